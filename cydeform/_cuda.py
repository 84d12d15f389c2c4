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
* ``msda_forward_baseline`` / ``msda_backward_baseline``: the simplest correct kernels
  (one thread per output element; one thread per point), for benchmarks.
* ``msda_cell_keys``, ``msda_segment_starts``, ``msda_row_pieces``,
  ``msda_grad_value_pieces``, ``msda_grad_value_gather``: the deterministic grad_value.
* ``msda_forward_shared`` (experiment, not in the default kernel list): ``msda_forward``
  with the geometry split over the lanes of a group and broadcast by shuffles
  (bit-identical); selected by ``LaunchConfig(forward_kernel=...)`` or
  ``variant="shared"`` until a GPU has measured it.

The orchestration (``_forward`` / ``_backward``) takes its launch settings as a
:class:`LaunchConfig` and talks to the device through the :class:`Runtime` protocol,
so that the host harness in tests/cuda_host runs exactly this code with the kernels
compiled as C++, and the tuning script tries configurations without touching globals.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import _nvrtc, _validate

__all__ = ["forward", "backward", "kernel_source", "kernel_expressions", "LaunchConfig", "DEFAULT_CONFIG",
           "Runtime"]

KERNEL_DIR = Path(__file__).parent / "kernels"
KERNEL_FILES = ("msda_common.cuh", "msda_forward.cu", "msda_backward.cu")
INT32_MAX = 2**31 - 1
FORWARD_KERNELS = ("msda_forward", "msda_forward_shared")


