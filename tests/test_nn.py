"""Tests of cydeform.nn: the MSDeformAttn layer, Linear and the pyramid helpers.

The whole-layer oracle below is written from the Deformable DETR equations with
separate (unfused) projections, SciPy's softmax and cydeform.reference's float64 op:
none of it goes through cydeform.nn.
"""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st
from scipy.special import softmax

import cydeform
from cydeform.nn import Linear, MSDeformAttn, encoder_reference_points, flatten_levels
from cydeform.reference import ms_deform_attn_reference

NAMES = ("sampling_offsets.weight", "sampling_offsets.bias", "attention_weights.weight", "attention_weights.bias",
         "value_proj.weight", "value_proj.bias", "output_proj.weight", "output_proj.bias")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are tiny: threads only add synchronisation, which turns into
    seconds per test on a busy 2-core machine. Results do not depend on the count."""
    before = cydeform.get_num_threads()
    cydeform.set_num_threads(1)
    yield
    cydeform.set_num_threads(before)


# --------------------------------------------------------------------------- oracle and problem builders

def oracle_forward(p, query, ref, x, shapes, mask, M, L, P):
    """Whole layer in float64 from the paper's equations; returns (output, sampling locations)."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    query, ref, x = (np.asarray(a, np.float64) for a in (query, ref, x))
    N, Lq, C = query.shape
    S = x.shape[1]
    value = x @ p["value_proj.weight"].T + p["value_proj.bias"]
    if mask is not None:
        value[mask] = 0.0
    off = (query @ p["sampling_offsets.weight"].T + p["sampling_offsets.bias"]).reshape(N, Lq, M, L, P, 2)
    logits = (query @ p["attention_weights.weight"].T + p["attention_weights.bias"]).reshape(N, Lq, M, L * P)
    attn = softmax(logits, axis=-1).reshape(N, Lq, M, L, P)
    ref = np.broadcast_to(ref, (N, *ref.shape[1:]))
    if ref.shape[-1] == 2:
        wh = shapes[:, ::-1].astype(np.float64)  # (L, 2) = (W_l, H_l)
        loc = ref[:, :, None, :, None, :] + off / wh[:, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + off / P * ref[:, :, None, :, None, 2:] * 0.5
    sampled = ms_deform_attn_reference(value.reshape(N, S, M, C // M), shapes, None, loc, attn)
    return sampled @ p["output_proj.weight"].T + p["output_proj.bias"], loc


def random_levels(rng, L):
    return np.array([[rng.integers(1, 5), rng.integers(1, 5)] for _ in range(L)], dtype=np.int64)


def random_problem(rng, *, N=2, Lq=3, M=2, D=4, L=2, P=2, shapes=None, ref_dim=2, masked=False,
                   dtype="float64", ref_batch=None):
    """A layer with every parameter random (not the init's zeros) and inputs for it."""
    shapes = random_levels(rng, L) if shapes is None else np.asarray(shapes, dtype=np.int64)
    C, S = M * D, int((shapes[:, 0] * shapes[:, 1]).sum())
    layer = MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=P, dtype=dtype, seed=int(rng.integers(1 << 30)))
    layer.load_state_dict({k: rng.normal(0.0, 0.4, v.shape) + v for k, v in layer.state_dict().items()})
    query = rng.normal(size=(N, Lq, C)).astype(dtype)
    x = rng.normal(size=(N, S, C)).astype(dtype)
    nr = N if ref_batch is None else ref_batch
    if ref_dim == 2:
        ref = rng.uniform(0.1, 0.9, (nr, Lq, L, 2))
    else:
        ref = np.concatenate([rng.uniform(0.2, 0.8, (nr, Lq, L, 2)), rng.uniform(0.2, 0.6, (nr, Lq, L, 2))], -1)
    mask = None
    if masked:
        mask = rng.uniform(size=(N, S)) < 0.3
        mask[:, 0] = False  # keep some content in every image
    return layer, query, ref.astype(dtype), x, shapes, mask


def clear_of_kinks(layer, query, ref, x, shapes, mask, min_px=0.05):
    """Shift each sampling-offset bias so all pixel coordinates are >= min_px from an integer.

    The bilinear map has kinks at integer pixel coordinates (x = loc * W - 0.5); a
    bias shift moves every (n, q) of one (m, l, p, axis) by a known amount, and a
    search over shifts finds one that keeps all of them clear.
    """
    M, L, P = layer.n_heads, layer.n_levels, layer.n_points
    _, loc = oracle_forward(layer.params, query, ref, x, shapes, mask, M, L, P)
    size = shapes[:, ::-1].astype(np.float64)[:, None, :]  # (L, 1, 2) = (W_l, H_l)
    pix = loc * size - 0.5  # (N, Lq, M, L, P, 2)
    if ref.shape[-1] == 2:
        rate = np.ones_like(pix)  # pixels moved per unit of bias
    else:
        rate = np.broadcast_to(ref[:, :, None, :, None, 2:] * 0.5 / P * size, pix.shape)
    shifts = np.linspace(-1.0, 1.0, 2001)
    cand = pix[..., None] + rate[..., None] * shifts
    dist = np.abs(cand - np.round(cand)).min(axis=(0, 1))  # (M, L, P, 2, K)
    best = dist.argmax(axis=-1)
    assert dist.max(axis=-1).min() >= min_px, "no bias shift keeps the points clear of pixel kinks"
    layer.params["sampling_offsets.bias"][...] += shifts[best].reshape(-1)


def central_difference(f, arr, eps=1e-6):
    """Gradient of scalar f() with respect to every entry of arr, perturbed in place."""
    grad = np.zeros(arr.shape)
    for idx in np.ndindex(arr.shape):
        old = arr[idx]
        arr[idx] = old + eps
        up = f()
        arr[idx] = old - eps
        down = f()
        arr[idx] = old
        grad[idx] = (up - down) / (2 * eps)
    return grad


# --------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_finite_differences(ref_dim, masked):
    rng = np.random.default_rng(10 * ref_dim + masked)
    layer, query, ref, x, shapes, mask = random_problem(rng, shapes=[[3, 4], [2, 3]], ref_dim=ref_dim, masked=masked)
    clear_of_kinks(layer, query, ref, x, shapes, mask)
    R = rng.normal(size=(2, 3, 8))

    def loss():
        return float((layer.forward(query, ref, x, shapes, None, mask) * R).sum())

    loss()
    layer.zero_grad()
    g_query, g_ref, g_x = layer.backward(R)
    checks = [("query", g_query, query), ("reference_points", g_ref, ref), ("input_flatten", g_x, x)]
    checks += [(name, layer.grads[name].copy(), layer.params[name]) for name in NAMES]
    for name, analytic, arr in checks:
        numeric = central_difference(loss, arr)
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-7, err_msg=name)
    if masked:
        assert np.all(g_x[mask] == 0) and np.any(g_x[~mask] != 0)


def test_broadcast_reference_points_gradient_is_summed_over_the_batch():
    rng = np.random.default_rng(5)
    layer, query, ref, x, shapes, _ = random_problem(rng, ref_dim=4, ref_batch=1)
    R = rng.normal(size=(2, 3, 8))
    out1 = layer.forward(query, ref, x, shapes)
    _, g1, _ = layer.backward(R)
    outN = layer.forward(query, np.repeat(ref, 2, axis=0), x, shapes)
    _, gN, _ = layer.backward(R)
    np.testing.assert_array_equal(out1, outN)
    assert g1.shape == ref.shape
    np.testing.assert_allclose(g1, gN.sum(axis=0, keepdims=True), rtol=1e-12, atol=1e-14)


def test_parameter_gradients_accumulate_and_zero_grad_clears_them():
    rng = np.random.default_rng(6)
    layer, query, ref, x, shapes, _ = random_problem(rng)
    R = rng.normal(size=(2, 3, 8))
    layer.forward(query, ref, x, shapes)
    layer.backward(R)
    once = {k: v.copy() for k, v in layer.grads.items()}
    layer.forward(query, ref, x, shapes)
    layer.backward(R)
    for name in NAMES:
        assert np.any(once[name] != 0), name
        np.testing.assert_allclose(layer.grads[name], 2 * once[name], rtol=1e-12, atol=1e-15, err_msg=name)
    layer.zero_grad()
    assert all(np.all(g == 0) for g in layer.grads.values())


def test_float32_layer_tracks_float64():
    rng = np.random.default_rng(7)
    layer, query, ref, x, shapes, mask = random_problem(rng, ref_dim=4, masked=True, shapes=[[4, 4], [2, 2]])
    clear_of_kinks(layer, query, ref, x, shapes, mask)
    R = rng.normal(size=(2, 3, 8))
    out64 = layer.forward(query, ref, x, shapes, None, mask)
    g64 = layer.backward(R)
    layer.to(dtype="float32")
    f32 = [a.astype(np.float32) for a in (query, ref, x, R)]
    out32 = layer.forward(*f32[:3], shapes, None, mask)
    g32 = layer.backward(f32[3])
    assert out32.dtype == np.float32 and all(g.dtype == np.float32 for g in g32)
    assert layer.params["value_proj.weight"].dtype == np.float32
    np.testing.assert_allclose(out32, out64, rtol=1e-4, atol=1e-4 * np.abs(out64).max())
    for a, b in zip(g32, g64):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * np.abs(b).max())


