"""Cost model of the deterministic grad_value, measured on the host (no GPU).

    python benchmarks/det_cost_model.py [--det-piece 128]

For the benchmark calls (encoder N=1, uniform and local locations) and a degenerate
input (every point in one bilinear cell), computes from the actual inputs, in NumPy,
with the kernels' own rules (cell of a point, the four cells of a value row, pieces of
max(K0, ceil(sqrt(W))) points): the longest serial walk of one thread before the split
(the old gather walked all W points of a row) and after (max over threads of the points
of a piece or the pieces of a row), the number of pieces and the scratch bytes
(_cuda.max_pieces), and the sort's size. The GPU time is what a lent GPU measures.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cydeform import _cuda, _validate  # noqa: E402
from cydeform.bench.problems import make_problem  # noqa: E402


def row_work(prob, loc):
    """W: the number of points contributing to each value row (N*S*M,), as the kernels count."""
    N, S, M, L, P = prob.N, prob.S, prob.M, prob.L, prob.P
    work = np.zeros(N * S * M, dtype=np.int64)
    n = np.arange(N)[:, None, None, None]
    m = np.arange(M)[None, None, :, None]
    for l, (H, W) in enumerate(prob.spatial_shapes):
        x = loc[:, :, :, l, :, 0].astype(np.float64) * W - 0.5
        y = loc[:, :, :, l, :, 1].astype(np.float64) * H - 0.5
        inside = np.isfinite(x) & np.isfinite(y) & (x >= -1) & (x < W) & (y >= -1) & (y < H)
        x0 = np.floor(np.where(inside, x, 0)).astype(np.int64)
        y0 = np.floor(np.where(inside, y, 0)).astype(np.int64)
        start = int(prob.level_start_index[l])
        for dy in (0, 1):
            for dx in (0, 1):
                yy, xx = y0 + dy, x0 + dx
                ok = inside & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
                row = ((n * S + start + yy * W + xx) * M + m)
                np.add.at(work, np.broadcast_to(row, ok.shape)[ok], 1)
    return work


def model(prob, loc, K0):
    work = row_work(prob, loc)
    K = np.maximum(K0, np.ceil(np.sqrt(work)).astype(np.int64))
    pieces = -(-work // K)
    split = pieces > 1
    after = int(max(work[~split].max(initial=0), K[split].max(initial=0), pieces[split].max(initial=0)))
    return dict(rows=work.size, max_W=int(work.max()), after=after, split_rows=int(split.sum()),
                pieces=int(pieces[split].sum()), bound=_cuda.max_pieces(prob, K0),
                scratch_MB=_cuda.max_pieces(prob, K0) * prob.D * 4 / 1e6)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--det-piece", type=int, default=_cuda.DEFAULT_CONFIG.det_piece)
    args = ap.parse_args(argv)
    print(f"K0 = {args.det_piece}; longest serial walk of one thread (points), before and after the split\n")
    print("| input | rows | points | max W (before) | after | split rows | pieces | pieces bound | scratch MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, dist in (("encoder N=1 uniform", "uniform"), ("encoder N=1 local", "local"),
                       ("encoder N=1, all points in one cell", "uniform")):
        value, shapes, starts, loc, attn = make_problem(1, None, dist, np.float32)
        if "one cell" in name:
            loc = np.empty_like(loc)
            loc[..., 0] = (50.3 + 0.5) / 167  # pixel (50.3, 40.6) of level 0 ...
            loc[..., 1] = (40.6 + 0.5) / 100
            loc[:, :, :, 1:] = np.nan        # ... and no other level
        prob = _validate.check_problem(value, shapes, starts, loc, attn, _validate.CPU_DTYPES)
        r = model(prob, loc, args.det_piece)
        points = prob.N * prob.Lq * prob.M * prob.L * prob.P
        print(f"| {name} | {r['rows']} | {points} | {r['max_W']} | {r['after']} | {r['split_rows']} | {r['pieces']} "
              f"| {r['bound']} | {r['scratch_MB']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
