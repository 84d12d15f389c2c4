/* Inner loops of the Cython CPU backend (src/_cpu_impl.pxi) over the D channels of one
 * head, and the sparse backward's geometry over a row's points (at the end).
 *
 * They live in C for `restrict`, which Cython cannot spell: it tells the compiler that
 * the rows written never overlap the rows read, so the loops vectorise without run-time
 * overlap checks. Read-only pointers may coincide (corners outside the map all read one
 * zero row), which restrict allows; written pointers never do.
 *
 * Every sum has a fixed order that does not depend on the vector width, so each ISA
 * build of the backend (baseline, AVX2, AVX-512, all with -ffp-contract=off) and every
 * thread count give bit-identical results.
 *
 * With GCC/Clang, channels go CYD_LANES at a time through explicit vector types (8
 * floats: one AVX2 register, two SSE ones, half an AVX-512 one; the forward's
 * accumulation takes a whole AVX-512 register, CYD_ACC_LANES). Left to plain loops,
 * GCC vectorised the channel loops across the wrong axis (shuffles and stack spills,
 * measured 2026-12-03). Elsewhere, plain loops with the same element-wise arithmetic.
 */
#ifndef CYDEFORM_MSDA_INNER_H
#define CYDEFORM_MSDA_INNER_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#if defined(_MSC_VER) && !defined(__clang__)
#define restrict __restrict  /* MSVC's C mode spells C99 restrict this way */
#endif

#define CYD_LANES 8
/* Points a step of the AVX-512 forward (cyd_forward_points): _BLOCK of src/_cpu_impl.pxi. */
#define CYD_FWD_BLOCK 64

/* cyd_prefetch_row: ask for a corner row (up to 128 bytes) before a loop needs it;
 * cyd_prefetch_row_write: the same, for a row about to be written.
 * cyd_prefetch_line: ask for one 64-byte line (into the L1).
 * cyd_prefetch_line_l2: ask for one 64-byte line a whole block ahead, into the L2 only
 * (prefetcht2 on x86: the sparse backward's next block of value, 1-6 % faster at 1 thread
 * than into the L1, benchmarks/cpu_log.md 30). */
#if defined(__GNUC__)
#define cyd_prefetch_line_l2(p) __builtin_prefetch((const char *)(p), 0, 1)
#define cyd_prefetch_line(p) __builtin_prefetch((const char *)(p))
#define cyd_prefetch_write(p) __builtin_prefetch((const char *)(p), 1)
#define cyd_prefetch_row(p) (__builtin_prefetch((const char *)(p)), __builtin_prefetch((const char *)(p) + 64))
#define cyd_prefetch_row_write(p) \
    (__builtin_prefetch((const char *)(p), 1), __builtin_prefetch((const char *)(p) + 64, 1))
#else
#define cyd_prefetch_line_l2(p) ((void)(p))
#define cyd_prefetch_line(p) ((void)(p))
#define cyd_prefetch_write(p) ((void)(p))
#define cyd_prefetch_row(p) ((void)(p))
#define cyd_prefetch_row_write(p) ((void)(p))
#endif

/* The value of *counter, which is incremented, atomically: phase 3 of the sparse
 * backward hands out its blocks this way (dynamic scheduling). */
#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
static inline int64_t cyd_claim(int64_t *counter) {
    return _InterlockedExchangeAdd64((volatile __int64 *)counter, 1);
}
#elif defined(__GNUC__)
static inline int64_t cyd_claim(int64_t *counter) {
    return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
}
#else
static inline int64_t cyd_claim(int64_t *counter) {
    int64_t old;
#if defined(_OPENMP)
#pragma omp atomic capture
#endif
    old = (*counter)++;
    return old;
}
#endif

/* A barrier of the enclosing OpenMP parallel region (nothing without OpenMP): Cython
 * compiles a prange inside `with parallel()` as `omp for nowait`, so the phases of a
 * parallel region need their own barriers between them. */
#if defined(_OPENMP) && defined(_MSC_VER) && !defined(__clang__)
static inline void cyd_barrier(void) { __pragma(omp barrier) }
#elif defined(_OPENMP)
static inline void cyd_barrier(void) { _Pragma("omp barrier") }
#else
static inline void cyd_barrier(void) {}
#endif

/* dst[0:n] = src[0:n] (bytes) for the short per-row copies of the head-major paths
 * (_rows_in, _rows_out: 64-256 bytes a row, five rows per row of the backward): inline
 * fixed-size moves instead of a call to memcpy per row, 1.08-1.16x on the encoder
 * backward (benchmarks/cpu_log.md 96). */
static inline void cyd_copy_short(void *dst, const void *src, size_t n) {
    char *d = (char *)dst;
    const char *s = (const char *)src;
    for (; n >= 32; n -= 32, d += 32, s += 32) memcpy(d, s, 32);
    for (; n >= 4; n -= 4, d += 4, s += 4) memcpy(d, s, 4);
    for (; n > 0; --n) *d++ = *s++;
}

/* dst[0:n] = src[0:n] (bytes), then src[0:n] = 0; on x86-64 the 64-byte-aligned part of dst with
 * non-temporal stores (elsewhere a plain memcpy): written straight to memory, without
 * first reading the destination's lines into the cache (half the memory traffic of a
 * plain copy into cold memory) and without evicting what the cache holds. Ends with a
 * store fence, so the data is ordered before whatever the caller does next (another
 * thread may read it after the parallel region's barrier). */
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>  /* SSE2, part of x86-64: non-temporal 16-byte stores */
#endif
static inline void cyd_stream_copy_zero(void *dst, void *src, size_t n) {
#if defined(__x86_64__) || defined(_M_X64)
    char *d = (char *)dst;
    char *s = (char *)src;
    size_t head = (size_t)((64 - (uintptr_t)d % 64) % 64);
    if (head > n) head = n;
    memcpy(d, s, head);
    memset(s, 0, head);
    d += head; s += head; n -= head;
    const __m128i z = _mm_setzero_si128();
    for (; n >= 64; n -= 64, d += 64, s += 64)
        for (int k = 0; k < 64; k += 16) {
            _mm_stream_si128((__m128i *)(d + k), _mm_loadu_si128((const __m128i *)(s + k)));
            _mm_storeu_si128((__m128i *)(s + k), z);
        }
    memcpy(d, s, n);
    memset(s, 0, n);
    _mm_sfence();
#else
    memcpy(dst, src, n);
    memset(src, 0, n);
#endif
}

#if defined(__GNUC__)
/* ------------------------------------------------------------------ vector types */
/* The helpers are static inline: passing vectors by value has no ABI to keep. */
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float cyd_lanes_f __attribute__((vector_size(CYD_LANES * sizeof(float))));
typedef double cyd_lanes_d __attribute__((vector_size(CYD_LANES * sizeof(double))));

/* The accumulation (cyd_accumulate_by) in vectors of its own width: a whole AVX-512
 * register of floats where the build has one (twice the backward's 8 lanes, whose count
 * fixes the order of its dot products' sums; here every out[d] is its own sum, in sample
 * order, whatever the width: the same bits). cyd_acc_blockU: channels [d, d + U
 * CYD_ACC_LANES) of one call, ``out`` already offset (benchmarks/cpu_log.md 89, 95). */
