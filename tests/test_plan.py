"""The cost planner (pixart_fast/plan.py) and what it counts with (flops.py, memory.py, gpus.py): its FLOP count
against torch's FlopCounterMode run on the real modules, the paper schedule's A100-days, the plan's arithmetic,
schedule files and command line, the GPU table's names, and the memory model's weights, EMA, gradients and
optimizer state against the real tensors of a training step (its activation figures are checked against
measurements in bench/test_bench_memory.py)."""
import json

import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from came_pytorch import CAME
from pixart_fast.lora import add_lora, ema_copy
from pixart_fast.model import CONFIGS, RECOMPUTE, DiT, PixArt
from pixart_fast.flops import flops_per_image, forward_flops
from pixart_fast.gpus import GPU_ALIASES, GPUS, resolve_gpu
from pixart_fast.memory import (LORA_RANK, OPTIMIZERS, activation_bytes, largest_batch, state_bytes, step_bytes,
                                training_memory)
from pixart_fast.plan import PAPER_SCHEDULE, Stage, gpu_days, load_schedule, main, mfu_from_bench, plan
from pixart_fast.train.recipes import RECIPES


def counted_flops(model, x, *args, **kwargs):
    """(forward, backward) FLOPs FlopCounterMode counts for one training step of `model` on x (meta tensors)."""
    with FlopCounterMode(display=False) as fwd:
        out = model(x, *args, **kwargs)
    with FlopCounterMode(display=False) as bwd:
        out.float().square().mean().backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def no_input_grad_flops(cfg, T, L, class_conditional=False):
    """FLOPs of the backward products autograd skips: the input gradient of the first product on each input
    that needs none (patch embedding, the timestep MLP's first layer, the caption MLP's first layer, the
    micro-condition MLPs' first layers). `flops_per_image`'s 3 x forward counts them; FlopCounterMode does not."""
    D, p = cfg.hidden_size, cfg.patch_size
    skipped = 2 * T * cfg.in_channels * p * p * D + 2 * 256 * D
    if not class_conditional:
        skipped += 2 * L * cfg.caption_channels * D
        if cfg.micro_conditions:
            skipped += 3 * 2 * 256 * (D // 3)
    return skipped


def pixart_inputs(cfg, B, h, w):
    """Meta-device inputs for a PixArt training forward at latent size h x w with the full caption length."""
    x = torch.randn(B, cfg.in_channels, h, w)
    t = torch.randint(0, 1000, (B,))
    y = torch.randn(B, cfg.max_tokens, cfg.caption_channels)
    mask = torch.ones(B, cfg.max_tokens, dtype=torch.bool)
    extra = (torch.full((B, 2), 8.0 * h), torch.ones(B)) if cfg.micro_conditions else ()
    return x, t, y, mask, *extra


def test_xl2_256_matches_flop_counter():
    cfg = CONFIGS["PixArt-XL/2-256"]
    B = 2
    with torch.device("meta"):
        model = PixArt(cfg, kernels="torch")
        fwd, bwd = counted_flops(model, *pixart_inputs(cfg, B, 32, 32))
    parts = forward_flops(cfg, 256)
    assert fwd == B * sum(parts.values())  # every forward product, exactly
    train = flops_per_image(cfg, 256)
    assert train == 3 * sum(parts.values())
    assert abs((fwd + bwd) / B - train) / train < 0.02
    assert (fwd + bwd) / B == train - no_input_grad_flops(cfg, 256, 120)
    assert 0.85e12 < train < 0.95e12  # docs/ARCHITECTURE.md: about 0.9 TFLOP per 256-px training image


TINY_CASES = [("PixArt-tiny", 64, 64), ("PixArt-tiny", 64, 128), ("PixArt-tiny", 128, 128),
              ("PixArtMS-tiny", 64, 64), ("PixArtMS-tiny", 128, 64)]


@pytest.mark.parametrize("name, height, width", TINY_CASES)
def test_tiny_configs_match_flop_counter_exactly(name, height, width):
    cfg = CONFIGS[name]
    B, h, w = 3, height // 8, width // 8
    with torch.device("meta"):
        model = PixArt(cfg, kernels="torch")
        fwd, bwd = counted_flops(model, *pixart_inputs(cfg, B, h, w))
    T = (h // cfg.patch_size) * (w // cfg.patch_size)
    assert fwd == B * sum(forward_flops(cfg, height, width).values())
    assert bwd == B * (2 * sum(forward_flops(cfg, height, width).values()) - no_input_grad_flops(cfg, T, cfg.max_tokens))


def test_class_conditional_dit_matches_flop_counter():
    cfg = CONFIGS["PixArt-tiny"]
    B = 2
    with torch.device("meta"):
        model = DiT(cfg)
        x = torch.randn(B, cfg.in_channels, cfg.input_size, cfg.input_size)
        fwd, bwd = counted_flops(model, x, torch.randint(0, 1000, (B,)), torch.randint(0, cfg.num_classes, (B,)))
    parts = forward_flops(cfg, class_conditional=True)
    T = (cfg.input_size // cfg.patch_size) ** 2
    assert fwd == B * sum(parts.values())
    assert bwd == B * (2 * sum(parts.values()) - no_input_grad_flops(cfg, T, 0, class_conditional=True))


def test_pixel_space_and_caption_length_arguments():
    cfg = CONFIGS["PixArt-pixel-32"]  # 32-px images in pixel space: vae_downsample 1
    B = 2
    with torch.device("meta"):
        model = PixArt(cfg, kernels="torch").eval()  # eval: no caption dropout, which needs the full 120 tokens
        x = torch.randn(B, 3, 32, 32)
        y = torch.randn(B, 50, cfg.caption_channels)
        fwd, _ = counted_flops(model, x, torch.randint(0, 1000, (B,)), y, torch.ones(B, 50, dtype=torch.bool))
    assert fwd == B * sum(forward_flops(cfg, 32, 32, vae_downsample=1, caption_tokens=50).values())
    with pytest.raises(ValueError, match="multiples of vae_downsample"):
        forward_flops(cfg, 33, vae_downsample=1)


def test_paper_schedule_at_full_a100_mfu_is_about_141_days():
    result = plan(PAPER_SCHEDULE, "A100-80GB")
    days = result["total"]["floor_gpu_days"]
    # docs/ARCHITECTURE.md section 2: about 3.8e21 FLOP, 141 A100-days at 100 % of 312 TFLOP/s. Our exact count, stage 1 as
    # the class-conditional DiT (no caption projection or cross-attention), comes out 1.8 % lower.
    assert abs(days / 141 - 1) < 0.03, days
    assert abs(result["total"]["flop"] / 3.8e21 - 1) < 0.03
    # Counting every image at the 256-px cost undercounts the 512 and 1024-px stages by a quarter.
    assert result["total"]["floor_gpu_days_256"] < 0.8 * days
    assert result["paper"]["a100_days"] == pytest.approx(1656 / 2.2)
    assert result["paper"]["implied_a100_mfu_later"] == pytest.approx(days / 675)


def test_plan_arithmetic():
    stages = (Stage("a", 256, 1000, 64), Stage("b", 512, 10, 32, config="PixArt-XL/2-512"))
    r = plan(stages, "H100", mfu=0.5, usd_per_gpu_hour=3.0, kg_co2_per_kwh=0.2, pue=1.5)
    for row, stage in zip(r["stages"], stages):
        flop = stage.steps * stage.global_batch * flops_per_image(CONFIGS[stage.config], stage.resolution)
        assert row["flop"] == flop
        assert row["floor_gpu_days"] == pytest.approx(flop / 989.5e12 / 86400)
        assert row["gpu_days"] == pytest.approx(2 * row["floor_gpu_days"])
        assert row["kwh"] == pytest.approx(row["gpu_days"] * 24 * 0.7 * 1.5)
        assert row["kg_co2"] == pytest.approx(0.2 * row["kwh"])
        assert row["usd"] == pytest.approx(72 * row["gpu_days"])
    assert r["total"]["gpu_days"] == pytest.approx(sum(row["gpu_days"] for row in r["stages"]))
    assert r["paper"] is None  # no paper figures in this schedule
    per_res = plan(stages, "H100", mfu={256: 0.5, 512: 0.25})
    assert per_res["stages"][1]["gpu_days"] == pytest.approx(4 * per_res["stages"][1]["floor_gpu_days"])
    with pytest.raises(ValueError, match="no MFU for 512 px"):
        plan(stages, "H100", mfu={256: 0.5})
    with pytest.raises(ValueError, match="MFU must be in"):
        plan(stages, "H100", mfu=1.5)
    with pytest.raises(ValueError, match="unknown GPU 'B200'"):
        plan(stages, "B200")


def test_gpu_table_is_consistent():
    assert {"A100-40GB", "A100-80GB", "H100", "H200", "V100", "L40S", "RTX4090"} <= set(GPUS)
    assert GPUS["A100-80GB"].tflops == 312.0
    assert gpu_days(312e12 * 86400, GPUS["A100-80GB"]) == pytest.approx(1.0)


def test_schedule_file(tmp_path):
    path = tmp_path / "schedule.json"
    path.write_text(json.dumps([{"name": "s", "resolution": 512, "steps": 10, "global_batch": 8,
                                 "config": "PixArt-XL/2-512", "paper_v100_days": 1.0}]))
    (stage,) = load_schedule(path)
    assert stage == Stage("s", 512, 10, 8, config="PixArt-XL/2-512", paper_v100_days=1.0)
    path.write_text(json.dumps([{"name": "s", "resolution": 512, "steps": 10, "batch": 8}]))
    with pytest.raises(ValueError, match=r"unknown keys \['batch'\], missing keys \['global_batch'\]"):
        load_schedule(path)
    path.write_text(json.dumps([{"name": "s", "resolution": 512, "steps": 10, "global_batch": 8, "config": "XL"}]))
    with pytest.raises(ValueError, match="config 'XL' is not one of"):
        load_schedule(path)


def bench_json(path, rows):
    path.write_text(json.dumps({"benchmarks": [{"name": f"b{i}", "extra_info": r} for i, r in enumerate(rows)]}))
    return path


def test_mfu_from_bench_uses_only_measured_training_steps(tmp_path):
    rows = [{"kind": "train_step", "model": "ours", "gpu": "H100", "resolution": 256, "mfu": 0.30},
            {"kind": "train_step", "model": "ours", "gpu": "H100", "resolution": 256, "mfu": 0.35},
            {"kind": "train_step", "model": "diffusers", "gpu": "H100", "resolution": 256, "mfu": 0.5},
            {"kind": "train_step", "model": "ours", "gpu": "H100", "resolution": 512, "mfu": 0.9, "estimate": True},
            {"kind": "train_step", "model": "ours", "gpu": "H100", "resolution": 512, "mfu": 0.4}]
    assert mfu_from_bench(bench_json(tmp_path / "b.json", rows)) == ("H100", {256: 0.35, 512: 0.4})
    cpu_only = [{"kind": "train_step", "model": "ours", "resolution": 256, "mfu": None}]
    with pytest.raises(ValueError, match="no measured GPU training-step MFU"):
        mfu_from_bench(bench_json(tmp_path / "c.json", cpu_only))


def test_command_line(tmp_path, capsys):
    main(["--mfu", "0.4", "--usd-per-gpu-hour", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["total"]["gpu_days"] == pytest.approx(result["total"]["floor_gpu_days"] / 0.4)
    png = tmp_path / "plan.png"
    main(["--gpu", "H100", "--mfu", "0.3", "--png", str(png)])
    text = capsys.readouterr().out
    assert "256-px equivalent" in text and "675" in text and "plan at 30% MFU" in text
    with Image.open(png) as img:
        assert img.width > 500 and img.height > 100
    with pytest.raises(SystemExit):
        main(["--mfu", "0.4", "--mfu-from", "x.json"])  # mutually exclusive
    with pytest.raises(SystemExit):
        main(["--mfu", "2"])
    assert "MFU must be in (0, 1], got 2.0" in capsys.readouterr().err


def test_gpu_names_and_aliases(capsys):
    assert resolve_gpu("a100") == resolve_gpu("A100") == "A100-80GB"  # the bare name: the 80 GB part
    assert resolve_gpu("h100") == "H100" and GPUS["H100"].name.startswith("H100 SXM")
    assert resolve_gpu("h200") == "H200" and resolve_gpu("v100") == "V100"
    for key in GPUS:  # every key, in any case
        assert resolve_gpu(key) == resolve_gpu(key.lower()) == key
    assert resolve_gpu("a100_40gb") == resolve_gpu("A100 40GB") == "A100-40GB"
    assert all(key in GPUS for key in GPU_ALIASES.values())
    with pytest.raises(ValueError, match=r"unknown GPU 'B200'.*A100-80GB \(or A100\).*H100"):
        resolve_gpu("B200")
    # the Python API takes the same names, and reports the key
    assert plan(PAPER_SCHEDULE, "a100")["settings"]["gpu"] == "A100-80GB"
    assert plan(PAPER_SCHEDULE, "h100", 0.3) == plan(PAPER_SCHEDULE, "H100", 0.3)
    # the command line: aliases accepted, listed in --help, an unknown name refused with the list
    main(["--gpu", "A100", "--json"])
    assert json.loads(capsys.readouterr().out)["settings"]["gpu"] == "A100-80GB"
    main(["--gpu", "h100", "--json"])
    assert json.loads(capsys.readouterr().out)["settings"]["name"] == GPUS["H100"].name
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert help_text.startswith("usage: python -m pixart_fast.plan ")
    assert all(key in help_text for key in GPUS) and "A100-80GB (or A100)" in help_text
    with pytest.raises(SystemExit):
        main(["--gpu", "B200"])
    err = " ".join(capsys.readouterr().err.split())
    assert "unknown GPU 'B200'" in err and "A100-80GB (or A100)" in err and "RTX4090" in err


def real_state_bytes(name: str, lora_rank: int, optimizer: str) -> dict[str, int]:
    """What the trainer's tensors take after one real training step of a tiny model: fp32 weights and buffers,
    the EMA (`pixart_fast.lora.ema_copy`: its tensors that the model does not share), the gradients and the
    optimizer's state tensors, in bytes; and the parameter counts."""
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = PixArt(cfg, kernels="torch").train()
    if lora_rank:
        add_lora(model, lora_rank)
    ema = ema_copy(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.AdamW(trained, lr=1e-4, fused=True) if optimizer == "adamw" else
           CAME(trained, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16)))
    model(*pixart_inputs(cfg, 2, cfg.input_size, cfg.input_size)).square().mean().backward()
    opt.step()
    size = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    weights = [*model.parameters(), *model.buffers()]
    shared = {t.data_ptr() for t in weights}
    return {"params": sum(p.numel() for p in model.parameters()), "trained_params": sum(p.numel() for p in trained),
            "weights": size(weights),
            "ema": size(t for t in [*ema.parameters(), *ema.buffers()] if t.data_ptr() not in shared),
            "gradients": size(p.grad for p in trained if p.grad is not None),
            "optimizer_state": size(v for state in opt.state.values() for v in state.values() if torch.is_tensor(v))}


@pytest.mark.parametrize("name", ["PixArt-tiny", "PixArtMS-tiny", "PixArt-Sigma-tiny"])
@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_state_bytes_equal_real_tensors(name, lora_rank, optimizer):
    """The planner's weights, EMA, gradients and optimizer state equal the bytes of the real tensors after a real
    AdamW or CAME step, full and LoRA (the trained-parameter count then PEFT's)."""
    real = real_state_bytes(name, lora_rank, optimizer)
    assert state_bytes(CONFIGS[name], lora_rank, optimizer) == real
    if lora_rank:
        assert real["trained_params"] < real["params"] / 5  # the base frozen: only the adapters train


def test_lora_targets_and_came_factoring():
    cfg = CONFIGS["PixArt-Sigma-XL/2-1024"]
    full = state_bytes(cfg, 0, "adamw")
    assert full["params"] == 610_856_096
    assert full["weights"] > 4 * full["params"]  # and the buffers: position table, null caption
    assert full["optimizer_state"] == pytest.approx(8 * full["params"], rel=1e-4)
    came = state_bytes(cfg, 0, "came")["optimizer_state"]
    assert 0.5 * full["optimizer_state"] < came < 0.51 * full["optimizer_state"]  # exp_avg; vectors for the rest
    attn = state_bytes(cfg, 16, "adamw", "attn")
    D, depth = cfg.hidden_size, cfg.depth
    assert attn["trained_params"] == depth * 16 * ((D + 3 * D) + (D + D))  # qkv (D -> 3D) and proj (D -> D)
    with pytest.raises(ValueError, match="names no Linear layer"):
        state_bytes(cfg, 16, "adamw", "attn,conv")
    with pytest.raises(ValueError, match="optimizer must be one of"):
        state_bytes(cfg, 0, "sgd")


def test_largest_batch_fits_and_one_more_does_not():
    cfg = CONFIGS["PixArt-Sigma-XL/2-1024"]
    for res, recompute, rank, optimizer, gb in ((1024, "none", 0, "adamw", 80), (1024, "full", 16, "came", 24),
                                                  (512, "selective", 16, "adamw", 24), (2048, "full", 0, "came", 141)):
        memory = training_memory(cfg, res, rank, optimizer, recompute)
        b = largest_batch(memory, gb)
        assert b > 0
        assert step_bytes(memory, b) <= gb * 1e9 < step_bytes(memory, b + 1)
    full = training_memory(cfg, 1024, 0, "adamw", "none")
    assert largest_batch(full, 10) == 0  # weights, EMA, gradients and AdamW's moments alone take 12.2 GB
    per_image = {mode: training_memory(cfg, 1024, recompute=mode)["activations_per_image"] for mode in RECOMPUTE}
    assert per_image["full"] < per_image["selective"] < per_image["none"]
    at_1024, at_2048 = activation_bytes(cfg, 1024)[0], activation_bytes(cfg, 2048)[0]
    assert 3.9 * at_1024 < at_2048 < 4 * at_1024  # 4x the image tokens, the same 300 caption tokens
    with pytest.raises(ValueError, match="measured at PixArt-XL/2's width"):
        activation_bytes(CONFIGS["PixArt-tiny"], 64)
    with pytest.raises(ValueError, match="multiple of 16 px"):
        activation_bytes(cfg, 1000)


def test_memory_command_line(capsys):
    main(["--memory", "--model", "PixArt-XL/2-512", "--gpu", "4090", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["gpu"] == "RTX4090" and result["settings"]["memory_gb"] == 24
    rows = result["rows"]
    assert {(r["resolution"], r["lora_rank"]) for r in rows} == {(512, 0), (512, LORA_RANK)}
    assert len(rows) == 2 * len(OPTIMIZERS) * len(RECOMPUTE)
    for r in rows:
        assert r == {**r, **training_memory(CONFIGS["PixArt-XL/2-512"], 512, r["lora_rank"], r["optimizer"],
                                            r["recompute"]), "largest_batch": r["largest_batch"]}
        assert r["largest_batch"] == largest_batch(r, 24)
    main(["--memory", "--resolution", "512,1024", "--lora-rank", "0", "--optimizer", "came", "--recompute", "full"])
    text = capsys.readouterr().out
    assert "PixArt-Sigma-XL/2-1024" in text and "GeForce RTX 4090" in text and "not a measurement" in text
    assert [line.split()[:4] for line in text.splitlines() if line[:4] in ("512 ", "1024")] == [
        ["512", "full", "came", "full"], ["1024", "full", "came", "full"]]
    for bad, message in ((["--model", "PixArt-tiny"], "measured at PixArt-XL/2's width"),
                         (["--optimizer", "sgd"], "expected adamw, came"),
                         (["--mfu", "0.4"], "--memory takes --model")):
        with pytest.raises(SystemExit):
            main(["--memory", *bad])
        assert message in capsys.readouterr().err


def test_the_schedule_scaled_by_a_ratio_an_ablation_measured(tmp_path, capsys):
    from pixart_fast.flops import flops_per_image
    from pixart_fast.plan import ratio_from_ablation
    from pixart_fast.train.ablate import ablate

    tiny = CONFIGS["PixArt-pixel-tiny"]
    ablate(tmp_path, arms=("paper", "default"), seeds=1, steps=2, stage1_steps=2, eval_every=2, num_val=2,
           progress=False, model="PixArt-pixel-tiny", batch_size=2, kernels="torch", sample_steps=2, route_start=0,
           route_end=0, t5_train_steps=0)
    # untrained, both arms sit at the paper arm's final position score from their first evaluation: the paper arm
    # paid its stage 1 on top of the same stage-2 steps, unrouted, where the default routes block 0 of the two
    # (blocks 0 to the default end, block 0, for every arm: the recipe's blocks 1-3 need four)
    paper = 2 * 2 * flops_per_image(tiny, vae_downsample=1)
    default = 2 * 2 * flops_per_image(tiny, vae_downsample=1, route_ratio=RECIPES[2].route_ratio, route_blocks=(0, 1))
    stage1 = 2 * 2 * flops_per_image(tiny, vae_downsample=1, class_conditional=True)
    ratio = ratio_from_ablation(tmp_path / "ablation.json", "default")
    assert default < paper and ratio["ratio"] == pytest.approx((stage1 + paper) / default) == ratio["low"]
    result = plan(PAPER_SCHEDULE, "A100-80GB", mfu=0.4, ratio=ratio)
    assert result["scaled"]["flop"] == pytest.approx(result["total"]["flop"] / ratio["ratio"])
    assert result["scaled"]["gpu_days"] == pytest.approx(result["total"]["gpu_days"] / ratio["ratio"])
    assert main(["--mfu", "0.4", "--ratio-from", str(tmp_path / "ablation.json")]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATE, scaled by a ratio measured in miniature" in out and f"{ratio['ratio']:.2f}x less" in out
    with pytest.raises(ValueError, match="no arm 'mask'"):
        ratio_from_ablation(tmp_path / "ablation.json", "mask")
    with pytest.raises(ValueError, match="reached position >= 0.5 in 0 of 1 seeds; no ratio"):  # a bar by its label
        ratio_from_ablation(tmp_path / "ablation.json", "default", bar="position >= 0.5")
    with pytest.raises(ValueError, match="has no bar position >= 0.9"):
        ratio_from_ablation(tmp_path / "ablation.json", "default", bar="position >= 0.9")
