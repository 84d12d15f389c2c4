"""One-shot GPU tuning run: ``python benchmarks/tune_gpu.py --out DIR [--dry-run]``.

For the lent H100 session (see benchmarks/NOTES.md, "How to run on the lent GPU"):

(a) device copy bandwidth (cydeform.bench.gpu.copy_bandwidth_gbs) and the ptxas report
    of the timed kernels under the machine's own NVRTC;
(b) the fast kernels beside the baseline kernels, CUDA events, median of >= 100 runs
    after warm-up (cydeform.bench.gpu.Timer's method: each call queued behind a spin
    kernel), for encoder N=1, N=2 and decoder, float32/float16/bfloat16 (float64 once),
    both location distributions, with the fraction of the DRAM floor at the measured
    copy bandwidth; the decoder call end to end through the public API (wall clock) and
    a breakdown of its host overhead; the targets of the CUDA issue checked;
(c) tuning experiments that need no source edit: the table EXPERIMENTS, one entry per
    experiment (what to vary: a cydeform._cuda.LaunchConfig field, an NVRTC option, a
    kernel variant or a timing condition; which calls, dtypes, location distributions
    and directions to time; the written-down prediction), run by one loop that times
    each cell beside the default kernel and checks its result against the default's.

Writes DIR/tune_report.md (rewritten after every section and every experiment, so a run
cut short still leaves a report) and DIR/tune_results.json. Every measurement and
experiment is guarded: a failure prints its error and the run goes on. ``--budget-s``
stops starting new measurements when the time is spent.

No GPU needed:
``--list``: print every experiment of the table with its config and cells, validated
against the library (LaunchConfig, _cuda.check_limits, _cuda.channel_layout, and the
orchestration run on a runtime that records launches); exit 1 on an invalid entry.
``--dry-run``: no CuPy, no GPU. Runs the same host logic with NumPy arrays, the
recording runtime and a fake timer (numbers marked FAKE), so the argument parsing, the
table, the loop and the report formatting are tested here (tests/test_gpu_scripts.py).
``--dry-run --compile`` also compiles every recorded kernel variant with NVRTC (with the
experiment's options) when CuPy's NVRTC bindings are present. The former
``--host-check`` (alternative layouts on the CPU host harness) is gone: benchmarks do
not import tests/; tests/test_cuda_layouts.py checks the same layouts there.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

from cydeform import _cuda, _validate  # noqa: E402
from cydeform.bench import gpu as bench_gpu  # noqa: E402
from cydeform.bench.problems import make_problem  # noqa: E402
from tuning_table import BLOCKS, LAYOUTS, REG_CAPS, SHARED_GEOMETRY_PREDICTION  # noqa: E402

CALLS = list(bench_gpu.CALLS)  # encoder1, encoder2, decoder
MAIN_DTYPES = ("float32", "float16", "bfloat16")
DISTS = ("uniform", "local")

# Targets of the CUDA issue (H100), microseconds.
TARGETS = {
    ("encoder1", "float32", "fwd"): 80, ("encoder1", "float32", "bwd"): 250,
    ("encoder1", "float16", "fwd"): 50, ("encoder1", "float16", "bwd"): 200,
    ("encoder1", "bfloat16", "fwd"): 50, ("encoder1", "bfloat16", "bwd"): 200,
}
E2E_TARGET_US = 15.0
N2_RATIO_TARGET = 2.1

# H100 SXM figures for the L1 estimate (a cost-model lead, not a measurement).
L1_BYTES_PER_CLK_PER_SM = 128
SM_CLOCK_GHZ = 1.755


# ---- cost model --------------------------------------------------------------------------

def gather_bytes(prob):
    """Bytes of corner gathers (4 corners x D channels per sample): the L1 traffic."""
    return prob.N * prob.Lq * prob.M * prob.L * prob.P * 4 * prob.D * np.dtype(prob.dtype).itemsize


def floors_us(prob, backward, copy_gbs, sms=132):
    """(DRAM floor at the measured copy bandwidth, L1 gather floor estimate) in us."""
    dram = bench_gpu.traffic_bytes(prob, backward) / (copy_gbs * 1e9) * 1e6
    l1_bw = sms * L1_BYTES_PER_CLK_PER_SM * SM_CLOCK_GHZ * 1e9
    l1 = gather_bytes(prob) * (2 if backward else 1) / l1_bw * 1e6
    return dram, l1


# ---- runtimes for the dry run --------------------------------------------------------

class RecordingRuntime:
    """The runtime interface of cydeform._cuda with NumPy arrays; records launches, runs nothing."""

    xp = np

    def __init__(self):
        self.launched = []

    def launch(self, expr, total_threads, args, config):
        self.launched.append((expr, config.grid(total_threads), config.block, config.options))

    @staticmethod
    def pointer(a):
        return a.ctypes.data

    @staticmethod
    def levels(prob):
        return _cuda.level_table(prob)

    @staticmethod
    def argsort_stable(keys):
        return np.argsort(keys, kind="stable")


class FakeTimer:
    """Calls fn once (so the orchestration runs) and returns made-up numbers marked FAKE."""

    fake = True

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def stats_us(self, fn, repeat, warmup=0, flush=None):
        fn()
        med = float(self.rng.uniform(20, 400))
        return dict(median=med, p10=med * 0.98, p90=med * 1.03, enqueue=5.0, n=repeat)


class EventTimer(bench_gpu.Timer):
    """bench_gpu.Timer plus spread (p10/p90), the host enqueue time and an optional L2 flush."""

    fake = False

    def stats_us(self, fn, repeat, warmup=5, flush=None):
        cupy = self.cupy
        for _ in range(warmup):
            fn()
        cupy.cuda.get_current_stream().synchronize()
        pairs, enqueue = [], []
        for _ in range(repeat):
            if flush is not None:
                flush()  # before the spin: not inside the timed region
            self._spin((1,), (1,), (self._ns,))
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            t0 = time.perf_counter()
            fn()
            enqueue.append(time.perf_counter() - t0)
            end.record()
            pairs.append((start, end))
        pairs[-1][1].synchronize()
        times = sorted(cupy.cuda.get_elapsed_time(s, e) * 1e3 for s, e in pairs)
        q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
        return dict(median=statistics.median(times), p10=q(0.1), p90=q(0.9),
                    enqueue=statistics.median(enqueue) * 1e6, n=repeat)


# ---- the experiment table ----------------------------------------------------------




@dataclass(frozen=True)
class Experiment:
    """One row of the tuning table: what to vary, on which calls, and the prediction.

    The variant is ``_cuda.DEFAULT_CONFIG`` with ``block`` / ``grid_waves`` (max_grid =
    grid_waves x SMs) / extra NVRTC ``options`` / forced ``layout`` (J, G) replaced, plus
    keyword arguments of ``_cuda._forward`` / ``_cuda._backward`` (``call_kw``: variant,
    specialize, index64). ``flush_l2`` and ``carveout`` change how it is timed, not what
    runs. Each (call, dtype, dist, direction) cell is timed beside the default kernel.
    """

    name: str
    prediction: str
    block: int | None = None
    grid_waves: int | None = None
    options: tuple = ()
    layout: tuple | None = None
    call_kw: tuple = ()  # (key, value) pairs: hashable, printed as given
    dtypes: tuple = ("float32", "float16")
    dists: tuple = DISTS
    calls: tuple = ("encoder1",)
    directions: tuple = ("fwd", "bwd")
    flush_l2: bool = False
    carveout: int | None = None

    def config(self, sms=132, base=_cuda.DEFAULT_CONFIG):
        """The LaunchConfig of this experiment (validated by LaunchConfig itself)."""
        kw = {}
        if self.block is not None:
            kw["block"] = self.block
        if self.grid_waves is not None:
            kw["max_grid"] = sms * self.grid_waves
        if self.options:
            kw["options"] = (*base.options, *self.options)
        if self.layout is not None:
            kw["layout"] = tuple(self.layout)
        return dataclasses.replace(base, **kw)

    def cells(self):
        """(call, dtype, dist, direction) in the order they are timed."""
        return [(c, t, s, d) for c in self.calls for t in self.dtypes for s in self.dists for d in self.directions]


def _layout_rows():
    dtypes = {4: ("float32",), 2: ("float16", "bfloat16"), 8: ("float64",)}
    return [Experiment(f"layout {label.split(':')[0]}", f"{label}. Prediction: {pred}", layout=(J, G),
                       dtypes=dtypes[itemsize], dists=DISTS if itemsize != 8 else ("uniform",))
            for itemsize in (4, 2, 8) for (J, G), label, pred in LAYOUTS[itemsize]]


# Largest predicted gain first (METHOD: try the largest first); "repeat default" is the noise floor.
EXPERIMENTS = (
    Experiment("repeat default", "identical config timed again: within +-2% (the noise floor for every "
               "comparison below)"),
    Experiment("shared geometry (forward)", SHARED_GEOMETRY_PREDICTION, call_kw=(("variant", "shared"),),
               dtypes=MAIN_DTYPES, directions=("fwd",)),
    *_layout_rows(),
    Experiment("maxrregcount=64", REG_CAPS[0][1], options=("--maxrregcount=64",), dtypes=MAIN_DTYPES),
    *(Experiment(f"BLOCK={block}", pred, block=block) for block, pred in BLOCKS),
    Experiment("maxrregcount=64 + BLOCK=128", "combined: 64 regs at 128 threads = 32 warps/SM (50%); gain = the "
               "better of the two alone, +0-3%", options=("--maxrregcount=64",), block=128),
    Experiment("maxrregcount=48", REG_CAPS[1][1], options=("--maxrregcount=48",), dtypes=("float32",)),
    Experiment("specialize off", "runtime L/P/D loops, J=1, G=8 (fp32) / 4 (half): slower by 1.2-1.6x (no "
               "unrolling: fewer loads in flight, more geometry lanes for fp32)", call_kw=(("specialize", False),)),
    Experiment("64-bit offsets", "index64=True: more IMAD/LEA per address: slower by 0-10%",
               call_kw=(("index64", True),), dtypes=("float32",)),
    Experiment("persistent grid (3 blocks per SM)", "grid-stride with one resident wave: within +-5% (the wave "
               "quantisation moves into the per-thread loop)", grid_waves=3, dtypes=("float32",)),
    Experiment("L1 carveout 0 (max L1)", "driver already gives a 0-smem kernel the largest L1: within +-3%",
               carveout=0, dtypes=("float32",)),
    Experiment("cold L2 (flushed before each run)", "not a knob: how much the warm-L2 numbers flatter. encoder "
               "fp32 fwd +3-10 us (value 22.8 MB and loc/attn from DRAM), decoder +2-6 us", flush_l2=True,
               dtypes=("float32",), calls=("encoder1", "decoder"), dists=("uniform",)),
)


def select(names=None):
    """The table's entries whose name contains one of ``names`` (all when None/empty)."""
    if not names:
        return list(EXPERIMENTS)
    return [e for e in EXPERIMENTS if any(s.lower() in e.name.lower() for s in names)]