#if defined(__AVX512F__)
#define CYD_ACC_LANES_f 16
#else
#define CYD_ACC_LANES_f 8
#endif
#define CYD_ACC_LANES_d 8
typedef float cyd_acc_f __attribute__((vector_size(CYD_ACC_LANES_f * sizeof(float))));
typedef double cyd_acc_d __attribute__((vector_size(CYD_ACC_LANES_d * sizeof(double))));
#define CYD_ACC_BLOCK(T, SUF, U)                                                              \
static inline void cyd_acc_block##U##_##SUF(T *restrict out, const T *const *restrict ptr,    \
        const T *restrict w, ptrdiff_t npts, ptrdiff_t d, ptrdiff_t ps, ptrdiff_t cs) {       \
    cyd_acc_##SUF acc[U];                                                                     \
    for (int u = 0; u < U; ++u)                                                               \
        __builtin_memcpy(&acc[u], out + u * CYD_ACC_LANES_##SUF, sizeof acc[u]);              \
    for (ptrdiff_t k = 0; k < npts; ++k) {                                                    \
        const T *p0 = ptr[ps * k] + d, *p1 = ptr[ps * k + cs] + d;                            \
        const T *p2 = ptr[ps * k + 2 * cs] + d, *p3 = ptr[ps * k + 3 * cs] + d;               \
        T w0 = w[ps * k], w1 = w[ps * k + cs], w2 = w[ps * k + 2 * cs], w3 = w[ps * k + 3 * cs]; \
        for (int u = 0; u < U; ++u) {                                                         \
            int o = u * CYD_ACC_LANES_##SUF;                                                  \
            cyd_acc_##SUF v0, v1, v2, v3;                                                     \
            __builtin_memcpy(&v0, p0 + o, sizeof v0);                                         \
            __builtin_memcpy(&v1, p1 + o, sizeof v1);                                         \
            __builtin_memcpy(&v2, p2 + o, sizeof v2);                                         \
            __builtin_memcpy(&v3, p3 + o, sizeof v3);                                         \
            acc[u] += w0 * v0 + w1 * v1 + w2 * v2 + w3 * v3;                                  \
        }                                                                                     \
    }                                                                                         \
    for (int u = 0; u < U; ++u)                                                               \
        __builtin_memcpy(out + u * CYD_ACC_LANES_##SUF, &acc[u], sizeof acc[u]);              \
}
CYD_ACC_BLOCK(float, f, 4)
CYD_ACC_BLOCK(float, f, 2)
CYD_ACC_BLOCK(float, f, 1)
CYD_ACC_BLOCK(double, d, 4)
CYD_ACC_BLOCK(double, d, 2)
CYD_ACC_BLOCK(double, d, 1)

#define CYD_DEFINE_INNER(T, SUF)                                                              \
static inline cyd_lanes_##SUF cyd_load_##SUF(const T *p) {                                    \
    cyd_lanes_##SUF v;                                                                        \
    __builtin_memcpy(&v, p, sizeof v);                                                        \
    return v;                                                                                 \
}                                                                                             \
static inline void cyd_store_##SUF(T *p, cyd_lanes_##SUF v) { __builtin_memcpy(p, &v, sizeof v); } \
/* One block of a row's samples: out[d] += sum_k (w0 v0[d] + w1 v1[d] + w2 v2[d] + w3 v3[d])  \
 * with sample k's corner rows at ptr[ps k + cs c] and weights (attention included) at       \
 * w[ps k + cs c] (cyd_accumulate: ps = 4, cs = 1; cyd_accumulate_planar: by corner, ps = 1, \
 * cs = CYD_FWD_BLOCK). Every out[d] is summed in sample order, the same as one sample at a   \
 * time; up to 4 x CYD_ACC_LANES channels stay in registers across all samples. */          \
static inline void cyd_accumulate_by_##SUF(T *restrict out, const T *const *restrict ptr,     \
                                           const T *restrict w, ptrdiff_t npts, ptrdiff_t D,   \
                                           ptrdiff_t ps, ptrdiff_t cs) {                       \
    ptrdiff_t d = 0;                                                                          \
    for (; d + 4 * CYD_ACC_LANES_##SUF <= D; d += 4 * CYD_ACC_LANES_##SUF)                    \
        cyd_acc_block4_##SUF(out + d, ptr, w, npts, d, ps, cs);                               \
    for (; d + 2 * CYD_ACC_LANES_##SUF <= D; d += 2 * CYD_ACC_LANES_##SUF)                    \
        cyd_acc_block2_##SUF(out + d, ptr, w, npts, d, ps, cs);                               \
    for (; d + CYD_ACC_LANES_##SUF <= D; d += CYD_ACC_LANES_##SUF)                            \
        cyd_acc_block1_##SUF(out + d, ptr, w, npts, d, ps, cs);                               \
    for (; d < D; ++d) {                                                                      \
        T acc = out[d];                                                                       \
        for (ptrdiff_t k = 0; k < npts; ++k)                                                  \
            acc += w[ps * k] * ptr[ps * k][d] + w[ps * k + cs] * ptr[ps * k + cs][d]          \
                 + w[ps * k + 2 * cs] * ptr[ps * k + 2 * cs][d]                               \
                 + w[ps * k + 3 * cs] * ptr[ps * k + 3 * cs][d];                              \
        out[d] = acc;                                                                         \
    }                                                                                         \
}                                                                                             \
/* Backward of one sample in one pass over d:                                                 \
 *   lanes[8c + j] = sum_{d = j mod 8} g[d] vc[d]   (partial sums of the four dot products   \
 *                                                    every scalar gradient needs; the tail   \
 *                                                    d >= D - D % 8 goes to lane 0)          \
 *   gvc[d] += awc g[d]                  (scatter into the four corner rows of grad_value)    \
 * cyd_reduce_lanes sums the lanes later: a block's samples first all issue their loads,     \
 * then all reduce, so more of their cache misses overlap (measured 2026-12-03). */          \
static inline void cyd_sample_backward_##SUF(                                                     \
        const T *restrict g, const T *restrict v0, const T *restrict v1,                      \
        const T *restrict v2, const T *restrict v3, T *restrict gv0, T *restrict gv1,         \
        T *restrict gv2, T *restrict gv3, T aw0, T aw1, T aw2, T aw3, ptrdiff_t D,            \
        T *restrict lanes) {                                                                  \
    cyd_lanes_##SUF a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                   \
    ptrdiff_t d = 0;                                                                          \
    for (; d + CYD_LANES <= D; d += CYD_LANES) {                                              \
        cyd_lanes_##SUF gd = cyd_load_##SUF(g + d);                                           \
        a0 += gd * cyd_load_##SUF(v0 + d);                                                    \
        a1 += gd * cyd_load_##SUF(v1 + d);                                                    \
        a2 += gd * cyd_load_##SUF(v2 + d);                                                    \
        a3 += gd * cyd_load_##SUF(v3 + d);                                                    \
        cyd_store_##SUF(gv0 + d, cyd_load_##SUF(gv0 + d) + aw0 * gd);                         \
        cyd_store_##SUF(gv1 + d, cyd_load_##SUF(gv1 + d) + aw1 * gd);                         \
        cyd_store_##SUF(gv2 + d, cyd_load_##SUF(gv2 + d) + aw2 * gd);                         \
        cyd_store_##SUF(gv3 + d, cyd_load_##SUF(gv3 + d) + aw3 * gd);                         \
    }                                                                                         \
    for (; d < D; ++d) {                                                                      \
        T gj = g[d];                                                                          \
        a0[0] += gj * v0[d];                                                                  \
        a1[0] += gj * v1[d];                                                                  \
        a2[0] += gj * v2[d];                                                                  \
        a3[0] += gj * v3[d];                                                                  \
        gv0[d] += aw0 * gj;                                                                   \
        gv1[d] += aw1 * gj;                                                                   \
        gv2[d] += aw2 * gj;                                                                   \
        gv3[d] += aw3 * gj;                                                                   \
    }                                                                                         \
    cyd_store_##SUF(lanes, a0);                                                               \
    cyd_store_##SUF(lanes + CYD_LANES, a1);                                                   \
    cyd_store_##SUF(lanes + 2 * CYD_LANES, a2);                                               \
    cyd_store_##SUF(lanes + 3 * CYD_LANES, a3);                                               \
}                                                                                             \
/* One corner's dot product g . v for the sparse backward, summed as cyd_sample_backward    \
 * sums it (lanes in d order, the tail in lane 0) and reduced as cyd_reduce_lanes does:      \
 * the same bits as that corner's dots[c]. */                                                 \
static inline double cyd_dot_##SUF(const T *restrict g, const T *restrict v, ptrdiff_t D) {   \
    cyd_lanes_##SUF a = {0};                                                                  \
    ptrdiff_t d = 0;                                                                          \
    for (; d + CYD_LANES <= D; d += CYD_LANES)                                                \
        a += cyd_load_##SUF(g + d) * cyd_load_##SUF(v + d);                                   \
    for (; d < D; ++d) a[0] += g[d] * v[d];                                                   \
    T lanes[CYD_LANES];                                                                       \
    cyd_store_##SUF(lanes, a);                                                                \
    double s = 0;                                                                             \
    for (int j = 0; j < CYD_LANES; ++j) s += lanes[j];                                        \
    return s;                                                                                 \
}                                                                                             \
/* out[d] += w x[d]: one corner's scatter of the sparse backward, the same arithmetic as     \
 * cyd_sample_backward's gv[d] += aw g[d]. */                                                 \
static inline void cyd_axpy_##SUF(T *restrict out, T w, const T *restrict x, ptrdiff_t D) {   \
    ptrdiff_t d = 0;                                                                          \
    for (; d + CYD_LANES <= D; d += CYD_LANES)                                                \
        cyd_store_##SUF(out + d, cyd_load_##SUF(out + d) + w * cyd_load_##SUF(x + d));        \
    for (; d < D; ++d) out[d] += w * x[d];                                                    \
}                                                                                             \
/* A placed record's phase-3 work in one pass over d, g loaded once (sparse backward):       \
 * dots[c] = g . vc as cyd_dot sums it, outc[d] += wc g[d] as cyd_axpy does, for c = 0,    \
 * and c = 1 too where pair: the same bits as those calls one after the other. */           \
