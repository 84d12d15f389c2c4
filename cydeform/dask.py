"""Multi-scale deformable attention over dask arrays chunked along the batch axis N.

Each N-chunk runs one call of :func:`cydeform.ms_deform_attn` (or its backward) on
the chunk's own array type (NumPy chunks on the CPU backend, CuPy chunks on the GPU),
so results are bit-identical to one call on the whole batch: the op computes each
image independently. ``import cydeform`` never imports this module or dask.

Axis letters: N batch, S value positions, M heads, D channels per head, Lq queries,
L levels, P points per head and level.
"""
from __future__ import annotations

import dask
import dask.array as da
import numpy as np

from . import _validate
from .functional import ms_deform_attn as _forward, ms_deform_attn_backward as _backward

__all__ = ["ms_deform_attn", "ms_deform_attn_backward", "layer_forward", "layer_backward"]

_AXES = {
    "value": "NSMD",
    "sampling_locations": ("N", "Lq", "M", "L", "P", "2"),
    "attention_weights": ("N", "Lq", "M", "L", "P"),
    "grad_output": ("N", "Lq", "M*D"),
}


def _chunked_along_n(name, arr, chunks, axes=None):
    """``arr`` as a dask array with N-chunks ``chunks``: NumPy/CuPy arrays wrapped, dask
    arrays rechunked along N; chunking along any other axis refused (``axes`` names them)."""
    if not isinstance(arr, da.Array):
        arr = da.from_array(arr, chunks=(chunks,) + tuple(-1 for _ in arr.shape[1:]))
    for i in range(1, arr.ndim):
        if len(arr.chunks[i]) > 1:
            label = f" ({axes[i]})" if axes else ""
            raise ValueError(f"{name} is chunked along axis {i}{label}; only the batch axis N may be "
                             f"chunked: rechunk with {name}.rechunk({{{i}: -1}})")
    return arr.rechunk({0: chunks}) if arr.chunks[0] != chunks else arr


def _as_dask(named, reference_chunks):
    """Wrap NumPy/CuPy arrays, check that only N is chunked, rechunk N to ``reference_chunks``."""
    out = {}
    for name, arr in named.items():
        if not isinstance(arr, da.Array) and not hasattr(arr, "shape"):
            raise TypeError(f"{name} must be a dask, NumPy or CuPy array; got {type(arr).__name__}")
        if len(arr.shape) < 1 or arr.shape[0] != sum(reference_chunks):
            raise ValueError(f"{name} has shape {tuple(arr.shape)} but the first dask argument has "
                             f"N = {sum(reference_chunks)} (axis 0)")
        axes = _AXES[name]
        if len(arr.shape) != len(axes):
            raise ValueError(f"{name} must have {len(axes)} axes {tuple(axes)}; got shape {tuple(arr.shape)}")
        out[name] = _chunked_along_n(name, arr, reference_chunks, axes)
    return out


def _stand_in(arr):
    """A zero-memory NumPy array with ``arr``'s shape and dtype, for eager validation."""
    return np.broadcast_to(np.zeros((), dtype=arr.dtype), arr.shape)


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output=None):
    named = {"value": value, "sampling_locations": sampling_locations, "attention_weights": attention_weights}
    if grad_output is not None:
        named = {"grad_output": grad_output, **named}
    first = next((a for a in named.values() if isinstance(a, da.Array)), None)
    if first is None:
        raise TypeError("at least one of " + ", ".join(named) + " must be a dask array")
    arrays = _as_dask(named, first.chunks[0])
    on_gpu = _validate._is_cupy(arrays["value"]._meta)
    prob = _validate.check_problem(_stand_in(arrays["value"]), spatial_shapes, level_start_index,
                                   _stand_in(arrays["sampling_locations"]), _stand_in(arrays["attention_weights"]),
                                   _validate.GPU_DTYPES if on_gpu else _validate.CPU_DTYPES)
    if grad_output is not None:
        _validate.check_grad_output(_stand_in(arrays["grad_output"]), prob)
    return arrays, prob


