/* Inner loops of the Cython CPU backend (src/_cpu_impl.pxi) over the D channels of one
 * head.
 *
 * They live in C for `restrict`, which Cython cannot spell: it tells the compiler that
 * the rows written never overlap the rows read, so the loops vectorise without run-time
 * overlap checks. Read-only pointers may coincide (corners outside the map all read one
 * zero row), which restrict allows; written pointers never do.
 *
 * Every sum has a fixed order that does not depend on the vector width, so each ISA
 * build of the backend (baseline, AVX2, AVX-512, all with -ffp-contract=off) and every
 * thread count give bit-identical results.
 */
#ifndef CYDEFORM_MSDA_INNER_H
#define CYDEFORM_MSDA_INNER_H

#include <stddef.h>

#if defined(_MSC_VER) && !defined(__clang__)
#define restrict __restrict  /* MSVC's C mode spells C99 restrict this way */
#endif

#define CYD_LANES 8

/* Ask for a corner row (up to 128 bytes) before the accumulation needs it. */
#if defined(__GNUC__)
#define cyd_prefetch_row(p) (__builtin_prefetch((const char *)(p)), __builtin_prefetch((const char *)(p) + 64))
#else
#define cyd_prefetch_row(p) ((void)(p))
#endif

/* A chunk of 128 bytes of channels, as one GCC/Clang vector (lowered to whatever width the
 * build targets); elsewhere, a plain array with the same element-wise arithmetic. */
#if defined(__GNUC__)
#define CYD_CHUNK_TYPE(T, SUF, CHUNK) typedef T cyd_chunk_##SUF __attribute__((vector_size(CHUNK * sizeof(T))));
#define CYD_HAVE_VECTORS 1
#else
#define CYD_HAVE_VECTORS 0
#endif

#define CYD_DEFINE_INNER(T, SUF, CHUNK)                                                       \
/* One block of a row's samples: out[d] += sum_k (w0 v0[d] + w1 v1[d] + w2 v2[d] + w3 v3[d])  \
 * with sample k's corner rows at ptr[4k + c] and weights (attention included) at w[4k + c].  \
 * CHUNK channels at a time stay in registers across all samples; every out[d] is summed in  \
 * sample order, the same as one sample at a time. */                                        \
static inline void cyd_accumulate_##SUF(T *restrict out, const T *const *restrict ptr,        \
                                        const T *restrict w, ptrdiff_t npts, ptrdiff_t D) {    \
    ptrdiff_t d0 = 0;                                                                         \
    CYD_ACCUMULATE_CHUNKS_##SUF                                                               \
    for (; d0 < D; ++d0) {                                                                    \
        T acc = out[d0];                                                                      \
        for (ptrdiff_t k = 0; k < npts; ++k)                                                  \
            acc += w[4 * k] * ptr[4 * k][d0] + w[4 * k + 1] * ptr[4 * k + 1][d0]              \
                 + w[4 * k + 2] * ptr[4 * k + 2][d0] + w[4 * k + 3] * ptr[4 * k + 3][d0];      \
        out[d0] = acc;                                                                        \
    }                                                                                         \
}                                                                                             \
/* Backward of one sample in one pass over d:                                                 \
 *   dots[c] = sum_d g[d] vc[d]          (the four dot products every scalar gradient needs)  \
 *   gvc[d] += awc g[d]                  (scatter into the four corner rows of grad_value)    \
 * The dot products keep CYD_LANES independent partial sums (lane j takes d = j mod 8, the    \
 * tail goes to lane 0), summed in lane order at the end. */                                  \
static inline void cyd_sample_backward_##SUF(                                                 \
        const T *restrict g, const T *restrict v0, const T *restrict v1,                      \
        const T *restrict v2, const T *restrict v3, T *restrict gv0, T *restrict gv1,         \
        T *restrict gv2, T *restrict gv3, T aw0, T aw1, T aw2, T aw3, ptrdiff_t D,            \
        double *restrict dots) {                                                              \
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
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                    \
    for (int j = 0; j < CYD_LANES; ++j) {                                                     \
        s0 += a0[j]; s1 += a1[j]; s2 += a2[j]; s3 += a3[j];                                   \
    }                                                                                         \
    dots[0] = s0; dots[1] = s1; dots[2] = s2; dots[3] = s3;                                   \
}

#if CYD_HAVE_VECTORS
/* Full chunks of channels: the accumulator lives in vector registers across samples. */
#define CYD_ACCUMULATE_CHUNKS(T, SUF, CHUNK)                                                  \
    for (; d0 + CHUNK <= D; d0 += CHUNK) {                                                    \
        cyd_chunk_##SUF acc, v0, v1, v2, v3;                                                  \
        __builtin_memcpy(&acc, out + d0, sizeof acc);                                         \
        for (ptrdiff_t k = 0; k < npts; ++k) {                                                \
            __builtin_memcpy(&v0, ptr[4 * k] + d0, sizeof v0);                                \
            __builtin_memcpy(&v1, ptr[4 * k + 1] + d0, sizeof v1);                            \
            __builtin_memcpy(&v2, ptr[4 * k + 2] + d0, sizeof v2);                            \
            __builtin_memcpy(&v3, ptr[4 * k + 3] + d0, sizeof v3);                            \
            acc += w[4 * k] * v0 + w[4 * k + 1] * v1 + w[4 * k + 2] * v2 + w[4 * k + 3] * v3; \
        }                                                                                     \
        __builtin_memcpy(out + d0, &acc, sizeof acc);                                         \
    }
CYD_CHUNK_TYPE(float, f, 32)
CYD_CHUNK_TYPE(double, d, 16)
#define CYD_ACCUMULATE_CHUNKS_f CYD_ACCUMULATE_CHUNKS(float, f, 32)
#define CYD_ACCUMULATE_CHUNKS_d CYD_ACCUMULATE_CHUNKS(double, d, 16)
#else
#define CYD_ACCUMULATE_CHUNKS_f
#define CYD_ACCUMULATE_CHUNKS_d
#endif

/* 128 bytes of channels per register chunk. */
CYD_DEFINE_INNER(float, f, 32)
CYD_DEFINE_INNER(double, d, 16)

#endif
