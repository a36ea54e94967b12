"""Feature extraction (pixart_fast.extract) and training from its output (pixart_fast.features, --data): the
stored features equal the encoders' own outputs, unreadable images are skipped by path, a rerun finishes only
what is missing, two shards equal one unsharded run, multi-aspect buckets follow PixArt's tables, and every
stage trains from features.

The encoders are a tiny diffusers AutoencoderKL and a tiny T5 with ByT5's tokenizer, random weights, saved to
folders and loaded offline. The images are photographs that ship inside scikit-image, with hand-written captions.
"""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from pixart_fast.checkpoints import load_safetensors
from pixart_fast.extract import (ASPECT_RATIO_1024, aspect_ratio_buckets,
                                 extract, load_image, main, nearest_bucket, read_records)
from pixart_fast.features import FeatureDataset
from pixart_fast.model import PixArt, PixArtConfig
from pixart_fast.text import TextEncoder
from pixart_fast.train.loop import batch_indices, train
from pixart_fast.train.recipes import RECIPES

# Real photographs that ship inside scikit-image, cut to (width, height) with hand-written captions;
# heights / widths from 0.33 to 2.75.
PICTURES = [
    ("astronaut", (64, 48), "an astronaut in a white suit in front of an american flag"),
    ("coffee", (48, 64), "a cup of coffee on a saucer with a spoon"),
    ("rocket", (120, 40), "a rocket on its launch pad under a blue sky"),
    ("chelsea", (40, 110), "a tabby cat looking to the side"),
    ("immunohistochemistry", (64, 64), "a stained tissue sample under a microscope"),
    ("coffee", (90, 50), "a red cup of coffee seen from above"),
    ("astronaut", (50, 90), "a smiling woman in a space suit"),
]


