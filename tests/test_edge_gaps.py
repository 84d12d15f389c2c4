"""Cases a mutation run showed missing (issue 10): each test here failed under a
single-line mutation that every other test let through.

- x == W / y == H exactly on the CPU (mutation: the range check x < W -> x <= W);
- P = 0 (mutation: the P < 1 check dropped);
- softmax of large logits in the layer (mutation: no max-subtraction);
- half types through the CUDA kernels (host harness) against the float64 oracle, not
  only against the same kernels' float32 path.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import cydeform
from cydeform import _cuda, _validate
from cydeform.nn import MSDeformAttn
from cydeform.reference import ms_deform_attn_backward_reference, ms_deform_attn_reference


def _inputs(rng, dtype, N, Lq, M, D, P, sides):
    shapes = np.array(sides, dtype=np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    L = len(sides)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    value = rng.standard_normal((N, int(sizes.sum()), M, D))
    loc = rng.uniform(0.0, 1.0, (N, Lq, M, L, P, 2))
    attn = rng.uniform(0.0, 1.0, (N, Lq, M, L, P))
    return [value.astype(dtype), shapes, starts, loc.astype(dtype), attn.astype(dtype)]


def test_zero_points_are_refused():
    rng = np.random.default_rng(0)
    value, shapes, starts, loc, attn = _inputs(rng, np.float64, 1, 2, 1, 4, 1, [(2, 2)])
    with pytest.raises(ValueError, match="P >= 1"):
        cydeform.ms_deform_attn(value, shapes, starts, loc[..., :0, :], attn[..., :0])


def test_layer_softmax_survives_large_logits():
    """Shifting every attention logit of a query by 800 leaves the softmax unchanged;
    without max-subtraction exp(800) overflows to inf and the output is NaN."""
    layer = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, dtype="float64", seed=0)
    rng = np.random.default_rng(1)
    shapes = np.array([[4, 4], [2, 2]])
    query = rng.standard_normal((1, 3, 16))
    ref = rng.uniform(0.2, 0.8, (1, 3, 2, 2))
    flat = rng.standard_normal((1, 20, 16))
    out = layer.forward(query, ref, flat, shapes)
    layer.params["attention_weights.bias"][...] += 800.0
    shifted = layer.forward(query, ref, flat, shapes)
    assert np.isfinite(shifted).all()
    np.testing.assert_allclose(shifted, out, rtol=1e-9, atol=1e-12)


# ---- half types through the kernels, against the float64 oracle ------------------------

try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None

HALF = [np.float16] + ([ml_dtypes.bfloat16] if ml_dtypes else [])


def _eps(dtype):
    return 2.0**-10 if np.dtype(dtype) == np.float16 else 2.0**-7


@pytest.fixture(scope="module")
def half_rt(tmp_path_factory):
    from cuda_host.host_runtime import HostRuntime, find_compiler

    if find_compiler() is None:
        pytest.skip("no C++ compiler to build the host harness")
    build_dir = os.environ.get("CYDEFORM_HOST_BUILD_DIR") or tmp_path_factory.mktemp("cuda_host_half")
    exprs = set()
    for dtype in HALF:
        meta = _validate.Problem(1, 4, 1, 16, 1, 2, 2, np.dtype(dtype), np.array([[1, 2], [1, 2]]),
                                 np.array([0, 2]))
        exprs.update(_cuda.kernel_expressions(meta, specialize=False))
    return HostRuntime(build_dir, prebuild=sorted(exprs))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", HALF, ids=lambda d: np.dtype(d).name)
def test_half_types_against_the_float64_oracle(half_rt, dtype, deterministic):
    """float16/bfloat16 in, float32 accumulation, rounded once on output: each result
    within 2 units of the output type's epsilon (relative to its largest element) of the
    float64 oracle evaluated on the same rounded inputs."""
    rng = np.random.default_rng(9)
    args = _inputs(rng, np.float64, 2, 5, 2, 16, 2, [(3, 5), (2, 2)])
    args[3] = rng.uniform(-0.2, 1.2, args[3].shape)
    value, shapes, starts, loc, attn = args
    grad = rng.standard_normal((2, 5, 32))
    half = [a.astype(dtype) for a in (value, loc, attn, grad)]
    exact = [a.astype(np.float64) for a in half]  # the oracle sees the rounded inputs
    prob = _validate.check_problem(half[0], shapes, starts, half[1], half[2], _validate.GPU_DTYPES)
    out = _cuda._forward(half_rt, prob, half[0], half[1], half[2], specialize=False)
    grads = _cuda._backward(half_rt, prob, half[3], half[0], half[1], half[2], deterministic=deterministic,
                            specialize=False)
    want = (ms_deform_attn_reference(exact[0], shapes, starts, exact[1], exact[2]),
            *ms_deform_attn_backward_reference(exact[3], exact[0], shapes, starts, exact[1], exact[2]))
    for name, got, w in zip(("output", "grad_value", "grad_loc", "grad_attn"), (out, *grads), want):
        assert got.dtype == np.dtype(dtype), name
        err = np.abs(got.astype(np.float64) - w).max() / np.abs(w).max()
        assert err <= 2 * _eps(dtype), f"{name}: error {err:.2e} > 2 eps = {2 * _eps(dtype):.2e}"
