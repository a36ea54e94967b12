"""`python -m pixart_fast.train.ablate`: recipes compared by the compute they take to reach a quality.

Each arm is a named recipe (ARMS): stage-2 settings over the default recipe, and optionally the stage-1 run it
starts from or the alignment encoder it trains first. Every arm x seed trains stage 2 (after its stage 1 or its
encoder, when it has one) on the embedded data with the same text encoder and held-out captions; the EMA model is
scored every --eval-every steps (`pixart_fast.eval`, each check beside its chance level). Each evaluated step gets
its cost: training FLOPs (`pixart_fast.flops`, counted as the model runs: masked or routed tokens, the unmasked
finish, an alignment target's forward, stage 1 or the encoder's training when the arm has one) and the seconds of
the training steps (from the images/s of metrics.jsonl; validation excluded).

Writes, under --out: ablation.json (every score and cost), ablation.md (per arm and threshold: the FLOPs and
seconds to reach it, mean and spread over seeds, and the ratio to the baseline arms `paper` and `no-route`; then
each arm's final scores beside their chance levels) and ablation.png (score against training FLOPs, mean and
min-max band over seeds). Runs resume: a finished arm x seed is not trained again, an interrupted one continues
from its newest checkpoint (one every --eval-every steps), so rerunning the command adds arms or seeds.

    python -m pixart_fast.train.ablate                                    # every arm, 3 seeds
    python -m pixart_fast.train.ablate --arms paper,no-route,default,mask --seeds 3 --steps 800 --eval-every 200
"""
import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from pixart_fast.cli import UserError, run
from pixart_fast.flops import flops_per_image
from pixart_fast.model import CONFIGS
from .encoder import EncoderConfig, train_encoder
from .loop import train
from .recipes import RECIPES, TrainConfig

METRICS = ("colour", "position", "shape", "size", "accuracy")
BASELINES = ("paper", "no-route")


@dataclass(frozen=True)
class Arm:
    """A recipe of the ablation: `stage2` overrides the stage-2 recipe; `stage1` (None: from scratch) overrides
    the stage-1 recipe of the run it starts from; `unmasked_fraction`: with a mask ratio, the share of the stage-2
    steps trained unmasked at the end; `early_route_fraction`: the share of the stage-2 steps at the start that
    route as --early-route-ratio and --early-route-start say; `encoder`: an alignment encoder is trained first
    (`pixart_fast.train.encoder` at its defaults, the arm's seed) and is stage 2's --repa-encoder, its cost counted
    where a stage 1's is (an arm has one or the other); `autoguided`: its validation samples with guidance
    AUTOGUIDED_CFG and autoguidance by its own first evaluated checkpoint (weight 1), a sampler that costs no
    training, so its FLOPs are its recipe's."""

    name: str
    about: str
    stage2: dict = field(default_factory=dict)
    stage1: dict | None = None
    unmasked_fraction: float = 0.0
    early_route_fraction: float = 0.0
    encoder: bool = False
    autoguided: bool = False


# The paper's recipe in miniature (PixArt-alpha section 2.4 and its configs): eps prediction with the learned
# variance and the VLB term, uniform timesteps, unweighted loss, AdamW with weight decay 0.03, eps 1e-10 and a
# gradient-norm clip of 0.01, starting from a class-conditional stage 1 of one large object per image. Its lr is
# the miniature's (1e-3, 20-step warm-up), not the paper's 2e-5: that is set for a 611 M-parameter model at batch
# 256, and the toy at 2e-5 barely moves in its budget. The text encoder is every arm's (word tokens, locality 0.5,
# trained on caption text: its 1.1e11 FLOPs are spent once for every arm, as a pretrained T5's, and not counted).
# No token routing and no learning-rate decay: the paper has neither.
_PAPER = dict(prediction="eps", min_snr_gamma=0.0, min_snr_plus_one=False, lr=1e-3, warmup=20, grad_clip=0.01,
              route_ratio=0.0, lr_decay=0.0)
