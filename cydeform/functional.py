"""The functional API: multi-scale deformable attention forward and backward.

NumPy arrays run on the Cython CPU backend (cydeform._cpu); CuPy arrays run on the
CUDA backend (cydeform._cuda) on CuPy's current device and stream. Results come back
in the inputs' array type, dtype and device.
"""
from __future__ import annotations

import numpy as np

from . import _validate

__all__ = ["ms_deform_attn", "ms_deform_attn_backward"]


def _native_byte_order(a):
    """A copy in native byte order if ``a`` is floating and byte-swapped; else ``a``."""
    if a.dtype.kind == "f" and not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


def _c_ready(a):
    """``a`` if C-contiguous and aligned for its dtype, else such a copy: the CPU backend
    reads the buffer through float/double pointers (np.ascontiguousarray keeps an array
    that starts at an odd byte offset as it is)."""
    if type(a) is np.ndarray and a.flags.c_contiguous and a.flags.aligned:
        return a
    return np.require(a, requirements="CAE")  # E: a base-class ndarray, as ascontiguousarray gave


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    if type(value) is np.ndarray and type(sampling_locations) is np.ndarray and type(attention_weights) is np.ndarray:
        xp = np  # the common case, without array_module's general checks
        # Native byte order: nothing to convert (the conversion pass costs ~15 us after an
        # op call has swept the caches).
        convert = not (value.dtype.isnative and sampling_locations.dtype.isnative
                       and attention_weights.dtype.isnative)
    else:
        xp = _validate.array_module(
            ("value", value), ("sampling_locations", sampling_locations), ("attention_weights", attention_weights)
        )
        convert = xp is np
    if convert:
        # Array-likes and non-native byte order are accepted on the CPU (converted, never
        # modified in place).
        value, sampling_locations, attention_weights = (
            _native_byte_order(a if isinstance(a, np.ndarray) else np.asarray(a))
            for a in (value, sampling_locations, attention_weights)
        )
    allowed = _validate.CPU_DTYPES if xp is np else _validate.GPU_DTYPES
    prob = _validate.check_problem(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, allowed
    )
    return xp, prob, value, sampling_locations, attention_weights


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention forward (Deformable DETR, section 4.1).

    Parameters
    ----------
    value : array (N, S, M, D)
        Levels flattened row-major (y, then x) and concatenated along S.
    spatial_shapes : integer array (L, 2)
        Row l is (H_l, W_l); S must equal sum_l H_l * W_l.
    level_start_index : integer array (L,) or None
        Offset of level l in S; derived from ``spatial_shapes`` when None.
    sampling_locations : array (N, Lq, M, L, P, 2)
        Normalised (x, y); any real value is legal (outside [0, 1] reads zero padding).
    attention_weights : array (N, Lq, M, L, P)
        Already normalised (the op applies no softmax).

    Returns
    -------
    array (N, Lq, M * D)
        Same array type, dtype and device as ``value``.

    Notes
    -----
    Per level this is ``grid_sample(2*loc - 1, mode='bilinear', padding_mode='zeros',
    align_corners=False)``. A non-finite location makes the output row of its
    (n, q, m) NaN. float32/float64 everywhere; float16/bfloat16 on the GPU (float32
    accumulation).
    """
    xp, prob, value, loc, attn = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if xp is np:
        from . import _cpu

        return _cpu.forward(_c_ready(value), prob.spatial_shapes, prob.level_start_index, _c_ready(loc),
                            _c_ready(attn))
    from . import _cuda

    return _cuda.forward(prob, value, loc, attn)


def ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                            attention_weights, *, deterministic=False):
    """Gradients of :func:`ms_deform_attn` with respect to its floating inputs.

    Parameters
    ----------
    grad_output : array (N, Lq, M * D)
        Gradient of the loss with respect to the forward's output.
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        As in :func:`ms_deform_attn`.
    deterministic : bool, keyword-only
        On the GPU, accumulate grad_value without floating-point atomics so results are
        bit-identical run to run. The CPU backend is always deterministic (for any
        thread count) and accepts the keyword for symmetry.

    Returns
    -------
    grad_value : array (N, S, M, D)
    grad_sampling_locations : array (N, Lq, M, L, P, 2)
    grad_attention_weights : array (N, Lq, M, L, P)
        Each with its input's shape, dtype and device. The location gradient is that of
        the piecewise-bilinear map (one-sided where a coordinate sits on an integer).
    """
    xp, prob, value, loc, attn = _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if xp is np:
        if not isinstance(grad_output, np.ndarray) and not _validate._is_cupy(grad_output):
            grad_output = np.asarray(grad_output)
        grad_output = _native_byte_order(grad_output)
    # Same array module and device as the other floating inputs, or a named error.
    if not (xp is np and type(grad_output) is np.ndarray):
        _validate.array_module(("grad_output", grad_output), ("value", value))
    _validate.check_grad_output(grad_output, prob)
    if xp is np:
        from . import _cpu

        return _cpu.backward(_c_ready(grad_output), _c_ready(value), prob.spatial_shapes,
                             prob.level_start_index, _c_ready(loc), _c_ready(attn))
    from . import _cuda

    return _cuda.backward(prob, grad_output, value, loc, attn, deterministic=bool(deterministic))
