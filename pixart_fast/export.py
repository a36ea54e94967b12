"""Export a PixArt checkpoint to other formats.

    python -m pixart_fast.export --ckpt X --out DIR --format diffusers [--model NAME] [--weights ema|model]
    python -m pixart_fast.export --ckpt LORA_CHECKPOINT --out DIR --lora     # a PEFT adapter for diffusers
    python -m pixart_fast.export --ckpt LORA_CHECKPOINT --out DIR --merge    # base + adapter, one diffusers model

--ckpt: a checkpoint folder of our trainer (its EMA weights by default), one of our .safetensors files, an
official PixArt .pth or a diffusers transformer folder. The model config is --model, or the name our
checkpoints record in their metadata. "diffusers" writes what `PixArtTransformer2DModel.from_pretrained(DIR)`
loads: config.json and diffusion_pytorch_model.safetensors. diffusers keeps no null caption (`y_embedding`):
its pipeline encodes the empty prompt for classifier-free guidance instead. The caption length is not part of
the transformer's config: diffusers' pipelines take it as `max_sequence_length` (PixArtAlphaPipeline 120,
PixArtSigmaPipeline 300, the PixArt-Sigma configs' max_tokens); config.json carries the position interpolation
(`interpolation_scale`: 1 / 2 / 4 for Sigma at 512 / 1024 / 2K) and `use_additional_conditions` explicitly.

A LoRA run's checkpoint (--lora-rank) holds the adapters and records its base weights. --lora writes a PEFT
adapter folder (adapter_config.json, adapter_model.safetensors) for diffusers' PixArtTransformer2DModel of those
base weights: `PeftModel.from_pretrained(transformer, DIR)` (pixart_fast/lora.py); --merge writes the base with the
adapters merged in, as a plain diffusers folder. --base overrides the recorded base path.
"""
import argparse
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from pixart_fast import lora
from pixart_fast.checkpoints import (checkpoint_file, config_name, diffusers_config, load_pixart, to_diffusers,
                                    training_metadata)
from pixart_fast.cli import UserError, run
from pixart_fast.model import CONFIGS, PixArtConfig

FORMATS = ("diffusers",)


def write_diffusers(state_dict: dict, config: PixArtConfig, out) -> Path:
    """A PixArt state dict (official names) as a diffusers PixArtTransformer2DModel folder; returns out."""
    if config.pixel_decoder:
        raise UserError(f"diffusers' PixArtTransformer2DModel has no pixel decoder, and this model has one "
                        f"(pixel_decoder {config.pixel_decoder}): sample it here with python -m pixart_fast.sample")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(diffusers_config(config), indent=2) + "\n")
    tensors = {k: v.contiguous() for k, v in to_diffusers(state_dict).items()}
    save_file(tensors, str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return out


def export(ckpt, out, format: str = "diffusers", model: str | None = None, weights: str = "ema",
           adapter: bool = False, merge: bool = False, base=None) -> Path:
    """Write checkpoint `ckpt` in `format` to folder `out`; returns `out`. The weights are checked against the
    model config first (strictly: every key, every shape), so a wrong --model fails here, not in diffusers.
    A LoRA run's checkpoint: adapter=True writes its PEFT adapter, merge=True the merged model (one of them)."""
    if format not in FORMATS:
        raise UserError(f"unknown format {format!r}; choose one of {FORMATS}")
    path = checkpoint_file(Path(ckpt), weights)
    is_lora = "lora_rank" in training_metadata(path)
    if adapter or merge or is_lora:
        if not is_lora:
            raise UserError(f"--lora / --merge export a LoRA run's adapters; {path} holds no LoRA adapters")
        if adapter == merge:
            raise UserError(f"{path} holds LoRA adapters: pass --lora (a PEFT adapter folder for diffusers) or "
                             "--merge (base and adapters merged into one diffusers model)")
        lora_model = lora.load_lora(path, base)
        if adapter:
            return lora.to_peft_diffusers(lora_model, out)
        return write_diffusers(lora.merged_state_dict(lora_model), lora_model.config, out)
    name = config_name(path, model)
    weights_sd = load_pixart(path, name, kernels="torch").state_dict()  # checked strictly: every key, every shape
    return write_diffusers(weights_sd, CONFIGS[name], out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixart_fast.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint folder or file (ours, official .pth, diffusers)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=FORMATS, default="diffusers", help="output format")
    p.add_argument("--model", default=None, help="model config name (default: the one the checkpoint records)")
    p.add_argument("--weights", choices=["ema", "model"], default="ema",
                   help="which weights of a trainer checkpoint folder (default: the EMA's)")
    p.add_argument("--lora", action="store_true",
                   help="a LoRA checkpoint: write its adapters as a PEFT adapter folder for diffusers")
    p.add_argument("--merge", action="store_true",
                   help="a LoRA checkpoint: write its base weights with the adapters merged in, as a diffusers folder")
    p.add_argument("--base", default=None, help="a LoRA checkpoint's base weights (default: the path it records)")
    a = p.parse_args(argv)
    print(f"wrote {export(a.ckpt, a.out, a.format, a.model, a.weights, a.lora, a.merge, a.base)}")
    if training_metadata(checkpoint_file(Path(a.ckpt), a.weights)).get("prediction") == "flow":
        print("note: this model was trained with rectified flow (it predicts the velocity noise - x0 at timestep "
              "sigma * 1000); diffusers' PixArt pipelines run eps / v schedulers, so sample it with "
              "FlowMatchEulerDiscreteScheduler in a loop of your own, or with python -m pixart_fast.sample")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
