"""The tuning grid's data: alternative channel layouts, register caps and block sizes,
each with the prediction written before any GPU measured it, Shared by tune_gpu.py (which times them) and ptxas_report.py (which
reports their registers): neither imports the other.
"""
from __future__ import annotations

import numpy as np

from cydeform import _cuda


def make_layout(prob, J, G, vec=True, specialise=True):
    """A ChannelLayout with J chunks per lane and G lanes per (n, q, m) (vector chunks)."""
    itemsize = np.dtype(prob.dtype).itemsize
    C = 16 // itemsize if vec else 1
    if prob.D % (C * J * G) != 0:
        raise ValueError(f"J*G*C = {J * G * C} does not divide D = {prob.D}")
    if specialise:
        return _cuda.ChannelLayout(C, J, G, vec, prob.L, prob.P, prob.D, G)
    return _cuda.ChannelLayout(C, J, G, vec, 0, 0, 0, 0)


# Alternative (J, G) per element size for D = 32 (C = 16 / itemsize channels per chunk).
# Default: 4 B -> J=2, G=4; 2 B -> J=1, G=4; 8 B -> J=2, G=8 (_cuda._J_TARGET).
LAYOUTS = {
    4: [((4, 2), "J=4 G=2: 16 ch/lane, half the lanes",
         "fwd 0.70-0.85x of default (SASS issue floor 75 -> 55 us at the same 72-reg, 37.5% occupancy: the "
         "float64 geometry and address math are done by 2 lanes, not 4); bwd atomics 0.8-0.95x (issue floor "
         "164 -> 136 us, but 96 regs: 25% occupancy)"),
        ((8, 1), "J=8 G=1: one lane per (n, q, m), 32 ch/lane",
         "fwd 0.65-1.0x (issue floor 42 us, but 104 regs: 16 warps/SM may not hide the gather latency); "
         "bwd 0.75-1.0x (issue floor 119 us, no shuffles, 126 regs)"),
        ((1, 8), "J=1 G=8: 4 ch/lane, twice the lanes",
         "slower: fwd 1.15-1.4x (issue floor 75 -> 102 us although 48 regs give 62.5% occupancy); "
         "bwd 1.1-1.3x (206 vs 164 us floor)")],
    2: [((4, 1), "J=4 G=1: one lane per (n, q, m), 32 ch/lane",
         "fwd 0.7-0.95x (issue floor 77 -> 58 us; 80 regs, same 37.5% occupancy as default's 72); "
         "bwd 0.8-1.0x (floor 149 -> 122 us, 128 regs: 25% occupancy)"),
        ((2, 2), "J=2 G=2: 16 ch/lane (two 16-B loads per corner), half the lanes",
         "fwd 0.8-0.95x (issue floor 77 -> 66 us, 80 regs: same occupancy); bwd 0.85-1.0x (floor 149 -> 133 us, "
         "96 regs for fp16: 25% occupancy; 80 for bf16)")],
    8: [((4, 4), "J=4 G=4: 8 ch/lane", "fwd and bwd 0.6-0.9x (geometry by 4 lanes, not 8; not in the targets)"),
        ((1, 16), "J=1 G=16: 2 ch/lane", "slower, 1.2-1.5x: geometry by 16 lanes")],
}

REG_CAPS = [  # (option, prediction)
    (64, "ptxas (12.9): fp16/bf16 fwd 72 -> 64 regs with no spill (37.5% -> 50% occupancy): 0.85-1.0x; fp32 fwd "
         "66 -> 64 with 4 B spill stores / 16 B loads (8 B stack): 0.9-1.05x; fp32 bwd unchanged (already 64); "
         "fp16/bf16 bwd 80 -> 64 with 48/~400 B spills: 0.95-1.15x"),
    (48, "62.5% occupancy but 280-1600 B of spills on every fast kernel: predicted slower, 1.05-1.5x"),
]

BLOCKS = [  # (block size, prediction)
    (128, "72-reg kernels: 28 warps/SM instead of 24 (7 blocks of 4 warps vs 3 of 8): +0-8% if latency-bound; "
          "also halves the last-wave tail (2778 blocks / 396 resident = 7.02 waves at 256)"),
    (512, "72-reg kernels: 1 block of 16 warps/SM (25% occupancy, from 37.5%): slower by 5-20%"),
    (64, "72-reg kernels: 28 warps/SM (14 blocks of 2); same occupancy as 128, more scheduling: within +-5% of 128"),
]


# msda_forward_shared: the G lanes of a group split the points and broadcast each
# point's geometry by shuffles. Static SASS counts (sm_90, NVRTC 12.9, encoder float32):
# fp64 160 -> 40, conversions 162 -> 44, +96 SHFL, total 3114 -> 2794 (-10%), 70 regs
# (fast: 66; both 37.5% occupancy). Bit-identical results (host-harness test).
SHARED_GEOMETRY_PREDICTION = ("lanes share the float64 geometry: -10% instructions, -75% fp64 and conversions, "
                              "+96 shuffles per thread. If the forward is issue/conversion bound (ptxas_sm90.md): "
                              "faster by 1.05-1.25x, most for half types; if L1/memory bound: within +-3%")
