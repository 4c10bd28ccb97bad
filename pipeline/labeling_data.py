"""Inputs of detect-objects and label-objects: parquet readers and the DataLoader datasets."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from pipeline.clip_inputs import ClipInputSpec, jpeg_size_for_device, pil_to_chw, square_pil
from pipeline.images import (
    ImageRejected,
    cap_longest_side,
    decode_rgb,
    encode_jpeg,
    read_image_bytes,
)
from pmu.errors import InputError
from pmu.io import atomic_path

PAIRS_COLUMNS = ("id", "source", "image_path", "caption", "itm", "width", "height")
BOXES_METADATA_KEY = b"pmu_detect"
BOXES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("boxes", pa.list_(pa.list_(pa.float32(), 4))),
        ("classes", pa.list_(pa.string())),
        ("confs", pa.list_(pa.float32())),
        ("error", pa.string()),
    ]
)


def read_pairs(path: str | os.PathLike) -> dict[str, list]:
    """Columns of pairs.parquet as python lists (the contract in docs/architecture.md)."""
    table = pq.read_table(path)
    missing = [c for c in PAIRS_COLUMNS if c not in table.column_names]
    if missing:
        raise InputError(f"{path}: missing columns {missing} (see docs/architecture.md)")
    pairs = {c: table.column(c).to_pylist() for c in PAIRS_COLUMNS}
    if len(set(pairs["id"])) != len(pairs["id"]):
        raise InputError(f"{path}: sample ids are not unique")
    return pairs


def check_pairs_columns(path: str | os.PathLike) -> int:
    """Number of rows of pairs.parquet, after checking its columns (reads the footer only)."""
    pf = pq.ParquetFile(path)
    missing = [c for c in PAIRS_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise InputError(f"{path}: missing columns {missing} (see docs/architecture.md)")
    return pf.metadata.num_rows


class ParquetRows:
    """Rows [start, stop) of a parquet file as python dicts, decoding only the row groups they
    touch (the last one is cached: a worker labelling consecutive shards decodes it once)."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str] | None = None) -> None:
        self.path = str(path)
        self.columns = list(columns) if columns else None
        self._file = pq.ParquetFile(self.path)
        meta = self._file.metadata
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).tolist()
        self._cached: tuple[int, pa.Table] | None = None

    def __len__(self) -> int:
        return self.offsets[-1]

    def _group(self, g: int) -> pa.Table:
        if self._cached is None or self._cached[0] != g:
            self._cached = (g, self._file.read_row_group(g, columns=self.columns))
        return self._cached[1]

    def rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        stop = min(stop, len(self))
        for g in range(len(self.offsets) - 1):
            lo, hi = self.offsets[g], self.offsets[g + 1]
            if hi <= start or lo >= stop:
                continue
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            out.extend(self._group(g).slice(a, b - a).to_pylist())
        return out


