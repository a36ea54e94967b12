"""The input pipeline: pixart_fast.loader.prefetch (order, the same batches as a synchronous loop, exceptions at
their step, no thread left behind) and FeatureDataset.batch's fast path (the batches of the per-sample path, the
stored text dtype on request, reused buffers never overwriting a batch still held, worker pickling, a chunk
damaged after the dataset opened).

The feature sets are small and synthetic, written by pixart_fast.extract's own writer.
"""
import json
import pickle
import threading
import time

import numpy as np
import pytest
import torch

from pixart_fast.batch import Batch
from pixart_fast.extract import Record, aspect_ratio_buckets, plan, write_chunk, write_index
from pixart_fast.features import FeatureDataset, chunk_name
from pixart_fast.loader import THREAD_NAME, prefetch, to_device
from pixart_fast.train.loop import batch_indices

E = 16  # caption channels


def write_features(root, samples=20, chunk_size=8, resolution=32, ratios=None, text_dtypes=(torch.bfloat16,),
                   labels=False, downsample=8):
    """A feature folder: latents 4 x (resolution / downsample)^2 (or aspect buckets), 1-120 caption tokens of E
    channels, each chunk's latents and text in text_dtypes[k % len] (a GPU extraction writes bfloat16, a CPU one
    float32)."""
    blocks = [8] * (downsample.bit_length())  # one 2x downsampling per block but the last
    for name, config in (("vae", {"block_out_channels": blocks, "latent_channels": 4}), ("t5", {"d_model": E})):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(config))
    records = [Record(f"{i}.png", f"caption {i}", i % 3 if labels else None) for i in range(samples)]
    meta = plan(records, root / "vae", root / "t5", resolution, ratios is not None, chunk_size)
    out = root / "features"
    out.mkdir()
    write_index(out, meta)
    table = aspect_ratio_buckets(resolution) if ratios else {1.0: (resolution, resolution)}
    ratios = ratios or (1.0,)
    g = torch.Generator().manual_seed(0)
    for k in range(meta["num_chunks"]):
        dtype, chunk = text_dtypes[k % len(text_dtypes)], {}
        for i in range(k * chunk_size, min((k + 1) * chunk_size, samples)):
            ratio = ratios[i % len(ratios)]
            H, W = table[ratio]
            n = int(torch.randint(1, 121, (), generator=g)) if i % 5 else 120  # some full captions
            mean, std = torch.randn(2, 4, H // downsample, W // downsample, generator=g).to(dtype)
            chunk[i] = {"mean": mean, "std": std.abs(), "text": torch.randn(n, E, generator=g).to(dtype),
                        "hw": (H + i, W), "size": (H, W), "ratio": ratio}
        write_chunk(out / chunk_name(k), chunk, meta, records, [])
    return out


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    return FeatureDataset(write_features(tmp_path_factory.mktemp("features"), labels=True))


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_NAME)]