# The other levers are measured over the stage-2 recipe without routing (on the network without a pixel
# decoder), each alone; each arm names its network, routing and learning-rate schedule, so it stays the recipe it
# was when the default moves.
_ALONE = dict(model="PixArt-pixel-32", route_ratio=0.0, lr_decay=0.0)
_ROUTE_05 = dict(_ALONE, route_ratio=0.5, route_start=1, route_end=0)  # the default before the pixel decoder
# The default before the routing moved to blocks 1-3 with the learning rate down over the second half: 90 % of the
# tokens past blocks 0-2 on the network with a pixel decoder, the learning rate held.
_ROUTE_09_PD = dict(model="PixArt-pixel-32-pd", route_ratio=0.9, route_start=0, route_end=0, lr_decay=0.0)
# The truth after the first block, with routing past blocks 1-3 so that block 0 runs every token.
_TRUTH_FIRST = dict(_ROUTE_09_PD, route_start=1, route_end=4, repa_depth=1, repa_truth=True, repa_projector_dim=64)
# The autoguided arms' sampler, picked among 13 settings on one checkpoint (docs/time-to-quality-log.md).
AUTOGUIDED_CFG = 2.5
ARMS = (
    Arm("paper", "the paper's recipe: eps + learned sigma + VLB, uniform t, clip 0.01, from a one-object stage 1",
        stage2=dict(_PAPER, model="PixArt-pixel-32"), stage1=dict(prediction="eps", min_snr_gamma=0.0, grad_clip=0.01)),
    Arm("no-route", "the stage-2 recipe from scratch without token routing (v, min-SNR 5, lr 2e-3)", stage2=_ALONE),
    Arm("default", "the stage-2 recipe as it ships: route-0.9-pd with the routing moved to blocks 1-3 (block 0 runs "
        "every token) and the learning rate down to 0 over the second half of the steps"),
    Arm("route-0.9-pd", "the default before that: nine tenths of the tokens routed past blocks 0-2 on "
        "PixArt-pixel-32-pd, the network with a pixel decoder, the learning rate held", stage2=_ROUTE_09_PD),
    Arm("route-0.5", "no-route with half the tokens routed past blocks 1-2 (TREAD)", stage2=_ROUTE_05),
    Arm("route-0.75", "no-route with three quarters of the tokens routed past blocks 1-2",
        stage2=dict(_ROUTE_05, route_ratio=0.75)),
    Arm("route-0.9", "no-route with nine tenths of the tokens routed past blocks 0-2 (only the last block sees all)",
        stage2=dict(_ALONE, route_ratio=0.9, route_start=0, route_end=0)),
    Arm("route-early", "a routing schedule: route-0.9's routing for the first third of the steps, then route-0.5's",
        stage2=dict(_ROUTE_05, early_route_ratio=0.9, early_route_start=0), early_route_fraction=1 / 3),
    Arm("pixel-decoder", "route-0.5 on PixArt-pixel-32-pd: a 16-channel conv decoder in pixel space after the "
        "final layer (DeCo-style)", stage2=dict(_ROUTE_05, model="PixArt-pixel-32-pd")),
    Arm("perturb", "route-0.5 with input perturbation 0.1 (the noisy input from noise + 0.1 x a second draw)",
        stage2=dict(_ROUTE_05, input_perturbation=0.1)),
    Arm("stage1", "no-route's stage 2 from a stage 1 on stage-2 scenes (sizes, counts, distractors)",
        stage2=_ALONE, stage1=dict(stage1_scenes=True)),
    Arm("flow", "rectified flow, logit-normal timesteps (SD3)",
        stage2=dict(_ALONE, prediction="flow", timestep_sampling="logit-normal", min_snr_gamma=0.0)),
    Arm("mask", "token masking 0.5, the last 1/8 of the steps unmasked", stage2=dict(_ALONE, mask_ratio=0.5),
        unmasked_fraction=0.125),
    Arm("self-align", "self-representation alignment: block 2's states toward the EMA model's block 4, weight 0.5",
        stage2=dict(_ALONE, repa_depth=2, repa_target_depth=4)),
    Arm("repa", "REPA against the embedded data's encoder (pixart_fast.train.encoder, trained first and counted): "
        "route-0.9-pd's routing moved to blocks 1-2, the states after the first block toward the encoder's patch "
        "features, weight 0.5",
        stage2=dict(_ROUTE_09_PD, route_start=1, repa_depth=1), encoder=True),
    Arm("repa-truth", "repa with the renderer's per-pixel truth as the target (one-hot shape, size and colour of "
        "each pixel): no encoder to train or run",
        stage2=dict(_ROUTE_09_PD, route_start=1, repa_depth=1, repa_truth=True)),
    Arm("repa-truth-last", "route-0.9-pd with the renderer's truth as the target of the states after the last "
        "block, the one every token runs (a projector 64 wide): route-0.9-pd's step and a projector",
        stage2=dict(_ROUTE_09_PD, repa_depth=4, repa_truth=True, repa_projector_dim=64)),
    Arm("repa-truth-both", "the truth as the target of the states after the first block and after the last (a "
        "projector 64 wide each): repa-truth's routing, blocks 1-2, so that both blocks run every token",
        stage2=dict(_ROUTE_09_PD, route_start=1, repa_depth=4, repa_second_depth=1, repa_truth=True,
                    repa_projector_dim=64)),
    Arm("repa-truth-first", "the truth as the target of the states after the first block, with the routing moved to "
        "blocks 1-3 so that the first is the one block every token runs (a projector 64 wide): repa-truth-last's step",
        stage2=_TRUTH_FIRST),
    Arm("default-autoguided", "default, sampled with guidance 2.5 and autoguidance by its first evaluated "
        "checkpoint", autoguided=True),
    Arm("repa-truth-first-autoguided", "repa-truth-first, sampled as default-autoguided",
        stage2=_TRUTH_FIRST, autoguided=True),
    Arm("v-unweighted", "v-prediction without min-SNR weighting (more weight on the low-noise steps)",
        stage2=dict(_ALONE, min_snr_gamma=0.0, min_snr_plus_one=False)),
    Arm("p2-mask", "patch 2 (256 tokens) with token masking 0.75, the last 1/8 of the steps unmasked",
        stage2=dict(_ALONE, model="PixArt-pixel-32-p2", mask_ratio=0.75), unmasked_fraction=0.125),
)
ARM_NAMES = tuple(a.name for a in ARMS)


