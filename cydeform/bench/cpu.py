"""Benchmark: ``python -m cydeform.bench [--repeat R] [--threads T ...] [--dtype ...] [--no-torch]``.

Times the CPU backend's forward and backward (median of repeated runs) on the
Deformable DETR shapes of msda.md section 4, prints GB/s (a cost model: each sample
gathers 4 corners x D channels) beside the thread count and dtype, and, when PyTorch is
importable, times the grid_sample reference at the same thread count and prints the
ratio. PyTorch is never a dependency. The calls and location distributions are those of
``cydeform.bench.problems``. Each row also shows the measured floor of the same call
(``cydeform.bench.floor``: the op's corner gathers, and for the backward its scatters
(for a backward that goes sparse, in that method's block order, summed in a buffer
streamed out to grad_value), without geometry or arithmetic, from the buffer the op
gathers from: its staging copy when it stages value, cydeform._staging, or its
head-major copy) and cydeform's time as a multiple of it; the
header gives the machine's copy bandwidth. ``--no-floor`` skips them. Rows with more
than one thread show the speed-up over 1 thread as the median of ratios of the two
timed back to back (``paired_speedup``), not as a ratio of two medians taken a
minute apart, and beside it the floor's own speed-up measured the same way: how much
a second thread can give on this machine (shared caches and memory bandwidth).
After the table, each of issue 13's targets (``TORCH_TARGETS``, ``FLOOR_TARGET``,
``SCALING_TARGET``) with how many of this run's float32 rows meet it, their range and
the rows that miss it (``check_targets``).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import numpy as np

import cydeform

from . import floor
from .problems import LEVELS, D, M, P, make_problem  # noqa: F401 (re-exported)


def traffic_bytes(N, Lq, dtype, backward=False):
    """Bytes the op touches by the cost model: 4 corner gathers of D channels per sample
    plus locations, weights and output once (backward: also grad_output read, corner
    scatters into grad_value, location and weight gradients written)."""
    item = np.dtype(dtype).itemsize
    L = len(LEVELS)
    samples = N * Lq * M * L * P
    gathers = samples * 4 * D * item
    once = samples * 3 * item + N * Lq * M * D * item
    if backward:
        return 2 * gathers + once + samples * 3 * item
    return gathers + once


def median_time(fn, repeat, min_time=0.0):
    fn()  # warm-up (page faults, caches)
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def paired_speedup(fn, threads, repeat, min_time=1.0):
    """Median over rounds of (1-thread time / ``threads``-thread time) of ``fn``, the two
    run back to back in each round, so that a machine whose speed drifts over minutes
    (shared VMs) does not skew the ratio as two separately timed medians would. At
    least ``repeat`` rounds and ``min_time`` seconds of them: a call of a few ms gets
    hundreds of rounds, whose median a slow stretch of the VM moves less."""
    ratios = []
    start = time.perf_counter()
    while len(ratios) < max(3, repeat) or time.perf_counter() - start < min_time:
        pair = []
        for n in (1, threads):
            cydeform.set_num_threads(n)
            t0 = time.perf_counter()
            fn()
            pair.append(time.perf_counter() - t0)
        ratios.append(pair[0] / pair[1])
    cydeform.set_num_threads(threads)
    return statistics.median(ratios)


def paired_ratio(fn, ref, repeat, min_time=1.0):
    """Median over rounds of (``fn``'s time / ``ref``'s time), the two run back to back in
    each round (after a warm-up of each), for the same reason as paired_speedup: the
    benchmark's "x floor" under a drifting machine."""
    fn()
    ref()
    ratios = []
    start = time.perf_counter()
    while len(ratios) < max(3, repeat) or time.perf_counter() - start < min_time:
        pair = []
        for f in (fn, ref):
            t0 = time.perf_counter()
            f()
            pair.append(time.perf_counter() - t0)
        ratios.append(pair[0] / pair[1])
    return statistics.median(ratios)