def read_boxes(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(id -> row, detect metadata) from boxes.parquet."""
    table = pq.read_table(path)
    meta_raw = (table.schema.metadata or {}).get(BOXES_METADATA_KEY, b"{}")
    rows = {row["id"]: row for row in table.to_pylist()}
    return rows, json.loads(meta_raw)


def read_boxes_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The detect metadata (preset, detector, parameters) of boxes.parquet, from its footer."""
    meta = pq.ParquetFile(path).schema_arrow.metadata or {}
    return json.loads(meta.get(BOXES_METADATA_KEY, b"{}"))


def write_boxes(path: str | os.PathLike, rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """boxes.parquet, atomically, with the detector and parameters in the schema metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = BOXES_SCHEMA.with_metadata({BOXES_METADATA_KEY: json.dumps(meta, sort_keys=True)})
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def load_rgb(image_path: str, max_pixels: int) -> Image.Image:
    """Read and decode one image; raises ImageRejected with a reason."""
    return decode_rgb(read_image_bytes(image_path), max_pixels=max_pixels)


def as_list(items: list) -> list:
    """Identity collate: keep a batch as a list (module level so workers can use it)."""
    return items


class DecodeDataset(torch.utils.data.Dataset):
    """Image paths -> (index, BGR uint8 array or None, rejection reason or None), for YOLO."""

    def __init__(self, image_paths: Sequence[str], max_pixels: int) -> None:
        self.image_paths = list(image_paths)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            rgb = load_rgb(self.image_paths[i], self.max_pixels)
        except ImageRejected as e:
            return i, None, str(e)
        # ultralytics reads numpy input as OpenCV BGR.
        return i, np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1]), None


def padded_box(box: Sequence[float], width: int, height: int, padding: float) -> tuple[int, ...]:
    """Integer crop window: the box grown by `padding` x its size per side, clamped, >= 1 px."""
    x0, y0, x1, y1 = (float(v) for v in box)
    pw, ph = (x1 - x0) * padding, (y1 - y0) * padding
    left = min(max(int(np.floor(x0 - pw)), 0), width - 1)
    top = min(max(int(np.floor(y0 - ph)), 0), height - 1)
    right = max(min(int(np.ceil(x1 + pw)), width), left + 1)
    bottom = max(min(int(np.ceil(y1 + ph)), height), top + 1)
    return left, top, right, bottom


def normalised_boxes(
    boxes: Sequence[Sequence[float]], width: int, height: int
) -> list[list[float]]:
    """Pixel xyxy -> [0,1] xyxy w.r.t. the decoded image (clamped, rounded to 6 places)."""
    out = []
    for x0, y0, x1, y1 in boxes:
        nx0, nx1 = (min(max(v / width, 0.0), 1.0) for v in (x0, x1))
        ny0, ny1 = (min(max(v / height, 0.0), 1.0) for v in (y0, y1))
        out.append([round(nx0, 6), round(ny0, 6), round(max(nx0, nx1), 6), round(max(ny0, ny1), 6)])
    return out


@dataclass(frozen=True)
class LabelItemSpec:
    """What the label dataset needs per sample (plain values, cheap to send to workers)."""

    image_path: str
    boxes: list[list[float]]
    width: int
    height: int


SIZE_CHANGED = "image: size differs from detection"


def size_mismatch(spec: LabelItemSpec, width: int, height: int) -> dict[str, str] | None:
    """The rejection of an image whose decoded size is not the one its boxes were found in."""
    if spec.boxes and (width, height) != (spec.width, spec.height):
        return {
            "error": SIZE_CHANGED,
            "detail": f"{width}x{height} vs {spec.width}x{spec.height}",
        }
    return None


def clip_inputs_pil(
    img: Image.Image,
    windows: Sequence[tuple[int, ...]],
    clip_spec: ClipInputSpec,
    max_side: int,
    jpeg_quality: int,
) -> dict[str, Any]:
    """Whole image and crops as uint8 CLIP inputs, and the re-encoded shard jpg (PIL path)."""
    if windows:
        crops = torch.stack([pil_to_chw(square_pil(img.crop(w), clip_spec)) for w in windows])
    else:
        crops = torch.zeros((0, 3, clip_spec.size, clip_spec.size), dtype=torch.uint8)
    return {
        "image": pil_to_chw(square_pil(img, clip_spec)),
        "crops": crops,
        "jpg": encode_jpeg(cap_longest_side(img, max_side), jpeg_quality),
        "width": img.size[0],
        "height": img.size[1],
    }


class LabelDataset(torch.utils.data.Dataset):
    """Per sample: decode once, crop the boxes, make image and crops square uint8 CLIP inputs
    (`pipeline.clip_inputs`), re-encode the jpg. With `device_decode`, a JPEG the device decoder
    takes travels undecoded (its bytes and crop windows) and all of that happens on the device;
    other images take the PIL path here."""

    def __init__(
        self,
        specs: Sequence[LabelItemSpec],
        clip_spec: ClipInputSpec,
        crop_padding: float,
        max_side: int,
        jpeg_quality: int,
        max_pixels: int,
        device_decode: bool = False,
    ) -> None:
        self.specs = list(specs)
        self.clip_spec = clip_spec
        self.crop_padding = crop_padding
        self.max_side = max_side
        self.jpeg_quality = jpeg_quality
        self.max_pixels = max_pixels
        self.device_decode = device_decode

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        spec = self.specs[i]
        try:
            data = read_image_bytes(spec.image_path)
            if self.device_decode:
                size = jpeg_size_for_device(data)
                if size is not None and size[0] * size[1] <= self.max_pixels:
                    return self._undecoded(i, spec, data, *size)
            img = decode_rgb(data, max_pixels=self.max_pixels)
        except ImageRejected as e:
            return {"index": i, "error": e.reason, "detail": e.detail}
        width, height = img.size
        bad = size_mismatch(spec, width, height)
        if bad:
            return {"index": i, **bad}
        windows = [padded_box(b, width, height, self.crop_padding) for b in spec.boxes]
        item = clip_inputs_pil(img, windows, self.clip_spec, self.max_side, self.jpeg_quality)
        return {"index": i, "error": None, **item}

    def _undecoded(
        self, i: int, spec: LabelItemSpec, data: bytes, width: int, height: int
    ) -> dict[str, Any]:
        bad = size_mismatch(spec, width, height)
        if bad:
            return {"index": i, **bad}
        return {
            "index": i,
            "error": None,
            "jpeg": data,
            "windows": [padded_box(b, width, height, self.crop_padding) for b in spec.boxes],
            "width": width,
            "height": height,
        }


def collate_label_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, concatenate crops ACROSS images (uint8); rejected items travel as
    (index, reason, detail); undecoded JPEGs travel as their bytes (all of a batch's in one
    uint8 tensor, `jpeg` + `jpeg_sizes`: one shared-memory transfer and one pinned buffer per
    batch, not one per image; `batch_jpegs` splits it) and crop windows."""
    ok = [it for it in items if it["error"] is None]
    done = [it for it in ok if "jpeg" not in it]
    raw = [it["jpeg"] for it in ok if "jpeg" in it]
    batch: dict[str, Any] = {
        "rejected": [
            (it["index"], it["error"], it["detail"]) for it in items if it["error"] is not None
        ],
        "index": [it["index"] for it in ok],
        "n_crops": [len(it["windows"]) if "jpeg" in it else int(it["crops"].shape[0]) for it in ok],
        "jpg": [it.get("jpg") for it in ok],
        "size": [(it["width"], it["height"]) for it in ok],
        "undecoded": [j for j, it in enumerate(ok) if "jpeg" in it],
        "jpeg": torch.frombuffer(bytearray(b"".join(raw)), dtype=torch.uint8) if raw else None,
        "jpeg_sizes": [len(r) for r in raw],
        "windows": [it["windows"] for it in ok if "jpeg" in it],
    }
    if done:
        batch["images"] = torch.stack([it["image"] for it in done])
        batch["crops"] = torch.cat([it["crops"] for it in done])
    return batch


def batch_jpegs(batch: dict[str, Any]) -> list[torch.Tensor]:
    """The batch's undecoded JPEGs, one 1-D uint8 view of `batch["jpeg"]` each (no copy)."""
    flat, out, at = batch["jpeg"], [], 0
    for size in batch["jpeg_sizes"]:
        out.append(flat[at : at + size])
        at += size
    return out


def shard_batches(
    shard_ids: Sequence[int], n_samples: int, samples_per_shard: int, batch_size: int
) -> Iterator[list[int]]:
    """Index batches that never cross a shard boundary (so each shard is computed alone)."""
    for s in shard_ids:
        stop = min((s + 1) * samples_per_shard, n_samples)
        for start in range(s * samples_per_shard, stop, batch_size):
            yield list(range(start, min(start + batch_size, stop)))
