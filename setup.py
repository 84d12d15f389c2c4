"""Build the Cython CPU backend (cydeform._cpu_*), with OpenMP where the compiler has it.

Without OpenMP the same code builds single-threaded and gives identical numbers:
every parallel loop in src/_cpu_impl.pxi writes disjoint outputs in a fixed order.
"""
import os
import platform
import sys
import tempfile
import textwrap

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _openmp_flags(compiler):
    """Return (compile_args, link_args) enabling OpenMP, or ([], []) if it does not work."""
    if os.environ.get("CYDEFORM_NO_OPENMP"):
        return [], []
    if compiler.compiler_type == "msvc":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    test = textwrap.dedent("""
        #include <omp.h>
        int main(void) { int n = 0;
        #pragma omp parallel reduction(+:n)
          n += 1;
          return n > 0 ? 0 : 1; }
    """)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp_test.c")
        with open(src, "w") as f:
            f.write(test)
        for cflags, lflags in candidates:
            try:
                objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
                compiler.link_executable(objs, "omp_test", output_dir=tmp, extra_postargs=lflags)
                return cflags, lflags
            except Exception:
                continue
    print("cydeform: OpenMP not available, building the CPU backend single-threaded", file=sys.stderr)
    return [], []


# Extra builds of the same source for newer x86-64 processors; cydeform/_cpu.py picks
# the best one at import time. Each is built only if the compiler accepts its flags.
ISA_FLAGS = {
    "avx2": ["-mavx2", "-mfma"],
    "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
               "-mprefer-vector-width=512"],
}


def _accepts(compiler, flags):
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "isa_test.c")
        with open(src, "w") as f:
            f.write("int main(void) { return 0; }\n")
        try:
            compiler.compile([src], output_dir=tmp, extra_postargs=flags + ["-Werror"])
            return True
        except Exception:
            return False


class BuildExt(build_ext):
    def build_extensions(self):
        cflags, lflags = _openmp_flags(self.compiler)
        msvc = self.compiler.compiler_type == "msvc"
        # -ffp-contract=off: no fused multiply-adds, so every ISA build rounds alike.
        opt = ["/O2"] if msvc else ["-O3", "-fno-math-errno", "-ffp-contract=off"]
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        kept = []
        for ext in self.extensions:
            isa = ext.name.rsplit("_", 1)[-1]
            isa_flags = ISA_FLAGS.get(isa, [])
            if isa_flags and (msvc or not x86 or not _accepts(self.compiler, isa_flags)):
                print(f"cydeform: skipping the {isa} build of the CPU backend", file=sys.stderr)
                continue
            ext.extra_compile_args = opt + isa_flags + cflags
            ext.extra_link_args = lflags
            kept.append(ext)
        self.extensions = kept
        super().build_extensions()


extensions = [
    Extension(
        f"cydeform._cpu_{isa}",
        [f"src/_cpu_{isa}.pyx"],
        include_dirs=[numpy.get_include(), "src"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for isa in ("baseline", "avx2", "avx512")
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3},
    ),
    cmdclass={"build_ext": BuildExt},
)