def torch_reference():
    """The PyTorch grid_sample reference (Deformable DETR's ms_deform_attn_core_pytorch), or None."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None

    def forward(value, shapes, sampling_locations, attention_weights):
        N, S, M_, D_ = value.shape
        _, Lq, _, L, P_, _ = sampling_locations.shape
        value_list = value.split([int(h) * int(w) for h, w in shapes], dim=1)
        grids = 2 * sampling_locations - 1
        samples = []
        for lid, (h, w) in enumerate(shapes):
            v = value_list[lid].flatten(2).transpose(1, 2).reshape(N * M_, D_, int(h), int(w))
            g = grids[:, :, :, lid].transpose(1, 2).flatten(0, 1)
            samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
        a = attention_weights.transpose(1, 2).reshape(N * M_, 1, Lq, L * P_)
        out = (torch.stack(samples, dim=-2).flatten(-2) * a).sum(-1).view(N, M_ * D_, Lq)
        return out.transpose(1, 2).contiguous()

    return torch, forward


# Issue 13's targets, checked on every run's rows (float32 rows only): a speed goal lives
# here, in the benchmark, never in a timed test. (call, pass, least ratio to PyTorch.)
TORCH_TARGETS = (("encoder", "forward", 25.0), ("encoder", "backward", 12.0), ("decoder", "backward", 10.0))
FLOOR_TARGET = 2.0  # each row within this multiple of its measured floor
SCALING_TARGET = 1.8  # a 2-thread row, its speed-up over 1 thread


def shown(value, digits, better="higher"):
    """``value`` with ``digits`` decimals, rounded away from the side that is better: down
    where higher is better (a ratio to PyTorch, a speed-up), up where lower is (× floor).
    So a printed value meets a target's threshold exactly when the value does: a ratio of
    9.996 prints as 9.99, not as 10.00 beside a count that calls it a miss."""
    scaled = value * 10.0 ** digits
    if abs(scaled - round(scaled)) <= 1e-9 * max(1.0, abs(scaled)):
        scaled = round(scaled)  # 1.15 * 100 is 114.99999999999999: a decimal, not below it
    rounded = (math.floor if better == "higher" else math.ceil)(scaled)
    return f"{rounded / 10.0 ** digits:.{digits}f}"


def check_targets(rows):
    """Lines saying, per target, how many of this run's rows meet it, with the values.

    ``rows``: dicts with keys call, locations, dtype, threads, pass, ratio (to PyTorch, or
    None), x_floor (or None), speedup (over 1 thread, or None) and floor_speedup (or None).
    Only float32 rows count (the targets are stated for float32). A target no row
    measured (no PyTorch, --no-floor, no 2-thread row) is said to be not measured.
    """
    rows = [r for r in rows if r["dtype"] == "float32"]

    def line(name, cells, ok, better="higher"):
        if not cells:
            return f"- {name}: not measured in this run"
        values = [v for _, v in cells]
        missed = [f"{where} {shown(v, 2, better)}" for where, v in cells if not ok(v)]
        return (f"- {name}: {len(cells) - len(missed)} of {len(cells)} rows "
                f"({shown(min(values), 2, better)}-{shown(max(values), 2, better)}"
                + (f"; missed: {', '.join(missed)})" if missed else ")"))

    def label(r):
        return f"{r['locations']} {r['threads']}T"

    lines = []
    for call, pas, least in TORCH_TARGETS:
        cells = [(label(r), r["ratio"]) for r in rows
                 if r["call"] == call and r["pass"] == pas and r["ratio"] is not None]
        lines.append(line(f"{call} {pas} >= {least:g}x PyTorch", cells, lambda v, least=least: v >= least))
    cells = [(f"{r['call']} {r['pass']} {label(r)}", r["x_floor"]) for r in rows if r["x_floor"] is not None]
    lines.append(line(f"within {FLOOR_TARGET:g}x of the floor", cells, lambda v: v <= FLOOR_TARGET, "lower"))
    two = [r for r in rows if r["threads"] == 2]
    cells = [(f"{r['call']} {r['pass']} {label(r)}", r["speedup"]) for r in two if r["speedup"] is not None]
    lines.append(line(f"2 threads >= {SCALING_TARGET:g}x 1 thread", cells, lambda v: v >= SCALING_TARGET))
    floor_cells = [(f"{r['call']} {r['pass']} {label(r)}", r["floor_speedup"]) for r in two
                   if r["floor_speedup"] is not None]
    if floor_cells:
        met = sum(v >= SCALING_TARGET for _, v in floor_cells)
        lines.append(f"  (the floor's own speed-up reached {SCALING_TARGET:g}x in {met} of {len(floor_cells)}: "
                     "what a second thread can give on this machine)")
    return lines


def run_cpu(args):
    from .. import _cpu

    ref = None if args.no_torch else torch_reference()
    print(f"# cydeform {cydeform.__version__} CPU benchmark: {_cpu_model()}, {os.cpu_count()} logical cores, "
          f"'{_cpu.isa}' build, numpy {np.__version__}"
          + (f", torch {ref[0].__version__}" if ref else ", torch not importable (no ratio)"))
    print(f"# median of >= {args.repeat} runs; GB/s by the cost model in traffic_bytes()"
          + ("" if args.no_floor else f"; copy bandwidth {floor.copy_gbs():.1f} GB/s (read + write, 256 MB); "
             "floor: the same corner gathers (backward: and scatters; where the backward goes "
             "sparse, in its block order, into a buffer streamed out) without geometry, same threads; "
             "x floor: median over rounds of the op's time over the floor's, the two back to back"))
    header = ("| call | locations | dtype | threads | pass | cydeform ms | GB/s | "
              + ("" if args.no_floor else "floor ms | x floor | ") + "torch ms | speed-up |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    results = []
    for call, Lq in (("encoder", None), ("decoder", 300)):
        for dist in args.distributions:
            for dtype in args.dtype:
                value, shapes, starts, loc, attn = make_problem(1, Lq, dist, np.dtype(dtype))
                Lq_ = loc.shape[1]
                grad = np.random.default_rng(1).standard_normal((1, Lq_, M * D)).astype(dtype)
                heads = _cpu._by_head(value, loc)
                rows = None if args.no_floor else floor.corner_rows(value.shape, shapes, starts, loc, heads=heads)
                # The floor gathers from a buffer like the op's: its head-major copy or its
                # staging copy if any.
                if args.no_floor or not heads:
                    staged = None if args.no_floor else _cpu._stage(value, shapes, starts, loc, attn)[0]
                    floor_value = value if staged is None else staged
                else:
                    N, S, M_, D_ = value.shape
                    floor_value = _cpu._impl._aligned_empty((N, M_, S, D_), value.dtype)
                    floor_value[...] = value.transpose(0, 2, 1, 3)
                floor_work = _cpu._work(value) if heads else None  # the op's own kept buffer
                sparse = _cpu._impl.sparse_applies(value.shape[1], Lq_, loc.shape[3], loc.shape[4])
                slots = floor.sparse_slots(rows, value.shape, value.itemsize) if sparse and rows is not None else None
                def op_forward():
                    cydeform.ms_deform_attn(value, shapes, starts, loc, attn)

                def op_backward():
                    cydeform.ms_deform_attn_backward(grad, value, shapes, starts, loc, attn)

                for threads in args.threads:
                    cydeform.set_num_threads(threads)
                    tt_f = tt_b = None
                    if ref is None:
                        t_f = median_time(op_forward, args.repeat, 0.5)
                        t_b = median_time(op_backward, args.repeat, 0.5)
                    else:
                        # cydeform's and PyTorch's medians from the same minutes (interleaved_times).
                        calls = _torch_calls(ref, threads, value, shapes, loc, attn, grad)
                        (t_f, t_b), (tt_f, tt_b) = interleaved_times(
                            (op_forward, op_backward), lambda: torch_round(calls), args.repeat)
                        tt_b = max(tt_b, 1e-9)
                    # Scaling: 1 thread and this many timed in the same rounds.
                    s_f = paired_speedup(op_forward, threads, args.repeat) if threads > 1 else None
                    s_b = paired_speedup(op_backward, threads, args.repeat) if threads > 1 else None
                    fl_f = fl_b = x_f = x_b = sf_f = sf_b = None
                    if rows is not None:
                        def floor_forward():
                            _cpu._impl.gather_floor(floor_value, rows, heads=heads)

                        def floor_backward():
                            if sparse:
                                _cpu._impl.sparse_floor(floor_value, *slots)
                            else:
                                _cpu._impl.gather_floor(floor_value, rows, backward=True, heads=heads,
                                                        work=floor_work)

                        fl_f = median_time(floor_forward, args.repeat, 0.5)
                        fl_b = median_time(floor_backward, args.repeat, 0.5)
                        # "x floor": the op and its floor back to back in each round.
                        x_f = paired_ratio(op_forward, floor_forward, args.repeat)
                        x_b = paired_ratio(op_backward, floor_backward, args.repeat)
                        # The floor's own scaling: what this machine allows the op.
                        if threads > 1:
                            sf_f = paired_speedup(floor_forward, threads, args.repeat)
                            sf_b = paired_speedup(floor_backward, threads, args.repeat)
                    for name, t, tt, fl, x, sp, sfl, bwd in (
                            ("forward", t_f, tt_f, fl_f, x_f, s_f, sf_f, False),
                            ("backward", t_b, tt_b, fl_b, x_b, s_b, sf_b, True)):
                        gbs = traffic_bytes(1, Lq_, dtype, bwd) / t / 1e9
                        extra = ""
                        if sp is not None:
                            extra = (f" ({shown(sp, 2)}x 1 thread"
                                     + (f"; floor {shown(sfl, 2)}x)" if sfl is not None else ")"))
                        torch_ms = f"{tt * 1e3:.1f}" if tt else "-"
                        ratio = f"{shown(tt / t, 1)}x" if tt else "-"
                        floor_cols = "" if fl is None else f"{fl * 1e3:.2f} | {shown(x, 2, 'lower')} | "
                        print(f"| {call} | {dist} | {dtype} | {threads} | {name} | {t * 1e3:.2f}{extra} | {gbs:.1f} "
                              f"| {floor_cols}{torch_ms} | {ratio} |", flush=True)
                        results.append({"call": call, "locations": dist, "dtype": dtype, "threads": threads,
                                        "pass": name, "ratio": tt / t if tt else None, "x_floor": x,
                                        "speedup": sp, "floor_speedup": sfl})
    print("\nTargets (issue 13), this run:")
    for text in check_targets(results):
        print(text)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_calls(ref, threads, value, shapes, loc, attn, grad):
    """PyTorch's (forward, backward, forward_graph) for one row: forward without a graph,
    forward + autograd backward, and forward with graph recording (the backward pass
    alone is the second's time minus the third's, see torch_round)."""
    torch, fwd = ref
    torch.set_num_threads(threads)
    v = torch.from_numpy(value).requires_grad_(True)
    lo = torch.from_numpy(loc).requires_grad_(True)
    a = torch.from_numpy(attn).requires_grad_(True)
    g = torch.from_numpy(grad)
    shp = [tuple(int(x) for x in row) for row in shapes]

    def forward():
        with torch.no_grad():
            fwd(v, shp, lo, a)

    def backward():
        out = fwd(v, shp, lo, a)
        torch.autograd.grad(out, (v, lo, a), g)

    def forward_graph():
        fwd(v, shp, lo, a)

    return forward, backward, forward_graph


def torch_round(calls):
    """One round of _torch_calls' three, back to back: (forward s, backward-pass-alone s)."""
    times = []
    for fn in calls:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times[0], times[1] - times[2]


