"""One conformance suite, every backend (issue 10): the public kit's properties and the
edge cases that must hold everywhere, run through a ``backend`` fixture.

Backends: ``cpu`` (the Cython backend), ``cuda_host-{fast,baseline,deterministic}``
(the CUDA kernels through cydeform._cuda's orchestration, compiled as host C++:
tests/cuda_host; skipped without a C++ compiler) and ``cupy`` (the public API on a
GPU; skipped without one). Each takes and returns NumPy arrays.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import cydeform
from cydeform import _cuda, _validate, testing

BACKENDS = ["cpu", "cuda_host-fast", "cuda_host-baseline", "cuda_host-deterministic", "cupy"]


class Backend:
    def __init__(self, forward, backward):
        self.forward, self.backward = forward, backward


def _host_backend(rt, mode):
    variant = "baseline" if mode == "baseline" else "fast"

    def prob_of(value, shapes, starts, loc, attn):
        return _validate.check_problem(value, shapes, starts, loc, attn, ("float32", "float64"))

    def forward(value, shapes, starts, loc, attn):
        return _cuda._forward(rt, prob_of(value, shapes, starts, loc, attn), np.ascontiguousarray(value),
                              np.ascontiguousarray(loc), np.ascontiguousarray(attn), variant=variant,
                              specialize=False)

    def backward(g, value, shapes, starts, loc, attn):
        return _cuda._backward(rt, prob_of(value, shapes, starts, loc, attn), np.ascontiguousarray(g),
                               np.ascontiguousarray(value), np.ascontiguousarray(loc), np.ascontiguousarray(attn),
                               variant=variant, deterministic=(mode == "deterministic"), specialize=False)
    return Backend(forward, backward)


def _host_expressions():
    """The generic kernels for every D the kit draws: one harness build for the module."""
    exprs = set()
    for dtype in (np.float32, np.float64):
        for D in sorted(set(testing.D_VALUES) | {5, 10}):
            prob = _validate.Problem(1, 8, 1, D, 2, 2, 2, np.dtype(dtype), np.array([[2, 2], [2, 2]]),
                                     np.array([0, 4]))
            for aligned in (True, False):
                exprs.update(_cuda.kernel_expressions(prob, aligned=aligned, specialize=False, index64=False))
    return sorted(exprs)


@pytest.fixture(scope="module")
def host_runtime(tmp_path_factory):
    from cuda_host.host_runtime import HostRuntime, find_compiler

    if find_compiler() is None:
        pytest.skip("no C++ compiler to build the host harness")
    build_dir = os.environ.get("CYDEFORM_HOST_BUILD_DIR") or tmp_path_factory.mktemp("conformance_host")
    return HostRuntime(build_dir, prebuild=_host_expressions())


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    name = request.param
    if name == "cpu":
        return Backend(cydeform.ms_deform_attn, cydeform.ms_deform_attn_backward)
    if name.startswith("cuda_host"):
        return _host_backend(request.getfixturevalue("host_runtime"), name.split("-")[1])
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError
    except Exception:
        pytest.skip("no CuPy GPU")

    def on_gpu(fn):
        def run(*arrays):
            dev = [cupy.asarray(a) if a is not None and a.dtype.kind == "f" else a for a in arrays]
            out = fn(*dev)
            return tuple(cupy.asnumpy(o) for o in out) if isinstance(out, tuple) else cupy.asnumpy(out)
        return run
    return Backend(on_gpu(cydeform.ms_deform_attn), on_gpu(cydeform.ms_deform_attn_backward))


def test_every_property_of_the_kit(backend):
    results = testing.check_implementation(backend.forward, backend.backward, dtypes=(np.float32, np.float64),
                                           max_examples=40, verbose=False)
    assert {k: v for k, v in results.items() if v is not None} == {}


def _problem(rng, dtype, N, Lq, M, D, P, sides):
    shapes = np.array(sides, dtype=np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    L = len(sides)
    return dict(value=rng.standard_normal((N, int(sizes.sum()), M, D)).astype(dtype), spatial_shapes=shapes,
                level_start_index=np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64),
                sampling_locations=rng.uniform(0.0, 1.0, (N, Lq, M, L, P, 2)).astype(dtype),
                attention_weights=rng.uniform(0.0, 1.0, (N, Lq, M, L, P)).astype(dtype),
                grad_output=rng.standard_normal((N, Lq, M * D)).astype(dtype))


def _check(backend, p):
    testing.assert_forward_matches(backend.forward, p)
    testing.assert_backward_matches(backend.backward, p)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cell_boundaries(backend, dtype):
    """Points exactly on integer pixel coordinates (x or y = -1, 0, ..., W-1, W), where the
    location gradient jumps: every backend must pick the oracle's cell."""
    rng = np.random.default_rng(7)
    sides = [(4, 8), (2, 4)]  # powers of two: (k + 0.5) / W is exact in float32
    p = _problem(rng, dtype, 2, 5, 2, 5, 3, sides)
    loc = p["sampling_locations"].astype(np.float64)
    for l, (H, W) in enumerate(sides):
        for axis, size in ((0, W), (1, H)):
            k = rng.integers(-1, size + 1, size=loc[:, :, :, l, :, axis].shape)
            loc[:, :, :, l, :, axis] = np.where(rng.random(k.shape) < 0.7, (k + 0.5) / size,
                                                loc[:, :, :, l, :, axis])
    p["sampling_locations"] = loc.astype(dtype)
    _check(backend, p)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_points_exactly_at_x_equal_W_or_y_equal_H_touch_nothing(backend, dtype, axis):
    """x = W (or y = H) exactly: the cell [W, W+1) holds no texel (a check x <= W would
    read the next row's first texel)."""
    rng = np.random.default_rng(2)
    sides = [(4, 8), (2, 4)]
    p = _problem(rng, dtype, 2, 6, 2, 5, 3, sides)
    loc = p["sampling_locations"].astype(np.float64)
    for l, (H, W) in enumerate(sides):
        size = (W, H)[axis]
        edge = rng.random(loc[:, :, :, l, :, axis].shape) < 0.5
        loc[:, :, :, l, :, axis] = np.where(edge, (size + 0.5) / size, loc[:, :, :, l, :, axis])
    p["sampling_locations"] = loc.astype(dtype)
    _check(backend, p)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outside_points_ignore_nonfinite_weights_and_grad_output(backend, dtype):
    """A point outside the map contributes a constant 0: exactly zero gradients even with
    a NaN weight or in a row whose grad_output is NaN; NaN/inf locations poison their row."""
    rng = np.random.default_rng(12)
    p = _problem(rng, dtype, 1, 4, 2, 5, 2, [(3, 4), (2, 2)])
    loc, attn, g = p["sampling_locations"], p["attention_weights"], p["grad_output"]
    loc[0, 0, 0, 0, 0] = (5.0, 0.5)
    attn[0, 0, 0, 0, 0] = np.nan      # outside: ignored
    loc[0, 1, 1, 1, 1] = (-3.0, 0.5)  # outside, in row (0, 1, 1) whose grad_output is NaN
    g[0, 1, 5:] = np.nan
    loc[0, 2, 0, 1, 0, 1] = np.nan    # poisons row (0, 2, 0)
    loc[0, 3, 1, 0, 1, 0] = 1e30      # far, finite: nothing
    _check(backend, p)