def assert_same_batch(a: Batch, b: Batch):
    for name in ("images", "latent_std", "labels", "text", "mask", "img_hw", "aspect_ratio"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.latent_scale == b.latent_scale


def per_sample(data: FeatureDataset, indices) -> Batch:
    """The old path: one sample at a time, stacked by Batch.collate."""
    return Batch.collate([data[i] for i in indices], latent_scale=data.meta["scaling_factor"])


# ----------------------------------------------------------------------------------------------------------
# prefetch
# ----------------------------------------------------------------------------------------------------------


def test_prefetch_yields_every_step_in_order_however_the_workers_finish():
    def make(step):  # later steps finish first: out-of-order completion
        time.sleep(0.02 * ((7 - step) % 4))
        return {"step": step, "x": torch.full((3,), float(step))}

    got = list(prefetch(make, range(2, 12), depth=3, workers=3))
    assert [s for s, _ in got] == list(range(2, 12))
    assert all(b["step"] == s and torch.equal(b["x"], torch.full((3,), float(s))) for s, b in got)
    assert list(prefetch(make, [])) == []
    assert not prefetch_threads()


def test_prefetched_batches_equal_synchronous_ones_and_the_per_sample_path(features):
    def make(step):  # the trainer's: a pure function of (seed, step)
        return features.batch(batch_indices(features, step, 6, seed=3))

    with prefetch(make, range(10), depth=3, workers=2) as batches:
        for step, batch in batches:
            assert_same_batch(batch, make(step))
            assert_same_batch(batch, per_sample(features, batch_indices(features, step, 6, seed=3)))
    assert not prefetch_threads()


def test_an_exception_in_make_batch_is_raised_at_its_step():
    def make(step):
        if step == 3:
            raise KeyError(f"bad sample at step {step}")
        return step

    seen = []
    with pytest.raises(KeyError, match="bad sample at step 3"):
        for step, batch in prefetch(make, range(10), depth=4, workers=2):
            seen.append(batch)
    assert seen == [0, 1, 2]
    assert not prefetch_threads()


def test_leaving_the_loop_early_leaves_no_thread():
    started = []

    def make(step):
        started.append(step)
        time.sleep(0.05)
        return step

    for step, _ in prefetch(make, range(1000), depth=3, workers=2):  # no `with`: garbage collection closes it
        if step == 2:
            break
    assert not prefetch_threads() and max(started) <= 2 + 3  # nothing built past depth
    with pytest.raises(RuntimeError, match="the consumer failed"), prefetch(make, range(1000), depth=3, workers=2):
        raise RuntimeError("the consumer failed")
    assert not prefetch_threads()
    batches = prefetch(make, range(1000), depth=2, workers=2)
    assert next(batches) == (0, 0)
    batches.close()
    assert not prefetch_threads() and list(batches) == []
    with pytest.raises(ValueError, match="depth >= 1 and workers >= 1"):
        prefetch(make, range(3), depth=0)


def test_pin_memory_without_cuda_warns_and_pins_nothing(features):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: pinning works here")
    with pytest.warns(UserWarning, match="no CUDA"):
        batches = prefetch(lambda s: features.batch([s]), range(2), pin_memory=True)
    assert [s for s, _ in batches] == [0, 1]
    batch = features.batch([0, 1], pin_memory=True)  # asked of the dataset: ignored alike
    assert not batch.text.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pinned_batches_reach_the_gpu_unchanged(features):
    idx = batch_indices(features, 0, 6, seed=0)
    pinned = features.batch(idx, text_dtype=None, pin_memory=True)
    assert all(t.is_pinned() for t in (pinned.images, pinned.latent_std, pinned.text, pinned.mask, pinned.img_hw))
    on_gpu = to_device(pinned, "cuda")
    torch.cuda.synchronize()
    assert on_gpu.text.dtype == torch.float32 and on_gpu.images.is_cuda
    assert_same_batch(on_gpu.to("cpu"), features.batch(idx))
    ((_, batch),) = list(prefetch(lambda s: features.batch(idx), range(1), pin_memory=True))
    assert batch.text.is_pinned()


# ----------------------------------------------------------------------------------------------------------
# FeatureDataset.batch
# ----------------------------------------------------------------------------------------------------------


def test_text_keeps_its_stored_dtype_on_request_and_mixed_chunks_promote(tmp_path):
    data = FeatureDataset(write_features(tmp_path / "a", text_dtypes=(torch.bfloat16, torch.float32)))
    in_bf16, in_fp32, both = [0, 3, 7], [8, 9], [1, 8, 2]  # chunks of 8: chunk 0 bf16, chunk 1 fp32
    old = per_sample(data, both)
    assert old.text.dtype == torch.float32 and old.images.dtype == torch.float32
    assert_same_batch(data.batch(both), old)
    assert data.batch(in_bf16, text_dtype=None).text.dtype == torch.bfloat16
    assert data.batch(in_fp32, text_dtype=None).text.dtype == torch.float32
    assert_same_batch(data.batch(both, text_dtype=None), old)  # stored dtypes differ: float32
    kept = data.batch(in_bf16, text_dtype=None)
    assert torch.equal(kept.text.float(), data.batch(in_bf16).text)
    moved = to_device(kept, "cpu")
    assert moved.text.dtype == torch.float32 and torch.equal(moved.text, data.batch(in_bf16).text)
    with pytest.raises(ValueError, match="floating-point dtype"):
        data.batch([0], text_dtype=torch.int64)


def test_text_is_padded_with_zeros_and_masked(features):
    idx = list(range(len(features)))
    batch = features.batch(idx, text_dtype=None)
    assert batch.text.shape == (len(idx), 120, E) and batch.mask.shape == (len(idx), 120)
    assert batch.mask.sum(1).tolist() == [features.tokens[i] for i in idx]
    assert (batch.text[~batch.mask] == 0).all() and (batch.text[batch.mask] != 0).all()
    assert batch.labels.tolist() == [i % 3 for i in idx]


def test_a_batch_still_held_is_never_overwritten(features):
    features = FeatureDataset(features.root)  # its own buffer pool
    first = features.batch([0, 1, 2], text_dtype=None)
    copy = Batch(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(first).items()})
    view = features.batch([3, 4, 5], text_dtype=None).text[1]  # only a view of the batch's text kept
    saved = view.clone()
    for step in range(12):  # as many batches again of each shape: the free buffers are reused
        features.batch([6 + step % 3, 7, 8], text_dtype=None)
    assert_same_batch(first, copy) and torch.equal(view, saved)
    # 14 batches of 5 buffers each (mean, std, text and the bfloat16 latents' scratch pair), 3 at most alive
    assert len(features._buffers._bases) <= 3 * 5


