"""Property-test your own MSDA implementation with cydeform.testing.

A hand-written NumPy forward with one classic slip, align_corners=True
(x = loc_x * (W - 1) instead of loc_x * W - 0.5), is run through
``check_implementation``: the kit names the properties it breaks and the worst
element. cydeform's own CPU backend then passes the same checks. Exits non-zero
if the slip goes unnoticed or the CPU backend fails.
"""
import sys

import numpy as np

import cydeform
from cydeform.testing import check_implementation


def my_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
               align_corners=True):
    """value (N, S, M, D), sampling_locations (N, Lq, M, L, P, 2) -> (N, Lq, M*D)."""
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    out = np.zeros((N, Lq, M, D), value.dtype)
    n = np.arange(N)[:, None, None, None]
    m = np.arange(M)[None, None, :, None]
    for l, ((H, W), start) in enumerate(zip(spatial_shapes, level_start_index)):
        loc = sampling_locations[:, :, :, l]  # (N, Lq, M, P, 2)
        if align_corners:  # the slip: corners of the map at loc = 0 and 1
            x, y = loc[..., 0] * (W - 1), loc[..., 1] * (H - 1)
        else:
            x, y = loc[..., 0] * W - 0.5, loc[..., 1] * H - 0.5
        x0, y0 = np.floor(x), np.floor(y)
        for dy in (0, 1):
            for dx in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                w = (1 - np.abs(x - xi)) * (1 - np.abs(y - yi)) * attention_weights[:, :, :, l]
                inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
                idx = np.where(inside, yi * W + xi, 0).astype(np.int64) + start
                sample = value[n, idx, m]  # (N, Lq, M, P, D)
                out += (np.where(inside, w, 0)[..., None] * sample).sum(axis=3).astype(value.dtype)
    rows_bad = ~np.isfinite(sampling_locations).all(axis=(3, 4, 5))
    out[rows_bad] = np.nan
    return out.reshape(N, Lq, M * D)


def main():
    print("my_forward (align_corners=True):")
    wrong = check_implementation(my_forward, dtypes=(np.float64,), max_examples=20)
    caught = [name for (name, _), verdict in wrong.items() if verdict is not None]

    print("my_forward (align_corners=False):")
    fixed = check_implementation(lambda *a: my_forward(*a, align_corners=False), dtypes=(np.float64,),
                                 max_examples=20)

    print("cydeform CPU backend:")
    ours = check_implementation(cydeform.ms_deform_attn, cydeform.ms_deform_attn_backward,
                                dtypes=(np.float32, np.float64), max_examples=20)

    ok = bool(caught) and all(v is None for v in fixed.values()) and all(v is None for v in ours.values())
    print(f"align_corners=True caught by: {', '.join(caught) or 'nothing'}")
    print("test_your_implementation: " + ("all checks behaved as expected" if ok else "UNEXPECTED RESULT"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
