"""Image grids with captions: the PNGs `python -m pixart_fast.sample` and the trainer's validation write.

The images are tiny (32 x 32 px, or 64-px-area stage-3 buckets), so a grid is upscaled `scale` times (nearest) and
each tile's caption is written under it in PIL's default font, word-wrapped to the tile's width.
"""
import torch
from PIL import Image, ImageDraw, ImageFont

BORDER = 1  # pixels of black around every image, before upscaling
CAPTION_BACKGROUND = (24, 24, 24)
CAPTION_COLOUR = (235, 235, 235)


def caption_font(scale: int = 4):
    """PIL's default font at a size readable in a grid upscaled `scale` times (12 px at scale 4). Pillow
    without FreeType, or older than 10.1, gives its fixed-size bitmap font instead."""
    try:
        return ImageFont.load_default(size=max(10, 3 * scale))
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def wrap(text: str, font, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels in `font`: broken between words, and a word wider than
    a line broken between its characters."""
    lines, line = [], ""
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:  # a word wider than a line: fill lines with it
            if line:
                lines.append(line)
                line = ""
            cut = 1
            while cut < len(word) and font.getlength(word[:cut + 1]) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}" if line else word
        if line and font.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    if line:
        lines.append(line)
    return lines


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag|y")
    return bottom + 2


def image_grid(images, captions=None, cols: int = 8, scale: int = 4) -> Image.Image:
    """Images (3, H, W) in [-1, 1], of any sizes -> one PIL grid, in order, row by row: each image in a cell the
    size of the largest plus a 1-pixel black border, upscaled `scale` times (nearest: these are tiny images).

    captions: None, or one string (or None: no caption) per image, drawn under its tile, word-wrapped to the tile's
    width; each row of tiles gets a caption band as tall as its longest caption. Without captions the grid is
    only the tiles."""
    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    if captions is not None:
        captions = list(captions)
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions for {len(images)} images: give one per image (None for none)")
    if cols < 1 or scale < 1:
        raise ValueError(f"cols and scale must be positive, got cols={cols}, scale={scale}")
    H = max(im.shape[1] for im in images) + 2 * BORDER
    W = max(im.shape[2] for im in images) + 2 * BORDER
    cols = min(cols, len(images))
    rows = -(-len(images) // cols)
    grid = torch.zeros(rows * H, cols * W, 3, dtype=torch.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        pix = ((im.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
        grid[r * H + BORDER:r * H + BORDER + pix.shape[0], c * W + BORDER:c * W + BORDER + pix.shape[1]] = pix
    tiles = Image.fromarray(grid.numpy())
    tiles = tiles.resize((tiles.width * scale, tiles.height * scale), Image.NEAREST)
    if captions is None or all(not c for c in captions):
        return tiles

    font = caption_font(scale)
    cell_h, cell_w, pad = H * scale, W * scale, max(2, scale)
    line_h = _line_height(font)
    lines = [wrap(c, font, cell_w - 2 * pad) if c else [] for c in captions]
    band = [max(len(lines[i]) for i in range(r * cols, min((r + 1) * cols, len(images)))) for r in range(rows)]
    band = [n * line_h + 2 * pad if n else 0 for n in band]
    out = Image.new("RGB", (tiles.width, rows * cell_h + sum(band)), CAPTION_BACKGROUND)
    draw = ImageDraw.Draw(out)
    y = 0
    for r in range(rows):
        out.paste(tiles.crop((0, r * cell_h, tiles.width, (r + 1) * cell_h)), (0, y))
        for c in range(cols):
            i = r * cols + c
            if i < len(images):
                for k, text in enumerate(lines[i]):
                    draw.text((c * cell_w + pad, y + cell_h + pad + k * line_h), text, fill=CAPTION_COLOUR, font=font)
        y += cell_h + band[r]
    return out
