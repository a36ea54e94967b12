"""The embedded default data (docs/ARCHITECTURE.md section 5): procedurally rendered coloured shapes whose captions state
exactly what is in the image, so generated samples can be scored automatically (`pixart_fast.eval`).

    ShapeClasses  stage 1: one object, class = shape x colour (24 classes), 32 px, hard edges
    ShapeScenes   stage 2: 1-3 objects (training may draw other counts, up to 4) in distinct cells of a 3x3 grid,
                  captioned, 32 px, hard edges
    AspectScenes  stage 3: like stage 2 but anti-aliased, 64-px base size in five aspect-ratio buckets

Every dataset is map-style with a configurable virtual length. Sample i is a pure function of (seed, split, i):
its own numpy Generator is seeded with that triple, so it never depends on batch size, order or workers.
split "val" draws from a stream disjoint from every training seed. Nothing is downloaded or shipped.

Images are float32 (3, H, W) in [-1, 1], pixel space (the model sees them directly, no VAE). Each sample keeps
its ground truth, a `Scene`, under "truth".
"""
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from pixart_fast.batch import Batch

# RGB in [0, 1]. Pairwise distances are >= 0.6, so a pixel within 0.3 of one of them is unambiguous.
COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.15, 0.25, 0.95),
    "yellow": (0.95, 0.85, 0.10),
    "purple": (0.75, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.85),
}
BACKGROUND = (0.15, 0.15, 0.15)
SHAPES = ("circle", "square", "triangle", "diamond")
# The 3x3 grid of cells, row-major: REGIONS[3 * row + col].
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
# Object radius (half its bounding-box side) as a fraction of the cell side; "medium" is not named in captions.
SIZES = {"small": 0.32, "medium": 0.39, "large": 0.46}
OBJECTS = (1, 2, 3)  # the object counts of a scene, one drawn uniformly; the held-out scenes always have these
MAX_OBJECTS = 4  # objects a scene can hold: a 4-object caption is at most 32 word tokens, EOS included
# Stage-3 aspect-ratio buckets (height, width): sides divisible by 8, about 64 * 64 pixels each.
BUCKETS = ((64, 64), (48, 80), (80, 48), (56, 72), (72, 56))

