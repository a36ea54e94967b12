"""When things go wrong: every fault of docs/faults.md gets a clear message naming the offending value or
path, and leaves no partial output behind. The trainer (interrupted saves, non-finite steps and weights,
checkpoints that do not fit, pickled code), the extractor (missing and corrupt images, empty and long captions,
small images, metadata that is not JSON), feature chunks of the wrong shape or dtype, and the kernels' inputs
(strided, mixed dtypes or devices, unsupported sizes; backend="triton" under TRITON_INTERPRET=1)."""
import contextlib
import copy
import io
import json
import pickle
import re
import shutil
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pixart_fast.checkpoints import CheckpointMismatch, load_safetensors, save_safetensors
from pixart_fast.diffusion import Diffusion
from pixart_fast.distributed import Dist
from pixart_fast.extract import extract, read_records, write_chunk_manifest
from pixart_fast.features import FeatureDataset
from pixart_fast.kernels.cross_attn import cross_attention, cross_attention_ref
from pixart_fast.kernels.modulation import (gated_residual, gated_residual_modulate, gated_residual_modulate_ref,
                                          gated_residual_ref, modulate, modulate_ref)
from pixart_fast.kernels.patch_copy import patchify, patchify_ref, unpatchify, unpatchify_ref
from pixart_fast.model import CONFIGS, PixArt
from pixart_fast.train.loop import train
from pixart_fast.train.stages import STAGES
from pixart_fast.train.run_folder import latest_checkpoint, save_checkpoint
from pixart_fast.train.recipes import RECIPES
from test_extract import encoders, picture  # noqa: F401 (encoders: the tiny VAE and T5 folders, a fixture)

FAST = dict(model="PixArt-pixel-tiny", batch_size=4, log_every=1, save_every=1, num_val=2, sample_steps=2,
            kernels="torch", t5_train_steps=0, route_end=2)


def tiny(tmp_path, **kw):
    """Stage 2's recipe with the tiny model and a fast schedule; kw overrides."""
    return replace(RECIPES[2], **{**FAST, "out": str(tmp_path), **kw})


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "stage2/metrics.jsonl").read_text().splitlines()]


def weights(out, step: int, name: str = "model") -> dict:
    return load_safetensors(out / "stage2/checkpoints" / f"step-{step:07d}" / f"{name}.safetensors")


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------


def test_save_safetensors_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    save_safetensors({"w": torch.ones(3)}, path)

    def crash(tensors, filename, metadata=None):  # dies halfway through writing
        open(filename, "wb").write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr("pixart_fast.checkpoints.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors({"w": torch.zeros(3)}, path)
    assert torch.equal(load_safetensors(path)["w"], torch.ones(3))  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary file left


def test_an_interrupted_save_leaves_the_last_checkpoint_latest_and_keep_prunes(tmp_path, monkeypatch, capsys):
    train(tiny(tmp_path, steps=2), progress=False)

    def crash(obj, f):  # trainer.pt, the last file of a checkpoint: the model and EMA files are written by now
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch, "save", crash)
        with pytest.raises(KeyboardInterrupt):
            train(tiny(tmp_path, steps=4, resume="latest"), progress=False)
    ckpts = tmp_path / "stage2/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000001", "step-0000002", "step-0000003.tmp"]
    assert latest_checkpoint(tmp_path / "stage2").name == "step-0000002"
    capsys.readouterr()
    train(tiny(tmp_path, steps=4, resume="latest", keep=2), progress=False)
    out = capsys.readouterr().out
    assert f"deleted {ckpts / 'step-0000003.tmp'}, left incomplete by an interrupted save" in out
    assert f"resumed from {ckpts / 'step-0000002'} at step 2" in out
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003", "step-0000004"]  # --keep 2
    assert [m["step"] for m in metrics(tmp_path) if "loss" in m] == [1, 2, 3, 4]


