// Run CUDA kernel source on the CPU, for tests on machines without a GPU.
//
// Defines the CUDA keywords, built-in variables and intrinsics used by
// cydeform/kernels as plain C++, and a launcher that runs a grid block by block and
// each warp's 32 lanes as cooperative fibers (ucontext): a warp shuffle parks the
// calling lane until every lane of the warp has reached a shuffle, then exchanges the
// values, so shuffle reductions behave as on the GPU. The launcher also reports
// misuse a GPU would punish silently: a shuffle whose mask names a lane that has
// exited or waits at a different shuffle (divergent code).
//
// Everything runs on one OS thread, so atomicAdd is a plain read-modify-write.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>
#include <ucontext.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
    unsigned x, y, z;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline double __longlong_as_double(long long v) { double d; std::memcpy(&d, &v, 8); return d; }
inline long long __double_as_longlong(double d) { long long v; std::memcpy(&v, &d, 8); return v; }
inline double __hiloint2double(int hi, int lo) {
    return __longlong_as_double((long long)(((unsigned long long)(unsigned)hi << 32) | (unsigned)lo));
}
inline int __double2loint(double d) { return (int)(unsigned)(__double_as_longlong(d) & 0xffffffffu); }
inline int __double2hiint(double d) { return (int)(unsigned)((unsigned long long)__double_as_longlong(d) >> 32); }
// The harness is built with -ffp-contract=off, so these are single roundings as on the GPU.
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float atomicAdd(float* p, float v) { const float old = *p; *p = old + v; return old; }
inline double atomicAdd(double* p, double v) { const double old = *p; *p = old + v; return old; }

namespace cyd_host {

constexpr int kWarp = 32;
constexpr size_t kStack = 256 * 1024;

enum LaneState { kRunnable, kAtShuffle, kDone };

struct Lane {
    ucontext_t ctx;
    dim3 tid;
    LaneState state;
    unsigned mask;
    int src;              // lane whose value this lane receives
    const void* site;     // return address of the shuffle call, to catch divergent shuffles
    unsigned char value[8];
    unsigned char result[8];
};

inline Lane* g_lane = nullptr;
inline ucontext_t g_scheduler;
inline std::function<void()> g_body;
inline std::string g_error;
inline dim3 g_blockIdx, g_blockDim, g_gridDim;

inline void fail(const std::string& msg) {
    if (g_error.empty()) g_error = msg;
}

inline void lane_entry() {
    g_body();
    g_lane->state = kDone;  // uc_link returns to the scheduler
}

template <typename V>
__attribute__((noinline)) V shuffle(unsigned mask, V v, int src, const void* site) {
    static_assert(sizeof(V) <= 8, "shuffle of at most 8 bytes");
    Lane* me = g_lane;
    std::memcpy(me->value, &v, sizeof(V));
    me->mask = mask;
    me->src = src;
    me->site = site;
    me->state = kAtShuffle;
    swapcontext(&me->ctx, &g_scheduler);
    V r;
    std::memcpy(&r, me->result, sizeof(V));
    return r;
}

inline int lane_id() {
    const dim3 t = g_lane->tid;
    return (int)((t.x + g_blockDim.x * (t.y + g_blockDim.y * t.z)) % kWarp);
}

// Run one warp's lanes until all have finished, resolving shuffles in rounds.
inline void run_warp(std::vector<Lane>& lanes, std::vector<std::vector<char>>& stacks, int count) {
    for (int i = 0; i < count; ++i) {
        Lane& ln = lanes[i];
        getcontext(&ln.ctx);
        ln.ctx.uc_stack.ss_sp = stacks[i].data();
        ln.ctx.uc_stack.ss_size = stacks[i].size();
        ln.ctx.uc_link = &g_scheduler;
        ln.state = kRunnable;
        makecontext(&ln.ctx, lane_entry, 0);
    }
    for (;;) {
        for (int i = 0; i < count; ++i) {
            if (lanes[i].state != kRunnable) continue;
            g_lane = &lanes[i];
            swapcontext(&g_scheduler, &lanes[i].ctx);
        }
        unsigned waiting = 0;
        for (int i = 0; i < count; ++i)
            if (lanes[i].state == kAtShuffle) waiting |= 1u << i;
        if (!waiting) return;
        const Lane* first = nullptr;
        for (int i = 0; i < count; ++i) {
            Lane& ln = lanes[i];
            if (ln.state != kAtShuffle) continue;
            if (!first) first = &ln;
            if (ln.mask != waiting)
                fail("shuffle mask " + std::to_string(ln.mask) + " differs from the lanes at a shuffle (" +
                     std::to_string(waiting) + "): a lane exited or diverged");
            if (ln.site != first->site) fail("lanes of one warp wait at different shuffles (divergent code)");
            if (ln.src < 0 || ln.src >= count || !(waiting & (1u << ln.src)))
                fail("shuffle reads lane " + std::to_string(ln.src) + " which is not at the shuffle");
        }
        for (int i = 0; i < count; ++i) {
            Lane& ln = lanes[i];
            if (ln.state != kAtShuffle) continue;
            const int s = (ln.src >= 0 && ln.src < count) ? ln.src : i;
            std::memcpy(ln.result, lanes[s].value, 8);
        }
        for (int i = 0; i < count; ++i)
            if (lanes[i].state == kAtShuffle) lanes[i].state = kRunnable;
        if (!g_error.empty()) return;  // the kernel's results are meaningless now
    }
}

// Launch a 1-D grid; argv[i] points at the value of kernel argument i.
template <typename... Args, size_t... I>
void call_kernel(void (*kernel)(Args...), void** argv, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_reference_t<Args>*>(argv[I])...);
}

