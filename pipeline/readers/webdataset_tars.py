"""Reader for img2dataset-style WebDataset tars: `key.jpg` + `key.txt` (+ `key.json`) per sample.

Members are grouped by key in tar order; images stay in the tar and are referenced as
`TAR::MEMBER`. Unsafe member paths (absolute, `..`, links) are reported, never followed, and
nothing is unpickled: only the image, `txt` and `json` members are looked at.

A tar cut short (a failed download, a killed writer) keeps every sample before the cut: a
sample is complete once the next one starts, or the tar's end-of-archive block follows it; the
sample at the cut is rejected (its later members, such as a `json` with `itm` 0, may be lost).
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.images import tar_ref
from pipeline.readers.records import CAPTION_TOO_LONG, RawRecord, short_error, text_or_bytes
from pipeline.readers.rows import id_field, itm_field
from pmu.shards import split_member, unsafe_member_reason

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_TEXT_BYTES = 1 << 20  # a txt member this large holds over 100,000 characters: no caption
BLOCK = tarfile.BLOCKSIZE
# Reasons of samples (or whole tars) this reader rejects.
NO_IMAGE = "wds: no image member"
UNSAFE = "wds: unsafe tar member"
UNREADABLE_TAR = "wds: unreadable tar"
BAD_TAR = "wds: bad tar"
TRUNCATED_TAR = "wds: truncated tar"
BAD_JSON = "wds: bad JSON"
JSON_NOT_OBJECT = "wds: JSON is not an object"
JSON_TOO_LARGE = "wds: JSON too large"


def tar_files(path: str | os.PathLike) -> list[Path]:
    """A single tar, or every `*.tar` in a folder in name order."""
    path = Path(path)
    return sorted(path.glob("*.tar")) if path.is_dir() else [path]


def _caption(members: dict[str, tarfile.TarInfo], tar) -> tuple[str | bytes | None, str | None]:
    info = members.get("txt")
    if info is None:
        return None, None  # prepare rejects it as `caption: missing`
    if info.size > MAX_TEXT_BYTES:
        return None, f"{CAPTION_TOO_LONG} ({info.size} bytes > {MAX_TEXT_BYTES})"
    return text_or_bytes(tar.extractfile(info).read()), None


def _meta(members: dict[str, tarfile.TarInfo], tar) -> tuple[dict, str | None]:
    """(the sample's json object, problem): a json member that is there but unusable rejects
    the sample, since its `itm` (maybe 0) and `id` would otherwise be silently replaced."""
    info = members.get("json")
    if info is None:
        return {}, None
    if info.size > MAX_TEXT_BYTES:
        return {}, f"{JSON_TOO_LARGE} ({info.size} bytes > {MAX_TEXT_BYTES})"
    raw = tar.extractfile(info).read()
    try:
        loaded = json.loads(raw)
    except json.JSONDecodeError as exc:
        return {}, f"{BAD_JSON} ({exc.msg} at byte {exc.pos})"
    except UnicodeDecodeError as exc:
        return {}, f"{BAD_JSON} (not UTF-8: {short_error(exc)})"
    if not isinstance(loaded, dict):
        return {}, f"{JSON_NOT_OBJECT} ({type(loaded).__name__})"
    return loaded, None


def _record(tar_path: Path, key: str, members: dict[str, tarfile.TarInfo], tar) -> RawRecord:
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    caption, caption_problem = _caption(members, tar)
    meta, meta_problem = _meta(members, tar)
    rec_id, id_problem = id_field(meta.get("id"), key, "wds")
    itm, itm_problem = itm_field(meta.get("itm"), "wds")
    return RawRecord(
        id=rec_id,
        source="wds",
        image_path=tar_ref(str(tar_path), image.name) if image is not None else None,
        caption=caption,
        itm=itm,
        problem=caption_problem
        or (NO_IMAGE if image is None else None)
        or meta_problem
        or id_problem
        or itm_problem,
    )


def _ends_cleanly(tar_path: Path, offset: int) -> bool:
    """Whether an end-of-archive (zero) block sits at `offset`, where tarfile stopped.

    tarfile also stops quietly, without an error, at a cut between members or inside a header;
    only the zero block says the last sample is whole.
    """
    with open(tar_path, "rb") as f:
        f.seek(offset)
        block = f.read(BLOCK)
    return len(block) == BLOCK and not block.strip(b"\0")


def _cut_record(tar_path: Path, key: str, reason: str, detail: str) -> RawRecord:
    """The rejection of the sample a tar ends in (or breaks in): its members may be missing."""
    return RawRecord(f"{tar_path.name}:{key}", "wds", None, None, problem=f"{reason} ({detail})")


def _samples(tar_path: Path, tar) -> Iterator[RawRecord]:
    """The samples of an open tar; the one at a cut or a damaged header is rejected."""
    key, members, last = None, {}, None
    try:
        for info in tar:
            last = info
            bad = unsafe_member_reason(info)
            if bad is not None:
                if info.isdir():
                    continue
                yield RawRecord(info.name, "wds", None, None, problem=f"{UNSAFE} ({bad})")
                continue
            member_key, ext = split_member(info.name)
            if member_key != key and key is not None:
                yield _record(tar_path, key, members, tar)  # the next sample began: it is whole
                members = {}
            key = member_key
            members[ext.lower()] = info
    except tarfile.TarError as exc:
        if key is not None:
            size = tar_path.stat().st_size
            cut = last is not None and last.offset_data + last.size > size
            reason = TRUNCATED_TAR if cut else BAD_TAR
            yield _cut_record(tar_path, key, reason, f"{short_error(exc)}, at sample {key}")
        return
    if key is None:
        return
    if _ends_cleanly(tar_path, tar.offset):
        yield _record(tar_path, key, members, tar)
    else:
        detail = f"no end-of-archive block at byte {tar.offset}, at sample {key}"
        yield _cut_record(tar_path, key, TRUNCATED_TAR, detail)


def read_wds(path: str | os.PathLike) -> Iterator[RawRecord]:
    """Yield one record per sample key of each tar; unsafe members become rejected records."""
    for tar_path in tar_files(path):
        try:
            tar = tarfile.open(tar_path, "r:")
        except (tarfile.TarError, OSError) as exc:
            problem = f"{UNREADABLE_TAR} ({short_error(exc)})"
            yield RawRecord(tar_path.name, "wds", None, None, problem=problem)
            continue
        with tar:
            yield from _samples(tar_path, tar)
