// Backward kernels of multi-scale deformable attention (formulas of msda.md section 2).
//
// With g = grad_output[n, q, m*D : (m+1)*D], a = A[n,q,m,l,p] and the corner values
// V00, V01, V10, V11 (zero outside the map):
//   dV[corner] += w_corner * a * g
//   dA          = sum_d g * s
//   dloc_x      = W * a * sum_d g * (hy*(V01 - V00) + ly*(V11 - V10))
//   dloc_y      = H * a * sum_d g * (hx*(V10 - V00) + lx*(V11 - V01))
// A non-finite location gets NaN dA and dloc and adds nothing to dV.
#include "msda_common.cuh"

// Fast backward; thread layout and template parameters as msda_forward. Each lane keeps
// partial sums of dA, dloc_x, dloc_y over its channels; the group reduces them with
// warp shuffles (no barriers, outside any divergent branch) and lane 0 writes them.
// GRAD_VALUE: accumulate dV into grad_value with atomics (zero-initialised buffer of
// the accumulator type: float for float/half/bfloat16, double for double). Without it
// only dA and dloc are written, and the deterministic gather kernel below computes dV.
// Threads: N*Lq*M*G (total_threads).
template <typename T, typename Index, int L_, int P_, int D_, int C, int J, int G_, bool VEC, bool GRAD_VALUE>
__global__ void msda_backward(
    const T* __restrict__ grad_out,        // (N, Lq, M*D)
    const T* __restrict__ value,           // (N, S, M, D)
    const long long* __restrict__ levels,  // (L, 4)
    const T* __restrict__ loc,             // (N, Lq, M, L, P, 2)
    const T* __restrict__ attn,            // (N, Lq, M, L, P)
    typename AccOf<T>::type* __restrict__ grad_value,  // (N, S, M, D), accumulated
    T* __restrict__ grad_loc,              // (N, Lq, M, L, P, 2)
    T* __restrict__ grad_attn,             // (N, Lq, M, L, P)
    int S, int M, int D_rt, int Lq, int L_rt, int P_rt, int log2G_rt, long long total_threads) {
    typedef typename AccOf<T>::type A;
    const int L = L_ > 0 ? L_ : L_rt;
    const int P = P_ > 0 ? P_ : P_rt;
    const int D = D_ > 0 ? D_ : D_rt;
    const int log2G = G_ > 0 ? cyd_log2(G_) : log2G_rt;
    const int G = 1 << log2G;
    const int pass = G * J * C;
    constexpr bool ONE_PASS = D_ > 0 && G_ > 0 && D_ == G_ * J * C;
    const Index MD = (Index)M * D;
    const long long stride = (long long)gridDim.x * blockDim.x;
    // The loop bound depends only on blockIdx, so whole warps iterate together and the
    // shuffles below always see all 32 lanes.
    for (long long base = (long long)blockIdx.x * blockDim.x; base < total_threads; base += stride) {
        const long long gid = base + threadIdx.x;
        const bool active = gid < total_threads;
        // Tail lanes shadow group 0 (valid memory) and write nothing.
        const Index nqm = active ? (Index)(gid >> log2G) : 0;
        const int lane = (int)(gid & (G - 1));
        const Index n = nqm / ((Index)Lq * M);
        const int m = (int)(nqm % M);
        const Index vrow = n * S * MD + (Index)m * D;  // offset of (n, s=0, m, d=0)
        const T* vbase = value + vrow;
        const T* go = grad_out + nqm * D;
        const T* lp = loc + nqm * (L * P * 2);
        const T* ap = attn + nqm * (L * P);
        A gcache[J][C];
        if (ONE_PASS) {
#pragma unroll
            for (int j = 0; j < J; ++j) load_chunk<T, C, VEC>(go + (j * G + lane) * C, C, gcache[j]);
        }
#pragma unroll
        for (int l = 0; l < L; ++l) {
            const int H = (int)levels[4 * l], W = (int)levels[4 * l + 1];
            const Index start = (Index)levels[4 * l + 2];
#pragma unroll
            for (int p = 0; p < P; ++p) {
                const int k = l * P + p;
                const Sample<A> s = sample_geometry(Conv<T>::ldg(lp + 2 * k), Conv<T>::ldg(lp + 2 * k + 1), H, W);
                // A point that touches no texel contributes a constant 0: weight 0 keeps
                // its gradients exactly 0 even when its real weight is NaN or infinite.
                const A a = s.inside ? Conv<T>::ldg(ap + k) : (A)0;
                A part_a = 0, part_x = 0, part_y = 0;
                if (s.inside) {  // uniform across the group; no shuffles inside
                    const A w00 = s.hy * s.hx * a, w01 = s.hy * s.lx * a;
                    const A w10 = s.ly * s.hx * a, w11 = s.ly * s.lx * a;
                    const bool x0ok = s.x0 >= 0, x1ok = s.x0 + 1 < W;
                    const bool y0ok = s.y0 >= 0, y1ok = s.y0 + 1 < H;
                    const Index r00 = start + (Index)s.y0 * W + s.x0;
                    for (int d0 = 0; d0 < D; d0 += pass) {
#pragma unroll
                        for (int j = 0; j < J; ++j) {
                            const int d = d0 + (j * G + lane) * C;
                            if (d >= D) continue;
                            const int cnt = D - d < C ? D - d : C;
                            A g[C], v00[C], v01[C], v10[C], v11[C];
                            if (ONE_PASS) {
#pragma unroll
                                for (int c = 0; c < C; ++c) g[c] = gcache[j][c];
                            } else {
                                load_chunk<T, C, VEC>(go + d, cnt, g);
                            }
#pragma unroll
                            for (int c = 0; c < C; ++c) v00[c] = v01[c] = v10[c] = v11[c] = 0;
                            if (y0ok && x0ok) load_chunk<T, C, VEC>(vbase + r00 * MD + d, cnt, v00);
                            if (y0ok && x1ok) load_chunk<T, C, VEC>(vbase + (r00 + 1) * MD + d, cnt, v01);
                            if (y1ok && x0ok) load_chunk<T, C, VEC>(vbase + (r00 + W) * MD + d, cnt, v10);
                            if (y1ok && x1ok) load_chunk<T, C, VEC>(vbase + (r00 + W + 1) * MD + d, cnt, v11);
#pragma unroll
                            for (int c = 0; c < C; ++c) {
                                const A sv = s.hy * s.hx * v00[c] + s.hy * s.lx * v01[c]
                                           + s.ly * s.hx * v10[c] + s.ly * s.lx * v11[c];
                                part_a += g[c] * sv;
                                part_x += g[c] * (s.hy * (v01[c] - v00[c]) + s.ly * (v11[c] - v10[c]));
                                part_y += g[c] * (s.hx * (v10[c] - v00[c]) + s.lx * (v11[c] - v01[c]));
                            }
                            if (GRAD_VALUE && active) {
                                A t[C];
                                A* gv = grad_value + vrow + d;
                                if (y0ok && x0ok) {
#pragma unroll
                                    for (int c = 0; c < C; ++c) t[c] = w00 * g[c];
                                    atomic_add_chunk<C, VEC>(gv + r00 * MD, cnt, t);
                                }
                                if (y0ok && x1ok) {
#pragma unroll
                                    for (int c = 0; c < C; ++c) t[c] = w01 * g[c];
                                    atomic_add_chunk<C, VEC>(gv + (r00 + 1) * MD, cnt, t);
                                }
                                if (y1ok && x0ok) {
#pragma unroll
                                    for (int c = 0; c < C; ++c) t[c] = w10 * g[c];
                                    atomic_add_chunk<C, VEC>(gv + (r00 + W) * MD, cnt, t);
                                }
                                if (y1ok && x1ok) {
#pragma unroll
                                    for (int c = 0; c < C; ++c) t[c] = w11 * g[c];
                                    atomic_add_chunk<C, VEC>(gv + (r00 + W + 1) * MD, cnt, t);
                                }
                            }
                        }
                    }
                }
                part_a = group_sum(part_a, G);
                part_x = group_sum(part_x, G);
                part_y = group_sum(part_y, G);
                if (active && lane == 0) {
                    const Index o = nqm * (L * P) + k;
                    grad_attn[o] = Conv<T>::store(s.finite ? part_a : cyd_nan(A()));
                    grad_loc[2 * o] = Conv<T>::store(s.finite ? (A)W * a * part_x : cyd_nan(A()));
                    grad_loc[2 * o + 1] = Conv<T>::store(s.finite ? (A)H * a * part_y : cyd_nan(A()));
                }
            }
        }
    }
}

