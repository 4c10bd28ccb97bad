"""label-objects: CLIP soft labels (q_ent per object crop, q_rel per image) written as shards.

Shard i holds the prepared pairs [i*n, (i+1)*n) (minus rejections), and is computed from those
samples alone (batches never cross a shard boundary), so a killed run resumes by skipping
complete shards and still gives byte-identical output, and shards can be farmed out as tasks.
The stage is three pieces that every engine shares: `plan_labeling` (inputs, fingerprint, which
shards are done), `ShardLabeler` (CLIP loaded once; labels whole shards and writes each tar and
its done-marker) and `finish_labeling` (sizes.json, manifest.json, vocabularies).
`label_objects` runs them in this process; `pipeline.ray_engine` runs the middle one on Ray.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.settings import LabelParams, LabelSettings
from pmu import shards
from pmu.errors import InputError
from pmu.io import file_sha256, write_json_atomic

RERUN_EMBED = "re-run `pipeline embed-prompts` with the same --preset / --clip and vocabularies"
# What the DataLoader workers import (the forkserver imports it once; see pmu.runtime).
WORKER_MODULES = ("pipeline.labeling_data", "pipeline.clip_inputs", "torchvision.transforms.v2")
PROGRESS_DIR = ".progress"  # per-shard done markers; removed once the manifest is written


@dataclass(frozen=True)
class LabelJob:
    """One label-objects run, taken by every engine: its settings, the number of prepared pairs
    and shards, and the fingerprint of inputs and parameters (plain values: cheap to send to a
    worker process or node)."""

    settings: LabelSettings
    n: int  # prepared pairs
    n_shards: int
    fingerprint: str

    @property
    def params(self) -> LabelParams:
        return self.settings.params

    def shard_range(self, s: int) -> tuple[int, int]:
        n = self.params.samples_per_shard
        return s * n, min((s + 1) * n, self.n)


def soft_labels(
    feats: Any, prompts: Any, logit_scale: float, tau: float, k: int
) -> tuple[Any, Any, Any, Any]:
    """softmax(s * cos / tau) truncated to its top-k: (indices, probs, kept mass, sharpness)
    on CPU; sharpness [N, 2] holds each full distribution's top-1 mass and entropy (nats).

    `feats` and `prompts` are L2-normalised; the sort is stable so ties order by index.
    """
    import torch

    logits = (logit_scale / tau) * (feats.float() @ prompts.float().T)
    probs = torch.softmax(logits, dim=-1)
    entropy = -(probs * torch.log_softmax(logits, dim=-1)).sum(-1)
    top, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    sharpness = torch.stack([top[..., 0], entropy], dim=-1).cpu()
    top, idx = top[..., :k], idx[..., :k]
    return idx.to(torch.int32).cpu(), top.cpu(), top.sum(dim=-1).cpu(), sharpness


def sharpness_sums(rows: Sequence[Any]) -> list[float]:
    """[rows, sum of top-1 masses, sum of entropies] of sharpness tensors [N, 2] (float64)."""
    import torch

    if not rows:
        return [0, 0.0, 0.0]
    both = torch.cat(list(rows)).double()
    return [int(both.shape[0]), float(both[:, 0].sum()), float(both[:, 1].sum())]


def label_sharpness(done: dict[int, dict[str, Any]], sizes: dict[str, int]) -> dict[str, Any]:
    """How soft the labels are, over every shard (exact: from the full distributions before
    top-k truncation): per label kind the mean top-1 mass, the mean mass beyond the top-1 and
    the mean entropy, with the entropy of a uniform distribution beside it."""
    out: dict[str, Any] = {}
    for kind, size_key in (("q_ent", "entities"), ("q_rel", "relations")):
        n, top1, entropy = 0, 0.0, 0.0
        missing = 0
        for s in sorted(done):
            sums = done[s].get("sharpness", {}).get(kind)
            if sums is None:
                missing += 1
                continue
            n, top1, entropy = n + sums[0], top1 + sums[1], entropy + sums[2]
        out[kind] = {
            "labels": n,
            "mean_top1_mass": round(top1 / n, 6) if n else None,
            "mean_mass_beyond_top1": round(1 - top1 / n, 6) if n else None,
            "mean_entropy_nats": round(entropy / n, 6) if n else None,
            "uniform_entropy_nats": round(math.log(sizes[size_key]), 6)
            if sizes[size_key]
            else None,
            **({"shards_without_figures": missing} if missing else {}),
        }
    return out


def _fingerprint(paths: list[Path], params: dict[str, Any], clip_id: dict) -> str:
    """Inputs + parameters that determine the shards; a resume only reuses matching shards."""
    digest = hashlib.sha256(json.dumps([params, clip_id], sort_keys=True).encode())
    for p in paths:
        digest.update(file_sha256(p).encode() if p and Path(p).exists() else b"-")
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


def plan_labeling(settings: LabelSettings) -> tuple[LabelJob, dict[int, dict[str, Any]]]:
    """Check the inputs, fingerprint them and find the shards already done (to resume)."""
    from pipeline.labeling_data import check_pairs_columns
    from pipeline.models import clip_identity
    from pipeline.prompts import load_prompt_metadata

    s, params = settings, settings.params
    params.check()
    n = check_pairs_columns(s.pairs)
    clip_id = clip_identity(s.preset, s.clip)
    check_prompts(load_prompt_metadata(s.prompts), clip_id, s.entities, s.relations)
    n_shards = (n + params.samples_per_shard - 1) // params.samples_per_shard
    fingerprint = _fingerprint(
        [Path(s.pairs), Path(s.boxes), Path(s.prompts)], params.recorded(), clip_id
    )
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PROGRESS_DIR).mkdir(exist_ok=True)
    job = LabelJob(settings=s, n=n, n_shards=n_shards, fingerprint=fingerprint)
    return job, _complete_shards(out, fingerprint, n_shards)


class ShardLabeler:
    """CLIP and the prompt embeddings loaded once; labels whole shards, writing each shard's tar
    and done-marker. The unit of work of every engine (all of them give the same bytes)."""

    def __init__(self, job: LabelJob, threads: int | None = None) -> None:
        import torch

        from pipeline import labeling_data as data
        from pipeline.clip_inputs import ClipInputSpec, Normaliser
        from pipeline.models import load_clip
        from pipeline.prompts import load_prompts
        from pmu.runtime import (
            auto_workers,
            keep_freed_memory,
            select_device,
            set_threads,
            start_worker_server,
        )

        self.job, self.params = job, job.params
        keep_freed_memory()  # batches reuse heap pages, no mmap + munmap (PMU_MALLOC=system: off)
        self.threads = set_threads(threads)
        torch.manual_seed(self.params.seed)
        self.dev = select_device(job.settings.device)
        self.num_workers = auto_workers(self.params.num_workers, self.dev, cpu_default=2)
        if self.num_workers > 0:
            start_worker_server(WORKER_MODULES)  # the workers' server imports while CLIP loads
        prompt_tensors, _ = load_prompts(job.settings.prompts)
        self.ent_prompts = prompt_tensors["entity"].to(self.dev)
        self.rel_prompts = prompt_tensors["relation"].to(self.dev)
        self.k_ent = min(self.params.k_ent, self.ent_prompts.shape[0])
        self.k_rel = min(self.params.k_rel, self.rel_prompts.shape[0])
        model, preprocess, _ = load_clip(job.settings.preset, job.settings.clip)
        self.model = model.to(self.dev)
        self.clip_spec = ClipInputSpec.from_preprocess(preprocess, self.params.resize_mode)
        self.normalise = Normaliser(self.clip_spec, self.dev)
        self.logit_scale, scale_source = model_logit_scale(model, self.params.logit_scale)
        decode = self.params.decode
        self.decode = (
            decode if decode != "auto" else "device" if self.dev.type == "cuda" else "workers"
        )
        # What this labeler resolved; each done-marker carries it into the manifest.
        self.runtime = {
            "logit_scale": self.logit_scale,
            "logit_scale_source": scale_source,
            "decode": self.decode,
            "device": self.dev.type,
        }
        self._pairs = data.ParquetRows(job.settings.pairs, data.PAIRS_COLUMNS)
        self._boxes = data.ParquetRows(job.settings.boxes)
        self._boxes_by_id: dict[str, dict] | None = None  # only if boxes are not in pair order
        self.encode_seconds = 0.0
        self.images_seen = 0
        self.bytes_to_device = 0  # host -> device traffic of the batches (benchmark proxy)

    def _rows(self, shard_ids: Sequence[int]) -> tuple[list[int], list[dict], list[dict]]:
        """(global index, pair row, detection row) of every sample of these shards."""
        from pipeline.labeling_data import read_boxes

        index, pairs, boxes = [], [], []
        for s in shard_ids:
            start, stop = self.job.shard_range(s)
            p_rows = self._pairs.rows(start, stop)
            b_rows = self._boxes.rows(start, stop)
            if [r["id"] for r in b_rows] != [r["id"] for r in p_rows]:
                # boxes.parquet is written in pair order; anything else is looked up by id.
                if self._boxes_by_id is None:
                    self._boxes_by_id = read_boxes(self.job.settings.boxes)[0]
                missing = [r["id"] for r in p_rows if r["id"] not in self._boxes_by_id]
                if missing:
                    raise InputError(
                        f"{self.job.settings.boxes} lacks {len(missing)} prepared ids "
                        f"(e.g. {missing[0]!r}): re-run detect-objects"
                    )
                b_rows = [self._boxes_by_id[r["id"]] for r in p_rows]
            index.extend(range(start, stop))
            pairs.extend(p_rows)
            boxes.extend(b_rows)
        if len(set(r["id"] for r in pairs)) != len(pairs):
            raise InputError(
                f"{self.job.settings.pairs}: sample ids are not unique", "re-run `pipeline prepare`"
            )
        return index, pairs, boxes

    def _encode(self, pixels: Any) -> Any:
        """L2-normalised image-tower features of uint8 inputs already on the device."""
        import torch.nn.functional as F

        from pmu.runtime import autocast

        t = time.perf_counter()
        images = self.normalise(pixels)  # fp32, before autocast: the reference's arithmetic
        with autocast(self.dev):
            feats = self.model.encode_image(images)
        feats = F.normalize(feats.float(), dim=-1)
        self.encode_seconds += time.perf_counter() - t
        return feats

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's uint8 images and crops on the device, jpg bytes for every sample.

        Worker-made inputs are copied as they are; undecoded JPEGs are decoded, cropped, made
        square and re-encoded on the device. A JPEG the device cannot decode takes the PIL path
        here (its rejection, if PIL refuses it too, joins the batch's rejections).
        """
        import torch

        from pipeline import clip_inputs as ci
        from pipeline import labeling_data as data
        from pipeline.images import ImageRejected, decode_rgb

        def moved(t: Any) -> Any:
            self.bytes_to_device += t.numel() * t.element_size()
            return t.to(self.dev, non_blocking=True)

        pre_images = moved(batch["images"]) if "images" in batch else None
        pre_crops = moved(batch["crops"]) if "crops" in batch else None
        if not batch["undecoded"]:
            return dict(batch, images=pre_images, crops=pre_crops)
        jpegs = data.batch_jpegs(batch)
        self.bytes_to_device += sum(batch["jpeg_sizes"])
        decoded = ci.decode_jpegs(jpegs, self.dev)
        raw_at = {j: u for u, j in enumerate(batch["undecoded"])}
        spec, p = self.clip_spec, self.params
        out: dict[str, Any] = {k: [] for k in ("index", "n_crops", "jpg", "size")}
        out["rejected"] = list(batch["rejected"])
        # The batch's CLIP inputs are written into one device tensor each (no stack / cat).
        shape = (3, spec.size, spec.size)
        images = torch.empty((len(batch["index"]), *shape), dtype=torch.uint8, device=self.dev)
        crops = torch.empty((sum(batch["n_crops"]), *shape), dtype=torch.uint8, device=self.dev)
        capped, capped_at = [], []
        pre_image, pre_crop, k, c = 0, 0, 0, 0
        for j, index in enumerate(batch["index"]):
            jpg, n = batch["jpg"][j], batch["n_crops"][j]
            if j not in raw_at:
                images[k].copy_(pre_images[pre_image])
                crops[c : c + n].copy_(pre_crops[pre_crop : pre_crop + n])
                pre_image, pre_crop = pre_image + 1, pre_crop + n
            else:
                u = raw_at[j]
                img, windows = decoded[u], batch["windows"][u]
                if img is None:  # not for the device decoder after all: PIL, here
                    try:
                        pil = decode_rgb(jpegs[u].numpy().tobytes(), p.max_pixels)
                    except ImageRejected as e:
                        out["rejected"].append((index, e.reason, e.detail))
                        continue
                    item = data.clip_inputs_pil(pil, windows, spec, p.max_side, p.jpeg_quality)
                    images[k].copy_(moved(item["image"]))
                    crops[c : c + n].copy_(moved(item["crops"]))
                    jpg = item["jpg"]
                else:
                    ci.square_tensor(img, spec, out=images[k])
                    for w, (lft, t, r, b) in enumerate(windows):
                        ci.square_tensor(img[:, t:b, lft:r], spec, out=crops[c + w])
                    capped.append(ci.cap_tensor(img, p.max_side))
                    capped_at.append(len(out["jpg"]))
            k, c = k + 1, c + n
            out["index"].append(index)
            out["n_crops"].append(n)
            out["jpg"].append(jpg)
            out["size"].append(batch["size"][j])
        for at, encoded in zip(capped_at, ci.encode_jpegs(capped, p.jpeg_quality), strict=True):
            out["jpg"][at] = encoded
        if out["index"]:
            out["images"], out["crops"] = images[:k], crops[:c]
        return out

    def label(
        self, shard_ids: Sequence[int], progress: bool = False
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Label these shards in order; yield (shard, done-marker) once each one is on disk.

        A shard's tar and marker are written by a background thread while the next shard is
        labelled; it is yielded before the next one is handed to the writer (one write in
        flight; closing the generator waits for it).
        """
        from concurrent.futures import ThreadPoolExecutor

        import torch
        from tqdm import tqdm

        from pipeline import labeling_data as data
        from pmu.runtime import worker_context

        p = self.params
        index, pairs, boxes = self._rows(shard_ids)
        if not index:
            return
        local = {g: i for i, g in enumerate(index)}
        specs = [
            data.LabelItemSpec(
                image_path=pr["image_path"],
                boxes=[] if br["error"] else br["boxes"],
                width=br["width"],
                height=br["height"],
            )
            for pr, br in zip(pairs, boxes, strict=True)
        ]
        dataset = data.LabelDataset(
            specs,
            self.clip_spec,
            p.crop_padding,
            p.max_side,
            p.jpeg_quality,
            p.max_pixels,
            device_decode=self.decode == "device",
        )
        global_batches = data.shard_batches(
            shard_ids, self.job.n, p.samples_per_shard, p.image_batch_size
        )
        batches = [[local[g] for g in b] for b in global_batches]
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=data.collate_label_batch,
            pin_memory=self.dev.type == "cuda",
            persistent_workers=False,
            multiprocessing_context=worker_context(self.num_workers, WORKER_MODULES),
        )
        state: _ShardState | None = None
        writes: list[tuple[int, Any]] = []  # (shard, future), oldest first
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        bar = tqdm(total=len(index), desc="label-objects", unit="img", disable=not progress)
        try:
            with torch.inference_mode():
                for raw in loader:
                    first = raw["index"][0] if raw["index"] else raw["rejected"][0][0]
                    s = index[first] // p.samples_per_shard
                    batch = self._to_device(raw)
                    if state is not None and state.shard != s:
                        closed = self._close_shard(state)
                        yield from _finished(writes)  # the previous shard, written meanwhile
                        writes.append((state.shard, writer.submit(*closed)))
                        state = None
                    if state is None:
                        state = _ShardState(s)
                    self._label_batch(state, batch, pairs, boxes)
                    n_batch = len(raw["index"]) + len(raw["rejected"])
                    self.images_seen += n_batch
                    bar.update(n_batch)
                if state is not None:
                    closed = self._close_shard(state)
                    yield from _finished(writes)
                    writes.append((state.shard, writer.submit(*closed)))
                yield from _finished(writes)
        finally:
            writer.shutdown(wait=True)
            bar.close()

    def _label_batch(
        self, state: _ShardState, batch: dict[str, Any], pairs: list[dict], boxes: list[dict]
    ) -> None:
        """q_rel of the batch's images now, its crops queued; records added to the shard."""
        p = self.params
        for i, reason, detail in batch["rejected"]:
            state.rejected.append({"id": pairs[i]["id"], "reason": reason, "detail": detail})
        if not batch["index"]:
            return
        rel_idx, rel_prob, rel_mass, rel_sharp = soft_labels(
            self._encode(batch["images"]), self.rel_prompts, self.logit_scale, p.tau, self.k_rel
        )
        state.rel_sharpness.append(rel_sharp)
        if batch["crops"].shape[0]:
            state.crop_queue.append(batch["crops"])
            state.queued += int(batch["crops"].shape[0])
            self._flush_crops(state, final=False)
        rel_mass = rel_mass.tolist()
        for j, i in enumerate(batch["index"]):
            state.samples.append(
                _sample_record(
                    pairs[i],
                    boxes[i],
                    batch["jpg"][j],
                    batch["size"][j],
                    batch["n_crops"][j],
                    rel_idx[j],
                    rel_prob[j],
                    rel_mass[j],
                )
            )

    def _flush_crops(self, state: _ShardState, final: bool) -> None:
        """Encode queued crops in fixed-size batches (the tail only at the end of a shard)."""
        B = self.params.crop_batch_size
        while state.queued >= (1 if final else B):
            feats = self._encode(_take_rows(state.crop_queue, min(B, state.queued)))
            state.queued -= int(feats.shape[0])
            state.crop_results.append(
                soft_labels(feats, self.ent_prompts, self.logit_scale, self.params.tau, self.k_ent)
            )

    def _close_shard(self, state: _ShardState) -> tuple[Any, ...]:
        """Encode the shard's last crops and assemble its samples (here: the device work);
        returns the call that writes it (for the writer thread)."""
        import torch

        self._flush_crops(state, final=True)
        results = state.crop_results
        sharpness = {
            "q_ent": sharpness_sums([r[3] for r in results]),
            "q_rel": sharpness_sums(state.rel_sharpness),
        }
        if results:
            ent_idx = torch.cat([r[0] for r in results]).numpy()
            ent_prob = torch.cat([r[1] for r in results]).numpy()
            ent_mass = torch.cat([r[2] for r in results]).tolist()
        else:
            ent_idx = np.zeros((0, self.k_ent), np.int32)
            ent_prob = np.zeros((0, self.k_ent), np.float32)
            ent_mass = []
        samples, offset = [], 0
        for rec in state.samples:
            m = rec.pop("n_crops")
            rec["meta"]["ent_mass"] = ent_mass[offset : offset + m]
            samples.append(
                shards.LabelledSample(
                    ent_idx=ent_idx[offset : offset + m],
                    ent_prob=ent_prob[offset : offset + m],
                    **rec,
                )
            )
            offset += m
        marker = {
            "fingerprint": self.job.fingerprint,
            "samples": len(samples),
            "objects": offset,
            "no_objects": sum(1 for x in samples if not x.meta["boxes"]),
            "rejected": state.rejected,
            "runtime": self.runtime,
            "sharpness": sharpness,
        }
        return self._write_shard, state.shard, samples, marker

    def _write_shard(
        self, shard: int, samples: list[Any], marker: dict[str, Any]
    ) -> dict[str, Any]:
        """Write the shard tar (atomically), then its done-marker."""
        out = Path(self.job.settings.out)
        marker["samples"] = shards.write_shard(out / shards.SHARD_PATTERN.format(shard), samples)
        write_json_atomic(out / PROGRESS_DIR / f"shard-{shard:06d}.json", marker)
        return marker


def _take_rows(queue: list[Any], n: int) -> Any:
    """The first n rows of the queued tensors, removed from the queue: a view when the first
    tensor holds them all (no copy), else one concatenation of just those rows."""
    import torch

    parts, need = [], n
    while need:
        head = queue[0]
        if head.shape[0] <= need:
            parts.append(queue.pop(0))
            need -= head.shape[0]
        else:
            parts.append(head[:need])
            queue[0] = head[need:]
            need = 0
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _finished(writes: list[tuple[int, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
    """Wait for the writes in flight; yield their (shard, marker) in shard order. A consumer
    that stops at a yield leaves no later shard half-submitted (as a kill would)."""
    while writes:
        shard, future = writes.pop(0)
        yield shard, future.result()


def model_logit_scale(model: Any, override: float | None) -> tuple[float, str]:
    """(s, where it came from): the explicit value, else the CLIP's learned exp(logit_scale)."""
    if override is not None:
        return float(override), "param"
    scale = getattr(model, "logit_scale", None)
    if scale is None:
        raise InputError("this CLIP has no logit_scale: pass an explicit logit_scale")
    return float(scale.detach().float().exp().cpu()), "model"


@dataclass
class _ShardState:
    """The shard being assembled: its records, rejections and queued / encoded crops."""

    shard: int

    def __post_init__(self) -> None:
        self.samples: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.crop_queue: list[Any] = []
        self.queued = 0
        self.crop_results: list[tuple[Any, Any, Any, Any]] = []
        self.rel_sharpness: list[Any] = []


def label_objects(
    settings: LabelSettings,
    *,
    progress: bool = True,
    stop_after_shards: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """Label every prepared pair in this process and write shards + sizes.json + manifest.json
    + vocabularies (the local engine; `pipeline.ray_engine.label_objects_ray` is the other).

    `stop_after_shards` ends the run early (as a kill would) after writing that many shards.
    `threads` caps torch's threads (default: every core this process may use).
    """
    t_start = time.perf_counter()
    job, done = plan_labeling(settings)
    todo = [s for s in range(job.n_shards) if s not in done]
    labeler = ShardLabeler(job, threads)
    written_now = 0
    t_loop = time.perf_counter()
    with contextlib.closing(labeler.label(todo, progress)) as labelled:
        for s, marker in labelled:
            done[s] = marker
            written_now += 1
            if stop_after_shards is not None and written_now >= stop_after_shards:
                break
    loop_seconds = time.perf_counter() - t_loop
    if len(done) < job.n_shards:
        return {"complete": False, "shards_written": written_now, "shards_done": len(done)}
    summary = finish_labeling(job, done)
    summary["timing"] = {
        "seconds_total": round(time.perf_counter() - t_start, 3),
        "seconds_loop": round(loop_seconds, 3),
        "seconds_clip_encode": round(labeler.encode_seconds, 3),
        "images_labelled_this_run": labeler.images_seen,
        "images_per_s": round(labeler.images_seen / loop_seconds, 2) if loop_seconds > 0 else None,
        "shards_resumed": job.n_shards - written_now,
        "device": str(labeler.dev),
        "num_workers": labeler.num_workers,
        "engine": "local",
    }
    write_stats(settings.stats, summary)
    return summary


class _LabelActor:
    """Ray: holds one CLIP (`ShardLabeler`); labels the shards it is given and writes them."""

    def __init__(self, job: LabelJob, threads: int) -> None:
        self.labeler = ShardLabeler(job, threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        shard_ids = [int(s) for s in batch["shard"]]
        markers = dict(self.labeler.label(shard_ids))
        return {
            "shard": np.array(shard_ids, dtype=np.int64),
            "marker": np.array([json.dumps(markers[s]) for s in shard_ids], dtype=object),
        }


def label_objects_ray(settings: LabelSettings, *, progress: bool = True) -> dict[str, Any]:
    """label-objects on Ray Data (`pipeline.ray_engine`), one shard per task: the same shard
    folder bytes as locally."""
    from pipeline.ray_engine import run_units

    t_start = time.perf_counter()
    job, done = plan_labeling(settings)
    todo = [s for s in range(job.n_shards) if s not in done]
    t_loop = time.perf_counter()
    units = [{"shard": s} for s in todo]
    rows, pool = run_units(units, _LabelActor, {"job": job}, settings.ray, progress)
    for row in rows:
        done[int(row["shard"])] = json.loads(row["marker"])
    loop_seconds = time.perf_counter() - t_loop
    images = sum(job.shard_range(s)[1] - job.shard_range(s)[0] for s in todo)
    summary = finish_labeling(job, done)
    summary["timing"] = {
        "seconds_total": round(time.perf_counter() - t_start, 3),
        "seconds_loop": round(loop_seconds, 3),
        "images_labelled_this_run": images,
        "images_per_s": round(images / loop_seconds, 2) if loop_seconds > 0 else None,
        "shards_resumed": job.n_shards - len(todo),
        "device": settings.device,
        "num_workers": settings.params.num_workers,
        "engine": "ray",
        **pool,
    }
    write_stats(settings.stats, summary)
    return summary


def write_stats(stats_path: str | os.PathLike | None, summary: dict[str, Any]) -> None:
    """Timings and counts beside the shards' provenance (never inside the manifest)."""
    if stats_path:
        write_json_atomic(stats_path, {"counts": summary["counts"], **summary["timing"]})


def _sample_record(
    pair: dict[str, Any],
    det: dict[str, Any],
    jpg: bytes,
    size: tuple[int, int],
    n_crops: int,
    rel_idx: Any,
    rel_prob: Any,
    rel_mass: float,
) -> dict[str, Any]:
    from pipeline.labeling_data import normalised_boxes

    width, height = size
    det_boxes = [] if det["error"] else det["boxes"]
    meta = {
        "source": pair["source"],
        "itm": int(pair["itm"]),
        "width": width,
        "height": height,
        "boxes": normalised_boxes(det_boxes, width, height),
        "box_classes": list(det["classes"]) if det_boxes else [],
        "box_confs": [round(float(c), 6) for c in det["confs"]] if det_boxes else [],
        "rel_mass": rel_mass,
    }
    return {
        "id": pair["id"],
        "jpg": jpg,
        "caption": pair["caption"],
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


def _provenance(job: LabelJob, done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The manifest's record of what made the shards: creator, models, every stage's
    parameters, the inputs' and vocabularies' hashes."""
    from pipeline.labeling_data import read_boxes_meta
    from pipeline.models import clip_identity
    from pipeline.prompts import load_prompt_metadata
    from pmu import __version__

    st = job.settings
    detect_meta, prompt_meta = read_boxes_meta(st.boxes), load_prompt_metadata(st.prompts)
    stage_params = read_stage_params(st.stage_params)
    return {
        "contract_version": shards.CONTRACT_VERSION,
        "creator": {"package": "prompt-me-up", "version": __version__, "stage": "label-objects"},
        "preset": st.preset,
        "models": {
            "detector": detect_meta.get("detector"),
            "clip": clip_identity(st.preset, st.clip),
        },
        "params": {
            "detect": detect_meta.get("params"),
            "embed_prompts": {
                "templates_entity": json.loads(prompt_meta.get("templates_entity", "[]")),
                "templates_relation": json.loads(prompt_meta.get("templates_relation", "[]")),
            },
            "label": job.params.recorded(),
            "label_runtime": label_runtime(done),
            **({"stages": stage_params} if stage_params else {}),
        },
        "inputs": {
            "pairs_sha256": file_sha256(st.pairs),
            "boxes_sha256": file_sha256(st.boxes),
            "prompts_sha256": file_sha256(st.prompts),
        },
        "vocab": {
            "entities": _vocab_entry(st.entities, shards.ENTITIES_FILE),
            "relations": _vocab_entry(st.relations, shards.RELATIONS_FILE),
        },
    }


def _vocab_size(path: Any) -> int:
    info = json.loads(Path(path).read_text(encoding="utf-8"))
    return len(info.get("entities", info.get("relations", [])))


def _vocab_entry(path: Any, name: str) -> dict[str, Any]:
    info = json.loads(Path(path).read_text(encoding="utf-8"))
    return {
        "file": name,
        "sha256": file_sha256(path),
        "size": len(info["entities" if name == shards.ENTITIES_FILE else "relations"]),
        "source": info.get("source"),
        **({"warning": info["warning"]} if info.get("warning") else {}),
    }


def label_runtime(done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """What the labelers resolved (logit scale used and its source, decode place, device type),
    from the done-markers; a value that differs between shards is listed."""
    values: dict[str, list] = {}
    for s in sorted(done):
        for key, value in done[s].get("runtime", {}).items():
            if value not in values.setdefault(key, []):
                values[key].append(value)
    return {k: v[0] if len(v) == 1 else v for k, v in values.items()}


def finish_labeling(job: LabelJob, done: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """sizes.json, vocabularies, manifest.json; drop stale shards and the progress markers."""
    st, out, n_shards = job.settings, Path(job.settings.out), job.n_shards
    missing = [s for s in range(n_shards) if s not in done]
    if missing:
        raise ValueError(f"shards {missing[:5]} of {n_shards} are not done")
    sizes = {shards.SHARD_PATTERN.format(s): done[s]["samples"] for s in range(n_shards)}
    for stale in shards.shard_paths(out):
        if stale.name not in sizes:
            stale.unlink()
    shutil.copyfile(st.entities, out / shards.ENTITIES_FILE)
    shutil.copyfile(st.relations, out / shards.RELATIONS_FILE)
    write_json_atomic(out / shards.SIZES_FILE, sizes)

    label_rejected = [
        dict(r, stage="label-objects") for s in range(n_shards) for r in done[s]["rejected"]
    ]
    prepare_rejected = _read_prepare_rejected(st.rejected)
    all_rejected = prepare_rejected + label_rejected
    counts = {
        "pairs": job.n,
        "samples": sum(sizes.values()),
        "shards": n_shards,
        "objects": sum(done[s]["objects"] for s in range(n_shards)),
        "images_without_objects": sum(done[s]["no_objects"] for s in range(n_shards)),
        "rejected": len(all_rejected),
        "rejected_prepare": len(prepare_rejected),
        "rejected_label": len(label_rejected),
    }
    manifest = {
        **_provenance(job, done),
        "counts": counts,
        "label_sharpness": label_sharpness(
            done, {"entities": _vocab_size(st.entities), "relations": _vocab_size(st.relations)}
        ),
        "rejected": {
            "by_reason": dict(sorted(Counter(r["reason"] for r in all_rejected).items())),
            "samples": all_rejected,
        },
        # sha256 of every shard, sizes.json and the member hashes: `pipeline verify` detects
        # later content changes.
        "files": shards.hash_shards(out, sizes),
    }
    write_json_atomic(out / shards.MANIFEST_FILE, manifest)
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)
    return {
        "complete": True,
        "counts": counts,
        "label_sharpness": manifest["label_sharpness"],
        "rejected_by_reason": manifest["rejected"]["by_reason"],
        "out": str(out),
    }


def prompts_current(
    prompts_path: str | os.PathLike,
    preset_name: str,
    clip_path: str | None,
    entities_path: str | os.PathLike,
    relations_path: str | os.PathLike,
) -> None:
    """prompts.safetensors must come from this CLIP and these vocabularies (label-objects'
    own consistency check, run before anything is loaded or written)."""
    from pipeline.models import clip_identity
    from pipeline.prompts import load_prompt_metadata
    from pmu.errors import require_file

    path = require_file(prompts_path, "prompt embeddings", RERUN_EMBED)
    try:
        meta = load_prompt_metadata(path)
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types)
        raise InputError(f"{path} is not a readable safetensors file ({exc})", RERUN_EMBED) from exc
    check_prompts(meta, clip_identity(preset_name, clip_path), entities_path, relations_path)


def check_prompts(meta: dict[str, str], clip_id: dict, entities: Any, relations: Any) -> None:
    """Refuse prompts made by another CLIP or for other vocabularies (stale inputs)."""
    if (meta.get("clip_model"), meta.get("clip_weights")) != (clip_id["model"], clip_id["weights"]):
        raise InputError(
            f"stale prompts: they were embedded with CLIP {meta.get('clip_model')}/"
            f"{meta.get('clip_weights')} but labeling uses {clip_id['model']}/{clip_id['weights']}",
            RERUN_EMBED,
        )
    for name, path in (("entities", entities), ("relations", relations)):
        if meta.get(f"{name}_sha256") != file_sha256(path):
            raise InputError(
                f"stale prompts: they do not match {path} ({name} changed)", RERUN_EMBED
            )


def read_stage_params(spec: str | None) -> dict | None:
    """`--stage-params params.yaml` -> the dict recorded in the shard manifest."""
    if not spec:
        return None
    import yaml

    from pmu.errors import require_file

    path = require_file(spec, "--stage-params file", "pass params.yaml, or leave it out")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not readable YAML ({exc})", "fix the file") from None


# ----------------------------------------------------------------------------- the stage


def check_inputs(settings: LabelSettings) -> None:
    """Everything the command can check before a model loads: pairs, boxes, vocabularies,
    preset, CLIP file, stale prompts, device."""
    from pipeline import checks

    s = settings
    checks.pairs_table(s.pairs, ("id", "source", "image_path", "caption", "itm"))
    checks.boxes_cover_pairs(s.boxes, s.pairs)
    checks.vocabulary(s.entities, "entities")
    checks.vocabulary(s.relations, "relations")
    checks.preset(s.preset)
    checks.weights_file(s.clip, "CLIP checkpoint", "--clip")
    prompts_current(s.prompts, s.preset, s.clip, s.entities, s.relations)
    checks.device(s.device)
    s.params.check()
    read_stage_params(s.stage_params)


def run_stage(settings: LabelSettings, *, progress: bool = True) -> str:
    """label-objects as the command runs it: checks, the engine, the metrics file; returns
    what the command prints."""
    check_inputs(settings)
    if settings.engine == "ray":
        s = label_objects_ray(settings, progress=progress)
    else:
        s = label_objects(settings, progress=progress)
    c, t = s["counts"], s["timing"]
    if settings.metrics:
        headline = {**c, "rejected_by_reason": s["rejected_by_reason"]}
        write_json_atomic(settings.metrics, {**headline, "label_sharpness": s["label_sharpness"]})
    lines = [
        f"label-objects: {c['samples']} samples in {c['shards']} shards ({t['shards_resumed']} "
        f"resumed), {c['objects']} objects, {c['images_without_objects']} images without "
        f"detections, {c['rejected']} rejected (prepare {c['rejected_prepare']}, "
        f"label {c['rejected_label']}) -> {s['out']}"
    ]
    lines += [f"  rejected {n:>6}  {reason}" for reason, n in s["rejected_by_reason"].items()]
    for kind, fig in s["label_sharpness"].items():
        if fig["labels"]:
            lines.append(
                f"  {kind}: mean top-1 mass {fig['mean_top1_mass']:.3f}, beyond the top-1 "
                f"{fig['mean_mass_beyond_top1']:.3f}, entropy {fig['mean_entropy_nats']:.3f} "
                f"nats (uniform {fig['uniform_entropy_nats']:.3f}) over {fig['labels']} labels"
            )
    lines.append(
        f"  {t['images_labelled_this_run']} images in {t['seconds_loop']} s "
        f"({t['images_per_s']} img/s; CLIP {t.get('seconds_clip_encode', '-')} s) on "
        f"{t['device']} with {t['num_workers']} workers, engine {t['engine']}; "
        f"total {t['seconds_total']} s"
    )
    return "\n".join(lines)
