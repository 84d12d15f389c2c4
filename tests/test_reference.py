"""The float64 oracle (cydeform.reference) against hand-computed cases, an independent
bilinear sampler (scipy.ndimage), and finite differences of itself."""
import numpy as np
import pytest
from hypothesis import given
from scipy import ndimage

from cydeform.reference import ms_deform_attn_backward_reference, ms_deform_attn_reference

from strategies import args, grad_output_for, problems


def one_point(value_hw, loc_xy):
    """Sample a single-level, single-head, single-channel map at one point."""
    H, W = value_hw.shape
    value = value_hw.reshape(1, H * W, 1, 1)
    loc = np.asarray(loc_xy, np.float64).reshape(1, 1, 1, 1, 1, 2)
    attn = np.ones((1, 1, 1, 1, 1))
    return ms_deform_attn_reference(value, np.array([[H, W]]), None, loc, attn)[0, 0, 0]


def test_single_texel_centre_returns_the_texel():
    assert one_point(np.array([[7.0]]), (0.5, 0.5)) == 7.0


def test_point_between_four_texels_is_their_mean():
    v = np.array([[1.0, 2.0], [3.0, 10.0]])
    # (0.5, 0.5) on a 2x2 map is pixel coordinate (0.5, 0.5): equal weights 1/4.
    assert one_point(v, (0.5, 0.5)) == pytest.approx(4.0)


def test_point_half_outside_sees_half_of_the_edge_texel():
    v = np.array([[6.0, 100.0]])
    # x = 0 * 2 - 0.5 = -0.5: corner x0 = -1 is outside (zero), x1 = 0 has weight 0.5.
    assert one_point(v, (0.0, 0.5)) == pytest.approx(3.0)
    # Corner of the map: a quarter of the corner texel.
    assert one_point(np.array([[8.0]]), (0.0, 0.0)) == pytest.approx(2.0)


def test_point_beyond_the_border_reads_zero():
    v = np.array([[5.0, 5.0], [5.0, 5.0]])
    for loc in [(1.25, 0.5), (-0.25, 0.5), (0.5, 1.25), (0.5, -0.25), (1e30, 0.5)]:
        assert one_point(v, loc) == 0.0


def test_weighted_sum_over_levels_and_points():
    # Two 1x1 levels with values 2 and 3, weights 0.25 and 0.75 at their centres.
    value = np.array([2.0, 3.0]).reshape(1, 2, 1, 1)
    loc = np.full((1, 1, 1, 2, 1, 2), 0.5)
    attn = np.array([0.25, 0.75]).reshape(1, 1, 1, 2, 1)
    out = ms_deform_attn_reference(value, np.array([[1, 1], [1, 1]]), None, loc, attn)
    assert out[0, 0, 0] == pytest.approx(0.25 * 2 + 0.75 * 3)


@given(problems(max_batch=1))
def test_matches_scipy_bilinear_sampling_with_zero_padding(problem):
    """Every level sample equals scipy.ndimage.map_coordinates(order=1, mode='grid-constant')."""
    value, shapes, starts, loc, _ = args(problem)
    N, _, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    for l, ((H, W), start) in enumerate(zip(shapes, starts)):
        onehot = np.zeros((N, Lq, M, L, P))
        onehot[:, :, :, l, 0] = 1.0
        out = ms_deform_attn_reference(value, shapes, starts, loc, onehot).reshape(N, Lq, M, D)
        x = loc[0, :, :, l, 0, 0] * W - 0.5
        y = loc[0, :, :, l, 0, 1] * H - 0.5
        for m in range(M):
            for d in range(D):
                img = value[0, start:start + H * W, m, d].reshape(H, W)
                expected = ndimage.map_coordinates(img, [y[:, m], x[:, m]], order=1, mode="grid-constant", cval=0.0)
                np.testing.assert_allclose(out[0, :, m, d], expected, rtol=1e-12, atol=1e-12)


@given(problems(kink_margin=0.05))
def test_backward_matches_finite_differences_of_the_forward(problem):
    value, shapes, starts, loc, attn = args(problem)
    g = grad_output_for(problem).astype(np.float64)
    gv, gl, ga = ms_deform_attn_backward_reference(g, value, shapes, starts, loc, attn)

    def loss(v, lo, a):
        return float((ms_deform_attn_reference(v, shapes, starts, lo, a) * g).sum())

    rng = np.random.default_rng(0)
    # Directional derivatives along random directions: one check covers every entry.
    eps = 1e-6
    for grad, which in ((gv, 0), (gl, 1), (ga, 2)):
        direction = rng.standard_normal(grad.shape)
        if which == 1:
            direction *= 1e-3  # stay within the smooth piece (>= 0.05 px from kinks)
        inputs = [value, loc, attn]
        plus = list(inputs)
        minus = list(inputs)
        plus[which] = inputs[which] + eps * direction
        minus[which] = inputs[which] - eps * direction
        numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
        analytic = float((grad * direction).sum())
        assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-7)
