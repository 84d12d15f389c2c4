"""Host-side logic of the CUDA backend that needs no GPU: launch configuration, size
limits, the architecture choice for NVRTC, the per-stream level-table cache."""
from __future__ import annotations

import numpy as np
import pytest

from cydeform import _cuda, _nvrtc, _validate


def _meta(L, P, sides=((2, 3),)):
    shapes = np.array([sides[0]] * L, dtype=np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    return _validate.Problem(1, int(sizes.sum()), 1, 4, 1, L, P, np.dtype(np.float32), shapes, starts)


def test_launch_config_grid_and_checks():
    c = _cuda.LaunchConfig(block=128, max_grid=7)
    assert (c.grid(0), c.grid(1), c.grid(128), c.grid(129), c.grid(10**9)) == (1, 1, 1, 2, 7)
    with pytest.raises(ValueError, match="block must be a multiple of 32"):
        _cuda.LaunchConfig(block=100)
    with pytest.raises(ValueError, match="forward_kernel"):
        _cuda.LaunchConfig(forward_kernel="msda_nope")
    with pytest.raises(ValueError, match="det_piece"):
        _cuda.LaunchConfig(det_piece=0)


def test_layout_override_is_checked():
    prob = _meta(1, 1)  # D = 4, float32: one 16-byte chunk per row
    assert _cuda.channel_layout(prob, True, config=_cuda.LaunchConfig(layout=(1, 1))).G == 1
    with pytest.raises(ValueError, match="must divide D"):
        _cuda.channel_layout(prob, True, config=_cuda.LaunchConfig(layout=(1, 2)))


def test_shared_forward_is_not_in_the_default_kernel_list():
    prob = _meta(2, 2)
    assert not any(e.startswith("msda_forward_shared") for e in _cuda.kernel_expressions(prob))
    assert any(e.startswith("msda_forward_shared") for e in _cuda.kernel_expressions(prob, experimental=True))
    shared = _cuda.LaunchConfig(forward_kernel="msda_forward_shared")
    assert _cuda.kernel_expressions(prob, config=shared)[0].startswith("msda_forward_shared<")


def test_too_many_points_per_query_are_refused_before_any_work():
    prob = _meta(2, 2**30)  # L*P*2 = 2**32
    with pytest.raises(ValueError, match=r"L\*P\*2 must be below 2\*\*31"):
        _cuda._forward(None, prob, None, None, None)  # raises before touching runtime or arrays
    with pytest.raises(ValueError, match=r"L\*P\*2 must be below 2\*\*31"):
        _cuda._backward(None, prob, None, None, None, None)
    _cuda.check_limits(_meta(2, 2**29 - 1))  # L*P*2 < 2**31: fine


def test_arch_for_a_gpu_newer_than_nvrtc_names_the_fix():
    with pytest.raises(_nvrtc.NvrtcError) as info:
        _nvrtc.arch_for(120, archs=(70, 80, 90), nvrtc_version=(12, 4))
    msg = str(info.value)
    assert "12.0 (sm_120)" in msg and "12.4" in msg and "at most sm_90" in msg and "nvidia-cuda-nvrtc" in msg
    with pytest.raises(_nvrtc.NvrtcError, match="cannot target"):
        _nvrtc.arch_for(50, archs=(70, 80, 90), nvrtc_version=(13, 0))
    assert _nvrtc.arch_for(90, archs=(70, 80, 90), nvrtc_version=(12, 4)) == "sm_90"


def test_level_tables_are_cached_per_stream_and_evicted_in_lru_order():
    uploads = []

    def upload(table):
        uploads.append(table)
        return object()

    cache = _cuda.LevelTableCache(upload, maxsize=2)
    a = np.arange(4, dtype=np.int64).reshape(1, 4)
    b = a + 1
    on_s1 = cache.get(a, 0, stream_ptr=1)
    assert cache.get(a, 0, stream_ptr=1) is on_s1          # reused on its own stream
    on_s2 = cache.get(a, 0, stream_ptr=2)
    assert on_s2 is not on_s1                              # never shared across streams
    assert cache.get(a, 1, stream_ptr=1) is not on_s1      # nor across devices
    assert len(cache) == 2 and len(uploads) == 3
    cache.get(b, 0, stream_ptr=1)                          # evicts the least recently used
    assert cache.get(a, 1, stream_ptr=1) is not None and len(uploads) == 4
    assert cache.get(a, 0, stream_ptr=1) is not on_s1      # on_s1 had been evicted: a fresh upload


def test_compile_failure_names_the_kernel_and_carries_the_log(monkeypatch):
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    monkeypatch.setattr(_cuda, "kernel_source", lambda: "this is not CUDA;\n")
    with pytest.raises(_nvrtc.NvrtcError, match=r"msda_forward_baseline<float, int>.*sm_90") as info:
        _cuda.compile_kernel("msda_forward_baseline<float, int>", "sm_90")
    assert "error" in str(info.value).lower() and "-ftz=false" in str(info.value)