def stage2_config(arm: Arm, seed: int, steps: int, eval_every: int, num_val: int, settings: dict,
                  encoder: str | None = None) -> TrainConfig:
    extra = dict(arm.stage2, repa_encoder=encoder) if encoder else dict(arm.stage2)
    if arm.unmasked_fraction:
        extra["unmasked_steps"] = round(arm.unmasked_fraction * steps)
    if arm.early_route_fraction:
        extra["early_route_steps"] = round(arm.early_route_fraction * steps)
    if arm.autoguided:
        extra.update(cfg_scale=AUTOGUIDED_CFG, guide_step=eval_every)
    return replace(RECIPES[2], seed=seed, steps=steps, sample_every=eval_every, num_val=num_val, save_every=eval_every,
                   log_every=math.gcd(RECIPES[2].log_every, eval_every, steps), **{**extra, **settings})


def stage1_config(arm: Arm, seed: int, steps: int, settings: dict) -> TrainConfig:
    return replace(RECIPES[1], seed=seed, steps=steps, save_every=10**9, sample_every=10**9, num_val=8,
                   log_every=math.gcd(RECIPES[1].log_every, steps), **{**arm.stage1, **settings})


def image_flops(cfg: TrainConfig, step: int) -> int:
    """Training FLOPs of one image at step `step` (0-based) of a run of `cfg` (pixel space, its caption length):
    masked or not, routed as TrainConfig.routing says."""
    model = CONFIGS[cfg.model]
    levers = {}
    if cfg.mask_ratio and step < cfg.steps - cfg.unmasked_steps:
        levers["mask_ratio"] = cfg.mask_ratio
    routing = cfg.routing(step, model.depth)
    if routing:
        levers.update(route_ratio=routing[0], route_blocks=routing[1])
    if cfg.aligns(step):
        encoder = None
        if cfg.repa_encoder:
            from transformers import AutoConfig

            encoder = AutoConfig.from_pretrained(cfg.repa_encoder, local_files_only=True)
        levers.update(repa_depth=cfg.repa_depth, repa_second_depth=cfg.repa_second_depth,
                      repa_target_depth=cfg.repa_target_depth,
                      repa_projector_dim=cfg.repa_projector_dim, repa_encoder=encoder, repa_truth=cfg.repa_truth)
    if cfg.disperse_depth:  # the ablation trains in one process: the loss's batch is the whole batch
        levers.update(disperse_depth=cfg.disperse_depth, batch_size=cfg.batch_size)
    return flops_per_image(model, vae_downsample=1, class_conditional=cfg.stage == 1, **levers)


