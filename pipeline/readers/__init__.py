"""Input readers: one module per format, each yielding `RawRecord`s and never raising per record.

Whole-input problems (a missing file, an unknown source or format) raise `InputError` when the
reader is created, before any output exists; bad records come back with a `problem`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pmu.errors import InputError, require_dir, require_file, require_path

SOURCES = ("sample", "newsclippings", "table", "wds", "hf", "world")


def read_source(
    source: str,
    input_path: str | None = None,
    image_root: str | None = None,
    visualnews_data: str | None = None,
    columns=None,
    *,
    allow_outside_root: bool = False,
    split: str | None = None,
    image_store: str | os.PathLike | None = None,
):
    """The record iterator for one source name (`sample`, `newsclippings`, `table`, `wds`,
    `hf`, `world`), after checking that its inputs exist (`InputError` otherwise).

    `allow_outside_root` lets image paths leave the image root; `split` and `image_store` (where
    images held as bytes are written) are for `hf`.
    """
    if source not in SOURCES:
        raise InputError(f"unknown source {source!r}", f"use --source with one of {SOURCES}")
    if image_root is not None:
        require_dir(image_root, "--image-root", "pass the folder the image paths are relative to")
    if source == "sample":
        from pipeline.readers.sample import read_sample

        if input_path is not None:
            require_file(
                Path(input_path) / "captions.jsonl",
                "sample captions",
                "--input must be a folder with captions.jsonl and images/ (or leave it out)",
            )
        return read_sample(input_path, allow_outside_root)
    if input_path is None:
        raise InputError(f"--input is required for source {source!r}", INPUT_HINTS[source])
    if source == "hf":
        from pipeline.readers.hf import open_hf

        if image_store is None:
            raise ValueError("source 'hf' needs an image_store folder for images held as bytes")
        return open_hf(input_path, columns, image_root, split, image_store, allow_outside_root)
    require_path(input_path, "--input", INPUT_HINTS[source])
    if source == "world":
        from pipeline.readers.world import read_world

        return read_world(input_path, allow_outside_root)
    if source == "newsclippings":
        from pipeline.readers.newsclippings import read_newsclippings

        require_file(input_path, "--input", INPUT_HINTS[source])
        if visualnews_data is None:
            raise InputError(
                "source 'newsclippings' needs --visualnews-data", "pass VisualNews' data.json"
            )
        require_file(visualnews_data, "--visualnews-data", "pass VisualNews' data.json")
        return read_newsclippings(input_path, visualnews_data, image_root, allow_outside_root)
    if source == "table":
        from pipeline.readers.tabular import read_table, table_format

        require_file(input_path, "--input", INPUT_HINTS[source])
        table_format(input_path)
        return read_table(input_path, columns, image_root, allow_outside_root=allow_outside_root)
    from pipeline.readers.webdataset_tars import read_wds, tar_files

    if not tar_files(input_path):
        raise InputError(f"no *.tar files in {input_path}", INPUT_HINTS[source])
    return read_wds(input_path)


INPUT_HINTS = {
    "newsclippings": "pass a NewsCLIPpings annotation JSON with --input",
    "table": "pass a .parquet, .csv or .jsonl table with --input",
    "wds": "pass a WebDataset .tar or a folder of them with --input",
    "hf": "pass a folder saved with Dataset.save_to_disk, or a hub dataset name, with --input",
    "world": "pass a folder made by `pipeline synth-world` (or one of its split folders)",
}
