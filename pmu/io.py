"""Writing files so that a reader never sees half of one, and hashing them.

Every output is written under a temporary name beside its final path and renamed into place
(`atomic_path`); a failure leaves the old file (or none) and no temporary behind. Folders are
built the same way (`atomic_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside `path` (parent folders made); renamed onto `path` when the
    block succeeds, removed when it fails. `suffix` keeps a file type visible to writers that
    choose their format by extension (e.g. `.tmp.png`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = (
        path.with_name(path.name + suffix)
        if suffix == ".tmp"
        else path.with_name(path.stem + suffix)
    )
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, fsync: bool = False) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Pretty, key-sorted JSON (UTF-8, trailing newline), atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty staging folder beside `path`; on success it replaces `path` (an old
    folder is moved aside first and removed after), on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(staging, path)
    shutil.rmtree(old, ignore_errors=True)


def png_bytes(fig: Any, **savefig: Any) -> bytes:
    """A matplotlib figure as PNG bytes with no version string in them (reruns give the same
    bytes)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None}, **savefig)
    return buf.getvalue()


def save_figure(fig: Any, path: str | os.PathLike, **savefig: Any) -> Path:
    """`png_bytes` written atomically; a pyplot figure is closed after."""
    import sys

    write_bytes_atomic(path, png_bytes(fig, **savefig))
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    return Path(path)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safetensors_bytes(tensors: dict[str, Any], metadata: dict[str, str]) -> bytes:
    """safetensors serialisation with a key-sorted header (the library's header order varies)."""
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    return len(text).to_bytes(8, "little") + text + raw[8 + n :]


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata=None) -> Path:
    """Tensors (made contiguous, on the CPU) as .safetensors with a sorted header, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_bytes_atomic(path, safetensors_bytes(state, metadata or {}))
    return Path(path)
