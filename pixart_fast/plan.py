"""The cost planner: what a training schedule costs on a GPU (GPU-days, energy, CO2, dollars), and its command line.

    python -m pixart_fast.plan                                  # the paper's Table 4 on A100 80GB, floor only
    python -m pixart_fast.plan --gpu H100 --mfu 0.35 --usd-per-gpu-hour 2.5
    python -m pixart_fast.plan --mfu-from bench.json --json     # MFU measured by `pytest bench/ --benchmark-json`
    python -m pixart_fast.plan --schedule my_schedule.json --png plan.png
    python -m pixart_fast.plan --memory --model PixArt-XL/2-512 --gpu 4090   # training memory, largest batch

Training FLOPs are counted by pixart_fast/flops.py (matrix products only, 3 x forward per training image), the
memory of a training step by pixart_fast/memory.py; the GPUs' peaks come from pixart_fast/gpus.py.

A schedule stage's images are counted at the stage's own resolution ("exact"). The planner also shows every
image counted at the 256-px cost ("256-px equivalent"): the cheaper convention, which undercounts the 512-px and
1024-px stages (4.1x and 21.8x the 256-px cost per image: more tokens, and self-attention grows with their square).
"""
import argparse
import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from pixart_fast.cli import run
from pixart_fast.flops import flops_per_image
from pixart_fast.gpus import GPU, GPUS, gpu_names, resolve_gpu
from pixart_fast.lora import DEFAULT_TARGETS
from pixart_fast.memory import LORA_RANK, OPTIMIZERS, memory_plan
from pixart_fast.model import CONFIGS, RECOMPUTE
from pixart_fast.tables import fmt, text_table

SECONDS_PER_DAY = 86_400
# Defaults for energy and emissions, each overridable on the command line.
PUE = 1.10  # Google data centers, fleet-wide trailing-twelve-month PUE 1.10 (2023 Environmental Report)
KG_CO2_PER_KWH = 0.48  # world average electricity, 480 g CO2/kWh in 2023 (Ember, Global Electricity Review 2024)


# ----------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage of a training schedule: `steps` optimizer steps of `global_batch` square images."""

    name: str
    resolution: int  # image side, px
    steps: int
    global_batch: int  # images per optimizer step, all GPUs together
    config: str = "PixArt-XL/2-256"  # a pixart_fast.model.CONFIGS name: the architecture; the size is `resolution`
    class_conditional: bool = False  # the stage-1 DiT (labels, no captions)
    paper_v100_days: float | None = None  # what the paper reports for this stage

    @property
    def images(self) -> int:
        return self.steps * self.global_batch


# The paper's Table 4 (docs/ARCHITECTURE.md section 2).
PAPER_SCHEDULE = (
    Stage("1 pixel dependency", 256, 300_000, 1024, class_conditional=True, paper_v100_days=88),
    Stage("2 text-image alignment", 256, 150_000, 11392, paper_v100_days=672),
    Stage("3 aesthetics", 256, 90_000, 11392, paper_v100_days=416),
    Stage("3 aesthetics", 512, 100_000, 2560, config="PixArt-XL/2-512", paper_v100_days=320),
    Stage("3 aesthetics, multi-aspect", 1024, 16_000, 384, config="PixArtMS-XL/2-1024", paper_v100_days=160),
)
PAPER_V100_PER_A100 = 2.2  # the paper's conversion: 1656 V100-days = 753 A100-days
PAPER_A100_DAYS_LATER = 675  # later versions of the paper: 675 A100-days, $26,000


