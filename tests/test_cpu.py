"""The Cython CPU backend against the float64 oracle, finite differences, and its own
invariants (linearity, thread-count independence, non-finite semantics, input safety)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import cydeform
from cydeform.reference import ms_deform_attn_backward_reference, ms_deform_attn_reference

from strategies import args, grad_output_for, problems, push_off_kinks

# Forward: float32 keeps ~7 digits over sums of a few dozen terms.
TOL = {np.float64: dict(rtol=1e-12, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-5)}


def assert_close(actual, expected, dtype, scale=1.0):
    tol = TOL[dtype]
    np.testing.assert_allclose(actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale)


@given(problems(kink_margin=0.05))
def test_gradients_match_central_finite_differences(problem):
    """Every entry of every gradient, in float64, through the Cython forward."""
    value, shapes, starts, loc, attn = args(problem)
    g = grad_output_for(problem).astype(np.float64)
    grads = cydeform.ms_deform_attn_backward(g, value, shapes, starts, loc, attn)

    def loss(v, lo, a):
        return float((cydeform.ms_deform_attn(v, shapes, starts, lo, a) * g).sum())

    inputs = [value, loc, attn]
    # eps in normalised units: 1e-7 moves a point < 1e-6 px, far inside the 0.05 px margin.
    for which, eps in ((0, 1e-6), (1, 1e-7), (2, 1e-6)):
        numeric = np.empty_like(inputs[which])
        flat = numeric.reshape(-1)
        base = inputs[which]
        for i in range(base.size):
            plus, minus = base.copy(), base.copy()
            plus.reshape(-1)[i] += eps
            minus.reshape(-1)[i] -= eps
            hi = list(inputs)
            lo = list(inputs)
            hi[which], lo[which] = plus, minus
            flat[i] = (loss(*hi) - loss(*lo)) / (2 * eps)
        np.testing.assert_allclose(grads[which], numeric, rtol=1e-5, atol=1e-6)


@pytest.fixture
def restore_threads():
    """Let small problems use threads (normally they run on one), then restore."""
    from cydeform import _cpu

    before = cydeform.get_num_threads()
    threshold = _cpu.set_min_parallel_work(0)
    yield
    _cpu.set_min_parallel_work(threshold)
    cydeform.set_num_threads(before)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture only restores state
@given(data=st.data())
def test_results_are_bit_identical_for_any_thread_count(restore_threads, dtype, data):
    problem = data.draw(problems(dtype=dtype, max_batch=3))
    g = grad_output_for(problem)
    results = []
    for threads in (1, 2, 3):
        cydeform.set_num_threads(threads)
        results.append((cydeform.ms_deform_attn(*args(problem)),
                        *cydeform.ms_deform_attn_backward(g, *args(problem))))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert np.array_equal(a, b, equal_nan=True)
            assert a.tobytes() == b.tobytes()


def test_thread_count_is_settable_and_validated(restore_threads):
    cydeform.set_num_threads(1)
    assert cydeform.get_num_threads() == 1


def test_inputs_are_never_modified_and_read_only_non_contiguous_inputs_work():
    rng = np.random.default_rng(3)
    shapes = np.array([[3, 4], [2, 2]])
    base_value = rng.standard_normal((1, 16, 4, 6))
    value = base_value[:, :, ::2, :]  # non-contiguous (N, S, M=2, D)
    loc = np.asfortranarray(rng.uniform(-0.2, 1.2, (1, 5, 2, 2, 3, 2)))
    attn = rng.uniform(0, 1, (1, 5, 2, 2, 3))
    g = rng.standard_normal((1, 5, 12))[:, :, :]
    for a in (value, loc, attn, g, shapes):
        a.flags.writeable = False
    copies = [a.copy() for a in (value, loc, attn, g, shapes)]
    out = cydeform.ms_deform_attn(value, shapes, None, loc, attn)
    grads = cydeform.ms_deform_attn_backward(g, value, shapes, None, loc, attn)
    for a, c in zip((value, loc, attn, g, shapes), copies):
        assert np.array_equal(a, c)
    contiguous = [np.ascontiguousarray(a) for a in (value, loc, attn, g)]
    np.testing.assert_array_equal(out, cydeform.ms_deform_attn(contiguous[0], shapes, None, contiguous[1], contiguous[2]))
    for a, b in zip(grads, cydeform.ms_deform_attn_backward(contiguous[3], contiguous[0], shapes, None,
                                                            contiguous[1], contiguous[2])):
        np.testing.assert_array_equal(a, b)


def test_level_start_index_none_equals_explicit_offsets():
    rng = np.random.default_rng(4)
    shapes = np.array([[3, 5], [2, 1]], dtype=np.int32)
    value = rng.standard_normal((2, 17, 2, 3))
    loc = rng.uniform(0, 1, (2, 4, 2, 2, 2, 2))
    attn = rng.uniform(0, 1, (2, 4, 2, 2, 2))
    a = cydeform.ms_deform_attn(value, shapes, None, loc, attn)
    b = cydeform.ms_deform_attn(value, shapes, np.array([0, 15], dtype=np.int32), loc, attn)
    assert np.array_equal(a, b)


def test_backward_accepts_deterministic_keyword():
    rng = np.random.default_rng(5)
    value = rng.standard_normal((1, 4, 1, 2))
    loc = rng.uniform(0, 1, (1, 3, 1, 1, 2, 2))
    attn = rng.uniform(0, 1, (1, 3, 1, 1, 2))
    g = rng.standard_normal((1, 3, 2))
    a = cydeform.ms_deform_attn_backward(g, value, [[2, 2]], None, loc, attn)
    b = cydeform.ms_deform_attn_backward(g, value, [[2, 2]], None, loc, attn, deterministic=True)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(data=st.data())
def test_every_instruction_set_build_gives_bit_identical_results(dtype, data):
    """The baseline, AVX2 and AVX-512 builds differ in speed only (where this CPU runs them)."""
    import importlib

    from cydeform import _cpu

    isas = _cpu.available_isas()
    if len(isas) < 2:
        pytest.skip(f"only the {isas[0]} build runs on this processor: nothing to compare")
    problem = data.draw(problems(dtype=dtype, nonfinite=data.draw(st.booleans())))
    g = grad_output_for(problem)
    value, shapes, starts, loc, attn = args(problem)
    results = []
    for isa in isas:
        impl = importlib.import_module(f"cydeform._cpu_{isa}")
        results.append((impl.forward(value, shapes, starts, loc, attn),
                        *impl.backward(g, value, shapes, starts, loc, attn),
                        # and the head-major path, whatever the problem's shape would pick
                        impl.forward(value, shapes, starts, loc, attn, layout="heads"),
                        *impl.backward(g, value, shapes, starts, loc, attn, method="dense", layout="heads"),
                        # and the sparse backward (its own dots and streamed-out blocks)
                        *impl.backward(g, value, shapes, starts, loc, attn, method="sparse")))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert a.tobytes() == b.tobytes()


def test_chunked_backward_matches_oracle_and_is_thread_invariant(restore_threads):
    """One image with many samples per value position: the backward splits the queries
    into chunks with their own grad_value buffers (asserted), summed in a fixed order."""
    from cydeform import _cpu

    rng = np.random.default_rng(7)
    shapes = np.array([[3, 4], [2, 2]])
    N, S, M, D, Lq, L, P = 1, 16, 3, 9, 64, 2, 2
    assert _cpu._impl.query_chunks(S, Lq, L, P, Lq * M * L * P * D) > 1
    value = rng.standard_normal((N, S, M, D))
    loc = rng.uniform(-0.2, 1.2, (N, Lq, M, L, P, 2))
    attn = rng.uniform(0, 1, (N, Lq, M, L, P))
    g = rng.standard_normal((N, Lq, M * D))
    expected = ms_deform_attn_backward_reference(g, value, shapes, None, loc, attn)
    results = []
    for threads in (1, 2, 3):
        cydeform.set_num_threads(threads)
        results.append(cydeform.ms_deform_attn_backward(g, value, shapes, None, loc, attn))
    for got in results:
        for a, b, e in zip(got, results[0], expected):
            assert a.tobytes() == b.tobytes()
            np.testing.assert_allclose(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("threads", [1, 2])
def test_each_images_gradients_are_the_same_alone_or_in_a_batch(restore_threads, threads):
    """The chunked backward's summation order depends on one image's size only, so a
    batch gives each image the bits it gets alone (cydeform.dask's chunks rely on it)."""
    from cydeform import _cpu

    cydeform.set_num_threads(threads)
    rng = np.random.default_rng(11)
    shapes = np.array([[3, 4], [2, 2]])
    N, S, M, D, Lq, L, P = 3, 16, 2, 5, 48, 2, 2
    assert _cpu._impl.query_chunks(S, Lq, L, P, Lq * M * L * P * D) > 1
    value = rng.standard_normal((N, S, M, D)).astype(np.float32)
    loc = rng.uniform(-0.2, 1.2, (N, Lq, M, L, P, 2)).astype(np.float32)
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(np.float32)
    g = rng.standard_normal((N, Lq, M * D)).astype(np.float32)
    batch = cydeform.ms_deform_attn_backward(g, value, shapes, None, loc, attn)
    for n in range(N):
        alone = cydeform.ms_deform_attn_backward(g[n:n + 1], value[n:n + 1], shapes, None, loc[n:n + 1],
                                                 attn[n:n + 1])
        for a, b in zip(alone, batch):
            assert a[0].tobytes() == b[n].tobytes()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture only restores state
@given(data=st.data(), dtype=st.sampled_from([np.float64, np.float32]), nonfinite=st.booleans())
def test_chunked_backward_on_random_problems(restore_threads, data, dtype, nonfinite):
    """Images with many samples per value position take the chunked backward
    (several grad_value buffers): it matches the oracle and ignores the thread count."""
    from hypothesis import assume

    from cydeform import _cpu

    problem = data.draw(problems(dtype=dtype, nonfinite=nonfinite, max_side=2, max_batch=2,
                                 kink_margin=1e-3 if dtype == np.float32 else None, min_queries=16, max_queries=40))
    value, shapes, starts, loc, attn = args(problem)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    assume(_cpu._impl.query_chunks(S, Lq, L, P, Lq * M * L * P * D) > 1)
    g = grad_output_for(problem)
    expected = ms_deform_attn_backward_reference(g, *args(problem))
    results = []
    for threads in (1, 2, 3):
        cydeform.set_num_threads(threads)
        results.append(cydeform.ms_deform_attn_backward(g, *args(problem)))
    for got in results:
        for a, b, e in zip(got, results[0], expected):
            assert a.tobytes() == b.tobytes()
            assert np.array_equal(np.isnan(a), np.isnan(e))
            assert_close(np.nan_to_num(a), np.nan_to_num(e), dtype, scale=10.0)


def assert_sparse_matches_dense(g, value, shapes, starts, loc, attn, threads=(1, 2, 3)):
    """The sparse backward gives the dense backward's bits at each thread count; returns
    the last sparse result."""
    from cydeform import _cpu

    dense = _cpu._impl.backward(g, value, shapes, starts, loc, attn, method="dense")
    for n in threads:
        cydeform.set_num_threads(n)
        sparse = _cpu._impl.backward(g, value, shapes, starts, loc, attn, method="sparse")
        for a, b in zip(sparse, dense):
            assert a.tobytes() == b.tobytes()
    return sparse


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture only restores state
@given(data=st.data(), dtype=st.sampled_from([np.float64, np.float32]), nonfinite=st.booleans())
def test_sparse_and_dense_backward_give_the_same_bits(restore_threads, data, dtype, nonfinite):
    """The sparse backward (sorted scatter, the default for few samples per value
    position) sums every element in the dense backward's order, for any thread count."""
    from hypothesis import assume

    from cydeform import _cpu

    problem = data.draw(problems(dtype=dtype, nonfinite=nonfinite, max_batch=3))
    value, shapes, starts, loc, attn = args(problem)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    assume(_cpu._impl.query_chunks(S, Lq, L, P, Lq * M * L * P * D) == 1)  # one dense buffer
    g = grad_output_for(problem)
    assert_sparse_matches_dense(g, value, shapes, starts, loc, attn)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_backward_nonfinite_grad_output_at_a_border_point(restore_threads, dtype):
    """A point on the map's border has corners outside it, whose dot products are
    g . 0: NaN where grad_output is infinite (as in the dense backward, which reads a
    zero row there), so that point's location and weight gradients are NaN too, and the
    sparse and dense methods agree bit for bit."""
    from cydeform import _cpu

    rng = np.random.default_rng(3)
    shapes = np.array([[6, 7], [3, 4]], dtype=np.int64)
    starts = np.array([0, 42], dtype=np.int64)
    N, S, M, D, Lq, L, P = 1, 54, 2, 9, 4, 2, 2
    assert _cpu._impl.sparse_applies(S, Lq, L, P)
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(0.2, 0.8, (N, Lq, M, L, P, 2)).astype(dtype)
    loc[0, 1, 0, 0, 1] = [0.02, 0.5]  # x = 0.02 * 7 - 0.5 < 0: the left corners are outside
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype)
    g = rng.standard_normal((N, Lq, M * D)).astype(dtype)
    g[0, 1, 3] = np.inf  # query 1, head 0
    dense = _cpu._impl.backward(g, value, shapes, starts, loc, attn, method="dense")
    sparse = _cpu._impl.backward(g, value, shapes, starts, loc, attn, method="sparse")
    assert np.isnan(sparse[2][0, 1, 0, 0, 1]) and np.isnan(sparse[1][0, 1, 0, 0, 1]).all()
    assert np.isfinite(sparse[2][0, 2]).all()  # other queries untouched
    for a, b in zip(sparse, dense):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_backward_with_and_without_the_block_prefetch_gives_the_same_bits(restore_threads, dtype):
    """Phase 3 of the sparse method prefetches each next block's value rows or not (a
    choice by processor, sparse_block_prefetch_default): the same bytes either way, over
    many blocks and a short last one, at any thread count; the benchmark's floor takes the
    same argument."""
    from cydeform import _cpu
    from cydeform.bench.floor import corner_rows, sparse_slots

    rng = np.random.default_rng(5)
    shapes = np.array([[40, 50], [20, 25], [7, 9]], dtype=np.int64)
    starts = np.array([0, 2000, 2500], dtype=np.int64)
    N, S, M, D, Lq, L, P = 1, 2563, 4, 24, 20, 3, 4
    assert _cpu._impl.sparse_applies(S, Lq, L, P)
    itemsize = np.dtype(dtype).itemsize
    assert _cpu._impl.sparse_blocks(N * S * M, D, itemsize) > 3
    assert N * S * M % (1 << _cpu._impl.sparse_block_shift(D, itemsize)) != 0  # a short last block
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(-0.1, 1.1, (N, Lq, M, L, P, 2)).astype(dtype)
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype)
    g = rng.standard_normal((N, Lq, M * D)).astype(dtype)
    assert _cpu._impl.sparse_block_prefetch_default() in (True, False)
    want = None
    for threads in (1, 2, 3):
        cydeform.set_num_threads(threads)
        for prefetch in (True, False, None):
            got = _cpu._impl.backward(g, value, shapes, starts, loc, attn, method="sparse",
                                      block_prefetch=prefetch)
            assert np.count_nonzero(got[0]) > 0
            want = want or got
            for a, b in zip(got, want):
                assert a.tobytes() == b.tobytes()
    slots = sparse_slots(corner_rows(value.shape, shapes, starts, loc), value.shape, itemsize)
    floors = [_cpu._impl.sparse_floor(value, *slots, block_prefetch=prefetch) for prefetch in (True, False)]
    assert floors[0].tobytes() == floors[1].tobytes() and np.count_nonzero(floors[0]) > 0
    with pytest.raises(ValueError, match="block_prefetch"):
        _cpu._impl.backward(g, value, shapes, starts, loc, attn, method="sparse", block_prefetch="auto")


