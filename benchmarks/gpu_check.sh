#!/usr/bin/env bash
# One-shot GPU check (under 6 minutes on one GPU):
#   1. build and install the project (editable, no build isolation),
#   2. tests/test_gpu.py with a moderate hypothesis profile,
#   3. compute-sanitizer memcheck on every kernel (benchmarks/sanitize_cases.py),
#   4. the GPU benchmark (python -m cydeform.bench.gpu),
# then writes benchmarks/results/<date>-<gpu-name>.md (and a copy to $OUT if set).
# Each stage has a time limit so the script always finishes and reports.
# Exit status: non-zero if the build, a test or the sanitizer failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGDIR=$(mktemp -d)
status=0

stage() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

stage "install"
if timeout 100 "$PY" -m pip install --no-build-isolation -e . >"$LOGDIR/install.log" 2>&1; then
    install_result="ok"
else
    install_result="FAILED (exit $?); last lines:"$'\n\n```\n'"$(tail -20 "$LOGDIR/install.log")"$'\n```'
    status=1
fi
echo "$install_result" | head -1

gpu=$("$PY" -c "import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); n = p['name']; print(n.decode() if isinstance(n, bytes) else n)" 2>/dev/null || echo "unknown-gpu")
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
cupy_version=$("$PY" -c "import cupy; print(cupy.__version__)" 2>/dev/null || echo "not importable")
echo "GPU: $gpu, driver ${driver:-unknown}, CuPy $cupy_version"

stage "tests/test_gpu.py"
HYPOTHESIS_PROFILE=ci timeout 130 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -ra \
    2>&1 | tee "$LOGDIR/tests.log"
tests_rc=${PIPESTATUS[0]}
[ "$tests_rc" -eq 0 ] || status=1

stage "compute-sanitizer memcheck"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
if [ -n "$sanitizer" ]; then
    timeout 90 "$sanitizer" --tool memcheck --error-exitcode 1 --print-limit 20 \
        "$PY" benchmarks/sanitize_cases.py 2>&1 | tee "$LOGDIR/sanitizer.log"
    sanitizer_rc=${PIPESTATUS[0]}
    [ "$sanitizer_rc" -eq 0 ] || status=1
    sanitizer_result="exit $sanitizer_rc ($sanitizer)"$'\n\n```\n'"$(grep -E 'ERROR SUMMARY|cases|BAD|Invalid|unexpected' "$LOGDIR/sanitizer.log" | head -30)"$'\n```'
else
    sanitizer_result="skipped: compute-sanitizer not found on PATH or under /usr/local/cuda*/bin"
    echo "$sanitizer_result"
fi

stage "benchmark"
timeout 100 "$PY" -m cydeform.bench.gpu --repeat 100 2>&1 | tee "$LOGDIR/bench.log"
bench_rc=${PIPESTATUS[0]}

mkdir -p benchmarks/results
slug=$(echo "$gpu" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
report="benchmarks/results/$(date +%Y-%m-%d)-${slug}.md"
{
    echo "# GPU check: $gpu"
    echo
    echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
    echo "- GPU: $gpu"
    echo "- driver: ${driver:-unknown}"
    echo "- CuPy: $cupy_version"
    echo "- Python: $("$PY" --version 2>&1)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo
    echo "## Install"
    echo
    echo "$install_result"
    echo
    echo "## tests/test_gpu.py (exit $tests_rc)"
    echo
    echo '```'
    grep -E "passed|failed|error|skipped|SKIPPED|FAILED|ERROR" "$LOGDIR/tests.log" | tail -30
    echo '```'
    echo
    echo "## compute-sanitizer memcheck"
    echo
    echo "$sanitizer_result"
    echo
    echo "## Benchmark (exit $bench_rc)"
    echo
    cat "$LOGDIR/bench.log"
} >"$report"
echo
echo "report: $report"
if [ -n "${OUT:-}" ]; then
    cp "$report" "$OUT/" && echo "copied to $OUT/$(basename "$report")"
fi
rm -rf "$LOGDIR"
exit $status
