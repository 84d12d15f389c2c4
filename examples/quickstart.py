"""Quick start: multi-scale deformable attention on NumPy arrays (and CuPy, with a GPU).

Runs the functional API forward and backward on a small random problem, checks both
against the float64 NumPy oracle, repeats on the GPU when CuPy and a GPU are present,
then runs the Deformable DETR layer (cydeform.nn.MSDeformAttn) forward and backward
and checks its reference-point gradient by finite differences. Exits non-zero if any
check fails.

    python examples/quickstart.py
"""
import sys

import numpy as np

import cydeform
from cydeform.reference import ms_deform_attn_backward_reference, ms_deform_attn_reference

rng = np.random.default_rng(0)

# A 3-level pyramid, 2 images, 8 heads of 32 channels, 100 queries, 4 points per level.
spatial_shapes = np.array([[32, 48], [16, 24], [8, 12]])        # (L, 2) rows (H_l, W_l)
N, M, D, Lq, P = 2, 8, 32, 100, 4
L = len(spatial_shapes)
S = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())

value = rng.standard_normal((N, S, M, D), dtype=np.float32)                 # (N, S, M, D)
sampling_locations = rng.uniform(-0.1, 1.1, (N, Lq, M, L, P, 2)).astype(np.float32)
logits = rng.standard_normal((N, Lq, M, L * P), dtype=np.float32)
attention_weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # softmax over L*P
attention_weights = attention_weights.reshape(N, Lq, M, L, P)

out = cydeform.ms_deform_attn(value, spatial_shapes, None, sampling_locations, attention_weights)
print(f"forward:  out {out.shape} {out.dtype}  (N, Lq, M*D)")

grad_out = rng.standard_normal(out.shape, dtype=np.float32)
grads = cydeform.ms_deform_attn_backward(grad_out, value, spatial_shapes, None,
                                         sampling_locations, attention_weights)
print("backward: " + ", ".join(f"{name} {g.shape}" for name, g in
                               zip(("grad_value", "grad_sampling_locations", "grad_attention_weights"), grads)))

failures = []


def check(name, actual, expected, tol):
    err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)) / (np.max(np.abs(expected)) + 1e-30))
    ok = err <= tol
    print(f"  {name:<28} max relative error {err:.1e}  {'ok' if ok else 'FAIL'} (tolerance {tol:.0e})")
    if not ok:
        failures.append(name)


print(f"CPU ({cydeform.get_num_threads()} threads) vs the float64 oracle:")
ref_out = ms_deform_attn_reference(value, spatial_shapes, None, sampling_locations, attention_weights)
ref_grads = ms_deform_attn_backward_reference(grad_out, value, spatial_shapes, None,
                                              sampling_locations, attention_weights)
check("output", out, ref_out, 1e-5)
for name, g, r in zip(("grad_value", "grad_sampling_locations", "grad_attention_weights"), grads, ref_grads):
    # float32 points within ~1e-5 px of a pixel boundary may take the other side of the
    # location gradient's jump than their float64 copies: compare those loosely.
    check(name, g, r, 1e-3 if name == "grad_sampling_locations" else 1e-5)


def gpu_available():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


if gpu_available():
    import cupy as cp

    args = (cp.asarray(value), spatial_shapes, None, cp.asarray(sampling_locations), cp.asarray(attention_weights))
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    print(f"GPU ({name.decode() if isinstance(name, bytes) else name}) vs the CPU backend:")
    check("output", cp.asnumpy(cydeform.ms_deform_attn(*args)), out.astype(np.float64), 1e-5)
    gpu_grads = cydeform.ms_deform_attn_backward(cp.asarray(grad_out), *args)
    for name, g, r in zip(("grad_value", "grad_sampling_locations", "grad_attention_weights"), gpu_grads, grads):
        check(name, cp.asnumpy(g), r.astype(np.float64), 1e-3 if name == "grad_sampling_locations" else 1e-5)
else:
    print("GPU: no CuPy GPU found, skipped")

# The layer: projections, softmax and reference-point arithmetic around the op, with a
# hand-written backward and Deformable DETR's parameter names (layer.state_dict()).
from cydeform.nn import MSDeformAttn  # noqa: E402

C, shapes = 32, np.array([[8, 8], [4, 4]])                     # two levels (H_l, W_l): S = 80
layer = MSDeformAttn(d_model=C, n_levels=2, n_heads=4, n_points=2, dtype="float64", seed=0)
query = rng.normal(size=(2, 5, C))                             # (N, Lq, C)
ref = rng.uniform(0.2, 0.8, size=(2, 5, 2, 2))                 # (N, Lq, L, 2) normalised (x, y)
feats = rng.normal(size=(2, 80, C))                            # (N, S, C), see nn.flatten_levels
y = layer.forward(query, ref, feats, shapes)                   # (N, Lq, C)
gy = rng.normal(size=y.shape)                                  # gradient of loss = sum(y * gy)
g_query, g_ref, g_feats = layer.backward(gy)                   # parameter gradients in layer.grads
direction, eps = rng.normal(size=ref.shape), 1e-6
fd = ((layer.forward(query, ref + eps * direction, feats, shapes)
       - layer.forward(query, ref - eps * direction, feats, shapes)) * gy).sum() / (2 * eps)
print(f"layer: MSDeformAttn forward {y.shape}; reference-point gradient vs central difference:")
check("directional derivative", np.array([(g_ref * direction).sum()]), np.array([fd]), 1e-6)

if failures:
    sys.exit(f"quickstart: checks failed: {', '.join(failures)}")
print("quickstart: all checks passed")
