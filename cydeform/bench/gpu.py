"""GPU benchmark: ``python -m cydeform.bench.gpu [--repeat R] [--dtype ...] [--calls ...]``.

Times the CUDA backend's fast kernels beside the baseline kernels (the original op's
one-thread-per-output-element forward, a one-thread-per-point backward) on the
Deformable DETR shapes of msda.md section 4, for each dtype and both location
distributions, and prints a markdown table.

Method: CUDA events around each call, median of ``--repeat`` (>= 100) runs after a
warm-up. Before each timed call a spin kernel keeps the GPU busy while Python enqueues
the call, so the events measure device time only (allocation from CuPy's pool,
memsets, every kernel, the sort of the deterministic mode), not Python overhead. The
decoder call is also timed end to end through the public API (wall clock, including
validation and Python overhead, synchronised).

Cost model: the minimal DRAM traffic (each input read once, each output written once)
divided by the time gives GB/s; "% copy" compares it with the device-to-device copy
bandwidth measured in the same run. The floor for a call is its minimal traffic at
copy bandwidth.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

CALLS = {  # name: (label, N, Lq); Lq None = one query per pixel (the encoder)
    "encoder1": ("encoder N=1", 1, None),
    "encoder2": ("encoder N=2", 2, None),
    "decoder": ("decoder N=1, Lq=300", 1, 300),
}
DTYPES = ["float32", "float16", "bfloat16", "float64"]
DISTRIBUTIONS = ["uniform", "local"]

_SPIN_SOURCE = r"""
__device__ unsigned long long cyd_now() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
extern "C" __global__ void cyd_spin(unsigned long long ns) {
    const unsigned long long start = cyd_now();
    while (cyd_now() - start < ns) { }
}
"""


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class Timer:
    """Device time of a callable: events around it, queued behind a spin kernel."""

    def __init__(self, spin_us=300.0):
        import cupy

        self.cupy = cupy
        self._spin = cupy.RawKernel(_SPIN_SOURCE, "cyd_spin")
        self._ns = np.uint64(spin_us * 1e3)

    def median_us(self, fn, repeat, warmup=5):
        cupy = self.cupy
        for _ in range(warmup):
            fn()
        pairs = []
        for _ in range(repeat):
            self._spin((1,), (1,), (self._ns,))
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
        pairs[-1][1].synchronize()
        return statistics.median(cupy.cuda.get_elapsed_time(s, e) * 1e3 for s, e in pairs)


def copy_bandwidth_gbs(timer, nbytes=1 << 30, repeat=20):
    """Device-to-device copy bandwidth (bytes read + written per second), GB/s."""
    cupy = timer.cupy
    src = cupy.ones(nbytes // 4, dtype=cupy.float32)
    dst = cupy.empty_like(src)
    stream = cupy.cuda.get_current_stream().ptr

    def copy():
        cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes,
                                      cupy.cuda.runtime.memcpyDeviceToDevice, stream)

    us = timer.median_us(copy, repeat)
    return 2 * nbytes / (us * 1e-6) / 1e9


def traffic_bytes(prob, backward):
    """Minimal DRAM traffic of one call: every input read once, every output written once."""
    item = np.dtype(prob.dtype).itemsize
    value = prob.N * prob.S * prob.M * prob.D * item
    out = prob.N * prob.Lq * prob.M * prob.D * item
    points = prob.N * prob.Lq * prob.M * prob.L * prob.P * item
    forward = value + 3 * points + out  # value, locations (2 per point), weights, output
    if not backward:
        return forward
    return forward + value + 3 * points  # + grad_value, grad_loc, grad_attn written (grad_output read ~ out)


def _inputs(call, dtype, distribution):
    import cupy

    from .. import _validate
    from .problems import make_problem

    _, N, Lq = CALLS[call]
    value, shapes, starts, loc, attn = make_problem(N=N, Lq=Lq, distribution=distribution, dtype=np.float32)
    dt = _dtype(dtype)
    value, loc, attn = (cupy.asarray(a.astype(dt)) for a in (value, loc, attn))
    prob = _validate.check_problem(value, shapes, starts, loc, attn, _validate.GPU_DTYPES)
    rng = np.random.default_rng(1)
    grad = cupy.asarray(rng.standard_normal((prob.N, prob.Lq, prob.M * prob.D), dtype=np.float32).astype(dt))
    return prob, value, shapes, starts, loc, attn, grad


def bench_call(timer, call, dtype, distribution, repeat, copy_gbs):
    from .. import _cuda

    prob, value, _, _, loc, attn, grad = _inputs(call, dtype, distribution)
    t = {}
    for variant in ("fast", "baseline"):
        t[f"fwd {variant}"] = timer.median_us(lambda: _cuda.forward(prob, value, loc, attn, variant=variant), repeat)
        t[f"bwd {variant}"] = timer.median_us(
            lambda: _cuda.backward(prob, grad, value, loc, attn, variant=variant), repeat)
    t["bwd det"] = timer.median_us(lambda: _cuda.backward(prob, grad, value, loc, attn, deterministic=True), repeat)
    row = dict(call=CALLS[call][0], dtype=dtype, locations=distribution, **t)
    for kind, backward in (("fwd", False), ("bwd", True)):
        nbytes = traffic_bytes(prob, backward)
        gbs = nbytes / (t[f"{kind} fast"] * 1e-6) / 1e9
        row[f"{kind} GB/s"] = gbs
        row[f"{kind} %copy"] = 100 * gbs / copy_gbs
        row[f"{kind} floor"] = nbytes / (copy_gbs * 1e9) * 1e6
    return row


def end_to_end_us(call, dtype, repeat):
    """Wall clock of the public forward + backward on the decoder call, synchronised."""
    import cupy

    import cydeform

    _, value, shapes, starts, loc, attn, grad = _inputs(call, dtype, "uniform")
    stream = cupy.cuda.get_current_stream()

    def fwd():
        cydeform.ms_deform_attn(value, shapes, starts, loc, attn)
        stream.synchronize()

    def bwd():
        cydeform.ms_deform_attn_backward(grad, value, shapes, starts, loc, attn)
        stream.synchronize()

    out = {}
    for name, fn in (("fwd", fwd), ("bwd", bwd)):
        fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times) * 1e6
    return out


def device_description():
    import cupy

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    driver = cupy.cuda.runtime.driverGetVersion()
    return (f"{name} (sm_{dev.compute_capability}), driver API {driver // 1000}.{driver % 1000 // 10}, "
            f"CuPy {cupy.__version__}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=100, help="timed runs per measurement (median); >= 100")
    parser.add_argument("--dtype", nargs="+", default=DTYPES, choices=DTYPES)
    parser.add_argument("--calls", nargs="+", default=list(CALLS), choices=list(CALLS))
    parser.add_argument("--distributions", nargs="+", default=DISTRIBUTIONS, choices=DISTRIBUTIONS)
    args = parser.parse_args(argv)

    timer = Timer()
    copy_gbs = copy_bandwidth_gbs(timer)
    print(f"\nGPU benchmark: {device_description()}")
    print(f"device-to-device copy bandwidth: {copy_gbs:.0f} GB/s; median of {args.repeat} runs, device time (us)\n")
    header = ("| call | dtype | locations | fwd fast | fwd baseline | speed-up | fwd GB/s (% copy, floor us) "
              "| bwd fast | bwd baseline | speed-up | bwd deterministic | bwd GB/s (% copy, floor us) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for call in args.calls:
        for dtype in args.dtype:
            for dist in args.distributions:
                try:
                    r = bench_call(timer, call, dtype, dist, args.repeat, copy_gbs)
                except Exception as exc:  # e.g. bfloat16 without ml_dtypes
                    print(f"| {CALLS[call][0]} | {dtype} | {dist} | skipped: {type(exc).__name__}: {exc} |")
                    continue
                print(f"| {r['call']} | {dtype} | {dist} | {r['fwd fast']:.1f} | {r['fwd baseline']:.1f} "
                      f"| {r['fwd baseline'] / r['fwd fast']:.2f}x "
                      f"| {r['fwd GB/s']:.0f} ({r['fwd %copy']:.0f}%, {r['fwd floor']:.1f}) "
                      f"| {r['bwd fast']:.1f} | {r['bwd baseline']:.1f} | {r['bwd baseline'] / r['bwd fast']:.2f}x "
                      f"| {r['bwd det']:.1f} | {r['bwd GB/s']:.0f} ({r['bwd %copy']:.0f}%, {r['bwd floor']:.1f}) |")
    call = "decoder"
    print(f"\nEnd to end through the public API, {CALLS[call][0]}, wall clock incl. Python overhead "
          f"(median of {args.repeat}, synchronised):\n")
    print("| dtype | forward us | backward us |\n|---|---|---|")
    for dtype in args.dtype:
        try:
            e2e = end_to_end_us(call, dtype, args.repeat)
        except Exception as exc:
            print(f"| {dtype} | skipped: {type(exc).__name__}: {exc} | |")
            continue
        print(f"| {dtype} | {e2e['fwd']:.1f} | {e2e['bwd']:.1f} |")


if __name__ == "__main__":
    main()
