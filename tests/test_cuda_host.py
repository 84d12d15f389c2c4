"""The CUDA kernels, compiled as host C++ (tests/cuda_host), against the CPU backends.

The kernels run through cydeform._cuda's own orchestration (variant choice, index
width, buffers, sorting, kernel arguments), with each warp's 32 lanes executed as
cooperative fibers so warp shuffles behave as on a GPU. Compared with the Cython
backend (``cydeform.ms_deform_attn`` on NumPy arrays) in the inputs' dtype and with
the float64 oracle ``cydeform.reference``. No GPU needed; skipped without a C++
compiler.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cydeform
from cydeform import _cuda, _validate
from cydeform.reference import ms_deform_attn_backward_reference, ms_deform_attn_reference

from cuda_host.host_runtime import HarnessError, HostRuntime, find_compiler
from strategies import args, grad_output_for, problems

if find_compiler() is None:
    pytest.skip("no C++ compiler to build the host harness", allow_module_level=True)

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

# (L, P, D) compiled with compile-time sizes; together they reach one and several
# passes, G = 1..8 lanes and J = 1, 2 chunks per lane for float32 and float64.
SPECIALISED = [(1, 1, 4), (2, 3, 12), (4, 4, 32), (3, 2, 48)]
MODES = ["fast", "baseline", "deterministic"]

# Test-only kernels, appended to the kernel source for the harness build.
EXTRA_SOURCE = r"""
template <typename T>
__global__ void test_load_to_float(const T* src, float* dst, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] = Conv<T>::ldg(src + i);
}
__global__ void test_group_sum(float* out, int log2G, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const float s = group_sum((float)(i % 1000), 1 << log2G);
    if (i < n) out[i] = s;
}
__global__ void test_divergent_shuffle(float* out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    float v = (float)i;
    if (i % 2) v = __shfl_xor_sync(0xffffffffu, v, 1);
    if (i < n) out[i] = v;
}
__global__ void test_early_exit_shuffle(float* out, long long n) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    out[i] = group_sum((float)i, 32);
}
"""


def _prob(dtype, L, P, D, N=1, Lq=2, M=1, side=3):
    shapes = np.full((L, 2), side, dtype=np.int64)
    starts = np.arange(L, dtype=np.int64) * side * side
    return _validate.Problem(N, L * side * side, M, D, Lq, L, P, np.dtype(dtype), shapes, starts)


def _expressions():
    """Every kernel the tests below launch: one harness build for the whole module."""
    exprs = set()
    for dtype in (np.float32, np.float64):
        for index64 in (False, True):
            for D in (8, 9):  # vector chunks and the scalar generic path
                exprs.update(_cuda.kernel_expressions(_prob(dtype, 2, 2, D), specialize=False, index64=index64, experimental=True))
        # SPECIALISED and the fixed shapes of the single-case tests below.
        for L, P, D in SPECIALISED + [(1, 2, 8), (2, 4, 8), (2, 2, 8)]:
            exprs.update(_cuda.kernel_expressions(_prob(dtype, L, P, D), specialize=True, experimental=True))
    half_types = [np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes else [])
    for dtype in half_types:
        for D in (8, 9):
            exprs.update(_cuda.kernel_expressions(_prob(dtype, 2, 2, D), specialize=False, experimental=True))
        exprs.update(_cuda.kernel_expressions(_prob(dtype, 4, 4, 32), specialize=True, experimental=True))
        exprs.add(f"test_load_to_float<{_cuda._CTYPE[np.dtype(dtype).name]}>")
    exprs.update({"test_group_sum", "test_divergent_shuffle", "test_early_exit_shuffle"})
    return sorted(exprs)


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    build_dir = os.environ.get("CYDEFORM_HOST_BUILD_DIR") or tmp_path_factory.mktemp("cuda_host")
    return HostRuntime(build_dir, prebuild=_expressions(), extra_source=EXTRA_SOURCE)


def _problem_of(p):
    value, shapes, starts, loc, attn = args(p)
    allowed = ("float32", "float64", "float16", "bfloat16")
    return _validate.check_problem(value, shapes, starts, loc, attn, allowed)


def run(rt, p, grad, mode, **kw):
    """Forward and backward of problem ``p`` on the host harness in ``mode``."""
    prob = _problem_of(p)
    value, _, _, loc, attn = args(p)
    variant = "baseline" if mode == "baseline" else "fast"
    out = _cuda._forward(rt, prob, value, loc, attn, variant=variant, **kw)
    grads = _cuda._backward(rt, prob, grad, value, loc, attn, variant=variant,
                            deterministic=(mode == "deterministic"), **kw)
    return out, grads


def assert_matches(got, want, rtol, name):
    """Same NaN positions; elsewhere |got - want| <= rtol * (|want| + max|want|)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, name
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    assert np.array_equal(nan_got, nan_want), (
        f"{name}: NaN at {np.argwhere(nan_got != nan_want)[:5].tolist()} differs")
    g, w = got[~nan_want], want[~nan_want]
    scale = max(1.0, float(np.abs(w).max(initial=0.0)))
    np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * scale, err_msg=name)


