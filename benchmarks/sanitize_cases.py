"""Launch every CUDA kernel variant once on small inputs, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cases.py

Covers each dtype, compile-time / runtime-size vector / scalar generic kernels, the
baseline kernels, the shared-geometry forward (experiment), the deterministic key,
piece and gather kernels (direct rows and, with det_piece=2, split rows) and the
half-type cast, with 32- and 64-bit offsets, aligned and misaligned value arrays, and
locations that are in range, on cell edges, far outside, NaN, +-inf and 1e30. CuPy's
memory pool is switched off so that every array is its own allocation and any
out-of-bounds access is caught at its edge. Every result is compared with the Cython
CPU backend (same NaN pattern; within a dtype tolerance elsewhere). Prints one line per
case; exits non-zero on any mismatch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's package, not an installed one

import cupy  # noqa: E402

import cydeform  # noqa: E402
from cydeform import _cuda, _validate  # noqa: E402

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


TOL = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}


def mismatch(got, want, tol):
    """'' if ``got`` (device) matches ``want`` (host float64): same NaNs, close elsewhere."""
    g = cupy.asnumpy(got.astype(cupy.float32)).astype(np.float64)
    nan_g, nan_w = np.isnan(g), np.isnan(want)
    if not np.array_equal(nan_g, nan_w):
        return f"NaN pattern differs at {int((nan_g != nan_w).sum())} elements"
    scale = max(1.0, float(np.abs(want[~nan_w]).max(initial=0.0)))
    err = float(np.abs(g[~nan_w] - want[~nan_w]).max(initial=0.0)) / scale
    return "" if err <= tol else f"max error {err:.2e} > {tol:.0e} (relative to max |want|)"


MODES = [  # (label, forward variant, backward variant, deterministic, config)
    ("fast", "fast", "fast", False, _cuda.DEFAULT_CONFIG),
    ("baseline", "baseline", "baseline", False, _cuda.DEFAULT_CONFIG),
    ("shared-fwd + deterministic", "shared", "fast", True, _cuda.DEFAULT_CONFIG),
    ("deterministic split rows", "fast", "fast", True, _cuda.LaunchConfig(det_piece=2)),
]


def main():
    rng = np.random.default_rng(0)
    rt = _cuda.CupyRuntime()
    cases = 0
    bad = []
    for dtype in DTYPES:
        name = np.dtype(dtype).name
        for L, P, D, sides in SHAPES:
            (value, loc, attn, grad), shapes = make(dtype, L, P, D, sides, rng)
            prob = _validate.check_problem(value, shapes, None, loc, attn, _validate.GPU_DTYPES)
            # The CPU backend on the same (rounded) inputs, in float64.
            host = [cupy.asnumpy(a.astype(cupy.float32)).astype(np.float64) for a in (value, loc, attn, grad)]
            want = (cydeform.ms_deform_attn(host[0], shapes, None, host[1], host[2]),
                    *cydeform.ms_deform_attn_backward(host[3], host[0], shapes, None, host[1], host[2]))
            for values in (value, misaligned(value)):
                for index64 in (False, True):
                    for specialize in (True, False):
                        for label, fwd, bwd, det, config in MODES:
                            kw = dict(specialize=specialize, index64=index64, config=config)
                            out = _cuda._forward(rt, prob, values, loc, attn, variant=fwd, **kw)
                            grads = _cuda._backward(rt, prob, grad, values, loc, attn, variant=bwd,
                                                    deterministic=det, **kw)
                            cupy.cuda.get_current_stream().synchronize()
                            case = (f"{name} L={L} P={P} D={D} {label} index64={index64} "
                                    f"specialize={specialize} aligned={values is value}")
                            problems = [f"{what}: {m}" for what, got, w in zip(
                                ("output", "grad_value", "grad_loc", "grad_attn"), (out, *grads), want)
                                if (m := mismatch(got, w, TOL[name]))]
                            if problems:
                                bad.append(f"{case}: {'; '.join(problems)}")
                            cases += 1
                            print("BAD" if problems else "ok", case, *problems, flush=True)
    print(f"{cases} cases, {_cuda._cupy_function.cache_info().currsize} kernel variants compiled and launched")
    if bad:
        print("mismatches against the CPU backend:", *bad, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
