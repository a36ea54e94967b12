"""LoRA fine-tuning of a PixArt through PEFT: which layers get adapters, the adapter's state, and the adapter in
the form `peft.PeftModel.from_pretrained` loads onto diffusers' `PixArtTransformer2DModel`.

PEFT (a kept library) writes the LoRA layers: `add_lora` wraps the chosen `nn.Linear` modules in place with
`peft.inject_adapter_in_model`, so the model stays a `PixArt` whose fused kernels (modulation, cross-attention)
still run on the frozen parts, and only the adapters' A and B matrices require gradients.

Targets, by group (`--lora-targets attn,cross,mlp,embed`, or module-name suffixes such as `attn.qkv`):
    attn   self-attention  qkv, proj                     (diffusers attn1.to_q / to_k / to_v, attn1.to_out.0)
    cross  cross-attention q_linear, kv_linear, proj     (attn2.to_q, attn2.to_k / to_v, attn2.to_out.0)
    mlp    fc1, fc2                                      (ff.net.0.proj, ff.net.2)
    embed  the timestep, caption, size embedders, t_block and the final layer's Linear
The default is all four: the official PixArt LoRA script (train_pixart_lora_hf.py) adapts every Linear of the
transformer. It also matches the patch embedding's convolution (`proj`); ours stays frozen, because the model
runs that convolution as patchify + matmul on its weight, which a wrapper around the module would not see.

Our `qkv` and `kv_linear` are diffusers' to_q, to_k, to_v concatenated along the output dimension, so an adapter
on `qkv` (B A, with B of 3D x r) is exactly three diffusers adapters that share A and take one third of B each:
`to_peft_diffusers` writes it so, with the same rank and alpha, and the outputs agree.
"""
import copy
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from pixart_fast.checkpoints import config_name, diffusers_module, load_into, load_safetensors, training_metadata
from pixart_fast.model import CONFIGS, PixArt

TARGET_GROUPS = {
    "attn": ("attn.qkv", "attn.proj"),
    "cross": ("cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj"),
    "mlp": ("mlp.fc1", "mlp.fc2"),
    "embed": ("t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1", "y_embedder.y_proj.fc1", "y_embedder.y_proj.fc2",
              "csize_embedder.mlp.0", "csize_embedder.mlp.2", "ar_embedder.mlp.0", "ar_embedder.mlp.2",
              "final_layer.linear"),
}
DEFAULT_TARGETS = "attn,cross,mlp,embed"
DEFAULT_ALPHA = 8.0  # PEFT's LoraConfig default, which the official script keeps (it sets no alpha)
ADAPTER = "default"  # PEFT's adapter name


def target_modules(model: torch.nn.Module, targets: str) -> list[str]:
    """The names of `model`'s nn.Linear modules that `targets` selects: comma-separated groups of TARGET_GROUPS
    or module-name suffixes. Raises ValueError naming an entry that selects nothing."""
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    chosen = []
    for entry in (e.strip() for e in targets.split(",") if e.strip()):
        suffixes = TARGET_GROUPS.get(entry, (entry,))
        found = [n for n in linears if any(n == s or n.endswith("." + s) for s in suffixes)]
        if not found and entry not in TARGET_GROUPS:
            raise ValueError(f"--lora-targets: {entry!r} names no Linear layer of the model; use groups "
                             f"{', '.join(TARGET_GROUPS)} or suffixes such as attn.qkv, mlp.fc1")
        chosen += [n for n in found if n not in chosen]
    if not chosen:
        raise ValueError(f"--lora-targets {targets!r} selects no Linear layer of the model")
    return chosen


def add_lora(model: torch.nn.Module, rank: int, alpha: float = DEFAULT_ALPHA, targets: str = DEFAULT_TARGETS):
    """Freeze `model` and add rank-`rank` LoRA adapters (PEFT) to the targeted Linear layers, in place; the
    adapters' weights are fp32 (what the optimizer updates; autocast casts them for the matmul). Returns model."""
    from peft import LoraConfig, inject_adapter_in_model  # imported here: only LoRA runs need PEFT

    if rank < 1:
        raise ValueError(f"--lora-rank must be >= 1, got {rank}")
    names = target_modules(model, targets)
    model.requires_grad_(False)
    # Exact module names (anchored regex): a suffix list would also match same-named layers elsewhere.
    # A drawn from a normal distribution of std 1 / rank, B zero: the official script's init_lora_weights="gaussian"
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", init_lora_weights="gaussian",
                        target_modules="^(" + "|".join(re.escape(n) for n in names) + ")$")
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def is_lora(model: torch.nn.Module) -> bool:
    return any(".lora_A." in n for n, _ in model.named_parameters())


