"""cydeform.jax: parity with the NumPy path (bit-exact: the same C code runs), with the
float64 oracle and an independent pure-JAX autodiff implementation, under jit, grad,
vjp, vmap and their compositions; finite differences; the functional API's errors.

Needs jax (``pip install cydeform[jax]``): skipped without it. GPU: not covered
(cydeform.jax registers CPU targets only).
"""
import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # float64 cases; float32 arrays stay float32
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

import cydeform  # noqa: E402
import cydeform.jax as cjax  # noqa: E402
from cydeform import _cpu  # noqa: E402
from cydeform.bench.jax_bench import pure_jax_msda  # noqa: E402
from cydeform.reference import ms_deform_attn_backward_reference, ms_deform_attn_reference  # noqa: E402

SHAPES = np.array([[5, 7], [3, 4], [1, 2]], dtype=np.int64)
STARTS = np.array([0, 35, 47], dtype=np.int64)
S = 49


def problem(N=2, Lq=6, M=3, D=10, P=2, dtype=np.float64, seed=0, special=True):
    """Random inputs; locations spill past the map, and with ``special`` some are NaN/inf."""
    rng = np.random.default_rng(seed)
    L = len(SHAPES)
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(-0.3, 1.3, (N, Lq, M, L, P, 2)).astype(dtype)
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype)
    if special:
        loc[0, 0, 0, 1, 0, 0] = np.nan
        loc[-1, 1, -1, 0, 1, 1] = np.inf
        loc[0, 2, 1, 2, 0] = (-5.0, 7.0)  # far outside: zero output and gradients
    grad = rng.standard_normal((N, Lq, M * D)).astype(dtype)
    return value, loc, attn, grad


def ours(v, l, a):
    return cjax.ms_deform_attn(v, SHAPES, STARTS, l, a)


def numpy_forward(v, l, a):
    return cydeform.ms_deform_attn(np.asarray(v), SHAPES, STARTS, np.asarray(l), np.asarray(a))


def numpy_backward(g, v, l, a):
    return cydeform.ms_deform_attn_backward(np.asarray(g), np.asarray(v), SHAPES, STARTS, np.asarray(l),
                                            np.asarray(a))


def assert_same(actual, expected):
    """Bit-identical (NaN where NaN), dtype included."""
    actual = np.asarray(actual)
    assert actual.dtype == expected.dtype
    np.testing.assert_array_equal(actual, expected)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    """Both thread counts, with small calls allowed onto the parallel (and chunked) paths."""
    old_threads = cydeform.get_num_threads()
    old_work = _cpu.set_min_parallel_work(0)
    cydeform.set_num_threads(request.param)
    yield request.param
    cydeform.set_num_threads(old_threads)
    _cpu.set_min_parallel_work(old_work)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_forward_is_bit_identical_to_numpy(dtype, jit, threads):
    v, l, a, _ = problem(dtype=dtype)
    f = jax.jit(ours) if jit else ours
    out = f(jnp.asarray(v), jnp.asarray(l), jnp.asarray(a))
    assert out.shape == (2, 6, 30)
    expected = numpy_forward(v, l, a)
    assert np.isnan(expected[0, 0, :10]).all() and np.isnan(expected[-1, 1, -10:]).all()
    assert_same(out, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Lq", [6, 200], ids=["Lq6", "Lq200-query-chunks"])
def test_vjp_under_jit_is_bit_identical_to_numpy_backward(dtype, Lq, threads):
    # Lq=200 on one image takes the backward's query-chunked path (two grad_value buffers)
    # and, forward and backward, the head-major layout, in the C entry points too.
    N = 1 if Lq == 200 else 2
    v, l, a, g = problem(N=N, Lq=Lq, dtype=dtype)
    if Lq == 200:
        assert _cpu._impl.query_chunks(S, Lq, len(SHAPES), 2, 1 << 30) == 2
        assert _cpu._impl.by_head(S, Lq, len(SHAPES), 2)

    @jax.jit
    def run(v, l, a, g):
        out, vjp = jax.vjp(ours, v, l, a)
        return out, *vjp(g)

    out, gv, gl, ga = run(*(jnp.asarray(x) for x in (v, l, a, g)))
    assert_same(out, numpy_forward(v, l, a))
    for got, want in zip((gv, gl, ga), numpy_backward(g, v, l, a)):
        assert_same(got, want)
    assert np.isnan(np.asarray(gl)[0, 0, 0, 1, 0]).all()
    assert (np.asarray(gl)[0, 2, 1, 2, 0] == 0).all() and np.asarray(ga)[0, 2, 1, 2, 0] == 0


def test_grad_of_a_loss_matches_numpy_backward():
    v, l, a, w = problem(special=False)

    def loss(v, l, a):
        return jnp.sum(ours(v, l, a) * w)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(v), jnp.asarray(l), jnp.asarray(a))
    for got, want in zip(grads, numpy_backward(w, v, l, a)):
        assert_same(got, want)


