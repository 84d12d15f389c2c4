"""Every documented bad input gets its documented error: type and part of the message."""
import numpy as np
import pytest

import cydeform

RNG = np.random.default_rng(0)
SHAPES = np.array([[2, 3], [1, 2]])  # S = 8
N, S, M, D, Lq, L, P = 2, 8, 2, 3, 4, 2, 2


def good(dtype=np.float64):
    return dict(
        value=RNG.standard_normal((N, S, M, D)).astype(dtype),
        spatial_shapes=SHAPES.copy(),
        level_start_index=np.array([0, 6]),
        sampling_locations=RNG.uniform(0, 1, (N, Lq, M, L, P, 2)).astype(dtype),
        attention_weights=RNG.uniform(0, 1, (N, Lq, M, L, P)).astype(dtype),
    )


def call(**changes):
    kw = good()
    kw.update(changes)
    return cydeform.ms_deform_attn(kw["value"], kw["spatial_shapes"], kw["level_start_index"],
                                   kw["sampling_locations"], kw["attention_weights"])


def call_backward(grad_output, **changes):
    kw = good()
    kw.update(changes)
    return cydeform.ms_deform_attn_backward(grad_output, kw["value"], kw["spatial_shapes"],
                                            kw["level_start_index"], kw["sampling_locations"],
                                            kw["attention_weights"])


def test_good_inputs_pass():
    assert call().shape == (N, Lq, M * D)


@pytest.mark.parametrize("changes, match", [
    (dict(value=np.zeros((N, S, M * D))), r"value must have 4 dimensions \(N, S, M, D\); got 3"),
    (dict(sampling_locations=np.zeros((N, Lq, M, L, P))), r"sampling_locations must have 6 dimensions"),
    (dict(attention_weights=np.zeros((N, Lq, M, L * P))), r"attention_weights must have 5 dimensions"),
    (dict(spatial_shapes=np.array([2, 3, 1, 2])), r"spatial_shapes must have 2 dimensions \(L, 2\)"),
    (dict(spatial_shapes=np.array([[2, 3, 1]])), r"spatial_shapes must have shape \(L, 2\)"),
    (dict(level_start_index=np.array([[0, 6]])), r"level_start_index must have 1 dimensions"),
])
def test_wrong_number_of_dimensions(changes, match):
    with pytest.raises(ValueError, match=match):
        call(**changes)


@pytest.mark.parametrize("changes, match", [
    (dict(sampling_locations=np.zeros((N + 1, Lq, M, L, P, 2))), r"sampling_locations has N = 3 .* value has N = 2"),
    (dict(sampling_locations=np.zeros((N, Lq, M + 1, L, P, 2))), r"sampling_locations has M = 3 .* value has M = 2"),
    (dict(sampling_locations=np.zeros((N, Lq, M, L + 1, P, 2))), r"sampling_locations has L = 3 .* spatial_shapes has L = 2"),
    (dict(sampling_locations=np.zeros((N, Lq, M, L, P, 3))), r"sampling_locations must end in an axis of 2 \(x, y\)"),
    (dict(attention_weights=np.zeros((N, Lq + 1, M, L, P))), r"attention_weights must have shape \(N, Lq, M, L, P\)"),
    (dict(attention_weights=np.zeros((N, Lq, M, L, P + 1))), r"attention_weights must have shape \(N, Lq, M, L, P\)"),
    (dict(value=np.zeros((N, S + 1, M, D))), r"value has S = 9 .* sum\(H_l \* W_l\) = 8"),
    (dict(level_start_index=np.array([0, 5])), r"level_start_index must be .* \[0, 6\]; got \[0, 5\]"),
    (dict(level_start_index=np.array([0, 6, 8])), r"level_start_index must be .* got \[0, 6, 8\]"),
    (dict(spatial_shapes=np.array([[2, 3], [0, 2]]), value=np.zeros((N, 6, M, D))),
     r"spatial_shapes must hold positive \(H, W\); level 1 is \(0, 2\)"),
    (dict(spatial_shapes=np.array([[-2, -3], [1, 2]])), r"spatial_shapes must hold positive"),
    (dict(sampling_locations=np.zeros((N, 0, M, L, P, 2)), attention_weights=np.zeros((N, 0, M, L, P))),
     r"Lq >= 1 and P >= 1"),
    (dict(value=np.zeros((N, S, M, 0))), r"value must have non-empty axes"),
])
def test_disagreeing_sizes(changes, match):
    with pytest.raises(ValueError, match=match):
        call(**changes)


