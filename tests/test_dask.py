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



def test_chunks_equal_one_call_when_the_backward_splits_queries():
    """Many samples per value position at the default threshold: the CPU backward sums
    grad_value in query chunks; an image's chunks must not depend on the batch."""
    from cydeform import _cpu

    rng = np.random.default_rng(5)
    n, m, d, lq, p = 3, 4, 32, 300, 4
    S = int((SHAPES[:, 0] * SHAPES[:, 1]).sum())
    assert _cpu._impl.query_chunks(S, lq, len(SHAPES), p, lq * m * len(SHAPES) * p * d) > 1
    value = rng.standard_normal((n, S, m, d)).astype(np.float32)
    loc = rng.uniform(-0.1, 1.1, (n, lq, m, len(SHAPES), p, 2)).astype(np.float32)
    attn = rng.random((n, lq, m, len(SHAPES), p)).astype(np.float32)
    grad = rng.standard_normal((n, lq, m * d)).astype(np.float32)
    want = cydeform.ms_deform_attn_backward(grad, value, SHAPES, None, loc, attn)
    for chunks in (1, 2):
        got = dask.compute(*cdask.ms_deform_attn_backward(grad, da.from_array(value, chunks=(chunks, -1, -1, -1)),
                                                          SHAPES, None, loc, attn), scheduler="threads")
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
    """Return ``arr``; on the first attempt, write this process's pid and block (bounded).

    The gate is claimed atomically (O_EXCL): dask may fuse the gated call into more than
    one task (the layer test's forward and backward graphs), and two of them can start at
    once on the two workers; only one may block, or the other waits out its 60 s."""
    import os
    import pathlib
    import time

    try:
        fd = os.open(pathlib.Path(gate_dir, "first"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        pathlib.Path(gate_dir, "retry").write_text(str(os.getpid()))
        return arr
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(60)  # the test kills this process long before
    raise RuntimeError("the test did not kill the worker")


def _kill_the_gated_worker(gate_dir):
    """Wait until the gated task runs, SIGKILL its worker process, return its pid."""
    import os
    import signal
    import time

    first = gate_dir / "first"
    deadline = time.monotonic() + 60
    while not first.exists() or not first.read_text():
        assert time.monotonic() < deadline, "the gated task never started"
        time.sleep(0.05)
    killed = int(first.read_text())
    os.kill(killed, signal.SIGKILL)
    return killed


def test_a_worker_killed_mid_compute_gives_the_exact_result_after_retry(tmp_path):
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
        killed = _kill_the_gated_worker(tmp_path)
        out = fut.result(timeout=120)
    retried = int((tmp_path / "retry").read_text())
    assert retried != killed
    np.testing.assert_array_equal(out, cydeform.ms_deform_attn(value, SHAPES, None, loc, attn))


# --------------------------------------------------------------------------- the layer over dask

from cydeform.nn import MSDeformAttn  # noqa: E402

LAYER_SHAPES = np.array([[6, 5], [3, 4]], dtype=np.int64)
C, LS = 16, 42


def layer_problem(ref_kind="per_image", dtype="float64", mask=False, seed=0):
    """A layer with perturbed (non-initial) parameters and one batch of inputs."""
    rng = np.random.default_rng(seed)
    layer = MSDeformAttn(C, 2, 2, 3, dtype=dtype, seed=1)
    for p in layer.params.values():
        p[...] += rng.standard_normal(p.shape).astype(dtype) * 0.1
    width = 4 if ref_kind == "box" else 2
    ref = rng.uniform(0.1, 0.9, (1 if ref_kind == "shared" else N, Lq, 2, width)).astype(dtype)
    return layer, dict(
        query=rng.standard_normal((N, Lq, C)).astype(dtype),
        reference_points=ref,
        input_flatten=rng.standard_normal((N, LS, C)).astype(dtype),
        input_padding_mask=(rng.random((N, LS)) < 0.2) if mask else None,
    ), rng.standard_normal((N, Lq, C)).astype(dtype)


def one_call(layer, x, grad):
    out = layer.forward(x["query"], x["reference_points"], x["input_flatten"], LAYER_SHAPES, None,
                        x["input_padding_mask"])
    layer.zero_grad()
    grads = layer.backward(grad)
    return out, grads, {k: g.copy() for k, g in layer.grads.items()}


def dask_calls(layer, x, grad, chunks):
    dq = da.from_array(x["query"], chunks=(chunks, -1, -1))
    args = (dq, x["reference_points"], x["input_flatten"], LAYER_SHAPES, None, x["input_padding_mask"])
    return cdask.layer_forward(layer, *args), cdask.layer_backward(layer, grad, *args)


@pytest.mark.parametrize("ref_kind,chunks,dtype,mask", [
    ("per_image", 2, "float64", False), ("per_image", 5, "float32", True),
    ("shared", 2, "float64", True), ("shared", 1, "float32", False), ("box", 3, "float64", False)])
def test_layer_forward_backward_and_parameter_gradients_equal_one_call_bit_for_bit(ref_kind, chunks, dtype, mask):
    layer, x, grad = layer_problem(ref_kind, dtype, mask)
    out_d, (gq_d, gr_d, gi_d, params_d) = dask_calls(layer, x, grad, chunks)
    assert out_d.chunks[0] == gq_d.chunks[0] == da.from_array(x["query"], chunks=(chunks, -1, -1)).chunks[0]
    with dask.config.set(scheduler="threads"):
        got = dask.compute(out_d, gq_d, gr_d, gi_d, params_d)
    out, (gq, gr, gi), params = one_call(layer, x, grad)
    for g, w in zip(got[:4], (out, gq, gr, gi)):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_array_equal(g, w)
    assert set(got[4]) == set(params)
    for name in params:
        np.testing.assert_array_equal(got[4][name], params[name], err_msg=name)


def test_layer_over_dask_leaves_the_layer_unchanged():
    layer, x, grad = layer_problem()
    before = {k: p.copy() for k, p in layer.params.items()}
    layer.zero_grad()
    _, back = dask_calls(layer, x, grad, 2)
    dask.compute(*back[:3], back[3], scheduler="threads")
    for k, p in layer.params.items():
        np.testing.assert_array_equal(p, before[k])
        assert not layer.grads[k].any()


def test_layer_over_dask_refuses_bad_input_before_computing():
    layer, x, grad = layer_problem()
    dq = da.from_array(x["query"], chunks=(2, -1, -1))
    with pytest.raises(TypeError, match="MSDeformAttn"):
        cdask.layer_forward(object(), dq, x["reference_points"], x["input_flatten"], LAYER_SHAPES)
    with pytest.raises(ValueError, match=r"input_flatten is chunked along axis 1"):
        cdask.layer_forward(layer, dq, x["reference_points"], da.from_array(x["input_flatten"], chunks=(2, 7, -1)),
                            LAYER_SHAPES)
    with pytest.raises(ValueError, match="input_spatial_shapes"):
        cdask.layer_forward(layer, dq, x["reference_points"], x["input_flatten"], LAYER_SHAPES[:, ::-1] * 2)
    with pytest.raises(ValueError, match="N = 4"):
        cdask.layer_forward(layer, dq, x["reference_points"], x["input_flatten"][:4], LAYER_SHAPES)
    with pytest.raises(ValueError, match="grad_output"):
        cdask.layer_backward(layer, grad[:, :3], dq, x["reference_points"], x["input_flatten"], LAYER_SHAPES)


def _gated_query(arr, gate_dir):
    """Like _gated_chunk, for the layer test's query chunk."""
    return _gated_chunk(arr, gate_dir)


def test_layer_backward_on_a_local_cluster_with_a_worker_killed_mid_compute(tmp_path):
    distributed = pytest.importorskip("distributed")
    layer, x, grad = layer_problem("shared", mask=True)
    q = x["query"]
    gated = dask.delayed(_gated_query, pure=False)(q[4:], str(tmp_path))
    dq = da.concatenate([da.from_array(q[:4], chunks=(2, -1, -1)), da.from_delayed(gated, shape=q[4:].shape,
                                                                                   dtype=q.dtype)])
    args = (dq, x["reference_points"], x["input_flatten"], LAYER_SHAPES, None, x["input_padding_mask"])
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        import cloudpickle
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
        futures = client.compute([cdask.layer_forward(layer, *args), *cdask.layer_backward(layer, grad, *args)])
        killed = _kill_the_gated_worker(tmp_path)
        got = [f.result(timeout=120) for f in futures]
    assert int((tmp_path / "retry").read_text()) != killed
    out, (gq, gr, gi), params = one_call(layer, x, grad)
    for g, w in zip(got[:4], (out, gq, gr, gi)):
        np.testing.assert_array_equal(g, w)
    for name in params:
        np.testing.assert_array_equal(got[4][name], params[name], err_msg=name)


def test_an_argument_with_another_batch_size_is_refused_naming_it():
    value, loc, attn, _ = problem()
    with pytest.raises(ValueError, match=r"attention_weights has shape \(4,.*N = 5"):
        cdask.ms_deform_attn(da.from_array(value, chunks=(2, -1, -1, -1)), SHAPES, None, loc, attn[:4])


def test_dask_benchmark_prints_a_row_per_pass_and_worker_count():
    pytest.importorskip("distributed")
    result = subprocess.run([sys.executable, "-m", "cydeform.bench", "--dask", "--images", "1", "--repeat", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| forward")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("forward", "1"), ("forward+backward", "1"), ("forward", "2"), ("forward+backward", "2")]
    for r in rows:
        assert float(r[2]) > 0 and float(r[3]) > 0
