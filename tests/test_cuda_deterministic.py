"""The deterministic grad_value of the CUDA backend (sort by cell, split long rows into
pieces, gather), run through the host harness (tests/cuda_host) against the Cython
backend and the float64 oracle; and the 64-bit cell arithmetic of its keys.

``LaunchConfig(det_piece=K0)`` with a small K0 makes small problems take the split-row
path (pieces summed into scratch, reduced in piece order) that the encoder's coarse
levels and degenerate inputs take at the default K0.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import cydeform
from cydeform import _cuda, _validate
from cydeform.reference import ms_deform_attn_backward_reference

from cuda_host.host_runtime import HostRuntime, find_compiler

if find_compiler() is None:
    pytest.skip("no C++ compiler to build the host harness", allow_module_level=True)

DTYPES = (np.float32, np.float64)


def _problem(rng, dtype, N, Lq, M, D, P, sides, loc=None):
    shapes = np.array(sides, dtype=np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    L = len(sides)
    if loc is None:
        loc = rng.uniform(-0.3, 1.3, (N, Lq, M, L, P, 2))
    value = rng.standard_normal((N, int(sizes.sum()), M, D)).astype(dtype)
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return value, shapes, starts, np.asarray(loc).astype(dtype), attn


def _prob(args):
    return _validate.check_problem(*args, ("float32", "float64"))


def _meta(dtype, D, sides, N=1, Lq=2, M=1, P=2):
    shapes = np.array(sides, dtype=np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return _validate.Problem(N, int(sizes.sum()), M, D, Lq, len(sides), P, np.dtype(dtype), shapes, starts)


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    build_dir = os.environ.get("CYDEFORM_HOST_BUILD_DIR") or tmp_path_factory.mktemp("cuda_host_det")
    exprs = set()
    for dtype in DTYPES:
        for D in (8, 5):  # vector chunks and scalar chunks
            exprs.update(_cuda.kernel_expressions(_meta(dtype, D, [(2, 3)]), specialize=False))
    exprs.add("msda_cell_keys<float, long long>")
    return HostRuntime(build_dir, prebuild=sorted(exprs))


def _grad_value(rt, args, grad, config):
    prob = _prob(args)
    value, _, _, loc, attn = args
    return _cuda._backward(rt, prob, grad, value, loc, attn, deterministic=True, config=config,
                           specialize=False)[0]


def _pieces(rt, args, det_piece):
    """The number of split rows' pieces the kernels computed (msda_row_pieces' output)."""
    rt.launched.clear()
    captured = {}
    original = rt.launch

    def spy(expr, total, kargs, config=_cuda.DEFAULT_CONFIG):
        original(expr, total, kargs, config)
        if expr == "msda_row_pieces":
            captured["pieces"] = kargs[2].copy()

    rt.launch = spy
    try:
        _grad_value(rt, args, np.ones((args[0].shape[0], args[3].shape[1], args[0].shape[2] * args[0].shape[3]),
                                      args[0].dtype), _cuda.LaunchConfig(det_piece=det_piece))
    finally:
        del rt.launch
    return captured["pieces"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [8, 5])
@pytest.mark.parametrize("det_piece", [1, 3, 128])
def test_split_rows_match_the_cpu_backend_and_the_oracle(rt, dtype, D, det_piece):
    """Many points per texel (tiny levels, 40 queries): with K0 = 1 or 3 most rows are
    split into pieces; K0 = 128 sums every row directly. All agree with the CPU backend
    and the float64 oracle."""
    rng = np.random.default_rng(21)
    args = _problem(rng, dtype, 2, 40, 2, D, 3, [(2, 3), (1, 2)])
    grad = rng.standard_normal((2, 40, 2 * D)).astype(dtype)
    got = _grad_value(rt, args, grad, _cuda.LaunchConfig(det_piece=det_piece))
    cpu = cydeform.ms_deform_attn_backward(grad, *args)[0]
    ref = ms_deform_attn_backward_reference(grad, *args)[0]
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, cpu, rtol=tol, atol=tol * np.abs(cpu).max())
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
    pieces = _pieces(rt, args, det_piece)
    if det_piece < 128:
        assert pieces.max() > 1, "no row was split: the test would not reach the pieces kernel"
    else:
        assert pieces.max() == 0


def test_all_points_in_one_cell(rt):
    """The degenerate input of the serial-gather cliff: every point of every query in one
    bilinear cell. Each of the cell's 4 rows of each head gets 300*2 = 600 points, split
    into ceil(600 / max(K0, ceil(sqrt(600)))) pieces; correct, and bit-identical for any
    grid (schedule)."""
    rng = np.random.default_rng(4)
    N, Lq, M, P = 1, 300, 2, 2
    loc = np.empty((N, Lq, M, 1, P, 2))
    # Pixel coordinates x, y in (0.1, 0.9): cell (y0, x0) = (0, 0) of the 3 x 4 level.
    loc[..., 0] = (rng.uniform(0.1, 0.9, loc.shape[:-1]) + 0.5) / 4
    loc[..., 1] = (rng.uniform(0.1, 0.9, loc.shape[:-1]) + 0.5) / 3
    args = _problem(rng, np.float64, N, Lq, M, 8, P, [(3, 4)], loc=loc)
    grad = rng.standard_normal((N, Lq, M * 8))
    ref = ms_deform_attn_backward_reference(grad, *args)[0]
    nonzero_rows = np.flatnonzero(np.abs(ref).sum(axis=(0, 2, 3)))
    assert nonzero_rows.tolist() == [0, 1, 4, 5]  # the cell's 4 texels, nothing else
    for det_piece in (16, 128):
        pieces = _pieces(rt, args, det_piece)
        K = max(det_piece, int(np.ceil(np.sqrt(Lq * P))))
        expect = np.zeros(args[0].shape[1] * M, dtype=np.int64)
        expect.reshape(-1, M)[nonzero_rows] = -(-Lq * P // K)
        assert np.array_equal(pieces, expect)
        runs = [_grad_value(rt, args, grad, _cuda.LaunchConfig(det_piece=det_piece, max_grid=g)) for g in (1, 3, 1000)]
        for r in runs:
            np.testing.assert_allclose(r, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
            assert r.tobytes() == runs[0].tobytes()


def test_max_pieces_bounds_the_pieces_computed(rt):
    """The host's scratch size (no device-to-host read) covers what the kernels use."""
    rng = np.random.default_rng(8)
    args = _problem(rng, np.float32, 2, 50, 2, 8, 3, [(1, 1), (2, 2)])
    for det_piece in (1, 2, 5):
        assert _pieces(rt, args, det_piece).sum() <= _cuda.max_pieces(_prob(args), det_piece)


