"""Bit-identity of the CPU backend across processor architectures (x86-64 and aarch64, say).

    python benchmarks/arch_bits.py save DIR     # on one machine: inputs and results to DIR
    python benchmarks/arch_bits.py check DIR    # on another: the same inputs, compared bit for bit

``save`` makes the benchmark's problems (isa_bits.py's: float32 and float64, N=1,
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

from isa_bits import cases, make_inputs, results  # benchmarks/, this script's own folder

NAMES = ("out", "grad_value", "grad_loc", "grad_attn")


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
        got = results(inputs, threads)
        digests = {key: digest(r) for key, r in got.items()}
        # save: every build and thread count against the first; check: against the saved results.
        want = digest(saved) if args.mode == "check" else next(iter(digests.values()))
        differ = [key for key, d in digests.items() if d != want]
        if args.mode == "save":
            np.savez(path, **inputs, **dict(zip(NAMES, next(iter(got.values())))))
            line = f"DIFFER among builds / threads: {differ}" if differ else f"{len(got)} results bit-identical"
        elif differ:
            worst = {n: ulps(a, b) for n, a, b in zip(NAMES, got[differ[0]], saved)}
            line = f"DIFFER from the saved results: {differ}; {differ[0]} ulps {worst}"
        else:
            line = f"{len(got)} results bit-identical to the saved ones ({want})"
        print(f"{name}: {line}", flush=True)
        bad += bool(differ)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
