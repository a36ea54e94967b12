"""Export to diffusers: the folder loads with PixArtTransformer2DModel.from_pretrained and computes what our model
computes; the right weights and config are picked, and wrong inputs are refused."""
import json

import pytest
import torch
from safetensors.torch import load_file

from pixart_fast.checkpoints import CheckpointMismatch, load_pixart, save_safetensors, to_diffusers
from pixart_fast.export import diffusers_config, export, main
from pixart_fast.model import CONFIGS, DiT, PixArt


def random_pixart(name, seed=0):
    """Our model with random weights everywhere (zero-initialised layers included, so every path counts)."""
    torch.manual_seed(seed)
    model = PixArt(CONFIGS[name], kernels="torch").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.0 / p.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("name", ["PixArt-tiny", "PixArtMS-tiny", "PixArtMS-pixel-tiny", "PixArt-Sigma-tiny"])
def test_exported_folder_loads_in_diffusers_and_matches(name, tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    cfg = CONFIGS[name]
    ours = random_pixart(name)
    save_safetensors(ours.state_dict(), tmp_path / "ckpt.safetensors", {"model": name})
    main(["--ckpt", str(tmp_path / "ckpt.safetensors"), "--out", str(tmp_path / "hf"), "--format", "diffusers"])
    ref = diffusers.PixArtTransformer2DModel.from_pretrained(tmp_path / "hf").eval()
    assert ref.config.interpolation_scale == cfg.pe_interpolation
    assert ref.use_additional_conditions == cfg.micro_conditions

    g = torch.Generator().manual_seed(1)
    for H, W in [(cfg.input_size, cfg.input_size), (cfg.input_size // 2, cfg.input_size)]:
        x = torch.randn(2, cfg.in_channels, H, W, generator=g)
        t = torch.tensor([3.0, 700.0])
        y = torch.randn(2, cfg.max_tokens, cfg.caption_channels, generator=g)
        mask = torch.ones(2, cfg.max_tokens, dtype=torch.long)
        mask[0, 3:] = 0
        kwargs, extra = {}, ()
        if cfg.micro_conditions:
            img_hw = torch.tensor([[256.0, 512.0], [1024.0, 768.0]])
            ratio = img_hw[:, :1] / img_hw[:, 1:]
            kwargs, extra = {"added_cond_kwargs": {"resolution": img_hw, "aspect_ratio": ratio}}, (img_hw, ratio)
        with torch.no_grad():
            expected = ref(x, encoder_hidden_states=y, timestep=t, encoder_attention_mask=mask, **kwargs).sample
            got = ours(x, t, y, mask, *extra)
        assert got.shape == expected.shape == (2, cfg.out_channels, H, W)
        assert expected.abs().max() > 0.1  # a meaningful comparison, not two zeros
        assert (got - expected).abs().max().item() <= 1e-5


def test_trainer_folder_exports_the_ema_weights_by_default(tmp_path):
    folder = tmp_path / "step-0000010"
    folder.mkdir()
    model, ema = random_pixart("PixArt-tiny", seed=1).state_dict(), random_pixart("PixArt-tiny", seed=2).state_dict()
    save_safetensors(model, folder / "model.safetensors", {"model": "PixArt-tiny"})
    save_safetensors(ema, folder / "ema.safetensors", {"model": "PixArt-tiny"})
    for weights, sd in (("ema", ema), ("model", model)):
        export(folder, tmp_path / weights, weights=weights)
        written = load_file(tmp_path / weights / "diffusion_pytorch_model.safetensors")
        expected = to_diffusers(sd)
        assert written.keys() == expected.keys() and all(torch.equal(written[k], expected[k]) for k in written)
    config = json.loads((tmp_path / "ema" / "config.json").read_text())
    assert config["_class_name"] == "PixArtTransformer2DModel" and config["num_layers"] == 2


def test_bad_exports_are_refused(tmp_path):
    sd = random_pixart("PixArt-tiny").state_dict()
    save_safetensors(sd, tmp_path / "bare.safetensors")  # no model name recorded
    with pytest.raises(ValueError, match="pass --model"):
        export(tmp_path / "bare.safetensors", tmp_path / "out")
    with pytest.raises(CheckpointMismatch, match="shape mismatch"):
        export(tmp_path / "bare.safetensors", tmp_path / "out", model="PixArt-pixel-tiny")
    export(tmp_path / "bare.safetensors", tmp_path / "out", model="PixArt-tiny")  # named: fine
    save_safetensors(DiT(CONFIGS["PixArt-tiny"]).state_dict(), tmp_path / "dit.safetensors", {"model": "PixArt-tiny"})
    with pytest.raises(ValueError, match="class-conditional DiT"):
        export(tmp_path / "dit.safetensors", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown format"):
        export(tmp_path / "bare.safetensors", tmp_path / "out", format="onnx", model="PixArt-tiny")


@pytest.mark.parametrize("name", ["PixArt-Sigma-XL/2-512", "PixArt-Sigma-XL/2-1024", "PixArt-Sigma-XL/2-2K"])
def test_sigma_config_json_is_what_diffusers_hub_folders_hold(name):
    """The released Sigma transformers' config.json (diffusers' convert_pixart_sigma_to_diffusers.py): sample_size
    px / 8, interpolation_scale 1 / 2 / 4 and use_additional_conditions false written out, not left to diffusers'
    guesses (it would turn micro-conditions on at sample_size 128). The caption length (300) is no config field:
    diffusers' PixArtSigmaPipeline takes it as max_sequence_length, 300 by default."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    cfg = CONFIGS[name]
    config = diffusers_config(cfg)
    assert (config["sample_size"], config["interpolation_scale"], config["use_additional_conditions"]) == (
        cfg.input_size, {64: 1.0, 128: 2.0, 256: 4.0}[cfg.input_size], False)
    assert config["caption_channels"] == 4096 and config["num_layers"] == 28 and config["attention_head_dim"] == 72
    assert set(config) - {"_class_name"} <= set(diffusers.PixArtTransformer2DModel.extract_init_dict(config)[0])


def test_exported_sigma_folder_round_trips(tmp_path):
    """Export a Sigma checkpoint, load the folder back through our loaders: the same weights (the null caption is the
    model's own: diffusers keeps none)."""
    ours = random_pixart("PixArt-Sigma-tiny")
    save_safetensors(ours.state_dict(), tmp_path / "ckpt.safetensors", {"model": "PixArt-Sigma-tiny"})
    export(tmp_path / "ckpt.safetensors", tmp_path / "hf")
    back = load_pixart(tmp_path / "hf", "PixArt-Sigma-tiny", kernels="torch").state_dict()
    expected = ours.state_dict()
    assert all(torch.equal(back[k], v) for k, v in expected.items() if k != "y_embedder.y_embedding")
