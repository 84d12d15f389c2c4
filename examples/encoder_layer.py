"""One Deformable DETR encoder layer over a 4-level pyramid, forward and backward.

Two images are batched on one canvas; the second is smaller, so its feature maps are
padded. The layer follows Deformable DETR's encoder:

    query  = src + pos + level_embed[l]        (every pixel of every level is a query)
    x      = norm1(src + MSDeformAttn(query, reference points, src, padding mask))
    out    = norm2(x + linear2(relu(linear1(x))))

with reference points at the pixel centres scaled by the images' valid ratios. The
backward pass runs by hand through every piece. Checks: the gradient agrees with a
finite-difference directional derivative (all parameters, the level embedding and the
backbone features at once), and padded pixels influence neither the valid outputs
nor, through the gradient, anything at all.
"""
import sys

import numpy as np

from cydeform.nn import Linear, MSDeformAttn, encoder_reference_points, flatten_levels

N, C, M, L, P, FFN = 2, 32, 4, 4, 4, 64
SIZES = [(24, 32), (12, 16), (6, 8), (3, 4)]  # (H_l, W_l), strides 8 .. 64 of a 192x256 canvas
VALID = [(1.0, 1.0), (0.75, 2 / 3)]  # (x, y) fraction of the canvas each image fills
rng = np.random.default_rng(0)


