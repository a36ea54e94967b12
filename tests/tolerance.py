"""The kernel accuracy rule of docs/ARCHITECTURE.md section 4, shared by every kernel test.

err(kernel) <= 2 * err(torch in the same dtype) + atol, both measured against an fp32 reference.
atol is relative to the reference's largest magnitude (at least 1), so one rule serves activations
and token-summed gradients alike.
"""
import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_kernel_close(got: torch.Tensor, torch_same_dtype: torch.Tensor, ref_fp32: torch.Tensor, dtype, what=""):
    """Assert the rule for one output or gradient. `dtype` is the dtype the computation ran in."""
    assert got.shape == ref_fp32.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref_fp32.shape)}"
    ref = ref_fp32.double()
    err_kernel = (got.double() - ref).abs().max().item()
    err_torch = (torch_same_dtype.double() - ref).abs().max().item()
    atol = ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert err_kernel <= 2 * err_torch + atol, (
        f"{what} [{dtype}]: kernel error {err_kernel:.3e} > 2 * torch error {err_torch:.3e} + atol {atol:.1e}"
    )