CLASS_NAMES = tuple(f"{colour} {shape}" for shape in SHAPES for colour in COLOURS)  # stage-1 label -> name
NUM_CLASSES = len(CLASS_NAMES)
SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object. Geometry in pixels, origin at the image's top-left corner."""

    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES
    cy: float  # centre of the bounding box
    cx: float
    radius: float  # half the side of the (square) bounding box
    region: str | None = None  # one of REGIONS, or None where the condition does not state it (stage 1)
    size: str | None = None  # a key of SIZES, or None where the condition does not state it (stage 1)

    def phrase(self) -> str:
        """'a small red circle at top left'. Regions are named without 'the' to keep 3-object captions
        within 120 ByT5 tokens (one per byte, plus EOS)."""
        size = f"{self.size} " if self.size in ("small", "large") else ""
        words = f"a {size}{self.colour} {self.shape}"
        return words if self.region is None else f"{words} at {self.region}"


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image: its size and the objects drawn on it, in drawing order."""

    height: int
    width: int
    objects: tuple[ShapeObject, ...]

    @property
    def caption(self) -> str:
        """'a red circle at top left, a small blue square at center and a large green diamond at right'."""
        phrases = [o.phrase() for o in self.objects]
        return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def shape_coverage(
    shape: str, cy: float, cx: float, radius: float, height: int, width: int, supersample: int = 1,
    radius_x: float | None = None,
) -> np.ndarray:
    """Fraction of each pixel covered by the shape: (height, width) float in [0, 1].

    Point-samples a supersample x supersample grid inside every pixel (1: the pixel centre only, giving hard
    0/1 edges). In units of the radius, with v pointing down: circle u^2 + v^2 <= 1, square max(|u|, |v|) <= 1,
    triangle apex up (0, -1) with its base on v = 1, diamond |u| + |v| <= 1. radius_x, when given, stretches
    the shape to a different horizontal half-side (the evaluator fits templates to bounding boxes).
    """
    s = supersample
    v = ((np.arange(height * s) + 0.5) / s - cy)[:, None] / radius  # (H*s, 1)
    u = ((np.arange(width * s) + 0.5) / s - cx)[None, :] / (radius_x or radius)  # (1, W*s)
    if shape == "circle":
        inside = u * u + v * v <= 1
    elif shape == "square":
        inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    elif shape == "triangle":
        inside = (v <= 1) & (2 * np.abs(u) <= v + 1)
    elif shape == "diamond":
        inside = np.abs(u) + np.abs(v) <= 1
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def render(scene: Scene, supersample: int = 1) -> torch.Tensor:
    """Draw a scene: (3, H, W) float32 in [-1, 1]. supersample > 1 anti-aliases the edges (supersample^2
    point samples per pixel, averaged)."""
    image = np.empty((scene.height, scene.width, 3))
    image[:] = BACKGROUND
    for o in scene.objects:
        alpha = shape_coverage(o.shape, o.cy, o.cx, o.radius, scene.height, scene.width, supersample)[..., None]
        image = image * (1 - alpha) + np.asarray(COLOURS[o.colour]) * alpha
    return torch.from_numpy(image).permute(2, 0, 1).float() * 2 - 1


# pixel_truth's labels: classes of each, 0 the background
TRUTH_CLASSES = {"shape": 1 + len(SHAPES), "size": 1 + len(SIZES), "colour": 1 + len(COLOURS)}


def pixel_truth(scene: Scene) -> np.ndarray:
    """What each pixel of `render(scene)` shows: (3, H, W) int64, the rows shape, size and colour, each 0 for the
    background and 1 + the index into SHAPES, SIZES and COLOURS where an object covers at least half the pixel (a
    later object over an earlier one, as `render` draws them). Every object needs its size (stage-2 scenes)."""
    truth = np.zeros((3, scene.height, scene.width), np.int64)
    for o in scene.objects:
        if o.size not in SIZES:
            raise ValueError(f"object {o.phrase()!r} has size {o.size!r}; pixel_truth needs one of {tuple(SIZES)}")
        inside = shape_coverage(o.shape, o.cy, o.cx, o.radius, scene.height, scene.width) >= 0.5
        truth[:, inside] = np.array([1 + SHAPES.index(o.shape), 1 + list(SIZES).index(o.size),
                                     1 + list(COLOURS).index(o.colour)])[:, None]
    return truth


def random_scene(rng: np.random.Generator, height: int, width: int, objects: tuple[int, ...] = OBJECTS) -> Scene:
    """A scene of n objects, n drawn uniformly from `objects` (the counts; one repeated is drawn more often), with
    distinct colours, each in its own cell of the 3x3 grid, drawn wholly inside that cell (so objects never
    overlap). Radius: SIZES times the cell side, +-5 % jitter; the centre is jittered as far as the cell allows.
    Counts go up to MAX_OBJECTS: a 3-object caption fits 120 ByT5 tokens, a 4-object one 32 word tokens (EOS
    included), the embedded models' caption length with the word tokenizer."""
    if not objects or not all(1 <= n <= MAX_OBJECTS for n in objects):
        raise ValueError(f"objects must be counts from 1 to {MAX_OBJECTS} (longer captions overflow 32 word tokens), "
                         f"got {objects}")
    n = int(objects[rng.integers(len(objects))])
    colours = rng.choice(list(COLOURS), n, replace=False)
    cells = rng.choice(len(REGIONS), n, replace=False)
    cell_h, cell_w = height / 3, width / 3
    objects = []
    for colour, cell in zip(colours, cells):
        shape = SHAPES[rng.integers(len(SHAPES))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        radius = SIZES[size] * min(cell_h, cell_w) * rng.uniform(0.95, 1.05)
        row, col = divmod(int(cell), 3)
        cy = (row + 0.5) * cell_h + rng.uniform(-1, 1) * max(0.0, cell_h / 2 - radius)
        cx = (col + 0.5) * cell_w + rng.uniform(-1, 1) * max(0.0, cell_w / 2 - radius)
        objects.append(ShapeObject(str(colour), shape, cy, cx, radius, REGIONS[cell], size))
    return Scene(height, width, tuple(objects))


class _Procedural(Dataset):
    """A virtual-length dataset whose sample i comes from its own Generator seeded with (seed, split, i)."""

    def __init__(self, length: int, seed: int, split: str):
        if length < 1:
            raise ValueError(f"length must be >= 1 (it is the virtual epoch size), got {length}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seed sequences take non-negative integers), got {seed}")
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
        self.length, self.seed, self.split = length, seed, split

    def __len__(self) -> int:
        return self.length

    def bucket_ids(self) -> np.ndarray | None:
        """Every sample's bucket (samples of one bucket share a size), or None: all samples have one size."""
        return None

    def batch(self, indices) -> Batch:
        """The samples at `indices` as one Batch (they must share a size: see bucket_ids)."""
        return Batch.collate([self[i] for i in indices])

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a dataset of length {self.length}")
        return np.random.default_rng([self.seed, SPLITS[self.split], index])


class ShapeClasses(_Procedural):
    """Stage 1: class-conditional images. Sample: {"image": (3, size, size), "label": int in [0, 24), "caption":
    "a red circle", "truth": Scene of the named object alone}. Label = SHAPES.index(shape) * len(COLOURS) + colour
    index; names in `class_names`.

    scenes False: one object anywhere in the image (radius 15-30 % of the side), the paper's ImageNet stage in
    miniature. scenes True: stage 2's scenes (see `random_scene`: 1-3 objects of stage-2 sizes, each in a cell of
    the 3x3 grid), the class naming the first object and the others distractors, so stage 1 learns the statistics
    stage 2's images have."""

    num_classes = NUM_CLASSES
    class_names = CLASS_NAMES

    def __init__(self, length: int = 100_000, seed: int = 0, split: str = "train", size: int = 32,
                 scenes: bool = False):
        super().__init__(length, seed, split)
        self.size, self.scenes = size, scenes

    def __getitem__(self, index: int) -> dict:
        rng = self._rng(index)
        if self.scenes:
            scene = random_scene(rng, self.size, self.size)
            named = replace(scene.objects[0], region=None, size=None)  # the class states colour and shape only
            label = SHAPES.index(named.shape) * len(COLOURS) + list(COLOURS).index(named.colour)
        else:
            label = int(rng.integers(NUM_CLASSES))
            shape, colour = SHAPES[label // len(COLOURS)], list(COLOURS)[label % len(COLOURS)]
            radius = rng.uniform(0.15, 0.30) * self.size
            cy, cx = rng.uniform(radius, self.size - radius, size=2)
            named = ShapeObject(colour, shape, cy, cx, radius)
            scene = Scene(self.size, self.size, (named,))
        truth = Scene(self.size, self.size, (named,))
        return {"image": render(scene), "label": label, "caption": truth.caption, "truth": truth}


class ShapeScenes(_Procedural):
    """Stage 2: captioned scenes, each of a count of objects drawn from `objects` (see `random_scene`), size x
    size, hard edges. Sample: {"image": (3, size, size), "caption": str, "truth": Scene}."""

    def __init__(
        self, length: int = 100_000, seed: int = 0, split: str = "train", size: int = 32,
        objects: tuple[int, ...] = OBJECTS,
    ):
        super().__init__(length, seed, split)
        self.size, self.objects = size, tuple(objects)

    def __getitem__(self, index: int) -> dict:
        scene = random_scene(self._rng(index), self.size, self.size, self.objects)
        return {"image": render(scene), "caption": scene.caption, "truth": scene}


class AspectScenes(_Procedural):
    """Stage 3: stage-2 scenes rendered anti-aliased (4x4 supersampling) in aspect-ratio buckets; sample i
    uses buckets[i % len(buckets)]. Sample: {"image": (3, H, W), "caption": str, "truth": Scene,
    "img_hw": (2,) float32 original (H, W) in pixels, "aspect_ratio": () float32 H / W} -- PixArtMS's
    micro-conditions. `bucket_ids()` gives each sample's bucket, so a batch can share one size."""

    def __init__(
        self, length: int = 100_000, seed: int = 0, split: str = "train", buckets=BUCKETS,
        objects: tuple[int, ...] = OBJECTS, supersample: int = 4,
    ):
        super().__init__(length, seed, split)
        for h, w in buckets:
            if h % 8 or w % 8:
                raise ValueError(f"bucket {(h, w)} has a side not divisible by 8; patch and grid sizes need it")
        self.buckets, self.objects, self.supersample = tuple(buckets), tuple(objects), supersample

    def bucket_ids(self) -> np.ndarray:
        """(length,) int64: the bucket index of every sample."""
        return np.arange(self.length) % len(self.buckets)

    def __getitem__(self, index: int) -> dict:
        h, w = self.buckets[index % len(self.buckets)]
        scene = random_scene(self._rng(index), h, w, self.objects)
        return {
            "image": render(scene, self.supersample),
            "caption": scene.caption,
            "truth": scene,
            "img_hw": torch.tensor([h, w], dtype=torch.float32),
            "aspect_ratio": torch.tensor(h / w, dtype=torch.float32),
        }
