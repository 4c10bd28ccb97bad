"""Shard streaming for pretraining: WebDataset pipeline, per-sample tensors and batch collation.

Each rank and DataLoader worker reads an endless, seeded stream of shards (reshuffled every pass;
`split_by_node` then `split_by_worker`), shuffles samples in a buffer, decodes them (PIL, no
pickle, no WebDataset auto-decoders) and batches them in the worker. The trainer takes exactly
`steps_per_epoch(...)` batches per epoch on every rank, so all ranks run the same number of
steps. Bad samples are counted and reported with their reasons instead of stopping the run.
"""

from __future__ import annotations

import io
import random
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline.images import pil_open
from pmu import shards as contract
from pmu.errors import InputError

Image.MAX_IMAGE_PIXELS = 64_000_000  # refuse decompression bombs in shards


def vit_pixels(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> [3, size, size] uint8: bicubic resize to the ViT's square input.

    The one image preprocessing of the student (pretraining, fine-tuning, alignment plot). The
    model normalises on its device with its own encoder's mean and std
    (`PretrainModel.normalise`): a quarter of the bytes of float pixels through the loader's
    shared memory, pinning and host-to-device copies."""
    img = img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


@dataclass
class DataConfig:
    shard_dir: str
    batch_size: int = 8
    max_len: int = 80  # caption tokens, [CLS]/[SEP] included (the paper's 80)
    image_size: int = 64  # square ViT input; normalised boxes map onto it unchanged
    num_workers: int = 0
    shuffle_buffer: int = 256
    seed: int = 0
    n_entities: int = 0  # label indices are checked against the vocabularies
    n_relations: int = 0
    max_consecutive_bad: int = 1000  # this many bad samples in a row: the data is broken, stop


# ------------------------------------------------------------------------------ shard lists


def shard_urls(shard_dir: str | Path) -> list[str]:
    """Shard paths in sizes.json order (sorted names); every listed shard must exist."""
    shard_dir = Path(shard_dir)
    if not (shard_dir / contract.SIZES_FILE).is_file():
        raise FileNotFoundError(f"{shard_dir}/{contract.SIZES_FILE} missing: not a shard folder")
    names = sorted(contract.read_sizes(shard_dir))
    missing = [n for n in names if not (shard_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"shards listed in sizes.json but missing: {missing[:5]}")
    if not names:
        raise ValueError(f"{shard_dir}: sizes.json lists no shards")
    return [str(shard_dir / n) for n in names]


def total_samples(shard_dir: str | Path) -> int:
    return int(sum(contract.read_sizes(shard_dir).values()))


def steps_per_epoch(n_samples: int, world_size: int, batch_size: int) -> int:
    """Batches per rank per epoch: floor(samples / (world * batch)), the same on every rank."""
    steps = n_samples // (world_size * batch_size)
    if steps < 1:
        raise ValueError(
            f"{n_samples} samples cannot fill one batch of {batch_size} on each of "
            f"{world_size} ranks; lower the batch size"
        )
    return steps


class SampleStream(torch.utils.data.IterableDataset):
    """Endless raw samples for this rank and worker, one shuffled pass over its shards at a time.

    Pass r of epoch e: the shard list shuffled with seed (seed, e, r), split with
    `split_by_node` then `split_by_worker`, read with `tarfile_to_samples`, and shuffled in a
    buffer that is flushed at the end of the pass, so a balanced epoch sees every sample once.
    When shards are fewer than ranks × workers, the list is repeated within a pass so that
    every worker gets at least one shard (ranks then share shards instead of starving).
    """

    def __init__(self, urls: list[str], seed: int, epoch: int, bufsize: int, handler):
        self.urls, self.seed, self.epoch = list(urls), seed, epoch
        self.bufsize, self.handler = bufsize, handler

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world, worker, n_workers = wds.utils.pytorch_worker_info()
        copies = -(-world * n_workers // len(self.urls))  # ceil: >= 1 shard per worker
        for r in range(1 << 62):
            order = list(self.urls) * copies
            random.Random(f"shards:{self.seed}:{self.epoch}:{r}").shuffle(order)
            src = wds.split_by_worker(wds.split_by_node([{"url": u} for u in order]))
            samples = wds.tarfile_to_samples(handler=self.handler)(src)
            if self.bufsize > 1:
                rng = random.Random(f"samples:{self.seed}:{self.epoch}:{r}:{rank}:{worker}")
                samples = wds.shuffle(self.bufsize, initial=self.bufsize, rng=rng)(samples)
            n = 0
            for n, sample in enumerate(samples, 1):  # noqa: B007
                yield sample
            if n == 0 and r > 0:
                raise RuntimeError(f"rank {rank} worker {worker}: its shards hold no samples")


# ------------------------------------------------------------------------------ bad samples


def bad_reason(exn: Exception) -> str:
    """Why a sample was rejected, one reason per kind of failure (object addresses would make
    every sample unique)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(exn).__name__}: {exn}")[:200]


