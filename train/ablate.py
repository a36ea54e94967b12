"""`python -m pixart_fast.train.ablate`: the paper's first claim in miniature -- does stage 1 (pixel dependency) make
stage 2 (text-image alignment) learn faster?

For each seed it trains stage 1, then stage 2 twice with the same stage-2 budget: from stage 1's EMA weights
(re-parameterized, as `--stage 2` does after `--stage 1`) and from scratch. The EMA model is scored on the held-out
captions every --eval-every steps (the trainer's own validation: samples scored by pixart_fast.eval). Writes, under
--out: ablation.json (every score), ablation.md (mean and spread per arm and step, and the steps each arm took to
reach position >= --target) and ablation.png (score against step, mean and min-max band per arm).

    python -m pixart_fast.train.ablate                       # the default recipes, 3 seeds
    python -m pixart_fast.train.ablate --seeds 2 --stage2-steps 600 --eval-every 200 --out runs/ablate-short
"""
import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from pixart_fast.cli import run
from .loop import train
from .recipes import RECIPES

ARMS = ("from stage 1", "from scratch")
METRICS = ("colour", "position", "shape", "accuracy")


def scores_by_step(run_dir: Path) -> dict[int, dict]:
    """{step: the EMA model's scores} from a stage's metrics.jsonl validation lines."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val" in record:
            out[record["step"]] = record["val"]
    return out


def run_seed(seed: int, out: Path, stage1_steps: int | None, stage2_steps: int | None, eval_every: int,
             num_val: int, progress: bool = True, **settings) -> dict:
    """Stage 1, then stage 2 from it and from scratch, for one seed; returns {arm: {step: scores}}. settings:
    other TrainConfig fields for both stages (a smaller model for a quick look, say)."""
    chain, scratch = out / f"seed{seed}" / "chain", out / f"seed{seed}" / "scratch"
    train(replace(RECIPES[1], seed=seed, out=str(chain), steps=stage1_steps or RECIPES[1].steps, **settings),
          progress=progress)
    stage2 = replace(RECIPES[2], seed=seed, sample_every=eval_every, num_val=num_val,
                     steps=stage2_steps or RECIPES[2].steps, save_every=10**9, **settings)
    train(replace(stage2, out=str(chain)), progress=progress)
    train(replace(stage2, out=str(scratch)), progress=progress)
    return {ARMS[0]: scores_by_step(chain / "stage2"), ARMS[1]: scores_by_step(scratch / "stage2")}


def steps_to_reach(scores: dict[int, dict], metric: str, target: float) -> int | None:
    """The first evaluated step whose `metric` is at least `target` (None: never)."""
    return next((step for step in sorted(scores) if scores[step].get(metric, 0) >= target), None)


def summarise(runs: dict[int, dict], target: float) -> dict:
    """Per arm and step: mean, min and max of each metric over seeds; per arm: steps to reach position >= target."""
    table = {}
    for arm in ARMS:
        steps = sorted(set.intersection(*(set(r[arm]) for r in runs.values())))
        table[arm] = {"steps": steps, "metrics": {}, "steps_to_target": {}}
        for metric in METRICS:
            values = [[r[arm][s][metric] for r in runs.values()] for s in steps]
            table[arm]["metrics"][metric] = {"mean": [statistics.fmean(v) for v in values],
                                             "min": [min(v) for v in values], "max": [max(v) for v in values]}
        table[arm]["steps_to_target"] = {seed: steps_to_reach(r[arm], "position", target) for seed, r in runs.items()}
    return table


def markdown(table: dict, target: float) -> str:
    lines = ["| arm | step | " + " | ".join(METRICS) + " |", "| --- | --- | " + " | ".join("---" for _ in METRICS) + " |"]
    for arm, t in table.items():
        for i, step in enumerate(t["steps"]):
            cells = [f"{t['metrics'][m]['mean'][i]:.2f} ({t['metrics'][m]['min'][i]:.2f}-{t['metrics'][m]['max'][i]:.2f})"
                     for m in METRICS]
            lines.append(f"| {arm} | {step} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"Steps to reach position >= {target} (per seed; '-' = not reached):")
    lines.append("")
    for arm, t in table.items():
        reached = ", ".join(f"seed {s}: {n if n is not None else '-'}" for s, n in t["steps_to_target"].items())
        lines.append(f"- {arm}: {reached}")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    """Score against step, one panel per metric: each arm's mean line and its min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2), sharey=True)
    for ax, metric in zip(axes, METRICS):
        for arm, t in table.items():
            m = t["metrics"][metric]
            ax.plot(t["steps"], m["mean"], marker="o", label=arm)
            ax.fill_between(t["steps"], m["min"], m["max"], alpha=0.2)
        ax.set_title(metric)
        ax.set_xlabel("stage-2 step")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("EMA score, held-out captions")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablate(out, seeds: int = 3, stage1_steps: int | None = None, stage2_steps: int | None = None,
           eval_every: int = 200, num_val: int = RECIPES[2].num_val, target: float = 0.5, progress: bool = True,
           **settings) -> dict:
    """Run the ablation (see the module docstring) and write its three files under `out`; returns the summary."""
    out = Path(out)
    runs = {seed: run_seed(seed, out, stage1_steps, stage2_steps, eval_every, num_val, progress, **settings)
            for seed in range(seeds)}
    table = summarise(runs, target)
    (out / "ablation.json").write_text(json.dumps({"runs": runs, "summary": table}, indent=1) + "\n")
    (out / "ablation.md").write_text(markdown(table, target))
    plot(table, out / "ablation.png")
    return table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixart_fast.train.ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1, each a stage-1 run and two stage-2 runs "
                                                        "(default: 3)")
    p.add_argument("--stage1-steps", type=int, default=None, help="stage-1 steps (default: the recipe's)")
    p.add_argument("--stage2-steps", type=int, default=None, help="stage-2 budget of both arms (default: the recipe's)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between scorings of the EMA model (default: 200)")
    p.add_argument("--num-val", type=int, default=RECIPES[2].num_val,
                   help=f"held-out captions scored each time (default: {RECIPES[2].num_val})")
    p.add_argument("--target", type=float, default=0.5, help="the position score whose first step is reported "
                                                             "(default: 0.5)")
    p.add_argument("--out", default="runs/ablate", help="output folder (default: runs/ablate)")
    a = p.parse_args(argv)
    if a.seeds < 1 or a.eval_every < 1:
        p.error(f"--seeds and --eval-every must be >= 1, got {a.seeds} and {a.eval_every}")
    table = ablate(a.out, a.seeds, a.stage1_steps, a.stage2_steps, a.eval_every, a.num_val, a.target)
    print(markdown(table, a.target))
    out = Path(a.out)
    print(f"wrote {out / 'ablation.json'}, {out / 'ablation.md'}, {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