@pytest.mark.parametrize("M", [1, 3])
def test_sparse_backward_pairs_of_corners_across_a_block_boundary(restore_threads, M):
    """The sparse method places a point's corners 0 and 1 (2 and 3) as one record where
    both are in the map and in one grad_value block. With 4 rows a block (D = 2048
    float64) many such pairs straddle a block boundary and go as two records, others as
    one: the same bits as the dense method either way, for any thread count."""
    from cydeform import _cpu

    rng = np.random.default_rng(M)
    shapes = np.array([[6, 7], [3, 4]], dtype=np.int64)
    starts = np.array([0, 42], dtype=np.int64)
    N, S, D, Lq, L, P = 2, 54, 2048, 6, 2, 2
    shift = _cpu._impl.sparse_block_shift(D, 8)
    assert shift == 2 and _cpu._impl.sparse_applies(S, Lq, L, P)
    value = rng.standard_normal((N, S, M, D))
    loc = rng.uniform(0.05, 0.95, (N, Lq, M, L, P, 2))
    attn = rng.uniform(0, 1, (N, Lq, M, L, P))
    g = rng.standard_normal((N, Lq, M * D))
    # Corner 0's grad_value row where corner 1 is in the map too: both kinds of pair occur.
    H, W = shapes[:, 0][None, None, None, :, None], shapes[:, 1][None, None, None, :, None]
    x0 = np.floor(loc[..., 0] * W - 0.5).astype(np.int64)
    y0 = np.floor(loc[..., 1] * H - 0.5).astype(np.int64)
    n = np.arange(N)[:, None, None, None, None]
    m = np.arange(M)[None, None, :, None, None]
    key = n * S * M + (starts[None, None, None, :, None] + y0 * W + x0) * M + m
    both = (x0 >= 0) & (x0 + 1 < W) & (y0 >= 0) & (y0 < H)
    straddle = (key >> shift) != ((key + M) >> shift)
    assert (both & straddle).any() and (both & ~straddle).any()
    assert_sparse_matches_dense(g, value, shapes, starts, loc, attn)