def validate_table(experiments=EXPERIMENTS, sms=132, rt=None):
    """Check every experiment against the library before a GPU is spent on it.

    For each entry: its LaunchConfig (block, grid, forced layout), every cell's problem
    through ``_cuda.check_limits``, the forced layout through ``_cuda.channel_layout``,
    and the kernels it launches, recorded on ``rt`` (a RecordingRuntime) by running the
    orchestration with NumPy arrays. Returns {name: [error, ...]} (empty lists: valid).
    """
    rt = rt or RecordingRuntime()
    inputs = {}
    errors = {}
    for ex in experiments:
        errs = errors.setdefault(ex.name, [])
        try:
            config = ex.config(sms)
        except Exception as exc:
            errs.append(f"config: {type(exc).__name__}: {exc}")
            continue
        for call, dtype, dist, direction in ex.cells():
            try:
                if (call, dtype, dist) not in inputs:
                    inputs[call, dtype, dist] = host_inputs(call, dtype, dist)
                prob = inputs[call, dtype, dist][0]
                _cuda.check_limits(prob)
                _cuda.channel_layout(prob, True, config=config)
                run_cell(rt, inputs[call, dtype, dist], direction, call_kw={**dict(ex.call_kw), "config": config})()
            except Exception as exc:
                errs.append(f"{call} {dtype} {dist} {direction}: {type(exc).__name__}: {exc}")
    return errors


