"""Training FLOPs of PixArt counted from its shapes: one image's forward pass, part by part, and a training image.

FLOP convention (torch.utils.flop_counter.FlopCounterMode's, and MFU's as PaLM defines it): only matrix
products count, an (m x k) @ (k x n) product as 2mkn FLOPs, attention's q k^T and p v included; elementwise
work (LayerNorm, modulation, GELU, softmax, residual adds, biases, the optimizer) counts zero. A training image
costs 3 x its forward pass: the backward computes one product for the input gradient and one for the weight
gradient of every forward product. Text (T5) and VAE encoding are not counted: PixArt trains on features
extracted once beforehand. Token masking and routing (pixart_fast.model's token levers) are counted as the model
runs them: masked, every part that works per image token sees only the kept ones; routed, the routed blocks see
only the routed ones.
"""
from pixart_fast.model import PixArtConfig, kept_count

TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (input and weight gradients)
VAE_DOWNSAMPLE = 8  # SD-VAE: one latent pixel per 8 x 8 image pixels


def _mm(m: int, k: int, n: int) -> int:
    """FLOPs of an (m x k) @ (k x n) product."""
    return 2 * m * k * n


def forward_flops(config: PixArtConfig, height_px: int | None = None, width_px: int | None = None, *,
                  vae_downsample: int = VAE_DOWNSAMPLE, caption_tokens: int | None = None,
                  class_conditional: bool = False, mask_ratio: float = 0.0, route_ratio: float = 0.0,
                  route_blocks: tuple[int, int] | None = None) -> dict[str, int]:
    """FLOPs of one image's forward pass, per part of the model (matrix products only, 2mkn each).

    config: the architecture; height_px x width_px: the image in pixels (default: the config's own input size),
    each a multiple of vae_downsample * patch_size; vae_downsample: image pixels per latent pixel (8 for SD-VAE
    latents, 1 for a pixel-space model). caption_tokens: L, the padded caption length the model attends over
    (default config.max_tokens = 120; padding is masked, not skipped, so it costs the same).
    class_conditional: count the stage-1 DiT instead (`pixart_fast.model.DiT`): per-block adaLN and a label
    lookup, no caption projection and no cross-attention.
    mask_ratio: the fraction of image tokens masked (dropped after the patch embedding; the model runs on
    kept_count(T, mask_ratio) tokens); route_ratio with route_blocks = (start, end): the fraction of those that
    skips blocks start .. end - 1 (they run on kept_count(T', route_ratio) tokens).
    Returns {part: FLOPs}; the values sum to the forward FLOPs of one image.
    """
    c = config
    unit = vae_downsample * c.patch_size
    size_h = c.input_size * vae_downsample if height_px is None else height_px
    size_w = size_h if width_px is None else width_px
    if size_h <= 0 or size_w <= 0 or size_h % unit or size_w % unit:
        raise ValueError(f"image size {size_h} x {size_w} px must be positive multiples of vae_downsample * "
                         f"patch_size = {vae_downsample} * {c.patch_size} = {unit} px")
    T = kept_count((size_h // unit) * (size_w // unit), mask_ratio)  # image tokens (masked: the kept ones)
    start, end = route_blocks if route_ratio else (0, 0)
    routed = kept_count(T, route_ratio)
    tokens = [routed if start <= i < end else T for i in range(c.depth)]  # each block's image tokens
    D, p, N = c.hidden_size, c.patch_size, c.depth
    L = c.max_tokens if caption_tokens is None else caption_tokens
    mlp_hidden = int(D * c.mlp_ratio)
    f = {
        "patch_embed": _mm(T, c.in_channels * p * p, D),
        "t_embedder": _mm(1, 256, D) + _mm(1, D, D),  # 256-dim sinusoid -> D -> D
    }
    if class_conditional:
        f["adaLN"] = N * _mm(1, D, 6 * D) + _mm(1, D, 2 * D)  # every block's own, and the final layer's
    else:
        f["t_block"] = _mm(1, D, 6 * D)  # adaLN-single: once per image, shared by all blocks
        f["caption_projection"] = _mm(L, c.caption_channels, D) + _mm(L, D, D)
        if c.micro_conditions:  # height, width and aspect ratio, each a 256-dim sinusoid -> D/3 -> D/3
            f["micro_conditions"] = 3 * (_mm(1, 256, D // 3) + _mm(1, D // 3, D // 3))
    f["self_attn_linears"] = sum(_mm(n, D, 3 * D) + _mm(n, D, D) for n in tokens)  # qkv, proj
    f["self_attn_scores_values"] = sum(_mm(n, D, n) + _mm(n, n, D) for n in tokens)  # q k^T, p v; over heads
    if not class_conditional:
        f["cross_attn_linears"] = sum(_mm(n, D, D) + _mm(L, D, 2 * D) + _mm(n, D, D) for n in tokens)  # q, kv, proj
        f["cross_attn_scores_values"] = sum(_mm(n, D, L) + _mm(n, L, D) for n in tokens)
    f["mlp"] = sum(_mm(n, D, mlp_hidden) + _mm(n, mlp_hidden, D) for n in tokens)
    f["final_layer"] = _mm(T, D, p * p * c.out_channels)
    return f


def flops_per_image(config: PixArtConfig, height_px: int | None = None, width_px: int | None = None,
                    **kwargs) -> int:
    """Training FLOPs of one image, forward + backward = 3 x forward (see `forward_flops` for the arguments).

    FlopCounterMode run on the real module reports about 0.1 % less at 256 px: autograd skips the input
    gradient of a product whose input needs none (patch embedding, the first layers of the timestep and
    caption MLPs). The 3 x convention counts it, as MFU is conventionally defined.
    """
    return TRAIN_FLOPS_PER_FORWARD * sum(forward_flops(config, height_px, width_px, **kwargs).values())
