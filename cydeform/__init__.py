"""cydeform: multi-scale deformable attention (Deformable DETR) without PyTorch.

``ms_deform_attn`` and ``ms_deform_attn_backward`` take NumPy arrays (Cython CPU
backend, OpenMP) or CuPy arrays (CUDA kernels compiled at run time with NVRTC).
"""
from . import nn
from .functional import ms_deform_attn, ms_deform_attn_backward
from ._staging import set_huge_pages
from ._threads import get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = ["nn", "ms_deform_attn", "ms_deform_attn_backward", "get_num_threads", "set_num_threads", "set_huge_pages",
           "__version__"]
