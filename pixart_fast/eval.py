"""Score generated images against the ground truth of their captions (the embedded default, docs/ARCHITECTURE.md section 5).

Every object a caption states gets three checks. Scenes use each colour at most once, so the colour names the
object in the image:

    colour    the stated colour is present: solid 2x2 blocks of pixels of that colour cover at least
              `min_fraction` of one grid cell. A pixel has a colour when it is within `tol` (RGB distance,
              channels in [0, 1]) of that palette entry and nearer to it than to any other. Solid blocks, not
              single pixels, so that noise, which hits a colour only here and there, does not count.
    position  the object's blob (its colour's pixels within one cell of the median solid block) has its
              centroid in the stated cell of the 3x3 grid. Not scored where the truth states no region (stage 1).
    shape     the shape template (the renderer's own, fitted to the blob's bounding box) with the highest
              intersection-over-union with the blob is the stated shape, with IoU >= `min_iou`.

Position and shape fail when the colour is absent. An object is correct when all its scored checks pass;
`alignment_accuracy` is the fraction of correct objects over all images, and `alignment_scores` adds the
fraction passing each check.
"""
import numpy as np
import torch

from pixart_fast.data import COLOURS, REGIONS, SHAPES, Scene, shape_coverage

_PALETTE = np.array(list(COLOURS.values()))  # (K, 3) RGB in [0, 1]
_COLOUR_INDEX = {name: k for k, name in enumerate(COLOURS)}


def colour_labels(image: torch.Tensor, tol: float = 0.3) -> np.ndarray:
    """image (3, H, W) in [-1, 1] -> (H, W) int: index into COLOURS of each pixel's nearest palette colour,
    -1 where that colour is farther than tol (RGB distance, channels in [0, 1])."""
    rgb = (image.detach().float().cpu().clamp(-1, 1).permute(1, 2, 0).numpy() + 1) / 2  # (H, W, 3)
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE, axis=-1)  # (H, W, K)
    return np.where(dist.min(-1) <= tol, dist.argmin(-1), -1)


def classify_shape(blob: np.ndarray, min_iou: float = 0.5) -> str | None:
    """blob (H, W) bool, the pixels of one object -> the shape in SHAPES whose template, stretched to fill the
    blob's bounding box, overlaps it best; None when no template reaches intersection-over-union min_iou."""
    ys, xs = np.nonzero(blob)
    if len(ys) == 0:
        return None
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1  # pixel edges
    cy, cx = (top + bottom) / 2, (left + right) / 2
    best, best_iou = None, min_iou
    for shape in SHAPES:
        template = shape_coverage(shape, cy, cx, (bottom - top) / 2, *blob.shape, radius_x=(right - left) / 2) >= 0.5
        iou = (template & blob).sum() / (template | blob).sum()
        if iou >= best_iou:
            best, best_iou = shape, iou
    return best


def score_objects(
    image: torch.Tensor, truth: Scene, tol: float = 0.3, min_fraction: float = 0.02, min_iou: float = 0.5
) -> list[dict]:
    """Check every object of one image. image (3, H, W) in [-1, 1] with (H, W) = (truth.height, truth.width).
    Returns one dict per object: {"colour": bool, "position": bool or None (not stated), "shape": bool}."""
    h, w = truth.height, truth.width
    if tuple(image.shape) != (3, h, w):
        raise ValueError(f"image of shape {tuple(image.shape)} does not match its truth's (3, {h}, {w})")
    labels = colour_labels(image, tol)
    cell_h, cell_w = h / 3, w / 3
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    results = []
    for obj in truth.objects:
        mask = labels == _COLOUR_INDEX[obj.colour]  # (H, W)
        solid = mask[:-1, :-1] & mask[1:, :-1] & mask[:-1, 1:] & mask[1:, 1:]  # (H-1, W-1): 2x2 blocks
        if solid.sum() < min_fraction * cell_h * cell_w:
            results.append({"colour": False, "position": False if obj.region else None, "shape": False})
            continue
        ys, xs = np.nonzero(solid)
        my, mx = np.median(ys) + 1, np.median(xs) + 1  # a block's centre is its top-left pixel's corner + 1
        blob = mask & (np.abs(yy - my) <= cell_h) & (np.abs(xx - mx) <= cell_w)
        if not blob.any():  # the median of distant clusters can fall between them: take the block nearest it
            k = np.argmin((ys + 1 - my) ** 2 + (xs + 1 - mx) ** 2)
            my, mx = ys[k] + 1, xs[k] + 1
            blob = mask & (np.abs(yy - my) <= cell_h) & (np.abs(xx - mx) <= cell_w)
        row = min(int(yy[blob].mean() // cell_h), 2)
        col = min(int(xx[blob].mean() // cell_w), 2)
        results.append({
            "colour": True,
            "position": REGIONS[3 * row + col] == obj.region if obj.region else None,
            "shape": classify_shape(blob, min_iou) == obj.shape,
        })
    return results


def alignment_scores(images, truths: list[Scene], **kwargs) -> dict[str, float]:
    """Score images against their truths. images: (B, 3, H, W) in [-1, 1], or a list of (3, H_i, W_i) for
    mixed sizes (stage-3 buckets); truths: B Scenes. kwargs: tol, min_fraction, min_iou of `score_objects`.

    Returns fractions in [0, 1] over all objects: {"accuracy": all scored checks pass, "colour", "position"
    (over objects whose truth states a region; nan if none does), "shape", "objects": the object count}.
    """
    if len(images) != len(truths):
        raise ValueError(f"got {len(images)} images but {len(truths)} truths; pass one truth per image")
    checks = [c for image, truth in zip(images, truths) for c in score_objects(image, truth, **kwargs)]
    if not checks:
        raise ValueError("the truths state no objects; nothing to score")
    positions = [c["position"] for c in checks if c["position"] is not None]
    return {
        "accuracy": float(np.mean([c["colour"] and c["shape"] and c["position"] is not False for c in checks])),
        "colour": float(np.mean([c["colour"] for c in checks])),
        "position": float(np.mean(positions)) if positions else float("nan"),
        "shape": float(np.mean([c["shape"] for c in checks])),
        "objects": len(checks),
    }


def alignment_accuracy(images, truths: list[Scene], **kwargs) -> float:
    """Fraction of stated objects drawn with the right colour, shape and region (see `alignment_scores`)."""
    return alignment_scores(images, truths, **kwargs)["accuracy"]
