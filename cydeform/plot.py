"""Pictures of where multi-scale deformable attention looks.

Needs matplotlib (``pip install 'cydeform[plot]'``). ``import cydeform`` never imports
this module, and this module imports matplotlib only when a function is called, so
the rest of the package works without it.

Everything here uses matplotlib's object-oriented API (``Figure`` with an Agg canvas,
or the axes you pass in); nothing touches pyplot's global state, so it is safe in
scripts, servers and tests. Show a returned figure in a notebook by evaluating it, or
save it with ``fig.savefig(path)``.

Coordinates: a normalised location (x, y), as :func:`cydeform.ms_deform_attn` takes
it, is drawn at pixel (x * W_img, y * H_img) of the image, with the origin at the
image's top-left corner and y pointing down (matplotlib's ``imshow`` convention with
``extent=(0, W_img, H_img, 0)``). Because the convention is align_corners=False, pixel
(i, j) of level l covers [j W_img / W_l, (j + 1) W_img / W_l) in x on the image.
"""
from __future__ import annotations

import colorsys

import numpy as np

from . import _validate

__all__ = ["sampling_points", "head_colours", "HEAD_COLOURS", "REFERENCE_COLOUR", "LEVEL_MARKERS"]

#: Head m is drawn in ``HEAD_COLOURS[m]`` (more heads: see :func:`head_colours`).
#: Saturated, mutually distinct, none of them black, white or grey, so a head's
#: points stay findable over a photograph and in tests.
HEAD_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4",
                "#f032e6", "#bfef45", "#469990", "#9a6324", "#800000", "#000075")
#: Face colour of the reference-point marker (a filled "X" with a white edge).
REFERENCE_COLOUR = "#000000"
#: Marker of level l when all levels share one panel (``layout="single"``).
LEVEL_MARKERS = ("o", "s", "^", "D", "v", "P", "p", "h", "*", "<", ">", "8")

_INSTALL_HINT = "cydeform.plot needs matplotlib: pip install 'cydeform[plot]'"
_LAYOUTS = ("levels", "single")
_ENCODINGS = ("size", "alpha", "both")
_FITS = ("image", "points")


def _matplotlib():
    """(Figure, FigureCanvasAgg, Line2D, Rectangle), or ImportError with the install hint."""
    try:
        import matplotlib  # noqa: F401 (imported first so a missing package fails here)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from matplotlib.patches import Rectangle
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return Figure, FigureCanvasAgg, Line2D, Rectangle


def head_colours(n_heads):
    """Hex colours of heads 0 .. n_heads - 1, always the same for the same head.

    The first 12 are :data:`HEAD_COLOURS`; further heads get hues spaced by the golden
    angle (deterministic, distinct from the palette's neighbours).
    """
    colours = list(HEAD_COLOURS[:n_heads])
    for m in range(len(HEAD_COLOURS), n_heads):
        r, g, b = colorsys.hsv_to_rgb((0.11 + 0.618034 * m) % 1.0, 0.85, 0.85)
        colours.append(f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}")
    return colours


# --------------------------------------------------------------------------- checks

def _host_real(name, arr, layout):
    """``arr`` as a NumPy array of real numbers (CuPy arrays are copied to the host)."""
    if _validate._is_cupy(arr):
        arr = arr.get()
    try:
        out = np.asarray(arr)
    except Exception:
        raise TypeError(f"{name} must be an array {layout}; got {type(arr).__name__}") from None
    if out.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers {layout}; got dtype {out.dtype}")
    return out


def _index_list(name, value, size, axis):
    """``value`` (int, sequence of ints or None = all) as a list of indices in [0, size)."""
    if value is None:
        return list(range(size))
    items = [value] if np.ndim(value) == 0 else list(np.asarray(value).ravel())
    if not items:
        raise ValueError(f"{name} must name at least one index")
    out = []
    for v in items:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be integers; got {v!r}")
        if not 0 <= v < size:
            raise IndexError(f"{name} {int(v)} is out of range: {axis} has {size} entries (0 .. {size - 1})")
        out.append(int(v))
    return out


