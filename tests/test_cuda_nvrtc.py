"""Every CUDA kernel variant the backend can launch compiles with NVRTC, without spills.

Compiles ``cydeform._cuda.kernel_source()`` (the exact text the backend hands to
``cupy.RawModule``) for sm_70, sm_80 and sm_90 through the runtime's own compile path and options
(``cydeform._nvrtc``: -ftz=false etc.), asks ptxas
for its resource report and fails on any spill. Needs only NVRTC (no GPU, no CUDA
toolkit); skipped when CuPy's NVRTC bindings or the NVRTC library are missing.

Run as a script to print the register table: ``python tests/test_cuda_nvrtc.py sm_90``.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cydeform import _cuda, _nvrtc, _validate

nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="CuPy's NVRTC bindings are not installed")

try:
    NVRTC_VERSION = nvrtc.getVersion()
except Exception as exc:  # the shared library itself may be absent
    pytest.skip(f"NVRTC is not available: {exc}", allow_module_level=True)

ARCHS = ["sm_70", "sm_80", "sm_90"]
DTYPES = ["float32", "float64", "float16", "bfloat16"]
ENCODER_LEVELS = np.array([[100, 167], [50, 84], [25, 42], [13, 21]], dtype=np.int64)
SMALL_LEVELS = np.array([[64, 64], [32, 32], [16, 16], [8, 8]], dtype=np.int64)


def _problem(dtype, N, Lq, M, D, P, levels):
    """A Problem with only metadata: nothing is allocated, so any size is fine."""
    sizes = levels[:, 0] * levels[:, 1]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return _validate.Problem(N, int(sizes.sum()), M, D, Lq, len(levels), P, np.dtype(dtype), levels, starts)


def variant_expressions(dtype):
    """The kernels of the benchmark and common shapes, every mode and fallback:
    compile-time (fast) and runtime-size (generic, vector and scalar) kernels, baseline,
    deterministic key/gather kernels, 32- and 64-bit offsets, 32- and 64-bit keys."""
    S = int((ENCODER_LEVELS[:, 0] * ENCODER_LEVELS[:, 1]).sum())
    problems = [
        _problem(dtype, 1, S, 8, 32, 4, ENCODER_LEVELS),     # encoder
        _problem(dtype, 2, 300, 8, 32, 4, ENCODER_LEVELS),   # decoder
        _problem(dtype, 2, 300, 8, 32, 4, SMALL_LEVELS),     # common small benchmark
        _problem(dtype, 2, 300, 8, 64, 4, SMALL_LEVELS),     # wider heads
        _problem(dtype, 2, 300, 1, 256, 1, SMALL_LEVELS[:1]),  # deformable-conv style: L = P = 1, D = C
        _problem(dtype, 2, 300, 8, 9, 3, SMALL_LEVELS[:2]),  # odd D: scalar generic path
    ]
    huge = _problem(dtype, 16384, S, 8, 32, 4, ENCODER_LEVELS)  # offsets and cell keys past 2**31
    exprs = []
    for prob in problems:
        for specialize in (True, False):
            for index64 in (False, True):
                for aligned in (True, False):
                    exprs += _cuda.kernel_expressions(prob, aligned=aligned, specialize=specialize, index64=index64,
                                                      experimental=True)
    exprs += _cuda.kernel_expressions(huge)
    assert any("long long>" in e for e in exprs if e.startswith("msda_cell_keys"))
    return sorted(set(exprs))


def expressions_for(dtype):
    """variant_expressions, with bfloat16 derived from float16 when ml_dtypes (which
    NumPy needs to spell bfloat16) is missing: both have 2-byte elements, so the
    backend picks the same variants and only the element type differs."""
    if dtype == "bfloat16":
        try:
            import ml_dtypes  # noqa: F401
        except ImportError:
            return [e.replace("cyd_half", "cyd_bf16") for e in variant_expressions("float16")]
    return variant_expressions(dtype)


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def compile_and_report(exprs, arch):
    """Compile ``exprs`` in one NVRTC program with the runtime's own compile path and
    options (``_nvrtc.compile_program``, ``DEFAULT_CONFIG.options``); return
    {expr: (registers, spill stores, spill loads)} from ptxas' report."""
    try:
        program = _nvrtc.compile_program(_cuda.kernel_source(), exprs, arch, _cuda.DEFAULT_CONFIG.options,
                                         ptxas_verbose=True)
    except _nvrtc.NvrtcError as exc:
        pytest.fail(str(exc))
    assert program.cubin, "no cubin produced"
    lowered = {v: k for k, v in program.lowered.items()}
    report, current = {}, None
    for line in program.log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = lowered.get(m.group(1))
            assert m.group(2) == arch
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            report[current] = (None, int(m.group(1)), int(m.group(2)))
        m = _REGS.search(line)
        if m and current in report:
            report[current] = (int(m.group(1)), *report[current][1:])
    return report


