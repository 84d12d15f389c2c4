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

from . import _cpu_baseline

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
forward = _impl.forward
backward = _impl.backward


def set_num_threads(n: int) -> None:
    _impl.set_num_threads(n)


def get_num_threads() -> int:
    return _impl.get_num_threads()


def set_min_parallel_work(work: int) -> int:
    """Internal (tests): calls with fewer channel-samples than this run single-threaded.
    Returns the previous value."""
    return [_load(isa).set_min_parallel_work(work) for isa in available_isas()][0]
