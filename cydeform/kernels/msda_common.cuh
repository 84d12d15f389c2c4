// Shared device helpers of the multi-scale deformable attention kernels.
//
// Axis letters: N batch, S value positions, M heads, D channels per head, Lq queries,
// L levels, P points per head and level. Layouts (row-major):
//   value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2) as (x, y),
//   attention_weights (N, Lq, M, L, P), output (N, Lq, M*D),
//   levels (L, 4) int64 rows (H_l, W_l, start_l, cell_start_l).
//
// The files are concatenated by cydeform._cuda.kernel_source() and compiled with
// NVRTC, which ships no CUDA headers: half and bfloat16 are our own 16-bit structs.
// The same text also compiles as host C++ (tests/cuda_host), so everything device
// specific sits behind __CUDA_ARCH__ with a portable fallback.
#ifndef CYDEFORM_MSDA_COMMON_CUH
#define CYDEFORM_MSDA_COMMON_CUH

struct cyd_half { unsigned short bits; };
struct cyd_bf16 { unsigned short bits; };

// Accumulator type: float for float/half/bfloat16, double for double.
template <typename T> struct AccOf { typedef float type; };
template <> struct AccOf<double> { typedef double type; };

// ---- scalar conversions -----------------------------------------------------------

__device__ __forceinline__ float cyd_half_to_float(unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const unsigned sign = (unsigned)(h & 0x8000u) << 16;
    const unsigned exp = (h >> 10) & 0x1fu;
    const unsigned mant = h & 0x3ffu;
    if (exp == 0) {  // zero or subnormal: mant * 2^-24 is exact in float
        const float mag = (float)mant * 5.9604644775390625e-8f;
        return __uint_as_float(sign | __float_as_uint(mag));
    }
    if (exp == 31) return __uint_as_float(sign | 0x7f800000u | (mant << 13));
    return __uint_as_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

__device__ __forceinline__ unsigned short cyd_float_to_half(float f) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    // Round to nearest even, like cvt.rn.f16.f32.
    const unsigned u = __float_as_uint(f);
    const unsigned sign = (u >> 16) & 0x8000u;
    const unsigned a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)(sign | 0x7e00u);   // NaN
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (a < 0x38800000u) {  // below 2^-14: half subnormal (or zero), step 2^-24
        const float scaled = __uint_as_float(a) * 16777216.0f;  // exact
        return (unsigned short)(sign | (unsigned)rintf(scaled));
    }
    const unsigned r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;  // rebias 127 -> 15
    return (unsigned short)(sign | (r >> 13));
#endif
}

__device__ __forceinline__ float cyd_bf16_to_float(unsigned short b) {
    return __uint_as_float((unsigned)b << 16);
}

