"""Reading image bytes (files and `TAR::MEMBER` refs) and robust, bomb-safe decoding to RGB."""

from __future__ import annotations

import io
import os
import sys
import tarfile
import threading
import warnings
from functools import lru_cache

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.settings import DEFAULT_MAX_PIXELS

TAR_SEP = "::"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class ImageRejected(ValueError):
    """An image that cannot be used; `reason` is a short category, `detail` says more."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason} ({detail})" if detail else reason)


# Reason categories (recorded in rejected.jsonl and counted in summaries).
MISSING = "image: missing file"
UNSAFE_MEMBER = "image: unsafe tar member"
TOO_LARGE_FILE = "image: file too large"
EMPTY = "image: empty file"
UNKNOWN_FORMAT = "image: unknown format"
TOO_MANY_PIXELS = "image: too many pixels"
TRUNCATED = "image: truncated"
DECODE_ERROR = "image: decode error"


def is_tar_ref(image_path: str) -> bool:
    return TAR_SEP in image_path


def tar_ref(tar_path: str, member: str) -> str:
    """The `TAR_PATH::MEMBER` reference that `read_image_bytes` understands."""
    return f"{tar_path}{TAR_SEP}{member}"


@lru_cache(maxsize=16)
def _tar_index(tar_path: str, mtime_ns: int, size: int) -> dict[str, tuple[int, int] | str]:
    """member name -> (data offset, size) for safe regular files, or the reason it is unsafe.

    One scan per tar (cached on path, mtime and size) so reading N members costs O(N), not O(N^2).
    """
    from pmu.shards import unsafe_member_reason

    index: dict[str, tuple[int, int] | str] = {}
    with tarfile.open(tar_path, "r:") as tar:
        try:
            for info in tar:
                bad = unsafe_member_reason(info)
                index[info.name] = bad if bad else (info.offset_data, info.size)
        except tarfile.ReadError:
            # Cut short (a failed download, a killed writer): the members before the cut are
            # whole and stay readable; read_image_bytes refuses one whose data is cut.
            pass
    return index


_tar_lock = threading.Lock()


def read_image_bytes(image_path: str, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Bytes of a plain file or of `TAR_PATH::MEMBER` (an uncompressed tar); never extracts."""
    path, _, member = image_path.partition(TAR_SEP)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageRejected(MISSING, path) from exc
    if not member:
        if not os.path.isfile(path):
            raise ImageRejected(MISSING, f"not a file: {path}")
        if st.st_size > max_bytes:
            raise ImageRejected(TOO_LARGE_FILE, f"{st.st_size} bytes")
        with open(path, "rb") as f:
            return f.read()
    try:
        with _tar_lock:
            index = _tar_index(os.path.abspath(path), st.st_mtime_ns, st.st_size)
    except (tarfile.TarError, OSError) as exc:
        raise ImageRejected(MISSING, f"unreadable tar {path}: {exc}") from exc
    entry = index.get(member)
    if entry is None:
        raise ImageRejected(MISSING, f"no member {member!r} in {path}")
    if isinstance(entry, str):
        raise ImageRejected(UNSAFE_MEMBER, f"{member!r}: {entry}")
    offset, size = entry
    if size > max_bytes:
        raise ImageRejected(TOO_LARGE_FILE, f"{size} bytes")
    if offset + size > st.st_size:
        raise ImageRejected(TRUNCATED, f"{member!r} is cut short: the tar ends at {st.st_size}")
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white, 16/32-bit gray scaled to 8 bit."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB", "1") and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit (and 32-bit integer, as 16-bit PNGs may open as "I"): keep the top 8 bits.
        arr = np.asarray(img, dtype=np.int64)
        arr = np.clip(arr, 0, 65535) >> 8
        return Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(scaled.round().astype(np.uint8), mode="L").convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _decode_failure(exc: BaseException) -> ImageRejected:
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, EOFError) or "truncated" in msg.lower() or "premature end" in msg.lower():
        return ImageRejected(TRUNCATED, msg)
    return ImageRejected(DECODE_ERROR, msg)


def pil_open(fp):
    """PIL's own Image.open. Importing ultralytics replaces it with a wrapper that, on an
    unidentifiable file, tries to pip-install and import pi-heif: never that for untrusted data."""
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)(fp)


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes to an RGB image, rejecting empty, unknown, truncated and oversized inputs.

    The pixel count is checked from the header before any pixel is decoded (decompression bombs),
    independent of PIL's global MAX_IMAGE_PIXELS (which some libraries switch off).
    """
    if not data:
        raise ImageRejected(EMPTY)
    # Truncated files must fail, not decode as grey padding; another library may have flipped it.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = pil_open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageRejected(TOO_MANY_PIXELS, str(exc)) from exc
        except UnidentifiedImageError as exc:
            raise ImageRejected(UNKNOWN_FORMAT) from exc
        except (OSError, SyntaxError, ValueError) as exc:
            raise _decode_failure(exc) from exc
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageRejected(DECODE_ERROR, f"size {width}x{height}")
        if width * height > max_pixels:
            raise ImageRejected(TOO_MANY_PIXELS, f"{width}x{height} > {max_pixels}")
        try:
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
            rgb.load()
        except Image.DecompressionBombError as exc:
            raise ImageRejected(TOO_MANY_PIXELS, str(exc)) from exc
        except (OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:
            raise _decode_failure(exc) from exc
    return rgb


def cap_longest_side(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the longest side is at most `max_side` (bicubic); smaller images unchanged."""
    width, height = img.size
    longest = max(width, height)
    if max_side <= 0 or longest <= max_side:
        return img
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    """Baseline JPEG without metadata: the same pixels and quality give the same bytes."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=False, subsampling=0)
    return buf.getvalue()