def sine_position(mask, C, temperature=10000.0):
    """DETR's normalised sine embedding: mask (N, H, W) -> (N, C, H, W)."""
    not_mask = ~mask
    y = not_mask.cumsum(axis=1, dtype=np.float64)
    x = not_mask.cumsum(axis=2, dtype=np.float64)
    y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * 2 * np.pi
    x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * 2 * np.pi
    freq = temperature ** (2 * (np.arange(C // 2) // 2) / (C // 2))
    parts = []
    for t in (y, x):
        t = t[..., None] / freq  # (N, H, W, C/2)
        parts.append(np.stack([np.sin(t[..., 0::2]), np.cos(t[..., 1::2])], axis=-1).reshape(*t.shape))
    return np.concatenate(parts, axis=-1).transpose(0, 3, 1, 2)


def layer_norm(x):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    inv = 1.0 / np.sqrt(var + 1e-5)
    return (x - mu) * inv, inv


def layer_norm_backward(g, y, inv):
    """Gradient through y = (x - mean) / std along the last axis."""
    return inv * (g - g.mean(-1, keepdims=True) - y * (g * y).mean(-1, keepdims=True))


# ----------------------------------------------------------------------------- inputs
feats, masks = [], []
for H, W in SIZES:
    mask = np.zeros((N, H, W), bool)
    for n, (vx, vy) in enumerate(VALID):
        mask[n, round(vy * H):, :] = True
        mask[n, :, round(vx * W):] = True
    feats.append(rng.normal(size=(N, C, H, W)))  # stand-in for backbone features
    masks.append(mask)
src, shapes, starts = flatten_levels(feats)  # (N, S, C)
pos, _, _ = flatten_levels([sine_position(m, C) for m in masks])
mask_flatten = np.concatenate([m.reshape(N, -1) for m in masks], axis=1)  # (N, S), True = padding
# Deformable DETR's get_valid_ratio: valid width / W, valid height / H per image and level.
valid_ratios = np.stack([np.stack([(~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]], -1)
                         for m in masks], axis=1)  # (N, L, 2)
reference_points = encoder_reference_points(shapes, valid_ratios)  # (N, S, L, 2)
level_of = np.repeat(np.arange(L), shapes[:, 0] * shapes[:, 1])  # (S,)
S = src.shape[1]

# ----------------------------------------------------------------------------- parameters
attn = MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=P, dtype="float64", seed=0)
# Stand-in for a trained layer: query-dependent offsets and attention (the paper's
# initialisation makes both constant).
for name in ("sampling_offsets.weight", "attention_weights.weight"):
    attn.params[name][...] = rng.normal(0.0, 0.1, attn.params[name].shape)
linear1 = Linear(C, FFN, dtype="float64", seed=1)
linear2 = Linear(FFN, C, dtype="float64", seed=2)
level_embed = rng.normal(size=(L, C))
target = rng.normal(size=(N, S, C))
valid = ~mask_flatten


def forward():
    """Encoder layer and loss (mean squared error on the valid positions)."""
    global cache
    query = src + pos + level_embed[level_of]
    a = attn.forward(query, reference_points, src, shapes, starts, mask_flatten)
    x, inv1 = layer_norm(src + a)
    h = linear1.forward(x)
    out, inv2 = layer_norm(x + linear2.forward(np.maximum(h, 0.0)))
    cache = (x, inv1, h, out, inv2)
    diff = (out - target) * valid[..., None]
    return out, 0.5 * (diff ** 2).sum() / valid.sum()


def backward():
    """Gradients of the loss: parameters accumulate in .grads; returns (d src, d level_embed)."""
    x, inv1, h, out, inv2 = cache
    g = (out - target) * valid[..., None] / valid.sum()
    g = layer_norm_backward(g, out, inv2)
    g_x = g + linear1.backward(linear2.backward(g) * (h > 0))
    g = layer_norm_backward(g_x, x, inv1)
    g_query, _, g_value = attn.backward(g)  # reference points are fixed inputs here
    g_level = np.zeros((L, C))
    np.add.at(g_level, level_of, g_query.sum(axis=0))
    return g + g_query + g_value, g_level


out, loss = forward()
g_src, g_level = backward()

# ----------------------------------------------------------------------------- checks
# 1. Directional derivative: every parameter, the level embedding and the features.
#    The bilinear map has kinks where a sampling point crosses a pixel (and ReLU at 0);
#    a central difference straddling one is off by up to half the slope jump, however
#    small the step. A step of 1e-9 makes crossing one of the ~500k coordinates
#    unlikely, and forming loss(+h) - loss(-h) from the outputs avoids the rounding of
#    subtracting two nearly equal losses.
leaves = [attn.params[k] for k in attn.params] + [m.params[k] for m in (linear1, linear2) for k in m.params]
grads = [attn.grads[k] for k in attn.grads] + [m.grads[k] for m in (linear1, linear2) for k in m.grads]
leaves += [level_embed, src]
grads += [g_level, g_src]
direction = [rng.normal(size=a.shape) for a in leaves]
analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
originals = [a.copy() for a in leaves]


def output_at(step):
    for a, a0, d in zip(leaves, originals, direction):
        a[...] = a0 + step * d
    return forward()[0]


step = 1e-9
out_plus, out_minus = output_at(step), output_at(-step)
output_at(0.0)  # restore every leaf exactly
# 0.5 (a - t)^2 - 0.5 (b - t)^2 = (a - b) ((a + b) / 2 - t)
loss_change = ((out_plus - out_minus) * ((out_plus + out_minus) / 2 - target))[valid].sum() / valid.sum()
numeric = loss_change / (2 * step)
grad_err = abs(numeric - analytic) / abs(analytic)

# 2. Padding: scrambling padded features changes no valid output; their gradient is 0.
out_before = out.copy()
src[mask_flatten] += 100 * rng.normal(size=(int(mask_flatten.sum()), C))
out_after, _ = forward()
pad_err = np.abs(out_after - out_before)[valid].max()
pad_grad = np.abs(g_src[mask_flatten]).max()

print(f"encoder layer: N = {N}, C = {C}, M = {M}, L = {L}, P = {P}, "
      f"levels {', '.join(f'{h}x{w}' for h, w in SIZES)} -> S = {S} queries per image")
print(f"  image 1 valid ratios (x, y) per level: {np.round(valid_ratios[1], 3).tolist()}")
print(f"  loss {loss:.4f}; directional derivative {analytic:.6e} vs finite difference {numeric:.6e} "
      f"(relative error {grad_err:.1e})")
print(f"  padded features: max change of valid outputs {pad_err:.1e}, max |gradient| {pad_grad:.1e}")
if not (grad_err < 1e-5 and pad_err == 0.0 and pad_grad == 0.0):
    sys.exit("FAILED: gradient or padding check")
print("OK")