def test_against_the_float64_oracle():
    v, l, a, g = problem()
    out, vjp = jax.vjp(ours, jnp.asarray(v), jnp.asarray(l), jnp.asarray(a))
    np.testing.assert_allclose(np.asarray(out), ms_deform_attn_reference(v, SHAPES, STARTS, l, a),
                               rtol=1e-12, atol=1e-12)
    for got, want in zip(vjp(jnp.asarray(g)), ms_deform_attn_backward_reference(g, v, SHAPES, STARTS, l, a)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-10)


def test_against_pure_jax_autodiff():
    # An independent implementation (plain jax.numpy gathers, differentiated by JAX).
    v, l, a, g = problem(special=False)
    args = tuple(jnp.asarray(x) for x in (v, l, a))
    shapes = tuple(map(tuple, SHAPES.tolist()))
    out, vjp = jax.vjp(ours, *args)
    out_p, vjp_p = jax.vjp(lambda v, l, a: pure_jax_msda(v, shapes, l, a), *args)
    np.testing.assert_allclose(np.asarray(out), np.asarray(out_p), rtol=1e-12, atol=1e-12)
    for got, want in zip(vjp(jnp.asarray(g)), vjp_p(jnp.asarray(g))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-10)


def test_check_grads_finite_differences_float64():
    # Locations inside cells (away from the kinks of the bilinear map), so central
    # differences with eps=1e-6 never cross a cell edge.
    v, _, a, _ = problem(N=1, Lq=3, M=2, D=4, special=False)
    rng = np.random.default_rng(3)
    cells = np.array([[7, 5], [4, 3], [2, 1]], dtype=np.float64)  # (W, H) per level
    idx = rng.integers(-1, 8, (1, 3, 2, 3, 2, 2))
    frac = rng.uniform(0.2, 0.8, idx.shape)
    l = (idx + frac + 0.5) / cells[None, None, None, :, None, :]
    check_grads(ours, (jnp.asarray(v[:, :, :2, :4]), jnp.asarray(l), jnp.asarray(a[:, :3, :2])),
                order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_vmap_folds_batch_axes_into_one_call():
    B = 3
    cases = [problem(seed=s) for s in range(B)]
    v, l, a, g = (np.stack(x) for x in zip(*cases))
    out = jax.jit(jax.vmap(ours))(jnp.asarray(v), jnp.asarray(l), jnp.asarray(a))
    for b in range(B):
        assert_same(out[b], numpy_forward(v[b], l[b], a[b]))
    # One custom call of the folded batch, not a loop: the jaxpr has a single ffi_call.
    jaxpr = str(jax.make_jaxpr(jax.vmap(ours))(v, l, a))
    assert jaxpr.count("ffi_call") == 1
    # Nested vmap: two batch axes fold alike.
    out2 = jax.vmap(jax.vmap(ours))(v[None], l[None], a[None])
    assert_same(out2[0], np.asarray(out))


def test_vmap_of_vjp_per_example():
    B = 2
    v, l, a, g = (np.stack(x) for x in zip(*[problem(seed=s) for s in range(B)]))

    def one(v, l, a, g):
        _, vjp = jax.vjp(ours, v, l, a)
        return vjp(g)

    grads = jax.jit(jax.vmap(one))(*(jnp.asarray(x) for x in (v, l, a, g)))
    for b in range(B):
        for got, want in zip(grads, numpy_backward(g[b], v[b], l[b], a[b])):
            assert_same(got[b], want)


def test_jit_grad_vmap_with_shared_value():
    # value unbatched (in_axes None), locations and weights batched: grad_value sums
    # over the batch.
    B = 3
    v = problem()[0]
    cases = [problem(seed=s + 10, special=False) for s in range(B)]
    l, a, w = (np.stack(x) for x in zip(*[(c[1], c[2], c[3]) for c in cases]))

    def loss(v, l, a):
        return jnp.sum(jax.vmap(ours, in_axes=(None, 0, 0))(v, l, a) * w)

    gv, gl, ga = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(v), jnp.asarray(l), jnp.asarray(a))
    per = [numpy_backward(w[b], v, l[b], a[b]) for b in range(B)]
    np.testing.assert_allclose(np.asarray(gv), sum(p[0] for p in per), rtol=1e-13, atol=1e-13)
    for b in range(B):
        assert_same(gl[b], per[b][1])
        assert_same(ga[b], per[b][2])


