// Forward kernels of multi-scale deformable attention.
//
//   out[n, q, m*D + d] = sum_l sum_p A[n,q,m,l,p] * bilinear(value[n, level l, m, d], loc[n,q,m,l,p])
//
// A non-finite location makes the whole (n, q, m) row NaN; a finite location outside
// the map adds nothing. Semantics are those of cydeform.reference.
#include "msda_common.cuh"

// One point's contribution to a lane's channel chunks: chunk j holds the C channels at
// d0 + (j*G + lane)*C. The four corner loads are issued before any arithmetic; a corner
// outside the map reads as zero without touching memory. r00 is the row of corner
// (y0, x0) in the head's value rows (may be < 0 when that corner is outside).
template <typename T, int C, int J, bool VEC, typename A, typename Index>
__device__ __forceinline__ void gather_point(A (&acc)[J][C], const T* __restrict__ vbase, Index r00, Index MD,
                                             int W, bool x0ok, bool x1ok, bool y0ok, bool y1ok,
                                             A w00, A w01, A w10, A w11, int d0, int G, int lane, int D) {
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int d = d0 + (j * G + lane) * C;
        if (d >= D) continue;
        const int cnt = D - d < C ? D - d : C;
        A v00[C], v01[C], v10[C], v11[C];
#pragma unroll
        for (int c = 0; c < C; ++c) v00[c] = v01[c] = v10[c] = v11[c] = 0;
        if (y0ok && x0ok) load_chunk<T, C, VEC>(vbase + r00 * MD + d, cnt, v00);
        if (y0ok && x1ok) load_chunk<T, C, VEC>(vbase + (r00 + 1) * MD + d, cnt, v01);
        if (y1ok && x0ok) load_chunk<T, C, VEC>(vbase + (r00 + W) * MD + d, cnt, v10);
        if (y1ok && x1ok) load_chunk<T, C, VEC>(vbase + (r00 + W + 1) * MD + d, cnt, v11);
#pragma unroll
        for (int c = 0; c < C; ++c)
            acc[j][c] += w00 * v00[c] + w01 * v01[c] + w10 * v10[c] + w11 * v11[c];
    }
}

// Store a lane's channel chunks of one output row (NaN if a location was not finite).
template <typename T, int C, int J, bool VEC, typename A>
__device__ __forceinline__ void store_row(A (&acc)[J][C], T* __restrict__ op, bool finite, int d0, int G, int lane,
                                          int D) {
#pragma unroll
    for (int j = 0; j < J; ++j) {
        const int d = d0 + (j * G + lane) * C;
        if (d >= D) continue;
        if (!finite)
#pragma unroll
            for (int c = 0; c < C; ++c) acc[j][c] = cyd_nan(A());
        store_chunk<T, C, VEC>(op + d, D - d < C ? D - d : C, acc[j]);
    }
}

// Fast forward. A group of G threads (G a power of two <= 32, aligned in the warp) owns
// one (n, q, m). Lane g holds chunks j = 0..J-1 of C channels at d0 + (j*G + g)*C, so
// the group's lanes read adjacent 16-byte pieces of a texel row. Each thread computes
// the coordinates and bilinear weights of a point once for all its channels and
// accumulates in float32 (float64 for double). When D exceeds one pass of G*J*C
// channels, further passes recompute the geometry.
//
// L_, P_, D_, G_ > 0 are compile-time sizes (full unrolling, no channel masks); 0 takes
// the runtime argument. VEC: chunks are 16-byte aligned vectors (D % C == 0).
// Threads: N*Lq*M*G (total_threads); grid-stride loop, so any grid size works.
template <typename T, typename Index, int L_, int P_, int D_, int C, int J, int G_, bool VEC>
__global__ void msda_forward(
    const T* __restrict__ value,           // (N, S, M, D)
    const long long* __restrict__ levels,  // (L, 4): H, W, start, cell_start
    const T* __restrict__ loc,             // (N, Lq, M, L, P, 2)
    const T* __restrict__ attn,            // (N, Lq, M, L, P)
    T* __restrict__ out,                   // (N, Lq, M*D)
    int S, int M, int D_rt, int Lq, int L_rt, int P_rt, int log2G_rt, long long total_threads) {
    typedef typename AccOf<T>::type A;
    const int L = L_ > 0 ? L_ : L_rt;
    const int P = P_ > 0 ? P_ : P_rt;
    const int D = D_ > 0 ? D_ : D_rt;
    const int log2G = G_ > 0 ? cyd_log2(G_) : log2G_rt;
    const int G = 1 << log2G;
    const int pass = G * J * C;
    const Index MD = (Index)M * D;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x; gid < total_threads; gid += stride) {
        const Index nqm = (Index)(gid >> log2G);
        const int lane = (int)(gid & (G - 1));
        const Index n = nqm / ((Index)Lq * M);
        const int m = (int)(nqm % M);
        const T* vbase = value + n * S * MD + (Index)m * D;
        const T* lp = loc + nqm * (L * P * 2);
        const T* ap = attn + nqm * (L * P);
        T* op = out + nqm * D;
        for (int d0 = 0; d0 < D; d0 += pass) {
            A acc[J][C];
#pragma unroll
            for (int j = 0; j < J; ++j)
#pragma unroll
                for (int c = 0; c < C; ++c) acc[j][c] = 0;
            bool finite = true;
#pragma unroll
            for (int l = 0; l < L; ++l) {
                const int H = (int)levels[4 * l], W = (int)levels[4 * l + 1];
                const Index start = (Index)levels[4 * l + 2];
#pragma unroll
                for (int p = 0; p < P; ++p) {
                    const int k = l * P + p;
                    const Sample<A> s = sample_geometry(Conv<T>::ldg(lp + 2 * k), Conv<T>::ldg(lp + 2 * k + 1), H, W);
                    finite = finite && s.finite;
                    if (!s.inside) continue;  // uniform across the group
                    const A a = Conv<T>::ldg(ap + k);
                    const A w00 = s.hy * s.hx * a, w01 = s.hy * s.lx * a;
                    const A w10 = s.ly * s.hx * a, w11 = s.ly * s.lx * a;
                    const bool x0ok = s.x0 >= 0, x1ok = s.x0 + 1 < W;
                    const bool y0ok = s.y0 >= 0, y1ok = s.y0 + 1 < H;
                    const Index r00 = start + (Index)s.y0 * W + s.x0;  // row of corner (y0, x0); may be < 0
                    gather_point<T, C, J, VEC>(acc, vbase, r00, MD, W, x0ok, x1ok, y0ok, y1ok,
                                               w00, w01, w10, w11, d0, G, lane, D);
                }
            }
            store_row<T, C, J, VEC>(acc, op, finite, d0, G, lane, D);
        }
    }
}

