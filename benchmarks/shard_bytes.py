"""The exact bytes detect-objects and label-objects write, to compare two checkouts (or two
versions of the hot loops) on CPU: sha256 of boxes.parquet and of every shard tar member.

    python benchmarks/shard_bytes.py --out before.json            # on the old code
    python benchmarks/shard_bytes.py --out after.json --compare before.json

Inputs: the label benchmark's re-encoded sample JPEGs (longest sides 224-1024, qualities 80-95)
plus the odd files the device path hands back to PIL (a PNG, a progressive JPEG, an EXIF-rotated
JPEG, a grayscale JPEG) and one file truncated after prepare (a label-stage rejection). Every
fifth pair gets no boxes. detect-objects runs with 0 and 1 DataLoader workers, label-objects
with `--decode workers` and `--decode device`, each with 0 and 2 workers, several shards, image
and crop batches that do not divide them. Tiny preset by default (`--preset base-random`: the
benchmark's base architectures with random weights, slower). Run both sides at the same torch
thread count (`--threads`, default 2). `--device cuda` runs both stages on the GPU: compare two
runs there for run-to-run identity (CUDA bytes differ from CPU bytes by design).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # label_throughput's inputs

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "YOLO_OFFLINE"):
    os.environ.setdefault(_var, "1")


def _odd_images(folder: Path, base: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Files the device decoder does not take (PIL path), made from the first sample image."""
    from PIL import Image

    src, caption = base[0]
    with Image.open(src) as im:
        img = im.convert("RGB")
    img = img.resize((img.width // 2 or 1, img.height // 2 or 1))
    out = []
    png = folder / "odd-png.png"
    img.save(png, format="PNG")
    out.append((str(png), caption + " (png)"))
    prog = folder / "odd-progressive.jpg"
    img.save(prog, format="JPEG", quality=85, progressive=True)
    out.append((str(prog), caption + " (progressive)"))
    rot = folder / "odd-rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    img.save(rot, format="JPEG", quality=90, exif=exif.tobytes())
    out.append((str(rot), caption + " (rotated)"))
    gray = folder / "odd-gray.jpg"
    img.convert("L").save(gray, format="JPEG", quality=90)
    out.append((str(gray), caption + " (gray)"))
    return out


ENTITY_WORDS = (
    "man woman child dog cat horse bird car bus truck boat bicycle tree house street city "
    "flag ball table chair phone book bottle cup food beach mountain river sky road train "
    "plane shirt hat player crowd stage building bridge window door"
).split()


def build(root: Path, n: int, preset: str) -> dict[str, Path]:
    """pairs.parquet, vocabularies and prompts under `root` (one file truncated after prepare)."""
    import io
    from contextlib import redirect_stderr

    import label_throughput as bench

    from pipeline.prepare import prepare
    from pipeline.prompts import embed_prompts
    from pipeline.readers.records import RawRecord
    from pipeline.relations import fetch_relations
    from pmu.io import write_json_atomic

    items = bench.write_images(root / "images", n)
    items[3:3] = _odd_images(root / "images", bench.sample_pairs())
    records = [
        RawRecord(id=f"bytes-{i:05d}", source="bytes", image_path=path, caption=caption)
        for i, (path, caption) in enumerate(items)
    ]
    result = prepare(records, root / "prepared", negatives=True, progress=False)
    assert not result.rejected, result.rejected[:3]
    truncated = Path(items[-2][0])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    vocab = root / "vocab"
    ent, rel, prompts = (
        vocab / "entities.json",
        vocab / "relations.json",
        vocab / "prompts.safetensors",
    )
    write_json_atomic(
        ent, {"source": "bytes", "entities": [{"name": w, "count": 1} for w in ENTITY_WORDS]}
    )
    with redirect_stderr(io.StringIO()):
        fetch_relations(rel, l=24)
    embed_prompts(ent, rel, prompts, preset=preset)
    return {
        "root": root,
        "pairs": root / "prepared" / "pairs.parquet",
        "rejected": root / "prepared" / "rejected.jsonl",
        "entities": ent,
        "relations": rel,
        "prompts": prompts,
    }


def _without_some_boxes(src: Path, dst: Path) -> Path:
    """boxes.parquet with every fifth row's boxes removed (images without objects)."""
    import pyarrow.parquet as pq

    from pipeline.labeling_data import read_boxes_meta, write_boxes

    rows = pq.read_table(src).to_pylist()
    for i, row in enumerate(rows):
        if i % 5 == 0 and not row["error"]:
            row.update(boxes=[], classes=[], confs=[])
    write_boxes(dst, rows, read_boxes_meta(src))
    return dst


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_digest(folder: Path) -> dict[str, Any]:
    """sha256 of every file; for shard tars, of the whole tar and of every member."""
    out: dict[str, Any] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        entry: dict[str, Any] = {"sha256": sha(path.read_bytes())}
        if path.suffix == ".tar":
            with tarfile.open(path, "r:") as tar:
                entry["members"] = {m.name: sha(tar.extractfile(m).read()) for m in tar}
        out[path.name] = entry
    return out


def run(root: Path, preset: str, threads: int, device: str = "cpu") -> dict[str, Any]:
    from pipeline.detect import detect_objects
    from pipeline.label import label_objects
    from pipeline.settings import DetectParams, DetectSettings, LabelParams, LabelSettings

    ws = build(root, 22, preset)
    digests: dict[str, Any] = {}
    boxes = {}
    for workers in (0, 1):
        out = root / "objects" / f"boxes-w{workers}.parquet"
        params = DetectParams(imgsz=320, conf=0.0, top_k=4, batch_size=6, num_workers=workers)
        detect_objects(
            DetectSettings(
                pairs=str(ws["pairs"]), out=str(out), preset=preset, device=device, params=params
            ),
            progress=False,
            threads=threads,
        )
        boxes[workers] = out
        digests[f"detect/workers{workers}/boxes.parquet"] = sha(out.read_bytes())
    label_boxes = _without_some_boxes(boxes[0], root / "objects" / "boxes.parquet")
    digests["label-input/boxes.parquet"] = sha(label_boxes.read_bytes())
    for decode in ("workers", "device"):
        for workers in (0, 2):
            out = root / f"shards-{decode}-w{workers}"
            params = LabelParams(
                samples_per_shard=7,
                image_batch_size=3,
                crop_batch_size=5,
                num_workers=workers,
                k_ent=5,
                k_rel=4,
                max_side=256,
                decode=decode,
            )
            settings = LabelSettings(
                pairs=str(ws["pairs"]), boxes=str(label_boxes), prompts=str(ws["prompts"]),
                entities=str(ws["entities"]), relations=str(ws["relations"]), out=str(out),
                rejected=str(ws["rejected"]), preset=preset, device=device, params=params,
            )  # fmt: skip
            label_objects(settings, progress=False, threads=threads)
            for name, entry in folder_digest(out).items():
                digests[f"label/{decode}/workers{workers}/{name}"] = entry
    return digests


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose digests differ (members listed one by one)."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict) and "members" in x and "members" in y:
            mx, my = x["members"], y["members"]
            bad = [m for m in sorted(set(mx) | set(my)) if mx.get(m) != my.get(m)]
            diffs.append(f"{key}: {len(bad)} members differ, e.g. {bad[:4]}")
        else:
            diffs.append(f"{key}: {x if not isinstance(x, dict) else x.get('sha256')} != "
                         f"{y if not isinstance(y, dict) else y.get('sha256')}")  # fmt: skip
    return diffs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="write the digests to this JSON file")
    p.add_argument("--compare", default="", help="digests of the other side: exit 1 on a change")
    p.add_argument("--preset", default="tiny", help="tiny | base-random")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu | cuda (run-to-run identity on a GPU)")
    p.add_argument(
        "--workdir", default="",
        help="keep the files here (default: $TMPDIR/pmu-shard-bytes, removed after); give both "
        "sides the same folder, since the manifest hashes the absolute image paths",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.preset != "tiny":
        import label_throughput as bench

        bench.register_bench_preset()
    from pmu.runtime import set_threads

    set_threads(args.threads)
    # One fixed folder by default: pairs.parquet holds absolute image paths and the manifest
    # hashes it, so both sides must build their inputs at the same path.
    root = Path(args.workdir or Path(tempfile.gettempdir()) / "pmu-shard-bytes")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    try:
        digests = run(root, args.preset, args.threads, args.device)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    Path(args.out).write_text(
        json.dumps(digests, indent=1, sort_keys=True) + "\n", encoding="utf-8"
    )
    members = sum(
        len(v["members"]) for v in digests.values() if isinstance(v, dict) and "members" in v
    )
    print(f"{len(digests)} files, {members} shard members -> {args.out}")
    if args.compare:
        diffs = compare(json.loads(Path(args.compare).read_text(encoding="utf-8")), digests)
        for line in diffs:
            print("DIFFERS", line)
        print("identical" if not diffs else f"{len(diffs)} files differ")
        return 1 if diffs else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
