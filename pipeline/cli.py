"""Typer app: one thin command per stage. Heavy imports stay inside the commands."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="pipeline",
    help="Prompt Me Up labeling pipeline (image-caption pairs -> soft-labelled shards).",
    no_args_is_help=True,
    add_completion=False,
)


@app.command("presets")
def presets_cmd() -> None:
    """List the model presets and what each component loads."""
    from pipeline.models import PRESETS

    for preset in PRESETS.values():
        typer.echo(f"{preset.name}: {preset.to_dict()}")


@app.callback()
def main() -> None:
    """Prompt Me Up labeling pipeline. Every stage is also a DVC stage (see dvc.yaml)."""
