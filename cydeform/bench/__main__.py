"""``python -m cydeform.bench [CPU options] [--cpu-only]``: CPU benchmark, then GPU when present."""
from __future__ import annotations

from . import cpu


def _gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def main(argv=None):
    args = cpu.main(argv)
    if not args.cpu_only and _gpu_available():
        from . import gpu

        gpu.main([])


if __name__ == "__main__":
    main()
