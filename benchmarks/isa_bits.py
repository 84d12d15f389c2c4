"""Bit-identity of the CPU backend across its instruction-set builds and thread counts,
on the benchmark's own problems (float32 and float64, N=1, encoder and decoder call,
uniform and local locations, and the same locations stretched past the borders).

    python benchmarks/isa_bits.py

tests/test_cpu.py checks the same on small drawn problems; this runs the sizes the
benchmark times, whose paths (head-major staging, the sparse backward's blocks, the
chunked dense backward) small problems may not reach. Exits 1 on any difference.
"""
import importlib
import sys

import numpy as np

from ab_cpu import WithImpl  # benchmarks/, this script's own folder
from cydeform import _cpu
from cydeform.bench import problems


def cases():
    """(name, dtype, Lq, distribution, stretch) of the problems checked (Lq None: the encoder call)."""
    for dtype in ("float32", "float64"):
        for Lq in (None, 300):
            for dist in ("uniform", "local"):
                for stretch in (1.0, 1.3):
                    call = "encoder" if Lq is None else "decoder"
                    yield f"{dtype}-{call}-{dist}-stretch{stretch}", np.dtype(dtype), Lq, dist, stretch


def make_inputs(dtype, Lq, dist, stretch):
    """{value, shapes, starts, loc, attn, grad} of one case."""
    value, shapes, starts, loc, attn = problems.make_problem(1, Lq, dist, dtype)
    # Stretched about the centre: ~1/4 of the points have corners outside.
    loc = np.ascontiguousarray((0.5 + (loc - 0.5) * stretch).astype(dtype))
    M, D = value.shape[2:]
    grad = np.random.default_rng(1).standard_normal((1, loc.shape[1], M * D)).astype(dtype)
    return dict(value=value, shapes=shapes, starts=starts, loc=loc, attn=attn, grad=grad)


def results(x, threads=(1, 2, 3)):
    """{(isa, threads): (out, grad_value, grad_loc, grad_attn)} through _cpu's dispatch, for
    every build this processor runs; ``x`` as make_inputs returns."""
    got = {}
    for isa in _cpu.available_isas():
        lib = WithImpl(_cpu, importlib.import_module(f"cydeform._cpu_{isa}"))
        for t in threads:
            lib.set_num_threads(t)
            got[isa, t] = (lib.forward(x["value"], x["shapes"], x["starts"], x["loc"], x["attn"]),
                           *lib.backward(x["grad"], x["value"], x["shapes"], x["starts"], x["loc"], x["attn"]))
    return got


def main():
    print(f"builds: {', '.join(_cpu.available_isas())}; threads 1, 2, 3")
    bad = 0
    for _, dtype, Lq, dist, stretch in cases():
        got = results(make_inputs(dtype, Lq, dist, stretch))
        first_key = next(iter(got))
        differ = [key for key, r in got.items()
                  if any(a.tobytes() != b.tobytes() for a, b in zip(r, got[first_key]))]
        call = "encoder" if Lq is None else "decoder"
        print(f"{dtype.name} {call} {dist} stretch {stretch}: "
              + (f"DIFFER from {first_key}: {differ}" if differ else f"{len(got)} results bit-identical"),
              flush=True)
        bad += bool(differ)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
