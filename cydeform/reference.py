"""Float64 NumPy oracle for multi-scale deformable attention, forward and backward.

Independent of the Cython and CUDA code: vectorised gathers over all queries at once
(the only Python loops run over levels and the four bilinear corners). Used by the
tests and the quick start as the ground truth; it is slow and memory hungry, so keep
problems small.

Convention (``grid_sample(2*loc - 1, bilinear, zeros, align_corners=False)`` per level)::

    x = loc_x * W_l - 0.5,  y = loc_y * H_l - 0.5    (texel centres at integers)
    s = sum over the 4 corners inside the map of  w_corner * V[corner]
    out[n, q, m*D:(m+1)*D] = sum_l sum_p A[n, q, m, l, p] * s_{l,p}

Non-finite semantics: a point whose location is NaN or +-inf makes the output row of
its (n, q, m) NaN; its own location and weight gradients are NaN and it adds nothing
to grad_value. A finite location far outside the map touches no texel: it adds
nothing to the output and has exactly zero location and weight gradients, whatever
its attention weight or grad_output (NaN or inf included). Elsewhere non-finite
weights, values and grad_output propagate by IEEE arithmetic.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ms_deform_attn_reference", "ms_deform_attn_backward_reference"]

_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (dy, dx)


def _levels(spatial_shapes):
    shapes = np.asarray(spatial_shapes, dtype=np.int64).reshape(-1, 2)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    return [(int(h), int(w), int(s)) for (h, w), s in zip(shapes, starts)]


def _sample_geometry(loc_l, H, W):
    """Corner indices and weights of level-l points.

    loc_l (N, Lq, M, P, 2) -> list over the 4 corners of (index, valid, weight), each
    (N, Lq, M, P), plus the fractional parts (lx, ly) and the finiteness mask.
    """
    finite = np.isfinite(loc_l).all(axis=-1)
    # Clamping keeps floor() well defined; points beyond [-1, W] touch nothing either way.
    x = np.clip(np.where(finite, loc_l[..., 0] * W - 0.5, -2.0), -2.0, W + 1.0)
    y = np.clip(np.where(finite, loc_l[..., 1] * H - 0.5, -2.0), -2.0, H + 1.0)
    x0 = np.floor(x)
    y0 = np.floor(y)
    lx, ly = x - x0, y - y0
    hx, hy = 1.0 - lx, 1.0 - ly
    x0 = x0.astype(np.int64)
    y0 = y0.astype(np.int64)
    weights = {(0, 0): hy * hx, (0, 1): hy * lx, (1, 0): ly * hx, (1, 1): ly * lx}
    corners = []
    for dy, dx in _CORNERS:
        yi, xi = y0 + dy, x0 + dx
        valid = (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W) & finite
        idx = np.where(valid, yi * W + xi, 0)
        corners.append((idx, valid, weights[(dy, dx)]))
    return corners, lx, ly, finite


def _gather(V, idx):
    """V (N, HW, M, D), idx (N, Lq, M, P) -> (N, Lq, M, P, D)."""
    N, _, M, _ = V.shape
    n = np.arange(N)[:, None, None, None]
    m = np.arange(M)[None, None, :, None]
    return V[n, idx, m]


def ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights):
    """Forward in float64. Shapes as :func:`cydeform.ms_deform_attn`; returns (N, Lq, M*D)."""
    del level_start_index  # derived from spatial_shapes
    value = np.asarray(value, dtype=np.float64)
    loc = np.asarray(sampling_locations, dtype=np.float64)
    A = np.asarray(attention_weights, dtype=np.float64)
    N, _, M, D = value.shape
    Lq = loc.shape[1]
    out = np.zeros((N, Lq, M, D))
    for l, (H, W, start) in enumerate(_levels(spatial_shapes)):
        V = value[:, start:start + H * W]
        corners, _, _, _ = _sample_geometry(loc[:, :, :, l], H, W)
        A_l = A[:, :, :, l]  # (N, Lq, M, P)
        for idx, valid, w in corners:
            contrib = (A_l * w)[..., None] * _gather(V, idx)
            out += np.where(valid[..., None], contrib, 0.0).sum(axis=3)
    bad_row = ~np.isfinite(loc).all(axis=(3, 4, 5))  # (N, Lq, M)
    out[bad_row] = np.nan
    return out.reshape(N, Lq, M * D)


def ms_deform_attn_backward_reference(grad_output, value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights):
    """Backward in float64: returns (grad_value, grad_sampling_locations, grad_attention_weights).

    dV[corner] += w_corner * A * g;  dA = sum_d g * s;
    dloc_x = W * A * sum_d g * (hy*(V01 - V00) + ly*(V11 - V10));
    dloc_y = H * A * sum_d g * (hx*(V10 - V00) + lx*(V11 - V01)).
    """
    del level_start_index
    value = np.asarray(value, dtype=np.float64)
    loc = np.asarray(sampling_locations, dtype=np.float64)
    A = np.asarray(attention_weights, dtype=np.float64)
    N, S, M, D = value.shape
    Lq, L, P = loc.shape[1], loc.shape[3], loc.shape[4]
    g = np.asarray(grad_output, dtype=np.float64).reshape(N, Lq, M, 1, D)  # broadcast over P
    grad_value = np.zeros_like(value)
    grad_loc = np.zeros_like(loc)
    grad_A = np.zeros_like(A)
    n_idx = np.broadcast_to(np.arange(N)[:, None, None, None], (N, Lq, M, P))
    m_idx = np.broadcast_to(np.arange(M)[None, None, :, None], (N, Lq, M, P))
    for l, (H, W, start) in enumerate(_levels(spatial_shapes)):
        V = value[:, start:start + H * W]
        corners, lx, ly, finite = _sample_geometry(loc[:, :, :, l], H, W)
        hx, hy = 1.0 - lx, 1.0 - ly
        A_l = A[:, :, :, l]
        vals = [np.where(valid[..., None], _gather(V, idx), 0.0) for idx, valid, _ in corners]
        V00, V01, V10, V11 = vals
        s = sum(w[..., None] * v for (_, _, w), v in zip(corners, vals))
        grad_A[:, :, :, l] = (g * s).sum(-1)
        gx = (g * (hy[..., None] * (V01 - V00) + ly[..., None] * (V11 - V10))).sum(-1)
        gy = (g * (hx[..., None] * (V10 - V00) + lx[..., None] * (V11 - V01))).sum(-1)
        grad_loc[:, :, :, l, :, 0] = W * A_l * gx
        grad_loc[:, :, :, l, :, 1] = H * A_l * gy
        for idx, valid, w in corners:
            contrib = (w * A_l)[..., None] * g  # (N, Lq, M, P, D)
            sel = valid
            np.add.at(grad_value, (n_idx[sel], start + idx[sel], m_idx[sel]), contrib[sel])
        # A point that touches no texel contributes a constant 0 (whatever its weight):
        # exactly zero gradients, even where A or grad_output is not finite.
        touches = np.any([valid for _, valid, _ in corners], axis=0)
        grad_A[:, :, :, l][~touches] = 0.0
        grad_loc[:, :, :, l][~touches] = 0.0
        nonfinite = ~finite
        grad_A[:, :, :, l][nonfinite] = np.nan
        grad_loc[:, :, :, l][nonfinite] = np.nan
    return grad_value, grad_loc, grad_A
