"""Conformance kit: test any MSDA implementation against cydeform's float64 oracle.

Needs hypothesis (``pip install hypothesis``); ``import cydeform`` never imports this
module. An implementation is two callables on NumPy arrays (wrap a device library so
that it takes and returns NumPy; CuPy and JAX results are converted with
``np.asarray``/``.get()``)::

    forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        -> output (N, Lq, M*D)
    backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights) -> (grad_value, grad_sampling_locations, grad_attention_weights)

with value (N, S, M, D), spatial_shapes (L, 2) as (H, W), level_start_index (L,),
sampling_locations (N, Lq, M, L, P, 2) in [0, 1] as (x, y), attention_weights
(N, Lq, M, L, P). The convention is grid_sample(2*loc - 1, bilinear, zeros,
align_corners=False) per level: see :mod:`cydeform.reference`.

- :func:`problems`: hypothesis strategy of problem dicts (the five inputs plus grad_output).
- :func:`assert_forward_matches`, :func:`assert_backward_matches`: one problem against
  the oracle; the error names the worst element.
- :func:`check_implementation`: the whole property set, a verdict per property.
"""
from __future__ import annotations

import math

import numpy as np

try:
    from hypothesis import HealthCheck, given, settings, strategies as st
except ImportError as exc:  # pragma: no cover - exercised in a venv without hypothesis
    raise ImportError("cydeform.testing needs hypothesis: pip install hypothesis "
                      "(or pip install 'cydeform[testing]')") from exc

from .reference import ms_deform_attn_backward_reference, ms_deform_attn_reference

__all__ = ["problems", "assert_forward_matches", "assert_backward_matches", "check_implementation",
           "ConformanceError", "LOCATIONS"]

# Where sampling points are drawn, in normalised coordinates (pixel x = loc_x * W - 0.5).
LOCATIONS = ("inside", "spread", "border", "outside", "edges", "nonfinite")
D_VALUES = (1, 2, 3, 5, 8, 9, 16, 17)  # 1, odd sizes, vector bodies and their tails


class ConformanceError(AssertionError):
    """An implementation disagrees with the oracle or breaks a property."""


def _level_starts(shapes):
    sizes = shapes[:, 0] * shapes[:, 1]
    return np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)


def _wh(shapes):
    return shapes[:, ::-1].astype(np.float64)[None, None, None, :, None, :]  # (W, H) per level


def _push_off_kinks(loc, shapes, margin):
    """Move points at least ``margin`` px off integer pixel coordinates (gradient kinks)."""
    px = loc * _wh(shapes) - 0.5
    frac = np.clip(px - np.floor(px), margin, 1.0 - margin)
    return (np.floor(px) + frac + 0.5) / _wh(shapes)


def _locations(rng, kind, shape, shapes):
    if kind == "inside":
        return rng.uniform(0.0, 1.0, shape)
    if kind == "spread":
        return rng.uniform(-0.5, 1.5, shape)
    if kind == "border":  # within one pixel of the map's edge, on either side
        px = rng.uniform(-1.5, 1.5, shape)
        far_side = rng.random(shape) < 0.5
        size = np.broadcast_to(_wh(shapes), shape)
        px = np.where(far_side, size - 1.0 + px, px)
        return (px + 0.5) / size
    if kind == "outside":  # finite, beyond the map on one axis at least: touches no texel
        size = np.broadcast_to(_wh(shapes), shape)
        px = rng.uniform(-0.5, 1.0, shape) * size
        out_axis = rng.integers(0, 2, shape[:-1])[..., None] == np.arange(2)
        far = np.where(rng.random(shape) < 0.5, -1.0 - rng.uniform(1e-3, 20.0, shape),
                       size + rng.uniform(0.0, 20.0, shape))
        return (np.where(out_axis, far, px) + 0.5) / size
    if kind == "edges":  # texel centres and cell edges: integer pixel coordinates, -1 and W/H included
        size = np.broadcast_to(_wh(shapes), shape)
        px = np.floor(rng.uniform(-1.0, 1.0, shape) + rng.uniform(-1.0, 1.0, shape) * size).clip(-2, None)
        px = np.minimum(px, size + 1.0)
        half = rng.random(shape) < 0.25  # some half-texel points between centres
        return (px + np.where(half, 0.5, 0.0) + 0.5) / size
    if kind == "nonfinite":
        loc = rng.uniform(-0.5, 1.5, shape)
        flat = loc.reshape(-1)
        picks = rng.choice(flat.size, size=max(1, flat.size // 6), replace=False)
        flat[picks] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30], size=picks.size)
        return loc
    raise ValueError(f"location must be one of {LOCATIONS}; got {kind!r}")