def test_to_casts_and_refuses_unknown_modules():
    layer = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, dtype="float64", seed=0)
    before = layer.state_dict()
    assert layer.to(np) is layer and layer.xp is np
    layer.to(dtype="float32")
    assert layer.dtype == np.float32
    for name in NAMES:
        assert layer.params[name].dtype == layer.grads[name].dtype == np.float32
        np.testing.assert_array_equal(layer.params[name], before[name].astype(np.float32))
    with pytest.raises(TypeError, match=r"xp must be the numpy or cupy module"):
        layer.to("cupy")
    with pytest.raises(TypeError, match=r"dtype must be one of"):
        layer.to(dtype="int32")
    assert layer.dtype == np.float32 and layer.xp is np


def test_deterministic_backward_matches_default():
    rng = np.random.default_rng(8)
    layer, query, ref, x, shapes, _ = random_problem(rng)
    R = rng.normal(size=(2, 3, 8))
    layer.forward(query, ref, x, shapes)
    a = layer.backward(R)
    layer.forward(query, ref, x, shapes)
    b = layer.backward(R, deterministic=True)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


# --------------------------------------------------------------------------- forward against the oracle

@given(seed=st.integers(0, 2**32 - 1), N=st.integers(1, 2), Lq=st.integers(1, 4), M=st.integers(1, 3),
       D=st.integers(1, 3), L=st.integers(1, 3), P=st.integers(1, 3), ref_dim=st.sampled_from([2, 4]),
       masked=st.booleans(), dtype=st.sampled_from(["float32", "float64"]))
