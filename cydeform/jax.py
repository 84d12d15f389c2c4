"""Multi-scale deformable attention for JAX, on the Cython CPU backend through the XLA FFI.

``ms_deform_attn`` takes the arguments of :func:`cydeform.ms_deform_attn` as JAX arrays
and returns a JAX array. It is differentiable (``jax.grad``, ``jax.vjp``) in value,
sampling_locations and attention_weights through the backend's hand-derived backward
(no JAX autodiff through the sampling), works under ``jax.jit`` with the level
geometry static, and under ``jax.vmap`` (the extra batch axes fold into N in the
handler: one call, no Python loop).

On the CPU the op is an XLA custom call (``jax.ffi.ffi_call``) whose handler
(cydeform/kernels/jax_cpu_ffi.cc, compiled at first use, see cydeform/_jax_ffi.py)
runs the same C code as the NumPy path on XLA's buffers: no copies, no Python and no
GIL at run time, results bit-identical to ``cydeform.ms_deform_attn`` on NumPy.
``cydeform.set_num_threads`` sets its thread count. float32 and float64 (with
``jax_enable_x64``).

GPU: not implemented. The targets are registered for the CPU platform only; under a
GPU backend, run the op on a CPU device (``jax.default_device(jax.devices("cpu")[0])``).

``import cydeform`` never imports this module or jax.

Axis letters: N batch, S value positions, M heads, D channels per head, Lq queries,
L levels, P points per head and level.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from . import _jax_ffi, _validate

__all__ = ["ms_deform_attn"]


def _static_int_array(name, arr):
    """``arr`` as a host array; a traced value cannot describe the level geometry."""
    if isinstance(arr, jax.core.Tracer):
        raise TypeError(f"{name} must be static under jax.jit (a tuple, list or NumPy array, or a "
                        f"static argument); got a traced JAX value")
    if arr is None or isinstance(arr, np.ndarray):
        return arr
    return np.asarray(arr)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention forward, as :func:`cydeform.ms_deform_attn`.

    Parameters
    ----------
    value : jax array (N, S, M, D)
    spatial_shapes : static integer array (L, 2)
        Rows (H_l, W_l): a tuple, list or NumPy array (a concrete JAX array is accepted
        outside jit). It fixes the kernel's geometry, so it must not be traced.
    level_start_index : static integer array (L,) or None
        Checked against ``spatial_shapes`` (derived when None).
    sampling_locations : jax array (N, Lq, M, L, P, 2)
    attention_weights : jax array (N, Lq, M, L, P)

    Returns
    -------
    jax array (N, Lq, M * D), value's dtype.

    Bad input raises the functional API's errors (same types and messages) at trace
    time: dtype, rank and shape checks need only the abstract values.
    """
    spatial_shapes = _static_int_array("spatial_shapes", spatial_shapes)
    level_start_index = _static_int_array("level_start_index", level_start_index)
    for name, a in (("value", value), ("sampling_locations", sampling_locations),
                    ("attention_weights", attention_weights)):
        if not hasattr(a, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(a).__name__}")
    prob = _validate.check_problem(value, spatial_shapes, level_start_index, sampling_locations,
                                   attention_weights, _validate.CPU_DTYPES)
    _jax_ffi.register()
    geometry = (tuple(int(v) for v in prob.spatial_shapes.ravel()),
                tuple(int(v) for v in prob.level_start_index))
    return _msda(geometry, value, sampling_locations, attention_weights)


def _attrs(geometry):
    shapes, starts = geometry
    return {"spatial_shapes": np.array(shapes, dtype=np.int64),
            "level_start_index": np.array(starts, dtype=np.int64)}


def _forward(geometry, value, loc, attn):
    N, Lq = loc.shape[:2]
    M, D = value.shape[2:]
    out = jax.ShapeDtypeStruct((N, Lq, M * D), value.dtype)
    # broadcast_all: under vmap every operand gets the batch axes in front, which the
    # handler folds into N.
    call = jax.ffi.ffi_call(_jax_ffi.FORWARD_TARGET, out, vmap_method="broadcast_all")
    return call(value, loc, attn, **_attrs(geometry))


def _backward(geometry, grad_out, value, loc, attn):
    outs = (jax.ShapeDtypeStruct(value.shape, value.dtype), jax.ShapeDtypeStruct(loc.shape, loc.dtype),
            jax.ShapeDtypeStruct(attn.shape, attn.dtype))
    call = jax.ffi.ffi_call(_jax_ffi.BACKWARD_TARGET, outs, vmap_method="broadcast_all")
    return call(grad_out.astype(value.dtype), value, loc, attn, **_attrs(geometry))


# The geometry (hashable tuples) is a non-differentiable static argument; the residuals
# are the inputs themselves (no copies, nothing recomputed).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _msda(geometry, value, loc, attn):
    return _forward(geometry, value, loc, attn)


def _msda_fwd(geometry, value, loc, attn):
    return _forward(geometry, value, loc, attn), (value, loc, attn)


def _msda_bwd(geometry, residuals, grad_out):
    return _backward(geometry, grad_out, *residuals)


_msda.defvjp(_msda_fwd, _msda_bwd)