def host_inputs(call, dtype, dist):
    """A benchmark call's inputs as NumPy arrays (the dry run's stand-in for bench_gpu._inputs)."""
    _, N, Lq = bench_gpu.CALLS[call]
    dt = bench_gpu._dtype(dtype)
    value, shapes, starts, loc, attn = make_problem(N=N, Lq=Lq, distribution=dist, dtype=np.float32)
    value, loc, attn = (a.astype(dt) for a in (value, loc, attn))
    prob = _validate.check_problem(value, shapes, starts, loc, attn, _validate.GPU_DTYPES)
    grad = np.ones((prob.N, prob.Lq, prob.M * prob.D), dtype=dt)
    return prob, value, shapes, starts, loc, attn, grad


def run_cell(rt, inputs, direction, mode="fast", call_kw=None):
    """A no-argument function that runs one direction of one call on ``rt``.

    mode: 'fast', 'baseline' or 'det' (deterministic backward); ``call_kw`` are keyword
    arguments of _cuda._forward / _cuda._backward (config, variant, specialize, index64).
    """
    prob, value, _, _, loc, attn, grad = inputs
    kw = dict(call_kw or {})
    variant = kw.pop("variant", "baseline" if mode == "baseline" else "fast")
    if direction == "fwd":
        return lambda: _cuda._forward(rt, prob, value, loc, attn, variant=variant, **kw)
    if mode == "det":
        return lambda: _cuda._backward(rt, prob, grad, value, loc, attn, deterministic=True, **kw)
    return lambda: _cuda._backward(rt, prob, grad, value, loc, attn, variant=variant, **kw)