def test_output_dtype_follows_value_and_float32_stays_float32():
    v, l, a, _ = problem(dtype=np.float32)
    out = jax.jit(ours)(v, l, a)
    assert out.dtype == jnp.float32
    g = jax.grad(lambda v: ours(v, l, a).sum())(jnp.asarray(v))
    assert g.dtype == jnp.float32


def _numpy_error(v, shapes, starts, l, a):
    with pytest.raises((TypeError, ValueError)) as info:
        cydeform.ms_deform_attn(v, shapes, starts, l, a)
    return info.type, str(info.value)


@pytest.mark.parametrize("case", ["float16", "mixed dtypes", "ndim", "S mismatch", "bad starts", "M mismatch"])
def test_bad_input_gets_the_functional_api_error_at_trace_time(case):
    v, l, a, _ = problem()
    shapes, starts = SHAPES, STARTS
    if case == "float16":
        v, l, a = (x.astype(np.float16) for x in (v, l, a))
    elif case == "mixed dtypes":
        a = a.astype(np.float32)
    elif case == "ndim":
        a = a[0]
    elif case == "S mismatch":
        v = v[:, :-1]
    elif case == "bad starts":
        starts = np.array([0, 35, 46])
    elif case == "M mismatch":
        v = v[:, :, :2]
    exc_type, message = _numpy_error(v, shapes, starts, l, a)
    # eval_shape traces without running: the error comes from tracing.
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (v, l, a)]
    with pytest.raises(exc_type) as info:
        jax.eval_shape(lambda v, l, a: cjax.ms_deform_attn(v, shapes, starts, l, a), *specs)
    assert str(info.value) == message


def test_traced_spatial_shapes_are_refused_by_name():
    v, l, a, _ = problem()
    with pytest.raises(TypeError, match="spatial_shapes must be static"):
        jax.jit(lambda s, v, l, a: cjax.ms_deform_attn(v, s, None, l, a))(SHAPES, v, l, a)
    with pytest.raises(TypeError, match="level_start_index must be static"):
        jax.jit(lambda s, v, l, a: cjax.ms_deform_attn(v, SHAPES, s, l, a))(STARTS, v, l, a)


def test_static_geometry_as_tuples_and_concrete_jax_arrays():
    v, l, a, _ = problem()
    expected = numpy_forward(v, l, a)
    assert_same(cjax.ms_deform_attn(v, ((5, 7), (3, 4), (1, 2)), None, l, a), expected)
    assert_same(cjax.ms_deform_attn(v, jnp.asarray(SHAPES), jnp.asarray(STARTS), l, a), expected)


def test_importing_cydeform_does_not_import_jax():
    code = "import sys, cydeform, cydeform.functional, cydeform.nn; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_missing_compiler_is_named(monkeypatch):
    from cydeform import _jax_ffi

    monkeypatch.setenv("CXX", "no-such-compiler-cydeform")
    with pytest.raises(_jax_ffi.BuildError, match="no-such-compiler-cydeform"):
        _jax_ffi.library_path()
