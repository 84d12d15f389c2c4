"""``python -m cydeform.bench --plot FILE.png [options]``: time against problem size, as a picture.

Times the CPU backend's forward and backward on the benchmark call of
``cydeform.bench.problems`` (N=1, the encoder's four levels, M=8, D=32, P=4) with Lq
on a log grid from 300 (the decoder's query count) to S = 22223 (the encoder call; the
queries at each Lq are an evenly strided subset of the encoder's, so the location
distribution is the same along the curve), and, when
PyTorch is importable, Deformable DETR's grid_sample reference at the same thread
count; draws time against Lq on log-log axes with a line proportional to Lq for
comparison, and prints the numbers as a Markdown table. Timing: ``cpu.median_time`` and
``cpu._time_torch``, each library on its own (``python -m cydeform.bench``'s table times
the two in alternating segments instead, ``cpu.interleaved_times``). Needs
matplotlib (``pip install 'cydeform[plot]'``); PyTorch is optional.
"""
from __future__ import annotations

import argparse
import datetime
import os

import numpy as np

import cydeform

from . import cpu
from .problems import LEVELS, D, M, make_problem

#: Line colours: one per implementation (pass = line style), fixed so tests can find them.
COLOURS = {"cydeform": "#1f77b4", "torch": "#d62728"}
STYLES = {"forward": "-", "backward": "--"}
MARKERS = {"forward": "o", "backward": "s"}


def lq_grid(points=8, low=300, high=None):
    """``points`` query counts spaced evenly in log from ``low`` to ``high`` (default S, the encoder's)."""
    high = int((LEVELS[:, 0] * LEVELS[:, 1]).sum()) if high is None else int(high)
    if points < 2 or not 1 <= low < high:
        raise ValueError(f"need points >= 2 and 1 <= low < high; got points={points}, low={low}, high={high}")
    return sorted({int(round(v)) for v in np.geomspace(low, high, points)})


def measure(lqs, *, dtype="float32", threads=None, distribution="local", repeat=10, torch_ref=None, log=print):
    """Median times in seconds: ``{(impl, pass): [t for each Lq]}`` with impl "cydeform"
    (and "torch" when ``torch_ref`` is given, as returned by ``cpu.torch_reference()``).

    cydeform: median of >= ``repeat`` runs and >= 0.2 s (short calls get more runs, which
    steadies them on a shared machine); torch: ``cpu._time_torch`` (at least 1 s of rounds).
    """
    threads = cydeform.get_num_threads() if threads is None else threads
    cydeform.set_num_threads(threads)
    times = {(impl, p): [] for impl in ("cydeform",) + (("torch",) if torch_ref else ()) for p in STYLES}
    value, shapes, starts, loc_all, attn_all = make_problem(1, None, distribution, np.dtype(dtype))
    S = value.shape[1]
    grad_all = np.zeros((1, S, M * D), dtype=dtype)
    for _ in range(3):  # untimed: thread pool, page faults, clock ramp-up before the first point
        cydeform.ms_deform_attn_backward(grad_all, value, shapes, starts, loc_all, attn_all)
    for Lq in lqs:
        # An evenly strided subset of the encoder call's queries, in order: every Lq has
        # the same location distribution, and Lq = S is exactly the encoder call.
        idx = np.round(np.linspace(0, S - 1, Lq)).astype(np.int64)
        loc, attn = np.ascontiguousarray(loc_all[:, idx]), np.ascontiguousarray(attn_all[:, idx])
        grad = np.random.default_rng(1).standard_normal((1, Lq, M * D)).astype(dtype)
        times["cydeform", "forward"].append(
            cpu.median_time(lambda: cydeform.ms_deform_attn(value, shapes, starts, loc, attn), repeat, 0.2))
        times["cydeform", "backward"].append(
            cpu.median_time(lambda: cydeform.ms_deform_attn_backward(grad, value, shapes, starts, loc, attn), repeat,
                             0.2))
        if torch_ref:
            t_f, t_b = cpu._time_torch(torch_ref, threads, value, shapes, loc, attn, grad, repeat)
            times["torch", "forward"].append(t_f)
            times["torch", "backward"].append(t_b)
        log(f"| {Lq} | " + " | ".join(f"{v[-1] * 1e3:.2f}" for v in times.values()) + " |")
    return times


