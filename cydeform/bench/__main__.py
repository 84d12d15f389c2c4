"""``python -m cydeform.bench [CPU options] [--cpu-only]``: CPU benchmark, then GPU when present.

``python -m cydeform.bench --dask [--images N] [--repeat R]``: Dask throughput instead.
``python -m cydeform.bench --plot FILE.png [options]``: time against Lq, drawn (see plot_scaling).
``python -m cydeform.bench --jax [options]``: the JAX benchmark instead (cydeform.bench.jax_bench).
"""
from __future__ import annotations

import argparse
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
    if "--jax" in argv:
        from . import jax_bench

        return jax_bench.main([a for a in argv if a != "--jax"])
    if "--dask" in argv:
        from . import dask_bench

        dask_bench.main([a for a in argv if a != "--dask"])
        return
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--plot", metavar="FILE.png")
    known, argv = pre.parse_known_args(argv)
    if known.plot:
        from . import plot_scaling

        return plot_scaling.main([known.plot, *argv])
    args = cpu.main(argv)
    if not args.cpu_only and _gpu_available():
        from . import gpu

        gpu.main([])


if __name__ == "__main__":
    main()