def test_the_dataset_pickles_for_worker_processes(features):
    twin = pickle.loads(pickle.dumps(features))
    assert_same_batch(twin.batch([5, 1, 12]), features.batch([5, 1, 12]))


def test_batches_take_one_bucket_and_indices_in_range(tmp_path):
    data = FeatureDataset(write_features(tmp_path, samples=12, resolution=64, ratios=(1.0, 0.5, 2.0), downsample=4))
    assert len(data.buckets) == 3
    ids = data.bucket_ids()
    same = [i for i in range(len(data)) if ids[i] == ids[0]]
    assert_same_batch(data.batch(same), per_sample(data, same))
    assert data.batch(np.array(same)).images.shape == (len(same), 4, 16, 16)
    with pytest.raises(ValueError, match=r"cannot stack 'latent_mean' of shapes .*batch one bucket at a time"):
        data.batch([0, 1])
    with pytest.raises(IndexError, match="sample index 12 out of range"):
        data.batch([0, 12])
    assert_same_batch(data.batch([-12]), data.batch([0]))
    with pytest.raises(IndexError):
        data[12]


def test_a_chunk_damaged_after_the_dataset_opened_is_named(tmp_path):
    out = write_features(tmp_path, samples=8, chunk_size=4)
    data = FeatureDataset(out)
    data.batch([0, 5])  # both chunks' layouts parsed and cached
    chunk = out / chunk_name(1)
    whole = chunk.read_bytes()
    chunk.write_bytes(whole[: 8 + int.from_bytes(whole[:8], "little") + 10])  # cut short after it was parsed
    with pytest.raises(ValueError, match=rf"feature chunk {chunk}.*not a readable safetensors file.*delete it"):
        data.batch([0, 5])
    assert data.batch([0, 1]).images.shape[0] == 2  # the other chunk reads on
    chunk.write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match=rf"feature chunk {chunk} is not a readable safetensors file"):
        data.batch([4])
    chunk.unlink()
    with pytest.raises(ValueError, match=rf"feature chunk {chunk} is not a readable safetensors file"):
        data.batch([4])
