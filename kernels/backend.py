"""Which implementation a kernel call runs: Triton, or the pure-PyTorch reference beside it.

backend="auto":   CUDA tensors -> Triton; CPU tensors -> the reference, unless TRITON_INTERPRET=1 is set
                  (then Triton runs through its CPU interpreter: that is how the tests run the kernels).
backend="triton": always Triton (on a CPU tensor this needs TRITON_INTERPRET=1).
backend="torch":  always the reference.
"""
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(backend: str, x: torch.Tensor) -> bool:
    """Decide for one call from the backend name and the tensor it runs on."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not x.is_cuda and not interpreting():
            raise RuntimeError(
                f"backend='triton' on a {x.device} tensor needs TRITON_INTERPRET=1 (set before importing "
                "pixart_fast), or use backend='auto'"
            )
        return True
    return x.is_cuda or interpreting()
