"""The shard contract between pipeline and trainer: encode, write, read and decode samples.

A shard is a plain WebDataset tar (`shard-000000.tar`, ...) with the members of one sample
adjacent, in a fixed order. Tars are written deterministically (fixed header fields and member
order) and atomically (temp name, then rename). Nothing here ever unpickles: arrays are .npy
read with allow_pickle=False, metadata is JSON.

Per sample (key = `sample_key(id)`):
    {key}.jpg           image (RGB JPEG, longest side capped)
    {key}.txt           caption, UTF-8
    {key}.json          id, source, itm, width, height, boxes (xyxy in [0,1]), box_classes,
                        box_confs, ent_mass (kept q_ent mass per object), rel_mass
    {key}.ent_idx.npy   int32 [n_objects, k_ent]   entity vocabulary indices, by falling prob
    {key}.ent_prob.npy  float32 [n_objects, k_ent] q_ent restricted to those indices
    {key}.rel_idx.npy   int32 [k_rel]              relation vocabulary indices
    {key}.rel_prob.npy  float32 [k_rel]            q_rel restricted to those indices
Beside the shards: sizes.json (shard name -> sample count), manifest.json, entities.json,
relations.json (the vocabularies, so a trainer needs only the shard folder). manifest.json's
`files` holds the sha256 and size of every shard, of sizes.json and of members.sha256
(`hash_shards`), its `vocab` those of the vocabularies, so `pipeline verify` notices content
changed after labeling. members.sha256 holds the sha256 of every tar member
(`sha256sum` format, `HASH  shard-000000.tar/KEY.SUFFIX`), so two machines' shards can be
compared member by member (`pipeline compare-shards`) without copying the shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pmu.errors import InputError
from pmu.io import atomic_path, file_sha256

CONTRACT_VERSION = 1
SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_GLOB = "shard-*.tar"
MEMBER_ORDER = ("jpg", "txt", "json", "ent_idx.npy", "ent_prob.npy", "rel_idx.npy", "rel_prob.npy")
SIZES_FILE = "sizes.json"
MANIFEST_FILE = "manifest.json"
MEMBERS_FILE = "members.sha256"  # sha256sum lines, one per tar member: diffable across machines
ENTITIES_FILE = "entities.json"
RELATIONS_FILE = "relations.json"
_SAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")


@dataclass
class LabelledSample:
    """One sample as the contract stores it."""

    id: str
    jpg: bytes
    caption: str
    meta: dict[str, Any]
    ent_idx: np.ndarray
    ent_prob: np.ndarray
    rel_idx: np.ndarray
    rel_prob: np.ndarray
    key: str = field(default="")

    def __post_init__(self) -> None:
        self.key = self.key or sample_key(self.id)


def sample_key(sample_id: str) -> str:
    """A WebDataset-safe key (no dots or slashes) that stays unique for any id."""
    key = _SAFE_KEY.sub("_", sample_id)
    if key != sample_id or not key:
        key = f"{key[:80]}_{hashlib.sha1(sample_id.encode('utf-8')).hexdigest()[:10]}"
    return key


def _npy_bytes_slow(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _npy_bytes(array: np.ndarray) -> bytes:
    """`np.save`'s bytes: its header for this dtype and shape (made by np.save once, then
    cached) followed by the C-order data."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        return _npy_bytes_slow(array)
    key = (array.dtype.str, array.shape)
    header = _NPY_HEADERS.get(key)
    if header is None:
        full = _npy_bytes_slow(array)
        header = full[: len(full) - array.nbytes]
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[key] = header
        return full
    return header + array.tobytes()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode(
        "utf-8"
    )


def encode_sample(sample: LabelledSample) -> dict[str, bytes]:
    """Member suffix -> bytes, in contract order."""
    meta = dict(sample.meta, id=sample.id)
    return {
        "jpg": sample.jpg,
        "txt": sample.caption.encode("utf-8"),
        "json": _json_bytes(meta),
        "ent_idx.npy": _npy_bytes(np.asarray(sample.ent_idx, dtype=np.int32)),
        "ent_prob.npy": _npy_bytes(np.asarray(sample.ent_prob, dtype=np.float32)),
        "rel_idx.npy": _npy_bytes(np.asarray(sample.rel_idx, dtype=np.int32)),
        "rel_prob.npy": _npy_bytes(np.asarray(sample.rel_prob, dtype=np.float32)),
    }


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A shard member's fixed header fields (regular file, 0444, owner 0, mtime 0)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# The parts of a GNU-format header (tarfile's GNU_FORMAT) that are the same for every member.
_HEADER_MODE_IDS = b"0000444\0" + b"0000000\0" + b"0000000\0"  # mode, uid, gid
_HEADER_MTIME = b"00000000000\0"
_HEADER_TAIL = (  # type, linkname, GNU magic, uname, gname, devmajor, devminor, prefix
    tarfile.REGTYPE + b"\0" * 100 + tarfile.GNU_MAGIC + b"\0" * (32 + 32 + 8 + 8 + 155)
)
_HEADER_SIZE_MAX = 8**11  # sizes from here on take tarfile's base-256 field


