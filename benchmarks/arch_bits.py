"""Bit-identity of the CPU backend across processor architectures (x86-64 and aarch64, say).

    python benchmarks/arch_bits.py save DIR     # on one machine: inputs and results to DIR
    python benchmarks/arch_bits.py check DIR    # on another: the same inputs, compared bit for bit

``save`` makes the benchmark's problems (those of isa_bits.py: float32 and float64, N=1,
encoder and decoder call, uniform and local locations, plain and stretched past the
borders), runs the forward and backward with every build of this machine at 1, 2 and 3
threads, exits 1 if those differ among themselves, and writes each case's inputs and
results to DIR/CASE.npz. ``check`` loads each case's inputs, runs its own builds at the
thread counts given (``--threads 1,2``, default 1,2,3) and compares every result with
the saved one byte for byte; exits 1 on any difference, printing the largest one in
units in the last place.

The inputs travel as files, not as a seed: make_problem draws through np.exp, whose last
bits may differ between architectures (NumPy's SIMD code), which would make two machines
compare different problems. ``--cases SUBSTRING`` keeps the cases whose name contains it
(under an emulator the encoder cases take minutes each).

Under emulation (qemu-aarch64 with a Debian arm64 tree) benchmarks/arm_check.sh builds
the aarch64 extension and runs ``check``.
"""
import argparse
import hashlib
import os
import sys

import numpy as np

NAMES = ("out", "grad_value", "grad_loc", "grad_attn")


def cases():
    """(name, dtype, Lq, distribution, stretch) of isa_bits.py's problems."""
    for dtype in ("float32", "float64"):
        for Lq in (None, 300):
            for dist in ("uniform", "local"):
                for stretch in (1.0, 1.3):
                    call = "encoder" if Lq is None else "decoder"
                    yield f"{dtype}-{call}-{dist}-stretch{stretch}", np.dtype(dtype), Lq, dist, stretch


def make_inputs(dtype, Lq, dist, stretch):
    from cydeform.bench import problems

    value, shapes, starts, loc, attn = problems.make_problem(1, Lq, dist, dtype)
    # Stretched about the centre: ~1/4 of the points have corners outside the map.
    loc = np.ascontiguousarray((0.5 + (loc - 0.5) * stretch).astype(dtype))
    M, D = value.shape[2:]
    grad = np.random.default_rng(1).standard_normal((1, loc.shape[1], M * D)).astype(dtype)
    return dict(value=value, shapes=shapes, starts=starts, loc=loc, attn=attn, grad=grad)


def run(inputs, threads):
    """{(isa, threads): (out, grad_value, grad_loc, grad_attn)} for every build of this machine."""
    import importlib

    from ab_cpu import WithImpl  # benchmarks/, this script's own folder
    from cydeform import _cpu

    x = inputs
    got = {}
    for isa in _cpu.available_isas():
        lib = WithImpl(_cpu, importlib.import_module(f"cydeform._cpu_{isa}"))
        for t in threads:
            lib.set_num_threads(t)
            got[isa, t] = (lib.forward(x["value"], x["shapes"], x["starts"], x["loc"], x["attn"]),
                           *lib.backward(x["grad"], x["value"], x["shapes"], x["starts"], x["loc"], x["attn"]))
    return got


def ulps(a, b):
    """Largest distance between a and b in units in the last place (NaN where only one is NaN)."""
    itype = np.int32 if a.dtype == np.float32 else np.int64
    ia, ib = a.view(itype).astype(np.int64), b.view(itype).astype(np.int64)
    # Map the sign-magnitude bit patterns onto one ordered integer line.
    lo = np.iinfo(itype).min
    ia = np.where(ia < 0, lo - ia, ia)
    ib = np.where(ib < 0, lo - ib, ib)
    if (np.isnan(a) != np.isnan(b)).any():
        return float("nan")
    return int(np.abs(ia - ib).max(initial=0))


def digest(arrays):
    return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()[:16]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("save", "check"))
    parser.add_argument("dir")
    parser.add_argument("--threads", default="1,2,3")
    parser.add_argument("--cases", default="")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    import platform

    from cydeform import _cpu

    print(f"{platform.machine()}; builds: {', '.join(_cpu.available_isas())}; threads {args.threads}", flush=True)
    if args.mode == "save":
        os.makedirs(args.dir, exist_ok=True)
    bad = 0
    for name, dtype, Lq, dist, stretch in cases():
        if args.cases not in name:
            continue
        path = os.path.join(args.dir, name + ".npz")
        if args.mode == "save":
            inputs = make_inputs(dtype, Lq, dist, stretch)
        else:
            if not os.path.exists(path):
                sys.exit(f"{path} missing: run `arch_bits.py save {args.dir}` (with the same --cases) first")
            with np.load(path) as f:
                inputs = {k: f[k] for k in ("value", "shapes", "starts", "loc", "attn", "grad")}
                saved = tuple(f[k] for k in NAMES)
        got = run(inputs, threads)
        first = next(iter(got))
        differ = [key for key, r in got.items() if digest(r) != digest(got[first])]
        if args.mode == "save":
            np.savez(path, **inputs, **dict(zip(NAMES, got[first])))
            line = f"DIFFER among builds / threads: {differ}" if differ else f"{len(got)} results bit-identical"
        else:
            differ += [key for key, r in got.items() if digest(r) != digest(saved) and key not in differ]
            if differ:
                worst = {n: ulps(a, b) for n, a, b in zip(NAMES, got[differ[0]], saved)}
                line = f"DIFFER from the saved results: {differ}; {differ[0]} ulps {worst}"
            else:
                line = f"{len(got)} results bit-identical to the saved ones ({digest(saved)})"
        print(f"{name}: {line}", flush=True)
        bad += bool(differ)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
