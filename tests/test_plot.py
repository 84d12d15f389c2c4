"""cydeform.plot: render with Agg and look at the pixels, not only at the file.

Each picture is read back as an RGBA array; a point's expected pixel comes from the
axes' own data-to-display transform, so the checks hold at any figure size or dpi.
"""
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from cydeform import plot  # noqa: E402
from cydeform.nn import MSDeformAttn, encoder_reference_points  # noqa: E402

H_IMG, W_IMG = 100, 200
SHAPES = np.array([[10, 20], [5, 10]], dtype=np.int64)  # L = 2


def rgb(hex_colour):
    return np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=float)


def render(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)


def pixel(fig, ax, x, y):
    """(row, col) of the buffer where data point (x, y) of ``ax`` lands."""
    dx, dy = ax.transData.transform((x, y))
    return int(round(fig.bbox.height - dy)), int(round(dx))


def colour_mask(img, hex_colour, tol=3.0):
    return (np.abs(img - rgb(hex_colour)) <= tol).all(axis=-1)


def near(mask, rc, radius):
    r, c = rc
    return mask[max(r - radius, 0):r + radius + 1, max(c - radius, 0):c + radius + 1]


def problem(M=3, P=2, weights=None):
    """One query; head m's point p on level l at a distinct, known place."""
    L = len(SHAPES)
    loc = np.empty((1, 1, M, L, P, 2))
    for m in range(M):
        for lvl in range(L):
            for p in range(P):
                loc[0, 0, m, lvl, p] = (0.1 + 0.25 * m + 0.1 * p, 0.2 + 0.5 * lvl + 0.1 * p)
    w = np.full((1, 1, M, L, P), 1.0 / (L * P)) if weights is None else weights
    ref = np.array([[[0.5, 0.5]]])  # (N, Lq, 2): the same point on every level
    return ref, loc, w


def draw(ref, loc, w, **kw):
    kw.setdefault("image_size", (H_IMG, W_IMG))
    kw.setdefault("legend", False)
    return plot.sampling_points(kw.pop("image", None), ref, loc, w, SHAPES, **kw)


def test_head_colours_appear_at_their_points_and_nowhere_else():
    ref, loc, w = problem()
    fig, axes = draw(ref, loc, w)
    assert len(axes) == len(SHAPES)
    img = render(fig)
    M, L, P = loc.shape[2:5]
    for m, colour in enumerate(plot.head_colours(M)):
        mask = colour_mask(img, colour)
        expected = np.zeros_like(mask)
        for lvl, ax in enumerate(axes):
            for p in range(P):
                x, y = loc[0, 0, m, lvl, p]
                rc = pixel(fig, ax, x * W_IMG, y * H_IMG)
                assert near(mask, rc, 1).all(), f"head {m} level {lvl} point {p}: colour missing at {rc}"
                r, c = rc
                expected[max(r - 8, 0):r + 9, max(c - 8, 0):c + 9] = True  # marker radius ~4.4 px
        assert mask.sum() > 0
        assert not (mask & ~expected).any(), f"head {m}'s colour appears away from its points"


def test_reference_point_marked_in_every_panel():
    ref, loc, w = problem()
    ref4 = np.array([[[[0.3, 0.8], [0.9, 0.1]]]])  # (N, Lq, L, 2): a different point per level
    fig, axes = draw(ref4, loc, w)
    img = render(fig)
    black = colour_mask(img, plot.REFERENCE_COLOUR, tol=10)
    for lvl, ax in enumerate(axes):
        x, y = ref4[0, 0, lvl]
        assert near(black, pixel(fig, ax, x * W_IMG, y * H_IMG), 1).all()
        ox, oy = ref4[0, 0, 1 - lvl]  # the other level's reference is not drawn here
        assert not near(black, pixel(fig, ax, ox * W_IMG, oy * H_IMG), 3).any()


def test_zero_weight_invisible_and_size_grows_with_weight():
    ref, loc, w = problem(M=1, P=2)
    w[0, 0, 0, 0] = (0.0, 1.0)  # level 0: point 0 weightless, point 1 full
    w[0, 0, 0, 1] = (0.25, 1.0)  # level 1: quarter weight -> quarter area
    fig, axes = draw(ref, loc, w, encode="size")
    mask = colour_mask(render(fig), plot.head_colours(1)[0])

    def area(lvl, p):
        x, y = loc[0, 0, 0, lvl, p]
        return near(mask, pixel(fig, axes[lvl], x * W_IMG, y * H_IMG), 10).sum()

    assert area(0, 0) == 0
    assert area(0, 1) > 20
    assert area(1, 0) > 0
    assert 2.5 < area(1, 1) / area(1, 0) < 6  # area scales with the weight (4x, give or take edge pixels)