def _from_parts(parts, template, shape_of, dtype, n_chunks):
    blocks = [da.from_delayed(p, shape=shape_of(n), dtype=dtype, meta=template) for p, n in zip(parts, n_chunks)]
    return da.concatenate(blocks, axis=0)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """:func:`cydeform.ms_deform_attn` on dask arrays chunked along N.

    Parameters
    ----------
    value : dask array (N, S, M, D)
    spatial_shapes : integer NumPy array (L, 2)
    level_start_index : integer NumPy array (L,) or None
    sampling_locations : dask array (N, Lq, M, L, P, 2)
    attention_weights : dask array (N, Lq, M, L, P)
        Only axis N may have more than one chunk; the first dask array's N-chunks
        are used and the others are rechunked to match. NumPy or CuPy arrays are
        wrapped as one chunk per N-chunk.

    Returns
    -------
    dask array (N, Lq, M * D)
        Chunked like the inputs along N, chunks of the inputs' array type.

    Raises
    ------
    ValueError, TypeError
        Eagerly (before computing) for chunking along any axis but N, and for
        everything :func:`cydeform.ms_deform_attn` refuses.
    """
    a, prob = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    shapes, starts = np.asarray(prob.spatial_shapes), np.asarray(prob.level_start_index)
    v, lo, w = (a[k].to_delayed().ravel() for k in ("value", "sampling_locations", "attention_weights"))
    call = dask.delayed(_forward, pure=True)
    parts = [call(vb, shapes, starts, lb, wb) for vb, lb, wb in zip(v, lo, w)]
    meta = a["value"]._meta.reshape((0, 0, 0))
    return _from_parts(parts, meta, lambda n: (n, prob.Lq, prob.M * prob.D), a["value"].dtype,
                       a["value"].chunks[0])


def ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, deterministic=False):
    """:func:`cydeform.ms_deform_attn_backward` on dask arrays chunked along N.

    Parameters are those of :func:`ms_deform_attn` plus ``grad_output``, a dask
    array (N, Lq, M * D), and ``deterministic`` (passed on).

    Returns
    -------
    grad_value : dask array (N, S, M, D)
    grad_sampling_locations : dask array (N, Lq, M, L, P, 2)
    grad_attention_weights : dask array (N, Lq, M, L, P)
        Each chunked along N like the inputs; one task per chunk computes all three.
    """
    a, prob = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output)
    shapes, starts = np.asarray(prob.spatial_shapes), np.asarray(prob.level_start_index)
    g, v, lo, w = (a[k].to_delayed().ravel()
                   for k in ("grad_output", "value", "sampling_locations", "attention_weights"))
    call = dask.delayed(_backward, pure=True, nout=3)
    parts = [call(gb, vb, shapes, starts, lb, wb, deterministic=bool(deterministic))
             for gb, vb, lb, wb in zip(g, v, lo, w)]
    meta_of = lambda ndim: a["value"]._meta.reshape((0,) * ndim)  # noqa: E731
    dt, nch = a["value"].dtype, a["value"].chunks[0]
    p = prob
    return (
        _from_parts([q[0] for q in parts], meta_of(4), lambda n: (n, p.S, p.M, p.D), dt, nch),
        _from_parts([q[1] for q in parts], meta_of(6), lambda n: (n, p.Lq, p.M, p.L, p.P, 2), dt, nch),
        _from_parts([q[2] for q in parts], meta_of(5), lambda n: (n, p.Lq, p.M, p.L, p.P), dt, nch),
    )


# --------------------------------------------------------------------------- the layer over dask

def _layer_spec(layer):
    """What a worker needs to rebuild ``layer``: its sizes, dtype, module and parameters."""
    from .nn import MSDeformAttn

    if not isinstance(layer, MSDeformAttn):
        raise TypeError(f"layer must be a cydeform.nn.MSDeformAttn; got {type(layer).__name__}")
    sizes = (layer.d_model, layer.n_levels, layer.n_heads, layer.n_points)
    return sizes, layer.dtype.name, layer.xp.__name__, layer.state_dict()


def _rebuild(spec):
    # Workers keep no state between tasks: each task builds its own copy of the layer
    # (cheap next to the op) instead of unpickling one whose named views would be copies.
    from .nn import MSDeformAttn

    sizes, dtype, module, state = spec
    layer = MSDeformAttn(*sizes, dtype=dtype)
    if module != "numpy":
        import cupy

        layer.to(cupy)
    layer.load_state_dict(state)
    return layer


def _layer_inputs(query, reference_points, input_flatten, input_padding_mask):
    """Dask arrays chunked along N like ``query``; reference points with a leading 1 stay whole."""
    for name, arr, ndim in (("query", query, 3), ("input_flatten", input_flatten, 3)):
        if not hasattr(arr, "shape") or len(arr.shape) != ndim:
            raise ValueError(f"{name} must be an array of shape (N, ., C); got "
                             f"{getattr(arr, 'shape', type(arr).__name__)}")
    first = next((a for a in (query, input_flatten) if isinstance(a, da.Array)), None)
    if first is None:
        raise TypeError("query or input_flatten must be a dask array")
    nch = first.chunks[0]
    named = {"query": query, "input_flatten": input_flatten}
    if input_padding_mask is not None:
        named["input_padding_mask"] = input_padding_mask
    ref_whole = getattr(reference_points, "shape", (None,))[0] == 1
    if not ref_whole:
        named["reference_points"] = reference_points
    out = {}
    for name, arr in named.items():
        if not hasattr(arr, "shape") or len(arr.shape) < 1 or arr.shape[0] != first.shape[0]:
            raise ValueError(f"{name} has N = {getattr(arr, 'shape', (None,))[0]} (axis 0 of shape "
                             f"{getattr(arr, 'shape', None)}) but query/input_flatten have N = {first.shape[0]}")
        out[name] = _chunked_along_n(name, arr, nch)
    if ref_whole:
        out["reference_points"] = reference_points.compute() if isinstance(reference_points, da.Array) \
            else reference_points
    return out, nch


