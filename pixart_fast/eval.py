"""Score generated images against the ground truth of their captions (the embedded default, docs/ARCHITECTURE.md section 5).

Every object a caption states gets up to four checks, and every image one background score. Scenes use each colour
at most once, so the colour names the object in the image. RGB distances below are Euclidean, channels in [0, 1].

    colour      the stated colour is present: solid 2x2 blocks of pixels of that colour cover at least
                `min_fraction` (default 0.02) of one grid cell. A pixel has a colour when it is within `tol`
                (default 0.3) of that palette entry and nearer to it than to any other. Solid blocks, not single
                pixels, so that noise, which hits a colour only here and there, does not count.
    position    the object's blob (its colour's pixels within one cell of the median solid block) has its centroid
                in the stated cell of the 3x3 grid. Not scored where the truth states no region (stage 1).
    shape       the renderer's own template of each shape (`pixart_fast.data.shape_coverage` sampled at pixel
                centres: square bounding box, apex-up triangle, never stretched) is fitted to the object's mask (the
                window's pixels that are at least half the stated colour over the background, `object_mask`) over
                centre and radius, maximising intersection-over-union (IoU, `fit_shapes`). The stated shape passes
                when its IoU is >= `min_iou` (default 0.9) and beats every other shape's by at least `min_margin`
                (default 0.0, so a tie passes). Why these: ground-truth renders fit their own shape at IoU >= 0.95
                (32 px hard edges and 64 px anti-aliased alike), but at 32 px the shapes differ by a few pixels (a
                medium circle and square by their 4 corner pixels, IoU 0.94; a small circle and diamond can share
                every pixel), so no margin can be demanded there; the strict IoU bar does the work instead. A blob
                that is not one of the four shapes at the object's scale fails: an ellipse of aspect 1.6-2.2 fits
                no template above IoU 0.86, a lumpy blob of four discs passes for its stated shape about 5 % of the
                time (at 32 px it is often simply round, i.e. a circle).
    size        the object's radius (half its bounding-box side, as the renderer defines it) measured from the
                mask's area, sqrt(area / the shape's area per radius^2), taking the stated shape where it passes
                and the best-fitting shape otherwise, as a fraction of the grid cell's shorter side, lies in the
                stated size's band (`SIZE_BANDS`): small 0.24-0.36, large 0.42-0.54; the renderer draws small
                0.304-0.336, medium 0.371-0.410, large 0.437-0.483. Scored only where the caption names a size:
                captions name small and large, never medium, and stage 1 names none.
    background  per image: the fraction of pixels outside every stated object (its mask and blob, grown by one
                pixel for anti-aliased edges) within `bg_tol` (default 0.1, a sixth of the distance from
                BACKGROUND to the nearest palette colour) of BACKGROUND. 1.0 for a flat background; speckle, noise
                and objects the caption does not state lower it. Not a per-object check, not part of accuracy, and
                without a chance level (no caption word states it).

Position, shape and size fail when the colour is absent. An object is correct when all its scored checks pass;
`alignment_accuracy` is the fraction of correct objects over all images.

Chance levels. `alignment_scores` reports next to each check `<check>_chance`: the score the same images get when
that word of every caption is replaced by a draw from the data's own distribution of it, independent of the image
(what a model that ignored the word would score): shape uniform over SHAPES; size uniform over the sizes captions
name (small, large); colour uniform over the colours no other object of the scene has (scenes never repeat one);
region uniform over the cells no other object of the scene occupies. `accuracy_chance` replaces all four at once.
These are exact expectations over the draws (every alternative is scored and averaged), so they carry no sampling
noise and need no seed. A check is evidence of skill only where its score is well above its chance.
"""
import numpy as np
import torch

from pixart_fast.data import BACKGROUND, COLOURS, REGIONS, SHAPES, Scene

_PALETTE = np.array(list(COLOURS.values()))  # (K, 3) RGB in [0, 1]
_COLOUR_INDEX = {name: k for k, name in enumerate(COLOURS)}
_BACKGROUND = np.asarray(BACKGROUND)

