"""Train an MSDeformAttn layer with plain SGD: learn to read the value at a hidden location.

Each sample is a smooth random 16x16 feature map (one level). The target is the
feature vector at a fixed hidden location, sampled bilinearly by SciPy. One learned
object query with its reference point at the image centre must learn where to look
(sampling offsets), which points to trust (attention weights) and how to pass the
features through (value and output projections). No autograd framework: ``backward``
gives every gradient, including the query's, and the update is ``p -= lr * g`` in
place.

Check: the held-out loss falls far below its initial value, and the point with the
largest attention weight ends on the hidden location.
"""
import sys

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates

import cydeform
from cydeform.nn import MSDeformAttn, flatten_levels

C, M, P, H, W = 8, 4, 2, 16, 16
BATCH, STEPS, LR = 32, 200, 0.5
HIDDEN = np.array([0.71, 0.29])  # normalised (x, y): about 3 px right of and above the centre
rng = np.random.default_rng(0)
cydeform.set_num_threads(1)  # a batch this small gains nothing from threads (and suffers on a busy machine)

# Smooth maps (correlation length ~2 px) so that the loss tells a point which way to move.
maps = gaussian_filter(rng.normal(size=(640, C, H, W)), sigma=(0, 0, 2.0, 2.0), mode="constant")
maps /= maps.std()
px, py = HIDDEN * [W, H] - 0.5  # pixel coordinates, texel centres at integers
targets = np.array([[map_coordinates(m[c], [[py], [px]], order=1)[0] for c in range(C)] for m in maps])
values, shapes, starts = flatten_levels([maps.astype(np.float32)])
targets = targets.astype(np.float32)[:, None, :]  # (samples, Lq = 1, C)
train, test = slice(0, 512), slice(512, None)

layer = MSDeformAttn(d_model=C, n_levels=1, n_heads=M, n_points=P, dtype="float32", seed=0)
query = rng.normal(size=(1, 1, C)).astype(np.float32)  # learned, shared by all images
ref = np.full((1, 1, 1, 2), 0.5, dtype=np.float32)  # the image centre


def run(x, tgt, learn):
    """Loss (mean squared error) of a batch; with ``learn`` also one SGD step."""
    q = np.repeat(query, len(x), axis=0)
    diff = layer.forward(q, ref, x, shapes, starts) - tgt
    loss = float((diff ** 2).mean())
    if learn:
        layer.zero_grad()
        g_query, _, _ = layer.backward(2.0 * diff / diff.size)
        for name, p in layer.params.items():
            p -= LR * layer.grads[name]
        query[...] -= LR * g_query.sum(axis=0, keepdims=True)
    return loss


def strongest_point():
    """Pixel (x, y) of the point with the largest attention weight, and that weight."""
    loc, attn = layer.sampling_points(query, ref, shapes)
    w = attn[0, 0, :, 0]  # (M, P)
    m, p = np.unravel_index(w.argmax(), w.shape)
    return loc[0, 0, m, 0, p] * [W, H] - 0.5, float(w[m, p])


def report(step):
    (x, y), w = strongest_point()
    loss = run(values[test], targets[test], learn=False)
    print(f"  step {step:4d}: held-out loss {loss:.5f}; strongest point at ({x:5.2f}, {y:5.2f}), weight {w:.2f}")
    return loss


print(f"learning to read the feature at pixel ({px:.2f}, {py:.2f}) of a {H}x{W} map from its centre; "
      f"M = {M} heads, P = {P} points, SGD lr = {LR}, batch {BATCH}")
initial = report(0)
for step in range(1, STEPS + 1):
    batch = rng.integers(train.start, train.stop, size=BATCH)
    run(values[batch], targets[batch], learn=True)
    if step % 50 == 0:
        final = report(step)
(x, y), w = strongest_point()
miss = max(abs(x - px), abs(y - py))
if not (final < 0.01 * initial and miss < 0.5 and w > 0.5):
    sys.exit(f"FAILED: held-out loss {initial:.4f} -> {final:.5f}; strongest point {miss:.2f} px off, weight {w:.2f}")
print(f"OK: held-out loss fell {initial / final:.0f}x; the strongest point is {miss:.2f} px from the target")