def test_non_finite_weights_are_never_saved(tmp_path):
    cfg = tiny(tmp_path, steps=1)
    model = STAGES[cfg.stage].build_model(cfg)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        ema.blocks[1].mlp.fc1.weight[0, 0] = float("inf")
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    run = tmp_path / "stage2"
    with pytest.raises(FloatingPointError, match=r"refusing to write checkpoint .*step-0000005: the EMA weights hold "
                                                 r"NaN or inf in 1 tensors \(blocks.1.mlp.fc1.weight\)"):
        save_checkpoint(run, 5, model, ema, opt, sched, 0, cfg, Dist())
    assert not (run / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------------------
# Non-finite steps
# ----------------------------------------------------------------------------------------------------------


def nan_loss_at(monkeypatch, bad_steps) -> None:
    """Make the training loss NaN at the given steps (1-based), as an overflow would: NaN gradients follow."""
    real, calls = Diffusion.training_losses, []

    def losses(self, *args, **kwargs):
        terms = real(self, *args, **kwargs)
        calls.append(1)
        if len(calls) in bad_steps:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(Diffusion, "training_losses", losses)


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {3, 4})
    summary = train(tiny(tmp_path, steps=6, lr_decay=0.0), progress=False)  # all six steps in the warm-up
    lines = [m for m in metrics(tmp_path) if "loss" in m]
    assert [m["skipped_steps"] for m in lines] == [0, 0, 1, 2, 2, 2] and summary["skipped_steps"] == 2
    assert not np.isfinite(lines[2]["loss"]) and np.isfinite(lines[4]["loss"])
    for name in ("model", "ema"):  # steps 3 and 4 changed nothing; step 5 trained again
        a, b, c = weights(tmp_path, 2, name), weights(tmp_path, 4, name), weights(tmp_path, 5, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        assert not all(torch.equal(b[k], c[k]) for k in b), name
    warmup = RECIPES[2].warmup  # the schedule counts skipped steps too: lr after step s is lr * (s + 1) / warmup
    assert [m["lr"] for m in lines] == pytest.approx([RECIPES[2].lr * (s + 1) / warmup for s in range(1, 7)])


def test_too_many_non_finite_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, set(range(3, 100)))
    ckpt = tmp_path / "stage2/checkpoints/step-0000005"
    with pytest.raises(FloatingPointError, match=f"stopping at step 6: steps 3 to 6 all had a non-finite loss or "
                                                 rf"gradient norm \(--max-bad-steps 4\). The last good checkpoint is "
                                                 f"{re.escape(str(ckpt))}"):
        train(tiny(tmp_path, steps=10, max_bad_steps=4), progress=False)
    assert latest_checkpoint(tmp_path / "stage2") == ckpt  # finite weights: those of step 2
    assert all(torch.equal(v, weights(tmp_path, 2)[k]) for k, v in weights(tmp_path, 5).items())


# ----------------------------------------------------------------------------------------------------------
# What the trainer starts from
# ----------------------------------------------------------------------------------------------------------


