"""verify: check a shard folder against the contract and report every violation found.

Besides the contract (structure, arrays, probabilities, boxes, counts), the sha256 of every
shard and of sizes.json is compared with manifest.json's `files` (written by label-objects), so
changes that keep the contract (a swapped jpg, an edited caption, probability mass moved
between entries) are found too; `check_hashes=False` (`--quick`) skips that hashing.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.settings import VerifySettings
from pmu import shards
from pmu.io import file_sha256

TOLERANCE = 1e-4  # float32 sums of up to thousands of probabilities


@dataclass
class VerifyReport:
    shard_dir: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what was not checked, and why
    shards: int = 0
    samples: int = 0
    objects: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def render(self, limit: int = 50) -> str:
        head = (
            f"{self.shard_dir}: {self.shards} shards, {self.samples} samples, "
            f"{self.objects} objects: "
        )
        notes = [f"  note: {n}" for n in self.notes]
        if self.ok:
            return "\n".join([head + "OK", *notes])
        lines = [head + f"{len(self.problems)} problem(s)"]
        lines += [f"  - {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join([*lines, *notes])


def _load_json(path: Path, report: VerifyReport) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        report.add(path.name, "missing")
    except (OSError, ValueError) as e:
        report.add(path.name, f"unreadable JSON ({e})")
    return None


def _sample_counts(sizes: Any, report: VerifyReport) -> dict[str, int | None]:
    """sizes.json's entries, None where the count is not a sample count (a problem)."""
    if sizes is None:
        return {}  # missing or unreadable: reported already
    for problem in shards.sizes_problems(sizes):
        report.add(shards.SIZES_FILE, problem)
    if not isinstance(sizes, dict):
        return {}
    return {name: n if shards.is_sample_count(n) else None for name, n in sizes.items()}


def verify_shards(
    shard_dir: str | os.PathLike, tol: float = TOLERANCE, check_hashes: bool = True
) -> VerifyReport:
    """Check the shards, sizes.json, manifest.json and vocabularies; never raises on bad data.
    `check_hashes` compares every shard's and sizes.json's sha256 with the manifest."""
    root = Path(shard_dir)
    report = VerifyReport(str(root))
    if not root.is_dir():
        report.add(str(root), "not a directory")
        return report
    sizes = _sample_counts(_load_json(root / shards.SIZES_FILE, report), report)
    manifest = _load_json(root / shards.MANIFEST_FILE, report) or {}
    ent_vocab = _load_json(root / shards.ENTITIES_FILE, report) or {}
    rel_vocab = _load_json(root / shards.RELATIONS_FILE, report) or {}
    n_ent = len(ent_vocab.get("entities", [])) if isinstance(ent_vocab, dict) else 0
    n_rel = len(rel_vocab.get("relations", [])) if isinstance(rel_vocab, dict) else 0
    for name, n in ((shards.ENTITIES_FILE, n_ent), (shards.RELATIONS_FILE, n_rel)):
        if (root / name).is_file() and n == 0:
            report.add(name, "empty vocabulary")
    _check_manifest_vocab(root, manifest, report)

    present = {p.name for p in shards.shard_paths(root)}
    for name in sorted(set(sizes) - present):
        report.add(name, "listed in sizes.json but missing")
    for name in sorted(present - set(sizes)):
        report.add(name, "not listed in sizes.json")
    seen_keys: set[str] = set()
    for name in sorted(present & set(sizes)):
        count = _check_shard(root / name, n_ent, n_rel, tol, seen_keys, report)
        report.shards += 1
        report.samples += count
        if sizes[name] is not None and count != sizes[name]:
            report.add(name, f"{count} samples but sizes.json says {sizes[name]}")
    if present and report.samples == 0:
        report.add(str(root), "the shards hold no samples: nothing to train on")
    counts = manifest.get("counts", {}) if isinstance(manifest, dict) else {}
    listed = sum(n for n in sizes.values() if n is not None)
    if counts and counts.get("samples") != listed:
        report.add(
            shards.MANIFEST_FILE,
            f"counts.samples={counts.get('samples')} but sizes.json sums to {listed}",
        )
    if counts and "objects" in counts and counts["objects"] != report.objects and report.shards:
        report.add(
            shards.MANIFEST_FILE,
            f"counts.objects={counts['objects']} but the shards hold {report.objects}",
        )
    if check_hashes:
        _check_file_hashes(root, manifest, sizes, present, report)
    else:
        report.notes.append("file hashes not checked (--quick)")
    return report


