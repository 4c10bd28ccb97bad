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


def annotate(img: Image.Image, boxes: Sequence[Sequence[float]]) -> Image.Image:
    """A display-size copy with every box outlined in its colour and numbered from 1."""
    shown = _resize_longest(img, DISPLAY_SIDE)
    draw = ImageDraw.Draw(shown)
    font = ImageFont.load_default(size=14)
    for i, box in enumerate(boxes):
        colour = box_colour(i)
        x0, y0, x1, y1 = pixel_box(box, shown.width, shown.height)
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=3)
        label = str(i + 1)
        left, t, r, b = draw.textbbox((0, 0), label, font=font)
        tag_w, tag_h = r - left + 6, b - t + 6
        ty = y0 - tag_h if y0 >= tag_h else y0  # above the box, inside it at the top edge
        draw.rectangle((x0, ty, x0 + tag_w, ty + tag_h), fill=colour)
        draw.text((x0 + 3 - left, ty + 3 - t), label, fill=(255, 255, 255), font=font)
    return shown


def crop_thumbnail(img: Image.Image, box: Sequence[float]) -> Image.Image:
    """The object's pixels (from the stored image), scaled to a thumbnail."""
    return _resize_longest(img.crop(pixel_box(box, img.width, img.height)), THUMB_SIDE)
