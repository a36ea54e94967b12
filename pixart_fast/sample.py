"""`python -m pixart_fast.sample --ckpt X --prompt "..." --out img.png`: text-to-image with a PixArt checkpoint.

With --t5 and --vae (local folders) it runs a real PixArt (T5 features, SD-VAE latents); without them, the
embedded default: the tiny byte-level T5 and pixel space (docs/ARCHITECTURE.md section 5).
"""
import argparse
import sys
from pathlib import Path

import torch

from pixart_fast.checkpoints import checkpoint_file, load_pixart, stored_text_encoder, training_metadata
from pixart_fast.cli import UserError, run
from pixart_fast.lora import load_lora
from pixart_fast.diffusion import PREDICTIONS, SAMPLERS, Diffusion
from pixart_fast.grid import image_grid
from pixart_fast.model import CONFIGS, PixArt
from pixart_fast.text import TextEncoder

VAE_FACTOR = 8  # pixels per latent pixel


def sampler_for(prediction: str, sampler: str | None, shift: float | None = None) -> str:
    """The sampler to run for a model of `prediction`: `sampler`, or None for its default (dpm for eps and v,
    euler for flow). UserError for a sampler or a shift that does not fit the prediction."""
    sampler = sampler or SAMPLERS[prediction][0]
    if sampler not in SAMPLERS[prediction]:
        raise UserError(f"--sampler {sampler} does not sample a {prediction}-prediction model: pass "
                        f"{' or '.join(SAMPLERS[prediction])} (or leave --sampler out)")
    if shift is not None and prediction != "flow":
        raise UserError(f"--shift is for a flow model; this one predicts {prediction}")
    if shift is not None and not shift > 0:
        raise UserError(f"--shift {shift}: must be > 0")
    return sampler


@torch.no_grad()
def generate(model: PixArt, text: TextEncoder, prompts: list[str], height: int, width: int, steps: int = 20,
             cfg_scale: float = 4.5, sampler: str | None = None, seed: int = 0, vae=None,
             prediction: str = "eps", shift: float | None = None, guide: PixArt | None = None,
             guide_weight: float = 0.0) -> torch.Tensor:
    """Images (N, 3, height, width) in [-1, 1] for N prompts. height/width in pixels (with a VAE, 8 per latent
    pixel). The noise comes from a CPU generator seeded with `seed`, so results do not depend on the device.
    prediction: what the model predicts, "eps", "v" or "flow" (what it was trained with). sampler: "dpm" or
    "ddim" for eps and v, "euler" for flow; None: the prediction's default (`sampler_for`). shift: flow only,
    SD3's timestep shift of the Euler steps' noise levels (None: 1, none). guide, guide_weight: autoguidance by a
    weaker model of the same kind, e.g. an earlier checkpoint of `model` (`PixArt.forward_with_cfg`)."""
    sampler = sampler_for(prediction, sampler, shift)
    cfg = model.config
    factor = VAE_FACTOR if vae is not None else 1
    p = cfg.patch_size * factor
    if height % p or width % p:
        raise ValueError(f"height and width must be multiples of {p} (patch {cfg.patch_size} x {factor}), got {height}x{width}")
    device = next(model.parameters()).device
    y, mask = (a.to(device) for a in text.encode(prompts))
    N = len(prompts)
    extra = {}
    if cfg.micro_conditions:
        extra = {"img_hw": torch.tensor([[height, width]] * N, dtype=torch.float32, device=device),
                 "aspect_ratio": torch.full((N, 1), height / width, device=device)}
    noise = torch.randn(N, cfg.in_channels, height // factor, width // factor,
                        generator=torch.Generator().manual_seed(seed)).to(device)
    eps_fn = lambda x, t: model.forward_with_cfg(x, t, y, mask, cfg_scale, **extra, guide=guide,  # noqa: E731
                                                 guide_weight=guide_weight)
    diffusion = Diffusion(learn_sigma=cfg.learn_sigma, prediction=prediction)
    # pixel space: clip x0 to the data range
    x = diffusion.sample(eps_fn, noise, steps=steps, sampler=sampler, shift=shift or 1.0, clip_x0=vae is None)
    if vae is not None:
        x = vae.decode(x / vae.config.scaling_factor).sample  # the VAE's own factor, as extraction uses
    return x.float().clamp(-1, 1).cpu()