# The sizes captions name (ShapeObject.phrase drops "medium"), and the band of measured radius / the cell's shorter
# side that passes for each. The renderer draws radius = SIZES x cell side x U(0.95, 1.05): small 0.304-0.336,
# medium 0.371-0.410, large 0.437-0.483. A 32-px hard-edged render's measured radius is off by up to half a pixel
# (0.05 of its 10.7-px cell), so the inner edges sit just inside medium's range rather than halfway between the
# extremes, and the outer edges 0.06 beyond: ground-truth renders pass (>= 98 % at 32 px, 100 % at 64 px), small and
# large are never taken for each other, and a medium drawing passes for small or large about 3-9 % of the time at
# 32 px, under 1 % at 64 px.
SIZE_BANDS = {"small": (0.24, 0.36), "large": (0.42, 0.54)}
NAMED_SIZES = tuple(SIZE_BANDS)

# Each shape's area in units of radius^2, and how far its centroid lies below its bounding box's centre.
_AREA = {"circle": np.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
_CENTROID_DOWN = {"circle": 0.0, "square": 0.0, "triangle": 1 / 3, "diamond": 0.0}
# fit_shapes' search: a 3 x 3 x 3 grid of (centre y, centre x, radius) steps around the best so far, 5 levels.
_STEPS = np.stack(np.meshgrid(*[np.array([-1.0, 0.0, 1.0], np.float32)] * 3, indexing="ij"), -1).reshape(-1, 3)
_LEVELS = 5


def colour_labels(image: torch.Tensor, tol: float = 0.3) -> np.ndarray:
    """image (3, H, W) in [-1, 1] -> (H, W) int: index into COLOURS of each pixel's nearest palette colour,
    -1 where that colour is farther than tol (RGB distance, channels in [0, 1])."""
    return _labels(_rgb(image), tol)


def _rgb(image: torch.Tensor) -> np.ndarray:
    return (image.detach().float().cpu().clamp(-1, 1).permute(1, 2, 0).numpy() + 1) / 2  # (H, W, 3)


def _labels(rgb: np.ndarray, tol: float) -> np.ndarray:
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE, axis=-1)  # (H, W, K)
    return np.where(dist.min(-1) <= tol, dist.argmin(-1), -1)


