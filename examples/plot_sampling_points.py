"""Where an untrained Deformable DETR encoder layer looks: the paper's rays, drawn.

Builds the MSDeformAttn layer of examples/encoder_layer.py with the paper's
initialisation (no training, no stand-in weights): head m's P points sit on ray m
(angle 2 pi m / M) at 1..P pixels of each level from the reference point, with uniform
attention. The second, padded image of that example's batch is drawn, so the
reference points follow its valid ratios and the coarse levels' points reach far into
the padding and beyond the canvas (offsets are in pixels of the level: 8 canvas pixels
per step on level 0, 64 on level 3).

Usage: python examples/plot_sampling_points.py [OUT.png]   (default docs/sampling_points.png)

Needs matplotlib (pip install 'cydeform[plot]'). Checks: the locations are the rays
exactly, the weights uniform, and each head's colour is in the rendered picture at
its first point of every query on level 0.
"""
import math
import pathlib
import sys

import numpy as np

from cydeform import plot
from cydeform.nn import MSDeformAttn, encoder_reference_points

# The shapes of examples/encoder_layer.py.
N, C, M, L, P = 2, 32, 4, 4, 4
SIZES = np.array([(24, 32), (12, 16), (6, 8), (3, 4)])  # (H_l, W_l), strides 8 .. 64 of a 192x256 canvas
VALID = [(1.0, 1.0), (0.75, 2 / 3)]  # (x, y) fraction of the canvas each image fills
H_IMG, W_IMG = 192, 256
IMAGE = 1  # the padded one
out_path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else \
    pathlib.Path(__file__).resolve().parent.parent / "docs" / "sampling_points.png"

# Valid ratios as Deformable DETR's get_valid_ratio computes them from the padding mask.
valid_ratios = np.empty((N, L, 2))
for lvl, (H, W) in enumerate(SIZES):
    for n, (vx, vy) in enumerate(VALID):
        valid_ratios[n, lvl] = (round(vx * W) / W, round(vy * H) / H)
reference_points = encoder_reference_points(SIZES, valid_ratios)  # (N, S, L, 2)
S = reference_points.shape[1]

layer = MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=P, dtype="float64", seed=0)
query = np.random.default_rng(0).normal(size=(N, S, C))  # irrelevant at initialisation (weight 0)
loc, weights = layer.sampling_points(query, reference_points, SIZES)  # (N, S, M, L, P, 2), (N, S, M, L, P)

# Three level-0 queries of image 1 (the encoder's first H_0 * W_0 queries are level 0's pixels).
rows_cols = [(3, 4), (9, 12), (13, 20)]
queries = [int(r * SIZES[0, 1] + c) for r, c in rows_cols]

# A synthetic "photograph": soft blobs where image 1 is, mid grey where it is padded.
yy, xx = np.mgrid[0:H_IMG, 0:W_IMG] + 0.5
picture = 0.75 + 0.2 * np.cos(xx / 23.0) * np.sin(yy / 17.0)
picture[(yy > VALID[IMAGE][1] * H_IMG) | (xx > VALID[IMAGE][0] * W_IMG)] = 0.45
image = np.repeat(picture[..., None], 3, axis=-1).clip(0, 1)

fig, axes = plot.sampling_points(image, reference_points, loc, weights, SIZES, queries=queries, batch=IMAGE,
                                 fit="points", level_grid=True, panel_width=3.2, dpi=90,
                                 title="Untrained MSDeformAttn (paper initialisation): M=4 heads, P=4 points "
                                       "per level, 3 queries of image 1 (padded region grey)")
out_path.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(out_path)

# ----------------------------------------------------------------------------- checks
theta = 2 * math.pi * np.arange(M) / M
rays = np.stack([np.cos(theta), np.sin(theta)], -1)
rays /= np.abs(rays).max(-1, keepdims=True)
steps = rays[:, None, None, :] * np.arange(1, P + 1)[None, None, :, None] / SIZES[None, :, None, ::-1]
expected = reference_points[:, :, None, :, None, :] + steps[None, None]  # (N, S, M, L, P, 2)
geometry_err = np.abs(loc - expected).max()
weight_err = np.abs(weights - 1.0 / (L * P)).max()

fig.canvas.draw()
pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
missing = []
for m, colour in enumerate(plot.head_colours(M)):
    target = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    for q in queries:
        x, y = loc[IMAGE, q, m, 0, 0] * (W_IMG, H_IMG)
        dx, dy = axes[0].transData.transform((x, y))
        r, c = int(round(fig.bbox.height - dy)), int(round(dx))
        if not (np.abs(pixels[r - 1:r + 2, c - 1:c + 2] - target).max(-1) <= 3).any():
            missing.append((m, q))
size_kb = out_path.stat().st_size / 1024

print(f"untrained MSDeformAttn: M = {M}, L = {L}, P = {P}; queries {queries} of image {IMAGE} "
      f"(valid ratios (x, y) {np.round(valid_ratios[IMAGE, 0], 3).tolist()})")
print(f"  locations vs the paper's rays: max error {geometry_err:.1e}; weights vs 1/(L P): max error {weight_err:.1e}")
print(f"  wrote {out_path} ({size_kb:.0f} KB); head colours missing at level-0 points: {missing or 'none'}")
if not (geometry_err < 1e-12 and weight_err < 1e-12 and not missing):
    sys.exit("FAILED: ray geometry, uniform weights or the rendered picture")
print("OK")