template <typename... Args>
int launch(void (*kernel)(Args...), unsigned grid, unsigned block, void** argv) {
    g_error.clear();
    g_gridDim = dim3{grid, 1, 1};
    g_blockDim = dim3{block, 1, 1};
    g_body = [=]() { call_kernel(kernel, argv, std::index_sequence_for<Args...>{}); };
    std::vector<Lane> lanes(kWarp);
    std::vector<std::vector<char>> stacks(kWarp, std::vector<char>(kStack));
    for (unsigned b = 0; b < grid && g_error.empty(); ++b) {
        g_blockIdx = dim3{b, 0, 0};
        for (unsigned w = 0; w * kWarp < block && g_error.empty(); ++w) {
            const int count = (int)std::min<unsigned>(kWarp, block - w * kWarp);
            for (int i = 0; i < count; ++i) lanes[i].tid = dim3{w * kWarp + i, 0, 0};
            run_warp(lanes, stacks, count);
        }
    }
    return g_error.empty() ? 0 : 1;
}

}  // namespace cyd_host

#define threadIdx (::cyd_host::g_lane->tid)
#define blockIdx (::cyd_host::g_blockIdx)
#define blockDim (::cyd_host::g_blockDim)
#define gridDim (::cyd_host::g_gridDim)

template <typename V>
__attribute__((noinline)) V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
    const int lane = cyd_host::lane_id();
    const int src = (lane & ~(width - 1)) | ((lane ^ lane_mask) & (width - 1));
    return cyd_host::shuffle(mask, v, src, __builtin_return_address(0));
}

template <typename V>
__attribute__((noinline)) V __shfl_sync(unsigned mask, V v, int src_lane, int width = 32) {
    const int lane = cyd_host::lane_id();
    const int src = (lane & ~(width - 1)) | (src_lane & (width - 1));
    return cyd_host::shuffle(mask, v, src, __builtin_return_address(0));
}

template <typename V>
__attribute__((noinline)) V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = 32) {
    const int lane = cyd_host::lane_id();
    const int src = (lane % width) + (int)delta < width ? lane + (int)delta : lane;
    return cyd_host::shuffle(mask, v, src, __builtin_return_address(0));
}