def load_schedule(path) -> tuple[Stage, ...]:
    """A schedule from a JSON file: a list of stages, each {"name", "resolution" (px), "steps", "global_batch"}
    and optionally "config" (a CONFIGS name), "class_conditional" (bool), "paper_v100_days"."""
    text = Path(path).read_text()
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"schedule {path} is not valid JSON: {e}") from e
    if not isinstance(items, list) or not items:
        raise ValueError(f"schedule {path} must be a non-empty JSON list of stages, got {type(items).__name__}")
    allowed = {f.name for f in fields(Stage)}
    stages = []
    for i, item in enumerate(items):
        unknown = set(item) - allowed
        missing = {"name", "resolution", "steps", "global_batch"} - set(item)
        if unknown or missing:
            raise ValueError(f"schedule {path}, stage {i}: unknown keys {sorted(unknown)}, missing keys "
                             f"{sorted(missing)}; allowed: {sorted(allowed)}")
        stage = Stage(**item)
        if stage.config not in CONFIGS:
            raise ValueError(f"schedule {path}, stage {i}: config {stage.config!r} is not one of {sorted(CONFIGS)}")
        if stage.steps <= 0 or stage.global_batch <= 0:
            raise ValueError(f"schedule {path}, stage {i}: steps and global_batch must be positive, "
                             f"got {stage.steps} and {stage.global_batch}")
        stages.append(stage)
    return tuple(stages)


def stage_flops_per_image(stage: Stage, resolution: int | None = None) -> int:
    """Training FLOPs of one image of `stage`, at its own resolution or at `resolution` px."""
    res = stage.resolution if resolution is None else resolution
    return flops_per_image(CONFIGS[stage.config], res, res, class_conditional=stage.class_conditional)


# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------


def gpu_days(flop: float, gpu: GPU, mfu: float = 1.0) -> float:
    """Days of one GPU to do `flop` model FLOPs at model-FLOP utilisation `mfu` of its dense peak."""
    return flop / (gpu.tflops * 1e12 * mfu) / SECONDS_PER_DAY


def mfu_from_bench(path) -> tuple[str, dict[int, float]]:
    """(GPU key, {resolution px: MFU}) from a pytest-benchmark JSON of `pytest bench/`: the best measured MFU
    of our model's training step at each resolution. Estimates are never used."""
    data = json.loads(Path(path).read_text())
    rows = [b["extra_info"] for b in data.get("benchmarks", [])
            if b.get("extra_info", {}).get("kind") == "train_step" and b["extra_info"].get("model") == "ours"
            and not b["extra_info"].get("estimate") and b["extra_info"].get("mfu")]
    if not rows:
        raise ValueError(f"{path} holds no measured GPU training-step MFU (was it run without a GPU, or on a GPU "
                         f"missing from the table {sorted(GPUS)}?); pass --mfu instead")
    gpus = {r["gpu"] for r in rows}
    if len(gpus) != 1:
        raise ValueError(f"{path} mixes GPUs {sorted(gpus)}; pass --mfu instead")
    best = {}
    for r in rows:
        best[r["resolution"]] = max(best.get(r["resolution"], 0.0), r["mfu"])
    return gpus.pop(), best


def ratio_from_ablation(path, arm: str, baseline: str = "paper", bar: str | None = None) -> dict:
    """The compute ratio an ablation measured (`python -m pixart_fast.train.ablate`'s ablation.json): how many
    times less training compute `arm` took than `baseline` to reach the baseline's own final quality (the bar
    "... (<baseline>'s final)"; `bar`: another bar's label, as ablation.md writes it), stage 1 counted where an arm
    has one. Returns {"ratio": the ratio of the means over seeds, "low": the lower end of the spread (the baseline's
    cheapest seed over the arm's dearest), "source": a line saying where it came from}. Every seed of both arms must
    have reached the bar."""
    data = json.loads(Path(path).read_text())
    summary = data.get("summary")
    if not summary:
        raise ValueError(f"{path}: no summary (an ablation still running, or not an ablation.json)")
    for name in (arm, baseline):
        if name not in summary:
            raise ValueError(f"{path}: no arm {name!r}; it has {sorted(summary)}")

    def flops(name):
        found = next((b for b in summary[name]["bars"]
                      if (b["label"] == bar if bar else b["label"].endswith(f"({baseline}'s final)"))), None)
        if found is None:
            labels = [b["label"] for b in summary[name]["bars"]]
            raise ValueError(f"{path}: arm {name!r} has no bar {bar or baseline + ' final'}; its bars: {labels}")
        entry = found.get("with_stage1", found.get("stage2"))
        if entry["reached"] != summary[name]["seeds"]:
            raise ValueError(f"{path}: arm {name!r} reached {found['label']} in {entry['reached']} of "
                             f"{summary[name]['seeds']} seeds; no ratio to scale by")
        return found["label"], entry["flops"]

    label, base = flops(baseline)
    _, ours = flops(arm)
    return {"ratio": base["mean"] / ours["mean"], "low": base["min"] / ours["max"],
            "source": f"{path}: arm {arm!r} against {baseline!r} to {label}, {summary[arm]['seeds']} seeds"}


