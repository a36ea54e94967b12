"""patchify / unpatchify: the Triton copy kernels (through the CPU interpreter) against the PixArt/DiT layouts.

Both ops only move elements, so the kernel must be bit-exact: every check compares with torch.equal against
PyTorch's own expression in the same dtype. That is stricter than the shared rule of tolerance.py, which a zero
error satisfies in every dtype.
"""
import pytest
import torch

from pixart_fast.kernels.patch_copy import patchify, patchify_ref, unpatchify

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unpatchify_expr(x, p, C, H, W):
    """The PixArt/DiT final-layer reshape, verbatim."""
    x = x.reshape(x.shape[0], H // p, W // p, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, H, W)


def _check_op(op, ref, x, grad):
    """Forward and input gradient of op(x) against ref(x): both must be bit-identical."""
    x_ref = x.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    y, y_ref = op(x), ref(x_ref)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref), "forward differs"
    y.backward(grad)
    y_ref.backward(grad)
    assert x.grad.dtype == x.dtype and torch.equal(x.grad, x_ref.grad), "gradient differs"


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_patchify_matches_reference(p, dtype):
    B, C, H, W = 2, 3, 8, 12  # non-square, C not a power of two
    x = torch.randn(B, C, H, W, dtype=dtype)
    grad = torch.randn(B, (H // p) * (W // p), C * p * p, dtype=dtype)
    _check_op(lambda t: patchify(t, p, backend="triton"), lambda t: patchify_ref(t, p), x, grad)


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_unpatchify_matches_final_layer_expression(p, dtype):
    B, C, H, W = 2, 3, 8, 12
    x = torch.randn(B, (H // p) * (W // p), p * p * C, dtype=dtype)
    grad = torch.randn(B, C, H, W, dtype=dtype)
    _check_op(lambda t: unpatchify(t, p, C, H, W, backend="triton"),
              lambda t: unpatchify_expr(t, p, C, H, W), x, grad)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_patchify_is_the_conv_patch_embedding(backend):
    """Conv2d(C, D, p, stride=p)(x) as tokens == patchify(x, p) @ weight.reshape(D, -1).T + bias."""
    torch.manual_seed(0)
    B, C, H, W, D, p = 2, 4, 8, 12, 6, 2
    proj = torch.nn.Conv2d(C, D, p, stride=p)
    x = torch.randn(B, C, H, W)
    expected = proj(x).flatten(2).transpose(1, 2)  # (B, T, D)
    got = patchify(x, p, backend=backend) @ proj.weight.reshape(D, -1).T + proj.bias
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs_and_gradients(dtype):
    B, C, H, W, p = 2, 3, 8, 12, 2
    T, K = (H // p) * (W // p), C * p * p
    # channels-last image, token-major gradient: every stride differs from the contiguous layout
    x = torch.randn(B, H, W, C, dtype=dtype).permute(0, 3, 1, 2)
    grad = torch.randn(B, K, T, dtype=dtype).transpose(1, 2)
    _check_op(lambda t: patchify(t, p, backend="triton"), lambda t: patchify_ref(t, p), x, grad)
    # a strided slice of tokens, an expanded (stride 0) gradient
    tok = torch.randn(B, T, 2 * K, dtype=dtype)[:, :, ::2]
    grad = torch.randn(1, C, H, W, dtype=dtype).expand(B, C, H, W)
    _check_op(lambda t: unpatchify(t, p, C, H, W, backend="triton"),
              lambda t: unpatchify_expr(t, p, C, H, W), tok, grad)


def test_channels_split_across_programs():
    """C * p * p above one program's tile (1024 elements): the channel axis is split over the grid."""
    B, C, H, W, p = 2, 72, 4, 8, 4
    x = torch.randn(B, C, H, W)
    grad = torch.randn(B, (H // p) * (W // p), C * p * p)
    _check_op(lambda t: patchify(t, p, backend="triton"), lambda t: patchify_ref(t, p), x, grad)
    _check_op(lambda t: unpatchify(t, p, C, H, W, backend="triton"),
              lambda t: unpatchify_expr(t, p, C, H, W), grad, x)


def test_custom_ops_pass_opcheck():
    """The torch.library registrations (schema, fake tensors, autograd plumbing) torch.compile relies on."""
    x = torch.randn(1, 2, 4, 6)
    tok = torch.randn(1, 6, 8)
    torch.library.opcheck(torch.ops.pixart_fast.image_to_tokens.default, (x, 2, True))
    torch.library.opcheck(torch.ops.pixart_fast.tokens_to_image.default, (tok, 2, 2, 4, 6, False))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"6 x 8 is not divisible by the patch size p = 4"):
        patchify(torch.randn(1, 4, 6, 8), 4)
    with pytest.raises(ValueError, match=r"not divisible by the patch size p = 2"):
        unpatchify(torch.randn(1, 12, 32), 2, 8, 6, 7)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, C, H, W\), got \(4, 8, 8\)"):
        patchify(torch.randn(4, 8, 8), 2)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 16, 32\), got \(1, 16, 31\)"):
        unpatchify(torch.randn(1, 16, 31), 2, 8, 8, 8)
    with pytest.raises(ValueError, match=r"positive int, got 0"):
        patchify(torch.randn(1, 4, 8, 8), 0)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        patchify(torch.randn(1, 4, 8, 8), 2, backend="cuda")