@st.composite
def problems(draw, dtype=np.float64, *, locations=("inside", "spread", "border", "edges"),
             kink_margin=None, batch=(1, 2), queries=(1, 5), heads=(1, 3), channels=D_VALUES,
             levels=(1, 3), points=(1, 3), side=(1, 6)):
    """Strategy of MSDA problems: dicts with value, spatial_shapes, level_start_index,
    sampling_locations, attention_weights and grad_output (N, Lq, M*D).

    ``dtype``: of the float arrays (int64 for shapes/starts). ``locations``: a name or
    names from :data:`LOCATIONS`, one drawn per problem. ``kink_margin``: keep every
    point this many pixels off integer pixel coordinates (for finite differences;
    ignored for 'edges'). Ranges are inclusive (low, high) pairs; ``channels`` is a
    list of D values. Sizes shrink under hypothesis; contents come from a seeded
    generator, so every failure is reproducible.
    """
    N = draw(st.integers(*batch))
    Lq = draw(st.integers(*queries))
    M = draw(st.integers(*heads))
    D = draw(st.sampled_from(list(channels)))
    L = draw(st.integers(*levels))
    P = draw(st.integers(*points))
    shapes = np.array([[draw(st.integers(*side)), draw(st.integers(*side))] for _ in range(L)], np.int64)
    kinds = (locations,) if isinstance(locations, str) else tuple(locations)
    kind = draw(st.sampled_from(kinds))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    loc = _locations(rng, kind, (N, Lq, M, L, P, 2), shapes)
    if kink_margin is not None and kind != "edges":
        finite = np.isfinite(loc)
        loc = np.where(finite, _push_off_kinks(np.where(finite, loc, 0.5), shapes, kink_margin), loc)
    attn = rng.uniform(0.0, 1.0, (N, Lq, M, L, P))
    attn /= attn.sum(axis=(3, 4), keepdims=True)
    return dict(value=rng.standard_normal((N, S, M, D)).astype(dtype), spatial_shapes=shapes,
                level_start_index=_level_starts(shapes), sampling_locations=loc.astype(dtype),
                attention_weights=attn.astype(dtype),
                grad_output=rng.standard_normal((N, Lq, M * D)).astype(dtype))


def _inputs(problem):
    return (problem["value"], problem["spatial_shapes"], problem["level_start_index"],
            problem["sampling_locations"], problem["attention_weights"])


def _to_numpy(x):
    return np.asarray(x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else x)


# Worst-case relative error allowed against the oracle, in units of the dtype's eps
# over the oracle's scale (max |expected|, at least 1): rounding of a sum of a few
# dozen terms. float16/bfloat16 inputs with float32 accumulation lose only the final
# rounding plus the inputs' own rounding (the oracle sees the rounded inputs).
_EPS_FACTOR = 64


def _tolerance(dtype, k):
    name = np.dtype(dtype).name
    if name == "float64":
        return 1e-10
    if name == "float32":
        return k * _EPS_FACTOR * float(np.finfo(np.float32).eps)
    if name == "float16":
        return k * 2.0 ** -10
    if name == "bfloat16":
        return k * 2.0 ** -7
    raise ValueError(f"no tolerance for dtype {name}")


