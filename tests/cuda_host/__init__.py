"""Host (CPU) harness for cydeform's CUDA kernels; see host_runtime and cuda_host_compat.h."""
