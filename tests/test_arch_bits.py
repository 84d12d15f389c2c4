"""benchmarks/arch_bits.py, the cross-architecture bit check: on one machine `check`
passes on what `save` wrote, and fails, naming the array and its distance in ulps,
when one saved bit differs."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CASE = "float32-decoder-uniform-stretch1.3"


def arch_bits(*args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "arch_bits.py"), *args, "--cases", CASE,
                           "--threads", "1,2"], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ["grad_loc", "out"])
def test_check_passes_on_its_own_save_and_catches_one_flipped_bit(tmp_path, name):
    saved = arch_bits("save", str(tmp_path))
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert "bit-identical" in saved.stdout
    same = arch_bits("check", str(tmp_path))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "bit-identical to the saved ones" in same.stdout

    path = tmp_path / f"{CASE}.npz"
    with np.load(path) as f:
        arrays = dict(f)
    flat = arrays[name].reshape(-1).view(np.uint32)
    flat[flat.size // 2] ^= 1  # the last bit of one element
    np.savez(path, **arrays)
    changed = arch_bits("check", str(tmp_path))
    assert changed.returncode == 1, changed.stdout + changed.stderr
    assert "DIFFER" in changed.stdout and f"'{name}': 1" in changed.stdout
