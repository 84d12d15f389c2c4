"""CUDA backend: kernels in ``cydeform/kernels`` compiled with NVRTC, launched through CuPy.

Only imported when CuPy arrays are passed; CuPy itself is imported lazily, so this
module also imports (and its planning helpers work) without CuPy or a GPU.

Axis letters: N batch, S value positions, M heads, D channels per head, Lq queries,
L levels, P points per head and level.

Kernels (see docs/cuda.md):

* ``msda_forward`` / ``msda_backward``: a group of G lanes per (n, q, m), C channels
  per 16-byte chunk, J chunks per lane, geometry once per point and lane, float32
  accumulation, warp-shuffle reductions. Compile-time L, P, D, G when the shape allows
  (D a multiple of the vector width, L <= 8, P <= 16, D <= 1024); a runtime-size
  generic variant otherwise.
* ``msda_forward_shared``: ``msda_forward`` with the geometry split over the lanes of a
  group and broadcast by shuffles (bit-identical; a tuning experiment until measured).
* ``msda_forward_baseline`` / ``msda_backward_baseline``: the simplest correct kernels
  (one thread per output element; one thread per point), for benchmarks.
* ``msda_cell_keys`` + ``msda_grad_value_gather``: the deterministic grad_value.

The orchestration (``_forward`` / ``_backward``) is written against a small runtime
interface (array module, launch, pointer, levels, stable argsort) so that the host
harness in tests/cuda_host runs exactly this code with the kernels compiled as C++.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import _validate

__all__ = ["forward", "backward", "kernel_source", "kernel_expressions", "COMPILE_OPTIONS"]

KERNEL_DIR = Path(__file__).parent / "kernels"
KERNEL_FILES = ("msda_common.cuh", "msda_forward.cu", "msda_backward.cu")
COMPILE_OPTIONS = ("-std=c++17",)
BLOCK = 256
INT32_MAX = 2**31 - 1
_MAX_GRID = 2**31 - 1  # kernels loop grid-stride; tests lower this to exercise the loop

_CTYPE = {"float32": "float", "float64": "double", "float16": "cyd_half", "bfloat16": "cyd_bf16"}
# Lanes' chunks per pass for the specialised kernels: 8 channels per lane for 4-byte and
# 2-byte types (two or one 16-byte loads), 4 for double.
_J_TARGET = {4: 2, 2: 1, 8: 2}
# Compile-time sizes only where unrolling stays bounded and one group of lanes covers D
# in a few passes (each pass recomputes the geometry).
_SPECIALIZE_MAX = {"L": 8, "P": 16, "D": 1024, "passes": 4}


@functools.lru_cache(maxsize=1)
def kernel_source() -> str:
    """The CUDA source compiled for every kernel: the files of ``KERNEL_FILES`` in order.

    Local ``#include "..."`` lines are dropped (NVRTC gets one string, and CuPy's disk
    cache keys on that string, so a header edit can never leave a stale binary).
    """
    parts = []
    for name in KERNEL_FILES:
        text = (KERNEL_DIR / name).read_text()
        parts.append("\n".join(ln for ln in text.splitlines() if not ln.startswith('#include "')))
    return "\n".join(parts) + "\n"


# ---- planning (pure host logic) -----------------------------------------------------

@dataclass(frozen=True)
class ChannelLayout:
    """How the D channels of one (n, q, m) are spread over a group of G lanes.

    C channels per chunk (a 16-byte vector when ``vec``), J chunks per lane and pass;
    ``L_t, P_t, D_t, G_t`` are the template's compile-time sizes (0: runtime).
    """

    C: int
    J: int
    G: int
    vec: bool
    L_t: int
    P_t: int
    D_t: int
    G_t: int

    @property
    def log2G(self) -> int:
        return self.G.bit_length() - 1


def _pow2_at_least(v: int, cap: int = 32) -> int:
    return min(cap, 1 << max(0, (v - 1).bit_length()))


def _pow2_dividing(v: int, cap: int = 32) -> int:
    return min(cap, v & -v)


def channel_layout(prob, aligned: bool, specialize: bool = True) -> ChannelLayout:
    """Choose the fast kernels' channel layout for ``prob``.

    ``aligned``: the channel rows of the arrays read and written with vectors start on
    16-byte boundaries. Vector chunks need D % (16 / itemsize) == 0; compile-time sizes
    additionally need L, P, D and the number of channel passes within
    ``_SPECIALIZE_MAX``.
    """
    itemsize = np.dtype(prob.dtype).itemsize
    width = 16 // itemsize
    if aligned and prob.D % width == 0:
        K = prob.D // width  # chunks per row
        J = _J_TARGET[itemsize] if K % _J_TARGET[itemsize] == 0 else 1
        G = _pow2_dividing(K // J)  # G*J divides K: no channel masks, K/(G*J) passes
        if (specialize and prob.L <= _SPECIALIZE_MAX["L"] and prob.P <= _SPECIALIZE_MAX["P"]
                and prob.D <= _SPECIALIZE_MAX["D"] and K // (J * G) <= _SPECIALIZE_MAX["passes"]):
            return ChannelLayout(width, J, G, True, prob.L, prob.P, prob.D, G)
        return ChannelLayout(width, 1, _pow2_at_least(K), True, 0, 0, 0, 0)
    return ChannelLayout(1, 1, _pow2_at_least(prob.D), False, 0, 0, 0, 0)


def gather_layout(prob, aligned: bool) -> ChannelLayout:
    """Channel layout of the deterministic grad_value gather (runtime sizes, J = 1)."""
    width = 16 // np.dtype(prob.dtype).itemsize
    if aligned and prob.D % width == 0:
        return ChannelLayout(width, 1, _pow2_at_least(prob.D // width), True, 0, 0, 0, 0)
    return ChannelLayout(1, 1, _pow2_at_least(prob.D), False, 0, 0, 0, 0)


def index_ctype(prob, index64: bool | None = None) -> str:
    """'int' unless an element offset can pass 2**31 - 1 (or ``index64`` forces 64-bit)."""
    N, S, M, D, Lq, L, P = prob.N, prob.S, prob.M, prob.D, prob.Lq, prob.L, prob.P
    biggest = max(N * S * M * D, N * Lq * M * D, N * Lq * M * L * P * 2)
    if index64 is None:
        index64 = biggest > INT32_MAX
    return "long long" if index64 else "int"


def level_table(prob) -> np.ndarray:
    """(L, 4) int64 rows (H_l, W_l, start_l, cell_start_l); cells of level l: (H_l+1)(W_l+1).

    Read-only and memoised per pyramid: building it cost more host time than the
    decoder call's kernel.
    """
    return _level_table(prob.spatial_shapes.tobytes(), prob.level_start_index.tobytes())


@functools.lru_cache(maxsize=256)
def _level_table(shapes_bytes: bytes, starts_bytes: bytes) -> np.ndarray:
    shapes = np.frombuffer(shapes_bytes, dtype=np.int64).reshape(-1, 2)
    cells = (shapes[:, 0] + 1) * (shapes[:, 1] + 1)
    cell_start = np.concatenate(([0], np.cumsum(cells)[:-1]))
    table = np.ascontiguousarray(
        np.stack([shapes[:, 0], shapes[:, 1], np.frombuffer(starts_bytes, dtype=np.int64), cell_start], axis=1),
        dtype=np.int64)
    table.flags.writeable = False
    return table


def _num_cells(prob) -> int:
    return int(((prob.spatial_shapes[:, 0] + 1) * (prob.spatial_shapes[:, 1] + 1)).sum())


def _key_dtype(prob):
    n_keys = prob.N * _num_cells(prob) * prob.M  # also the sentinel
    return (np.int32, "int") if n_keys < INT32_MAX else (np.int64, "long long")


@functools.lru_cache(maxsize=1024, typed=True)  # typed: True and 1 format differently
def _expr(kernel: str, *targs) -> str:
    def fmt(a):
        return ("true" if a else "false") if isinstance(a, bool) else str(a)
    return f"{kernel}<{', '.join(fmt(a) for a in targs)}>"


def _ctype(prob) -> str:
    return _CTYPE_OF_DTYPE.get(prob.dtype) or _CTYPE[_validate.dtype_name(prob.dtype)]


_CTYPE_OF_DTYPE = {np.dtype(name): c for name, c in _CTYPE.items() if name != "bfloat16"}


def _fast_expr(kernel, prob, index, lay, *extra):
    return _expr(kernel, _ctype(prob), index, lay.L_t, lay.P_t, lay.D_t, lay.C, lay.J, lay.G_t, lay.vec, *extra)


def kernel_expressions(prob, *, aligned: bool = True, specialize: bool = True, index64: bool | None = None):
    """Every kernel name expression forward/backward can launch for ``prob`` (all modes
    and variants), in a stable order. Used to precompile and by the NVRTC test."""
    index = index_ctype(prob, index64)
    T = _ctype(prob)
    lay = channel_layout(prob, aligned, specialize)
    exprs = [
        _fast_expr("msda_forward", prob, index, lay),
        _expr("msda_forward_baseline", T, index),
        _fast_expr("msda_backward", prob, index, lay, True),
        _fast_expr("msda_backward", prob, index, lay, False),
        _expr("msda_backward_baseline", T, index),
        _expr("msda_cell_keys", T, _key_dtype(prob)[1]),
        _expr("msda_segment_starts", _key_dtype(prob)[1]),
    ]
    g = gather_layout(prob, aligned)
    exprs.append(_expr("msda_grad_value_gather", T, index, g.C, g.vec))
    if T in ("cyd_half", "cyd_bf16"):
        exprs.append(_expr("cast_from_float", T))
    exprs.append(_fast_expr("msda_forward_shared", prob, index, lay))  # tuning variant
    return exprs


# ---- runtimes -----------------------------------------------------------------------

def _grid(total_threads: int) -> int:
    return max(1, min(_MAX_GRID, -(-total_threads // BLOCK)))


@functools.lru_cache(maxsize=None)
def _cupy_function(expr: str, device_id: int):
    """Compile ``expr`` from ``kernel_source()`` for ``device_id``, once per process."""
    import cupy

    with cupy.cuda.Device(device_id):
        try:
            module = cupy.RawModule(code=kernel_source(), options=COMPILE_OPTIONS, name_expressions=(expr,))
            return module.get_function(expr)
        except cupy.cuda.compiler.CompileException as exc:
            log = exc.get_message() if hasattr(exc, "get_message") else str(exc)
            raise RuntimeError(
                f"cydeform: NVRTC failed to compile CUDA kernel {expr} for device {device_id}; "
                f"NVRTC log:\n{log}") from exc


@functools.lru_cache(maxsize=256)
def _device_levels(pyramid_bytes: bytes, L: int, device_id: int):
    """The level table of a pyramid (spatial_shapes bytes + level_start_index bytes) on a device."""
    import cupy

    table = _level_table(pyramid_bytes[:16 * L], pyramid_bytes[16 * L:])
    with cupy.cuda.Device(device_id):
        arr = cupy.asarray(table)
        # Cached arrays may be used later on other streams: finish the upload now.
        cupy.cuda.get_current_stream().synchronize()
    return arr


class CupyRuntime:
    """Launches on CuPy's current device (callers enter the inputs' device) and stream."""

    def __init__(self):
        import cupy

        self.xp = cupy
        self.device_id = cupy.cuda.Device().id

    def launch(self, expr, total_threads, args):
        _cupy_function(expr, self.device_id)((_grid(total_threads),), (BLOCK,), args)

    @staticmethod
    def pointer(a) -> int:
        return a.data.ptr

    def levels(self, prob):
        return _device_levels(prob.spatial_shapes.tobytes() + prob.level_start_index.tobytes(),
                              prob.L, self.device_id)

    @staticmethod
    def argsort_stable(keys):
        return keys.argsort()  # CuPy's argsort is always stable (thrust stable sort)


# ---- orchestration ----------------------------------------------------------------

def _contiguous(xp, a):
    if a.flags.c_contiguous:
        return a
    if a.dtype.itemsize == 2:  # copy half types as raw 16-bit words (no bfloat16 arithmetic needed)
        return xp.ascontiguousarray(a.view(xp.uint16)).view(a.dtype)
    return xp.ascontiguousarray(a)


def _aligned(rt, *arrays) -> bool:
    return all(rt.pointer(a) % 16 == 0 for a in arrays)


def _acc_dtype(prob):
    return np.float64 if np.dtype(prob.dtype) == np.float64 else np.float32


def _i32(v):
    if not -2**31 <= v < 2**31:
        raise ValueError(f"a size of {v} is too large for the CUDA kernels' 32-bit size arguments "
                         f"(S, M, D, Lq, L and P must each be below 2**31)")
    return np.int32(v)


def _i64(v):
    return np.int64(v)


def _forward(rt, prob, value, loc, attn, *, variant="fast", specialize=True, index64=None):
    xp = rt.xp
    value, loc, attn = (_contiguous(xp, a) for a in (value, loc, attn))
    N, S, M, D, Lq, L, P = prob.N, prob.S, prob.M, prob.D, prob.Lq, prob.L, prob.P
    index = index_ctype(prob, index64)
    levels = rt.levels(prob)
    out = xp.empty((N, Lq, M * D), dtype=prob.dtype)
    if variant == "baseline":
        total = N * Lq * M * D
        rt.launch(_expr("msda_forward_baseline", _ctype(prob), index), total,
                  (value, levels, loc, attn, out, _i32(S), _i32(M), _i32(D), _i32(Lq), _i32(L), _i32(P), _i64(total)))
        return out
    if variant not in ("fast", "shared"):
        raise ValueError(f"variant must be 'fast', 'shared' or 'baseline'; got {variant!r}")
    lay = channel_layout(prob, _aligned(rt, value, out), specialize)
    total = N * Lq * M * lay.G
    kernel = "msda_forward_shared" if variant == "shared" else "msda_forward"
    rt.launch(_fast_expr(kernel, prob, index, lay), total,
              (value, levels, loc, attn, out, _i32(S), _i32(M), _i32(D), _i32(Lq), _i32(L), _i32(P),
               _i32(lay.log2G), _i64(total)))
    return out


def _finish_grad_value(rt, prob, acc):
    """Accumulator buffer -> grad_value in the inputs' dtype (a cast for half types)."""
    if np.dtype(prob.dtype) == acc.dtype:
        return acc
    out = rt.xp.empty(acc.shape, dtype=prob.dtype)
    rt.launch(_expr("cast_from_float", _ctype(prob)), acc.size, (acc, out, _i64(acc.size)))
    return out


