"""What the benchmarks run: our PixArt and diffusers' PixArtTransformer2DModel with the same weights, a training
batch, one training step (forward, loss, backward, AdamW) and the largest batch that fits.

Shapes: B batch, C latent channels, H x W latent size, L caption tokens, E caption channels.
"""
from dataclasses import dataclass

import torch

try:
    from diffusers import PixArtTransformer2DModel
except ImportError as error:  # diffusers is optional (a GPU machine without network may lack it): only the
    PixArtTransformer2DModel, DIFFUSERS_IMPORT_ERROR = None, error  # diffusers comparisons need it
else:
    DIFFUSERS_IMPORT_ERROR = None

from pixart_fast.checkpoints import to_diffusers
from pixart_fast.diffusion import Diffusion
from pixart_fast.model import CONFIGS, PixArt, PixArtConfig, draw_tokens, keep_patches

# PixArt-XL/2 at each training resolution (px).
XL = {256: CONFIGS["PixArt-XL/2-256"], 512: CONFIGS["PixArt-XL/2-512"], 1024: CONFIGS["PixArtMS-XL/2-1024"]}
# Images per GPU step in the XL/2 timings: 8192 image tokens per step at every resolution.
XL_BATCH = {256: 32, 512: 8, 1024: 2}
# The CPU comparison: big enough that a step (about 3 GFLOP) is not dominated by Python overhead, small enough
# for a shared 2-core machine. 64 image tokens, 3 heads of dim 64, 32 caption tokens; batch CPU_BATCH.
CPU_CONFIG = PixArtConfig(input_size=16, in_channels=4, hidden_size=192, depth=4, num_heads=3,
                          caption_channels=128, max_tokens=32)
CPU_BATCH = 4
# The training-step variants the GPU benchmarks compare. name: (model, kernels, torch.compile)
TRAIN_VARIANTS = {
    "ours": ("ours", "torch", False),
    "ours+triton": ("ours", "triton", False),
    "ours+compile": ("ours", "torch", True),
    "ours+triton+compile": ("ours", "triton", True),
    "diffusers": ("diffusers", "torch", False),
    "diffusers+compile": ("diffusers", "torch", True),
}
# AdamW as the paper trains (lr 2e-5, weight decay 0.03, eps 1e-10).
ADAMW = dict(lr=2e-5, weight_decay=0.03, eps=1e-10)


@dataclass
class Batch:
    x0: torch.Tensor  # (B, C, H, W) clean latents
    t: torch.Tensor  # (B,) int64 diffusion steps
    y: torch.Tensor  # (B, L, E) caption features
    mask: torch.Tensor  # (B, L) bool, True = real token
    img_hw: torch.Tensor | None  # (B, 2) image height, width in px (micro-conditions only)
    aspect_ratio: torch.Tensor | None  # (B, 1)


def make_batch(cfg: PixArtConfig, B: int, device, seed: int = 0) -> Batch:
    """Random latents, timesteps and padded captions (lengths 1..L) of cfg's shape, on device."""
    g = torch.Generator().manual_seed(seed)
    S, L = cfg.input_size, cfg.max_tokens
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    micro = cfg.micro_conditions
    batch = Batch(x0=torch.randn(B, cfg.in_channels, S, S, generator=g),
                  t=torch.randint(0, 1000, (B,), generator=g),
                  y=torch.randn(B, L, cfg.caption_channels, generator=g),
                  mask=torch.arange(L)[None] < lengths[:, None],
                  img_hw=torch.full((B, 2), 8.0 * S) if micro else None,
                  aspect_ratio=torch.ones(B, 1) if micro else None)
    return Batch(*[None if v is None else v.to(device) for v in vars(batch).values()])


def build_ours(cfg: PixArtConfig, device, kernels: str = "auto", seed: int = 0) -> PixArt:
    """Our PixArt in training mode, built directly on device, weights from `seed`."""
    torch.manual_seed(seed)
    with torch.device(device):
        return PixArt(cfg, kernels=kernels).train()


def build_diffusers(ours: PixArt) -> PixArtTransformer2DModel:
    """diffusers' PixArtTransformer2DModel of ours' shape, on ours' device, with ours' weights (strict load)."""
    if PixArtTransformer2DModel is None:
        raise ModuleNotFoundError(f"diffusers cannot be imported ({DIFFUSERS_IMPORT_ERROR}); install it for the "
                                  "comparisons with diffusers' model")
    cfg = ours.config
    device = next(ours.parameters()).device
    with torch.device(device):
        ref = PixArtTransformer2DModel(
            num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
            out_channels=cfg.out_channels, num_layers=cfg.depth, cross_attention_dim=cfg.hidden_size,
            sample_size=cfg.input_size, patch_size=cfg.patch_size, caption_channels=cfg.caption_channels,
            interpolation_scale=cfg.pe_interpolation, use_additional_conditions=cfg.micro_conditions)
    ref.load_state_dict(to_diffusers(ours.state_dict()))
    return ref.to(device).train()