def _check_file_hashes(
    root: Path, manifest: Any, sizes: dict, present: set[str], report: VerifyReport
) -> None:
    """Every shard and sizes.json against the sha256 and size that label-objects recorded."""
    if not isinstance(manifest, dict) or not manifest:
        return  # a missing or unreadable manifest is reported already
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        report.notes.append(
            "manifest.json records no file hashes (an older label-objects made it): contents "
            "not checked against it; re-run label-objects to record them"
        )
        return
    for name in sorted(present - set(files)):
        report.add(name, "has no sha256 in manifest.json (added after labeling?)")
    for name, entry in sorted(files.items()):
        path = root / name
        if not isinstance(entry, dict):
            report.add(shards.MANIFEST_FILE, f"files[{name!r}] is not an object")
        elif not path.is_file():
            if name not in sizes and name != shards.SIZES_FILE:  # else reported already
                report.add(name, "listed in manifest.json but missing")
        elif entry.get("bytes") is not None and path.stat().st_size != entry["bytes"]:
            size = path.stat().st_size
            report.add(name, f"{size} bytes but manifest.json records {entry['bytes']}")
        elif file_sha256(path) != entry.get("sha256"):
            report.add(name, "content changed after labeling: sha256 differs from manifest.json")


def _check_manifest_vocab(root: Path, manifest: Any, report: VerifyReport) -> None:
    if not isinstance(manifest, dict) or not manifest:
        return
    if manifest.get("contract_version") != shards.CONTRACT_VERSION:
        report.add(
            shards.MANIFEST_FILE,
            f"contract_version {manifest.get('contract_version')!r} != {shards.CONTRACT_VERSION}",
        )
    for entry in (manifest.get("vocab") or {}).values():
        path = root / str(entry.get("file", ""))
        if path.is_file() and entry.get("sha256") and file_sha256(path) != entry["sha256"]:
            report.add(path.name, "sha256 differs from manifest.json")


def _check_shard(
    path: Path, n_ent: int, n_rel: int, tol: float, seen: set[str], report: VerifyReport
) -> int:
    """Read one tar member by member; return the number of samples found."""
    samples: dict[str, dict[str, bytes]] = {}
    order: list[str] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                reason = shards.unsafe_member_reason(info)
                if reason:
                    report.add(path.name, f"member {info.name!r}: {reason}")
                    continue
                key, suffix = shards.split_member(info.name)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                elif order[-1] != key:
                    report.add(path.name, f"members of {key!r} are not adjacent")
                if suffix in samples[key]:
                    report.add(path.name, f"member {info.name!r} repeated")
                samples[key][suffix] = tar.extractfile(info).read()
    except (OSError, tarfile.TarError) as e:
        report.add(path.name, f"unreadable tar ({e})")
        return 0
    for key in order:
        where = f"{path.name}:{key}"
        if key in seen:
            report.add(where, "key repeated in another shard")
        seen.add(key)
        _check_sample(where, samples[key], n_ent, n_rel, tol, report)
    return len(order)


def _npy(raw: dict[str, bytes], suffix: str) -> np.ndarray:
    return np.load(io.BytesIO(raw[suffix]), allow_pickle=False)


