#!/usr/bin/env bash
# The CPU backend on aarch64, under emulation: builds the extension for aarch64 and checks
# that it gives the same bits as this machine's builds (benchmarks/arch_bits.py).
#
#   bash benchmarks/arm_check.sh [WORKDIR]      # default /tmp/cydeform-arm (~3 GB)
#
# Run from the repository root of a tree built in place (python setup.py build_ext
# --inplace: the build leaves src/_cpu_baseline.c, the Cython output compiled here), as
# root on a Debian/x86-64 machine that reaches Debian's package archive. Steps:
#   1. apt: a cross compiler (gcc-aarch64-linux-gnu), qemu-user-static, mmdebstrap;
#   2. a Debian arm64 tree (trixie: Python 3.13, NumPy), unpacked without running any
#      of its packages' scripts, plus the links those scripts would have made;
#   3. src/_cpu_baseline.c compiled against that tree with setup.py's flags (on a
#      processor other than x86-64 setup.py builds only 'baseline');
#   4. `arch_bits.py save` here (every build, 1-3 threads), then `arch_bits.py check`
#      under qemu-aarch64 with the aarch64 build on the same inputs. Exits 1 on a difference;
#   5. with ARM_TESTS=1, the CPU backend's test files under emulation too (~30 minutes).
# Emulated times say nothing about speed on a real aarch64 processor.
# PYTHON (default: python) runs the x86-64 side; CASES (default: all) keeps the cases whose
# name contains it (arch_bits.py --cases; under qemu each encoder case took ~50 s here,
# the eight decoder cases ~1.5 minutes together).
set -euo pipefail
W=${1:-/tmp/cydeform-arm}
PY=${PYTHON:-python}
R=$W/root
T=aarch64-linux-gnu

[ -f src/_cpu_baseline.c ] || { echo "src/_cpu_baseline.c missing: run '$PY setup.py build_ext --inplace' first" >&2; exit 2; }

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq gcc-$T g++-$T qemu-user-static mmdebstrap >/dev/null

if [ ! -x "$R/usr/bin/python3" ]; then
    rm -rf "$R" && mkdir -p "$W"
    mmdebstrap --arch=arm64 --variant=extract \
        --include=libc6,libgomp1,libstdc++6,python3,python3-dev,libpython3-dev,python3-numpy,python3-numpy-dev,python3-scipy,python3-pytest,python3-hypothesis trixie "$R"
    # What usrmerge and update-alternatives would have set up.
    for d in lib bin sbin; do [ -e "$R/$d" ] || ln -s "usr/$d" "$R/$d"; done
    for lib in blas/libblas.so.3 lapack/liblapack.so.3; do
        [ -e "$R/usr/lib/$T/${lib#*/}" ] || ln -s "$lib" "$R/usr/lib/$T/${lib#*/}"
    done
fi
PYV=$(basename "$(readlink -f "$R/usr/bin/python3")")              # python3.13
NPI=
for d in "$R"/usr/lib/$T/python3-numpy/numpy/_core/include "$R"/usr/lib/python3/dist-packages/numpy/_core/include; do
    [ -d "$d" ] && NPI=$d && break
done
[ -n "$NPI" ] || { echo "NumPy's headers not found in $R" >&2; exit 2; }
SUFFIX=$(ls "$R/usr/lib/$PYV/lib-dynload/" | sed -n 's/^[^.]*\(\.cpython-.*\.so\)$/\1/p;T;q')   # .cpython-313-aarch64-linux-gnu.so
[ -n "$SUFFIX" ] || { echo "no extension suffix found in $R/usr/lib/$PYV/lib-dynload" >&2; exit 2; }

# The package's Python files and the aarch64 build, apart from this tree's x86-64 builds.
rm -rf "$W/pkg" && mkdir -p "$W/pkg"
cp -r cydeform "$W/pkg/"
find "$W/pkg/cydeform" \( -name '*.so' -o -name __pycache__ \) -prune -exec rm -rf {} +
$T-gcc --sysroot="$R" -B"$R/usr/lib/$T" -O3 -fno-math-errno -ffp-contract=off -fopenmp -fPIC -shared \
    -Wall -Wno-unused-function -Wno-unreachable-code \
    -I"$R/usr/include/$PYV" -I"$NPI" -Isrc -DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION \
    src/_cpu_baseline.c -o "$W/pkg/cydeform/_cpu_baseline$SUFFIX"
echo "built $W/pkg/cydeform/_cpu_baseline$SUFFIX ($($T-gcc --version | head -1))"

# An x86-64 script that runs the aarch64 Python, so that tests which start sys.executable
# in a subprocess start it under qemu too.
printf '#!/bin/sh\nexec qemu-aarch64-static -L "%s" -0 "%s" "%s" "$@"\n' "$R" "$W/python3" "$R/usr/bin/python3" > "$W/python3"
chmod +x "$W/python3"
# The tests' CUDA host harness compiles the kernels as C++ with $CXX and loads them into
# that Python: an aarch64 C++ compiler against the same tree.
printf '#!/bin/sh\nexec %s-g++ --sysroot="%s" -B"%s" "$@"\n' "$T" "$R" "$R/usr/lib/$T" > "$W/cxx"
chmod +x "$W/cxx"

"$PY" benchmarks/arch_bits.py save "$W/ref" --cases "${CASES:-}"
PYTHONPATH="$W/pkg" "$W/python3" benchmarks/arch_bits.py check "$W/ref" --threads 1,2,3 --cases "${CASES:-}"
if [ "${ARM_TESTS:-0}" = 1 ]; then
    # Run from $W: the tests, and the `python -c` subprocesses some of them start (the
    # working folder first on sys.path), must import cydeform from the aarch64 package,
    # not from this tree, whose builds are x86-64.
    REPO=$PWD
    (cd "$W" && CXX="$W/cxx" PYTHONPATH="$W/pkg" "$W/python3" -m pytest -q -p no:cacheprovider --rootdir "$REPO" \
        "$REPO"/tests/test_cpu.py "$REPO"/tests/test_conformance.py "$REPO"/tests/test_edge_gaps.py \
        "$REPO"/tests/test_errors.py "$REPO"/tests/test_nn.py "$REPO"/tests/test_reference.py \
        "$REPO"/tests/test_testing_kit.py "$REPO"/tests/test_staging.py "$REPO"/tests/test_examples.py)
fi
