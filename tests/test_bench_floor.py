"""The benchmark's floor does the op's gathers: its corner offsets are the op's corners,
and its kernels sum and scatter exactly the rows they are given; its thread scaling
is timed in pairs, and the PyTorch reference in segments alternating with the op's."""
import re
import time

import numpy as np
import pytest

import cydeform
from cydeform import _cpu
from cydeform.bench.floor import copy_gbs, corner_rows, sparse_slots
from cydeform.bench.problems import make_problem

LEVELS = np.array([[5, 7], [3, 4], [1, 2]])


def problem(dtype, seed=0, Lq=9):
    value, shapes, starts, loc, attn = make_problem(2, Lq, "uniform", dtype, seed=seed, levels=LEVELS)
    loc = (loc * 1.6 - 0.3).astype(dtype)  # a third of the points near or past the border
    return value, shapes, starts, loc, attn


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_corner_rows_are_the_ops_corners(dtype):
    value, shapes, starts, loc, attn = problem(dtype)
    rows = corner_rows(value.shape, shapes, starts, loc)
    N, S, M, D = value.shape
    _, Lq, _, L, P, _ = loc.shape
    assert rows.shape == (N * Lq * M, 4 * L * P) and 0 < (rows >= 0).mean() < 1
    # The op's output rebuilt from the offsets and the bilinear weights of each corner.
    W, H = shapes[:, 1][None, None, None, :, None], shapes[:, 0][None, None, None, :, None]
    x, y = loc[..., 0].astype(np.float64) * W - 0.5, loc[..., 1].astype(np.float64) * H - 0.5
    lx, ly = x - np.floor(x), y - np.floor(y)
    w = np.stack([(1 - lx) * (1 - ly), lx * (1 - ly), (1 - lx) * ly, lx * ly], axis=-1) * attn[..., None]
    w = w.reshape(N * Lq * M, 4 * L * P)
    flat = np.concatenate([value.reshape(-1).astype(np.float64), np.zeros(D)])
    gathered = flat[np.where(rows >= 0, rows, flat.size - D)[..., None] + np.arange(D)]  # (R, K, D)
    rebuilt = np.einsum("rk,rkd->rd", w, gathered).reshape(N, Lq, M * D)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(rebuilt, cydeform.ms_deform_attn(value, shapes, starts, loc, attn), atol=tol)


def test_head_major_corner_rows_point_at_the_same_elements():
    value, shapes, starts, loc, attn = problem(np.float32)
    rows = corner_rows(value.shape, shapes, starts, loc)
    N, S, M, D = value.shape
    # Head-major rows come in (n, m, q) order: back to (n, q, m) to compare row by row.
    rows_h = corner_rows(value.shape, shapes, starts, loc, heads=True)
    rows_h = rows_h.reshape(N, M, -1, rows.shape[1]).transpose(0, 2, 1, 3).reshape(rows.shape)
    np.testing.assert_array_equal(rows < 0, rows_h < 0)
    heads = np.ascontiguousarray(value.transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(value.reshape(-1)[rows[rows >= 0]], heads.reshape(-1)[rows_h[rows_h >= 0]])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,Lq,heads", [(np.float32, 9, False), (np.float64, 9, False), (np.float64, 64, False),
                                            (np.float32, 9, True), (np.float64, 9, True), (np.float64, 64, True),
                                            (np.float32, 4, False)])  # a sparse backward is never head-major