static inline void cyd_record_##SUF(const T *restrict g, const T *restrict v0,                \
                                    const T *restrict v1, T *restrict out0, T *restrict out1, \
                                    T w0, T w1, int pair, ptrdiff_t D, double *restrict dots) { \
    if (!pair) {                                                                              \
        dots[0] = cyd_dot_##SUF(g, v0, D);                                                    \
        cyd_axpy_##SUF(out0, w0, g, D);                                                       \
        return;                                                                               \
    }                                                                                         \
    cyd_lanes_##SUF a0 = {0}, a1 = {0};                                                       \
    ptrdiff_t d = 0;                                                                          \
    for (; d + CYD_LANES <= D; d += CYD_LANES) {                                              \
        cyd_lanes_##SUF gd = cyd_load_##SUF(g + d);                                           \
        a0 += gd * cyd_load_##SUF(v0 + d);                                                    \
        a1 += gd * cyd_load_##SUF(v1 + d);                                                    \
        cyd_store_##SUF(out0 + d, cyd_load_##SUF(out0 + d) + w0 * gd);                        \
        cyd_store_##SUF(out1 + d, cyd_load_##SUF(out1 + d) + w1 * gd);                        \
    }                                                                                         \
    for (; d < D; ++d) {                                                                      \
        T gj = g[d];                                                                          \
        a0[0] += gj * v0[d];                                                                  \
        a1[0] += gj * v1[d];                                                                  \
        out0[d] += w0 * gj;                                                                   \
        out1[d] += w1 * gj;                                                                   \
    }                                                                                         \
    T l0[CYD_LANES], l1[CYD_LANES];                                                           \
    cyd_store_##SUF(l0, a0);                                                                  \
    cyd_store_##SUF(l1, a1);                                                                  \
    double s0 = 0, s1 = 0;                                                                    \
    for (int j = 0; j < CYD_LANES; ++j) {                                                     \
        s0 += l0[j];                                                                          \
        s1 += l1[j];                                                                          \
    }                                                                                         \
    dots[0] = s0;                                                                             \
    dots[1] = s1;                                                                             \
}

#else
/* ------------------------------------------------------------------ plain loops */
#define CYD_DEFINE_INNER(T, SUF)                                                              \
static inline void cyd_accumulate_by_##SUF(T *restrict out, const T *const *restrict ptr,     \
                                           const T *restrict w, ptrdiff_t npts, ptrdiff_t D,   \
                                           ptrdiff_t ps, ptrdiff_t cs) {                       \
    for (ptrdiff_t d = 0; d < D; ++d) {                                                       \
        T acc = out[d];                                                                       \
        for (ptrdiff_t k = 0; k < npts; ++k)                                                  \
            acc += w[ps * k] * ptr[ps * k][d] + w[ps * k + cs] * ptr[ps * k + cs][d]          \
                 + w[ps * k + 2 * cs] * ptr[ps * k + 2 * cs][d]                               \
                 + w[ps * k + 3 * cs] * ptr[ps * k + 3 * cs][d];                              \
        out[d] = acc;                                                                         \
    }                                                                                         \
}                                                                                             \
static inline void cyd_sample_backward_##SUF(                                                     \
        const T *restrict g, const T *restrict v0, const T *restrict v1,                      \
        const T *restrict v2, const T *restrict v3, T *restrict gv0, T *restrict gv1,         \
        T *restrict gv2, T *restrict gv3, T aw0, T aw1, T aw2, T aw3, ptrdiff_t D,            \
        T *restrict lanes) {                                                                  \
    T a0[CYD_LANES] = {0}, a1[CYD_LANES] = {0}, a2[CYD_LANES] = {0}, a3[CYD_LANES] = {0};     \
    ptrdiff_t D8 = D - D % CYD_LANES, d;                                                      \
    for (d = 0; d < D8; d += CYD_LANES)                                                       \
        for (int j = 0; j < CYD_LANES; ++j) {                                                 \
            T gj = g[d + j];                                                                  \
            a0[j] += gj * v0[d + j];                                                          \
            a1[j] += gj * v1[d + j];                                                          \
            a2[j] += gj * v2[d + j];                                                          \
            a3[j] += gj * v3[d + j];                                                          \
            gv0[d + j] += aw0 * gj;                                                           \
            gv1[d + j] += aw1 * gj;                                                           \
            gv2[d + j] += aw2 * gj;                                                           \
            gv3[d + j] += aw3 * gj;                                                           \
        }                                                                                     \
    for (; d < D; ++d) {                                                                      \
        T gj = g[d];                                                                          \
        a0[0] += gj * v0[d];                                                                  \
        a1[0] += gj * v1[d];                                                                  \
        a2[0] += gj * v2[d];                                                                  \
        a3[0] += gj * v3[d];                                                                  \
        gv0[d] += aw0 * gj;                                                                   \
        gv1[d] += aw1 * gj;                                                                   \
        gv2[d] += aw2 * gj;                                                                   \
        gv3[d] += aw3 * gj;                                                                   \
    }                                                                                         \
    for (int j = 0; j < CYD_LANES; ++j) {                                                     \
        lanes[j] = a0[j]; lanes[CYD_LANES + j] = a1[j];                                       \
        lanes[2 * CYD_LANES + j] = a2[j]; lanes[3 * CYD_LANES + j] = a3[j];                   \
    }                                                                                         \
}                                                                                             \
static inline double cyd_dot_##SUF(const T *restrict g, const T *restrict v, ptrdiff_t D) {   \
    T a[CYD_LANES] = {0};                                                                     \
    ptrdiff_t D8 = D - D % CYD_LANES, d;                                                      \
    for (d = 0; d < D8; d += CYD_LANES)                                                       \
        for (int j = 0; j < CYD_LANES; ++j) a[j] += g[d + j] * v[d + j];                      \
    for (; d < D; ++d) a[0] += g[d] * v[d];                                                   \
    double s = 0;                                                                             \
    for (int j = 0; j < CYD_LANES; ++j) s += a[j];                                            \
    return s;                                                                                 \
}                                                                                             \
static inline void cyd_axpy_##SUF(T *restrict out, T w, const T *restrict x, ptrdiff_t D) {   \
    for (ptrdiff_t d = 0; d < D; ++d) out[d] += w * x[d];                                     \
}                                                                                             \
static inline void cyd_record_##SUF(const T *restrict g, const T *restrict v0,                \
                                    const T *restrict v1, T *restrict out0, T *restrict out1, \
                                    T w0, T w1, int pair, ptrdiff_t D, double *restrict dots) { \
    dots[0] = cyd_dot_##SUF(g, v0, D);                                                        \
    cyd_axpy_##SUF(out0, w0, g, D);                                                           \
    if (pair) {                                                                               \
        dots[1] = cyd_dot_##SUF(g, v1, D);                                                    \
        cyd_axpy_##SUF(out1, w1, g, D);                                                       \
    }                                                                                         \
}
#endif