def _describe(name, index, problem):
    """What element ``index`` of the named array means: batch, query, head, level, point."""
    shapes = problem["spatial_shapes"]
    M, D = problem["value"].shape[2], problem["value"].shape[3]
    if name == "output":
        n, q, c = index
        return f"n={n}, query={q}, head={c // D}, channel={c % D}"
    if name == "grad_value":
        n, s, m, d = index
        starts = _level_starts(shapes)
        l = int(np.searchsorted(starts, s, side="right") - 1)
        y, x = divmod(int(s - starts[l]), int(shapes[l, 1]))
        return f"n={n}, level={l}, pixel (y={y}, x={x}), head={m}, channel={d}"
    n, q, m, l, p = index[:5]
    loc = np.asarray(problem["sampling_locations"], np.float64)[n, q, m, l, p]
    H, W = shapes[l]
    px = (loc[0] * W - 0.5, loc[1] * H - 0.5)
    axis = f", axis={'xy'[index[5]]}" if len(index) == 6 else ""
    return (f"n={n}, query={q}, head={m}, level={l} (H={H}, W={W}), point={p}{axis}, "
            f"location={tuple(loc.tolist())} (pixel x={px[0]:.6g}, y={px[1]:.6g})")


def _compare(name, got, expected, dtype, k, problem):
    got = _to_numpy(got)
    if got.shape != expected.shape:
        raise ConformanceError(f"{name}: shape {got.shape}, expected {expected.shape}")
    if got.dtype != np.dtype(dtype):
        raise ConformanceError(f"{name}: dtype {got.dtype}, expected {np.dtype(dtype)} (the inputs' dtype)")
    got = got.astype(np.float64)
    nan_got, nan_exp = np.isnan(got), np.isnan(expected)
    if not np.array_equal(nan_got, nan_exp):
        i = tuple(int(v) for v in np.argwhere(nan_got != nan_exp)[0])
        raise ConformanceError(f"{name}: NaN where the oracle has {float(expected[i])!r} or vice versa, at {i} "
                               f"({_describe(name, i, problem)}): got {float(got[i])!r}")
    fin = ~nan_exp
    scale = max(1.0, float(np.abs(np.where(np.isfinite(expected), expected, 0.0)).max(initial=0.0)))
    with np.errstate(invalid="ignore"):
        err = np.where(fin, np.abs(got - np.where(fin, expected, 0.0)), 0.0)
        err = np.where(fin & (got == expected), 0.0, err)  # equal infinities
    tol = _tolerance(dtype, k) * scale
    if np.isnan(err).any() or err.max(initial=0.0) > tol:
        err = np.where(np.isnan(err), np.inf, err)
        i = np.unravel_index(int(np.argmax(err)), err.shape)
        i = tuple(int(v) for v in i)
        raise ConformanceError(
            f"{name}: worst element {i} ({_describe(name, i, problem)}): expected {float(expected[i])!r}, "
            f"got {float(got[i])!r}, error {err[i]:.3g} > tolerance {tol:.3g} ({np.dtype(dtype).name}, "
            f"{int((err > tol).sum())} of {err.size} elements off)")


def assert_forward_matches(forward, problem, *, k=2.0):
    """Raise :class:`ConformanceError` unless ``forward(*inputs)`` matches the float64
    oracle on ``problem`` (same NaN positions, output dtype = input dtype, and
    max error <= tolerance(dtype) * max(1, max |expected|)); ``k`` scales the
    low-precision tolerances, like flash-attention's "k times the error of a
    same-precision reference"."""
    dtype = problem["value"].dtype
    expected = ms_deform_attn_reference(*_inputs(problem))
    _compare("output", forward(*_inputs(problem)), expected, dtype, k, problem)


def assert_backward_matches(backward, problem, *, k=2.0):
    """As :func:`assert_forward_matches`, for ``backward(grad_output, *inputs)`` and its
    three gradients."""
    dtype = problem["value"].dtype
    expected = ms_deform_attn_backward_reference(problem["grad_output"], *_inputs(problem))
    got = backward(problem["grad_output"], *_inputs(problem))
    if len(got) != 3:
        raise ConformanceError(f"backward must return 3 gradients; got {len(got)}")
    for name, g, e in zip(("grad_value", "grad_sampling_locations", "grad_attention_weights"), got, expected):
        _compare(name, g, e, dtype, k, problem)