def _check_inputs(image, image_size, reference_points, sampling_locations, attention_weights, spatial_shapes):
    loc = _host_real("sampling_locations", sampling_locations, "(N, Lq, M, L, P, 2)")
    if loc.ndim != 6 or loc.shape[-1] != 2:
        raise ValueError(f"sampling_locations must have shape (N, Lq, M, L, P, 2); got {loc.shape}")
    N, Lq, M, L, P, _ = loc.shape
    weights = _host_real("attention_weights", attention_weights, "(N, Lq, M, L, P)")
    if weights.shape != loc.shape[:-1]:
        raise ValueError(f"attention_weights must have shape (N, Lq, M, L, P) = {loc.shape[:-1]} to match "
                         f"sampling_locations; got {weights.shape}")
    shapes = _host_real("spatial_shapes", spatial_shapes, "(L, 2)")
    if shapes.shape != (L, 2) or shapes.dtype.kind not in "iu" or (shapes <= 0).any():
        raise ValueError(f"spatial_shapes must be positive integers of shape (L, 2) = ({L}, 2), rows (H_l, W_l); "
                         f"got {shapes.tolist() if shapes.ndim else shapes}")
    ref = _host_real("reference_points", reference_points, "(N or 1, Lq, [L,] 2 or 4)")
    if ref.ndim == 3:  # one point for every level
        ref = ref[:, :, None, :]
    if (ref.ndim != 4 or ref.shape[0] not in (1, N) or ref.shape[1] != Lq or ref.shape[2] not in (1, L)
            or ref.shape[3] not in (2, 4)):
        raise ValueError(f"reference_points must have shape (N or 1, Lq, L, 2 or 4) or (N or 1, Lq, 2 or 4) with "
                         f"N = {N}, Lq = {Lq}, L = {L}; got {np.shape(reference_points)}")
    if image is None:
        if image_size is None:
            image_size = tuple(int(v) for v in shapes[0])  # the finest level, one unit per pixel
        if len(image_size) != 2 or any(int(v) <= 0 for v in image_size):
            raise ValueError(f"image_size must be (H_img, W_img) with positive entries; got {image_size!r}")
        H_img, W_img = (int(v) for v in image_size)
    else:
        image = _host_real("image", image, "(H, W), (H, W, 3) or (H, W, 4)")
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))) or 0 in image.shape:
            raise ValueError(f"image must have shape (H, W), (H, W, 3) or (H, W, 4); got {image.shape}")
        if image_size is not None and tuple(image_size) != image.shape[:2]:
            raise ValueError(f"image_size {tuple(image_size)} disagrees with the image's (H, W) {image.shape[:2]}")
        H_img, W_img = image.shape[:2]
    return image, H_img, W_img, ref, loc, weights, shapes


# --------------------------------------------------------------------------- drawing

