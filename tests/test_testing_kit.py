"""cydeform.testing, the public conformance kit: it passes cydeform's CPU backend and
the oracle, and it catches planted bugs, each in the property meant to catch it."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings

import cydeform
from cydeform import testing
from cydeform.reference import ms_deform_attn_backward_reference, ms_deform_attn_reference

FAST = dict(max_examples=15, verbose=False)


def failed(results):
    return {name for (name, _), verdict in results.items() if verdict is not None}


def test_cpu_backend_passes_every_property():
    results = testing.check_implementation(cydeform.ms_deform_attn, cydeform.ms_deform_attn_backward,
                                           dtypes=(np.float32, np.float64), max_examples=30, verbose=False)
    assert len(results) == 15  # 8 properties x 2 dtypes, finite differences in float64 only
    assert failed(results) == set(), results


def _shifted_forward(*a):  # align_corners-style half-pixel slip
    value, shapes, starts, loc, attn = a
    return cydeform.ms_deform_attn(value, shapes, starts, loc + 0.5 / shapes[:, ::-1][None, None, None, :, None, :]
                                   .astype(loc.dtype), attn)


def _no_nan_rows(*a):
    return np.nan_to_num(cydeform.ms_deform_attn(*a), nan=0.0)


def _cross_batch(*a):  # item n reads item 0's value: only batch independence can see it
    value, shapes, starts, loc, attn = a
    return cydeform.ms_deform_attn(np.broadcast_to(value[:1], value.shape).copy(), shapes, starts, loc, attn)


def _swapped_location_grad(g, *a):
    gv, gl, ga = cydeform.ms_deform_attn_backward(g, *a)
    return gv, gl[..., ::-1].copy(), ga


def _leaky_outside_backward(g, *a):
    gv, gl, ga = cydeform.ms_deform_attn_backward(g, *a)
    return gv, gl, ga + np.asarray(1e-3, ga.dtype)


@pytest.mark.parametrize("forward,backward,caught_by", [
    (_shifted_forward, None, "forward matches oracle"),
    (_no_nan_rows, None, "non-finite locations"),
    (_cross_batch, None, "batch independence"),
    (cydeform.ms_deform_attn, _swapped_location_grad, "finite differences (float64)"),
    (cydeform.ms_deform_attn, _leaky_outside_backward, "out-of-map points: zero output and gradients"),
])
def test_planted_bugs_are_caught(forward, backward, caught_by):
    results = testing.check_implementation(forward, backward, dtypes=(np.float64,), **FAST)
    assert caught_by in failed(results), results


def test_the_example_align_corners_slip_is_caught():
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent / "examples"))
    try:
        import test_your_implementation as example
    finally:
        sys.path.pop(0)
    assert "forward matches oracle" in failed(testing.check_implementation(example.my_forward,
                                                                           dtypes=(np.float64,), **FAST))


@settings(max_examples=10)
@given(testing.problems(np.float64))
def test_the_message_names_the_worst_element(problem):
    def off_by_one_element(*a):
        out = ms_deform_attn_reference(*a)
        out[-1, -1, -1] += 1.0
        return out
    N, Lq, C = ms_deform_attn_reference(*testing._inputs(problem)).shape
    with pytest.raises(testing.ConformanceError, match=rf"worst element \({N - 1}, {Lq - 1}, {C - 1}\)"):
        testing.assert_forward_matches(off_by_one_element, problem)


@settings(max_examples=10)
@given(testing.problems(np.float64, locations="spread"))
def test_backward_message_names_level_point_and_location(problem):
    def off(g, *a):
        gv, gl, ga = ms_deform_attn_backward_reference(g, *a)
        ga[0, 0, 0, -1, -1] += 1.0
        return gv, gl, ga
    L, P = problem["attention_weights"].shape[3:]
    with pytest.raises(testing.ConformanceError, match=rf"level={L - 1} .*point={P - 1}, location="):
        testing.assert_backward_matches(off, problem)


def test_wrong_output_dtype_is_reported():
    problem = dict(zip(("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights"),
                       (np.zeros((1, 4, 1, 2), np.float32), np.array([[2, 2]]), np.array([0]),
                        np.full((1, 1, 1, 1, 1, 2), 0.5, np.float32), np.ones((1, 1, 1, 1, 1), np.float32))))
    with pytest.raises(testing.ConformanceError, match="dtype float64, expected float32"):
        testing.assert_forward_matches(lambda *a: ms_deform_attn_reference(*a), problem)


@pytest.mark.parametrize("kind", testing.LOCATIONS)
@settings(max_examples=20)
@given(data=__import__("hypothesis").strategies.data())
def test_location_distributions_land_where_they_say(kind, data):
    p = data.draw(testing.problems(np.float64, locations=kind))
    wh = p["spatial_shapes"][:, ::-1][None, None, None, :, None, :]
    px = p["sampling_locations"] * wh - 0.5
    if kind == "inside":
        assert ((px >= -0.5) & (px <= wh - 0.5)).all()
    elif kind == "outside":  # beyond (-1, W) on at least one axis: touches no texel
        assert ((px < -1) | (px >= wh)).any(axis=-1).all()
    elif kind == "edges":
        assert np.allclose(2 * px, np.round(2 * px))  # integer or half-integer pixel coordinates
    elif kind == "nonfinite":
        assert (~np.isfinite(px)).any() or (np.abs(px) > 1e20).any()


def test_import_cydeform_does_not_import_the_kit_or_hypothesis():
    code = "import sys, cydeform; print('cydeform.testing' in sys.modules, 'hypothesis' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_missing_hypothesis_gives_an_install_hint():
    code = "import sys; sys.modules['hypothesis'] = None; import cydeform.testing"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0 and "pip install hypothesis" in result.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
def test_two_threads_really_run():
    """With 2 threads asked for, the OpenMP team exists (a new OS thread appears); with 1, none does."""
    code = r"""
import os, numpy as np, cydeform
from cydeform import _cpu
from cydeform.testing import problems
_cpu.set_min_parallel_work(0)
rng = np.random.default_rng(0)
shapes = np.array([[8, 8]]); v = rng.standard_normal((2, 64, 2, 8)); loc = rng.uniform(0, 1, (2, 64, 2, 1, 2, 2))
w = rng.uniform(0, 1, (2, 64, 2, 1, 2))
counts = []
for n in (1, 2):
    cydeform.set_num_threads(n)
    cydeform.ms_deform_attn(v, shapes, None, loc, w)
    counts.append(len(os.listdir('/proc/self/task')))
print(*counts)
"""
    one, two = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       check=True).stdout.split())
    assert two > one, (one, two)
