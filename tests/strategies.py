"""Hypothesis strategies for MSDA problems, shared by the test modules.

A problem is a dict with value (N, S, M, D), spatial_shapes (L, 2), level_start_index
(L,), sampling_locations (N, Lq, M, L, P, 2) and attention_weights (N, Lq, M, L, P).
Sizes are drawn by hypothesis (so they shrink); array contents come from a NumPy
generator seeded by a drawn integer (fast, and still reproducible).
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

# D values reach the inner loops' vector body (multiples of 8) and their tails.
D_VALUES = [1, 2, 3, 5, 8, 9, 16, 17]


def level_starts(shapes):
    sizes = shapes[:, 0] * shapes[:, 1]
    return np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)


def pixel_coordinates(loc, shapes):
    """Continuous pixel coordinates x = loc_x W - 0.5, y = loc_y H - 0.5 of every point,
    in float64: (N, Lq, M, L, P, 2)."""
    wh = shapes[:, ::-1].astype(np.float64)  # (L, 2) as (W, H)
    return np.asarray(loc, np.float64) * wh[None, None, None, :, None, :] - 0.5


def push_off_kinks(loc, shapes, margin):
    """Move every point at least ``margin`` px away from integer pixel coordinates,
    where the location gradient jumps (finite differences need smooth neighbourhoods)."""
    wh = shapes[:, ::-1].astype(np.float64)[None, None, None, :, None, :]
    px = np.asarray(loc, np.float64) * wh - 0.5
    frac = px - np.floor(px)
    frac = np.clip(frac, margin, 1.0 - margin)
    return (np.floor(px) + frac + 0.5) / wh


@st.composite
def problems(draw, dtype=np.float64, max_side=6, loc_low=-0.5, loc_high=1.5, nonfinite=False,
             kink_margin=None, max_batch=2, min_queries=1, max_queries=5):
    """Random valid MSDA inputs, including L=1, P=1, D=1, odd D, 1x1 levels and H != W."""
    N = draw(st.integers(1, max_batch))
    M = draw(st.integers(1, 3))
    D = draw(st.sampled_from(D_VALUES))
    Lq = draw(st.integers(min_queries, max_queries))
    L = draw(st.integers(1, 3))
    P = draw(st.integers(1, 3))
    shapes = np.array([[draw(st.integers(1, max_side)), draw(st.integers(1, max_side))] for _ in range(L)],
                      dtype=np.int64)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = rng.standard_normal((N, S, M, D))
    loc = rng.uniform(loc_low, loc_high, (N, Lq, M, L, P, 2))
    if kink_margin is not None:
        loc = push_off_kinks(loc, shapes, kink_margin)
    attn = rng.uniform(0.0, 1.0, (N, Lq, M, L, P))
    attn /= attn.sum(axis=(3, 4), keepdims=True)
    if nonfinite:
        # Sprinkle NaN, +-inf and huge finite coordinates over a few points.
        specials = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 3e38])
        flat = loc.reshape(-1)
        count = draw(st.integers(1, max(1, flat.size // 4)))
        picks = rng.choice(flat.size, size=count, replace=False)
        flat[picks] = rng.choice(specials, size=count)
    return dict(
        value=value.astype(dtype),
        spatial_shapes=shapes,
        level_start_index=level_starts(shapes),
        sampling_locations=loc.astype(dtype),
        attention_weights=attn.astype(dtype),
    )


def args(problem):
    """The forward's positional arguments, in order."""
    return (problem["value"], problem["spatial_shapes"], problem["level_start_index"],
            problem["sampling_locations"], problem["attention_weights"])


def grad_output_for(problem, seed=0):
    N, _, M, D = problem["value"].shape
    Lq = problem["sampling_locations"].shape[1]
    rng = np.random.default_rng(seed)
    return rng.standard_normal((N, Lq, M * D)).astype(problem["value"].dtype)