def test_a_checkpoint_of_another_config_is_refused_by_init_and_resume(tmp_path):
    other = tmp_path / "PixArt-tiny.safetensors"  # 4 latent channels and 24-dim captions, not 3 and 64
    save_safetensors(PixArt(CONFIGS["PixArt-tiny"]).state_dict(), other)
    mismatch = r"shape mismatch \(5\): .*x_embedder.proj.weight: checkpoint \(48, 4, 2, 2\) vs model \(48, 3, 2, 2\)"
    with pytest.raises(CheckpointMismatch, match=rf"--init {re.escape(str(other))} does not fit (.|\n)*{mismatch}"):
        train(tiny(tmp_path, init=str(other), steps=1), progress=False)
    assert not (tmp_path / "stage2/checkpoints").exists()
    train(tiny(tmp_path, steps=1), progress=False)
    ckpt = tmp_path / "stage2/checkpoints/step-0000001"
    with pytest.raises(CheckpointMismatch, match=rf"--resume {re.escape(str(ckpt))}/model.safetensors does not fit "
                                                 r"PixArt(.|\n)*missing \(\d+\): csize_embedder"):
        train(tiny(tmp_path, model="PixArtMS-pixel-tiny", resume="latest", steps=2), progress=False)
    with pytest.raises(FileNotFoundError, match=f"--resume {re.escape(str(tmp_path))}: not a checkpoint folder"):
        train(tiny(tmp_path, resume=str(tmp_path), steps=2), progress=False)
    assert [p.name for p in (tmp_path / "stage2/checkpoints").iterdir()] == ["step-0000001"]


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_init_refuses_pickled_code_and_non_finite_weights(tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"state_dict": {"x": Evil()}}, protocol=2))
    with pytest.raises(ValueError, match=f"{re.escape(str(evil))}: refused to load"):
        train(tiny(tmp_path, init=str(evil), steps=1), progress=False)
    assert "this must never run" not in capsys.readouterr().out
    sd = PixArt(CONFIGS["PixArt-pixel-tiny"]).state_dict()
    sd["t_block.1.bias"][3] = float("nan")
    save_safetensors(sd, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"nan.safetensors: NaN or inf in 1 tensors \(t_block.1.bias\)"):
        train(tiny(tmp_path, init=str(tmp_path / "nan.safetensors"), steps=1), progress=False)
    assert not (tmp_path / "stage2/checkpoints").exists()


# ----------------------------------------------------------------------------------------------------------
# Extraction: one folder holding every kind of bad input, extracted once
# ----------------------------------------------------------------------------------------------------------

LONG = "a very long caption that goes on " * 4 + "and on"  # 138 bytes: 139 ByT5 tokens with EOS
MESSY = [  # (file, caption); None: the file is written below as something that is not an image
    ("good0.png", "an astronaut in a white suit"),
    ("missing.png", "a file the metadata lists but nobody saved"),
    ("corrupt.jpg", "bytes that are not a JPEG"),
    ("cut.png", "a PNG cut in half"),
    ("empty.png", ""),
    ("long.png", LONG),
    ("small.png", "a coffee cup only 12 pixels wide"),
    ("good1.png", "a tabby cat"),
]


@pytest.fixture(scope="module")
def messy(tmp_path_factory, encoders):  # noqa: F811
    """(images folder, extraction folder, summary, printed output, warnings) of one extraction at 32 px."""
    root = tmp_path_factory.mktemp("messy")
    for name, photo in (("good0.png", "astronaut"), ("empty.png", "coffee"), ("long.png", "chelsea"),
                        ("good1.png", "chelsea")):
        picture(photo, 48, 40).save(root / name)
    picture("coffee", 12, 10).save(root / "small.png")
    (root / "corrupt.jpg").write_bytes(b"this is not a JPEG")
    whole = io.BytesIO()
    picture("astronaut", 48, 40).save(whole, format="PNG")
    (root / "cut.png").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": c}) + "\n" for f, c in MESSY))
    out = root / "features"
    printed = io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        summary = extract(root, *encoders, out, resolution=32, batch_size=2, chunk_size=4, progress=False)
    return root, out, summary, printed.getvalue(), [str(w.message) for w in caught]


def sample_of(out, file: str) -> dict:
    data = FeatureDataset(out)
    index = [r.file for r in read_records(out.parent / "metadata.jsonl")].index(file)
    return data[data.records.index(index)]


def test_missing_and_corrupt_images_are_skipped_reported_and_counted(messy):
    root, out, summary, printed, _ = messy
    bad = [str(root / f) for f in ("missing.png", "corrupt.jpg", "cut.png")]
    assert [path for path, _ in summary["unreadable"]] == bad
    assert summary["encoded"] == len(MESSY) - 3 and len(FeatureDataset(out)) == len(MESSY) - 3
    for path in bad:
        assert f"skipped unreadable image {path} (" in printed
    assert "skipped 3 unreadable" in printed
    with safe_open(str(out / "chunk-000000.safetensors"), "pt") as f:  # the chunk keeps the list too
        assert [path for _, path, _ in json.loads(f.metadata()["skipped"])] == bad
    assert not list(out.glob("*.tmp*"))