# ---- the session ----------------------------------------------------------------------

class Session:
    def __init__(self, args):
        self.args = args
        self.dry = args.dry_run
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.sections = []   # (title, markdown)
        self.results = dict(meta={}, baseline=[], experiments=[], e2e=[], host=[], errors=[], ptxas={})
        self.inputs = {}
        self.reference = {}
        if self.dry:
            self.timer = FakeTimer()
            self.rt = RecordingRuntime()
            self.xp = np
        else:
            import cupy

            self.cupy = cupy
            self.timer = EventTimer(spin_us=args.spin_us)
            self.rt = _cuda.CupyRuntime()
            self.xp = cupy
        self._flush_buf = None

    # -- bookkeeping
    def elapsed(self):
        return time.perf_counter() - self.t0

    def over_budget(self):
        return self.elapsed() > self.args.budget_s

    def error(self, where, exc):
        msg = f"{where}: {type(exc).__name__}: {exc}"
        print("  ERROR " + msg, flush=True)
        if self.args.verbose:
            traceback.print_exc()
        self.results["errors"].append(msg)
        return msg

    def write(self):
        lines = [f"# GPU tuning run{' (DRY RUN: FAKE numbers, no GPU)' if self.dry else ''}\n"]
        for title, body in self.sections:
            lines.append(f"## {title}\n\n{body}\n")
        (self.out / "tune_report.md").write_text("\n".join(lines))
        (self.out / "tune_results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def section(self, title, body):
        self.sections.append((title, body))
        print(f"\n## {title}\n\n{body}", flush=True)
        self.write()

    # -- inputs
    def get_inputs(self, call, dtype, dist):
        key = (call, dtype, dist)
        if key not in self.inputs:
            if len(self.inputs) > 6:  # keep device memory bounded
                self.inputs.pop(next(iter(self.inputs)))
            if self.dry:
                self.inputs[key] = host_inputs(call, dtype, dist)
            else:
                self.inputs[key] = bench_gpu._inputs(call, dtype, dist)
        return self.inputs[key]

    def fns(self, call, dtype, dist, direction, mode="fast", call_kw=None):
        return run_cell(self.rt, self.get_inputs(call, dtype, dist), direction, mode, call_kw)

    def flush_fn(self):
        if self.dry:
            return lambda: None
        if self._flush_buf is None:
            self._flush_buf = self.cupy.empty(256 << 20, dtype=self.cupy.uint8)  # > 50 MB L2
        buf = self._flush_buf
        return lambda: buf.fill(1)

    def time(self, fn, flush=False):
        return self.timer.stats_us(fn, self.args.repeat, flush=self.flush_fn() if flush else None)

    # -- correctness of a variant against the default fast kernels
    def check(self, call, dtype, dist, direction, fn):
        if self.dry:
            return "n/a (dry)"
        key = (call, dtype, dist, direction)
        xp = self.xp
        if key not in self.reference:
            self.reference[key] = self.fns(call, dtype, dist, direction)()
        got, want = fn(), self.reference[key]
        if direction == "fwd":
            got, want = (got,), (want,)
        worst = 0.0
        for g, w in zip(got, want):
            g64, w64 = g.astype(xp.float64), w.astype(xp.float64)
            scale = float(xp.nanmax(xp.abs(w64))) or 1.0
            if not bool((xp.isnan(g64) == xp.isnan(w64)).all()):
                return "MISMATCH (NaN positions)"
            worst = max(worst, float(xp.nanmax(xp.abs(g64 - w64))) / scale)
        tol = 1e-5 if dtype in ("float32", "float64") else 2e-2
        return f"ok ({worst:.1e})" if worst <= tol else f"MISMATCH (max rel {worst:.1e})"

    # ---- (a) device
    def device(self):
        meta = self.results["meta"]
        meta["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
        meta["python"] = platform.python_version()
        if self.dry:
            meta.update(device="DRY RUN (no GPU)", copy_gbs=3000.0, sms=132, nvrtc="n/a")
        else:
            cupy = self.cupy
            meta["device"] = bench_gpu.device_description()
            props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
            meta["sms"] = int(props["multiProcessorCount"])
            meta["l2_mb"] = props.get("l2CacheSize", 0) / 2**20
            meta["clock_mhz"] = props.get("clockRate", 0) / 1e3
            try:
                import ptxas_report
                meta["nvrtc"] = ptxas_report.nvrtc_version()
            except Exception as exc:
                meta["nvrtc"] = f"? ({exc})"
            bws = []
            for _ in range(2):  # twice: the spread of the ceiling itself
                bws.append(bench_gpu.copy_bandwidth_gbs(self.timer))
            meta["copy_gbs_runs"] = bws
            meta["copy_gbs"] = max(bws)
        body = "\n".join(f"- {k}: {v}" for k, v in meta.items())
        self.section("Device", body)

    def ptxas(self):
        """The machine's own NVRTC: registers/spills/occupancy of the default fast kernels."""
        try:
            import ptxas_report
        except Exception as exc:
            self.error("ptxas import", exc)
            return
        rows = [ptxas_report.HEADER, "|" + "---|" * ptxas_report.HEADER.count("|")]
        for dtype in ("float32", "float16", "bfloat16", "float64"):
            try:
                used, _ = ptxas_report.benchmark_expressions(dtype)
                exprs = [e for e in used if "encoder1:default" in used[e]]
                rep, _ = ptxas_report.compile_report(exprs, "sm_90")
                for e in sorted(exprs, key=ptxas_report.role):
                    if e in rep and rep[e]["regs"] is not None:
                        rows.append(ptxas_report.fmt_row(e, rep[e]))
                        self.results["ptxas"][e] = rep[e]
            except Exception as exc:
                rows.append(f"| {dtype} | {self.error('ptxas ' + dtype, exc)} |")
        self.section("ptxas on this machine's NVRTC (sm_90, default options)", "\n".join(rows))

    # ---- (b) baseline table
    def baseline(self):
        copy_gbs = self.results["meta"]["copy_gbs"]
        sms = self.results["meta"].get("sms", 132)
        head = ("| call | dtype | locations | fwd fast us (p10-p90) | fwd baseline | speed-up | fwd % DRAM floor "
                "(floor us) | L1 floor est. us | bwd fast | bwd baseline | speed-up | bwd det | bwd % DRAM floor "
                "(floor us) | enqueue us fwd/bwd |")
        rows = [head, "|" + "---|" * (head.count("|") - 1)]
        plan = [(c, d, s) for c in CALLS for d in MAIN_DTYPES for s in DISTS] + [("encoder1", "float64", "uniform")]
        for call, dtype, dist in plan:
            if self.over_budget():
                rows.append(f"| {call} | {dtype} | {dist} | skipped: time budget | |")
                continue
            try:
                prob = self.get_inputs(call, dtype, dist)[0]
                t = {}
                for direction in ("fwd", "bwd"):
                    for mode in ("fast", "baseline") + (("det",) if direction == "bwd" else ()):
                        t[f"{direction} {mode}"] = self.time(self.fns(call, dtype, dist, direction, mode))
                fl = {d: floors_us(prob, d == "bwd", copy_gbs, sms) for d in ("fwd", "bwd")}
                rec = dict(call=call, dtype=dtype, dist=dist, t=t, floors=fl)
                self.results["baseline"].append(rec)
                f, b = t["fwd fast"], t["bwd fast"]
                rows.append(
                    f"| {call} | {dtype} | {dist} | {f['median']:.1f} ({f['p10']:.1f}-{f['p90']:.1f}) "
                    f"| {t['fwd baseline']['median']:.1f} | {t['fwd baseline']['median'] / f['median']:.2f}x "
                    f"| {100 * fl['fwd'][0] / f['median']:.0f}% ({fl['fwd'][0]:.1f}) | {fl['fwd'][1]:.1f} "
                    f"| {b['median']:.1f} ({b['p10']:.1f}-{b['p90']:.1f}) | {t['bwd baseline']['median']:.1f} "
                    f"| {t['bwd baseline']['median'] / b['median']:.2f}x | {t['bwd det']['median']:.1f} "
                    f"| {100 * fl['bwd'][0] / b['median']:.0f}% ({fl['bwd'][0]:.1f}) "
                    f"| {f['enqueue']:.0f}/{b['enqueue']:.0f} |")
                print(rows[-1], flush=True)
            except Exception as exc:
                rows.append(f"| {call} | {dtype} | {dist} | {self.error(f'baseline {call} {dtype} {dist}', exc)} |")
        note = (f"\nDevice time (events, median of {self.args.repeat} after warm-up, spin {self.args.spin_us:.0f} us "
                "ahead of each call). bwd = atomics mode incl. the grad_value memset (and the cast for half types). "
                "DRAM floor = bench_gpu.traffic_bytes / measured copy bandwidth; L1 floor = corner-gather bytes / "
                f"({L1_BYTES_PER_CLK_PER_SM} B/clk/SM x SMs x {SM_CLOCK_GHZ} GHz), an estimate. "
                "If 'enqueue' nears the spin time, the events include host gaps: rerun with a larger --spin-us.")
        self.section("Fast vs baseline kernels", "\n".join(rows) + "\n" + note)
        self.components()
        self.targets()

    def components(self):
        """How much of the backward is the grad_value buffer (memset) and the half cast."""
        rows = ["| call | dtype | zeros(acc) us | cast us |", "|---|---|---|---|"]
        for call in ("encoder1", "decoder"):
            for dtype in ("float32", "float16"):
                try:
                    prob = self.get_inputs(call, dtype, "uniform")[0]
                    acc_dtype = _cuda._acc_dtype(prob)
                    shape = (prob.N, prob.S, prob.M, prob.D)
                    xp = self.xp
                    z = self.time(lambda: xp.zeros(shape, dtype=acc_dtype))["median"]
                    if dtype == "float32":
                        c = "-"
                    else:
                        acc = xp.zeros(shape, dtype=acc_dtype)
                        c = f"{self.time(lambda: _cuda._finish_grad_value(self.rt, prob, acc, _cuda.DEFAULT_CONFIG))['median']:.1f}"
                    rows.append(f"| {call} | {dtype} | {z:.1f} | {c} |")
                except Exception as exc:
                    rows.append(f"| {call} | {dtype} | {self.error('components', exc)} | |")
        self.section("Backward components (device time)", "\n".join(rows))

    def targets(self):
        rows = ["| check | measured | target | verdict |", "|---|---|---|---|"]
        base = {(r["call"], r["dtype"], r["dist"]): r["t"] for r in self.results["baseline"]}
        for (call, dtype, direction), target in TARGETS.items():
            for dist in DISTS:
                t = base.get((call, dtype, dist))
                if t is None:
                    continue
                m = t[f"{direction} fast"]["median"]
                rows.append(f"| {call} {dtype} {direction} ({dist}) | {m:.1f} us | <= {target} us "
                            f"| {'PASS' if m <= target else 'MISS'} |")
        for dtype in MAIN_DTYPES:
            for dist in DISTS:
                t1, t2 = base.get(("encoder1", dtype, dist)), base.get(("encoder2", dtype, dist))
                if t1 is None or t2 is None:
                    continue
                for direction in ("fwd", "bwd"):
                    ratio = t2[f"{direction} fast"]["median"] / t1[f"{direction} fast"]["median"]
                    rows.append(f"| N=2 / N=1 {dtype} {direction} ({dist}) | {ratio:.2f}x | <= {N2_RATIO_TARGET}x "
                                f"| {'PASS' if ratio <= N2_RATIO_TARGET else 'MISS'} |")
        for rec in self.results["e2e"]:
            for direction in ("fwd", "bwd"):
                m = rec[direction]
                rows.append(f"| decoder end to end {rec['dtype']} {direction} | {m:.1f} us | <= {E2E_TARGET_US} us "
                            f"| {'PASS' if m <= E2E_TARGET_US else 'MISS'} |")
        self.section("Targets", "\n".join(rows))

    # ---- decoder end to end and host overhead
    def end_to_end(self):
        rows = ["| dtype | fwd us | bwd us | host: check_problem | host: _cuda.forward enqueue | "
                "host: _cuda.backward enqueue | empty kernel launch+sync |", "|---|---|---|---|---|---|---|"]
        for dtype in MAIN_DTYPES:
            try:
                if self.dry:
                    e2e = dict(fwd=float("nan"), bwd=float("nan"))
                else:
                    e2e = bench_gpu.end_to_end_us("decoder", dtype, max(self.args.repeat, 100))
                host = self.host_breakdown(dtype)
                self.results["e2e"].append(dict(dtype=dtype, **e2e))
                self.results["host"].append(dict(dtype=dtype, **host))
                rows.append(f"| {dtype} | {e2e['fwd']:.1f} | {e2e['bwd']:.1f} | {host['validate']:.1f} "
                            f"| {host['fwd_enqueue']:.1f} | {host['bwd_enqueue']:.1f} | {host['launch_sync']:.1f} |")
            except Exception as exc:
                rows.append(f"| {dtype} | {self.error('end to end ' + dtype, exc)} | |")
        self.section("Decoder call end to end (wall clock, public API, synchronised) and host overhead",
                     "\n".join(rows) + "\n\nHost columns: median wall time of the host-side step alone "
                     "(enqueue = the backend call returns before the GPU finishes; device idle before each).")
        self.targets()

    def host_breakdown(self, dtype, repeat=200):
        prob, value, shapes, starts, loc, attn, grad = self.get_inputs("decoder", dtype, "uniform")

        def med(fn, sync):
            ts = []
            for _ in range(repeat):
                sync()
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            sync()
            return statistics.median(ts) * 1e6

        if self.dry:
            sync = lambda: None  # noqa: E731
            launch_sync = float("nan")
            fwd = lambda: _cuda._forward(self.rt, prob, value, loc, attn)  # noqa: E731
            bwd = lambda: _cuda._backward(self.rt, prob, grad, value, loc, attn)  # noqa: E731
        else:
            stream = self.cupy.cuda.get_current_stream()
            sync = stream.synchronize
            k = self.cupy.RawKernel('extern "C" __global__ void cyd_empty() {}', "cyd_empty")
            launch_sync = med(lambda: (k((1,), (1,), ()), stream.synchronize()), lambda: None)
            fwd = lambda: _cuda.forward(prob, value, loc, attn)  # noqa: E731
            bwd = lambda: _cuda.backward(prob, grad, value, loc, attn)  # noqa: E731
        validate = med(lambda: _validate.check_problem(value, shapes, starts, loc, attn, _validate.GPU_DTYPES), sync)
        return dict(validate=validate, fwd_enqueue=med(fwd, sync), bwd_enqueue=med(bwd, sync), launch_sync=launch_sync)

    # ---- (c) experiments: one loop over the table
    def run_experiments(self):
        sms = self.results["meta"].get("sms", 132)
        head = ("| experiment | call | dtype | locations | dir | default us | variant us (p10-p90) | ratio "
                "(<1 = faster) | check | prediction |")
        rows = [head, "|" + "---|" * (head.count("|") - 1)]
        for ex in select(self.args.only):
            print(f"\n# experiment: {ex.name}\n  prediction: {ex.prediction}", flush=True)
            for i, (call, dtype, dist, direction) in enumerate(ex.cells()):
                cell = f"| {'' if i else ex.name} | {call} | {dtype} | {dist} | {direction} "
                pred = "" if i else ex.prediction
                if self.over_budget():
                    rows.append(cell + f"| skipped: time budget ({self.args.budget_s:.0f} s) | | | | | |")
                    continue
                try:
                    rows.append(cell + self.one_experiment(ex, sms, call, dtype, dist, direction, pred))
                except Exception as exc:
                    where = f"{ex.name} {call} {dtype} {dist} {direction}"
                    rows.append(cell + f"| {self.error(where, exc)} | | | | | {pred} |")
                print(rows[-1], flush=True)
            self.sections = [s for s in self.sections if s[0] != "Experiments"]
            self.sections.append(("Experiments", "\n".join(rows)))
            self.write()  # after every experiment: a run cut short keeps what it measured
        self.sections = [s for s in self.sections if s[0] != "Experiments"]
        self.section("Experiments", "\n".join(rows) + "\n\nratio = variant / default median, both timed in the "
                     "same run. A difference inside the 'repeat default' spread is noise.")

    def one_experiment(self, ex, sms, call, dtype, dist, direction, pred):
        default = self.time(self.fns(call, dtype, dist, direction), flush=False)
        fn = self.fns(call, dtype, dist, direction, call_kw={**dict(ex.call_kw), "config": ex.config(sms)})
        restore = self.set_carveout(ex, call, dtype, dist, direction) if ex.carveout is not None else None
        try:
            check = self.check(call, dtype, dist, direction, fn)
            var = self.time(fn, flush=ex.flush_l2)
        finally:
            if restore:
                restore()
        self.results["experiments"].append(dict(name=ex.name, call=call, dtype=dtype, dist=dist, direction=direction,
                                                default=default, variant=var, check=check, prediction=ex.prediction))
        ratio = var["median"] / default["median"]
        return (f"| {default['median']:.1f} | {var['median']:.1f} ({var['p10']:.1f}-{var['p90']:.1f}) "
                f"| {ratio:.2f} | {check} | {pred} |")

    def set_carveout(self, ex, call, dtype, dist, direction):
        """Set the preferred shared-memory carveout of the fast kernel; return a restorer."""
        if self.dry:
            return None
        from cupy.cuda import driver

        prob = self.get_inputs(call, dtype, dist)[0]
        index, lay = _cuda.index_ctype(prob), _cuda.channel_layout(prob, True)
        expr = (_cuda._fast_expr("msda_forward", prob, index, lay) if direction == "fwd"
                else _cuda._fast_expr("msda_backward", prob, index, lay, True))
        _, func = _cuda._cupy_function(expr, self.rt.device_id, _cuda.DEFAULT_CONFIG.options)
        attr = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
        driver.funcSetAttribute(func.ptr, attr, int(ex.carveout))
        return lambda: driver.funcSetAttribute(func.ptr, attr, -1)  # -1: no preference (the default)


# ---- dry-run extras -----------------------------------------------------------------

def dry_compile(session):
    """Compile every (expression, options) the dry run recorded, with NVRTC here."""
    try:
        import ptxas_report
    except Exception as exc:
        print(f"compile check skipped: {exc}")
        return
    by_opts = {}
    for expr, _, _, opts in session.rt.launched:
        by_opts.setdefault(opts, set()).add(expr)
    rows = ["| options | kernels | max regs | spills |", "|---|---|---|---|"]
    for opts, exprs in by_opts.items():
        extra = tuple(o for o in opts if o not in _cuda.DEFAULT_CONFIG.options)
        try:
            rep, _ = ptxas_report.compile_report(sorted(exprs), "sm_90", extra_options=extra)
            spills = [e for e, r in rep.items() if r["spill_st"] or r["spill_ld"]]
            rows.append(f"| {' '.join(opts)} | {len(exprs)} | {max(r['regs'] for r in rep.values())} "
                        f"| {len(spills)}: {', '.join(spills)[:300]} |")
        except Exception as exc:
            rows.append(f"| {' '.join(opts)} | {len(exprs)} | {session.error('compile', exc)} | |")
    session.section("Dry run: NVRTC compile of every recorded launch", "\n".join(rows))


def list_table(only=None, sms=132):
    """Print every selected experiment, its config and cells, and the validation; return the error count."""
    selected = select(only)
    errors = validate_table(selected, sms)
    for ex in selected:
        c = ex.config(sms) if not errors[ex.name] or not errors[ex.name][0].startswith("config") else None
        extra = ", ".join(f"{k}={v}" for k, v in ex.call_kw)
        print(f"{ex.name}: block={c and c.block} max_grid={c and c.max_grid} layout={c and c.layout} "
              f"options+={list(ex.options)} {extra} flush_l2={ex.flush_l2} carveout={ex.carveout} "
              f"cells={len(ex.cells())}: {'ok' if not errors[ex.name] else 'INVALID'}")
        for e in errors[ex.name]:
            print(f"  {e}")
    n = sum(map(len, errors.values()))
    print(f"{len(selected)} experiments, {sum(len(e.cells()) for e in selected)} cells, {n} errors")
    return n


# ---- main ------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="directory for tune_report.md and tune_results.json (required unless --list)")
    ap.add_argument("--repeat", type=int, default=100, help="timed runs per measurement (median; >= 100)")
    ap.add_argument("--spin-us", type=float, default=500.0, help="spin kernel ahead of each timed call (us)")
    ap.add_argument("--budget-s", type=float, default=230.0, help="start no new measurement after this many seconds")
    ap.add_argument("--only", nargs="*", help="run only experiments whose name contains one of these")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ptxas", "baseline", "e2e", "experiments"])
    ap.add_argument("--dry-run", action="store_true", help="no GPU: fake timer, recording runtime")
    ap.add_argument("--compile", action="store_true", help="with --dry-run: NVRTC-compile every recorded launch")
    ap.add_argument("--list", action="store_true", help="no GPU: list and validate the experiment table, then exit")
    ap.add_argument("--verbose", action="store_true", help="print tracebacks")
    args = ap.parse_args(argv)
    if args.out is None and not args.list:
        ap.error("--out is required (unless --list)")
    if args.repeat < 100 and not args.dry_run:
        ap.error("--repeat must be >= 100 (median of >= 100 runs)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        return 1 if list_table(args.only) else 0
    s = Session(args)
    steps = [("device", s.device)]
    if "ptxas" not in args.skip:
        steps.append(("ptxas", s.ptxas))
    if "baseline" not in args.skip:
        steps.append(("baseline", s.baseline))
    if "e2e" not in args.skip:
        steps.append(("e2e", s.end_to_end))
    if "experiments" not in args.skip:
        steps.append(("experiments", s.run_experiments))
    for name, fn in steps:
        try:
            fn()
        except Exception as exc:
            s.error(name, exc)
            s.write()
    if args.dry_run and args.compile:
        dry_compile(s)
    s.results["meta"]["elapsed_s"] = s.elapsed()
    s.write()
    print(f"\nwrote {s.out / 'tune_report.md'} and tune_results.json in {s.elapsed():.0f} s; "
          f"{len(s.results['errors'])} errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
