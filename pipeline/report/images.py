"""Pictures for the report: boxes drawn and numbered, crop thumbnails, base64 data URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from pipeline.images import pil_open

DISPLAY_SIDE = 384  # longest side of the annotated picture (small images are scaled up)
THUMB_SIDE = 96  # longest side of a crop thumbnail
MAX_PIXELS = 50_000_000  # refuse decompression bombs
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
)


def box_colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def decode_image(jpg: bytes) -> Image.Image:
    """JPEG bytes -> RGB image; raises ValueError with the cause when it cannot be decoded."""
    try:
        img = pil_open(io.BytesIO(jpg))
        if img.width * img.height > MAX_PIXELS:
            raise ValueError(f"{img.width}x{img.height} pixels is too many")
        img.load()
        return img.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"image cannot be decoded: {exc}") from exc


def data_uri(img: Image.Image, quality: int = 85) -> str:
    """An inline `data:image/jpeg;base64,...` URI (deterministic for the same pixels)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _resize_longest(img: Image.Image, side: int) -> Image.Image:
    scale = side / max(img.width, img.height)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def pixel_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Normalised xyxy -> integer pixel box clipped to the image and at least 1 px wide."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = sorted((min(max(x0, 0.0), 1.0) * width, min(max(x1, 0.0), 1.0) * width))
    y0, y1 = sorted((min(max(y0, 0.0), 1.0) * height, min(max(y1, 0.0), 1.0) * height))
    ix0, iy0 = min(int(x0), width - 1), min(int(y0), height - 1)
    return ix0, iy0, max(ix0 + 1, round(x1)), max(iy0 + 1, round(y1))


Rect = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def place_tags(
    boxes: Sequence[Rect], sizes: Sequence[tuple[int, int]], width: int, height: int
) -> list[Rect]:
    """Where each box's number tag goes, so that no tag hides another (boxes may coincide).

    A tag sits at its box's top-left corner, above the box (inside it at the top edge when there
    is no room above); if an earlier tag is there, it moves right along that edge, then down a
    tag height at a time. Deterministic; tags stay inside the picture.
    """
    placed: list[Rect] = []
    for (x0, y0, _, _), (w, h) in zip(boxes, sizes, strict=True):
        w, h = min(w, width), min(h, height)
        top = y0 - h if y0 >= h else y0
        xs = list(range(min(x0, width - w), width - w + 1, w)) + list(range(x0 - w, -1, -w))
        ys = list(range(min(top, height - h), height - h + 1, h)) + list(range(top - h, -1, -h))
        spot = next(
            (
                (x, y, x + w, y + h)
                for y in ys
                for x in xs
                if not any(_overlap((x, y, x + w, y + h), r) for r in placed)
            ),
            None,
        )
        if spot is None:  # more tags than room: the corner, on top of the others
            x, y = min(x0, width - w), min(top, height - h)
            spot = (x, y, x + w, y + h)
        placed.append(spot)
    return placed


def annotate(img: Image.Image, boxes: Sequence[Sequence[float]]) -> Image.Image:
    """A display-size copy with every box outlined in its colour and numbered from 1; the
    number tags are drawn last and never cover each other."""
    shown = _resize_longest(img, DISPLAY_SIDE)
    draw = ImageDraw.Draw(shown)
    font = ImageFont.load_default(size=14)
    pixel_boxes = [pixel_box(box, shown.width, shown.height) for box in boxes]
    for i, (x0, y0, x1, y1) in enumerate(pixel_boxes):
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=box_colour(i), width=3)
    labels = [str(i + 1) for i in range(len(boxes))]
    bounds = [draw.textbbox((0, 0), label, font=font) for label in labels]
    sizes = [(r - left + 6, b - t + 6) for left, t, r, b in bounds]
    tags = place_tags(pixel_boxes, sizes, shown.width, shown.height)
    for i, (label, (left, t, _, _), (tx0, ty0, tx1, ty1)) in enumerate(
        zip(labels, bounds, tags, strict=True)
    ):
        draw.rectangle((tx0, ty0, tx1 - 1, ty1 - 1), fill=box_colour(i))
        draw.text((tx0 + 3 - left, ty0 + 3 - t), label, fill=(255, 255, 255), font=font)
    return shown


def crop_thumbnail(img: Image.Image, box: Sequence[float]) -> Image.Image:
    """The object's pixels (from the stored image), scaled to a thumbnail."""
    return _resize_longest(img.crop(pixel_box(box, img.width, img.height)), THUMB_SIDE)