def test_an_empty_caption_is_kept_warned_once_and_counted(messy):
    root, out, summary, printed, _ = messy
    assert summary["empty_captions"] == 1
    assert f"{root / 'empty.png'}: empty caption, kept" in printed
    assert sample_of(out, "empty.png")["mask"].sum() == 1  # T5's end-of-sequence token alone


def test_a_caption_over_120_tokens_is_truncated_warned_once_and_counted(messy):
    _, out, summary, printed, caught = messy
    assert summary["truncated_captions"] == 1 and "1 truncated captions" in printed
    warned = [w for w in caught if "exceed 120 tokens" in w]
    assert len(warned) == 1 and f"(longest 139; first {LONG[:60]!r}...) and were truncated" in warned[0]
    assert sample_of(out, "long.png")["mask"].sum() == 120


def test_an_image_smaller_than_the_target_is_upscaled_warned_and_counted(messy):
    root, out, summary, printed, _ = messy
    assert summary["upscaled"] == 1
    assert f"{root / 'small.png'}: 10 x 12 px is smaller than its target 32 x 32: upscaled" in printed
    sample = sample_of(out, "small.png")
    assert sample["latent_mean"].shape == (3, 16, 16) and sample["img_hw"].tolist() == [10, 12]


def test_a_metadata_line_that_is_not_json_stops_before_any_output(encoders, tmp_path):  # noqa: F811
    lines = [json.dumps({"file_name": "a.png", "text": "fine"}), "", '{"file_name": "b.png", "text": ']
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}/metadata.jsonl, line 3: not JSON \("):
        extract(tmp_path, *encoders, tmp_path / "out", progress=False)
    (tmp_path / "metadata.jsonl").write_text(lines[0] + '\n["b.png", "a list"]\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 2, record 1: expected a JSON object"):
        extract(tmp_path, *encoders, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Feature chunks
# ----------------------------------------------------------------------------------------------------------


def rewrite(path, **changes) -> None:
    """Rewrite a chunk with some tensors replaced (None: removed), its metadata kept, and its manifest, as a
    writer of such a chunk would (else the dataset refuses it as damaged, before looking inside)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = {k: v for k, v in {**load_file(path), **changes}.items() if v is not None}
    save_file(tensors, str(path), metadata=meta)
    write_chunk_manifest(path)


def test_a_feature_chunk_of_the_wrong_shape_or_dtype_is_named(messy, tmp_path):
    out = tmp_path / "features"
    shutil.copytree(messy[1], out)
    chunk = out / "chunk-000001.safetensors"
    tensors = load_file(chunk)
    r = int(tensors["index"][0])
    i = FeatureDataset(out).records.index(r)
    rewrite(chunk, **{f"{r}.mean": torch.zeros(3, 8, 8)})
    data = FeatureDataset(out)  # the tables are fine: the dataset opens
    with pytest.raises(ValueError, match=rf"feature chunk {re.escape(str(chunk))}: '{r}.mean' should be float32 or "
                                         r"bfloat16 of shape \(3, 16, 16\), found float32 of shape \(3, 8, 8\)"):
        data[i]
    rewrite(chunk, **{f"{r}.mean": tensors[f"{r}.mean"], f"{r}.text": tensors[f"{r}.text"].double()})
    with pytest.raises(ValueError, match=rf"'{r}.text' should be float32 or bfloat16 of shape \(1, 64\), found "
                                         r"float64 of shape \(1, 64\)"):  # the empty caption: 1 token
        FeatureDataset(out)[i]
    rewrite(chunk, **{f"{r}.text": tensors[f"{r}.text"], f"{r}.std": None})
    with pytest.raises(ValueError, match=rf"{re.escape(str(chunk))} has no tensor '{r}.std'; delete it and rerun"):
        FeatureDataset(out)[i]
    rewrite(chunk, **{f"{r}.std": tensors[f"{r}.std"], "tokens": tensors["tokens"].long()})  # a table: refused at
    cfg = replace(RECIPES[2], **FAST, data=str(out), out=str(tmp_path / "run"), steps=1)  # start, here by train()
    with pytest.raises(ValueError, match=r"'tokens' should be int32 of shape \(4,\), found int64 of shape \(4,\)"):
        train(cfg, progress=False)
    assert not (tmp_path / "run/stage2/checkpoints").exists()
    rewrite(chunk, tokens=tensors["tokens"])
    assert torch.equal(FeatureDataset(out)[i]["latent_mean"], FeatureDataset(messy[1])[i]["latent_mean"])  # whole again
    chunk.write_bytes(chunk.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"feature chunk {re.escape(str(chunk))} is not a readable safetensors"):
        FeatureDataset(out)


# ----------------------------------------------------------------------------------------------------------
# Kernel inputs: backend="triton" (the CPU interpreter here). "meta" stands in for a second device.
# ----------------------------------------------------------------------------------------------------------


def strided(*shape, seed=0):
    """A random (..., D) tensor whose last dimension is not unit-stride (a transposed view)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2)


def every_other(B, D, seed=0):
    """A random (B, D) view that reads every other element of a (B, 2D) tensor."""
    return torch.randn(B, 2 * D, generator=torch.Generator().manual_seed(seed))[:, ::2]


def test_modulate_inputs():
    x, shift, scale = strided(2, 5, 16), every_other(2, 16, seed=1), every_other(2, 16, seed=2)
    out = modulate(x, shift, scale, backend="triton")  # strided views are read or copied: the same result
    assert torch.equal(out, modulate(x.contiguous(), shift.contiguous(), scale.contiguous(), backend="triton"))
    torch.testing.assert_close(out, modulate_ref(x, shift, scale))
    mixed = modulate(x.bfloat16(), shift, scale, backend="triton")  # dtypes promote as in torch: float32 here
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, modulate_ref(x.bfloat16().float(), shift, scale))
    with pytest.raises(TypeError, match="support .*got torch.float64; cast the inputs or use backend='torch'"):
        modulate(x.double(), shift.double(), scale.double(), backend="triton")
    with pytest.raises(ValueError, match="scale is on meta but x is on cpu"):
        modulate(x, shift, scale.to("meta"), backend="triton")
    wide = torch.zeros(1, 1, 8200)
    with pytest.raises(ValueError, match="D <= 8192 values per program, got D = 8200; use backend='torch'"):
        modulate(wide, wide[:, 0], wide[:, 0], backend="triton")


def test_gated_residual_inputs():
    x, y, gate = strided(2, 5, 16), strided(2, 5, 16, seed=1), every_other(2, 16, seed=2)
    out = gated_residual(x, gate, y, backend="triton")
    assert torch.equal(out, gated_residual(x.contiguous(), gate.contiguous(), y.contiguous(), backend="triton"))
    torch.testing.assert_close(out, gated_residual_ref(x, gate, y))
    mixed = gated_residual(x.half(), gate, y.bfloat16(), backend="triton")
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, gated_residual_ref(x.half().float(), gate, y.bfloat16().float()))
    with pytest.raises(TypeError, match="got torch.float64"):
        gated_residual(x, gate.double(), y, backend="triton")
    with pytest.raises(ValueError, match="y is on meta but x is on cpu"):
        gated_residual(x, gate, y.to("meta"), backend="triton")
    with pytest.raises(ValueError, match=r"gate must be \(B, D\) = \(2, 16\) .* got \(2, 1, 16\)"):
        gated_residual(x, gate[:, None], y, backend="triton")


