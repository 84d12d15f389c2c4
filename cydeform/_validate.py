"""Argument checking and normalisation shared by every backend.

Everything here reads only host-side metadata (``ndim``, ``shape``, ``dtype``) of the
floating arrays, so validating CuPy inputs never synchronises with the device. The
only values read are those of ``spatial_shapes`` and ``level_start_index``, which are
tiny integer arrays (copied to the host once if they were given as CuPy arrays).

Axis letters (used everywhere in cydeform): N batch, S value positions
(S = sum_l H_l * W_l), M heads, D channels per head, Lq queries, L levels,
P points per head and level.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

# dtypes each backend computes in; the GPU adds float16 and bfloat16.
CPU_DTYPES = ("float32", "float64")
GPU_DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class Problem:
    """Sizes and level geometry of one call, after validation.

    ``spatial_shapes`` (L, 2) and ``level_start_index`` (L,) are host int64 arrays.
    """

    N: int
    S: int
    M: int
    D: int
    Lq: int
    L: int
    P: int
    dtype: np.dtype
    spatial_shapes: np.ndarray
    level_start_index: np.ndarray


def array_module(*arrays):
    """Return ``numpy`` or ``cupy`` for the floating inputs; refuse a mixture.

    Raises ``TypeError`` naming the arguments when some are CuPy arrays and some are
    not, and ``ValueError`` when CuPy arrays live on different devices.
    """
    names = [name for name, _ in arrays]
    on_gpu = [_is_cupy(a) for _, a in arrays]
    if not any(on_gpu):
        return np
    if not all(on_gpu):
        gpu = [n for n, g in zip(names, on_gpu) if g]
        cpu = [n for n, g in zip(names, on_gpu) if not g]
        raise TypeError(
            f"CuPy arrays: {', '.join(gpu)}; not CuPy arrays: {', '.join(cpu)}. "
            "Pass all floating inputs as NumPy arrays or all as CuPy arrays on one device"
        )
    import cupy

    devices = {name: a.device.id for name, a in arrays}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on device {d}" for n, d in devices.items())
        raise ValueError(f"CuPy inputs are on different devices ({listing}); move them to one device")
    return cupy


def _is_cupy(a) -> bool:
    mod = type(a).__module__
    return mod.startswith("cupy") and hasattr(a, "device")


def dtype_name(dtype) -> str:
    """``np.dtype`` -> its name, with ml_dtypes' bfloat16 spelled 'bfloat16'."""
    return np.dtype(dtype).name


@functools.lru_cache(maxsize=None)
def _dtype_set(allowed):
    """The np.dtype objects named in ``allowed`` (bfloat16 only if ml_dtypes is there)."""
    dtypes = set()
    for name in allowed:
        if name == "bfloat16":
            try:
                import ml_dtypes
            except ImportError:
                continue
            dtypes.add(np.dtype(ml_dtypes.bfloat16))
        else:
            dtypes.add(np.dtype(name))
    return frozenset(dtypes)


def check_floating(name, arr, allowed):
    """Check ``arr`` has a floating dtype among ``allowed`` names; return that dtype."""
    try:
        dt = arr.dtype
    except AttributeError:
        raise TypeError(f"{name} must be an array, got {type(arr).__name__}") from None
    if dt not in _dtype_set(allowed):
        raise TypeError(f"{name} must have a floating dtype among {', '.join(allowed)}; got dtype {dt}")
    return dt


def check_ndim(name, arr, ndim, layout):
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}; got {arr.ndim} dimensions with shape {tuple(arr.shape)}")


def _host_int_array(name, arr, ndim_expected, layout):
    """Bring a small integer array to the host as int64; refuse anything else."""
    if _is_cupy(arr):
        arr = arr.get()  # tiny; pass NumPy here to avoid this device-to-host copy
    arr = np.asarray(arr)
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise TypeError(f"{name} must have an integer dtype; got dtype {arr.dtype}")
    if arr.ndim != ndim_expected:
        raise ValueError(f"{name} must have {ndim_expected} dimensions {layout}; got {arr.ndim} dimensions with shape {arr.shape}")
    return arr.astype(np.int64)


def check_problem(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  allowed_dtypes=CPU_DTYPES) -> Problem:
    """Validate the forward's arguments; return the problem's sizes and level geometry.

    Shapes: value (N, S, M, D); spatial_shapes (L, 2) rows (H_l, W_l);
    level_start_index (L,) or None; sampling_locations (N, Lq, M, L, P, 2);
    attention_weights (N, Lq, M, L, P).

    Memoised on everything the checks read (the floating inputs' shapes and dtypes, the
    level geometry's bytes, ``allowed_dtypes``), for NumPy level geometry: a model calls
    the op with the same shapes every time, and right after an op call (its caches
    swept) the checks cost ~0.1 ms, a tenth of a decoder call (cpu_log 69).
    """
    geometry = _geometry_key(spatial_shapes, level_start_index)
    key = None
    if geometry is not None:
        try:
            key = (allowed_dtypes, value.shape, value.dtype, sampling_locations.shape, sampling_locations.dtype,
                   attention_weights.shape, attention_weights.dtype, geometry)
            cached = _PROBLEM_CACHE.get(key)
        except (AttributeError, TypeError):  # not arrays: the checks below say so
            key = cached = None
        if cached is not None:
            return cached
    prob = _check_problem(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                          allowed_dtypes)
    if key is not None:
        if len(_PROBLEM_CACHE) >= 64:
            _PROBLEM_CACHE.clear()
        _PROBLEM_CACHE[key] = prob
    return prob