def model_fn(model, batch: Batch, levers: dict | None = None):
    """(x_t, t) -> model output (B, 2C, H, W), captions and micro-conditions bound from batch; levers: our PixArt's
    token masking / routing arguments (keep, grid, route, route_blocks; pixart_fast.model)."""
    if PixArtTransformer2DModel is not None and (
            isinstance(model, PixArtTransformer2DModel)
            or isinstance(getattr(model, "_orig_mod", None), PixArtTransformer2DModel)):
        added = None if batch.img_hw is None else {"resolution": batch.img_hw, "aspect_ratio": batch.aspect_ratio}
        return lambda x, t: model(x, encoder_hidden_states=batch.y, timestep=t, encoder_attention_mask=batch.mask,
                                  added_cond_kwargs=added, return_dict=False)[0]
    return lambda x, t: model(x, t, batch.y, batch.mask, batch.img_hw, batch.aspect_ratio, **(levers or {}))


def token_levers(cfg: PixArtConfig, batch_size: int, device, mask_ratio: float = 0.0, route_ratio: float = 0.0,
                 seed: int = 0) -> dict:
    """Our PixArt's forward arguments for masking a fraction mask_ratio of each image's tokens and routing a
    fraction route_ratio of the rest past blocks 1 to depth - 2 (the trainer's defaults; a 2-block model: block 0),
    drawn once: a step's cost does not depend on which tokens are drawn."""
    g = torch.Generator(device).manual_seed(seed)
    grid, levers = (cfg.input_size // cfg.patch_size,) * 2, {}
    tokens = grid[0] * grid[1]
    if mask_ratio:
        keep = draw_tokens(batch_size, tokens, mask_ratio, g)
        levers, tokens = {"keep": keep, "grid": grid}, keep.shape[1]
    if route_ratio:
        levers.update(route=draw_tokens(batch_size, tokens, route_ratio, g), route_blocks=(1 if cfg.depth > 2 else 0, cfg.depth - 1))
    return levers


def train_step(model, batch: Batch, optimizer, autocast_dtype: torch.dtype | None = None, sync=None, ema=None,
               levers: dict | None = None):
    """One training step as a callable: the diffusion loss (MSE + VLB) under autocast, backward, AdamW step, and
    ema() after it where given. The optimizer step and the EMA update run inside record_function ranges
    ("pixart::optimizer", "pixart::ema") so that a profile can tell their kernels apart.

    sync: called at the end of the step (torch.cuda.synchronize on a GPU) so that a timer sees finished work.
    levers: token_levers(...) for our PixArt; with masking the loss reads only the kept patches, as in training.
    """
    diffusion, fn = Diffusion(), model_fn(model, batch, levers)
    x0 = batch.x0
    if levers and "keep" in levers:
        x0 = keep_patches(x0, levers["keep"], getattr(model, "_orig_mod", model).config.patch_size)
    device_type = batch.x0.device.type

    def step():
        # Gradients are dropped first, not last: a step that ran out of memory halfway leaves none behind.
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = diffusion.training_losses(fn, x0, batch.t)["loss"].mean()
        loss.backward()
        with torch.profiler.record_function("pixart::optimizer"):
            optimizer.step()
        if ema is not None:
            with torch.profiler.record_function("pixart::ema"):
                ema()
        if sync is not None:
            sync()
    return step


def adamw(model) -> torch.optim.AdamW:
    """The paper's AdamW; the fused implementation on CUDA."""
    cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), **ADAMW, **({"fused": True} if cuda else {}))


def fits(make_step, batch_size: int) -> bool:
    """Whether one training step at batch_size runs without running out of GPU memory."""
    try:
        make_step(batch_size)()
        ok = True
    except torch.OutOfMemoryError:
        ok = False
    torch.cuda.empty_cache()  # after the except block: the exception no longer holds the step's tensors
    return ok


def largest_batch(make_step, start: int, max_probes: int = 8) -> tuple[int, int]:
    """The largest batch size for which make_step(B)() fits, by doubling from `start` and then bisecting;
    stops after max_probes steps (so the answer is within a factor 2^-k of the truth, k the bisection probes
    left). Returns (largest batch that fit, 0 if none; probes used)."""
    good, bad, probes = 0, None, 0
    B = start
    while bad is None and probes < max_probes:
        probes += 1
        if fits(make_step, B):
            good, B = B, 2 * B
        else:
            bad = B
    while bad is not None and bad - good > 1 and probes < max_probes:
        probes += 1
        mid = (good + bad) // 2
        if fits(make_step, mid):
            good = mid
        else:
            bad = mid
    return good, probes
