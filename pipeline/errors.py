"""Expected failures: a `UserError` says what is wrong and what to do about it.

The `pipeline` CLI prints one as `error: WHAT` (and `  WHAT TO DO`) and exits with its
`exit_code` (2: bad input or usage), without a traceback; `pipeline --debug` shows the
traceback. Anything else is a bug and keeps its traceback. No third-party imports here: every
module may raise these.
"""

from __future__ import annotations

import os
from pathlib import Path

EXIT_USAGE = 2  # bad input or parameters (Click uses 2 for usage errors too)


class UserError(Exception):
    """A failure the user can fix: `message` says what is wrong, `hint` what to do."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}; {hint}" if hint else message)

    def render(self) -> str:
        """`error: ...` plus an indented hint line: what the CLI prints."""
        return f"error: {self.message}" + (f"\n  {self.hint}" if self.hint else "")


def require_file(path: str | os.PathLike, what: str, hint: str, empty_ok: bool = False) -> Path:
    """`path` as a Path when it is a (non-empty) file, else a UserError naming `what` it is."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {str(p)!r} does not exist", hint)
    if not p.is_file():
        raise UserError(f"{what} {str(p)!r} is not a file", hint)
    if not empty_ok and p.stat().st_size == 0:
        raise UserError(f"{what} {str(p)!r} is empty", hint)
    return p


def require_dir(path: str | os.PathLike, what: str, hint: str) -> Path:
    """`path` as a Path when it is a directory, else a UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {str(p)!r} does not exist", hint)
    if not p.is_dir():
        raise UserError(f"{what} {str(p)!r} is not a folder", hint)
    return p


def require_path(path: str | os.PathLike, what: str, hint: str) -> Path:
    """`path` as a Path when it exists (file or folder), else a UserError."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {str(p)!r} does not exist", hint)
    return p