def render(lqs, times, title):
    """The log-log figure (a matplotlib Figure with an Agg canvas) of ``measure``'s result."""
    from ..plot import _matplotlib

    Figure, FigureCanvasAgg, _, _ = _matplotlib()
    fig = Figure(figsize=(7.0, 5.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    lqs = np.asarray(lqs, dtype=float)
    for (impl, p), t in times.items():
        ax.plot(lqs, np.asarray(t) * 1e3, color=COLOURS[impl], linestyle=STYLES[p], marker=MARKERS[p],
                markersize=4, label=f"{'PyTorch grid_sample' if impl == 'torch' else impl} {p}")
    # Slope-1 guide through cydeform's forward at the largest Lq: linear scaling is parallel to it.
    top = times["cydeform", "forward"][-1] * 1e3
    ax.plot(lqs, top * lqs / lqs[-1], color="0.6", linestyle=":", linewidth=1, label="\u221d Lq")
    S = int((LEVELS[:, 0] * LEVELS[:, 1]).sum())
    for x, name, side in ((300, " decoder's Lq", "left"), (S, "encoder call ", "right")):
        if lqs[0] <= x <= lqs[-1]:
            ax.axvline(x, color="0.85", linewidth=0.8, zorder=0)
            ax.annotate(name, (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 4),
                        textcoords="offset points", ha=side, fontsize=8, color="0.4")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("queries Lq (N=1, S=22223 values, M=8, D=32, L=4, P=4)")
    ax.set_ylabel("median time [ms]")
    ax.grid(True, which="both", color="0.92", linewidth=0.6)
    fig.legend(fontsize=8, loc="outside lower center", ncols=3, frameon=False)
    ax.set_title(title, fontsize=9)
    return fig


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cydeform.bench --plot",
                                     description=__doc__.split("\n")[0].split(": ", 1)[1])
    parser.add_argument("plot", metavar="FILE.png", help="where to write the figure (any format matplotlib saves)")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="thread count (default: the OpenMP maximum)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--distribution", default="local", choices=["uniform", "local"])
    parser.add_argument("--points", type=int, default=8, help="Lq values on the log grid")
    parser.add_argument("--min-lq", type=int, default=300, help="smallest Lq (largest: the encoder's 22223)")
    parser.add_argument("--sweeps", type=int, default=1,
                        help="repeat the whole sweep and keep each point's median over the sweeps (a burst of "
                             "other load on a shared machine spoils one sweep's point, rarely most)")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    args = parser.parse_args(argv)
    if args.sweeps < 1:
        parser.error("--sweeps must be >= 1")
    from ..plot import _matplotlib

    _matplotlib()  # fail before timing, not after, when matplotlib is missing
    from .. import _cpu

    threads = cydeform.get_num_threads() if args.threads is None else args.threads
    ref = None if args.no_torch else cpu.torch_reference()
    lqs = lq_grid(args.points, args.min_lq)
    machine = f"{cpu._cpu_model()}, {os.cpu_count()} logical cores, '{_cpu.isa}' build"
    print(f"# cydeform {cydeform.__version__} scaling: {machine}; {threads} thread{'s' * (threads != 1)}, {args.dtype}, "
          f"{args.distribution} locations" + (f", torch {ref[0].__version__}" if ref else ", torch not importable"))
    print("| Lq | " + " | ".join(f"{i} {p} ms" for i in ("cydeform",) + (("torch",) if ref else ()) for p in STYLES)
          + " |")
    print("|---" * (1 + 2 * (2 if ref else 1)) + "|")
    sweeps = []
    for sweep in range(args.sweeps):
        if args.sweeps > 1:
            print(f"# sweep {sweep + 1} of {args.sweeps}")
        sweeps.append(measure(lqs, dtype=args.dtype, threads=threads, distribution=args.distribution,
                              repeat=args.repeat, torch_ref=ref))
    # The median, not the minimum: torch's backward is a difference of two timings, and
    # the smallest of several differences is biased low.
    times = {k: list(np.median([s[k] for s in sweeps], axis=0)) for k in sweeps[0]}
    if args.sweeps > 1:
        print("# median over the sweeps")
        for i, Lq in enumerate(lqs):
            print(f"| {Lq} | " + " | ".join(f"{v[i] * 1e3:.2f}" for v in times.values()) + " |")
    date = datetime.date.today().isoformat()
    title = (f"cydeform {cydeform.__version__} CPU, {date}: {machine}\n"
             f"{threads} thread{'s' * (threads != 1)}, {args.dtype}, {args.distribution} locations, "
             + (f"PyTorch {ref[0].__version__}" if ref else "PyTorch not importable")
             + f"\nmedians of \u2265{args.repeat} runs" + (f" (PyTorch \u2265{max(3, args.repeat // 3)})" if ref else "")
             + (f", median of {args.sweeps} sweeps" if args.sweeps > 1 else ""))
    render(lqs, times, title).savefig(args.plot)
    print(f"# wrote {args.plot}")
    return lqs, times


if __name__ == "__main__":
    main()