#define CYD_DEFINE_ENTRY_POINTS(T, SUF)                                                       \
static inline void cyd_accumulate_##SUF(T *restrict out, const T *const *restrict ptr,        \
                                        const T *restrict w, ptrdiff_t npts, ptrdiff_t D) {    \
    cyd_accumulate_by_##SUF(out, ptr, w, npts, D, 4, 1);                                      \
}                                                                                             \
static inline void cyd_accumulate_planar_##SUF(T *restrict out, const T *const *restrict ptr, \
                                               const T *restrict w, ptrdiff_t npts, ptrdiff_t D) { \
    cyd_accumulate_by_##SUF(out, ptr, w, npts, D, 1, CYD_FWD_BLOCK);                          \
}                                                                                             \
/* dots[c] = lanes[8c] + ... + lanes[8c + 7], in double, in lane order. */                    \
static inline void cyd_reduce_lanes_##SUF(const T *restrict lanes, double *restrict dots) {   \
    for (int c = 0; c < 4; ++c) {                                                             \
        double s = 0;                                                                         \
        for (int j = 0; j < CYD_LANES; ++j) s += lanes[c * CYD_LANES + j];                    \
        dots[c] = s;                                                                          \
    }                                                                                         \
}

CYD_DEFINE_INNER(float, f)
CYD_DEFINE_INNER(double, d)
CYD_DEFINE_ENTRY_POINTS(float, f)
CYD_DEFINE_ENTRY_POINTS(double, d)

/* ------------------------------------------------------------------ sparse geometry */
/* Per point k of a row (its level l = k / P), the numbers of its level that the sparse
 * geometry needs; set up once a call (_sparse_levels in src/_cpu_impl.pxi). */
typedef struct {
    const int64_t *base;    /* starts[l] M: the key of the level's position 0 */
    const int64_t *WM;      /* W M: from a corner to the one below it */
    const double *Wd, *Hd;  /* the level's width and height W, H as doubles */
    const int32_t *Wi;      /* W as an int32 (only read where narrow) */
    int narrow;             /* every level has (H W + W + 1) M < 2^31: a corner's key
                               within its level, (y0 W + x0) M, fits an int32 */
} cyd_levels;

/* Phase 1 of the sparse backward for the n points of one row (_sparse_row in
 * src/_cpu_impl.pxi has the semantics): for point k, with key_nm + base[k] the
 * grad_value row of its level's position 0: keys[4k + c], the grad_value row of corner
 * c, or -1 outside the map; weights[4k + c] = (T)(a w_c); geo[2k : 2k + 2] = (lx, ly),
 * or lx = -1 with status[k] 0 (cell without texel) or -1 (location not finite);
 * status[k] = 1 otherwise.
 * Four points at a time through vector types in the AVX2 and AVX-512 builds (eight first
 * in the AVX-512 build: CYD_GEOMETRY_VECTOR8, at the end of this file), where the
 * compiler has __builtin_shufflevector (GCC >= 12, Clang) and the keys fit int32
 * arithmetic (lv->narrow): the same double arithmetic as one at a time (floor(x) as a
 * truncation and a correction, exact for the x in [-1, W) that get there), so the same
 * bits. Only what AVX has natively: no int64 multiply, no conversion between double
 * and int64, no vector wider than a register (with those, GCC 12's AVX2 code went lane
 * by lane and was slower than the scalar loop, benchmarks/cpu_log.md 44). */
#define CYD_GEOMETRY_ONE(T, k)                                                                \
    do {                                                                                      \
        double lxv = loc[2 * (k)], lyv = loc[2 * (k) + 1];                                    \
        int fin = (lxv - lxv == 0) && (lyv - lyv == 0);                                       \
        double Wf = lv->Wd[k], Hf = lv->Hd[k];                                                \
        double x = lxv * Wf - 0.5, y = lyv * Hf - 0.5;                                        \
        if (!fin || !(x >= -1.0 && x < Wf && y >= -1.0 && y < Hf)) {                          \
            status[k] = fin ? 0 : -1;                                                         \
            geo[2 * (k)] = -1;                                                                \
            keys[4 * (k)] = keys[4 * (k) + 1] = keys[4 * (k) + 2] = keys[4 * (k) + 3] = -1;   \
            break;                                                                            \
        }                                                                                     \
        double x0f = floor(x), y0f = floor(y);                                                \
        int64_t x0 = (int64_t)x0f, y0 = (int64_t)y0f;                                        \
        double lx = x - x0f, ly = y - y0f, a = attn[k];                                       \
        int iy0 = y0 >= 0, iy1 = y0f + 1.0 < Hf, ix0 = x0 >= 0, ix1 = x0f + 1.0 < Wf;         \
        int64_t b = key_nm + lv->base[k] + y0 * lv->WM[k] + x0 * M;                           \
        keys[4 * (k)] = iy0 && ix0 ? b : -1;                                                  \
        keys[4 * (k) + 1] = iy0 && ix1 ? b + M : -1;                                          \
        keys[4 * (k) + 2] = iy1 && ix0 ? b + lv->WM[k] : -1;                                  \
        keys[4 * (k) + 3] = iy1 && ix1 ? b + lv->WM[k] + M : -1;                              \
        weights[4 * (k)] = (T)(a * ((1.0 - ly) * (1.0 - lx)));                                \
        weights[4 * (k) + 1] = (T)(a * ((1.0 - ly) * lx));                                    \
        weights[4 * (k) + 2] = (T)(a * (ly * (1.0 - lx)));                                    \
        weights[4 * (k) + 3] = (T)(a * (ly * lx));                                            \
        geo[2 * (k)] = lx;                                                                    \
        geo[2 * (k) + 1] = ly;                                                                \
        status[k] = 1;                                                                        \
    } while (0)

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define CYD_HAVE_SHUFFLEVECTOR 1
#else
#define CYD_HAVE_SHUFFLEVECTOR 0
#endif
#if CYD_HAVE_SHUFFLEVECTOR && defined(__AVX__)
#define CYD_GEOMETRY_LANES 4
/* Four points a step: 4 doubles fill one AVX register (8 made GCC 12 compare lane by
 * lane on AVX2, which has no 512-bit vectors). */