def _edge_locations(loc, shapes, P):
    """Queries 1-4 of ``loc`` (N, Lq, M, L, P, 2) onto the cell edges x = -1 and x = W - 1,
    the first texel row and texel centres (lx = 0), level by level."""
    Wl = shapes[:, 1].astype(float)[:, None]  # (L, 1), against (N, M, L, P)
    Hl = shapes[:, 0].astype(float)[:, None]
    loc[:, 1, :, :, :, 0] = -0.5 / Wl  # x = -1: the first cell edge, corners x0 outside
    loc[:, 2, :, :, :, 0] = (Wl - 0.5) / Wl  # x = W - 1: the last texel centre
    loc[:, 3, :, :, :, 1] = 0.5 / Hl  # y = 0: the first texel row
    loc[:, 4, :, :, :, 0] = (np.arange(P) * 2 % shapes[:, 1][:, None] + 0.5) / Wl  # texel centres: lx = 0


@pytest.mark.parametrize("P", [5, 8, 23])
@pytest.mark.parametrize("layout", ["positions", "heads"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_geometry_eight_points_at_a_time(restore_threads, dtype, layout, P):
    """The AVX-512 build's forward takes a row's points 8 at a time (cyd_forward_points,
    src/msda_inner.h), the other builds one at a time (_forward_row). With L P = 15 (one
    group of 8, then 7 one at a time), 24 (three groups) and 69 (two blocks of up to 64
    points, the second 5 one at a time), D = 19 (a 16-float vector and a scalar tail) and
    locations that hit every case (not finite, outside the map, on the cell edges x = -1
    and x = W - 1, on texel centres, levels of width or height 1), every build gives the
    same bits, and the oracle's values."""
    from cydeform import _cpu

    rng = np.random.default_rng(21)
    shapes = np.array([[9, 9], [20, 1], [1, 6]], dtype=np.int64)
    starts = np.array([0, 81, 101], dtype=np.int64)
    N, S, M, D, Lq, L = 2, 107, 3, 19, 9, 3
    assert _cpu._impl.forward_vector_applies(shapes, starts) == (_cpu._impl.forward_geometry_lanes() == 8)
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(-0.3, 1.3, (N, Lq, M, L, P, 2))
    _edge_locations(loc, shapes, P)
    loc[:, 5, 1, 0, 1] = [np.nan, 0.5]  # in the first group of 8
    loc[:, 5, 1, 2, P - 1] = [0.5, np.inf]  # the row's last point
    loc[:, 6, 2, 1, 0] = [-np.inf, -np.inf]
    loc[:, 7, :, :, :, 0] = rng.choice([-0.6, 1.6], (N, M, L, P))  # outside
    Hl = shapes[:, 0].astype(float)[:, None]
    loc[:, 8, :, :, :, 1] = (Hl - 0.5) / Hl + 0.25 / Hl  # y between H - 1 and H: corners y0 + 1 outside
    loc = loc.astype(dtype)
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype)
    import importlib

    outs = {}
    for isa in _cpu.available_isas():
        impl = importlib.import_module(f"cydeform._cpu_{isa}")
        assert impl.forward_geometry_lanes() == (8 if isa == "avx512" and impl.geometry_lanes()[1] else 1)
        for threads in (1, 2):
            impl.set_num_threads(threads)
            outs[isa, threads] = impl.forward(value, shapes, starts, loc, attn, layout=layout)
    first = next(iter(outs.values()))
    for out in outs.values():
        assert out.tobytes() == first.tobytes()
    assert np.isnan(first[:, 5, 1 * D:2 * D]).all() and np.isnan(first[:, 6, 2 * D:3 * D]).all()
    ok = np.ones(first.shape, bool)
    ok[:, 5, D:2 * D] = ok[:, 6, 2 * D:3 * D] = False
    expect = ms_deform_attn_reference(value.astype(np.float64), shapes, starts,
                                      loc.astype(np.float64), attn.astype(np.float64))
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(first[ok], expect[ok], rtol=tol, atol=tol)


def test_forward_vector_code_only_for_levels_it_is_exact_on():
    """cyd_forward_points truncates x and y to int32 and forms a level's positions in a double:
    levels 2^31 wide or tall, or past 2^53 positions, take the scalar path in every build
    (decided from the shapes alone; no such array is made)."""
    import importlib

    from cydeform import _cpu

    for isa in _cpu.available_isas():
        impl = importlib.import_module(f"cydeform._cpu_{isa}")
        vector = impl.forward_geometry_lanes() == 8
        ok = np.array([[5, 7], [2**31 - 1, 1]], dtype=np.int64)
        assert impl.forward_vector_applies(ok, np.array([0, 35], dtype=np.int64)) == vector
        for shapes, starts in [([[5, 7], [1, 2**31]], [0, 35]), ([[2**31, 1]], [0]),
                               ([[2**26, 2**27]], [0]), ([[4, 4]], [2**53 - 16])]:
            assert not impl.forward_vector_applies(np.array(shapes, dtype=np.int64),
                                                   np.array(starts, dtype=np.int64))
        assert impl.forward_vector_applies(np.array([[4, 4]], dtype=np.int64),
                                           np.array([2**53 - 17], dtype=np.int64)) == vector


@pytest.mark.parametrize("D", [31, 48, 64, 79])
def test_forward_accumulation_vector_widths_agree(D):
    """The forward's accumulation takes 16 float channels a vector in the AVX-512 build and 8
    elsewhere, in blocks of 4, 2 or 1 vectors and then one channel at a time: these D take
    every block (the drawn problems stop at D = 17), and every build gives the same bits."""
    import importlib

    from cydeform import _cpu

    rng = np.random.default_rng(D)
    shapes = np.array([[5, 7], [3, 2]], dtype=np.int64)
    starts = np.array([0, 35], dtype=np.int64)
    N, S, M, Lq, L, P = 1, 41, 2, 6, 2, 3
    value = rng.standard_normal((N, S, M, D)).astype(np.float32)
    loc = rng.uniform(-0.2, 1.2, (N, Lq, M, L, P, 2)).astype(np.float32)
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(np.float32)
    outs = [importlib.import_module(f"cydeform._cpu_{isa}").forward(value, shapes, starts, loc, attn,
                                                                        layout=layout)
            for isa in _cpu.available_isas() for layout in ("positions", "heads")]
    for out in outs[1:]:
        assert out.tobytes() == outs[0].tobytes()
    expect = ms_deform_attn_reference(value.astype(np.float64), shapes, starts, loc.astype(np.float64),
                                      attn.astype(np.float64))
    np.testing.assert_allclose(outs[0], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_backward_geometry_four_points_at_a_time(restore_threads, dtype):
    """The sparse method's geometry (phase 1) and its location and weight gradients
    (phase 4) take a row's points 4 at a time (vector types, in the AVX2 and AVX-512
    builds; the geometry 8 at a time first in the AVX-512 build) and the rest one at a
    time (cyd_sparse_geometry, cyd_sparse_gradients, src/msda_inner.h); the dense method
    takes them one at a time. With L P = 15 (three groups of 4, or one of 8 and one of 4,
    then 3) and locations that hit every case (not finite, outside the
    map, on the cell edges x = -1 and x = W - 1, on texel centres, on the border; a row
    with no point in the map), both give the same bits, in every instruction-set build."""
    from cydeform import _cpu

    rng = np.random.default_rng(12)
    shapes = np.array([[9, 9], [20, 1], [1, 6]], dtype=np.int64)  # a level of width 1, one of height 1
    starts = np.array([0, 81, 101], dtype=np.int64)
    N, S, M, D, Lq, L, P = 2, 107, 3, 8, 7, 3, 5
    assert _cpu._impl.sparse_applies(S, Lq, L, P) and L * P % 4 != 0
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(-0.3, 1.3, (N, Lq, M, L, P, 2))
    _edge_locations(loc, shapes, P)
    loc[:, 5, 1, 0, 1] = [np.nan, 0.5]
    loc[:, 5, 1, 1, 2] = [0.5, np.inf]
    loc[:, 5, 2, 2, 3] = [-np.inf, -np.inf]
    loc[:, 6, :, :, :, 0] = rng.choice([-0.6, 1.6], (N, M, L, P))  # cells without a texel
    loc = loc.astype(dtype)
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype)
    g = rng.standard_normal((N, Lq, M * D)).astype(dtype)
    sparse = assert_sparse_matches_dense(g, value, shapes, starts, loc, attn, threads=(1, 2))
    dense = _cpu._impl.backward(g, value, shapes, starts, loc, attn, method="dense")
    assert np.isnan(sparse[2][:, 5, 1, 0, 1]).all() and (sparse[2][:, 6] == 0).all()
    # and every instruction-set build this processor runs (the baseline one without AVX)
    import importlib

    for isa in _cpu.available_isas():
        impl = importlib.import_module(f"cydeform._cpu_{isa}")
        lanes, have_shufflevector = impl.geometry_lanes()
        # the vector paths are built where AVX is and the compiler can (else this test
        # would pass without ever running them): 8 then 4 points a step with AVX-512
        assert lanes == ({"avx2": 4, "avx512": 8}.get(isa, 1) if have_shufflevector else 1)
        other = impl.backward(g, value, shapes, starts, loc, attn, method="sparse")
        for a, b in zip(other, dense):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype,D,misalign", [(np.float32, 32, 4), (np.float32, 11, 12), (np.float64, 33, 8)])
def test_sparse_backward_c_entry_point_writes_a_misaligned_grad_value(restore_threads, dtype, D, misalign):
    """The C entry point (what cydeform.jax calls) writes grad_value wherever the caller's
    buffer starts: the sparse method streams each block out with 64-byte-aligned
    non-temporal stores and plain copies for the ends. Same bits as the NumPy path, and
    the bytes around the buffer untouched."""
    import ctypes

    from cydeform import _cpu

    rng = np.random.default_rng(D)
    shapes = np.array([[20, 30], [10, 15], [5, 8]], dtype=np.int64)
    starts = np.array([0, 600, 750], dtype=np.int64)
    S = 790
    N, M, Lq, L, P = 2, 4, 30, 3, 2
    assert _cpu._impl.sparse_applies(S, Lq, L, P)
    assert _cpu._impl.sparse_blocks(N * S * M, D, np.dtype(dtype).itemsize) > 1
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(-0.1, 1.1, (N, Lq, M, L, P, 2)).astype(dtype)
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype)
    g = rng.standard_normal((N, Lq, M * D)).astype(dtype)
    want = _cpu._impl.backward(g, value, shapes, starts, loc, attn)
    raw = np.full(value.nbytes + 192, 0xAB, dtype=np.uint8)
    start = (-raw.ctypes.data) % 64 + misalign  # misalign bytes past a 64-byte boundary
    grad_value = raw[start:start + value.nbytes].view(dtype).reshape(value.shape)
    grad_loc, grad_attn = np.empty_like(loc), np.empty_like(attn)
    ptr = lambda a: ctypes.c_void_p(a.ctypes.data)
    fn = ctypes.CFUNCTYPE(ctypes.c_int, *[ctypes.c_void_p] * 9, *[ctypes.c_int64] * 7)(
        _cpu._impl.c_entry_points()["backward_f32" if dtype == np.float32 else "backward_f64"])
    for threads in (1, 2, 3):
        cydeform.set_num_threads(threads)
        grad_value.fill(np.nan)
        assert fn(ptr(g), ptr(value), ptr(shapes), ptr(starts), ptr(loc), ptr(attn), ptr(grad_value),
                  ptr(grad_loc), ptr(grad_attn), N, S, M, D, Lq, L, P) == 0
        for a, b in zip((grad_value, grad_loc, grad_attn), want):
            assert a.tobytes() == b.tobytes()
        assert np.all(raw[:start] == 0xAB) and np.all(raw[start + value.nbytes:] == 0xAB)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture only restores state
