"""``python -m cydeform.bench [CPU options] [--cpu-only]``: CPU benchmark, then GPU when present.

``python -m cydeform.bench --dask [--images N] [--repeat R]``: Dask throughput instead.
"""
from __future__ import annotations

import sys

from . import cpu


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--dask" in argv:
        from . import dask_bench

        dask_bench.main([a for a in argv if a != "--dask"])
        return
    args = cpu.main(argv)
    if not args.cpu_only and _gpu_available():
        from . import gpu

        gpu.main([])


if __name__ == "__main__":
    main()