def member_header(name: str, size: int) -> bytes:
    """The 512-byte header `tarfile` writes in GNU format for a shard member (`_tarinfo`),
    built directly (tarfile's TarInfo.tobuf costs ~30 us a member); names tarfile would give a
    GNU long-name record, and huge sizes, go through tarfile itself. Tested equal to tobuf."""
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) > tarfile.LENGTH_NAME or not name.isascii() or size >= _HEADER_SIZE_MAX:
        return _tarinfo(name, size).tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    head = raw.ljust(100, b"\0") + _HEADER_MODE_IDS + b"%011o\0" % size + _HEADER_MTIME
    tail = _HEADER_TAIL
    chksum = 256 + sum(head) + sum(tail)  # the checksum field counts as 8 spaces (256)
    block = head + b"%06o\0 " % chksum + tail
    return block + b"\0" * (tarfile.BLOCKSIZE - len(block))


def shard_bytes(samples: Iterable[LabelledSample]) -> Iterator[bytes]:
    """The bytes of a shard tar, in pieces: what `tarfile.open(mode="w",
    format=tarfile.GNU_FORMAT)` writes for these members (header, data, NUL padding to 512
    bytes; two NUL blocks and padding to a 10240-byte record at the end)."""
    offset = 0
    for sample in samples:
        for suffix, data in encode_sample(sample).items():
            header = member_header(f"{sample.key}.{suffix}", len(data))
            pad = -len(data) % tarfile.BLOCKSIZE
            yield header
            yield data
            if pad:
                yield b"\0" * pad
            offset += len(header) + len(data) + pad
    end = 2 * tarfile.BLOCKSIZE
    end += -(offset + end) % tarfile.RECORDSIZE
    yield b"\0" * end


def write_shard(path: str | os.PathLike, samples: Iterable[LabelledSample]) -> int:
    """Write one shard deterministically and atomically; return the number of samples."""
    count = 0

    def counted() -> Iterator[LabelledSample]:
        nonlocal count
        for sample in samples:
            yield sample
            count += 1

    with atomic_path(path) as tmp, open(tmp, "wb", buffering=1 << 20) as f:
        f.writelines(shard_bytes(counted()))
        f.flush()
        os.fsync(f.fileno())
    return count


def write_shard_tarfile(path: str | os.PathLike, samples: Iterable[LabelledSample]) -> int:
    """`write_shard` through `tarfile` (the reference the direct writer is tested against)."""
    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for sample in samples:
                for suffix, data in encode_sample(sample).items():
                    tar.addfile(_tarinfo(f"{sample.key}.{suffix}", len(data)), io.BytesIO(data))
                count += 1
        f.flush()
        os.fsync(f.fileno())
    return count


def unsafe_member_reason(info: tarfile.TarInfo) -> str | None:
    """Why a tar member must not be read, or None when it is a plain, relative file."""
    name = info.name
    if not info.isfile():
        return "not a regular file"
    if name.startswith(("/", "\\")) or ".." in Path(name).parts or ":" in name:
        return "unsafe path"
    if name.endswith((".pkl", ".pickle", ".pyd", ".pth")) or ".pkl." in name:
        return "pickle member"
    return None


def split_member(name: str) -> tuple[str, str]:
    """`dir/key.ent_idx.npy` -> (`dir/key`, `ent_idx.npy`), the WebDataset convention."""
    base = os.path.basename(name)
    key, _, suffix = base.partition(".")
    return os.path.join(os.path.dirname(name), key) if os.path.dirname(name) else key, suffix


def iter_raw_samples(path: str | os.PathLike) -> Iterator[dict[str, bytes]]:
    """Group a shard's members by key; raise ValueError on unsafe or pickle members."""
    current: dict[str, bytes] = {}
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            reason = unsafe_member_reason(info)
            if reason:
                raise ValueError(f"{path}: member {info.name!r}: {reason}")
            key, suffix = split_member(info.name)
            if current and current["__key__"] != key:
                yield current
                current = {}
            current.setdefault("__key__", key)
            current[suffix] = tar.extractfile(info).read()
    if current:
        yield current


def decode_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """Raw member bytes -> python values. The image stays JPEG bytes (decode where it is used)."""

    def npy(suffix: str) -> np.ndarray:
        return np.load(io.BytesIO(raw[suffix]), allow_pickle=False)

    meta = json.loads(raw["json"])
    return {
        "__key__": raw.get("__key__"),
        "jpg": raw["jpg"],
        "caption": raw["txt"].decode("utf-8"),
        "meta": meta,
        "ent_idx": npy("ent_idx.npy"),
        "ent_prob": npy("ent_prob.npy"),
        "rel_idx": npy("rel_idx.npy"),
        "rel_prob": npy("rel_prob.npy"),
    }