__device__ __forceinline__ unsigned short cyd_float_to_bf16(float f) {
    // Round to nearest even on the bits; works on every architecture (sm_70 has no cvt.bf16).
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

// Element conversions between a storage type T and its accumulator type.
template <typename T> struct Conv;
template <> struct Conv<float> {
    static __device__ __forceinline__ float load(float v) { return v; }
    static __device__ __forceinline__ float ldg(const float* p) { return __ldg(p); }
    static __device__ __forceinline__ float store(float v) { return v; }
    static __device__ __forceinline__ void unpack16(uint4 u, float (&o)[4]) {
        o[0] = __uint_as_float(u.x); o[1] = __uint_as_float(u.y);
        o[2] = __uint_as_float(u.z); o[3] = __uint_as_float(u.w);
    }
    static __device__ __forceinline__ uint4 pack16(const float (&v)[4]) {
        uint4 u;
        u.x = __float_as_uint(v[0]); u.y = __float_as_uint(v[1]);
        u.z = __float_as_uint(v[2]); u.w = __float_as_uint(v[3]);
        return u;
    }
};
template <> struct Conv<double> {
    static __device__ __forceinline__ double load(double v) { return v; }
    static __device__ __forceinline__ double ldg(const double* p) { return __ldg(p); }
    static __device__ __forceinline__ double store(double v) { return v; }
    static __device__ __forceinline__ void unpack16(uint4 u, double (&o)[2]) {
        o[0] = __hiloint2double((int)u.y, (int)u.x);
        o[1] = __hiloint2double((int)u.w, (int)u.z);
    }
    static __device__ __forceinline__ uint4 pack16(const double (&v)[2]) {
        uint4 u;
        u.x = (unsigned)__double2loint(v[0]); u.y = (unsigned)__double2hiint(v[0]);
        u.z = (unsigned)__double2loint(v[1]); u.w = (unsigned)__double2hiint(v[1]);
        return u;
    }
};
template <> struct Conv<cyd_half> {
    static __device__ __forceinline__ float load(cyd_half v) { return cyd_half_to_float(v.bits); }
    static __device__ __forceinline__ float ldg(const cyd_half* p) {
        return cyd_half_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
    }
    static __device__ __forceinline__ cyd_half store(float v) { cyd_half h; h.bits = cyd_float_to_half(v); return h; }
    static __device__ __forceinline__ void unpack16(uint4 u, float (&o)[8]) {
        const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            o[2 * i] = cyd_half_to_float((unsigned short)(w[i] & 0xffffu));
            o[2 * i + 1] = cyd_half_to_float((unsigned short)(w[i] >> 16));
        }
    }
    static __device__ __forceinline__ uint4 pack16(const float (&v)[8]) {
        unsigned w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            w[i] = (unsigned)cyd_float_to_half(v[2 * i]) | ((unsigned)cyd_float_to_half(v[2 * i + 1]) << 16);
        uint4 u;
        u.x = w[0]; u.y = w[1]; u.z = w[2]; u.w = w[3];
        return u;
    }
};
template <> struct Conv<cyd_bf16> {
    static __device__ __forceinline__ float load(cyd_bf16 v) { return cyd_bf16_to_float(v.bits); }
    static __device__ __forceinline__ float ldg(const cyd_bf16* p) {
        return cyd_bf16_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
    }
    static __device__ __forceinline__ cyd_bf16 store(float v) { cyd_bf16 h; h.bits = cyd_float_to_bf16(v); return h; }
    static __device__ __forceinline__ void unpack16(uint4 u, float (&o)[8]) {
        const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            o[2 * i] = cyd_bf16_to_float((unsigned short)(w[i] & 0xffffu));
            o[2 * i + 1] = cyd_bf16_to_float((unsigned short)(w[i] >> 16));
        }
    }
    static __device__ __forceinline__ uint4 pack16(const float (&v)[8]) {
        unsigned w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
            w[i] = (unsigned)cyd_float_to_bf16(v[2 * i]) | ((unsigned)cyd_float_to_bf16(v[2 * i + 1]) << 16);
        uint4 u;
        u.x = w[0]; u.y = w[1]; u.z = w[2]; u.w = w[3];
        return u;
    }
};

__device__ __forceinline__ bool cyd_isfinite(float v) { return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u; }
__device__ __forceinline__ bool cyd_isfinite(double v) {
    return (__double_as_longlong(v) & 0x7ff0000000000000LL) != 0x7ff0000000000000LL;
}
__device__ __forceinline__ float cyd_nan(float) { return __uint_as_float(0x7fc00000u); }
__device__ __forceinline__ double cyd_nan(double) { return __longlong_as_double(0x7ff8000000000000LL); }

__host__ __device__ constexpr int cyd_log2(int v) { return v <= 1 ? 0 : 1 + cyd_log2(v >> 1); }

// ---- sampling geometry ------------------------------------------------------------

// Bilinear footprint of one sampling point on a level of H x W texels.
template <typename A>
struct Sample {
    bool finite;   // both coordinates finite (else the (n, q, m) row is NaN)
    bool inside;   // finite and -1 <= x < W and -1 <= y < H: touches at least one texel
    int x0, y0;    // top-left corner (may be -1); valid only when inside
    A lx, ly, hx, hy;
};