def test_forward_matches_oracle(seed, N, Lq, M, D, L, P, ref_dim, masked, dtype):
    rng = np.random.default_rng(seed)
    layer, query, ref, x, shapes, mask = random_problem(rng, N=N, Lq=Lq, M=M, D=D, L=L, P=P, ref_dim=ref_dim,
                                                        masked=masked, dtype=dtype)
    starts = np.concatenate(([0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1]))
    out = layer.forward(query, ref, x, shapes, starts, mask)
    expected, loc = oracle_forward(layer.params, query, ref, x, shapes, mask, M, L, P)
    assert out.shape == (N, Lq, M * D) and out.dtype == np.dtype(dtype)
    scale = max(1.0, np.abs(expected).max())
    tol = 1e-12 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(out, expected, rtol=tol, atol=tol * scale)
    loc_layer, attn = layer.sampling_points(query, ref, shapes)
    np.testing.assert_allclose(loc_layer, loc, rtol=tol, atol=tol)
    np.testing.assert_allclose(attn.sum(axis=(3, 4)), 1.0, rtol=tol)


def test_padding_mask_hides_padded_input():
    rng = np.random.default_rng(9)
    layer, query, ref, x, shapes, mask = random_problem(rng, masked=True)
    out = layer.forward(query, ref, x, shapes, None, mask)
    x2 = x.copy()
    x2[mask] = rng.normal(size=(int(mask.sum()), x.shape[-1])) * 100
    np.testing.assert_array_equal(layer.forward(query, ref, x2, shapes, None, mask), out)
    assert not np.allclose(layer.forward(query, ref, x2, shapes), out)


