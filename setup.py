"""Build the Cython CPU backend (cydeform._cpu), with OpenMP where the compiler has it.

Without OpenMP the same code builds single-threaded and gives identical numbers:
every parallel loop in src/_cpu.pyx writes disjoint outputs in a fixed order.
"""
import os
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


class BuildExt(build_ext):
    def build_extensions(self):
        cflags, lflags = _openmp_flags(self.compiler)
        opt = ["/O2"] if self.compiler.compiler_type == "msvc" else ["-O3", "-fno-math-errno", "-ffp-contract=off"]
        for ext in self.extensions:
            ext.extra_compile_args = opt + cflags
            ext.extra_link_args = lflags
        super().build_extensions()


extensions = [
    Extension(
        "cydeform._cpu",
        ["src/_cpu.pyx"],
        include_dirs=[numpy.get_include(), "src"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3},
    ),
    cmdclass={"build_ext": BuildExt},
)
