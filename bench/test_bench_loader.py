"""The --data input pipeline at PixArt-XL/2 shapes, on this machine's CPU: samples per second of the path the
trainer takes (batch indices -> FeatureDataset.batch -> Batch, built ahead by pixart_fast.loader.prefetch), beside
the synchronous one-sample-at-a-time path it replaced (the "before" figure).

The feature sets are synthetic (random tensors instead of a VAE and T5) but written by the project's own writer,
pixart_fast.extract (plan, write_index, write_chunk), with the shapes and dtypes a GPU extraction stores: latent
mean / std 4 x (resolution / 8)^2 bfloat16, T5 features of 1 to 120 valid tokens (uniform) x 4096 bfloat16.
256 px: one bucket; 1024 px: four of PixArt's aspect-ratio buckets (1.0, 0.57, 1.75, 0.5). Read from the page
cache (warm), as a training run reads a set that fits its machine's memory.

An H200 at 60 % MFU consumes about 660 PixArt-XL/2 training images/s at 256 px (docs/ARCHITECTURE.md section 6).

The same 256-px samples as WebDataset tar shards (pixart_fast.shards, docs/shards.md), read by the same batch
path: in place ("local"), and from an S3-compatible server on localhost (moto, a private bucket read with curl's
signed GETs through webdataset's `pipe:`) into a local cache ("s3"): its first batch, which downloads every
shard, is timed apart (first_batch_s); the rounds then read the cache.

One intra-op thread, as bench/test_bench_cpu.py and for the same reason: on a shared machine with more runnable
processes than cores, OpenMP's barriers time the scheduler (the old path measured 16-21 samples/s with two
threads on a loaded 2-core machine, 140-160 with one). The new path fans nothing out per sample, so this is fair
to the old one rather than the new.
"""
import json
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pixart_fast.batch import Batch
from pixart_fast.extract import Record, aspect_ratio_buckets, plan, write_chunk, write_index
from pixart_fast.features import FeatureDataset, chunk_name
from pixart_fast.loader import prefetch
from pixart_fast.shards import SHARDS, ShardDataset, shard_name, write_shard
from pixart_fast.train.loop import batch_indices

BATCH, SEED = 128, 0
SETS = {  # resolution: (samples, chunk size, aspect-ratio buckets; None: square only)
    256: (512, 256, None),
    1024: (256, 128, (1.0, 0.57, 1.75, 0.5)),
}
STEPS = 24  # batches per timed round of the prefetched path
BEFORE_STEPS = 2  # batches timed on the synchronous path (about a second each at 256 px)
WORKERS, DEPTH = 2, 4