def test_hand_cases_x_minus_one_far_and_infinite_points(backend):
    """Exact values worked out by hand. x = loc_x * W - 0.5 = -1: zero output, but the
    cell [-1, 0) holds texel 0, so the (one-sided) location gradient is W * V[0] = 6.
    Points at +-1e30, x = 2 W or x = -1.5 add nothing and have zero gradients; +-inf
    locations poison their row and their own gradients only."""
    value = np.array([3.0, 5.0]).reshape(1, 2, 1, 1)  # one 1x2 level, M = D = 1
    shapes = np.array([[1, 2]])
    loc = np.concatenate([np.array([[-0.25, 0.5], [1e30, 0.5], [0.5, -1e30], [2.0, 0.5], [-0.5, 0.5]]),
                          np.array([[np.inf, 0.5], [0.5, -np.inf]])]).reshape(1, 7, 1, 1, 1, 2)
    attn = np.ones((1, 7, 1, 1, 1))
    g = np.ones((1, 7, 1))
    out = backend.forward(value, shapes, None, loc, attn)
    gv, gl, ga = backend.backward(g, value, shapes, None, loc, attn)
    np.testing.assert_array_equal(out[0, :5, 0], 0.0)
    assert np.isnan(out[0, 5:, 0]).all()
    assert gl[0, 0, 0, 0, 0, 0] == 2 * 3.0 and gl[0, 0, 0, 0, 0, 1] == 0.0 and ga[0, 0, 0, 0, 0] == 0.0
    np.testing.assert_array_equal(gl[0, 1:5], 0.0)
    np.testing.assert_array_equal(ga[0, 1:5], 0.0)
    assert np.isnan(gl[0, 5:]).all() and np.isnan(ga[0, 5:]).all()
    # Only the x = -1 point reaches value, through texel 0 with weight 0 (x0 = -1 is
    # outside, x0 + 1 = 0 has weight lx = 0): grad_value stays exactly zero.
    np.testing.assert_array_equal(gv, 0.0)


@pytest.mark.parametrize("D,dtype", [(1, np.float64), (8, np.float32)])
def test_queries_of_several_images_in_one_block(backend, D, dtype):
    """Lq not a multiple of a GPU block's query count: one 256-thread block holds queries
    of three images, each of which must read its own image (value offset per image)."""
    rng = np.random.default_rng(5)
    p = _problem(rng, dtype, 3, 5, 1, D, 2, [(2, 3)])
    p["value"] = (p["value"] + np.arange(3)[:, None, None, None] * 10).astype(dtype)
    _check(backend, p)
