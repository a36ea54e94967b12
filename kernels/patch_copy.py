"""Patchify / unpatchify: (B, C, H, W) latents <-> (B, T, C*p*p) tokens, T = (H/p) * (W/p).

patchify:   the PixArt/DiT patch embedding's reshape. Tokens run row-major over the (H/p, W/p) grid and each
            token's elements are in (c, i, j) order, the order of Conv2d(C, D, p, stride=p).weight.reshape(D, -1),
            so  Conv2d(x) == patchify(x, p) @ proj.weight.reshape(D, -1).T + proj.bias  (as tokens).
unpatchify: the PixArt/DiT final layer's reshape. Each token's p*p*C elements are in (i, j, c) order.

Both directions, forward and backward, are one strided copy kernel: the backward of patchify is the
tokens -> image copy in (c, i, j) order, the backward of unpatchify the image -> tokens copy in (i, j, c) order.
The kernel reads and writes through strides, so non-contiguous inputs and gradients need no extra copy.
"""
import torch

from .backend import tl, triton, use_triton
from .utils import launch_config, launch_options


def patchify_ref(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, C*p*p), tokens row-major over the (H/p, W/p) grid, elements in (c, i, j) order."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwcpq", x).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify_ref(x: torch.Tensor, p: int, C: int, H: int, W: int) -> torch.Tensor:
    """(B, T, p*p*C) with elements in (i, j, c) order -> (B, C, H, W); the DiT/PixArt final-layer reshape."""
    B = x.shape[0]
    x = x.reshape(B, H // p, W // p, p, p, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, C, H, W)


@triton.jit
def _patch_copy_kernel(
    img_ptr,  # (B, C, H, W) image, any strides
    tok_ptr,  # (B, T, K) tokens, T = Hp * Wp, K = C * P * P, any strides
    C, Hp, Wp,  # channels and the patch grid (H / P, W / P)
    stride_ib, stride_ic, stride_ih, stride_iw,  # image strides, in elements
    stride_tb, stride_tt, stride_tk,  # token strides, in elements
    P: tl.constexpr,  # patch size
    CHANNELS_FIRST: tl.constexpr,  # token elements in (c, i, j) order (patchify) or (i, j, c) (unpatchify)
    TO_TOKENS: tl.constexpr,  # copy image -> tokens, or tokens -> image
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_WP: tl.constexpr,
):
    # One program copies a (BLOCK_C, P, BLOCK_WP, P) tile of one patch row hp of one sample b: indices
    # (c, i, wp, j) address pixel (c, hp*P + i, wp*P + j) and element (c, i, j) of token hp*Wp + wp.
    pid = tl.program_id(0)
    b = pid // Hp
    hp = pid % Hp
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)[:, None, None, None]
    i = tl.arange(0, BLOCK_P)[None, :, None, None]
    wp = tl.program_id(1) * BLOCK_WP + tl.arange(0, BLOCK_WP)[None, None, :, None]
    j = tl.arange(0, BLOCK_P)[None, None, None, :]
    mask = (c < C) & (i < P) & (wp < Wp) & (j < P)

    img_offs = b.to(tl.int64) * stride_ib + c * stride_ic + (hp * P + i) * stride_ih + (wp * P + j) * stride_iw
    if CHANNELS_FIRST:
        k = (c * P + i) * P + j
    else:
        k = (i * P + j) * C + c
    tok_offs = b.to(tl.int64) * stride_tb + (hp * Wp + wp) * stride_tt + k * stride_tk
    if TO_TOKENS:
        tl.store(tok_ptr + tok_offs, tl.load(img_ptr + img_offs, mask=mask), mask=mask)
    else:
        tl.store(img_ptr + img_offs, tl.load(tok_ptr + tok_offs, mask=mask), mask=mask)


# Elements one program copies: 8 per thread at 4 warps, a few registers each, never a spill.
_MAX_TILE = 1024