def step_flops(cfg: TrainConfig, step: int) -> int:
    """Training FLOPs of steps 1..step of a run of `cfg`: its phases (the early routing, the unmasked finish, the
    alignment's end) each costed at their own steps' FLOPs."""
    phases = (cfg.early_route_steps, cfg.steps - cfg.unmasked_steps, cfg.repa_steps)
    bounds = sorted({0, step, *(b for b in phases if 0 < b < step)})
    return cfg.batch_size * sum((b - a) * image_flops(cfg, a) for a, b in zip(bounds, bounds[1:]))


def read_run(run_dir: Path, batch_size: int) -> tuple[dict[int, dict], dict[int, float]]:
    """({step: the EMA model's scores}, {logged step: seconds of training up to it}) from metrics.jsonl. Seconds
    add up each logged interval's images over its images/s, so validation time is left out."""
    scores, seconds, elapsed, last = {}, {}, 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val" in record:
            scores[record["step"]] = record["val"]
        elif record.get("img_per_s"):
            elapsed += (record["step"] - last) * batch_size / record["img_per_s"]
            last = record["step"]
            seconds[last] = elapsed
    return scores, seconds


def seconds_at(seconds: dict[int, float], step: int) -> float:
    """Training seconds up to `step`: the nearest logged step at or after it."""
    return seconds[min((s for s in seconds if s >= step), default=max(seconds))]


def _same_budget(run_dir: Path, steps: int) -> None:
    """A run already under `run_dir` must have the budget asked for: resuming a finished run with more steps would
    train it on, and with fewer would refuse."""
    summary = run_dir / "summary.json"
    if summary.exists() and (done := json.loads(summary.read_text()).get("steps")) != steps:
        raise UserError(f"{run_dir} holds a run of {done} steps, not {steps}: pass the same step counts as the "
                        "ablation in that folder, or another --out")


def run_arm(arm: Arm, seed: int, out: Path, steps: int, stage1_steps: int, eval_every: int, num_val: int,
            progress: bool, settings: dict) -> dict:
    """Train one arm x seed (stage 1 or the alignment encoder first when the arm has one) and return its evaluated
    steps with their scores, stage-2 FLOPs and seconds, and the cost of what came first (under "stage1")."""
    folder = out / arm.name / f"seed{seed}"
    stage1, encoder = {"flops": 0, "seconds": 0.0}, None
    if arm.encoder:
        encoder = folder / "encoder"
        if not (encoder / "encoder.json").exists():  # the folder appears whole, so this is a finished one
            train_encoder(EncoderConfig(out=str(encoder), seed=seed), progress=progress)
        done = json.loads((encoder / "encoder.json").read_text())
        stage1 = {"flops": done["train_flops"], "seconds": done["train_seconds"]}
    if arm.stage1 is not None:
        cfg1 = stage1_config(arm, seed, stage1_steps, settings)
        _same_budget(folder / "stage1", cfg1.steps)
        train(replace(cfg1, out=str(folder), resume="latest"), progress=progress)
        _, sec1 = read_run(folder / "stage1", cfg1.batch_size)
        stage1 = {"flops": step_flops(cfg1, cfg1.steps), "seconds": seconds_at(sec1, cfg1.steps)}
    cfg2 = stage2_config(arm, seed, steps, eval_every, num_val, settings, encoder and str(encoder))
    _same_budget(folder / "stage2", cfg2.steps)
    train(replace(cfg2, out=str(folder), resume="latest"), progress=progress)
    scores, seconds = read_run(folder / "stage2", cfg2.batch_size)
    evaluated = [{"step": s, "flops": step_flops(cfg2, s), "seconds": seconds_at(seconds, s), "scores": scores[s]}
                 for s in sorted(scores)]
    return {"stage1": stage1, "evaluated": evaluated}


def first_reaching(run: dict, metric: str, value: float, with_stage1: bool) -> dict | None:
    """The cost ({"flops", "seconds", "step"}) of the first evaluated step scoring `metric` >= value; None: never."""
    for e in run["evaluated"]:
        if e["scores"].get(metric, 0.0) >= value:
            extra = run["stage1"] if with_stage1 else {"flops": 0, "seconds": 0.0}
            return {"step": e["step"], "flops": e["flops"] + extra["flops"], "seconds": e["seconds"] + extra["seconds"]}
    return None


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}


