"""Test-wide environment: no hub access, Triton kernels through the CPU interpreter, one CPU thread.

Both variables must be set before torch/triton/transformers are imported: `@triton.jit` decides at
decoration time whether a kernel is compiled or interpreted.
"""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# The tests' tensors are tiny: one thread avoids OpenMP start-up and contention costs (several-fold faster on 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    from pixart_fast.kernels.backend import INTERPRETER_PROBLEM  # after TRITON_INTERPRET is set

    if INTERPRETER_PROBLEM:
        raise pytest.UsageError(INTERPRETER_PROBLEM)


@pytest.fixture
def reference_kernels(monkeypatch):
    """For tests of commands that load a checkpoint with kernels "auto" (rescore, probe): on a CPU that is the PyTorch
    reference, as a user's run has it, not the Triton interpreter, which takes minutes a sampled grid. The kernels
    are checked against PyTorch in their own tests."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
