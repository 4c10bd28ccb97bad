"""Labeling throughput: detect-objects + label-objects against their model-only limits, the CPU-side
costs of the main process, a naive per-image loop, the FLOP rate and peak RSS.

    python benchmarks/label_throughput.py [--device cpu|cuda] [--images 48] [--naive-images 3]
        [--rss-images 16] [--rss-factor 10] [--entities 64] [--relations 32] [--top-k 4]
        [--detect-conf 0] [--workers N] [--detect-workers N] [--json F]

Runs the real stages (pipeline.detect.ImageDetector, pipeline.label.ShardLabeler, as
detect_objects / label_objects do) on N JPEGs made by re-encoding the bundled sample images at
varied sizes and qualities, prepared by pipeline.prepare, with the BASE architectures and random
weights (YOLO from yolo11n.yaml, open_clip ViT-B-32 with pretrained=None), so the FLOPs are the
real ones and nothing is downloaded. One run prints:
- the stage throughputs (detect at each `--detect-conf`, label on the boxes of the first one) and,
  on CUDA, the mean GPU utilisation sampled during each stage (NVML, else nvidia-smi);
- the model-only limits measured in the same process (YOLO forward at the detect batch, CLIP
  encode_image at the crop batch; bf16 autocast on CUDA) and each stage's ratio to its limit;
- CPU-side proxies that need no GPU: main-process CPU ms per image (time.process_time of this
  process over the stage loop, in total and outside the model forwards and device-side ops: the
  "host side", split into the main thread's, the shard writer thread's and the rest, mostly
  torch's CPU thread pool spin-waiting after each CPU forward; `--threads 1` leaves that out, as
  a GPU run does) and bytes per image moved host -> device;
- on CPU: a naive reference loop on a subset (one image at a time, one crop at a time, prompts
  re-encoded for every image) and the speed-up, the CLIP image tower's FLOP rate against this
  machine's fp32 matmul rate, and peak RSS for 1x and Fx the input (each in a fresh subprocess).

The benchmark only calls APIs that the stages have had since their first release, so the same file
can measure an older checkout (copy it into that checkout's benchmarks/ folder). Timings on a busy
machine are noisy: the parameters are printed with the figures, re-take them on a quiet machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
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
DETECT_IMGSZ = 640


def register_bench_preset() -> str:
    """The base architectures with random weights (yolo11n.yaml, ViT-B-32 without pretrained)."""
    from pipeline import models

    try:  # the presets live in pmu.presets now; older checkouts keep them in pipeline.models
        from pmu import presets as registry
    except ImportError:
        registry = models
    registry.PRESETS.setdefault(
        BENCH_PRESET,
        registry.Preset(
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
    from pipeline.readers.records import RawRecord

    records = [
        RawRecord(id=f"bench-{i:07d}", source="bench", image_path=path, caption=caption)
        for i, (path, caption) in enumerate(write_images(root / "images", n))
    ]
    result = prepare(records, root / "prepared", negatives=False, progress=False)
    if result.rejected:
        raise RuntimeError(f"prepare rejected benchmark images: {result.rejected[:3]}")
    return {"root": root, "pairs": root / "prepared" / "pairs.parquet"}


def build_vocab(ws: dict[str, Path], m: int, l: int, device: str = "cpu") -> dict[str, Path]:  # noqa: E741
    """entities.json (mined from the captions, padded with snapshot relation words if short),
    relations.json (bundled Wikidata snapshot) and prompts.safetensors (encoded once)."""
    import io
    from contextlib import redirect_stderr

    from pipeline.nouns import mine_nouns
    from pipeline.prompts import embed_prompts
    from pipeline.relations import fetch_relations, read_snapshot
    from pmu.io import write_json_atomic

    vocab = ws["root"] / "vocab"
    ent, rel = vocab / "entities.json", vocab / "relations.json"
    try:
        doc = mine_nouns(ws["pairs"], ent, m=m, progress=False)
        rewrite = False
    except (ImportError, OSError, RuntimeError, ValueError) as e:  # no spaCy (a GPU machine)
        print(f"mine-nouns unavailable ({type(e).__name__}); entities from caption words")
        doc = {"source": "bench-caption-words", "m": m, "entities": caption_words(ws["pairs"])}
        rewrite = True
    names = [e["name"] for e in doc["entities"]][:m]
    if rewrite or len(names) < m:  # the sample's captions have ~150 distinct nouns
        extra = (w for prop in read_snapshot() for w in prop.label.split() if len(w) > 2)
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
    embed_prompts(ent, rel, vocab / "prompts.safetensors", preset=BENCH_PRESET, device=device)
    return {"entities": ent, "relations": rel, "prompts": vocab / "prompts.safetensors"}


def caption_words(pairs_path: Path) -> list[dict[str, Any]]:
    """Lower-case caption words (3+ letters) by falling count: a stand-in entity vocabulary
    (throughput depends on its size, not its words)."""
    import re
    from collections import Counter

    from pipeline.labeling_data import read_pairs

    counts = Counter(
        w for c in read_pairs(pairs_path)["caption"] for w in re.findall(r"[a-z]{3,}", c.lower())
    )
    return [{"name": w, "count": n} for w, n in sorted(counts.items(), key=lambda x: (-x[1], x[0]))]


# ----------------------------------------------------------------------------- parameters


def _params(cls: type, **values: Any) -> Any:
    """A params dataclass with the values it knows (older checkouts lack newer fields)."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known and v is not None})


