"""Outputs claimed before any work: each can be created and written, and one run at a time
writes each output folder.

`claim_outputs({flag: path})` checks every path (its folder is created; a probe file is
written and removed there, so a read-only disk or a file in the way fails at once, not at the
first checkpoint), then holds a writer lock on the primary output for the run:
`.<name>.lock` beside it (outside the output folder, which may be replaced atomically), locked
with `flock` and holding the holder's pid, host, start time and command line. A second writer
fails at once with one line naming the holder. The kernel drops the lock when its process dies
(even by SIGKILL), so a lock file left by a killed run is taken over, and said so.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pmu.errors import InputError


def lock_path(out: str | os.PathLike) -> Path:
    """`shards` -> `.shards.lock` beside it (`--out .` is named after the real folder)."""
    p = Path(out)
    if p.name in ("", ".", ".."):
        p = p.resolve()
    return p.parent / f".{p.name}.lock"


def check_writable(path: str | os.PathLike, what: str = "--out") -> list[Path]:
    """The output `path` (a file or a folder) can be created and written, or InputError.
    Returns the folders it created (deepest last) for the path's parent."""
    p = Path(path)
    hint = f"choose a {what} on a writable disk"
    for parent in (p, *p.parents):
        if parent.exists():
            break
    if parent != p and not parent.is_dir():
        raise InputError(f"{what} {path}: {parent} is a file, not a folder", hint)
    created = [d for d in reversed(p.parents) if not d.exists()]
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        folders = [p.parent] + ([p] if p.is_dir() else [])
        for folder in folders:
            probe = folder / f".pmu-write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as exc:
        _remove_empty(created)
        raise InputError(
            f"{what} {path} cannot be written: {exc.strerror or exc} ({exc.filename or p})", hint
        ) from None
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders (deepest first) that are still empty: a failed run leaves nothing."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}


def _describe(h: dict[str, Any]) -> str:
    if not h:
        return "a run that has not recorded itself yet"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h.get("started", 0)))
    return f"pid {h.get('pid')} on {h.get('host')} since {started} ({h.get('command', '?')})"


def _acquire(path: Path, out: str | os.PathLike) -> int:
    """An fd holding the flock of `path` (the file as it is now, not one being removed)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise InputError(
                f"{out} is being written by another run: {_describe(holder)}",
                f"wait for it to finish, or write to another --out (lock: {path})",
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # its holder finished and removed it after our open
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def writer_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold the writer lock of output `out` for the block (see the module docstring)."""
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, out)
    try:
        previous = _holder(fd)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            print(f"{out}: took over the lock of a run that is gone: {_describe(previous)}",
                  file=sys.stderr)  # fmt: skip
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join(sys.argv)[:300]}  # fmt: skip
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(me).encode())
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)


def _check_all(outputs: dict[str, str | os.PathLike | None]) -> list[Path]:
    """check_writable for every set output; the folders made, shallowest first (removed again
    when one output fails)."""
    created: list[Path] = []
    try:
        for flag, path in outputs.items():
            if path:
                created += check_writable(path, flag)
    except InputError:
        _remove_empty(_shallowest_first(created))
        raise
    return _shallowest_first(created)


def _shallowest_first(folders: list[Path]) -> list[Path]:
    return sorted(set(folders), key=lambda d: len(d.parts))


def check_outputs(outputs: dict[str, str | os.PathLike | None]) -> None:
    """Check every output ({flag: path}, unset ones skipped) can be written, and leave no
    folder behind: an early check, before the run claims them (`claim_outputs`)."""
    _remove_empty(_check_all(outputs))


@contextlib.contextmanager
def claim_outputs(
    outputs: dict[str, str | os.PathLike | None], lock: str | None = "--out"
) -> Iterator[None]:
    """Check every output ({flag: path}, unset ones skipped) can be written, then hold the
    writer lock of `outputs[lock]` for the block. Folders made for the check are removed
    again if the block fails and leaves them empty."""
    created = _check_all(outputs)
    primary = outputs.get(lock) if lock else None
    try:
        with writer_lock(primary) if primary else contextlib.nullcontext():
            yield
    except BaseException:
        _remove_empty(created)
        raise
