"""Training FLOPs of PixArt counted from its shapes: one image's forward pass, part by part, and a training image.

FLOP convention (torch.utils.flop_counter.FlopCounterMode's, and MFU's as PaLM defines it): only matrix
products count, an (m x k) @ (k x n) product as 2mkn FLOPs, attention's q k^T and p v included; elementwise
work (LayerNorm, modulation, GELU, softmax, residual adds, biases, the optimizer) counts zero. A training image
costs 3 x its forward pass: the backward computes one product for the input gradient and one for the weight
gradient of every forward product. Text (T5) and VAE encoding are not counted: PixArt trains on features
extracted once beforehand. Token masking and routing (pixart_fast.model's token levers) are counted as the model
runs them: masked, every part that works per image token sees only the kept ones; routed, the routed blocks see
only the routed ones. Representation alignment (pixart_fast.align) adds its projectors (trained: 3 x), and its
target's forward pass (no gradient: 1 x): the EMA model's blocks up to the target depth on the same tokens, or
the DINOv2 encoder on the whole image (REPA; not precomputed, so counted); the truth (what the renderer drew, read
as the image is drawn) costs nothing. The dispersive loss adds its Gram matrix over the batch (trained: 3 x).
"""
from dataclasses import replace

from pixart_fast.align import truth_width
from pixart_fast.model import PixArtConfig, inside_routed_run, kept_count

TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward (input and weight gradients)
VAE_DOWNSAMPLE = 8  # SD-VAE: one latent pixel per 8 x 8 image pixels


def _mm(m: int, k: int, n: int) -> int:
    """FLOPs of an (m x k) @ (k x n) product."""
    return 2 * m * k * n


def _token_grid(c: PixArtConfig, height_px: int | None, width_px: int | None, vae_downsample: int) -> tuple[int, int]:
    """The model's token grid (rows, columns) for an image of height_px x width_px (default: the config's size)."""
    unit = vae_downsample * c.patch_size
    size_h = c.input_size * vae_downsample if height_px is None else height_px
    size_w = size_h if width_px is None else width_px
    if size_h <= 0 or size_w <= 0 or size_h % unit or size_w % unit:
        raise ValueError(f"image size {size_h} x {size_w} px must be positive multiples of vae_downsample * "
                         f"patch_size = {vae_downsample} * {c.patch_size} = {unit} px")
    return size_h // unit, size_w // unit


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
    grid_h, grid_w = _token_grid(c, height_px, width_px, vae_downsample)
    T = kept_count(grid_h * grid_w, mask_ratio)  # image tokens (masked: the kept ones)
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
    if c.pixel_decoder:  # a Linear to n features per pixel, then 3x3 convolutions (n + C -> n -> n -> C)
        if mask_ratio:
            raise ValueError(f"a model with a pixel decoder takes no token masking, got mask_ratio {mask_ratio}")
        n, C, pixels = c.pixel_decoder, c.in_channels, T * p * p
        f["pixel_decoder"] = (_mm(T, D, p * p * n) + _mm(pixels, 9 * (n + C), n) + _mm(pixels, 9 * n, n)
                              + _mm(pixels, 9 * n, C))
    return f


def encoder_forward_flops(encoder, grid_h: int, grid_w: int) -> dict[str, int]:
    """FLOPs of one image's forward pass through a DINOv2 (`encoder`: its transformers Dinov2Config) whose input
    is resized to grid_h x grid_w of its patches: the patch embedding, then every layer's attention (q, k, v and
    output projections; scores and values over the patch tokens and CLS) and MLP (SwiGLU for the giant model)."""
    E, N, n_layers = encoder.hidden_size, grid_h * grid_w + 1, encoder.num_hidden_layers  # N: patches + CLS
    hidden = int(E * encoder.mlp_ratio)
    if encoder.use_swiglu_ffn:  # gate and up projections to two thirds of the width (rounded up to 8), then down
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        mlp = _mm(N, E, 2 * hidden) + _mm(N, hidden, E)
    else:
        mlp = _mm(N, E, hidden) + _mm(N, hidden, E)
    return {"encoder_patch_embed": _mm(N - 1, encoder.num_channels * encoder.patch_size ** 2, E),
            "encoder_attn_linears": n_layers * _mm(N, E, 4 * E),
            "encoder_attn_scores_values": n_layers * (_mm(N, E, N) + _mm(N, N, E)),
            "encoder_mlp": n_layers * mlp}