typedef double cyd_v4d __attribute__((vector_size(4 * sizeof(double))));
typedef int64_t cyd_v4l __attribute__((vector_size(4 * sizeof(int64_t))));
typedef int32_t cyd_v4i __attribute__((vector_size(4 * sizeof(int32_t))));
typedef float cyd_v4f __attribute__((vector_size(4 * sizeof(float))));
#define CYD_LOAD(VT, p) ({ VT v_; __builtin_memcpy(&v_, (p), sizeof v_); v_; })
/* Four 4-lane vectors c0..c3 stored as out[4i + j] = cj[i] (a 4 x 4 transpose). */
#define CYD_STORE_4x4(out, c0, c1, c2, c3, VT)                                                \
    do {                                                                                      \
        VT lo01_ = __builtin_shufflevector(c0, c1, 0, 4, 1, 5);                               \
        VT hi01_ = __builtin_shufflevector(c0, c1, 2, 6, 3, 7);                               \
        VT lo23_ = __builtin_shufflevector(c2, c3, 0, 4, 1, 5);                               \
        VT hi23_ = __builtin_shufflevector(c2, c3, 2, 6, 3, 7);                               \
        VT o_[4] = {__builtin_shufflevector(lo01_, lo23_, 0, 1, 4, 5),                        \
                    __builtin_shufflevector(lo01_, lo23_, 2, 3, 6, 7),                        \
                    __builtin_shufflevector(hi01_, hi23_, 0, 1, 4, 5),                        \
                    __builtin_shufflevector(hi01_, hi23_, 2, 3, 6, 7)};                       \
        __builtin_memcpy(out, o_, sizeof o_);                                                 \
    } while (0)
/* T's 4-lane vector type: cyd_v4f for float, cyd_v4d for double. */
#define CYD_V4_f cyd_v4f
#define CYD_V4_d cyd_v4d

/* One step of NL points of the sparse geometry: VD, VL and VI are NL-lane vectors of
 * double, int64 and int32, VT of T; XY declares the points' lxv, lyv (as doubles) and a;
 * STORE writes four NL-lane vectors c0..c3 as out[4i + j] = cj[i]; GEO stores gx and ly
 * interleaved at geo + 2k. Used with 4 lanes (AVX2 and AVX-512 builds) and 8 (AVX-512). */
#define CYD_GEOMETRY_STEP(NL, VD, VL, VI, VT, XY, STORE, GEO)                                 \
    for (; lv->narrow && k + NL <= n; k += NL) {                                              \
        XY                                                                                    \
        VD Wf = CYD_LOAD(VD, lv->Wd + k), Hf = CYD_LOAD(VD, lv->Hd + k);                     \
        VL bk = CYD_LOAD(VL, lv->base + k) + key_nm;                                          \
        VL WM = CYD_LOAD(VL, lv->WM + k);                                                     \
        VI Wi = CYD_LOAD(VI, lv->Wi + k);                                                     \
        VL fin = (lxv - lxv == 0) & (lyv - lyv == 0);                                         \
        VD x = lxv * Wf - 0.5, y = lyv * Hf - 0.5;                                            \
        VL in = fin & (x >= -1.0) & (x < Wf) & (y >= -1.0) & (y < Hf);                        \
        /* 0 where out (so the conversions below are defined); those lanes are not kept. */   \
        x = (VD)((VL)x & in);                                                                 \
        y = (VD)((VL)y & in);                                                                 \
        const VD zero = {0}, one = zero + 1.0;                                                \
        /* floor: the truncation, less 1 where that is above x */                             \
        VD tx = __builtin_convertvector(__builtin_convertvector(x, VI), VD);                  \
        VD ty = __builtin_convertvector(__builtin_convertvector(y, VI), VD);                  \
        VD x0 = tx - (VD)((tx > x) & (VL)one);                                                \
        VD y0 = ty - (VD)((ty > y) & (VL)one);                                                \
        VD lx = x - x0, ly = y - y0;                                                          \
        VI rel = (__builtin_convertvector(y0, VI) * Wi + __builtin_convertvector(x0, VI)) * (int32_t)M; \
        VL b = bk + __builtin_convertvector(rel, VL);                                         \
        VL iy0 = in & (y0 >= 0.0), iy1 = in & (y0 + 1.0 < Hf), ix0 = x0 >= 0.0, ix1 = x0 + 1.0 < Wf; \
        VL m0 = iy0 & ix0, m1 = iy0 & ix1, m2 = iy1 & ix0, m3 = iy1 & ix1;                    \
        VL k0 = (b & m0) | ~m0, k1 = ((b + M) & m1) | ~m1;                                    \
        VL k2 = ((b + WM) & m2) | ~m2, k3 = ((b + WM + M) & m3) | ~m3;                        \
        VD hx = 1.0 - lx, hy = 1.0 - ly;                                                      \
        VT w0 = __builtin_convertvector(a * (hy * hx), VT);                                   \
        VT w1 = __builtin_convertvector(a * (hy * lx), VT);                                   \
        VT w2 = __builtin_convertvector(a * (ly * hx), VT);                                   \
        VT w3 = __builtin_convertvector(a * (ly * lx), VT);                                   \
        VD gx = (VD)(((VL)lx & in) | ((VL)(-one) & ~in));                                     \
        STORE(keys + 4 * k, k0, k1, k2, k3, VL);                                              \
        STORE(weights + 4 * k, w0, w1, w2, w3, VT);                                           \
        GEO(geo + 2 * k, gx, ly, VD);                                                         \
        VL st = (in & 1) | ~fin; /* 1 in the map, 0 outside, -1 not finite */                 \
        for (int i = 0; i < NL; ++i) status[k + i] = (signed char)st[i];                      \
    }
