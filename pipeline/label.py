"""label-objects: CLIP soft labels (q_ent per object crop, q_rel per image) written as shards.

Shard i holds the prepared pairs [i*n, (i+1)*n) (minus rejections), and is computed from those
samples alone (batches never cross a shard boundary), so a killed run resumes by skipping
complete shards and still gives byte-identical output, and shards can be farmed out as tasks.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import shards
from pipeline.images import DEFAULT_MAX_PIXELS

PROGRESS_DIR = ".progress"  # per-shard done markers; removed once the manifest is written


@dataclass(frozen=True)
class LabelParams:
    samples_per_shard: int = 1000
    image_batch_size: int = 32  # whole images per CLIP forward (and per DataLoader batch)
    crop_batch_size: int = 128  # object crops per CLIP forward, gathered across images
    num_workers: int = 2  # DataLoader workers: decode, crop, preprocess, re-encode jpg
    tau: float = 1.0  # softmax temperature
    logit_scale: float = 100.0  # CLIP logit scale s (openai CLIP learned 100)
    k_ent: int = 10  # kept entries of q_ent per object (>= M keeps all)
    k_rel: int = 10  # kept entries of q_rel per image (>= L keeps all)
    crop_padding: float = 0.0  # crops grow by this fraction of the box size per side
    max_side: int = 512  # longest side of the stored jpg
    jpeg_quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int = 0

    def recorded(self) -> dict[str, Any]:
        """The parameters that shape the shards (worker counts do not)."""
        d = asdict(self)
        d.pop("num_workers")
        return d


def soft_labels(
    feats: Any, prompts: Any, logit_scale: float, tau: float, k: int
) -> tuple[Any, Any, Any]:
    """softmax(s * cos / tau) truncated to its top-k: (indices, probs, kept mass) on CPU.

    `feats` and `prompts` are L2-normalised; the sort is stable so ties order by index.
    """
    import torch

    logits = (logit_scale / tau) * (feats.float() @ prompts.float().T)
    probs = torch.softmax(logits, dim=-1)
    top, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    top, idx = top[..., :k], idx[..., :k]
    return idx.to(torch.int32).cpu(), top.cpu(), top.sum(dim=-1).cpu()


def _fingerprint(paths: list[Path], params: dict[str, Any], clip_id: dict) -> str:
    """Inputs + parameters that determine the shards; a resume only reuses matching shards."""
    digest = hashlib.sha256(json.dumps([params, clip_id], sort_keys=True).encode())
    for p in paths:
        digest.update(shards.file_sha256(p).encode() if p and Path(p).exists() else b"-")
    return digest.hexdigest()


def _complete_shards(out: Path, fingerprint: str, n_shards: int) -> dict[int, dict[str, Any]]:
    """Shards whose marker matches this run and whose tar has the recorded member count."""
    import tarfile

    done = {}
    for s in range(n_shards):
        marker = out / PROGRESS_DIR / f"shard-{s:06d}.json"
        tar_path = out / shards.SHARD_PATTERN.format(s)
        if not (marker.is_file() and tar_path.is_file()):
            continue
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            with tarfile.open(tar_path, "r:") as tar:
                members = sum(1 for _ in tar)
        except (OSError, ValueError, tarfile.TarError):
            continue
        if info.get("fingerprint") == fingerprint and members == 7 * info["samples"]:
            done[s] = info
    return done


def label_objects(
    pairs_path: str | os.PathLike,
    boxes_path: str | os.PathLike,
    prompts_path: str | os.PathLike,
    entities_path: str | os.PathLike,
    relations_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    preset: str = "tiny",
    clip_path: str | os.PathLike | None = None,
    params: LabelParams = LabelParams(),
    device: str = "auto",
    prepare_rejected_path: str | os.PathLike | None = None,
    stats_path: str | os.PathLike | None = None,
    stage_params: dict[str, Any] | None = None,
    progress: bool = True,
    stop_after_shards: int | None = None,
) -> dict[str, Any]:
    """Label every prepared pair and write shards + sizes.json + manifest.json + vocabularies.

    `stage_params` (e.g. all of params.yaml) is recorded in the manifest as given.
    `stop_after_shards` ends the run early (as a kill would) after writing that many shards.
    """
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from pipeline import labeling_data as data
    from pipeline.models import clip_identity, load_clip
    from pipeline.prompts import load_prompts
    from pipeline.runtime import autocast, select_device, set_threads

    if params.samples_per_shard < 1 or params.image_batch_size < 1 or params.crop_batch_size < 1:
        raise ValueError("samples_per_shard, image_batch_size and crop_batch_size must be >= 1")
    if params.tau <= 0 or params.k_ent < 1 or params.k_rel < 1:
        raise ValueError("tau must be > 0 and k_ent, k_rel >= 1")
    t_start = time.perf_counter()
    set_threads()
    torch.manual_seed(params.seed)
    dev = select_device(device)
    out = Path(out_dir)

    pairs = data.read_pairs(pairs_path)
    boxes, detect_meta = data.read_boxes(boxes_path)
    prompt_tensors, prompt_meta = load_prompts(prompts_path)
    clip_id = clip_identity(preset, clip_path)
    _check_prompts(prompt_meta, clip_id, entities_path, relations_path)
    ent_prompts = prompt_tensors["entity"].to(dev)
    rel_prompts = prompt_tensors["relation"].to(dev)
    k_ent = min(params.k_ent, ent_prompts.shape[0])
    k_rel = min(params.k_rel, rel_prompts.shape[0])

    n = len(pairs["id"])
    missing = [sid for sid in pairs["id"] if sid not in boxes]
    if missing:
        raise ValueError(
            f"{boxes_path} lacks {len(missing)} prepared ids (e.g. {missing[0]!r}): "
            "re-run detect-objects"
        )
    n_shards = (n + params.samples_per_shard - 1) // params.samples_per_shard
    fingerprint = _fingerprint(
        [Path(pairs_path), Path(boxes_path), Path(prompts_path)], params.recorded(), clip_id
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    done = _complete_shards(out, fingerprint, n_shards)
    todo = [s for s in range(n_shards) if s not in done]

    model, preprocess, _ = load_clip(preset, clip_path)
    model = model.to(dev)
    on_cuda = dev.type == "cuda"
    specs = [
        data.LabelItemSpec(
            image_path=path,
            boxes=[] if boxes[sid]["error"] else boxes[sid]["boxes"],
            width=boxes[sid]["width"],
            height=boxes[sid]["height"],
        )
        for sid, path in zip(pairs["id"], pairs["image_path"], strict=True)
    ]
    dataset = data.LabelDataset(
        specs,
        preprocess,
        data.clip_image_size(preprocess),
        params.crop_padding,
        params.max_side,
        params.jpeg_quality,
        params.max_pixels,
    )
    batches = list(data.shard_batches(todo, n, params.samples_per_shard, params.image_batch_size))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=params.num_workers,
        collate_fn=data.collate_label_batch,
        pin_memory=on_cuda,
        persistent_workers=False,
    )

    def encode(images: Any) -> Any:
        with autocast(dev):
            feats = model.encode_image(images.to(dev, non_blocking=True))
        return F.normalize(feats.float(), dim=-1)

    encode_seconds = 0.0
    shard_state: dict[str, Any] = {}

    def start_shard(s: int) -> None:
        shard_state.clear()
        shard_state.update(
            shard=s, samples=[], rejected=[], crop_queue=[], queued=0, crop_results=[]
        )

    def flush_crops(final: bool) -> None:
        """Encode queued crops in fixed-size batches (the tail only at the end of a shard)."""
        nonlocal encode_seconds
        B = params.crop_batch_size
        if shard_state["queued"] < (1 if final else B):
            return
        queue = torch.cat(shard_state["crop_queue"])
        n_full = (queue.shape[0] // B) * B
        take = queue.shape[0] if final else n_full
        t = time.perf_counter()
        for start in range(0, take, B):
            feats = encode(queue[start : start + B])
            shard_state["crop_results"].append(
                soft_labels(feats, ent_prompts, params.logit_scale, params.tau, k_ent)
            )
        encode_seconds += time.perf_counter() - t
        rest = queue[take:]
        shard_state["crop_queue"] = [rest] if rest.shape[0] else []
        shard_state["queued"] = int(rest.shape[0])

    def finish_shard() -> None:
        flush_crops(final=True)
        results = shard_state["crop_results"]
        if results:
            ent_idx = torch.cat([r[0] for r in results]).numpy()
            ent_prob = torch.cat([r[1] for r in results]).numpy()
            ent_mass = torch.cat([r[2] for r in results]).numpy()
        else:
            ent_idx = np.zeros((0, k_ent), np.int32)
            ent_prob = np.zeros((0, k_ent), np.float32)
            ent_mass = np.zeros((0,), np.float32)
        samples, offset = [], 0
        for rec in shard_state["samples"]:
            m = rec.pop("n_crops")
            rec["meta"]["ent_mass"] = [float(v) for v in ent_mass[offset : offset + m]]
            samples.append(
                shards.LabelledSample(
                    ent_idx=ent_idx[offset : offset + m],
                    ent_prob=ent_prob[offset : offset + m],
                    **rec,
                )
            )
            offset += m
        s = shard_state["shard"]
        count = shards.write_shard(out / shards.SHARD_PATTERN.format(s), samples)
        marker = {
            "fingerprint": fingerprint,
            "samples": count,
            "objects": offset,
            "no_objects": sum(1 for x in samples if not x.meta["boxes"]),
            "rejected": shard_state["rejected"],
        }
        shards.write_json_atomic(out / PROGRESS_DIR / f"shard-{s:06d}.json", marker)
        done[s] = marker

    written_now = 0
    t_loop = time.perf_counter()
    n_todo_images = sum(len(b) for b in batches)
    bar = tqdm(total=n_todo_images, desc="label-objects", unit="img", disable=not progress)
    with torch.inference_mode():
        for batch in loader:
            first = batch["index"][0] if batch["index"] else batch["rejected"][0][0]
            s = first // params.samples_per_shard
            if shard_state and shard_state["shard"] != s:
                finish_shard()
                written_now += 1
                if stop_after_shards is not None and written_now >= stop_after_shards:
                    break
            if not shard_state or shard_state["shard"] != s:
                start_shard(s)
            for i, reason, detail in batch["rejected"]:
                shard_state["rejected"].append(
                    {"id": pairs["id"][i], "reason": reason, "detail": detail}
                )
            if batch["index"]:
                t = time.perf_counter()
                rel_idx, rel_prob, rel_mass = soft_labels(
                    encode(batch["images"]), rel_prompts, params.logit_scale, params.tau, k_rel
                )
                encode_seconds += time.perf_counter() - t
                if batch["crops"].shape[0]:
                    shard_state["crop_queue"].append(batch["crops"].to(dev, non_blocking=True))
                    shard_state["queued"] += int(batch["crops"].shape[0])
                    flush_crops(final=False)
                for j, i in enumerate(batch["index"]):
                    shard_state["samples"].append(
                        _sample_record(
                            pairs,
                            boxes,
                            i,
                            batch["jpg"][j],
                            batch["size"][j],
                            batch["n_crops"][j],
                            rel_idx[j],
                            rel_prob[j],
                            float(rel_mass[j]),
                        )
                    )
            bar.update(len(batch["index"]) + len(batch["rejected"]))
        else:
            if shard_state:
                finish_shard()
                written_now += 1
    bar.close()
    loop_seconds = time.perf_counter() - t_loop
    if len(done) < n_shards:
        return {"complete": False, "shards_written": written_now, "shards_done": len(done)}

    summary = _finish_run(
        out,
        n,
        n_shards,
        done,
        pairs_path,
        boxes_path,
        prompts_path,
        entities_path,
        relations_path,
        prepare_rejected_path,
        preset,
        clip_id,
        detect_meta,
        prompt_meta,
        params,
        stage_params,
    )
    timing = {
        "seconds_total": round(time.perf_counter() - t_start, 3),
        "seconds_loop": round(loop_seconds, 3),
        "seconds_clip_encode": round(encode_seconds, 3),
        "images_labelled_this_run": n_todo_images,
        "images_per_s": round(n_todo_images / loop_seconds, 2) if loop_seconds > 0 else None,
        "shards_resumed": n_shards - written_now,
        "device": str(dev),
        "num_workers": params.num_workers,
    }
    summary["timing"] = timing
    if stats_path:
        Path(stats_path).parent.mkdir(parents=True, exist_ok=True)
        shards.write_json_atomic(stats_path, {"counts": summary["counts"], **timing})
    return summary


def _check_prompts(meta: dict[str, str], clip_id: dict, entities: Any, relations: Any) -> None:
    """Refuse prompts made by another CLIP or for other vocabularies (stale inputs)."""
    if (meta.get("clip_model"), meta.get("clip_weights")) != (clip_id["model"], clip_id["weights"]):
        raise ValueError(
            f"prompts were embedded with CLIP {meta.get('clip_model')}/{meta.get('clip_weights')} "
            f"but labeling uses {clip_id['model']}/{clip_id['weights']}: re-run embed-prompts"
        )
    for name, path in (("entities", entities), ("relations", relations)):
        if meta.get(f"{name}_sha256") != shards.file_sha256(path):
            raise ValueError(f"prompts do not match {path} ({name} changed): re-run embed-prompts")


def _sample_record(
    pairs: dict[str, list],
    boxes: dict[str, dict],
    i: int,
    jpg: bytes,
    size: tuple[int, int],
    n_crops: int,
    rel_idx: Any,
    rel_prob: Any,
    rel_mass: float,
) -> dict[str, Any]:
    from pipeline.labeling_data import normalised_boxes

    sid = pairs["id"][i]
    det = boxes[sid]
    width, height = size
    det_boxes = [] if det["error"] else det["boxes"]
    meta = {
        "source": pairs["source"][i],
        "itm": int(pairs["itm"][i]),
        "width": width,
        "height": height,
        "boxes": normalised_boxes(det_boxes, width, height),
        "box_classes": list(det["classes"]) if det_boxes else [],
        "box_confs": [round(float(c), 6) for c in det["confs"]] if det_boxes else [],
        "rel_mass": rel_mass,
    }
    return {
        "id": sid,
        "jpg": jpg,
        "caption": pairs["caption"][i],
        "meta": meta,
        "rel_idx": rel_idx.numpy(),
        "rel_prob": rel_prob.numpy(),
        "n_crops": n_crops,
    }


def _read_prepare_rejected(path: str | os.PathLike | None) -> list[dict[str, str]]:
    if not path or not Path(path).is_file():
        return []
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            rec = json.loads(line)
            entry = {
                "id": str(rec.get("id")),
                "reason": str(rec.get("reason")),
                "stage": str(rec.get("stage", "prepare")),
            }
            if rec.get("detail"):
                entry["detail"] = str(rec["detail"])
            out.append(entry)
    return out


def _vocab_entry(path: Any, name: str) -> dict[str, Any]:
    info = json.loads(Path(path).read_text(encoding="utf-8"))
    return {
        "file": name,
        "sha256": shards.file_sha256(path),
        "size": len(info["entities" if name == shards.ENTITIES_FILE else "relations"]),
        "source": info.get("source"),
        **({"warning": info["warning"]} if info.get("warning") else {}),
    }


def _finish_run(
    out: Path,
    n: int,
    n_shards: int,
    done: dict[int, dict],
    pairs_path: Any,
    boxes_path: Any,
    prompts_path: Any,
    entities_path: Any,
    relations_path: Any,
    prepare_rejected_path: Any,
    preset: str,
    clip_id: dict,
    detect_meta: dict,
    prompt_meta: dict,
    params: LabelParams,
    stage_params: dict | None,
) -> dict[str, Any]:
    """sizes.json, vocabularies, manifest.json; drop stale shards and the progress markers."""
    from pipeline import __version__

    sizes = {shards.SHARD_PATTERN.format(s): done[s]["samples"] for s in range(n_shards)}
    for stale in shards.shard_paths(out):
        if stale.name not in sizes:
            stale.unlink()
    shutil.copyfile(entities_path, out / shards.ENTITIES_FILE)
    shutil.copyfile(relations_path, out / shards.RELATIONS_FILE)
    shards.write_json_atomic(out / shards.SIZES_FILE, sizes)

    label_rejected = [
        dict(r, stage="label-objects") for s in range(n_shards) for r in done[s]["rejected"]
    ]
    prepare_rejected = _read_prepare_rejected(prepare_rejected_path)
    all_rejected = prepare_rejected + label_rejected
    counts = {
        "pairs": n,
        "samples": sum(sizes.values()),
        "shards": n_shards,
        "objects": sum(done[s]["objects"] for s in range(n_shards)),
        "images_without_objects": sum(done[s]["no_objects"] for s in range(n_shards)),
        "rejected": len(all_rejected),
        "rejected_prepare": len(prepare_rejected),
        "rejected_label": len(label_rejected),
    }
    manifest = {
        "contract_version": shards.CONTRACT_VERSION,
        "creator": {"package": "prompt-me-up", "version": __version__, "stage": "label-objects"},
        "preset": preset,
        "models": {"detector": detect_meta.get("detector"), "clip": clip_id},
        "params": {
            "detect": detect_meta.get("params"),
            "embed_prompts": {
                "templates_entity": json.loads(prompt_meta.get("templates_entity", "[]")),
                "templates_relation": json.loads(prompt_meta.get("templates_relation", "[]")),
            },
            "label": params.recorded(),
            **({"stages": stage_params} if stage_params else {}),
        },
        "inputs": {
            "pairs_sha256": shards.file_sha256(pairs_path),
            "boxes_sha256": shards.file_sha256(boxes_path),
            "prompts_sha256": shards.file_sha256(prompts_path),
        },
        "vocab": {
            "entities": _vocab_entry(entities_path, shards.ENTITIES_FILE),
            "relations": _vocab_entry(relations_path, shards.RELATIONS_FILE),
        },
        "counts": counts,
        "rejected": {
            "by_reason": dict(sorted(Counter(r["reason"] for r in all_rejected).items())),
            "samples": all_rejected,
        },
    }
    shards.write_json_atomic(out / shards.MANIFEST_FILE, manifest)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    return {
        "complete": True,
        "counts": counts,
        "rejected_by_reason": manifest["rejected"]["by_reason"],
        "out": str(out),
    }