def thresholds(runs: dict, fixed: list[tuple[str, float]], metric: str) -> list[dict]:
    """The quality bars: the fixed ones, and each baseline arm's final mean `metric` (when it ran)."""
    bars = [{"metric": m, "value": v, "label": f"{m} >= {v:g}"} for m, v in fixed]
    for name in BASELINES:
        if name in runs:
            final = statistics.fmean(r["evaluated"][-1]["scores"][metric] for r in runs[name].values())
            bars.append({"metric": metric, "value": final, "label": f"{metric} >= {final:.2f} ({name}'s final)"})
    return bars


def summarise(runs: dict, bars: list[dict]) -> dict:
    """Per arm: each bar's cost to reach it over seeds (stage 1 counted and not), and the final scores' spread."""
    table = {}
    for name, seeds in runs.items():
        has_stage1 = any(r["stage1"]["flops"] for r in seeds.values())
        arm = {"seeds": len(seeds), "bars": [], "final": {}}
        for bar in bars:
            entry = {"label": bar["label"]}
            for counted in (True, False) if has_stage1 else (True,):
                reached = [first_reaching(r, bar["metric"], bar["value"], counted) for r in seeds.values()]
                got = [c for c in reached if c is not None]
                key = "with_stage1" if counted and has_stage1 else "stage2"
                entry[key] = {"reached": len(got), "flops": _spread([c["flops"] for c in got]) if got else None,
                              "seconds": _spread([c["seconds"] for c in got]) if got else None}
            arm["bars"].append(entry)
        last = [r["evaluated"][-1] for r in seeds.values()]
        arm["final"] = {k: _spread([e["scores"][k] for e in last]) for k in last[0]["scores"]
                        if k not in ("objects", "words")}
        arm["final"]["flops"] = _spread([e["flops"] + r["stage1"]["flops"] for e, r in zip(last, seeds.values())])
        table[name] = arm
    return table


def _cost(entry: dict | None, seeds: int, what: str, fmt: str) -> str:
    if entry is None or entry[what] is None:
        return f"not reached (0/{seeds})"
    s = entry[what]
    tail = "" if entry["reached"] == seeds else f", {entry['reached']}/{seeds} seeds"
    return f"{s['mean']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}}{tail})"


def _ratio(table: dict, base: str, label: str, entry: dict | None) -> str:
    """How many times less compute than `base` to the same bar (means; only when both reached it in every seed)."""
    if base not in table or entry is None or entry["flops"] is None:
        return "-"
    ref = next(b for b in table[base]["bars"] if b["label"] == label)
    ref = ref.get("with_stage1", ref.get("stage2"))
    if ref["flops"] is None:
        return "base never reached it"
    return f"{ref['flops']['mean'] / entry['flops']['mean']:.2f}x"


