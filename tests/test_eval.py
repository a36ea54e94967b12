"""The alignment score: ground-truth renders pass; noise, blanks and images with the wrong colour, position
or shape fail on exactly the criterion that is wrong."""
import dataclasses
import math

import pytest
import torch

from pixart_fast.data import COLOURS, SHAPES, AspectScenes, Scene, ShapeClasses, ShapeObject, ShapeScenes, render
from pixart_fast.eval import alignment_accuracy, alignment_scores, classify_shape, colour_labels, score_objects


def _held_out(stage):
    val = {1: ShapeClasses, 2: ShapeScenes, 3: AspectScenes}[stage](length=32, split="val")
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


def test_ground_truth_renders_score_near_one(held_out):
    _, images, truths = held_out
    scores = alignment_scores(images, truths)
    assert scores["objects"] == sum(len(t.objects) for t in truths) > 32
    assert scores["accuracy"] >= 0.95 and min(scores["colour"], scores["position"], scores["shape"]) >= 0.95
    assert alignment_accuracy(images, truths) == scores["accuracy"]


def test_stage1_scores_colour_and_shape_only():
    images, truths = _held_out(1)
    scores = alignment_scores(images, truths)
    assert math.isnan(scores["position"])  # stage 1 states no region
    assert scores["accuracy"] >= 0.95


def test_noise_and_blank_images_score_low(held_out):
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
        assert scores["accuracy"] <= 0.05 and scores["colour"] <= 0.05, (name, scores)


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
    assert scores["colour"] >= 0.95 and scores["shape"] >= 0.95, scores


def test_wrong_shapes_fail_on_shape_only(held_out):
    stage, _, truths = held_out
    next_shape = lambda o, t: dataclasses.replace(o, shape=SHAPES[(SHAPES.index(o.shape) + 1) % len(SHAPES)])
    scores = alignment_scores(_redraw(truths, stage, next_shape), truths)
    assert scores["shape"] <= 0.05 and scores["accuracy"] <= 0.05, scores
    assert scores["colour"] >= 0.95 and scores["position"] >= 0.95, scores


def test_shape_classifier_on_large_clean_shapes():
    for shape in SHAPES:
        blob = render(Scene(40, 40, (ShapeObject("red", shape, 19.6, 20.3, 12.7),)))[0] > 0  # red channel
        assert classify_shape(blob.numpy()) == shape
    assert classify_shape(torch.zeros(8, 8, dtype=torch.bool).numpy()) is None


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