def shard_paths(shard_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(shard_dir).glob(SHARD_GLOB))


def is_sample_count(value: Any) -> bool:
    """A whole number of samples >= 0 (not a bool, a float or a string of digits)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def sizes_problems(sizes: Any) -> list[str]:
    """What makes a parsed sizes.json unusable (empty when it is fine): it must map each shard
    name to a whole sample count."""
    if not isinstance(sizes, dict):
        return [f"expected an object of shard name -> sample count, got {type(sizes).__name__}"]
    return [
        f"entry {name!r}: {json.dumps(count)} is not a sample count (a whole number >= 0)"
        for name, count in sizes.items()
        if not is_sample_count(count)
    ]


def read_sizes(shard_dir: str | os.PathLike) -> dict[str, int]:
    """sizes.json as {shard name: sample count}; an unreadable or malformed table is an
    InputError naming the file and its first bad entry (the sums downstream need ints)."""
    path = Path(shard_dir) / SIZES_FILE
    redo = "re-run `pipeline label-objects` (it writes sizes.json)"
    try:
        sizes = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path} missing: not a shard folder; {redo}") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path} is not readable JSON ({e}); {redo}") from None
    problems = sizes_problems(sizes)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{path}: {problems[0]}{more}; {redo}")
    return sizes


def read_vocabularies(shard_dir: str | os.PathLike) -> tuple[list[str], list[str]]:
    """(entity names, relation labels) in index order, from the files beside the shards."""
    shard_dir = Path(shard_dir)
    entities = json.loads((shard_dir / ENTITIES_FILE).read_text(encoding="utf-8"))["entities"]
    relations = json.loads((shard_dir / RELATIONS_FILE).read_text(encoding="utf-8"))["relations"]
    return [e["name"] for e in entities], [r["label"] for r in relations]


def _on_threads(fn: Any, items: list) -> list:
    """`fn` over `items` on a few threads (hashlib releases the GIL), results in order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(fn, items))


def file_hashes(root: str | os.PathLike, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """{name: {"sha256", "bytes"}} of files in `root`, in name order: the manifest's `files`."""
    root, names = Path(root), sorted(set(names))
    digests = _on_threads(lambda n: file_sha256(root / n), names)
    return {
        name: {"sha256": digest, "bytes": (root / name).stat().st_size}
        for name, digest in zip(names, digests, strict=True)
    }


class _HashingReader(io.RawIOBase):
    """A file read front to back, every byte also fed to a sha256 (tar stream mode reads so)."""

    def __init__(self, f: Any) -> None:
        self.f, self.digest = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        n = self.f.readinto(buf)
        self.digest.update(memoryview(buf)[:n])
        return n


def member_hashes(path: str | os.PathLike) -> tuple[str, list[tuple[str, str]]]:
    """(sha256 of the whole shard, [(member name, sha256)] in tar order), in one read."""
    out = []
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        with tarfile.open(fileobj=reader, mode="r|") as tar:
            for info in tar:
                data = tar.extractfile(info).read() if info.isfile() else b""
                out.append((info.name, hashlib.sha256(data).hexdigest()))
        while reader.read(1 << 20):  # the end-of-archive padding the stream did not need
            pass
    return reader.digest.hexdigest(), out


def hash_shards(root: str | os.PathLike, shard_names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Read every shard once: write members.sha256 (every member's sha256, atomically) and
    return the manifest's `files` entries of the shards, sizes.json and members.sha256."""
    root, names = Path(root), sorted(set(shard_names))
    per_shard = _on_threads(lambda n: member_hashes(root / n), names)
    lines = [
        f"{digest}  {name}/{member}\n"
        for name, (_, members) in zip(names, per_shard, strict=True)
        for member, digest in members
    ]
    with atomic_path(root / MEMBERS_FILE) as tmp:
        Path(tmp).write_text("".join(lines), encoding="utf-8")
    files = file_hashes(root, [SIZES_FILE, MEMBERS_FILE])
    for name, (digest, _) in zip(names, per_shard, strict=True):
        files[name] = {"sha256": digest, "bytes": (root / name).stat().st_size}
    return dict(sorted(files.items()))


def read_member_hashes(path: str | os.PathLike) -> dict[str, str]:
    """`shard/member` -> sha256 from a members.sha256 file (or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / MEMBERS_FILE
    hashes = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ValueError(f"{path}: not a sha256sum line: {line[:80]!r}")
        hashes[name] = digest
    return hashes
