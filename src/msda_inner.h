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

#define CYD_LANES 8

#define CYD_DEFINE_INNER(T, SUF)                                                              \
/* out[d] += w0 v0[d] + w1 v1[d] + w2 v2[d] + w3 v3[d]: one weighted bilinear sample. */     \
static inline void cyd_gather4_##SUF(T *restrict out, const T *restrict v0,                   \
                                     const T *restrict v1, const T *restrict v2,               \
                                     const T *restrict v3, T w0, T w1, T w2, T w3,             \
                                     ptrdiff_t D) {                                            \
    for (ptrdiff_t d = 0; d < D; ++d)                                                         \
        out[d] += w0 * v0[d] + w1 * v1[d] + w2 * v2[d] + w3 * v3[d];                          \
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

CYD_DEFINE_INNER(float, f)
CYD_DEFINE_INNER(double, d)

#endif
