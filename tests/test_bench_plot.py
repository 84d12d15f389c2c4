"""``python -m cydeform.bench --plot``: the grid, the picture's lines where the data says, the CLI."""
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from cydeform.bench import __main__ as bench_main  # noqa: E402
from cydeform.bench import plot_scaling  # noqa: E402


def rgb(hex_colour):
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)


def test_grid_runs_from_the_decoder_to_the_encoder_on_a_log_scale():
    lqs = plot_scaling.lq_grid(8)
    assert lqs[0] == 300 and lqs[-1] == 22223 and len(lqs) == 8
    ratios = np.diff(np.log(lqs))
    assert np.allclose(ratios, ratios[0], rtol=0.01)
    with pytest.raises(ValueError):
        plot_scaling.lq_grid(1)


def test_lines_pass_through_their_measurements():
    lqs = [300, 3000, 30000]
    times = {("cydeform", "forward"): [1e-3, 1e-2, 1e-1], ("cydeform", "backward"): [1e-2, 3e-2, 3e-1],
             ("torch", "forward"): [5e-3, 1e-1, 1.0], ("torch", "backward"): [2e-2, 3e-1, 3.0]}
    fig = plot_scaling.render(lqs, times, "title")
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
    ax = fig.axes[0]
    for (impl, _), t in times.items():
        colour = rgb(plot_scaling.COLOURS[impl])
        for x, y in zip(lqs, t):
            dx, dy = ax.transData.transform((x, y * 1e3))
            r, c = int(round(fig.bbox.height - dy)), int(round(dx))
            patch = img[r - 1:r + 2, c - 1:c + 2]
            assert (np.abs(patch - colour).max(axis=-1) <= 3).any(), (impl, x)
    # Nothing of cydeform's colour above the torch backward line's top-left, where no data lies.
    dx, dy = ax.transData.transform((600, 1e4))
    r, c = int(round(fig.bbox.height - dy)), int(round(dx))
    window = img[r - 10:r + 10, c - 10:c + 10]
    assert not (np.abs(window - rgb(plot_scaling.COLOURS["cydeform"])).max(axis=-1) <= 3).any()


def test_cli_writes_the_figure(tmp_path, capsys):
    path = tmp_path / "scaling.png"
    lqs, times = bench_main.main(["--plot", str(path), "--repeat", "1", "--points", "2", "--min-lq", "5000",
                                  "--no-torch", "--threads", "1"])
    assert lqs == [5000, 22223]
    assert set(times) == {("cydeform", "forward"), ("cydeform", "backward")}
    assert all(t > 0 for v in times.values() for t in v)
    out = capsys.readouterr().out
    assert "1 thread, float32" in out and "| 22223 |" in out
    from matplotlib.image import imread

    img = imread(path)[..., :3] * 255
    assert (np.abs(img - rgb(plot_scaling.COLOURS["cydeform"])).max(axis=-1) <= 3).sum() > 50