def _check_sample(
    where: str, raw: dict[str, bytes], n_ent: int, n_rel: int, tol: float, report: VerifyReport
) -> None:
    members = set(raw)
    missing = [m for m in shards.MEMBER_ORDER if m not in members]
    extra = sorted(members - set(shards.MEMBER_ORDER))
    if missing:
        report.add(where, f"missing members {missing}")
    if extra:
        report.add(where, f"unexpected members {extra}")
    if missing:
        return
    try:
        meta = json.loads(raw["json"])
        raw["txt"].decode("utf-8")
        ent_idx, ent_prob = _npy(raw, "ent_idx.npy"), _npy(raw, "ent_prob.npy")
        rel_idx, rel_prob = _npy(raw, "rel_idx.npy"), _npy(raw, "rel_prob.npy")
    except (ValueError, UnicodeDecodeError, OSError) as e:
        report.add(where, f"undecodable member ({e})")
        return
    try:
        from pipeline.images import ImageRejected, decode_rgb

        decode_rgb(raw["jpg"])
    except ImageRejected as e:
        report.add(where, f"jpg does not decode ({e})")

    boxes = meta.get("boxes", [])
    n_obj = len(boxes)
    report.objects += n_obj
    for name in ("box_classes", "box_confs", "ent_mass"):
        if len(meta.get(name, [])) != n_obj:
            report.add(where, f"{len(meta.get(name, []))} {name} for {n_obj} boxes")
    for j, box in enumerate(boxes):
        if len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
            report.add(where, f"box {j} is not 4 numbers: {box}")
            continue
        x0, y0, x1, y1 = box
        if not all(0.0 <= v <= 1.0 for v in box):
            report.add(where, f"box {j} outside [0,1]: {box}")
        if x0 > x1 or y0 > y1:
            report.add(where, f"box {j} has x0>x1 or y0>y1: {box}")
    for key in ("width", "height"):
        if not (isinstance(meta.get(key), int) and meta[key] > 0):
            report.add(where, f"{key} is {meta.get(key)!r}")
    if meta.get("itm") not in (0, 1):
        report.add(where, f"itm is {meta.get('itm')!r}")

    if ent_idx.ndim != 2 or ent_idx.shape != ent_prob.shape or ent_idx.shape[0] != n_obj:
        report.add(where, f"ent arrays {ent_idx.shape}/{ent_prob.shape} for {n_obj} boxes")
    else:
        masses = meta.get("ent_mass", [])
        for j in range(n_obj):
            mass = masses[j] if j < len(masses) else None
            _check_dist(f"{where} object {j}", ent_idx[j], ent_prob[j], mass, n_ent, tol, report)
    if rel_idx.ndim != 1 or rel_idx.shape != rel_prob.shape:
        report.add(where, f"rel arrays {rel_idx.shape}/{rel_prob.shape} are not matching vectors")
    else:
        _check_dist(
            f"{where} relation", rel_idx, rel_prob, meta.get("rel_mass"), n_rel, tol, report
        )


def _check_dist(
    where: str,
    idx: np.ndarray,
    prob: np.ndarray,
    mass: Any,
    size: int,
    tol: float,
    report: VerifyReport,
) -> None:
    if idx.dtype.kind not in "iu":
        report.add(where, f"indices have dtype {idx.dtype}")
        return
    if idx.size and (idx.min() < 0 or idx.max() >= size):
        report.add(where, f"index outside the vocabulary of {size}: {idx.tolist()}")
    if len(set(idx.tolist())) != idx.size:
        report.add(where, "repeated indices")
    if prob.dtype.kind != "f" or not np.all(np.isfinite(prob)):
        report.add(where, "probabilities are not finite floats")
        return
    if prob.size and (prob.min() < -tol or prob.max() > 1 + tol):
        report.add(where, f"probability outside [0,1]: {prob.tolist()}")
    total = float(prob.sum(dtype=np.float64))
    if total > 1 + tol:
        report.add(where, f"probabilities sum to {total:.6f} > 1")
    if mass is None or not isinstance(mass, (int, float)):
        report.add(where, "kept mass not recorded")
    elif abs(total - mass) > tol:
        report.add(where, f"probabilities sum to {total:.6f} but the recorded mass is {mass:.6f}")


def run_stage(settings: VerifySettings) -> tuple[str, bool]:
    """verify as the command runs it: (the report, whether every check passed)."""
    from pipeline import checks

    root = checks.shard_folder(settings.shard_dir)
    if (root / shards.SIZES_FILE).exists():
        shards.read_sizes(root)  # a table that is not name -> count: one line, exit 2
    report = verify_shards(settings.shard_dir, settings.tol, check_hashes=not settings.quick)
    return report.render(settings.limit), report.ok