def _eager_check(layer, arrays, input_spatial_shapes, input_level_start_index):
    """Run the layer's own checks on zero-memory stand-ins of one image, before any compute."""
    if layer.xp is not np:
        return  # stand-ins are NumPy; the layer checks CuPy chunks when the tasks run
    one = {k: (_stand_in(v) if isinstance(v, da.Array) else v)[:1] for k, v in arrays.items()}
    N, _, shapes = layer._check_queries(one["query"], one["reference_points"], input_spatial_shapes)
    layer._check_values(one["input_flatten"], N, shapes, input_level_start_index, one.get("input_padding_mask"))


def _blocks(arrays, name, n):
    a = arrays.get(name)
    if a is None:
        return [None] * n
    if not isinstance(a, da.Array):
        return [a] * n  # reference points with a leading 1, shared by every chunk
    return list(a.to_delayed().ravel())


def _chunk_forward(spec, query, ref, flat, shapes, starts, mask):
    return _rebuild(spec).forward(query, ref, flat, shapes, starts, mask)


def _chunk_backward(spec, grad_output, query, ref, flat, shapes, starts, mask, deterministic):
    """One chunk's input gradients and each image's parameter gradients, image by image.

    Returns (grad_query, grad_reference_points (one row per image, also when the
    references are shared), grad_input, list over images of {name: parameter gradient}). Each image runs alone so its
    parameter gradients are the exact term :meth:`Linear.backward` adds for it in one call.
    """
    layer = _rebuild(spec)
    xp = layer.xp
    gq, gr, gi, per_image = [], [], [], []
    for n in range(query.shape[0]):
        r = ref if ref.shape[0] == 1 else ref[n:n + 1]
        m = None if mask is None else mask[n:n + 1]
        layer.zero_grad()
        layer.forward(query[n:n + 1], r, flat[n:n + 1], shapes, starts, m)
        q, rr, i = layer.backward(grad_output[n:n + 1], deterministic=deterministic)
        gq.append(q), gr.append(rr), gi.append(i)
        per_image.append({k: g.copy() for k, g in layer.grads.items()})
    cat = (lambda parts: xp.concatenate(parts, axis=0)) if query.shape[0] else (lambda parts: None)
    return cat(gq), cat(gr), cat(gi), per_image


def _accumulate(total, per_image):
    """Add each image's parameter gradients to ``total`` in image order (None: start)."""
    for grads in per_image:
        if total is None:
            total = {k: g.copy() for k, g in grads.items()}
        else:
            for k, g in grads.items():
                total[k] += g
    return total


def layer_forward(layer, query, reference_points, input_flatten, input_spatial_shapes,
                  input_level_start_index=None, input_padding_mask=None):
    """:meth:`cydeform.nn.MSDeformAttn.forward` over a batch of dask arrays chunked along N.

    Parameters
    ----------
    layer : cydeform.nn.MSDeformAttn
        Its parameters are copied into the graph when this is called; later changes to
        the layer do not affect the result. Keeps no activations (use
        :func:`layer_backward` for gradients).
    query : dask array (N, Lq, C)
    reference_points : array (N, Lq, L, 2 or 4), or (1, Lq, L, 2 or 4) shared by all images
    input_flatten : dask array (N, S, C)
    input_spatial_shapes, input_level_start_index : as in ``MSDeformAttn.forward``
    input_padding_mask : bool array (N, S) or None

    Only axis N may be chunked; arrays are rechunked to the N-chunks of ``query``
    (or of ``input_flatten`` when ``query`` is not a dask array).

    Returns
    -------
    dask array (N, Lq, C)
        Bit-identical to ``layer.forward`` on the whole batch on the CPU.
    """
    spec = _layer_spec(layer)
    arrays, nch = _layer_inputs(query, reference_points, input_flatten, input_padding_mask)
    _eager_check(layer, arrays, input_spatial_shapes, input_level_start_index)
    q, r, f, m = (_blocks(arrays, k, len(nch)) for k in ("query", "reference_points", "input_flatten",
                                                       "input_padding_mask"))
    call = dask.delayed(_chunk_forward, pure=True)
    spec_d = dask.delayed(spec, traverse=False)
    parts = [call(spec_d, q[i], r[i], f[i], input_spatial_shapes, input_level_start_index, m[i])
             for i in range(len(nch))]
    Lq, C = arrays["query"].shape[1], layer.d_model
    return _from_parts(parts, arrays["query"]._meta, lambda n: (n, Lq, C), layer.dtype, nch)