def markdown(table: dict, arms: dict[str, Arm]) -> str:
    lines = ["| arm | bar | FLOPs to reach (mean, min-max) | seconds to reach | "
             + " | ".join(f"vs {b}" for b in BASELINES) + " |",
             "| --- " * (4 + len(BASELINES)) + "|"]
    for name, arm in table.items():
        for bar in arm["bars"]:
            for key in ("with_stage1", "stage2"):
                if key not in bar:
                    continue
                e, n = bar[key], arm["seeds"]
                first = "the encoder" if arms[name].encoder else "stage 1"
                tag = name + (f" ({first} counted)" if key == "with_stage1" else
                              f" ({first} not counted)" if "with_stage1" in bar else "")
                lines.append(f"| {tag} | {bar['label']} | {_cost(e, n, 'flops', '.2e')} | {_cost(e, n, 'seconds', '.0f')} "
                             + "".join(f"| {_ratio(table, b, bar['label'], e)} " for b in BASELINES) + "|")
    lines += ["", "Final scores (mean and min-max over seeds; chance level beside each):", "",
              "| arm | recipe | training FLOPs | " + " | ".join(METRICS) + " | background |",
              "| --- | --- | --- | " + " | ".join("---" for _ in METRICS) + " | --- |"]
    for name, arm in table.items():
        f = arm["final"]
        cells = [f"{f[m]['mean']:.2f} ({f[m]['min']:.2f}-{f[m]['max']:.2f}) / {f[m + '_chance']['mean']:.2f}"
                 for m in METRICS]
        lines.append(f"| {name} | {arms[name].about} | {f['flops']['mean']:.2e} | " + " | ".join(cells)
                     + f" | {f['background']['mean']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, path: Path, metrics=("colour", "position", "shape", "accuracy")) -> None:
    """Score against training FLOPs (stage 1 counted), one panel per metric: each arm's mean and min-max band."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), sharey=True)
    for ax, metric in zip(axes, metrics):
        for name, seeds in runs.items():
            rows = [[(e["flops"] + r["stage1"]["flops"], e["scores"][metric]) for e in r["evaluated"]]
                    for r in seeds.values()]
            n = min(map(len, rows))
            x = [statistics.fmean(row[i][0] for row in rows) for i in range(n)]
            y = [[row[i][1] for row in rows] for i in range(n)]
            ax.plot(x, [statistics.fmean(v) for v in y], marker="o", label=name)
            ax.fill_between(x, [min(v) for v in y], [max(v) for v in y], alpha=0.15)
        ax.set_title(metric)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decade labels only: they do not overlap
        ax.set_xlabel("training FLOPs")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("EMA score, held-out captions")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablate(out, arms: tuple[str, ...] = ARM_NAMES, seeds: int = 3, steps: int | None = None,
           stage1_steps: int | None = None, eval_every: int = 200, num_val: int = RECIPES[2].num_val,
           fixed: tuple[tuple[str, float], ...] = (("position", 0.5), ("position", 0.8)), metric: str = "position",
           progress: bool = True, **settings) -> dict:
    """Run the ablation (see the module docstring), write its three files under `out`, return the summary.
    settings: other TrainConfig fields for every run (a smaller model for a quick look, say)."""
    unknown = [a for a in arms if a not in ARM_NAMES]
    if unknown:
        raise UserError(f"--arms {','.join(unknown)}: unknown arm; choose from {','.join(ARM_NAMES)}")
    out, chosen = Path(out), {name: next(a for a in ARMS if a.name == name) for name in dict.fromkeys(arms)}
    steps, stage1_steps = steps or RECIPES[2].steps, stage1_steps or RECIPES[1].steps
    runs = {name: {} for name in chosen}
    for seed in range(seeds):
        for name, arm in chosen.items():
            runs[name][seed] = run_arm(arm, seed, out, steps, stage1_steps, eval_every, num_val, progress, settings)
            (out / "ablation.json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")  # results as they land
    bars = thresholds(runs, list(fixed), metric)
    table = summarise(runs, bars)
    (out / "ablation.json").write_text(json.dumps({"runs": runs, "bars": bars, "summary": table}, indent=1) + "\n")
    (out / "ablation.md").write_text(markdown(table, chosen))
    plot(runs, out / "ablation.png")
    return table


def _bar(text: str) -> tuple[str, float]:
    metric, _, value = text.partition("=")
    if metric not in METRICS or not value:
        raise UserError(f"--bars {text}: expected METRIC=VALUE with METRIC one of {', '.join(METRICS)}")
    return metric, float(value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pixart_fast.train.ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARM_NAMES),
                   help="comma-separated arms: " + "; ".join(f"{a.name}: {a.about}" for a in ARMS))
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of every arm (default: 3)")
    p.add_argument("--steps", type=int, default=None, help="stage-2 steps of every arm (default: the recipe's)")
    p.add_argument("--stage1-steps", type=int, default=None, help="stage-1 steps of arms that start from one "
                                                                  "(default: the recipe's)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between scorings of the EMA model (default: 200)")
    p.add_argument("--num-val", type=int, default=RECIPES[2].num_val,
                   help=f"held-out captions scored each time (default: {RECIPES[2].num_val})")
    p.add_argument("--bars", default="position=0.5,position=0.8",
                   help="fixed quality bars METRIC=VALUE, comma-separated; the baselines' final position scores are "
                        "added (default: position=0.5,position=0.8)")
    p.add_argument("--out", default="runs/ablate", help="output folder (default: runs/ablate)")
    a = p.parse_args(argv)
    for flag, value in (("--seeds", a.seeds), ("--eval-every", a.eval_every)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    ablate(a.out, tuple(a.arms.split(",")), a.seeds, a.steps, a.stage1_steps, a.eval_every, a.num_val,
           tuple(_bar(b) for b in a.bars.split(",")))
    out = Path(a.out)
    print((out / "ablation.md").read_text())
    print(f"wrote {out / 'ablation.json'}, {out / 'ablation.md'}, {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
