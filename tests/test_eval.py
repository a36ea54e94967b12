"""The alignment score: ground-truth renders pass every check, well above each check's chance level; noise, blanks,
shuffled captions and images with the wrong colour, position, shape or size fail on exactly the criterion that is
wrong; shapeless smears fail shape; speckle lowers the background score; a drawing that ignores a word scores that
word's chance level."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from pixart_fast.data import (
    BACKGROUND, COLOURS, SHAPES, SIZES, AspectScenes, Scene, ShapeClasses, ShapeObject, ShapeScenes, render,
    shape_coverage,
)
from pixart_fast.eval import (
    SIZE_BANDS, _templates, alignment_accuracy, alignment_scores, classify_shape, colour_labels, fit_shapes,
    score_objects,
)

CHECKS = ("colour", "position", "shape", "size")


def _held_out(stage, length=32):
    val = {1: ShapeClasses, 2: ShapeScenes, 3: AspectScenes}[stage](length=length, split="val")
    samples = [val[i] for i in range(len(val))]
    return [s["image"] for s in samples], [s["truth"] for s in samples]


@pytest.fixture(scope="module", params=[2, 3])
def held_out(request):
    """(stage, images, truths): stage 2 (32 px, hard edges, one tensor) and stage 3 (anti-aliased, mixed sizes)."""
    images, truths = _held_out(request.param)
    if request.param == 2:
        images = torch.stack(images)  # (32, 3, 32, 32)
    return request.param, images, truths


def _redraw(truths, stage, change):
    """Render every truth with each object changed by change(object, scene)."""
    supersample = 4 if stage == 3 else 1
    return [render(dataclasses.replace(t, objects=tuple(change(o, t) for o in t.objects)), supersample) for t in truths]


def _paint(truth, masks) -> torch.Tensor:
    """An image of truth's size: the background, each object's colour on its (H, W) bool mask."""
    image = np.empty((truth.height, truth.width, 3))
    image[:] = BACKGROUND
    for o, mask in zip(truth.objects, masks):
        image[mask] = COLOURS[o.colour]
    return torch.from_numpy(image).permute(2, 0, 1).float() * 2 - 1


def test_ground_truth_renders_score_near_one_and_far_above_chance(held_out):
    _, images, truths = held_out
    scores = alignment_scores(images, truths)
    assert scores["objects"] == sum(len(t.objects) for t in truths) > 32
    assert scores["accuracy"] >= 0.95 and min(scores[c] for c in CHECKS) >= 0.95, scores
    assert scores["background"] >= 0.99, scores
    for check in CHECKS + ("accuracy",):  # chance: the same images against captions with that word redrawn
        assert scores[f"{check}_chance"] <= scores[check] - 0.4, (check, scores)
    assert scores["shape_chance"] == pytest.approx(0.25, abs=0.03) and scores["accuracy_chance"] <= 0.02, scores
    assert alignment_accuracy(images, truths) == scores["accuracy"]


def test_stage1_scores_colour_and_shape_only():
    images, truths = _held_out(1)
    scores = alignment_scores(images, truths)
    assert math.isnan(scores["position"]) and math.isnan(scores["position_chance"])  # stage 1 states no region
    assert math.isnan(scores["size"]) and math.isnan(scores["size_chance"])  # nor a size
    assert scores["accuracy"] >= 0.95 and scores["shape"] >= 0.95 and scores["shape_chance"] <= 0.3, scores


def test_noise_and_blank_images_score_zero(held_out):
    _, images, truths = held_out
    g = torch.Generator().manual_seed(0)
    fakes = {
        "uniform noise": [torch.rand(i.shape, generator=g) * 2 - 1 for i in images],
        "gaussian noise": [torch.randn(i.shape, generator=g).clamp(-1, 1) for i in images],
        "zeros": [torch.zeros_like(i) for i in images],
        "background": _redraw(truths, held_out[0], lambda o, t: dataclasses.replace(o, radius=1e-3)),
    }
    for name, fake in fakes.items():
        scores = alignment_scores(fake, truths)
        assert scores["accuracy"] <= 0.05 and max(scores[c] for c in CHECKS) <= 0.05, (name, scores)
        assert max(scores[f"{c}_chance"] for c in CHECKS) <= 0.05, (name, scores)
        if name != "background":
            assert scores["background"] <= 0.2, (name, scores)


def _shuffled(images, truths):
    """Each image with the caption of the next image of its size (stage 3 mixes sizes)."""
    by_size = {}
    for k, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(k)
    other = {}
    for ks in by_size.values():
        other.update({k: ks[(j + 1) % len(ks)] for j, k in enumerate(ks)})
    return [truths[other[k]] for k in range(len(images))]


def test_shuffled_captions_score_at_chance():
    for stage in (2, 3):
        images, truths = _held_out(stage, length=80)
        scores = alignment_scores(images, _shuffled(images, truths))
        assert scores["accuracy"] <= 0.05, (stage, scores)
        for check in CHECKS:  # another caption's words are as good as words drawn at random
            assert scores[check] <= scores[f"{check}_chance"] + 0.12, (stage, check, scores)
        assert scores["shape"] <= 0.35 and scores["position"] <= 0.2, (stage, scores)


def test_wrong_colours_fail_on_colour(held_out):
    stage, _, truths = held_out

    def unused_colour(o, t):  # a colour no object of the scene has, so nothing else can answer for it
        unused = [c for c in COLOURS if c not in {p.colour for p in t.objects}]
        return dataclasses.replace(o, colour=unused[t.objects.index(o)])

    scores = alignment_scores(_redraw(truths, stage, unused_colour), truths)
    assert scores["colour"] <= 0.05 and scores["accuracy"] <= 0.05, scores


def test_wrong_region_fails_on_position_only(held_out):
    _, images, truths = held_out
    # roll every image by a third of its width: each object lands in the next column (wrapping around)
    shifted = [torch.roll(i, i.shape[-1] // 3, dims=-1) for i in images]
    scores = alignment_scores(shifted, truths)
    assert scores["position"] <= 0.05 and scores["accuracy"] <= 0.05, scores
    assert min(scores["colour"], scores["shape"], scores["size"]) >= 0.95, scores


def test_wrong_shapes_fail_on_shape_only(held_out):
    stage, _, truths = held_out
    for k in (1, 2, 3):  # every other shape in turn
        other_shape = lambda o, t: dataclasses.replace(o, shape=SHAPES[(SHAPES.index(o.shape) + k) % len(SHAPES)])
        scores = alignment_scores(_redraw(truths, stage, other_shape), truths)
        assert scores["shape"] <= 0.05 and scores["accuracy"] <= 0.05, (k, scores)
        assert min(scores["colour"], scores["position"], scores["size"]) >= 0.95, (k, scores)


def test_the_breakdown_by_word_names_the_shape_drawn_wrong(held_out):
    stage, images, truths = held_out
    words = alignment_scores(images, truths)["words"]
    for word in SHAPES + tuple(SIZE_BANDS):  # ground truth: every word drawn, far above its chance
        assert words[word] >= 0.9 and words[f"{word}_chance"] <= words[word] - 0.4, (word, words)
    as_square = lambda o, t: dataclasses.replace(o, shape="square") if o.shape == "triangle" else o  # noqa: E731
    scores = alignment_scores(_redraw(truths, stage, as_square), truths)
    words = scores["words"]
    assert words["triangle"] <= 0.05 and min(words[w] for w in ("circle", "square", "diamond")) >= 0.9, words
    assert scores["shape"] == pytest.approx(np.mean([o.shape != "triangle" for t in truths for o in t.objects]),
                                            abs=0.1), scores


def test_wrong_sizes_fail_on_size_only(held_out):
    stage, _, truths = held_out
    swap = {"small": "large", "large": "small", "medium": "medium"}

    def other_size(o, t):
        return dataclasses.replace(o, radius=o.radius / SIZES[o.size] * SIZES[swap[o.size]])

    scores = alignment_scores(_redraw(truths, stage, other_size), truths)
    unsized = np.mean([o.size not in SIZE_BANDS for t in truths for o in t.objects])  # medium: no size to fail
    assert scores["size"] <= 0.05 and scores["accuracy"] <= unsized + 0.05, scores
    assert min(scores["colour"], scores["position"], scores["shape"]) >= 0.9, scores


def test_medium_drawings_rarely_pass_for_small_or_large():
    # captions never name "medium"; a medium object scored as if its caption had said small, then large
    for stage in (2, 3):
        images, truths = _held_out(stage, length=80)
        for named in ("small", "large"):
            relabelled = [dataclasses.replace(t, objects=tuple(dataclasses.replace(o, size=named if o.size == "medium"
                          else None) for o in t.objects)) for t in truths]
            scores = alignment_scores(images, relabelled)
            assert scores["size"] <= 0.15, (stage, named, scores)


def test_smears_fail_shape(held_out):
    """Each object replaced by a blob of its colour, area and place but no shape of the four."""
    stage, _, truths = held_out
    rng = np.random.default_rng(0)

    def ellipse(o, yy, xx):  # aspect ratio 1.6-2.2, any orientation, the object's area
        area = shape_coverage(o.shape, o.cy, o.cx, o.radius, *yy.shape, supersample=4).sum()
        aspect, angle = rng.uniform(1.6, 2.2), rng.uniform(0, np.pi)
        b = np.sqrt(area / np.pi / aspect)
        dy, dx = yy - o.cy, xx - o.cx
        u, v = dx * np.cos(angle) + dy * np.sin(angle), dy * np.cos(angle) - dx * np.sin(angle)
        return (u / (aspect * b)) ** 2 + (v / b) ** 2 <= 1

    def lumps(o, yy, xx):  # four overlapping discs of random sizes around the centre
        mask = np.zeros(yy.shape, dtype=bool)
        for _ in range(4):
            r, d, a = o.radius * rng.uniform(0.35, 0.6), o.radius * rng.uniform(0.2, 0.6), rng.uniform(0, 2 * np.pi)
            mask |= (yy - o.cy - d * np.sin(a)) ** 2 + (xx - o.cx - d * np.cos(a)) ** 2 <= r * r
        return mask

    for smear, most in ((ellipse, 0.02), (lumps, 0.1)):
        images = []
        for t in truths:
            yy, xx = np.mgrid[0:t.height, 0:t.width] + 0.5
            images.append(_paint(t, [smear(o, yy, xx) for o in t.objects]))
        scores = alignment_scores(images, truths)
        assert scores["shape"] <= most and scores["shape"] <= scores["shape_chance"] + 0.02, (smear.__name__, scores)
        assert scores["colour"] >= 0.95 and scores["position"] >= 0.9, (smear.__name__, scores)


def test_speckle_lowers_the_background_only(held_out):
    _, images, truths = held_out
    g = torch.Generator().manual_seed(0)
    clean = alignment_scores(images, truths)
    for fraction in (0.03, 0.1):
        speckled = []
        for image in images:
            hit = torch.rand(image.shape[1:], generator=g) < fraction
            speckled.append(torch.where(hit, torch.rand(image.shape, generator=g) * 2 - 1, image))
        scores = alignment_scores(speckled, truths)
        assert scores["background"] <= clean["background"] - 0.6 * fraction, (fraction, scores)
        if fraction == 0.03:
            assert min(scores[c] for c in ("colour", "position")) >= 0.95, scores
    shifted = [(image + 0.3).clamp(-1, 1) for image in images]  # a background of another grey: no pixel is flat
    assert alignment_scores(shifted, truths)["background"] <= 0.05


def test_a_drawing_that_ignores_a_word_scores_its_chance(held_out):
    stage, _, truths = held_out
    squares = alignment_scores(_redraw(truths, stage, lambda o, t: dataclasses.replace(o, shape="square")), truths)
    stated = np.mean([o.shape == "square" for t in truths for o in t.objects])
    assert squares["shape"] == pytest.approx(stated, abs=0.02)
    assert squares["shape_chance"] == pytest.approx(0.25, abs=0.02)  # only "square" would pass, 1 in 4

    def large(o, t):
        return dataclasses.replace(o, radius=o.radius / SIZES[o.size] * SIZES["large"])

    larges = alignment_scores(_redraw(truths, stage, large), truths)
    named = [o.size == "large" for t in truths for o in t.objects if o.size in SIZE_BANDS]
    assert larges["size"] == pytest.approx(np.mean(named), abs=0.05)
    assert larges["size_chance"] == pytest.approx(0.5, abs=0.05)  # only "large" would pass, 1 in 2


def test_templates_are_the_renderers():
    rng = np.random.default_rng(0)
    cy, cx, r = rng.uniform(8, 24, 50), rng.uniform(8, 24, 50), rng.uniform(2, 8, 50)
    ys = xs = np.arange(32) + 0.5
    for shape in SHAPES:
        drawn = np.stack([shape_coverage(shape, *p, 32, 32) >= 0.5 for p in zip(cy, cx, r)])
        assert (_templates(shape, cy, cx, r, ys, xs) == drawn).all(), shape


def test_shape_classifier_on_clean_shapes_and_an_ellipse():
    for shape in SHAPES:
        blob = render(Scene(40, 40, (ShapeObject("red", shape, 19.6, 20.3, 12.7),)))[0] > 0  # red channel
        assert classify_shape(blob.numpy()) == shape
        assert fit_shapes(blob.numpy())[shape] >= 0.99
    yy, xx = np.mgrid[0:40, 0:40] + 0.5
    assert classify_shape(((yy - 20) / 6) ** 2 + ((xx - 20) / 14) ** 2 <= 1) is None
    assert classify_shape(torch.zeros(8, 8, dtype=torch.bool).numpy()) is None


def test_size_bands_hold_the_renderers_sizes():
    for size, (low, high) in SIZE_BANDS.items():
        assert low < SIZES[size] * 0.95 and SIZES[size] * 1.05 < high
        assert not low <= SIZES["medium"] <= high  # a medium drawing of nominal size passes for neither


def test_colour_labels():
    scene = Scene(16, 16, (ShapeObject("cyan", "square", 8, 8, 4),))
    labels = colour_labels(render(scene))
    assert (labels[6:10, 6:10] == list(COLOURS).index("cyan")).all() and (labels[:3] == -1).all()  # background: none


def test_mismatched_inputs_are_refused():
    images, truths = _held_out(2)
    with pytest.raises(ValueError, match="one truth per image"):
        alignment_scores(images[:3], truths[:2])
    with pytest.raises(ValueError, match="does not match"):
        alignment_scores([images[0][:, :16]], truths[:1])


def test_clusters_whose_median_falls_between_them_are_scored_not_crashed():
    # Two small red squares in opposite corners: the median of their blocks lies in the empty middle, more than a
    # cell from either; the scorer must anchor on a real blob instead of averaging nothing.
    objects = tuple(ShapeObject("red", "square", c, c, 2.0) for c in (2.5, 29.5))
    drawn = render(Scene(32, 32, objects))
    truth = Scene(32, 32, (ShapeObject("red", "square", 2.5, 2.5, 2.0, region="top left", size="small"),))
    result = score_objects(drawn, truth)
    assert result[0]["colour"] is True and result[0]["position"] in (True, False)
    assert set(result[0]) == {"colour", "position", "shape", "size"}
