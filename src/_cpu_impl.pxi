# Body of the Cython CPU backend, included by one small .pyx per instruction set
# (_cpu_baseline.pyx, _cpu_avx2.pyx, _cpu_avx512.pyx): setup.py compiles the same code
# with different -m flags and cydeform/_cpu.py picks the best build the processor runs.
#
# Cython CPU backend of cydeform: MSDA forward and hand-derived backward.
#
# Called by cydeform._cpu after validation, with C-contiguous arrays:
# value (N, S, M, D), spatial_shapes (L, 2) int64, level_start_index (L,) int64,
# sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P),
# grad_output (N, Lq, M*D).
#
# Parallel layout (OpenMP through prange; without OpenMP the loops run serially and
# give identical numbers):
# - forward: one task per output row (n, q, m); rows are disjoint.
# - backward: one task per (n, query chunk, range of heads). A task owns its slice of
#   its chunk's grad_value buffer and walks the queries in order, so every element is
#   summed in the same order for any thread count (bit-identical results), and no two
#   threads write one element. The chunk buffers are added in chunk order at the end.
# Tasks are handed out as threads come free (schedule "dynamic", a few small tasks a
# claim: _DYNAMIC_ROWS, _DYNAMIC_TASKS) rather than split in equal shares up front: on the 2-vCPU
# VMs one thread of two often ran 1.5x slower than the other for whole calls (30 against
# 50 ms of the encoder forward, same work), and equal shares made every call wait for
# it (benchmarks/cpu_log.md, 70). Which thread runs a task never changes its bits.

import numpy as np

from cython.parallel cimport parallel, prange, threadid
from libc.math cimport floor, isfinite, NAN
from libc.stdint cimport int32_t, int64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset

def _aligned_empty(shape, dtype):
    """np.empty, but starting on a 64-byte cache line: NumPy's big arrays start 16 bytes
    into a page (glibc), so every 128-byte row of a (.., M, 32) float32 array would
    straddle three lines instead of two (measured on value: up to 1.5x slower gathers)."""
    # Typed, without np.prod or .ctypes: called on every op call, right after the op has
    # swept its caches, where each Python-level step costs microseconds (cpu_log 56).
    dtype = np.dtype(dtype)
    cdef Py_ssize_t nbytes = dtype.itemsize, n
    if not isinstance(shape, tuple):
        shape = tuple(shape) if hasattr(shape, "__len__") else (shape,)
    for n in shape:
        if n < 0:
            raise ValueError(f"negative dimensions are not allowed: {shape}")
        nbytes *= n
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    cdef unsigned char[::1] bytes_ = raw
    cdef Py_ssize_t offset = (64 - <uintptr_t>&bytes_[0] % 64) % 64
    return raw[offset:offset + nbytes].view(dtype).reshape(shape)


ctypedef fused floating:
    float
    double

cdef extern from *:
    """
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    static int cyd_cpu_supports_avx2(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    static int cyd_cpu_supports_avx512(void) {
        __builtin_cpu_init();
        return cyd_cpu_supports_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
            && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    }
    #else
    static int cyd_cpu_supports_avx2(void) { return 0; }
    static int cyd_cpu_supports_avx512(void) { return 0; }
    #endif
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    #include <cpuid.h>
    static int cyd_cpu_is_intel(void) {
        unsigned a, b, c, d;
        if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
        return b == 0x756e6547u && d == 0x49656e69u && c == 0x6c65746eu;  /* "GenuineIntel" */
    }
    #else
    static int cyd_cpu_is_intel(void) { return 0; }
    #endif
    #ifdef _OPENMP
    #include <omp.h>
    static int cyd_max_threads(void) { return omp_get_max_threads(); }
    static int cyd_have_openmp(void) { return 1; }
    #else
    static int cyd_max_threads(void) { return 1; }
    static int cyd_have_openmp(void) { return 0; }
    #endif
    """
    int cyd_max_threads() noexcept nogil
    int cyd_have_openmp() noexcept nogil
    int cyd_cpu_supports_avx2() noexcept nogil
    int cyd_cpu_supports_avx512() noexcept nogil
    int cyd_cpu_is_intel() noexcept nogil


def cpu_supports(str isa):
    """Whether this processor runs the build for ``isa`` ('baseline', 'avx2', 'avx512')."""
    if isa == "baseline":
        return True
    if isa == "avx2":
        return bool(cyd_cpu_supports_avx2())
    if isa == "avx512":
        return bool(cyd_cpu_supports_avx512())
    raise ValueError(f"unknown instruction set {isa!r}")


# Whether phase 3 of the sparse backward prefetches the next block's value rows (all of
# them, in address order, into the L2) while it works on a block: a property of the
# processor, read once. On the AMD machines measured (Zen 3, Zen 4) that prefetch is what
# made phase 3 fast, and prefetching only the rows the block reads was 8-16 % slower
# (benchmarks/cpu_log.md 17, 22, 29); on the Intel one (a Sapphire Rapids class VM) the
# decoder backward is 1.06-1.10x faster without it, the records' own prefetch a few
# ahead reading only the rows they need (100). Never changes a result.
cdef bint _default_block_prefetch = not cyd_cpu_is_intel()


def sparse_block_prefetch_default():
    """Internal: whether the sparse backward prefetches each next block's value rows on
    this processor (False on Intel processors, True elsewhere)."""
    return bool(_default_block_prefetch)


cdef bint _block_prefetch(block_prefetch) except -1:
    if block_prefetch is None:
        return _default_block_prefetch
    if block_prefetch not in (True, False):
        raise ValueError(f"block_prefetch must be True, False or None; got {block_prefetch!r}")
    return block_prefetch

cdef extern from "msda_inner.h":
    void cyd_prefetch_row(const void* p) noexcept nogil
    void cyd_prefetch_row_write(const void* p) noexcept nogil
    void cyd_stream_copy_zero(void* dst, void* src, size_t n) noexcept nogil
    void cyd_copy_short(void* dst, const void* src, size_t n) noexcept nogil
    int64_t cyd_claim(int64_t* counter) noexcept nogil
    void cyd_barrier() noexcept nogil
    void cyd_prefetch_line_l2(const void* p) noexcept nogil
    void cyd_prefetch_line(const void* p) noexcept nogil
    void cyd_prefetch_write(const void* p) noexcept nogil
    void cyd_accumulate_f(float* out, const float** ptr, const float* w, ptrdiff_t npts,
                          ptrdiff_t D) noexcept nogil
    void cyd_accumulate_d(double* out, const double** ptr, const double* w, ptrdiff_t npts,
                          ptrdiff_t D) noexcept nogil
    void cyd_sample_backward_f(const float* g, const float* v0, const float* v1, const float* v2,
                               const float* v3, float* gv0, float* gv1, float* gv2, float* gv3,
                               float aw0, float aw1, float aw2, float aw3, ptrdiff_t D,
                               float* lanes) noexcept nogil
    void cyd_sample_backward_d(const double* g, const double* v0, const double* v1, const double* v2,
                               const double* v3, double* gv0, double* gv1, double* gv2, double* gv3,
                               double aw0, double aw1, double aw2, double aw3, ptrdiff_t D,
                               double* lanes) noexcept nogil
    void cyd_reduce_lanes_f(const float* lanes, double* dots) noexcept nogil
    void cyd_reduce_lanes_d(const double* lanes, double* dots) noexcept nogil
    void cyd_axpy_f(float* out, float w, const float* x, ptrdiff_t D) noexcept nogil
    void cyd_axpy_d(double* out, double w, const double* x, ptrdiff_t D) noexcept nogil
    double cyd_dot_f(const float* g, const float* v, ptrdiff_t D) noexcept nogil
    double cyd_dot_d(const double* g, const double* v, ptrdiff_t D) noexcept nogil
    void cyd_record_f(const float* g, const float* v0, const float* v1, float* out0, float* out1,
                      float w0, float w1, int pair, ptrdiff_t D, double* dots) noexcept nogil
    void cyd_record_d(const double* g, const double* v0, const double* v1, double* out0, double* out1,
                      double w0, double w1, int pair, ptrdiff_t D, double* dots) noexcept nogil
    int CYD_SPARSE_GEOMETRY_LANES
    int CYD_FWD_GEOMETRY_LANES
    int CYD_FWD_BLOCK
    int cyd_forward_points_f(const float* loc, const float* attn, ptrdiff_t n, const double* tab,
                             ptrdiff_t stride, const float* value, ptrdiff_t row_stride, const float* zeros,
                             const float** ptr, float* w) noexcept nogil
    int cyd_forward_points_d(const double* loc, const double* attn, ptrdiff_t n, const double* tab,
                             ptrdiff_t stride, const double* value, ptrdiff_t row_stride, const double* zeros,
                             const double** ptr, double* w) noexcept nogil
    void cyd_accumulate_planar_f(float* out, const float** ptr, const float* w, ptrdiff_t npts,
                                 ptrdiff_t D) noexcept nogil
    void cyd_accumulate_planar_d(double* out, const double** ptr, const double* w, ptrdiff_t npts,
                                 ptrdiff_t D) noexcept nogil
    int CYD_HAVE_SHUFFLEVECTOR
    ctypedef struct cyd_levels:
        const int64_t* base
        const int64_t* WM
        const double* Wd
        const double* Hd
        const int32_t* Wi
        int narrow
    void cyd_sparse_geometry_f(const float* loc, const float* attn, ptrdiff_t n, const cyd_levels* lv,
                               int64_t key_nm, int64_t M, int64_t* keys, float* weights, double* geo,
                               signed char* status) noexcept nogil
    void cyd_sparse_geometry_d(const double* loc, const double* attn, ptrdiff_t n, const cyd_levels* lv,
                               int64_t key_nm, int64_t M, int64_t* keys, double* weights, double* geo,
                               signed char* status) noexcept nogil
    void cyd_point_gradients_f(double lx, double ly, double a, double W, double H, const double* d,
                               float* grad_attn, float* grad_loc) noexcept nogil
    void cyd_point_gradients_d(double lx, double ly, double a, double W, double H, const double* d,
                               double* grad_attn, double* grad_loc) noexcept nogil
    void cyd_sparse_gradients_f(const int64_t* where, const double* dots, const float* g, const float* zeros,
                                ptrdiff_t D, const double* geo, const float* attn, const cyd_levels* lv,
                                ptrdiff_t n, float* grad_loc, float* grad_attn) noexcept nogil
    void cyd_sparse_gradients_d(const int64_t* where, const double* dots, const double* g, const double* zeros,
                                ptrdiff_t D, const double* geo, const double* attn, const cyd_levels* lv,
                                ptrdiff_t n, double* grad_loc, double* grad_attn) noexcept nogil

# 0 means "OpenMP's default" (omp_get_max_threads, i.e. OMP_NUM_THREADS or the core count).
cdef int _num_threads = 0


def set_num_threads(int n):
    global _num_threads
    _num_threads = n


def get_num_threads():
    """Threads the parallel loops use: 1 in a build without OpenMP."""
    if not cyd_have_openmp():
        return 1
    return _num_threads if _num_threads > 0 else cyd_max_threads()


# Calls smaller than this many channel-samples (samples x D) run on one thread: waking
# a thread team costs more than they take, and far more on a busy machine. It also
# gates the backward's query chunks (query_chunks), which set grad_value's summation
# order; results never depend on the thread count. Tests lower it to 0 so that small
# problems exercise the parallel and chunked paths.
cdef int64_t _min_parallel_work = 1 << 18


def set_min_parallel_work(int64_t work):
    """Internal: work (samples x D) below which a call runs single-threaded; returns the old value."""
    global _min_parallel_work
    old = _min_parallel_work
    _min_parallel_work = work
    return old


cdef inline int _threads(int64_t work) noexcept nogil:
    if work < _min_parallel_work:
        return 1
    return _num_threads if _num_threads > 0 else cyd_max_threads()


# Geometry of one sampling point on one level: the four corner offsets into the level
# (in units of M*D elements, -1 when the corner is outside the map) and the bilinear
# fractions. Returns 0 if the point's cell [x0, x0+1) x [y0, y0+1) holds no texel
# (x < -1, x >= W, y < -1 or y >= H), 1 if it does, -1 if its location is not finite.
# At x = -1 the output is 0 but the one-sided location gradient (from the cell to the
# right, as everywhere) is not, hence >=. The range check happens in floating point,
# before any int conversion.
cdef inline int _corners(double loc_x, double loc_y, int64_t H, int64_t W,
                         int64_t* idx, double* lx, double* ly) noexcept nogil:
    cdef double x = loc_x * W - 0.5
    cdef double y = loc_y * H - 0.5
    if not (x >= -1.0 and x < W and y >= -1.0 and y < H):
        # Also every non-finite location (NaN compares false; +-inf falls outside), so the
        # finiteness tests run only here (cpu_log 80).
        return 0 if isfinite(loc_x) and isfinite(loc_y) else -1
    cdef double x0f = floor(x)
    cdef double y0f = floor(y)
    cdef int64_t x0 = <int64_t>x0f
    cdef int64_t y0 = <int64_t>y0f
    lx[0] = x - x0f
    ly[0] = y - y0f
    cdef bint in_y0 = y0 >= 0
    cdef bint in_y1 = y0 + 1 < H
    cdef bint in_x0 = x0 >= 0
    cdef bint in_x1 = x0 + 1 < W
    idx[0] = y0 * W + x0 if (in_y0 and in_x0) else -1
    idx[1] = y0 * W + x0 + 1 if (in_y0 and in_x1) else -1
    idx[2] = (y0 + 1) * W + x0 if (in_y1 and in_x0) else -1
    idx[3] = (y0 + 1) * W + x0 + 1 if (in_y1 and in_x1) else -1
    return 1