def alignment_flops(config: PixArtConfig, height_px: int | None = None, width_px: int | None = None, *,
                    repa_depth: int = 1, repa_second_depth: int = 0, repa_target_depth: int = 0,
                    repa_projector_dim: int = 0, repa_encoder=None, repa_truth: bool = False,
                    vae_downsample: int = VAE_DOWNSAMPLE, caption_tokens: int | None = None, mask_ratio: float = 0.0,
                    route_ratio: float = 0.0, route_blocks: tuple[int, int] | None = None) -> dict[str, int]:
    """Training FLOPs representation alignment adds to one image, per part (pixart_fast.align): the projector
    (width repa_projector_dim, 0: 2 x hidden size) after repa_depth blocks, and with repa_second_depth a second
    one after that many, each forward and backward on the tokens it reads: those that ran the blocks before its
    depth (inside the routed run of route_blocks, `inside_routed_run`, the routed ones). And forward only,
    self-alignment's teacher (the model's first repa_target_depth blocks and what comes before them, on the same
    tokens, never routed) or REPA's encoder (`repa_encoder`: a transformers Dinov2Config) on the whole image. With
    repa_truth the target is the truth (pixel data): the projector's output is its width, and nothing else counts.
    Other arguments as `forward_flops`."""
    c = config
    grid_h, grid_w = _token_grid(c, height_px, width_px, vae_downsample)
    T = kept_count(grid_h * grid_w, mask_ratio)  # the tokens that enter the blocks (masked: the kept ones)
    D, P = c.hidden_size, repa_projector_dim or 2 * c.hidden_size
    Z = repa_encoder.hidden_size if repa_encoder is not None else truth_width(c.patch_size) if repa_truth else D
    f = {"projector": 0}
    for depth in (repa_depth, repa_second_depth) if repa_second_depth else (repa_depth,):
        n = kept_count(T, route_ratio) if route_ratio and inside_routed_run(depth, route_blocks) else T
        f["projector"] += TRAIN_FLOPS_PER_FORWARD * (_mm(n, D, P) + _mm(n, P, P) + _mm(n, P, Z))
    if repa_encoder is not None:
        f.update(encoder_forward_flops(repa_encoder, grid_h, grid_w))
    elif not repa_truth:
        teacher = forward_flops(replace(c, depth=repa_target_depth), height_px, width_px,
                                vae_downsample=vae_downsample, caption_tokens=caption_tokens, mask_ratio=mask_ratio)
        f["teacher"] = sum(teacher.values()) - teacher["final_layer"]
    return f


def dispersion_flops(config: PixArtConfig, height_px: int | None = None, width_px: int | None = None, *,
                     batch_size: int, vae_downsample: int = VAE_DOWNSAMPLE) -> int:
    """Training FLOPs the dispersive loss (pixart_fast.align.dispersive_loss) adds to one image of a batch of
    batch_size: its row of the batch's Gram matrix over the states after a block, flattened (every token's, at any
    depth and routing), forward and backward."""
    if batch_size < 1:
        raise ValueError(f"the dispersive loss's FLOPs need the batch size, got {batch_size}")
    grid_h, grid_w = _token_grid(config, height_px, width_px, vae_downsample)
    return TRAIN_FLOPS_PER_FORWARD * _mm(1, grid_h * grid_w * config.hidden_size, batch_size)


def flops_per_image(config: PixArtConfig, height_px: int | None = None, width_px: int | None = None, *,
                    repa_depth: int = 0, repa_second_depth: int = 0, repa_target_depth: int = 0,
                    repa_projector_dim: int = 0, repa_encoder=None, repa_truth: bool = False, disperse_depth: int = 0,
                    batch_size: int = 0, **kwargs) -> int:
    """Training FLOPs of one image, forward + backward = 3 x forward (see `forward_flops` for the arguments),
    plus, with repa_depth > 0, what representation alignment adds (`alignment_flops`: the other repa_ arguments),
    and with disperse_depth > 0 what the dispersive loss adds to an image of a batch of batch_size
    (`dispersion_flops`).

    FlopCounterMode run on the real module reports about 0.1 % less at 256 px: autograd skips the input
    gradient of a product whose input needs none (patch embedding, the first layers of the timestep and
    caption MLPs). The 3 x convention counts it, as MFU is conventionally defined.
    """
    train = TRAIN_FLOPS_PER_FORWARD * sum(forward_flops(config, height_px, width_px, **kwargs).values())
    if repa_depth:
        kwargs = {k: v for k, v in kwargs.items() if k != "class_conditional"}
        train += sum(alignment_flops(config, height_px, width_px, repa_depth=repa_depth,
                                     repa_second_depth=repa_second_depth, repa_target_depth=repa_target_depth,
                                     repa_projector_dim=repa_projector_dim, repa_encoder=repa_encoder,
                                     repa_truth=repa_truth, **kwargs).values())
    if disperse_depth:
        train += dispersion_flops(config, height_px, width_px, batch_size=batch_size,
                                  vae_downsample=kwargs.get("vae_downsample", VAE_DOWNSAMPLE))
    return train
