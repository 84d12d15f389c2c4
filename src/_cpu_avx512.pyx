# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""cydeform's CPU backend compiled for the 'avx512' instruction set (see setup.py)."""
include "_cpu_impl.pxi"