# Samples whose corner pointers and weights the forward gathers before accumulating
# them: all loads of a block are independent, so their cache misses overlap.
cdef enum:
    _BLOCK = 64
    _LANES = 8  # CYD_LANES of msda_inner.h
    _BY_HEAD_SAMPLES = 3  # _by_head's threshold, samples per value position and head (cpu_log 16)
    _LAYOUT_BLOCK = 64  # positions per task of the layout copies
    _QUERY_BLOCK = 32  # queries per task of the head-major forward
    _DYNAMIC_ROWS = 16  # rows a claim of the row-by-row forward (the decoder call's)
    _DYNAMIC_TASKS = 8  # tasks a claim of the head-major forward and the layout copies
    _DYNAMIC_ELEMENTS = 1 << 14  # elements a claim of the chunk buffers' sum


cdef inline void _accumulate(floating* out, const floating** ptr, const floating* w, Py_ssize_t npts,
                             Py_ssize_t D) noexcept nogil:
    if floating is float:
        cyd_accumulate_f(out, ptr, w, npts, D)
    else:
        cyd_accumulate_d(out, ptr, w, npts, D)


cdef inline void _forward_row(const floating* value_nm, const floating* zeros, int64_t row_stride,
                              const int64_t* shapes, const int64_t* starts, Py_ssize_t L, Py_ssize_t P,
                              Py_ssize_t D, const floating* loc, const floating* attn,
                              floating* out) noexcept nogil:
    """out (D,) = sum_{l,p} attn[l,p] * bilinear sample of level l at loc[l,p] (one (n, q, m) row)."""
    cdef Py_ssize_t l, p, d, c, k
    cdef int64_t idx[4]
    cdef double lx, ly, a
    cdef const floating* ptr[4 * _BLOCK]
    cdef floating w[4 * _BLOCK]
    cdef Py_ssize_t npts = 0
    cdef bint nonfinite = False
    cdef int status
    for d in range(D):
        out[d] = 0
    for l in range(L):
        for p in range(P):
            status = _corners(loc[2 * (l * P + p)], loc[2 * (l * P + p) + 1],
                              shapes[2 * l], shapes[2 * l + 1], idx, &lx, &ly)
            if status < 0:
                nonfinite = True
                continue
            if status == 0:
                continue
            a = attn[l * P + p]
            k = 4 * npts
            w[k] = <floating>(a * ((1.0 - ly) * (1.0 - lx)))
            w[k + 1] = <floating>(a * ((1.0 - ly) * lx))
            w[k + 2] = <floating>(a * (ly * (1.0 - lx)))
            w[k + 3] = <floating>(a * (ly * lx))
            if idx[0] >= 0 and idx[3] >= 0:
                # All four corners inside (corner 0 in: x0, y0 >= 0; corner 3 in: x0 + 1 < W,
                # y0 + 1 < H), the common case: one index, no test per corner (cpu_log 79).
                ptr[k] = value_nm + (starts[l] + idx[0]) * row_stride
                ptr[k + 1] = ptr[k] + row_stride
                ptr[k + 2] = ptr[k] + shapes[2 * l + 1] * row_stride
                ptr[k + 3] = ptr[k + 2] + row_stride
                cyd_prefetch_row(ptr[k])
                cyd_prefetch_row(ptr[k + 1])
                cyd_prefetch_row(ptr[k + 2])
                cyd_prefetch_row(ptr[k + 3])
            else:
                for c in range(4):
                    # Corners outside the map read a zero row with weight 0: exact zero.
                    if idx[c] >= 0:
                        ptr[k + c] = value_nm + (starts[l] + idx[c]) * row_stride
                        cyd_prefetch_row(ptr[k + c])
                    else:
                        ptr[k + c] = zeros
                        w[k + c] = 0
            npts += 1
            if npts == _BLOCK:
                _accumulate(out, ptr, w, npts, D)
                npts = 0
    if npts > 0:
        _accumulate(out, ptr, w, npts, D)
    if nonfinite:
        for d in range(D):
            out[d] = NAN


cdef inline bint _forward_vector_applies(const int64_t* shapes, const int64_t* starts,
                                         Py_ssize_t L) noexcept nogil:
    """Whether the build has cyd_forward_points' vector code and every level suits it: it
    truncates x and y (< W, < H) to int32 and forms start + y0 W + x0 in a double, exact
    below 2^53. Otherwise the forward takes its points one at a time (_forward_row)."""
    cdef Py_ssize_t l
    cdef int64_t two31 = 2147483648, two53 = 9007199254740992
    if CYD_FWD_GEOMETRY_LANES == 1:
        return False
    for l in range(L):
        if shapes[2 * l] >= two31 or shapes[2 * l + 1] >= two31:
            return False
        if shapes[2 * l] * shapes[2 * l + 1] >= two53 - starts[l]:  # both below 2^62: no overflow
            return False
    return True


def forward_vector_applies(const int64_t[:, ::1] spatial_shapes, const int64_t[::1] level_start_index):
    """Internal (tests): whether this build's forward takes these levels' points eight at a
    time (cyd_forward_points) or one at a time (_forward_row)."""
    return _forward_vector_applies(&spatial_shapes[0, 0], &level_start_index[0], spatial_shapes.shape[0])


cdef double* _forward_tab(const int64_t* shapes, const int64_t* starts, Py_ssize_t L,
                          Py_ssize_t P) noexcept nogil:
    """Per point k = l P + p of a row: W, H and the level's first position as doubles, at
    tab[k], tab[LP + k], tab[2 LP + k] (cyd_forward_points' table); NULL where the points
    go one at a time (not _forward_vector_applies) or malloc fails."""
    if not _forward_vector_applies(shapes, starts, L):
        return NULL
    cdef Py_ssize_t LP = L * P, l, p
    cdef double* tab = <double*>malloc(3 * LP * sizeof(double))
    if tab == NULL:
        return NULL
    for l in range(L):
        for p in range(P):
            tab[l * P + p] = <double>shapes[2 * l + 1]
            tab[LP + l * P + p] = <double>shapes[2 * l]
            tab[2 * LP + l * P + p] = <double>starts[l]
    return tab


cdef inline void _forward_row_v(const floating* value_nm, const floating* zeros, int64_t row_stride,
                                const int64_t* shapes, const double* tab, Py_ssize_t L, Py_ssize_t P,
                                Py_ssize_t D, const floating* loc, const floating* attn,
                                floating* out) noexcept nogil:
    """_forward_row with the corner rows and weights of up to _BLOCK points at a time from
    cyd_forward_points (src/msda_inner.h: eight a step in vectors), points outside the map
    included as zero rows of weight 0: the same sums, so the same bits."""
    cdef Py_ssize_t LP = L * P, c0, nb, j, d
    cdef const floating* ptr[4 * _BLOCK]
    cdef floating w[4 * _BLOCK]
    cdef bint nonfinite = False
    for d in range(D):
        out[d] = 0
    c0 = 0
    while c0 < LP:
        nb = min(<Py_ssize_t>_BLOCK, LP - c0)
        if floating is float:
            nonfinite |= cyd_forward_points_f(loc + 2 * c0, attn + c0, nb, tab + c0, LP, value_nm, row_stride,
                                              zeros, ptr, w)
        else:
            nonfinite |= cyd_forward_points_d(loc + 2 * c0, attn + c0, nb, tab + c0, LP, value_nm, row_stride,
                                              zeros, ptr, w)
        for j in range(nb):
            cyd_prefetch_row(ptr[j])
            cyd_prefetch_row(ptr[_BLOCK + j])
            cyd_prefetch_row(ptr[2 * _BLOCK + j])
            cyd_prefetch_row(ptr[3 * _BLOCK + j])
        if floating is float:
            cyd_accumulate_planar_f(out, ptr, w, nb, D)
        else:
            cyd_accumulate_planar_d(out, ptr, w, nb, D)
        c0 += nb
    if nonfinite:
        for d in range(D):
            out[d] = NAN


cdef void _forward(const floating* value, const int64_t* shapes, const int64_t* starts,
                   const floating* loc, const floating* attn, floating* out, const floating* zeros,
                   Py_ssize_t N, Py_ssize_t S, Py_ssize_t M, Py_ssize_t D, Py_ssize_t Lq,
                   Py_ssize_t L, Py_ssize_t P) noexcept nogil:
    cdef Py_ssize_t r, n, m
    cdef double* tab = _forward_tab(shapes, starts, L, P)
    for r in prange(N * Lq * M, schedule="dynamic", chunksize=_DYNAMIC_ROWS,
                    num_threads=_threads(N * Lq * M * L * P * D)):
        n = r // (Lq * M)
        m = r % M
        if tab != NULL:
            _forward_row_v(value + n * S * M * D + m * D, zeros, M * D, shapes, tab, L, P, D,
                           loc + r * L * P * 2, attn + r * L * P, out + r * D)
        else:
            _forward_row(value + n * S * M * D + m * D, zeros, M * D, shapes, starts, L, P, D,
                         loc + r * L * P * 2, attn + r * L * P, out + r * D)
    free(tab)


cdef inline void _rows_in(floating* dst, const floating* src, Py_ssize_t width, Py_ssize_t r0,
                          Py_ssize_t step, Py_ssize_t count) noexcept nogil:
    """dst[j] = src row r0 + j * step, for j < count (rows of ``width`` elements)."""
    cdef Py_ssize_t j
    for j in range(count):
        cyd_copy_short(dst + j * width, src + (r0 + j * step) * width, width * sizeof(floating))


cdef inline void _rows_out(floating* dst, const floating* src, Py_ssize_t width, Py_ssize_t r0,
                           Py_ssize_t step, Py_ssize_t count) noexcept nogil:
    """dst row r0 + j * step = src[j], for j < count: the inverse of _rows_in."""
    cdef Py_ssize_t j
    for j in range(count):
        cyd_copy_short(dst + (r0 + j * step) * width, src + j * width, width * sizeof(floating))


cdef enum:
    # What _row_prefetch asks for.
    _FOR_READ = 0  # into the L1
    _FOR_WRITE = 1  # into the L1, for writing
    _FOR_READ_L2 = 2  # into the L2 only


cdef inline void _prefetch_one(const char* p, int kind) noexcept nogil:
    if kind == _FOR_WRITE:
        cyd_prefetch_write(p)
    elif kind == _FOR_READ_L2:
        cyd_prefetch_line_l2(p)
    else:
        cyd_prefetch_line(p)


cdef inline void _row_prefetch(const floating* row, Py_ssize_t width, int kind) noexcept nogil:
    """Ask for the lines of one row of ``width`` elements (``kind``: _FOR_READ, _FOR_WRITE
    or _FOR_READ_L2)."""
    cdef const char* p = <const char*>row
    cdef Py_ssize_t nbytes = width * sizeof(floating), off = 0
    while off < nbytes:
        _prefetch_one(p + off, kind)
        off += 64
    # The last byte: a row that does not start on a line ends on one line more.
    _prefetch_one(p + nbytes - 1, kind)


