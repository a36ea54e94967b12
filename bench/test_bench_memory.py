"""Activation memory: the bytes a training forward leaves allocated for the backward pass, per image, ours (PyTorch
and Triton kernels, each recomputation mode) against diffusers' PixArtTransformer2DModel, in fp32 and under bf16
autocast (the real training dtype).

Measured with the PyTorch profiler's memory events: every allocation and free during the forward, summed, is what
the forward leaves behind for backward (tensors autograd saved, autocast's casts it saved, the outputs selective
recomputation keeps, the block inputs full recomputation keeps), whatever mechanism holds it. Parameters exist
before and are not counted. PixArt-XL/2 does not fit a CPU's memory, so the measurement runs at XL width
(D = 1152, 256 px, 120 caption tokens) with 0 and 1 blocks and batch 1 and 2: one block's share per image is the
difference of differences. That leaves out what a step holds once whatever the batch (under autocast the bf16
copies of the weights that the backward needs, 2 bytes a parameter), reported on its own as per_block_fixed_bytes.
XL/2's per-image total is extrapolated as base + 28 blocks. The Triton kernels run through the interpreter in a subprocess
(TRITON_INTERPRET=1 must be set before Triton is imported): that executes their autograd Functions, which decide
what is saved, exactly as on a GPU.

The planner's activation model (`pixart_fast.memory.ACTIVATIONS`: PyTorch kernels, bf16 autocast, full fine-tuning and
LoRA, each recomputation mode; the Triton kernels keep less without recomputation, and interpreted they take too
long at these shapes on a CPU) is fitted here at XL width with 1 and 2 blocks (`-k activation_fit`: 256 against
1024 image tokens, 120 against 300 caption tokens) and checked against whole 28-block models, batch 1 against 2
(`-k planner_vs_measured`): PixArt-XL/2-256 and PixArt-Sigma-XL/2-512 (1024 image and 300 caption tokens, a shape
it was not fitted on), and PixArt-Sigma-XL/2-1024 with full recomputation (the others need more than a CPU's
memory); per image and per step within 10 %.
"""
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from pixart_fast.lora import add_lora
from pixart_fast.model import CONFIGS, RECOMPUTE, PixArt, PixArtConfig
from pixart_fast.memory import LORA_RANK, ActivationFit, activation_bytes
from workloads import build_diffusers, make_batch, model_fn

# variant: (model, kernels, recompute)
VARIANTS = {"ours": ("ours", "torch", "none"), "ours selective": ("ours", "torch", "selective"),
            "ours full": ("ours", "torch", "full"), "ours+triton": ("ours", "triton", "none"),
            "ours+triton selective": ("ours", "triton", "selective"), "diffusers": ("diffusers", "torch", "none")}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}
XL = CONFIGS["PixArt-XL/2-256"]
MIB = 2**20
# The planner's fit: three shapes at XL width, (image tokens, caption tokens) (256, 120), (1024, 120), (256, 300).
FIT_SHAPES = {"256px": XL, "512px": CONFIGS["PixArt-XL/2-512"], "256px-300tokens": replace(XL, max_tokens=300)}
PLANNER_VARIANTS = [f"{kind} {recompute}" for kind in ("full", "lora") for recompute in RECOMPUTE]
# The planner's checks on whole models, as far as a CPU's memory goes: (model, variant).
PLANNER_CHECKS = [(name, variant) for name in ("PixArt-XL/2-256", "PixArt-Sigma-XL/2-512") for variant in
                  PLANNER_VARIANTS] + [("PixArt-Sigma-XL/2-1024", "full full"), ("PixArt-Sigma-XL/2-1024", "lora full")]


def retained_bytes(config: PixArtConfig, model: str, kernels: str, recompute: str, precision: str, B: int,
                   lora_rank: int = 0) -> int:
    """Bytes a training forward of `config` (batch B; LoRA adapters of lora_rank on the default targets when
    lora_rank > 0) leaves allocated."""
    torch.manual_seed(0)
    ours = PixArt(config, kernels=kernels, recompute=recompute).train()
    if lora_rank:
        add_lora(ours, lora_rank)
    net = ours if model == "ours" else build_diffusers(ours)
    batch = make_batch(ours.config, B, "cpu")
    fn = model_fn(net, batch)
    dtype = PRECISIONS[precision]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=dtype) if dtype else nullcontext():
            out = fn(batch.x0, batch.t)
    assert out.requires_grad
    return sum(e.self_cpu_memory_usage for e in prof.events())  # allocations minus frees


def measure(config: dict, model: str, kernels: str, recompute: str, precision: str, lora_rank: int = 0,
            depths: tuple[int, int] = (0, 1)) -> list[int]:
    """Bytes of `config` (a PixArtConfig as a dict) at two depths (lo, hi): [lo blocks batch 1, hi blocks batch 1,
    lo blocks batch 2, hi blocks batch 2]."""
    return [retained_bytes(replace(PixArtConfig(**config), depth=depth), model, kernels, recompute, precision, B,
                           lora_rank) for B in (1, 2) for depth in depths]


