"""Run cydeform's CUDA kernels on the CPU through cydeform._cuda's own orchestration.

``build_library`` compiles ``cydeform._cuda.kernel_source()`` (the exact text NVRTC
gets) after ``cuda_host_compat.h`` with the host C++ compiler into a shared library
exporting one launcher per kernel name expression. ``HostRuntime`` implements
``cydeform._cuda.Runtime`` (array module, launch, pointer, levels, stable argsort) with
NumPy arrays, so ``_cuda._forward`` / ``_cuda._backward`` run unchanged:
the same variant selection, index width, buffers, sorting and kernel arguments as on
a GPU. Libraries are cached by a hash of their source and flags.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from cydeform import _cuda

HERE = Path(__file__).parent
COMPAT_HEADER = HERE / "cuda_host_compat.h"
# -O0 keeps the build short; -ffp-contract=off gives GPU-like single roundings (no
# implicit FMA, so cell selection matches the float64 reference bit for bit).
CXXFLAGS = ["-std=c++17", "-O0", "-fPIC", "-shared", "-ffp-contract=off", "-w"]


def find_compiler():
    """Path of a C++ compiler ($CXX, g++, c++, clang++), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build_library(exprs, build_dir: Path, extra_source: str = ""):
    """Compile the kernels instantiated at ``exprs``; return (CDLL, {expr: launcher}).

    ``extra_source`` (test-only kernels) is appended to ``_cuda.kernel_source()``.
    """
    exprs = list(exprs)
    lines = ['#include "cuda_host_compat.h"', _cuda.kernel_source(), extra_source]
    for i, e in enumerate(exprs):
        lines.append(f'extern "C" int cyd_launch_{i}(unsigned grid, unsigned block, void** argv) '
                     f'{{ return cyd_host::launch(&{e}, grid, block, argv); }}')
    lines.append('extern "C" const char* cyd_error() { return cyd_host::g_error.c_str(); }')
    text = "\n".join(lines) + "\n"
    cxx = find_compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found")
    digest = hashlib.sha256((text + COMPAT_HEADER.read_text() + " ".join([cxx, *CXXFLAGS])).encode()).hexdigest()[:20]
    build_dir = Path(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    lib_path = build_dir / f"msda_host_{digest}.so"
    if not lib_path.exists():
        src = build_dir / f"msda_host_{digest}.cpp"
        src.write_text(text)
        tmp = build_dir / f"msda_host_{digest}.{os.getpid()}.tmp.so"
        proc = subprocess.run([cxx, *CXXFLAGS, f"-I{HERE}", "-o", str(tmp), str(src)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"host build of the CUDA kernels failed:\n{proc.stderr[-8000:]}")
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lib.cyd_error.restype = ctypes.c_char_p
    funcs = {}
    for i, e in enumerate(exprs):
        fn = getattr(lib, f"cyd_launch_{i}")
        fn.argtypes = [ctypes.c_uint, ctypes.c_uint, ctypes.POINTER(ctypes.c_void_p)]
        fn.restype = ctypes.c_int
        funcs[e] = fn
    return lib, funcs


class HarnessError(AssertionError):
    """The harness caught a kernel misusing warp shuffles."""


class HostRuntime:
    """cydeform._cuda.Runtime on the CPU (NumPy arrays, fiber warps)."""

    xp = np

    def __init__(self, build_dir, prebuild=(), extra_source=""):
        self.build_dir = Path(build_dir)
        self.extra_source = extra_source
        self._funcs = {}  # expr -> (library, launcher); holds the libraries alive
        self.launched = []
        if prebuild:
            self.add(prebuild)

    def add(self, exprs):
        missing = sorted(set(exprs) - set(self._funcs))
        if missing:
            lib, funcs = build_library(missing, self.build_dir, self.extra_source)
            self._funcs.update({e: (lib, fn) for e, fn in funcs.items()})

    def launch(self, expr, total_threads, args, config=_cuda.DEFAULT_CONFIG):
        self.add([expr])
        holders = []
        for a in args:
            if isinstance(a, np.ndarray):
                assert a.flags.c_contiguous, f"{expr}: non-contiguous array argument"
                holders.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.generic):
                holders.append(ctypes.create_string_buffer(a.tobytes(), a.nbytes))
            else:
                raise TypeError(f"{expr}: kernel arguments must be NumPy arrays or NumPy scalars, got {type(a)}")
        argv = (ctypes.c_void_p * len(holders))(*[ctypes.addressof(h) for h in holders])
        lib, fn = self._funcs[expr]
        if fn(config.grid(total_threads), config.block, argv):
            raise HarnessError(f"{expr}: {lib.cyd_error().decode()}")
        self.launched.append(expr)

    @staticmethod
    def pointer(a) -> int:
        return a.ctypes.data

    @staticmethod
    def levels(prob):
        return _cuda.level_table(prob)

    @staticmethod
    def argsort_stable(keys):
        return np.argsort(keys, kind="stable")
