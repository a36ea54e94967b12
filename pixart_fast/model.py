"""PixArt-alpha (arXiv 2310.00426) and the class-conditional DiT it starts from, in one file.

Read top to bottom: configs, position embeddings, embedders, attention and MLP, the PixArt block, the final
layer, the PixArt model, the DiT model of stage 1, and `reparameterize` (DiT -> PixArt, paper section 2.3).
Parameter names are the official PixArt repo's (and facebookresearch/DiT's for `DiT`), so their checkpoints
load unchanged. Shapes: B batch, C channels, H x W input, T = (H/p)(W/p) image tokens, D hidden size,
L caption tokens (at most max_tokens: 120 for PixArt-alpha, 300 for PixArt-Sigma), E caption channels (4096 for
T5-XXL). The PixArt-Sigma models (arXiv 2403.04692) are this network with 300 caption tokens, no micro-conditions
and larger position-interpolation scales (CONFIGS "PixArt-Sigma-*").

Two training-only levers cut the tokens PixArt's blocks see (section "Token levers"): masking (MaskDiT, MicroDiT)
runs only a kept subset of each image's tokens through the whole network and the loss reads only their patches;
routing (TREAD) sends a subset of the tokens through a run of middle blocks while the others skip it unchanged.
"""
import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from pixart_fast.diffusion import guided
from pixart_fast.kernels import cross_attention, gated_residual, gated_residual_modulate, modulate, patchify, unpatchify
from pixart_fast.kernels.backend import BACKENDS


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PixArtConfig:
    """Shape of a PixArt model (and of the stage-1 DiT built from the same numbers)."""

    input_size: int = 32  # side of the model input in latent pixels (32, 64, 128 at 256/512/1024 px)
    patch_size: int = 2
    in_channels: int = 4  # SD-VAE latents; 3 for the embedded pixel-space default
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    learn_sigma: bool = True  # output eps and the learned-range variance: 2 * in_channels channels
    caption_channels: int = 4096  # T5 v1.1 XXL feature size
    max_tokens: int = 120  # caption tokens (alpha 120, Sigma 300); the null caption `y_embedding` has this many
    class_dropout_prob: float = 0.1  # caption (or class) replaced by the null one with this probability in training
    pe_interpolation: float = 1.0  # position-embedding grid divisor: 1 at 256/512 px, 2 at 1024 px, 4 at 2K (Sigma)
    micro_conditions: bool = False  # PixArtMS: add image size and aspect-ratio embeddings to t
    num_classes: int = 1000  # classes of the stage-1 class-conditional DiT (unused by PixArt)
    pixel_decoder: int = 0  # channels of a conv decoder in pixel space after the final layer (0: none, as PixArt)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.micro_conditions and self.hidden_size % 3:
            raise ValueError(f"micro_conditions need hidden_size divisible by 3 (2 size + 1 ratio third), got {self.hidden_size}")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