def test_opacity_encodes_weight():
    ref, loc, w = problem(M=1, P=2)
    w[...] = 1.0
    w[0, 0, 0, 0, 0] = 0.5
    fig, axes = draw(ref, loc, w, encode="alpha")
    img = render(fig)
    colour = rgb(plot.head_colours(1)[0])
    x, y = loc[0, 0, 0, 0, 0]
    r, c = pixel(fig, axes[0], x * W_IMG, y * H_IMG)
    half = 0.5 * colour + 0.5 * 255  # blended with the white canvas
    assert np.abs(img[r, c] - half).max() <= 3
    x, y = loc[0, 0, 0, 0, 1]
    r, c = pixel(fig, axes[0], x * W_IMG, y * H_IMG)
    assert np.abs(img[r, c] - colour).max() <= 3


def test_image_is_drawn_with_y_down_and_normalised_coordinates():
    # Quadrants of distinct colours: top-left red, top-right green, bottom-left blue, bottom-right yellow.
    image = np.zeros((H_IMG, W_IMG, 3))
    image[:H_IMG // 2, :W_IMG // 2] = (1, 0, 0)
    image[:H_IMG // 2, W_IMG // 2:] = (0, 1, 0)
    image[H_IMG // 2:, :W_IMG // 2] = (0, 0, 1)
    image[H_IMG // 2:, W_IMG // 2:] = (1, 1, 0)
    ref = np.array([[[0.02, 0.02]]])
    loc = np.full((1, 1, 1, 2, 1, 2), 0.98)  # bottom-right corner
    w = np.ones((1, 1, 1, 2, 1))
    fig, axes = plot.sampling_points(image, ref, loc, w, SHAPES, legend=False)
    img = render(fig)
    for (x, y), expected in (((0.25, 0.25), "#ff0000"), ((0.75, 0.25), "#00ff00"),
                             ((0.25, 0.75), "#0000ff"), ((0.75, 0.75), "#ffff00")):
        r, c = pixel(fig, axes[0], x * W_IMG, y * H_IMG)
        assert np.abs(img[r, c] - rgb(expected)).max() <= 3, (x, y)
    head = colour_mask(img, plot.head_colours(1)[0])
    assert near(head, pixel(fig, axes[0], 0.98 * W_IMG, 0.98 * H_IMG), 1).all()
    # On screen, independent of the axes' transform: red fills the panel's top-left
    # quadrant (image row 0 at the top, as the image is seen), yellow its bottom-right.
    box = axes[0].get_window_extent()
    top = fig.bbox.height - box.y1
    for fx, fy, expected in ((0.25, 0.25, "#ff0000"), (0.75, 0.75, "#ffff00")):
        r, c = int(top + fy * box.height), int(box.x0 + fx * box.width)
        assert np.abs(img[r, c] - rgb(expected)).max() <= 3, (fx, fy)


def test_single_layout_draws_every_level_in_one_panel():
    ref, loc, w = problem()
    fig, axes = draw(ref, loc, w, layout="single")
    assert len(axes) == 1
    img = render(fig)
    for m, colour in enumerate(plot.head_colours(loc.shape[2])):
        mask = colour_mask(img, colour)
        for lvl in range(len(SHAPES)):
            x, y = loc[0, 0, m, lvl, 0]
            assert near(mask, pixel(fig, axes[0], x * W_IMG, y * H_IMG), 1).all(), (m, lvl)


def test_chosen_queries_only():
    ref, loc, w = problem(M=1, P=1)
    loc = np.concatenate([loc, loc + 0.3], axis=1)  # two queries
    w = np.concatenate([w, w], axis=1)
    ref = np.concatenate([ref, ref + 0.3], axis=1)
    fig, axes = draw(ref, loc, w, queries=[1])
    mask = colour_mask(render(fig), plot.head_colours(1)[0])
    x0, y0 = loc[0, 0, 0, 0, 0]
    x1, y1 = loc[0, 1, 0, 0, 0]
    assert not near(mask, pixel(fig, axes[0], x0 * W_IMG, y0 * H_IMG), 3).any()
    assert near(mask, pixel(fig, axes[0], x1 * W_IMG, y1 * H_IMG), 1).all()


def test_fit_points_shows_locations_outside_the_image():
    ref, loc, w = problem(M=1, P=1)
    loc[0, 0, 0, :, 0] = (1.4, 0.5)  # right of the image: normal for coarse levels
    colour = plot.head_colours(1)[0]
    fig, axes = draw(ref, loc, w, fit="image")
    assert not colour_mask(render(fig), colour).any()
    fig, axes = draw(ref, loc, w, fit="points")
    mask = colour_mask(render(fig), colour)
    assert near(mask, pixel(fig, axes[0], 1.4 * W_IMG, 0.5 * H_IMG), 1).all()


def test_draws_into_given_axes_and_legend_lists_heads():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3))
    FigureCanvasAgg(fig)
    given = list(fig.subplots(1, 2))
    ref, loc, w = problem()
    out_fig, axes = plot.sampling_points(None, ref, loc, w, SHAPES, axes=given, legend=True)
    assert out_fig is fig and axes == given
    labels = [t.get_text() for t in given[-1].get_legend().get_texts()]
    assert labels == ["head 0", "head 1", "head 2", "reference"]
    with pytest.raises(ValueError, match="needs 2 axes"):
        plot.sampling_points(None, ref, loc, w, SHAPES, axes=given[0])


def test_own_figure_saves_a_png(tmp_path):
    ref, loc, w = problem()
    fig, _ = draw(ref, loc, w, legend=True, title="t")
    path = tmp_path / "p.png"
    fig.savefig(path)
    from matplotlib.image import imread

    img = imread(path)[..., :3] * 255
    assert colour_mask(img, plot.head_colours(3)[2]).any()


def test_paper_initialisation_draws_rays():
    """The untrained layer: head m's points lie on ray m at 1..P level pixels from the reference."""
    M, L, P = 4, 2, 3
    layer = MSDeformAttn(d_model=16, n_levels=L, n_heads=M, n_points=P, dtype="float64", seed=0)
    ref = encoder_reference_points(SHAPES, dtype="float64")
    query = np.random.default_rng(0).normal(size=(1, ref.shape[1], 16))
    q = 4 * 20 + 10  # level-0 pixel (4, 10)
    loc, w = layer.sampling_points(query, ref, SHAPES)
    fig, axes = plot.sampling_points(None, ref, loc, w, SHAPES, queries=q, image_size=(H_IMG, W_IMG),
                                     fit="points", legend=False)
    img = render(fig)
    rays = [(1, 0), (0, 1), (-1, 0), (0, -1)]  # theta = 0, 90, 180, 270 degrees, y down
    for m, colour in enumerate(plot.head_colours(M)):
        mask = colour_mask(img, colour)
        for lvl, (Hl, Wl) in enumerate(SHAPES):
            for p in range(P):
                x = ref[0, q, lvl, 0] * W_IMG + rays[m][0] * (p + 1) * W_IMG / Wl
                y = ref[0, q, lvl, 1] * H_IMG + rays[m][1] * (p + 1) * H_IMG / Hl
                assert near(mask, pixel(fig, axes[lvl], x, y), 1).all(), (m, lvl, p)


@pytest.mark.parametrize("change, error, match", [
    (dict(loc=np.zeros((1, 1, 3, 2, 2))), ValueError, r"sampling_locations must have shape \(N, Lq, M, L, P, 2\)"),
    (dict(w=np.zeros((1, 1, 3, 2, 3))), ValueError, "attention_weights must have shape"),
    (dict(shapes=np.array([[10, 20]])), ValueError, r"spatial_shapes must be positive integers of shape \(L, 2\)"),
    (dict(shapes=np.array([[10.0, 20.0], [5.0, 10.0]])), ValueError, "spatial_shapes"),
    (dict(ref=np.zeros((1, 2, 2))), ValueError, "reference_points must have shape"),
    (dict(ref=np.zeros((1, 1, 3, 2))), ValueError, "reference_points must have shape"),
    (dict(loc="abc"), TypeError, "sampling_locations must hold real numbers"),
    (dict(queries=1), IndexError, r"queries 1 is out of range: the query axis Lq has 1 entries"),
    (dict(queries=-1), IndexError, "queries -1 is out of range"),
    (dict(queries=[0.5]), TypeError, "queries must be integers"),
    (dict(queries=[]), ValueError, "at least one"),
    (dict(batch=1), IndexError, "batch 1 is out of range"),
    (dict(layout="grid"), ValueError, "layout must be one of"),
    (dict(encode="colour"), ValueError, "encode must be one of"),
    (dict(fit="all"), ValueError, "fit must be one of"),
    (dict(image=np.zeros((4, 5, 2))), ValueError, r"image must have shape \(H, W\)"),
    (dict(image=np.zeros((4, 5)), image_size=(5, 4)), ValueError, "disagrees"),
    (dict(image_size=(0, 4)), ValueError, "image_size"),
    (dict(weight_max=0.0), ValueError, "weight_max must be > 0"),
    (dict(marker_size=-1.0), ValueError, "marker_size must be > 0"),
])
def test_errors(change, error, match):
    ref, loc, w = problem()
    args = dict(image=None, ref=ref, loc=loc, w=w, shapes=SHAPES)
    kw = {k: v for k, v in change.items() if k not in args}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(error, match=match):
        plot.sampling_points(args["image"], args["ref"], args["loc"], args["w"], args["shapes"], **kw)


def test_missing_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    ref, loc, w = problem()
    with pytest.raises(ImportError, match=r"pip install 'cydeform\[plot\]'"):
        plot.sampling_points(None, ref, loc, w, SHAPES)


def test_import_cydeform_does_not_import_matplotlib():
    code = ("import sys, cydeform, cydeform.nn, cydeform.plot; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_fixed_weight_max_shrinks_markers_across_figures():
    ref, loc, w = problem(M=1, P=1)
    colour = plot.head_colours(1)[0]

    def area(**kw):
        fig, axes = draw(ref, loc, w, **kw)
        mask = colour_mask(render(fig), colour)
        x, y = loc[0, 0, 0, 0, 0]
        return near(mask, pixel(fig, axes[0], x * W_IMG, y * H_IMG), 10).sum()

    full, quarter = area(), area(weight_max=4 * float(w.max()))
    assert full > 20 and 2.5 < full / quarter < 6