@given(data=st.data(), dtype=st.sampled_from([np.float64, np.float32]), nonfinite=st.booleans())
def test_head_major_and_given_layouts_give_the_same_bits(restore_threads, data, dtype, nonfinite):
    """Forward and dense backward on the op's head-major copy of value (the default for
    many samples per value position) sum in the same order as on value as given, for
    any thread count."""
    from cydeform import _cpu

    problem = data.draw(problems(dtype=dtype, nonfinite=nonfinite, max_batch=3))
    value, shapes, starts, loc, attn = args(problem)
    g = grad_output_for(problem)
    out = _cpu._impl.forward(value, shapes, starts, loc, attn, layout="positions")
    grads = _cpu._impl.backward(g, value, shapes, starts, loc, attn, method="dense", layout="positions")
    for threads in (1, 2, 3):
        cydeform.set_num_threads(threads)
        assert _cpu._impl.forward(value, shapes, starts, loc, attn, layout="heads").tobytes() == out.tobytes()
        got = _cpu._impl.backward(g, value, shapes, starts, loc, attn, method="dense", layout="heads")
        for a, b in zip(got, grads):
            assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dtype,D", [(np.float64, 5), (np.float32, 32)])
def test_head_major_path_over_many_query_blocks_matches_the_oracle(restore_threads, dtype, D):
    """An encoder-like call (a query per position, 8 samples each) goes head-major, with
    two query chunks and more queries per head than one copy block (32); it matches the
    oracle at 1-3 threads, through the public API and the C entry point's rule."""
    from cydeform import _cpu

    rng = np.random.default_rng(D)
    shapes = np.array([[9, 11], [5, 6]])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    N, M, Lq, L, P = 2, 3, S, 2, 4
    assert _cpu._impl.by_head(S, Lq, L, P) and not _cpu._impl.by_head(S, S // 4 - 1, L, P)
    assert _cpu._impl.query_chunks(S, Lq, L, P, Lq * M * L * P * D) == 2
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(-0.1, 1.1, (N, Lq, M, L, P, 2))
    loc = push_off_kinks(loc, shapes, 1e-3).astype(dtype)
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype)
    g = rng.standard_normal((N, Lq, M * D)).astype(dtype)
    expected_out = ms_deform_attn_reference(value, shapes, None, loc, attn)
    expected = ms_deform_attn_backward_reference(g, value, shapes, None, loc, attn)
    for threads in (1, 2, 3):
        cydeform.set_num_threads(threads)
        assert_close(cydeform.ms_deform_attn(value, shapes, None, loc, attn), expected_out, dtype)
        for a, e in zip(cydeform.ms_deform_attn_backward(g, value, shapes, None, loc, attn), expected):
            assert_close(a, e, dtype, scale=4.0)
    with pytest.raises(ValueError, match="layout"):
        _cpu._impl.forward(value, shapes.astype(np.int64), np.array([0, 99]), loc, attn, layout="rows")