def save_tiny_encoders(vae_dir, t5_dir, latent_channels: int, t5_channels: int):
    """Save a random 2x-downsampling VAE with `latent_channels` to vae_dir and a one-layer T5 encoder of
    `t5_channels` with ByT5's tokenizer to t5_dir (seeded: the same folders every time)."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    torch.manual_seed(0)
    diffusers.AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels,
                            norm_num_groups=4, layers_per_block=1, sample_size=32).save_pretrained(vae_dir)
    T5EncoderModel(T5Config(vocab_size=384, d_model=t5_channels, d_kv=t5_channels // 2, d_ff=2 * t5_channels,
                            num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
                            dropout_rate=0.0)).save_pretrained(t5_dir)
    ByT5Tokenizer().save_pretrained(t5_dir)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """(vae folder, t5 folder): a 2x-downsampling VAE with 3 latent channels (the tiny test models' in_channels)
    and a 64-channel T5 encoder (their caption_channels)."""
    root = tmp_path_factory.mktemp("encoders")
    save_tiny_encoders(root / "vae", root / "t5", latent_channels=3, t5_channels=64)
    return root / "vae", root / "t5"


def picture(name, width, height):
    """skimage.data's photograph `name`, center-cropped to the aspect ratio width / height and resized."""
    photos = pytest.importorskip("skimage.data", reason="scikit-image not installed")
    image = Image.fromarray(getattr(photos, name)()).convert("RGB")
    W, H = image.size
    scale = min(W / width, H / height)
    cw, ch = round(width * scale), round(height * scale)
    left, top = (W - cw) // 2, (H - ch) // 2
    return image.crop((left, top, left + cw, top + ch)).resize((width, height), Image.BICUBIC)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An imagefolder: the pictures (PNG and JPEG), one unreadable file, metadata.jsonl listing all of them."""
    root = tmp_path_factory.mktemp("images")
    lines = []
    for n, (photo, (w, h), caption) in enumerate(PICTURES):
        name = f"pic{n}.{'jpg' if n % 2 else 'png'}"
        picture(photo, w, h).save(root / name)
        lines.append({"file_name": name, "text": caption, "label": n % 3})
        if n == 2:
            (root / "broken.jpg").write_bytes(b"this is not a JPEG")
            lines.append({"file_name": "broken.jpg", "text": "nothing", "label": 0})
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def kept_records(images):
    return [r for r in read_records(images / "metadata.jsonl") if r.file != "broken.jpg"]


def assert_same_files(a, b):
    """Two extraction folders hold the same files with equal tensors and metadata (safetensors' header order
    varies from write to write, so bytes, and the chunks' manifests, may not)."""
    files_a, files_b = sorted(a.iterdir()), sorted(b.iterdir())
    assert [p.name for p in files_a] == [p.name for p in files_b]
    for fa, fb in zip(files_a, files_b):
        if fa.name.endswith(".manifest.json"):
            assert json.loads(fa.read_text())["files"].keys() == json.loads(fb.read_text())["files"].keys()
            continue
        if fa.suffix == ".json":
            assert fa.read_text() == fb.read_text()
            continue
        ta, tb = load_file(fa), load_file(fb)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), fa.name
        with safe_open(str(fa), "pt") as ha, safe_open(str(fb), "pt") as hb:
            assert ha.metadata() == hb.metadata()


def run(images, encoders, out, **kw):
    vae, t5 = encoders
    settings = {"resolution": 32, "batch_size": 2, "chunk_size": 3, "progress": False, **kw}
    return extract(images, vae, t5, out, **settings)


def test_aspect_ratio_tables_are_pixarts():
    assert len(ASPECT_RATIO_1024) == 40 and min(ASPECT_RATIO_1024) == 0.25 and max(ASPECT_RATIO_1024) == 4.0
    for r, (h, w) in ASPECT_RATIO_1024.items():
        assert h % 64 == 0 and w % 64 == 0
        assert abs(h / w - r) < 0.01, r  # the key is the bucket's height / width
        assert 0.9 < h * w / 1024**2 < 1.1, r  # about one megapixel
    assert aspect_ratio_buckets(1024) == ASPECT_RATIO_1024
    # entries of the official ASPECT_RATIO_512 and ASPECT_RATIO_256 tables
    b512, b256 = aspect_ratio_buckets(512), aspect_ratio_buckets(256)
    assert (b512[0.25], b512[0.57], b512[1.0], b512[3.11]) == ((256, 1024), (384, 672), (512, 512), (896, 288))
    assert (b256[0.28], b256[0.94], b256[2.89], b256[4.0]) == ((128, 464), (240, 256), (416, 144), (512, 128))
    assert len(b512) == len(b256) == 40
    assert aspect_ratio_buckets(64)[0.57] == (48, 84)  # other sizes: the 1024 table scaled
    assert nearest_bucket(1000, 3000, b256) == (0.33, (144, 432))
    assert nearest_bucket(720, 1280, ASPECT_RATIO_1024) == (0.57, (768, 1344))
    with pytest.raises(ValueError, match="multiple of 16"):
        aspect_ratio_buckets(40)


def test_load_image_resizes_the_shorter_side_and_crops_the_center(tmp_path):
    left_red = np.zeros((32, 64, 3), np.uint8)  # (height, width): red left half, blue right half
    left_red[:, :32, 0] = 255
    left_red[:, 32:, 2] = 255
    Image.fromarray(left_red).save(tmp_path / "wide.png")
    image, hw, ratio = load_image(tmp_path / "wide.png", 16, None)
    assert image.shape == (3, 16, 16) and hw == (32, 64) and ratio == 1.0
    assert image.min() >= -1 and image.max() <= 1
    # resized to 16 x 32, columns 8..23 kept: the left half of the crop red, the right half blue
    assert image[0, :, 0].min() > 0.9 and image[2, :, 0].max() < -0.9
    assert image[2, :, -1].min() > 0.9 and image[0, :, -1].max() < -0.9
    image, hw, ratio = load_image(tmp_path / "wide.png", 64, aspect_ratio_buckets(64))
    assert ratio == 0.5 and image.shape == (3, 44, 88)  # the 0.5 bucket, (704, 1408) / 16


def test_features_equal_the_encoders_and_unreadable_images_are_skipped(images, encoders, tmp_path):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    summary = run(images, encoders, tmp_path)
    assert summary["encoded"] == len(PICTURES) and summary["chunks_written"] == 3
    assert summary["unreadable"][0][0] == str(images / "broken.jpg") and len(summary["unreadable"]) == 1
    data = FeatureDataset(tmp_path)
    assert len(data) == len(PICTURES) and data.buckets == [(32, 32)]
    vae = diffusers.AutoencoderKL.from_pretrained(encoders[0], low_cpu_mem_usage=False)
    text = TextEncoder.from_pretrained(encoders[1])
    for i, record in enumerate(kept_records(images)):
        sample = data[i]
        pixels, hw, _ = load_image(images / record.file, 32, None)
        with torch.no_grad():
            latent = vae.encode(pixels[None]).latent_dist
        features, mask = text.encode([record.caption])
        assert sample["latent_mean"].shape == (3, 16, 16)
        torch.testing.assert_close(sample["latent_mean"], latent.mean[0])
        torch.testing.assert_close(sample["latent_std"], latent.std[0])
        assert torch.equal(sample["mask"], mask[0])
        torch.testing.assert_close(sample["text"][mask[0]], features[0][mask[0]])
        assert (sample["text"][~mask[0]] == 0).all()  # padding is hidden by the mask; stored as zeros
        assert sample["img_hw"].tolist() == list(hw) == [PICTURES[i][1][1], PICTURES[i][1][0]]
        assert sample["aspect_ratio"] == 1.0 and sample["label"] == i % 3
    mean, std = data[0]["latent_mean"], data[0]["latent_std"]
    eps = torch.randn(1, *mean.shape)
    batch = data.batch([0])
    assert batch.is_latent and batch.latent_scale == 0.18215
    torch.testing.assert_close(batch.x0(eps), (mean + std * eps) * 0.18215)
    # a batch reads samples across chunks as one at a time does; text_dtype=None keeps the stored float32
    order = [5, 0, 3, 3, 6]
    whole, samples = data.batch(order, text_dtype=None), [data[i] for i in order]
    for field, key in (("images", "latent_mean"), ("latent_std", "latent_std"), ("text", "text"), ("mask", "mask"),
                       ("img_hw", "img_hw"), ("aspect_ratio", "aspect_ratio")):
        assert torch.equal(getattr(whole, field), torch.stack([s[key] for s in samples])), field
    assert whole.text.dtype == torch.float32 and whole.labels.tolist() == [s["label"] for s in samples]


def test_rerun_writes_only_what_is_missing(images, encoders, tmp_path):
    first, out = tmp_path / "first", tmp_path / "out"
    run(images, encoders, first)
    run(images, encoders, out)
    untouched = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith("chunk-000001.")}
    (out / "chunk-000001.safetensors").unlink()
    (out / "chunk-000001.safetensors.tmp").write_bytes(b"half-written by a killed run")
    with pytest.raises(ValueError, match="incomplete.*chunk-000001"):
        FeatureDataset(out)
    summary = run(images, encoders, out)
    # chunk 1 holds records 3-5, record 3 the unreadable file
    assert (summary["chunks_done_before"], summary["chunks_written"], summary["encoded"]) == (2, 1, 2)
    assert not (out / "chunk-000001.safetensors.tmp").exists()  # the leftover was overwritten, then renamed
    assert {n: (out / n).stat().st_mtime_ns for n in untouched} == untouched
    assert_same_files(first, out)
    assert run(images, encoders, out)["chunks_written"] == 0
    with pytest.raises(ValueError, match="another extraction.*resolution"):
        run(images, encoders, out, resolution=64)