def _launch_config(img: torch.Tensor, tok: torch.Tensor, p: int, channels_first: bool, to_tokens: bool):
    """Scalar arguments (by name), grid and launch configuration for one copy between `img` (B, C, H, W) and
    `tok` (B, T, K); the launch is _patch_copy_kernel[grid](img, tok, **scalars, **launch_options(config)).

    The single place that picks block sizes: the launcher and aot_specs() both read them from here.
    """
    B, C, H, W = img.shape
    Hp, Wp = H // p, W // p
    BLOCK_P = triton.next_power_of_2(p)
    BLOCK_C = min(triton.next_power_of_2(C), max(1, _MAX_TILE // BLOCK_P**2))
    BLOCK_WP = min(triton.next_power_of_2(Wp), max(1, _MAX_TILE // (BLOCK_C * BLOCK_P**2)))
    scalars = dict(
        C=C, Hp=Hp, Wp=Wp,
        stride_ib=img.stride(0), stride_ic=img.stride(1), stride_ih=img.stride(2), stride_iw=img.stride(3),
        stride_tb=tok.stride(0), stride_tt=tok.stride(1), stride_tk=tok.stride(2),
    )
    grid = (B * Hp, triton.cdiv(Wp, BLOCK_WP), triton.cdiv(C, BLOCK_C))
    # A straight copy: no loop to pipeline, so one stage.
    config = launch_config(num_warps=4, num_stages=1, P=p, CHANNELS_FIRST=channels_first, TO_TOKENS=to_tokens,
                           BLOCK_C=BLOCK_C, BLOCK_P=BLOCK_P, BLOCK_WP=BLOCK_WP)
    return scalars, grid, config


def _launch_patchify(img: torch.Tensor, p: int, channels_first: bool) -> torch.Tensor:
    """(B, C, H, W) -> (B, T, C*p*p) in (c, i, j) element order, or (i, j, c) when not channels_first."""
    B, C, H, W = img.shape
    tok = img.new_empty(B, (H // p) * (W // p), C * p * p)
    scalars, grid, config = _launch_config(img, tok, p, channels_first, to_tokens=True)
    _patch_copy_kernel[grid](img, tok, **scalars, **launch_options(config))
    return tok


def _launch_unpatchify(tok: torch.Tensor, p: int, C: int, H: int, W: int, channels_first: bool) -> torch.Tensor:
    """(B, T, C*p*p) in (c, i, j) element order, or (i, j, c) when not channels_first -> (B, C, H, W)."""
    img = tok.new_empty(tok.shape[0], C, H, W)
    scalars, grid, config = _launch_config(img, tok, p, channels_first, to_tokens=False)
    _patch_copy_kernel[grid](img, tok, **scalars, **launch_options(config))
    return img


# torch.compile sees the two copies as opaque ops with known output shapes.
@torch.library.custom_op("pixart_fast::image_to_tokens", mutates_args=())
def _image_to_tokens_op(img: torch.Tensor, p: int, channels_first: bool) -> torch.Tensor:
    return _launch_patchify(img, p, channels_first)


@_image_to_tokens_op.register_fake
def _(img, p, channels_first):
    B, C, H, W = img.shape
    return img.new_empty(B, (H // p) * (W // p), C * p * p)


@torch.library.custom_op("pixart_fast::tokens_to_image", mutates_args=())
def _tokens_to_image_op(tok: torch.Tensor, p: int, C: int, H: int, W: int, channels_first: bool) -> torch.Tensor:
    return _launch_unpatchify(tok, p, C, H, W, channels_first)


@_tokens_to_image_op.register_fake
def _(tok, p, C, H, W, channels_first):
    return tok.new_empty(tok.shape[0], C, H, W)


class PatchifyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p):
        ctx.p, ctx.shape = p, x.shape
        return _image_to_tokens_op(x, p, True)

    @staticmethod
    def backward(ctx, grad):
        _, C, H, W = ctx.shape
        return _tokens_to_image_op(grad, ctx.p, C, H, W, True), None


class UnpatchifyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p, C, H, W):
        ctx.p = p
        return _tokens_to_image_op(x, p, C, H, W, False)

    @staticmethod
    def backward(ctx, grad):
        return _image_to_tokens_op(grad, ctx.p, False), None, None, None, None


def _check_patch(p: int, H: int, W: int):
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"patch size p must be a positive int, got {p!r}")
    if H % p or W % p:
        raise ValueError(f"image size H x W = {H} x {W} is not divisible by the patch size p = {p}; "
                         "crop or pad the latents to a multiple of p")


def patchify(x: torch.Tensor, p: int, backend: str = "auto") -> torch.Tensor:
    """Cut (B, C, H, W) latents into (B, T, C*p*p) patch tokens, T = (H/p) * (W/p).

    Tokens run row-major over the (H/p, W/p) grid; each token's elements are in (c, i, j) order, matching
    Conv2d(C, D, p, stride=p).weight.reshape(D, -1). H and W must be multiples of p.
    """
    if x.dim() != 4:
        raise ValueError(f"patchify expects x of shape (B, C, H, W), got {tuple(x.shape)}")
    _check_patch(p, x.shape[2], x.shape[3])
    if not use_triton(backend, x):
        return patchify_ref(x, p)
    return PatchifyFunction.apply(x, p)


def unpatchify(x: torch.Tensor, p: int, C: int, H: int, W: int, backend: str = "auto") -> torch.Tensor:
    """Reassemble (B, T, p*p*C) tokens, elements in (i, j, c) order, into (B, C, H, W), T = (H/p) * (W/p).

    The inverse layout of the PixArt/DiT final layer, whose Linear emits p*p*C values per token in (i, j, c) order.
    """
    _check_patch(p, H, W)
    T, K = (H // p) * (W // p), p * p * C
    if x.dim() != 3 or x.shape[1:] != (T, K):
        raise ValueError(f"unpatchify to (C, H, W) = ({C}, {H}, {W}) with p = {p} expects x of shape "
                         f"(B, {T}, {K}), got {tuple(x.shape)}")
    if not use_triton(backend, x):
        return unpatchify_ref(x, p, C, H, W)
    return UnpatchifyFunction.apply(x, p, C, H, W)


def aot_specs(sms: int = 132, batch: int = 8, sizes=(32, 64, 128), capability: int = 90) -> list[dict]:
    """The copies PixArt-XL/2 training launches, for ahead-of-time compilation (kernels/aot.py).

    The real launchers run on meta tensors (the launches are recorded, not run): batch 8, p = 2, latents 32 / 64 /
    128 square. pixart_fast/model.py patchifies the fp32 latents (in every precision: they need no gradient, so
    there is no patchify backward), unpatchifies the final Linear's output of 8 channels (the autocast dtype, or
    fp32) and, backward, turns the image gradient of that dtype back into tokens. `sms` and `capability` are unused
    (the grid does not depend on the GPU). Entries as kernels/modulation.py's aot_specs().
    """
    from .utils import recorded_launches

    p, c_in, c_out = 2, 4, 8
    specs = []
    for regime, dtype in (("bf16 autocast", torch.bfloat16), ("fp16 autocast", torch.float16), ("fp32", torch.float32)):
        for size in sizes:
            T = (size // p) ** 2
            latents = torch.empty(batch, c_in, size, size, dtype=torch.float32, device="meta")
            tokens = torch.empty(batch, T, p * p * c_out, dtype=dtype, device="meta")
            with recorded_launches(globals(), (_patch_copy_kernel,), sms, capability) as calls:
                _launch_patchify(latents, p, True)  # patchify forward
                image = _launch_unpatchify(tokens, p, c_out, size, size, False)  # unpatchify forward
                _launch_patchify(torch.empty_like(image), p, False)  # unpatchify backward
            for call, name in zip(calls, ("patchify_fwd", "unpatchify_fwd", "unpatchify_bwd")):
                specs.append({"name": name, "call": f"{regime} B={batch} {size}x{size}", **call})
    return specs
