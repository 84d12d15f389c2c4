"""Interleaved A/B of two builds of the CPU backend in one process.

    python benchmarks/ab_cpu.py BASE_TREE NEW_TREE [REPEAT]

Each tree is a checkout with its extensions built in place (``python setup.py
build_ext --inplace``), e.g. ``git worktree add /tmp/base <commit>``. Both trees'
``cydeform._cpu`` are loaded side by side and called alternately (base, new, base,
...) on the benchmark's problems (float32, N=1, encoder and decoder call, uniform and
local locations, 1 and 2 threads), so a machine whose speed drifts over minutes
slows both alike. Prints medians in ms (the first round of each pair is a warm-up).
Calls ``_cpu.forward`` / ``_cpu.backward`` directly: the inputs are already
validated and C-contiguous, and the public functions import ``_cpu`` lazily, which
would resolve to one tree for both. Each tree keeps its own per-thread buffers
(``_staging``), which evict each other between calls: absolute times run above a
single-build process's (measured: 47 vs 31 ms, the uniform encoder forward at 2
threads); the ratio is what this is for.
"""
import importlib
import statistics
import sys
import time

import numpy as np


def load(tree):
    """(cydeform._cpu, cydeform.bench.problems) of ``tree``, removed from sys.modules
    afterwards so the next tree's package can be imported under the same names."""
    sys.path.insert(0, tree)
    try:
        for name in ("cydeform._cpu", "cydeform._staging", "cydeform.bench.problems"):
            importlib.import_module(name)
        mods = {k: v for k, v in sys.modules.items() if k == "cydeform" or k.startswith("cydeform.")}
    finally:
        sys.path.pop(0)
    for k in mods:
        del sys.modules[k]
    return mods["cydeform._cpu"], mods["cydeform.bench.problems"]


def main(base_tree, new_tree, repeat=7):
    base, problems = load(base_tree)
    new, _ = load(new_tree)
    print(f"# base {base._impl.__file__}\n# new  {new._impl.__file__}")
    for Lq in (None, 300):
        for dist in ("uniform", "local"):
            value, shapes, starts, loc, attn = problems.make_problem(1, Lq, dist, np.dtype("float32"))
            M, D = value.shape[2:]
            grad = np.random.default_rng(1).standard_normal((1, loc.shape[1], M * D)).astype("float32")
            for threads in (1, 2):
                for pas in ("forward", "backward"):
                    times = {"base": [], "new": []}
                    for rnd in range(repeat + 1):
                        for name, lib in (("base", base), ("new", new)):
                            lib.set_num_threads(threads)
                            t = time.perf_counter()
                            if pas == "forward":
                                lib.forward(value, shapes, starts, loc, attn)
                            else:
                                lib.backward(grad, value, shapes, starts, loc, attn)
                            if rnd:
                                times[name].append((time.perf_counter() - t) * 1e3)
                    b, n = statistics.median(times["base"]), statistics.median(times["new"])
                    call = "encoder" if Lq is None else "decoder"
                    print(f"{call} {dist} {threads}T {pas:8s} base {b:8.2f}  new {n:8.2f}  ratio {b / n:5.2f}",
                          flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) == 4 else 7)
