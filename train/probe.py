"""`python -m pixart_fast.train.probe CKPT`: which caption words a model trained on the embedded data uses, noise
level by noise level.

Samples show what a model draws; they do not show why a check fails. This probe takes the held-out scenes'
ground-truth renders, noises them to each timestep t, and scores the model's one-step estimate of the clean image
(`Diffusion.predict_x0`, no guidance) with `pixart_fast.eval`, three times: with the true captions, with every
shape word changed to another shape, and with every size word swapped (small <-> large). The scenes scored are
always the true ones. A model that reads a word loses that check when the word changes; one that ignores it scores
the same both ways. At low noise the image itself shows the shape and size, so every model keeps them there; the
noise levels where the true caption beats the changed one are where the model has learned the word.

A one-step estimate is a posterior mean, blurred wherever the noise leaves the image uncertain; a sample is not.
So the probe also samples down from each noised render (the true captions, the default sampler, no guidance;
SDEdit's chain) and scores the result: the last two columns. Where they fall below 1, the steps from that noise
level down lose what the image still showed; a model that denoised perfectly would keep every shape from any t,
since the caption names it.

    python -m pixart_fast.train.probe runs/stage2/checkpoints/step-0003200
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pixart_fast.cli import UserError, run
from pixart_fast.data import SHAPES, Scene, ShapeScenes
from pixart_fast.diffusion import Diffusion
from pixart_fast.eval import alignment_scores
from pixart_fast.sample import load_for_sampling

CHECKS = ("colour", "position", "shape", "size")
SIZE_SWAP = {"small": "large", "large": "small"}


def changed(scene: Scene, word: str) -> Scene:
    """The scene with every object's `word` ("shape" or "size") changed: each shape to the next of SHAPES, small and
    large to each other (medium, which captions do not name, stays)."""
    if word == "shape":
        objects = [replace(o, shape=SHAPES[(SHAPES.index(o.shape) + 1) % len(SHAPES)]) for o in scene.objects]
    elif word == "size":
        objects = [replace(o, size=SIZE_SWAP.get(o.size, o.size)) for o in scene.objects]
    else:
        raise ValueError(f"word must be 'shape' or 'size', got {word!r}")
    return replace(scene, objects=tuple(objects))


@torch.no_grad()
def probe(x0_fn, images: torch.Tensor, scenes: list[Scene], timesteps: list[int], diffusion: Diffusion,
          seed: int = 0, sample_fn=None) -> list[dict]:
    """images (B, 3, H, W) in [-1, 1], the renders of `scenes`; x0_fn(x_t, t (B,), captions) -> the model's clean
    image estimate (B, 3, H, W). For each t: {"t", "snr", "true": scores with the true captions, "shape changed":
    scores with the shape words changed, "size changed": with the size words swapped}, every score against the
    true scenes (`alignment_scores`). sample_fn(x_t, t (an int), captions) -> a sample (B, 3, H, W) from x_t,
    when given: each row also has "sampled", the sample's scores with the true captions."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    captions = {"true": [s.caption for s in scenes], "shape changed": [changed(s, "shape").caption for s in scenes],
                "size changed": [changed(s, "size").caption for s in scenes]}
    rows = []
    for t in timesteps:
        tt = torch.full((len(images),), t, dtype=torch.long)
        x_t = diffusion.noised(images, tt, noise)
        row = {"t": t, "snr": diffusion.snr(t)}
        for name, caps in captions.items():
            row[name] = alignment_scores(list(x0_fn(x_t, tt, caps).clamp(-1, 1)), scenes)
        if sample_fn is not None:
            row["sampled"] = alignment_scores(list(sample_fn(x_t, t, captions["true"]).clamp(-1, 1)), scenes)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """The probe's rows as a markdown table: the true captions' four checks, then shape and size with their word
    changed, then (where the rows have them) shape and size sampled from t."""
    sampled = all("sampled" in r for r in rows)
    head = "| t | SNR | colour | position | shape | size | shape, shape word changed | size, size word swapped |"
    lines = [head + (" shape, sampled from t | size, sampled from t |" if sampled else ""),
             "| --- " * (8 + 2 * sampled) + "|"]
    for r in rows:
        true = " | ".join(f"{r['true'][c]:.2f}" for c in CHECKS)
        line = (f"| {r['t']} | {r['snr']:.3g} | {true} | {r['shape changed']['shape']:.2f} "
                f"| {r['size changed']['size']:.2f} |")
        lines.append(line + (f" {r['sampled']['shape']:.2f} | {r['sampled']['size']:.2f} |" if sampled else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixart_fast.train.probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="a checkpoint of a model trained on the embedded stage-2 data (our checkpoint folder "
                                "or its .safetensors)")
    p.add_argument("--num-val", type=int, default=56, help="held-out scenes to score (default: 56)")
    p.add_argument("--timesteps", default="50,100,200,300,400,600",
                   help="noise levels, training timesteps in [0, 1000), comma-separated (default: 50,100,200,300,400,600)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default: 0)")
    p.add_argument("--steps", type=int, default=20,
                   help="sampler steps from each noised render down (the prediction's default sampler, "
                        "DPM-Solver++ or Euler; 0: no sampling, the one-step estimates only) (default: 20)")
    args = p.parse_args(argv)
    if not Path(args.ckpt).exists():
        raise UserError(f"{args.ckpt}: no such file or folder")
    try:
        timesteps = [int(t) for t in args.timesteps.split(",")]
    except ValueError:
        raise UserError(f"--timesteps {args.timesteps}: expected integers separated by commas") from None
    if not all(0 <= t < 1000 for t in timesteps):
        raise UserError(f"--timesteps {args.timesteps}: each must be in [0, 1000)")
    if args.num_val < 1:
        raise UserError(f"--num-val {args.num_val}: must be >= 1")
    if args.steps < 0 or args.steps > min(timesteps) + 1:
        raise UserError(f"--steps {args.steps}: must be in [0, {min(timesteps) + 1}] (a chain from t visits at most "
                        "t + 1 timesteps)")
    model, text, prediction = load_for_sampling(Path(args.ckpt))
    if prediction == "flow" and args.steps and 0 in timesteps:
        raise UserError(f"--timesteps {args.timesteps}: a flow model's chain starts at t > 0 (at t = 0 it has no noise "
                        "to take away); drop 0 or pass --steps 0")
    side = model.config.input_size
    if model.config.in_channels != 3 or model.config.micro_conditions:
        raise UserError(f"{args.ckpt}: the probe reads stage-2 models of the embedded data (pixel space, no "
                        "micro-conditions)")
    val = ShapeScenes(length=args.num_val, split="val", size=side)
    items = [val[i] for i in range(args.num_val)]
    diffusion = Diffusion(learn_sigma=model.config.learn_sigma, prediction=prediction)

    def x0_fn(x_t, t, captions):
        y, mask = text.encode_cached(captions)
        return diffusion.predict_x0(lambda x, tt: model(x, tt, y, mask), x_t, t)

    def sample_fn(x_t, t, captions):
        y, mask = text.encode_cached(captions)
        return diffusion.sample(lambda x, tt: model(x, tt, y, mask), x_t, steps=args.steps, clip_x0=True, start=t)

    rows = probe(x0_fn, torch.stack([it["image"] for it in items]), [it["truth"] for it in items], timesteps,
                 diffusion, args.seed, sample_fn if args.steps else None)
    sampled = f" and (last two columns) {args.steps}-step samples from t, no guidance," if args.steps else ""
    print(f"{args.ckpt}: {prediction}-prediction, {args.num_val} held-out scenes; one-step clean-image estimates"
          f"{sampled} scored against the true scenes\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
