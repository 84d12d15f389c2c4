"""ptxas resource report and theoretical occupancy of every CUDA kernel variant the
backend produces for the benchmark shapes, plus the variants benchmarks/tune_gpu.py
tries.

    python benchmarks/ptxas_report.py [--arch sm_90] [--date 2026-11-26] [--sass] > benchmarks/ptxas_sm90.md

Needs only NVRTC (CuPy's bindings; no GPU). Compiles ``_cuda.kernel_source()`` (the
exact text the backend hands to ``cupy.RawModule``) with the backend's own
``DEFAULT_CONFIG.options`` (``cydeform._nvrtc``, the runtime's compile path) and name expressions (``_cuda.kernel_expressions``), asks ptxas for
its resource report (``--ptxas-options=-v``) and computes the occupancy on sm_90
(Hopper: 65536 registers per SM in 4 sub-partitions, at most 64 warps and 32 blocks per
SM, registers allocated per warp in units of 256, 228 KB shared memory per SM with
1 KB reserved per block) for 256-thread blocks (``_cuda.DEFAULT_CONFIG.block``), the way CUDA's
occupancy calculator does (cuda_occupancy.h).

``--sass``: also count instruction classes in the SASS of the encoder kernels (needs
``cuobjdump`` and ``nvdisasm`` on PATH, or $CUOBJDUMP).

Imported by tune_gpu.py (``compile_report``, ``occupancy``) to print the same table for
the NVRTC of the GPU machine.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from cydeform import _cuda, _nvrtc, _validate  # noqa: E402
from cydeform.bench.problems import LEVELS, D, M, P  # noqa: E402
import tuning_table  # noqa: E402

# ---- sm_90 occupancy (cuda_occupancy.h's arithmetic, Hopper limits) ----------------

SM90 = dict(regs_per_sm=65536, sub_partitions=4, reg_unit=256, max_warps=64, max_blocks=32,
            smem_per_sm=228 * 1024, smem_reserved_per_block=1024, regs_per_block=65536, warp=32)


def occupancy(regs, smem=0, block=256, lim=SM90):
    """(blocks per SM, active warps per SM, occupancy fraction, limiter) for a kernel
    using ``regs`` registers per thread and ``smem`` bytes of static shared memory."""
    warps_per_block = -(-block // lim["warp"])
    regs_per_warp = -(-regs * lim["warp"] // lim["reg_unit"]) * lim["reg_unit"]
    limits = {"warps": lim["max_warps"] // warps_per_block, "blocks": lim["max_blocks"]}
    if regs_per_warp * warps_per_block > lim["regs_per_block"]:
        limits["regs"] = 0
    else:
        per_sub = (lim["regs_per_sm"] // lim["sub_partitions"]) // regs_per_warp
        limits["regs"] = per_sub * lim["sub_partitions"] // warps_per_block
    limits["smem"] = lim["smem_per_sm"] // (smem + lim["smem_reserved_per_block"])
    blocks = min(limits.values())
    order = ["warps", "blocks", "smem", "regs"]  # on a tie, name the hard limit first
    limiter = min(limits, key=lambda k: (limits[k], order.index(k)))
    warps = blocks * warps_per_block
    return blocks, warps, warps / lim["max_warps"], limiter


def max_regs_for(warps_per_sm, lim=SM90):
    """Largest register count per thread that still allows ``warps_per_sm`` (per-warp allocation)."""
    per_sub = -(-warps_per_sm // lim["sub_partitions"])
    regs_per_warp = (lim["regs_per_sm"] // lim["sub_partitions"]) // per_sub
    return (regs_per_warp // lim["reg_unit"]) * lim["reg_unit"] // lim["warp"]


def threshold_text(block=256):
    """'<= R regs: B blocks (occ)' for each step of the occupancy staircase."""
    steps, prev = [], None
    for regs in range(1, 256):
        b, w, o, _ = occupancy(regs, 0, block)
        if prev is not None and b != prev[1]:
            steps.append(f"<= {regs - 1}: {prev[1]} blocks ({prev[2]:.1%})")
        prev = (regs, b, o)
    steps.append(f"<= 255: {prev[1]} blocks ({prev[2]:.1%})")
    return "; ".join(steps)


# ---- problems of the benchmark --------------------------------------------------------

DTYPES = ["float32", "float16", "bfloat16", "float64"]


def _np_dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def problem(call, dtype):
    """Metadata-only Problem of a benchmark call (bench_gpu.CALLS); nothing allocated."""
    from cydeform.bench.gpu import CALLS

    _, N, Lq = CALLS[call]
    sizes = LEVELS[:, 0] * LEVELS[:, 1]
    S = int(sizes.sum())
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return _validate.Problem(N, S, M, D, S if Lq is None else Lq, len(LEVELS), P, _np_dtype(dtype), LEVELS, starts)


def _with_dtype(fn, call, dtype):
    """fn(problem) for ``dtype``; bfloat16 derived from float16 when ml_dtypes is missing
    (both 2-byte: the backend picks the same variants, only the element type differs)."""
    try:
        return fn(problem(call, dtype)), False
    except ImportError:
        if dtype != "bfloat16":
            raise
        out = fn(problem(call, "float16"))
        swap = (lambda e: e.replace("cyd_half", "cyd_bf16"))
        if isinstance(out, dict):
            return {swap(k): v for k, v in out.items()}, True
        return [swap(e) for e in out], True


def role(expr):
    """Human name of a kernel variant from its name expression."""
    name, _, args = expr.partition("<")
    a = [x.strip() for x in args.rstrip(">").split(",")]
    if name in ("msda_forward", "msda_backward"):
        L_t, C, J, G_t, vec = a[2], a[5], a[6], a[7], a[8]
        kind = "fast" if L_t != "0" else ("runtime-size vector" if vec == "true" else "runtime-size scalar")
        what = "fwd" if name == "msda_forward" else ("bwd atomics" if a[9] == "true" else "bwd no-dV (deterministic)")
        lay = f"C={C} J={J} G={G_t if G_t != '0' else 'rt'}"
        return f"{what}, {kind} ({lay})"
    return {
        "msda_forward_baseline": "fwd baseline (thread per output)",
        "msda_backward_baseline": "bwd baseline (thread per point)",
        "msda_cell_keys": "det: cell keys",
        "msda_segment_starts": "det: segment starts",
        "msda_row_pieces": "det: pieces per value row",
        "msda_grad_value_pieces": "det: grad_value pieces (split rows)",
        "msda_grad_value_gather": "det: grad_value gather",
        "msda_forward_shared": "fwd shared geometry (experiment)",
        "cast_from_float": "cast float32 -> half",
    }.get(name, name)


def benchmark_expressions(dtype):
    """{expr: set of 'call/mode' labels} for every variant of the benchmark calls."""
    from cydeform.bench.gpu import CALLS

    used = defaultdict(set)
    derived = False
    for call in CALLS:
        for label, kw in (("default", dict(aligned=True, specialize=True)),
                          ("specialize off", dict(aligned=True, specialize=False)),
                          ("misaligned", dict(aligned=False, specialize=True))):
            exprs, d = _with_dtype(lambda p: _cuda.kernel_expressions(p, **kw), call, dtype)
            derived |= d
            for e in exprs:
                used[e].add(f"{call}:{label}")
    return used, derived


# ---- NVRTC + ptxas -------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")
_SMEM = re.compile(r"(\d+) bytes smem")


def nvrtc_module():
    from cupy_backends.cuda.libs import nvrtc

    return nvrtc


def nvrtc_version():
    try:
        v = nvrtc_module().getVersion()
        return f"{v[0]}.{v[1]}"
    except Exception as exc:  # pragma: no cover
        return f"unavailable ({exc})"


def compile_report(exprs, arch="sm_90", extra_options=(), want_cubin=False):
    """Compile ``exprs`` in one NVRTC program with the backend's options (+ extra).

    Returns ({expr: dict(regs, stack, spill_st, spill_ld, smem, barriers)}, cubin bytes or None).
    """
    exprs = list(dict.fromkeys(exprs))
    options = (*_cuda.DEFAULT_CONFIG.options, *extra_options)
    try:
        program = _nvrtc.compile_program(_cuda.kernel_source(), exprs, arch, options, ptxas_verbose=True)
    except _nvrtc.NvrtcError as exc:
        raise RuntimeError(str(exc)) from exc
    log = program.log
    lowered = {v: k for k, v in program.lowered.items()}
    report, current = {}, None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = lowered.get(m.group(1))
            if current is not None:
                report[current] = dict(regs=None, stack=0, spill_st=0, spill_ld=0, smem=0, barriers=0,
                                       mangled=m.group(1))
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            report[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = _REGS.search(line)
        if m:
            report[current]["regs"] = int(m.group(1))
            if m.group(2):
                report[current]["barriers"] = int(m.group(2))
            s = _SMEM.search(line)
            if s:
                report[current]["smem"] = int(s.group(1))
    return report, (program.cubin if want_cubin else None)


def compile_variants(dtype):
    """(label, expressions, extra NVRTC options) of the variants benchmarks/tune_gpu.py tries."""
    out = []
    try:
        prob = problem("encoder1", dtype)
        swap = None
    except ImportError:  # bfloat16 without ml_dtypes: derive from float16
        prob = problem("encoder1", "float16")
        swap = "cyd_bf16"
    itemsize = np.dtype(prob.dtype).itemsize
    index = _cuda.index_ctype(prob)

    def fix(exprs):
        return [e.replace("cyd_half", swap) for e in exprs] if swap else exprs

    for (J, G), label, _ in tuning_table.LAYOUTS[itemsize]:
        lay = tuning_table.make_layout(prob, J, G)
        exprs = [_cuda._fast_expr("msda_forward", prob, index, lay),
                 _cuda._fast_expr("msda_backward", prob, index, lay, True),
                 _cuda._fast_expr("msda_backward", prob, index, lay, False)]
        out.append((f"layout {label.split(':')[0]}", fix(exprs), ()))
    lay = _cuda.channel_layout(prob, True)
    fast = [_cuda._fast_expr("msda_forward", prob, index, lay),
            _cuda._fast_expr("msda_backward", prob, index, lay, True),
            _cuda._fast_expr("msda_backward", prob, index, lay, False)]
    for cap, _ in tuning_table.REG_CAPS:
        out.append((f"--maxrregcount={cap}", fix(fast), (f"--maxrregcount={cap}",)))
    return out


# ---- SASS instruction classes (optional) ---------------------------------------------

SASS_CLASSES = [  # (column, regex on the opcode)
    ("LDG.128", r"^LDG\..*128"),
    ("LDG other", r"^LDG(?!.*128)"),
    ("RED/ATOM", r"^(RED|ATOM)"),
    ("SHFL", r"^SHFL"),
    ("fp64 (D*)", r"^D(ADD|MUL|FMA|SETP)"),
    ("conv (F2I/F2F/I2F/FRND)", r"^(F2I|F2F|I2F|FRND)"),
    ("FFMA/FMUL/FADD", r"^F(FMA|MUL|ADD)$|^F(FMA|MUL|ADD)\."),
    ("LDL/STL", r"^(LDL|STL)"),
    ("total", r"."),
]


def sass_counts(cubin, mangled_names):
    """{mangled: {class: count}} from cuobjdump -sass, or None when the tools are missing."""
    tool = os.environ.get("CUOBJDUMP") or shutil.which("cuobjdump")
    if not tool:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        # CuPy's getCUBIN drops the last byte of the ELF image (it treats it as a C string):
        # pad so cuobjdump can read the program headers.
        path.write_bytes(bytes(cubin) + b"\0" * 8)
        proc = subprocess.run([tool, "-sass", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    counts, current = {}, None
    op_re = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[0-7T]\s+)?([A-Z][A-Z0-9_.]*)")
    for line in proc.stdout.splitlines():
        if "Function :" in line:
            current = line.split("Function :", 1)[1].strip()
            counts[current] = defaultdict(int)
            continue
        if current is None:
            continue
        m = op_re.search(line)
        if not m or m.group(1).startswith("NOP"):
            continue
        op = m.group(1)
        for col, pat in SASS_CLASSES:
            if re.search(pat, op):
                counts[current][col] += 1
    return {k: counts.get(k) for k in mangled_names}


def issue_floor_us(expr, total_instr, call="encoder1", clock_ghz=1.755, sms=132):
    """Instruction-issue floor of a fully unrolled fast kernel (compile-time L, P, D):
    warps x static SASS count / (4 schedulers x SMs x clock). None for other kernels
    (their loops make the static count meaningless)."""
    name, _, args = expr.partition("<")
    a = [x.strip() for x in args.rstrip(">").split(",")]
    if name not in ("msda_forward", "msda_backward") or a[2] == "0":
        return None
    G = int(a[7])
    prob = problem(call, "float32")
    warps = prob.N * prob.Lq * prob.M * G / 32
    return warps * total_instr / (4 * sms * clock_ghz * 1e3)


def sass_table(out, entries):
    """entries: [(label, {expr: mangled}, cubin)]; prints one row per kernel."""
    cols = [c for c, _ in SASS_CLASSES]
    out("| variant | kernel | " + " | ".join(cols) + " | issue floor us (encoder1, 1.755 GHz) |")
    out("|" + "---|" * (len(cols) + 3))
    any_counts = False
    for label, names, cubin in entries:
        counts = sass_counts(cubin, list(names.values()))
        if counts is None:
            continue
        for e, mangled in sorted(names.items(), key=lambda kv: role(kv[0])):
            c = counts.get(mangled)
            if not c:
                continue
            any_counts = True
            fl = issue_floor_us(e, c.get("total", 0))
            out(f"| {label} | {role(e)} | " + " | ".join(str(c.get(col, 0)) for col in cols)
                + f" | {'-' if fl is None else f'{fl:.0f}'} |")
    if not any_counts:
        out("(cuobjdump/nvdisasm not found: no SASS counts)")
    out("")


# ---- the report -----------------------------------------------------------------------

def fmt_row(expr, r, used=None, block=256):
    blocks, warps, occ, limiter = occupancy(r["regs"], r["smem"], block)
    spill = f"{r['spill_st']}/{r['spill_ld']}"
    cells = [role(expr), f"`{expr}`", str(r["regs"]), spill, str(r["stack"]), str(r["smem"]),
             f"{blocks} x {block // 32} = {warps}", f"{occ:.1%}", limiter]
    if used is not None:
        cells.append(", ".join(sorted(used)))
    return "| " + " | ".join(cells) + " |"


HEADER = ("| role | name expression | regs | spill st/ld B | stack B | smem B | blocks x warps/SM "
          "| occupancy | limit |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--sass", action="store_true", help="count SASS instruction classes (needs cuobjdump+nvdisasm)")
    ap.add_argument("--no-tuning", action="store_true", help="skip the tune_gpu.py experiment variants")
    args = ap.parse_args(argv)

    out = print
    out(f"# ptxas resource report, {args.arch}\n")
    out(f"- generated by `python benchmarks/ptxas_report.py --arch {args.arch}"
        f"{' --sass' if args.sass else ''}` on {args.date}")
    out(f"- NVRTC {nvrtc_version()} (the GPU machine's CuPy uses NVRTC 13.x: registers can differ; "
        "tune_gpu.py prints the same table there)")
    out(f"- options: `{' '.join(['--gpu-architecture=' + args.arch, *_cuda.DEFAULT_CONFIG.options])}`")
    out("- occupancy: computed for sm_90 (65536 regs/SM in 4 sub-partitions, registers per warp rounded up "
        "to 256, max 64 warps and 32 blocks/SM, 228 KB smem/SM with 1 KB reserved per block), "
        f"{_cuda.DEFAULT_CONFIG.block}-thread blocks. 'limit' names the resource that binds.")
    out(f"- register thresholds for {_cuda.DEFAULT_CONFIG.block}-thread blocks (computed): " + threshold_text(_cuda.DEFAULT_CONFIG.block) + ".")
    out("- calls: encoder1 = N=1, Lq=S=22223; encoder2 = N=2; decoder = N=1, Lq=300 "
        "(levels 100x167, 50x84, 25x42, 13x21; M=8, D=32, L=P=4). Modes: default (aligned, compile-time sizes), "
        "specialize off (runtime-size vector), misaligned (runtime-size scalar).\n")

    sass_wanted = []
    for dtype in DTYPES:
        used, derived = benchmark_expressions(dtype)
        rep, cubin = compile_report(used, args.arch, want_cubin=args.sass)
        note = " (expressions derived from float16: ml_dtypes missing here)" if derived else ""
        out(f"## {dtype}{note}\n")
        out(HEADER + " used by |")
        out("|" + "---|" * (HEADER.count("|")))
        for e in sorted(used, key=lambda e: (role(e), e)):
            if e not in rep or rep[e]["regs"] is None:
                out(f"| {role(e)} | `{e}` | ptxas reported nothing | | | | | | | |")
                continue
            out(fmt_row(e, rep[e], used[e]))
        out("")
        if args.sass:
            fast = [e for e in used if e.startswith(("msda_forward", "msda_backward"))
                    and "encoder1:default" in used[e]]
            sass_wanted.append((dtype, {e: rep[e]["mangled"] for e in fast if e in rep}, cubin))

    if args.sass:
        out("## SASS instruction counts, encoder kernels\n")
        out("Static counts per kernel (the fast kernels are fully unrolled over L*P = 16 points, so for them the "
            "static count is what each thread executes once). 'issue floor' = warps x count / (4 schedulers x "
            "132 SMs x 1.755 GHz): the time if every scheduler issued one instruction per clock, a lower bound "
            "that ignores memory.\n")
        sass_table(out, sass_wanted)

    if not args.no_tuning:

        out("## Variants benchmarks/tune_gpu.py tries (encoder1, aligned)\n")
        out("Channel layouts other than the default, and register caps (`--maxrregcount`) on the default "
            "fast kernels. Occupancy for each block size the script tries where it differs.\n")
        out(HEADER + " experiment |")
        out("|" + "---|" * (HEADER.count("|")))
        tuning_sass = []
        for dtype in DTYPES:
            for label, exprs, opts in compile_variants(dtype):
                try:
                    rep, cubin = compile_report(exprs, args.arch, extra_options=opts, want_cubin=args.sass)
                    if args.sass:
                        tuning_sass.append((f"{dtype} {label}", {e: rep[e]["mangled"] for e in exprs if e in rep}, cubin))
                except Exception as exc:
                    out(f"| {label} | compile failed: {str(exc).splitlines()[0]} | | | | | | | | |")
                    continue
                for e in exprs:
                    if e in rep and rep[e]["regs"] is not None:
                        out(fmt_row(e, rep[e], {f"{dtype}: {label}"}))
        out("")
        if args.sass:
            out("### SASS instruction counts of these variants\n")
            sass_table(out, tuning_sass)
        out("### Occupancy by block size for the register counts above\n")
        out("| regs | 64 | 128 | 256 | 512 |")
        out("|---|---|---|---|---|")
        for regs in (32, 40, 48, 56, 64, 66, 72, 76, 80, 90, 96, 110, 128):
            cells = []
            for block in (64, 128, 256, 512):
                b, w, o, _ = occupancy(regs, 0, block)
                cells.append(f"{w} warps ({o:.0%})")
            out(f"| {regs} | " + " | ".join(cells) + " |")
        out("")


if __name__ == "__main__":
    main()
