"""A batch of images through one MSDeformAttn layer on a Dask cluster, forward and backward.

The batch is chunked along N (two images per chunk) and runs on a LocalCluster of two
worker processes; in real use the cluster would be a set of machines and the arrays
would come from ``dask.array`` readers (zarr, HDF5, images on disk). The layer's
parameters travel with the graph; the parameter gradients come back summed over the
batch. Checks: everything equals one call of the layer on the whole batch, bit for bit.

Needs ``pip install "cydeform[dask]"``.
"""
import sys
import time

import numpy as np

try:
    import dask
    import dask.array as da
    import distributed
except ImportError:
    print("dask_batch: needs dask and distributed (pip install 'cydeform[dask]'); skipped")
    sys.exit(0)

from cydeform import dask as cdask
from cydeform.nn import MSDeformAttn, encoder_reference_points, flatten_levels

N, C, SIZES = 6, 64, [(32, 48), (16, 24), (8, 12), (4, 6)]  # (H_l, W_l) per level


def one_call(state, src, ref, shapes, starts, grad):
    """Forward and backward of the layer with parameters ``state`` on the whole batch."""
    layer = MSDeformAttn(C, n_levels=len(SIZES), n_heads=8, n_points=4)
    layer.load_state_dict(state)
    out = layer.forward(src, ref, src, shapes, starts)
    return (out, *layer.backward(grad), {k: g.copy() for k, g in layer.grads.items()})


def main():
    rng = np.random.default_rng(0)
    layer = MSDeformAttn(C, n_levels=len(SIZES), n_heads=8, n_points=4, seed=0)
    # Untrained offsets lie on rays; perturb them so the batch exercises general positions.
    for p in layer.params.values():
        p[...] += (0.05 * rng.standard_normal(p.shape)).astype(p.dtype)
    src, shapes, starts = flatten_levels([rng.standard_normal((N, C, h, w)).astype(np.float32) for h, w in SIZES])
    ref = encoder_reference_points(shapes, dtype=np.float32)  # (1, S, L, 2): shared by the batch
    grad = rng.standard_normal(src.shape).astype(np.float32)

    # Chunk along N only: two images per task.
    query = da.from_array(src, chunks=(2, -1, -1))
    out = cdask.layer_forward(layer, query, ref, src, shapes, starts)
    g_query, g_ref, g_input, g_params = cdask.layer_backward(layer, grad, query, ref, src, shapes, starts)

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        t0 = time.perf_counter()
        got = dask.compute(out, g_query, g_ref, g_input, g_params)
        elapsed = time.perf_counter() - t0
        # The same as one call of the layer on the whole batch, run on a worker so that
        # NumPy's BLAS uses the workers' thread count (its weight-gradient products round
        # differently with another; cydeform's own op does not).
        want = client.submit(one_call, layer.state_dict(), src, ref, shapes, starts, grad).result()
    print(f"dask_batch: {N} images ({src.shape[1]} queries each, C={C}) forward + backward on 2 workers "
          f"in {elapsed:.2f} s (includes shipping the inputs)")
    failures = []
    for name, g, w in zip(("output", "grad_query", "grad_reference_points", "grad_input_flatten"),
                          got[:4], want[:4]):
        if g.shape != w.shape or not np.array_equal(g, w):
            failures.append(name)
    failures += [name for name, g in got[4].items() if not np.array_equal(g, want[4][name])]
    if failures:
        print("dask_batch: differs from one call in " + ", ".join(failures))
        return 1
    print("dask_batch: output, input gradients and all 8 parameter gradients equal one call bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