def object_mask(rgb: np.ndarray, colour: str, tol: float = 0.3) -> np.ndarray:
    """rgb (H, W, 3) in [0, 1] -> (H, W) bool: pixels that are at least half `colour` over the background.

    Each pixel is read as the background mixed with the colour, BACKGROUND + a * (colour - BACKGROUND) (how the
    renderer anti-aliases edges): a is the projection on that line, and the pixel counts when a >= 0.5 and it lies
    within tol of the line. With hard edges this is the colour's pixels; with anti-aliased edges it is the shape's
    coverage >= 0.5, which is what a template sampled at pixel centres draws."""
    d = np.asarray(COLOURS[colour]) - _BACKGROUND
    rel = rgb - _BACKGROUND
    a = np.clip(rel @ d / (d @ d), 0.0, 1.0)
    off = np.linalg.norm(rel - a[..., None] * d, axis=-1)
    return (a >= 0.5) & (off <= tol)


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The renderer's shape test (`pixart_fast.data.shape_coverage`) in units of the radius, v pointing down."""
    if shape == "circle":
        return u * u + v * v <= 1
    if shape == "square":
        return (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if shape == "triangle":
        return (v <= 1) & (2 * np.abs(u) <= v + 1)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _templates(shape: str, cy, cx, r, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """(P,) centres and radii -> (P, len(ys), len(xs)) bool: `shape_coverage` at pixel centres (supersample 1,
    hard edges) for every parameter set at once. ys, xs: pixel-centre coordinates."""
    cy, cx, r = (np.asarray(a)[:, None, None] for a in (cy, cx, r))
    return _inside(shape, (xs[None, None, :] - cx) / r, (ys[None, :, None] - cy) / r)


def fit_shapes(blob: np.ndarray) -> dict[str, float]:
    """blob (H, W) bool -> {shape: IoU} for every shape of SHAPES: the best intersection-over-union of the blob with
    the renderer's template of that shape over its centre and radius (pixels). The search starts where a shape of
    the blob's area and centroid would lie and refines a 3 x 3 x 3 grid 5 times, halving its steps (from a quarter of
    the radius, at least a pixel, in position and 12 % in radius). Empty blob: IoU 0 for every shape."""
    ys, xs = np.nonzero(blob)
    if len(ys) == 0:
        return {s: 0.0 for s in SHAPES}
    area = float(len(ys))
    my, mx = ys.mean() + 0.5, xs.mean() + 0.5
    pad = int(np.ceil(0.4 * (max(np.ptp(ys), np.ptp(xs)) + 1))) + 2  # room for templates larger than the blob
    y0, y1 = max(ys.min() - pad, 0), min(ys.max() + 1 + pad, blob.shape[0])
    x0, x1 = max(xs.min() - pad, 0), min(xs.max() + 1 + pad, blob.shape[1])
    crop = blob[y0:y1, x0:x1].ravel().astype(np.float32)
    crop_and_ones = np.stack([crop, np.ones_like(crop)], 1)  # one matmul counts the intersection and the template
    py, px = np.arange(y0, y1, dtype=np.float32) + 0.5, np.arange(x0, x1, dtype=np.float32) + 0.5
    r0 = np.sqrt(area / np.array([_AREA[s] for s in SHAPES], np.float32))  # (S,)
    best = np.stack([my - np.array([_CENTROID_DOWN[s] for s in SHAPES]) * r0, np.full_like(r0, mx), r0], -1)
    step = np.stack([np.maximum(1.0, 0.25 * r0), np.maximum(1.0, 0.25 * r0), 0.12 * r0], -1)  # (S, 3)
    best_iou = np.zeros(len(SHAPES))
    rows = np.arange(len(SHAPES))
    for _ in range(_LEVELS):
        p = best[:, None, :] + _STEPS[None] * step[:, None, :]  # (S, 27, 3)
        p[..., 2] = np.maximum(p[..., 2], 0.5)
        r = p[..., 2, None, None]
        v = (py[None, None, :, None] - p[..., 0, None, None]) / r  # (S, 27, h, 1)
        u = (px[None, None, None, :] - p[..., 1, None, None]) / r  # (S, 27, 1, w)
        t = np.stack([_inside(s, u[i], v[i]) for i, s in enumerate(SHAPES)])
        t = t.reshape(len(SHAPES) * len(_STEPS), -1).astype(np.float32)
        inter, drawn = (t @ crop_and_ones).T
        iou = (inter / (drawn + area - inter)).reshape(len(SHAPES), len(_STEPS))
        k = iou.argmax(1)
        better = iou[rows, k] >= best_iou
        best_iou = np.where(better, iou[rows, k], best_iou)
        best = np.where(better[:, None], p[rows, k], best)
        step = step / 2
    return {s: float(best_iou[i]) for i, s in enumerate(SHAPES)}


def shape_passes(fits: dict[str, float], shape: str, min_iou: float = 0.9, min_margin: float = 0.0) -> bool:
    """fits: `fit_shapes`' answer for one blob. True when `shape`'s template fits with IoU >= min_iou and by at least
    min_margin better than every other shape's (0: a tie passes both, for drawings whose pixels cannot tell two
    shapes apart: at 32 px a small circle and diamond can share every pixel)."""
    own = fits[shape]
    return own >= min_iou and all(own - iou >= min_margin for s, iou in fits.items() if s != shape)


def classify_shape(blob: np.ndarray, min_iou: float = 0.9, min_margin: float = 0.0) -> str | None:
    """blob (H, W) bool, the pixels of one object -> the shape in SHAPES whose template fits it best (`fit_shapes`),
    or None when that shape does not pass `shape_passes` (the blob has no recognisable shape)."""
    fits = fit_shapes(blob)
    best = max(SHAPES, key=fits.get)
    return best if shape_passes(fits, best, min_iou, min_margin) else None


class _Image:
    """One image's findings, colour by colour (each computed when first asked for), judged with one scoring call's
    thresholds."""

    def __init__(self, image: torch.Tensor, tol: float, min_fraction: float, min_iou: float, min_margin: float):
        self.rgb = _rgb(image)
        self.h, self.w = self.rgb.shape[:2]
        self.labels = _labels(self.rgb, tol)
        self.tol, self.min_fraction, self.min_iou, self.min_margin = tol, min_fraction, min_iou, min_margin
        self.cell_h, self.cell_w = self.h / 3, self.w / 3
        self.yy, self.xx = np.mgrid[0:self.h, 0:self.w] + 0.5  # pixel centres
        self.found: dict[str, dict | None] = {}

    def find(self, colour: str) -> dict | None:
        """None when the colour is absent, else {"cell": the region of its blob's centroid, "shapes": the shapes
        that pass `shape_passes`, "best": the best-fitting shape, "radius": {shape: the radius, as a fraction of the
        cell's shorter side, of that shape with the mask's area}, "pixels": (H, W) bool, the object's pixels}."""
        if colour not in self.found:
            self.found[colour] = self._find(colour)
        return self.found[colour]

    def _find(self, colour: str) -> dict | None:
        mask = self.labels == _COLOUR_INDEX[colour]  # (H, W)
        solid = mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:] & mask[1:, 1:]  # (H-1, W-1): 2x2 blocks
        if solid.sum() < self.min_fraction * self.cell_h * self.cell_w:
            return None
        ys, xs = np.nonzero(solid)
        my, mx = np.median(ys) + 1, np.median(xs) + 1  # a block's centre is its top-left pixel's corner + 1
        window = (np.abs(self.yy - my) <= self.cell_h) & (np.abs(self.xx - mx) <= self.cell_w)
        if not (mask & window).any():  # the median of distant clusters can fall between them: take the nearest block
            k = np.argmin((ys + 1 - my) ** 2 + (xs + 1 - mx) ** 2)
            my, mx = ys[k] + 1, xs[k] + 1
            window = (np.abs(self.yy - my) <= self.cell_h) & (np.abs(self.xx - mx) <= self.cell_w)
        blob = mask & window
        row = min(int(self.yy[blob].mean() // self.cell_h), 2)
        col = min(int(self.xx[blob].mean() // self.cell_w), 2)
        fit_mask = object_mask(self.rgb, colour, self.tol) & window
        fits = fit_shapes(fit_mask)
        area, side = float(fit_mask.sum()), min(self.cell_h, self.cell_w)
        return {
            "cell": REGIONS[3 * row + col],
            "shapes": {s for s in SHAPES if shape_passes(fits, s, self.min_iou, self.min_margin)},
            "best": max(SHAPES, key=fits.get),
            "radius": {s: float(np.sqrt(area / _AREA[s])) / side for s in SHAPES},
            "pixels": blob | fit_mask,
        }

    def background(self, colours, bg_tol: float) -> float:
        """Fraction of the pixels outside the objects of `colours` (each grown by one pixel, for anti-aliased
        edges) within bg_tol of BACKGROUND; 1.0 where no pixel is left."""
        objects = np.zeros((self.h, self.w), dtype=bool)
        for colour in colours:
            found = self.find(colour)
            if found is not None:
                objects |= found["pixels"]
        grown = objects.copy()
        grown[1:] |= objects[:-1]
        grown[:-1] |= objects[1:]
        grown[:, 1:] |= objects[:, :-1]
        grown[:, :-1] |= objects[:, 1:]
        rest = ~grown
        if not rest.any():
            return 1.0
        flat = np.linalg.norm(self.rgb - _BACKGROUND, axis=-1) <= bg_tol
        return float(flat[rest].mean())


def _shape_ok(found: dict | None, shape: str) -> bool:
    return found is not None and shape in found["shapes"]


def _size_ok(found: dict | None, size: str, shape: str) -> bool:
    """The measured radius is that of the stated shape where it passes, else of the best-fitting one: area per
    radius^2 differs by shape, and one drawing can be two shapes of different radii."""
    if found is None:
        return False
    low, high = SIZE_BANDS[size]
    return low <= found["radius"][shape if shape in found["shapes"] else found["best"]] <= high


def _checks(found: dict | None, obj) -> dict:
    """The four checks of one stated object against what was found for its colour."""
    return {
        "colour": found is not None,
        "position": (found is not None and found["cell"] == obj.region) if obj.region else None,
        "shape": _shape_ok(found, obj.shape),
        "size": _size_ok(found, obj.size, obj.shape) if obj.size in NAMED_SIZES else None,
    }


def _chances(img: _Image, obj, truth: Scene) -> dict:
    """Each check's pass rate when that attribute of obj is redrawn from the data's distribution of it, independent
    of the image (the scene's other objects kept): exact averages over every alternative."""
    others = [o for o in truth.objects if o is not obj]
    colours = [c for c in COLOURS if c not in {o.colour for o in others}]
    regions = [r for r in REGIONS if r not in {o.region for o in others}]

    def position(found):  # None: not scored
        return sum(found is not None and found["cell"] == r for r in regions) / len(regions) if obj.region else None

    def size(found, shape):
        if obj.size not in NAMED_SIZES:
            return None
        return sum(_size_ok(found, z, shape) for z in NAMED_SIZES) / len(NAMED_SIZES)

    joint = 0.0  # accuracy with colour, region, shape and size all redrawn
    for c in colours:
        found = img.find(c)
        if found is None:
            continue
        where = 1.0 if obj.region is None else position(found)
        for s in found["shapes"]:
            joint += where * (1.0 if obj.size not in NAMED_SIZES else size(found, s))
    found = img.find(obj.colour)
    return {
        "accuracy": joint / (len(colours) * len(SHAPES)),
        "colour": sum(img.find(c) is not None for c in colours) / len(colours),
        "position": position(found),
        "shape": sum(_shape_ok(found, s) for s in SHAPES) / len(SHAPES),
        "size": size(found, obj.shape),
    }


def _check_inputs(image: torch.Tensor, truth: Scene):
    h, w = truth.height, truth.width
    if tuple(image.shape) != (3, h, w):
        raise ValueError(f"image of shape {tuple(image.shape)} does not match its truth's (3, {h}, {w})")


def score_objects(
    image: torch.Tensor, truth: Scene, tol: float = 0.3, min_fraction: float = 0.02, min_iou: float = 0.9,
    min_margin: float = 0.0,
) -> list[dict]:
    """Check every object of one image. image (3, H, W) in [-1, 1] with (H, W) = (truth.height, truth.width).
    Returns one dict per object: {"colour": bool, "position": bool or None (no region stated), "shape": bool,
    "size": bool or None (the caption names no size)}."""
    _check_inputs(image, truth)
    img = _Image(image, tol, min_fraction, min_iou, min_margin)
    return [_checks(img.find(o.colour), o) for o in truth.objects]


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else float("nan")


def alignment_scores(
    images, truths: list[Scene], tol: float = 0.3, min_fraction: float = 0.02, min_iou: float = 0.9,
    min_margin: float = 0.0, bg_tol: float = 0.1,
) -> dict[str, float]:
    """Score images against their truths. images: (B, 3, H, W) in [-1, 1], or a list of (3, H_i, W_i) for
    mixed sizes (stage-3 buckets); truths: B Scenes. tol, min_fraction, min_iou, min_margin, bg_tol: see the
    module's docstring.

    Returns fractions in [0, 1] over all stated objects, each check followed by its chance level (`<check>_chance`:
    the score with that caption word redrawn independently of the image; see the module's docstring):
    "accuracy" (all scored checks pass), "colour", "position" (over objects whose truth states a region; nan if
    none does), "shape", "size" (over objects whose caption names a size; nan if none does); then "background",
    the mean over images of the flat-background fraction (no chance level: no caption word states it),
    "objects", the object count, and "words": the shape check over the objects whose caption names each shape
    ("circle", ...) and the size check over those named each size ("small", "large"), each beside its chance level
    ("circle_chance", ...; nan where no object names the word). The breakdown shows which words a model draws:
    a model can pass a fair share of shapes by drawing one round blob for every shape word.
    """
    if len(images) != len(truths):
        raise ValueError(f"got {len(images)} images but {len(truths)} truths; pass one truth per image")
    checks, chances, backgrounds, stated = [], [], [], []
    for image, truth in zip(images, truths):
        _check_inputs(image, truth)
        img = _Image(image, tol, min_fraction, min_iou, min_margin)
        for o in truth.objects:
            checks.append(_checks(img.find(o.colour), o))
            chances.append(_chances(img, o, truth))
            stated.append(o)
        backgrounds.append(img.background([o.colour for o in truth.objects], bg_tol))
    if not checks:
        raise ValueError("the truths state no objects; nothing to score")
    correct = [all(v is not False for v in c.values()) for c in checks]
    scores = {"accuracy": float(np.mean(correct)), "accuracy_chance": _mean(c["accuracy"] for c in chances)}
    for name in ("colour", "position", "shape", "size"):
        scores[name] = _mean(c[name] for c in checks)
        scores[f"{name}_chance"] = _mean(c[name] for c in chances)
    scores["background"] = float(np.mean(backgrounds))
    scores["objects"] = len(checks)
    scores["words"] = {}
    for check, words in (("shape", SHAPES), ("size", NAMED_SIZES)):
        for word in words:
            named = [i for i, o in enumerate(stated) if getattr(o, check) == word]
            scores["words"][word] = _mean(checks[i][check] for i in named)
            scores["words"][f"{word}_chance"] = _mean(chances[i][check] for i in named)
    return scores


def alignment_accuracy(images, truths: list[Scene], **kwargs) -> float:
    """Fraction of stated objects drawn with the right colour, region, shape and size (see `alignment_scores`)."""
    return alignment_scores(images, truths, **kwargs)["accuracy"]
