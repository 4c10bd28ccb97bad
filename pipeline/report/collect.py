"""One streaming pass over the shards: label statistics and a seeded reservoir of samples."""

from __future__ import annotations

import math
import random
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pmu import shards

N_BINS = 40
MAX_LISTED = 20  # ids listed for "images without detections" and unreadable samples


def entropy_lower_bound(probs: np.ndarray) -> float:
    """Entropy (nats) of a top-k distribution with the dropped mass lumped into one bin.

    With k = vocabulary size this is the exact entropy; with truncation it is a lower bound
    of the full distribution's entropy, so peaked labels stay visible either way.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    rest = max(0.0, 1.0 - float(p.sum()))
    terms = [q for q in p.tolist() if q > 0.0] + ([rest] if rest > 1e-12 else [])
    return float(-sum(q * math.log(q) for q in terms))


@dataclass
class Histogram:
    """Fixed-range histogram: constant memory however many values stream through."""

    low: float
    high: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(N_BINS, dtype=np.int64))
    total: float = 0.0
    n: int = 0

    def add(self, value: float) -> None:
        span = self.high - self.low
        b = int((value - self.low) / span * N_BINS) if span > 0 else 0
        self.counts[min(max(b, 0), N_BINS - 1)] += 1
        self.total += value
        self.n += 1

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    def edges(self) -> np.ndarray:
        return np.linspace(self.low, self.high, N_BINS + 1)


@dataclass
class LabelStats:
    """Everything the summary shows, accumulated sample by sample."""

    n_entities: int
    n_relations: int
    samples: int = 0
    objects: int = 0
    shards_read: int = 0
    itm: Counter = field(default_factory=Counter)
    sources: Counter = field(default_factory=Counter)
    box_classes: Counter = field(default_factory=Counter)
    top1_entity: Counter = field(default_factory=Counter)
    top1_relation: Counter = field(default_factory=Counter)
    no_detections: int = 0
    no_detection_ids: list[str] = field(default_factory=list)
    unreadable: list[dict[str, str]] = field(default_factory=list)
    unreadable_count: int = 0
    ent_entropy: Histogram = field(init=False)
    rel_entropy: Histogram = field(init=False)
    ent_mass: Histogram = field(default_factory=lambda: Histogram(0.0, 1.0))
    rel_mass: Histogram = field(default_factory=lambda: Histogram(0.0, 1.0))
    ent_top1_mass: Histogram = field(default_factory=lambda: Histogram(0.0, 1.0))
    rel_top1_mass: Histogram = field(default_factory=lambda: Histogram(0.0, 1.0))

    def __post_init__(self) -> None:
        self.ent_entropy = Histogram(0.0, math.log(max(self.n_entities, 2)))
        self.rel_entropy = Histogram(0.0, math.log(max(self.n_relations, 2)))

    def add_unreadable(self, where: str, reason: str) -> None:
        self.unreadable_count += 1
        if len(self.unreadable) < MAX_LISTED:
            self.unreadable.append({"where": where, "reason": reason})

    def add(self, sample: dict[str, Any]) -> None:
        meta = sample["meta"]
        ent_idx, ent_prob = np.atleast_2d(sample["ent_idx"]), np.atleast_2d(sample["ent_prob"])
        n_obj = len(meta.get("boxes", [])) if ent_idx.size == 0 else ent_idx.shape[0]
        self.samples += 1
        self.objects += n_obj
        self.itm[int(meta.get("itm", -1))] += 1
        self.sources[str(meta.get("source", "?"))] += 1
        for name in meta.get("box_classes", []):
            self.box_classes[str(name)] += 1
        if n_obj == 0:
            self.no_detections += 1
            if len(self.no_detection_ids) < MAX_LISTED:
                self.no_detection_ids.append(str(meta.get("id", sample.get("__key__"))))
        for o in range(ent_idx.shape[0] if ent_idx.size else 0):
            if ent_idx.shape[1]:
                self.top1_entity[int(ent_idx[o, 0])] += 1
                self.ent_top1_mass.add(float(ent_prob[o, 0]))
            self.ent_entropy.add(entropy_lower_bound(ent_prob[o]))
            self.ent_mass.add(float(np.clip(ent_prob[o].astype(np.float64).sum(), 0.0, 1.0)))
        rel_idx, rel_prob = np.ravel(sample["rel_idx"]), np.ravel(sample["rel_prob"])
        if rel_idx.size:
            self.top1_relation[int(rel_idx[0])] += 1
            self.rel_top1_mass.add(float(rel_prob[0]))
            self.rel_entropy.add(entropy_lower_bound(rel_prob))
            self.rel_mass.add(float(np.clip(rel_prob.astype(np.float64).sum(), 0.0, 1.0)))


class Reservoir:
    """Seeded uniform sample of at most `size` items from a stream (Algorithm R).

    Memory is O(size) however long the stream; the same stream and seed pick the same items.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seen = 0
        self._rng = random.Random(seed)
        self._kept: list[tuple[int, Any]] = []

    def offer(self, item: Any) -> None:
        if len(self._kept) < self.size:
            self._kept.append((self.seen, item))
        else:
            j = self._rng.randrange(self.seen + 1)
            if j < self.size:
                self._kept[j] = (self.seen, item)
        self.seen += 1

    def items(self) -> list[tuple[int, Any]]:
        """(stream index, item) pairs in stream order."""
        return sorted(self._kept, key=lambda pair: pair[0])


def scan_shards(
    shard_dir: str | Path,
    n_samples: int,
    seed: int,
    n_entities: int,
    n_relations: int,
    progress: bool = True,
) -> tuple[LabelStats, list[tuple[int, dict[str, Any]]]]:
    """Stream every sample once; return the statistics and (stream index, raw sample) pairs.

    The reservoir (Algorithm R, seeded) holds at most `n_samples` raw samples, so memory does
    not grow with the number of shards, and the same shards + seed pick the same samples.
    """
    from tqdm import tqdm

    stats = LabelStats(n_entities=n_entities, n_relations=n_relations)
    reservoir = Reservoir(n_samples, seed)
    paths = shards.shard_paths(shard_dir)
    if not paths:
        raise FileNotFoundError(f"no {shards.SHARD_GLOB} in {shard_dir}")
    for path in tqdm(paths, desc="inspect", unit="shard", disable=not progress):
        try:
            for raw in shards.iter_raw_samples(path):
                where = f"{path.name}:{raw.get('__key__')}"
                try:
                    sample = shards.decode_sample(raw)
                except (KeyError, ValueError, UnicodeDecodeError) as exc:
                    stats.add_unreadable(where, f"{type(exc).__name__}: {exc}")
                    continue
                stats.add(sample)
                reservoir.offer(raw)
            stats.shards_read += 1
        except (OSError, EOFError, ValueError, tarfile.TarError) as exc:  # the run goes on
            stats.add_unreadable(path.name, f"{type(exc).__name__}: {exc}")
    return stats, reservoir.items()