def adapter_state_dict(model: torch.nn.Module) -> dict:
    """The adapters' A and B of a LoRA model (or of its EMA copy), by their names in the model."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_" in n}


def load_adapter(model: torch.nn.Module, sd: dict, source: str) -> None:
    """Load adapter tensors into a LoRA model: exactly its adapters, every shape equal, else ValueError saying
    what differs (a checkpoint of another rank or target set)."""
    own = adapter_state_dict(model)
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [f"{k}: {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{source} does not fit this LoRA model (--lora-rank / --lora-targets differ?): "
                         f"{len(missing)} adapters missing {missing[:3]}, {len(unexpected)} unexpected "
                         f"{unexpected[:3]}, shapes {shapes[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            v.copy_(sd[k])


def ema_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` for the EMA: a LoRA model's copy shares the frozen base weights (only the adapters are
    averaged, so only they are duplicated); a fully trained model is copied whole."""
    shared = {id(p): p for p in model.parameters() if not p.requires_grad}
    ema = copy.deepcopy(model, memo=dict(shared))
    return ema.requires_grad_(False).eval()


def merged_state_dict(model: torch.nn.Module) -> dict:
    """The full state dict of a LoRA model with every adapter merged into its base weight (W + alpha / r * B A,
    PEFT's `get_delta_weight`), under the plain model's names: a model without adapters loads it."""
    from peft.tuners.lora import LoraLayer

    sd = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            sd[f"{name}.weight"] = (base.weight + module.get_delta_weight(ADAPTER)).detach()
            if base.bias is not None:
                sd[f"{name}.bias"] = base.bias.detach()
    for key, value in model.state_dict().items():
        plain = key.replace(".base_layer.", ".")
        if ".lora_" not in key and plain not in sd:
            sd[plain] = value
    return sd


def lora_settings(model: torch.nn.Module) -> tuple[int, float, list[str]]:
    """(rank, alpha, adapted module names) of a LoRA model."""
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    first = next(iter(layers.values()))
    rank = first.r[ADAPTER]
    return rank, first.scaling[ADAPTER] * rank, list(layers)


def to_peft_diffusers(model: torch.nn.Module, out) -> Path:
    """Write the adapters of a LoRA PixArt as a PEFT adapter folder (adapter_config.json and
    adapter_model.safetensors) for diffusers' PixArtTransformer2DModel: `PeftModel.from_pretrained(transformer,
    out)` then computes what this model computes. Fused qkv / kv_linear adapters become per-projection adapters
    sharing A (see the module's docstring). Returns out."""
    from peft import LoraConfig

    rank, alpha, modules = lora_settings(model)
    tensors, targets = {}, []
    for name in modules:
        layer = model.get_submodule(name)
        a = layer.lora_A[ADAPTER].weight.detach().float()
        b = layer.lora_B[ADAPTER].weight.detach().float()
        parts = diffusers_module(name)
        for part, b_part in zip(parts, b.chunk(len(parts), dim=0)):
            tensors[f"base_model.model.{part}.lora_A.weight"] = a.clone()  # each part its own copy of A
            tensors[f"base_model.model.{part}.lora_B.weight"] = b_part.contiguous()
            targets.append(part)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none",
                        target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$")
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def adapter_summary(model: torch.nn.Module) -> str:
    rank, alpha, modules = lora_settings(model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return (f"LoRA rank {rank}, alpha {alpha:g} on {len(modules)} Linear layers: {trained / 1e6:.3f} M trained "
            f"parameters of {total / 1e6:.2f} M")


def load_lora(path: Path, base=None, kernels: str = "auto") -> PixArt:
    """The LoRA PixArt of a LoRA run's weights file (export, sampling): the config and base it records (`base`
    overrides the base path), the adapters loaded."""
    recorded = training_metadata(path)
    base = base or recorded.get("base")
    if not base:
        raise ValueError(f"{path} records no base weights; pass --base (the --init the LoRA run was trained on)")
    model = PixArt(CONFIGS[config_name(path)], kernels=kernels)
    load_into(model, base, from_dit=False, source=f"base {base}")
    add_lora(model, int(recorded["lora_rank"]), float(recorded["lora_alpha"]), recorded["lora_targets"])
    load_adapter(model, load_safetensors(path), source=str(path))
    return model.eval()
