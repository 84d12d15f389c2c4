"""The alternative channel layouts benchmarks/tune_gpu.py times (benchmarks/tuning_table.py)
give the float64 reference's numbers on the CPU host harness (formerly tune_gpu --host-check)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from cydeform import _cuda, _validate
from cydeform.bench.problems import make_problem
from cydeform.reference import ms_deform_attn_backward_reference, ms_deform_attn_reference

from cuda_host.host_runtime import HostRuntime, find_compiler

# Load the data file by path: tests may read benchmark data; benchmarks never import tests.
_spec = importlib.util.spec_from_file_location(
    "tuning_table", Path(__file__).resolve().parents[1] / "benchmarks" / "tuning_table.py")
tuning_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tuning_table)

CASES = [(dtype, JG) for dtype, itemsize in ((np.float32, 4), (np.float64, 8))
         for JG, _, _ in tuning_table.LAYOUTS[itemsize]]
TOL = {np.float32: 1e-5, np.float64: 1e-12}

pytestmark = pytest.mark.skipif(find_compiler() is None, reason="no C++ compiler for the host harness")


@pytest.fixture(scope="module")
def rt(tmp_path_factory):
    return HostRuntime(tmp_path_factory.mktemp("cuda_layouts"))


@pytest.mark.parametrize("dtype,JG", CASES, ids=[f"{np.dtype(d).name}-J{j}G{g}" for d, (j, g) in CASES])
def test_tuning_layout_matches_reference(rt, dtype, JG):
    levels = np.array([[6, 7], [3, 4], [2, 2], [1, 1]], dtype=np.int64)
    value, shapes, starts, loc, attn = make_problem(N=2, Lq=5, distribution="uniform", dtype=np.float64, seed=3,
                                                    levels=levels)
    loc = loc * 1.6 - 0.3  # some points outside the levels
    grad = np.random.default_rng(5).standard_normal((2, 5, value.shape[2] * value.shape[3]))
    want_f = ms_deform_attn_reference(value, shapes, starts, loc, attn)
    want_b = ms_deform_attn_backward_reference(grad, value, shapes, starts, loc, attn)
    v, lo, a, g = (x.astype(dtype) for x in (value, loc, attn, grad))
    prob = _validate.check_problem(v, shapes, starts, lo, a, _validate.GPU_DTYPES)
    config = _cuda.LaunchConfig(layout=JG)
    assert (_cuda.channel_layout(prob, True, config=config).J, _cuda.channel_layout(prob, True, config=config).G) == JG
    got_f = _cuda._forward(rt, prob, v, lo, a, config=config)
    got_b = _cuda._backward(rt, prob, g, v, lo, a, config=config)
    assert np.abs(got_f - want_f).max() <= TOL[dtype] * np.abs(want_f).max()
    for name, x, w in zip(("grad_value", "grad_loc", "grad_attn"), got_b, want_b):
        assert np.abs(x - w).max() <= TOL[dtype] * max(np.abs(w).max(), 1e-30), name
