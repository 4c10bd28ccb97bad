"""The one error type of bad input: `InputError` says what is wrong and what to do about it.

Every stage raises it at its own checks (a missing file, an empty input, a value that cannot
work, a refused resume). The command lines catch this type only: they print `error: WHAT` (and
`  WHAT TO DO`) and exit 2 (`--debug` shows the traceback). Any other exception is a bug and
keeps its traceback and a non-zero exit. No third-party imports here: every module may raise it.
"""

from __future__ import annotations

import os
from pathlib import Path

EXIT_USAGE = 2  # bad input or parameters (Click uses 2 for usage errors too)


class InputError(Exception):
    """A failure the user can fix: `message` says what is wrong, `hint` what to do."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}; {hint}" if hint else message)

    def render(self) -> str:
        """`error: ...` plus an indented hint line: what the command lines print."""
        return f"error: {self.message}" + (f"\n  {self.hint}" if self.hint else "")


def require_path(
    path: str | os.PathLike, what: str, hint: str, kind: str = "any", empty_ok: bool = True
) -> Path:
    """`path` as a Path when it exists (`kind`: any, file or dir; a file must be non-empty
    unless `empty_ok`), else an InputError naming `what` it is."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} {str(p)!r} does not exist", hint)
    if kind == "file" and not p.is_file():
        raise InputError(f"{what} {str(p)!r} is not a file", hint)
    if kind == "dir" and not p.is_dir():
        raise InputError(f"{what} {str(p)!r} is not a folder", hint)
    if kind == "file" and not empty_ok and p.stat().st_size == 0:
        raise InputError(f"{what} {str(p)!r} is empty", hint)
    return p


def require_file(path: str | os.PathLike, what: str, hint: str, empty_ok: bool = False) -> Path:
    """`path` as a Path when it is a (non-empty) file, else an InputError."""
    return require_path(path, what, hint, "file", empty_ok)


def require_dir(path: str | os.PathLike, what: str, hint: str) -> Path:
    """`path` as a Path when it is a folder, else an InputError."""
    return require_path(path, what, hint, "dir")