# --------------------------------------------------------------------------- initialisation

def test_initial_offsets_lie_on_rays_and_attention_is_uniform():
    M, L, P, C = 8, 3, 4, 32
    layer = MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=P, dtype="float64", seed=0)
    bias = layer.params["sampling_offsets.bias"].reshape(M, L, P, 2)
    for m in range(M):
        theta = 2 * math.pi * m / M
        for p in range(P):
            v = bias[m, :, p]  # (L, 2): same point on every level
            np.testing.assert_allclose(np.abs(v).max(axis=-1), p + 1, rtol=1e-12)  # ring p + 1
            angle = np.arctan2(v[:, 1], v[:, 0]) % (2 * math.pi)
            np.testing.assert_allclose((angle - theta + math.pi) % (2 * math.pi) - math.pi, 0, atol=1e-12)
    for name in ("sampling_offsets.weight", "attention_weights.weight", "attention_weights.bias",
                 "value_proj.bias", "output_proj.bias"):
        assert np.all(layer.params[name] == 0), name

    rng = np.random.default_rng(0)
    shapes = np.array([[4, 6], [3, 3], [2, 5]])
    query, ref = rng.normal(size=(2, 5, C)), rng.uniform(size=(2, 5, L, 2))
    loc, attn = layer.sampling_points(query, ref, shapes)
    np.testing.assert_allclose(attn, 1.0 / (L * P), rtol=1e-12)
    pixels = (loc - ref[:, :, None, :, None, :]) * shapes[:, ::-1][None, None, None, :, None, :]
    np.testing.assert_allclose(pixels, np.broadcast_to(bias, pixels.shape), atol=1e-12)


def test_projections_are_xavier_uniform_and_seeded():
    C = 128
    a, b, c = (MSDeformAttn(d_model=C, seed=s) for s in (0, 0, 1))
    bound = math.sqrt(6.0 / (2 * C))
    for name in ("value_proj.weight", "output_proj.weight"):
        w = a.params[name]
        assert w.dtype == np.float32 and w.shape == (C, C)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
        assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.03  # uniform's standard deviation
        np.testing.assert_array_equal(w, b.params[name])
        assert not np.array_equal(w, c.params[name])
    assert not np.array_equal(a.params["value_proj.weight"], a.params["output_proj.weight"])


# --------------------------------------------------------------------------- state dicts

def test_state_dict_has_checkpoint_names_and_shapes_and_returns_copies():
    C, M, L, P = 16, 2, 3, 2
    layer = MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=P, seed=0)
    sd = layer.state_dict()
    assert {k: v.shape for k, v in sd.items()} == {
        "sampling_offsets.weight": (M * L * P * 2, C), "sampling_offsets.bias": (M * L * P * 2,),
        "attention_weights.weight": (M * L * P, C), "attention_weights.bias": (M * L * P,),
        "value_proj.weight": (C, C), "value_proj.bias": (C,),
        "output_proj.weight": (C, C), "output_proj.bias": (C,)}
    assert tuple(layer.params) == NAMES
    sd["value_proj.weight"][...] = 7
    assert not np.any(layer.params["value_proj.weight"] == 7)
    with pytest.raises(TypeError):
        layer.params["value_proj.weight"] = sd["value_proj.weight"]  # live storage: update in place


