"""Features as WebDataset tar shards (pixart_fast.shards, `pixart_fast.extract --format shards`): a shard set holds
the batches of a chunk folder and trains to the same weights, resumes bit-identically, is read from an
S3-compatible server on localhost (moto) through a local cache, and is what WebDataset itself reads; extraction
reads img2dataset's tar shards (local or remote), splits its work over torchrun's processes (two give the
features of one), and resumes after a kill with no sample lost or duplicated.

The encoders and images are test_extract's: a tiny VAE and T5 from configs, photographs from scikit-image.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import load

from pixart_fast.checkpoints import load_safetensors
from pixart_fast.cli import UserError
from pixart_fast.distributed import Dist
from pixart_fast.extract import TAR_STRIDE, Record, extract, launch_share, tar_records
from pixart_fast.features import FeatureDataset, FeatureError
from pixart_fast.shards import ShardDataset, open_features, shard_name, table_name, write_shard
from pixart_fast.train.loop import batch_indices, step_batch, train
from pixart_fast.train.recipes import RECIPES
from pixart_fast.train.stages import FeatureData
from test_extract import PICTURES, encoders, images, kept_records  # noqa: F401 (fixtures)
from test_loader import assert_same_batch

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"resolution": 64, "multi_aspect": True, "batch_size": 2, "chunk_size": 3, "progress": False}


def run(images, encoders, out, **kw):
    return extract(images, *encoders, out, **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def extracted(images, encoders, tmp_path_factory):
    """(chunk folder, shard folder) of the same multi-aspect extraction."""
    root = tmp_path_factory.mktemp("extracted")
    run(images, encoders, root / "chunks")
    run(images, encoders, root / "shards", format="shards")
    return root / "chunks", root / "shards"


KEYS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}  # the local server's credentials


def signed(url: str) -> str:
    """A webdataset `pipe:` source reading `url` (a private S3 object, path style) with a signed GET (curl's AWS
    Signature Version 4)."""
    return f"pipe:curl -sfL --aws-sigv4 aws:amz:us-east-1:s3 --user testing:testing {url}"


@contextmanager
def s3_bucket(folder: Path, bucket: str = "data"):
    """An S3-compatible server (moto) on localhost holding folder's files under s3://bucket/<folder name>/ (a
    private bucket); yields (the folder's HTTP URL, path style, and a boto3 client)."""
    boto3 = pytest.importorskip("boto3", reason="boto3 not installed (the test extra has it)")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] not installed (the test extra has it)")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **KEYS)
        s3.create_bucket(Bucket=bucket)
        for path in sorted(folder.iterdir()):
            s3.upload_file(str(path), bucket, f"{folder.name}/{path.name}")
        yield f"{endpoint}/{bucket}/{folder.name}", s3
    finally:
        server.stop()


def same_samples(a: FeatureDataset, b: FeatureDataset) -> None:
    """a and b hold the same samples in the same order: every bucket's samples read as one batch are equal."""
    assert len(a) == len(b) and a.buckets == b.buckets and (a.bucket_ids() == b.bucket_ids()).all()
    for bucket in range(len(a.buckets)):
        members = np.flatnonzero(a.bucket_ids() == bucket).tolist()
        assert_same_batch(a.batch(members, text_dtype=None), b.batch(members, text_dtype=None))


def weights(out: Path, step: int) -> dict:
    return load_safetensors(out / f"stage3/checkpoints/step-{step:07d}/model.safetensors")


