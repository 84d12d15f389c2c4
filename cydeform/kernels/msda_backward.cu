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
// Cell (y0, x0) of level l (y0, x0 in [-1, H-1] x [-1, W-1]) has index
// cell_start_l + (y0+1)*(W+1) + (x0+1) among cells = sum_l (H_l+1)*(W_l+1). Step 1 gives
// every point (n, q, m, l, p) the key (n*M + m)*cells + cell, or `sentinel` (= N*M*cells)
// when it touches no texel or is non-finite. The host stably sorts the keys (CuPy: a
// radix sort) and msda_segment_starts locates each key's segment. The value row
// (n, s, m) of texel (y, x) is a corner of cells (y-1, x-1), (y-1, x), (y, x-1), (y, x):
// two runs of two adjacent keys, so its W contributing points are two ranges of the
// sorted order. A row with W <= K0 points is summed by one thread group in
// msda_grad_value_gather; a longer row is cut into pieces of K = max(K0, ceil(sqrt(W)))
// points, each summed into a scratch row by msda_grad_value_pieces, and the gather then
// adds its ceil(W/K) pieces in piece order. No thread walks more than max(K0, about
// 2 sqrt(W)) items, there are no atomics, and every sum has a fixed order: the result is
// bit-identical run to run. 64-bit cell arithmetic throughout: (W+1) overflows int for
// a level of width 2^31 - 1.

__device__ __forceinline__ long long cyd_cell_index(const long long* __restrict__ levels, int l, int y0, int x0) {
    return levels[4 * l + 3] + (long long)(y0 + 1) * (levels[4 * l + 1] + 1) + (x0 + 1);
}

