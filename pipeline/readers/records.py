"""What every reader yields (`RawRecord`) and the rules they share: text that may not be UTF-8,
and image paths that must stay under the image root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Reason of an image path that leaves the image root (`../`, or absolute elsewhere).
IMAGE_OUTSIDE_ROOT = "image: outside the image root"
# Caption rules shared by prepare and the readers that can tell early (a 1 GB tar member).
CAPTION_TOO_LONG = "caption: too long"
MAX_CAPTION_INPUT_CHARS = 100_000  # beyond this it is a document or junk, not a caption
ERROR_CHARS = 200  # a library's error text in a reason is cut here (one line, short)


@dataclass
class RawRecord:
    """One image-caption pair as a reader found it, before validation.

    `caption` is bytes when the reader could not decode it as UTF-8 (prepare rejects it with a
    reason); `problem` is a reader-level reason (e.g. a missing field) that rejects the record.
    """

    id: str
    source: str
    image_path: str | None
    caption: str | bytes | None
    itm: int = 1
    problem: str | None = None


def text_or_bytes(raw: bytes) -> str | bytes:
    """UTF-8 text, or the raw bytes back when they do not decode (rejected later with a reason)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def unescape_surrogates(value: str) -> str | bytes:
    """A str decoded with `surrogateescape`: the text, or the original bytes if it was not UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes: still not valid UTF-8
            return value.encode("utf-8", "surrogatepass")
    return value


def image_under_root(
    value: str, root: str | os.PathLike, allow_outside: bool = False
) -> tuple[str | None, str | None]:
    """(path, problem): `value` joined to `root` (an absolute value stays as it is).

    A path that leaves the root, lexically (`../` parts, or an absolute path elsewhere), is
    refused unless `allow_outside`; symbolic links inside the root are followed as they are.
    """
    path = Path(root) / value
    if not allow_outside:
        base = os.path.abspath(root)
        if os.path.commonpath([os.path.abspath(path), base]) != base:
            return None, f"{IMAGE_OUTSIDE_ROOT} ({value} is not under {root})"
    return str(path), None


def short_error(exc: BaseException) -> str:
    """An exception's text on one short line, for a reason's detail or an error message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = "".join(ch if ch.isprintable() else "?" for ch in text)  # a damaged file's bytes
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."