def layer_backward(layer, grad_output, query, reference_points, input_flatten, input_spatial_shapes,
                   input_level_start_index=None, input_padding_mask=None, *, deterministic=False):
    """Gradients of :meth:`MSDeformAttn.forward` over a batch of dask arrays chunked along N.

    Takes the forward's arguments (see :func:`layer_forward`) plus ``grad_output``
    (N, Lq, C). Each chunk's task runs the chunk's forward again (workers keep no
    activations), then the backward image by image.

    Returns
    -------
    grad_query : dask array (N, Lq, C)
    grad_reference_points : dask array shaped like ``reference_points``
        Summed over the batch when ``reference_points`` has a leading 1.
    grad_input_flatten : dask array (N, S, C)
    param_grads : dict name -> dask array
        The batch's parameter gradients under the PyTorch names of ``layer.grads``,
        added image by image in image order (a chain of small tasks, one per chunk):
        on the CPU bit-identical to ``layer.grads`` after ``zero_grad()``, ``forward``
        and ``backward`` on the whole batch, whatever the chunking, scheduler or
        retries. Add them into ``layer.grads`` yourself; the layer is not modified.

    Notes
    -----
    Bit-identity needs the same BLAS thread count where the one call runs: NumPy's
    weight-gradient products (a long reduction over the queries) round differently
    when OpenBLAS splits them over another number of threads, and
    ``distributed`` starts its workers with one BLAS thread. cydeform's own op is
    independent of its thread count and of how the batch is split.
    """
    spec = _layer_spec(layer)
    arrays, nch = _layer_inputs(query, reference_points, input_flatten, input_padding_mask)
    _eager_check(layer, arrays, input_spatial_shapes, input_level_start_index)
    N, Lq, C = (int(s) for s in arrays["query"].shape)
    if tuple(grad_output.shape) != (N, Lq, C):
        raise ValueError(f"grad_output must have the output's shape (N, Lq, C) = {(N, Lq, C)}; "
                         f"got {tuple(grad_output.shape)}")
    g = _as_dask({"grad_output": grad_output}, nch)["grad_output"]
    blocks = {k: _blocks(arrays, k, len(nch)) for k in ("query", "reference_points", "input_flatten",
                                                         "input_padding_mask")}
    gb = list(g.to_delayed().ravel())
    call = dask.delayed(_chunk_backward, pure=True, nout=4)
    spec_d = dask.delayed(spec, traverse=False)
    parts = [call(spec_d, gb[i], blocks["query"][i], blocks["reference_points"][i], blocks["input_flatten"][i],
                  input_spatial_shapes, input_level_start_index, blocks["input_padding_mask"][i],
                  bool(deterministic)) for i in range(len(nch))]
    total = None
    acc = dask.delayed(_accumulate, pure=True)
    for p in parts:
        total = acc(total, p[3])
    meta = arrays["query"]._meta
    dt, S = layer.dtype, int(arrays["input_flatten"].shape[1])
    ref = arrays["reference_points"]
    ref_shape = tuple(int(s) for s in ref.shape)
    grad_query = _from_parts([p[0] for p in parts], meta, lambda n: (n, Lq, C), dt, nch)
    grad_input = _from_parts([p[2] for p in parts], meta, lambda n: (n, S, C), dt, nch)
    meta4 = meta.reshape((0,) * len(ref_shape))
    grad_ref = _from_parts([p[1] for p in parts], meta4, lambda n: (n,) + ref_shape[1:], dt, nch)
    if ref_shape[0] == 1 and N > 1:
        # The same reduction as the one call: sum over axis 0 of the whole (N, ...) array.
        summed = dask.delayed(lambda a: a.sum(axis=0, keepdims=True), pure=True)(grad_ref.rechunk({0: -1}))
        grad_ref = da.from_delayed(summed, shape=ref_shape, dtype=dt, meta=meta4)
    params = {k: da.from_delayed(total[k], shape=tuple(v.shape), dtype=dt, meta=meta.reshape((0,) * v.ndim))
              for k, v in layer.params.items()}
    return grad_query, grad_ref, grad_input, params