def test_shards_hold_the_chunks_and_train_alike_and_resume_bit_identically(extracted, tmp_path):
    chunks, shards = extracted
    a, b = FeatureDataset(chunks), open_features(shards)
    assert isinstance(b, ShardDataset) and len(b.buckets) >= 4
    same_samples(a, b)
    for step in range(10):  # the same batch of step s, drawn from (seed, s)
        assert batch_indices(a, step, 4, seed=1) == batch_indices(b, step, 4, seed=1)
    # a shard is a WebDataset: WebDataset reads its samples, keyed by record, with their features
    samples = list(wds.WebDataset(str(shards / shard_name(0)), shardshuffle=False))
    table = json.loads((shards / table_name(0)).read_text())["samples"]
    assert [int(s["__key__"]) for s in samples] == table["index"]
    first = load(samples[0]["safetensors"])
    assert torch.equal(first["mean"], a[0]["latent_mean"])
    assert json.loads(samples[0]["json"])["caption"] == PICTURES[0][2]

    cfg = replace(RECIPES[3], model="PixArtMS-pixel-tiny", batch_size=2, log_every=1, save_every=2, num_val=4,
                  kernels="torch")
    train(replace(cfg, data=str(chunks), steps=3, out=str(tmp_path / "chunks")), progress=False)
    train(replace(cfg, data=str(shards), steps=2, out=str(tmp_path / "shards")), progress=False)
    train(replace(cfg, data=str(shards), steps=3, out=str(tmp_path / "shards"), resume="latest"), progress=False)
    x, y = weights(tmp_path / "chunks", 3), weights(tmp_path / "shards", 3)
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_shards_train_from_localhost_s3_through_a_local_cache(extracted, tmp_path):
    chunks, shards = extracted
    local = ShardDataset(shards)
    with s3_bucket(shards) as (http, s3):
        url = signed(f"{http}/{{name}}")
        remote = open_features(url, tmp_path / "cache")
        assert isinstance(remote, ShardDataset) and not (tmp_path / "cache").exists()  # nothing downloaded yet
        assert_same_batch(remote.batch([0], text_dtype=None), local.batch([0], text_dtype=None))
        assert [p.name for p in (tmp_path / "cache").iterdir()] == [shard_name(0)]  # only the shard it read
        same_samples(local, remote)
        # a damaged copy in the cache is downloaded again
        cached = tmp_path / "cache" / shard_name(1)
        data = bytearray(cached.read_bytes())
        data[-2000] ^= 1
        cached.write_bytes(data)
        same_samples(local, ShardDataset(url, tmp_path / "cache"))
        # a damaged object in the bucket is refused, naming the shard and its CRC-32
        data = bytearray((shards / shard_name(2)).read_bytes())
        data[1000] ^= 1
        s3.put_object(Bucket="data", Key=f"shards/{shard_name(2)}", Body=bytes(data))
        fresh = ShardDataset(url, tmp_path / "other")
        with pytest.raises(FeatureError, match=f"{shard_name(2)} is damaged"):
            fresh.batch([fresh.chunk.index(2)])
        s3.upload_file(str(shards / shard_name(2)), "data", f"shards/{shard_name(2)}")
        cfg = replace(RECIPES[3], model="PixArtMS-pixel-tiny", batch_size=2, log_every=1, num_val=4, kernels="torch",
                      steps=2)
        summary = train(replace(cfg, data=url, data_cache=str(tmp_path / "train-cache"), out=str(tmp_path / "s3")),
                        progress=False)
        train(replace(cfg, data=str(chunks), out=str(tmp_path / "local")), progress=False)
        x, y = weights(tmp_path / "s3", 2), weights(tmp_path / "local", 2)
        assert np.isfinite(summary["final_loss"]) and all(torch.equal(x[k], y[k]) for k in x)
        with pytest.raises(FeatureError, match="missing/index.json: cannot read it"):
            ShardDataset(signed(f"{http}/missing/{{name}}"), tmp_path / "cache")


def test_each_rank_downloads_and_reads_only_its_slice(images, encoders, tmp_path):
    shards = tmp_path / "square"  # one bucket: a batch draws from every shard
    run(images, encoders, shards, format="shards", resolution=32, multi_aspect=False)
    whole = FeatureData(ShardDataset(shards))
    cfg = replace(RECIPES[3], batch_size=4)
    narrower = 0  # steps where a rank's slice lies in fewer shards than the global batch
    with s3_bucket(shards) as (http, _):
        for step in range(6):
            batch = batch_indices(whole, step, cfg.batch_size, cfg.seed)
            for rank in (0, 1):
                cache = tmp_path / f"cache-{step}-{rank}"
                data = FeatureData(ShardDataset(signed(f"{http}/{{name}}"), cache))
                part = batch[rank * 2:(rank + 1) * 2]
                assert_same_batch(step_batch(SimpleNamespace(cfg=cfg, dist=Dist(rank, 2), data=data), step),
                                  whole.batch(part))
                downloaded = {p.name for p in cache.iterdir()}
                assert downloaded == {shard_name(whole.features.chunk[i]) for i in part}
                narrower += len(downloaded) < len({whole.features.chunk[i] for i in batch})
    assert narrower, "no step tells a rank's slice from the global batch"