def bench_params(args: argparse.Namespace, conf: float | None = None) -> tuple[Any, Any]:
    from pipeline.settings import DetectParams, LabelParams

    detect = _params(
        DetectParams,
        batch_size=args.detect_batch,
        imgsz=DETECT_IMGSZ,
        conf=args.detect_conf[0] if conf is None else conf,
        top_k=args.top_k,
        num_workers=args.detect_workers,
        impl=args.detect_impl,
    )
    label = _params(
        LabelParams,
        samples_per_shard=args.samples_per_shard,
        image_batch_size=args.image_batch,
        crop_batch_size=args.crop_batch,
        num_workers=args.workers,
        decode=args.decode,
        resize_mode=args.resize_mode,
    )
    return detect, label


def fill_device_defaults(args: argparse.Namespace) -> None:
    """Unset sizes: the old CPU benchmark's on CPU; on CUDA, sized for a 16-core GPU machine."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cuda = args.device.startswith("cuda")
    defaults = {
        "detect_batch": 64 if cuda else 16,
        "image_batch": 256 if cuda else 32,
        "crop_batch": 1024 if cuda else 128,
        "workers": max(1, min(15, (cpus or 2) - 1)) if cuda else 2,
        "detect_workers": max(1, min(15, (cpus or 2) - 1)) if cuda else 0,
        "samples_per_shard": 1024 if cuda else 1000,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.detect_conf is None:
        args.detect_conf = [0.0, 0.25] if cuda else [0.0]
    if args.skip_cpu_figures is None:
        args.skip_cpu_figures = cuda


# ----------------------------------------------------------------------------- instruments


class ForwardMeter:
    """Process CPU time, wall time and input size inside the model forwards (YOLO's
    `BaseModel.forward`, open_clip's `encode_image`), patched at class level so that any code
    path (the stages' own or ultralytics' predictor) is measured the same way."""

    # Device-side pre/post-processing of the fast paths (absent in older checkouts). On CPU the
    # device is the CPU, so this work shows up as main-process CPU time; on CUDA it is launches.
    DEVICE_OPS = {
        "pipeline.yolo_batch": ("to_model_input", "postprocess"),
        "pipeline.clip_inputs": ("decode_jpegs", "square_tensor", "cap_tensor", "encode_jpegs"),
    }

    def __init__(self) -> None:
        self.cpu = {"yolo": 0.0, "clip": 0.0, "device_ops": 0.0}
        # Thread CPU: the main thread's inside the metered calls, the shard writer's in total.
        self.thread = {"main_metered": 0.0, "writer": 0.0}
        self.elements = {"yolo": 0, "clip": 0}
        self.bytes = {"yolo": 0, "clip": 0}
        self._patched: list[tuple[Any, str, Any]] = []
        self._depth = 0  # metered calls nested in the main thread count once

    def _wrap(self, owner: Any, name: str, key: str, method: bool = True) -> None:
        original = owner.__dict__.get(name)
        if original is None:
            return
        meter = self

        def timed(*args, **kwargs):
            outermost = meter._depth == 0 and threading.current_thread() is threading.main_thread()
            meter._depth += outermost
            t, t_main = time.process_time(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                meter.cpu[key] += time.process_time() - t
                if outermost:
                    meter.thread["main_metered"] += time.thread_time() - t_main
                    meter._depth -= 1
                if key in meter.elements:
                    x = args[1]
                    meter.elements[key] += int(x.numel())
                    meter.bytes[key] += int(x.numel() * x.element_size())

        setattr(owner, name, timed)
        self._patched.append((owner, name, original))

    def __enter__(self) -> ForwardMeter:
        import importlib

        import open_clip.model
        from ultralytics.nn.tasks import BaseModel

        self._wrap(BaseModel, "forward", "yolo")
        for cls_name in ("CLIP", "CustomTextCLIP"):
            cls = getattr(open_clip.model, cls_name, None)
            if cls is not None:
                self._wrap(cls, "encode_image", "clip")
        for module_name, names in self.DEVICE_OPS.items():
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            for name in names:
                self._wrap(module, name, "device_ops")
            normaliser = getattr(module, "Normaliser", None)
            if normaliser is not None:
                self._wrap(normaliser, "__call__", "device_ops")
        self._time_writer()
        return self

    def _time_writer(self) -> None:
        """The shard writer thread's CPU (it runs `ShardLabeler._write_shard` only)."""
        from pipeline.label import ShardLabeler

        original = ShardLabeler.__dict__.get("_write_shard")
        if original is None:
            return
        meter = self

        def timed(*args, **kwargs):
            t = time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                meter.thread["writer"] += time.thread_time() - t

        ShardLabeler._write_shard = timed
        self._patched.append((ShardLabeler, "_write_shard", original))

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in reversed(self._patched):
            setattr(owner, name, original)
        self._patched.clear()

    def snapshot(self) -> dict[str, float]:
        return {
            **{f"cpu_{k}": v for k, v in self.cpu.items()},
            **{f"thread_{k}": v for k, v in self.thread.items()},
            **self._counts(),
        }

    def _counts(self) -> dict[str, float]:
        return {
            **{f"elements_{k}": v for k, v in self.elements.items()},
            **{f"bytes_{k}": v for k, v in self.bytes.items()},
        }


class GpuSampler:
    """Mean GPU utilisation (%) sampled every 100 ms in a thread (NVML, else nvidia-smi)."""

    def __init__(self, device: str) -> None:
        self.enabled = device.startswith("cuda")
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.source = "n/a"

    def _nvml(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            index = int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0)
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.source = "nvml"
            return lambda: float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # noqa: BLE001 - no NVML: fall back to nvidia-smi
            return None

    def _smi(self):
        if not shutil.which("nvidia-smi"):
            return None
        self.source = "nvidia-smi"

        def read() -> float:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
            return float(out[0]) if out else float("nan")

        return read

    def __enter__(self) -> GpuSampler:
        if not self.enabled:
            return self
        read = self._nvml() or self._smi()
        if read is None:
            return self

        def loop() -> None:
            while not self._stop.wait(0.1):
                self.samples.append(read())

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        vals = [v for v in self.samples if v == v]
        return round(sum(vals) / len(vals), 1) if vals else None


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def measured(device: str, meter: ForwardMeter):
    """Wall time, this process's CPU time and the forward meter's deltas over a block."""
    result: dict[str, Any] = {}
    before = meter.snapshot()
    sampler = GpuSampler(device)
    with sampler:
        sync(device)
        t0, c0, main0 = time.perf_counter(), time.process_time(), time.thread_time()
        yield result
        sync(device)
        result["wall"] = time.perf_counter() - t0
        result["cpu"] = time.process_time() - c0
        result["main_thread_cpu"] = time.thread_time() - main0
    after = meter.snapshot()
    result.update({k: after[k] - before[k] for k in after})
    result["gpu_util"] = sampler.mean
    result["gpu_util_source"] = sampler.source


# ----------------------------------------------------------------------------- model-only limits


def _best_seconds(fn: Any, dev: Any, warm: int, reps: int, tries: int = 3) -> float:
    """Fastest of `tries` timings of `reps` calls, after `warm` calls (inference, autocast)."""
    import torch

    from pmu.runtime import autocast

    best = float("inf")
    with torch.inference_mode(), autocast(dev):
        for _ in range(warm):
            fn()
        for _ in range(tries):
            sync(str(dev))
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            sync(str(dev))
            best = min(best, time.perf_counter() - t)
    return best


def model_limits(args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of the bare YOLO forward (fused, as predict runs it) and CLIP encode_image on
    random input, batch as in the stages (CPU: small batches, one timed pass)."""
    import copy

    import torch

    from pipeline.models import load_clip, load_detector
    from pmu.runtime import select_device, set_threads

    dev = select_device(args.device)
    cuda = dev.type == "cuda"
    warm, reps = (3, 10) if cuda else (1, 1)  # CPU: best of 3 single passes (busy machines)
    out: dict[str, Any] = {}
    net = copy.deepcopy(load_detector(BENCH_PRESET).model).fuse(verbose=False).to(dev).eval()
    if not cuda:  # as predict does on x86 CPUs (pipeline.yolo_batch.fused_network too)
        net = net.to(memory_format=torch.channels_last)
    set_threads()  # importing ultralytics leaves torch on one thread
    bs = args.detect_batch if cuda else min(args.detect_batch, 8)
    x = torch.rand(bs, 3, DETECT_IMGSZ, DETECT_IMGSZ, device=dev)
    out["yolo_images_per_s"] = bs * reps / _best_seconds(lambda: net(x), dev, warm, reps)
    out["yolo_batch"] = bs

    clip = load_clip(BENCH_PRESET)[0].to(dev).eval()
    set_threads()
    size = clip.visual.image_size[0]
    bs = args.crop_batch if cuda else min(args.crop_batch, 32)
    x = torch.randn(bs, 3, size, size, device=dev)
    out["clip_passes_per_s"] = (
        bs * reps / _best_seconds(lambda: clip.encode_image(x), dev, warm, reps)
    )
    out["clip_batch"] = bs
    return out


# ----------------------------------------------------------------------------- the stages


def run_detect(ws: dict[str, Path], args: argparse.Namespace, meter: ForwardMeter, conf: float):
    """The detect loop (model loaded outside the timing); writes boxes.parquet for labeling."""
    from pipeline.detect import ImageDetector, unique_images, write_detections
    from pipeline.settings import DetectSettings

    detect_params, _ = bench_params(args, conf)
    boxes = ws["root"] / "objects" / f"boxes-conf{conf:g}.parquet"
    settings = DetectSettings(
        pairs=str(ws["pairs"]), out=str(boxes), preset=BENCH_PRESET, device=args.device,
        params=detect_params,
    )  # fmt: skip
    pairs, paths = unique_images(ws["pairs"])
    detector = ImageDetector(settings, *([args.threads] if args.threads else []))
    if args.device.startswith("cuda"):  # cudnn autotuning, allocator growth
        detector.detect(paths[: detect_params.batch_size * 2])
        for attr in ("bytes_to_device",):
            if hasattr(detector, attr):
                setattr(detector, attr, 0)
    with measured(args.device, meter) as m:
        by_path = detector.detect(paths)
    counts = write_detections(pairs, by_path, settings)
    m.update(
        images=len(paths),
        boxes_path=boxes,
        counts=counts,
        bytes_to_device=getattr(detector, "bytes_to_device", None),
        impl=getattr(detect_params, "impl", "ultralytics"),
    )
    return m


def run_label(
    ws: dict[str, Path],
    vocab: dict[str, Path],
    boxes: Path,
    args: argparse.Namespace,
    meter: ForwardMeter,
):
    """The label loop as label_objects runs it (plan, ShardLabeler, finish), model load untimed."""
    from pipeline.label import ShardLabeler, finish_labeling, plan_labeling

    _, label_params = bench_params(args)
    out = ws["root"] / "shards"
    shutil.rmtree(out, ignore_errors=True)
    job, done = plan_labeling(label_settings(ws, vocab, boxes, out, label_params, args.device))
    labeler = ShardLabeler(job, *([args.threads] if args.threads else []))
    if args.device.startswith("cuda"):  # warm-up on shard 0 (rewritten by the timed run)
        for s, marker in labeler.label([0]):
            done[s] = marker
        labeler.encode_seconds = 0.0
        labeler.images_seen = 0
        if hasattr(labeler, "bytes_to_device"):
            labeler.bytes_to_device = 0
    with measured(args.device, meter) as m:
        for s, marker in labeler.label(range(job.n_shards)):
            done[s] = marker
    summary = finish_labeling(job, done)
    m.update(
        images=job.n,
        counts=summary["counts"],
        encode_seconds=labeler.encode_seconds,
        bytes_to_device=getattr(labeler, "bytes_to_device", None),
        decode=getattr(labeler, "decode", "workers"),
        resize_mode=getattr(label_params, "resize_mode", "center_crop"),
    )
    return m


def run_stages(ws: dict[str, Path], vocab: dict[str, Path], args: argparse.Namespace) -> dict:
    """detect-objects then label-objects through their public functions (the RSS runs)."""
    from pipeline.detect import detect_objects
    from pipeline.label import label_objects
    from pipeline.settings import DetectSettings

    detect_params, label_params = bench_params(args)
    boxes = ws["root"] / "objects" / "boxes.parquet"
    detect = DetectSettings(
        pairs=str(ws["pairs"]), out=str(boxes), preset=BENCH_PRESET, device="cpu",
        params=detect_params,
    )  # fmt: skip
    det = detect_objects(detect, progress=False)
    labels = label_settings(ws, vocab, boxes, ws["root"] / "shards", label_params, "cpu")
    lab = label_objects(labels, progress=False)
    return {"detect": det, "label": lab}


def label_settings(ws, vocab, boxes, out, params, device: str):
    """label-objects' settings for the benchmark's inputs."""
    from pipeline.settings import LabelSettings

    return LabelSettings(
        pairs=str(ws["pairs"]), boxes=str(boxes), prompts=str(vocab["prompts"]),
        entities=str(vocab["entities"]), relations=str(vocab["relations"]), out=str(out),
        rejected=None, preset=BENCH_PRESET, device=device, params=params,
    )  # fmt: skip


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
    from pmu.runtime import set_threads

    detect_params, label_params = bench_params(args)
    detector = load_detector(BENCH_PRESET)
    set_threads()
    clip, preprocess, tokenizer = load_clip(BENCH_PRESET)
    clip_input = _reference_input(preprocess, label_params)
    scale = getattr(label_params, "logit_scale", None) or float(clip.logit_scale.detach().exp())
    entities = read_entity_names(vocab["entities"])
    relations = read_relation_labels(vocab["relations"])
    cpu = torch.device("cpu")
    prompt_seconds = 0.0
    rel_dense = {}
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
            feats = F.normalize(clip.encode_image(clip_input(img)[None]), dim=-1)
            # the full distribution (k = L), back in relation order: the shards' top-k is
            # compared against it
            idx, prob, _, _ = soft_labels(
                feats, rel_prompts, scale, label_params.tau, len(relations)
            )
            rel_dense[path] = prob[0].numpy()[np.argsort(idx[0].numpy())]
            for box in xyxy:
                window = padded_box(box, img.width, img.height, label_params.crop_padding)
                crop = F.normalize(clip.encode_image(clip_input(img.crop(window))[None]), dim=-1)
                soft_labels(crop, ent_prompts, scale, label_params.tau, label_params.k_ent)
            encode_jpeg(cap_longest_side(img, label_params.max_side), label_params.jpeg_quality)
    seconds = time.perf_counter() - t0
    return {
        "images": len(paths),
        "seconds": seconds,
        "prompt_seconds": prompt_seconds,
        "prompts_per_image": len(entities) * len(ENTITY_TEMPLATES)
        + len(relations) * len(RELATION_TEMPLATES),
        "rel_dense": rel_dense,
    }


def _reference_input(preprocess: Any, label_params: Any):
    """The per-image PIL + open_clip preprocess path for the configured resize mode."""
    try:
        from pipeline.clip_inputs import reference_clip_input
    except ImportError:  # older checkouts: open_clip's preprocess (centre crop)
        return preprocess
    mode = getattr(label_params, "resize_mode", "center_crop")
    return lambda img: reference_clip_input(img, preprocess, mode)


def compare_with_shards(rel_dense: dict, shard_dir: Path, pairs: dict) -> dict[str, Any]:
    """The shards' top-k q_rel against the naive loop's full distributions (same image, same
    CLIP, the per-image PIL reference preprocess): the largest |q| difference at the stored
    relations, the largest gap by which a left-out relation beats the last stored one (0: the
    stored set is the reference's top-k), and how many images keep the reference's top-1."""
    import numpy as np

    from pmu import shards

    by_id = {}
    for tar in shards.shard_paths(shard_dir):
        for raw in shards.iter_raw_samples(tar):
            s = shards.decode_sample(raw)
            by_id[s["meta"]["id"]] = s
    path_to_id = dict(zip(pairs["image_path"], pairs["id"], strict=True))
    worst, missed, same_top1 = 0.0, 0.0, 0
    for path, q in rel_dense.items():
        s = by_id[path_to_id[path]]
        idx, prob = s["rel_idx"].astype(np.int64), s["rel_prob"]
        worst = max(worst, float(np.abs(prob - q[idx]).max()))
        left_out = np.delete(q, idx)
        if left_out.size:
            missed = max(missed, float(left_out.max() - q[idx[-1]]))
        same_top1 += int(idx[0] == int(np.argmax(q)))
    return {
        "max_abs_diff_at_stored": worst,
        "max_left_out_excess": max(missed, 0.0),
        "top1_agree": same_top1,
        "images": len(rel_dense),
        "max_reference_prob": max((float(q.max()) for q in rel_dense.values()), default=0.0),
    }


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

    from pmu.runtime import set_threads

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
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
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
    p.add_argument(
        "--detect-conf",
        type=float,
        nargs="+",
        default=None,
        help="detect thresholds to time; labeling uses the first (default: 0 on CPU, 0 and "
        "0.25 on CUDA; the random detector scores ~1e-4, so 0.25 keeps no box)",
    )
    p.add_argument(
        "--threads", type=int, default=0,
        help="torch CPU threads of the timed stages (0: every core). 1 leaves out the second "
        "thread's spin-wait after each CPU forward, which a GPU run does not have",
    )  # fmt: skip
    p.add_argument("--detect-batch", type=int, default=None, help="images per YOLO forward")
    p.add_argument("--detect-workers", type=int, default=None, help="detect DataLoader workers")
    p.add_argument("--detect-impl", default=None, help="fast | ultralytics (newer checkouts)")
    p.add_argument("--image-batch", type=int, default=None, help="images per CLIP forward")
    p.add_argument("--crop-batch", type=int, default=None, help="crops per CLIP forward")
    p.add_argument("--samples-per-shard", type=int, default=None)
    p.add_argument("--workers", type=int, default=None, help="label DataLoader workers")
    p.add_argument("--decode", default=None, help="label decode: auto | workers | device")
    p.add_argument("--resize-mode", default=None, help="label: letterbox | center_crop")
    p.add_argument(
        "--skip-cpu-figures",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="skip the naive loop, FLOP rate and RSS runs (default: skipped on CUDA)",
    )
    p.add_argument("--workdir", default="", help="keep the workspace here (default: temp dir)")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    fill_device_defaults(args)
    # What an RSS child needs to run the stages with the same parameters.
    args.child_args = [
        f"--{k}={getattr(args, k.replace('-', '_'))}"
        for k in ("top-k", "detect-batch", "image-batch", "crop-batch", "workers", "detect-workers")
    ] + [f"--samples-per-shard={args.rss_samples_per_shard}"]
    for k in ("decode", "resize-mode", "detect-impl"):
        if getattr(args, k.replace("-", "_")):
            args.child_args.append(f"--{k}={getattr(args, k.replace('-', '_'))}")
    args.child_args += ["--detect-conf", *map(str, args.detect_conf[:1])]
    return args


def _per_image(value: float | None, images: int, scale: float = 1.0) -> float | None:
    return None if value is None else round(value * scale / max(images, 1), 3)


def stage_figures(m: dict[str, Any], kind: str, limit_per_s: float) -> dict[str, Any]:
    """Throughput, limit ratio and CPU-side proxies of one timed stage loop."""
    key = "yolo" if kind == "detect" else "clip"
    images = m["images"]
    rate = images / m["wall"]
    host = m["cpu"] - m[f"cpu_{key}"] - m["cpu_device_ops"]
    main = m["main_thread_cpu"] - m["thread_main_metered"]
    if m.get("bytes_to_device") is not None:
        h2d, how = m["bytes_to_device"], "counted by the stage"
    elif kind == "detect":  # ultralytics' predictor moves the uint8 letterboxed batch
        h2d, how = m[f"elements_{key}"], "uint8 model inputs (ultralytics predictor)"
    else:  # the first release moved float32 model inputs
        h2d, how = m[f"bytes_{key}"], "float32 model inputs"
    return {
        "images": images,
        "images_per_s": round(rate, 2),
        "limit_images_per_s": round(limit_per_s, 1),
        "ratio_to_limit": round(rate / limit_per_s, 3),
        "gpu_util_mean_pct": m["gpu_util"],
        "main_cpu_ms_per_image": _per_image(m["cpu"], images, 1e3),
        "main_cpu_ms_per_image_in_forwards": _per_image(m[f"cpu_{key}"], images, 1e3),
        "main_cpu_ms_per_image_in_device_ops": _per_image(m["cpu_device_ops"], images, 1e3),
        "main_cpu_ms_per_image_host_side": _per_image(host, images, 1e3),
        "host_side_ms_per_image_main_thread": _per_image(main, images, 1e3),
        "host_side_ms_per_image_shard_writer": _per_image(m["thread_writer"], images, 1e3),
        "host_side_ms_per_image_other_threads": _per_image(
            host - main - m["thread_writer"], images, 1e3
        ),
        "h2d_bytes_per_image": _per_image(h2d, images),
        "h2d_method": how,
        "model_input_bytes_per_image": _per_image(m[f"bytes_{key}"], images),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    register_bench_preset()
    if args.rss_child:
        rss_child(Path(args.rss_child), args)
        return {}

    import torch

    from pmu.runtime import set_threads

    threads = set_threads(args.threads or None)
    tmp = None
    if args.workdir:
        root = Path(args.workdir)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="pmu-bench-")
        root = Path(tmp.name)
    figures: dict[str, Any] = {}
    try:
        t = time.perf_counter()
        ws = build_workspace(root / "main", args.images)
        vocab = build_vocab(ws, args.entities, args.relations, args.device)
        print(f"setup: {args.images} images, vocab, prompts in {time.perf_counter() - t:.1f} s")

        limits = model_limits(args)
        print(f"model-only limits: {json.dumps({k: round(v, 1) for k, v in limits.items()})}")
        set_threads(args.threads or None)
        with ForwardMeter() as meter:
            detects = {}
            for conf in args.detect_conf:
                detects[conf] = run_detect(ws, args, meter, conf)
                print(f"detect conf {conf:g}: {detects[conf]['wall']:.2f} s", flush=True)
            first = detects[args.detect_conf[0]]
            label = run_label(ws, vocab, first["boxes_path"], args, meter)
            print(f"label: {label['wall']:.2f} s", flush=True)
        counts = label["counts"]
        passes_per_image = (counts["samples"] + counts["objects"]) / max(counts["samples"], 1)
        figures["detect"] = {
            f"conf{conf:g}": dict(
                stage_figures(m, "detect", limits["yolo_images_per_s"]),
                boxes=m["counts"]["boxes"],
                impl=m["impl"],
            )
            for conf, m in detects.items()
        }
        figures["label"] = dict(
            stage_figures(label, "label", limits["clip_passes_per_s"] / passes_per_image),
            crops=counts["objects"],
            clip_passes_per_image=round(passes_per_image, 2),
            clip_encode_share_of_loop=round(label["encode_seconds"] / label["wall"], 3),
            decode=label["decode"],
            resize_mode=label["resize_mode"],
        )
        figures["limits"] = {k: round(v, 1) for k, v in limits.items()}
        if not args.skip_cpu_figures:
            figures.update(cpu_figures(ws, vocab, args, detects[args.detect_conf[0]], label, root))
    finally:
        if tmp is not None:
            tmp.cleanup()
    figures["params"] = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "images": args.images,
        "entities_M": args.entities,
        "relations_L": args.relations,
        "boxes_per_image": args.top_k,
        "detect_imgsz": DETECT_IMGSZ,
        "detect_batch": args.detect_batch,
        "detect_workers": args.detect_workers,
        "image_batch": args.image_batch,
        "crop_batch": args.crop_batch,
        "label_workers": args.workers,
        "samples_per_shard": args.samples_per_shard,
        "rss_samples_per_shard": args.rss_samples_per_shard,
        "torch_threads": threads,
        "torch": torch.__version__,
        "models": "yolo11n.yaml + open_clip ViT-B-32, random weights",
    }
    print_report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return figures


def cpu_figures(ws, vocab, args, detect, label, root) -> dict[str, Any]:
    """The first release's CPU ratios: naive loop, FLOP rate, RSS 1x / Fx."""
    from pipeline.labeling_data import read_pairs
    from pmu.runtime import set_threads

    pairs = read_pairs(ws["pairs"])
    naive = naive_label(pairs["image_path"][: args.naive_images], vocab, args)
    naive_diff = compare_with_shards(naive.pop("rel_dense"), ws["root"] / "shards", pairs)
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
    n = args.images
    counts = label["counts"]
    passes = counts["samples"] + counts["objects"]
    fast_loop = detect["wall"] + label["wall"]
    fast_rate = n / fast_loop
    naive_rate = naive["images"] / naive["seconds"]
    naive_no_prompts = naive["images"] / (naive["seconds"] - naive["prompt_seconds"])
    encode_s = label["encode_seconds"]
    return {
        "fast": {"images_per_s": round(fast_rate, 3)},
        "naive": {
            "images": naive["images"],
            "images_per_s": round(naive_rate, 4),
            "images_per_s_without_prompt_reencoding": round(naive_no_prompts, 4),
            "prompt_share": round(naive["prompt_seconds"] / naive["seconds"], 3),
            "prompts_reencoded_per_image": naive["prompts_per_image"],
            "q_rel_vs_reference": naive_diff,
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
                passes * flops_per_pass / label["wall"] / peak, 3
            ),
        },
        "rss": rss,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def print_report(f: dict[str, Any]) -> None:
    p = f["params"]
    stages = {f"detect {k}": v for k, v in f["detect"].items()} | {"label": f["label"]}
    rows = [
        ("images/s", "images_per_s"),
        ("model-only limit, images/s", "limit_images_per_s"),
        ("ratio to the limit", "ratio_to_limit"),
        ("mean GPU utilisation %", "gpu_util_mean_pct"),
        ("main-process CPU ms/image", "main_cpu_ms_per_image"),
        ("  in model forwards", "main_cpu_ms_per_image_in_forwards"),
        ("  in device-side pre/post ops", "main_cpu_ms_per_image_in_device_ops"),
        ("  host side (the rest)", "main_cpu_ms_per_image_host_side"),
        ("    main thread", "host_side_ms_per_image_main_thread"),
        ("    shard writer thread", "host_side_ms_per_image_shard_writer"),
        ("    other threads (torch pool)", "host_side_ms_per_image_other_threads"),
        ("host->device bytes/image", "h2d_bytes_per_image"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines = [
        "",
        "== label throughput (detect-objects + label-objects) ==",
        f"params: {json.dumps(p)}",
        f"limits: {json.dumps(f['limits'])}",
        "".ljust(width) + "".join(name.rjust(16) for name in stages),
    ]
    for title, key in rows:
        lines.append(
            title.ljust(width) + "".join(_fmt(s.get(key)).rjust(16) for s in stages.values())
        )
    lab = f["label"]
    lines.append(
        f"label: {lab['crops']} crops, {lab['clip_passes_per_image']} CLIP passes per image, "
        f"CLIP encode = {lab['clip_encode_share_of_loop']:.0%} of the loop; decode "
        f"{lab['decode']}, resize {lab['resize_mode']}; host->device counted as: "
        + "; ".join(f"{name}: {s['h2d_method']}" for name, s in stages.items())
    )
    if "naive" in f:
        fast, naive, sp, fl = f["fast"], f["naive"], f["speedup"], f["flops"]
        ref = naive["q_rel_vs_reference"]
        lines += [
            f"fast path:  {fast['images_per_s']:.2f} images/s (detect + label loops)",
            f"naive loop: {naive['images_per_s']:.3f} images/s  ({naive['prompt_share']:.0%} "
            f"of it re-encoding {naive['prompts_reencoded_per_image']} prompts per image; "
            f"{naive['images_per_s_without_prompt_reencoding']:.3f} images/s without that)",
            "shards' q_rel vs the naive loop's full distributions: "
            f"max |diff| at the stored relations {ref['max_abs_diff_at_stored']:.2g}, "
            f"a left-out one above the last stored by at most {ref['max_left_out_excess']:.2g}, "
            f"top-1 equal on {ref['top1_agree']} / {ref['images']} images "
            f"(largest reference probability {ref['max_reference_prob']:.3g})",
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