def test_cell_keys_use_64_bit_cell_arithmetic(rt):
    """A legal level H = 1, W = 2**31 - 1: (W + 1) overflows int. The keys of points in
    its last cells must equal the exact (Python int) key (n*M + m)*cells + cell."""
    W = 2**31 - 1
    prob = _meta(np.float32, 1, [(1, W)], N=1, Lq=1, M=2, P=3)
    _cuda.check_limits(prob)  # a legal shape for the kernels
    x = np.array([W - 0.7, W - 1.2, 5.3])  # pixel coordinates; cell x0 = floor(x)
    loc = np.empty((1, 1, 2, 1, 3, 2), np.float32)
    loc[..., 0] = ((x + 0.5) / W).astype(np.float32)
    loc[..., 1] = 0.5  # y = 0: cell y0 = 0
    levels = _cuda.level_table(prob)
    cells = 2 * (W + 1)
    n_keys = prob.N * prob.M * cells
    assert _cuda._key_dtype(prob)[0] == np.int64
    keys = np.empty(6, np.int64)
    rt.launch("msda_cell_keys<float, long long>", 6,
              (levels, loc, keys, np.int32(2), np.int32(1), np.int32(1), np.int32(3), np.int64(cells),
               np.int64(n_keys), np.int64(6)))
    px = np.float64(loc[..., 0]).reshape(2, 3) * W - 0.5
    want = [(m * cells) + (0 + 1) * (W + 1) + int(np.floor(px[m, p])) + 1 for m in range(2) for p in range(3)]
    assert keys.tolist() == want
