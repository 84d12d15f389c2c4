"""Huge-page staging of the CPU backend's randomly accessed arrays.

The op's corner gathers (forward and backward) and the backward's scatters land
anywhere in value / grad_value. With 4 KiB pages an encoder-sized value (22.7 MB,
5,500 pages) overflows the TLB, and each gather pays a page walk: measured on a 2-core
Xeon VM (benchmarks/cpu_log.md), the encoder forward with uniform locations took
118 ms with value in 4 KiB pages and 67 ms with the same bytes in 2 MiB pages.

So, when it pays, the CPU backend copies value into a buffer backed by transparent
huge pages (``madvise(MADV_HUGEPAGE)``, 2 MiB aligned), and the backward scatters into
such buffers and copies grad_value out. The copies are sequential (about 3 ms for
22.7 MB); the results are bit-identical with and without staging (the same arithmetic
on the same numbers). Each Python thread keeps its own buffers, grown as needed and
kept for the next call: the first call of a thread at a new size pays their page
faults (tens of ms for an encoder-sized call).

Separately, a value that does not start on a 64-byte cache line (NumPy's big arrays
start 16 bytes into a page) is copied to an aligned buffer when the call gathers
enough (:func:`worth_aligning`): into the huge-page buffer where huge pages are
enabled, else into a plain page-aligned one; the backward's grad_value buffers are
then the op's own (also aligned), not staged.

Calls with many samples per value position (the encoder call) do not stage: the op
copies value into its head-major layout itself (src/_cpu_impl.pxi, ``_by_head``), into
this thread's 'work' buffer (:func:`work_buffer`: huge pages where enabled, else plain
pages), kept between calls like the others.

Huge-page staging happens only if all of these hold:
- huge pages are enabled (``set_huge_pages(True)``, or the default ``None``, "auto",
  which needs Linux with transparent huge pages in ``madvise`` mode; in ``always``
  mode NumPy's large arrays get huge pages without help, in ``never`` mode none can);
- the kernel actually backed the buffer with huge pages (checked once per buffer in
  /proc/self/smaps; otherwise staging stops for this process);
- value is at least 8 MiB (what 4 KiB pages' TLB reach covers, roughly);
- the call's gathers are spread out (:func:`page_spread`: uniform-like locations,
  not a trained encoder's local ones, which the TLB already covers) and many enough
  to save at least twice the copy (:func:`worth_staging`).
"""
from __future__ import annotations

import functools
import mmap
import threading

import numpy as np

_HUGE_PAGE = 2 << 20
MIN_VALUE_BYTES = 8 << 20

_setting = None  # None: auto; True / False: forced by set_huge_pages
_unavailable = False  # the kernel gave 4 KiB pages to a buffer: stop trying
_local = threading.local()


