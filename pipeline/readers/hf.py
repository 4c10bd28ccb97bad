"""Reader for Hugging Face `datasets`: a `save_to_disk` folder (offline) or a hub dataset name.

Rows are streamed (`to_iterable_dataset()` over the memory-mapped Arrow files, or
`load_dataset(..., streaming=True)` for a hub name), so memory does not grow with the dataset.
Columns are chosen with the table options (`--image-col`, `--caption-col`, `--id-col`,
`--itm-col`) and follow the same rules (`pipeline.readers.rows`). The image column may be:

- an `Image` feature (read undecoded) or a binary column: the bytes are written once to a
  content-addressed store, `IMAGE_STORE/ab/abcdef….ext` (sha256 of the bytes; the extension from
  the file's magic number), because every later stage reads images by path. Prepare puts the
  store at `OUT/images` (inside its output folder, so DVC tracks it with pairs.parquet);
- an `Image` value without bytes, or a text column: a path, resolved against `--image-root`
  (default: the saved dataset's folder; for a hub name, the working directory) and refused when
  it leaves that root, as for tables.
Undecodable bytes are stored as well and rejected by prepare's image check like any bad file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.readers.records import RawRecord, image_under_root
from pipeline.readers.rows import Columns, field_value, path_field, require_columns, row_record
from pmu.errors import InputError
from pmu.io import atomic_path

SOURCE = "hf"
MAGIC = (
    (b"\xff\xd8\xff", "jpg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)
SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
HINT = "pass a folder saved with Dataset.save_to_disk, or a hub dataset name, with --input"


def image_extension(data: bytes) -> str:
    for magic, ext in MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "img"


def store_image(data: bytes, store: str | os.PathLike) -> str:
    """Write `data` under its sha256 (once; atomically) and return the file's path."""
    digest = hashlib.sha256(data).hexdigest()
    path = Path(store) / digest[:2] / f"{digest}.{image_extension(data)}"
    if not (path.is_file() and path.stat().st_size == len(data)):
        with atomic_path(path, suffix=f".{os.getpid()}.tmp") as tmp:  # workers may race
            tmp.write_bytes(data)
    return str(path)


def _datasets():
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - depends on the installed packages
        raise InputError(
            "--source hf needs the `datasets` package", "pip install datasets (see pyproject.toml)"
        ) from exc
    return datasets


def _choose_split(splits: list[str], split: str | None, where: str) -> str:
    if split is not None:
        if split not in splits:
            raise InputError(f"{where} has no split {split!r}", f"use --split with one of {splits}")
        return split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise InputError(f"{where} has the splits {splits}", "choose one with --split")


def _open_saved(folder: Path, split: str | None) -> tuple[Any, str]:
    """(iterable dataset, name) of a save_to_disk folder (Dataset or DatasetDict)."""
    datasets = _datasets()
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:  # noqa: BLE001 (datasets raises several types for a bad folder)
        raise InputError(f"{folder} cannot be loaded with load_from_disk ({exc})", HINT) from exc
    if isinstance(loaded, datasets.DatasetDict):
        loaded = loaded[_choose_split(list(loaded), split, str(folder))]
    elif split is not None:
        raise InputError(f"{folder} is a single dataset without splits", "leave out --split")
    return loaded.to_iterable_dataset(), folder.resolve().name


def _open_hub(name: str, split: str | None) -> tuple[Any, str]:
    datasets = _datasets()
    from pipeline.models import hub_unreachable, hub_url

    offline = os.environ.get("HF_DATASETS_OFFLINE", "") not in ("", "0") or os.environ.get(
        "HF_HUB_OFFLINE", ""
    ) not in ("", "0")
    reason = "the offline switches are set" if offline else hub_unreachable(hub_url())
    if reason:
        raise InputError(
            f"{name!r} is not a local folder, and the hub cannot be used ({reason})",
            "pass a folder saved with save_to_disk (or unset HF_DATASETS_OFFLINE / HF_HUB_OFFLINE "
            "on a machine with internet)",
        )
    try:
        if split is None:
            splits = list(datasets.get_dataset_split_names(name))
            split = _choose_split(splits, None, name)
        loaded = datasets.load_dataset(name, split=split, streaming=True)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot open hub dataset {name!r} ({exc})", HINT) from exc
    return loaded, name.replace("/", "_")


def open_hf(
    input_path: str,
    columns: Columns | None,
    image_root: str | os.PathLike | None,
    split: str | None,
    image_store: str | os.PathLike,
    allow_outside_root: bool = False,
) -> Iterator[RawRecord]:
    """Open the dataset and check its columns now (a `InputError` names the columns there are);
    return the iterator of its records. Images held as bytes are written to `image_store`."""
    cols = columns or Columns()
    local = Path(input_path)
    if local.is_dir():
        if not any((local / m).is_file() for m in SAVED_MARKERS):
            raise InputError(
                f"{local} is not a folder saved with save_to_disk (no dataset_info.json)",
                "save it with Dataset.save_to_disk, or use --source table for files",
            )
        dataset, name = _open_saved(local, split)
        root = Path(image_root) if image_root is not None else local
    elif local.exists():
        raise InputError(f"{local} is a file, not a dataset folder", HINT)
    else:
        dataset, name = _open_hub(str(input_path), split)
        root = Path(image_root) if image_root is not None else Path(".")
    features = dataset.features
    if features is not None:
        images = [c for c, f in features.items() if type(f).__name__ == "Image"]
        note = f"; Image features: {images}" if images else ""
        require_columns(list(features), cols, input_path, note)
        feature = features[cols.image]
        if type(feature).__name__ == "Image" and getattr(feature, "decode", False):
            dataset = dataset.cast_column(cols.image, _datasets().Image(decode=False))
    return _records(dataset, cols, name, root, Path(image_store), allow_outside_root)


def _image(
    value: Any, root: Path, store: Path, allow_outside: bool
) -> tuple[str | None, str | None]:
    """(path, problem) of one image cell: stored bytes, or a path under the root."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return store_image(bytes(value["bytes"]), store), None
        value = value.get("path")
    if isinstance(value, bytes | bytearray):
        return store_image(bytes(value), store), None
    if value is not None and not isinstance(value, str):
        return None, f"hf: image is not an Image, bytes or a path ({type(value).__name__})"
    path, problem = path_field(field_value({"v": value}, "v"), SOURCE)
    if path is None:
        return None, problem
    return image_under_root(path, root, allow_outside)


def _records(
    dataset: Any, cols: Columns, name: str, root: Path, store: Path, allow_outside: bool
) -> Iterator[RawRecord]:
    for n, row in enumerate(dataset):
        image, problem = _image(row.get(cols.image), root, store, allow_outside)
        yield row_record(row, cols, f"{name}-{n:08d}", SOURCE, image, problem, SOURCE)
