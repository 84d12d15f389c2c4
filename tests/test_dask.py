"""cydeform.dask: the op over dask arrays chunked along N equals one call, bit for bit."""
import subprocess
import sys

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
import dask  # noqa: E402

import cydeform  # noqa: E402
from cydeform import dask as cdask  # noqa: E402

SHAPES = np.array([[6, 5], [3, 4]], dtype=np.int64)
N, M, D, Lq, P = 5, 2, 3, 7, 2


def problem(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    S, L = int((SHAPES[:, 0] * SHAPES[:, 1]).sum()), len(SHAPES)
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(-0.2, 1.2, (N, Lq, M, L, P, 2)).astype(dtype)
    attn = rng.random((N, Lq, M, L, P)).astype(dtype)
    grad = rng.standard_normal((N, Lq, M * D)).astype(dtype)
    return value, loc, attn, grad


@pytest.mark.parametrize("chunks", [1, 2, 5])
def test_forward_and_backward_equal_one_call_bit_for_bit(chunks):
    value, loc, attn, grad = problem()
    dv = da.from_array(value, chunks=(chunks, -1, -1, -1))
    # The others come unchunked or chunked differently: they are rechunked to value's N-chunks.
    dl = da.from_array(loc, chunks=(3, -1, -1, -1, -1, -1))
    out = cdask.ms_deform_attn(dv, SHAPES, None, dl, attn)
    assert out.chunks[0] == dv.chunks[0]
    with dask.config.set(scheduler="threads"):
        np.testing.assert_array_equal(out.compute(), cydeform.ms_deform_attn(value, SHAPES, None, loc, attn))
        got = dask.compute(*cdask.ms_deform_attn_backward(da.from_array(grad, chunks=(chunks, -1, -1)),
                                                          dv, SHAPES, None, dl, attn))
    want = cydeform.ms_deform_attn_backward(grad, value, SHAPES, None, loc, attn)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_chunking_along_another_axis_is_refused_naming_argument_and_axis():
    value, loc, attn, _ = problem()
    dl = da.from_array(loc, chunks=(2, -1, 1, -1, -1, -1))
    with pytest.raises(ValueError, match=r"sampling_locations is chunked along axis 2 \(M\)"):
        cdask.ms_deform_attn(da.from_array(value, chunks=(2, -1, -1, -1)), SHAPES, None, dl, attn)


def test_bad_shapes_are_refused_before_computing():
    value, loc, attn, _ = problem()
    with pytest.raises(ValueError, match="spatial_shapes"):
        cdask.ms_deform_attn(da.from_array(value, chunks=(2, -1, -1, -1)), SHAPES[:1], None, loc, attn)


def test_importing_cydeform_does_not_import_dask():
    code = "import sys, cydeform, cydeform.nn; print('dask' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_on_a_local_cluster_of_two_worker_processes():
    distributed = pytest.importorskip("distributed")
    value, loc, attn, grad = problem()
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        dv = da.from_array(value, chunks=(2, -1, -1, -1))
        out = client.compute(cdask.ms_deform_attn(dv, SHAPES, None, loc, attn)).result(timeout=120)
        grads = client.compute(list(cdask.ms_deform_attn_backward(grad, dv, SHAPES, None, loc, attn)))
        got = [f.result(timeout=120) for f in grads]
    np.testing.assert_array_equal(out, cydeform.ms_deform_attn(value, SHAPES, None, loc, attn))
    for g, w in zip(got, cydeform.ms_deform_attn_backward(grad, value, SHAPES, None, loc, attn)):
        np.testing.assert_array_equal(g, w)


def _gated_chunk(arr, gate_dir):
    """Return ``arr``; on the first attempt, write this process's pid and block (bounded)."""
    import os
    import pathlib
    import time

    first = pathlib.Path(gate_dir, "first")
    if not first.exists():
        first.write_text(str(os.getpid()))
        time.sleep(60)  # the test kills this process long before
        raise RuntimeError("the test did not kill the worker")
    pathlib.Path(gate_dir, "retry").write_text(str(os.getpid()))
    return arr


def test_a_worker_killed_mid_compute_gives_the_exact_result_after_retry(tmp_path):
    import os
    import signal
    import time

    distributed = pytest.importorskip("distributed")
    value, loc, attn, grad = problem()
    gated = dask.delayed(_gated_chunk, pure=False)(value[4:], str(tmp_path))
    dv = da.concatenate([da.from_array(value[:4], chunks=(2, -1, -1, -1)),
                         da.from_delayed(gated, shape=value[4:].shape, dtype=value.dtype)])
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        import cloudpickle
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        fut = client.compute(cdask.ms_deform_attn(dv, SHAPES, None, loc, attn))
        deadline = time.monotonic() + 60
        while not (tmp_path / "first").exists() or not (tmp_path / "first").read_text():
            assert time.monotonic() < deadline, "the gated task never started"
            time.sleep(0.05)
        killed = int((tmp_path / "first").read_text())
        os.kill(killed, signal.SIGKILL)
        out = fut.result(timeout=120)
    retried = int((tmp_path / "retry").read_text())
    assert retried != killed
    np.testing.assert_array_equal(out, cydeform.ms_deform_attn(value, SHAPES, None, loc, attn))
