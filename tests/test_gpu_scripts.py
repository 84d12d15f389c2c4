"""Dry runs of the scripts a lent GPU runs once (benchmarks/gpu_check.sh, tune_gpu.py):
their own logic, with every GPU call replaced, so a typo cannot waste the GPU."""
from __future__ import annotations

import os
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_a_report_of_every_stage(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = tmp_path / "gpu_check"
    report = (logs / "report.md").read_text()
    for stage in ("Install", "tests/test_gpu.py", "memcheck", "initcheck", "Benchmark"):
        assert f"{stage}" in report and "(exit 0 (dry run))" in report, stage
    commands = {name: (logs / f"{name}.log").read_text() for name in ("install", "tests", "memcheck", "initcheck",
                                                                       "bench")}
    assert "pip install --no-build-isolation -e ." in commands["install"]
    assert "tests/test_gpu.py" in commands["tests"]
    assert "--tool memcheck" in commands["memcheck"] and "sanitize_cases.py" in commands["memcheck"]
    assert "--tool initcheck" in commands["initcheck"] and "sanitize_cases.py" in commands["initcheck"]
    assert "cydeform.bench.gpu" in commands["bench"]
    limits = [int(line.split("timeout ")[1].split()[0]) for line in commands.values()]
    assert sum(limits) < 360, f"stage limits sum to {sum(limits)} s: over 6 minutes"
    for script in ("sanitize_cases.py", "tune_gpu.py", "ptxas_report.py"):
        py_compile.compile(str(ROOT / "benchmarks" / script), doraise=True)


def test_tune_gpu_dry_run(tmp_path):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    proc = subprocess.run([sys.executable, "tune_gpu.py", "--out", str(tmp_path), "--dry-run",
                           "--skip", "ptxas"], cwd=ROOT / "benchmarks", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 errors" in proc.stdout, proc.stdout[-3000:]
    assert (tmp_path / "tune_report.md").read_text().count("FAKE") > 0


def test_tune_gpu_list_validates_every_experiment():
    proc = subprocess.run([sys.executable, "tune_gpu.py", "--list"], cwd=ROOT / "benchmarks", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Every experiment the script ran before it became a table is still in it.
    for name in ("repeat default", "shared geometry (forward)", "layout J=4 G=2", "layout J=8 G=1", "layout J=1 G=8",
                 "layout J=4 G=1", "layout J=2 G=2", "layout J=4 G=4", "layout J=1 G=16", "maxrregcount=64:",
                 "BLOCK=128", "BLOCK=512", "BLOCK=64", "maxrregcount=64 + BLOCK=128", "maxrregcount=48",
                 "specialize off", "64-bit offsets", "persistent grid", "L1 carveout 0", "cold L2"):
        assert name in proc.stdout, name
    assert "20 experiments, 118 cells, 0 errors" in proc.stdout, proc.stdout[-2000:]