def plan(schedule=PAPER_SCHEDULE, gpu: str = "A100-80GB", mfu: float | dict | None = None,
         usd_per_gpu_hour: float | None = None, kg_co2_per_kwh: float = KG_CO2_PER_KWH, pue: float = PUE,
         watts: float | None = None, ratio: dict | None = None) -> dict:
    """Cost of a schedule on one kind of GPU.

    gpu: a GPUS key or another name `resolve_gpu` accepts ("a100", "h100", a key in any case). mfu: model-FLOP
    utilisation in (0, 1], one number or {resolution px: mfu} for every stage's resolution; None gives only the
    100 %-MFU floor. Energy: GPU-hours x watts (default the GPU's TDP, an upper bound for the GPU board; host,
    network and storage are not counted) x PUE; CO2 = energy x kg_co2_per_kwh. Returns a JSON-serialisable dict:
    "stages" (one row each), "total", "paper", "settings", and with `ratio` (`ratio_from_ablation`'s) "scaled":
    the schedule's FLOPs and days divided by the measured ratio and by its low end, an estimate that assumes the
    miniature's ratio carries over to the schedule's model.
    """
    gpu = resolve_gpu(gpu)
    g = GPUS[gpu]
    for name, value in (("pue", pue), ("kg_co2_per_kwh", kg_co2_per_kwh), ("watts", watts),
                        ("usd_per_gpu_hour", usd_per_gpu_hour)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
    watts = g.tdp_w if watts is None else watts
    rows = []
    for stage in schedule:
        flop = stage.images * stage_flops_per_image(stage)
        flop_256 = stage.images * stage_flops_per_image(stage, 256)
        row = {**asdict(stage), "images": stage.images,
               "tflop_per_image": stage_flops_per_image(stage) / 1e12,
               "tflop_per_image_256": stage_flops_per_image(stage, 256) / 1e12,
               "flop": flop, "flop_256": flop_256,
               "floor_gpu_days": gpu_days(flop, g), "floor_gpu_days_256": gpu_days(flop_256, g)}
        stage_mfu = mfu.get(stage.resolution) if isinstance(mfu, dict) else mfu
        if isinstance(mfu, dict) and stage_mfu is None:
            raise ValueError(f"no MFU for {stage.resolution} px (stage {stage.name!r}); have {sorted(mfu)}")
        if stage_mfu is not None:
            if not 0 < stage_mfu <= 1:
                raise ValueError(f"MFU must be in (0, 1], got {stage_mfu} for stage {stage.name!r}")
            days = gpu_days(flop, g, stage_mfu)
            kwh = days * 24 * watts / 1000 * pue
            row.update(mfu=stage_mfu, gpu_days=days, kwh=kwh, kg_co2=kwh * kg_co2_per_kwh,
                       usd=None if usd_per_gpu_hour is None else days * 24 * usd_per_gpu_hour)
        rows.append(row)

    def total(key):
        values = [r.get(key) for r in rows]
        return None if any(v is None for v in values) else sum(values)

    totals = {k: total(k) for k in ("images", "flop", "flop_256", "floor_gpu_days", "floor_gpu_days_256",
                                    "gpu_days", "kwh", "kg_co2", "usd")}
    v100_days = total("paper_v100_days")
    paper = None
    if v100_days is not None:  # the MFU the paper's A100-days imply: the exact 100 %-MFU floor / the days
        a100_floor = gpu_days(totals["flop"], GPUS["A100-80GB"])
        paper = {"v100_days": v100_days, "a100_days": v100_days / PAPER_V100_PER_A100,
                 "a100_days_later": PAPER_A100_DAYS_LATER,
                 "implied_a100_mfu": a100_floor / (v100_days / PAPER_V100_PER_A100),
                 "implied_a100_mfu_later": a100_floor / PAPER_A100_DAYS_LATER}
    settings = {"gpu": gpu, **asdict(g), "watts": watts, "mfu": mfu, "usd_per_gpu_hour": usd_per_gpu_hour,
                "kg_co2_per_kwh": kg_co2_per_kwh, "pue": pue}
    scaled = None
    if ratio is not None:
        scaled = {**ratio, **{f"{k}{tail}": None if totals[k] is None else totals[k] / r
                              for k in ("flop", "floor_gpu_days", "gpu_days")
                              for tail, r in (("", ratio["ratio"]), ("_low", ratio["low"]))}}
    return {"stages": rows, "total": totals, "paper": paper, "settings": settings, "scaled": scaled}


# ----------------------------------------------------------------------------------------------------------
# Output: text table, PNG bar chart
# ----------------------------------------------------------------------------------------------------------


def bars(result: dict) -> list[tuple[str, float]]:
    """The comparison the planner draws: (label with unit, GPU-days)."""
    gpu, out = result["settings"]["gpu"], []
    if result["paper"]:
        p = result["paper"]
        out += [(f"paper: {p['v100_days']:.0f} V100-days / 2.2 (A100-days)", p["a100_days"]),
                ("paper, later versions (A100-days)", p["a100_days_later"])]
    out += [(f"floor, 100% MFU, exact resolution ({gpu}-days)", result["total"]["floor_gpu_days"]),
            (f"floor, 100% MFU, 256-px equivalent ({gpu}-days)", result["total"]["floor_gpu_days_256"])]
    if result["total"]["gpu_days"] is not None:
        mfu = result["settings"]["mfu"]
        which = f"{mfu:.0%} MFU" if isinstance(mfu, float) else "the measured MFU"
        out.append((f"plan at {which} ({gpu}-days)", result["total"]["gpu_days"]))
    scaled = result.get("scaled")
    if scaled:
        days, what = ((scaled["gpu_days"], "plan") if scaled["gpu_days"] is not None else
                      (scaled["floor_gpu_days"], "floor"))
        out.append((f"estimate: {what} / {scaled['ratio']:.1f} measured ({gpu}-days)", days))
    return out


def format_plan(result: dict) -> str:
    """The plan as text: the per-stage table, the totals, the comparison and what the conventions mean."""
    s, rows, tot = result["settings"], result["stages"], result["total"]
    gpu = s["gpu"]
    header = ("stage", "px", "steps", "batch", "images", "TFLOP/img", "@256px", "EFLOP", "floor days", "@256px",
              "MFU", "days", "kWh", "t CO2", "USD", "paper V100-days")
    lines = [(r["name"], str(r["resolution"]), f"{r['steps']:,}", f"{r['global_batch']:,}", f"{r['images']:.3g}",
              f"{r['tflop_per_image']:.3f}", f"{r['tflop_per_image_256']:.3f}", f"{r['flop'] / 1e18:.1f}",
              f"{r['floor_gpu_days']:.1f}", f"{r['floor_gpu_days_256']:.1f}", fmt(r.get("mfu"), ".1%"),
              fmt(r.get("gpu_days"), ".1f"), fmt(r.get("kwh"), ",.0f"),
              fmt(None if r.get("kg_co2") is None else r["kg_co2"] / 1000, ".2f"), fmt(r.get("usd"), ",.0f"),
              fmt(r["paper_v100_days"], ".0f")) for r in rows]
    v100 = None if result["paper"] is None else result["paper"]["v100_days"]
    lines.append(("total", "", "", "", f"{tot['images']:.3g}", "", "", f"{tot['flop'] / 1e18:.1f}",
                  f"{tot['floor_gpu_days']:.1f}", f"{tot['floor_gpu_days_256']:.1f}", "",
                  fmt(tot["gpu_days"], ".1f"), fmt(tot["kwh"], ",.0f"),
                  fmt(None if tot["kg_co2"] is None else tot["kg_co2"] / 1000, ".2f"), fmt(tot["usd"], ",.0f"),
                  fmt(v100, ".0f")))
    out = [f"GPU: {s['name']} ({gpu}), {s['tflops']:g} dense bf16 TFLOP/s, {s['bandwidth_gbs']:g} GB/s, "
           f"{s['watts']:g} W; PUE {s['pue']:g}, {s['kg_co2_per_kwh']:g} kg CO2/kWh, "
           f"{fmt(s['usd_per_gpu_hour'], 'g')} USD per GPU-hour. Days: {gpu}-days.", "",
           text_table(header, lines), ""]
    out += [f"{label:<58} {days:10.1f}" for label, days in bars(result)]
    if result["paper"]:
        p = result["paper"]
        out.append(f"\nThe paper's figures imply an A100 MFU of {p['implied_a100_mfu']:.1%} ({p['a100_days']:.0f} "
                   f"A100-days) and {p['implied_a100_mfu_later']:.1%} ({p['a100_days_later']} A100-days).")
    if tot["gpu_days"] is None:
        out.append("Pass --mfu (or --mfu-from a bench JSON) for the plan's GPU-days, energy, CO2 and cost.")
    scaled = result.get("scaled")
    if scaled:
        days = "gpu_days" if scaled["gpu_days"] is not None else "floor_gpu_days"
        out.append(f"\nESTIMATE, scaled by a ratio measured in miniature ({scaled['source']}): "
                   f"{scaled['ratio']:.2f}x less compute (lower end of the seeds' spread {scaled['low']:.2f}x) gives "
                   f"{scaled['flop'] / 1e18:.1f} EFLOP and {scaled[days]:.1f} {gpu}-days "
                   f"({'at the MFU above' if days == 'gpu_days' else 'floor, 100% MFU'}; "
                   f"{scaled[days + '_low']:.1f} at the lower end). It assumes the ratio carries over from the "
                   "embedded 32-px task to this schedule's model and data; nothing at that scale has measured it.")
    out.append(
        "\nTFLOP/img: training FLOPs of one image (3 x forward; matrix products only, 2mkn each) at the stage's "
        "resolution.\n@256px: the same images counted at the 256-px cost (the '256-px equivalent'). The exact "
        f"count is larger:\na 512-px image costs {_ratio(rows, 512)} and a 1024-px image {_ratio(rows, 1024)} "
        "a 256-px one (4x and 16x the tokens; self-attention grows\nwith their square). Energy: GPU-hours x "
        "power x PUE (host, network and storage not counted). T5 and VAE encoding not counted.")
    dit = [r["name"] for r in rows if r["class_conditional"]]
    if dit:
        out.append(f"Class-conditional DiT (no caption projection, no cross-attention): {', '.join(dit)}.")
    return "\n".join(out)


def _ratio(rows, resolution):
    r = [row for row in rows if row["resolution"] == resolution]
    return "-" if not r else f"{r[0]['tflop_per_image'] / r[0]['tflop_per_image_256']:.1f}x"


def draw_png(result: dict, path) -> None:
    """A horizontal bar chart of `bars(result)` drawn with Pillow, written to path."""
    items = bars(result)
    font = ImageFont.load_default(size=16)
    width, left, bar_h, gap, top = 1100, 470, 28, 14, 50
    img = Image.new("RGB", (width, top + len(items) * (bar_h + gap) + 30), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 12), f"Training cost of the schedule ({result['settings']['name']})", fill="black", font=font)
    scale = (width - left - 110) / max(days for _, days in items)
    for i, (label, days) in enumerate(items):
        y = top + i * (bar_h + gap)
        colour = "#999999" if label.startswith("paper") else "#4477aa" if label.startswith("floor") else "#ee6677"
        draw.text((10, y + 5), label, fill="black", font=font)
        draw.rectangle((left, y, left + max(1, round(days * scale)), y + bar_h), fill=colour)
        draw.text((left + round(days * scale) + 8, y + 5), f"{days:.0f}", fill="black", font=font)
    img.save(path)