// Baseline backward: the simplest correct kernel, one thread per point (n, q, m, l, p)
// looping over the D channels; dV by scalar atomics into the accumulator-type buffer.
// Threads: N*Lq*M*L*P (total_threads).
template <typename T, typename Index>
__global__ void msda_backward_baseline(
    const T* __restrict__ grad_out,        // (N, Lq, M*D)
    const T* __restrict__ value,           // (N, S, M, D)
    const long long* __restrict__ levels,  // (L, 4)
    const T* __restrict__ loc,             // (N, Lq, M, L, P, 2)
    const T* __restrict__ attn,            // (N, Lq, M, L, P)
    typename AccOf<T>::type* __restrict__ grad_value,  // (N, S, M, D), accumulated
    T* __restrict__ grad_loc,              // (N, Lq, M, L, P, 2)
    T* __restrict__ grad_attn,             // (N, Lq, M, L, P)
    int S, int M, int D, int Lq, int L, int P, long long total_threads) {
    typedef typename AccOf<T>::type A;
    const Index MD = (Index)M * D;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x; gid < total_threads; gid += stride) {
        const Index k = (Index)gid;  // flat (n, q, m, l, p)
        const Index nqm = k / (L * P);
        const int l = (int)(k % (L * P)) / P;
        const Index n = nqm / ((Index)Lq * M);
        const int m = (int)(nqm % M);
        const int H = (int)levels[4 * l], W = (int)levels[4 * l + 1];
        const Index start = (Index)levels[4 * l + 2];
        const Sample<A> s = sample_geometry(Conv<T>::ldg(loc + 2 * k), Conv<T>::ldg(loc + 2 * k + 1), H, W);
        const A a = s.inside ? Conv<T>::ldg(attn + k) : (A)0;  // outside: exactly 0 gradients
        A sum_a = 0, sum_x = 0, sum_y = 0;
        if (s.inside) {
            const Index vrow = n * S * MD + (Index)m * D;
            const Index r00 = start + (Index)s.y0 * W + s.x0;
            const bool x0ok = s.x0 >= 0, x1ok = s.x0 + 1 < W;
            const bool y0ok = s.y0 >= 0, y1ok = s.y0 + 1 < H;
            for (int d = 0; d < D; ++d) {
                const A g = Conv<T>::ldg(grad_out + nqm * D + d);
                const A v00 = (y0ok && x0ok) ? Conv<T>::ldg(value + vrow + r00 * MD + d) : (A)0;
                const A v01 = (y0ok && x1ok) ? Conv<T>::ldg(value + vrow + (r00 + 1) * MD + d) : (A)0;
                const A v10 = (y1ok && x0ok) ? Conv<T>::ldg(value + vrow + (r00 + W) * MD + d) : (A)0;
                const A v11 = (y1ok && x1ok) ? Conv<T>::ldg(value + vrow + (r00 + W + 1) * MD + d) : (A)0;
                sum_a += g * (s.hy * s.hx * v00 + s.hy * s.lx * v01 + s.ly * s.hx * v10 + s.ly * s.lx * v11);
                sum_x += g * (s.hy * (v01 - v00) + s.ly * (v11 - v10));
                sum_y += g * (s.hx * (v10 - v00) + s.lx * (v11 - v01));
                if (y0ok && x0ok) atomicAdd(grad_value + vrow + r00 * MD + d, s.hy * s.hx * a * g);
                if (y0ok && x1ok) atomicAdd(grad_value + vrow + (r00 + 1) * MD + d, s.hy * s.lx * a * g);
                if (y1ok && x0ok) atomicAdd(grad_value + vrow + (r00 + W) * MD + d, s.ly * s.hx * a * g);
                if (y1ok && x1ok) atomicAdd(grad_value + vrow + (r00 + W + 1) * MD + d, s.ly * s.lx * a * g);
            }
        }
        grad_attn[k] = Conv<T>::store(s.finite ? sum_a : cyd_nan(A()));
        grad_loc[2 * k] = Conv<T>::store(s.finite ? (A)W * a * sum_x : cyd_nan(A()));
        grad_loc[2 * k + 1] = Conv<T>::store(s.finite ? (A)H * a * sum_y : cyd_nan(A()));
    }
}