@pytest.mark.parametrize("dtype,D", [(np.float64, 33), (np.float32, 32)])
def test_sparse_backward_over_many_row_blocks_matches_the_oracle(restore_threads, dtype, D):
    """A decoder-like call (300 queries, few samples per position) goes sparse, over
    more grad_value blocks than threads; it matches the oracle and the dense method."""
    from cydeform import _cpu

    rng = np.random.default_rng(D)
    shapes = np.array([[20, 30], [10, 15], [5, 8]])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    N, M, Lq, L, P = 2, 4, 30, 3, 2
    assert _cpu._impl.sparse_applies(S, Lq, L, P)
    assert _cpu._impl.sparse_blocks(N * S * M, D, np.dtype(dtype).itemsize) > 3
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(-0.1, 1.1, (N, Lq, M, L, P, 2))
    loc = push_off_kinks(loc, shapes, 1e-3).astype(dtype)
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype)
    g = rng.standard_normal((N, Lq, M * D)).astype(dtype)
    expected = ms_deform_attn_backward_reference(g, value, shapes, None, loc, attn)
    starts = np.concatenate(([0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1])).astype(np.int64)
    dense = _cpu._impl.backward(g, value, shapes.astype(np.int64), starts, loc, attn, method="dense")
    for threads in (1, 2, 3):
        cydeform.set_num_threads(threads)
        got = cydeform.ms_deform_attn_backward(g, value, shapes, None, loc, attn)
        for a, b, e in zip(got, dense, expected):
            assert a.tobytes() == b.tobytes()
            assert_close(a, e, dtype, scale=4.0)
    with pytest.raises(ValueError, match="method"):
        _cpu._impl.backward(g, value, shapes.astype(np.int64), starts, loc, attn, method="sorted")


