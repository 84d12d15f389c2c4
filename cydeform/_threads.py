"""Thread count of the CPU backend (OpenMP)."""
from __future__ import annotations

import numbers

_MAX_THREADS = 4096


def set_num_threads(n: int) -> None:
    """Use ``n`` threads in the CPU backend's parallel loops (default: OpenMP's maximum).

    Results do not depend on ``n``: every parallel loop writes disjoint outputs in a
    fixed order.
    """
    from . import _cpu

    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= _MAX_THREADS:
        raise ValueError(f"set_num_threads expects an integer from 1 to {_MAX_THREADS}; got {n!r}")
    _cpu.set_num_threads(int(n))


def get_num_threads() -> int:
    """Threads the CPU backend uses (1 when built without OpenMP)."""
    from . import _cpu

    return _cpu.get_num_threads()