def test_gather_floor_sums_and_scatters_the_given_rows(dtype, threads, Lq, heads):
    value, shapes, starts, loc, attn = problem(dtype, seed=1, Lq=Lq)
    rows = corner_rows(value.shape, shapes, starts, loc, heads=heads)
    given = value
    if heads:  # the head-major copy the op would gather from
        value = np.ascontiguousarray(value.transpose(0, 2, 1, 3))
    before = cydeform.get_num_threads(), _cpu.set_min_parallel_work(0)
    S, L, P, D = given.shape[1], len(LEVELS), loc.shape[4], given.shape[3]
    # Lq = 64: the backward floor takes the op's query-chunk layout (several buffers).
    assert (_cpu._impl.query_chunks(S, Lq, L, P, 0) > 1) == (Lq == 64)
    # Lq = 4: few samples per position, the backward goes sparse, and its floor does
    # the same scatters in the sparse method's order (sparse_floor).
    sparse = _cpu._impl.sparse_applies(S, Lq, L, P)
    assert sparse == (Lq == 4)
    try:
        cydeform.set_num_threads(threads)
        sums = _cpu._impl.gather_floor(value, rows, heads=heads)
        if sparse:
            sums_b = sums
            grad = _cpu._impl.sparse_floor(value, *sparse_slots(rows, value.shape, value.itemsize))
            with pytest.raises(ValueError, match="sparse"):
                _cpu._impl.gather_floor(value, rows, backward=True)
        else:
            sums_b, grad = _cpu._impl.gather_floor(value, rows, backward=True, heads=heads)
    finally:
        cydeform.set_num_threads(before[0])
        _cpu.set_min_parallel_work(before[1])
    D = value.shape[-1]
    flat = value.reshape(-1).astype(np.float64)
    want, want_grad = np.zeros((rows.shape[0], D)), np.zeros(flat.size)
    for r, row in enumerate(rows):
        for off in row[row >= 0]:
            want[r] += flat[off:off + D]
            want_grad[off:off + D] += flat[off:off + D]
    tol = 1e-4 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(sums, want, atol=tol)
    np.testing.assert_array_equal(sums_b, sums)
    assert grad.shape == given.shape  # (N, S, M, D) in either layout
    want_grad = want_grad.reshape(value.shape)
    if heads:
        want_grad = want_grad.transpose(0, 2, 1, 3)
    np.testing.assert_allclose(grad, want_grad, atol=tol)


def test_copy_bandwidth_is_a_positive_rate():
    assert 0.1 < copy_gbs(8 << 20, repeat=3) < 10_000


def test_paired_speedup_is_the_ratio_of_one_thread_to_many_in_the_same_rounds():
    from cydeform.bench.cpu import paired_speedup

    before = cydeform.get_num_threads()
    try:
        # A call that takes 2 ms per thread: 1 thread is twice as fast as 2.
        ratio = paired_speedup(lambda: time.sleep(0.002 * cydeform.get_num_threads()), 2, 3, min_time=0)
        assert 0.3 < ratio < 0.8
        assert cydeform.get_num_threads() == 2  # left at the row's thread count
    finally:
        cydeform.set_num_threads(before)