def test_state_dict_round_trip_through_npz(tmp_path):
    rng = np.random.default_rng(0)
    src, query, ref, x, shapes, _ = random_problem(rng, ref_dim=4)
    dst = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, dtype="float64", seed=123)
    for p in dst.params.values():
        p[...] = 7.0  # every parameter must be overwritten, biases included
    np.savez(tmp_path / "ckpt.npz", **src.state_dict())
    with np.load(tmp_path / "ckpt.npz") as ckpt:
        dst.load_state_dict(ckpt)
    for name in NAMES:
        np.testing.assert_array_equal(dst.params[name], src.params[name])
    np.testing.assert_array_equal(dst.forward(query, ref, x, shapes), src.forward(query, ref, x, shapes))


def test_load_state_dict_with_prefix_and_cast():
    src = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, dtype="float64", seed=1)
    prefix = "transformer.encoder.layers.0.self_attn."
    ckpt = {prefix + k: v for k, v in src.state_dict().items()}
    ckpt["transformer.encoder.layers.0.norm1.weight"] = np.ones(8)  # other modules' entries are skipped
    dst = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, dtype="float32", seed=2)
    for p in dst.params.values():
        p[...] = 7.0
    dst.load_state_dict(ckpt, prefix=prefix)
    for name in NAMES:
        assert dst.params[name].dtype == np.float32
        np.testing.assert_array_equal(dst.params[name], src.params[name].astype(np.float32))


def _bad_mappings():
    good = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, seed=0).state_dict()
    missing = dict(good)
    del missing["value_proj.bias"]
    extra = dict(good, **{"value_proj.scale": np.ones(8)})
    shaped = dict(good, **{"output_proj.weight": np.ones((8, 4))})
    swapped = dict(good, **{"sampling_offsets.weight": np.ones((8, 16))})  # transposed (in, out)
    text = dict(good, **{"attention_weights.bias": np.array(["a"] * 8)})
    return [
        (missing, ValueError, r"missing parameters: value_proj\.bias"),
        (extra, ValueError, r"unexpected parameters: value_proj\.scale"),
        (shaped, ValueError, r"output_proj\.weight has shape \(8, 4\) but the layer needs \(8, 8\)"),
        (swapped, ValueError, r"sampling_offsets\.weight has shape \(8, 16\)"),
        (text, TypeError, r"attention_weights\.bias must hold real numbers"),
        ([("value_proj.bias", np.ones(8))], TypeError, r"mapping of name -> array"),
    ]


@pytest.mark.parametrize("mapping, exc, message", _bad_mappings())
def test_load_state_dict_refuses_bad_mappings_and_changes_nothing(mapping, exc, message):
    layer = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, seed=5)
    before = layer.state_dict()
    with pytest.raises(exc, match=message):
        layer.load_state_dict(mapping)
    for name in NAMES:
        np.testing.assert_array_equal(layer.params[name], before[name])


# --------------------------------------------------------------------------- errors

def _layer_inputs():
    rng = np.random.default_rng(0)
    layer = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, seed=0)
    shapes = np.array([[3, 4], [2, 3]])
    args = dict(query=rng.normal(size=(2, 3, 8)).astype(np.float32),
                reference_points=rng.uniform(size=(2, 3, 2, 2)).astype(np.float32),
                input_flatten=rng.normal(size=(2, 18, 8)).astype(np.float32),
                input_spatial_shapes=shapes, input_level_start_index=np.array([0, 12]),
                input_padding_mask=np.zeros((2, 18), bool))
    return layer, args