def load_for_sampling(ckpt: Path, model_name: str | None = None, t5: str | None = None, tokenizer: str | None = None,
                      prediction: str | None = None, device="cpu", check=None) -> tuple[PixArt, TextEncoder, str]:
    """A checkpoint ready to sample: (model in eval mode on `device`, its text encoder, its prediction). Each None
    takes what our trainer's checkpoint records (model config, prediction, the embedded T5's tokenizer, locality
    and training on caption text, with the trained T5's weights), else eps and byte; t5: a local T5 folder instead
    of the embedded one. check(prediction), when given, runs before the text encoder loads (to refuse a sampler
    that does not fit). One of our checkpoint folders (step-XXXXXXX/) stands for its EMA weights."""
    model, recorded = load_pixart_checkpoint(ckpt, model_name, device)
    prediction = prediction or recorded.get("prediction", "eps")
    if check is not None:
        check(prediction)
    tokenizer = tokenizer or recorded.get("tokenizer", "byte")
    length = model.config.max_tokens  # the caption length the model's null caption has (Σ: 300)
    # else the embedded T5 it was trained with: the trained weights the checkpoint keeps, else rebuilt from the
    # settings it records (a checkpoint written before the weights were kept: trained again, exact on this machine)
    text = (TextEncoder.from_pretrained(t5, max_length=length) if t5 else
            TextEncoder.embedded(tokenizer=tokenizer, max_length=length, locality=recorded.get("t5_locality", 0.0),
                                 train_steps=recorded.get("t5_train_steps", 0), weights=stored_text_encoder(ckpt)))
    if text.caption_channels != model.config.caption_channels:
        raise UserError(f"the text encoder gives {text.caption_channels}-dim features but the model expects "
                        f"{model.config.caption_channels}: pass the T5 the model was trained with (--t5)")
    return model, text, prediction


def load_pixart_checkpoint(ckpt: Path, model_name: str | None = None, device="cpu") -> tuple[PixArt, dict]:
    """(the PixArt at `ckpt` in eval mode on `device`, what our trainer recorded in it: {} for other files)."""
    ckpt = checkpoint_file(ckpt)
    recorded = training_metadata(ckpt)  # our trainer's checkpoints say how they were trained
    # a LoRA run's weights file: the base it records with the adapters on it
    model = load_lora(ckpt) if "lora_rank" in recorded else load_pixart(ckpt, model_name)
    return model.to(device).eval(), recorded