cdef void _forward_heads(const floating* value, const int64_t* shapes, const int64_t* starts,
                         const floating* loc, const floating* attn, floating* out, const floating* zeros,
                         floating* scratch, Py_ssize_t N, Py_ssize_t S, Py_ssize_t M, Py_ssize_t D,
                         Py_ssize_t Lq, Py_ssize_t L, Py_ssize_t P, int threads) noexcept nogil:
    """The forward on head-major value (N, M, S, D): tasks (n, m, block of _QUERY_BLOCK
    queries) on ``threads`` threads. A head's rows are 1 in M of the per-row arrays, so a
    task first copies its rows' inputs into its thread's ``scratch`` (sized by
    _heads_scratch_size for ``threads``) in one loop of independent loads, runs the rows
    there and copies the outputs out at the end."""
    cdef Py_ssize_t LP = L * P, per = _QUERY_BLOCK * (3 * LP + D)
    cdef Py_ssize_t blocks = (Lq + _QUERY_BLOCK - 1) // _QUERY_BLOCK
    cdef Py_ssize_t t, n, m, q_lo, q_hi, q1, r0, r1, nb, j
    cdef floating* b_loc
    cdef floating* b_attn
    cdef floating* b_out
    cdef double* tab = _forward_tab(shapes, starts, L, P)
    for t in prange(N * M * blocks, schedule="dynamic", chunksize=_DYNAMIC_TASKS, num_threads=threads):
        n = t // (M * blocks)
        m = (t // blocks) % M
        q_lo = (t % blocks) * _QUERY_BLOCK
        q_hi = min(Lq, q_lo + _QUERY_BLOCK)
        b_loc = scratch + threadid() * per
        b_attn = b_loc + _QUERY_BLOCK * 2 * LP
        b_out = b_attn + _QUERY_BLOCK * LP
        r0 = (n * Lq + q_lo) * M + m  # the task's rows: r0, r0 + M, ...
        _rows_in(b_loc, loc, 2 * LP, r0, M, q_hi - q_lo)
        _rows_in(b_attn, attn, LP, r0, M, q_hi - q_lo)
        if t + 1 < N * M * blocks:
            # The next task's rows: this thread's next one, but at the end of a claim
            # (every _DYNAMIC_TASKS) maybe another thread's: a hint either way.
            q1 = ((t + 1) % blocks) * _QUERY_BLOCK
            r1 = ((t + 1) // (M * blocks) * Lq + q1) * M + ((t + 1) // blocks) % M
            nb = min(Lq, q1 + _QUERY_BLOCK) - q1
        else:
            r1 = r0
            nb = 0
        for j in range(q_hi - q_lo):
            if j < nb:
                # The next task's row j meanwhile (not all its rows at once: a burst
                # would fill the miss buffers the gathers need).
                _row_prefetch(loc + (r1 + j * M) * 2 * LP, 2 * LP, _FOR_READ)
                _row_prefetch(attn + (r1 + j * M) * LP, LP, _FOR_READ)
                _row_prefetch(out + (r1 + j * M) * D, D, _FOR_WRITE)
            if tab != NULL:
                _forward_row_v(value + (n * M + m) * S * D, zeros, D, shapes, tab, L, P, D,
                               b_loc + j * 2 * LP, b_attn + j * LP, b_out + j * D)
            else:
                _forward_row(value + (n * M + m) * S * D, zeros, D, shapes, starts, L, P, D,
                             b_loc + j * 2 * LP, b_attn + j * LP, b_out + j * D)
        _rows_out(out, b_out, D, r0, M, q_hi - q_lo)
    free(tab)


cdef inline Py_ssize_t _heads_scratch_size(int threads, Py_ssize_t L, Py_ssize_t P, Py_ssize_t D) noexcept nogil:
    return threads * _QUERY_BLOCK * (3 * L * P + D)


# ------------------------------------------------------------------ head-major layout
# With value as the caller gives it, (N, S, M, D), one head's rows are 128 bytes in
# every M*D*itemsize: a thread gathering for one head touches pages (TLB entries) and
# cache sets of all of value, and the two corners (x0, x0+1) are M rows apart. With
# many samples per value position (the encoder call: 16), the op first copies value
# into the head-major layout (N, M, S, D) and works head by head: a thread's working
# set is one head's contiguous slab (2.8 MB of the encoder call's 22.7 MB; the
# backward's grad_value slab as much again), and x0, x0+1 are adjacent rows.
# Measured (benchmarks/cpu_log.md, 13): the encoder backward 1.6-2.6x faster with
# uniform locations (Zen 3 and Zen 4 VMs). The arithmetic and its order per output element are unchanged:
# both layouts give the same bits.

cdef inline bint _by_head(Py_ssize_t S, Py_ssize_t Lq, Py_ssize_t L, Py_ssize_t P) noexcept nogil:
    # Samples per value position and head, in one image (never the thread count or the
    # batch size): enough to earn the copies.
    return Lq * L * P >= _BY_HEAD_SAMPLES * S


def geometry_lanes():
    """Internal (tests): (the most points a step of the sparse geometry in this build: 8
    with AVX-512, 4 with AVX2, else 1; whether the compiler had __builtin_shufflevector,
    which the vector paths need)."""
    return CYD_SPARSE_GEOMETRY_LANES, bool(CYD_HAVE_SHUFFLEVECTOR)


if CYD_FWD_BLOCK != _BLOCK:  # cyd_forward_points' arrays are sized by _BLOCK here
    raise ImportError(f"CYD_FWD_BLOCK ({CYD_FWD_BLOCK}) != _BLOCK ({_BLOCK})")


def forward_geometry_lanes():
    """Internal (tests): points a step of the forward's geometry in this build: 8 where
    it has AVX-512 (cyd_forward_points and _forward_row_v), else 1 (_forward_row)."""
    return CYD_FWD_GEOMETRY_LANES


def by_head(Py_ssize_t S, Py_ssize_t Lq, Py_ssize_t L, Py_ssize_t P):
    """Internal: whether forward() and the dense backward() use the head-major layout."""
    return _by_head(S, Lq, L, P)


cdef void _to_heads(const floating* src, floating* dst, Py_ssize_t N, Py_ssize_t S, Py_ssize_t M,
                    Py_ssize_t D, int threads) noexcept nogil:
    """dst (N, M, S, D) = src (N, S, M, D), in blocks of positions (M write streams each)."""
    cdef Py_ssize_t b, n, s, s_lo, s_hi, m, d
    cdef Py_ssize_t blocks = (S + _LAYOUT_BLOCK - 1) // _LAYOUT_BLOCK
    cdef const floating* a
    cdef floating* o
    for b in prange(N * blocks, schedule="dynamic", chunksize=_DYNAMIC_TASKS, num_threads=threads):
        n = b // blocks
        s_lo = (b % blocks) * _LAYOUT_BLOCK
        s_hi = min(S, s_lo + _LAYOUT_BLOCK)
        for s in range(s_lo, s_hi):
            for m in range(M):
                a = src + ((n * S + s) * M + m) * D
                o = dst + ((n * M + m) * S + s) * D
                for d in range(D):
                    o[d] = a[d]


cdef void _from_heads(const floating* chunks, Py_ssize_t K, floating* dst, Py_ssize_t N, Py_ssize_t S,
                      Py_ssize_t M, Py_ssize_t D, int threads) noexcept nogil:
    """dst (N, S, M, D) = chunk 0 + chunk 1 + ... (in this order) of the K head-major
    buffers (K, N, M, S, D): the dense backward's query-chunk sum and layout change in one pass."""
    cdef Py_ssize_t b, n, s, s_lo, s_hi, m, d, c
    cdef Py_ssize_t blocks = (S + _LAYOUT_BLOCK - 1) // _LAYOUT_BLOCK
    cdef Py_ssize_t size = N * M * S * D
    cdef const floating* a
    cdef floating* o
    cdef floating acc
    for b in prange(N * blocks, schedule="dynamic", chunksize=_DYNAMIC_TASKS, num_threads=threads):
        n = b // blocks
        s_lo = (b % blocks) * _LAYOUT_BLOCK
        s_hi = min(S, s_lo + _LAYOUT_BLOCK)
        for s in range(s_lo, s_hi):
            for m in range(M):
                a = chunks + ((n * M + m) * S + s) * D
                o = dst + ((n * S + s) * M + m) * D
                for d in range(D):
                    acc = a[d]
                    for c in range(1, K):
                        acc = acc + a[c * size + d]
                    o[d] = acc


def _work_buffer(work, Py_ssize_t n, dtype):
    if work is None:
        return _aligned_empty(n, dtype)
    buf = work(n)
    if buf.ndim != 1 or buf.shape[0] < n or buf.dtype != dtype or not buf.flags.c_contiguous:
        raise ValueError(f"work({n}) must return a 1-d C-contiguous {np.dtype(dtype).name} array of "
                         f">= {n} elements")
    return buf


def _use_heads(layout, Py_ssize_t S, Py_ssize_t Lq, Py_ssize_t L, Py_ssize_t P):
    if layout is None:
        return _by_head(S, Lq, L, P)
    if layout not in ("heads", "positions"):
        raise ValueError(f"layout must be 'heads', 'positions' or None; got {layout!r}")
    return layout == "heads"


def forward(value, const int64_t[:, ::1] spatial_shapes, const int64_t[::1] level_start_index,
            sampling_locations, attention_weights, layout=None, work=None):
    """Forward on validated C-contiguous arrays; returns (N, Lq, M*D) of value's dtype.

    ``layout``: 'heads' (work on a head-major copy of value), 'positions' (on value as
    given) or None: 'heads' where by_head(S, Lq, L, P). Both give the same bits.
    ``work``: optional callable ``work(n)`` returning a 1-d C-contiguous array of n
    elements of value's dtype (contents unused) for the head-major copy, such as a
    buffer kept between calls (cydeform._staging); by default a fresh one.
    """
    N, S, M, D = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    heads = _use_heads(layout, S, Lq, L, P)
    # Read once: the scratch below is sized for this many threads (set_num_threads may
    # be called from another Python thread meanwhile).
    cdef int threads = _threads(N * Lq * M * L * P * D)
    out = _aligned_empty((N, Lq, M * D), value.dtype)
    zeros = np.zeros(D, dtype=value.dtype)
    # The head-major copy of value, then the scratch rows of _forward_heads (unused otherwise).
    buf = _work_buffer(work, value.size + _heads_scratch_size(threads, L, P, D), value.dtype) if heads else zeros
    if value.dtype == np.float32:
        _forward_typed[float](value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, out, zeros, buf, heads, threads)
    else:
        _forward_typed[double](value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights, out, zeros, buf, heads, threads)
    return out


cdef _forward_typed(const floating[:, :, :, ::1] value, const int64_t[:, ::1] shapes,
                    const int64_t[::1] starts, const floating[:, :, :, :, :, ::1] loc,
                    const floating[:, :, :, :, ::1] attn, floating[:, :, ::1] out,
                    const floating[::1] zeros, floating[::1] work, bint heads, int threads):
    cdef Py_ssize_t N = value.shape[0], S = value.shape[1], M = value.shape[2], D = value.shape[3]
    cdef Py_ssize_t Lq = loc.shape[1], L = loc.shape[3], P = loc.shape[4]
    with nogil:
        if heads:
            _to_heads(&value[0, 0, 0, 0], &work[0], N, S, M, D, threads)
            _forward_heads(&work[0], &shapes[0, 0], &starts[0], &loc[0, 0, 0, 0, 0, 0], &attn[0, 0, 0, 0, 0],
                           &out[0, 0, 0], &zeros[0], &work[0] + N * S * M * D, N, S, M, D, Lq, L, P, threads)
        else:
            _forward(&value[0, 0, 0, 0], &shapes[0, 0], &starts[0], &loc[0, 0, 0, 0, 0, 0],
                     &attn[0, 0, 0, 0, 0], &out[0, 0, 0], &zeros[0], N, S, M, D, Lq, L, P)


# Backward of one sampling point: four dot products g . V_c give every scalar gradient,
#   dA = sum_c w_c (g . V_c)
#   dx = hy (g.V01 - g.V00) + ly (g.V11 - g.V10),   dloc_x = W * A * dx
#   dy = hx (g.V10 - g.V00) + lx (g.V11 - g.V01),   dloc_y = H * A * dy
# and grad_value[c] += A * w_c * g for the corners inside the map (the first three:
# cyd_point_gradients, src/msda_inner.h, for both backward methods).
cdef inline void _bilinear(double lx, double ly, double* w) noexcept nogil:
    """The four corners' bilinear weights w_c (before the attention weight)."""
    w[0] = (1.0 - ly) * (1.0 - lx)
    w[1] = (1.0 - ly) * lx
    w[2] = ly * (1.0 - lx)
    w[3] = ly * lx


cdef inline void _backward_block(Py_ssize_t D,
                                 const floating* g, const int64_t* geo_k, const int* inside, const double* geo,
                                 const floating** v, floating** gv, Py_ssize_t npts,
                                 floating* grad_loc, floating* grad_attn) noexcept nogil:
    """Backward of ``npts`` in-map samples whose geometry _backward_row gathered.

    Sample j is point geo_k[j] of the row; geo[5j:5j+5] = (lx, ly, A, W, H); bit c of
    inside[j] says corner c is in the map. Its corner rows are v[4j:4j+4] (value) and
    gv[4j:4j+4] (grad_value, scattered into); corners outside the map read a zero row
    and scatter into the task's scratch rows with weight 0.
    First every sample's loads and scatters (partial sums kept), then every sample's
    scalar gradients: the loads of several samples are in flight together.
    """
    cdef Py_ssize_t j, c, k
    cdef double a
    cdef double dots[4]
    cdef double w[4]
    cdef floating aw[4]
    cdef floating lanes[4 * _LANES * _BLOCK]
    for j in range(npts):
        a = geo[5 * j + 2]
        _bilinear(geo[5 * j], geo[5 * j + 1], w)
        for c in range(4):
            aw[c] = <floating>(a * w[c]) if inside[j] & (1 << c) else 0
        if floating is float:
            cyd_sample_backward_f(g, v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3],
                                  gv[4 * j], gv[4 * j + 1], gv[4 * j + 2], gv[4 * j + 3],
                                  aw[0], aw[1], aw[2], aw[3], D, lanes + 4 * _LANES * j)
        else:
            cyd_sample_backward_d(g, v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3],
                                  gv[4 * j], gv[4 * j + 1], gv[4 * j + 2], gv[4 * j + 3],
                                  aw[0], aw[1], aw[2], aw[3], D, lanes + 4 * _LANES * j)
    for j in range(npts):
        if floating is float:
            cyd_reduce_lanes_f(lanes + 4 * _LANES * j, dots)
        else:
            cyd_reduce_lanes_d(lanes + 4 * _LANES * j, dots)
        k = geo_k[j]
        if floating is float:
            cyd_point_gradients_f(geo[5 * j], geo[5 * j + 1], geo[5 * j + 2], geo[5 * j + 3], geo[5 * j + 4],
                                  dots, grad_attn + k, grad_loc + 2 * k)
        else:
            cyd_point_gradients_d(geo[5 * j], geo[5 * j + 1], geo[5 * j + 2], geo[5 * j + 3], geo[5 * j + 4],
                                  dots, grad_attn + k, grad_loc + 2 * k)