@pytest.mark.parametrize("changes, match", [
    (dict(spatial_shapes=np.array([[2.0, 3.0], [1.0, 2.0]])), r"spatial_shapes must have an integer dtype; got dtype float64"),
    (dict(spatial_shapes=np.array([[True, True], [True, True]])), r"spatial_shapes must have an integer dtype; got dtype bool"),
    (dict(level_start_index=np.array([0.0, 6.0])), r"level_start_index must have an integer dtype"),
    (dict(value=np.zeros((N, S, M, D), dtype=np.int64)), r"value must have a floating dtype among float32, float64; got dtype int64"),
    (dict(attention_weights=np.zeros((N, Lq, M, L, P), dtype=np.complex128)), r"attention_weights must have a floating dtype"),
    (dict(value=np.zeros((N, S, M, D), dtype=np.float16)), r"value must have a floating dtype among float32, float64; got dtype float16"),
    (dict(sampling_locations=np.zeros((N, Lq, M, L, P, 2), dtype=np.float32)),
     r"share one dtype: value is float64 but sampling_locations is float32"),
    (dict(attention_weights=np.zeros((N, Lq, M, L, P), dtype=np.float32)),
     r"share one dtype: value is float64 but attention_weights is float32"),
    (dict(value="not an array"), r"value must have a floating dtype"),
])
def test_wrong_dtypes(changes, match):
    with pytest.raises(TypeError, match=match):
        call(**changes)


def test_object_without_dtype_is_refused_by_name():
    with pytest.raises(TypeError, match=r"value must have a floating dtype"):
        call(value=[[1, 2]])


@pytest.mark.parametrize("grad_output, exc, match", [
    (np.zeros((N, Lq, M * D + 1)), ValueError, r"grad_output must have shape \(N, Lq, M\*D\) = \(2, 4, 6\); got \(2, 4, 7\)"),
    (np.zeros((N, Lq, M, D)), ValueError, r"grad_output must have shape"),
    (np.zeros((N, Lq, M * D), dtype=np.float32), TypeError, r"grad_output must have the inputs' dtype float64; got dtype float32"),
])
def test_bad_grad_output(grad_output, exc, match):
    with pytest.raises(exc, match=match):
        call_backward(grad_output)


def test_backward_validates_the_forward_arguments_too():
    with pytest.raises(ValueError, match=r"value has S = 9"):
        call_backward(np.zeros((N, Lq, M * D)), value=np.zeros((N, S + 1, M, D)))


def test_sizes_that_overflow_int64_are_refused_not_wrapped():
    # 2**61 * 8 wraps to 0 in int64 arithmetic, which would make S look like 1.
    with pytest.raises(ValueError, match=r"spatial_shapes describe sum\(H_l \* W_l\) = \d+"):
        cydeform.ms_deform_attn(np.zeros((1, 1, 1, 4)), np.array([[2**61, 8], [1, 1]]), None,
                                np.full((1, 1, 1, 2, 1, 2), 0.5), np.ones((1, 1, 1, 2, 1)))


class FakeCupyArray:
    """Looks like a CuPy array to the dispatcher (module name and a device), no GPU needed."""

    __module__ = "cupy._core.core"

    def __init__(self, like, device_id=0):
        self._a = like
        self.device = type("Device", (), {"id": device_id})()
        self.dtype, self.shape, self.ndim = like.dtype, like.shape, like.ndim


@pytest.mark.parametrize("which", ["value", "sampling_locations", "attention_weights"])
def test_numpy_and_cupy_inputs_cannot_be_mixed(which):
    kw = good()
    kw[which] = FakeCupyArray(kw[which])
    with pytest.raises(TypeError, match=rf"CuPy arrays: {which}; not CuPy arrays: "):
        call(**kw)


def test_grad_output_must_live_where_the_inputs_live():
    with pytest.raises(TypeError, match=r"CuPy arrays: grad_output; not CuPy arrays: value"):
        call_backward(FakeCupyArray(np.zeros((N, Lq, M * D))))


