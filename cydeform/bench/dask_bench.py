"""Dask throughput: ``python -m cydeform.bench --dask [--images N] [--repeat R]``.

The encoder call (msda.md section 4, float32) over a batch of images chunked one image
per task, on a ``distributed.LocalCluster`` of 1 and then 2 worker processes with one
thread each (cydeform and BLAS on one thread per worker). Inputs are made on the
workers and persisted before timing, and each output chunk is reduced to a scalar on
its worker, so the rows measure the op's scaling, not the transfer of 23 MB per image
to the client. Prints images/s (median of ``repeat`` runs) beside the ideal line
(workers x the 1-worker rate) and the direct single-process call on one thread.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import cydeform

from .cpu import _cpu_model, median_time
from .problems import make_problem


def _image(seed, dtype):
    value, shapes, starts, loc, attn = make_problem(1, None, "local", np.dtype(dtype), seed=seed)
    grad = np.random.default_rng(seed + 1).standard_normal((1, loc.shape[1], value.shape[2] * value.shape[3]))
    return value, loc, attn, grad.astype(dtype)


def _batch(n_images, dtype):
    """Dask arrays (N, ...) made chunk by chunk on the workers."""
    import dask
    import dask.array as da

    value0, loc0, attn0, grad0 = _image(0, dtype)  # shapes and dtypes only
    parts = [dask.delayed(_image, pure=True, nout=4)(i, dtype) for i in range(n_images)]
    return [da.concatenate([da.from_delayed(p[k], shape=ref.shape, dtype=ref.dtype) for p in parts])
            for k, ref in enumerate((value0, loc0, attn0, grad0))]


def run(n_images=4, repeat=3, dtype="float32"):
    import dask
    import distributed

    from .. import dask as cdask

    _, shapes, starts, _, _ = make_problem(1, 300, "local", np.dtype(dtype))
    cydeform.set_num_threads(1)
    v, lo, a, g = _image(0, dtype)
    direct = {"forward": median_time(lambda: cydeform.ms_deform_attn(v, shapes, starts, lo, a), repeat),
              "forward+backward": median_time(lambda: (cydeform.ms_deform_attn(v, shapes, starts, lo, a),
                                                       cydeform.ms_deform_attn_backward(g, v, shapes, starts, lo, a)),
                                              repeat)}
    print(f"# cydeform {cydeform.__version__} Dask benchmark: {_cpu_model()}, {os.cpu_count()} logical cores; "
          f"encoder call (Lq = S = 22223, local locations), {dtype}, {n_images} images, one image per task; "
          f"median of {repeat} runs")
    print("| pass | workers | images/s | ideal images/s | of ideal | direct call, 1 thread, images/s |")
    print("|---|---|---|---|---|---|")
    base = {}
    for workers in (1, 2):
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                      dashboard_address=None) as cluster, distributed.Client(cluster) as client:
            client.run(cydeform.set_num_threads, 1)
            value, loc, attn, grad = client.persist(_batch(n_images, dtype))
            distributed.wait([value, loc, attn, grad])
            out = cdask.ms_deform_attn(value, shapes, starts, loc, attn)
            back = cdask.ms_deform_attn_backward(grad, value, shapes, starts, loc, attn)
            # One scalar per chunk, computed on its worker.
            total = lambda x: x.map_blocks(lambda b: b.sum(keepdims=True), chunks=(1,) * x.ndim)  # noqa: E731
            graphs = {"forward": [total(out)], "forward+backward": [total(out)] + [total(x) for x in back]}
            for name, graph in graphs.items():
                def once():
                    dask.compute(*graph)

                t = median_time(once, repeat)
                rate = n_images / t
                base.setdefault(name, rate)
                ideal = base[name] * workers
                print(f"| {name} | {workers} | {rate:.2f} | {ideal:.2f} | {rate / ideal:.0%} | "
                      f"{1 / direct[name]:.2f} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4, help="images in the batch (one task each)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row (median)")
    args, _ = parser.parse_known_args(argv)
    run(args.images, args.repeat)


if __name__ == "__main__":
    main()
