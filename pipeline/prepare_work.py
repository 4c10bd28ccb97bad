"""prepare's work folder: finished chunks as atomic part files, so a killed run resumes.

Layout (beside the output folder, since DVC deletes a stage's outputs before it runs):
`fingerprint.json` (inputs and output-shaping parameters) and per chunk `part-NNNNNN.parquet`
(accepted pairs), `part-NNNNNN.jsonl` (rejections) and, written last, `part-NNNNNN.done.json`
(the chunk's record digest). A chunk is reused only when its done-marker names the same
fingerprint and the same chained digest of every record read up to and including the chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.pairs import Pair, Rejection, write_pairs_parquet
from pmu.io import write_text_atomic

FINGERPRINT_FILE = "fingerprint.json"
# 2: rejections keyed by record index; 3: shard-key collisions rejected; 4: long captions cut,
# not rejected
WORK_VERSION = 4


def default_work_dir(out_dir: str | os.PathLike) -> Path:
    """`data/prepared` -> `data/.prepared.work` (outside the DVC output folder)."""
    out = Path(out_dir)
    if out.name in ("", ".", ".."):  # `--out .`: name the folder after the real directory
        out = out.resolve()
    return out.parent / f".{out.name}.work"


def _file_stats(path: Path) -> list[list]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    if path.exists():
        st = path.stat()
        return [[str(path), st.st_size, st.st_mtime_ns]]
    return [[str(path), None, None]]


def describe_inputs(
    source: str,
    input_path: str | os.PathLike | None,
    image_root: str | os.PathLike | None = None,
    visualnews_data: str | os.PathLike | None = None,
    columns: Any = None,
    options: dict[str, Any] | None = None,
) -> dict:
    """What the records depend on, cheaply: reader settings and the size and mtime of the input
    file(s) (a folder input is listed recursively; image files under `image_root` are not).
    `options` holds further reader settings that differ from their defaults."""
    files = []
    for p in (input_path, visualnews_data):
        if p is not None:
            files += _file_stats(Path(p))
    described = {
        "source": source,
        "input": None if input_path is None else str(input_path),
        "image_root": None if image_root is None else str(image_root),
        "visualnews_data": None if visualnews_data is None else str(visualnews_data),
        "columns": asdict(columns) if columns is not None else None,
        "files": files,
    }
    if options:
        described["options"] = dict(sorted(options.items()))
    return described


def fingerprint_digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def chain_digest(previous: str, records: Iterable[Any]) -> str:
    """Digest of every record so far: the previous chunk's digest plus this chunk's records."""
    h = hashlib.sha256(previous.encode())
    for rec in records:
        caption = rec.caption
        if isinstance(caption, bytes):
            caption = "bytes:" + caption.hex()
        row = [rec.id, rec.source, rec.image_path, caption, rec.itm, rec.problem]
        h.update(json.dumps(row, ensure_ascii=True).encode() + b"\n")
    return h.hexdigest()


class WorkDir:
    """Finished chunks of one prepare run; `open` discards a folder left by other inputs."""

    def __init__(self, path: str | os.PathLike, fingerprint: dict):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.digest = fingerprint_digest(fingerprint)

    def open(self) -> tuple[int, bool]:
        """(finished chunks found, whether an old folder was discarded); creates the folder."""
        discarded = False
        fp_file = self.path / FINGERPRINT_FILE
        if self.path.exists():
            try:
                same = json.loads(fp_file.read_text(encoding="utf-8")) == self.fingerprint
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.path)
                discarded = True
        self.path.mkdir(parents=True, exist_ok=True)
        # The folder ignores itself, so a half-finished run never shows up in `git status`.
        (self.path / ".gitignore").write_text("*\n", encoding="utf-8")
        if not fp_file.exists():
            _write_atomic(fp_file, json.dumps(self.fingerprint, sort_keys=True, indent=2) + "\n")
        return self.finished_chunks(), discarded

    def finished_chunks(self) -> int:
        return len(list(self.path.glob("part-*.done.json"))) if self.path.is_dir() else 0

    def _part(self, index: int, suffix: str) -> Path:
        return self.path / f"part-{index:06d}{suffix}"

    def is_done(self, index: int, records_digest: str) -> bool:
        try:
            marker = json.loads(self._part(index, ".done.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return marker.get("fingerprint") == self.digest and marker.get("records") == records_digest

    def write(
        self, index: int, records_digest: str, pairs: list, rejected: list, truncated: int = 0
    ) -> None:
        """The chunk's pairs and (record index, rejection)s, each atomically, then the marker
        (which also holds the count of captions that were cut)."""
        marker = self._part(index, ".done.json")
        marker.unlink(missing_ok=True)  # a stale marker must not vouch for the new parts
        write_pairs_parquet(pairs, self._part(index, ".parquet"))
        lines = "".join(json.dumps([key, asdict(r)]) + "\n" for key, r in rejected)
        _write_atomic(self._part(index, ".jsonl"), lines)
        info = {"fingerprint": self.digest, "records": records_digest}
        counts = {"n_pairs": len(pairs), "n_truncated": truncated}
        _write_atomic(marker, json.dumps({**info, **counts}) + "\n")

    def read(self, index: int) -> tuple[list, list]:
        """(pairs, (record index, rejection)s) of a finished chunk, exactly as they were written."""
        import pyarrow.parquet as pq

        rows = pq.read_table(self._part(index, ".parquet")).to_pylist()
        text = self._part(index, ".jsonl").read_text(encoding="utf-8")
        rejected = []
        for line in text.splitlines():
            key, row = json.loads(line)
            rejected.append((int(key), Rejection(**row)))
        return [Pair(**r) for r in rows], rejected

    def truncated(self, index: int) -> int:
        """How many of a finished chunk's pairs have a caption that was cut."""
        marker = json.loads(self._part(index, ".done.json").read_text(encoding="utf-8"))
        return int(marker.get("n_truncated", 0))

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    write_text_atomic(path, text)