def test_two_shards_equal_one_unsharded_run(images, encoders, tmp_path):
    run(images, encoders, tmp_path / "whole")
    vae, t5 = encoders
    for i in range(2):  # through the command line, as two machines would run it
        main(["--images", str(images), "--vae", str(vae), "--t5", str(t5), "--out", str(tmp_path / "split"),
              "--resolution", "32", "--batch-size", "2", "--chunk-size", "3", "--shard", f"{i}/2", "--workers", "0"])
    assert_same_files(tmp_path / "whole", tmp_path / "split")


def test_multi_aspect_from_pixart_data_info_json(images, encoders, tmp_path):
    # The official layout: InternalData/partition/data_info.json, image paths relative to another folder.
    info = [{"path": r.file, "prompt": r.caption, "height": h, "width": w, "ratio": h / w}
            for r, (_, (w, h), _) in zip(kept_records(images), PICTURES)]
    (tmp_path / "InternalData" / "partition").mkdir(parents=True)
    (tmp_path / "InternalData" / "partition" / "data_info.json").write_text(json.dumps(info))
    run(tmp_path / "InternalData", encoders, tmp_path / "out", resolution=64, multi_aspect=True, image_root=images)
    data = FeatureDataset(tmp_path / "out")
    table = aspect_ratio_buckets(64)
    for i, entry in enumerate(info):
        ratio, (H, W) = nearest_bucket(entry["height"], entry["width"], table)
        sample = data[i]
        assert data.buckets[data.bucket_ids()[i]] == (H, W)
        assert sample["latent_mean"].shape == (3, H // 2, W // 2)
        assert sample["aspect_ratio"].item() == pytest.approx(ratio)
        assert sample["img_hw"].tolist() == [entry["height"], entry["width"]]
    assert len(data.buckets) >= 4
    for step in range(20):  # every batch one bucket, and a pure function of (seed, step)
        idx = batch_indices(data, step, 4, seed=3)
        assert len({int(data.bucket_ids()[i]) for i in idx}) == 1 and idx == batch_indices(data, step, 4, seed=3)
    assert any(batch_indices(data, s, 4, seed=3) != batch_indices(data, s, 4, seed=4) for s in range(5))

    cfg = replace(RECIPES[3], model="PixArtMS-pixel-tiny", data=str(tmp_path / "out"), out=str(tmp_path / "run"),
                  steps=2, batch_size=2, log_every=1, num_val=4, kernels="torch")
    summary = train(cfg, progress=False)
    assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["ema_scores"]["val_loss"])