@dataclass(frozen=True)
class LaunchConfig:
    """Launch settings of the CUDA backend, passed explicitly to the orchestration.

    block : threads per block.
    max_grid : most blocks per launch; kernels loop grid-stride over the rest (tests
        lower it to exercise the loop).
    options : NVRTC options (the architecture is added per device); see ``_nvrtc.OPTIONS``.
    layout : (J, G) chunks per lane and lanes per (n, q, m) forced for aligned vector
        calls, or None for :func:`channel_layout`'s choice (tuning).
    forward_kernel : 'msda_forward', or the experiment 'msda_forward_shared'.
    det_piece : K0 of the deterministic grad_value: a value row with more than K0
        contributing points is split into pieces of max(K0, ceil(sqrt(points))) points,
        summed by separate threads and reduced in a fixed order, so no thread walks more
        than about max(K0, 2 sqrt(points)) points (docs/cuda.md).
    """

    block: int = 256
    max_grid: int = INT32_MAX
    options: tuple = _nvrtc.OPTIONS
    layout: tuple | None = None
    forward_kernel: str = "msda_forward"
    det_piece: int = 128

    def __post_init__(self):
        if self.block <= 0 or self.block % 32 or self.block > 1024:
            raise ValueError(f"block must be a multiple of 32 in [32, 1024]; got {self.block}")
        if self.max_grid < 1:
            raise ValueError(f"max_grid must be >= 1; got {self.max_grid}")
        if self.forward_kernel not in FORWARD_KERNELS:
            raise ValueError(f"forward_kernel must be one of {FORWARD_KERNELS}; got {self.forward_kernel!r}")
        if self.det_piece < 1:
            raise ValueError(f"det_piece must be >= 1; got {self.det_piece}")
        object.__setattr__(self, "options", tuple(self.options))

    def grid(self, total_threads: int) -> int:
        """Blocks for ``total_threads`` threads (at least 1, at most ``max_grid``)."""
        return max(1, min(self.max_grid, -(-total_threads // self.block)))


DEFAULT_CONFIG = LaunchConfig()


class Runtime(Protocol):
    """What the orchestration needs from a device: CuPy on a GPU, NumPy + C++ on the host."""

    xp: Any  # array module (cupy or numpy)

    def launch(self, expr: str, total_threads: int, args: tuple, config: LaunchConfig) -> None:
        """Run kernel ``expr`` (a name expression of ``kernel_source()``) on
        ``config.grid(total_threads)`` blocks of ``config.block`` threads, in stream order."""

    def pointer(self, a) -> int:
        """Device address of array ``a``'s first element."""

    def levels(self, prob) -> Any:
        """``level_table(prob)`` as a device array, valid for kernels launched after this call."""

    def argsort_stable(self, keys) -> Any:
        """Stable argsort of the 1-d integer array ``keys`` on the device."""

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


def channel_layout(prob, aligned: bool, specialize: bool = True,
                   config: LaunchConfig = DEFAULT_CONFIG) -> ChannelLayout:
    """Choose the fast kernels' channel layout for ``prob``.

    ``aligned``: the channel rows of the arrays read and written with vectors start on
    16-byte boundaries. Vector chunks need D % (16 / itemsize) == 0; compile-time sizes
    additionally need L, P, D and the number of channel passes within
    ``_SPECIALIZE_MAX``. ``config.layout`` = (J, G) forces the layout of aligned vector
    calls (tuning); it must divide D into whole chunks.
    """
    itemsize = np.dtype(prob.dtype).itemsize
    width = 16 // itemsize
    if config.layout is not None and aligned and prob.D % width == 0:
        J, G = config.layout
        if G < 1 or G > 32 or G & (G - 1) or J < 1 or prob.D % (width * J * G):
            raise ValueError(f"config.layout (J, G) = {config.layout}: G must be a power of two <= 32 and "
                             f"J*G*{width} must divide D = {prob.D}")
        if specialize and prob.L <= _SPECIALIZE_MAX["L"] and prob.P <= _SPECIALIZE_MAX["P"]:
            return ChannelLayout(width, J, G, True, prob.L, prob.P, prob.D, G)
        return ChannelLayout(width, J, G, True, 0, 0, 0, 0)
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


def kernel_expressions(prob, *, aligned: bool = True, specialize: bool = True, index64: bool | None = None,
                       experimental: bool = False, config: LaunchConfig = DEFAULT_CONFIG):
    """Every kernel name expression forward/backward can launch for ``prob`` under
    ``config`` (all modes and variants), in a stable order. Used to precompile and by the
    NVRTC test. ``experimental`` adds the unmeasured kernels (``msda_forward_shared``)."""
    index = index_ctype(prob, index64)
    T = _ctype(prob)
    lay = channel_layout(prob, aligned, specialize, config)
    exprs = [
        _fast_expr(config.forward_kernel, prob, index, lay),
        _expr("msda_forward_baseline", T, index),
        _fast_expr("msda_backward", prob, index, lay, True),
        _fast_expr("msda_backward", prob, index, lay, False),
        _expr("msda_backward_baseline", T, index),
        _expr("msda_cell_keys", T, _key_dtype(prob)[1]),
        _expr("msda_segment_starts", _key_dtype(prob)[1]),
        "msda_row_pieces",
    ]
    g = gather_layout(prob, aligned)
    exprs.append(_expr("msda_grad_value_pieces", T, index, g.C, g.vec))
    exprs.append(_expr("msda_grad_value_gather", T, index, g.C, g.vec))
    if T in ("cyd_half", "cyd_bf16"):
        exprs.append(_expr("cast_from_float", T))
    if experimental:
        exprs += [_fast_expr(k, prob, index, lay) for k in FORWARD_KERNELS if k != config.forward_kernel]
    return exprs


# ---- the CuPy runtime ------------------------------------------------------------------

def compile_kernel(expr: str, arch: str, options: tuple = DEFAULT_CONFIG.options) -> _nvrtc.Program:
    """NVRTC-compile kernel ``expr`` for ``arch`` with ``options``: the CuPy runtime's
    compile (``kernel_source()``); no GPU needed."""
    return _nvrtc.compile_program(kernel_source(), (expr,), arch, options)


@functools.lru_cache(maxsize=None)
def _device_arch(device_id: int) -> str:
    import cupy

    cc = int(cupy.cuda.Device(device_id).compute_capability)
    return _nvrtc.arch_for(cc)


@functools.lru_cache(maxsize=None)
def _cupy_function(expr: str, device_id: int, options: tuple):
    """Kernel ``expr`` compiled for device ``device_id`` and loaded, once per process."""
    import cupy

    program = compile_kernel(expr, _device_arch(device_id), options)
    with cupy.cuda.Device(device_id):
        module = cupy.cuda.function.Module()
        try:
            module.load(program.cubin)
        except cupy.cuda.driver.CUDADriverError as exc:
            raise _nvrtc.NvrtcError(
                f"cydeform: the CUDA driver could not load kernel {expr} compiled by NVRTC "
                f"{'.'.join(map(str, _nvrtc.version()))} for {_device_arch(device_id)}: {exc}. The driver may be "
                f"older than this NVRTC (cupy.cuda.runtime.driverGetVersion() = "
                f"{cupy.cuda.runtime.driverGetVersion()}); install the NVRTC wheel matching your driver.") from exc
        function = module.get_function(program.lowered[expr])
    return module, function  # the module must outlive the function


class LevelTableCache:
    """Device copies of level tables, one per (pyramid, device, stream).

    An entry is uploaded on the stream it is keyed by and only ever used there, so when
    the LRU evicts it, the freed block returns to CuPy's pool arena of that same stream
    and is reused only by work ordered after every kernel that read it. (Keyed by
    pyramid and device alone, an evicted table could be overwritten while a kernel on
    another stream still read it.) ``upload(table)`` makes the device array on the
    current device and stream.
    """

    def __init__(self, upload, maxsize: int = 256):
        self._upload = upload
        self._maxsize = maxsize
        self._entries = {}  # insertion order = recency (dicts keep order)

    def get(self, table: np.ndarray, device_id: int, stream_ptr: int):
        key = (table.tobytes(), device_id, stream_ptr)
        entry = self._entries.pop(key, None)
        if entry is None:
            entry = self._upload(table)
            while len(self._entries) >= self._maxsize:
                self._entries.pop(next(iter(self._entries)))
        self._entries[key] = entry
        return entry

    def __len__(self):
        return len(self._entries)


def _upload_table(table):
    import cupy

    return cupy.asarray(table)  # on the current stream: ordered before the kernels that read it


_LEVEL_TABLES = LevelTableCache(_upload_table)


class CupyRuntime:
    """:class:`Runtime` on CuPy's current device (callers enter the inputs' device) and stream."""

    def __init__(self):
        import cupy

        self.xp = cupy
        self.device_id = cupy.cuda.Device().id

    def launch(self, expr, total_threads, args, config):
        _, function = _cupy_function(expr, self.device_id, config.options)
        function((config.grid(total_threads),), (config.block,), args)

    @staticmethod
    def pointer(a) -> int:
        return a.data.ptr

    def levels(self, prob):
        return _LEVEL_TABLES.get(level_table(prob), self.device_id, self.xp.cuda.get_current_stream().ptr)

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


def check_limits(prob):
    """Refuse shapes the kernels' 32-bit size arguments cannot carry (before any work).

    S, M, D, Lq, L, P are passed as int and L*P*2 (the locations of one (n, q, m)) is
    computed in int; every other product is 64-bit or uses the launch's index type.
    """
    for name in ("S", "M", "D", "Lq", "L", "P"):
        v = getattr(prob, name)
        if v > INT32_MAX:
            raise ValueError(f"{name} = {v} is too large for the CUDA kernels' 32-bit size arguments "
                             f"(S, M, D, Lq, L and P must each be below 2**31)")
    if prob.L * prob.P * 2 > INT32_MAX:
        raise ValueError(f"L*P = {prob.L}*{prob.P} is too large for the CUDA kernels: L*P*2 must be below 2**31")


def _i32(v):
    return np.int32(v)  # range checked by check_limits


def _i64(v):
    return np.int64(v)


def _forward(rt: Runtime, prob, value, loc, attn, *, config: LaunchConfig = DEFAULT_CONFIG, variant="fast",
             specialize=True, index64=None):
    if variant not in ("fast", "shared", "baseline"):
        raise ValueError(f"variant must be 'fast', 'shared' or 'baseline'; got {variant!r}")
    check_limits(prob)
    xp = rt.xp
    value, loc, attn = (_contiguous(xp, a) for a in (value, loc, attn))
    N, S, M, D, Lq, L, P = prob.N, prob.S, prob.M, prob.D, prob.Lq, prob.L, prob.P
    index = index_ctype(prob, index64)
    levels = rt.levels(prob)
    out = xp.empty((N, Lq, M * D), dtype=prob.dtype)
    if variant == "baseline":
        total = N * Lq * M * D
        rt.launch(_expr("msda_forward_baseline", _ctype(prob), index), total,
                  (value, levels, loc, attn, out, _i32(S), _i32(M), _i32(D), _i32(Lq), _i32(L), _i32(P),
                   _i64(total)), config)
        return out
    lay = channel_layout(prob, _aligned(rt, value, out), specialize, config)
    total = N * Lq * M * lay.G
    kernel = "msda_forward_shared" if variant == "shared" else config.forward_kernel
    rt.launch(_fast_expr(kernel, prob, index, lay), total,
              (value, levels, loc, attn, out, _i32(S), _i32(M), _i32(D), _i32(Lq), _i32(L), _i32(P),
               _i32(lay.log2G), _i64(total)), config)
    return out


def _finish_grad_value(rt, prob, acc, config):
    """Accumulator buffer -> grad_value in the inputs' dtype (a cast for half types)."""
    if np.dtype(prob.dtype) == acc.dtype:
        return acc
    out = rt.xp.empty(acc.shape, dtype=prob.dtype)
    rt.launch(_expr("cast_from_float", _ctype(prob)), acc.size, (acc, out, _i64(acc.size)), config)
    return out


def max_pieces(prob, det_piece: int) -> int:
    """Upper bound on the deterministic gather's pieces (scratch rows), known on the host.

    Only value rows with W > K points get pieces; such a row has ceil(W/K) < 2 W/K
    <= 2 W/K0 of them, and every point lies in at most 4 rows, so the total is below
    8 * points / K0.
    """
    points = prob.N * prob.Lq * prob.M * prob.L * prob.P
    return (8 * points) // det_piece + 1


def _grad_value_deterministic(rt, prob, grad_output, loc, attn, levels, index, config):
    """grad_value without atomics: key points by cell, stable sort, then gather per value row.

    A row's points lie in the four cells it is a corner of, two runs of two adjacent
    cells in key order. Rows with at most ``config.det_piece`` points are summed by one
    thread group; longer rows are split into pieces summed into a scratch buffer by
    ``msda_grad_value_pieces`` and reduced in piece order by the gather: bounded work
    per thread, fixed summation order, bit-identical run to run. No host
    synchronisation: keys, segment bounds, piece counts and the gather are kernels, the
    sort is CuPy's stable radix sort and the scan CuPy's cumsum, on the current stream.
    """
    xp = rt.xp
    N, S, M, D, Lq, L, P = prob.N, prob.S, prob.M, prob.D, prob.Lq, prob.L, prob.P
    cells = _num_cells(prob)
    n_keys = N * M * cells
    key_np, key_c = _key_dtype(prob)
    points = N * Lq * M * L * P
    rows = N * S * M
    keys = xp.empty(points, dtype=key_np)
    rt.launch(_expr("msda_cell_keys", _ctype(prob), key_c), points,
              (levels, loc, keys, _i32(M), _i32(Lq), _i32(L), _i32(P), _i64(cells), key_np(n_keys), _i64(points)),
              config)
    order = rt.argsort_stable(keys).astype(np.int64, copy=False)
    seg_start = xp.empty(n_keys + 2, dtype=np.int64)
    rt.launch(_expr("msda_segment_starts", key_c), n_keys + 2,
              (keys[order], seg_start, _i64(points), _i64(n_keys + 2)), config)
    del keys
    pieces = xp.empty(rows, dtype=np.int64)
    geometry = (_i32(S), _i32(M), _i32(L), _i64(cells), _i64(config.det_piece))
    rt.launch("msda_row_pieces", rows, (levels, seg_start, pieces, *geometry, _i64(rows)), config)
    piece_end = xp.cumsum(pieces)  # inclusive: the pieces of row r end at piece_end[r]
    grad_value = xp.empty((N, S, M, D), dtype=prob.dtype)
    g = gather_layout(prob, _aligned(rt, grad_output, grad_value))
    n_pieces = max_pieces(prob, config.det_piece)
    scratch = xp.empty((n_pieces, D), dtype=_acc_dtype(prob))
    common = (grad_output, levels, loc, attn, order, seg_start, pieces, piece_end)
    sizes = (_i32(S), _i32(M), _i32(D), _i32(L), _i32(P), _i64(cells), _i64(config.det_piece), _i32(g.log2G))
    total = n_pieces * g.G  # most of these threads find no piece and return at once
    rt.launch(_expr("msda_grad_value_pieces", _ctype(prob), index, g.C, g.vec), total,
              (*common, scratch, _i64(rows), _i64(n_pieces), *sizes, _i64(total)), config)
    total = rows * g.G
    rt.launch(_expr("msda_grad_value_gather", _ctype(prob), index, g.C, g.vec), total,
              (*common, scratch, grad_value, *sizes, _i64(total)), config)
    return grad_value


def _backward(rt: Runtime, prob, grad_output, value, loc, attn, *, deterministic=False, variant="fast",
              config: LaunchConfig = DEFAULT_CONFIG, specialize=True, index64=None):
    if variant not in ("fast", "baseline"):
        raise ValueError(f"variant must be 'fast' or 'baseline'; got {variant!r}")
    check_limits(prob)
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
                  (grad_output, value, levels, loc, attn, acc, grad_loc, grad_attn, *sizes, _i64(total)), config)
        return _finish_grad_value(rt, prob, acc, config), grad_loc, grad_attn
    # The accumulation buffer is a fresh allocation (aligned); the inputs decide.
    lay = channel_layout(prob, _aligned(rt, value, grad_output), specialize, config)
    total = N * Lq * M * lay.G
    # Without atomics the kernel never touches grad_value: a one-element placeholder.
    acc = xp.empty(1, dtype=_acc_dtype(prob)) if deterministic else xp.zeros(value.shape, dtype=_acc_dtype(prob))
    rt.launch(_fast_expr("msda_backward", prob, index, lay, not deterministic), total,
              (grad_output, value, levels, loc, attn, acc, grad_loc, grad_attn, *sizes, _i32(lay.log2G),
               _i64(total)), config)
    if deterministic:
        grad_value = _grad_value_deterministic(rt, prob, grad_output, loc, attn, levels, index, config)
    else:
        grad_value = _finish_grad_value(rt, prob, acc, config)
    return grad_value, grad_loc, grad_attn


# ---- public entry points (called by cydeform.functional) ----------------------------

def forward(prob, value, sampling_locations, attention_weights, *, variant="fast", config=DEFAULT_CONFIG):
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
        (an unmeasured experiment, bit-identical to 'fast').
    config : LaunchConfig
        Launch settings (benchmarks and tuning).

    Returns
    -------
    cupy array (N, Lq, M*D) in the inputs' dtype.
    """
    with value.device:  # the inputs' device, whichever is current
        return _forward(CupyRuntime(), prob, value, sampling_locations, attention_weights, variant=variant,
                        config=config)


def backward(prob, grad_output, value, sampling_locations, attention_weights, *, deterministic=False,
             variant="fast", config=DEFAULT_CONFIG):
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
    config : LaunchConfig
        Launch settings (benchmarks and tuning).

    Returns
    -------
    grad_value (N, S, M, D), grad_sampling_locations (N, Lq, M, L, P, 2),
    grad_attention_weights (N, Lq, M, L, P): cupy arrays in the inputs' dtype.
    """
    with value.device:
        return _backward(CupyRuntime(), prob, grad_output, value, sampling_locations, attention_weights,
                         deterministic=deterministic, variant=variant, config=config)