@pytest.mark.parametrize("change, exc, message", [
    (dict(query=np.zeros((2, 3, 6), np.float32)), ValueError, r"query has C = 6 .* d_model = 8"),
    (dict(query=np.zeros((3, 8), np.float32)), ValueError, r"query must have 3 dimensions"),
    (dict(query=[[[0.0] * 8] * 3] * 2), TypeError, r"query must be a NumPy array"),
    (dict(query=np.zeros((2, 3, 8))), TypeError, r"query has dtype float64 .* float32"),
    (dict(reference_points=np.zeros((2, 3, 2, 3), np.float32)), ValueError, r"reference_points must end in 2 .* or 4"),
    (dict(reference_points=np.zeros((2, 3, 3, 2), np.float32)), ValueError, r"reference_points must have shape"),
    (dict(reference_points=np.zeros((2, 4, 2, 2), np.float32)), ValueError, r"reference_points must have shape"),
    (dict(reference_points=np.zeros((3, 3, 2, 2), np.float32)), ValueError, r"reference_points must have shape"),
    (dict(input_flatten=np.zeros((2, 18, 4), np.float32)), ValueError, r"input_flatten must have shape .* C = d_model"),
    (dict(input_flatten=np.zeros((1, 18, 8), np.float32)), ValueError, r"input_flatten must have shape .* N = 2"),
    (dict(input_flatten=np.zeros((2, 17, 8), np.float32)), ValueError, r"input_spatial_shapes describe .* S = 17"),
    (dict(input_spatial_shapes=np.array([[3, 4]])), ValueError,
     r"input_spatial_shapes must have shape \(L, 2\) = \(2, 2\)"),
    (dict(input_spatial_shapes=np.array([[3.0, 4.0], [2.0, 3.0]])), TypeError,
     r"input_spatial_shapes must have an integer"),
    (dict(input_spatial_shapes=np.array([[3, 4], [0, 3]])), ValueError, r"input_spatial_shapes must hold positive"),
    (dict(input_level_start_index=np.array([0, 10])), ValueError, r"input_level_start_index must be \[0, 12\]"),
    (dict(input_padding_mask=np.zeros((2, 17), bool)), ValueError, r"input_padding_mask must have shape \(N, S\)"),
    (dict(input_padding_mask=np.zeros((2, 18))), TypeError, r"input_padding_mask must have dtype bool"),
])
def test_forward_refuses_bad_inputs(change, exc, message):
    layer, args = _layer_inputs()
    args.update(change)
    with pytest.raises(exc, match=message):
        layer.forward(**args)


def test_backward_needs_a_forward_and_a_well_shaped_gradient():
    layer, args = _layer_inputs()
    with pytest.raises(RuntimeError, match=r"backward\(\) needs a preceding forward\(\)"):
        layer.backward(np.zeros((2, 3, 8), np.float32))
    out = layer.forward(**args)
    with pytest.raises(ValueError, match=r"grad_output must have the output's shape"):
        layer.backward(np.zeros((2, 4, 8), np.float32))
    with pytest.raises(TypeError, match=r"grad_output has dtype float64"):
        layer.backward(np.zeros((2, 3, 8)))
    layer.backward(np.ones_like(out))  # refused gradients kept the activations
    with pytest.raises(RuntimeError, match=r"MSDeformAttn\.backward\(\) needs .* one backward\(\)"):
        layer.backward(np.ones_like(out))


