"""Reader for img2dataset-style WebDataset tars: `key.jpg` + `key.txt` (+ `key.json`) per sample.

Members are grouped by key in tar order; images stay in the tar and are referenced as
`TAR::MEMBER`. Unsafe member paths (absolute, `..`, links) are reported, never followed, and
nothing is unpickled: only the image, `txt` and `json` members are looked at.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.images import tar_ref
from pipeline.readers.records import RawRecord, text_or_bytes
from pipeline.readers.rows import id_field, itm_field
from pmu.shards import split_member, unsafe_member_reason

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_TEXT_BYTES = 1 << 20


def tar_files(path: str | os.PathLike) -> list[Path]:
    """A single tar, or every `*.tar` in a folder in name order."""
    path = Path(path)
    return sorted(path.glob("*.tar")) if path.is_dir() else [path]


def _record(tar_path: Path, key: str, members: dict[str, tarfile.TarInfo], tar) -> RawRecord:
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    caption: str | bytes | None = None
    meta: dict = {}
    problem = None
    if "txt" in members:
        info = members["txt"]
        if info.size > MAX_TEXT_BYTES:
            problem = "caption: too long"
        else:
            caption = text_or_bytes(tar.extractfile(info).read())
    if "json" in members and members["json"].size <= MAX_TEXT_BYTES:
        try:
            loaded = json.loads(tar.extractfile(members["json"]).read())
            meta = loaded if isinstance(loaded, dict) else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            meta = {}
    if image is None:
        problem = problem or "wds: no image member"
    rec_id, id_problem = id_field(meta.get("id"), key, "wds")
    itm, itm_problem = itm_field(meta.get("itm"), "wds")
    return RawRecord(
        id=rec_id,
        source="wds",
        image_path=tar_ref(str(tar_path), image.name) if image is not None else None,
        caption=caption,
        itm=itm,
        problem=problem or id_problem or itm_problem,
    )


def read_wds(path: str | os.PathLike) -> Iterator[RawRecord]:
    """Yield one record per sample key of each tar; unsafe members become rejected records."""
    for tar_path in tar_files(path):
        try:
            tar = tarfile.open(tar_path, "r:")
        except (tarfile.TarError, OSError) as exc:
            yield RawRecord(
                tar_path.name, "wds", None, None, problem=f"wds: unreadable tar ({exc})"
            )
            continue
        with tar:
            key, members = None, {}
            try:
                for info in tar:
                    bad = unsafe_member_reason(info)
                    if bad is not None:
                        if info.isdir():
                            continue
                        problem = f"wds: unsafe tar member ({bad})"
                        yield RawRecord(info.name, "wds", None, None, problem=problem)
                        continue
                    member_key, ext = split_member(info.name)
                    if member_key != key and key is not None:
                        yield _record(tar_path, key, members, tar)
                        members = {}
                    key = member_key
                    members[ext.lower()] = info
                if key is not None:
                    yield _record(tar_path, key, members, tar)
            except tarfile.TarError as exc:
                yield RawRecord(
                    f"{tar_path.name}:{key}", "wds", None, None, problem=f"wds: bad tar ({exc})"
                )
