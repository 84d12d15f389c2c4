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

__all__ = ["ms_deform_attn", "ms_deform_attn_backward"]

_AXES = {
    "value": "NSMD",
    "sampling_locations": ("N", "Lq", "M", "L", "P", "2"),
    "attention_weights": ("N", "Lq", "M", "L", "P"),
    "grad_output": ("N", "Lq", "M*D"),
}


def _as_dask(named, reference_chunks):
    """Wrap NumPy/CuPy arrays, check that only N is chunked, rechunk N to ``reference_chunks``."""
    out = {}
    for name, arr in named.items():
        if not isinstance(arr, da.Array):
            if not hasattr(arr, "shape"):
                raise TypeError(f"{name} must be a dask, NumPy or CuPy array; got {type(arr).__name__}")
            arr = da.from_array(arr, chunks=(reference_chunks,) + tuple(-1 for _ in arr.shape[1:]))
        axes = _AXES[name]
        if arr.ndim != len(axes):
            raise ValueError(f"{name} must have {len(axes)} axes {tuple(axes)}; got shape {arr.shape}")
        for i in range(1, arr.ndim):
            if len(arr.chunks[i]) > 1:
                raise ValueError(f"{name} is chunked along axis {i} ({axes[i]}); only the batch axis N may be "
                                 f"chunked: rechunk with {name}.rechunk({{{i}: -1}})")
        if arr.chunks[0] != reference_chunks:
            arr = arr.rechunk({0: reference_chunks})
        out[name] = arr
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
