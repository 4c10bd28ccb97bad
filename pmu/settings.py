"""Settings declared once: a dataclass field per setting, with its default and help text.

A stage's or trainer's settings are one dataclass whose fields carry their --help text as
metadata (`opt`); the command lines are generated from them (`pipeline/command.py` for the
Typer app, `trainer/settings.py` for the trainer scripts), and params.yaml's group of the same
name gives their project defaults (`load_group`, `check_types`). Light on purpose (stdlib +
yaml): `--help` and argument errors answer before torch loads.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pmu.errors import InputError

PARAMS_FILE = "params.yaml"
DVC_FILE = "dvc.yaml"


def opt(
    default: Any,
    help: str,  # noqa: A002
    shown: str | None = None,
    **cli: Any,
) -> Any:
    """A settings field with its --help text (`shown`: how --help names an unset default).

    `cli` tunes the generated option: `flags` (its names, e.g. ("--quick",)), `min` / `max`
    (bounds), `choices`, `values=True` (a bool taking true|false, for DVC), `argument=True`
    (positional), `recorded=False` (not among the parameters an output records), `output=True`
    (a path the stage writes: checked before any work, like `out`)."""
    return dataclasses.field(default=default, metadata={"help": help, "shown": shown, **cli})


FIELD_TYPES: dict[str, Callable[[str], Any]] = {
    "int": int,
    "float": float,
    "str": str,
    "bool": bool,
    "int | None": int,
    "float | None": float,
    "str | None": str,
}


def type_name(f: dataclasses.Field) -> str:
    """A field's annotation as text (`int`, `str | None`, ...), written as a string or not."""
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def field_type(cls: type, f: dataclasses.Field) -> Callable[[str], Any]:
    """The Python type of a settings field."""
    kind = FIELD_TYPES.get(type_name(f))
    if kind is None:
        raise TypeError(f"{cls.__name__}.{f.name}: no option type for {f.type}")
    return kind


def settings_dict(obj: Any) -> dict[str, Any]:
    """`dataclasses.asdict`, less the fields marked `omit_default` while they hold their default:
    a setting added later leaves what older runs recorded (and its bytes) as it was."""
    out = dataclasses.asdict(obj)
    for f in dataclasses.fields(obj):
        if f.metadata.get("omit_default") and out.get(f.name) == f.default:
            out.pop(f.name)
    return out


def recorded(settings: Any) -> dict[str, Any]:
    """The fields an output records (those not marked `recorded=False`), as a dict."""
    return {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if f.metadata.get("recorded", True)
    }


# ------------------------------------------------------------------------------ params.yaml


def project_root(start: Path | None = None) -> Path | None:
    """The nearest folder, from the current directory up, holding params.yaml or dvc.yaml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PARAMS_FILE).is_file() or (folder / DVC_FILE).is_file():
            return folder
    return None


def find_params(explicit: str | None) -> Path | None:
    """`--params FILE` (or `none`), else the project's params.yaml, else None."""
    if explicit is not None:
        if explicit.lower() in ("", "none"):
            return None
        path = Path(explicit)
        if not path.is_file():
            raise InputError(f"--params {explicit}: no such file")
        return path
    root = project_root()
    if root is not None and (root / PARAMS_FILE).is_file():
        return root / PARAMS_FILE
    return None


def load_group(
    path: Path, group: str, known: Iterable[str], subgroup: str | None = None
) -> dict[str, Any]:
    """params.yaml's `group:` (plus `group: subgroup:` over it), checked against `known` keys.

    Relative paths of a params file found in a parent folder are the project's, so path
    values (PATH_FIELDS of the caller) are resolved by the caller with `relative_to_cwd`."""
    import yaml

    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    values = dict(params.get(group) or {})
    nested = {k: v for k, v in values.items() if isinstance(v, dict)}
    values = {k: v for k, v in values.items() if not isinstance(v, dict)}
    if subgroup is not None:
        values.update(nested.get(subgroup) or {})
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"{path}: unknown `{group}` parameters {unknown}")
    return values


def relative_to_cwd(value: str | None, base: Path) -> str | None:
    """A project-relative path from params.yaml as a path from the current directory."""
    if not value or Path(value).is_absolute() or base.resolve() == Path.cwd().resolve():
        return value
    return os.path.relpath(base / value)


def checked_value(f: dataclasses.Field, value: Any, source: str) -> Any:
    """A value from a params file for this field, checked against its type (ints widen to
    floats, "" is unset where the field allows it); a field with its own parser takes text or
    a number."""
    kind = type_name(f)
    if f.metadata.get("parse"):
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
    elif value is None or value == "":
        ok = "None" in kind or kind == "str"
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind.startswith("int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind.startswith("float"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise InputError(f"{source}: {f.name} = {value!r} is not a {kind}", "fix the value")
    return None if value == "" and "None" in kind else value


def check_types(cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Values from a params file, checked against the field types of `cls`."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    return {name: checked_value(by_name[name], value, source) for name, value in values.items()}


def config_values(args: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The flags that were given (not None), restricted to `cls`'s fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in args.items() if k in names and v is not None}


def changed_defaults(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The values (from a params file) that differ from `cls`'s code defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in defaults and v != defaults[k]}


def describe_source(
    params: Path | None, groups: str, changed: Mapping[str, Any] | None = None
) -> str:
    """The line a script prints first: where its defaults came from. `changed`: the values the
    params file sets that differ from the code defaults (None: not known yet, as in --help)."""
    if params is None:
        return f"settings: code defaults (no {PARAMS_FILE} here or above); flags override"
    if changed is None:
        return f"settings: defaults from {params} ({groups}); flags override"
    if not changed:
        return f"settings: read {params} ({groups}): it sets only code defaults; flags override"
    listed = ", ".join(f"{k}={v}" for k, v in changed.items())
    return (
        f"settings: values from {params} ({groups}) in use, not the code defaults: {listed}; "
        "flags override (--params none: code defaults only)"
    )


# ------------------------------------------------------------------------------ DVC outputs


def dvc_outputs(root: Path) -> dict[Path, str]:
    """{resolved output path: stage} for every out, metric and plot of root/dvc.yaml."""
    import yaml

    path = root / DVC_FILE
    if not path.is_file():
        return {}
    try:
        stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except yaml.YAMLError:
        return {}
    found: dict[Path, str] = {}
    for name, stage in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for entry in (stage or {}).get(kind) or []:
                target = next(iter(entry)) if isinstance(entry, dict) else entry
                if isinstance(target, str) and "${" not in target:
                    found[(root / target).resolve()] = name
    return found


def refuse_dvc_outputs(outputs: Mapping[str, str | None], force: bool) -> None:
    """Refuse to write a DVC-tracked output outside `dvc repro` (it would make the pipeline
    stale): `outputs` maps a flag to the path it writes. `--force` or a DVC run allow it."""
    if force or os.environ.get("DVC_STAGE"):
        return
    root = project_root()
    tracked = dvc_outputs(root) if root is not None else {}
    for flag, value in outputs.items():
        if not value:
            continue
        target = Path(value).resolve()
        for out, stage in tracked.items():
            if target == out or out in target.parents or target in out.parents:
                raise InputError(
                    f"{flag} {value} would overwrite {os.path.relpath(out)}, an output of the "
                    f"DVC stage `{stage}` (the pipeline would go stale).\n"
                    f"Run `dvc repro {stage}`, write elsewhere (the default is runs/), "
                    "or add --force."
                )
