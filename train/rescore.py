"""`python -m pixart_fast.train.rescore RUN`: a run's saved checkpoints scored again with other sampler settings.

The trainer scores its EMA model on the held-out captions as it goes, with its --cfg-scale and --sample-steps. This
command samples every saved checkpoint of an embedded text-to-image run (stage 2 or 3; RUN is the stage's folder,
e.g. runs/stage2) again, on the same held-out captions and noise as the trainer's evaluation, with the settings
given here, and prints each checkpoint's scores beside their chance levels (`pixart_fast.eval`). Nothing is trained,
so sampler settings compare on the same training.

With --guide-step N, each checkpoint after step N is also guided by the run's own checkpoint at step N: autoguidance
(Karras et al. 2024), which moves each sampler step away from what the earlier, weaker model predicts by
--guide-weight x (model - earlier model), on top of classifier-free guidance (`pixart_fast.diffusion.guided`).
With --guide-ckpt, every checkpoint is guided by other weights of the same kind of model (a smaller or shorter run).

    python -m pixart_fast.train.rescore runs/stage2 --cfg-scale 2.5 --guide-step 1600
"""
import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from pixart_fast.checkpoints import training_metadata
from pixart_fast.cli import UserError, run
from pixart_fast.diffusion import Diffusion
from pixart_fast.sample import load_for_sampling, load_guide, load_pixart_checkpoint
from .recipes import RECIPES
from .run_folder import checkpoint_folders, checkpoint_problems, guide_checkpoint
from .stages import STAGES, EmbeddedData

CHECKS = ("colour", "position", "shape", "size", "accuracy")


def rescore(run_dir: Path, cfg_scale: float, sample_steps: int = 20, num_val: int = 56, guide_step: int = 0,
            guide_weight: float = 1.0, grids: Path | None = None, log=print,
            guide_ckpt: Path | None = None) -> list[dict]:
    """[{"step": s, "scores": the trainer's evaluation of checkpoint s with these settings}, ...], oldest first,
    over the run's intact checkpoints (after guide_step when it is > 0: the checkpoint at guide_step guides them;
    guide_ckpt: these weights guide every checkpoint).
    grids: a folder for each checkpoint's sample grid, step-XXXXXXX.png as the trainer's samples/ has them."""
    folders = checkpoint_folders(run_dir)
    if not folders:
        raise UserError(f"{run_dir}: no checkpoints/step-XXXXXXX folders; pass a stage's folder, e.g. runs/stage2")
    steps = {int(f.name.removeprefix("step-")): f for f in folders}
    recorded = training_metadata(folders[0] / "ema.safetensors")
    stage_number = recorded.get("stage")
    if stage_number not in (2, 3) or recorded.get("lora_rank"):
        raise UserError(f"{run_dir}: rescore reads the embedded text-to-image stages (2 and 3) that our trainer "
                        f"wrote; its checkpoints record stage {stage_number}")
    guide_folder = guide_ckpt
    if guide_step and guide_ckpt is not None:
        raise UserError(f"--guide-step {guide_step} and --guide-ckpt {guide_ckpt}: pass one guide")
    if guide_step:
        guide_folder = guide_checkpoint(run_dir, guide_step)
        steps = {s: f for s, f in steps.items() if s > guide_step}
        if not steps:
            raise UserError(f"--guide-step {guide_step}: {run_dir} has no checkpoint after it to guide")
    stage = STAGES[stage_number]
    cfg = replace(RECIPES[stage_number], cfg_scale=cfg_scale, sample_steps=sample_steps, num_val=num_val)
    rows, guide, data = [], None, None
    for step, folder in sorted(steps.items()):
        problems = checkpoint_problems(folder)
        if problems:
            log(f"{folder.name}: damaged ({'; '.join(problems)}); skipping it")
            continue
        if data is not None:
            model = load_pixart_checkpoint(folder)[0]
        else:  # the first checkpoint scored sets up what they all share: the captions, the sampler, the guide
            model, text, prediction = load_for_sampling(folder)
            if model.config.in_channels != 3:
                raise UserError(f"{run_dir}: rescore reads runs on the embedded data (pixel space, 3 channels); this "
                                f"one has {model.config.in_channels} input channels (a run on extracted features)")
            if guide_folder is not None:
                guide = load_guide(guide_folder, model, prediction)
            data = EmbeddedData(None, stage.embedded_set(cfg, model.config.input_size, 0, "val", num_val), text)
            diffusion = Diffusion(learn_sigma=model.config.learn_sigma, prediction=prediction)
        png = None if grids is None else grids / f"step-{step:07d}.png"
        scores = data.evaluate(model, stage, cfg, diffusion, "cpu", png, guide, guide_weight)
        rows.append({"step": step, "scores": scores})
        log(row(step, scores))
    return rows


def row(step: int, scores: dict) -> str:
    """One markdown row: step, then each check as score / chance, then the background."""
    checks = " | ".join(f"{scores[c]:.3f} / {scores[c + '_chance']:.3f}" for c in CHECKS)
    return f"| {step} | {checks} | {scores['background']:.2f} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixart_fast.train.rescore", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a stage's run folder of an embedded run (the one holding checkpoints/)")
    p.add_argument("--cfg-scale", type=float, default=4.5, help="classifier-free guidance scale (default: 4.5, the "
                   "trainer's)")
    p.add_argument("--sample-steps", type=int, default=20, help="sampler steps (default: 20, the trainer's)")
    p.add_argument("--num-val", type=int, default=56, help="held-out captions (default: 56, the trainer's)")
    p.add_argument("--guide-step", type=int, default=0,
                   help="autoguidance by the run's checkpoint at this step, for the checkpoints after it (default: "
                        "0, none)")
    p.add_argument("--guide-ckpt", default=None,
                   help="autoguidance by these weights instead, for every checkpoint: a weaker model of the same "
                        "kind (another run's checkpoint; default: none)")
    p.add_argument("--guide-weight", type=float, default=1.0, help="autoguidance's weight (default: 1)")
    p.add_argument("--out", default=None, help="also write the scores to this JSON file")
    p.add_argument("--grids", default=None, help="also write each checkpoint's samples beside the truth to this "
                   "folder, step-XXXXXXX.png")
    args = p.parse_args(argv)
    if not Path(args.run).is_dir():
        raise UserError(f"{args.run}: no such folder")
    for flag, value in (("--sample-steps", args.sample_steps), ("--num-val", args.num_val)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    if args.cfg_scale < 0 or args.guide_step < 0:
        raise UserError(f"--cfg-scale {args.cfg_scale} and --guide-step {args.guide_step} must be >= 0")
    if args.guide_ckpt is not None and not Path(args.guide_ckpt).exists():
        raise UserError(f"--guide-ckpt {args.guide_ckpt}: no such file or folder (pass a local path; nothing is "
                        "downloaded)")
    print(f"| step | {' | '.join(CHECKS)} | background |\n" + "| --- " * (len(CHECKS) + 2) + "|")
    rows = rescore(Path(args.run), args.cfg_scale, args.sample_steps, args.num_val, args.guide_step,
                   args.guide_weight, None if args.grids is None else Path(args.grids),
                   guide_ckpt=None if args.guide_ckpt is None else Path(args.guide_ckpt))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
