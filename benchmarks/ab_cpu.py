"""Interleaved A/B of two builds of the CPU backend in one process.

    python benchmarks/ab_cpu.py BASE_TREE NEW_TREE [REPEAT]
    python benchmarks/ab_cpu.py --isa BASE_ISA NEW_ISA [REPEAT]

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

With ``--isa`` it compares two instruction-set builds of the tree it runs from (e.g.
``--isa avx2 avx512``) by pointing ``cydeform._cpu._impl`` at one build, then the other:
a Cython module cannot be imported a second time into one process, so the tree is
loaded once and both builds share its staging buffers.

    python benchmarks/ab_cpu.py --block-prefetch [REPEAT]

compares, in the tree it runs from, the sparse (decoder) backward without (base) and with
(new) phase 3's prefetch of the next block's value rows, the choice cydeform makes by CPU
vendor (``sparse_block_prefetch_default``: off on Intel, on elsewhere; benchmarks/cpu_log.md
100); a ratio above 1 means the prefetch pays on this machine. Decoder backward rows only.
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


class WithImpl:
    """``cydeform._cpu`` with its build swapped to ``impl`` for the duration of each call."""

    def __init__(self, cpu, impl):
        self._cpu, self._impl = cpu, impl

    def __getattr__(self, name):
        attr = getattr(self._cpu, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            saved, self._cpu._impl = self._cpu._impl, self._impl
            try:
                return attr(*args, **kwargs)
            finally:
                self._cpu._impl = saved
        return call


def load_isas(base_isa, new_isa):
    """Two views of this tree's ``cydeform._cpu``, each calling one instruction-set build."""
    from cydeform import _cpu
    from cydeform.bench import problems
    for isa in (base_isa, new_isa):
        if isa not in _cpu.available_isas():
            sys.exit(f"the {isa} build is missing or this processor cannot run it; "
                     f"available: {', '.join(_cpu.available_isas())}")
    return (WithImpl(_cpu, importlib.import_module(f"cydeform._cpu_{base_isa}")),
            WithImpl(_cpu, importlib.import_module(f"cydeform._cpu_{new_isa}")), problems)


class WithBlockPrefetch:
    """``cydeform._cpu`` whose sparse backward runs with phase 3's block prefetch ``on``."""

    def __init__(self, cpu, on):
        self._cpu, self._on = cpu, on
        self._impl = cpu._impl

    def set_num_threads(self, n):
        self._cpu.set_num_threads(n)

    def backward(self, grad, value, shapes, starts, loc, attn):
        return self._impl.backward(grad, value, shapes, starts, loc, attn, method="sparse",
                                   block_prefetch=self._on)


def main_block_prefetch(repeat=7):
    from cydeform import _cpu
    from cydeform.bench import problems
    print(f"# {_cpu._impl.__file__}; this machine's default: block_prefetch="
          f"{_cpu._impl.sparse_block_prefetch_default()}\n# base: without the prefetch, new: with it")
    interleave(WithBlockPrefetch(_cpu, False), WithBlockPrefetch(_cpu, True), problems, repeat,
               calls=(300,), passes=("backward",))


def main(base_tree, new_tree, repeat=7, isas=False):
    if isas:
        base, new, problems = load_isas(base_tree, new_tree)
    else:
        base, problems = load(base_tree)
        new, _ = load(new_tree)
    print(f"# base {base._impl.__file__}\n# new  {new._impl.__file__}")
    interleave(base, new, problems, repeat)


def interleave(base, new, problems, repeat, calls=(None, 300), passes=("forward", "backward")):
    """For each benchmark problem (``calls``: Lq, None for the encoder call), location
    distribution, thread count and pass: ``base`` and ``new`` called alternately, the
    medians of ``repeat`` rounds after a warm-up round printed with their ratio."""
    for Lq in calls:
        for dist in ("uniform", "local"):
            value, shapes, starts, loc, attn = problems.make_problem(1, Lq, dist, np.dtype("float32"))
            M, D = value.shape[2:]
            grad = np.random.default_rng(1).standard_normal((1, loc.shape[1], M * D)).astype("float32")
            for threads in (1, 2):
                for pas in passes:
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
    argv = sys.argv[1:]
    if argv[:1] == ["--block-prefetch"]:
        if len(argv) > 2:
            sys.exit(__doc__)
        main_block_prefetch(int(argv[1]) if len(argv) == 2 else 7)
        sys.exit(0)
    isas = argv[:1] == ["--isa"]
    argv = argv[1:] if isas else argv
    if len(argv) not in (2, 3):
        sys.exit(__doc__)
    main(argv[0], argv[1], int(argv[2]) if len(argv) == 3 else 7, isas=isas)
