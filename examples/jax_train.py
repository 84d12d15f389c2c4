"""Train a small deformable-attention layer in plain JAX with cydeform.jax and SGD.

Each sample is a smooth random 16x16 feature map (one level, C channels). The target
is the feature vector at a hidden location (sampled bilinearly by cydeform's NumPy
op). One learned query, with its reference point at the map centre, must learn where
to look (sampling offsets), which points to trust (attention weights) and how to pass
the features through (value and output projections). The model is a pure function
of a parameter dict; ``jax.grad`` differentiates it through cydeform.jax's
hand-derived backward, and the update is plain SGD inside one ``jax.jit``.

Check: the held-out loss falls far below its initial value. Without jax installed
the example says so and exits 0 (``pip install cydeform[jax]``).
"""
import sys

try:
    import jax
    import jax.numpy as jnp
except ImportError:
    print("skipped: jax is not installed (pip install cydeform[jax])")
    sys.exit(0)

import numpy as np

import cydeform
import cydeform.jax as cjax

C, M, P, H, W = 8, 4, 2, 16, 16
D = C // M
BATCH, STEPS, LR = 32, 300, 0.3
HIDDEN = np.array([0.71, 0.29])  # normalised (x, y)
SHAPES = np.array([[H, W]], dtype=np.int64)
rng = np.random.default_rng(0)
cydeform.set_num_threads(1)  # a call this small gains nothing from threads

# Smooth maps: a few random low-frequency waves per channel, so the loss tells a
# sampling point which way to move. Flattened to value (samples, S = H*W, C).
yy, xx = np.meshgrid((np.arange(H) + 0.5) / H, (np.arange(W) + 0.5) / W, indexing="ij")
k = rng.uniform(1.0, 3.0, (640, C, 4, 2))
phase = rng.uniform(0, 2 * np.pi, (640, C, 4))
maps = np.cos(2 * np.pi * (k[..., 0, None, None] * xx + k[..., 1, None, None] * yy) + phase[..., None, None]).sum(2)
maps = (maps / maps.std()).astype(np.float32)  # (samples, C, H, W)
values = maps.reshape(640, C, H * W).transpose(0, 2, 1).copy()
# Targets: the bilinear sample at HIDDEN of every channel (one head of C channels, weight 1).
loc = np.broadcast_to(HIDDEN.astype(np.float32), (640, 1, 1, 1, 1, 2)).copy()
targets = cydeform.ms_deform_attn(values[:, :, None, :], SHAPES, None, loc, np.ones((640, 1, 1, 1, 1), np.float32))
train, test = slice(0, 512), slice(512, None)


def init(key):
    ks = jax.random.split(key, 5)
    return {
        "query": jax.random.normal(ks[0], (C,)),
        "w_off": jnp.zeros((C, M * P * 2)),
        "b_off": jax.random.normal(ks[1], (M * P * 2,)) * 2.0,  # initial spread of a few pixels
        "w_attn": jnp.zeros((C, M * P)),
        "b_attn": jnp.zeros((M * P,)),
        "w_val": jnp.eye(C) + 0.1 * jax.random.normal(ks[2], (C, C)),
        "w_out": jnp.eye(C) + 0.1 * jax.random.normal(ks[3], (C, C)),
    }


def model(params, value):
    """value (B, S, C) -> (B, 1, C): one query attending to the map around its reference point."""
    B = value.shape[0]
    q = params["query"]
    offsets = (q @ params["w_off"] + params["b_off"]).reshape(M, 1, P, 2)  # pixels
    loc = 0.5 + offsets / jnp.array([W, H], jnp.float32)
    attn = jax.nn.softmax((q @ params["w_attn"] + params["b_attn"]).reshape(M, 1, P), axis=-1)
    v = (value @ params["w_val"]).reshape(B, H * W, M, D)
    out = cjax.ms_deform_attn(v, SHAPES, None, jnp.broadcast_to(loc, (B, 1, M, 1, P, 2)),
                              jnp.broadcast_to(attn, (B, 1, M, 1, P)))
    return out @ params["w_out"]


def loss_fn(params, value, target):
    return jnp.mean((model(params, value) - target) ** 2)


@jax.jit
def sgd_step(params, value, target):
    loss, grads = jax.value_and_grad(loss_fn)(params, value, target)
    return jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads), loss


held_out = jax.jit(loss_fn)
params = init(jax.random.PRNGKey(0))
print(f"learning to read the feature at ({HIDDEN[0]}, {HIDDEN[1]}) of a {H}x{W} map from its centre; "
      f"M = {M} heads, P = {P} points, SGD lr = {LR}, batch {BATCH}")
initial = float(held_out(params, values[test], targets[test]))
print(f"  step    0: held-out loss {initial:.5f}")
for step in range(1, STEPS + 1):
    batch = rng.integers(train.start, train.stop, size=BATCH)
    params, loss = sgd_step(params, values[batch], targets[batch])
    if step % 50 == 0:
        final = float(held_out(params, values[test], targets[test]))
        print(f"  step {step:4d}: train loss {float(loss):.5f}, held-out loss {final:.5f}")
if not final < 0.05 * initial:
    sys.exit(f"FAILED: held-out loss {initial:.4f} -> {final:.5f}")
print(f"OK: held-out loss fell {initial / final:.0f}x")
