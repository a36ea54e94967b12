"""The embedded default data set: determinism, ground truth that matches the pixels, buckets and batching."""
import numpy as np
import pytest
import torch

from pixart_fast.data import (
    BACKGROUND, BUCKETS, CLASS_NAMES, COLOURS, NUM_CLASSES, REGIONS, SHAPES, SIZES, AspectScenes,
    Scene, ShapeClasses, ShapeObject, ShapeScenes, pixel_truth, render, shape_coverage,
)
from pixart_fast.model import CONFIGS
from pixart_fast.text import TextEncoder


def _rgb(colour):
    """RGB in [0, 1] -> a hashable triple of thousandths, so float32 pixels compare with float64 constants."""
    return tuple(int(v) for v in np.rint(np.asarray(colour, dtype=np.float64) * 1000))


_PALETTE = {_rgb(c) for c in [*COLOURS.values(), BACKGROUND]}


def _pixels(image):
    """(3, H, W) in [-1, 1] -> the set of distinct pixel colours, as _rgb triples."""
    rgb = np.unique(((image.double() + 1) / 2).permute(1, 2, 0).reshape(-1, 3).numpy(), axis=0)
    return {_rgb(p) for p in rgb}


@pytest.mark.parametrize("make", [ShapeClasses, ShapeScenes, AspectScenes])
def test_sample_depends_only_on_seed_split_and_index(make):
    a, b = make(length=50, seed=3), make(length=50, seed=3)
    forward = [a[i] for i in (0, 7, 49)]
    backward = [b[i] for i in (49, 7, 0)][::-1]  # other instance, other order
    for x, y in zip(forward, backward):
        assert torch.equal(x["image"], y["image"]) and x["truth"] == y["truth"]
    assert not torch.equal(a[7]["image"], make(length=50, seed=4)[7]["image"])
    assert not torch.equal(a[7]["image"], make(length=50, seed=3, split="val")[7]["image"])
    assert make(length=1000, seed=3)[7]["truth"] == a[7]["truth"]  # the virtual length does not change a sample


@pytest.mark.parametrize("make", [ShapeClasses, ShapeScenes, AspectScenes])
def test_images_are_float_in_range(make):
    ds = make(length=10)
    for i in range(10):
        image, truth = ds[i]["image"], ds[i]["truth"]
        assert image.dtype == torch.float32 and image.shape == (3, truth.height, truth.width)
        assert image.min() >= -1 and image.max() <= 1


def test_bad_arguments_are_refused():
    with pytest.raises(IndexError):
        ShapeScenes(length=5)[5]
    with pytest.raises(ValueError, match="split"):
        ShapeScenes(split="test")
    with pytest.raises(ValueError, match="divisible by 8"):
        AspectScenes(buckets=((64, 60),))
    with pytest.raises(ValueError, match="objects must be counts from 1 to 4"):
        ShapeScenes(objects=(1, 5))[0]
    with pytest.raises(ValueError, match="unknown shape"):
        shape_coverage("star", 5, 5, 3, 10, 10)


def test_stage1_labels_name_the_drawn_object():
    ds = ShapeClasses(length=200)
    assert ds.num_classes == NUM_CLASSES == len(SHAPES) * len(COLOURS) == 24
    assert len(set(ds.class_names)) == 24 and ds.class_names == CLASS_NAMES
    labels = set()
    for i in range(200):
        s = ds[i]
        (obj,) = s["truth"].objects
        assert CLASS_NAMES[s["label"]] == f"{obj.colour} {obj.shape}"
        assert s["caption"] == f"a {obj.colour} {obj.shape}"
        assert obj.region is None and obj.size is None  # stage 1 conditions on the class only
        assert _pixels(s["image"]) == {_rgb(COLOURS[obj.colour]), _rgb(BACKGROUND)}
        labels.add(s["label"])
    assert len(labels) == 24


def test_stage1_scenes_have_stage2_objects_and_the_class_names_the_first():
    scenes, classes = ShapeClasses(length=300, scenes=True), ShapeScenes(length=300)
    counts, radii = set(), []
    for i in range(300):
        s, reference = scenes[i], classes[i]  # the same (seed, split, index) draws the same scene
        (named,) = s["truth"].objects
        first = reference["truth"].objects[0]
        assert CLASS_NAMES[s["label"]] == f"{first.colour} {first.shape}" == f"{named.colour} {named.shape}"
        assert named.region is None and named.size is None and s["caption"] == f"a {named.colour} {named.shape}"
        assert torch.equal(s["image"], reference["image"])  # distractors drawn, stage-2 sizes and cells
        counts.add(len(reference["truth"].objects))
        radii.append(named.radius / (32 / 3))
    assert counts == {1, 2, 3}
    assert min(radii) >= 0.95 * min(SIZES.values()) and max(radii) <= 1.05 * max(SIZES.values())


def test_scene_object_counts_are_drawn_from_the_listed_ones():
    counts = [len(ShapeScenes(length=400, objects=(1, 3, 4, 4))[i]["truth"].objects) for i in range(400)]
    assert set(counts) == {1, 3, 4}
    assert 150 <= counts.count(4) <= 250  # half of 400, drawn
    assert len(ShapeScenes(length=1, objects=(4,))[0]["truth"].objects) == 4
    # the longest 4-object caption (every size named, two-word regions) fits the embedded models' 32 word tokens
    longest = Scene(32, 32, tuple(ShapeObject(c, "triangle", 5, 5, 3, r, "small") for c, r in
                                  zip(COLOURS, ("top left", "top right", "bottom left", "bottom right"))))
    assert len(TextEncoder.word_tokenizer()(longest.caption)["input_ids"]) == CONFIGS["PixArt-pixel-32-pd"].max_tokens