def _grad_value_deterministic(rt, prob, grad_output, loc, attn, levels, index):
    """grad_value without atomics: key points by cell, stable sort, gather per value row.

    No host synchronisation: keys, segment bounds and the gather are kernels, the sort
    is CuPy's (thrust) stable radix sort on the current stream.
    """
    xp = rt.xp
    N, S, M, D, Lq, L, P = prob.N, prob.S, prob.M, prob.D, prob.Lq, prob.L, prob.P
    cells = _num_cells(prob)
    n_keys = N * cells * M
    key_np, key_c = _key_dtype(prob)
    points = N * Lq * M * L * P
    keys = xp.empty(points, dtype=key_np)
    rt.launch(_expr("msda_cell_keys", _ctype(prob), key_c), points,
              (levels, loc, keys, _i32(M), _i32(Lq), _i32(L), _i32(P), _i64(cells), key_np(n_keys), _i64(points)))
    order = rt.argsort_stable(keys).astype(np.int64, copy=False)
    seg_start = xp.empty(n_keys + 2, dtype=np.int64)
    rt.launch(_expr("msda_segment_starts", key_c), n_keys + 2,
              (keys[order], seg_start, _i64(points), _i64(n_keys + 2)))
    grad_value = xp.empty((N, S, M, D), dtype=prob.dtype)
    g = gather_layout(prob, _aligned(rt, grad_output, grad_value))
    total = N * S * M * g.G
    rt.launch(_expr("msda_grad_value_gather", _ctype(prob), index, g.C, g.vec), total,
              (grad_output, levels, loc, attn, order, seg_start, grad_value, _i32(S), _i32(M), _i32(D),
               _i32(L), _i32(P), _i64(cells), _i32(g.log2G), _i64(total)))
    return grad_value


