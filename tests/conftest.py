"""Test-wide environment: no hub access, Triton kernels through the CPU interpreter.

Both variables must be set before torch/triton/transformers are imported: `@triton.jit` decides at
decoration time whether a kernel is compiled or interpreted.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