// float32 accumulation buffer -> half/bfloat16 gradient, once at the end.
template <typename T>
__global__ void cast_from_float(const float* __restrict__ src, T* __restrict__ dst, long long count) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride)
        dst[i] = Conv<T>::store(src[i]);
}

// ---- deterministic dV: sort the points by bilinear cell, then gather ---------------------
//
// Cell (y0, x0) of level l (y0, x0 in [-1, H-1] x [-1, W-1]) has id
// cell_start_l + (y0+1)*(W+1) + (x0+1); cells = sum_l (H_l+1)*(W_l+1). Step 1 gives every
// point (n, q, m, l, p) the key (n*cells + cell)*M + m, or `sentinel` when it touches no
// texel or is non-finite. The host stably sorts the keys (CuPy: a radix sort) and
// msda_segment_starts locates each key's segment; step 2 then sums, for every value row (n, s, m), the points of the four cells having
// it as a corner, in a fixed order (corner, then point index): no atomics, so the
// result is bit-identical run to run.

// Step 1. Threads: N*Lq*M*L*P (total_threads), one per point.
template <typename T, typename Key>
__global__ void msda_cell_keys(
    const long long* __restrict__ levels,  // (L, 4)
    const T* __restrict__ loc,             // (N, Lq, M, L, P, 2)
    Key* __restrict__ keys,                // (N, Lq, M, L, P)
    int M, int Lq, int L, int P, long long cells, Key sentinel, long long total_threads) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total_threads; k += stride) {
        const long long nqm = k / (L * P);
        const int l = (int)(k % (L * P)) / P;
        const long long n = nqm / ((long long)Lq * M);
        const int m = (int)(nqm % M);
        const int H = (int)levels[4 * l], W = (int)levels[4 * l + 1];
        typedef typename AccOf<T>::type A;
        const Sample<A> s = sample_geometry(Conv<T>::ldg(loc + 2 * k), Conv<T>::ldg(loc + 2 * k + 1), H, W);
        Key key = sentinel;
        if (s.inside) {
            const long long cell = levels[4 * l + 3] + (long long)(s.y0 + 1) * (W + 1) + (s.x0 + 1);
            key = (Key)((n * cells + cell) * M + m);
        }
        keys[k] = key;
    }
}