RTOL = {np.float64: 1e-12, np.float32: 1e-5}


def check_against_cpu(rt, p, mode, dtype, **kw):
    grad = grad_output_for(p)
    out, grads = run(rt, p, grad, mode, **kw)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    cpu_out = cydeform.ms_deform_attn(*args(p))
    cpu_grads = cydeform.ms_deform_attn_backward(grad, *args(p))
    assert_matches(out, cpu_out, RTOL[dtype], "output")
    for name, a, b in zip(("grad_value", "grad_loc", "grad_attn"), grads, cpu_grads):
        assert_matches(a, b, RTOL[dtype], name)
    if dtype == np.float64:  # also the independent oracle, bit-for-bit cell selection
        assert_matches(out, ms_deform_attn_reference(*args(p)), 1e-12, "output vs reference")
        ref = ms_deform_attn_backward_reference(grad, *args(p))
        for name, a, b in zip(("grad_value", "grad_loc", "grad_attn"), grads, ref):
            assert_matches(a, b, 1e-12, name + " vs reference")
    return out, grads


@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]), mode=st.sampled_from(MODES),
       index64=st.booleans(), nonfinite=st.booleans())
def test_generic_kernels_match_cpu_backend(rt, data, dtype, mode, index64, nonfinite):
    """Random shapes (L, P, D = 1, odd D, 1x1 levels, H != W), locations in [-0.5, 1.5],
    NaN/inf/1e30 locations; runtime-size kernels, 32- and 64-bit offsets."""
    p = data.draw(problems(dtype=dtype, nonfinite=nonfinite))
    rt.launched.clear()
    check_against_cpu(rt, p, mode, dtype, specialize=False, index64=index64)
    index = "long long" if index64 else "int"
    assert all(f", {index}" in e for e in rt.launched if not e.startswith(("msda_cell_keys", "msda_segment_starts", "msda_row_pieces", "cast")))
    if mode != "baseline":
        D = p["value"].shape[3]
        vec = D % (16 // np.dtype(dtype).itemsize) == 0
        assert rt.launched[0].endswith(f"{'true' if vec else 'false'}>"), rt.launched[0]


@pytest.mark.parametrize("L,P,D", SPECIALISED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=10)
@given(data=st.data(), mode=st.sampled_from(["fast", "deterministic"]), nonfinite=st.booleans())
def test_specialised_kernels_match_cpu_backend(rt, L, P, D, dtype, data, mode, nonfinite):
    """Compile-time L, P, D (fully unrolled, one or several channel passes)."""
    N = data.draw(st.integers(1, 2))
    Lq = data.draw(st.integers(1, 5))
    M = data.draw(st.integers(1, 3))
    sides = [(data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))) for _ in range(L)]
    p = _random_problem(np.random.default_rng(data.draw(st.integers(0, 2**32 - 1))), dtype, N, Lq, M, D, P, sides,
                        nonfinite)
    rt.launched.clear()
    check_against_cpu(rt, p, mode, dtype)
    assert rt.launched[0] == _cuda._fast_expr("msda_forward", _problem_of(p), "int",
                                              _cuda.channel_layout(_problem_of(p), True))
    assert f"<{_cuda._CTYPE[np.dtype(dtype).name]}, int, {L}, {P}, {D}," in rt.launched[0]


