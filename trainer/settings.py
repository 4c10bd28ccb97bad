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
from pmu.settings import (
    check_types,
    describe_source,
    field_type,
    find_params,
    load_group,
    relative_to_cwd,
    type_name,
)


def project_defaults(
    cls: type,
    group: str,
    params_flag: str | None,
    subgroup: str | None = None,
    path_fields: Iterable[str] = (),
) -> tuple[Any, dict[str, Any]]:
    """(the params file used, the defaults its `group:` (and `group: subgroup:`) gives `cls`),
    type-checked, with project-relative paths made relative to the current folder."""
    params = find_params(params_flag)
    if params is None:
        return None, {}
    names = {f.name for f in dataclasses.fields(cls)}
    defaults = load_group(params, group, names, subgroup=subgroup)
    defaults = check_types(cls, defaults, f"{params} `{group}:`")
    for name in path_fields:
        if name in defaults:
            defaults[name] = relative_to_cwd(defaults[name], params.parent)
    return params, defaults


def script_parser(prog: str, description: str, params: Any, source: str) -> argparse.ArgumentParser:
    """A trainer script's parser with the flags every one has: --params, --force, --debug."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, epilog=describe_source(params, source)
    )
    parser.add_argument(
        "--params",
        metavar="FILE",
        help=f"YAML whose {source} sets the defaults; `none` for the code defaults (default: "
        f"params.yaml here or in a parent folder: {params or 'none found'})",
    )
    parser.add_argument(
        "--force", action="store_true", help="allow writing DVC-tracked outputs outside dvc repro"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of input errors too")
    return parser


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


def run_main(body: Callable[[], Any], debug: bool) -> int:
    """Run a script body: an InputError prints `error: ...` (no traceback) and returns 2;
    `--debug` shows its traceback too. Anything else is a bug and raises."""
    try:
        body()
    except InputError as e:
        if debug:
            traceback.print_exc()
        print(e.render(), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