class BadSamples:
    """Per-process tally of rejected samples; collate ships it to the main process."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.pending: Counter[str] = Counter()
        self.consecutive = 0

    def handler(self, exn: Exception) -> bool:
        reason = bad_reason(exn)
        self.pending[reason] += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} bad samples in a row, last: {reason}; the shards look broken"
            ) from exn
        return True  # go on with the next sample

    def good(self) -> None:
        self.consecutive = 0

    def pop(self) -> dict[str, int]:
        out, self.pending = dict(self.pending), Counter()
        return out


# ------------------------------------------------------------------------------ samples


def preprocess(raw: dict[str, Any], cfg: DataConfig) -> dict[str, Any]:
    """Raw tar members -> checked numpy sample (image resized, CHW uint8)."""
    unexpected = [k for k in raw if not k.startswith("__") and k not in contract.MEMBER_ORDER]
    if unexpected:
        raise ValueError(f"unexpected members {unexpected} in {raw.get('__key__')}")
    s = contract.decode_sample(raw)
    meta = s["meta"]
    with pil_open(io.BytesIO(s["jpg"])) as im:
        pixels = vit_pixels(im, cfg.image_size)
    boxes = np.asarray(meta.get("boxes", []), dtype=np.float32).reshape(-1, 4)
    ent_idx, ent_prob = s["ent_idx"].astype(np.int64), s["ent_prob"].astype(np.float32)
    rel_idx, rel_prob = s["rel_idx"].astype(np.int64).ravel(), s["rel_prob"].astype(np.float32)
    itm = meta.get("itm")
    if itm not in (0, 1):
        raise ValueError(f"itm must be 0 or 1, got {itm!r}")
    if ent_idx.ndim != 2 or ent_idx.shape[0] != len(boxes) or ent_prob.shape != ent_idx.shape:
        raise ValueError(f"entity labels {ent_idx.shape}/{ent_prob.shape} vs {len(boxes)} boxes")
    if rel_prob.ravel().shape != rel_idx.shape:
        raise ValueError(f"relation labels {rel_idx.shape} vs {rel_prob.shape}")
    if not np.isfinite(boxes).all() or not np.isfinite(ent_prob).all():
        raise ValueError("non-finite boxes or probabilities")
    if cfg.n_entities and ent_idx.size and (ent_idx.min() < 0 or ent_idx.max() >= cfg.n_entities):
        raise ValueError(f"entity index out of range [0, {cfg.n_entities})")
    if cfg.n_relations and rel_idx.size and (rel_idx.min() < 0 or rel_idx.max() >= cfg.n_relations):
        raise ValueError(f"relation index out of range [0, {cfg.n_relations})")
    if not s["caption"].strip():
        raise ValueError("empty caption")
    return {
        "id": str(meta.get("id", s["__key__"])),
        "caption": s["caption"],
        "pixel_values": pixels,
        "itm": int(itm),
        "boxes": boxes,
        "ent_idx": ent_idx,
        "ent_prob": ent_prob,
        "rel_idx": rel_idx,
        "rel_prob": rel_prob.ravel(),
    }


def require_valid_sample(cfg: DataConfig) -> None:
    """At least one sample of the folder passes `preprocess`, else an InputError saying why:
    the endless loader would otherwise stop deep in a worker with a traceback. Reads in shard
    order until the first good sample (usually the first one), so it costs next to nothing
    on usable data and draws no random numbers."""
    rejected: Counter[str] = Counter()
    for url in shard_urls(cfg.shard_dir):
        try:
            for raw in contract.iter_raw_samples(url):
                try:
                    preprocess(raw, cfg)
                    return
                except Exception as e:  # noqa: BLE001 - what the loader's handler skips too
                    rejected[bad_reason(e)] += 1
        except (OSError, ValueError, tarfile.TarError) as e:
            rejected[bad_reason(e)] += 1
    where = f"--shards {cfg.shard_dir}"
    if not rejected:
        raise InputError(
            f"{where}: the shards hold no samples (sizes.json says {total_samples(cfg.shard_dir)})"
            "; re-run `pipeline label-objects`, `pipeline verify` lists what is wrong"
        )
    reason, n = rejected.most_common(1)[0]
    raise InputError(
        f"{where}: no valid sample: all {sum(rejected.values())} rejected (most often, {n}x: "
        f"{reason}); `pipeline verify {cfg.shard_dir}` lists every problem"
    )


def _pad(arrays: list[np.ndarray], shape: tuple[int, ...], dtype) -> np.ndarray:
    out = np.zeros((len(arrays), *shape), dtype=dtype)
    for i, a in enumerate(arrays):
        out[(i, *tuple(slice(0, n) for n in a.shape))] = a
    return out


class Collate:
    """Samples -> batch of tensors: tokenised captions, images, padded objects with a mask."""

    def __init__(self, tokenizer, max_len: int, bad: BadSamples | None = None):
        self.tokenizer, self.max_len, self.bad = tokenizer, max_len, bad

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        enc = self.tokenizer(
            [s["caption"] for s in samples],
            padding="longest",
            truncation=True,
            max_length=self.max_len,
            return_tensors="pt",
        )
        n_obj = max(1, max(len(s["boxes"]) for s in samples))  # >= 1 keeps fc_ent in the graph
        k_ent = max(1, max(s["ent_idx"].shape[1] if s["ent_idx"].ndim == 2 else 0 for s in samples))
        k_rel = max(1, max(len(s["rel_idx"]) for s in samples))
        box_mask = np.zeros((len(samples), n_obj), dtype=bool)
        for i, s in enumerate(samples):
            box_mask[i, : len(s["boxes"])] = True
        batch = {
            "ids": [s["id"] for s in samples],
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "pixel_values": torch.from_numpy(np.stack([s["pixel_values"] for s in samples])),
            "itm": torch.tensor([s["itm"] for s in samples], dtype=torch.long),
            "boxes": torch.from_numpy(_pad([s["boxes"] for s in samples], (n_obj, 4), np.float32)),
            "box_mask": torch.from_numpy(box_mask),
            "ent_idx": torch.from_numpy(
                _pad([s["ent_idx"] for s in samples], (n_obj, k_ent), np.int64)
            ),
            "ent_prob": torch.from_numpy(
                _pad([s["ent_prob"] for s in samples], (n_obj, k_ent), np.float32)
            ),
            "rel_idx": torch.from_numpy(_pad([s["rel_idx"] for s in samples], (k_rel,), np.int64)),
            "rel_prob": torch.from_numpy(
                _pad([s["rel_prob"] for s in samples], (k_rel,), np.float32)
            ),
        }
        batch["bad"] = self.bad.pop() if self.bad is not None else {}
        return batch


# ------------------------------------------------------------------------------ pipeline


def make_dataset(cfg: DataConfig, tokenizer, epoch: int = 0) -> wds.DataPipeline:
    """The WebDataset pipeline for one epoch: endless batches for this rank and worker."""
    bad = BadSamples(cfg.max_consecutive_bad)

    def decode(raw):
        sample = preprocess(raw, cfg)
        bad.good()
        return sample

    # a buffer larger than one worker's share of an epoch only delays the first batch
    _, world, _, _ = wds.utils.pytorch_worker_info()
    share = total_samples(cfg.shard_dir) // (world * max(1, cfg.num_workers))
    stream = SampleStream(
        shard_urls(cfg.shard_dir),
        cfg.seed,
        epoch,
        min(cfg.shuffle_buffer, share),
        bad.handler,
    )
    stages = [stream]
    stages += [
        wds.map(decode, handler=bad.handler),
        wds.batched(
            cfg.batch_size, collation_fn=Collate(tokenizer, cfg.max_len, bad), partial=False
        ),
    ]
    return wds.DataPipeline(*stages)


def make_loader(
    cfg: DataConfig, tokenizer, epoch: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over `make_dataset` (batches come whole from the workers)."""
    return torch.utils.data.DataLoader(
        make_dataset(cfg, tokenizer, epoch),
        batch_size=None,
        num_workers=cfg.num_workers,
        pin_memory=pin_memory,
        # its own generator: creating the loader must not consume the global torch RNG
        generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
        prefetch_factor=4 if cfg.num_workers > 0 else None,
    )


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    non_blocking = device.type == "cuda"
    return {
        k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
