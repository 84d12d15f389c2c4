"""The CUDA backend on a real GPU against the CPU path on the same inputs.

float64 to ~1e-12 relative, float32 to ~1e-5, float16/bfloat16 to their precision
against the float32 GPU result on the same (representable) inputs; deterministic mode
bit-identical run to run; errors, devices, streams, non-contiguous inputs, the
64-bit-offset path on a value array of more than 2**31 elements (when memory allows),
and a block covering queries of several images. Skipped without CuPy or a GPU.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

cupy = pytest.importorskip("cupy")
try:
    _GPUS = cupy.cuda.runtime.getDeviceCount()
except Exception:  # no driver, no device
    _GPUS = 0
if _GPUS == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

import cydeform
from cydeform import _cuda, _validate
from cydeform.reference import ms_deform_attn_backward_reference, ms_deform_attn_reference

from strategies import args, grad_output_for, problems

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

HALF_TYPES = [np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes else [])


def _eps(dtype):
    """Machine epsilon; NumPy's finfo does not know ml_dtypes' bfloat16."""
    if np.dtype(dtype).name == "bfloat16":
        return float(ml_dtypes.finfo(dtype).eps)
    return float(np.finfo(dtype).eps)
RTOL = {np.float64: 1e-12, np.float32: 1e-5}


def to_gpu(p):
    return {k: cupy.asarray(v) if k in ("value", "sampling_locations", "attention_weights") else v
            for k, v in p.items()}


def assert_matches(got, want, rtol, name):
    """Same NaN positions; elsewhere |got - want| <= rtol * (|want| + max|want|)."""
    got = np.asarray(cupy.asnumpy(got) if isinstance(got, cupy.ndarray) else got, dtype=np.float64)
    want = np.asarray(cupy.asnumpy(want) if isinstance(want, cupy.ndarray) else want, dtype=np.float64)
    assert got.shape == want.shape, name
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    assert np.array_equal(nan_got, nan_want), f"{name}: NaN positions differ"
    scale = max(1.0, float(np.abs(want[~nan_want]).max(initial=0.0)))
    np.testing.assert_allclose(got[~nan_want], want[~nan_want], rtol=rtol, atol=rtol * scale, err_msg=name)


def gpu_run(p, grad, mode, specialize=True):
    """Forward and backward on the GPU; mode in fast / baseline / deterministic."""
    g = to_gpu(p)
    value, shapes, starts, loc, attn = args(g)
    prob = _validate.check_problem(value, shapes, starts, loc, attn, _validate.GPU_DTYPES)
    rt = _cuda.CupyRuntime()
    variant = "baseline" if mode == "baseline" else "fast"
    out = _cuda._forward(rt, prob, value, loc, attn, variant=variant, specialize=specialize)
    grads = _cuda._backward(rt, prob, cupy.asarray(grad), value, loc, attn, variant=variant,
                            deterministic=mode == "deterministic", specialize=specialize)
    return out, grads


def cpu_run(p, grad):
    return cydeform.ms_deform_attn(*args(p)), cydeform.ms_deform_attn_backward(grad, *args(p))


# Random shapes use the runtime-size kernels (one compile per dtype and path, not per
# shape); the compile-time kernels get fixed shapes below.
@settings(max_examples=25)
@given(data=st.data(), dtype=st.sampled_from([np.float32, np.float64]),
       mode=st.sampled_from(["fast", "baseline", "deterministic"]), nonfinite=st.booleans())
def test_matches_cpu_backend(data, dtype, mode, nonfinite):
    p = data.draw(problems(dtype=dtype, nonfinite=nonfinite))
    grad = grad_output_for(p)
    out, grads = gpu_run(p, grad, mode, specialize=False)
    cpu_out, cpu_grads = cpu_run(p, grad)
    assert out.dtype == dtype
    assert_matches(out, cpu_out, RTOL[dtype], "output")
    for name, a, b in zip(("grad_value", "grad_loc", "grad_attn"), grads, cpu_grads):
        assert a.dtype == dtype
        assert_matches(a, b, RTOL[dtype], name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("L,P,D", [(4, 4, 32), (1, 1, 4), (2, 3, 12), (3, 2, 48), (2, 2, 64)])
def test_public_api_compile_time_kernels(dtype, L, P, D):
    rng = np.random.default_rng(L * 100 + P * 10 + D)
    p = random_problem(rng, dtype, 2, 37, 3, D, P, [(9, 13), (5, 7), (3, 4), (2, 2)][:L], nonfinite=True)
    grad = grad_output_for(p)
    g = to_gpu(p)
    out = cydeform.ms_deform_attn(*args(g))
    grads = cydeform.ms_deform_attn_backward(cupy.asarray(grad), *args(g))
    assert isinstance(out, cupy.ndarray) and all(isinstance(x, cupy.ndarray) for x in grads)
    cpu_out, cpu_grads = cpu_run(p, grad)
    assert_matches(out, cpu_out, RTOL[dtype], "output")
    for name, a, b in zip(("grad_value", "grad_loc", "grad_attn"), grads, cpu_grads):
        assert_matches(a, b, RTOL[dtype], name)
    if dtype == np.float64:
        assert_matches(out, ms_deform_attn_reference(*args(p)), 1e-12, "output vs reference")
        for name, a, b in zip(("gv", "gl", "ga"), grads, ms_deform_attn_backward_reference(grad, *args(p))):
            assert_matches(a, b, 1e-12, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64] + HALF_TYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("L,P,D,specialize", [(4, 4, 32, True), (3, 2, 48, True), (2, 3, 9, False), (1, 1, 4, False)])
def test_shared_geometry_forward_is_bit_identical_to_fast(dtype, L, P, D, specialize):
    """The tuning variant msda_forward_shared (lanes broadcast geometry by shuffles)."""
    rng = np.random.default_rng(L * 100 + P * 10 + D)
    p = to_gpu(random_problem(rng, dtype, 2, 37, 3, D, P, [(9, 13), (5, 7), (3, 4), (2, 2)][:L], nonfinite=True))
    prob = _validate.check_problem(*args(p), allowed_dtypes=_validate.GPU_DTYPES)
    value, _, _, loc, attn = args(p)
    fast = _cuda._forward(_cuda.CupyRuntime(), prob, value, loc, attn, variant="fast", specialize=specialize)
    shared = _cuda._forward(_cuda.CupyRuntime(), prob, value, loc, attn, variant="shared", specialize=specialize)
    assert cupy.asnumpy(fast).tobytes() == cupy.asnumpy(shared).tobytes()


def random_problem(rng, dtype, N, Lq, M, D, P, sides, nonfinite=False):
    shapes = np.array(sides, dtype=np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    L = len(sides)
    loc = rng.uniform(-0.5, 1.5, (N, Lq, M, L, P, 2))
    if nonfinite:
        flat = loc.reshape(-1)
        picks = rng.choice(flat.size, size=max(1, flat.size // 10), replace=False)
        flat[picks] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30], size=picks.size)
    return dict(value=rng.standard_normal((N, int(sizes.sum()), M, D)).astype(dtype), spatial_shapes=shapes,
                level_start_index=np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64),
                sampling_locations=loc.astype(dtype),
                attention_weights=rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype))


@pytest.mark.parametrize("dtype", HALF_TYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mode", ["fast", "baseline", "deterministic"])
@pytest.mark.parametrize("D", [32, 8, 9])
def test_half_types_match_float32(dtype, mode, D):
    rng = np.random.default_rng(D)
    p = random_problem(rng, dtype, 2, 50, 4, D, 4, [(20, 30), (10, 15), (5, 8), (3, 4)], nonfinite=True)
    p32 = {k: (v.astype(np.float32) if v.dtype == np.dtype(dtype) else v) for k, v in p.items()}
    grad = grad_output_for(p32).astype(dtype)
    got = gpu_run(p, grad, mode)
    want = gpu_run(p32, grad.astype(np.float32), mode)
    eps = _eps(dtype)
    assert got[0].dtype == np.dtype(dtype)
    assert_matches(got[0], want[0], 4 * eps, "output")
    for name, a, b in zip(("grad_value", "grad_loc", "grad_attn"), got[1], want[1]):
        assert a.dtype == np.dtype(dtype)
        assert_matches(a, b, 4 * eps, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float64] + HALF_TYPES, ids=lambda d: np.dtype(d).name)
def test_deterministic_backward_is_bit_identical(dtype):
    rng = np.random.default_rng(1)
    # Dense sampling of small levels: hundreds of points per texel.
    p = to_gpu(random_problem(rng, dtype, 2, 3000, 8, 32, 4, [(8, 8), (4, 4), (2, 2), (1, 1)]))
    grad = cupy.asarray(rng.standard_normal((2, 3000, 256)).astype(dtype))
    first = cydeform.ms_deform_attn_backward(grad, *args(p), deterministic=True)
    for _ in range(3):
        again = cydeform.ms_deform_attn_backward(grad, *args(p), deterministic=True)
        for a, b in zip(first, again):
            assert cupy.array_equal(a.view(cupy.uint8), b.view(cupy.uint8))
    atomic = cydeform.ms_deform_attn_backward(grad, *args(p))
    tol = 1e-5 if dtype in (np.float32, np.float64) else 4 * _eps(dtype)
    assert_matches(atomic[0].astype(cupy.float32), first[0].astype(cupy.float32), tol, "grad_value")


def test_mixed_numpy_and_cupy_inputs_raise_type_error():
    p = random_problem(np.random.default_rng(3), np.float32, 1, 4, 2, 8, 2, [(3, 3)])
    g = to_gpu(p)
    with pytest.raises(TypeError, match="CuPy"):
        cydeform.ms_deform_attn(p["value"], p["spatial_shapes"], None, g["sampling_locations"],
                                g["attention_weights"])
    with pytest.raises(TypeError, match="grad_output"):
        cydeform.ms_deform_attn_backward(np.zeros((1, 4, 16), np.float32), *args(g))


def test_outputs_on_the_inputs_device_and_current_stream():
    p = random_problem(np.random.default_rng(4), np.float32, 1, 30, 2, 8, 2, [(5, 4)])
    device = cupy.cuda.runtime.getDeviceCount() - 1  # another device than 0 when there are several
    with cupy.cuda.Device(device):
        g = to_gpu(p)
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            out = cydeform.ms_deform_attn(*args(g))
            grads = cydeform.ms_deform_attn_backward(cupy.ones_like(out), *args(g), deterministic=True)
        stream.synchronize()
    assert out.device.id == device and all(x.device.id == device for x in grads)
    assert_matches(out, cydeform.ms_deform_attn(*args(p)), 1e-5, "output")
    with cupy.cuda.Device(0):  # current device 0, inputs elsewhere: runs on the inputs' device
        again = cydeform.ms_deform_attn(*args(g))
    assert again.device.id == device
    assert_matches(again, out, 0, "output on the inputs' device")


def test_non_contiguous_inputs_are_read_correctly_and_not_modified():
    p = random_problem(np.random.default_rng(5), np.float32, 2, 9, 2, 16, 3, [(4, 6), (2, 3)])
    g = to_gpu(p)
    views = dict(g)
    views["value"] = cupy.asfortranarray(g["value"])
    views["sampling_locations"] = cupy.repeat(g["sampling_locations"], 2, axis=-1)[..., ::2]
    snapshot = {k: v.copy() for k, v in views.items() if isinstance(v, cupy.ndarray)}
    grad = cupy.asarray(grad_output_for(p))
    out = cydeform.ms_deform_attn(*args(views))
    grads = cydeform.ms_deform_attn_backward(cupy.asfortranarray(grad), *args(views))
    for k, v in snapshot.items():
        assert cupy.array_equal(views[k], v), f"{k} was modified"
    cpu_out, cpu_grads = cpu_run(p, cupy.asnumpy(grad))
    assert_matches(out, cpu_out, 1e-5, "output")
    for name, a, b in zip(("gv", "gl", "ga"), grads, cpu_grads):
        assert_matches(a, b, 1e-5, name)


def test_compile_failure_names_the_kernel_and_carries_the_log(monkeypatch):
    _cuda._cupy_function.cache_clear()
    monkeypatch.setattr(_cuda, "kernel_source", lambda: "this is not CUDA;\n")
    try:
        with pytest.raises(RuntimeError, match=r"msda_forward_baseline<float, int>") as info:
            _cuda._cupy_function("msda_forward_baseline<float, int>", cupy.cuda.Device().id,
                                 _cuda.DEFAULT_CONFIG.options)
        assert "error" in str(info.value).lower()
    finally:
        monkeypatch.undo()
        _cuda._cupy_function.cache_clear()


def test_offsets_past_two_to_the_31():
    """value of N*S*M*D > 2**31 elements: the backend must switch to 64-bit offsets.
    Points sit on texel centres near the end of the array (weight 1 on one texel), so
    the expected output is a plain gather."""
    H, W, M, D = 2048, 2048, 8, 64  # S*M*D = 2**31 + 2**21 elements, 8.6 GB in float32
    elements = H * W * M * D
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < 3 * elements * 4 + (2 << 30):
        pytest.skip(f"needs ~{3 * elements * 4 >> 30} GiB of free device memory")
    Lq, P = 64, 2
    rng = np.random.default_rng(6)
    value = cupy.empty((1, H * W, M, D), dtype=cupy.float32)
    value[:] = cupy.arange(D, dtype=cupy.float32)  # row content irrelevant except the sampled tail
    ys = rng.integers(H - 4, H, size=(1, Lq, M, 1, P))
    xs = rng.integers(0, W, size=(1, Lq, M, 1, P))
    value[0, ys.ravel() * W + xs.ravel()] = cupy.asarray(rng.standard_normal((ys.size, M, D)), dtype=cupy.float32)
    loc = np.stack([(xs + 0.5) / W, (ys + 0.5) / H], axis=-1).astype(np.float32)
    attn = rng.uniform(0, 1, (1, Lq, M, 1, P)).astype(np.float32)
    shapes = np.array([[H, W]])
    prob = _validate.check_problem(value, shapes, None, loc, attn, _validate.GPU_DTYPES)
    assert _cuda.index_ctype(prob) == "long long"
    loc_g, attn_g = cupy.asarray(loc), cupy.asarray(attn)
    out = cydeform.ms_deform_attn(value, shapes, None, loc_g, attn_g)
    texel = cupy.asarray(ys * W + xs)  # (1, Lq, M, 1, P)
    m_idx = cupy.arange(M)[None, None, :, None, None]
    gathered = value[0][texel[0], m_idx[0]]  # (Lq, M, 1, P, D)
    expected = (cupy.asarray(attn)[0][..., None] * gathered).sum(axis=(2, 3)).reshape(1, Lq, M * D)
    cupy.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    expected_ga = gathered.sum(axis=-1)[None]  # (1, Lq, M, 1, P): sum_d g * V with g = 1
    del gathered
    # grad_value rows: each point adds A (times g = 1) to every channel of its texel row.
    rows = {}
    for q in range(Lq):
        for m in range(M):
            for p_ in range(P):
                key = (int(ys[0, q, m, 0, p_] * W + xs[0, q, m, 0, p_]), m)
                rows[key] = rows.get(key, 0.0) + float(attn[0, q, m, 0, p_])
    keys = np.array(list(rows))
    grad = cupy.ones((1, Lq, M * D), dtype=cupy.float32)
    for deterministic in (False, True):
        gv, gl, ga = cydeform.ms_deform_attn_backward(grad, value, shapes, None, loc_g, attn_g,
                                                      deterministic=deterministic)
        cupy.testing.assert_allclose(ga, expected_ga, rtol=1e-5, atol=1e-5)
        got_rows = gv[0, cupy.asarray(keys[:, 0]), cupy.asarray(keys[:, 1])]  # (rows, D)
        want_rows = cupy.asarray(np.array(list(rows.values()), np.float32))[:, None]
        cupy.testing.assert_allclose(got_rows, cupy.broadcast_to(want_rows, got_rows.shape), rtol=1e-5)
        touched = int(cupy.count_nonzero(gv))
        assert touched == len(rows) * D, "grad_value written outside the sampled rows"
        del gv, gl, ga
