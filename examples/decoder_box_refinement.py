"""Decoder cross-attention with iterative box refinement (Deformable DETR, A.4).

Each decoder layer attends from the object queries into the encoder memory around
the current boxes, used as 4-d references (cx, cy, w, h): the layer scales its
offsets by the box size, so the P points of a head spread over the box. A box head
then predicts a correction and the refined box

    box_{k+1} = sigmoid(logit(box_k) + head_k(tgt_{k+1}))

becomes the next layer's reference. Deformable DETR detaches it there; the layer
still returns the reference-point gradient, so the full gradient is available too.

Checks: with the paper's initialisation every sampling point lies inside its box,
the outermost ones on its border; the full (non-detached) gradient of the summed
per-layer box losses agrees with a finite-difference directional derivative; and
detaching changes only the gradients of the layers before the last.
"""
import sys

import numpy as np

from cydeform.nn import Linear, MSDeformAttn, flatten_levels

N, C, M, L, P, Lq, LAYERS = 2, 32, 4, 3, 4, 12, 3
SIZES = [(16, 20), (8, 10), (4, 5)]
VALID = [(1.0, 1.0), (0.8, 0.75)]  # (x, y) fraction of the canvas each image fills
rng = np.random.default_rng(0)

# ----------------------------------------------------------------------------- inputs
masks = []
for H, W in SIZES:
    mask = np.zeros((N, H, W), bool)
    for n, (vx, vy) in enumerate(VALID):
        mask[n, round(vy * H):, :] = True
        mask[n, :, round(vx * W):] = True
    masks.append(mask)
memory, shapes, starts = flatten_levels([rng.normal(size=(N, C, H, W)) for H, W in SIZES])  # encoder output
mask_flatten = np.concatenate([m.reshape(N, -1) for m in masks], axis=1)
valid_ratios = np.stack([np.stack([(~m[:, 0, :]).sum(1) / m.shape[2], (~m[:, :, 0]).sum(1) / m.shape[1]], -1)
                         for m in masks], axis=1)  # (N, L, 2)
box_scale = np.concatenate([valid_ratios, valid_ratios], axis=-1)[:, None]  # (N, 1, L, 4)

tgt0 = rng.normal(size=(N, Lq, C))  # object query content
query_pos = rng.normal(size=(N, Lq, C))
boxes0 = np.concatenate([rng.uniform(0.25, 0.75, (N, Lq, 2)), rng.uniform(0.1, 0.4, (N, Lq, 2))], -1)  # proposals
target = np.clip(boxes0 + rng.normal(0.0, 0.05, boxes0.shape), 0.05, 0.95)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def logit(p):
    return np.log(p / (1.0 - p))


# ----------------------------------------------------------------------------- check 1: geometry at initialisation
fresh = MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=P, dtype="float64", seed=0)
ref_in = boxes0[:, :, None, :] * box_scale  # (N, Lq, L, 4): the box on each level's valid area
loc, _ = fresh.sampling_points(tgt0 + query_pos, ref_in, shapes)
centre, half = ref_in[:, :, None, :, None, :2], ref_in[:, :, None, :, None, 2:] / 2
reach = np.abs(loc - centre) / half  # (N, Lq, M, L, P, 2): 1 = on the box's border
box_reach = reach.max(axis=-1)  # Chebyshev: the P points of each head sit on rings 1/P .. 1
inside_err = max(box_reach.max() - 1.0, np.abs(box_reach[..., -1] - 1.0).max())

# ----------------------------------------------------------------------------- layers
layers = [MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=P, dtype="float64", seed=k) for k in range(LAYERS)]
heads = [Linear(C, 4, dtype="float64", seed=100 + k) for k in range(LAYERS)]
for attn, head in zip(layers, heads):
    # Stand-in for trained layers: query-dependent offsets and attention, small box updates.
    for name in ("sampling_offsets.weight", "attention_weights.weight"):
        attn.params[name][...] = rng.normal(0.0, 0.1, attn.params[name].shape)
    head.params["weight"][...] *= 0.1


def forward():
    """Run the decoder; return the refined boxes of every layer, each (N, Lq, 4)."""
    global trace
    tgt, box, trace, boxes = tgt0, boxes0, [], []
    for attn, head in zip(layers, heads):
        tgt = tgt + attn.forward(tgt + query_pos, box[:, :, None, :] * box_scale, memory, shapes, starts,
                                 mask_flatten)
        new_box = sigmoid(logit(box) + head.forward(tgt))
        trace.append((box, new_box))
        boxes.append(new_box)
        box = new_box
    return boxes


