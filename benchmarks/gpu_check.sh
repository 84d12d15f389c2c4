#!/usr/bin/env bash
# One-shot GPU check, for a bare device machine (stage limits sum to 350 s):
#   1. build the CPU extension and install the project (editable, no build isolation:
#      the *.so files are not carried to the device machine),
#   2. the GPU tests (tests/test_gpu.py) with the 'ci' hypothesis profile,
#   3. compute-sanitizer memcheck and initcheck on every kernel, results compared with
#      the CPU backend (benchmarks/sanitize_cases.py),
#   4. the GPU benchmark (python -m cydeform.bench.gpu).
# Every stage's output goes to $OUT/gpu_check/<stage>.log as it runs, and the report
# (benchmarks/results/<date>-<gpu>.md, copied to $OUT) is rewritten after every stage,
# so a run cut short by a time limit still leaves one.
#
# GPU_CHECK_DRY_RUN=1: run the script's own logic with every GPU command replaced by
# an echo (CI runs this: tests/test_gpu_scripts.py), so a typo cannot waste a GPU.
# Exit status: non-zero if the build, a test or the sanitizer failed.
set -u -o pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DRY=${GPU_CHECK_DRY_RUN:-0}
LOGDIR=${OUT:-$(mktemp -d)}/gpu_check
mkdir -p "$LOGDIR" benchmarks/results
status=0
declare -A result

# run NAME LIMIT_S CMD...: run CMD with a time limit, output to the terminal and LOGDIR/NAME.log.
run() {
    local name=$1 limit=$2
    shift 2
    echo
    echo "=== $name (limit ${limit}s, $(date +%H:%M:%S))"
    if [ "$DRY" = 1 ]; then
        echo "DRY RUN: timeout $limit $*" | tee "$LOGDIR/$name.log"
        result[$name]="exit 0 (dry run)"
        return 0
    fi
    timeout "$limit" "$@" 2>&1 | tee "$LOGDIR/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 124 ]; then
        result[$name]="TIMED OUT after ${limit}s"
    else
        result[$name]="exit $rc"
    fi
    return "$rc"
}

if [ "$DRY" = 1 ]; then
    gpu="dry-run"; driver="none"; cupy_version="n/a"
else
    gpu=$("$PY" -c "import cupy; p = cupy.cuda.runtime.getDeviceProperties(0); n = p['name']; print(n.decode() if isinstance(n, bytes) else n)" 2>/dev/null || echo "unknown-gpu")
    driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
    cupy_version=$("$PY" -c "import cupy; print(cupy.__version__)" 2>/dev/null || echo "not importable")
fi
slug=$(echo "$gpu" | tr -c 'A-Za-z0-9\n' '-' | tr -s '-' | sed 's/-$//')
report="benchmarks/results/$(date +%Y-%m-%d)-${slug}.md"
[ "$DRY" = 1 ] && report="$LOGDIR/report.md"
sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)
[ "$DRY" = 1 ] && sanitizer=${sanitizer:-compute-sanitizer}

section() {  # section TITLE NAME FILTER: a stage's result and the matching lines of its log
    echo "## $1 (${result[$2]:-not run})"
    echo
    echo '```'
    if [ -f "$LOGDIR/$2.log" ]; then grep -E "$3" "$LOGDIR/$2.log" | tail -40; fi
    echo '```'
    echo
}

write_report() {
    {
        echo "# GPU check: $gpu"
        echo
        echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
        echo "- GPU: $gpu; driver: ${driver:-unknown}; CuPy: $cupy_version; $("$PY" --version 2>&1)"
        echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "- logs: $LOGDIR"
        echo
        section "Install" install "error|Error|Successfully|ERROR"
        section "tests/test_gpu.py" tests "passed|failed|error|skipped|SKIPPED|FAILED|ERROR"
        section "compute-sanitizer memcheck" memcheck "ERROR SUMMARY|cases|BAD|Invalid|mismatch"
        section "compute-sanitizer initcheck" initcheck "ERROR SUMMARY|cases|BAD|Uninitialized|mismatch"
        echo "## Benchmark (${result[bench]:-not run})"
        echo
        [ -f "$LOGDIR/bench.log" ] && cat "$LOGDIR/bench.log"
    } >"$report"
    if [ -n "${OUT:-}" ] && [ "$DRY" != 1 ]; then cp "$report" "$OUT/"; fi
}

run install 90 "$PY" -m pip install --no-build-isolation -e . || status=1
write_report
echo "GPU: $gpu, driver ${driver:-unknown}, CuPy $cupy_version"

HYPOTHESIS_PROFILE=ci run tests 100 "$PY" -m pytest -q -p no:cacheprovider -ra tests/test_gpu.py || status=1
write_report

if [ -n "$sanitizer" ]; then
    run memcheck 50 "$sanitizer" --tool memcheck --error-exitcode 1 --print-limit 20 \
        "$PY" benchmarks/sanitize_cases.py || status=1
    write_report
    run initcheck 40 "$sanitizer" --tool initcheck --error-exitcode 1 --print-limit 20 \
        "$PY" benchmarks/sanitize_cases.py || status=1
else
    result[memcheck]="skipped: compute-sanitizer not found on PATH or under /usr/local/cuda*/bin"
    result[initcheck]=${result[memcheck]}
fi
write_report

run bench 70 "$PY" -m cydeform.bench.gpu --repeat 100
write_report

echo
echo "report: $report"
exit $status
