"""Typer commands generated from a stage's settings dataclass: every setting declared once.

A stage declares its settings as one dataclass whose fields carry their help text and option
details as metadata (`pmu.settings.opt`); a dataclass-typed field (e.g. the stage's recorded
parameters) contributes its own fields. `stage_command` turns the class into a Typer command:
one option per field (named after it, or as its `flags` say), its type from the annotation, its
default the field's, checked against `min` / `max` / `choices`. With `--params FILE` the
command reads its params.yaml groups (`groups`, e.g. `models` and `label`) for every option not
given on the command line, so dvc.yaml passes `--params params.yaml` instead of each value.
Adding a field to a settings class adds its option, with no other edit.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import typer

from pmu.errors import InputError
from pmu.outputs import claim_outputs
from pmu.settings import checked_value, field_type, type_name

GIVEN = (
    "COMMANDLINE",
    "ENVIRONMENT",
)  # option values the user gave, which params.yaml must not override
BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
              "false": False, "0": False, "no": False, "off": False}  # fmt: skip


def truthy(value: Any, name: str) -> bool:
    """A bool option given as a value (`--live true`, so DVC can pass `${group.flag}`)."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower()
    if word not in BOOL_WORDS:
        raise InputError(f"{name} expects true or false, got {value!r}", "pass true or false")
    return BOOL_WORDS[word]


def settings_fields(cls: type) -> Iterator[tuple[dataclasses.Field, type | None]]:
    """(field, the dataclass it belongs in when nested) of every option of `cls`, in order."""
    for f in dataclasses.fields(cls):
        nested = f.metadata.get("settings")
        if nested is not None:
            for inner, _ in settings_fields(nested):
                yield inner, nested
        elif f.metadata.get("help"):
            yield f, None


def option_name(f: dataclasses.Field) -> str:
    return "--" + f.name.replace("_", "-")


def _option(cls: type, f: dataclasses.Field) -> tuple[Any, Any]:
    """(annotation, typer.Option) of one settings field."""
    meta = f.metadata
    kind = type_name(f)
    flags = tuple(meta.get("flags") or (option_name(f),))
    common: dict[str, Any] = {"help": meta["help"], "show_default": meta.get("shown") or True}
    for bound in ("min", "max"):
        if meta.get(bound) is not None:
            common[bound] = meta[bound]
    required = bool(meta.get("required"))
    if meta.get("argument"):
        default = ... if required else f.default
        return field_type(cls, f), typer.Argument(
            default, help=meta["help"], metavar=f.name.upper()
        )
    if required:
        return field_type(cls, f), typer.Option(..., *flags, help=meta["help"])
    if kind == "list[str]":
        return list[str], typer.Option([], *flags, **common)
    if kind == "bool" and not meta.get("values"):
        if not meta.get("flags"):  # --name/--no-name, as Typer makes a bool option
            dashed = f.name.replace("_", "-")
            flags = (f"--{dashed}/--no-{dashed}",)
        return bool, typer.Option(f.default, *flags, **common)
    if kind == "bool" or meta.get("parse") or "None" in kind:
        # given as text: a bool word, a value with its own parser, or "" for unset
        shown = str(f.default).lower() if kind == "bool" else f.default
        default = "" if f.default is None else str(shown)
        return str, typer.Option(default, *flags, **common)
    return field_type(cls, f), typer.Option(f.default, *flags, **common)


def convert(f: dataclasses.Field, value: Any, cls: type) -> Any:
    """A command-line or params.yaml value as the field's type (text parsed, "" is unset)."""
    meta, kind = f.metadata, type_name(f)
    name = option_name(f)
    if meta.get("parse") and value is not None and not isinstance(value, bool):
        return meta["parse"](value, name)
    if kind == "bool":
        return truthy(value, name)
    if kind == "list[str]":
        return list(value or [])
    if "None" in kind and (value is None or value == ""):
        return None
    if "None" in kind and isinstance(value, str):
        try:
            return field_type(cls, f)(value)
        except ValueError:
            raise InputError(f"{name} {value!r} is not a {kind}", "") from None
    if meta.get("choices") and value not in meta["choices"]:
        raise InputError(
            f"{name} {value!r} is not one of {', '.join(meta['choices'])}",
            f"use {name} with one of: {', '.join(meta['choices'])}",
        )
    return value


