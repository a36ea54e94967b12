"""Time to quality: the default stage-2 recipe on this machine (embedded data, from scratch), its images per
second and the training seconds and FLOPs (`pixart_fast.flops`, as the recipe runs) it takes to reach position >= 0.5
on the held-out captions (or "not reached").

This is the number a change to the step (a kernel, the data path) or to the recipe (objective, schedule) should
move: how soon the model does what its captions say, not images per second alone. It runs the whole default
recipe (about 5 minutes on 2 CPU cores), scoring the EMA model every EVAL_EVERY steps; the seconds are training
time (the sum of the logged intervals up to that step), evaluation excluded; what training the embedded T5 on
caption text took before step 1 is recorded beside them (text_encoder_seconds, text_encoder_flops).
"""
import json
from dataclasses import replace

from pixart_fast.train.ablate import read_run, seconds_at, step_flops
from pixart_fast.train.loop import train
from pixart_fast.train.recipes import RECIPES

EVAL_EVERY = 200
TARGET = 0.5


def test_time_to_position_default_stage2(benchmark, tmp_path):
    cfg = replace(RECIPES[2], out=str(tmp_path), sample_every=EVAL_EVERY, save_every=10**9)
    summary = benchmark.pedantic(lambda: train(cfg, progress=False), rounds=1, iterations=1)
    lines = [json.loads(line) for line in (tmp_path / "stage2/metrics.jsonl").read_text().splitlines()]
    scores, seconds = read_run(tmp_path / "stage2", cfg.batch_size)
    clock = {step: seconds_at(seconds, step) for step in scores}
    reached = next((s for s in sorted(scores) if scores[s].get("position", 0) >= TARGET), None)
    speeds = sorted(m["img_per_s"] for m in lines if m.get("img_per_s"))
    benchmark.extra_info.update(
        kind="time_to_quality", device="cpu", recipe="stage 2 default, from scratch", steps=cfg.steps,
        batch=cfg.batch_size, img_per_s=speeds[len(speeds) // 2], target=f"position >= {TARGET}",
        seconds_to_target=None if reached is None else round(clock[reached], 1), step_reached=reached,
        flops_to_target=None if reached is None else step_flops(cfg, reached), train_flops=step_flops(cfg, cfg.steps),
        train_seconds=summary["train_seconds"], text_encoder_seconds=summary.get("text_encoder_seconds"),
        text_encoder_flops=summary.get("text_encoder_flops"), scores_by_step={str(s): v for s, v in scores.items()})
    final = scores[cfg.steps]
    verdict = (f"position >= {TARGET} at step {reached}, {clock[reached]:.0f} s and {step_flops(cfg, reached):.2e} "
               "FLOPs of training" if reached else
               f"position >= {TARGET} not reached in {summary['train_seconds']:.0f} s ({cfg.steps} steps)")
    print(f"\ntime to quality, default stage 2 from scratch: {speeds[len(speeds) // 2]:.0f} images/s (median); "
          f"{verdict}; final " + ", ".join(f"{k} {final[k]:.2f} (chance {final[k + '_chance']:.2f})"
                                           for k in ("colour", "position", "shape", "size", "accuracy")))