def format_memory(result: dict) -> str:
    """A `memory_plan` as text: one row per resolution, training, optimizer and recomputation mode, in GB."""
    s = result["settings"]
    header = ("px", "training", "optimizer", "recompute", "weights", "EMA", "grads", "opt. state", "act./step",
              "act./image", "batch")
    lines = [(str(r["resolution"]), f"LoRA r{r['lora_rank']}" if r["lora_rank"] else "full", r["optimizer"],
              r["recompute"], *(f"{r[k] / 1e9:.2f}" for k in ("weights", "ema", "gradients", "optimizer_state",
                                                              "activations_per_step", "activations_per_image")),
              str(r["largest_batch"])) for r in result["rows"]]
    return "\n".join([
        f"{s['model']}: training memory in GB (1e9 bytes); batch: the largest that fits a {s['name']} "
        f"({s['memory_gb']:g} GB).\nAn estimate from the planner's model, not a measurement on a GPU.", "",
        text_table(header, lines), "",
        "weights, EMA, gradients, optimizer state: the trainer's fp32 tensors, counted exactly (LoRA: the frozen "
        "base stays fp32;\nthe EMA, gradients and optimizer hold the adapters only; LoRA targets "
        f"{s['lora_targets']}). Activations: bf16 autocast,\nfitted on the bench's CPU measurement of the PyTorch "
        "kernels (bench/test_bench_memory.py; the Triton kernels keep less\nwithout recomputation); per step: the "
        "bf16 weight copies the backward needs. Not counted: the CUDA context,\nallocator slack, the backward's "
        "temporaries; the card's GB are taken as 1e9 bytes, which leaves them the 7 % by which\nits memory "
        "(GiB) is larger."])