def _time_torch(ref, threads, value, shapes, loc, attn, grad, repeat, min_time=1.0):
    """Medians of PyTorch's forward and backward pass alone, timed on their own."""
    forward, backward, forward_graph = _torch_calls(ref, threads, value, shapes, loc, attn, grad)
    # The backward pass alone: autograd's time minus a forward with graph recording,
    # paired within a round (the three run back to back) so that the machine's drift
    # between rounds cancels; medians over the rounds. At least max(3, repeat // 3)
    # rounds and ``min_time`` seconds of them: three-round medians of the decoder call's
    # backward at 2 threads ranged over 39.7-60.3 ms on one VM within an hour (2026-12-07;
    # 40 rounds: 10th/90th percentiles 43/68 ms); the encoder's ~10 s rounds stay at three.
    for fn in (forward, backward, forward_graph):
        fn()  # warm-up
    t_f, t_b = [], []
    start = time.perf_counter()
    while len(t_f) < max(3, repeat // 3) or time.perf_counter() - start < min_time:
        f, b = torch_round((forward, backward, forward_graph))
        t_f.append(f)
        t_b.append(b)
    return statistics.median(t_f), max(statistics.median(t_b), 1e-9)


def interleaved_times(ours, round_fn, repeat, segments=3, min_ours=0.2, min_ref=0.3, cheap_round=1.0):
    """Medians of cydeform's calls and of the reference's rounds, timed in alternating
    segments (ours, reference, ours, ...), so that both sample the same minutes of a VM
    whose speed drifts (two separately timed medians a minute apart moved the speed-up
    column by up to 1.6x, 2026-12-07) while each stays warm (cpu_log 43: timed call by
    call in alternation, each runs cold after the other).

    ``ours``: callables, each a call of cydeform timed alone; ``round_fn()``: one round of
    the reference, returning a tuple of times (torch_round), first run once untimed (its
    first calls at this thread count). In each segment each of
    ours gets an untimed warm-up call (the reference has just swept the caches), then at
    least ceil(repeat / segments) timed calls and ``min_ours`` seconds of them; then the
    reference gets a warm-up round where a round takes less than ``cheap_round`` seconds
    (the encoder's ~10 s rounds lose nothing measurable to a cold start, and a warm-up
    would double the benchmark's time), then timed rounds for at least ``min_ref``
    seconds (at least one). Returns (ours' medians, the reference's medians), each a
    list in order."""
    per = -(-repeat // segments)
    ours_t = [[] for _ in ours]
    ref_t = []
    round_fn()
    for _ in range(segments):
        for fn, acc in zip(ours, ours_t):
            fn()
            start = time.perf_counter()
            n = 0
            while n < per or time.perf_counter() - start < min_ours:
                t0 = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t0)
                n += 1
        timed = []
        start = time.perf_counter()
        first = round_fn()
        if time.perf_counter() - start >= cheap_round:
            timed.append(first)  # and it counts towards min_ref
        else:
            start = time.perf_counter()
        while not timed or time.perf_counter() - start < min_ref:
            timed.append(round_fn())
        ref_t += timed
    ref_medians = [statistics.median(col) for col in zip(*ref_t)]
    return [statistics.median(acc) for acc in ours_t], ref_medians


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts (default: 1 and the OpenMP maximum)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"])
    parser.add_argument("--distributions", nargs="+", default=["uniform", "local"], choices=["uniform", "local"])
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--no-floor", action="store_true", help="skip the measured floor and copy bandwidth")
    parser.add_argument("--cpu-only", action="store_true", help="skip the GPU benchmark even if a GPU is present")
    args = parser.parse_args(argv)
    if args.threads is None:
        maximum = cydeform.get_num_threads()
        args.threads = sorted({1, maximum})
    run_cpu(args)
    return args


if __name__ == "__main__":
    main()