_XL = PixArtConfig()
CONFIGS = {
    # The paper's models (docs/ARCHITECTURE.md section 1): 611 M parameters.
    "PixArt-XL/2-256": _XL,
    "PixArt-XL/2-512": replace(_XL, input_size=64),
    "PixArtMS-XL/2-1024": replace(_XL, input_size=128, pe_interpolation=2.0, micro_conditions=True),
    # PixArt-Sigma's released models (PixArt-Sigma-XL-2-{512,1024,2K}-MS; arXiv 2403.04692): the same 611 M network
    # (the official PixArtMS_XL_2 class with micro_condition False: no size embedders), 300 T5 tokens
    # (model_max_length 300) and pe_interpolation 1 / 2 / 4 at 512 / 1024 / 2048 px, as the official configs
    # configs/pixart_sigma_config/PixArt_sigma_xl2_img{512,1024}_internalms.py and
    # PixArt_sigma_xl2_img2K_internalms_kvcompress.py (kv_compress False there) and diffusers'
    # scripts/convert_pixart_sigma_to_diffusers.py (interpolation_scale {512: 1, 1024: 2, 2048: 4},
    # sample_size = px / 8, use_additional_conditions False). Sigma's VAE is SDXL's (4 channels, scale 0.13025):
    # the extraction reads the scale from the VAE's config.
    "PixArt-Sigma-XL/2-512": replace(_XL, input_size=64, max_tokens=300),
    "PixArt-Sigma-XL/2-1024": replace(_XL, input_size=128, pe_interpolation=2.0, max_tokens=300),
    "PixArt-Sigma-XL/2-2K": replace(_XL, input_size=256, pe_interpolation=4.0, max_tokens=300),
    # The embedded default (docs/ARCHITECTURE.md section 5): 32 px pixel space, the tiny T5's 64 channels, head dim 72 as
    # PixArt-XL/2's. Patch 4 (64 tokens), not the patch 2 of the paper's models (256 tokens): on 2 CPU cores patch 2 trains
    # at about 48 images/s and after 5 minutes samples only noise of the right colour; patch 4 runs about 4x
    # faster and in the same time draws objects of the right colour.
    # max_tokens 32: the embedded captions are at most 24 word tokens (EOS included); padding to 120 cost ~15 % of
    # stage 2's images/s (docs/time-to-quality-log.md). With --tokenizer byte, captions over 32 bytes are cut.
    "PixArt-pixel-32": PixArtConfig(input_size=32, patch_size=4, in_channels=3, hidden_size=144, depth=4,
                                    num_heads=2, caption_channels=64, max_tokens=32, num_classes=24),
    # The embedded default's network on patch 2 (256 tokens, as PixArt-XL/2 at 256 px): about 4x the step's work,
    # affordable with token masking (--mask-ratio 0.75 runs 64 tokens, as patch 4 does).
    "PixArt-pixel-32-p2": PixArtConfig(input_size=32, patch_size=2, in_channels=3, hidden_size=144, depth=4,
                                       num_heads=2, caption_channels=64, max_tokens=32, num_classes=24),
    # The embedded default's network with a pixel decoder of 16 channels (`PixelDecoder`; about 1.1x the FLOPs).
    "PixArt-pixel-32-pd": PixArtConfig(input_size=32, patch_size=4, in_channels=3, hidden_size=144, depth=4,
                                       num_heads=2, caption_channels=64, max_tokens=32, num_classes=24,
                                       pixel_decoder=16),
    # A guide for autoguidance of the embedded stage-2 networks (`sample --guide-ckpt`): half their width and depth
    # (head dim 72 still), its captions and image size theirs. Trained briefly, it is bad in the way they are, only
    # more so, which is what a guide should be (Karras et al. 2024).
    "PixArt-pixel-32-xs": PixArtConfig(input_size=32, patch_size=4, in_channels=3, hidden_size=72, depth=2,
                                       num_heads=1, caption_channels=64, max_tokens=32, num_classes=24),
    # Stage 3 of the embedded default: stage 2's network (its pixel decoder included) at twice the side (256
    # tokens, as a 256-px latent), multi-aspect, with micro-conditions; positions interpolated by 2 as PixArt does
    # from 512 to 1024 px, so stage-2 weights carry over unchanged.
    "PixArtMS-pixel-64": PixArtConfig(input_size=64, patch_size=4, in_channels=3, hidden_size=144, depth=4,
                                      num_heads=2, caption_channels=64, max_tokens=32, pe_interpolation=2.0,
                                      micro_conditions=True, pixel_decoder=16),
    # Tiny models for tests.
    "PixArt-pixel-tiny": PixArtConfig(input_size=16, in_channels=3, hidden_size=48, depth=2, num_heads=2,
                                      caption_channels=64, num_classes=24),
    "PixArtMS-pixel-tiny": PixArtConfig(input_size=32, in_channels=3, hidden_size=48, depth=2, num_heads=2,
                                        caption_channels=64, pe_interpolation=2.0, micro_conditions=True),
    "PixArt-tiny": PixArtConfig(input_size=8, in_channels=4, hidden_size=48, depth=2, num_heads=2,
                                caption_channels=24, max_tokens=10, num_classes=5),
    "PixArtMS-tiny": PixArtConfig(input_size=8, in_channels=4, hidden_size=48, depth=2, num_heads=2,
                                  caption_channels=24, max_tokens=10, micro_conditions=True),
    # PixArt-Sigma's settings in a tiny network: 300 caption tokens, positions interpolated by 2 (its 1024-px scale).
    "PixArt-Sigma-tiny": PixArtConfig(input_size=16, in_channels=4, hidden_size=48, depth=2, num_heads=2,
                                      caption_channels=24, max_tokens=300, pe_interpolation=2.0),
}