// Segment bounds of the sorted keys: seg_start[k] = first position in `sorted_keys`
// holding a key >= k (a binary search per k), for k = 0 .. n_keys + 1 (n_keys is the
// sentinel). No atomics, no host synchronisation.
// Threads: n_keys + 2 (total_threads).
template <typename Key>
__global__ void msda_segment_starts(
    const Key* __restrict__ sorted_keys,  // (count,), ascending
    long long* __restrict__ seg_start,    // (n_keys + 2,)
    long long count, long long total_threads) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total_threads; k += stride) {
        long long lo = 0, hi = count;
        while (lo < hi) {
            const long long mid = lo + (hi - lo) / 2;
            if ((long long)sorted_keys[mid] < k) lo = mid + 1;
            else hi = mid;
        }
        seg_start[k] = lo;
    }
}

// Step 2. A group of G lanes per value row (n, s, m), lane g owning chunks of C channels
// at d0 + g*C. order: point indices sorted by key; seg_start[key] .. seg_start[key+1]
// is the segment of `key` in that order. Writes every element of grad_value.
// Threads: N*S*M*G (total_threads).
template <typename T, typename Index, int C, bool VEC>
__global__ void msda_grad_value_gather(
    const T* __restrict__ grad_out,          // (N, Lq, M*D)
    const long long* __restrict__ levels,    // (L, 4)
    const T* __restrict__ loc,               // (N, Lq, M, L, P, 2)
    const T* __restrict__ attn,              // (N, Lq, M, L, P)
    const long long* __restrict__ order,     // (N*Lq*M*L*P,)
    const long long* __restrict__ seg_start, // (n_keys + 2,)
    T* __restrict__ grad_value,              // (N, S, M, D)
    int S, int M, int D, int L, int P, long long cells, int log2G, long long total_threads) {
    typedef typename AccOf<T>::type A;
    const int G = 1 << log2G;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x; gid < total_threads; gid += stride) {
        const Index row = (Index)(gid >> log2G);  // flat (n, s, m)
        const int lane = (int)(gid & (G - 1));
        const int m = (int)(row % M);
        const Index ns = row / M;
        const long long n = ns / S;
        const int sp = (int)(ns % S);
        int l = 0;
        while (l + 1 < L && sp >= levels[4 * (l + 1) + 2]) ++l;
        const int H = (int)levels[4 * l], W = (int)levels[4 * l + 1];
        const int r = sp - (int)levels[4 * l + 2];
        const int y = r / W, x = r % W;
        for (int d = lane * C; d < D; d += G * C) {
            const int cnt = D - d < C ? D - d : C;
            A acc[C];
#pragma unroll
            for (int c = 0; c < C; ++c) acc[c] = 0;
#pragma unroll
            for (int corner = 0; corner < 4; ++corner) {
                const int dy = corner >> 1, dx = corner & 1;
                const long long cell = levels[4 * l + 3] + (long long)(y - dy + 1) * (W + 1) + (x - dx + 1);
                const long long key = (n * cells + cell) * M + m;
                const long long end = seg_start[key + 1];
                for (long long i = seg_start[key]; i < end; ++i) {
                    const long long k = order[i];
                    const Sample<A> s = sample_geometry(Conv<T>::ldg(loc + 2 * k), Conv<T>::ldg(loc + 2 * k + 1), H, W);
                    const A a = Conv<T>::ldg(attn + k);
                    const A w = (dy ? s.ly : s.hy) * (dx ? s.lx : s.hx) * a;
                    A g[C];
                    load_chunk<T, C, VEC>(grad_out + (Index)(k / (L * P)) * D + d, cnt, g);
#pragma unroll
                    for (int c = 0; c < C; ++c) acc[c] += w * g[c];
                }
            }
            store_chunk<T, C, VEC>(grad_value + row * D + d, cnt, acc);
        }
    }
}