// Fast forward with shared geometry: as msda_forward, but the G lanes of a group split
// the points of their (n, q, m) (lane g computes point k0 + g) and broadcast each
// point's cell, fractions and weight with warp shuffles, instead of every lane
// recomputing every point's float64 coordinates. Same template parameters, arguments,
// thread count and results (bit for bit) as msda_forward. Like the backward, whole
// warps iterate together (tail lanes shadow group 0 and store nothing), so every
// shuffle sees all 32 lanes.
template <typename T, typename Index, int L_, int P_, int D_, int C, int J, int G_, bool VEC>
__global__ void msda_forward_shared(
    const T* __restrict__ value,           // (N, S, M, D)
    const long long* __restrict__ levels,  // (L, 4): H, W, start, cell_start
    const T* __restrict__ loc,             // (N, Lq, M, L, P, 2)
    const T* __restrict__ attn,            // (N, Lq, M, L, P)
    T* __restrict__ out,                   // (N, Lq, M*D)
    int S, int M, int D_rt, int Lq, int L_rt, int P_rt, int log2G_rt, long long total_threads) {
    typedef typename AccOf<T>::type A;
    const int L = L_ > 0 ? L_ : L_rt;
    const int P = P_ > 0 ? P_ : P_rt;
    const int D = D_ > 0 ? D_ : D_rt;
    const int K = L * P;
    const int log2G = G_ > 0 ? cyd_log2(G_) : log2G_rt;
    const int G = 1 << log2G;
    const int pass = G * J * C;
    const Index MD = (Index)M * D;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long base = (long long)blockIdx.x * blockDim.x; base < total_threads; base += stride) {
        const long long gid = base + threadIdx.x;
        const bool active = gid < total_threads;
        const Index nqm = active ? (Index)(gid >> log2G) : 0;
        const int lane = (int)(gid & (G - 1));
        const Index n = nqm / ((Index)Lq * M);
        const int m = (int)(nqm % M);
        const T* vbase = value + n * S * MD + (Index)m * D;
        const T* lp = loc + nqm * (L * P * 2);
        const T* ap = attn + nqm * (L * P);
        T* op = out + nqm * D;
        for (int d0 = 0; d0 < D; d0 += pass) {
            A acc[J][C];
#pragma unroll
            for (int j = 0; j < J; ++j)
#pragma unroll
                for (int c = 0; c < C; ++c) acc[j][c] = 0;
            bool finite = true;
#pragma unroll
            for (int k0 = 0; k0 < K; k0 += G) {
                // This lane's point of the batch: its geometry, packed for broadcasting.
                const int mine = k0 + lane;
                int my_flags = 1, my_x0 = 0, my_y0 = 0;  // bit 0: finite, bit 1: inside
                A my_lx = 0, my_ly = 0, my_a = 0;
                if (mine < K) {
                    const int l = mine / P;
                    const Sample<A> s = sample_geometry(Conv<T>::ldg(lp + 2 * mine), Conv<T>::ldg(lp + 2 * mine + 1),
                                                        (int)levels[4 * l], (int)levels[4 * l + 1]);
                    my_flags = (s.finite ? 1 : 0) | (s.inside ? 2 : 0);
                    if (s.inside) {
                        my_x0 = s.x0; my_y0 = s.y0; my_lx = s.lx; my_ly = s.ly;
                        my_a = Conv<T>::ldg(ap + mine);
                    }
                }
#pragma unroll
                for (int i = 0; i < (G_ > 0 ? G_ : 32); ++i) {
                    if (i >= G || k0 + i >= K) break;  // the same for every lane of the warp
                    const int flags = __shfl_sync(0xffffffffu, my_flags, i, G);
                    const int x0 = __shfl_sync(0xffffffffu, my_x0, i, G);
                    const int y0 = __shfl_sync(0xffffffffu, my_y0, i, G);
                    const A lx = __shfl_sync(0xffffffffu, my_lx, i, G);
                    const A ly = __shfl_sync(0xffffffffu, my_ly, i, G);
                    const A a = __shfl_sync(0xffffffffu, my_a, i, G);
                    finite = finite && (flags & 1);
                    if (!(flags & 2)) continue;  // uniform across the group
                    const int l = (k0 + i) / P;
                    const int H = (int)levels[4 * l], W = (int)levels[4 * l + 1];
                    const Index start = (Index)levels[4 * l + 2];
                    const A hx = (A)1 - lx, hy = (A)1 - ly;
                    const A w00 = hy * hx * a, w01 = hy * lx * a;
                    const A w10 = ly * hx * a, w11 = ly * lx * a;
                    const bool x0ok = x0 >= 0, x1ok = x0 + 1 < W;
                    const bool y0ok = y0 >= 0, y1ok = y0 + 1 < H;
                    const Index r00 = start + (Index)y0 * W + x0;
                    gather_point<T, C, J, VEC>(acc, vbase, r00, MD, W, x0ok, x1ok, y0ok, y1ok,
                                               w00, w01, w10, w11, d0, G, lane, D);
                }
            }
            if (active) store_row<T, C, J, VEC>(acc, op, finite, d0, G, lane, D);
        }
    }
}