_PROBLEM_CACHE: dict = {}


def _check_problem(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   allowed_dtypes) -> Problem:
    dt = check_floating("value", value, allowed_dtypes)
    for name, arr in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        other = check_floating(name, arr, allowed_dtypes)
        if other != dt:
            raise TypeError(f"all floating inputs must share one dtype: value is {dt} but {name} is {other}")

    check_ndim("value", value, 4, "(N, S, M, D)")
    check_ndim("sampling_locations", sampling_locations, 6, "(N, Lq, M, L, P, 2)")
    check_ndim("attention_weights", attention_weights, 5, "(N, Lq, M, L, P)")

    N, S, M, D = (int(v) for v in value.shape)
    if min(N, S, M, D) < 1:
        raise ValueError(f"value must have non-empty axes (N, S, M, D); got shape {tuple(value.shape)}")
    shapes, starts = _level_geometry(spatial_shapes, level_start_index)
    L = shapes.shape[0]
    total = int(starts[-1]) + int(shapes[-1, 0]) * int(shapes[-1, 1])
    if total != S:
        raise ValueError(
            f"value has S = {S} positions (axis 1) but spatial_shapes describe "
            f"sum(H_l * W_l) = {total}"
        )

    loc_shape = tuple(int(v) for v in sampling_locations.shape)
    Nl, Lq, Ml, Ll, P, two = loc_shape
    _agree("sampling_locations", loc_shape, "N", 0, N, "value")
    _agree("sampling_locations", loc_shape, "M", 2, M, "value")
    _agree("sampling_locations", loc_shape, "L", 3, L, "spatial_shapes")
    if two != 2:
        raise ValueError(f"sampling_locations must end in an axis of 2 (x, y); got shape {loc_shape}")
    if Lq < 1 or P < 1:
        raise ValueError(f"sampling_locations must have Lq >= 1 and P >= 1; got shape {loc_shape}")
    w_shape = tuple(int(v) for v in attention_weights.shape)
    if w_shape != loc_shape[:5]:
        raise ValueError(
            f"attention_weights must have shape (N, Lq, M, L, P) = {loc_shape[:5]} to match "
            f"sampling_locations {loc_shape}; got {w_shape}"
        )
    return Problem(N, S, M, D, Lq, L, P, dt, shapes, starts)


def _geometry_key(spatial_shapes, level_start_index):
    """A key for the values of NumPy level geometry (dtype, shape, bytes), else None.
    (The dtype itself, not its ``.str``: building that string cost ~8 us right after an
    op call has swept the caches.)"""
    if isinstance(spatial_shapes, np.ndarray) and (level_start_index is None
                                                   or isinstance(level_start_index, np.ndarray)):
        return (spatial_shapes.dtype, spatial_shapes.shape, spatial_shapes.tobytes(),
                None if level_start_index is None else
                (level_start_index.dtype, level_start_index.shape, level_start_index.tobytes()))
    return None


def _level_geometry(spatial_shapes, level_start_index):
    """Checked (spatial_shapes, level_start_index) as read-only host int64 arrays."""
    shapes = _host_int_array("spatial_shapes", spatial_shapes, 2, "(L, 2)")
    if shapes.shape[1] != 2 or shapes.shape[0] < 1:
        raise ValueError(f"spatial_shapes must have shape (L, 2) with L >= 1, rows (H_l, W_l); got shape {shapes.shape}")
    if (shapes <= 0).any():
        bad = int(np.argmax((shapes <= 0).any(axis=1)))
        raise ValueError(f"spatial_shapes must hold positive (H, W); level {bad} is {tuple(int(v) for v in shapes[bad])}")
    # Python ints: H*W and their sum cannot wrap around (2**61 * 8 would wrap to 0 in int64).
    sizes = [int(h) * int(w) for h, w in shapes.tolist()]
    offsets = [0]
    for size in sizes[:-1]:
        offsets.append(offsets[-1] + size)
    if offsets[-1] + sizes[-1] > 2**62:
        raise ValueError(f"spatial_shapes describe sum(H_l * W_l) = {offsets[-1] + sizes[-1]} positions; "
                         f"more than any array can hold")
    starts = np.array(offsets, dtype=np.int64)
    if level_start_index is not None:
        given = _host_int_array("level_start_index", level_start_index, 1, "(L,)")
        if given.shape != starts.shape or not np.array_equal(given, starts):
            raise ValueError(
                f"level_start_index must be the offsets of the levels in S implied by spatial_shapes, "
                f"{starts.tolist()}; got {given.tolist()}"
            )
    shapes = np.ascontiguousarray(shapes)
    shapes.flags.writeable = False
    starts.flags.writeable = False
    return shapes, starts


def _agree(name, shape, axis_name, axis, expected, source):
    if shape[axis] != expected:
        raise ValueError(
            f"{name} has {axis_name} = {shape[axis]} (axis {axis} of shape {shape}) "
            f"but {source} has {axis_name} = {expected}"
        )


def check_grad_output(grad_output, prob: Problem):
    """grad_output must be (N, Lq, M*D) with the inputs' dtype."""
    try:
        dt = grad_output.dtype
    except AttributeError:
        raise TypeError(f"grad_output must be an array, got {type(grad_output).__name__}") from None
    if np.dtype(dt) != prob.dtype:
        raise TypeError(f"grad_output must have the inputs' dtype {prob.dtype}; got dtype {dt}")
    expected = (prob.N, prob.Lq, prob.M * prob.D)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"grad_output must have shape (N, Lq, M*D) = {expected}; got {tuple(grad_output.shape)}")