def loss_of(boxes):
    return sum(0.5 * ((b - target) ** 2).sum() for b in boxes) / (N * Lq)


def backward(detach):
    """Gradients of the summed box losses; with ``detach`` the references pass none back.

    Returns the gradients of (tgt0, memory, boxes0) and leaves parameter gradients in
    the layers' and heads' .grads.
    """
    g_tgt, g_box, g_memory = np.zeros((N, Lq, C)), np.zeros((N, Lq, 4)), np.zeros_like(memory)
    for attn, head, (box, new_box) in zip(layers[::-1], heads[::-1], trace[::-1]):
        g_new = (new_box - target) / (N * Lq) + g_box
        g_z = g_new * new_box * (1.0 - new_box)  # through the sigmoid
        g_tgt = g_tgt + head.backward(g_z)
        g_query, g_ref, g_mem = attn.backward(g_tgt)
        g_tgt = g_tgt + g_query  # tgt_{k+1} = tgt_k + attn(tgt_k + query_pos, ...)
        g_memory += g_mem
        if detach:
            g_box = np.zeros_like(g_box)
        else:  # through logit(box) and the reference box on every level
            g_box = g_z / (box * (1.0 - box)) + (g_ref * box_scale).sum(axis=2)
    return g_tgt, g_memory, g_box


modules = layers + heads


def collect_grads():
    grads = [m.grads[k].copy() for m in modules for k in m.grads]
    for m in modules:
        m.zero_grad()
    return grads


boxes = forward()
loss = loss_of(boxes)
g_inputs = backward(detach=True)
detached = collect_grads()
forward()
g_inputs = backward(detach=False)
full = collect_grads()

# ----------------------------------------------------------------------------- check 2: full gradient
# Kinks of the bilinear map (a point crossing a pixel) spoil a central difference that
# straddles one; a step of 1e-9 makes that unlikely, and the loss difference is formed
# from the boxes to avoid subtracting two nearly equal losses.
leaves = [m.params[k] for m in modules for k in m.params] + [tgt0, memory, boxes0]
grads = full + list(g_inputs)
direction = [rng.normal(size=a.shape) for a in leaves]
direction[-1] *= 0.1  # keep the perturbed proposals inside (0, 1)
analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
originals = [a.copy() for a in leaves]


def boxes_at(step):
    for a, a0, d in zip(leaves, originals, direction):
        a[...] = a0 + step * d
    return forward()


step = 1e-9
plus, minus = boxes_at(step), boxes_at(-step)
boxes_at(0.0)
# 0.5 (a - t)^2 - 0.5 (b - t)^2 = (a - b) ((a + b) / 2 - t)
numeric = sum(((a - b) * ((a + b) / 2 - target)).sum() for a, b in zip(plus, minus)) / (N * Lq) / (2 * step)
grad_err = abs(numeric - analytic) / abs(analytic)

# ----------------------------------------------------------------------------- check 3: what detaching changes
per_layer = len(layers[0].params)
last = slice((LAYERS - 1) * per_layer, LAYERS * per_layer)
last_same = all(np.array_equal(a, b) for a, b in zip(detached[last], full[last]))
first_diff = np.linalg.norm(detached[0] - full[0]) / np.linalg.norm(full[0])

print(f"decoder: {LAYERS} layers, N = {N}, Lq = {Lq} queries, C = {C}, M = {M}, L = {L}, P = {P}, "
      f"levels {', '.join(f'{h}x{w}' for h, w in SIZES)}")
print(f"  initial sampling points: farthest at {box_reach.max():.6f} of the half box size "
      f"(each head's last point on the border within {inside_err:.1e})")
err_by_layer = [float(np.abs(b - target).mean()) for b in boxes]
print(f"  box loss {loss:.5f}; mean |box - target| per layer: {', '.join(f'{e:.4f}' for e in err_by_layer)}")
print(f"  full gradient: directional derivative {analytic:.6e} vs finite difference {numeric:.6e} "
      f"(relative error {grad_err:.1e})")
print(f"  detached references: last layer's gradients unchanged: {last_same}; "
      f"first layer's sampling_offsets.weight gradient changes by {first_diff:.1%}")
if not (inside_err < 1e-12 and grad_err < 1e-5 and last_same and first_diff > 1e-3):
    sys.exit("FAILED: box geometry, gradient or detach check")
print("OK")