# --- the property set -------------------------------------------------------------

def _prop_forward_oracle(forward, backward, dtype):
    @given(problems(dtype, locations=LOCATIONS[:-1]))
    def prop(p):
        assert_forward_matches(forward, p)
    return prop


def _prop_backward_oracle(forward, backward, dtype):
    @given(problems(dtype, locations=LOCATIONS[:-1]))
    def prop(p):
        assert_backward_matches(backward, p)
    return prop


def _prop_nonfinite(forward, backward, dtype):
    @given(problems(dtype, locations="nonfinite"))
    def prop(p):
        assert_forward_matches(forward, p)
        if backward is not None:
            assert_backward_matches(backward, p)
    return prop


def _prop_finite_differences(forward, backward, dtype):
    """float64: <backward, direction> equals the central difference of the forward."""
    @given(problems(np.float64, locations=("inside", "spread", "border"), kink_margin=0.05),
           st.integers(0, 2**32 - 1))
    def prop(p, seed):
        rng = np.random.default_rng(seed)
        value, shapes, starts, loc, attn = _inputs(p)
        g = p["grad_output"]
        gv, gl, ga = (_to_numpy(x).astype(np.float64) for x in backward(g, *_inputs(p)))
        dv, dl, da = (rng.standard_normal(x.shape) for x in (value, loc, attn))
        h = 1e-4 / max(1, int(shapes.max()))  # well within the kink margin (0.05 px); O(h^2) error
        f = lambda t: float((_to_numpy(forward(value + t * dv, shapes, starts, loc + t * dl, attn + t * da))
                             * g).sum())
        numeric = (f(h) - f(-h)) / (2 * h)
        analytic = float((gv * dv).sum() + (gl * dl).sum() + (ga * da).sum())
        if not math.isclose(numeric, analytic, rel_tol=1e-5, abs_tol=1e-6):
            raise ConformanceError(f"directional derivative: backward gives {analytic!r}, central difference "
                                   f"of the forward {numeric!r} (shapes {shapes.tolist()})")
    return prop


def _prop_linearity(forward, backward, dtype):
    @given(problems(dtype, locations=("inside", "spread")), st.floats(-3, 3), st.floats(-3, 3))
    def prop(p, a, b):
        value, shapes, starts, loc, attn = _inputs(p)
        rng = np.random.default_rng(0)
        v2 = rng.standard_normal(value.shape).astype(dtype)
        w2 = rng.uniform(0, 1, attn.shape).astype(dtype)
        F = lambda v, w: _to_numpy(forward(v, shapes, starts, loc, w)).astype(np.float64)
        tol = _tolerance(dtype, 4.0) * 10
        lin_v = F((a * value.astype(np.float64) + b * v2).astype(dtype), attn)
        comb = a * F(value, attn) + b * F(v2, attn)
        np.testing.assert_allclose(lin_v, comb, rtol=tol, atol=tol * (1 + abs(a) + abs(b)),
                                   err_msg="output is not linear in value")
        lin_w = F(value, (a * attn.astype(np.float64) + b * w2).astype(dtype))
        comb = a * F(value, attn) + b * F(value, w2)
        np.testing.assert_allclose(lin_w, comb, rtol=tol, atol=tol * (1 + abs(a) + abs(b)),
                                   err_msg="output is not linear in attention_weights")
    return prop