cdef inline void _backward_row(const floating* value_nm, floating* grad_value_nm, const floating* zeros,
                               floating* scratch, int64_t row_stride, const int64_t* shapes,
                               const int64_t* starts, Py_ssize_t L, Py_ssize_t P, Py_ssize_t D,
                               const floating* g, const floating* loc, const floating* attn,
                               floating* grad_loc, floating* grad_attn) noexcept nogil:
    """Gradients of one (n, q, m) row of the dense backward: accumulates into
    grad_value_nm (owned by the caller's task); ``scratch`` is 4 rows of D owned by the
    task, where corners outside the map scatter (weight 0), so the inner loop needs no
    branch. The row's samples are handled in blocks: first their geometry, with a
    prefetch of every corner row (so the misses overlap), then the channel loops.
    """
    cdef Py_ssize_t l, p, c, k
    cdef int64_t idx[4]
    cdef int64_t off, down
    cdef double lx, ly
    cdef int status
    cdef int64_t geo_k[_BLOCK]
    cdef double geo[5 * _BLOCK]
    cdef int inside[_BLOCK]
    cdef const floating* v[4 * _BLOCK]
    cdef floating* gv[4 * _BLOCK]
    cdef Py_ssize_t npts = 0
    for l in range(L):
        for p in range(P):
            k = l * P + p
            status = _corners(loc[2 * k], loc[2 * k + 1], shapes[2 * l], shapes[2 * l + 1], idx, &lx, &ly)
            if status <= 0:
                # Non-finite location: NaN gradients; outside the map: zero gradients.
                grad_attn[k] = NAN if status < 0 else 0
                grad_loc[2 * k] = grad_attn[k]
                grad_loc[2 * k + 1] = grad_attn[k]
                continue
            geo_k[npts] = k
            geo[5 * npts] = lx
            geo[5 * npts + 1] = ly
            geo[5 * npts + 2] = attn[k]
            geo[5 * npts + 3] = <double>shapes[2 * l + 1]
            geo[5 * npts + 4] = <double>shapes[2 * l]
            if idx[0] >= 0 and idx[3] >= 0:
                # All four corners inside (corner 0 in: x0, y0 >= 0; corner 3 in: x0 + 1 < W,
                # y0 + 1 < H), the common case: one index, no test per corner (cpu_log 79).
                inside[npts] = 15
                off = (starts[l] + idx[0]) * row_stride
                down = shapes[2 * l + 1] * row_stride
                for c in range(4):
                    v[4 * npts + c] = value_nm + off + (c >> 1) * down + (c & 1) * row_stride
                    gv[4 * npts + c] = grad_value_nm + off + (c >> 1) * down + (c & 1) * row_stride
                    cyd_prefetch_row(v[4 * npts + c])
                    cyd_prefetch_row(gv[4 * npts + c])
            else:
                inside[npts] = 0
                for c in range(4):
                    if idx[c] >= 0:
                        inside[npts] |= 1 << c
                        v[4 * npts + c] = value_nm + (starts[l] + idx[c]) * row_stride
                        gv[4 * npts + c] = grad_value_nm + (starts[l] + idx[c]) * row_stride
                        cyd_prefetch_row(v[4 * npts + c])
                        cyd_prefetch_row(gv[4 * npts + c])
                    else:
                        v[4 * npts + c] = zeros
                        gv[4 * npts + c] = scratch + c * D
            npts += 1
            if npts == _BLOCK:
                _backward_block(D, g, geo_k, inside, geo, v, gv, npts, grad_loc, grad_attn)
                npts = 0
    if npts > 0:
        _backward_block(D, g, geo_k, inside, geo, v, gv, npts, grad_loc, grad_attn)


# Query chunks of the backward, per image: each chunk scatters into its own grad_value
# buffer (chunk 0 into grad_value itself), summed in chunk order at the end. Two threads
# splitting the heads of one image instead write alternate halves of the same cache
# pages and slow each other down (measured: no faster than one thread); splitting the
# queries, each thread writes its own buffer. The count depends on one image's size
# (and the internal threshold tests lower), never on the thread count or the batch
# size, so results stay bit-identical for any number of threads and an image's
# gradient is the same alone or in any batch (what cydeform.dask relies on).
cdef enum:
    _QUERY_CHUNKS = 2


def query_chunks(Py_ssize_t S, Py_ssize_t Lq, Py_ssize_t L, Py_ssize_t P, int64_t work):
    """Internal: how many query chunks (grad_value buffers) the backward uses per image.

    ``work`` is one image's samples x D. Only for images with many samples per value
    position (the encoder call has 16): the extra buffer costs a pass over S*M*D, which
    a decoder call (300 queries) would not earn back.
    """
    return _query_chunks(S, Lq, L, P, work)


cdef inline Py_ssize_t _query_chunks(Py_ssize_t S, Py_ssize_t Lq, Py_ssize_t L, Py_ssize_t P,
                                     int64_t work) noexcept nogil:
    if Lq >= 2 * _QUERY_CHUNKS and Lq * L * P >= 4 * S and work >= _min_parallel_work:
        return _QUERY_CHUNKS
    return 1