@functools.lru_cache(maxsize=None)
def _reports():
    """Every (dtype, arch) report, compiled two at a time (NVRTC releases the GIL)."""
    jobs = [(dt, arch) for dt in DTYPES for arch in ARCHS if int(arch[3:]) in nvrtc.getSupportedArchs()]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        futures = {job: pool.submit(compile_and_report, expressions_for(job[0]), job[1]) for job in jobs}
    return {job: f.result() for job, f in futures.items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_variant_compiles_without_spills(dtype, arch):
    supported = nvrtc.getSupportedArchs()
    if int(arch[3:]) not in supported:  # e.g. CUDA 13 dropped sm_70
        pytest.skip(f"NVRTC {NVRTC_VERSION} cannot target {arch}")
    exprs = expressions_for(dtype)
    report = _reports()[(dtype, arch)]
    missing = [e for e in exprs if e not in report]
    assert not missing, f"ptxas reported nothing for {missing}"
    spills = {e: r for e, r in report.items() if r[1] or r[2]}
    assert not spills, f"register spills on {arch}: {spills}"
    assert all(r[0] is not None and r[0] <= 255 for r in report.values())


def test_variant_list_covers_every_kernel_family():
    exprs = variant_expressions("float16")
    for family in ("msda_forward<", "msda_forward_baseline<", "msda_backward<", "msda_backward_baseline<",
                   "msda_cell_keys<", "msda_segment_starts<", "msda_row_pieces", "msda_grad_value_pieces<",
                   "msda_grad_value_gather<", "cast_from_float<", "msda_forward_shared<"):
        assert any(e.startswith(family) for e in exprs), family
    fast = [e for e in exprs if e.startswith("msda_forward<")]
    assert any(", 4, 4, 32," in e for e in fast) and any(", 0, 0, 0," in e for e in fast)
    assert any("true>" in e for e in fast) and any("false>" in e for e in fast)
    assert any(", long long," in e for e in fast) and any(", int," in e for e in fast)


if __name__ == "__main__":
    arch = sys.argv[1] if len(sys.argv) > 1 else "sm_90"
    for dt in DTYPES:
        for e, (regs, st, ld) in sorted(compile_and_report(expressions_for(dt), arch).items()):
            print(f"| {arch} | `{e}` | {regs} | {st} | {ld} |")


def test_runtime_compiles_exactly_what_this_test_checks():
    """The runtime's per-kernel compile (``_cuda.compile_kernel``) produces the same
    machine code as this test's batch compile: same source, same options."""
    prob = _problem("float32", 2, 300, 8, 32, 4, SMALL_LEVELS)
    expr = _cuda.kernel_expressions(prob)[0]
    runtime = _cuda.compile_kernel(expr, "sm_90")
    assert "-ftz=false" in _cuda.DEFAULT_CONFIG.options and "-ftz=true" not in _cuda.DEFAULT_CONFIG.options
    checked = _nvrtc.compile_program(_cuda.kernel_source(), (expr,), "sm_90", _cuda.DEFAULT_CONFIG.options,
                                     ptxas_verbose=True, use_cache=False)
    assert runtime.cubin == checked.cubin
    flushed = _nvrtc.compile_program(_cuda.kernel_source(), (expr,), "sm_90",
                                     [o for o in _cuda.DEFAULT_CONFIG.options if not o.startswith("-ftz")]
                                     + ["-ftz=true"], use_cache=False)
    assert flushed.cubin != runtime.cubin  # the flag reaches the code (else the check above proves little)
