"""Prompt Me Up labeling pipeline: image-caption pairs -> soft-labelled WebDataset shards."""

__version__ = "0.1.0"

from pipeline.cli import app  # noqa: E402  (exposed for `typer pipeline run ...`)

__all__ = ["app", "__version__"]