def test_sparse_backward_with_fewer_threads_than_asked_gives_the_same_bits():
    """OpenMP may give a parallel region fewer threads than asked (OMP_THREAD_LIMIT,
    nesting): the sparse backward's phases (one task per requested thread, blocks
    claimed from a shared counter) must still cover every row and block once. Run in a
    fresh process whose thread limit is 1, with 3 threads asked for."""
    import os
    import subprocess
    import sys

    script = """
import numpy as np, cydeform
from cydeform import _cpu
rng = np.random.default_rng(7)
shapes = np.array([[20, 30], [10, 15], [5, 8]])
S = int((shapes[:, 0] * shapes[:, 1]).sum())
N, M, D, Lq, L, P = 2, 4, 32, 30, 3, 2
assert _cpu._impl.sparse_applies(S, Lq, L, P) and _cpu._impl.sparse_blocks(N * S * M, D, 4) > 3
value = rng.standard_normal((N, S, M, D)).astype(np.float32)
loc = rng.uniform(-0.1, 1.1, (N, Lq, M, L, P, 2)).astype(np.float32)
attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(np.float32)
g = rng.standard_normal((N, Lq, M * D)).astype(np.float32)
starts = np.concatenate(([0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1])).astype(np.int64)
dense = _cpu._impl.backward(g, value, shapes.astype(np.int64), starts, loc, attn, method="dense")
cydeform.set_num_threads(3)
sparse = _cpu._impl.backward(g, value, shapes.astype(np.int64), starts, loc, attn, method="sparse")
assert all(a.tobytes() == b.tobytes() for a, b in zip(sparse, dense))
print("same bits")
"""
    env = dict(os.environ, OMP_THREAD_LIMIT="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "same bits" in done.stdout


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("L,P,D", [(3, 30, 5), (1, 64, 33), (2, 40, 32), (1, 1, 67), (4, 4, 96)])
def test_many_points_and_wide_heads_match_the_oracle(restore_threads, dtype, L, P, D):
    """Rows with more samples than one gather block (64) and heads wider than one
    register chunk (32 floats / 16 doubles), with and without a tail."""
    rng = np.random.default_rng(L * 1000 + P * 10 + D)
    shapes = np.array([[5, 7], [3, 4], [2, 2], [1, 3]][:L])
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    N, M, Lq = 2, 2, 6
    value = rng.standard_normal((N, S, M, D)).astype(dtype)
    loc = rng.uniform(-0.3, 1.3, (N, Lq, M, L, P, 2))
    loc = push_off_kinks(loc, shapes, 1e-3).astype(dtype)
    loc[0, 1, 0, 0, P // 2, 0] = np.nan  # a poisoned row past the first block
    attn = rng.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype)
    g = rng.standard_normal((N, Lq, M * D)).astype(dtype)
    args_ = (value, shapes, None, loc, attn)
    expected_out = ms_deform_attn_reference(*args_)
    expected = ms_deform_attn_backward_reference(g, *args_)
    for threads in (1, 2):
        cydeform.set_num_threads(threads)
        out = cydeform.ms_deform_attn(*args_)
        assert np.array_equal(np.isnan(out), np.isnan(expected_out))
        assert_close(np.nan_to_num(out), np.nan_to_num(expected_out), dtype, scale=4.0)
        for a, e in zip(cydeform.ms_deform_attn_backward(g, *args_), expected):
            assert np.array_equal(np.isnan(a), np.isnan(e))
            assert_close(np.nan_to_num(a), np.nan_to_num(e), dtype, scale=40.0)


def test_c_entry_points_refuse_zero_sizes_and_pass_over_an_empty_batch():
    """The C entry points (cydeform.jax's FFI target) get sizes the Python checks never
    saw: N = 0 (an empty batch) is nothing to do, and a zero S, M, D, Lq, L or P is
    refused with status 2, on every path (sparse, dense as given, dense head-major).
    Before, N = 0 on the dense path divided by zero (SIGFPE) and D = 0 never ended the
    sparse block-size loop: so the calls run in a fresh process with a time limit."""
    import json
    import subprocess
    import sys

    from cydeform import _cpu

    script = """
import ctypes, json, sys
import numpy as np
from cydeform import _cpu
entry = _cpu._impl.c_entry_points()
fwd = ctypes.CFUNCTYPE(ctypes.c_int, *[ctypes.c_void_p] * 6, *[ctypes.c_int64] * 7)(entry["forward_f32"])
bwd = ctypes.CFUNCTYPE(ctypes.c_int, *[ctypes.c_void_p] * 9, *[ctypes.c_int64] * 7)(entry["backward_f32"])
shapes = np.array([[2, 3]], np.int64)
starts = np.zeros(1, np.int64)
buf = np.full(64, np.nan, np.float32)  # every operand: nothing may be read or written
p = ctypes.c_void_p(buf.ctypes.data)
sp, st = ctypes.c_void_p(shapes.ctypes.data), ctypes.c_void_p(starts.ctypes.data)
for sizes in json.loads(sys.argv[1]):
    print(fwd(p, sp, st, p, p, p, *sizes), bwd(p, p, sp, st, p, p, p, p, p, *sizes), int(np.isnan(buf).sum()),
          flush=True)
"""
    S, M, D, L = 6, 2, 4, 1
    # Lq L P against S: sparse (<= S), dense as given (< 3 S), dense head-major (>= 3 S).
    paths = [(2, 2), (2, 4), (6, 4)]
    assert _cpu._impl.sparse_applies(S, 2, L, 2) and not _cpu._impl.sparse_applies(S, 2, L, 4)
    assert not _cpu._impl.by_head(S, 2, L, 4) and _cpu._impl.by_head(S, 6, L, 4)
    cases = [([0, S, M, D, Lq, L, P], "0 0 64") for Lq, P in paths]
    for Lq, P in paths:
        for i in range(1, 7):
            sizes = [1, S, M, D, Lq, L, P]
            sizes[i] = 0
            cases.append((sizes, "2 2 64"))
    done = subprocess.run([sys.executable, "-c", script, json.dumps([c for c, _ in cases])], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stdout[-300:], done.stderr[-300:])
    assert done.stdout.splitlines() == [want for _, want in cases]