def _backward(rt, prob, grad_output, value, loc, attn, *, deterministic=False, variant="fast",
              specialize=True, index64=None):
    xp = rt.xp
    grad_output, value, loc, attn = (_contiguous(xp, a) for a in (grad_output, value, loc, attn))
    N, S, M, D, Lq, L, P = prob.N, prob.S, prob.M, prob.D, prob.Lq, prob.L, prob.P
    index = index_ctype(prob, index64)
    levels = rt.levels(prob)
    grad_loc = xp.empty(loc.shape, dtype=prob.dtype)
    grad_attn = xp.empty(attn.shape, dtype=prob.dtype)
    sizes = (_i32(S), _i32(M), _i32(D), _i32(Lq), _i32(L), _i32(P))
    if variant == "baseline":
        acc = xp.zeros(value.shape, dtype=_acc_dtype(prob))
        total = N * Lq * M * L * P
        rt.launch(_expr("msda_backward_baseline", _ctype(prob), index), total,
                  (grad_output, value, levels, loc, attn, acc, grad_loc, grad_attn, *sizes, _i64(total)))
        return _finish_grad_value(rt, prob, acc), grad_loc, grad_attn
    if variant != "fast":
        raise ValueError(f"variant must be 'fast' or 'baseline'; got {variant!r}")
    # The accumulation buffer is a fresh allocation (aligned); the inputs decide.
    lay = channel_layout(prob, _aligned(rt, value, grad_output), specialize)
    total = N * Lq * M * lay.G
    # Without atomics the kernel never touches grad_value: a one-element placeholder.
    acc = xp.empty(1, dtype=_acc_dtype(prob)) if deterministic else xp.zeros(value.shape, dtype=_acc_dtype(prob))
    rt.launch(_fast_expr("msda_backward", prob, index, lay, not deterministic), total,
              (grad_output, value, levels, loc, attn, acc, grad_loc, grad_attn, *sizes, _i32(lay.log2G), _i64(total)))
    if deterministic:
        grad_value = _grad_value_deterministic(rt, prob, grad_output, loc, attn, levels, index)
    else:
        grad_value = _finish_grad_value(rt, prob, acc)
    return grad_value, grad_loc, grad_attn