cdef inline Py_ssize_t _head_groups(Py_ssize_t chunks, Py_ssize_t M, int threads) noexcept nogil:
    """Head groups per (image, query chunk) of the position-major backward: as few as keep
    every thread busy (longer contiguous runs of per-row inputs), and a task count
    (chunks x groups) that is a multiple of the thread count where M allows (from when
    tasks were split in equal shares; harmless handed out one at a time)."""
    if chunks < 1:  # N = 0: no tasks (and no division by zero)
        return 1
    cdef Py_ssize_t groups = min(M, max(1, (threads + chunks - 1) // chunks))
    while (chunks * groups) % threads != 0 and groups < M:
        groups += 1
    return groups


cdef inline Py_ssize_t _backward_heads_scratch(Py_ssize_t L, Py_ssize_t P, Py_ssize_t D) noexcept nogil:
    """Scratch elements per thread of the head-major backward (_backward_head_rows)."""
    return 4 * D + _QUERY_BLOCK * (6 * L * P + D)


cdef inline void _backward_head_rows(const floating* value_m, floating* grad_value_m, const floating* zeros,
                                     floating* scratch, const int64_t* shapes, const int64_t* starts,
                                     Py_ssize_t L, Py_ssize_t P, Py_ssize_t D, Py_ssize_t M,
                                     const floating* g, const floating* loc, const floating* attn,
                                     floating* grad_loc, floating* grad_attn, Py_ssize_t r0,
                                     Py_ssize_t count) noexcept nogil:
    """Rows r0, r0 + M, ..., r0 + (count - 1) M (one head's consecutive queries) of the
    backward on head-major value_m / grad_value_m (S, D) slabs, in order. As in
    _forward_heads, their per-row inputs are 1 in M rows apart: copied in blocks of
    _QUERY_BLOCK rows into ``scratch`` (_backward_heads_scratch), outputs copied out."""
    cdef Py_ssize_t LP = L * P, jb, j, nb, r, nb1, r1
    cdef floating* b_g = scratch + 4 * D
    cdef floating* b_loc = b_g + _QUERY_BLOCK * D
    cdef floating* b_attn = b_loc + _QUERY_BLOCK * 2 * LP
    cdef floating* b_gloc = b_attn + _QUERY_BLOCK * LP
    cdef floating* b_gattn = b_gloc + _QUERY_BLOCK * 2 * LP
    for jb in range((count + _QUERY_BLOCK - 1) // _QUERY_BLOCK):
        r = r0 + jb * _QUERY_BLOCK * M  # the block's first row
        nb = min(_QUERY_BLOCK, count - jb * _QUERY_BLOCK)
        _rows_in(b_g, g, D, r, M, nb)
        _rows_in(b_loc, loc, 2 * LP, r, M, nb)
        _rows_in(b_attn, attn, LP, r, M, nb)
        # The next block's input rows into the L2, one row a row, for its _rows_in: into
        # the L1 they competed with the corner rows' prefetches (cpu_log 53, 82). Its
        # output rows too, read into the L2: a line no other core holds arrives there
        # exclusive, so _rows_out's stores then find it without a read for ownership
        # from memory (the encoder backward 1.08-1.10x at 1 thread, cpu_log 126).
        nb1 = min(_QUERY_BLOCK, count - (jb + 1) * _QUERY_BLOCK)
        r1 = r + _QUERY_BLOCK * M
        for j in range(nb):
            if j < nb1:
                _row_prefetch(g + (r1 + j * M) * D, D, _FOR_READ_L2)
                _row_prefetch(loc + (r1 + j * M) * 2 * LP, 2 * LP, _FOR_READ_L2)
                _row_prefetch(attn + (r1 + j * M) * LP, LP, _FOR_READ_L2)
                _row_prefetch(grad_loc + (r1 + j * M) * 2 * LP, 2 * LP, _FOR_READ_L2)
                _row_prefetch(grad_attn + (r1 + j * M) * LP, LP, _FOR_READ_L2)
            _backward_row(value_m, grad_value_m, zeros, scratch, D, shapes, starts, L, P, D, b_g + j * D,
                          b_loc + j * 2 * LP, b_attn + j * LP, b_gloc + j * 2 * LP, b_gattn + j * LP)
        _rows_out(grad_loc, b_gloc, 2 * LP, r, M, nb)
        _rows_out(grad_attn, b_gattn, LP, r, M, nb)


cdef void _backward(const floating* grad_out, const floating* value, const int64_t* shapes,
                    const int64_t* starts, const floating* loc, const floating* attn,
                    floating* grad_value, floating* extra, Py_ssize_t K, floating* grad_loc,
                    floating* grad_attn, const floating* zeros, floating* scratch, Py_ssize_t N,
                    Py_ssize_t S, Py_ssize_t M, Py_ssize_t D, Py_ssize_t Lq, Py_ssize_t L,
                    Py_ssize_t P, bint by_head, int threads) noexcept nogil:
    """Dense backward with K query chunks.

    Without ``by_head``: grad_value (N, S, M, D) zeroed is chunk 0's buffer and
    ``extra`` holds K - 1 more, zeroed, for chunks 1..K-1.
    With ``by_head``: value is head-major (N, M, S, D); ``extra`` holds all K chunk
    buffers, head-major, not zeroed (each task zeroes its own slab first, so its pages
    are first touched by the thread that works on them); grad_value is only written,
    at the end; ``scratch`` holds _backward_heads_scratch elements for each of ``threads``.
    """
    cdef Py_ssize_t t, n, m, q, r, c, m_lo, m_hi, i
    cdef Py_ssize_t size = N * S * M * D
    cdef floating* gv
    # A task is (n, query chunk c, a contiguous range of heads). It owns
    # buffer_c[n, :, m_lo:m_hi, :] and walks its queries in order, heads inner (by_head:
    # heads outer), so its reads of the per-row inputs are contiguous runs. Each buffer
    # element is summed by one task over q ascending (then l, p, corner): the same order
    # for any grouping of heads, hence any thread count, and in either layout. Position-
    # major: _head_groups; head-major (heads outer in a task anyway): one head a task, so
    # that handing tasks out as threads come free has tasks to balance.
    cdef Py_ssize_t groups = M if by_head else _head_groups(N * K, M, threads)
    for t in prange(N * K * groups, schedule="dynamic", chunksize=1, num_threads=threads):
        n = t // (K * groups)
        c = (t // groups) % K
        m_lo = (t % groups) * M // groups
        m_hi = (t % groups + 1) * M // groups
        if by_head:
            gv = extra + c * size + n * S * M * D
            memset(gv + m_lo * S * D, 0, (m_hi - m_lo) * S * D * sizeof(floating))
            for m in range(m_lo, m_hi):
                _backward_head_rows(value + (n * M + m) * S * D, gv + m * S * D, zeros,
                                    scratch + threadid() * _backward_heads_scratch(L, P, D), shapes, starts,
                                    L, P, D, M, grad_out, loc, attn, grad_loc, grad_attn,
                                    (n * Lq + c * Lq // K) * M + m, (c + 1) * Lq // K - c * Lq // K)
            continue
        gv = (grad_value if c == 0 else extra + (c - 1) * size) + n * S * M * D
        for q in range(c * Lq // K, (c + 1) * Lq // K):
            for m in range(m_lo, m_hi):
                r = (n * Lq + q) * M + m
                _backward_row(value + n * S * M * D + m * D, gv + m * D, zeros,
                              scratch + t * 4 * D, M * D, shapes, starts, L, P, D, grad_out + r * D,
                              loc + r * L * P * 2, attn + r * L * P,
                              grad_loc + r * L * P * 2, grad_attn + r * L * P)
    if by_head:
        _from_heads(extra, K, grad_value, N, S, M, D, threads)
    elif K > 1:
        # grad_value = chunk 0 + chunk 1 + ... in this order, element by element.
        for i in prange(size, schedule="dynamic", chunksize=_DYNAMIC_ELEMENTS, num_threads=threads):
            for c in range(1, K):
                grad_value[i] = grad_value[i] + extra[(c - 1) * size + i]


# ------------------------------------------------------------------------ sparse backward
# For calls with few samples per value position (a decoder call: 300 queries x 16
# samples against 22223 positions), the dense backward's gathers and scatters each land
# on a cold row of value and of a freshly zeroed 22.7 MB grad_value, in random order.
# Instead, everything that touches value or grad_value is done block by block:
# 1. rows (n, q, m) in parallel, geometry only (no value reads): each corner's
#    grad_value row ("key", -1 outside the map) and weight A w_c go to a fixed slot,
#    slot order (n, q, m, l, p, corner); each point's (lx, ly) is kept;
# 2. the slots bucketed, stably, by block of grad_value rows (_SPARSE_BLOCK_BYTES of
#    grad_value each, so a block stays in L2): each thread counts (during 1) and places
#    the slots of its own rows, blocks filled thread after thread; a point's corners 0
#    and 1 (2 and 3: the next texel in x) as one record where both are in one block;
# 3. per block, blocks handed out one at a time, in order, to whichever thread is free
#    (_sparse_sum_blocks):
#    the block summed in a per-thread buffer, zeroed first, then for each of its slots
#    in slot order the dot product g . value[key] (kept per slot) and buf[key] += A w_c g;
#    then the buffer streamed out to grad_value with non-temporal stores (no read of
#    grad_value's cold lines first, half the memory traffic of zeroing it in place).
#    value's rows of the thread's next block are prefetched in address order meanwhile, so a
#    thread reads value and writes grad_value one block at a time, not in random order
#    over all of each;
# 4. rows in parallel: each point's location and weight gradients from its four dots.
# A grad_value element is summed over q ascending, then l, p, exactly as in the dense
# backward with one query chunk, and each dot has the dense backward's lanes and
# reduction: both methods give the same bits (tests/test_cpu.py). Measured against the
# previous method (dots in phase 1 from random gathers, grad_value zeroed and added to
# in place): benchmarks/cpu_log.md, 17-21; pairs: 35; the geometry in vector types: 42.
# Dots from random gathers again, with the non-temporal stream out kept: 2x slower at
# 1 thread on Zen 3 (75): a backward call leaves value in DRAM, not the L3.

cdef enum:
    # 64 KiB: on Zen 3 (512 KiB L2) a block's value rows, the next block's and the
    # buffer then fit beside grad_output; 2 threads 1.02-1.06x against 128 KiB, 1 thread
    # 1.00-1.04x (cpu_log 64). Flat from 32 KiB to 1 MiB on Zen 4 (18, 38). Not in the bits.
    _SPARSE_BLOCK_BYTES = 64 * 1024
    _PLACE_AHEAD = 8  # phase 2: prefetch a block's records this far ahead (cpu_log 49: 4, 8, 16)
    _SPARSE_ROWS_AHEAD = 6  # phase 3's L1 prefetch distance, in records (cpu_log 46: 3, 6, 12)


# A record placed in its block (phase 2), everything phase 3 needs: one slot, or two
# (a pair): corners 0 and 1, or 2 and 3, of a point, both in the map and in one block,
# whose grad_value rows are k and k + M. rk = (r << shift | k) << 1 | pair: the
# grad_output row r, the (first) row k within the block; the weights w0 (and w1), a
# float weight exact in a double.
ctypedef struct _Slot:
    int64_t rk
    double w0
    double w1


def slot_dtype():
    """Internal: the numpy dtype of a placed record (_Slot), for the benchmark's floor."""
    return np.dtype([("rk", np.int64), ("w0", np.float64), ("w1", np.float64)])


cdef inline int _sparse_block_shift(Py_ssize_t D, Py_ssize_t itemsize) noexcept nogil:
    """log2 of the grad_value rows per block: the largest power of 2 within _SPARSE_BLOCK_BYTES."""
    cdef int shift = 0
    while shift < 30 and (2 << shift) * D * itemsize <= _SPARSE_BLOCK_BYTES:  # D = 0 would never end
        shift += 1
    return shift


cdef inline Py_ssize_t _sparse_blocks(Py_ssize_t rows, Py_ssize_t D, Py_ssize_t itemsize) noexcept nogil:
    cdef int shift = _sparse_block_shift(D, itemsize)
    return (rows + (1 << shift) - 1) >> shift


def sparse_blocks(Py_ssize_t rows, Py_ssize_t D, Py_ssize_t itemsize):
    """Internal: blocks of the sparse backward for ``rows`` = N S M grad_value rows."""
    return _sparse_blocks(rows, D, itemsize)


cdef inline bint _sparse_applies(Py_ssize_t S, Py_ssize_t Lq, Py_ssize_t L, Py_ssize_t P) noexcept nogil:
    # At most one sample per value position and head, in one image: never the thread
    # count or the batch size, so an image's gradient has the same bits in any batch.
    return Lq * L * P <= S


def sparse_applies(Py_ssize_t S, Py_ssize_t Lq, Py_ssize_t L, Py_ssize_t P):
    """Internal: whether backward() picks the sparse method for this image shape."""
    return _sparse_applies(S, Lq, L, P)


cdef inline Py_ssize_t _sparse_bufs_bytes(Py_ssize_t D, Py_ssize_t itemsize, int threads) noexcept nogil:
    """Bytes of the per-thread block buffers at the start of the work area, rounded up to 64."""
    return (threads * (D * itemsize << _sparse_block_shift(D, itemsize)) + 63) // 64 * 64


cdef inline Py_ssize_t _sparse_work_bytes(Py_ssize_t N, Py_ssize_t S, Py_ssize_t M, Py_ssize_t D,
                                          Py_ssize_t Lq, Py_ssize_t L, Py_ssize_t P, Py_ssize_t itemsize,
                                          int threads) noexcept nogil:
    """Bytes of _backward_sparse's work area (see there)."""
    cdef Py_ssize_t slots = 4 * N * Lq * M * L * P
    cdef Py_ssize_t B = _sparse_blocks(N * S * M, D, itemsize)
    return (_sparse_bufs_bytes(D, itemsize, threads)
            + 8 * (6 * slots + slots // 2 + B + 1 + threads * B + 1 + 5 * L * P) + itemsize * slots
            + threads * L * P)


def sparse_work_bytes(Py_ssize_t N, Py_ssize_t S, Py_ssize_t M, Py_ssize_t D, Py_ssize_t Lq, Py_ssize_t L,
                      Py_ssize_t P, Py_ssize_t itemsize, int threads):
    """Internal: bytes of the sparse backward's work area."""
    return _sparse_work_bytes(N, S, M, D, Lq, L, P, itemsize, threads)


cdef inline void _sparse_levels(const int64_t* shapes, const int64_t* starts, Py_ssize_t L, Py_ssize_t P,
                                Py_ssize_t M, int64_t* area, cyd_levels* lv) noexcept nogil:
    """Per point k of a row (level l = k // P), the numbers of its level that phase 1
    needs (cyd_levels, src/msda_inner.h), in ``area`` (5 L P int64)."""
    cdef Py_ssize_t LP = L * P, k
    cdef int64_t H, W, two31 = 2147483648
    cdef int64_t* base = area
    cdef int64_t* WM = area + LP
    cdef double* Wd = <double*>(area + 2 * LP)
    cdef double* Hd = <double*>(area + 3 * LP)
    cdef int32_t* Wi = <int32_t*>(area + 4 * LP)
    lv.narrow = 1
    for k in range(LP):
        H = shapes[2 * (k // P)]
        W = shapes[2 * (k // P) + 1]
        base[k] = starts[k // P] * M
        WM[k] = W * M
        Hd[k] = <double>H
        Wd[k] = <double>W
        # H W <= S (validated), so the product cannot overflow once each is below 2^31.
        if H >= two31 or W >= two31 or (H * W + W + 1) * M >= two31:
            lv.narrow = 0
        Wi[k] = <int32_t>W if lv.narrow else 0
    lv.base = base
    lv.WM = WM
    lv.Wd = Wd
    lv.Hd = Hd
    lv.Wi = Wi


cdef inline void _sparse_row(const cyd_levels* lv, Py_ssize_t LP, const floating* loc, const floating* attn,
                             floating* grad_loc, floating* grad_attn, Py_ssize_t M, int64_t key_nm,
                             int64_t* keys, floating* weights, double* geo, signed char* status) noexcept nogil:
    """Phase 1 of the sparse backward for one (n, q, m) row: keys[4k + c], the grad_value
    row (in units of D) of corner c of point k, or -1 outside the map; weights[4k + c],
    its weight A w_c; geo[2k : 2k + 2] = (lx, ly), or lx = -1 for a point whose cell holds
    no texel or whose location is not finite, whose gradients are final here (zero, or
    NaN). ``key_nm`` is the key of position 0, n S M + m; ``status``: LP bytes of scratch.
    The geometry is cyd_sparse_geometry (src/msda_inner.h)."""
    cdef Py_ssize_t k
    if floating is float:
        cyd_sparse_geometry_f(loc, attn, LP, lv, key_nm, M, keys, weights, geo, status)
    else:
        cyd_sparse_geometry_d(loc, attn, LP, lv, key_nm, M, keys, weights, geo, status)
    for k in range(LP):
        if status[k] <= 0:
            grad_attn[k] = NAN if status[k] < 0 else 0
            grad_loc[2 * k] = grad_attn[k]
            grad_loc[2 * k + 1] = grad_attn[k]


cdef inline void _sparse_gradients(const cyd_levels* lv, Py_ssize_t LP, Py_ssize_t D, const floating* g,
                                   const floating* attn, const floating* zeros, const int64_t* where,
                                   const int64_t* next_where, const double* dots, const double* geo,
                                   floating* grad_loc, floating* grad_attn) noexcept nogil:
    """Phase 4 for one row: the location and weight gradients of its in-map points from
    their corners' dots (where[4k + c]: the dot's index in ``dots``, -1 for a corner
    outside the map, whose dot is g . 0 as with the dense backward's zero row), as
    the dense backward computes them (cyd_point_gradients; cyd_sparse_gradients,
    src/msda_inner.h). First the next row's dots (``next_where``, or NULL) are
    prefetched: they lie at random in ``dots`` (cpu_log 48)."""
    cdef Py_ssize_t k
    if next_where != NULL:
        # Corners 0 and 2 only (1 and 3 are mostly their pair's second dot, on the same
        # line), without a test: a -1 asks for dots[-1], memory of the work area.
        for k in range(0, LP * 4, 2):
            cyd_prefetch_line(dots + next_where[k])
    if floating is float:
        cyd_sparse_gradients_f(where, dots, g, zeros, D, geo, attn, lv, LP, grad_loc, grad_attn)
    else:
        cyd_sparse_gradients_d(where, dots, g, zeros, D, geo, attn, lv, LP, grad_loc, grad_attn)


cdef inline const char* _prefetch_lines(const char* ahead, const char* end, Py_ssize_t count) noexcept nogil:
    """Prefetches up to ``count`` 64-byte lines from ``ahead`` (not past ``end``) into the L2;
    returns where it stopped."""
    cdef Py_ssize_t j
    for j in range(count):
        if ahead >= end:
            break
        cyd_prefetch_line_l2(ahead)
        ahead += 64
    return ahead


cdef inline bint _pair(int64_t key, int64_t key1, int shift) noexcept nogil:
    """Whether corners 0 and 1 (2 and 3) of a point, keys ``key`` and ``key1`` (-1 outside
    the map), go as one record: both in the map and in one block."""
    return key >= 0 and key1 >= 0 and key >> shift == key1 >> shift


cdef inline void _sparse_slots(Py_ssize_t r_lo, Py_ssize_t r_hi, const cyd_levels* lv, signed char* status,
                               const floating* loc, const floating* attn, floating* grad_loc,
                               floating* grad_attn, int64_t* keys, floating* weights, double* geo,
                               int64_t* count, Py_ssize_t B, int shift, Py_ssize_t S, Py_ssize_t M,
                               Py_ssize_t Lq, Py_ssize_t L, Py_ssize_t P) noexcept nogil:
    """Phase 1 for rows [r_lo, r_hi) in order: _sparse_row, and in count[blk] (zeroed
    first, B entries) how many of their records (a pair or a slot, see _Slot) fall in
    block blk."""
    cdef Py_ssize_t LP = L * P, r, j
    cdef int64_t key, key1
    memset(count, 0, B * sizeof(int64_t))
    for r in range(r_lo, r_hi):
        _sparse_row(lv, LP, loc + r * LP * 2, attn + r * LP, grad_loc + r * LP * 2, grad_attn + r * LP, M,
                    (r // (Lq * M)) * S * M + r % M, keys + r * LP * 4, weights + r * LP * 4, geo + r * LP * 2,
                    status)
        for j in range(0, LP * 4, 2):
            key = keys[r * LP * 4 + j]
            key1 = keys[r * LP * 4 + j + 1]
            if _pair(key, key1, shift):
                count[key >> shift] += 1
                continue
            if key >= 0:
                count[key >> shift] += 1
            if key1 >= 0:
                count[key1 >> shift] += 1


cdef inline void _sparse_offsets(int64_t* cursor, int64_t* block_first, Py_ssize_t B,
                                 int threads) noexcept nogil:
    """Between phases 1 and 2 (one thread): where each thread's slots of each block go,
    blocks in order, within a block the threads in order, so a block's slots end up in
    slot order whatever the thread count (cursor[t B + blk]: thread t's count in, its
    first position out); block_first."""
    cdef Py_ssize_t blk, t
    cdef int64_t pos = 0, count
    for blk in range(B):
        block_first[blk] = pos
        for t in range(threads):
            count = cursor[t * B + blk]
            cursor[t * B + blk] = pos
            pos += count
    block_first[B] = pos


cdef inline int64_t _take(int64_t* cursor, int64_t key, int shift, const _Slot* placed) noexcept nogil:
    """Phase 2: the next position in key's block, its cursor moved on; the line a few
    records on in that block's stream asked for (see _sparse_place)."""
    cdef int64_t pos = cursor[key >> shift]
    cursor[key >> shift] = pos + 1
    cyd_prefetch_write(placed + pos + _PLACE_AHEAD)
    return pos


cdef inline void _sparse_place(Py_ssize_t r_lo, Py_ssize_t r_hi, int64_t* keys, const floating* weights,
                               int64_t* cursor, int shift, Py_ssize_t LP, _Slot* placed) noexcept nogil:
    """Phase 2 for rows [r_lo, r_hi): their slots placed at the thread's cursors (one per
    block), corners 0 and 1 (2 and 3) of a point as one record where they can be; keys[e]
    becomes where phase 3 puts the slot's dot, 2 pos (+ 1, a pair's second) for the
    record at pos. Each block's records are one of ~B write streams, too many for the
    hardware prefetcher: each write asks for the line a few records on in its stream."""
    cdef Py_ssize_t r, e, i
    cdef int64_t key, key1, pos, mask = (1 << shift) - 1
    for r in range(r_lo, r_hi):
        for e in range(r * LP * 4, (r + 1) * LP * 4, 2):
            key = keys[e]
            key1 = keys[e + 1]
            if _pair(key, key1, shift):
                # key1 = key + M: the next texel in x.
                pos = _take(cursor, key, shift, placed)
                placed[pos].rk = (((r << shift) | (key & mask)) << 1) | 1
                placed[pos].w0 = weights[e]
                placed[pos].w1 = weights[e + 1]
                keys[e] = 2 * pos
                keys[e + 1] = 2 * pos + 1
                continue
            for i in range(e, e + 2):
                key = keys[i]
                if key >= 0:
                    pos = _take(cursor, key, shift, placed)
                    placed[pos].rk = ((r << shift) | (key & mask)) << 1
                    placed[pos].w0 = weights[i]
                    keys[i] = 2 * pos


cdef inline void _sparse_sum_blocks(int64_t* claimed, Py_ssize_t B, const floating* grad_out,
                                    const floating* value, floating* grad_value, floating* buf,
                                    const int64_t* block_first, const _Slot* placed, double* dots,
                                    Py_ssize_t NB, Py_ssize_t D, Py_ssize_t M, int shift,
                                    bint block_prefetch) noexcept nogil:
    """Phase 3 for the blocks this thread claims: the j-th claim of all threads together
    (``claimed``, shared, from 0) is block j, so the threads end within a block or two of
    each other (each holds the block it works on and the one it claimed next), whatever
    a block's slots cost on this machine against its rows (static ranges of equal
    estimated work left 1.2-1.5x between the two threads of the decoder call; the
    heaviest blocks first measured the same at 2 threads and 2-3 % slower at 1, cpu_log
    55 and 58). Each block is summed in ``buf`` (zeroed once, then by each block's
    stream-out: cpu_log 99), its slots' dots and scatters, then streamed out to
    grad_value. Where ``block_prefetch`` (see _default_block_prefetch), the thread's next
    block (claimed one ahead) has its value rows prefetched (into the L2) in address order
    meanwhile, spread over the block's slots; each record's value and buffer rows are
    prefetched a few records ahead into the L1. Which thread does a block never changes
    its bits. With ``dots`` NULL, the benchmark's floor (sparse_floor): each slot's value
    row added with weight 1, no dot (the floor's slots have r = 0)."""
    cdef Py_ssize_t blk, nxt, row_lo, row_hi, pos, lo, hi, step
    cdef int64_t rk, k, mask = (1 << shift) - 1
    cdef floating* out
    cdef floating* out1
    cdef const floating* v
    cdef const floating* v1
    cdef const floating* g
    cdef const char* ahead
    cdef const char* ahead_end
    cdef double w1
    # Zeroed once here; each block's stream-out zeroes what it copies (cyd_stream_copy_zero).
    memset(buf, 0, (D << shift) * sizeof(floating))
    blk = cyd_claim(claimed)
    while blk < B:
        nxt = cyd_claim(claimed)
        row_lo = blk << shift
        row_hi = min(NB, row_lo + (1 << shift))
        lo = block_first[blk]
        hi = block_first[blk + 1]
        ahead = ahead_end = <const char*>value
        if block_prefetch and nxt < B:
            ahead = <const char*>(value + (nxt << shift) * D)
            ahead_end = <const char*>(value + min(NB, (nxt + 1) << shift) * D)
        step = (ahead_end - ahead) // 64 // max(1, hi - lo) + 1
        for pos in range(lo, hi):
            ahead = _prefetch_lines(ahead, ahead_end, step)
            if pos + _SPARSE_ROWS_AHEAD < hi:
                # On to the L1: the value rows of the record 6 ahead (in the L2 since the
                # block-ahead prefetch); 1.03-1.15x on Zen 3, whose 512 KiB L2 holds
                # less of them (benchmarks/cpu_log.md 46); and its buffer rows, for
                # writing (the 64 KiB buffer is in the L2, not the L1): 2 threads
                # 1.02-1.06x on Zen 3 (61).
                rk = placed[pos + _SPARSE_ROWS_AHEAD].rk
                k = (rk >> 1) & mask
                cyd_prefetch_row(value + (row_lo + k) * D)
                cyd_prefetch_row_write(buf + k * D)
                if rk & 1:
                    cyd_prefetch_row(value + (row_lo + k + M) * D)
                    cyd_prefetch_row_write(buf + (k + M) * D)
            rk = placed[pos].rk
            k = (rk >> 1) & mask
            out = buf + k * D
            v = value + (row_lo + k) * D
            if dots == NULL:
                if floating is float:
                    cyd_axpy_f(out, 1, v, D)
                else:
                    cyd_axpy_d(out, 1, v, D)
                continue
            g = grad_out + (rk >> (shift + 1)) * D
            # A pair's second rows are k + M; a single slot's may lie past the block.
            v1 = v + M * D if rk & 1 else v
            out1 = out + M * D if rk & 1 else out
            # A single slot's w1 was never written (phase 2): not read.
            w1 = placed[pos].w1 if rk & 1 else 0
            if floating is float:
                cyd_record_f(g, v, v1, out, out1, <float>placed[pos].w0, <float>w1, rk & 1, D, dots + 2 * pos)
            else:
                cyd_record_d(g, v, v1, out, out1, placed[pos].w0, w1, rk & 1, D, dots + 2 * pos)
        cyd_stream_copy_zero(grad_value + row_lo * D, buf, (row_hi - row_lo) * D * sizeof(floating))
        blk = nxt


cdef void _backward_sparse(const floating* grad_out, const floating* value, const int64_t* shapes,
                           const int64_t* starts, const floating* loc, const floating* attn,
                           floating* grad_value, floating* grad_loc, floating* grad_attn,
                           const floating* zeros, char* work, int threads, Py_ssize_t N, Py_ssize_t S,
                           Py_ssize_t M, Py_ssize_t D, Py_ssize_t Lq, Py_ssize_t L, Py_ssize_t P,
                           bint block_prefetch) noexcept nogil:
    """``work``: _sparse_work_bytes(...) bytes, 8-byte aligned: the thread's block buffers,
    then for each of the 4 N Lq M L P slots keys (int64), placed (_Slot; pairs leave some
    unused) and two dots (double), geo (2 doubles a point), block_first (B + 1) and
    cursor (``threads`` x B, int64), phase 3's block counter (int64), weights (floating,
    a slot each), the level tables (cyd_levels, 5 L P int64) and a status byte a point per thread (L P
    each); B = sparse_blocks(N S M, D, itemsize). grad_value need not be zeroed."""
    cdef Py_ssize_t R = N * Lq * M, LP = L * P, NB = N * S * M
    cdef Py_ssize_t slots = 4 * R * LP
    cdef int shift = _sparse_block_shift(D, sizeof(floating))
    cdef Py_ssize_t B = _sparse_blocks(NB, D, sizeof(floating))
    cdef floating* block_bufs = <floating*>work
    cdef int64_t* keys = <int64_t*>(work + _sparse_bufs_bytes(D, sizeof(floating), threads))
    cdef _Slot* placed = <_Slot*>(keys + slots)
    cdef double* dots = <double*>(placed + slots)
    cdef double* geo = dots + 2 * slots
    cdef int64_t* block_first = <int64_t*>(geo + slots // 2)
    cdef int64_t* cursor = block_first + B + 1
    cdef floating* weights = <floating*>(cursor + threads * B + 1)
    cdef int64_t* level_area = <int64_t*>(weights + slots)  # slots is a multiple of 4: 8-byte aligned
    cdef signed char* status = <signed char*>(level_area + 5 * LP)
    cdef cyd_levels lv
    cdef int64_t* claimed = cursor + threads * B  # phase 3: blocks handed out so far
    cdef Py_ssize_t t, r
    # One parallel region, a barrier after each phase (cyd_barrier: Cython makes each
    # prange here an `omp for nowait`), so the other threads are woken once a call, not
    # once a phase: the same speed with libgomp's default wait policy, 4-6 % faster at
    # 2 threads with OMP_WAIT_POLICY=passive (benchmarks/cpu_log.md, 21).
    _sparse_levels(shapes, starts, L, P, M, level_area, &lv)
    claimed[0] = 0
    with parallel(num_threads=threads):
        # 1. Thread t, rows [t R / T, (t + 1) R / T) in order: the slots and geometry, and
        #    in cursor[t B + blk] how many of its slots fall in blk.
        for t in prange(threads, schedule="static"):
            _sparse_slots(t * R // threads, (t + 1) * R // threads, &lv, status + t * LP, loc, attn, grad_loc,
                          grad_attn, keys, weights, geo, cursor + t * B, B, shift, S, M, Lq, L, P)
        cyd_barrier()
        for t in prange(1, schedule="static"):
            _sparse_offsets(cursor, block_first, B, threads)
        cyd_barrier()
        # 2. Thread t places its own rows' slots.
        for t in prange(threads, schedule="static"):
            _sparse_place(t * R // threads, (t + 1) * R // threads, keys, weights, cursor + t * B, shift, LP,
                          placed)
        cyd_barrier()
        # 3. Blocks handed out one at a time: each summed in the thread's buffer (the
        #    slots' dots and scatters) and streamed out to grad_value.
        for t in prange(threads, schedule="static"):
            _sparse_sum_blocks(claimed, B, grad_out, value, grad_value,
                               block_bufs + t * (D << shift), block_first, placed, dots, NB, D, M, shift,
                               block_prefetch)
        cyd_barrier()
        # 4. Rows in parallel, each thread its own rows of phases 1 and 2 (their keys and
        #    geometry in its caches): the location and weight gradients. (Handed out as
        #    threads come free: no faster, cpu_log 71.)
        for r in prange(R, schedule="static"):
            _sparse_gradients(&lv, LP, D, grad_out + r * D, attn + r * LP, zeros, keys + r * LP * 4,
                              keys + (r + 1) * LP * 4 if r + 1 < R else NULL, dots, geo + r * LP * 2,
                              grad_loc + r * LP * 2, grad_attn + r * LP)


def backward(grad_output, value, const int64_t[:, ::1] spatial_shapes, const int64_t[::1] level_start_index,
             sampling_locations, attention_weights, buffers=None, method=None, layout=None, work=None,
             block_prefetch=None):
    """Backward on validated C-contiguous arrays; returns (grad_value, grad_loc, grad_attn).

    ``method``: 'dense' (scatter into zeroed grad_value buffers), 'sparse' (sorted
    scatter, see _backward_sparse) or None: sparse where sparse_applies(S, Lq, L, P).
    Both give the same bits where the dense method uses one query chunk.
    ``buffers`` (dense only): optional callable ``buffers(K)`` returning a zeroed
    C-contiguous array (K, N, S, M, D) of value's dtype for the K query-chunk grad_value
    buffers (huge-page staging, cydeform._staging), or None; grad_value is then its
    first buffer. Not called with the head-major layout.
    ``layout`` (dense only): as in forward(); 'heads' uses K head-major chunk buffers
    and writes grad_value (N, S, M, D) from them at the end. ``work``: as in forward(),
    for the head-major copy of value and those buffers, (K + 1) value sizes.
    ``block_prefetch`` (sparse only): whether phase 3 prefetches each next block's value
    rows, None for sparse_block_prefetch_default(); never changes a result.
    """
    N, S, M, D = value.shape
    Lq, L, P = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    cdef bint prefetch = _block_prefetch(block_prefetch)
    if method is None:
        method = "sparse" if sparse_applies(S, Lq, L, P) else "dense"
    if method not in ("dense", "sparse"):
        raise ValueError(f"method must be 'dense', 'sparse' or None; got {method!r}")
    grad_loc = np.empty(sampling_locations.shape, dtype=value.dtype)
    grad_attn = np.empty(attention_weights.shape, dtype=value.dtype)
    zeros = np.zeros(D, dtype=value.dtype)
    if method == "sparse":
        # Written whole by the sparse backward: no zeroing.
        grad_value = _aligned_empty(value.shape, value.dtype)
        threads = _threads(N * Lq * M * L * P * D)
        work_area = _aligned_empty((sparse_work_bytes(N, S, M, D, Lq, L, P, value.itemsize, threads) + 7) // 8,
                                   np.int64)
        if value.dtype == np.float32:
            _backward_sparse_typed[float](grad_output, value, spatial_shapes, level_start_index,
                                          sampling_locations, attention_weights, grad_value, grad_loc,
                                          grad_attn, zeros, work_area, threads, prefetch)
        else:
            _backward_sparse_typed[double](grad_output, value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights, grad_value, grad_loc,
                                           grad_attn, zeros, work_area, threads, prefetch)
        return grad_value, grad_loc, grad_attn
    K = query_chunks(S, Lq, L, P, Lq * M * L * P * D)
    threads = _threads(N * Lq * M * L * P * D)  # read once: the scratch is sized for it
    heads = _use_heads(layout, S, Lq, L, P)
    if heads:
        # Per thread: 4 rows where corners outside the map scatter, and block buffers.
        scratch = np.empty((threads, 1, _backward_heads_scratch(L, P, D)), dtype=value.dtype)
        grad_value = _aligned_empty(value.shape, value.dtype)
        # The head-major copy of value, then the K chunk buffers (zeroed by the op's tasks).
        extra = _work_buffer(work, (K + 1) * value.size, value.dtype)
    else:
        # Up to N * K * M tasks, each with 4 rows where corners outside the map scatter.
        scratch = np.empty((N * K * M, 4, D), dtype=value.dtype)
        staged = buffers(K) if buffers is not None else None
        if staged is not None:
            grad_value = staged[0]
            extra = staged[1:].reshape(-1) if K > 1 else np.zeros(1, dtype=value.dtype)
        else:
            # Zeroed here, not lazily by calloc, so the threads do not take the first-touch
            # page faults of the same pages together mid-loop.
            grad_value = _aligned_empty(value.shape, value.dtype)
            grad_value.fill(0)
            extra = _aligned_empty(((K - 1) * N * S * M * D) or 1, value.dtype)
            extra.fill(0)
    if value.dtype == np.float32:
        _backward_typed[float](grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                               attention_weights, grad_value, extra, K, grad_loc, grad_attn, zeros, scratch,
                               heads, threads)
    else:
        _backward_typed[double](grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                attention_weights, grad_value, extra, K, grad_loc, grad_attn, zeros, scratch,
                                heads, threads)
    return grad_value, grad_loc, grad_attn


cdef _backward_typed(const floating[:, :, ::1] grad_out, const floating[:, :, :, ::1] value,
                     const int64_t[:, ::1] shapes, const int64_t[::1] starts,
                     const floating[:, :, :, :, :, ::1] loc, const floating[:, :, :, :, ::1] attn,
                     floating[:, :, :, ::1] grad_value, floating[::1] extra, Py_ssize_t K,
                     floating[:, :, :, :, :, ::1] grad_loc, floating[:, :, :, :, ::1] grad_attn,
                     const floating[::1] zeros, floating[:, :, ::1] scratch, bint heads, int threads):
    """With ``heads``, ``extra`` is (K + 1) value sizes: the head-major copy of value, then
    the K chunk buffers (see _backward)."""
    cdef Py_ssize_t N = value.shape[0], S = value.shape[1], M = value.shape[2], D = value.shape[3]
    cdef Py_ssize_t Lq = loc.shape[1], L = loc.shape[3], P = loc.shape[4]
    cdef const floating* v = &value[0, 0, 0, 0]
    cdef floating* buf = &extra[0]
    with nogil:
        if heads:
            _to_heads(v, buf, N, S, M, D, threads)
            v = buf
            buf = buf + N * S * M * D
        _backward(&grad_out[0, 0, 0], v, &shapes[0, 0], &starts[0],
                  &loc[0, 0, 0, 0, 0, 0], &attn[0, 0, 0, 0, 0], &grad_value[0, 0, 0, 0], buf, K,
                  &grad_loc[0, 0, 0, 0, 0, 0], &grad_attn[0, 0, 0, 0, 0], &zeros[0],
                  &scratch[0, 0, 0], N, S, M, D, Lq, L, P, heads, threads)


cdef _backward_sparse_typed(const floating[:, :, ::1] grad_out, const floating[:, :, :, ::1] value,
                            const int64_t[:, ::1] shapes, const int64_t[::1] starts,
                            const floating[:, :, :, :, :, ::1] loc, const floating[:, :, :, :, ::1] attn,
                            floating[:, :, :, ::1] grad_value, floating[:, :, :, :, :, ::1] grad_loc,
                            floating[:, :, :, :, ::1] grad_attn, const floating[::1] zeros,
                            int64_t[::1] work, int threads, bint block_prefetch):
    cdef Py_ssize_t N = value.shape[0], S = value.shape[1], M = value.shape[2], D = value.shape[3]
    cdef Py_ssize_t Lq = loc.shape[1], L = loc.shape[3], P = loc.shape[4]
    with nogil:
        _backward_sparse(&grad_out[0, 0, 0], &value[0, 0, 0, 0], &shapes[0, 0], &starts[0],
                         &loc[0, 0, 0, 0, 0, 0], &attn[0, 0, 0, 0, 0], &grad_value[0, 0, 0, 0],
                         &grad_loc[0, 0, 0, 0, 0, 0], &grad_attn[0, 0, 0, 0, 0], &zeros[0],
                         <char*>&work[0], threads, N, S, M, D, Lq, L, P, block_prefetch)


# --------------------------------------------------------------------------- measured floor
# What the benchmark compares the op with (cydeform.bench, "floor"): the same corner-row
# gathers in the same order with the same prefetch and the same parallel layout, summed
# with weight 1, and no geometry (the row offsets come precomputed). Not used by the op.

cdef inline void _floor_row(const floating* value, const int64_t* rows, Py_ssize_t K, Py_ssize_t D,
                            const floating* zeros, const floating* ones, floating* out,
                            floating* gv) noexcept nogil:
    """out = sum_k value[rows[k] : + D]; with ``gv``, also gv[rows[k] : + D] += that row."""
    cdef Py_ssize_t k, b = 0, j, d
    cdef const floating* ptr[4 * _BLOCK]
    cdef int64_t off
    for d in range(D):
        out[d] = 0
    for k in range(K):
        off = rows[k]
        if off >= 0:
            ptr[b] = value + off
            cyd_prefetch_row(ptr[b])
            if gv != NULL:
                cyd_prefetch_row(gv + off)
        else:
            ptr[b] = zeros
        b += 1
        if b == 4 * _BLOCK or k == K - 1:  # K is 4 corners x L x P
            _accumulate(out, ptr, ones, b // 4, D)
            if gv != NULL:
                for j in range(b):
                    if ptr[j] != zeros:
                        for d in range(D):
                            gv[(ptr[j] - value) + d] += ptr[j][d]
            b = 0


cdef void _floor_forward(const floating* value, const int64_t* rows, Py_ssize_t N, Py_ssize_t Lq,
                         Py_ssize_t M, Py_ssize_t K, Py_ssize_t D, const floating* zeros, const floating* ones,
                         floating* out, bint heads) noexcept nogil:
    """Rows in the order given: the op forward's (n, q, m), or with ``heads`` (n, m, q);
    handed out dynamically like the op's: _DYNAMIC_ROWS a claim, or with ``heads``
    _DYNAMIC_TASKS x _QUERY_BLOCK rows (the op claims _DYNAMIC_TASKS tasks of up to
    _QUERY_BLOCK queries, a head's last one partial, so the claims' edges differ)."""
    cdef Py_ssize_t t
    cdef Py_ssize_t claim = _DYNAMIC_TASKS * _QUERY_BLOCK if heads else _DYNAMIC_ROWS
    for t in prange(N * Lq * M, schedule="dynamic", chunksize=claim, num_threads=_threads(N * Lq * M * K * D // 4)):
        _floor_row(value, rows + t * K, K, D, zeros, ones, out + t * D, NULL)


cdef void _floor_backward(const floating* value, const int64_t* rows, Py_ssize_t N, Py_ssize_t S,
                          Py_ssize_t Lq, Py_ssize_t M, Py_ssize_t K, Py_ssize_t D, Py_ssize_t QK,
                          const floating* zeros, const floating* ones, floating* out, floating* grad_value,
                          floating* extra, bint heads) noexcept nogil:
    """The op backward's layout: tasks (n, query chunk c of QK, head group), chunk c
    scattering into its own buffer, buffers added at the end. Without ``heads``,
    grad_value (zeroed) and extra (QK - 1 zeroed buffers) as in _backward; with
    ``heads``, the head-major path's: extra holds QK head-major buffers, each task
    zeroes its slabs and walks heads outer, and the end writes grad_value (_from_heads)."""
    cdef Py_ssize_t t, n, c, m, q, r, i, m_lo, m_hi
    cdef Py_ssize_t size = N * S * M * D
    cdef int threads = _threads(N * Lq * M * K * D // 4)
    cdef Py_ssize_t groups = M if heads else _head_groups(N * QK, M, threads)
    cdef floating* gv
    for t in prange(N * QK * groups, schedule="dynamic", chunksize=1, num_threads=threads):
        n = t // (QK * groups)
        c = (t // groups) % QK
        m_lo = (t % groups) * M // groups
        m_hi = (t % groups + 1) * M // groups
        if heads:
            gv = extra + c * size
            memset(gv + (n * M + m_lo) * S * D, 0, (m_hi - m_lo) * S * D * sizeof(floating))
            for m in range(m_lo, m_hi):
                for q in range(c * Lq // QK, (c + 1) * Lq // QK):
                    r = (n * M + m) * Lq + q  # rows in (n, m, q) order
                    _floor_row(value, rows + r * K, K, D, zeros, ones, out + r * D, gv)
            continue
        gv = grad_value if c == 0 else extra + (c - 1) * size
        for q in range(c * Lq // QK, (c + 1) * Lq // QK):
            for m in range(m_lo, m_hi):
                r = (n * Lq + q) * M + m
                _floor_row(value, rows + r * K, K, D, zeros, ones, out + r * D, gv)
    if heads:
        _from_heads(extra, QK, grad_value, N, S, M, D, threads)
    elif QK > 1:
        for i in prange(size, schedule="dynamic", chunksize=_DYNAMIC_ELEMENTS, num_threads=threads):
            for c in range(1, QK):
                grad_value[i] = grad_value[i] + extra[(c - 1) * size + i]


def gather_floor(value, const int64_t[:, ::1] rows, backward=False, heads=False, work=None):
    """Internal (benchmark floor). value (N, S, M, D); ``rows`` (N*Lq*M, K = 4 L P)
    element offsets into value of the corner rows each output row (n, q, m) gathers
    (-1: a corner outside the map). Returns the (N*Lq*M, D) sums; with ``backward``,
    also returns a grad_value shaped like value: every gathered row added into it with the
    op backward's buffers and task layout (a dense backward only: for a call whose
    backward is sparse, sparse_applies with L P = K / 4, see sparse_floor).
    ``heads``: value is the op's head-major copy (N, M, S, D), rows (and the sums) are
    in (n, m, q) order and index it (cydeform.bench.floor.corner_rows(heads=True)), and
    they run in the head-major path's order and buffers; ``work`` as in backward(), for
    its chunk buffers. The copy of value into that layout is not part of the floor."""
    if heads:
        N, M, S, D = value.shape
    else:
        N, S, M, D = value.shape
    R = rows.shape[0]
    Lq = R // (N * M)
    K = rows.shape[1]
    if backward and sparse_applies(S, Lq, K // 4, 1):
        raise ValueError("this call's backward is sparse: its floor is sparse_floor")
    out = np.empty((R, D), dtype=value.dtype)
    zeros = np.zeros(D, dtype=value.dtype)
    ones = np.ones(_BLOCK * 4, dtype=value.dtype)
    QK = query_chunks(S, Lq, K // 4, 1, Lq * M * (K // 4) * D) if backward else 1
    if heads and backward:
        grad = _aligned_empty((N, S, M, D), value.dtype)
        extra = _work_buffer(work, QK * value.size, value.dtype)
    else:
        grad = np.empty((N, S, M, D) if backward else 1, dtype=value.dtype)
        grad.fill(0)
        extra = np.zeros(((QK - 1) * value.size) or 1, dtype=value.dtype)
    if value.dtype == np.float32:
        _gather_floor_typed[float](value.reshape(-1), rows, out, zeros, ones, grad.reshape(-1), extra,
                                   N, S, Lq, M, QK, backward, heads)
    else:
        _gather_floor_typed[double](value.reshape(-1), rows, out, zeros, ones, grad.reshape(-1), extra,
                                    N, S, Lq, M, QK, backward, heads)
    return (out, grad) if backward else out


def sparse_floor(value, const _Slot[::1] slots, const int64_t[::1] block_first, block_prefetch=None):
    """Internal (benchmark floor of a sparse backward): the sparse method's memory traffic,
    its phase 3 without the dot products and weights. value (N, S, M, D); ``slots``
    (slot_dtype): every in-map corner's placed slot, its value row within its block in
    rk (r = 0), in the method's slot order bucketed stably by block
    (cydeform.bench.floor.sparse_slots); ``block_first`` (B + 1): where each block's slots
    start. The op's phase 3 with its shared block counter, prefetch and buffers, each
    slot's value row added with weight 1 into its block's buffer, which is then streamed
    out (``block_prefetch`` as in backward()). Returns that grad shaped like value (each
    row: its value row times the number of slots at it)."""
    N, S, M, D = value.shape
    cdef bint prefetch = _block_prefetch(block_prefetch)
    shift = _sparse_block_shift(D, value.itemsize)
    B = block_first.shape[0] - 1
    if B != _sparse_blocks(N * S * M, D, value.itemsize) or block_first[B] != slots.shape[0]:
        raise ValueError("block_first does not match value's blocks and the slots")
    threads = _threads(slots.shape[0] * D)
    grad = _aligned_empty(value.shape, value.dtype)
    bufs = _aligned_empty(threads * (D << shift), value.dtype)
    claimed = np.zeros(1, dtype=np.int64)
    if value.dtype == np.float32:
        _sparse_floor_typed[float](value.reshape(-1), slots, block_first, grad.reshape(-1), bufs, claimed,
                                   D, shift, threads, prefetch)
    else:
        _sparse_floor_typed[double](value.reshape(-1), slots, block_first, grad.reshape(-1), bufs, claimed,
                                    D, shift, threads, prefetch)
    return grad


def sparse_block_shift(Py_ssize_t D, Py_ssize_t itemsize):
    """Internal: log2 of the grad_value rows per block of the sparse backward."""
    return _sparse_block_shift(D, itemsize)


cdef _sparse_floor_typed(const floating[::1] value, const _Slot[::1] slots, const int64_t[::1] block_first,
                         floating[::1] grad, floating[::1] bufs, int64_t[::1] claimed, Py_ssize_t D,
                         int shift, int threads, bint block_prefetch):
    cdef Py_ssize_t NB = value.shape[0] // D, B = block_first.shape[0] - 1, t
    with nogil:
        for t in prange(threads, schedule="static", num_threads=threads):
            _sparse_sum_blocks(&claimed[0], B, NULL, &value[0], &grad[0],
                               &bufs[0] + t * (D << shift), &block_first[0], &slots[0], NULL, NB, D, 0, shift,
                               block_prefetch)


cdef _gather_floor_typed(const floating[::1] value, const int64_t[:, ::1] rows, floating[:, ::1] out,
                         const floating[::1] zeros, const floating[::1] ones, floating[::1] grad,
                         floating[::1] extra, Py_ssize_t N, Py_ssize_t S, Py_ssize_t Lq, Py_ssize_t M,
                         Py_ssize_t QK, bint backward, bint heads):
    cdef Py_ssize_t K = rows.shape[1], D = out.shape[1]
    with nogil:
        if backward:
            _floor_backward(&value[0], &rows[0, 0], N, S, Lq, M, K, D, QK, &zeros[0], &ones[0], &out[0, 0],
                            &grad[0], &extra[0], heads)
        else:
            _floor_forward(&value[0], &rows[0, 0], N, Lq, M, K, D, &zeros[0], &ones[0], &out[0, 0], heads)


# C entry points for callers outside Python (cydeform.jax's XLA FFI handler calls them
# from XLA's own threads, without the GIL). They run the same _forward/_backward as the
# Python functions above, with the same scratch buffers, so results are bit-identical
# to the NumPy path; the caller owns the input and output buffers (C-contiguous, sizes
# N, S, M, D, Lq, L, P as in the module comment). They return 0, 1 if a scratch
# allocation failed, or 2 for sizes the Python functions reject too (_bad_sizes). N = 0,
# an empty batch (a jax.vmap over none), is nothing to read or write. grad_value need
# not be zeroed by the caller.
cdef inline bint _bad_sizes(int64_t N, int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L,
                            int64_t P) noexcept nogil:
    """S, M, D, Lq, L or P below 1, or N below 0: the loops below would divide by zero
    (N K = 0 head groups) or never end (D = 0 in _sparse_block_shift)."""
    return N < 0 or S < 1 or M < 1 or D < 1 or Lq < 1 or L < 1 or P < 1


cdef int _c_forward(const floating* value, const int64_t* shapes, const int64_t* starts,
                    const floating* loc, const floating* attn, floating* out, int64_t N, int64_t S,
                    int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) noexcept nogil:
    if _bad_sizes(N, S, M, D, Lq, L, P):
        return 2
    if N == 0:
        return 0
    cdef bint heads = _by_head(S, Lq, L, P)
    cdef int threads = _threads(N * Lq * M * L * P * D)
    cdef Py_ssize_t size = N * S * M * D
    cdef floating* zeros = <floating*>calloc(D, sizeof(floating))
    cdef void* raw = malloc((size + _heads_scratch_size(threads, L, P, D)) * sizeof(floating) + 64 if heads else 1)
    cdef floating* work = <floating*>_align64(raw)
    cdef int status = 1
    if zeros != NULL and raw != NULL:
        if heads:
            _to_heads(value, work, N, S, M, D, threads)
            _forward_heads(work, shapes, starts, loc, attn, out, zeros, work + size, N, S, M, D, Lq, L, P,
                           threads)
        else:
            _forward(value, shapes, starts, loc, attn, out, zeros, N, S, M, D, Lq, L, P)
        status = 0
    free(zeros)
    free(raw)
    return status


cdef inline void* _align64(void* p) noexcept nogil:
    """The first 64-byte boundary at or after p (p from malloc(n + 64))."""
    return <void*>(<char*>p + ((64 - <uintptr_t>p % 64) % 64))


cdef int _c_backward(const floating* grad_out, const floating* value, const int64_t* shapes,
                     const int64_t* starts, const floating* loc, const floating* attn,
                     floating* grad_value, floating* grad_loc, floating* grad_attn, int64_t N, int64_t S,
                     int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) noexcept nogil:
    if _bad_sizes(N, S, M, D, Lq, L, P):
        return 2
    if N == 0:
        return 0
    if _sparse_applies(S, Lq, L, P):
        return _c_backward_sparse(grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc,
                                  grad_attn, N, S, M, D, Lq, L, P)
    # Per image, as backward() above: an image's gradient has the same bits in any batch.
    cdef Py_ssize_t K = _query_chunks(S, Lq, L, P, Lq * M * L * P * D)
    cdef Py_ssize_t size = N * S * M * D
    if _by_head(S, Lq, L, P):
        return _c_backward_heads(grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc,
                                 grad_attn, K, N, S, M, D, Lq, L, P)
    # As backward() above without staging: grad_value zeroed up front, the extra chunk
    # buffers lazily (calloc).
    cdef floating* extra = <floating*>calloc((K - 1) * size if K > 1 else 1, sizeof(floating))
    cdef floating* zeros = <floating*>calloc(D, sizeof(floating))
    cdef floating* scratch = <floating*>malloc(N * K * M * 4 * D * sizeof(floating))
    cdef int status = 1
    if extra != NULL and zeros != NULL and scratch != NULL:
        memset(grad_value, 0, size * sizeof(floating))
        _backward(grad_out, value, shapes, starts, loc, attn, grad_value, extra, K, grad_loc, grad_attn,
                  zeros, scratch, N, S, M, D, Lq, L, P, False, _threads(N * Lq * M * L * P * D))
        status = 0
    free(extra)
    free(zeros)
    free(scratch)
    return status


cdef int _c_backward_heads(const floating* grad_out, const floating* value, const int64_t* shapes,
                           const int64_t* starts, const floating* loc, const floating* attn,
                           floating* grad_value, floating* grad_loc, floating* grad_attn, Py_ssize_t K,
                           int64_t N, int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L,
                           int64_t P) noexcept nogil:
    # As backward()'s head-major path: value's copy and the K chunk buffers in one allocation.
    cdef Py_ssize_t size = N * S * M * D
    cdef void* raw = malloc((K + 1) * size * sizeof(floating) + 64)
    cdef floating* work = <floating*>_align64(raw)
    cdef floating* zeros = <floating*>calloc(D, sizeof(floating))
    cdef int threads = _threads(N * Lq * M * L * P * D)
    cdef floating* scratch = <floating*>malloc(threads * _backward_heads_scratch(L, P, D) * sizeof(floating))
    cdef int status = 1
    if raw != NULL and zeros != NULL and scratch != NULL:
        _to_heads(value, work, N, S, M, D, threads)
        _backward(grad_out, work, shapes, starts, loc, attn, grad_value, work + size, K, grad_loc, grad_attn,
                  zeros, scratch, N, S, M, D, Lq, L, P, True, threads)
        status = 0
    free(raw)
    free(zeros)
    free(scratch)
    return status


cdef int _c_backward_sparse(const floating* grad_out, const floating* value, const int64_t* shapes,
                            const int64_t* starts, const floating* loc, const floating* attn,
                            floating* grad_value, floating* grad_loc, floating* grad_attn, int64_t N,
                            int64_t S, int64_t M, int64_t D, int64_t Lq, int64_t L, int64_t P) noexcept nogil:
    # The work area of backward()'s sparse method (malloc's alignment is enough).
    cdef int threads = _threads(N * Lq * M * L * P * D)
    cdef char* work = <char*>malloc(_sparse_work_bytes(N, S, M, D, Lq, L, P, sizeof(floating), threads))
    cdef floating* zeros = <floating*>calloc(D, sizeof(floating))
    cdef int status = 1
    if work != NULL and zeros != NULL:
        _backward_sparse(grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn,
                         zeros, work, threads, N, S, M, D, Lq, L, P, _default_block_prefetch)
        status = 0
    free(work)
    free(zeros)
    return status


cdef int _c_forward_f32(const float* value, const int64_t* shapes, const int64_t* starts, const float* loc,
                        const float* attn, float* out, int64_t N, int64_t S, int64_t M, int64_t D,
                        int64_t Lq, int64_t L, int64_t P) noexcept nogil:
    return _c_forward(value, shapes, starts, loc, attn, out, N, S, M, D, Lq, L, P)


cdef int _c_forward_f64(const double* value, const int64_t* shapes, const int64_t* starts, const double* loc,
                        const double* attn, double* out, int64_t N, int64_t S, int64_t M, int64_t D,
                        int64_t Lq, int64_t L, int64_t P) noexcept nogil:
    return _c_forward(value, shapes, starts, loc, attn, out, N, S, M, D, Lq, L, P)


cdef int _c_backward_f32(const float* grad_out, const float* value, const int64_t* shapes,
                         const int64_t* starts, const float* loc, const float* attn, float* grad_value,
                         float* grad_loc, float* grad_attn, int64_t N, int64_t S, int64_t M, int64_t D,
                         int64_t Lq, int64_t L, int64_t P) noexcept nogil:
    return _c_backward(grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn,
                       N, S, M, D, Lq, L, P)


cdef int _c_backward_f64(const double* grad_out, const double* value, const int64_t* shapes,
                         const int64_t* starts, const double* loc, const double* attn, double* grad_value,
                         double* grad_loc, double* grad_attn, int64_t N, int64_t S, int64_t M, int64_t D,
                         int64_t Lq, int64_t L, int64_t P) noexcept nogil:
    return _c_backward(grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn,
                       N, S, M, D, Lq, L, P)


def c_entry_points():
    """Internal: addresses of the C entry points, as a dict of ints.

    Keys forward_f32, forward_f64, backward_f32, backward_f64; the signatures are those
    of _c_forward_f32 etc. in src/_cpu_impl.pxi (mirrored in cydeform/kernels/jax_cpu_ffi.cc).
    """
    return {
        "forward_f32": <uintptr_t><void*>_c_forward_f32,
        "forward_f64": <uintptr_t><void*>_c_forward_f64,
        "backward_f32": <uintptr_t><void*>_c_backward_f32,
        "backward_f64": <uintptr_t><void*>_c_backward_f64,
    }
