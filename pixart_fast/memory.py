"""The memory a training step holds, in bytes: the trainer's fp32 weights, EMA, gradients and optimizer state
counted exactly from the model's parameter shapes, activations from a fit of measurements; and the largest batch
that fits a GPU.
"""
import functools
import math
from dataclasses import asdict, dataclass

import torch

from pixart_fast.flops import VAE_DOWNSAMPLE
from pixart_fast.gpus import GPUS, resolve_gpu
from pixart_fast.lora import DEFAULT_TARGETS, target_modules
from pixart_fast.model import CONFIGS, RECOMPUTE, PixArt, PixArtConfig

OPTIMIZERS = ("adamw", "came")  # the trainer's --optimizer choices
LORA_RANK = 16  # the LoRA rank the planner assumes by default: the official PixArt LoRA script's
FP32 = 4  # bytes of an fp32 number: weights, EMA, gradients and optimizer state are all fp32 in the trainer


def optimizer_state_bytes(shape: tuple[int, ...], optimizer: str) -> int:
    """Bytes of optimizer state one fp32 parameter tensor of `shape` gets, as the optimizer allocates it.

    adamw (torch.optim.AdamW): exp_avg and exp_avg_sq, each the parameter's size, and a 0-dim fp32 step count.
    came (came_pytorch.CAME, PixArt-Sigma's): exp_avg the parameter's size; the second moment and the residual
    moment factored into a row (shape[:-1]) and a column (shape[:-2] + shape[-1:]) vector each for a tensor of
    2 or more dimensions, else exp_avg_sq the parameter's size; a 0-dim fp32 RMS (its step count is a Python int).
    """
    n = math.prod(shape)
    if optimizer == "adamw":
        return FP32 * (2 * n + 1)
    if optimizer == "came":
        second = 2 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]) if len(shape) >= 2 else n
        return FP32 * (n + second + 1)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