def test_paired_ratio_is_the_ratio_of_two_calls_in_the_same_rounds():
    from cydeform.bench.cpu import paired_ratio

    calls = []

    def slow():  # twice as long as fast
        calls.append("a")
        time.sleep(0.004)

    def fast():
        calls.append("b")
        time.sleep(0.002)

    ratio = paired_ratio(slow, fast, 3, min_time=0)
    assert 1.4 < ratio < 2.8
    assert calls == ["a", "b"] * 4  # a warm-up of each, then a then b in each of 3 rounds
    # With a minimum time, rounds go on past ``repeat`` until it is spent (6 ms a round).
    calls.clear()
    paired_ratio(slow, fast, 3, min_time=0.05)
    assert len(calls) >= 2 * 8 and calls == ["a", "b"] * (len(calls) // 2)


def test_interleaved_times_alternates_segments_and_keeps_warm_ups_out():
    from cydeform.bench.cpu import interleaved_times

    log = []

    def ours():  # 2 ms a call; the first call of each segment (its warm-up) 20 ms
        cold = not log or log[-1] == "ref"
        log.append("ours")
        time.sleep(0.02 if cold else 0.002)

    def ref_round():  # 8 ms and 4 ms; the first round of a segment 40 ms
        cold = not log or log[-1] == "ours"
        log.append("ref")
        time.sleep(0.04 if cold else 0.008)
        return (0.04, 0.02) if cold else (0.008, 0.004)

    # One timed call and one timed round a segment: a warm-up counted in would move
    # either median to halfway between cold and warm.
    (t_ours,), (f, b) = interleaved_times((ours,), ref_round, repeat=3, segments=3, min_ours=0, min_ref=0)
    assert 0.0015 < t_ours < 0.008  # no warm-up call among the timed ones
    assert (f, b) == (0.008, 0.004)  # a round under cheap_round: its segment's first is a warm-up
    # ref's untimed first round, then three segments: ours (warm-up + 1 timed), then ref
    # (warm-up + 1 timed round).
    assert re.fullmatch(r"r(oorr){3}", "".join(x[0] for x in log)), log


def test_interleaved_times_keeps_an_expensive_reference_round():
    from cydeform.bench.cpu import interleaved_times

    rounds = []

    def ref_round():  # 30 ms a round: "expensive" against cheap_round = 10 ms
        rounds.append(len(rounds))
        time.sleep(0.03)
        return (100.0 if len(rounds) == 1 else 5.0,)  # the untimed first round stands out

    # One segment: counting the untimed first round would make the median 52.5.
    (t,), (f,) = interleaved_times((lambda: None,), ref_round, repeat=3, segments=1, min_ours=0,
                                   min_ref=0.01, cheap_round=0.01)
    assert f == 5.0  # the call's first round is never timed
    # The segment's first round is kept, and it already covers min_ref: one round.
    assert len(rounds) == 1 + 1


def _row(call, pas, threads=1, dtype="float32", ratio=None, x_floor=None, speedup=None, floor_speedup=None):
    return {"call": call, "locations": "uniform", "dtype": dtype, "threads": threads, "pass": pas,
            "ratio": ratio, "x_floor": x_floor, "speedup": speedup, "floor_speedup": floor_speedup}


def test_targets_summary_counts_misses_at_the_thresholds():
    from cydeform.bench.cpu import FLOOR_TARGET, SCALING_TARGET, TORCH_TARGETS, check_targets

    least = dict(((call, pas), v) for call, pas, v in TORCH_TARGETS)
    enc_f = least[("encoder", "forward")]
    rows = [
        # At the threshold counts as met; just under it as missed.
        _row("encoder", "forward", 1, ratio=enc_f, x_floor=FLOOR_TARGET),
        _row("encoder", "forward", 2, ratio=enc_f * 0.99, x_floor=FLOOR_TARGET * 1.01,
             speedup=SCALING_TARGET * 0.99, floor_speedup=SCALING_TARGET),
        _row("encoder", "backward", 2, ratio=least[("encoder", "backward")], speedup=SCALING_TARGET),
        # float64 rows are not what the targets are stated for.
        _row("encoder", "forward", 1, dtype="float64", ratio=1.0, x_floor=10.0),
    ]
    lines = check_targets(rows)
    forward, backward, decoder, floor_line, scaling, floor_scaling = lines
    assert forward.startswith(f"- encoder forward >= {enc_f:g}x PyTorch: 1 of 2 rows")
    assert "missed: uniform 2T" in forward
    assert backward.startswith("- encoder backward") and "1 of 1 rows" in backward and "missed" not in backward
    assert decoder.endswith("not measured in this run")
    assert "1 of 2 rows" in floor_line and "missed: encoder forward uniform 2T" in floor_line
    assert "1 of 2 rows" in scaling and "missed: encoder forward uniform 2T" in scaling
    assert "in 1 of 1" in floor_scaling


def test_targets_summary_without_reference_floor_or_second_thread():
    from cydeform.bench.cpu import check_targets

    lines = check_targets([_row("decoder", "backward", 1), _row("decoder", "forward", 1)])
    assert len(lines) == 5 and all(line.endswith("not measured in this run") for line in lines)


def test_shown_values_round_toward_the_failing_side():
    from cydeform.bench.cpu import shown

    # Higher is better (ratios to PyTorch, speed-ups): never rounded up to a threshold.
    assert shown(9.996, 1) == "9.9" and shown(9.996, 2) == "9.99"
    assert shown(1.7999, 2) == "1.79"
    assert shown(10.0, 1) == "10.0" and shown(1.8, 2) == "1.80" and shown(1.15, 2) == "1.15"
    # Lower is better (x floor): never rounded down to a threshold.
    assert shown(2.004, 2, "lower") == "2.01"
    assert shown(2.0, 2, "lower") == "2.00" and shown(1.1, 2, "lower") == "1.10"


def test_targets_summary_never_prints_a_miss_as_the_threshold():
    from cydeform.bench.cpu import check_targets

    rows = [_row("decoder", "backward", 1, ratio=9.996, x_floor=2.004),
            _row("decoder", "backward", 2, ratio=10.0, x_floor=2.0, speedup=1.7999, floor_speedup=1.8)]
    decoder, floor_line, scaling = [line for line in check_targets(rows)
                                    if line.startswith(("- decoder", "- within", "- 2 threads"))]
    assert "1 of 2 rows (9.99-10.00; missed: uniform 1T 9.99)" in decoder
    assert "1 of 2 rows (2.00-2.01; missed: decoder backward uniform 1T 2.01)" in floor_line
    assert "0 of 1 rows (1.79-1.79; missed: decoder backward uniform 2T 1.79)" in scaling
