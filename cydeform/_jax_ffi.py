"""Build, load and register the XLA FFI targets of cydeform.jax on the CPU.

The handlers (cydeform/kernels/jax_cpu_ffi.cc) are compiled at first use with the
system C++ compiler (``$CXX``, default ``c++``; C++17) against the installed jaxlib's
FFI headers (``jax.ffi.include_dir()``), the way the CUDA kernels are compiled at run
time. The shared library is cached on disk (``$CYDEFORM_CACHE_DIR/jax``, default
``~/.cache/cydeform/jax``) under a hash of the source, the jaxlib version, the
compiler and its flags. The library gets the addresses of the Cython backend's C
entry points (the build cydeform._cpu picked for this processor) once, at load.

Importing this module imports jax; ``import cydeform`` never imports it.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jaxlib

FORWARD_TARGET = "cydeform_msda_forward"
BACKWARD_TARGET = "cydeform_msda_backward"

_SOURCE = Path(__file__).with_name("kernels") / "jax_cpu_ffi.cc"
_FLAGS = ("-std=c++17", "-O2", "-shared", "-fPIC")


class BuildError(RuntimeError):
    """The C++ compiler is missing or failed to build the FFI handlers."""


def _cache_dir() -> Path:
    root = os.environ.get("CYDEFORM_CACHE_DIR")
    return Path(root) / "jax" if root else Path.home() / ".cache" / "cydeform" / "jax"


def _compiler() -> str:
    cxx = os.environ.get("CXX") or "c++"
    path = shutil.which(cxx)
    if path is None:
        raise BuildError(f"cydeform.jax needs a C++17 compiler to build its XLA FFI handlers at first use; "
                         f"{cxx!r} was not found (set $CXX)")
    return path


def library_path() -> Path:
    """The cached shared library, compiling it first if needed."""
    source = _SOURCE.read_text()
    cxx = _compiler()
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([source, jaxlib.__version__, include, cxx, *_FLAGS]).encode()).hexdigest()[:24]
    path = _cache_dir() / f"cydeform_jax_cpu_{key}.so"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a private name, then rename: concurrent first uses never load a torn file.
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / path.name
        cmd = [cxx, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"cydeform.jax: building the XLA FFI handlers failed:\n{' '.join(cmd)}\n{proc.stderr}")
        os.replace(out, path)
    return path


@functools.lru_cache(maxsize=1)
def register() -> None:
    """Load the handlers, give them the backend's entry points, register both targets (once)."""
    from . import _cpu

    lib = ctypes.CDLL(str(library_path()))
    entry = _cpu._impl.c_entry_points()
    lib.cyd_jax_set_entry_points.argtypes = [ctypes.c_void_p] * 4
    lib.cyd_jax_set_entry_points.restype = None
    lib.cyd_jax_set_entry_points(entry["forward_f32"], entry["forward_f64"],
                                 entry["backward_f32"], entry["backward_f64"])
    jax.ffi.register_ffi_target(FORWARD_TARGET, jax.ffi.pycapsule(lib.cyd_jax_forward), platform="cpu")
    jax.ffi.register_ffi_target(BACKWARD_TARGET, jax.ffi.pycapsule(lib.cyd_jax_backward), platform="cpu")
    # Keep the library loaded for the life of the process (XLA holds raw pointers into it).
    register.lib = lib
