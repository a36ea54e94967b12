"""Fine-tuning released weights: LoRA through PEFT and the CAME optimizer.

A LoRA fine-tune of a diffusers-format tiny PixArt-Sigma folder on extracted features trains only the adapters,
saves and resumes them bit-identically; its exported PEFT adapter, loaded with `PeftModel.from_pretrained` onto
diffusers' PixArtTransformer2DModel of the base weights, computes what our model computes, and so does the merged
export. LoRA under bf16 autocast keeps fp32 adapters and trains without NaN. CAME trains, resumes exactly, and
keeps about half AdamW's optimizer state.
"""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from peft import PeftModel
from PIL import Image
from transformers import ByT5Tokenizer

from pixart_fast.checkpoints import load_into, load_safetensors, matching_configs, save_safetensors
from pixart_fast.export import export, main as export_main, write_diffusers
from pixart_fast.extract import extract
from pixart_fast.features import FeatureDataset
from pixart_fast.lora import load_lora
from pixart_fast.model import CONFIGS, PixArt
from pixart_fast.sample import main as sample_main
from pixart_fast.train.__main__ import config_from_args
from pixart_fast.train.loop import make_optimizer, train
from pixart_fast.train.recipes import RECIPES
from test_export import random_pixart
from test_extract import save_tiny_encoders

SIGMA = "PixArt-Sigma-tiny"  # 300 caption tokens of 24 channels, 4 latent channels, 16 x 16 latents


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    """Features for PixArt-Sigma-tiny: a 2x-downsampling VAE with 4 latent channels, a T5 of 24 channels, 300
    tokens, 32-px photographs that ship inside scikit-image, captioned by hand. The encoders sit in one folder as
    a diffusers pipeline keeps them (vae/, text_encoder/, tokenizer/), which extraction takes as it is."""
    photos = pytest.importorskip("skimage.data", reason="scikit-image not installed")
    root = tmp_path_factory.mktemp("sigma_features")
    save_tiny_encoders(root / "pipeline/vae", root / "pipeline/text_encoder", latent_channels=4, t5_channels=24)
    ByT5Tokenizer().save_pretrained(root / "pipeline/tokenizer")
    (root / "images").mkdir()
    lines = []
    for n, (photo, caption) in enumerate([("astronaut", "an astronaut in a white suit"), ("coffee", "a cup of coffee"),
                                          ("chelsea", "a tabby cat"), ("rocket", "a rocket on its launch pad")]):
        Image.fromarray(getattr(photos, photo)()).convert("RGB").resize((40, 32)).save(root / f"images/{n}.png")
        lines.append(json.dumps({"file_name": f"{n}.png", "text": caption}))
    (root / "images/metadata.jsonl").write_text("\n".join(lines) + "\n")
    extract(root / "images", root / "pipeline", root / "pipeline", root / "features", resolution=32, batch_size=2,
            max_tokens=300, progress=False)
    return root / "features"


@pytest.fixture(scope="module")
def sigma_folder(tmp_path_factory):
    """A diffusers PixArtTransformer2DModel folder of a random tiny PixArt-Sigma: the released weights' format."""
    return write_diffusers(random_pixart(SIGMA).state_dict(), CONFIGS[SIGMA], tmp_path_factory.mktemp("sigma") / "hf")


# the rate held: a 2-step run is then the first half of a 4-step one (the resume checks below)
FAST = dict(batch_size=4, log_every=1, save_every=2, num_val=3, sample_steps=2, kernels="torch", t5_train_steps=0,
            route_end=2, lr_decay=0.0)


def lora_run(out, features, sigma_folder, **kw):
    settings = dict(model=SIGMA, data=str(features), init=str(sigma_folder), out=str(out), lora_rank=4, lr=1e-2)
    return replace(RECIPES[2], **{**settings, **FAST, **kw})


def sigma_inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    y = torch.randn(2, cfg.max_tokens, cfg.caption_channels, generator=g)
    mask = torch.ones(2, cfg.max_tokens, dtype=torch.long)
    mask[0, 5:] = 0
    return x, torch.tensor([3.0, 700.0]), y, mask