@functools.lru_cache(maxsize=None)
def thp_mode():
    """Transparent huge page mode of this Linux kernel ('always', 'madvise', 'never'), or None.

    Read once per process: the staging decision runs on every call."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def set_huge_pages(enabled):
    """Stage the CPU backend's big random-access arrays in huge pages: True, False, or
    None (auto: on Linux with transparent huge pages in 'madvise' mode). Results do not
    depend on it, only speed and memory (up to 2 x value's size more per thread)."""
    global _setting
    if enabled not in (True, False, None):
        raise ValueError(f"set_huge_pages expects True, False or None (auto); got {enabled!r}")
    _setting = enabled


def huge_pages_enabled():
    """Whether staging may happen: the setting, the platform and what the kernel gave."""
    if _unavailable or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    if _setting is None:
        return thp_mode() == "madvise"
    return _setting


def page_spread(value_shape, itemsize, spatial_shapes, level_start_index, sampling_locations, queries=4):
    """Distinct 4 KiB pages of value per corner gather over a few consecutive queries.

    A window of ``queries`` queries from the middle of image 0 (all heads, levels and
    points; top-left and bottom-left corners): about 1 when the gathers land anywhere
    (uniform locations: each one a TLB miss), a few hundredths when neighbouring
    queries look at neighbouring texels (a trained encoder's local locations, which
    the TLB covers). Costs tens of microseconds.
    """
    N, S, M, D = value_shape
    Lq = sampling_locations.shape[1]
    q0 = max(0, Lq // 2 - queries // 2)
    loc = np.asarray(sampling_locations[0, q0:q0 + queries], dtype=np.float64)  # (q, M, L, P, 2)
    H = np.asarray(spatial_shapes)[:, 0][None, None, :, None]
    W = np.asarray(spatial_shapes)[:, 1][None, None, :, None]
    start = np.asarray(level_start_index)[None, None, :, None]
    with np.errstate(invalid="ignore"):
        x = np.clip(np.floor(np.nan_to_num(loc[..., 0]) * W - 0.5), 0, W - 1)
        y = np.clip(np.floor(np.nan_to_num(loc[..., 1]) * H - 0.5), 0, H - 1)
    row = (start + y * W + x).astype(np.int64)
    m = np.arange(M)[None, :, None, None]
    pages = [((row + dy * W) * M + m) * D * itemsize // 4096 for dy in (0, 1)]
    gathers = 2 * row.size
    return len(np.unique(np.concatenate([p.ravel() for p in pages]))) / max(gathers, 1)


def worth_aligning(value_address, row_bytes, value_nbytes, corner_gathers):
    """Whether copying value to a 64-byte aligned buffer pays for a call.

    NumPy's big arrays start 16 bytes into a page, so each 128-byte corner row straddles
    three cache lines instead of two. Measured on a 2-core AMD EPYC VM (encoder call,
    float32, benchmarks/cpu_log.md): forward 212 -> 140 ms (uniform) and 111 -> 88 ms
    (local) with value aligned; the copy costs about 0.1 ns per byte and the saving is
    2-6 ns per gather, so align calls with corner_gathers >= value_nbytes / 8 (the
    encoder call: 11.4 M gathers into 22.7 MB; not the decoder call: 154 k).
    """
    misaligned = value_address % 64 != 0 and row_bytes >= 32
    return misaligned and gathers_could_pay_for_aligning(value_nbytes, corner_gathers)


def gathers_could_pay_for_aligning(value_nbytes, corner_gathers):
    """worth_aligning's test of the gathers alone, which needs no address (reading an
    array's address costs ~50 us right after an op call has swept the caches)."""
    return 8 * corner_gathers >= value_nbytes


def worth_staging(value_nbytes, corner_gathers, spread, *, min_value_bytes=MIN_VALUE_BYTES):
    """Whether staging value (and grad_value) pays for a call.

    Measured on the encoder call (benchmarks/cpu_log.md): huge pages save about 4 ns
    per corner gather with uniform locations (page_spread near 1), and nothing
    measurable with local ones at 2 threads, where the copy (about 0.13 ns per byte)
    made the call slower. So stage only spread-out calls (``spread`` >= 0.3; measured:
    0.68 uniform, 0.12 local) whose
    gathers save at least twice the copy: corner_gathers >= value_nbytes / 16. The
    decoder call (300 queries, 154k gathers into 22.7 MB) does not stage.
    """
    return value_nbytes >= min_value_bytes and spread >= 0.3 and 16 * corner_gathers >= value_nbytes


class _Buffer:
    """One growable, 2 MiB-aligned anonymous mapping, advised for huge pages if ``huge``."""

    def __init__(self, huge=True):
        self._huge = huge
        self._map = None
        self._array = None

    def get(self, nbytes):
        """A uint8 array of at least ``nbytes`` (contents undefined), or None if huge
        pages were asked for and the kernel gave none."""
        global _unavailable
        if self._array is None or self._array.size < nbytes:
            size = -(-nbytes // _HUGE_PAGE) * _HUGE_PAGE
            # The old mapping is dropped (before the new one is mapped), not closed: a view
            # of it may still be alive (e.g. in a traceback kept from an interrupted call),
            # and closing would raise BufferError; it is unmapped when its last view goes.
            self._array = None
            self._map = None
            self._map = mmap.mmap(-1, size + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            raw = np.frombuffer(self._map, dtype=np.uint8)
            offset = (-raw.ctypes.data) % _HUGE_PAGE
            if self._huge:
                self._map.madvise(mmap.MADV_HUGEPAGE, offset, size)
            array = raw[offset:offset + size]
            array.fill(0)  # fault the pages in now, outside the op's loops
            if self._huge and not _backed_by_huge_pages(array.ctypes.data):
                _unavailable = True
                self._map = None
                return None
            self._array = array
        return self._array[:nbytes]


def _backed_by_huge_pages(address):
    """Whether the mapping holding ``address`` has any huge pages (Linux /proc/self/smaps)."""
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= address < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1]) > 0
    except (OSError, ValueError):
        pass
    return False


def _buffer(slot):
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    if slot not in buffers:
        buffers[slot] = _Buffer(huge=slot not in ("aligned", "work-plain"))
    return buffers[slot]


def work_buffer(n, dtype):
    """n elements of ``dtype`` (contents undefined) in this thread's 'work' buffer: huge
    pages where enabled and available, else plain pages; kept for the next call, so an
    encoder-sized call does not pay tens of thousands of page faults each time. For the
    CPU backend's head-major copies (src/_cpu_impl.pxi); valid until this thread's next call.
    """
    dtype = np.dtype(dtype)
    raw = _buffer("work").get(n * dtype.itemsize) if huge_pages_enabled() else None
    if raw is None:
        raw = _buffer("work-plain").get(n * dtype.itemsize)
    return raw.view(dtype)


def staged_copy(a, huge=True):
    """``a`` copied into this thread's huge-page 'value' buffer (``huge``), or into its
    plain page-aligned 'aligned' buffer; None if huge pages were asked for and none can
    be had. The copy is valid until this thread's next staged call.
    """
    raw = _buffer("value" if huge else "aligned").get(a.nbytes)
    if raw is None:
        return None
    out = raw.view(a.dtype).reshape(a.shape)
    np.copyto(out, a)
    return out


def zeroed(shape, dtype):
    """A zeroed array in this thread's huge-page 'grad' buffer, or None if none can be had."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = _buffer("grad").get(nbytes)
    if raw is None:
        return None
    out = raw.view(dtype).reshape(shape)
    out.fill(0)
    return out