def load_guide(ckpt: Path, model: PixArt, prediction: str, device="cpu") -> PixArt:
    """The weaker model autoguidance steers away from, in eval mode on `device`: one of our checkpoints (the EMA
    weights of an earlier step; the caption features are the model's, so it needs no text encoder of its own) or
    any PixArt weights file, refused where it cannot stand beside `model` (another input, output or caption width,
    or another recorded prediction)."""
    guide, recorded = load_pixart_checkpoint(ckpt, None, device)
    guide_prediction = recorded.get("prediction", prediction)
    mine, theirs = model.config, guide.config
    for field in ("in_channels", "out_channels", "caption_channels", "max_tokens", "micro_conditions", "input_size"):
        if getattr(mine, field) != getattr(theirs, field):
            raise UserError(f"--guide-ckpt {ckpt}: its {field} is {getattr(theirs, field)}, the model's "
                            f"{getattr(mine, field)}; guide with a checkpoint of the same kind of model")
    if guide_prediction != prediction:
        raise UserError(f"--guide-ckpt {ckpt} predicts {guide_prediction}, the model {prediction}: guide with a "
                        "checkpoint of the same run")
    return guide


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixart_fast.sample", description=__doc__)
    p.add_argument("--ckpt", required=True, help="PixArt weights: ours (a checkpoint folder or its .safetensors; a "
                   "LoRA run's with its recorded base), official .pth or a diffusers folder")
    p.add_argument("--prompt", required=True, action="append", help="caption; repeat for several images")
    p.add_argument("--out", default="sample.png", help="PNG to write: the images in a grid, each above its prompt")
    p.add_argument("--model", default=None, help=f"model config, one of {sorted(CONFIGS)} (default: from the checkpoint)")
    p.add_argument("--t5", default=None, help="local T5 encoder folder (default: the embedded tiny T5)")
    p.add_argument("--prediction", choices=PREDICTIONS, default=None,
                   help="what the model predicts (default: what the checkpoint records, else eps)")
    p.add_argument("--tokenizer", choices=["byte", "word"], default=None,
                   help="the embedded T5's tokenizer (default: what the checkpoint records, else byte)")
    p.add_argument("--vae", default=None, help="local diffusers AutoencoderKL folder, or a pipeline "
                   "folder with vae/ inside (default: pixel space, no VAE)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's size)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's size)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--cfg-scale", type=float, default=4.5, help="classifier-free guidance scale")
    p.add_argument("--guide-ckpt", default=None,
                   help="autoguidance: an earlier checkpoint of the same run (or a weaker model of the same kind); "
                        "the sample moves away from what it predicts by --guide-weight (default: none)")
    p.add_argument("--guide-weight", type=float, default=1.0,
                   help="autoguidance's weight w: w x (model - guide) is added to the guided prediction (default: 1; "
                        "the embedded runs draw best with --cfg-scale 2.5 beside it, docs/experiments.md)")
    p.add_argument("--sampler", choices=("dpm", "ddim", "euler"), default=None,
                   help="DPM-Solver++ 2M or DDIM for an eps or v model, Euler for a flow model (default: dpm, "
                        "flow: euler)")
    p.add_argument("--shift", type=float, default=None,
                   help="flow models: SD3's timestep shift of the Euler steps' noise levels, s -> shift s / (1 + "
                        "(shift - 1) s), dimensionless, > 1 spends more steps at high noise (default: 1, none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--scale", type=int, default=4, help="upscale the written PNG by this factor (nearest)")
    args = p.parse_args(argv)
    paths = (("--ckpt", args.ckpt), ("--t5", args.t5), ("--vae", args.vae), ("--guide-ckpt", args.guide_ckpt))
    for flag, path in paths:
        if path is not None and not Path(path).exists():  # nothing is downloaded: a name is not a path
            raise UserError(f"{flag} {path}: no such file or folder (pass a local path; nothing is downloaded)")
    if not Path(args.out).resolve().parent.is_dir():
        raise UserError(f"--out {args.out}: the folder {Path(args.out).parent} does not exist; create it or pass "
                        "another path")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, text, prediction = load_for_sampling(Path(args.ckpt), args.model, args.t5, args.tokenizer,
                                                args.prediction, device,
                                                check=lambda p: sampler_for(p, args.sampler, args.shift))
    guide = None
    if args.guide_ckpt:
        guide = load_guide(Path(args.guide_ckpt), model, prediction, device)
    vae = None
    if args.vae:
        from diffusers import AutoencoderKL
        inside = (Path(args.vae) / "vae").is_dir()  # a diffusers pipeline folder: its vae/
        vae = AutoencoderKL.from_pretrained(args.vae, subfolder="vae" if inside else None,
                                            local_files_only=True).to(device).eval()
    factor = VAE_FACTOR if vae is not None else 1
    side = model.config.input_size * factor
    images = generate(model, text, args.prompt, args.height or side, args.width or side, args.steps,
                      args.cfg_scale, args.sampler, args.seed, vae, prediction, args.shift, guide, args.guide_weight)
    image_grid(list(images), captions=args.prompt, cols=4, scale=args.scale).save(args.out)  # each under its prompt
    print(f"wrote {args.out}: {len(args.prompt)} image(s) of {images.shape[2]}x{images.shape[3]} px")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