def test_stage2_scenes_match_their_captions():
    ds = ShapeScenes(length=150)
    counts = set()
    for i in range(150):
        s = ds[i]
        scene, image = s["truth"], s["image"]
        objs = scene.objects
        counts.add(len(objs))
        assert len({o.colour for o in objs}) == len(objs) and len({o.region for o in objs}) == len(objs)
        for o in objs:
            assert o.phrase() in s["caption"]
            row, col = divmod(REGIONS.index(o.region), 3)
            # the whole bounding box lies in the stated cell, so objects never overlap
            assert row * 32 / 3 <= o.cy - o.radius and o.cy + o.radius <= (row + 1) * 32 / 3
            assert col * 32 / 3 <= o.cx - o.radius and o.cx + o.radius <= (col + 1) * 32 / 3
        # hard edges: only palette colours and the background; every stated colour is drawn
        assert _pixels(image) == {_rgb(c) for c in [BACKGROUND, *(COLOURS[o.colour] for o in objs)]}
    assert counts == {1, 2, 3}


def test_pixel_truth_names_what_each_pixel_shows():
    palette = np.array([BACKGROUND, *COLOURS.values()])
    for i in range(20):
        sample = ShapeScenes(length=20, seed=5)[i]
        truth, rgb = pixel_truth(sample["truth"]), (sample["image"].double().numpy() + 1) / 2
        np.testing.assert_allclose(rgb, palette[truth[2]].transpose(2, 0, 1), atol=1e-6)  # colour, background 0
        assert ((truth[0] > 0) == (truth[2] > 0)).all() and ((truth[1] > 0) == (truth[2] > 0)).all()
        for o in sample["truth"].objects:
            here = truth[2] == 1 + list(COLOURS).index(o.colour)
            assert here.any()
            assert (truth[0][here] == 1 + SHAPES.index(o.shape)).all()
            assert (truth[1][here] == 1 + list(SIZES).index(o.size)).all()
    with pytest.raises(ValueError, match="pixel_truth needs one of"):
        pixel_truth(ShapeClasses(length=1)[0]["truth"])


def test_captions_fit_120_byt5_tokens():
    """ByT5 takes one token per byte plus EOS: the longest caption the grammar allows must fit in 120."""
    longest = lambda words, n: sorted(words, key=len, reverse=True)[:n]
    worst = Scene(32, 32, tuple(
        ShapeObject(colour, longest(SHAPES, 1)[0], 0.0, 0.0, 1.0, region, "small")
        for colour, region in zip(longest(COLOURS, 3), longest(REGIONS, 3))
    ))
    assert len(worst.caption.encode()) + 1 <= 120, worst.caption
    ds = ShapeScenes(length=500)
    assert max(len(ds[i]["caption"].encode()) for i in range(500)) <= len(worst.caption.encode())


def test_size_words():
    scene = Scene(32, 32, tuple(ShapeObject("red", "circle", 5, 5, 2, "top left", size) for size in SIZES))
    want = "a small red circle at top left, a red circle at top left and a large red circle at top left"
    assert scene.caption == want


def test_render_antialiasing():
    scene = Scene(24, 24, (ShapeObject("red", "circle", 12.3, 11.7, 6.4, "center", "large"),))
    hard, soft = render(scene), render(scene, supersample=4)
    assert _pixels(hard) <= _PALETTE
    assert len(_pixels(soft) - _PALETTE) > 10  # edge pixels blend the colour into the background
    # coverage is area: the supersampled disc's total coverage is close to pi r^2
    area = shape_coverage("circle", 12.3, 11.7, 6.4, 24, 24, supersample=8).sum()
    assert abs(area - np.pi * 6.4**2) < 0.01 * np.pi * 6.4**2


def test_stage3_buckets_and_micro_conditions():
    ds = AspectScenes(length=20)
    assert all(h % 8 == 0 and w % 8 == 0 for h, w in BUCKETS)
    for i in range(10):
        s = ds[i]
        h, w = BUCKETS[ds.bucket_ids()[i]]
        assert s["image"].shape == (3, h, w) and (s["truth"].height, s["truth"].width) == (h, w)
        assert s["img_hw"].tolist() == [h, w] and s["aspect_ratio"].item() == pytest.approx(h / w)
        assert len(_pixels(s["image"]) - _PALETTE) > 0  # anti-aliased
    assert {tuple(ds[i]["image"].shape[1:]) for i in range(10)} == set(BUCKETS)


def test_a_batch_is_typed_and_takes_one_bucket_at_a_time():
    ds = AspectScenes(length=40)
    ids = ds.bucket_ids()
    batch = ds.batch(np.flatnonzero(ids == ids[0])[:3])
    h, w = batch.truths[0].height, batch.truths[0].width
    assert batch.images.shape == (3, 3, h, w) and len(batch) == 3
    assert batch.img_hw.shape == (3, 2) and batch.aspect_ratio.shape == (3,)
    assert len(batch.captions) == 3 and all(isinstance(c, str) for c in batch.captions)
    assert batch.labels is None and batch.text is None and not batch.is_latent
    assert batch.x0() is batch.images  # pixel space: the images themselves
    labels = ShapeClasses(length=4).batch(range(4)).labels
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    with pytest.raises(ValueError, match="one bucket at a time"):
        ds.batch([0, 1])


def test_validation_split_is_fixed_and_held_out():
    for kind in (ShapeClasses, ShapeScenes, AspectScenes):
        val = kind(length=32, split="val")
        assert len(val) == 32
        assert val[5]["truth"] == kind(length=32, split="val")[5]["truth"]
    val, train = ShapeScenes(length=32, split="val"), ShapeScenes(length=32)
    assert sum(val[i]["truth"] == train[i]["truth"] for i in range(32)) == 0