def write_synthetic(out: Path, resolution: int, samples: int, chunk_size: int, ratios=None, seed: int = 0,
                    shards: bool = False) -> Path:
    """An extraction folder of `samples` synthetic XL-shaped samples, written by pixart_fast.extract's writer
    (shards: as WebDataset tar shards, the same samples)."""
    encoders = out / "encoders"
    for name, config in (("vae", {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4,
                                  "scaling_factor": 0.18215}),
                         ("t5", {"d_model": 4096})):
        (encoders / name).mkdir(parents=True, exist_ok=True)
        (encoders / name / "config.json").write_text(json.dumps(config))
    records = [Record(f"image{i:06d}.jpg", f"synthetic caption {i}") for i in range(samples)]
    meta = plan(records, encoders / "vae", encoders / "t5", resolution, ratios is not None, chunk_size)
    folder = out / ("shards" if shards else "features")
    folder.mkdir(parents=True, exist_ok=True)
    if shards:
        meta["format"] = SHARDS
    write_index(folder, meta)
    table = aspect_ratio_buckets(resolution) if ratios else {1.0: (resolution, resolution)}
    ratios = ratios or (1.0,)
    g = torch.Generator().manual_seed(seed)
    words = torch.randn(4096, meta["caption_channels"], generator=g).to(torch.bfloat16)  # sliced into captions
    f = meta["vae_downsample"]
    for k in range(meta["num_chunks"]):
        chunk = {}
        for i in range(k * chunk_size, min((k + 1) * chunk_size, samples)):
            ratio = ratios[i % len(ratios)]
            H, W = table[ratio]
            n = int(torch.randint(1, meta["max_tokens"] + 1, (), generator=g))
            start = int(torch.randint(0, len(words) - n, (), generator=g))
            mean, std = torch.randn(2, meta["latent_channels"], H // f, W // f, generator=g).to(torch.bfloat16)
            chunk[i] = {"mean": mean, "std": std.abs(), "text": words[start:start + n].clone(), "hw": (H, W),
                        "size": (H, W), "ratio": ratio}
        if shards:
            write_shard(folder / shard_name(k), chunk, meta, records, [])
        else:
            write_chunk(folder / chunk_name(k), chunk, meta, records, [])
    return folder


def synchronous_before(data: FeatureDataset, indices) -> Batch:
    """The path without pixart_fast.loader: each sample's chunk opened (its header parsed) per sample,
    its tensors upcast to float32 and the caption padded per sample, then Batch.collate stacking them."""
    samples, L = [], data.meta["max_tokens"]
    for i in indices:
        r = data.records[i]
        with safe_open(str(data.root / chunk_name(data.chunk[i])), framework="pt") as f:
            mean, std, tokens = (f.get_tensor(f"{r}.{key}").float() for key in ("mean", "std", "text"))
        text = torch.zeros(L, tokens.shape[1])
        text[: len(tokens)] = tokens
        samples.append({"latent_mean": mean, "latent_std": std, "text": text, "mask": torch.arange(L) < len(tokens),
                        "img_hw": data.img_hw[i], "aspect_ratio": data.ratio[i]})
    return Batch.collate(samples, latent_scale=data.meta["scaling_factor"])


@pytest.fixture(scope="module", params=list(SETS), ids=[f"{r}px" for r in SETS])
def feature_set(request, tmp_path_factory):
    resolution = request.param
    samples, chunk_size, ratios = SETS[resolution]
    folder = write_synthetic(tmp_path_factory.mktemp(f"features{resolution}"), resolution, samples, chunk_size, ratios)
    data = FeatureDataset(folder)
    for k in range(data.meta["num_chunks"]):  # warm page cache, as the benchmark states
        (folder / chunk_name(k)).read_bytes()
    return resolution, data


def make_batch(data, step: int) -> Batch:  # the trainer's: a pure function of (seed, step)
    return data.batch(batch_indices(data, step, BATCH, SEED), text_dtype=None)


def epoch(data):
    for _, batch in prefetch(lambda step: make_batch(data, step), range(STEPS), depth=DEPTH, workers=WORKERS):
        assert len(batch) == BATCH


def test_data_loader_xl(benchmark, feature_set):
    resolution, data = feature_set

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # the same batches as the old path, text aside from its dtype
        new, old = make_batch(data, 0), synchronous_before(data, batch_indices(data, 0, BATCH, SEED))
        assert new.text.dtype == torch.bfloat16 and torch.equal(new.text.float(), old.text)
        assert torch.equal(new.images, old.images) and torch.equal(new.mask, old.mask)
        del new, old
        start = time.perf_counter()
        for step in range(1, BEFORE_STEPS + 1):
            synchronous_before(data, batch_indices(data, step, BATCH, SEED))
        before = BEFORE_STEPS * BATCH / (time.perf_counter() - start)
        benchmark.pedantic(epoch, args=(data,), rounds=3, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    after = STEPS * BATCH / benchmark.stats.stats.median
    stored = sum((data.root / chunk_name(k)).stat().st_size for k in range(data.meta["num_chunks"]))
    benchmark.extra_info.update(
        kind="data_loader", device="cpu", threads=1, resolution=resolution, batch=BATCH, samples=len(data),
        buckets=len(data.buckets), stored_mb=round(stored / 1e6, 1), text_dtype="bfloat16", workers=WORKERS,
        depth=DEPTH, samples_per_s=after, before_samples_per_s=before, speedup=after / before,
        before="synchronous: safe_open per sample, float32 upcast and padding per sample, Batch.collate")
    print(f"\n{resolution} px, batch {BATCH}, {len(data)} samples in {len(data.buckets)} bucket(s), "
          f"{stored / 1e6:.0f} MB: prefetched {after:,.0f} samples/s ({WORKERS} threads, depth {DEPTH}); "
          f"before (synchronous) {before:,.0f} samples/s; {after / before:.1f}x")
    if resolution == 256:
        assert after >= 660, "slower than one H200 consumes at 256 px"


@contextmanager
def s3_source(folder: Path):
    """folder's files in a private bucket of an S3-compatible server (moto) on localhost; yields the webdataset
    source that reads them with signed GETs (curl's AWS Signature Version 4)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        s3.create_bucket(Bucket="data")
        for path in sorted(folder.iterdir()):
            s3.upload_file(str(path), "data", f"shards/{path.name}")
        yield ("pipe:curl -sfL --aws-sigv4 aws:amz:us-east-1:s3 --user testing:testing "
               f"http://{host}:{port}/data/shards/{{name}}")
    finally:
        server.stop()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_data_loader_xl_shards(benchmark, where, tmp_path):
    samples, chunk_size, _ = SETS[256]
    folder = write_synthetic(tmp_path, 256, samples, chunk_size, shards=True)
    reference = FeatureDataset(write_synthetic(tmp_path, 256, samples, chunk_size))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with s3_source(folder) if where == "s3" else nullcontext(str(folder)) as source:
            data = ShardDataset(source, tmp_path / "cache")
            start = time.perf_counter()
            first = make_batch(data, 0)  # remote: downloads the shards
            first_batch = time.perf_counter() - start
            for name in ("images", "latent_std", "text", "mask", "img_hw"):  # the folder's batch
                assert torch.equal(getattr(first, name), getattr(make_batch(reference, 0), name)), name
            del first
            if where == "local":
                for k in range(data.meta["num_chunks"]):  # warm page cache, as for the folder
                    (folder / shard_name(k)).read_bytes()
            benchmark.pedantic(epoch, args=(data,), rounds=3, warmup_rounds=1)
    finally:
        torch.set_num_threads(threads)
    after = STEPS * BATCH / benchmark.stats.stats.median
    benchmark.extra_info.update(kind="data_loader", device="cpu", threads=1, resolution=256, batch=BATCH,
                                samples=len(data), format="shards", where=where, text_dtype="bfloat16",
                                workers=WORKERS, depth=DEPTH, samples_per_s=after, first_batch_s=first_batch)
    print(f"\n256 px shards ({where}), batch {BATCH}, {len(data)} samples: prefetched {after:,.0f} samples/s; "
          f"first batch {first_batch:.2f} s{' (downloads every shard)' if where == 's3' else ''}")
    assert after >= 2000, "shards read slower than 2,000 samples/s at 256 px"