def split(measured: list[int], depths: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """`measure`'s four numbers as bytes per block and outside the blocks (the rest, at depth 0), per image (batch 2
    against 1) and per step (what batch 1 holds beyond one image)."""
    lo, hi = depths
    lo1, hi1, lo2, hi2 = measured
    image_lo, image_hi = lo2 - lo1, hi2 - hi1
    step_lo, step_hi = lo1 - image_lo, hi1 - image_hi
    block, block_step = (image_hi - image_lo) / (hi - lo), (step_hi - step_lo) / (hi - lo)
    return {"outside": image_lo - lo * block, "outside_step": step_lo - lo * block_step, "block": block,
            "block_step": block_step}


def measure_interpreted(*args) -> list[int]:
    """`measure` in a subprocess with TRITON_INTERPRET=1, so Triton kernels run on the CPU."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from test_bench_memory import measure; print(json.dumps(measure(*{list(args)!r})))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_activation_memory_per_image(benchmark, variant, precision):
    model, kernels, recompute = VARIANTS[variant]
    run = measure_interpreted if kernels == "triton" else measure
    parts = benchmark.pedantic(run, args=(asdict(XL), model, kernels, recompute, precision), rounds=1, iterations=1)
    per_block, fixed, base = (split(parts)[k] for k in ("block", "block_step", "outside"))
    xl_total = base + XL.depth * per_block
    benchmark.extra_info.update(
        kind="activation_memory", model=model, kernels=kernels, recompute=recompute, variant=variant, device="cpu",
        precision=precision if precision == "fp32" else "bf16 autocast", resolution=256,
        config="PixArt-XL/2 width, 0 and 1 blocks, batch 1 and 2", base_bytes=base, per_block_bytes=per_block,
        per_block_fixed_bytes=fixed, xl2_extrapolated_bytes=xl_total)
    print(f"\n{variant}, {precision}: {per_block / MIB:.2f} MiB per block per 256-px image (+ {fixed / MIB:.1f} MiB "
          f"per block per step); PixArt-XL/2 extrapolated {xl_total / MIB:.0f} MiB per image")
    assert per_block > 0


def planner_measure(config: PixArtConfig, variant: str, depths: tuple[int, int]) -> dict[str, float]:
    """`split` of what the planner models (ours with PyTorch kernels, bf16 autocast, LoRA at LORA_RANK) at two
    depths."""
    kind, recompute = variant.split()
    return split(measure(asdict(config), "ours", "torch", recompute, "bf16", LORA_RANK if kind == "lora" else 0,
                         depths), depths)


def compare(config: PixArtConfig, variant: str, per_image: float, per_step: float) -> dict[str, float]:
    """Planner / measured - 1 for the activations of `config` at its own resolution, per image and per step."""
    kind, recompute = variant.split()
    planned = activation_bytes(config, config.input_size * 8, recompute, kind == "lora")
    return {"per_image": planned[0] / per_image - 1, "per_step": planned[1] / per_step - 1}


@pytest.mark.parametrize("variant", PLANNER_VARIANTS)
def test_activation_fit(benchmark, variant):
    """Fits pixart_fast.memory.ACTIVATIONS[variant] (printed, to paste there) from 1 against 2 blocks (2 blocks, not
    0: the caption embedding that every block reads is kept once however many blocks there are) and checks the
    planner's against the fitted shapes."""
    m = benchmark.pedantic(lambda: {name: planner_measure(cfg, variant, (1, 2)) for name, cfg in FIT_SHAPES.items()},
                           rounds=1, iterations=1)
    t = lambda c: (c.input_size // c.patch_size) ** 2  # noqa: E731
    base, more_tokens, more_captions = FIT_SHAPES.values()
    per_token = lambda part: (m["512px"][part] - m["256px"][part]) / (t(more_tokens) - t(base))  # noqa: E731
    per_caption_token = lambda part: (m["256px-300tokens"][part] - m["256px"][part]) / (  # noqa: E731
        more_captions.max_tokens - base.max_tokens)
    fit = ActivationFit(block_token=per_token("block"), block_caption_token=per_caption_token("block"),
                        block_step=m["256px"]["block_step"], outside_token=per_token("outside"),
                        outside_caption_token=per_caption_token("outside"), outside_step=m["256px"]["outside_step"])
    kind, recompute = variant.split()
    values = ", ".join(str(round(v)) for v in asdict(fit).values())
    print(f'\n    ("{kind}", "{recompute}"): ActivationFit({values}),')
    errors = {name: compare(cfg, variant, m[name]["outside"] + cfg.depth * m[name]["block"],
                            m[name]["outside_step"] + cfg.depth * m[name]["block_step"])
              for name, cfg in FIT_SHAPES.items()}
    benchmark.extra_info.update(kind="activation_fit", variant=variant, measured=m, fit=asdict(fit),
                                planner_error=errors)
    print("planner / measured (extrapolated to 28 blocks) - 1: " + ", ".join(
        f"{n} {e['per_image']:+.1%} per image, {e['per_step']:+.1%} per step" for n, e in errors.items()))
    assert all(abs(e) < 0.10 for err in errors.values() for e in err.values()), errors


@pytest.mark.parametrize("name, variant", PLANNER_CHECKS)
def test_planner_vs_measured(benchmark, name, variant):
    """The planner's activations of a whole 28-block model (no extrapolation; the Sigma models' 300 caption tokens
    with 1024 or 4096 image tokens are not a fitted shape) within 10 % of the measurement, per image and per step."""
    config = CONFIGS[name]
    kind, recompute = variant.split()
    one, two = benchmark.pedantic(lambda: [retained_bytes(config, "ours", "torch", recompute, "bf16", B,
                                                          LORA_RANK if kind == "lora" else 0) for B in (1, 2)],
                                  rounds=1, iterations=1)
    error = compare(config, variant, two - one, 2 * one - two)
    benchmark.extra_info.update(kind="planner_activation_check", variant=variant, config=name, per_image=two - one,
                                per_step=2 * one - two, planner_error=error)
    print(f"\n{name} {variant}: measured {(two - one) / 1e9:.2f} GB per image, {(2 * one - two) / 1e9:.2f} GB per "
          f"step; planner / measured - 1: {error['per_image']:+.1%} per image, {error['per_step']:+.1%} per step")
    assert abs(error["per_image"]) < 0.10 and abs(error["per_step"]) < 0.10, error