@pytest.mark.parametrize("kwargs, exc, message", [
    (dict(d_model=10, n_heads=4), ValueError, r"d_model must be divisible by n_heads"),
    (dict(n_points=0), ValueError, r"n_points must be >= 1"),
    (dict(n_levels=2.0), TypeError, r"n_levels must be an integer"),
    (dict(n_heads=True), TypeError, r"n_heads must be an integer"),
    (dict(dtype="float16"), TypeError, r"dtype must be one of float32, float64"),
    (dict(dtype="banana"), TypeError, r"dtype must be one of"),
])
def test_constructor_refuses_bad_sizes(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        MSDeformAttn(**{"d_model": 16, **kwargs})


# --------------------------------------------------------------------------- Linear

def test_linear_forward_backward_and_accumulation():
    rng = np.random.default_rng(0)
    lin = Linear(5, 3, dtype="float64", seed=0)
    bound = 1 / math.sqrt(5)
    assert lin.params["weight"].shape == (3, 5) and np.abs(lin.params["weight"]).max() <= bound
    x, g = rng.normal(size=(2, 4, 5)), rng.normal(size=(2, 4, 3))
    W, b = lin.params["weight"], lin.params["bias"]
    np.testing.assert_allclose(lin.forward(x), np.einsum("nqi,oi->nqo", x, W) + b, rtol=1e-13)
    gx = lin.backward(g)
    np.testing.assert_allclose(gx, np.einsum("nqo,oi->nqi", g, W), rtol=1e-13)
    np.testing.assert_allclose(lin.grads["weight"], np.einsum("nqo,nqi->oi", g, x), rtol=1e-13)
    np.testing.assert_allclose(lin.grads["bias"], g.sum(axis=(0, 1)), rtol=1e-13)
    lin.forward(x)
    lin.backward(g)
    np.testing.assert_allclose(lin.grads["bias"], 2 * g.sum(axis=(0, 1)), rtol=1e-13)
    with pytest.raises(RuntimeError, match=r"Linear\.backward\(\) needs a preceding forward"):
        lin.backward(g)
    with pytest.raises(ValueError, match=r"x must end in in_features = 5"):
        lin.forward(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"in_features must be >= 1"):
        Linear(0, 3)



@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_linear_outputs_and_gradients_of_a_batch_equal_its_parts_bit_for_bit(dtype):
    # A batch (N, T, in) split along N into parts whose gradients are accumulated in
    # order gives the same bits as one call (what cydeform.dask relies on).
    rng = np.random.default_rng(3)
    x, g = rng.normal(size=(7, 33, 24)).astype(dtype), rng.normal(size=(7, 33, 40)).astype(dtype)
    # OpenBLAS on an AMD EPYC rounds a row of one GEMM differently depending on the
    # number of rows, so both passes go one image at a time.
    whole, parts = Linear(24, 40, dtype=dtype, seed=0), Linear(24, 40, dtype=dtype, seed=0)
    y = whole.forward(x)
    gx = whole.backward(g)
    outs, pieces = [], []
    for lo, hi in ((0, 1), (1, 4), (4, 7)):
        outs.append(parts.forward(x[lo:hi]))
        pieces.append(parts.backward(g[lo:hi]))
    np.testing.assert_array_equal(np.concatenate(outs), y)
    np.testing.assert_array_equal(np.concatenate(pieces), gx)
    for name in ("weight", "bias"):
        np.testing.assert_array_equal(parts.grads[name], whole.grads[name], err_msg=name)
    # Empty batches and empty sequences add nothing and do not fail.
    parts.forward(x[:0])
    parts.backward(g[:0])
    parts.forward(x[:, :0])
    parts.backward(g[:, :0])
    np.testing.assert_array_equal(parts.grads["weight"], whole.grads["weight"])


# --------------------------------------------------------------------------- helpers

def test_flatten_levels_layout():
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(2, 3, h, w)) for h, w in ((4, 5), (2, 3), (1, 1))]
    flat, shapes, starts = flatten_levels(feats)
    assert flat.shape == (2, 27, 3)
    np.testing.assert_array_equal(shapes, [[4, 5], [2, 3], [1, 1]])
    np.testing.assert_array_equal(starts, [0, 20, 26])
    n, c, i, j = 1, 2, 3, 4  # pixel (i, j) of level 0 sits at s = i * W + j
    assert flat[n, i * 5 + j, c] == feats[0][n, c, i, j]
    assert flat[n, 20 + 1 * 3 + 2, c] == feats[1][n, c, 1, 2]
    with pytest.raises(ValueError, match=r"features\[1\] has \(N, C\)"):
        flatten_levels([feats[0], np.zeros((2, 4, 2, 2))])
    with pytest.raises(ValueError, match=r"features\[0\] must have 4 dimensions"):
        flatten_levels([np.zeros((3, 2, 2))])
    with pytest.raises(ValueError, match=r"at least one level"):
        flatten_levels([])