/* Four points' x, y (as doubles) and attention a from loc and attn at point k. */
#define CYD_GEOMETRY_XY4(SUF)                                                                 \
    CYD_V4_##SUF l01 = CYD_LOAD(CYD_V4_##SUF, loc + 2 * k);                                   \
    CYD_V4_##SUF l23 = CYD_LOAD(CYD_V4_##SUF, loc + 2 * k + 4);                               \
    cyd_v4d lxv = __builtin_convertvector(__builtin_shufflevector(l01, l23, 0, 2, 4, 6), cyd_v4d); \
    cyd_v4d lyv = __builtin_convertvector(__builtin_shufflevector(l01, l23, 1, 3, 5, 7), cyd_v4d); \
    cyd_v4d a = __builtin_convertvector(CYD_LOAD(CYD_V4_##SUF, attn + k), cyd_v4d);
/* gx and ly (4 lanes) stored interleaved at out. */
#define CYD_GEO_4(out, gx, ly, VD)                                                            \
    do {                                                                                      \
        VD g_[2] = {__builtin_shufflevector(gx, ly, 0, 4, 1, 5),                              \
                    __builtin_shufflevector(gx, ly, 2, 6, 3, 7)};                             \
        __builtin_memcpy(out, g_, sizeof g_);                                                 \
    } while (0)
#define CYD_GEOMETRY_VECTOR(T, SUF)                                                           \
    CYD_GEOMETRY_STEP(4, cyd_v4d, cyd_v4l, cyd_v4i, CYD_V4_##SUF, CYD_GEOMETRY_XY4(SUF),      \
                      CYD_STORE_4x4, CYD_GEO_4)
#else
#define CYD_GEOMETRY_LANES 1
#define CYD_GEOMETRY_VECTOR(T, SUF)
#endif


/* One in-map point's grad_attn[0] and grad_loc[0:2] from its four dots d[c] = g . V_c
 * (the formulas above _bilinear in src/_cpu_impl.pxi); the dense backward calls it too. */
#define CYD_DEFINE_POINT_GRADIENTS(T, SUF)                                                    \
static inline void cyd_point_gradients_##SUF(double lx, double ly, double a, double W,        \
                                             double H, const double *d, T *grad_attn,         \
                                             T *grad_loc) {                                   \
    double hx = 1.0 - lx, hy = 1.0 - ly;                                                      \
    double w0 = hy * hx, w1 = hy * lx, w2 = ly * hx, w3 = ly * lx;                            \
    grad_attn[0] = (T)(w0 * d[0] + w1 * d[1] + w2 * d[2] + w3 * d[3]);                        \
    grad_loc[0] = (T)(W * a * (hy * (d[1] - d[0]) + ly * (d[3] - d[2])));                     \
    grad_loc[1] = (T)(H * a * (hx * (d[2] - d[0]) + lx * (d[3] - d[1])));                     \
}
CYD_DEFINE_POINT_GRADIENTS(float, f)
CYD_DEFINE_POINT_GRADIENTS(double, d)

#define CYD_GRADIENTS_ONE(SUF, k)                                                             \
    do {                                                                                      \
        if (geo[2 * (k)] < 0) break;                                                          \
        double d[4];                                                                          \
        for (int c_ = 0; c_ < 4; ++c_) {                                                      \
            int64_t i_ = where[4 * (k) + c_];                                                 \
            d[c_] = i_ >= 0 ? dots[i_] : zero_dot;                                            \
        }                                                                                     \
        cyd_point_gradients_##SUF(geo[2 * (k)], geo[2 * (k) + 1], attn[k], lv->Wd[k], lv->Hd[k], \
                                  d, grad_attn + (k), grad_loc + 2 * (k));                    \
    } while (0)

#if CYD_GEOMETRY_LANES == 4
/* Corner c's dots of the four points whose where[] rows are i0..i3 (4 int64 each). */
#define CYD_DOTS4(c) {                                                                        \
        i0[c] >= 0 ? dots[i0[c]] : zero_dot, i1[c] >= 0 ? dots[i1[c]] : zero_dot,             \
        i2[c] >= 0 ? dots[i2[c]] : zero_dot, i3[c] >= 0 ? dots[i3[c]] : zero_dot}
