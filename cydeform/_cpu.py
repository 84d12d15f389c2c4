"""The CPU backend: picks the fastest build of src/_cpu_impl.pxi this processor runs.

setup.py compiles the same Cython source once per instruction set: 'baseline' (the
compiler's default target, always built), and on x86-64 'avx2' and 'avx512'. All
builds use -ffp-contract=off and inner loops whose summation order does not depend on
the vector width, so they return bit-identical results; only speed differs.
Set CYDEFORM_CPU_ISA=baseline|avx2|avx512 to force one.
"""
from __future__ import annotations

import importlib
import os

from . import _cpu_baseline, _staging

_PREFERENCE = ("avx512", "avx2", "baseline")


def _load(isa):
    try:
        return importlib.import_module(f"{__package__}._cpu_{isa}")
    except ImportError:  # not built for this compiler / platform
        return None


def available_isas():
    """Builds that exist and run on this processor, fastest first."""
    return [isa for isa in _PREFERENCE if _cpu_baseline.cpu_supports(isa) and _load(isa) is not None]


def _select():
    forced = os.environ.get("CYDEFORM_CPU_ISA")
    if forced:
        if forced not in _PREFERENCE:
            raise ValueError(f"CYDEFORM_CPU_ISA must be one of {', '.join(_PREFERENCE)}; got {forced!r}")
        if forced not in available_isas():
            raise RuntimeError(f"CYDEFORM_CPU_ISA={forced}: that build is missing or this processor cannot run it; "
                               f"available: {', '.join(available_isas())}")
        return forced
    return available_isas()[0]


isa = _select()
_impl = _load(isa)


def _stage(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """(value copied into a staging buffer, whether that buffer has huge pages) when that
    pays for this call (cydeform._staging), else (None, False)."""
    gathers = 4 * attention_weights.size
    # The cheap tests first (spread 1.0: the most a call can gain); page_spread costs
    # ~0.1 ms, a decoder call ~1 ms.
    could_stage = _staging.worth_staging(value.nbytes, gathers, 1.0)
    could_align = _staging.gathers_could_pay_for_aligning(value.nbytes, gathers)
    if not could_stage and not could_align:
        # The decoder call's answer without the rest (~20 us after an op call has swept
        # the caches).
        return None, False
    huge = _staging.huge_pages_enabled()
    if huge and could_stage:
        spread = _staging.page_spread(value.shape, value.itemsize, spatial_shapes, level_start_index,
                                      sampling_locations)
        if _staging.worth_staging(value.nbytes, gathers, spread):
            staged = _staging.staged_copy(value, huge=True)
            if staged is not None:
                return staged, True
    # The address only where the gathers could pay (never for the decoder call).
    if (could_align
            and _staging.worth_aligning(value.ctypes.data, value.shape[-1] * value.itemsize, value.nbytes, gathers)):
        # Only the alignment pays: the buffer with huge pages where they are enabled
        # (they do not hurt), else (or if the kernel gave none) a plain one.
        staged = _staging.staged_copy(value, huge=True) if huge else None
        if staged is None:
            staged = _staging.staged_copy(value, huge=False)
        return staged, False
    return None, False


def _by_head(value, sampling_locations):
    """Whether the op works on its own head-major copy of value (src/_cpu_impl.pxi):
    then no staging copy of value is needed, only a work buffer kept between calls."""
    _, S, _, _ = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    return _impl.by_head(S, Lq, L, P)


def _work(value):
    return lambda n: _staging.work_buffer(n, value.dtype)


def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """The op on validated C-contiguous arrays (see src/_cpu_impl.pxi)."""
    if _by_head(value, sampling_locations):
        return _impl.forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                             work=_work(value))
    staged, _ = _stage(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _impl.forward(value if staged is None else staged, spatial_shapes, level_start_index,
                         sampling_locations, attention_weights)


def backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Gradients on validated C-contiguous arrays; grad_value is never a staging buffer."""
    _, S, _, _ = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    if _impl.by_head(S, Lq, L, P):  # never a call the sparse method takes
        return _impl.backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, work=_work(value))
    if _impl.sparse_applies(S, Lq, L, P):
        # The sparse method reads value once, in address order: a staging copy (which
        # _stage did pick for some such calls, D itemsize <= 64 with huge pages) costs a
        # pass over value and one over grad_value more (1.17-1.26x slower on one such
        # shape), and deciding costs ~0.05 ms of a ~4 ms decoder call (cpu_log 63).
        return _impl.backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                              attention_weights, method="sparse")
    staged, huge = _stage(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if not huge:
        return _impl.backward(grad_output, value if staged is None else staged, spatial_shapes,
                              level_start_index, sampling_locations, attention_weights)
    grad_value, grad_loc, grad_attn = _impl.backward(
        grad_output, staged, spatial_shapes, level_start_index, sampling_locations, attention_weights,
        buffers=lambda K: _staging.zeroed((K,) + value.shape, value.dtype))
    # Out of the staging buffer (the next call reuses it) into the caller's own array.
    return grad_value.copy(), grad_loc, grad_attn


def set_num_threads(n: int) -> None:
    _impl.set_num_threads(n)


def get_num_threads() -> int:
    return _impl.get_num_threads()


def set_min_parallel_work(work: int) -> int:
    """Internal (tests): calls with fewer channel-samples than this run single-threaded.
    Returns the previous value."""
    return [_load(isa).set_min_parallel_work(work) for isa in available_isas()][0]
