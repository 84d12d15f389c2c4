"""Launch every CUDA kernel variant once on small inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cases.py

Covers each dtype, compile-time / runtime-size vector / scalar generic kernels, the
baseline kernels, the deterministic key + gather kernels and the half-type cast, with
32- and 64-bit offsets, aligned and misaligned value arrays, and locations that are
in range, on cell edges, far outside, NaN, +-inf and 1e30. CuPy's memory pool is
switched off so that every array is its own allocation and any out-of-bounds access
is caught at its edge. Prints one line per case; exits non-zero if a result has NaN
where it should not.
"""
from __future__ import annotations

import sys

import numpy as np

import cupy

from cydeform import _cuda, _validate

cupy.cuda.set_allocator(None)

try:
    import ml_dtypes

    DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
except ImportError:
    DTYPES = [np.float32, np.float64, np.float16]

SHAPES = [  # (L, P, D, level sides)
    (4, 4, 32, [(7, 9), (4, 5), (2, 3), (1, 1)]),  # compile-time sizes
    (2, 3, 9, [(5, 3), (1, 4)]),                  # odd D: scalar generic
    (3, 2, 12, [(3, 3), (2, 5), (6, 1)]),         # several channel passes
]


def make(dtype, L, P, D, sides, rng, N=2, Lq=7, M=3):
    shapes = np.array(sides, dtype=np.int64)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    loc = rng.uniform(-0.6, 1.6, (N, Lq, M, L, P, 2))
    flat = loc.reshape(-1)
    specials = [np.nan, np.inf, -np.inf, 1e30, -1e30, -0.5, 1.5, 0.0, 1.0]
    picks = rng.choice(flat.size, size=flat.size // 5, replace=False)
    flat[picks] = rng.choice(specials, size=picks.size)
    value = rng.standard_normal((N, S, M, D))
    attn = rng.uniform(0, 1, (N, Lq, M, L, P))
    grad = rng.standard_normal((N, Lq, M * D))
    return [cupy.asarray(a.astype(dtype)) for a in (value, loc, attn, grad)], shapes


def misaligned(a):
    """The same values in an allocation whose data starts 1 element past a 16-byte boundary."""
    buf = cupy.empty(a.size + 1, dtype=a.dtype)
    view = buf[1:].reshape(a.shape)
    view[...] = a
    return view


def main():
    rng = np.random.default_rng(0)
    rt = _cuda.CupyRuntime()
    cases = 0
    bad = []
    for dtype in DTYPES:
        for L, P, D, sides in SHAPES:
            (value, loc, attn, grad), shapes = make(dtype, L, P, D, sides, rng)
            prob = _validate.check_problem(value, shapes, None, loc, attn, _validate.GPU_DTYPES)
            finite_rows = cupy.isfinite(loc.astype(cupy.float32)).all(axis=(3, 4, 5))
            for values in (value, misaligned(value)):
                for index64 in (False, True):
                    for specialize in (True, False):
                        for mode in ("fast", "baseline", "deterministic"):
                            variant = "baseline" if mode == "baseline" else "fast"
                            out = _cuda._forward(rt, prob, values, loc, attn, variant=variant,
                                                 specialize=specialize, index64=index64)
                            gv, gl, ga = _cuda._backward(rt, prob, grad, values, loc, attn, variant=variant,
                                                         deterministic=mode == "deterministic",
                                                         specialize=specialize, index64=index64)
                            cupy.cuda.get_current_stream().synchronize()
                            out_nan = cupy.isnan(out.astype(cupy.float32).reshape(*finite_rows.shape, D)).any(-1)
                            label = (f"{np.dtype(dtype).name} L={L} P={P} D={D} {mode} index64={index64} "
                                     f"specialize={specialize} aligned={values is value}")
                            if bool((out_nan & finite_rows).any()) or not bool(
                                    cupy.isfinite(gv.astype(cupy.float32)).all()):
                                bad.append(label)
                            cases += 1
                            print("ok" if label not in bad else "BAD", label, flush=True)
    print(f"{cases} cases, {_cuda._cupy_function.cache_info().currsize} kernel variants compiled and launched")
    if bad:
        print("unexpected NaN in:", *bad, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