def _gpu_arg(name: str) -> str:
    try:
        return resolve_gpu(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _choices(allowed: tuple[str, ...]):
    """An argparse type: a comma-separated subset of `allowed`, as a tuple."""
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(","))
        if not set(values) <= set(allowed):
            raise argparse.ArgumentTypeError(f"expected {', '.join(allowed)} (comma-separated), got {text!r}")
        return values
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pixart_fast.plan", description="Training FLOPs, GPU-days, "
                                     "energy, CO2 and cost of a PixArt training schedule (default: the paper's "
                                     "Table 4).")
    parser.add_argument("--schedule", metavar="FILE", help="a JSON list of stages {name, resolution (px), steps, "
                        "global_batch, optional config, class_conditional, paper_v100_days}; default: the paper's")
    parser.add_argument("--gpu", type=_gpu_arg, metavar="NAME",
                        help=f"GPU type, any case: {gpu_names()} (default A100-80GB, or the bench's GPU with "
                        "--mfu-from; RTX4090 with --memory)")
    mfu = parser.add_mutually_exclusive_group()
    mfu.add_argument("--mfu", type=float, metavar="FRACTION",
                     help="model-FLOP utilisation, a fraction in (0, 1] of the dense bf16 peak")
    mfu.add_argument("--mfu-from", metavar="FILE", help="a `pytest bench/ --benchmark-json FILE` result: use the "
                     "training-step MFU measured there at each stage's resolution")
    parser.add_argument("--usd-per-gpu-hour", type=float, metavar="USD", help="price of one GPU for one hour, USD")
    parser.add_argument("--kg-co2-per-kwh", type=float, default=KG_CO2_PER_KWH, metavar="KG",
                        help=f"grid carbon intensity, kg CO2 per kWh (default {KG_CO2_PER_KWH}: world average 2023)")
    parser.add_argument("--pue", type=float, default=PUE, metavar="RATIO",
                        help=f"data-centre power usage effectiveness, facility energy / IT energy (default {PUE})")
    parser.add_argument("--watts", type=float, metavar="W", help="average power per GPU, W (default: the GPU's TDP)")
    parser.add_argument("--ratio-from", metavar="ABLATION_JSON", help="also print the schedule scaled by the compute "
                        "ratio an ablation measured (python -m pixart_fast.train.ablate's ablation.json): --arm "
                        "against --baseline to the baseline's final quality; labelled an estimate")
    parser.add_argument("--arm", default="default", help="with --ratio-from: the arm whose ratio scales the schedule "
                        "(default: default)")
    parser.add_argument("--baseline", default="paper", help="with --ratio-from: the arm standing for the paper's "
                        "recipe (default: paper)")
    parser.add_argument("--bar", help="with --ratio-from: the quality bar, as ablation.md labels it (default: the "
                        "baseline's final score)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    parser.add_argument("--png", metavar="FILE", help="also draw the comparison as a bar chart PNG")
    memory = parser.add_argument_group("--memory: what a training step holds, and the largest batch that fits --gpu")
    memory.add_argument("--memory", action="store_true", help="print GB of weights, EMA, gradients, optimizer state "
                        "and activations, full fine-tuning and LoRA, and the largest batch that fits --gpu")
    memory.add_argument("--model", default="PixArt-Sigma-XL/2-1024", choices=CONFIGS, metavar="NAME",
                        help="a pixart_fast.model.CONFIGS name at PixArt-XL/2's width (default PixArt-Sigma-XL/2-1024)")
    memory.add_argument("--resolution", type=_ints, metavar="PX[,PX]", help="image sides, px (default the model's)")
    memory.add_argument("--lora-rank", type=int, default=LORA_RANK, metavar="R",
                        help=f"rank of the LoRA rows (default {LORA_RANK}, the official LoRA script's); 0: full only")
    memory.add_argument("--lora-targets", default=DEFAULT_TARGETS, metavar="GROUPS",
                        help=f"the Linear layers LoRA adapts, as the trainer's (default {DEFAULT_TARGETS})")
    memory.add_argument("--optimizer", type=_choices(OPTIMIZERS), default=OPTIMIZERS, metavar="NAME[,NAME]",
                        help="adamw, came or both (default)")
    memory.add_argument("--recompute", type=_choices(RECOMPUTE), default=RECOMPUTE, metavar="MODE[,MODE]",
                        help="none, selective, full, comma-separated (default all three)")
    args = parser.parse_args(argv)

    if args.memory:
        if args.schedule or args.mfu is not None or args.mfu_from or args.png:
            parser.error("--memory takes --model, --gpu, --resolution, --lora-rank, --lora-targets, --optimizer, "
                         "--recompute and --json, not --schedule, --mfu, --mfu-from or --png")
        try:
            result = memory_plan(args.model, args.gpu or "RTX4090", args.resolution, args.lora_rank,
                                 args.optimizer, args.recompute, args.lora_targets)
        except ValueError as e:  # a model of another width, a resolution off the patch grid, unknown LoRA targets
            parser.error(str(e))
        print(json.dumps(result, indent=1) if args.json else format_memory(result))
        return 0

    try:
        schedule = PAPER_SCHEDULE if args.schedule is None else load_schedule(args.schedule)
        gpu, mfu_value = args.gpu, args.mfu
        if args.mfu_from:
            bench_gpu, mfu_value = mfu_from_bench(args.mfu_from)
            if gpu is not None and gpu != bench_gpu:
                parser.error(f"--gpu {gpu} but {args.mfu_from} was measured on {bench_gpu}")
            gpu = bench_gpu
        ratio = None if args.ratio_from is None else ratio_from_ablation(args.ratio_from, args.arm, args.baseline, args.bar)
        result = plan(schedule, gpu or "A100-80GB", mfu_value, args.usd_per_gpu_hour, args.kg_co2_per_kwh,
                      args.pue, args.watts, ratio)
    except (OSError, ValueError) as e:  # a missing file, a bad schedule or bench JSON, a value out of range
        parser.error(str(e))
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    if args.png:
        draw_png(result, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
