"""Labeling throughput: detect-objects + label-objects vs a naive per-image loop, FLOP rate, RSS.

    python benchmarks/label_throughput.py [--images 48] [--naive-images 3] [--rss-images 16]
        [--rss-factor 10] [--entities 64] [--relations 32] [--top-k 4] [--workers 2] [--json F]

Runs the real stages (pipeline.detect.detect_objects, pipeline.label.label_objects) on N JPEGs
made by re-encoding the bundled sample images at varied sizes and qualities, prepared by
pipeline.prepare, with the BASE architectures and random weights (YOLO from yolo11n.yaml, open_clip
ViT-B-32 with pretrained=None), so the FLOPs are the real ones and nothing is downloaded.
In the same process it times a naive reference loop on a subset (one image at a time, one crop at
a time, prompts re-encoded for every image: how per-image auto-labelers work) and prints the
speed-up; it measures this machine's fp32 matmul rate and reports the CLIP image tower's achieved
FLOP rate against it; and it runs the two stages in a fresh subprocess on 1x and Fx the input to
report peak RSS (streaming: it should not grow with the data). Timings on a busy machine are noisy:
the parameters are printed with the figures, re-take them on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "YOLO_OFFLINE"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "pipeline" / "sample"
BENCH_PRESET = "base-random"
LONGEST_SIDES = (224, 320, 480, 640, 800, 1024)  # re-encoded sizes, cycled
QUALITIES = (80, 88, 95)


def register_bench_preset() -> str:
    """The base architectures with random weights (yolo11n.yaml, ViT-B-32 without pretrained)."""
    from pipeline import models

    models.PRESETS.setdefault(
        BENCH_PRESET,
        models.Preset(
            name=BENCH_PRESET,
            detector="yolo11n.yaml",
            clip_model="ViT-B-32",
            clip_pretrained=None,
            text_encoder="tiny",
            vision_encoder="tiny",
        ),
    )
    return BENCH_PRESET


# ----------------------------------------------------------------------------- inputs


def sample_pairs() -> list[tuple[Path, str]]:
    """(image file, caption) of the bundled sample's matched pairs."""
    out = []
    for line in (SAMPLE / "captions.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line) if line.strip() else None
        if row and int(row.get("itm", 1)) == 1:
            out.append((SAMPLE / row["image"], row["caption"]))
    return out


def write_images(folder: Path, n: int) -> list[tuple[str, str]]:
    """n distinct JPEGs: sample images resized to cycled longest sides, flipped, re-encoded."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    base = sample_pairs()
    out = []
    for i in range(n):
        src, caption = base[i % len(base)]
        side = LONGEST_SIDES[(i // len(base) + i) % len(LONGEST_SIDES)]
        with Image.open(src) as im:
            img = im.convert("RGB")
        scale = side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        if (i // len(base)) % 2:
            img = ImageOps.mirror(img)
        path = folder / f"bench-{i:07d}.jpg"
        img.save(path, format="JPEG", quality=QUALITIES[i % len(QUALITIES)])
        out.append((str(path), caption))
    return out


def build_workspace(root: Path, n: int) -> dict[str, Path]:
    """images/ and prepared/pairs.parquet (pipeline.prepare, no generated negatives)."""
    from pipeline.prepare import prepare
    from pipeline.readers import RawRecord

    records = [
        RawRecord(id=f"bench-{i:07d}", source="bench", image_path=path, caption=caption)
        for i, (path, caption) in enumerate(write_images(root / "images", n))
    ]
    result = prepare(records, root / "prepared", negatives=False, progress=False)
    if result.rejected:
        raise RuntimeError(f"prepare rejected benchmark images: {result.rejected[:3]}")
    return {"root": root, "pairs": root / "prepared" / "pairs.parquet"}


def build_vocab(ws: dict[str, Path], m: int, l: int) -> dict[str, Path]:  # noqa: E741
    """entities.json (mined from the captions, padded with snapshot relation words if short),
    relations.json (bundled Wikidata snapshot) and prompts.safetensors (encoded once)."""
    import io
    from contextlib import redirect_stderr

    from pipeline.nouns import mine_nouns
    from pipeline.prompts import embed_prompts
    from pipeline.relations import fetch_relations, read_snapshot
    from pipeline.shards import write_json_atomic

    vocab = ws["root"] / "vocab"
    ent, rel = vocab / "entities.json", vocab / "relations.json"
    doc = mine_nouns(ws["pairs"], ent, m=m, progress=False)
    names = [e["name"] for e in doc["entities"]]
    if len(names) < m:  # the sample's captions have ~150 distinct nouns
        extra = (w for _, label in read_snapshot() for w in label.split() if len(w) > 2)
        for word in extra:
            if len(names) >= m:
                break
            if word not in names:
                names.append(word)
        doc = {k: v for k, v in doc.items() if not k.startswith("seconds")}
        doc["entities"] = [{"name": w, "count": 0} for w in names]
        write_json_atomic(ent, doc)
    with redirect_stderr(io.StringIO()):  # the snapshot warning is expected here
        fetch_relations(rel, l=l)
    embed_prompts(ent, rel, vocab / "prompts.safetensors", preset=BENCH_PRESET, device="cpu")
    return {"entities": ent, "relations": rel, "prompts": vocab / "prompts.safetensors"}


# ----------------------------------------------------------------------------- the stages


def bench_params(args: argparse.Namespace) -> tuple[Any, Any]:
    from pipeline.detect import DetectParams
    from pipeline.label import LabelParams

    detect = DetectParams(
        batch_size=args.detect_batch, imgsz=640, conf=0.0, top_k=args.top_k, num_workers=0
    )
    label = LabelParams(
        samples_per_shard=args.samples_per_shard,
        image_batch_size=args.image_batch,
        crop_batch_size=args.crop_batch,
        num_workers=args.workers,
    )
    return detect, label


def run_stages(ws: dict[str, Path], vocab: dict[str, Path], args: argparse.Namespace) -> dict:
    """detect-objects then label-objects on a workspace; their summaries and wall times."""
    from pipeline.detect import detect_objects
    from pipeline.label import label_objects

    detect_params, label_params = bench_params(args)
    boxes = ws["root"] / "objects" / "boxes.parquet"
    t0 = time.perf_counter()
    det = detect_objects(
        ws["pairs"], boxes, BENCH_PRESET, params=detect_params, device="cpu", progress=False
    )
    t1 = time.perf_counter()
    lab = label_objects(
        ws["pairs"],
        boxes,
        vocab["prompts"],
        vocab["entities"],
        vocab["relations"],
        ws["root"] / "shards",
        preset=BENCH_PRESET,
        params=label_params,
        device="cpu",
        progress=False,
    )
    t2 = time.perf_counter()
    return {"detect": det, "label": lab, "detect_wall": t1 - t0, "label_wall": t2 - t1}


# ----------------------------------------------------------------------------- naive reference


def naive_label(paths: list[str], vocab: dict[str, Path], args: argparse.Namespace) -> dict:
    """One image at a time: decode, YOLO on it alone, re-encode every prompt, CLIP on the whole
    image, then on each crop alone. Models are loaded once (outside the timing)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pipeline.images import cap_longest_side, encode_jpeg
    from pipeline.label import soft_labels
    from pipeline.labeling_data import load_rgb, padded_box
    from pipeline.models import load_clip, load_detector
    from pipeline.prompts import (
        ENTITY_TEMPLATES,
        RELATION_TEMPLATES,
        encode_prompts,
        read_entity_names,
        read_relation_labels,
    )
    from pipeline.runtime import set_threads

    detect_params, label_params = bench_params(args)
    detector = load_detector(BENCH_PRESET)
    set_threads()
    clip, preprocess, tokenizer = load_clip(BENCH_PRESET)
    entities = read_entity_names(vocab["entities"])
    relations = read_relation_labels(vocab["relations"])
    cpu = torch.device("cpu")
    prompt_seconds = 0.0
    rel_top = {}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            img = load_rgb(path, label_params.max_pixels)
            bgr = np.ascontiguousarray(np.asarray(img)[:, :, ::-1])
            res = detector.predict(
                bgr,
                imgsz=detect_params.imgsz,
                conf=detect_params.conf,
                iou=detect_params.iou,
                max_det=detect_params.top_k,
                device="cpu",
                verbose=False,
            )[0]
            xyxy = res.boxes.xyxy.float().numpy()[: detect_params.top_k]
            tp = time.perf_counter()
            ent_prompts = encode_prompts(
                clip, tokenizer, entities, ENTITY_TEMPLATES, "entity", 256, cpu
            )
            rel_prompts = encode_prompts(
                clip, tokenizer, relations, RELATION_TEMPLATES, "relation", 256, cpu
            )
            prompt_seconds += time.perf_counter() - tp
            feats = F.normalize(clip.encode_image(preprocess(img)[None]), dim=-1)
            rel_idx, rel_prob, _ = soft_labels(
                feats, rel_prompts, label_params.logit_scale, label_params.tau, label_params.k_rel
            )
            rel_top[path] = (rel_idx[0].numpy(), rel_prob[0].numpy())
            for box in xyxy:
                window = padded_box(box, img.width, img.height, label_params.crop_padding)
                crop = F.normalize(clip.encode_image(preprocess(img.crop(window))[None]), dim=-1)
                soft_labels(
                    crop,
                    ent_prompts,
                    label_params.logit_scale,
                    label_params.tau,
                    label_params.k_ent,
                )
            encode_jpeg(cap_longest_side(img, label_params.max_side), label_params.jpeg_quality)
    seconds = time.perf_counter() - t0
    return {
        "images": len(paths),
        "seconds": seconds,
        "prompt_seconds": prompt_seconds,
        "prompts_per_image": len(entities) * len(ENTITY_TEMPLATES)
        + len(relations) * len(RELATION_TEMPLATES),
        "rel_top": rel_top,
    }


def compare_with_shards(rel_top: dict, ws: dict[str, Path], pairs: dict) -> float:
    """Largest |q_rel| difference between the naive loop and the shards (same image, same CLIP)."""
    import numpy as np

    from pipeline import shards

    by_id = {}
    for tar in shards.shard_paths(ws["root"] / "shards"):
        for raw in shards.iter_raw_samples(tar):
            s = shards.decode_sample(raw)
            by_id[s["meta"]["id"]] = s
    worst = 0.0
    path_to_id = dict(zip(pairs["image_path"], pairs["id"], strict=True))
    for path, (idx, prob) in rel_top.items():
        s = by_id[path_to_id[path]]
        if not np.array_equal(s["rel_idx"], idx):
            return float("inf")
        worst = max(worst, float(np.abs(s["rel_prob"] - prob).max()))
    return worst


# ----------------------------------------------------------------------------- hardware figures


def clip_image_flops() -> tuple[float, float]:
    """FLOPs (2 x multiply-adds) of one CLIP image-tower pass: (counted by torch, analytic)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models import load_clip

    model, _, _ = load_clip(BENCH_PRESET)
    visual = model.visual
    size, patch = visual.image_size[0], visual.patch_size[0]
    counter = FlopCounterMode(display=False)
    # Grad mode on: under no_grad/inference_mode nn.MultiheadAttention takes a fused fast path
    # that the counter does not see (it would miss the q/k/v/out projections).
    with torch.enable_grad(), counter:
        model.encode_image(torch.zeros(1, 3, size, size))
    # Analytic ViT: per layer T*12*d^2 (qkv, out, 4d MLP) + 2*T^2*d (scores, mix); patch embed.
    t, d, layers = (size // patch) ** 2 + 1, visual.transformer.width, visual.transformer.layers
    macs = layers * (t * 12 * d * d + 2 * t * t * d) + (t - 1) * 3 * patch * patch * d
    macs += d * visual.output_dim
    return float(counter.get_total_flops()), 2.0 * macs


def matmul_peak(n: int = 2048, seconds: float = 3.0) -> float:
    """Best fp32 matmul rate (FLOP/s) over repeated n x n products, with the stages' threads."""
    import torch

    from pipeline.runtime import set_threads

    set_threads()
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=out)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


