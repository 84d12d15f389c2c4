"""JAX benchmark: ``python -m cydeform.bench --jax [--repeat R] [--threads T ...] [--calls ...] [--dtype ...]``.

Times, in the same run (rounds of short blocks of calls per implementation, so drift of
a busy machine hits all four alike), on the decoder and encoder calls of
``cydeform.bench.problems`` (uniform locations):

- NumPy: ``cydeform.ms_deform_attn`` called directly on NumPy arrays (forward), plus
  ``cydeform.ms_deform_attn_backward`` of that output (forward+backward);
- cydeform.jax: ``jax.jit`` of ``cydeform.jax.ms_deform_attn`` (forward), and of the
  output with its ``jax.vjp`` applied to the output itself, i.e. the gradient of
  |out|^2 / 2 (forward+backward);
- pure_callback glue: :func:`callback_msda`, what a JAX user writes without cydeform.jax
  (``jax.custom_vjp`` over ``jax.pure_callback`` to the NumPy API), timed the same way;
- pure JAX: :func:`pure_jax_msda`, a straightforward jitted bilinear-gather MSDA, and
  its JAX-autodiff vjp, timed the same way.

The thread count is ``cydeform.set_num_threads``; pure JAX runs on XLA's default
thread pool (all cores) in every row, which favours it in the 1-thread rows. (Pinning
the process to one core instead starves the JAX runtime's own threads: measured, it
made the JAX call ~30 % slower than the NumPy one on a single core.) The NumPy inputs
are zero-copy views of the JAX arrays: with separate copies, each switch between the
two paths finds the other's value array in cache, and with NumPy's own placement of
large arrays (16 bytes past a page, so a 128-byte value row straddles three cache lines
instead of two) the decoder forward takes ~1.7x as long; either would be measured as
"overhead" of one side. On a 2-core VM whose second core
other tenants share, libgomp's default (spinning) wait policy made 2-thread calls of
the backend ~10x slower than 1-thread ones, through NumPy and JAX alike; run with
``OMP_WAIT_POLICY=passive`` there (set before the process starts). Prints a markdown table of
medians and the ratios cydeform.jax / NumPy (the overhead), glue / NumPy and pure JAX /
cydeform.jax (the speed-up).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

from .problems import make_problem

CALLS = {"decoder": 300, "encoder": None}


def pure_jax_msda(value, spatial_shapes, sampling_locations, attention_weights):
    """MSDA in plain jax.numpy: per level, four bilinear corner gathers (zero padding).

    value (N, S, M, D), spatial_shapes a static sequence of (H, W), sampling_locations
    (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P) -> (N, Lq, M*D). Same
    convention as cydeform (grid_sample, align_corners=False); differentiable by JAX.
    """
    import jax.numpy as jnp

    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = jnp.zeros((N, M, Lq * P, D), value.dtype)
    start = 0
    for lvl, (H, W) in enumerate(spatial_shapes):
        H, W = int(H), int(W)
        v = value[:, start:start + H * W].transpose(0, 2, 1, 3)  # (N, M, HW, D)
        start += H * W
        loc = sampling_locations[:, :, :, lvl].transpose(0, 2, 1, 3, 4).reshape(N, M, Lq * P, 2)
        a = attention_weights[:, :, :, lvl].transpose(0, 2, 1, 3).reshape(N, M, Lq * P)
        x = loc[..., 0] * W - 0.5
        y = loc[..., 1] * H - 0.5
        x0 = jnp.floor(x)
        y0 = jnp.floor(y)
        lx, ly = x - x0, y - y0
        for dy, wy in ((0, 1 - ly), (1, ly)):
            for dx, wx in ((0, 1 - lx), (1, lx)):
                xi, yi = x0 + dx, y0 + dy
                inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
                idx = (jnp.clip(yi, 0, H - 1) * W + jnp.clip(xi, 0, W - 1)).astype(jnp.int32)
                corner = jnp.take_along_axis(v, idx[..., None], axis=2)  # (N, M, Lq*P, D)
                out = out + corner * jnp.where(inside, wy * wx * a, 0)[..., None]
    out = out.reshape(N, M, Lq, P, D).sum(3)
    return out.transpose(0, 2, 1, 3).reshape(N, Lq, M * D)


def callback_msda(spatial_shapes, level_start_index):
    """The glue a JAX user would write: ``custom_vjp`` over ``pure_callback`` to cydeform's NumPy API.

    Returns f(value, sampling_locations, attention_weights). For comparison only: the
    callback hands value (and takes grad_value) across as host copies.
    """
    import jax

    import cydeform

    @jax.custom_vjp
    def f(v, l, a):
        N, Lq, M = l.shape[:3]
        out = jax.ShapeDtypeStruct((N, Lq, M * v.shape[3]), v.dtype)
        return jax.pure_callback(lambda v, l, a: cydeform.ms_deform_attn(v, spatial_shapes, level_start_index, l, a),
                                 out, v, l, a)

    def fwd(v, l, a):
        return f(v, l, a), (v, l, a)

    def bwd(res, g):
        shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in res)
        return jax.pure_callback(lambda g, v, l, a: cydeform.ms_deform_attn_backward(
            g, v, spatial_shapes, level_start_index, l, a), shapes, g, *res)

    f.defvjp(fwd, bwd)
    return f


def _rows(threads, calls, dtypes, repeat, cycles, min_time, budget):
    """Time every (call, dtype, pass, implementation) at one thread count; result rows."""
    import jax
    import jax.numpy as jnp

    import cydeform
    import cydeform.jax as cjax

    cydeform.set_num_threads(threads)
    rows = []
    for call in calls:
        for dtype in dtypes:
            v, ss, lsi, loc, attn = make_problem(Lq=CALLS[call], dtype=np.dtype(dtype))
            shapes = tuple(map(tuple, ss.tolist()))
            jv, jl, ja = (jnp.asarray(x) for x in (v, loc, attn))
            # The NumPy path reads the JAX arrays' own memory (zero-copy views): both
            # read the same 64-byte-aligned bytes, from equally warm caches.
            v, loc, attn = (np.asarray(x) for x in (jv, jl, ja))
            assert v.ctypes.data == jv.unsafe_buffer_pointer()

            def ours(v_, l_, a_):
                return cjax.ms_deform_attn(v_, ss, lsi, l_, a_)

            def pure(v_, l_, a_):
                return pure_jax_msda(v_, shapes, l_, a_)

            # forward+backward of the loss |out|^2 / 2: the cotangent is the output, so the
            # backward waits for the forward as in training (with an independent cotangent
            # XLA may run the two custom calls concurrently, which a training step cannot).
            def fwd_bwd(f):
                def run(v_, l_, a_):
                    out, vjp = jax.vjp(f, v_, l_, a_)
                    return out, *vjp(out)
                return jax.jit(run)

            def numpy_fwd_bwd():
                out = cydeform.ms_deform_attn(v, ss, lsi, loc, attn)
                return out, *cydeform.ms_deform_attn_backward(out, v, ss, lsi, loc, attn)

            glue = callback_msda(ss, lsi)
            ours_f, glue_f, pure_f = jax.jit(ours), jax.jit(glue), jax.jit(pure)
            ours_fb, glue_fb, pure_fb = fwd_bwd(ours), fwd_bwd(glue), fwd_bwd(pure)
            fns = {
                ("forward", "numpy"): lambda: cydeform.ms_deform_attn(v, ss, lsi, loc, attn),
                ("forward", "cydeform.jax"): lambda: ours_f(jv, jl, ja).block_until_ready(),
                ("forward", "pure_callback"): lambda: glue_f(jv, jl, ja).block_until_ready(),
                ("forward", "pure JAX"): lambda: pure_f(jv, jl, ja).block_until_ready(),
                ("forward+backward", "numpy"): numpy_fwd_bwd,
                ("forward+backward", "cydeform.jax"): lambda: jax.block_until_ready(ours_fb(jv, jl, ja)),
                ("forward+backward", "pure_callback"): lambda: jax.block_until_ready(glue_fb(jv, jl, ja)),
                ("forward+backward", "pure JAX"): lambda: jax.block_until_ready(pure_fb(jv, jl, ja)),
            }
            times = {k: [] for k in fns}
            for fn in fns.values():  # warm-up: compiles, page faults
                fn()
            # Rounds of short blocks (`repeat` calls per implementation), until every
            # implementation has run `cycles` rounds and `min_time` seconds: drift of a
            # busy machine hits all alike at a fine grain. The order rotates each round:
            # right after a switch the previous implementation's idle threads (XLA's pool,
            # the other OpenMP team: the NumPy path's team belongs to the main thread,
            # the JAX path's to an XLA thread) may still be spinning, and rotation
            # spreads that over all; within a block the median shrugs it off. An
            # implementation that has spent `budget` seconds drops out of later rounds
            # (pure JAX on the encoder: seconds a call).
            keys = list(fns)
            spent = {k: 0.0 for k in fns}
            for rnd in range(100000):
                live = [k for k in keys if not (spent[k] > budget and len(times[k]) >= 3)]
                if rnd >= cycles and all(spent[k] >= min_time for k in live):
                    break
                for k in live[rnd % len(live):] + live[:rnd % len(live)]:
                    for _ in range(repeat):
                        t0 = time.perf_counter()
                        fns[k]()
                        times[k].append(time.perf_counter() - t0)
                    spent[k] += sum(times[k][-repeat:])
            for pas in ("forward", "forward+backward"):
                rows.append({"call": call, "dtype": dtype, "threads": threads, "pass": pas,
                             **{impl: statistics.median(times[(pas, impl)])
                                for impl in ("numpy", "cydeform.jax", "pure_callback", "pure JAX")}})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per block")
    parser.add_argument("--cycles", type=int, default=10, help="rounds of blocks at least (median of all calls)")
    parser.add_argument("--min-time", type=float, default=1.0,
                        help="more rounds until each implementation has run this many seconds on a row")
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds an implementation may spend on one row before it skips later rounds")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="cydeform thread counts")
    parser.add_argument("--calls", nargs="+", default=list(CALLS), choices=list(CALLS))
    parser.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "float64"])
    args = parser.parse_args(argv)
    import jax

    if "float64" in args.dtype:
        jax.config.update("jax_enable_x64", True)
    from .cpu import _cpu_model

    print(f"# cydeform.jax benchmark: {_cpu_model()}, {os.cpu_count()} logical cores, jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; median of all calls, in rotating rounds of "
          f"{args.repeat} calls, at least {args.cycles} rounds and {args.min_time:g} s a row (at most {args.budget:g} s); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; "
          f"threads = cydeform.set_num_threads (pure JAX: XLA's default thread pool, all cores)")
    print("| call | pass | dtype | threads | NumPy direct (ms) | cydeform.jax (ms) | pure_callback glue (ms) "
          "| pure JAX (ms) | cydeform.jax / NumPy | glue / NumPy | pure JAX / cydeform.jax |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for t in args.threads:
        for r in _rows(t, args.calls, args.dtype, args.repeat, args.cycles, args.min_time, args.budget):
            n, c, b, p = r["numpy"], r["cydeform.jax"], r["pure_callback"], r["pure JAX"]
            print(f"| {r['call']} | {r['pass']} | {r['dtype']} | {t} | {n * 1e3:.2f} | {c * 1e3:.2f} | {b * 1e3:.2f} "
                  f"| {p * 1e3:.1f} | {c / n:.3f} | {b / n:.2f} | {p / c:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
