"""The GPUs the ahead-of-time tools (aot.py's compile report, roofline.py's model) stand for: the kernel modules
that record their launches, and each compile target's SMs and memory limits.
"""

# Modules of pixart_fast.kernels that define aot_specs().
KERNEL_MODULES = ("patch_copy", "modulation", "cross_attn")
# SMs of the GPU each target stands for (A100 SXM; H100 SXM and H200): launchers size some grids from it.
SM_COUNT = {"sm_80": 108, "sm_90": 132}
# The most shared memory one block may use, in bytes (CUDA C++ Programming Guide, compute capability table:
# 163 KB on sm_80, 227 KB on sm_90); a kernel that needs more fails at launch with OutOfResources.
SHARED_MEMORY_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
# Shared memory per SM (same table), of which 1 KB is reserved per resident block; threads per SM: 2048.
SM_SHARED_MEMORY = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
SM_THREADS = 2048