#define CYD_GRADIENTS_VECTOR(T, SUF)                                                          \
    for (; k + 4 <= n; k += 4) {                                                              \
        cyd_v4d g01 = CYD_LOAD(cyd_v4d, geo + 2 * k), g23 = CYD_LOAD(cyd_v4d, geo + 2 * k + 4); \
        cyd_v4d lx = __builtin_shufflevector(g01, g23, 0, 2, 4, 6);                           \
        cyd_v4d ly = __builtin_shufflevector(g01, g23, 1, 3, 5, 7);                           \
        cyd_v4l live = lx >= 0.0;                                                             \
        if (!(live[0] | live[1] | live[2] | live[3])) continue;                               \
        cyd_v4l i0 = CYD_LOAD(cyd_v4l, where + 4 * k), i1 = CYD_LOAD(cyd_v4l, where + 4 * k + 4); \
        cyd_v4l i2 = CYD_LOAD(cyd_v4l, where + 4 * k + 8), i3 = CYD_LOAD(cyd_v4l, where + 4 * k + 12); \
        cyd_v4d d0 = CYD_DOTS4(0), d1 = CYD_DOTS4(1), d2 = CYD_DOTS4(2), d3 = CYD_DOTS4(3);   \
        cyd_v4d a = __builtin_convertvector(CYD_LOAD(CYD_V4_##SUF, attn + k), cyd_v4d);       \
        cyd_v4d Wf = CYD_LOAD(cyd_v4d, lv->Wd + k), Hf = CYD_LOAD(cyd_v4d, lv->Hd + k);       \
        cyd_v4d hx = 1.0 - lx, hy = 1.0 - ly;                                                 \
        cyd_v4d w0 = hy * hx, w1 = hy * lx, w2 = ly * hx, w3 = ly * lx;                       \
        CYD_V4_##SUF ga = __builtin_convertvector(w0 * d0 + w1 * d1 + w2 * d2 + w3 * d3,      \
                                                  CYD_V4_##SUF);                              \
        CYD_V4_##SUF gx = __builtin_convertvector(Wf * a * (hy * (d1 - d0) + ly * (d3 - d2)), \
                                                  CYD_V4_##SUF);                              \
        CYD_V4_##SUF gy = __builtin_convertvector(Hf * a * (hx * (d2 - d0) + lx * (d3 - d1)), \
                                                  CYD_V4_##SUF);                              \
        for (int i = 0; i < 4; ++i) {                                                         \
            if (!live[i]) continue;                                                           \
            grad_attn[k + i] = ga[i];                                                         \
            grad_loc[2 * (k + i)] = gx[i];                                                    \
            grad_loc[2 * (k + i) + 1] = gy[i];                                                \
        }                                                                                     \
    }
#else
#define CYD_GRADIENTS_VECTOR(T, SUF)
#endif

/* Phase 4 of the sparse backward for the n points of one row (_sparse_gradients in
 * src/_cpu_impl.pxi has the semantics): for each point k with geo[2k] >= 0 (in the map),
 * from its corners' dots (where[4k + c]: the index in ``dots``, or -1 for a corner
 * outside the map, whose dot is g . zeros), grad_attn[k] and grad_loc[2k : 2k + 2] as
 * cyd_point_gradients computes them; the other points are left alone. The same double
 * arithmetic in the same order one point at a time and four points a step (the AVX2 and
 * AVX-512 builds), so the same bits. */
#define CYD_DEFINE_GRADIENTS(T, SUF)                                                          \
static inline void cyd_sparse_gradients_##SUF(                                                \
        const int64_t *restrict where, const double *restrict dots, const T *restrict g,      \
        const T *restrict zeros, ptrdiff_t D, const double *restrict geo,                     \
        const T *restrict attn, const cyd_levels *lv, ptrdiff_t n, T *restrict grad_loc,      \
        T *restrict grad_attn) {                                                              \
    /* g . 0, the dot of a corner outside the map (+0, or NaN where g is not finite), only  \
     * where the row has such a corner. */                                                    \
    int64_t any_out = 0;                                                                      \
    for (ptrdiff_t e = 0; e < 4 * n; ++e) any_out |= where[e];                                \
    double zero_dot = any_out < 0 ? cyd_dot_##SUF(g, zeros, D) : 0;                           \
    ptrdiff_t k = 0;                                                                          \
    CYD_GRADIENTS_VECTOR(T, SUF)                                                              \
    for (; k < n; ++k) CYD_GRADIENTS_ONE(SUF, k);                                             \
}

CYD_DEFINE_GRADIENTS(float, f)
CYD_DEFINE_GRADIENTS(double, d)


/* ------------------------------------------------------------------ forward points */
/* The forward's corner rows and weights for n <= CYD_FWD_BLOCK points of one row, point k
 * on the level whose width, height and first position (as doubles) are tab[k],
 * tab[stride + k] and tab[2 stride + k]. By corner: ptr[c * CYD_FWD_BLOCK + k] is corner
 * c's row of value (rows row_stride elements apart), or ``zeros`` where the corner is
 * outside the map; w[c * CYD_FWD_BLOCK + k] its bilinear weight times the attention, 0
 * outside. A point outside the map (x < -1, x >= W, y < -1, y >= H) or not finite gets four
 * zero rows of weight 0. Returns whether some point's location is not finite.
 * The same double arithmetic as src/_cpu_impl.pxi's _corners and _forward_row (floor(x)
 * as the truncation less 1 where that is above x, exact for -1 <= x < W; y0 W + x0 + start
 * exact in a double), so the same weights and rows. _forward_row skips the points outside
 * the map, cyd_accumulate_planar adds their +0 terms: a sum of round-to-nearest additions
 * that starts at +0 is never -0, so adding +0 never changes it, and the bits are the same.
 * Eight points a step where the build has AVX-512 (one register of doubles); the scalar
 * code does the rest (and all of them elsewhere, where the Cython code does not call it). */
#define CYD_FWD_POINT_ONE(T, k)                                                               \
    do {                                                                                      \
        double lxv = loc[2 * (k)], lyv = loc[2 * (k) + 1];                                    \
        double Wf = tab[k], Hf = tab[stride + (k)];                                           \
        double x = lxv * Wf - 0.5, y = lyv * Hf - 0.5;                                        \
        for (int c_ = 0; c_ < 4; ++c_) {                                                      \
            ptr[c_ * CYD_FWD_BLOCK + (k)] = zeros;                                            \
            w[c_ * CYD_FWD_BLOCK + (k)] = 0;                                                  \
        }                                                                                     \
        if (!(x >= -1.0 && x < Wf && y >= -1.0 && y < Hf)) {                                  \
            nonfinite |= !((lxv - lxv == 0) && (lyv - lyv == 0));                             \
            break;                                                                            \
        }                                                                                     \
        double x0 = floor(x), y0 = floor(y), lx = x - x0, ly = y - y0, a = attn[k];           \
        int iy0 = y0 >= 0, iy1 = y0 + 1.0 < Hf, ix0 = x0 >= 0, ix1 = x0 + 1.0 < Wf;           \
        int64_t i0 = (int64_t)(tab[2 * stride + (k)] + y0 * Wf + x0), Wi = (int64_t)Wf;       \
        if (iy0 && ix0) {                                                                     \
            ptr[(k)] = value + i0 * row_stride;                                               \
            w[(k)] = (T)(a * ((1.0 - ly) * (1.0 - lx)));                                      \
        }                                                                                     \
        if (iy0 && ix1) {                                                                     \
            ptr[CYD_FWD_BLOCK + (k)] = value + (i0 + 1) * row_stride;                         \
            w[CYD_FWD_BLOCK + (k)] = (T)(a * ((1.0 - ly) * lx));                              \
        }                                                                                     \
        if (iy1 && ix0) {                                                                     \
            ptr[2 * CYD_FWD_BLOCK + (k)] = value + (i0 + Wi) * row_stride;                    \
            w[2 * CYD_FWD_BLOCK + (k)] = (T)(a * (ly * (1.0 - lx)));                          \
        }                                                                                     \
        if (iy1 && ix1) {                                                                     \
            ptr[3 * CYD_FWD_BLOCK + (k)] = value + (i0 + Wi + 1) * row_stride;                \
            w[3 * CYD_FWD_BLOCK + (k)] = (T)(a * (ly * lx));                                  \
        }                                                                                     \
    } while (0)

#if CYD_HAVE_SHUFFLEVECTOR && defined(__AVX512F__) && defined(__AVX512DQ__)
#define CYD_FWD_GEOMETRY_LANES 8
typedef double cyd_v8d __attribute__((vector_size(8 * sizeof(double))));
typedef int64_t cyd_v8l __attribute__((vector_size(8 * sizeof(int64_t))));
typedef int32_t cyd_v8i __attribute__((vector_size(8 * sizeof(int32_t))));
typedef float cyd_v8f __attribute__((vector_size(8 * sizeof(float))));
typedef float cyd_v16f __attribute__((vector_size(16 * sizeof(float))));
/* Eight points' x, y (as doubles) and attention a from loc and attn at point k. */
#define CYD_FWD_XY_f                                                                          \
    cyd_v16f l_ = CYD_LOAD(cyd_v16f, loc + 2 * k);                                            \
    cyd_v8d lxv = __builtin_convertvector(                                                    \
        __builtin_shufflevector(l_, l_, 0, 2, 4, 6, 8, 10, 12, 14), cyd_v8d);                 \
    cyd_v8d lyv = __builtin_convertvector(                                                    \
        __builtin_shufflevector(l_, l_, 1, 3, 5, 7, 9, 11, 13, 15), cyd_v8d);                 \
    cyd_v8d a = __builtin_convertvector(CYD_LOAD(cyd_v8f, attn + k), cyd_v8d);
#define CYD_FWD_XY_d                                                                          \
    cyd_v8d l0_ = CYD_LOAD(cyd_v8d, loc + 2 * k), l1_ = CYD_LOAD(cyd_v8d, loc + 2 * k + 8);   \
    cyd_v8d lxv = __builtin_shufflevector(l0_, l1_, 0, 2, 4, 6, 8, 10, 12, 14);               \
    cyd_v8d lyv = __builtin_shufflevector(l0_, l1_, 1, 3, 5, 7, 9, 11, 13, 15);               \
    cyd_v8d a = CYD_LOAD(cyd_v8d, attn + k);
#define CYD_V8_f cyd_v8f
#define CYD_V8_d cyd_v8d
/* The weights wv with the lanes where the mask m is 0 set to +0. */
#define CYD_MASK_W_f(wv, m) ((cyd_v8f)((cyd_v8i)(wv) & __builtin_convertvector(m, cyd_v8i)))
#define CYD_MASK_W_d(wv, m) ((cyd_v8d)((cyd_v8l)(wv) & (m)))
#define CYD_FWD_POINTS_VECTOR(T, SUF)                                                         \
    cyd_v8l bad = {0};                                                                        \
    const cyd_v8l zv = {0}, rs = zv + row_stride * (int64_t)sizeof(T);                       \
    const cyd_v8l vbase = zv + (int64_t)(intptr_t)value, zrow = zv + (int64_t)(intptr_t)zeros; \
    const cyd_v8d one = {1, 1, 1, 1, 1, 1, 1, 1};                                             \
    for (; k + 8 <= n; k += 8) {                                                              \
        CYD_FWD_XY_##SUF                                                                      \
        cyd_v8d Wf = CYD_LOAD(cyd_v8d, tab + k), Hf = CYD_LOAD(cyd_v8d, tab + stride + k);    \
        cyd_v8d Sf = CYD_LOAD(cyd_v8d, tab + 2 * stride + k);                                 \
        cyd_v8d x = lxv * Wf - 0.5, y = lyv * Hf - 0.5;                                       \
        cyd_v8l in = (x >= -1.0) & (x < Wf) & (y >= -1.0) & (y < Hf);                         \
        bad |= ~((lxv - lxv == 0.0) & (lyv - lyv == 0.0));                                    \
        /* 0 where out (so the conversions below are defined); those lanes are masked. */     \
        x = (cyd_v8d)((cyd_v8l)x & in);                                                       \
        y = (cyd_v8d)((cyd_v8l)y & in);                                                       \
        cyd_v8d tx = __builtin_convertvector(__builtin_convertvector(x, cyd_v8i), cyd_v8d);   \
        cyd_v8d ty = __builtin_convertvector(__builtin_convertvector(y, cyd_v8i), cyd_v8d);   \
        cyd_v8d x0 = tx - (cyd_v8d)((tx > x) & (cyd_v8l)one);                                 \
        cyd_v8d y0 = ty - (cyd_v8d)((ty > y) & (cyd_v8l)one);                                 \
        cyd_v8d lx = x - x0, ly = y - y0;                                                     \
        cyd_v8l iy0 = in & (y0 >= 0.0), iy1 = in & (y0 + 1.0 < Hf);                           \
        cyd_v8l ix0 = x0 >= 0.0, ix1 = x0 + 1.0 < Wf;                                         \
        cyd_v8l m0 = iy0 & ix0, m1 = iy0 & ix1, m2 = iy1 & ix0, m3 = iy1 & ix1;               \
        /* Addresses as integers: corner 0 at value + (start + y0 W + x0) row_stride. */      \
        cyd_v8l a0 = vbase + __builtin_convertvector(Sf + y0 * Wf + x0, cyd_v8l) * rs;        \
        cyd_v8l a2 = a0 + __builtin_convertvector(Wf, cyd_v8l) * rs;                          \
        cyd_v8l p0 = (a0 & m0) | (zrow & ~m0), p1 = ((a0 + rs) & m1) | (zrow & ~m1);          \
        cyd_v8l p2 = (a2 & m2) | (zrow & ~m2), p3 = ((a2 + rs) & m3) | (zrow & ~m3);          \
        cyd_v8d hx = 1.0 - lx, hy = 1.0 - ly;                                                 \
        CYD_V8_##SUF w0 = __builtin_convertvector(a * (hy * hx), CYD_V8_##SUF);               \
        CYD_V8_##SUF w1 = __builtin_convertvector(a * (hy * lx), CYD_V8_##SUF);               \
        CYD_V8_##SUF w2 = __builtin_convertvector(a * (ly * hx), CYD_V8_##SUF);               \
        CYD_V8_##SUF w3 = __builtin_convertvector(a * (ly * lx), CYD_V8_##SUF);               \
        w0 = CYD_MASK_W_##SUF(w0, m0);                                                        \
        w1 = CYD_MASK_W_##SUF(w1, m1);                                                        \
        w2 = CYD_MASK_W_##SUF(w2, m2);                                                        \
        w3 = CYD_MASK_W_##SUF(w3, m3);                                                        \
        __builtin_memcpy(ptr + k, &p0, sizeof p0);                                            \
        __builtin_memcpy(ptr + CYD_FWD_BLOCK + k, &p1, sizeof p1);                            \
        __builtin_memcpy(ptr + 2 * CYD_FWD_BLOCK + k, &p2, sizeof p2);                        \
        __builtin_memcpy(ptr + 3 * CYD_FWD_BLOCK + k, &p3, sizeof p3);                        \
        __builtin_memcpy(w + k, &w0, sizeof w0);                                              \
        __builtin_memcpy(w + CYD_FWD_BLOCK + k, &w1, sizeof w1);                              \
        __builtin_memcpy(w + 2 * CYD_FWD_BLOCK + k, &w2, sizeof w2);                          \
        __builtin_memcpy(w + 3 * CYD_FWD_BLOCK + k, &w3, sizeof w3);                          \
    }                                                                                         \
    for (int i_ = 0; i_ < 8; ++i_) nonfinite |= bad[i_] != 0;
#else
#define CYD_FWD_GEOMETRY_LANES 1
#define CYD_FWD_POINTS_VECTOR(T, SUF)
#endif

#define CYD_DEFINE_FWD_POINTS(T, SUF)                                                         \
static inline int cyd_forward_points_##SUF(                                                   \
        const T *restrict loc, const T *restrict attn, ptrdiff_t n, const double *restrict tab, \
        ptrdiff_t stride, const T *value, ptrdiff_t row_stride, const T *zeros,                \
        const T **restrict ptr, T *restrict w) {                                              \
    ptrdiff_t k = 0;                                                                          \
    int nonfinite = 0;                                                                        \
    CYD_FWD_POINTS_VECTOR(T, SUF)                                                             \
    for (; k < n; ++k) CYD_FWD_POINT_ONE(T, k);                                               \
    return nonfinite;                                                                         \
}

