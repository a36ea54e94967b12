"""Feature extraction's throughput on this machine's CPU: images/s of `python -m pixart_fast.extract --format
shards` in one process (one and two intra-op threads) and in two processes under torchrun (one thread each, each
its share of the chunks), at 256 px.

The encoders have the real architectures' shapes at random weights (nothing is downloaded): the VAE is
AutoencoderKL with SD's four blocks of 128, 256, 512, 512 channels (84 M parameters), the text encoder T5 of
t5-small's shape (6 layers, width 512, gated GELU) with ByT5's tokenizer, a far smaller model than PixArt's
T5-XXL: the VAE dominates here. Images: scikit-image's photographs cut to 320 x 256 and 256 x 320. The time is
the command's wall time, start-up (imports, loading the encoders) included: what a user waits for.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
IMAGES, CHUNK = 64, 8
RUNS = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (1, 2), "2 processes (torchrun), 1 thread each": (2, 1)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    photos = pytest.importorskip("skimage.data", reason="scikit-image not installed")
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("extract")
    diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                            sample_size=256).save_pretrained(root / "vae")
    T5EncoderModel(T5Config(vocab_size=384, d_model=512, d_kv=64, d_ff=1024, num_layers=6, num_heads=8,
                            feed_forward_proj="gated-gelu")).save_pretrained(root / "t5")
    ByT5Tokenizer().save_pretrained(root / "t5")
    (root / "images").mkdir()
    names, lines = ("astronaut", "coffee", "chelsea", "rocket"), []
    for n in range(IMAGES):
        size = (320, 256) if n % 2 else (256, 320)
        Image.fromarray(getattr(photos, names[n % 4])()).convert("RGB").resize(size).save(root / f"images/{n}.jpg")
        lines.append(json.dumps({"file_name": f"{n}.jpg", "text": f"photograph number {n} of a {names[n % 4]}"}))
    (root / "images/metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_extraction_images_per_second(benchmark, inputs, tmp_path):
    results = {}
    for label, (processes, threads) in RUNS.items():
        out = tmp_path / f"out-{processes}-{threads}"
        args = ["-m", "pixart_fast.extract", "--images", str(inputs / "images"), "--vae", str(inputs / "vae"),
                "--t5", str(inputs / "t5"), "--out", str(out), "--resolution", "256", "--batch-size", "8",
                "--chunk-size", str(CHUNK), "--workers", "0", "--format", "shards"]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                     str(processes)] if processes > 1 else [sys.executable])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        start = time.perf_counter()
        subprocess.run(launcher + args, env=env, check=True, capture_output=True, timeout=1200)
        seconds = time.perf_counter() - start
        assert len(list(out.glob("shard-*.json"))) == IMAGES // CHUNK
        results[label] = IMAGES / seconds
        print(f"\n{label}: {IMAGES} images in {seconds:.1f} s, {IMAGES / seconds:.2f} images/s")
    benchmark.extra_info.update(kind="extraction", device="cpu", resolution=256, images=IMAGES,
                                images_per_s=results, encoders="SD-shaped VAE, t5-small-shaped T5, random weights")
    benchmark.pedantic(lambda: None, rounds=1)
    two, one = results["2 processes (torchrun), 1 thread each"], results["1 process, 1 thread"]
    assert two > 1.2 * one, "two processes are not faster than one: the work is not split"