def _prop_outside(forward, backward, dtype):
    """Finite points beyond the map add nothing and have exactly zero gradients, even
    with NaN attention weights."""
    @given(problems(dtype, locations="outside"))
    def prop(p):
        value, shapes, starts, loc, attn = _inputs(p)
        attn = attn.copy()
        attn.reshape(-1)[::3] = np.nan
        out = _to_numpy(forward(value, shapes, starts, loc, attn))
        if not (out == 0).all():
            bad = tuple(int(v) for v in np.argwhere(out != 0)[0])
            raise ConformanceError(f"points outside every map (some with NaN weights): output should be exactly 0; "
                                   f"got {float(out[bad])!r} at {bad} ({_describe('output', bad, p)})")
        if backward is not None:
            for name, x in zip(("grad_value", "grad_sampling_locations", "grad_attention_weights"),
                               backward(p["grad_output"], value, shapes, starts, loc, attn)):
                if not (_to_numpy(x) == 0).all():
                    raise ConformanceError(f"points outside every map: {name} should be exactly 0")
    return prop


def _prop_query_permutation(forward, backward, dtype):
    @given(problems(dtype, queries=(2, 6)), st.randoms(use_true_random=False))
    def prop(p, r):
        value, shapes, starts, loc, attn = _inputs(p)
        perm = list(range(loc.shape[1]))
        r.shuffle(perm)
        out = _to_numpy(forward(*_inputs(p)))
        permuted = _to_numpy(forward(value, shapes, starts, loc[:, perm], attn[:, perm]))
        if not np.array_equal(out[:, perm], permuted, equal_nan=True):
            raise ConformanceError(f"permuting the queries by {perm} does not permute the output rows")
    return prop


def _prop_batch_independence(forward, backward, dtype):
    @given(problems(dtype, batch=(2, 3)))
    def prop(p):
        value, shapes, starts, loc, attn = _inputs(p)
        whole = _to_numpy(forward(*_inputs(p)))
        for n in range(value.shape[0]):
            alone = _to_numpy(forward(value[n:n + 1], shapes, starts, loc[n:n + 1], attn[n:n + 1]))
            if not np.allclose(whole[n:n + 1], alone, rtol=_tolerance(dtype, 2.0), atol=_tolerance(dtype, 2.0),
                               equal_nan=True):
                raise ConformanceError(f"batch item {n} computed alone differs from the same item in a batch "
                                       f"of {value.shape[0]}")
    return prop


# (name, builder, needs backward, float64 only)
PROPERTIES = (
    ("forward matches oracle", _prop_forward_oracle, False, False),
    ("backward matches oracle", _prop_backward_oracle, True, False),
    ("non-finite locations", _prop_nonfinite, False, False),
    ("finite differences (float64)", _prop_finite_differences, True, True),
    ("linear in value and weights", _prop_linearity, False, False),
    ("out-of-map points: zero output and gradients", _prop_outside, False, False),
    ("query permutation", _prop_query_permutation, False, False),
    ("batch independence", _prop_batch_independence, False, False),
)


def check_implementation(forward, backward=None, *, dtypes=(np.float32, np.float64), max_examples=50,
                         verbose=True, derandomize=True):
    """Run every property on ``forward`` (and ``backward`` when given) for each dtype.

    Returns {(property, dtype name): None if it held, else the failure message}; with
    ``verbose``, prints one verdict line per entry. Raises nothing: inspect the result,
    or ``assert all(v is None for v in result.values())``.
    """
    cfg = settings(max_examples=max_examples, deadline=None, database=None, derandomize=derandomize,
                   suppress_health_check=list(HealthCheck), print_blob=False)
    results = {}
    for name, build, needs_backward, f64_only in PROPERTIES:
        for dtype in dtypes:
            dname = np.dtype(dtype).name
            if (needs_backward and backward is None) or (f64_only and dname != "float64"):
                continue
            try:
                with np.errstate(all="ignore"):  # the problems include NaN, inf and far points on purpose
                    cfg(build(forward, backward, dtype))()
                verdict = None
            except Exception as exc:  # report every property, not only the first failure
                verdict = f"{type(exc).__name__}: {exc}".strip()
            results[(name, dname)] = verdict
            if verbose:
                status = "ok" if verdict is None else "FAIL"
                print(f"  {status:4} {name} [{dname}]" + ("" if verdict is None else
                                                          "\n       " + verdict.splitlines()[0][:400]))
    return results
