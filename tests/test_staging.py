"""Huge-page staging (cydeform._staging): same bits with and without, used when it pays.

Calls with many samples per value position (Lq L P >= 3 S) take the head-major
path instead: the op copies value into its own layout, in the thread's 'work' buffer
(huge pages where enabled); the value staging is for calls below that."""
import threading

import numpy as np
import pytest

import cydeform
from cydeform import _cpu, _staging
from cydeform.bench.problems import make_problem

LEVELS = np.array([[64, 128]])  # S = 8192: value (1, 8192, 8, 32) float32 is 8.4 MB


def spread_problem(seed=0, Lq=4096):
    """Lq L P = 2 S: staged (not head-major) by default; Lq=8192 is head-major."""
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
    assert not _cpu._by_head(value, loc)
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


@pytest.mark.parametrize("threads", [1, 2])
def test_head_major_calls_use_the_work_buffer_with_the_same_bits(threads):
    problem = spread_problem(Lq=8192)
    value, _, _, loc, _ = problem
    assert _cpu._by_head(value, loc)
    before = cydeform.get_num_threads()
    results = []
    try:
        cydeform.set_num_threads(threads)
        for setting in (False, None):
            cydeform.set_huge_pages(setting)
            results.append(run(problem))
            slot = "work" if _staging.huge_pages_enabled() else "work-plain"
            # The forward's copy of value; the backward's, plus its 2 query-chunk buffers.
            assert _staging._local.buffers[slot]._array.size >= 3 * value.nbytes
    finally:
        cydeform.set_num_threads(before)
        cydeform.set_huge_pages(None)
    for a, b in zip(*results):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("Lq", [4096, 8192])
def test_grad_value_is_the_callers_own_array(huge, Lq):
    first = run(spread_problem(seed=0, Lq=Lq))
    kept = [a.copy() for a in first]
    run(spread_problem(seed=1, Lq=Lq))  # reuses the staging or work buffers
    for a, b in zip(first, kept):
        np.testing.assert_array_equal(a, b)
    for buffer in _staging._local.buffers.values():
        if buffer._array is not None:
            assert not any(np.shares_memory(a, buffer._array) for a in first)


@pytest.mark.parametrize("Lq", [4096, 8192])
def test_concurrent_python_threads_each_get_their_own_buffers(huge, Lq):
    problems = [spread_problem(seed=s, Lq=Lq) for s in range(3)]
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
    assert uniform[0] > 0.5 and uniform[1]  # but the encoder call goes head-major (below)
    assert local[0] < 0.2 and not local[1]
    assert not decide(300, "uniform")[1]  # the decoder call: too few gathers for the copy
    assert not _staging.worth_staging(4 << 20, 10**9, 1.0)  # small values fit the TLB's reach
    encoder, decoder = make_problem(1, None), make_problem(1, 300)
    assert _cpu._by_head(encoder[0], encoder[3]) and not _cpu._by_head(decoder[0], decoder[3])


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
    # Local locations: not spread out, so only the alignment decides. D = 8 and
    # Lq L P = 2 S: enough gathers per byte of value to align, not head-major.
    value, shapes, starts, loc, attn = make_problem(1, 4096, "local", np.float32, levels=LEVELS)
    value = np.ascontiguousarray(value[..., :8])
    assert not _cpu._by_head(value, loc)
    assert _staging.worth_aligning(16, 32, value.nbytes, 4 * attn.size)
    assert not _staging.worth_aligning(64, 32, value.nbytes, 4 * attn.size)
    assert not _staging.worth_aligning(16, 32, value.nbytes, value.nbytes // 64)  # few gathers

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


@pytest.mark.parametrize("huge", [False, True])
def test_a_buffer_grows_while_a_view_of_its_old_mapping_is_alive(huge):
    """Growing drops the old mapping instead of closing it: a view still held (say in a
    traceback of an interrupted call) keeps its memory and contents, and the buffer grows."""
    buffer = _staging._Buffer(huge=huge)
    old = buffer.get(1000)
    if old is None:
        pytest.skip("the kernel gave no huge pages")
    old[:] = np.arange(1000) % 251
    new = buffer.get(5 * _staging._HUGE_PAGE)
    if new is None:
        pytest.skip("the kernel gave no huge pages")
    assert new.size == 5 * _staging._HUGE_PAGE
    assert np.array_equal(old, np.arange(1000) % 251)
    new[:] = 7  # a separate mapping: the old view is untouched
    assert np.array_equal(old, np.arange(1000) % 251)