# ----------------------------------------------------------------------------- peak RSS


def rss_child(workdir: Path, args: argparse.Namespace) -> None:
    """Run both stages on a prepared workspace; print peak RSS of this process and its workers."""
    ws = {"root": workdir, "pairs": workdir / "prepared" / "pairs.parquet"}
    vocab = {k: workdir / "vocab" / f"{k}.{ext}" for k, ext in VOCAB_FILES.items()}
    run = run_stages(ws, vocab, args)
    status = Path("/proc/self/status").read_text()
    hwm_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    workers_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(
        "RSS-RESULT "
        + json.dumps(
            {
                "main_mib": hwm_kb / 1024,
                "worker_mib": workers_kb / 1024,
                "samples": run["label"]["counts"]["samples"],
            }
        )
    )


VOCAB_FILES = {"entities": "json", "relations": "json", "prompts": "safetensors"}


def measure_rss(root: Path, n: int, vocab: dict[str, Path], args: argparse.Namespace) -> dict:
    ws = build_workspace(root, n)
    (root / "vocab").mkdir(exist_ok=True)
    for key, ext in VOCAB_FILES.items():
        shutil.copyfile(vocab[key], root / "vocab" / f"{key}.{ext}")
    cmd = [sys.executable, __file__, "--rss-child", str(ws["root"]), *args.child_args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS child failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RSS-RESULT "))
    result = json.loads(line.removeprefix("RSS-RESULT "))
    result["seconds"] = time.perf_counter() - t
    shutil.rmtree(root / "images", ignore_errors=True)
    return result


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=48, help="images for the throughput run")
    p.add_argument("--naive-images", type=int, default=3, help="subset for the naive loop")
    p.add_argument("--rss-images", type=int, default=16, help="1x input of the RSS runs (0: skip)")
    p.add_argument("--rss-factor", type=int, default=10, help="the larger RSS run is this x 1x")
    p.add_argument(
        "--rss-samples-per-shard",
        type=int,
        default=8,
        help="shard size of the RSS runs (memory is bounded by one shard: keep it below 1x)",
    )
    p.add_argument("--entities", type=int, default=64, help="entity vocabulary size M")
    p.add_argument("--relations", type=int, default=32, help="relation vocabulary size L")
    p.add_argument("--top-k", type=int, default=4, help="boxes (crops) per image")
    p.add_argument("--detect-batch", type=int, default=16, help="images per YOLO forward")
    p.add_argument("--image-batch", type=int, default=32, help="images per CLIP forward")
    p.add_argument("--crop-batch", type=int, default=128, help="crops per CLIP forward")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2, help="label DataLoader workers")
    p.add_argument("--workdir", default="", help="keep the workspace here (default: temp dir)")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # What an RSS child needs to run the stages with the same parameters.
    args.child_args = [
        f"--{k}={getattr(args, k.replace('-', '_'))}"
        for k in ("top-k", "detect-batch", "image-batch", "crop-batch", "workers")
    ] + [f"--samples-per-shard={args.rss_samples_per_shard}"]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    register_bench_preset()
    if args.rss_child:
        rss_child(Path(args.rss_child), args)
        return {}

    import torch

    from pipeline.labeling_data import read_pairs
    from pipeline.runtime import set_threads

    threads = set_threads()
    tmp = None
    if args.workdir:
        root = Path(args.workdir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pmu-bench-")
        root = Path(tmp.name)
    try:
        t = time.perf_counter()
        ws = build_workspace(root / "main", args.images)
        vocab = build_vocab(ws, args.entities, args.relations)
        setup_s = time.perf_counter() - t
        print(f"setup: {args.images} images, vocab and prompts in {setup_s:.1f} s", flush=True)

        run = run_stages(ws, vocab, args)
        det, lab = run["detect"], run["label"]
        print(f"fast path: detect {det['seconds']} s, label loop {lab['timing']['seconds_loop']} s")

        pairs = read_pairs(ws["pairs"])
        naive_paths = pairs["image_path"][: args.naive_images]
        naive = naive_label(naive_paths, vocab, args)
        naive_diff = compare_with_shards(naive.pop("rel_top"), ws, pairs)
        print(f"naive: {naive['images']} images in {naive['seconds']:.1f} s", flush=True)

        flops_per_pass, flops_analytic = clip_image_flops()
        peak = matmul_peak()
        set_threads()

        rss = {}
        if args.rss_images > 0:
            for factor in (1, args.rss_factor):
                n = args.rss_images * factor
                rss[f"{factor}x"] = measure_rss(root / f"rss-{factor}x", n, vocab, args)
                print(f"peak RSS at {n} images: {rss[f'{factor}x']}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()

    n = args.images
    counts = lab["counts"]
    passes = counts["samples"] + counts["objects"]
    fast_loop = det["seconds"] + lab["timing"]["seconds_loop"]
    fast_rate = n / fast_loop
    naive_rate = naive["images"] / naive["seconds"]
    naive_no_prompts = naive["images"] / (naive["seconds"] - naive["prompt_seconds"])
    encode_s = lab["timing"]["seconds_clip_encode"]
    figures = {
        "params": {
            "images": n,
            "naive_images": naive["images"],
            "entities_M": args.entities,
            "relations_L": args.relations,
            "prompts_reencoded_per_image_naive": naive["prompts_per_image"],
            "boxes_per_image": args.top_k,
            "detect_imgsz": 640,
            "detect_batch": args.detect_batch,
            "image_batch": args.image_batch,
            "crop_batch": args.crop_batch,
            "label_workers": args.workers,
            "samples_per_shard": args.samples_per_shard,
            "rss_samples_per_shard": args.rss_samples_per_shard,
            "torch_threads": threads,
            "torch": torch.__version__,
            "models": "yolo11n.yaml + open_clip ViT-B-32, random weights",
            "device": "cpu",
        },
        "fast": {
            "images_per_s": round(fast_rate, 3),
            "detect_images_per_s": det["images_per_s"],
            "label_images_per_s": lab["timing"]["images_per_s"],
            "crops": counts["objects"],
            "clip_passes": passes,
            "clip_encode_share_of_label_loop": round(encode_s / lab["timing"]["seconds_loop"], 3),
            "detect_wall_s_incl_model_load": round(run["detect_wall"], 2),
            "label_wall_s_incl_model_load": round(run["label_wall"], 2),
        },
        "naive": {
            "images_per_s": round(naive_rate, 4),
            "images_per_s_without_prompt_reencoding": round(naive_no_prompts, 4),
            "prompt_share": round(naive["prompt_seconds"] / naive["seconds"], 3),
            "max_abs_q_rel_diff_vs_fast": naive_diff,
        },
        "speedup": {
            "fast_vs_naive": round(fast_rate / naive_rate, 2),
            "fast_vs_naive_without_prompt_reencoding": round(fast_rate / naive_no_prompts, 2),
        },
        "flops": {
            "clip_image_tower_gflop_per_pass": round(flops_per_pass / 1e9, 3),
            "clip_image_tower_gflop_per_pass_analytic": round(flops_analytic / 1e9, 3),
            "matmul_peak_gflop_s": round(peak / 1e9, 1),
            "clip_encode_gflop_s": round(passes * flops_per_pass / encode_s / 1e9, 1),
            "clip_encode_fraction_of_peak": round(passes * flops_per_pass / encode_s / peak, 3),
            "clip_over_label_loop_fraction_of_peak": round(
                passes * flops_per_pass / lab["timing"]["seconds_loop"] / peak, 3
            ),
        },
        "rss": rss,
    }
    print_report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return figures


def print_report(f: dict[str, Any]) -> None:
    p, fast, naive, sp, fl = f["params"], f["fast"], f["naive"], f["speedup"], f["flops"]
    lines = [
        "",
        "== label throughput (detect-objects + label-objects) ==",
        f"params: {json.dumps(p)}",
        f"fast path:  {fast['images_per_s']:.2f} images/s  (detect {fast['detect_images_per_s']} "
        f"img/s, label {fast['label_images_per_s']} img/s; {fast['crops']} crops, "
        f"{fast['clip_passes']} CLIP image passes; CLIP encode = "
        f"{fast['clip_encode_share_of_label_loop']:.0%} of the label loop)",
        f"naive loop: {naive['images_per_s']:.3f} images/s  ({naive['prompt_share']:.0%} of it "
        f"re-encoding {p['prompts_reencoded_per_image_naive']} prompts per image; "
        f"{naive['images_per_s_without_prompt_reencoding']:.3f} images/s without that); "
        f"max |q_rel diff| vs shards {naive['max_abs_q_rel_diff_vs_fast']:.2g}",
        f"speed-up:   {sp['fast_vs_naive']:.1f}x over the naive loop "
        f"({sp['fast_vs_naive_without_prompt_reencoding']:.2f}x over it with prompts cached)",
        f"CLIP image tower: {fl['clip_image_tower_gflop_per_pass']} GFLOP/pass counted "
        f"({fl['clip_image_tower_gflop_per_pass_analytic']} analytic); "
        f"{fl['clip_encode_gflop_s']} GFLOP/s while encoding = "
        f"{fl['clip_encode_fraction_of_peak']:.0%} of the measured fp32 matmul peak "
        f"({fl['matmul_peak_gflop_s']} GFLOP/s); over the whole label loop "
        f"{fl['clip_over_label_loop_fraction_of_peak']:.0%}",
    ]
    for k, r in f["rss"].items():
        lines.append(
            f"peak RSS {k:>4} ({r['samples']} images, {p['rss_samples_per_shard']} per shard): "
            f"main {r['main_mib']:.0f} MiB, largest worker {r['worker_mib']:.0f} MiB "
            f"({r['seconds']:.0f} s)"
        )
    if len(f["rss"]) == 2:
        a, b = f["rss"].values()
        lines.append(f"RSS ratio {list(f['rss'])[1]}/1x: {b['main_mib'] / a['main_mib']:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