def test_gated_residual_modulate_inputs():
    x, y = strided(2, 5, 16), strided(2, 5, 16, seed=1)
    gate, shift, scale = (every_other(2, 16, seed=s) for s in (2, 3, 4))
    h, m = gated_residual_modulate(x, gate, y, shift, scale, backend="triton")
    hc, mc = gated_residual_modulate(*(t.contiguous() for t in (x, gate, y, shift, scale)), backend="triton")
    assert torch.equal(h, hc) and torch.equal(m, mc)
    for got, want in zip((h, m), gated_residual_modulate_ref(x, gate, y, shift, scale)):
        torch.testing.assert_close(got, want)
    h, m = gated_residual_modulate(x.bfloat16(), gate, y, shift, scale, backend="triton")
    assert h.dtype == m.dtype == torch.float32
    with pytest.raises(TypeError, match="got torch.float64"):
        gated_residual_modulate(x, gate, y, shift.double(), scale, backend="triton")
    with pytest.raises(ValueError, match="gate is on meta but x is on cpu"):
        gated_residual_modulate(x, gate.to("meta"), y, shift, scale, backend="triton")


def test_cross_attention_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 6, 72, generator=g).transpose(1, 2)  # (B, N, H, Dh) with heads and tokens swapped
    k, v = (torch.randn(2, 2, 4, 72, generator=g).transpose(1, 2) for _ in range(2))
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])  # 0/1 numbers work; an empty caption gives zeros
    out = cross_attention(q, k, v, mask, backend="triton")  # head dim 72, PixArt's: supported
    assert torch.equal(out, cross_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, backend="triton"))
    torch.testing.assert_close(out, cross_attention_ref(q, k, v, mask.bool()))
    assert (out[1] == 0).all()
    with pytest.raises(TypeError, match="share one dtype .*got torch.float16, torch.float32, torch.float32"):
        cross_attention(q.half(), k, v, backend="triton")
    with pytest.raises(ValueError, match=r"different devices \['cpu', 'cpu', 'meta'\]"):
        cross_attention(q, k, v.to("meta"), backend="triton")
    q12, k12 = torch.zeros(1, 3, 1, 12), torch.zeros(1, 2, 1, 12)
    with pytest.raises(ValueError, match="head dim 12 is not supported by the Triton kernel; use a multiple of 8"):
        cross_attention(q12, k12, k12, backend="triton")
    torch.testing.assert_close(cross_attention(q12, k12, k12, backend="torch"), cross_attention_ref(q12, k12, k12))