def test_lora_fine_tune_of_a_diffusers_sigma_folder_exports_where_it_loads(features, sigma_folder, tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    summary = train(lora_run(tmp_path / "a", features, sigma_folder, steps=4), progress=False)
    assert np.isfinite(summary["final_loss"]) and summary["skipped_steps"] == 0
    folder = tmp_path / "a/stage2/checkpoints/step-0000004"
    saved = load_safetensors(folder / "ema.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)  # the adapters only
    assert any(v.abs().max() > 0 for k, v in saved.items() if ".lora_B." in k)  # trained (B starts at zero)

    ours = load_lora(folder / "ema.safetensors")  # the base it records, the EMA adapters
    base = diffusers.PixArtTransformer2DModel.from_pretrained(sigma_folder).eval()

    export_main(["--ckpt", str(folder), "--out", str(tmp_path / "adapter"), "--lora"])
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    export(folder, tmp_path / "merged", merge=True)
    merged = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "merged").eval()
    plain = diffusers.PixArtTransformer2DModel.from_pretrained(sigma_folder).eval()

    x, t, y, mask = sigma_inputs(CONFIGS[SIGMA])
    with torch.no_grad():
        got = ours(x, t, y, mask)
        adapted = peft_model(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
        merged_out = merged(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
        base_out = plain(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask).sample
    assert (got - base_out).abs().max() > 1e-3  # the adapters change the output: the comparisons mean something
    assert (got - adapted).abs().max().item() <= 1e-5
    assert (merged_out - adapted).abs().max().item() <= 1e-5

    # sampling with the encoders of a pipeline folder: the LoRA weights file brings its base
    pipeline = features.parent / "pipeline"
    sample_main(["--ckpt", str(folder / "ema.safetensors"), "--t5", str(pipeline), "--vae", str(pipeline),
                 "--prompt", "a cat", "--out", str(tmp_path / "cat.png"), "--steps", "2"])
    assert (tmp_path / "cat.png").stat().st_size > 0

    # resume is bit-identical: 2 steps, then on to 4, equals 4 straight
    train(lora_run(tmp_path / "b", features, sigma_folder, steps=2), progress=False)
    train(lora_run(tmp_path / "b", features, sigma_folder, steps=4, init=None, resume="latest"), progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = load_safetensors(folder / name), load_safetensors(tmp_path / "b/stage2/checkpoints/step-0000004" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_lora_in_bf16_autocast_keeps_fp32_adapters_and_trains_without_nan(tmp_path):
    save_safetensors(random_pixart("PixArt-pixel-tiny").state_dict(), tmp_path / "base.safetensors")
    cfg = replace(RECIPES[2], model="PixArt-pixel-tiny", init=str(tmp_path / "base.safetensors"), out=str(tmp_path),
                  lora_rank=8, precision="bf16", steps=6, **FAST)
    summary = train(cfg, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "stage2/metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in lines if "loss" in m]
    assert len(losses) == 6 and np.isfinite(losses).all() and summary["skipped_steps"] == 0
    adapters = load_safetensors(tmp_path / "stage2/checkpoints/step-0000006/model.safetensors")
    assert {v.dtype for v in adapters.values()} == {torch.float32}
    # sampling takes the LoRA run's weights file as it takes any checkpoint (the base it records, the adapters)
    ema = tmp_path / "stage2/checkpoints/step-0000006/ema.safetensors"
    sample_main(["--ckpt", str(ema), "--prompt", "a red circle", "--out", str(tmp_path / "s.png"), "--steps", "2"])
    assert (tmp_path / "s.png").stat().st_size > 0


def test_lora_refuses_what_it_cannot_do(features, sigma_folder, tmp_path):
    with pytest.raises(ValueError, match="adapts existing weights, but there are none"):
        train(replace(RECIPES[2], model="PixArt-pixel-tiny", out=str(tmp_path), lora_rank=4, steps=1, **FAST),
              progress=False)
    with pytest.raises(ValueError, match="stage 1 trains a DiT"):
        train(replace(RECIPES[1], model="PixArt-pixel-tiny", out=str(tmp_path), lora_rank=4, steps=1, **FAST),
              progress=False)
    with pytest.raises(ValueError, match="'attn.nothing' names no Linear layer"):
        train(lora_run(tmp_path / "c", features, sigma_folder, steps=1, lora_targets="attn,attn.nothing"),
              progress=False)
    with pytest.raises(ValueError, match="latents of 16x16 but model big is made for 64x64"):  # 16 times the tokens
        FeatureDataset(features).check_model(replace(CONFIGS[SIGMA], input_size=64), "big", class_conditional=False)
    train(lora_run(tmp_path / "e", features, sigma_folder, steps=1), progress=False)
    with pytest.raises(ValueError, match="pass --lora .* or --merge"):
        export(tmp_path / "e/stage2/checkpoints/step-0000001", tmp_path / "x")


def test_only_the_targeted_layers_get_adapters():
    from pixart_fast.lora import add_lora

    model = add_lora(PixArt(CONFIGS["PixArt-tiny"], kernels="torch"), 2, targets="cross,mlp.fc2")
    adapted = sorted({n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad})
    assert adapted == [f"blocks.{i}.{m}" for i in range(2) for m in
                       ("cross_attn.kv_linear", "cross_attn.proj", "cross_attn.q_linear", "mlp.fc2")]
    d = CONFIGS["PixArt-tiny"].hidden_size
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * (
        (d + d) + (d + 2 * d) + (d + d) + (4 * d + d))


def optimizer_state_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
               if torch.is_tensor(v) and v.dim() > 0)


def test_came_keeps_about_half_adamws_state_and_resumes_exactly(tmp_path):
    model = PixArt(CONFIGS["PixArt-pixel-32"], kernels="torch")
    sizes = {}
    for kind in ("adamw", "came"):
        opt = make_optimizer(list(model.parameters()), replace(RECIPES[2], optimizer=kind))
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        sizes[kind] = optimizer_state_bytes(opt)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert sizes["adamw"] == 2 * params
    assert sizes["came"] <= 0.55 * sizes["adamw"]

    cfg = replace(RECIPES[2], model="PixArt-pixel-tiny", optimizer="came", **FAST)
    train(replace(cfg, out=str(tmp_path / "a"), steps=4), progress=False)
    train(replace(cfg, out=str(tmp_path / "b"), steps=2), progress=False)
    train(replace(cfg, out=str(tmp_path / "b"), steps=4, resume="latest"), progress=False)
    for name in ("model.safetensors", "ema.safetensors"):
        a = load_safetensors(tmp_path / "a/stage2/checkpoints/step-0000004" / name)
        b = load_safetensors(tmp_path / "b/stage2/checkpoints/step-0000004" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_released_weights_name_the_model_they_fit(sigma_folder, tmp_path):
    model = random_pixart("PixArtMS-tiny")
    official = {**model.state_dict(), "pos_embed": model.pos_embed}  # as the official .pth files hold it
    torch.save({"state_dict": official}, tmp_path / "ms.pth")
    assert matching_configs(sigma_folder) == [SIGMA]
    assert matching_configs(tmp_path / "ms.pth") == ["PixArtMS-tiny"]  # not PixArt-tiny: it has size embedders
    # without --model, --init of released weights picks the model they fit; ours record theirs (stage 3 from 2)
    assert config_from_args(["--init", str(sigma_folder)]).model == SIGMA
    assert config_from_args(["--init", str(tmp_path / "ms.pth"), "--model", "PixArt-tiny"]).model == "PixArt-tiny"
    export(tmp_path / "ms.pth", tmp_path / "ms")  # export and sampling take them without --model too
    assert json.loads((tmp_path / "ms/config.json").read_text())["use_additional_conditions"] is True
    # weights loaded at another resolution are allowed (PixArt's own 512 -> 1024 step) and said so
    bigger = PixArt(replace(CONFIGS[SIGMA], input_size=32, pe_interpolation=4.0), kernels="torch")
    assert "note: made for PixArt-Sigma-tiny, now at input size 32" in load_into(bigger, sigma_folder)


def test_lora_keeps_the_fused_kernels_on_the_frozen_parts():
    """PEFT wraps the Linear layers only: the block's fused kernels (modulation, cross-attention; Triton through
    the interpreter here) still run, and the LoRA model with them equals the one on PyTorch, gradients included."""
    from pixart_fast.lora import add_lora

    weights = random_pixart("PixArt-tiny").state_dict()
    models = {}
    for kernels in ("triton", "torch"):
        model = PixArt(CONFIGS["PixArt-tiny"], kernels=kernels)
        model.load_state_dict(weights)
        torch.manual_seed(0)
        models[kernels] = add_lora(model, 4)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:  # B starts at zero: give the adapters an effect
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
    cfg = CONFIGS["PixArt-tiny"]
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 500.0])
    y, mask = torch.randn(2, cfg.max_tokens, cfg.caption_channels), torch.ones(2, cfg.max_tokens)
    outs, grads = {}, {}
    for kernels, model in models.items():
        out = model(x, t, y, mask)
        out.square().mean().backward()
        outs[kernels] = out.detach()
        grads[kernels] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-4, atol=1e-5)
    for n in grads["torch"]:
        torch.testing.assert_close(grads["triton"][n], grads["torch"][n], rtol=1e-3, atol=1e-5)


def test_selective_recomputation_recomputes_the_adapters_and_keeps_the_gradients():
    """Selective recomputation keeps matmul outputs, but not a LoRA adapter's: its products go through the narrow
    rank (x A^T: D -> r, B: r -> D), cheap to recompute, while keeping B's output would keep one more (T, D) per
    adapted Linear. The gradients stay those of no recomputation."""
    from pixart_fast.lora import add_lora
    from pixart_fast.model import _low_rank

    mm, addmm = torch.ops.aten.mm.default, torch.ops.aten.addmm.default
    assert _low_rank(mm, (torch.empty(10, 1152), torch.empty(1152, 16)))  # x A^T
    assert _low_rank(mm, (torch.empty(10, 16), torch.empty(16, 3456)))  # (x A^T) B^T
    assert not _low_rank(addmm, (torch.empty(4608), torch.empty(10, 1152), torch.empty(1152, 4608)))  # fc1
    assert not _low_rank(addmm, (torch.empty(192), torch.empty(10, 48), torch.empty(48, 192)))  # a tiny model's fc1

    weights = random_pixart("PixArt-tiny").state_dict()
    grads = {}
    for recompute in ("none", "selective"):
        model = PixArt(CONFIGS["PixArt-tiny"], kernels="torch", recompute=recompute)
        model.load_state_dict(weights)
        torch.manual_seed(0)
        add_lora(model, 4).train()
        cfg = CONFIGS["PixArt-tiny"]
        g = torch.Generator().manual_seed(3)
        x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 500.0])
        y = torch.randn(2, cfg.max_tokens, cfg.caption_channels, generator=g)
        model(x, t, y, torch.ones(2, cfg.max_tokens)).square().mean().backward()
        grads[recompute] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for n, grad in grads["none"].items():
        torch.testing.assert_close(grads["selective"][n], grad, rtol=1e-5, atol=1e-7)


def test_the_resume_command_of_a_lora_run_keeps_its_base():
    from pixart_fast.train.loop import resume_command

    cfg = replace(RECIPES[2], init="sigma/transformer", lora_rank=16, data="features", out="runs/mine")
    command = resume_command(cfg)
    assert "--init sigma/transformer" in command and "--lora-rank 16" in command and command.endswith("--resume latest")
    assert "--init" not in resume_command(replace(cfg, lora_rank=0))  # full training: the checkpoint holds it all
