"""Huge-page staging (cydeform._staging): same bits with and without, used when it pays."""
import threading

import numpy as np
import pytest

import cydeform
from cydeform import _staging
from cydeform.bench.problems import make_problem

LEVELS = np.array([[64, 128]])  # S = 8192: value (1, 8192, 8, 32) float32 is 8.4 MB


def spread_problem(seed=0, Lq=8192):
    return make_problem(1, Lq, "uniform", np.float32, seed=seed, levels=LEVELS)


def huge_pages_or_skip():
    if not (hasattr(_staging.mmap, "MADV_HUGEPAGE") and _staging.thp_mode() in ("madvise", "always")):
        pytest.skip(f"no transparent huge pages here (mode {_staging.thp_mode()!r})")


@pytest.fixture
def huge(request):
    huge_pages_or_skip()
    cydeform.set_huge_pages(True)
    yield
    cydeform.set_huge_pages(None)


def run(problem):
    value, shapes, starts, loc, attn = problem
    g = np.random.default_rng(1).standard_normal((1, loc.shape[1], value.shape[2] * value.shape[3]))
    g = g.astype(value.dtype)
    return (cydeform.ms_deform_attn(value, shapes, starts, loc, attn),
            *cydeform.ms_deform_attn_backward(g, value, shapes, starts, loc, attn))


@pytest.mark.parametrize("threads", [1, 2])
def test_staged_calls_are_bit_identical_and_really_staged(huge, threads):
    problem = spread_problem()
    value, shapes, starts, loc, attn = problem
    assert _staging.worth_staging(value.nbytes, 4 * attn.size,
                                  _staging.page_spread(value.shape, 4, shapes, starts, loc))
    before = cydeform.get_num_threads()
    try:
        cydeform.set_num_threads(threads)
        staged = run(problem)
        if _staging._unavailable:
            pytest.skip("the kernel gave no huge pages to the staging buffer")
        buffers = _staging._local.buffers
        assert buffers["value"]._array.size >= value.nbytes and buffers["grad"]._array.size >= value.nbytes
        cydeform.set_huge_pages(False)
        plain = run(problem)
    finally:
        cydeform.set_num_threads(before)
    for a, b in zip(staged, plain):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_grad_value_is_the_callers_own_array(huge):
    first = run(spread_problem(seed=0))
    kept = first[1].copy()
    run(spread_problem(seed=1))  # reuses the staging buffers
    np.testing.assert_array_equal(first[1], kept)
    assert first[1].flags.owndata


def test_concurrent_python_threads_each_get_their_own_buffers(huge):
    problems = [spread_problem(seed=s) for s in range(3)]
    want = [cydeform.ms_deform_attn(*p) for p in problems]
    got = [None] * 3

    def work(i):
        for _ in range(3):
            got[i] = cydeform.ms_deform_attn(*problems[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, w in zip(got, want):
        assert g.tobytes() == w.tobytes()


def test_staging_is_chosen_for_spread_encoder_calls_only():
    def decide(Lq, dist):
        value, shapes, starts, loc, attn = make_problem(1, Lq, dist, np.float32)
        spread = _staging.page_spread(value.shape, value.itemsize, shapes, starts, loc)
        return spread, _staging.worth_staging(value.nbytes, 4 * attn.size, spread)

    uniform, local = decide(None, "uniform"), decide(None, "local")
    assert uniform[0] > 0.5 and uniform[1]
    assert local[0] < 0.2 and not local[1]
    assert not decide(300, "uniform")[1]  # the decoder call: too few gathers for the copy
    assert not _staging.worth_staging(4 << 20, 10**9, 1.0)  # small values fit the TLB's reach


def test_set_huge_pages_refuses_other_values():
    with pytest.raises(ValueError, match="True, False or None"):
        cydeform.set_huge_pages("yes")


def at_offset(a, offset):
    """A copy of ``a`` starting ``offset`` bytes after a 4 KiB boundary."""
    raw = np.empty(a.nbytes + 8192, dtype=np.uint8)
    start = (-raw.ctypes.data) % 4096 + offset
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("huge_pages", [False, None])
def test_a_misaligned_value_is_copied_to_an_aligned_buffer_with_the_same_bits(huge_pages):
    # Local locations: not spread out, so only the alignment decides.
    value, shapes, starts, loc, attn = make_problem(1, 8192, "local", np.float32, levels=LEVELS)
    assert _staging.worth_aligning(16, 128, value.nbytes, 4 * attn.size)
    assert not _staging.worth_aligning(64, 128, value.nbytes, 4 * attn.size)
    assert not _staging.worth_aligning(16, 128, value.nbytes, value.nbytes // 64)  # few gathers
    from cydeform import _cpu

    cydeform.set_huge_pages(huge_pages)
    try:
        results = []
        for offset in (16, 0):
            v = at_offset(value, offset)
            staged, huge = _cpu._stage(v, shapes, starts, loc, attn)
            assert not huge
            assert (staged is not None) == (offset == 16)
            if staged is not None:
                assert staged.ctypes.data % 64 == 0 and np.array_equal(staged, value)
            results.append(run((v, shapes, starts, loc, attn)))
    finally:
        cydeform.set_huge_pages(None)
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()


def test_outputs_start_on_a_cache_line():
    value, shapes, starts, loc, attn = make_problem(1, 300, "uniform", np.float32, levels=LEVELS)
    out, grad_value, _, _ = run((at_offset(value, 16), shapes, starts, loc, attn))
    assert out.ctypes.data % 64 == 0 and grad_value.ctypes.data % 64 == 0