def test_encoder_reference_points_follow_get_reference_points():
    shapes = np.array([[4, 6], [2, 3]])
    ref = encoder_reference_points(shapes)
    assert ref.shape == (1, 30, 2, 2) and ref.dtype == np.float32
    np.testing.assert_allclose(ref[0, 6 * 1 + 2, 0], [2.5 / 6, 1.5 / 4])  # level 0, row 1, column 2
    np.testing.assert_allclose(ref[0, 24 + 3 * 1 + 0, 1], [0.5 / 3, 1.5 / 2])  # level 1, row 1, column 0
    np.testing.assert_array_equal(ref[:, :, 0], ref[:, :, 1])

    vr = np.array([[[1.0, 1.0], [1.0, 1.0]], [[0.5, 0.75], [2 / 3, 1.0]]])
    got = encoder_reference_points(shapes, vr)
    # Direct transcription of Deformable DETR's loop, one position at a time.
    expected = np.zeros((2, 30, 2, 2))
    for n in range(2):
        s = 0
        for lvl, (H, W) in enumerate(shapes):
            for i in range(H):
                for j in range(W):
                    base = np.array([(j + 0.5) / (vr[n, lvl, 0] * W), (i + 0.5) / (vr[n, lvl, 1] * H)])
                    expected[n, s] = base[None, :] * vr[n]
                    s += 1
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-14)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    with pytest.raises(ValueError, match=r"valid_ratios must have shape \(N, L, 2\) with L = 2"):
        encoder_reference_points(shapes, np.ones((2, 3, 2)))


# --------------------------------------------------------------------------- GPU (skipped without one)

def _gpu():
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


@pytest.mark.skipif(_gpu() is None, reason="needs CuPy and a GPU")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cupy_layer_matches_numpy(dtype):
    cp = _gpu()
    rng = np.random.default_rng(3)
    layer, query, ref, x, shapes, mask = random_problem(rng, ref_dim=4, masked=True, dtype=dtype)
    clear_of_kinks(layer, query, ref, x, shapes, mask)
    R = rng.normal(size=(2, 3, 8)).astype(dtype)
    out = layer.forward(query, ref, x, shapes, None, mask)
    grads = layer.backward(R)
    pgrads = {k: v.copy() for k, v in layer.grads.items()}
    layer.zero_grad()
    layer.to(cp)
    assert isinstance(layer.params["value_proj.weight"], cp.ndarray)
    out_gpu = layer.forward(*(cp.asarray(a) for a in (query, ref, x)), shapes, None, cp.asarray(mask))
    grads_gpu = layer.backward(cp.asarray(R))
    tol = 1e-10 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(cp.asnumpy(out_gpu), out, rtol=tol, atol=tol)
    for a, b in zip(grads_gpu, grads):
        np.testing.assert_allclose(cp.asnumpy(a), b, rtol=tol, atol=tol)
    for k in NAMES:
        np.testing.assert_allclose(cp.asnumpy(layer.grads[k]), pgrads[k], rtol=tol, atol=tol, err_msg=k)
    with pytest.raises(TypeError, match=r"query is a NumPy array but the layer's parameters are CuPy"):
        layer.forward(query, ref, x, shapes)