@functools.lru_cache(maxsize=None)
def _parameter_shapes(config: PixArtConfig, lora_rank: int, lora_targets: str):
    """(frozen parameter shapes, trained parameter shapes, buffer bytes) of the model the trainer builds: every
    parameter trained, or (lora_rank > 0) the base frozen and PEFT's lora_A (r, in) and lora_B (out, r) trained
    on each Linear that `pixart_fast.lora.target_modules` selects. Built on the meta device: no memory."""
    with torch.device("meta"):
        model = PixArt(config, kernels="torch")
    shapes = tuple(tuple(p.shape) for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    if not lora_rank:
        return (), shapes, buffers
    adapters = []
    for name in target_modules(model, lora_targets):
        linear = model.get_submodule(name)
        adapters += [(lora_rank, linear.in_features), (linear.out_features, lora_rank)]
    return shapes, tuple(adapters), buffers


def state_bytes(config: PixArtConfig, lora_rank: int = 0, optimizer: str = "adamw",
                lora_targets: str = DEFAULT_TARGETS) -> dict[str, int]:
    """Bytes the trainer holds whatever the batch, exactly, as `python -m pixart_fast.train` keeps them: fp32
    weights (parameters and buffers; with LoRA the frozen base stays fp32 beside the fp32 adapters), the EMA (a
    copy of the weights; with LoRA only the adapters and buffers: `pixart_fast.lora.ema_copy` shares the frozen
    base), fp32 gradients of the trained parameters and their optimizer state (`optimizer_state_bytes`).
    lora_rank 0: full fine-tuning. Also returns the parameter counts "params" and "trained_params"."""
    if lora_rank < 0:
        raise ValueError(f"lora_rank must be >= 0 (0: full fine-tuning), got {lora_rank}")
    frozen, trained, buffers = _parameter_shapes(config, lora_rank, lora_targets)
    n_frozen, n_trained = sum(map(math.prod, frozen)), sum(map(math.prod, trained))
    return {"params": n_frozen + n_trained, "trained_params": n_trained,
            "weights": FP32 * (n_frozen + n_trained) + buffers, "ema": FP32 * n_trained + buffers,
            "gradients": FP32 * n_trained, "optimizer_state": sum(optimizer_state_bytes(s, optimizer) for s in trained)}


@dataclass(frozen=True)
class ActivationFit:
    """Bytes a training forward under bf16 autocast leaves allocated for the backward at PixArt-XL/2's width
    (hidden size 1152), PyTorch kernels: per image, per image token and per caption token, in each block and
    outside the blocks; per step whatever the batch (the bf16 weight copies the backward needs), in each block and
    outside them. The Triton kernels a GPU runs keep less without recomputation (the bench's
    `ours+triton` variant), so there the "none" figures are an upper bound."""

    block_token: float
    block_caption_token: float
    block_step: float
    outside_token: float
    outside_caption_token: float
    outside_step: float


ACTIVATION_WIDTH = 1152
# Printed by `pytest bench/test_bench_memory.py -k activation_fit --benchmark-only -s` (2026-12-02; PyTorch profiler
# memory events at XL width: per image from batch 1 against 2, per block from 1 against 2 blocks, per image token
# from 256 against 1024 image tokens, per caption token from 120 against 300; LoRA at rank 16 on the default
# targets); `-k planner_vs_measured` checks them against whole 28-block models.
# (training, recompute): ActivationFit(block_token, block_caption_token, block_step, outside_token,
#                                      outside_caption_token, outside_step)
ACTIVATIONS = {
    ("full", "none"): ActivationFit(64656, 4610, 42467328, 11624, 15104, 21307392),
    ("full", "selective"): ActivationFit(36992, 4608, 5056, 7016, 15105, 21307392),
    ("full", "full"): ActivationFit(6912, 0, 5056, 7016, 15105, 21307392),
    ("lora", "none"): ActivationFit(67152, 6946, 43315256, 7008, 12864, 21824560),
    ("lora", "selective"): ActivationFit(36992, 4608, 5112, 7008, 15169, 21824560),
    ("lora", "full"): ActivationFit(6912, 0, 5112, 7008, 15169, 21824560),
}


def activation_bytes(config: PixArtConfig, resolution: int, recompute: str = "none",
                     lora: bool = False) -> tuple[float, float]:
    """(bytes per image, bytes per step) of activations a training step at `resolution` px keeps for the backward:
    ACTIVATIONS' fit for the recomputation mode, times the image tokens ((resolution / 16)^2 for 8x latents and
    patch 2), caption tokens (config.max_tokens: padding is masked, not skipped) and depth."""
    if config.hidden_size != ACTIVATION_WIDTH:
        raise ValueError(f"activation memory is measured at PixArt-XL/2's width {ACTIVATION_WIDTH}; this model's "
                         f"is {config.hidden_size}")
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    fit = ACTIVATIONS[("lora" if lora else "full", recompute)]
    T, L = image_tokens(config, resolution), config.max_tokens
    per_image = config.depth * (fit.block_token * T + fit.block_caption_token * L) \
        + fit.outside_token * T + fit.outside_caption_token * L
    return per_image, config.depth * fit.block_step + fit.outside_step


def image_tokens(config: PixArtConfig, resolution: int) -> int:
    """Image tokens of a square `resolution`-px image: (resolution / (8 * patch_size))^2."""
    unit = VAE_DOWNSAMPLE * config.patch_size
    if resolution <= 0 or resolution % unit:
        raise ValueError(f"resolution {resolution} px must be a positive multiple of {unit} px")
    return (resolution // unit) ** 2


def training_memory(config: PixArtConfig, resolution: int, lora_rank: int = 0, optimizer: str = "adamw",
                    recompute: str = "none", lora_targets: str = DEFAULT_TARGETS) -> dict[str, float]:
    """Estimated memory of a training step, bytes: `state_bytes` (exact) and `activation_bytes` (measured on a CPU,
    fitted) as "activations_per_image" and "activations_per_step". Not counted: the CUDA context and allocator
    slack, the backward's short-lived buffers; gradients are counted beside every activation, though they fill
    while the backward frees activations."""
    per_image, per_step = activation_bytes(config, resolution, recompute, lora_rank > 0)
    return {**state_bytes(config, lora_rank, optimizer, lora_targets), "activations_per_image": per_image,
            "activations_per_step": per_step}


def step_bytes(memory: dict, batch: int) -> float:
    """Bytes of a training step of `batch` images under a `training_memory` estimate."""
    held = sum(memory[k] for k in ("weights", "ema", "gradients", "optimizer_state", "activations_per_step"))
    return held + batch * memory["activations_per_image"]


def largest_batch(memory: dict, memory_gb: float) -> int:
    """The largest batch whose `step_bytes` fit in `memory_gb` GB (1e9 bytes; 0: not even one image)."""
    return max(0, int((memory_gb * 1e9 - step_bytes(memory, 0)) // memory["activations_per_image"]))


def memory_plan(model: str = "PixArt-Sigma-XL/2-1024", gpu: str = "RTX4090", resolutions=None,
                lora_rank: int = LORA_RANK, optimizers=OPTIMIZERS, recomputes=RECOMPUTE,
                lora_targets: str = DEFAULT_TARGETS) -> dict:
    """`training_memory` of a CONFIGS model for full fine-tuning and LoRA (rank lora_rank; 0: full only), each
    optimizer and recomputation mode, at each resolution (default the model's own), with the largest batch that
    fits `gpu`. Returns a JSON-serialisable dict: "settings" and "rows"."""
    if model not in CONFIGS:
        raise ValueError(f"unknown model {model!r}; one of {', '.join(CONFIGS)}")
    config, gpu = CONFIGS[model], resolve_gpu(gpu)
    resolutions = resolutions or [config.input_size * VAE_DOWNSAMPLE]
    rows = []
    for res in resolutions:
        for rank in (0, lora_rank) if lora_rank else (0,):
            for optimizer in optimizers:
                for recompute in recomputes:
                    m = training_memory(config, res, rank, optimizer, recompute, lora_targets)
                    rows.append({"resolution": res, "lora_rank": rank, "optimizer": optimizer,
                                 "recompute": recompute, **m, "largest_batch": largest_batch(m, GPUS[gpu].memory_gb)})
    return {"settings": {"model": model, "gpu": gpu, **asdict(GPUS[gpu]), "lora_targets": lora_targets},
            "rows": rows}