def img2dataset_tars(images, out: Path, per_tar: int = 3) -> Path:
    """The pictures as img2dataset writes them: {key}.jpg (or .png) with {key}.txt, or a {key}.json caption."""
    out.mkdir()
    records = kept_records(images)
    for t in range(-(-len(records) // per_tar)):
        with tarfile.open(out / f"{t:05d}.tar", "w") as tar:
            for j, r in enumerate(records[t * per_tar:(t + 1) * per_tar]):
                key = f"{t:05d}{j:04d}"
                tar.add(images / r.file, f"{key}.{r.file.rsplit('.', 1)[1]}")
                caption = f"{key}.txt" if j % 2 else f"{key}.json"
                (out / caption).write_text(r.caption if j % 2 else json.dumps({"caption": r.caption, "width": 1}))
                tar.add(out / caption, caption)
                (out / caption).unlink()
    return out


def test_extraction_reads_img2dataset_tars_local_and_remote(images, encoders, tmp_path):
    tars = img2dataset_tars(images, tmp_path / "tars")
    # the same records through a metadata file, cut into the same chunks of 3
    listed = tmp_path / "listed"
    listed.mkdir()
    lines = [json.dumps({"file_name": r.file, "text": r.caption}) for r in kept_records(images)]
    (listed / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    run(listed, encoders, tmp_path / "from-metadata", image_root=images)
    summary = run(tars, encoders, tmp_path / "from-tars", format="shards")
    assert summary["encoded"] == len(kept_records(images)) and summary["chunks_written"] == 3
    from_tars = ShardDataset(tmp_path / "from-tars")
    assert from_tars.records[3] == TAR_STRIDE  # tar 1's first sample
    same_samples(FeatureDataset(tmp_path / "from-metadata"), from_tars)
    with s3_bucket(tars) as (http, _):
        run(signed(f"{http}/{{00000..00002}}.tar"), encoders, tmp_path / "from-s3", format="shards",
            cache=tmp_path / "cache")
    same_samples(from_tars, ShardDataset(tmp_path / "from-s3"))
    with pytest.raises(FeatureError, match="00000.tar.*cannot download"):
        run("http://127.0.0.1:9/none/00000.tar", encoders, tmp_path / "x", cache=tmp_path / "cache2")


def same_shard_sets(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    same_samples(ShardDataset(a), ShardDataset(b))
    for k in range(json.loads((a / "index.json").read_text())["num_chunks"]):
        ta, tb = (json.loads((f / table_name(k)).read_text()) for f in (a, b))
        assert ta["samples"] == tb["samples"] and ta["skipped"] == tb["skipped"]


def command(images, encoders, out) -> list[str]:
    vae, t5 = encoders
    return ["--images", str(images), "--vae", str(vae), "--t5", str(t5), "--out", str(out), "--resolution", "64",
            "--multi-aspect", "--batch-size", "1", "--chunk-size", "1", "--workers", "0", "--format", "shards"]


@pytest.fixture
def one_thread():
    """The test's own extractions at the one thread its subprocesses run (OMP_NUM_THREADS=1), whatever the caller's
    environment says: a convolution's float sums depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_torchrun_processes_split_the_work_and_a_killed_run_resumes(images, encoders, tmp_path, one_thread):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    whole = tmp_path / "whole"
    run(images, encoders, whole, format="shards", batch_size=1, chunk_size=1)
    two = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pixart_fast.extract", *command(images, encoders, two)],
                          env=env, check=True, capture_output=True, text=True, timeout=300)
    summaries = [json.loads(line[line.index("{"):]) for line in done.stdout.splitlines() if '"chunks_written"' in line]
    assert [(s["chunks"], s["chunks_written"]) for s in summaries] == [(4, 4), (4, 4)]  # each process its half
    same_shard_sets(whole, two)
    # killed after its third shard: the rerun writes the rest, every record once
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pixart_fast.extract", *command(images, encoders, killed)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (killed / table_name(2)).exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    written = len(list(killed.glob("shard-*.json")))
    assert 3 <= written < 8, "the kill came too late to test a resume"
    summary = run(images, encoders, killed, format="shards", batch_size=1, chunk_size=1)
    assert summary["chunks_done_before"] == written and summary["chunks_written"] == 8 - written
    same_shard_sets(whole, killed)
    assert sorted(ShardDataset(killed).records) == sorted(ShardDataset(whole).records)


def test_a_shard_holding_nan_names_the_record_and_caption(extracted, tmp_path):
    folder = shutil.copytree(extracted[1], tmp_path / "shards")
    meta, table = (json.loads((folder / name).read_text()) for name in ("index.json", table_name(0)))
    samples, records = {}, {}
    for sample in wds.WebDataset(str(folder / shard_name(0)), shardshuffle=False):
        i, info, tensors = int(sample["__key__"]), json.loads(sample["json"]), load(sample["safetensors"])
        samples[i] = {**tensors, "hw": info["hw"], "size": info["size"], "ratio": info["ratio"]}
        records[i] = Record(info["file"], info["caption"], info.get("label"))
    samples[1]["text"][0, 0] = float("nan")
    write_shard(folder / shard_name(0), samples, meta, records, table["skipped"])
    data = ShardDataset(folder)
    data.batch([0])  # another sample of the shard reads
    with pytest.raises(FeatureError, match=rf"record 1 \('pic1.jpg', caption '{PICTURES[1][2]}'\) holds NaN"):
        data.batch([1])


def test_user_mistakes_are_named(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert launch_share(None) == (3, 4)
    with pytest.raises(UserError, match="--shard 0/2 under torchrun .*drop --shard"):
        launch_share((0, 2))
    (tmp_path / "index.json").write_text(json.dumps({"format": "pixart_fast.features/1"}))
    with pytest.raises(UserError, match="expected 'pixart_fast.shards/1'"):
        ShardDataset(tmp_path)
    with pytest.raises(UserError, match=r"--data s3://b/feats: .* --data 'pipe:aws s3 cp s3://b/feats/\{name\} -'"):
        open_features("s3://b/feats")
    with pytest.raises(UserError, match=r"--images 'pipe:aws s3 cp s3://b/\{0..9\}.tar -'"):
        extract("s3://b/{0..9}.tar", tmp_path, tmp_path, tmp_path / "out")
    (tmp_path / "k.jpg").write_bytes(b"an image")
    with tarfile.open(tmp_path / "no-caption.tar", "w") as tar:
        tar.add(tmp_path / "k.jpg", "k.jpg")
    with pytest.raises(UserError, match="sample 'k' has no caption"):
        tar_records(str(tmp_path / "no-caption.tar"), 0, None)