def sampling_points(image, reference_points, sampling_locations, attention_weights, spatial_shapes, *,
                    queries=None, batch=0, layout="levels", encode="size", weight_max=None, marker_size=60.0,
                    image_size=None, fit="image", level_grid=False, legend=True, title=None, axes=None,
                    panel_width=4.0, dpi=100):
    """Draw every head's sampling points of chosen queries over the image.

    One colour per head (:func:`head_colours`), marker area and/or opacity by attention
    weight, the reference point as a black "X" with a white edge. The figure people
    draw to see what a (trained or freshly initialised) Deformable DETR layer attends to.

    Parameters
    ----------
    image : array (H_img, W_img), (H_img, W_img, 3), (H_img, W_img, 4) or None
        Drawn under the points with ``imshow`` (2-D: grey colour map spanning the image's
        minimum to maximum; RGB(A): floats in [0, 1] or uint8). None draws a white canvas
        of ``image_size``.
    reference_points : array (N or 1, Lq, L, 2 or 4) or (N or 1, Lq, 2 or 4)
        Normalised (x, y) per query (and level), as :meth:`cydeform.nn.MSDeformAttn.forward`
        takes them; of boxes (cx, cy, w, h) the centre is marked. Per-level points are
        marked in their level's panel (with ``layout="single"``: each level's).
    sampling_locations : array (N, Lq, M, L, P, 2)
        Normalised (x, y), as :func:`cydeform.ms_deform_attn` takes them (e.g. from
        :meth:`cydeform.nn.MSDeformAttn.sampling_points`). Non-finite points are not drawn.
    attention_weights : array (N, Lq, M, L, P)
    spatial_shapes : integer array (L, 2)
        Rows (H_l, W_l); used for the panel titles, ``level_grid`` and the checks.
    queries : int, sequence of int or None, keyword-only
        Indices into Lq to draw (None: all of them; an encoder has thousands).
    batch : int, keyword-only
        Index into N of the image to draw.
    layout : {"levels", "single"}, keyword-only
        "levels": one panel per level, left to right (each level's points on the same
        image, so its reach is comparable); "single": one panel, level l drawn with
        marker ``LEVEL_MARKERS[l]``.
    encode : {"size", "alpha", "both"}, keyword-only
        How a weight w is shown, with f = clip(w / weight_max, 0, 1): marker area
        ``marker_size * f`` (points^2), opacity f, or both. A zero weight is invisible.
    weight_max : float or None, keyword-only
        The weight drawn full size / opaque; None: the largest drawn weight. Fix it to
        compare figures.
    marker_size : float, keyword-only
        Marker area in points^2 at f = 1.
    image_size : (H_img, W_img) or None, keyword-only
        Canvas size when ``image`` is None (default: the finest level's (H_0, W_0)).
    fit : {"image", "points"}, keyword-only
        Axis limits: the image (points outside it are cut off), or the image and every
        drawn point (locations outside [0, 1] are normal; coarse levels reach far). The
        image's outline is drawn in grey.
    level_grid : bool, keyword-only
        Draw the level's pixel boundaries faintly (``layout="levels"`` only).
    legend : bool, keyword-only
        A legend of heads (and level markers). Placed under the panels when this function
        made the figure, to the right of the last axes otherwise.
    title : str or None, keyword-only
        Figure title.
    axes : matplotlib Axes or sequence of Axes, keyword-only
        Draw into these instead of a new figure: L axes for ``layout="levels"``, one for
        ``"single"``.
    panel_width, dpi : float, keyword-only
        Size of a new figure: inches per panel, dots per inch.

    Returns
    -------
    (matplotlib.figure.Figure, list of Axes)
        A new figure has an Agg canvas attached: ``fig.savefig(path)`` or
        ``fig.canvas.draw(); numpy.asarray(fig.canvas.buffer_rgba())`` work directly.

    Raises
    ------
    ImportError
        matplotlib is not installed.
    TypeError, ValueError, IndexError
        Mis-shaped or non-numeric inputs, a query or batch index out of range, an
        unknown option, or the wrong number of axes.
    """
    Figure, FigureCanvasAgg, Line2D, Rectangle = _matplotlib()
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}; got {layout!r}")
    if encode not in _ENCODINGS:
        raise ValueError(f"encode must be one of {_ENCODINGS}; got {encode!r}")
    if fit not in _FITS:
        raise ValueError(f"fit must be one of {_FITS}; got {fit!r}")
    if not marker_size > 0:
        raise ValueError(f"marker_size must be > 0; got {marker_size!r}")
    if weight_max is not None and not weight_max > 0:
        raise ValueError(f"weight_max must be > 0 or None; got {weight_max!r}")
    image, H_img, W_img, ref, loc, weights, shapes = _check_inputs(
        image, image_size, reference_points, sampling_locations, attention_weights, spatial_shapes)
    N, Lq, M, L, P, _ = loc.shape
    (b,) = _index_list("batch", batch, N, "the batch axis N")
    qs = _index_list("queries", queries, Lq, "the query axis Lq")
    n_panels = L if layout == "levels" else 1

    if axes is None:
        # A figure of our own: size panels to the image's aspect, leave room for the legend.
        height = panel_width * H_img / W_img + 0.6
        rows = 0 if not legend else -(-(M + 1 + (L if layout == "single" and L > 1 else 0))
                                      // max(1, int(panel_width * n_panels / 0.95)))
        fig = Figure(figsize=(panel_width * n_panels, height + 0.25 * rows), dpi=dpi,
                     layout="constrained")
        FigureCanvasAgg(fig)
        axes = list(fig.subplots(1, n_panels, squeeze=False)[0])
        own_figure = True
    else:
        axes = [axes] if hasattr(axes, "scatter") else list(axes)
        if len(axes) != n_panels:
            raise ValueError(f"layout={layout!r} with L = {L} levels needs {n_panels} axes; got {len(axes)}")
        fig = axes[0].figure
        own_figure = False

    loc = loc[b][qs].astype(np.float64)            # (Q, M, L, P, 2)
    w = weights[b][qs].astype(np.float64)           # (Q, M, L, P)
    ref = ref[0 if ref.shape[0] == 1 else b][qs]    # (Q, 1 or L, 2 or 4)
    ref = np.broadcast_to(ref[..., :2], (len(qs), L, 2)).astype(np.float64)
    top = np.nanmax(w) if weight_max is None else float(weight_max)
    frac = np.clip(w / top, 0.0, 1.0) if top > 0 else np.zeros_like(w)
    frac = np.nan_to_num(frac, nan=0.0)
    px = loc * np.array([W_img, H_img], dtype=np.float64)   # normalised (x, y) -> image pixels
    ref_px = ref * np.array([W_img, H_img], dtype=np.float64)
    colours = head_colours(M)

    def rgba(hex_colour, alpha):
        r, g, bl = (int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))
        out = np.empty((alpha.size, 4))
        out[:, :3] = (r, g, bl)
        out[:, 3] = alpha
        return out

    for k, ax in enumerate(axes):
        levels = [k] if layout == "levels" else list(range(L))
        _draw_background(ax, image, H_img, W_img, fit, Rectangle)
        if layout == "levels" and level_grid:
            Hl, Wl = (int(v) for v in shapes[k])
            ax.vlines(np.arange(1, Wl) * W_img / Wl, 0, H_img, colors="0.6", linewidths=0.3, zorder=1)
            ax.hlines(np.arange(1, Hl) * H_img / Hl, 0, W_img, colors="0.6", linewidths=0.3, zorder=1)
        drawn = [np.array([[0.0, 0.0], [W_img, H_img]])]
        for lvl in levels:
            marker = "o" if layout == "levels" else LEVEL_MARKERS[lvl % len(LEVEL_MARKERS)]
            for m in range(M):
                f = frac[:, m, lvl, :].ravel()
                xy = px[:, m, lvl, :, :].reshape(-1, 2)
                keep = (f > 0) & np.isfinite(xy).all(axis=1)  # zero weight: nothing to draw
                if not keep.any():
                    continue
                f, xy = f[keep], xy[keep]
                size = marker_size * (f if encode in ("size", "both") else np.ones_like(f))
                alpha = f if encode in ("alpha", "both") else np.ones_like(f)
                # No edge: the face is the head's exact colour (tests look for it).
                ax.scatter(xy[:, 0], xy[:, 1], s=size, c=rgba(colours[m], alpha), marker=marker,
                           edgecolors="none", linewidths=0, zorder=3)
                drawn.append(xy)
            r = ref_px[:, lvl, :]
            r = r[np.isfinite(r).all(axis=1)]
            ax.scatter(r[:, 0], r[:, 1], s=110, c=REFERENCE_COLOUR, marker="X", edgecolors="white",
                       linewidths=1.0, zorder=4)
            drawn.append(r)
        _set_limits(ax, H_img, W_img, fit, np.concatenate(drawn))
        if layout == "levels":
            Hl, Wl = (int(v) for v in shapes[k])
            ax.set_title(f"level {k}: {Hl}\u00d7{Wl}", fontsize=9)
        else:
            ax.set_title(f"levels 0\u2013{L - 1}" if L > 1 else "level 0", fontsize=9)
        ax.tick_params(labelsize=7)

    if legend:
        handles = [Line2D([], [], linestyle="none", marker="o", markersize=7, markerfacecolor=c,
                          markeredgecolor="none", label=f"head {m}") for m, c in enumerate(colours)]
        handles.append(Line2D([], [], linestyle="none", marker="X", markersize=8, markerfacecolor=REFERENCE_COLOUR,
                              markeredgecolor="white", label="reference"))
        if layout == "single" and L > 1:
            handles += [Line2D([], [], linestyle="none", marker=LEVEL_MARKERS[lvl % len(LEVEL_MARKERS)],
                               markersize=7, markerfacecolor="0.5", markeredgecolor="none", label=f"level {lvl}")
                        for lvl in range(L)]
        if own_figure:
            # About one legend entry per inch of figure width; more rows when narrow.
            per_row = max(1, min(len(handles), int(fig.get_figwidth() / 0.95)))
            fig.legend(handles=handles, loc="outside lower center", ncols=per_row, fontsize=8, frameon=False)
        else:
            axes[-1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if title is not None:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def _draw_background(ax, image, H_img, W_img, fit, Rectangle):
    if image is None:
        ax.add_patch(Rectangle((0, 0), W_img, H_img, facecolor="white", edgecolor="none", zorder=0))
    else:
        cmap = "gray" if image.ndim == 2 else None
        ax.imshow(image, extent=(0, W_img, H_img, 0), origin="upper", cmap=cmap, interpolation="nearest",
                  zorder=0)
    if fit == "points":
        ax.set_facecolor("0.92")  # outside the image
        ax.add_patch(Rectangle((0, 0), W_img, H_img, facecolor="none", edgecolor="0.5", linewidth=0.8, zorder=2))


def _set_limits(ax, H_img, W_img, fit, xy):
    if fit == "image":
        x0, x1, y0, y1 = 0.0, float(W_img), 0.0, float(H_img)
    else:
        x0, y0 = xy.min(axis=0)
        x1, y1 = xy.max(axis=0)
        pad = 0.04 * max(x1 - x0, y1 - y0)  # markers at the edge stay whole
        x0, x1, y0, y1 = x0 - pad, x1 + pad, y0 - pad, y1 + pad
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)  # y points down, as in the image
    ax.set_aspect("equal")