def test_every_stage_trains_from_features_and_the_model_must_fit(images, encoders, tmp_path):
    run(images, encoders, tmp_path / "features")
    cfg = replace(RECIPES[2], model="PixArt-pixel-tiny", route_end=2, data=str(tmp_path / "features"), batch_size=4,
                  log_every=1, save_every=2, num_val=3, kernels="torch", lr_decay=0.0)  # held: 2 steps then 3 = 3
    summary = train(replace(cfg, steps=3, out=str(tmp_path / "a")), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "a/stage2/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3] and np.isfinite(summary["ema_scores"]["val_loss"])
    # resuming is exact on features too (the latent samples come from the saved generator)
    train(replace(cfg, steps=2, out=str(tmp_path / "b")), progress=False)
    train(replace(cfg, steps=3, out=str(tmp_path / "b"), resume="latest"), progress=False)
    a = load_safetensors(tmp_path / "a/stage2/checkpoints/step-0000003/model.safetensors")
    b = load_safetensors(tmp_path / "b/stage2/checkpoints/step-0000003/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # stage 1: the class-conditional DiT learns from the labels stored with the features
    summary = train(replace(cfg, stage=1, steps=2, route_ratio=0.0, out=str(tmp_path / "c")), progress=False)
    assert np.isfinite(summary["final_loss"])

    with pytest.raises(ValueError, match="3-channel latents but model PixArt-tiny has in_channels 4"):
        train(replace(cfg, model="PixArt-tiny", steps=1, out=str(tmp_path / "d")), progress=False)
    with pytest.raises(ValueError, match="T5 features already"):
        train(replace(cfg, t5=str(encoders[1]), steps=1, out=str(tmp_path / "d")), progress=False)
    with pytest.raises(ValueError, match="no index.json"):
        train(replace(cfg, data=str(tmp_path), steps=1, out=str(tmp_path / "d")), progress=False)


def test_unlabelled_features_refuse_stage_1(images, encoders, tmp_path):
    (tmp_path / "images").mkdir()
    lines = [json.dumps({"file_name": str(images / r.file), "text": r.caption}) for r in kept_records(images)[:2]]
    (tmp_path / "images" / "metadata.jsonl").write_text("\n".join(lines))
    run(tmp_path / "images", encoders, tmp_path / "features")
    cfg = replace(RECIPES[1], model="PixArt-pixel-tiny", data=str(tmp_path / "features"), out=str(tmp_path),
                  steps=1, batch_size=2, kernels="torch")
    with pytest.raises(ValueError, match="no class labels"):
        train(cfg, progress=False)
    with pytest.raises(ValueError, match="record 1: need a 'file_name'"):
        (tmp_path / "images" / "metadata.jsonl").write_text(lines[0] + '\n{"file_name": "x.png"}\n')
        read_records(tmp_path / "images" / "metadata.jsonl")


def test_sigma_length_captions_300_tokens(images, encoders, tmp_path):
    """--max-tokens 300 (PixArt-Sigma): T5 pads to 300, index.json records it, batches hold (B, 300, E) captions
    equal to the encoder's; a 300-token model fits these features and a 120-token one does not (and the other way
    round), each refusal naming both lengths; a rerun with another length is refused."""
    vae, t5 = encoders
    main(["--images", str(images), "--vae", str(vae), "--t5", str(t5), "--out", str(tmp_path / "sigma"),
          "--resolution", "32", "--batch-size", "2", "--chunk-size", "3", "--workers", "0", "--max-tokens", "300"])
    run(images, encoders, tmp_path / "alpha")  # the default: 120
    sigma, alpha = FeatureDataset(tmp_path / "sigma"), FeatureDataset(tmp_path / "alpha")
    assert (sigma.meta["max_tokens"], alpha.meta["max_tokens"]) == (300, 120)
    text = TextEncoder.from_pretrained(t5, max_length=300)
    captions = [r.caption for r in kept_records(images)]
    long = " and ".join(captions[:4])  # 186 bytes: more than 120 tokens, fewer than 300
    features, mask = text.encode(captions + [long])
    assert features.shape == (len(captions) + 1, 300, 64) and mask[-1].sum() == len(long.encode()) + 1 > 120
    batch = sigma.batch(list(range(len(sigma))))
    assert batch.text.shape == (len(captions), 300, 64) and batch.mask.shape == (len(captions), 300)
    assert torch.equal(batch.mask, mask[:-1])
    torch.testing.assert_close(batch.text[mask[:-1]], features[:-1][mask[:-1]])
    assert (batch.text[~mask[:-1]] == 0).all()
    # the 120-token extraction holds the same tokens (no caption here is longer), padded less far
    torch.testing.assert_close(alpha.batch([0]).text[0], batch.text[0, :120])

    sigma_model = PixArtConfig(input_size=16, in_channels=3, hidden_size=48, depth=1, num_heads=2,
                               caption_channels=64, max_tokens=300)
    alpha_model = replace(sigma_model, max_tokens=120)
    sigma.check_model(sigma_model, "sigma-tiny", class_conditional=False)
    alpha.check_model(alpha_model, "alpha-tiny", class_conditional=False)
    with pytest.raises(ValueError, match="caption features of 300 tokens but model alpha-tiny has .* max_tokens 120; "
                                         ".*--max-tokens 120"):
        sigma.check_model(alpha_model, "alpha-tiny", class_conditional=False)
    with pytest.raises(ValueError, match="caption features of 120 tokens but model sigma-tiny has .* max_tokens 300; "
                                         ".*--max-tokens 300"):
        alpha.check_model(sigma_model, "sigma-tiny", class_conditional=False)
    # a 300-token model computes on a batch of these features, null caption included
    model = PixArt(sigma_model, kernels="torch").eval()
    x = torch.randn(len(captions), 3, 16, 16)
    out = model.forward_with_cfg(x, torch.full((len(captions),), 500.0), batch.text, batch.mask)
    assert out.shape == (len(captions), 6, 16, 16) and torch.isfinite(out).all()

    with pytest.raises(ValueError, match="another extraction.*max_tokens: 300 there, 120 now"):
        run(images, encoders, tmp_path / "sigma")
    with pytest.raises(ValueError, match="--max-tokens must be >= 1"):
        run(images, encoders, tmp_path / "zero", max_tokens=0)
