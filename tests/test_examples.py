"""Every example runs to completion and passes its own checks (each exits non-zero on failure)."""
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parent.parent / "examples").glob("*.py"))


def test_examples_exist():
    assert any(p.name == "quickstart.py" for p in EXAMPLES)


# Examples that draw: they need matplotlib (the plot extra) and take the output path as
# argv[1], so the test writes to a temporary file, not over the committed picture.
PLOTTING = {"plot_sampling_points.py"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs_and_passes_its_checks(path, tmp_path):
    args = []
    if path.name in PLOTTING:
        pytest.importorskip("matplotlib")
        args = [str(tmp_path / "picture.png")]
    result = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