def test_patchify_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, 3, generator=g).permute(0, 3, 1, 2)  # channels-last (B, C, H, W)
    assert torch.equal(patchify(x, 2, backend="triton"), patchify_ref(x, 2))  # strides are read in place
    for dtype in (torch.float64, torch.int32):  # a copy: any dtype, exactly
        assert torch.equal(patchify(x.to(dtype), 2, backend="triton"), patchify_ref(x.to(dtype), 2))
    with pytest.raises(ValueError, match="H x W = 8 x 6 is not divisible by the patch size p = 4"):
        patchify(x[..., :6], 4, backend="triton")
    with pytest.raises(ValueError, match=r"expects x of shape \(B, C, H, W\), got \(8, 8, 3\)"):
        patchify(x[0].permute(1, 2, 0), 2, backend="triton")


def test_unpatchify_inputs():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 12, 16, generator=g).transpose(1, 2)  # (B, T, p*p*C) = (2, 16, 12), strided
    assert torch.equal(unpatchify(tokens, 2, 3, 8, 8, backend="triton"), unpatchify_ref(tokens, 2, 3, 8, 8))
    assert torch.equal(unpatchify(tokens.half(), 2, 3, 8, 8, backend="triton"),
                       unpatchify_ref(tokens.half(), 2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 16, 12\), got \(2, 16, 11\)"):
        unpatchify(tokens[..., :11], 2, 3, 8, 8, backend="triton")