CYD_DEFINE_FWD_POINTS(float, f)
CYD_DEFINE_FWD_POINTS(double, d)


/* ------------------------------------------------------------------ sparse geometry, 8 lanes */
/* cyd_sparse_geometry eight points a step in the AVX-512 build, then four, then one: the
 * same step (CYD_GEOMETRY_STEP) in registers twice as wide, so the same bits. */
#if CYD_FWD_GEOMETRY_LANES == 8 && CYD_GEOMETRY_LANES == 4
#define CYD_SPARSE_GEOMETRY_LANES 8
/* Four 8-lane vectors c0..c3 stored as out[4i + j] = cj[i] (an 8 x 4 transpose). */
#define CYD_STORE_8x4(out, c0, c1, c2, c3, VT)                                                \
    do {                                                                                      \
        VT lo01_ = __builtin_shufflevector(c0, c1, 0, 8, 1, 9, 2, 10, 3, 11);                 \
        VT hi01_ = __builtin_shufflevector(c0, c1, 4, 12, 5, 13, 6, 14, 7, 15);               \
        VT lo23_ = __builtin_shufflevector(c2, c3, 0, 8, 1, 9, 2, 10, 3, 11);                 \
        VT hi23_ = __builtin_shufflevector(c2, c3, 4, 12, 5, 13, 6, 14, 7, 15);               \
        VT o_[4] = {__builtin_shufflevector(lo01_, lo23_, 0, 1, 8, 9, 2, 3, 10, 11),          \
                    __builtin_shufflevector(lo01_, lo23_, 4, 5, 12, 13, 6, 7, 14, 15),        \
                    __builtin_shufflevector(hi01_, hi23_, 0, 1, 8, 9, 2, 3, 10, 11),          \
                    __builtin_shufflevector(hi01_, hi23_, 4, 5, 12, 13, 6, 7, 14, 15)};       \
        __builtin_memcpy(out, o_, sizeof o_);                                                 \
    } while (0)
/* gx and ly (8 lanes) stored interleaved at out. */
#define CYD_GEO_8(out, gx, ly, VD)                                                            \
    do {                                                                                      \
        VD g_[2] = {__builtin_shufflevector(gx, ly, 0, 8, 1, 9, 2, 10, 3, 11),                \
                    __builtin_shufflevector(gx, ly, 4, 12, 5, 13, 6, 14, 7, 15)};             \
        __builtin_memcpy(out, g_, sizeof g_);                                                 \
    } while (0)
#define CYD_GEOMETRY_VECTOR8(T, SUF)                                                          \
    CYD_GEOMETRY_STEP(8, cyd_v8d, cyd_v8l, cyd_v8i, CYD_V8_##SUF, CYD_FWD_XY_##SUF,           \
                      CYD_STORE_8x4, CYD_GEO_8)
#else
#define CYD_SPARSE_GEOMETRY_LANES CYD_GEOMETRY_LANES
#define CYD_GEOMETRY_VECTOR8(T, SUF)
#endif

#define CYD_DEFINE_GEOMETRY(T, SUF)                                                           \
static inline void cyd_sparse_geometry_##SUF(                                                 \
        const T *restrict loc, const T *restrict attn, ptrdiff_t n, const cyd_levels *lv,     \
        int64_t key_nm, int64_t M, int64_t *restrict keys, T *restrict weights,               \
        double *restrict geo, signed char *restrict status) {                                 \
    ptrdiff_t k = 0;                                                                          \
    CYD_GEOMETRY_VECTOR8(T, SUF)                                                              \
    CYD_GEOMETRY_VECTOR(T, SUF)                                                               \
    for (; k < n; ++k) CYD_GEOMETRY_ONE(T, k);                                                \
}

CYD_DEFINE_GEOMETRY(float, f)
CYD_DEFINE_GEOMETRY(double, d)

#endif
