"""Deformable convolution as a special case of multi-scale deformable attention.

The Deformable DETR paper remarks that its attention reduces to a deformable
convolution with L = 1 level, K = P = 1 point and the value projection fixed to the
identity. Concretely, for a k x k kernel over C input channels:

- M = k*k heads, one per kernel tap, each seeing all C input channels (D = C), so
  the value is the input replicated once per head (d_model = k*k*C);
- head m = ky*k + kx samples at the output pixel's centre plus its tap offset
  (kx - k//2, ky - k//2) plus a deformation (in pixels);
- with one point per head the softmax gives attention weight 1;
- the output projection holds the kernel: W_out[o, m*C + c] = K[o, c, ky, kx].

Here the query carries the deformation field itself (what an offset-predicting conv
would produce) and ``sampling_offsets`` is the selection matrix that reads it, with
its bias holding the tap offsets. The script checks that zero deformation gives a
plain k x k convolution with zero padding and that a random deformation samples
exactly where a deformable convolution (bilinear, zero outside) does.
"""
import sys

import numpy as np
from scipy.ndimage import map_coordinates

from cydeform.nn import MSDeformAttn, encoder_reference_points, flatten_levels

N, C_in, C_out, H, W, k = 2, 3, 5, 9, 11, 3
M = k * k
d_model = M * C_in
rng = np.random.default_rng(0)
image = rng.normal(size=(N, C_in, H, W))
kernel = rng.normal(size=(C_out, C_in, k, k))
taps = [(ky - k // 2, kx - k // 2) for ky in range(k) for kx in range(k)]  # head m -> (dy, dx)

layer = MSDeformAttn(d_model=d_model, n_levels=1, n_heads=M, n_points=1, dtype="float64", seed=0)
selection = np.zeros((2 * M, d_model))
selection[:, :2 * M] = np.eye(2 * M)  # offsets = first 2*M query channels, (x, y) per head
out_proj = np.zeros((d_model, d_model))  # rows beyond C_out stay zero
for m, (dy, dx) in enumerate(taps):
    out_proj[:C_out, m * C_in:(m + 1) * C_in] = kernel[:, :, dy + k // 2, dx + k // 2]
layer.load_state_dict({
    "sampling_offsets.weight": selection,
    "sampling_offsets.bias": np.array([(dx, dy) for dy, dx in taps], dtype=float).ravel(),
    "attention_weights.weight": np.zeros((M, d_model)),
    "attention_weights.bias": np.zeros(M),
    "value_proj.weight": np.eye(d_model),  # fixed to the identity
    "value_proj.bias": np.zeros(d_model),
    "output_proj.weight": out_proj,
    "output_proj.bias": np.zeros(d_model),
})

value, shapes, starts = flatten_levels([np.tile(image, (1, M, 1, 1))])  # (N, H*W, M*C_in): one copy per head
ref = encoder_reference_points(shapes, dtype="float64")  # every output pixel's centre, (1, H*W, 1, 2)


def deformable_attention_conv(deformation):
    """deformation (N, H, W, M, 2) pixels (dx, dy) -> output (N, C_out, H, W) via the layer."""
    query = np.zeros((N, H * W, d_model))
    query[..., :2 * M] = deformation.reshape(N, H * W, 2 * M)
    out = layer.forward(query, ref, value, shapes, starts)
    return out[..., :C_out].reshape(N, H, W, C_out).transpose(0, 3, 1, 2)


def direct_conv(image):
    """Plain k x k cross-correlation with zero padding (PyTorch's Conv2d)."""
    padded = np.pad(image, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    out = np.zeros((N, C_out, H, W))
    for ky in range(k):
        for kx in range(k):
            out += np.einsum("oc,nchw->nohw", kernel[:, :, ky, kx], padded[:, :, ky:ky + H, kx:kx + W])
    return out


def direct_deformable_conv(image, deformation):
    """Deformable convolution by explicit bilinear sampling (zero outside the image)."""
    i, j = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    out = np.zeros((N, C_out, H, W))
    for n in range(N):
        for m, (dy, dx) in enumerate(taps):
            y = i + dy + deformation[n, :, :, m, 1]
            x = j + dx + deformation[n, :, :, m, 0]
            sampled = np.stack([map_coordinates(image[n, c], [y, x], order=1, mode="grid-constant", cval=0.0)
                                for c in range(C_in)])  # (C_in, H, W)
            out[n] += np.einsum("oc,chw->ohw", kernel[:, :, dy + k // 2, dx + k // 2], sampled)
    return out


expected = direct_conv(image)
plain_err = np.abs(deformable_attention_conv(np.zeros((N, H, W, M, 2))) - expected).max() / np.abs(expected).max()
deformation = rng.uniform(-1.5, 1.5, size=(N, H, W, M, 2))
expected = direct_deformable_conv(image, deformation)
deform_err = np.abs(deformable_attention_conv(deformation) - expected).max() / np.abs(expected).max()

print(f"{k}x{k} deformable convolution, {C_in} -> {C_out} channels on {N} images of {H}x{W}, "
      f"as MSDeformAttn with M = {M} heads, D = {C_in}, L = P = 1")
print(f"  zero deformation vs plain convolution (zero padding): max relative error {plain_err:.1e}")
print(f"  random deformation (+-1.5 px) vs bilinear deformable convolution: max relative error {deform_err:.1e}")
if not (plain_err < 1e-12 and deform_err < 1e-12):
    sys.exit("FAILED: the attention layer does not reproduce the convolution")
print("OK")
