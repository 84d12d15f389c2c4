"""NVRTC compilation of the CUDA kernels: the one compile path of the runtime, the tests,
the ptxas report and the tuning script.

We call NVRTC ourselves (CuPy's bindings in ``cupy_backends``) instead of going through
``cupy.RawModule``, for two reasons:

* options: ``RawModule`` appends ``-ftz=true`` to every compile. We compile with
  exactly ``OPTIONS`` (``-ftz=false``: float32 subnormals are kept, as on the CPU and
  in the float64 oracle), and the NVRTC test checks the binary this module produces.
* architecture: a GPU newer than the NVRTC in use gets a clear error naming its compute
  capability, the NVRTC version and the fix, not a cubin that fails to load.

Binaries are cached on disk (``$CYDEFORM_CACHE_DIR``, default
``~/.cache/cydeform/nvrtc``) under a hash of the source, name expressions, options,
architecture and NVRTC version, so a new process does not recompile.

Needs CuPy's NVRTC bindings and an NVRTC library (``nvidia-cuda-nvrtc-cu12`` or
``nvidia-cuda-nvrtc`` wheels), no GPU. Imported lazily: ``import cydeform`` does not
import this module's dependencies.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

# -ftz=false: keep subnormals (CuPy's RawModule would flush them: -ftz=true).
# -prec-div/-prec-sqrt: IEEE-rounded division and square root (NVRTC's defaults, stated).
# -fmad=true: NVRTC's default; multiply-adds may fuse, so float32 results differ from
# the CPU backend (built with -ffp-contract=off) in the last bits. The sampling cell
# never does: sample_geometry computes the pixel coordinate with __dmul_rn.
OPTIONS = ("-std=c++17", "-ftz=false", "-prec-div=true", "-prec-sqrt=true", "-fmad=true")

NVRTC_WHEELS = "nvidia-cuda-nvrtc-cu12 (with cupy-cuda12x) or nvidia-cuda-nvrtc (with cupy-cuda13x)"


class NvrtcError(RuntimeError):
    """NVRTC is missing, too old for the GPU, or failed to compile a kernel."""


def _nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc
    except ImportError as exc:  # pragma: no cover - CuPy always ships it
        raise NvrtcError("cydeform: CuPy's NVRTC bindings (cupy_backends.cuda.libs.nvrtc) are missing; "
                         "install CuPy: pip install cydeform[cuda12]") from exc
    return nvrtc


@functools.lru_cache(maxsize=1)
def version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library CuPy loads."""
    try:
        return tuple(_nvrtc().getVersion())
    except NvrtcError:
        raise
    except Exception as exc:
        raise NvrtcError(f"cydeform: the NVRTC library could not be loaded ({exc}); install {NVRTC_WHEELS}") from exc


@functools.lru_cache(maxsize=1)
def supported_archs() -> tuple[int, ...]:
    """Compute capabilities (as 90 for sm_90) this NVRTC can compile for, ascending."""
    return tuple(sorted(int(a) for a in _nvrtc().getSupportedArchs()))


def arch_for(compute_capability: int, archs: tuple[int, ...] | None = None, nvrtc_version=None) -> str:
    """The ``--gpu-architecture`` value for a device of ``compute_capability`` (e.g. 90).

    Raises :class:`NvrtcError` when this NVRTC cannot target the device: a GPU newer
    than the NVRTC (an sm_90 cubin would not load on sm_100) or older than its oldest
    target. ``archs`` and ``nvrtc_version`` default to the loaded NVRTC's.
    """
    archs = supported_archs() if archs is None else tuple(sorted(archs))
    ver = version() if nvrtc_version is None else tuple(nvrtc_version)
    cc = int(compute_capability)
    if cc in archs:
        return f"sm_{cc}"
    ver_text = ".".join(str(v) for v in ver)
    if cc > max(archs):
        raise NvrtcError(
            f"cydeform: this GPU has compute capability {cc // 10}.{cc % 10} (sm_{cc}), but the NVRTC in use "
            f"(version {ver_text}) can compile for at most sm_{max(archs)}. Install a newer NVRTC wheel: "
            f"pip install -U {NVRTC_WHEELS}.")
    raise NvrtcError(
        f"cydeform: this GPU has compute capability {cc // 10}.{cc % 10} (sm_{cc}), which NVRTC {ver_text} "
        f"cannot target (supported: {', '.join(f'sm_{a}' for a in archs)}).")


@dataclass(frozen=True)
class Program:
    """A compiled NVRTC program: the cubin, ``{name expression: lowered name}``, the log."""

    cubin: bytes
    lowered: dict
    log: str


def _cache_dir() -> Path:
    return Path(os.environ.get("CYDEFORM_CACHE_DIR") or Path.home() / ".cache" / "cydeform" / "nvrtc")


def compile_program(source: str, exprs, arch: str, options=OPTIONS, *, ptxas_verbose=False,
                    use_cache=True) -> Program:
    """Compile ``source`` for ``arch`` (e.g. 'sm_90'), instantiating the name expressions ``exprs``.

    The options NVRTC gets are ``--gpu-architecture=arch`` plus ``options`` (plus
    ``--ptxas-options=-v`` with ``ptxas_verbose``, which changes the log, not the code).
    Raises :class:`NvrtcError` with NVRTC's log on failure.
    """
    exprs = tuple(exprs)
    opts = [f"--gpu-architecture={arch}", *options] + (["--ptxas-options=-v"] if ptxas_verbose else [])
    key = hashlib.sha256("\0".join([source, *exprs, *opts, repr(version())]).encode()).hexdigest()[:32]
    path = _cache_dir() / f"{key}.cubin"
    if use_cache and not ptxas_verbose and path.exists():
        try:
            meta = json.loads(path.with_suffix(".json").read_text())
            return Program(path.read_bytes(), meta["lowered"], meta["log"])
        except (OSError, ValueError, KeyError):
            pass  # a torn or foreign entry: recompile and overwrite
    nvrtc = _nvrtc()
    prog = nvrtc.createProgram(source, "msda.cu", [], [])
    try:
        for e in exprs:
            nvrtc.addNameExpression(prog, e)
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception as exc:
            raise NvrtcError(f"cydeform: NVRTC {'.'.join(map(str, version()))} failed to compile "
                             f"{', '.join(exprs)} for {arch} with {' '.join(opts)}: {exc}\n"
                             f"{nvrtc.getProgramLog(prog)}") from exc
        program = Program(bytes(nvrtc.getCUBIN(prog)), {e: nvrtc.getLoweredName(prog, e) for e in exprs},
                          nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)
    if use_cache and not ptxas_verbose:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(program.cubin)
            tmp.with_suffix(".jsontmp").write_text(json.dumps({"lowered": program.lowered, "log": program.log}))
            os.replace(tmp.with_suffix(".jsontmp"), path.with_suffix(".json"))
            os.replace(tmp, path)  # the cubin last: its presence means the entry is complete
        except OSError:
            pass  # a read-only home is no reason to fail
    return program
