"""Prompt Me Up labeling pipeline: image-caption pairs -> soft-labelled WebDataset shards.

Importing the package is light: the Typer app (`pipeline.app`, for `typer pipeline run ...`)
is loaded on first access, so `import trainer` or `import pipeline.label` pulls in no CLI.
"""

from pmu import __version__

__all__ = ["app", "__version__"]


def __getattr__(name: str):
    if name == "app":
        from pipeline.cli import app

        return app
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "app"])