// x = loc_x * W - 0.5, y = loc_y * H - 0.5 (texel centres at integers), computed in
// float64 for every dtype: for float32/half inputs the product is then exact, so the
// cell (floor) of a point is the one cydeform.reference and the CPU backend pick, bit
// for bit (the location gradient jumps between cells). It costs a few float64
// operations per point and lane. The range check runs in floating point before any
// conversion to int: floor(NaN) or floor(1e30) cast to int is undefined behaviour.
// x == -1 is inside: its cell [-1, 0) has a texel, and the location gradient there is
// that cell's (as in cydeform.reference).
template <typename A>
__device__ __forceinline__ Sample<A> sample_geometry(A loc_x, A loc_y, int H, int W) {
    Sample<A> s;
    s.finite = cyd_isfinite(loc_x) && cyd_isfinite(loc_y);
    // No FMA contraction: x must round exactly like the reference's loc * W - 0.5.
    const double x = __dmul_rn((double)loc_x, (double)W) - 0.5;
    const double y = __dmul_rn((double)loc_y, (double)H) - 0.5;
    s.inside = s.finite && x >= -1.0 && x < (double)W && y >= -1.0 && y < (double)H;
    s.x0 = 0; s.y0 = 0;
    s.lx = 0; s.ly = 0; s.hx = 0; s.hy = 0;
    if (s.inside) {
        const double fx = floor(x), fy = floor(y);
        s.x0 = (int)fx; s.y0 = (int)fy;
        s.lx = (A)(x - fx); s.ly = (A)(y - fy);
        s.hx = (A)1 - s.lx; s.hy = (A)1 - s.ly;
    }
    return s;
}

// ---- channel chunks -----------------------------------------------------------------
//
// A chunk is C consecutive channels of one (n, s or q, m) row. With VEC the chunk is
// 16 bytes and is moved with one 16-byte access (callers guarantee alignment); without
// VEC it is C scalar accesses and `count` (<= C) channels are valid.

template <typename T, int C, bool VEC, typename A>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, int count, A (&out)[C]) {
    if constexpr (VEC) {
        static_assert(sizeof(T) * C == 16, "a vector chunk is 16 bytes");
        Conv<T>::unpack16(__ldg(reinterpret_cast<const uint4*>(p)), out);
    } else {
#pragma unroll
        for (int c = 0; c < C; ++c) out[c] = c < count ? Conv<T>::ldg(p + c) : (A)0;
    }
}

template <typename T, int C, bool VEC, typename A>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, int count, const A (&v)[C]) {
    if constexpr (VEC) {
        *reinterpret_cast<uint4*>(p) = Conv<T>::pack16(v);
    } else {
#pragma unroll
        for (int c = 0; c < C; ++c)
            if (c < count) p[c] = Conv<T>::store(v[c]);
    }
}

// grad_value accumulation: p[c] += v[c] with atomics (float or double buffer). On sm_90
// a 16-byte-aligned float chunk goes out as vector reductions (red.global.add.v4.f32):
// a quarter of the atomic instructions.
template <int C, bool VEC>
__device__ __forceinline__ void atomic_add_chunk(float* p, int count, const float (&v)[C]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (VEC && C % 4 == 0) {
#pragma unroll
        for (int c = 0; c < C; c += 4)
            asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};"
                         :: "l"(p + c), "f"(v[c]), "f"(v[c + 1]), "f"(v[c + 2]), "f"(v[c + 3]) : "memory");
        return;
    }
#endif
#pragma unroll
    for (int c = 0; c < C; ++c)
        if (VEC || c < count) atomicAdd(p + c, v[c]);
}

template <int C, bool VEC>
__device__ __forceinline__ void atomic_add_chunk(double* p, int count, const double (&v)[C]) {
#pragma unroll
    for (int c = 0; c < C; ++c)
        if (VEC || c < count) atomicAdd(p + c, v[c]);
}

// Sum over the G lanes of a channel group (G a power of two <= 32, groups aligned in
// the warp). Butterfly shuffles: every lane ends with the same total, no barrier. All
// 32 lanes of the warp must call it together (never from divergent code).
template <typename A>
__device__ __forceinline__ A group_sum(A v, int G) {
    for (int o = G >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

#endif  // CYDEFORM_MSDA_COMMON_CUH