# ----------------------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position embedding
# ----------------------------------------------------------------------------------------------------------


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos (M,) -> (M, dim): [sin(pos * w), cos(pos * w)] with w = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int, pe_interpolation: float) -> torch.Tensor:
    """(grid_h * grid_w, dim) float32, row-major over the token grid; the first half encodes the column
    coordinate, the second the row (the official repo's and diffusers' order). Coordinates are scaled so a grid
    of any size spans the base grid: arange(G) / (G / base_size) / pe_interpolation."""
    rows = torch.arange(grid_h, dtype=torch.float64) / (grid_h / base_size) / pe_interpolation
    cols = torch.arange(grid_w, dtype=torch.float64) / (grid_w / base_size) / pe_interpolation
    rr, cc = torch.meshgrid(rows, cols, indexing="ij")  # (grid_h, grid_w) each
    emb = torch.cat([sincos_1d(dim // 2, cc.flatten()), sincos_1d(dim // 2, rr.flatten())], dim=1)
    return emb.float()


# ----------------------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, T, D) with a stride-p convolution (kept as `proj` so checkpoints load), run as
    patchify + matmul so the reshape can be the fused kernel."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, kernels: str):
        super().__init__()
        self.patch_size, self.kernels = patch_size, kernels
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x):
        tokens = patchify(x, self.patch_size, backend=self.kernels)  # (B, T, C*p*p), (c, i, j) order
        return F.linear(tokens, self.proj.weight.flatten(1), self.proj.bias)  # (B, T, D)


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """t (N,) float, possibly fractional -> (N, dim) = [cos(t * f), sin(t * f)], f = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """t (B,) -> (B, D): 256-dim sinusoid, Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """PixArtMS micro-condition: s (B, k) sizes -> (B, k * D') with each of the k numbers embedded like a
    timestep (image height and width: k = 2; aspect ratio: k = 1)."""

    def forward(self, s):
        s = s.reshape(s.shape[0], -1)  # (B, k)
        return super().forward(s.flatten()).reshape(s.shape[0], -1)  # (B, k * D')


class CaptionEmbedder(nn.Module):
    """T5 features (B, L, E) -> (B, L, D) through Linear, tanh-GELU, Linear. Owns the null caption
    `y_embedding` (max_tokens, E) that classifier-free guidance and caption dropout use."""

    def __init__(self, caption_channels: int, hidden_size: int, max_tokens: int):
        super().__init__()
        self.y_proj = Mlp(caption_channels, hidden_size, hidden_size)
        self.register_buffer("y_embedding", torch.randn(max_tokens, caption_channels) / caption_channels**0.5)

    def forward(self, y):
        return self.y_proj(y)


# ----------------------------------------------------------------------------------------------------------
# Attention and MLP
# ----------------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """Linear, tanh-approximate GELU, Linear (timm's Mlp names: fc1, fc2)."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head self-attention over image tokens: (B, T, D) -> (B, T, D)."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)  # (B, H, T, Dh)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, Dh)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class CrossAttention(nn.Module):
    """Image tokens (B, T, D) attend to caption tokens (B, L, D) where mask (B, L) is True. A caption with
    no valid token contributes zero (never NaN)."""

    def __init__(self, hidden_size: int, num_heads: int, kernels: str):
        super().__init__()
        self.num_heads, self.kernels = num_heads, kernels
        self.q_linear = nn.Linear(hidden_size, hidden_size)
        self.kv_linear = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, y, mask):
        B, T, D = x.shape
        H, L = self.num_heads, y.shape[1]
        q = self.q_linear(x).view(B, T, H, D // H)  # (B, T, H, Dh)
        k, v = self.kv_linear(y).view(B, L, 2, H, D // H).unbind(2)  # (B, L, H, Dh) each
        x = cross_attention(q, k, v, mask, backend=self.kernels)  # (B, T, H, Dh)
        return self.proj(x.reshape(B, T, D))


# ----------------------------------------------------------------------------------------------------------
# The PixArt block (adaLN-single) and the final layer
# ----------------------------------------------------------------------------------------------------------


def linear_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype a Linear computes in on x's device: the autocast dtype where autocast is on, else None (the
    input's own). The kernels write what feeds a Linear in it, so no cast pass runs between them; the residual
    stream keeps its dtype (fp32)."""
    device = x.device.type  # "meta" (shape-only runs, the planner's FLOP count) has no autocast
    # CPU and CUDA always have autocast: torch.compile cannot trace is_autocast_available on torch 2.11 (a graph
    # break per call), so only other devices ask it.
    if device not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device):
        return None
    if not torch.is_autocast_enabled(device):
        return None
    return torch.get_autocast_dtype(device)


class PixArtBlock(nn.Module):
    """x += gate_msa * attn(modulate(LN(x))); x += cross_attn(x, y); x += gate_mlp * mlp(modulate(LN(x))).

    The six modulation vectors are this block's `scale_shift_table` (6, D) plus the shared t0 (B, 6D)
    (adaLN-single). The block takes its attention input already normalised and modulated, and closes with
    one fused pass: the MLP's gated residual add together with the LayerNorm + modulation of whatever comes
    next (the next block's attention input, or the final layer's), so the residual stream is read once there.
    The cross-attention's residual add runs fused into the MLP's modulation. Under autocast the kernels write
    what feeds a Linear (the modulated copies, the cross-attention's query input) in the autocast dtype, and the
    residual stream stays fp32 (the fp32 position embedding makes it so).
    """

    def __init__(self, config: PixArtConfig, kernels: str):
        super().__init__()
        D = config.hidden_size
        self.kernels = kernels
        self.attn = Attention(D, config.num_heads)
        self.cross_attn = CrossAttention(D, config.num_heads, kernels)
        self.mlp = Mlp(D, int(D * config.mlp_ratio), D)
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)

    def modulation(self, t0):
        """t0 (B, 6D) -> shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, each (B, D)."""
        return (self.scale_shift_table[None] + t0.reshape(t0.shape[0], 6, -1)).unbind(1)

    def forward(self, x, x_mod, y, t0, mask, next_shift, next_scale):
        """x: residual stream (B, T, D); x_mod: modulate(LN(x), shift_msa, scale_msa) (B, T, D);
        next_shift/next_scale (B, D): the modulation of the layer after this block.
        Returns the new stream and its normalised, modulated copy for the next layer."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t0)
        linear_in = linear_dtype(x)
        out = gated_residual(x, gate_msa, self.attn(x_mod), backend=self.kernels, copy_dtype=linear_in)
        x, x_q = out if linear_in else (out, out)  # the stream, and (autocast) its copy for cross_attn's q_linear
        # x + cross_attn: no norm, no modulation, no gate; the add runs in the MLP's modulate (gate None: 1).
        x, x_mod = gated_residual_modulate(x, None, self.cross_attn(x_q, y, mask), shift_mlp, scale_mlp,
                                           backend=self.kernels, out_dtype=linear_in)
        return gated_residual_modulate(x, gate_mlp, self.mlp(x_mod), next_shift, next_scale, backend=self.kernels,
                                       out_dtype=linear_in)


class FinalLayer(nn.Module):
    """LN, modulate by (table (2, D) + t), Linear to p*p*out_channels per token. The LN and modulation run
    fused into the last block's closing pass, so forward takes the modulated tokens."""

    def __init__(self, config: PixArtConfig):
        super().__init__()
        D, p = config.hidden_size, config.patch_size
        self.scale_shift_table = nn.Parameter(torch.randn(2, D) / D**0.5)
        self.linear = nn.Linear(D, p * p * config.out_channels)

    def modulation(self, t):
        """t (B, D), the timestep embedding before t_block -> shift, scale, each (B, D)."""
        return (self.scale_shift_table[None] + t[:, None]).unbind(1)

    def forward(self, x_mod):
        return self.linear(x_mod)  # (B, T, p*p*out)


class PixelDecoder(nn.Module):
    """A light decoder in pixel space after the final layer, for models that diffuse pixels (DeCo, arXiv
    2511.19365, decodes the high frequencies with one): the last modulated tokens, projected to `pixel_decoder`
    features per pixel, beside the noisy input, through three 3x3 convolutions (GELU between) whose output is added
    to the prediction's first in_channels channels. A patch's pixels then see their neighbours across the patch
    border, which a per-token linear head cannot. The last convolution starts at zero: a new decoder changes
    nothing."""

    def __init__(self, config: PixArtConfig):
        super().__init__()
        C, n, self.patch_size = config.in_channels, config.pixel_decoder, config.patch_size
        self.linear = nn.Linear(config.hidden_size, self.patch_size**2 * n)
        self.conv1 = nn.Conv2d(n + C, n, 3, padding=1)
        self.conv2 = nn.Conv2d(n, n, 3, padding=1)
        self.conv3 = nn.Conv2d(n, C, 3, padding=1)

    def forward(self, x_mod, pixels, kernels: str):
        """x_mod (B, T, D) the final layer's input, pixels (B, C, H, W) the noisy input -> (B, C, H, W)."""
        n = self.conv2.in_channels
        features = unpatchify(self.linear(x_mod), self.patch_size, n, *pixels.shape[2:], backend=kernels)
        h = F.gelu(self.conv1(torch.cat([features, pixels.to(features.dtype)], dim=1)))  # (B, n, H, W)
        return self.conv3(F.gelu(self.conv2(h)))


# ----------------------------------------------------------------------------------------------------------
# Recomputation: what the backward pass recomputes instead of storing
# ----------------------------------------------------------------------------------------------------------

RECOMPUTE = ("none", "selective", "full")
_aten = torch.ops.aten
# Ops whose outputs selective recomputation keeps: matmuls and attention (the FLOPs). Everything else in a block
# is pointwise or a reduction over one row (LayerNorm, modulation, GELU, casts, the gated residuals), recomputed
# in the backward pass from the kept tensors at a few percent of the block's compute.
_KEPT = {getattr(_aten, name).default for name in (
    "mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu") if hasattr(_aten, name)}


_LOW_RANK = 8  # a matmul whose inner or output width is at most 1/8 of the other: a low-rank factor (LoRA's A, B)


def _low_rank(op, args) -> bool:
    """A product through a narrow width (LoRA's x A^T: D -> r, then B: r -> D): 2 r D FLOPs per token against a
    Linear's 2 D^2, so recomputing it is cheap, while keeping B's output would keep one more (T, D) per Linear."""
    if op not in (_aten.mm.default, _aten.addmm.default):
        return False
    a, b = args[-2:]  # mm(a, b), addmm(bias, a, b): (m, k) @ (k, n)
    k, n = a.shape[-1], b.shape[-1]
    return min(k, n) * _LOW_RANK <= max(k, n)


def _keep_matmul_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    if op is torch.ops.pixart_fast.cross_attn_fwd.default:  # the cross-attention kernel: a matmul
        return CheckpointPolicy.MUST_SAVE
    if op in _KEPT and not _low_rank(op, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _checkpoint_options(recompute: str) -> dict:
    """torch.utils.checkpoint's options for a block under `recompute` ("selective" or "full")."""
    if recompute == "selective":
        return {"use_reentrant": False,
                "context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_matmul_outputs)}
    return {"use_reentrant": False}


def _check_recompute(recompute: str) -> str:
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    return recompute


def xavier_init(model: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear, and for the patch-embedding conv viewed as a
    Linear over the flattened patch: the official repo's and DiT's starting point before the special cases."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    proj = model.x_embedder.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)


# ----------------------------------------------------------------------------------------------------------
# Token levers: masking and routing (training only; sampling always runs every token through every block)
# ----------------------------------------------------------------------------------------------------------


def kept_count(n_tokens: int, ratio: float) -> int:
    """Tokens of n_tokens left when a fraction `ratio` is dropped: round((1 - ratio) n_tokens), at least one."""
    return max(1, round((1 - ratio) * n_tokens))


def draw_tokens(n_images: int, n_tokens: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """(n_images, kept_count(n_tokens, ratio)) int64: for each image a uniformly drawn subset of its token indices,
    in ascending order, drawn from `generator` (on its device, no host sync)."""
    scores = torch.rand(n_images, n_tokens, generator=generator, device=generator.device)
    return scores.argsort(dim=1)[:, :kept_count(n_tokens, ratio)].sort(dim=1).values


def take_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, T, D), index (B, K) -> (B, K, D): each image's tokens at its indices."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def inside_routed_run(depth: int, route_blocks: tuple[int, int]) -> bool:
    """Whether the residual stream after `depth` blocks is inside the routed run of route_blocks = (start, end):
    after a block that only the routed tokens ran, before they rejoin the others."""
    return route_blocks[0] < depth < route_blocks[1]


def keep_patches(x: torch.Tensor, keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """x (B, C, H, W), keep (B, K) indices into the row-major (H/p) x (W/p) patch grid -> (B, C, p, K p): the kept
    patches side by side, in `keep`'s order. A masked PixArt forward takes its input and gives its output in this
    layout, so the diffusion loss, computed pixel by pixel on it, covers exactly the kept patches."""
    B, C, H, W = x.shape
    p = patch_size
    patches = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C, p, p)  # (B, T, C, p, p)
    kept = patches.gather(1, keep[:, :, None, None, None].expand(-1, -1, C, p, p))  # (B, K, C, p, p)
    return kept.permute(0, 2, 3, 1, 4).reshape(B, C, p, -1)


def _as_bool_mask(mask, y):
    """mask (B, L) of 0/1 or bool, or None (all valid) -> bool (B, L)."""
    if mask is None:
        return torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
    if mask.shape != y.shape[:2]:
        raise ValueError(f"caption mask shape {tuple(mask.shape)} does not match captions {tuple(y.shape[:2])}")
    return mask.bool()


class PixArt(nn.Module):
    """PixArt-alpha: a DiT with adaLN-single, cross-attention to T5 features, optional PixArtMS micro-conditions.

    kernels: "auto" (Triton on CUDA, PyTorch on CPU), "triton" or "torch" (docs/ARCHITECTURE.md section 4).
    recompute: what the backward pass recomputes instead of storing (`RECOMPUTE`): "none"; "selective", each
    block's pointwise work (LayerNorm, modulation, GELU, casts) while its matmul and attention outputs are kept;
    "full", each whole block from its inputs (about a third more compute).
    """

    def __init__(self, config: PixArtConfig, kernels: str = "auto", recompute: str = "none"):
        super().__init__()
        if kernels not in BACKENDS:
            raise ValueError(f"kernels must be one of {BACKENDS}, got {kernels!r}")
        self.config, self.kernels, self.recompute = config, kernels, _check_recompute(recompute)
        D, c = config.hidden_size, config
        self.x_embedder = PatchEmbed(c.patch_size, c.in_channels, D, kernels)
        self.t_embedder = TimestepEmbedder(D)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))  # adaLN-single: computed once per forward
        self.y_embedder = CaptionEmbedder(c.caption_channels, D, c.max_tokens)
        if c.micro_conditions:
            self.csize_embedder = SizeEmbedder(D // 3)  # image (height, width) -> 2 * D/3
            self.ar_embedder = SizeEmbedder(D // 3)  # aspect ratio -> D/3
        self.blocks = nn.ModuleList([PixArtBlock(c, kernels) for _ in range(c.depth)])
        self.final_layer = FinalLayer(c)
        self.pixel_decoder = PixelDecoder(c) if c.pixel_decoder else None
        grid = c.input_size // c.patch_size
        self.register_buffer("pos_embed", pos_embed_2d(D, grid, grid, grid, c.pe_interpolation)[None], persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        xavier_init(self)
        # Timestep, adaLN-single, caption and size embedders: small normal.
        embedders = [self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                     self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2]
        if self.config.micro_conditions:
            embedders += [self.csize_embedder.mlp[0], self.csize_embedder.mlp[2],
                          self.ar_embedder.mlp[0], self.ar_embedder.mlp[2]]
        for m in embedders:
            nn.init.normal_(m.weight, std=0.02)
        # Cross-attention output and the final projection start at zero: each block starts as the identity
        # on its text branch and the model predicts zero.
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.pixel_decoder is not None:  # its last convolution too; the others as PyTorch's defaults
            nn.init.zeros_(self.pixel_decoder.conv3.weight)
            nn.init.zeros_(self.pixel_decoder.conv3.bias)

    def drop_captions(self, y, mask, drop):
        """Replace the captions where drop (B,) is True by the null caption (all its tokens valid)."""
        null = self.y_embedding_like(y)
        y = torch.where(drop[:, None, None], null, y)
        return y, torch.where(drop[:, None], True, mask)

    def y_embedding_like(self, y):
        """The null caption broadcast to y's batch, length and dtype: (B, L, E)."""
        B, L, E = y.shape
        if L != self.config.max_tokens or E != self.config.caption_channels:
            raise ValueError(f"captions must be (B, {self.config.max_tokens}, {self.config.caption_channels}) "
                             f"to be swapped for the null caption, got {tuple(y.shape)}")
        return self.y_embedder.y_embedding.to(y.dtype).expand(B, L, E)

    def forward(self, x, t, y, mask=None, img_hw=None, aspect_ratio=None, force_drop_ids=None, *, keep=None,
                grid=None, route=None, route_blocks=None, hidden_depth=0, hidden_only=False):
        """Predict eps (and the variance interpolation) for noisy input x at timesteps t given captions y.

        x: (B, C, H, W); H and W divisible by the patch size (non-square works).
        t: (B,) diffusion timesteps in [0, 1000), int or float.
        y: (B, L, caption_channels) T5 features; mask: (B, L) of 0/1 or bool, 1 = real token (None: all real).
        img_hw: (B, 2) original image height and width in pixels; aspect_ratio: (B,) or (B, 1) height/width.
            Both required when config.micro_conditions, ignored otherwise.
        force_drop_ids: (B,) bool, captions to replace by the null caption. None: in training mode each caption
            is replaced with probability config.class_dropout_prob; in eval mode none is.
        Token levers (training; `draw_tokens` draws the indices):
        keep: (B, K) token indices, ascending, into the (grid_h, grid_w) = grid patch grid of the full image: token
            masking. x is then only those patches, `keep_patches(x_full, keep, p)` (B, C, p, K p), and so is the
            output; only the K tokens run through the network, each with its own position embedding.
        route: (B, R) indices, ascending, into the tokens that enter the blocks (the kept ones when masking): token
            routing. Blocks route_blocks = (start, end), start inclusive, end exclusive, run on those R tokens
            only; the others skip them unchanged and are re-inserted after block end - 1.
        Returns (B, out_channels, H, W) (with keep: (B, out_channels, p, K p)). A model with a pixel decoder
        (config.pixel_decoder) adds its output to the first in_channels channels; it takes no keep.
        Hidden states (representation alignment, pixart_fast.align): hidden_depth n > 0 also returns the residual
        stream after the first n blocks, (B, T, D) over the tokens that entered the blocks (routed: the skipping
        tokens as they entered the routed run), as (output, hidden); hidden_only returns it alone, after running
        only those n blocks. A tuple of depths returns (output, a tuple of those states, in its order).
        """
        c = self.config
        B, C, H, W = x.shape
        p = c.patch_size
        if C != c.in_channels or H % p or W % p:
            raise ValueError(f"input must be (B, {c.in_channels}, H, W) with H, W divisible by {p}, got {tuple(x.shape)}")
        if y.shape[0] != B or y.shape[-1] != c.caption_channels:
            raise ValueError(f"captions must be (B={B}, L, {c.caption_channels}), got {tuple(y.shape)}")
        mask = _as_bool_mask(mask, y)
        if force_drop_ids is None and self.training and c.class_dropout_prob > 0:
            force_drop_ids = torch.rand(B, device=x.device) < c.class_dropout_prob
        if force_drop_ids is not None:
            y, mask = self.drop_captions(y, mask, force_drop_ids.bool())

        if keep is None:
            pos = self.pos_embed_for(H // p, W // p, x.device)  # (1, T, D)
        else:  # x: the kept patches side by side
            if grid is None or keep.shape != (B, W // p) or H != p:
                raise ValueError(f"with keep (B, K) = {tuple(keep.shape)}, x must be its patches (B, C, {p}, K * {p}) "
                                 f"(keep_patches) and grid the full patch grid, got x {tuple(x.shape)}, grid {grid}")
            if self.pixel_decoder is not None:
                raise ValueError("token masking (keep) leaves the pixel decoder no image to convolve; this model "
                                 f"has pixel_decoder {c.pixel_decoder}: use routing instead")
            pos = take_tokens(self.pos_embed_for(*grid, x.device).expand(B, -1, -1), keep)  # (B, K, D)
        start, end = (-1, -1) if route is None else route_blocks
        if route is not None and not 0 <= start < end <= c.depth:
            raise ValueError(f"route_blocks must be (start, end) with 0 <= start < end <= depth {c.depth}, got {route_blocks}")
        depths = hidden_depth if isinstance(hidden_depth, tuple) else (hidden_depth,) if hidden_depth else ()
        if not all(1 <= n <= c.depth for n in depths) or (hidden_only and not (isinstance(hidden_depth, int)
                                                                                and hidden_depth)):
            raise ValueError(f"hidden_depth must be in 1..depth {c.depth} or a tuple of those (0: none; "
                             f"hidden_only takes one), got {hidden_depth}")
        pixels, x = x, self.x_embedder(x) + pos  # (B, T, D)
        t = self.t_embedder(t)  # (B, D)
        if c.micro_conditions:
            if img_hw is None or aspect_ratio is None:
                raise ValueError("this model uses micro-conditions: pass img_hw (B, 2) and aspect_ratio (B,)")
            t = t + torch.cat([self.csize_embedder(img_hw), self.ar_embedder(aspect_ratio)], dim=1)  # (B, D)
        t0 = self.t_block(t)  # (B, 6D), shared by every block
        y = self.y_embedder(y)  # (B, L, D)
        shift, scale = self.blocks[0].modulation(t0)[:2] if c.depth else self.final_layer.modulation(t)
        x_mod = modulate(x, shift, scale, backend=self.kernels, out_dtype=linear_dtype(x))  # (B, T, D)
        hidden = {}  # depth -> the residual stream after that many blocks (hidden_depth)
        for i, block in enumerate(self.blocks):
            if i == start:  # routing: only the routed tokens go on; the stream keeps the others as they are
                stream, x, x_mod = x, take_tokens(x, route), take_tokens(x_mod, route)  # (B, R, D)
            nxt = self.blocks[i + 1].modulation(t0)[:2] if i + 1 < c.depth else self.final_layer.modulation(t)
            if self.recompute != "none" and torch.is_grad_enabled():
                x, x_mod = checkpoint(block, x, x_mod, y, t0, mask, *nxt, **_checkpoint_options(self.recompute))
            else:
                x, x_mod = block(x, x_mod, y, t0, mask, *nxt)  # (B, T, D) each
            if i == end - 1:  # re-insert; the skipping tokens need the next layer's modulated copy too: all anew
                x = stream.scatter(1, route[..., None].expand(-1, -1, x.shape[-1]), x)  # (B, T, D)
                x_mod = modulate(x, *nxt, backend=self.kernels, out_dtype=linear_dtype(x))
            if i + 1 in depths:
                routed = route is not None and inside_routed_run(i + 1, route_blocks)  # x: the routed tokens only
                hidden[i + 1] = stream.scatter(1, route[..., None].expand(-1, -1, x.shape[-1]), x) if routed else x
                if hidden_only:
                    return hidden[i + 1]
        x = self.final_layer(x_mod)  # (B, T, p*p*out)
        out = unpatchify(x, p, c.out_channels, H, W, backend=self.kernels)  # (B, out, H, W)
        if self.pixel_decoder is not None:
            detail = self.pixel_decoder(x_mod, pixels, self.kernels)  # (B, C, H, W)
            out = torch.cat([out[:, :C] + detail.to(out.dtype), out[:, C:]], dim=1)
        if isinstance(hidden_depth, tuple):
            return out, tuple(hidden[n] for n in hidden_depth)
        return (out, hidden[hidden_depth]) if hidden_depth else out

    def pos_embed_for(self, grid_h: int, grid_w: int, device) -> torch.Tensor:
        """(1, grid_h * grid_w, D): the stored table for the configured square grid, else built for this grid."""
        if grid_h * grid_w == self.pos_embed.shape[1] and grid_h == grid_w:
            return self.pos_embed
        base = self.config.input_size // self.config.patch_size
        return pos_embed_2d(self.config.hidden_size, grid_h, grid_w, base, self.config.pe_interpolation)[None].to(device)

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards as units (each gathered just before it runs). Not whole blocks: a block's
        `scale_shift_table` is read while the previous block closes (the fused residual + LayerNorm + modulate),
        before that block would be gathered; so the tables stay in the root unit and each block's sublayers
        (attention, cross-attention, MLP: nearly all its weights) are the units."""
        return [unit for block in self.blocks for unit in block.children()]

    def forward_with_cfg(self, x, t, y, mask=None, cfg_scale=4.5, img_hw=None, aspect_ratio=None, guide=None,
                         guide_weight=0.0):
        """Classifier-free guidance in one batched call (`pixart_fast.diffusion.guided`): x (B, C, H, W) is run
        with its captions and with the null caption; returns (B, out_channels, H, W) whose first C channels are
        the guided eps uncond + cfg_scale * (cond - uncond) and whose other channels are the conditional
        prediction's. guide: a weaker PixArt of the same input and output (an earlier checkpoint of this one):
        guide_weight * (cond - guide's cond) is added, autoguidance. The call goes through `self(...)`, so hooks
        (FSDP's gathering of sharded weights) run."""
        B = x.shape[0]
        guide_fn = None
        if guide is not None:
            guide_fn = lambda xg, tg: guide(xg, tg, y, mask, img_hw, aspect_ratio)  # noqa: E731
        drop = torch.arange(2 * B, device=x.device) >= B  # second half: null caption
        two = lambda a: None if a is None else torch.cat([a, a])  # noqa: E731
        y2, mask2, hw2, ar2 = two(y), two(_as_bool_mask(mask, y)), two(img_hw), two(aspect_ratio)
        return guided(lambda x2, t2: self(x2, t2, y2, mask2, hw2, ar2, force_drop_ids=drop), cfg_scale, guide_fn,
                      guide_weight)(x, t)


# ----------------------------------------------------------------------------------------------------------
# The class-conditional DiT of stage 1 (facebookresearch/DiT architecture and names)
# ----------------------------------------------------------------------------------------------------------


def dit_modulate(x, shift, scale):
    """DiT's modulate: x (B, T, D) * (1 + scale (B, D)) + shift (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class LabelEmbedder(nn.Module):
    """Class labels (B,) -> (B, D); the extra last row is the null class used by classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels, drop):
        if drop is not None:
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero: each block maps c (B, D) to its own six modulation vectors."""

    def __init__(self, config: PixArtConfig):
        super().__init__()
        D = config.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(D, config.num_heads)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, int(D * config.mlp_ratio), D)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(dit_modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(dit_modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiTFinalLayer(nn.Module):
    def __init__(self, config: PixArtConfig):
        super().__init__()
        D, p = config.hidden_size, config.patch_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, p * p * config.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(dit_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional DiT (Peebles & Xie) for stage 1, with the PixArt config's shape numbers and
    `config.num_classes` classes. forward(x (B,C,H,W), t (B,), labels (B,) long) -> (B, out_channels, H, W).

    kernels: the patchify / unpatchify backend; the blocks are facebookresearch/DiT's PyTorch code, which
    `pixart_fast.patch(model)` runs on the fused kernels (the trainer does that in stage 1)."""

    def __init__(self, config: PixArtConfig, kernels: str = "auto", recompute: str = "none"):
        super().__init__()
        if kernels not in BACKENDS:
            raise ValueError(f"kernels must be one of {BACKENDS}, got {kernels!r}")
        self.config, self.recompute = config, _check_recompute(recompute)
        D = config.hidden_size
        self.x_embedder = PatchEmbed(config.patch_size, config.in_channels, D, kernels)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(config.num_classes, D, config.class_dropout_prob)
        self.blocks = nn.ModuleList([DiTBlock(config) for _ in range(config.depth)])
        self.final_layer = DiTFinalLayer(config)
        grid = config.input_size // config.patch_size
        self.register_buffer("pos_embed", pos_embed_2d(D, grid, grid, grid, 1.0)[None], persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        # As facebookresearch/DiT: Xavier Linear layers, small-normal embedders, zero adaLN and output layers.
        xavier_init(self)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[1] for b in self.blocks] + [self.final_layer.adaLN_modulation[1],
                                                                    self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, labels, force_drop_ids=None):
        """force_drop_ids (B,) bool: labels to replace by the null class; None: random in training mode."""
        c = self.config
        B, _, H, W = x.shape
        if force_drop_ids is None and self.training and c.class_dropout_prob > 0:
            force_drop_ids = torch.rand(B, device=x.device) < c.class_dropout_prob
        x = self.x_embedder(x) + self.pos_embed  # (B, T, D)
        cond = self.t_embedder(t) + self.y_embedder(labels, force_drop_ids)  # (B, D)
        for block in self.blocks:
            if self.recompute != "none" and torch.is_grad_enabled():
                x = checkpoint(block, x, cond, **_checkpoint_options(self.recompute))
            else:
                x = block(x, cond)
        x = self.final_layer(x, cond)  # (B, T, p*p*out)
        return unpatchify(x, c.patch_size, c.out_channels, H, W, backend=self.x_embedder.kernels)

    def forward_with_cfg(self, x, t, labels, cfg_scale=4.5):
        """Classifier-free guidance over the null class, as PixArt.forward_with_cfg: (B, out_channels, H, W)."""
        B = x.shape[0]
        drop = torch.arange(2 * B, device=x.device) >= B  # second half: the null class
        labels = torch.cat([labels, labels])
        return guided(lambda x2, t2: self(x2, t2, labels, force_drop_ids=drop), cfg_scale)(x, t)

    def fsdp_units(self) -> list[nn.Module]:
        """The modules FSDP shards as units (each gathered just before it runs): the blocks."""
        return list(self.blocks)


# ----------------------------------------------------------------------------------------------------------
# Re-parameterization: DiT -> PixArt (paper section 2.3)
# ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def reparameterize(dit_state_dict: dict, config: PixArtConfig, t: float = 500.0, seed: int = 0) -> dict:
    """A PixArt state dict that starts where a class-conditional DiT left off.

    DiT block i modulates with f_i(c) = adaLN_modulation_i(c); PixArt with f(t) + E_i, f = t_block shared.
    f takes the first block's weights and each E_i (the block's scale_shift_table) is set so that
    f(t) + E_i = f_i(t) at t = 500 with no class embedding; the final layer's table likewise. Patch, timestep,
    attention and MLP weights carry over by name. New parts (cross-attention, caption embedder, micro-condition
    embedders) get PixArt's initialisation from `seed`, cross-attention output projections zero.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = PixArt(config, kernels="torch").state_dict()
    dit = {k: v for k, v in dit_state_dict.items() if k != "pos_embed"}
    carried = [k for k in out if k.startswith(("x_embedder.", "t_embedder.", "final_layer.linear."))
               or ".attn." in k or ".mlp." in k]
    for k in carried:
        if k not in dit:
            raise KeyError(f"DiT state dict has no {k!r}: not a DiT checkpoint of this config?")
        if dit[k].shape != out[k].shape:
            raise ValueError(f"{k}: DiT shape {tuple(dit[k].shape)} != PixArt shape {tuple(out[k].shape)} for this config")
        out[k] = dit[k].clone()

    D = config.hidden_size
    t_emb = TimestepEmbedder(D).to(torch.float64)
    for i in (0, 2):
        t_emb.mlp[i].weight.copy_(dit[f"t_embedder.mlp.{i}.weight"])
        t_emb.mlp[i].bias.copy_(dit[f"t_embedder.mlp.{i}.bias"])
    temb = t_emb(torch.tensor([t], dtype=torch.float64))  # (1, D)
    silu = F.silu(temb)

    def adaln(prefix):  # DiT's modulation at t: (n * D,)
        return (silu @ dit[prefix + ".weight"].double().T + dit[prefix + ".bias"].double())[0]

    out["t_block.1.weight"] = dit["blocks.0.adaLN_modulation.1.weight"].clone()
    out["t_block.1.bias"] = dit["blocks.0.adaLN_modulation.1.bias"].clone()
    shared = adaln("blocks.0.adaLN_modulation.1")  # f(t), (6D,)
    for i in range(config.depth):
        own = adaln(f"blocks.{i}.adaLN_modulation.1")
        out[f"blocks.{i}.scale_shift_table"] = (own - shared).reshape(6, D).to(out[f"blocks.{i}.scale_shift_table"].dtype)
    final = adaln("final_layer.adaLN_modulation.1").reshape(2, D)
    out["final_layer.scale_shift_table"] = (final - temb).to(out["final_layer.scale_shift_table"].dtype)
    return out
