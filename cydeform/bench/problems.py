"""The benchmark problems of msda.md section 4, shared by the CPU and GPU benchmarks.

Calls:
- encoder: N=1, Lq = S = 22223, levels 100x167, 50x84, 25x42, 13x21, M=8, D=32, L=4, P=4
- decoder: the same with Lq = 300
Location distributions:
- uniform: uniform in [0, 1] (no locality)
- local: pixel centres of the reference pixel plus offsets of a few pixels (what a
  trained encoder does)
"""
from __future__ import annotations

import numpy as np

LEVELS = np.array([[100, 167], [50, 84], [25, 42], [13, 21]], dtype=np.int64)
M, D, P = 8, 32, 4


def make_problem(N=1, Lq=None, distribution="uniform", dtype=np.float32, seed=0, levels=LEVELS):
    """Random inputs of the benchmark call.

    Returns (value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,),
    sampling_locations (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P)).
    ``Lq=None`` means one query per pixel (the encoder call).
    """
    rng = np.random.default_rng(seed)
    H, W = levels[:, 0], levels[:, 1]
    S = int((H * W).sum())
    L = len(levels)
    Lq = S if Lq is None else Lq
    value = rng.standard_normal((N, S, M, D), dtype=np.float32).astype(dtype)
    if distribution == "uniform":
        loc = rng.random((N, Lq, M, L, P, 2), dtype=np.float32)
    elif distribution == "local":
        # Reference pixel: query q's own pixel centre (encoder) or a random point;
        # offsets of a few pixels on each level, like trained sampling_offsets.
        ref = _pixel_centres(levels)[np.arange(Lq) % S] if Lq == S else rng.random((Lq, 2), dtype=np.float32)
        px = rng.normal(0.0, 2.0, (N, Lq, M, L, P, 2)).astype(np.float32)
        loc = ref[None, :, None, None, None, :] + px / np.stack([W, H], axis=1)[None, None, None, :, None, :]
    else:
        raise ValueError(f"distribution must be 'uniform' or 'local'; got {distribution!r}")
    logits = rng.standard_normal((N, Lq, M, L * P), dtype=np.float32)
    attn = np.exp(logits)
    attn /= attn.sum(-1, keepdims=True)
    attn = attn.reshape(N, Lq, M, L, P)
    starts = np.concatenate(([0], np.cumsum(H * W)[:-1])).astype(np.int64)
    return value, levels.copy(), starts, loc.astype(dtype), attn.astype(dtype)


def _pixel_centres(levels):
    """(S, 2) normalised (x, y) pixel centres of all levels, in the flattened order."""
    pts = []
    for h, w in levels:
        ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        pts.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
    return np.concatenate(pts).astype(np.float32)
