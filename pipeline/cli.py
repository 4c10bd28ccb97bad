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


@app.command("inspect")
def inspect_cmd(
    shard_dir: str = typer.Argument(..., help="Folder with shard-*.tar, manifest.json, vocabs."),
    out: str = typer.Option("reports/labels.html", help="The self-contained HTML report to write."),
    samples: int = typer.Option(48, min=0, help="Samples shown as cards (seeded reservoir)."),
    seed: int = typer.Option(0, help="Seed of the sample choice."),
) -> None:
    """Write an HTML report of crops, soft labels and label statistics for judging by eye."""
    from pipeline.report import build_report

    summary = build_report(shard_dir, out, samples=samples, seed=seed)
    typer.echo(
        f"inspect: {summary['out']} ({summary['bytes'] / 1e6:.1f} MB): {summary['sampled']} of "
        f"{summary['samples']} samples shown, {summary['objects']} objects, "
        f"{summary['images_without_detections']} images without detections, "
        f"{summary['rejected']} rejected, {summary['unreadable']} unreadable"
    )
    typer.echo(
        f"  mean entropy q_ent {summary['mean_entropy_ent']} / q_rel {summary['mean_entropy_rel']} "
        f"nats; mean kept mass q_ent {summary['mean_kept_mass_ent']} / "
        f"q_rel {summary['mean_kept_mass_rel']}"
    )
    for warning in summary["warnings"]:
        typer.echo(f"  warning: {warning}")


@app.callback()
def main() -> None:
    """Prompt Me Up labeling pipeline. Every stage is also a DVC stage (see dvc.yaml)."""