def test_memoised_validation_still_sees_changed_level_geometry():
    # check_problem remembers valid problems by shapes, dtypes and the level geometry's
    # bytes: a pyramid changed in place, or one with other offsets, must still be refused.
    kw = good()
    assert call(**dict(kw, level_start_index=None)).shape == (N, Lq, M * D)
    kw["spatial_shapes"][0, 0] = 3  # S would be 9 + 2
    with pytest.raises(ValueError, match=r"value has S = 8 positions .* sum\(H_l \* W_l\) = 11"):
        call(**dict(kw, level_start_index=None))
    kw["spatial_shapes"][0, 0] = 2
    assert call(**kw).shape == (N, Lq, M * D)
    kw["level_start_index"] = np.array([0, 5])
    with pytest.raises(ValueError, match=r"level_start_index must be the offsets"):
        call(**kw)
    kw["level_start_index"] = np.array([0, 6])
    with pytest.raises(TypeError, match=r"all floating inputs must share one dtype"):
        call(**dict(kw, attention_weights=kw["attention_weights"].astype(np.float32)))
    assert call(**kw).shape == (N, Lq, M * D)


def test_byte_swapped_inputs_are_accepted_and_give_the_same_result():
    kw = good()
    swapped = {k: (v.astype(v.dtype.newbyteorder(">")) if v.dtype.kind == "f" else v) for k, v in kw.items()}
    assert not swapped["value"].dtype.isnative
    np.testing.assert_array_equal(call(**swapped), call(**kw))
    g = RNG.standard_normal((N, Lq, M * D))
    for a, b in zip(call_backward(g.astype(">f8"), **swapped), call_backward(g, **kw)):
        np.testing.assert_array_equal(a, b)


def _misaligned(a):
    """A copy of ``a`` whose data starts 1 byte past an itemsize boundary (NumPy flags it
    unaligned; np.ascontiguousarray keeps it so)."""
    raw = np.empty(a.nbytes + a.itemsize, dtype=np.uint8)
    start = (-raw.ctypes.data) % a.itemsize + 1
    out = raw[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    assert not out.flags.aligned and out.flags.c_contiguous
    return out


def test_unaligned_inputs_reach_the_cpu_backend_aligned(monkeypatch):
    """The Cython backend reads its inputs through float/double pointers: an array that
    starts at an odd byte offset is copied first, never handed on as it is (formally
    undefined behaviour in C, though x86 forgives it). Same results as aligned inputs."""
    from cydeform import _cpu

    seen = []

    def recording(fn):
        def wrapper(*a, **k):
            seen.extend(x.flags.aligned for x in a if isinstance(x, np.ndarray) and x.dtype.kind == "f")
            return fn(*a, **k)
        return wrapper

    kw = good()
    g = RNG.standard_normal((N, Lq, M * D))
    want_f, want_b = call(**kw), call_backward(g, **kw)
    odd = {k: (_misaligned(v) if v.dtype.kind == "f" else v) for k, v in kw.items()}
    monkeypatch.setattr(_cpu, "forward", recording(_cpu.forward))
    monkeypatch.setattr(_cpu, "backward", recording(_cpu.backward))
    np.testing.assert_array_equal(call(**odd), want_f)
    for a, b in zip(call_backward(_misaligned(g), **odd), want_b):
        np.testing.assert_array_equal(a, b)
    assert len(seen) == 7 and all(seen)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", 2**31])
def test_thread_count_must_be_a_sane_integer(bad):
    with pytest.raises(ValueError, match="set_num_threads expects an integer from 1 to"):
        cydeform.set_num_threads(bad)


def test_thread_count_accepts_numpy_integers():
    before = cydeform.get_num_threads()
    try:
        cydeform.set_num_threads(np.int64(1))
        assert cydeform.get_num_threads() == 1
    finally:
        cydeform.set_num_threads(before)


def test_importing_cydeform_does_not_import_cupy():
    """CuPy (and a GPU) are needed only when CuPy arrays are passed."""
    import subprocess
    import sys

    code = "import sys, cydeform, cydeform.nn; print('cupy' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