def _random_problem(rng, dtype, N, Lq, M, D, P, sides, nonfinite=False):
    shapes = np.array(sides, dtype=np.int64)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    L = len(sides)
    loc = rng.uniform(-0.5, 1.5, (N, Lq, M, L, P, 2))
    if nonfinite:
        flat = loc.reshape(-1)
        picks = rng.choice(flat.size, size=max(1, flat.size // 6), replace=False)
        flat[picks] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30], size=picks.size)
    sizes = shapes[:, 0] * shapes[:, 1]
    return dict(value=rng.standard_normal((N, S, M, D)).astype(dtype), spatial_shapes=shapes,
                level_start_index=np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64),
                sampling_locations=loc.astype(dtype),
                attention_weights=rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype))


def test_deterministic_grad_value_does_not_depend_on_the_schedule(rt):
    """Fewer blocks (a grid-stride loop) change which thread runs which point and so the
    order of atomic additions; the deterministic gradient stays bit-identical."""
    rng = np.random.default_rng(11)
    # Many points per texel: 1x2 and 2x2 levels sampled by 3 * 150 queries (450 threads).
    p = _random_problem(rng, np.float32, 1, 150, 3, 8, 4, [(1, 2), (2, 2)])
    grad = grad_output_for(p)
    runs = {}
    for max_grid in (1, 2, 1000):
        config = _cuda.LaunchConfig(max_grid=max_grid)
        runs[max_grid] = {mode: run(rt, p, grad, mode, config=config) for mode in ("fast", "deterministic")}
    det = [r["deterministic"] for r in runs.values()]
    fast = [r["fast"] for r in runs.values()]
    for other in det[1:]:
        for a, b in zip((det[0][0], *det[0][1]), (other[0], *other[1])):
            assert np.array_equal(a, b, equal_nan=True)
    # The atomic path is also correct under every schedule (within rounding) ...
    for other in fast:
        assert_matches(other[1][0], det[0][1][0], 1e-5, "grad_value")
    # ... but its additions did run in a different order (else this test proves nothing).
    assert not all(np.array_equal(fast[0][1][0], f[1][0]) for f in fast[1:])


def test_inputs_untouched_and_non_contiguous_inputs(rt):
    rng = np.random.default_rng(13)
    p = _random_problem(rng, np.float32, 2, 3, 2, 8, 2, [(3, 3), (2, 1)])
    grad = grad_output_for(p)
    want = run(rt, p, grad, "fast")
    # Same numbers in non-contiguous layouts (Fortran order, strided views).
    q = dict(p)
    q["value"] = np.asfortranarray(p["value"])
    q["sampling_locations"] = np.repeat(p["sampling_locations"], 2, axis=-1)[..., ::2]
    q["attention_weights"] = np.asfortranarray(p["attention_weights"])
    assert not q["sampling_locations"].flags.c_contiguous
    copies = {k: np.copy(v) for k, v in q.items() if isinstance(v, np.ndarray)}
    got = run(rt, q, np.asfortranarray(grad), "deterministic")
    for k, v in copies.items():
        assert np.array_equal(q[k], v), f"{k} was modified"
    assert np.array_equal(want[0], got[0])
    for a, b in zip(want[1][1:], got[1][1:]):
        assert np.array_equal(a, b)
    assert_matches(got[1][0], want[1][0], 1e-5, "grad_value")


HALF_TYPES = [np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes else [])


def _eps(dtype):
    """Machine epsilon; NumPy's finfo does not know ml_dtypes' bfloat16."""
    if np.dtype(dtype).name == "bfloat16":
        return float(ml_dtypes.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=lambda d: np.dtype(d).name)
def test_half_load_is_exact_for_every_bit_pattern(rt, dtype):
    bits = np.arange(2**16, dtype=np.uint16)
    src = bits.view(dtype)
    dst = np.empty(src.size, np.float32)
    rt.launch(f"test_load_to_float<{_cuda._CTYPE[np.dtype(dtype).name]}>", src.size, (src, dst, np.int64(src.size)))
    want = src.astype(np.float32)
    assert np.array_equal(dst.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=lambda d: np.dtype(d).name)
