"""The measured floor of the CPU benchmark: the op's memory traffic without its arithmetic.

For a benchmark problem, ``corner_rows`` precomputes (untimed) the element offset of
every corner row each output row (n, q, m) gathers, in the op's order: point by point
(l, p), corners (y0, x0), (y0, x0+1), (y0+1, x0), (y0+1, x0+1). ``_cpu.gather_floor``
then does those gathers with the op's prefetch and register accumulation, weight 1 and
no geometry (forward floor), and with every gathered row also added into a per-thread
grad buffer at its offset (backward floor: the op's scatter, minus the dot products).
For calls the backward does with its sparse method (few samples per value position),
``sparse_slots`` puts the same offsets in that method's order (bucketed by block of
grad_value) and ``_cpu.sparse_floor`` does its memory traffic: per block, the gathers
added into a per-thread buffer that is then streamed out to grad_value.
For calls the op does on a head-major copy of value (``_cpu._by_head``), the floor
gathers from such a copy in the op's head-major order; the op's copies in and out of
that layout are not in the floor (they are what the op pays for the layout).
``copy_gbs`` is the machine's copy bandwidth. The benchmark prints each cydeform time as
a multiple of its floor.
"""
from __future__ import annotations

import time

import numpy as np


def corner_rows(value_shape, spatial_shapes, level_start_index, sampling_locations, heads=False):
    """(N*Lq*M, 4*L*P) int64 offsets into the flattened value (N, S, M, D), rows in
    (n, q, m) order; with ``heads``, offsets into its head-major copy (N, M, S, D) and
    rows in the head-major path's (n, m, q) order, so the floor reads them in order as
    the op reads its block copies. -1 where a corner lies outside the map or the
    point's cell holds no texel (assumes finite locations)."""
    N, S, M, D = value_shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    H = np.asarray(spatial_shapes)[:, 0].astype(np.int64)[None, None, None, :, None]
    W = np.asarray(spatial_shapes)[:, 1].astype(np.int64)[None, None, None, :, None]
    start = np.asarray(level_start_index).astype(np.int64)[None, None, None, :, None]
    x = sampling_locations[..., 0].astype(np.float64) * W - 0.5
    y = sampling_locations[..., 1].astype(np.float64) * H - 0.5
    inside = (x >= -1) & (x < W) & (y >= -1) & (y < H)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    n = np.arange(N).reshape(N, 1, 1, 1, 1)
    m = np.arange(M).reshape(1, 1, M, 1, 1)
    rows = []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        cx, cy = x0 + dx, y0 + dy
        ok = inside & (cx >= 0) & (cx < W) & (cy >= 0) & (cy < H)
        pos = start + cy * W + cx
        offset = ((n * M + m) * S + pos) * D if heads else ((n * S + pos) * M + m) * D
        rows.append(np.where(ok, offset, -1))
    rows = np.stack(rows, axis=-1).reshape(N, Lq, M, L * P * 4)
    if heads:
        rows = rows.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(rows.reshape(N * Lq * M, L * P * 4))


def sparse_slots(rows, value_shape, itemsize):
    """For a call whose backward is sparse (``_cpu.sparse_applies``): the placed slots
    (``_cpu.slot_dtype``) of the in-map corners in ``rows`` (corner_rows, not head-major),
    in the sparse method's order, slot order bucketed stably by grad_value block, each
    with its value row within its block and weight 1, and block_first (B + 1), where
    each block's slots start: the arguments of ``_cpu.sparse_floor``."""
    from cydeform import _cpu

    N, S, M, D = value_shape
    keys = rows.reshape(-1)
    keys = keys[keys >= 0] // D
    shift = _cpu._impl.sparse_block_shift(D, itemsize)
    block = keys >> shift
    order = np.argsort(block, kind="stable")
    counts = np.bincount(block, minlength=_cpu._impl.sparse_blocks(N * S * M, D, itemsize))
    slots = np.empty(len(keys), dtype=_cpu._impl.slot_dtype())
    slots["rk"] = (keys[order] & ((1 << shift) - 1)) << 1  # one slot a record, no pairs
    slots["w0"] = 1.0
    slots["w1"] = 0.0
    return slots, np.concatenate(([0], np.cumsum(counts))).astype(np.int64)


def copy_gbs(nbytes=256 << 20, repeat=5):
    """Copy bandwidth in GB/s (bytes read + written per second), median of ``repeat`` copies."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # page faults out of the timing
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / float(np.median(times)) / 1e9