// Step 1. Threads: N*Lq*M*L*P (total_threads), one per point.
template <typename T, typename Key>
__global__ void msda_cell_keys(
    const long long* __restrict__ levels,  // (L, 4)
    const T* __restrict__ loc,             // (N, Lq, M, L, P, 2)
    Key* __restrict__ keys,                // (N, Lq, M, L, P)
    int M, int Lq, int L, int P, long long cells, Key sentinel, long long total_threads) {
    typedef typename AccOf<T>::type A;
    const long long LP = (long long)L * P;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long k = (long long)blockIdx.x * blockDim.x + threadIdx.x; k < total_threads; k += stride) {
        const long long nqm = k / LP;
        const int l = (int)((k % LP) / P);
        const long long n = nqm / ((long long)Lq * M);
        const int m = (int)(nqm % M);
        const int H = (int)levels[4 * l], W = (int)levels[4 * l + 1];
        const Sample<A> s = sample_geometry(Conv<T>::ldg(loc + 2 * k), Conv<T>::ldg(loc + 2 * k + 1), H, W);
        keys[k] = s.inside ? (Key)((n * M + m) * cells + cyd_cell_index(levels, l, s.y0, s.x0)) : sentinel;
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

__device__ __forceinline__ long long cyd_ceil_sqrt(long long v) {
    long long r = (long long)sqrt((double)v);
    while (r * r < v) ++r;
    while (r > 0 && (r - 1) * (r - 1) >= v) --r;
    return r;
}

// The contributing points of value row `row` = (n, s, m) and how they are split.
struct RowSpan {
    long long n;
    int m, l, y, x, H, W;
    long long a0, na, b0, nb;     // points: sorted positions [a0, a0+na), then [b0, b0+nb)
    long long piece, pieces;      // points per piece (K) and pieces (<= 1: no scratch)
};

__device__ __forceinline__ RowSpan row_span(const long long* __restrict__ levels,
                                            const long long* __restrict__ seg_start, long long row, int S,
                                            int M, int L, long long cells, long long K0) {
    RowSpan r;
    r.m = (int)(row % M);
    const long long ns = row / M;
    r.n = ns / S;
    const int sp = (int)(ns % S);
    int l = 0;
    while (l + 1 < L && sp >= levels[4 * (l + 1) + 2]) ++l;
    r.l = l;
    r.H = (int)levels[4 * l];
    r.W = (int)levels[4 * l + 1];
    const int t = sp - (int)levels[4 * l + 2];
    r.y = t / r.W;
    r.x = t % r.W;
    const long long key_a = (r.n * M + r.m) * cells + cyd_cell_index(levels, l, r.y - 1, r.x - 1);
    const long long key_b = (r.n * M + r.m) * cells + cyd_cell_index(levels, l, r.y, r.x - 1);
    r.a0 = seg_start[key_a];
    r.na = seg_start[key_a + 2] - r.a0;  // cells (y-1, x-1) and (y-1, x)
    r.b0 = seg_start[key_b];
    r.nb = seg_start[key_b + 2] - r.b0;  // cells (y, x-1) and (y, x)
    const long long work = r.na + r.nb;
    const long long k = cyd_ceil_sqrt(work);
    r.piece = k > K0 ? k : K0;
    r.pieces = (work + r.piece - 1) / r.piece;
    return r;
}

// acc[c] += sum over the row's points i0 .. i1-1 (in the order of RowSpan) of
// w_corner * a * grad_out[n, q, m*D + d + c].
template <typename T, typename Index, int C, bool VEC>
__device__ __forceinline__ void add_row_points(
    typename AccOf<T>::type (&acc)[C], const RowSpan& r, long long i0, long long i1,
    const T* __restrict__ grad_out, const T* __restrict__ loc, const T* __restrict__ attn,
    const long long* __restrict__ order, int D, int L, int P, int d, int cnt) {
    typedef typename AccOf<T>::type A;
    const long long LP = (long long)L * P;
    for (long long i = i0; i < i1; ++i) {
        const long long k = order[i < r.na ? r.a0 + i : r.b0 + (i - r.na)];
        const Sample<A> s = sample_geometry(Conv<T>::ldg(loc + 2 * k), Conv<T>::ldg(loc + 2 * k + 1), r.H, r.W);
        const A a = Conv<T>::ldg(attn + k);
        // The row is corner (y0 + dy, x0 + dx) of the point's cell.
        const A w = (r.y == s.y0 ? s.hy : s.ly) * (r.x == s.x0 ? s.hx : s.lx) * a;
        A g[C];
        load_chunk<T, C, VEC>(grad_out + (Index)(k / LP) * D + d, cnt, g);
#pragma unroll
        for (int c = 0; c < C; ++c) acc[c] += w * g[c];
    }
}

// Pieces per value row: pieces[row] = ceil(W/K) when the row is split (> 1), else 0.
// Threads: N*S*M (total_threads), one per row.
__global__ void msda_row_pieces(
    const long long* __restrict__ levels,     // (L, 4)
    const long long* __restrict__ seg_start,  // (n_keys + 2,)
    long long* __restrict__ pieces,           // (N*S*M,)
    int S, int M, int L, long long cells, long long K0, long long total_threads) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long row = (long long)blockIdx.x * blockDim.x + threadIdx.x; row < total_threads; row += stride) {
        const RowSpan r = row_span(levels, seg_start, row, S, M, L, cells, K0);
        pieces[row] = r.pieces > 1 ? r.pieces : 0;
    }
}