def test_half_store_rounds_like_numpy(rt, dtype):
    rng = np.random.default_rng(17)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 1e-8, 2**-24, 2**-25,
                         3 * 2**-25, 2**-14, 1 + 2**-11, 1 + 3 * 2**-11, 3.4e38], np.float32)
    bits = rng.integers(0, 2**32, size=20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    src = np.concatenate([specials, -specials, bits, rng.standard_normal(2000).astype(np.float32)])
    dst = np.empty(src.size, dtype)
    rt.launch(f"cast_from_float<{_cuda._CTYPE[np.dtype(dtype).name]}>", src.size, (src, dst, np.int64(src.size)))
    want = src.astype(dtype)
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(np.isnan(dst.astype(np.float32)), nan)
    assert np.array_equal(dst[~nan].view(np.uint16), want[~nan].view(np.uint16))


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(4, 4, 32, True), (2, 2, 8, False), (2, 2, 9, False)])
def test_half_types_match_float32(rt, dtype, mode, shape):
    """Half inputs, float32 accumulation: the result equals the float32 kernels' on the
    same (half-representable) inputs to half precision."""
    L, P, D, specialize = shape
    rng = np.random.default_rng(19)
    p = _random_problem(rng, dtype, 2, 5, 2, D, P, [(5, 7), (3, 2), (2, 2), (1, 1)][:L], nonfinite=True)
    p32 = {k: (v.astype(np.float32) if v.dtype == np.dtype(dtype) else v) for k, v in p.items()}
    grad = grad_output_for(p32).astype(dtype)
    got = run(rt, p, grad, mode, specialize=specialize)
    want = run(rt, p32, grad.astype(np.float32), mode, specialize=specialize)
    eps = _eps(dtype)
    assert_matches(got[0], want[0], 4 * eps, "output")
    for name, a, b in zip(("grad_value", "grad_loc", "grad_attn"), got[1], want[1]):
        assert a.dtype == np.dtype(dtype)
        assert_matches(a, b, 4 * eps, name)


@pytest.mark.parametrize("log2G", [0, 1, 2, 3, 5])
def test_harness_group_sum(rt, log2G):
    """The fiber warps give group_sum its GPU meaning: each aligned group of 2**log2G lanes
    ends with its own sum (tail lanes beyond n still take part)."""
    n = 300
    out = np.empty(n, np.float32)
    rt.launch("test_group_sum", n, (out, np.int32(log2G), np.int64(n)))
    G = 1 << log2G
    lanes = np.arange(512) % 1000
    want = lanes.reshape(-1, G).sum(axis=1).repeat(G)[:n]
    assert np.array_equal(out, want.astype(np.float32))


@pytest.mark.parametrize("kernel", ["test_divergent_shuffle", "test_early_exit_shuffle"])
def test_harness_rejects_shuffles_a_gpu_would_not_run(rt, kernel):
    out = np.empty(300, np.float32)
    with pytest.raises(HarnessError):
        rt.launch(kernel, 300, (out, np.int64(300)))


def _shared_equals_fast(rt, p, **kw):
    prob = _problem_of(p)
    value, _, _, loc, attn = args(p)
    rt.launched.clear()
    fast = _cuda._forward(rt, prob, value, loc, attn, variant="fast", **kw)
    shared = _cuda._forward(rt, prob, value, loc, attn, variant="shared", **kw)
    assert rt.launched[1].startswith("msda_forward_shared<")
    assert fast.tobytes() == shared.tobytes()


@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64] + HALF_TYPES), index64=st.booleans(),
       nonfinite=st.booleans())
def test_shared_geometry_forward_equals_fast_forward(rt, data, dtype, index64, nonfinite):
    """The lanes of a group split the points and broadcast their geometry by shuffles:
    bit-identical to every lane computing every point (runtime sizes, tail lanes, L*P
    not a multiple of G, non-finite locations, half types)."""
    index64 = index64 and np.dtype(dtype).itemsize > 2  # half types are prebuilt with 32-bit offsets only
    _shared_equals_fast(rt, data.draw(problems(dtype=dtype, nonfinite=nonfinite)), specialize=False, index64=index64)


@pytest.mark.parametrize("L,P,D", SPECIALISED)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=5)
@given(data=st.data(), nonfinite=st.booleans())
def test_shared_geometry_forward_equals_fast_forward_specialised(rt, L, P, D, dtype, data, nonfinite):
    N, Lq, M = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 5)), data.draw(st.integers(1, 3))
    sides = [(data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))) for _ in range(L)]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    _shared_equals_fast(rt, _random_problem(rng, dtype, N, Lq, M, D, P, sides, nonfinite))
