"""Checkpoint formats: ours, official .pth, DiT .pt, diffusers folders; strict loading; pickles refused."""
import pickle

import pytest
import torch

from pixart_fast.checkpoints import (CheckpointMismatch, load_any, load_state_dict_strict, save_safetensors,
                                     to_diffusers)
from pixart_fast.model import CONFIGS, DiT, PixArt

TINY = CONFIGS["PixArt-tiny"]


def test_our_safetensors_round_trip(tmp_path):
    model = PixArt(TINY, kernels="torch")
    save_safetensors(model.state_dict(), tmp_path / "m.safetensors", metadata={"step": 3})
    kind, sd = load_any(tmp_path / "m.safetensors")
    assert kind == "pixart_fast"
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_official_pth_with_state_dict_key_and_pos_embed(tmp_path):
    model = PixArt(TINY, kernels="torch")
    sd = dict(model.state_dict(), pos_embed=torch.zeros(1, 16, TINY.hidden_size))
    torch.save({"state_dict": sd, "step": 10}, tmp_path / "PixArt-tiny.pth")
    kind, loaded = load_any(tmp_path / "PixArt-tiny.pth")
    assert kind == "official" and "pos_embed" not in loaded
    other = PixArt(TINY, kernels="torch")
    load_state_dict_strict(other, loaded)
    assert torch.equal(other.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_dit_pt_is_recognised(tmp_path):
    dit = DiT(TINY)
    torch.save(dit.state_dict(), tmp_path / "DiT-tiny.pt")
    kind, sd = load_any(tmp_path / "DiT-tiny.pt")
    assert kind == "dit"
    load_state_dict_strict(DiT(TINY), sd)


def test_diffusers_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    ref = diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=24, in_channels=4,
                                             out_channels=8, num_layers=2, cross_attention_dim=48, sample_size=8,
                                             caption_channels=24, interpolation_scale=1,
                                             use_additional_conditions=False)
    ref.save_pretrained(tmp_path / "transformer")
    kind, sd = load_any(tmp_path)  # a pipeline-style folder with transformer/ inside
    assert kind == "diffusers"
    model = PixArt(TINY, kernels="torch")
    load_state_dict_strict(model, sd, allow_missing=("y_embedder.y_embedding",))
    assert to_diffusers(model.state_dict()).keys() == ref.state_dict().keys()


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pth_carrying_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": Evil()}}, f)
    with pytest.raises(ValueError, match="refused"):
        load_any(path)
    assert "this must never run" not in capsys.readouterr().out


def test_mismatch_lists_missing_unexpected_and_shapes():
    sd = PixArt(TINY, kernels="torch").state_dict()
    sd.pop("t_block.1.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["final_layer.linear.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatch) as e:
        load_state_dict_strict(PixArt(TINY, kernels="torch"), sd)
    msg = str(e.value)
    assert "missing (1): t_block.1.bias" in msg
    assert "unexpected (1): extra.weight" in msg
    assert "final_layer.linear.weight: checkpoint (3, 3) vs model (32, 48)" in msg


def test_unknown_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_any(tmp_path / "nope.safetensors")
    (tmp_path / "w.txt").write_text("hi")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_any(tmp_path / "w.txt")