// Step 2a. The pieces of the split rows: piece j of row r (global index
// piece_end[r] - pieces[r] + j) sums points j*K .. (j+1)*K - 1 into scratch[piece, :].
// A group of G lanes per piece, lane g owning chunks of C channels at d0 + g*C.
// Threads: max_pieces*G (total_threads); those past piece_end[rows-1] return at once.
template <typename T, typename Index, int C, bool VEC>
__global__ void msda_grad_value_pieces(
    const T* __restrict__ grad_out,          // (N, Lq, M*D)
    const long long* __restrict__ levels,    // (L, 4)
    const T* __restrict__ loc,               // (N, Lq, M, L, P, 2)
    const T* __restrict__ attn,              // (N, Lq, M, L, P)
    const long long* __restrict__ order,     // (N*Lq*M*L*P,)
    const long long* __restrict__ seg_start, // (n_keys + 2,)
    const long long* __restrict__ pieces,    // (N*S*M,)
    const long long* __restrict__ piece_end, // (N*S*M,) inclusive scan of pieces
    typename AccOf<T>::type* __restrict__ scratch,  // (max_pieces, D)
    long long rows, long long max_pieces,
    int S, int M, int D, int L, int P, long long cells, long long K0, int log2G, long long total_threads) {
    typedef typename AccOf<T>::type A;
    const int G = 1 << log2G;
    const long long n_pieces = piece_end[rows - 1];
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x; gid < total_threads; gid += stride) {
        const long long piece = gid >> log2G;
        if (piece >= n_pieces || piece >= max_pieces) continue;
        const int lane = (int)(gid & (G - 1));
        long long lo = 0, hi = rows - 1;  // the row: first r with piece_end[r] > piece
        while (lo < hi) {
            const long long mid = lo + (hi - lo) / 2;
            if (piece_end[mid] > piece) hi = mid;
            else lo = mid + 1;
        }
        const RowSpan r = row_span(levels, seg_start, lo, S, M, L, cells, K0);
        const long long j = piece - (piece_end[lo] - pieces[lo]);
        const long long i0 = j * r.piece;
        const long long i1 = i0 + r.piece < r.na + r.nb ? i0 + r.piece : r.na + r.nb;
        for (int d = lane * C; d < D; d += G * C) {
            const int cnt = D - d < C ? D - d : C;
            A acc[C];
#pragma unroll
            for (int c = 0; c < C; ++c) acc[c] = 0;
            add_row_points<T, Index, C, VEC>(acc, r, i0, i1, grad_out, loc, attn, order, D, L, P, d, cnt);
            for (int c = 0; c < cnt; ++c) scratch[piece * D + d + c] = acc[c];
        }
    }
}

// Step 2b. Every value row (n, s, m): its points summed directly (one piece), or its
// pieces' scratch rows added in piece order. Writes every element of grad_value.
// Threads: N*S*M*G (total_threads).
template <typename T, typename Index, int C, bool VEC>
__global__ void msda_grad_value_gather(
    const T* __restrict__ grad_out,          // (N, Lq, M*D)
    const long long* __restrict__ levels,    // (L, 4)
    const T* __restrict__ loc,               // (N, Lq, M, L, P, 2)
    const T* __restrict__ attn,              // (N, Lq, M, L, P)
    const long long* __restrict__ order,     // (N*Lq*M*L*P,)
    const long long* __restrict__ seg_start, // (n_keys + 2,)
    const long long* __restrict__ pieces,    // (N*S*M,)
    const long long* __restrict__ piece_end, // (N*S*M,)
    const typename AccOf<T>::type* __restrict__ scratch,  // (max_pieces, D)
    T* __restrict__ grad_value,              // (N, S, M, D)
    int S, int M, int D, int L, int P, long long cells, long long K0, int log2G, long long total_threads) {
    typedef typename AccOf<T>::type A;
    const int G = 1 << log2G;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x; gid < total_threads; gid += stride) {
        const long long row = gid >> log2G;  // flat (n, s, m)
        const int lane = (int)(gid & (G - 1));
        const RowSpan r = row_span(levels, seg_start, row, S, M, L, cells, K0);
        const long long first = piece_end[row] - pieces[row];
        for (int d = lane * C; d < D; d += G * C) {
            const int cnt = D - d < C ? D - d : C;
            A acc[C];
#pragma unroll
            for (int c = 0; c < C; ++c) acc[c] = 0;
            if (r.pieces <= 1) {
                add_row_points<T, Index, C, VEC>(acc, r, 0, r.na + r.nb, grad_out, loc, attn, order, D, L, P, d, cnt);
            } else {
                for (long long j = 0; j < r.pieces; ++j) {
                    const A* src = scratch + (first + j) * D + d;
#pragma unroll
                    for (int c = 0; c < C; ++c) acc[c] += c < cnt ? src[c] : (A)0;
                }
            }
            store_chunk<T, C, VEC>(grad_value + (Index)row * D + d, cnt, acc);
        }
    }
}
