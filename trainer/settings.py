"""The trainer scripts' command lines: one argparse flag per settings field (`pmu.settings`),
and the runner that turns input errors into one line and exit 2.

Light on purpose (stdlib + yaml): `--help` and argument errors answer before torch loads.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pmu.errors import InputError
from pmu.settings import field_type, type_name


def add_config_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    defaults: Mapping[str, Any],
    skip: Iterable[str] = (),
) -> None:
    """One flag per dataclass field of `cls`, with its help text and current default."""
    skip = set(skip)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.metadata.get("help"):
            continue
        flag = "--" + f.name.replace("_", "-")
        default = defaults.get(f.name, f.default)
        shown = default
        if default is None or default == "":
            shown = f.metadata.get("shown") or "unset"
        help_text = f"{f.metadata['help']} (default: {shown})"
        if type_name(f) == "bool":
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        kind = field_type(cls, f)
        metavar = {int: "N", float: "X"}.get(kind, "VALUE")
        parser.add_argument(flag, type=kind, default=None, metavar=metavar, help=help_text)


# ------------------------------------------------------------------------------ running


def run_main(
    body: Callable[[], Any], debug: bool, expected: tuple[type[BaseException], ...] = ()
) -> int:
    """Run a script body: expected failures print `error: ...` (no traceback) and return 2;
    `--debug` shows the traceback of those too. Anything else is a bug and raises."""
    try:
        body()
    except (InputError, *expected) as e:
        if debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        if not debug and not isinstance(e, InputError):
            print("(--debug shows the traceback)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
