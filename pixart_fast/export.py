"""Export a PixArt checkpoint to other formats.

    python -m pixart_fast.export --ckpt X --out DIR --format diffusers [--model NAME] [--weights ema|model]

--ckpt: a checkpoint folder of our trainer (its EMA weights by default), one of our .safetensors files, an
official PixArt .pth or a diffusers transformer folder. The model config is --model, or the name our
checkpoints record in their metadata. "diffusers" writes what `PixArtTransformer2DModel.from_pretrained(DIR)`
loads: config.json and diffusion_pytorch_model.safetensors. diffusers keeps no null caption (`y_embedding`):
its pipeline encodes the empty prompt for classifier-free guidance instead. The caption length is not part of
the transformer's config: diffusers' pipelines take it as `max_sequence_length` (PixArtAlphaPipeline 120,
PixArtSigmaPipeline 300, the PixArt-Sigma configs' max_tokens); config.json carries the position interpolation
(`interpolation_scale`: 1 / 2 / 4 for Sigma at 512 / 1024 / 2K) and `use_additional_conditions` explicitly.
"""
import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from pixart_fast.checkpoints import config_name, load_pixart, to_diffusers
from pixart_fast.model import CONFIGS, PixArtConfig

FORMATS = ("diffusers",)


def diffusers_config(config: PixArtConfig) -> dict:
    """PixArtTransformer2DModel's config.json for a PixArt config. Every field is written out, so loading does
    not depend on diffusers' defaults (it would guess interpolation_scale and micro-conditions from sample_size)."""
    return {
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "dropout": 0.0,
        "norm_num_groups": 32,  # unused by the ada_norm_single blocks
        "cross_attention_dim": config.hidden_size,
        "attention_bias": True,
        "sample_size": config.input_size,
        "patch_size": config.patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "upcast_attention": False,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": config.pe_interpolation,
        "use_additional_conditions": config.micro_conditions,
        "caption_channels": config.caption_channels,
        "attention_type": "default",
    }


def _checkpoint_file(ckpt: Path, weights: str) -> Path:
    """Our trainer's checkpoint folder -> its {weights}.safetensors; anything else unchanged."""
    if ckpt.is_dir() and (ckpt / f"{weights}.safetensors").exists():
        return ckpt / f"{weights}.safetensors"
    return ckpt


def export(ckpt, out, format: str = "diffusers", model: str | None = None, weights: str = "ema") -> Path:
    """Write checkpoint `ckpt` in `format` to folder `out`; returns `out`. The weights are checked against the
    model config first (strictly: every key, every shape), so a wrong --model fails here, not in diffusers."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; choose one of {FORMATS}")
    path = _checkpoint_file(Path(ckpt), weights)
    name = config_name(path, model)
    weights_sd = load_pixart(path, name, kernels="torch").state_dict()  # checked strictly: every key, every shape
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(diffusers_config(CONFIGS[name]), indent=2) + "\n")
    tensors = {k: v.contiguous() for k, v in to_diffusers(weights_sd).items()}
    save_file(tensors, str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixart_fast.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or file (ours, official .pth, diffusers)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=FORMATS, default="diffusers", help="output format")
    p.add_argument("--model", default=None, help="model config name (default: the one the checkpoint records)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="which weights of a trainer checkpoint folder (default: the EMA's)")
    a = p.parse_args(argv)
    print(f"wrote {export(a.ckpt, a.out, a.format, a.model, a.weights)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