# ---- public entry points (called by cydeform.functional) ----------------------------

def forward(prob, value, sampling_locations, attention_weights, *, variant="fast"):
    """Forward on the inputs' device, on CuPy's current stream there.

    Parameters
    ----------
    prob : cydeform._validate.Problem
        Validated sizes and level geometry.
    value : cupy array (N, S, M, D)
    sampling_locations : cupy array (N, Lq, M, L, P, 2)
    attention_weights : cupy array (N, Lq, M, L, P)
        One dtype among float32, float64, float16, bfloat16; any strides.
    variant : {'fast', 'shared', 'baseline'}
        Internal: 'baseline' runs the one-thread-per-output-element kernel (benchmarks);
        'shared' the fast kernel whose lanes share each point's geometry by shuffles
        (a tuning experiment, bit-identical to 'fast').

    Returns
    -------
    cupy array (N, Lq, M*D) in the inputs' dtype.
    """
    with value.device:  # the inputs' device, whichever is current
        return _forward(CupyRuntime(), prob, value, sampling_locations, attention_weights, variant=variant)


def backward(prob, grad_output, value, sampling_locations, attention_weights, *, deterministic=False,
             variant="fast"):
    """Backward on the inputs' device, on CuPy's current stream there.

    Parameters
    ----------
    prob : cydeform._validate.Problem
    grad_output : cupy array (N, Lq, M*D)
    value, sampling_locations, attention_weights : as in :func:`forward`
    deterministic : bool
        False: grad_value by atomics (fast; float sums in varying order). True: sort the
        points by bilinear cell and gather per value row: bit-identical run to run.
    variant : {'fast', 'baseline'}
        Internal: 'baseline' runs the one-thread-per-point kernel (benchmarks; atomics).

    Returns
    -------
    grad_value (N, S, M, D), grad_sampling_locations (N, Lq, M, L, P, 2),
    grad_attention_weights (N, Lq, M, L, P): cupy arrays in the inputs' dtype.
    """
    with value.device:
        return _backward(CupyRuntime(), prob, grad_output, value, sampling_locations, attention_weights,
                         deterministic=deterministic, variant=variant)