// Baseline forward: the original op's design, one thread per output element
// (n, q, m, d), every thread recomputing the geometry of every point. Kept as the
// simplest correct kernel and as the benchmark's reference point.
// Threads: N*Lq*M*D (total_threads).
template <typename T, typename Index>
__global__ void msda_forward_baseline(
    const T* __restrict__ value,           // (N, S, M, D)
    const long long* __restrict__ levels,  // (L, 4)
    const T* __restrict__ loc,             // (N, Lq, M, L, P, 2)
    const T* __restrict__ attn,            // (N, Lq, M, L, P)
    T* __restrict__ out,                   // (N, Lq, M*D)
    int S, int M, int D, int Lq, int L, int P, long long total_threads) {
    typedef typename AccOf<T>::type A;
    const Index MD = (Index)M * D;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long gid = (long long)blockIdx.x * blockDim.x + threadIdx.x; gid < total_threads; gid += stride) {
        const Index e = (Index)gid;
        const int d = (int)(e % D);
        const Index nqm = e / D;
        const Index n = nqm / ((Index)Lq * M);
        const int m = (int)(nqm % M);
        const T* vbase = value + n * S * MD + (Index)m * D + d;
        A acc = 0;
        bool finite = true;
        for (int l = 0; l < L; ++l) {
            const int H = (int)levels[4 * l], W = (int)levels[4 * l + 1];
            const Index start = (Index)levels[4 * l + 2];
            for (int p = 0; p < P; ++p) {
                const Index k = nqm * (L * P) + l * P + p;
                const Sample<A> s = sample_geometry(Conv<T>::ldg(loc + 2 * k), Conv<T>::ldg(loc + 2 * k + 1), H, W);
                finite = finite && s.finite;
                if (!s.inside) continue;
                const A a = Conv<T>::ldg(attn + k);
                const Index r00 = start + (Index)s.y0 * W + s.x0;
                const bool x0ok = s.x0 >= 0, x1ok = s.x0 + 1 < W;
                const bool y0ok = s.y0 >= 0, y1ok = s.y0 + 1 < H;
                if (y0ok && x0ok) acc += s.hy * s.hx * a * Conv<T>::ldg(vbase + r00 * MD);
                if (y0ok && x1ok) acc += s.hy * s.lx * a * Conv<T>::ldg(vbase + (r00 + 1) * MD);
                if (y1ok && x0ok) acc += s.ly * s.hx * a * Conv<T>::ldg(vbase + (r00 + W) * MD);
                if (y1ok && x1ok) acc += s.ly * s.lx * a * Conv<T>::ldg(vbase + (r00 + W + 1) * MD);
            }
        }
        out[e] = Conv<T>::store(finite ? acc : cyd_nan(A()));
    }
}