def params_defaults(
    path: str, groups: Sequence[str], fields: dict[str, dataclasses.Field]
) -> dict[str, Any]:
    """The values a params file's groups give for these settings, type-checked (later groups
    win; the `models` group lends only the fields the stage has, the others must be known)."""
    import yaml

    from pmu.errors import require_file

    file = require_file(path, "--params file", "pass params.yaml, or leave it out")
    try:
        doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{file} is not readable YAML ({exc})", "fix the file") from None
    values: dict[str, Any] = {}
    for group in groups:
        items = doc.get(group) or {}
        if not isinstance(items, dict):
            raise InputError(f"{file}: `{group}:` is not a group of settings", "fix the file")
        unknown = sorted(set(items) - set(fields)) if group != "models" else []
        if unknown:
            raise InputError(f"{file}: unknown `{group}` settings {unknown}", "fix the file")
        source = f"{file} `{group}:`"
        values.update(
            {k: checked_value(fields[k], v, source) for k, v in items.items() if k in fields}
        )
    return values


def build_settings(cls: type, given: dict[str, Any]) -> Any:
    """The settings object (nested settings built from their own fields)."""
    values: dict[str, Any] = {}
    nested: dict[type, dict[str, Any]] = {}
    for f, owner in settings_fields(cls):
        if f.name in given:
            (nested.setdefault(owner, {}) if owner else values)[f.name] = given[f.name]
    for f in dataclasses.fields(cls):
        sub = f.metadata.get("settings")
        if sub is not None:
            values[f.name] = sub(**nested.get(sub, {}))
    return cls(**values)


REGISTERED: dict[str, tuple[type, tuple[str, ...]]] = {}  # command -> (settings, params groups)


def stage_command(
    app: typer.Typer, name: str, cls: type, groups: Sequence[str] = ()
) -> Callable[[Callable[[Any], None]], Callable[[Any], None]]:
    """Register `body(settings)` as the command `name`, its options generated from `cls`."""

    def register(body: Callable[[Any], None]) -> Callable[[Any], None]:
        REGISTERED[name] = (cls, tuple(groups))
        fields = list(settings_fields(cls))
        by_name = {f.name: (f, owner) for f, owner in fields}
        parameters = [
            inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
        ]
        for f, owner in fields:
            annotation, default = _option(owner or cls, f)
            parameters.append(
                inspect.Parameter(
                    f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
                )
            )
        if groups:
            params_help = (
                f"A params file whose {' and '.join(f'`{g}:`' for g in groups)} group(s) set "
                "every option not given here (dvc.yaml passes params.yaml)."
            )
            parameters.append(
                inspect.Parameter(
                    "params",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=typer.Option("", "--params", help=params_help),
                    annotation=str,
                )
            )

        def command(ctx: typer.Context, **values: Any) -> None:
            from_file = values.pop("params", "")
            if from_file:
                # typer vendors its own click: compare the source by name
                explicit = {
                    k for k in values if getattr(ctx.get_parameter_source(k), "name", "") in GIVEN
                }
                fields_by_name = {k: f for k, (f, _) in by_name.items()}
                for key, value in params_defaults(from_file, groups, fields_by_name).items():
                    if key not in explicit:
                        values[key] = value
            given = {
                k: convert(*by_name[k][:1], v, by_name[k][1] or cls) for k, v in values.items()
            }
            settings = build_settings(cls, given)
            with claim_outputs(stage_outputs(settings)):
                body(settings)

        command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        command.__doc__ = body.__doc__
        command.__name__ = body.__name__
        app.command(name)(command)
        return body

    return register


def stage_outputs(settings: Any) -> dict[str, Any]:
    """{flag: path} of what a stage writes: its `out` (the one locked) and the fields marked
    `output=True`, nested settings included."""
    outputs = {"--out": getattr(settings, "out", None)}
    for f, owner in settings_fields(type(settings)):
        if f.metadata.get("output"):
            holder = settings
            if owner is not None:
                holder = next(getattr(settings, g.name) for g in dataclasses.fields(settings)
                              if g.metadata.get("settings") is owner)  # fmt: skip
            outputs[option_name(f)] = getattr(holder, f.name)
    return outputs


def ensure_parent(path: str | Path) -> None:
    """An output's folder exists (created) before a stage writes into it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
