"""Mutation check: does the test suite notice single-line bugs?

Each entry below replaces one exact line fragment (it must occur exactly once in its
file) in a scratch copy of the repository, rebuilds the CPU extension when a C/Cython
source changed, and runs the tests most likely to notice. A mutant is *killed* when
those tests fail, and *survives* when they pass: a survivor names a gap in the tests.

    python benchmarks/mutation.py [--only SUBSTRING] [--keep DIR]

Runs in a few minutes on 2 cores (each CPU mutant rebuilds three ISA builds, ~40 s).
Prints a table and exits 1 if any mutant survives. Needs Cython in the environment
(pip install cython): the CPU mutants rebuild the extension.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CPU_TESTS = ["tests/test_conformance.py", "tests/test_cpu.py", "tests/test_edge_gaps.py"]
KERNEL_TESTS = ["tests/test_conformance.py", "tests/test_cuda_host.py", "tests/test_edge_gaps.py"]
LAYER_TESTS = ["tests/test_nn.py", "tests/test_edge_gaps.py"]
VALIDATION_TESTS = ["tests/test_errors.py", "tests/test_edge_gaps.py"]

# (name, file, original fragment, mutated fragment, tests)
MUTATIONS = [
    # CPU backend (src/_cpu_impl.pxi)
    ("cpu: range check x < W -> x <= W", "src/_cpu_impl.pxi",
     "x >= -1.0 and x < W and", "x >= -1.0 and x <= W and", CPU_TESTS),
    ("cpu: range check y >= -1 -> y > -1", "src/_cpu_impl.pxi",
     "and y >= -1.0 and y < H)", "and y > -1.0 and y < H)", CPU_TESTS),
    ("cpu: right corner x0 + 1 < W -> <= W", "src/_cpu_impl.pxi",
     "cdef bint in_x1 = x0 + 1 < W", "cdef bint in_x1 = x0 + 1 <= W", CPU_TESTS),
    ("cpu: pixel convention loc * W - 0.5 -> loc * W", "src/_cpu_impl.pxi",
     "cdef double x = loc_x * W - 0.5", "cdef double x = loc_x * W", CPU_TESTS),
    ("cpu: swapped terms in dloc_y", "src/_cpu_impl.pxi",
     "(hx * (dots[2] - dots[0]) + lx * (dots[3] - dots[1]))",
     "(hx * (dots[3] - dots[1]) + lx * (dots[2] - dots[0]))", CPU_TESTS),
    ("cpu: head-major forward drops the last query of each 32-query block", "src/_cpu_impl.pxi",
     "q_hi = min(Lq, q_lo + _QUERY_BLOCK)", "q_hi = min(Lq, q_lo + _QUERY_BLOCK - 1)", CPU_TESTS),
    ("cpu: head-major backward drops the last query of each chunk", "src/_cpu_impl.pxi",
     "(c + 1) * Lq // K - c * Lq // K)", "(c + 1) * Lq // K - c * Lq // K - 1)", CPU_TESTS),
    ("cpu: head-major backward's chunk sum keeps chunk 0 only", "src/_cpu_impl.pxi",
     "                    for c in range(1, K):\n                        acc = acc + a[c * size + d]",
     "                    for c in range(1, 1):\n                        acc = acc + a[c * size + d]", CPU_TESTS),
    ("cpu: sparse backward splits its blocks by rows only, not rows + slots", "src/_cpu_impl.pxi",
     "(blk << shift) + block_first[blk + 1] - block_first[blk]", "(blk << shift)", CPU_TESTS),
    ("cpu: sparse backward takes a corner outside the map as dot 0, not g . 0", "src/_cpu_impl.pxi",
     "                d[c] = zero_dot", "                d[c] = 0", CPU_TESTS),
    ("cpu: sparse backward streams each block out one row short", "src/_cpu_impl.pxi",
     "cyd_stream_copy(grad_value + row_lo * D, buf, (row_hi - row_lo) * D * sizeof(floating))",
     "cyd_stream_copy(grad_value + row_lo * D, buf, (row_hi - row_lo - 1) * D * sizeof(floating))", CPU_TESTS),
    # CUDA kernels (host harness)
    ("kernel: inside check x < W -> x <= W", "cydeform/kernels/msda_common.cuh",
     "x >= -1.0 && x < (double)W &&", "x >= -1.0 && x <= (double)W &&", KERNEL_TESTS),
    ("kernel: pixel convention y = loc * H - 0.5 -> + 0.5", "cydeform/kernels/msda_common.cuh",
     "const double y = __dmul_rn((double)loc_y, (double)H) - 0.5;",
     "const double y = __dmul_rn((double)loc_y, (double)H) + 0.5;", KERNEL_TESTS),
    ("kernel: backward dloc_y scaled by W", "cydeform/kernels/msda_backward.cu",
     "grad_loc[2 * k + 1] = Conv<T>::store(s.finite ? (A)H * a * sum_y : cyd_nan(A()));",
     "grad_loc[2 * k + 1] = Conv<T>::store(s.finite ? (A)W * a * sum_y : cyd_nan(A()));", KERNEL_TESTS),
    ("kernel: backward NaN location gives 0, not NaN", "cydeform/kernels/msda_backward.cu",
     "grad_loc[2 * o] = Conv<T>::store(s.finite ? (A)W * a * part_x : cyd_nan(A()));",
     "grad_loc[2 * o] = Conv<T>::store(s.finite ? (A)W * a * part_x : (A)0);", KERNEL_TESTS),
    ("kernel: forward bottom corner y0 + 1 < H -> <= H", "cydeform/kernels/msda_forward.cu",
     "const bool y0ok = y0 >= 0, y1ok = y0 + 1 < H;", "const bool y0ok = y0 >= 0, y1ok = y0 + 1 <= H;",
     KERNEL_TESTS),
    # layer (cydeform/nn.py)
    ("layer: softmax without max-subtraction", "cydeform/nn.py",
     "logits = logits - logits.max(axis=-1, keepdims=True)  # overflow-free softmax",
     "logits = logits  # overflow-free softmax", LAYER_TESTS),
    ("layer: offsets divided by (H, W) instead of (W, H)", "cydeform/nn.py",
     "normalizer = xp.asarray(np.ascontiguousarray(shapes[:, ::-1]), dtype=self._dtype)[:, None, :]",
     "normalizer = xp.asarray(np.ascontiguousarray(shapes), dtype=self._dtype)[:, None, :]", LAYER_TESTS),
    ("layer: box offsets without the 0.5", "cydeform/nn.py",
     "loc = ref[..., :2] + offsets / P * ref[..., 2:] * 0.5", "loc = ref[..., :2] + offsets / P * ref[..., 2:]",
     LAYER_TESTS),
    ("layer: Linear bias gradient not accumulated", "cydeform/nn.py",
     'self._grads["bias"] += g.sum(axis=0)', 'self._grads["bias"] = g.sum(axis=0)', LAYER_TESTS),
    ("layer: Linear accumulates a batch in one product, not image by image", "cydeform/nn.py",
     "return max(x2.shape[0] // x.shape[0], 1)", "return max(x2.shape[0], 1)", LAYER_TESTS),
    # validation (cydeform/_validate.py)
    ("validation: P < 1 check dropped", "cydeform/_validate.py",
     "if Lq < 1 or P < 1:", "if Lq < 1:", VALIDATION_TESTS),
    ("validation: empty value axes allowed", "cydeform/_validate.py",
     "if min(N, S, M, D) < 1:", "if min(N, S, M) < 1:", VALIDATION_TESTS),
    ("validation: level_start_index values not compared", "cydeform/_validate.py",
     "if given.shape != starts.shape or not np.array_equal(given, starts):", "if given.shape != starts.shape:",
     VALIDATION_TESTS),
]


def _copy_tree(dst: Path):
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dst / f)
    for so in (ROOT / "cydeform").glob("_cpu_*.so"):  # the unmutated build, reused unless C changes
        shutil.copy2(so, dst / "cydeform" / so.name)


def _build(tree: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                          capture_output=True, text=True)


def run(only=None, keep=None):
    tree = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="cydeform-mutation-"))
    tree.mkdir(parents=True, exist_ok=True)
    _copy_tree(tree)
    env = dict(os.environ, PYTHONPATH=str(tree), HYPOTHESIS_PROFILE="ci")
    rows = []
    for name, rel, old, new, tests in MUTATIONS:
        if only and only not in name:
            continue
        path = tree / rel
        text = path.read_text()
        if text.count(old) != 1:
            rows.append((name, f"STALE (fragment found {text.count(old)} times)", 0.0))
            print(f"{rows[-1][1]:>10}  {name}", flush=True)
            continue
        start = time.perf_counter()
        path.write_text(text.replace(old, new))
        try:
            native = rel.startswith("src/")
            if native and (build := _build(tree)).returncode != 0:
                rows.append((name, "BUILD FAILED", time.perf_counter() - start))
                print(f"{rows[-1][1]:>10}  {name}\n{build.stderr[-2000:]}", flush=True)
                continue
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                    cwd=tree, env=env, capture_output=True, text=True)
            # rc 1: a test failed; < 0: the mutant crashed the test process (out-of-bounds read).
            verdict = ("killed" if result.returncode == 1 or result.returncode < 0 else
                       "SURVIVED" if result.returncode == 0 else f"error (pytest rc {result.returncode})")
            rows.append((name, verdict, time.perf_counter() - start))
        finally:
            path.write_text(text)
            if rel.startswith("src/"):
                _build(tree)
        print(f"{rows[-1][1]:>10}  {name}  ({rows[-1][2]:.0f} s)", flush=True)
    if not keep:
        shutil.rmtree(tree, ignore_errors=True)
    survivors = [r for r in rows if r[1] != "killed"]
    print(f"\n{len(rows) - len(survivors)} of {len(rows)} mutants killed; survivors: "
          + (", ".join(r[0] for r in survivors) or "none"))
    return 1 if survivors else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run the mutations whose name contains this")
    ap.add_argument("--keep", help="scratch tree to use and keep (default: a temporary directory)")
    a = ap.parse_args()
    sys.exit(run(a.only, a.keep))
