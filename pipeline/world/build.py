"""Build a world folder: plan every image and text from seeded streams, render, write files.

Every image and sentence draws from its own generator, keyed by (seed, stream, index), so the
output does not depend on the worker count or on the other parts' sizes. The world is written
into a staging folder beside `out` (each file atomically) and renamed into place at the end;
`world.json`, written last, lists the sha256 of every other file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.settings import SynthWorldSettings
from pipeline.world import language as lang
from pipeline.world.compose import (
    canvas_ratio,
    key_scene,
    relation_scene,
    stream_rng,
    with_palettes,
)
from pipeline.world.ontology import (
    CLASS_INDEX,
    CLASS_NAMES,
    MNER_TYPES,
    MRE_FROM_RELATION,
    MRE_LABELS,
    MRE_NONE,
    RULES,
    describe,
    matching_rules,
    relation_rows,
)
from pipeline.world.scene import ObjectSpec, image_size, jpeg_bytes, render_scene
from pmu.errors import InputError
from pmu.io import write_bytes_atomic

GENERATOR_VERSION = 1
WORLD_FILE = "world.json"
SPLITS = ("train", "dev", "test")
NEGATIVE_P = 0.5  # a corpus image gets a mismatched pair this often (~1 per 2 positives)
YOLO_VAL_EVERY = 8  # every 8th adapt image is held out for YOLO validation (12.5%)
MRE_IMAGE_LABELS = (MRE_NONE, *MRE_FROM_RELATION.values())
RELATION_OF_MRE = {v: k for k, v in MRE_FROM_RELATION.items()}
NONE_RELATIONS = tuple(r.label for r in RULES if r.label not in MRE_FROM_RELATION)


@dataclass(frozen=True)
class ImageJob:
    """One image to render: where (relative to the world root), what, and its render stream."""

    path: str
    objects: tuple[ObjectSpec, ...]
    size: tuple[int, int]
    stream: str
    index: int


@dataclass
class Rendered:
    boxes: list[list[float]]
    sha256: str


@dataclass
class PairImage:
    """A corpus / adapt image with its caption and truth."""

    id: str
    job: ImageJob
    relation: str
    caption: str
    mentioned: list[str]


@dataclass
class Files:
    """Writes files under a root atomically and remembers each one's sha256."""

    root: Path
    sha256: dict[str, str] = field(default_factory=dict)

    def write(self, rel: str, data: bytes) -> None:
        write_bytes_atomic(self.root / rel, data)
        self.sha256[rel] = hashlib.sha256(data).hexdigest()

    def text(self, rel: str, text: str) -> None:
        self.write(rel, text.encode("utf-8"))

    def jsonl(self, rel: str, rows: Iterable[dict]) -> None:
        self.text(rel, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ----------------------------------------------------------------------------- rendering


def render_job(args: tuple[str, int, ImageJob]) -> Rendered:
    """Render one image into the staging folder (runs in worker processes)."""
    root, seed, job = args
    rng = stream_rng(seed, f"{job.stream}-render", job.index)
    img, boxes = render_scene(list(job.objects), job.size, rng)
    data = jpeg_bytes(img)
    write_bytes_atomic(Path(root) / job.path, data)
    return Rendered(boxes, hashlib.sha256(data).hexdigest())


def render_all(
    jobs: list[ImageJob], root: Path, seed: int, workers: int, progress: bool
) -> list[Rendered]:
    from tqdm import tqdm

    for folder in sorted({str(Path(j.path).parent) for j in jobs}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    args = [(str(root), seed, j) for j in jobs]
    bar = dict(total=len(jobs), desc="synth-world", unit="img", disable=not progress)
    if workers <= 1:
        return [render_job(a) for a in tqdm(args, **bar)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(render_job, args, chunksize=16), **bar))


# ----------------------------------------------------------------------------- planning


def _job(path: str, classes: list[str], rng, stream: str, index: int, px: int) -> ImageJob:
    objects = tuple(with_palettes(classes, rng))
    return ImageJob(path, objects, image_size(canvas_ratio(rng), px), stream, index)


def plan_pairs(split: str, n: int, seed: int, names: lang.NamePools, px: int) -> list[PairImage]:
    """Images for the corpus or adapt split: one rule relation each, a caption each."""
    plans = []
    for i in range(n):
        rng = stream_rng(seed, split, i)
        relation, classes = relation_scene(rng)
        image_id = f"{split}-{i:06d}"
        job = _job(f"{split}/images/{image_id}.jpg", classes, rng, split, i, px)
        text, mentioned = lang.caption(relation, list(job.objects), rng, names)
        plans.append(PairImage(image_id, job, relation, text, mentioned))
    return plans


def pair_rows(plans: list[PairImage], seed: int, negatives: bool) -> list[dict]:
    """pairs.jsonl rows: each positive, followed for about half the images by a mismatched
    pair: the image with the caption of an image of another relation that mentions an object
    the image lacks."""
    rng = stream_rng(seed, f"{plans[0].job.stream}-negatives") if plans else None
    rows = []
    for p in plans:
        image_path = p.job.path.split("/", 1)[1]
        rows.append({"id": p.id, "image_path": image_path, "caption": p.caption, "itm": 1})
        if not negatives or rng is None or rng.random() >= NEGATIVE_P:
            continue
        own = {o.cls for o in p.job.objects}
        for _ in range(100):
            other = plans[int(rng.integers(len(plans)))]
            if other.relation != p.relation and not set(other.mentioned) <= own:
                rows.append(
                    {
                        "id": f"{p.id}-neg",
                        "image_path": image_path,
                        "caption": other.caption,
                        "itm": 0,
                    }
                )
                break
    return rows


def truth_row(job: ImageJob, rendered: Rendered, relation_key: str, relation) -> dict:
    return {
        "image": job.path.split("/", 1)[1],
        "width": job.size[0],
        "height": job.size[1],
        "boxes": rendered.boxes,
        "classes": [o.cls for o in job.objects],
        relation_key: relation,
    }


@dataclass
class NerPlan:
    split: str
    sentences: list[lang.NerSentence]
    jobs: list[ImageJob]
    image_ids: list[str]


def plan_mner(split: str, n: int, seed: int, names: lang.NamePools, px: int) -> NerPlan:
    """About half the sentences carry an ambiguous name whose type the image's key object sets
    (types and names balanced); the rest have typed names and an ordinary random scene."""
    stream = f"mner-{split}"
    plan_rng = stream_rng(seed, f"{stream}-plan")
    dependent = sorted(int(i) for i in plan_rng.choice(n, size=n // 2, replace=False))
    assignments = dict(
        zip(
            dependent,
            lang.balanced_assignments(len(dependent), names.ambiguous, plan_rng, MNER_TYPES),
            strict=True,
        )
    )
    plan = NerPlan(split, [], [], [])
    for i in range(n):
        rng = stream_rng(seed, stream, i)
        assigned = assignments.get(i)
        sentence = lang.ner_sentence(rng, names, assigned)
        classes = key_scene(rng, assigned[1]) if assigned else relation_scene(rng)[1]
        image_id = f"{split}_{i:05d}"
        plan.sentences.append(sentence)
        plan.image_ids.append(image_id)
        plan.jobs.append(_job(f"mner/images/{image_id}.jpg", classes, rng, stream, i, px))
    return plan


@dataclass
class RelPlan:
    split: str
    samples: list[lang.RelSentence]
    labels: list[str]
    dependent: list[bool]
    jobs: list[ImageJob]
    image_ids: list[str]


def plan_mre(split: str, n: int, seed: int, names: lang.NamePools, px: int) -> RelPlan:
    """About half the samples are neutral sentences (a person and an ambiguous name) whose
    label the image's composition sets; the rest state their relation in words."""
    stream = f"mre-{split}"
    plan_rng = stream_rng(seed, f"{stream}-plan")
    dependent = sorted(int(i) for i in plan_rng.choice(n, size=n // 2, replace=False))
    assignments = dict(
        zip(
            dependent,
            lang.balanced_assignments(len(dependent), names.ambiguous, plan_rng, MRE_IMAGE_LABELS),
            strict=True,
        )
    )
    plan = RelPlan(split, [], [], [], [], [])
    for i in range(n):
        rng = stream_rng(seed, stream, i)
        assigned = assignments.get(i)
        if assigned:
            tail, label = assigned
            sample = lang.neutral_pair(rng, names, tail)
            if label == MRE_NONE:
                relation = lang.pick(rng, NONE_RELATIONS)
            else:
                relation = RELATION_OF_MRE[label]
            classes = relation_scene(rng, relation)[1]
        else:
            label = lang.pick(rng, MRE_LABELS)
            sample = lang.explicit_pair(rng, names, label)
            classes = relation_scene(rng)[1]
        image_id = f"{split}_{i:05d}"
        plan.samples.append(sample)
        plan.labels.append(label)
        plan.dependent.append(assigned is not None)
        plan.image_ids.append(image_id)
        plan.jobs.append(_job(f"mre/images/{image_id}.jpg", classes, rng, stream, i, px))
    return plan


# ----------------------------------------------------------------------------- writing


def ner_text(plan: NerPlan) -> str:
    blocks = []
    for image_id, s in zip(plan.image_ids, plan.sentences, strict=True):
        lines = [f"IMGID:{image_id}"] + [
            f"{t}\t{lab}" for t, lab in zip(s.tokens, s.labels, strict=True)
        ]
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def mre_text(plan: RelPlan) -> str:
    lines = []
    for image_id, s, label in zip(plan.image_ids, plan.samples, plan.labels, strict=True):
        row = {
            "token": s.tokens,
            "h": {"name": s.head[0], "pos": [s.head[1], s.head[2]]},
            "t": {"name": s.tail[0], "pos": [s.tail[1], s.tail[2]]},
            "img_id": f"{image_id}.jpg",
            "relation": label,
        }
        lines.append(repr(row) + "\n")  # a Python dict literal per line, as MNRE ships it
    return "".join(lines)


def yolo_files(files: Files, plans: list[PairImage], rendered: list[Rendered]) -> dict:
    """The adapt split as a YOLO dataset: hard links to the images, normalised label files."""
    counts = Counter()
    for i, (p, r) in enumerate(zip(plans, rendered, strict=True)):
        split = "val" if (i % YOLO_VAL_EVERY == YOLO_VAL_EVERY - 1) else "train"
        counts[split] += 1
        w, h = p.job.size
        lines = []
        for cls, (x0, y0, x1, y1) in zip((o.cls for o in p.job.objects), r.boxes, strict=True):
            cx, cy, bw, bh = (x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h
            lines.append(f"{CLASS_INDEX[cls]} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}\n")
        files.text(f"yolo/labels/{split}/{p.id}.txt", "".join(lines))
        target = files.root / f"yolo/images/{split}/{p.id}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(files.root / p.job.path, target)
        except OSError:  # a file system without hard links
            shutil.copyfile(files.root / p.job.path, target)
        files.sha256[f"yolo/images/{split}/{p.id}.jpg"] = r.sha256
    names = "".join(f"  {i}: {name}\n" for i, name in enumerate(CLASS_NAMES))
    files.text(
        "yolo/data.yaml",
        "# The world's adapt split for ultralytics (written by `pipeline synth-world`).\n"
        "# No `path` key: ultralytics then uses this file's folder as the dataset root, so the\n"
        "# export works wherever the world folder lies.\n"
        f"train: images/train\nval: images/val\nnc: {len(CLASS_NAMES)}\nnames:\n{names}",
    )
    return dict(counts)


def _check(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise InputError(f"{name} must be at least {minimum}, got {value}")


def _swap_into_place(staging: Path, out: Path) -> None:
    """Replace `out` (absent, empty, or an earlier world) with the finished staging folder."""
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / WORLD_FILE).is_file()):
            raise InputError(f"{out} exists and is not a world folder", "pass another --out")
        old = out.with_name(f".{out.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)


def build_world(
    out: str | os.PathLike,
    n: int = 2000,
    seed: int = 0,
    n_adapt: int = 2000,
    mner: tuple[int, int, int] = (400, 200, 400),
    mre: tuple[int, int, int] = (400, 200, 400),
    image_size_px: int = 160,
    workers: int = 1,
    progress: bool = False,
) -> dict:
    """Build the whole world under `out`; returns a summary (counts, seconds, paths).

    `mner` and `mre` are (train, dev, test) sentence counts; `image_size_px` is the longest
    image side. `workers` (processes rendering images) does not change any output byte.
    """
    start = time.perf_counter()
    _check("n", n, 2)
    _check("n_adapt", n_adapt, YOLO_VAL_EVERY)
    for name, sizes in (("mner", mner), ("mre", mre)):
        for split, value in zip(SPLITS, sizes, strict=True):
            _check(f"{name} {split}", value, 1)
    if not 64 <= image_size_px <= 2048:
        raise InputError(f"image size must be within 64..2048, got {image_size_px}")
    _check("workers", workers, 1)
    out = Path(out)
    if out.exists() and out.is_dir() and any(out.iterdir()) and not (out / WORLD_FILE).is_file():
        raise InputError(f"{out} exists and is not a world folder", "pass another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        shutil.rmtree(staging)  # left by a killed build
    staging.mkdir()
    try:
        summary = _build(staging, n, seed, n_adapt, mner, mre, image_size_px, workers, progress)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary["out"] = str(out)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _build(root, n, seed, n_adapt, mner, mre, px, workers, progress) -> dict:
    names = lang.make_name_pools(stream_rng(seed, "names"))
    corpus = plan_pairs("corpus", n, seed, names, px)
    adapt = plan_pairs("adapt", n_adapt, seed, names, px)
    ner = [plan_mner(s, k, seed, names, px) for s, k in zip(SPLITS, mner, strict=True)]
    rel = [plan_mre(s, k, seed, names, px) for s, k in zip(SPLITS, mre, strict=True)]
    jobs = [p.job for p in corpus + adapt]
    for plan in (*ner, *rel):
        jobs += plan.jobs
    rendered = render_all(jobs, root, seed, workers, progress)
    by_path = dict(zip((j.path for j in jobs), rendered, strict=True))
    files = Files(root)
    files.sha256.update({path: r.sha256 for path, r in by_path.items()})

    counts = _write_pair_splits(files, corpus, adapt, by_path, seed)
    counts["yolo"] = yolo_files(files, adapt, [by_path[p.job.path] for p in adapt])
    files.text(
        "relations.tsv", "pid\tlabel\n" + "".join(f"{p}\t{lb}\n" for p, lb in relation_rows())
    )
    counts["mner"] = _write_mner(files, ner, by_path)
    counts["mre"] = _write_mre(files, rel, by_path)
    world = {
        "generator": "pipeline.world",
        "version": GENERATOR_VERSION,
        "seed": seed,
        # Every output-shaping argument; `out` and `workers` change no byte, so they are absent.
        "args": {
            "n": n,
            "seed": seed,
            "n_adapt": n_adapt,
            "mner": dict(zip(SPLITS, mner, strict=True)),
            "mre": dict(zip(SPLITS, mre, strict=True)),
            "image_size": px,
        },
        **describe(),
        "ambiguous_names": list(names.ambiguous),
        "counts": counts,
        "files": dict(sorted(files.sha256.items())),
    }
    files.text(WORLD_FILE, json.dumps(world, indent=1, ensure_ascii=False) + "\n")
    return {"counts": counts, "files": len(files.sha256) - 1, "jobs": len(jobs)}


def _write_pair_splits(files: Files, corpus, adapt, by_path, seed: int) -> dict:
    """corpus/ and adapt/: pairs.jsonl and truth.jsonl; their counts."""
    counts: dict = {}
    for split, plans, negatives in (("corpus", corpus, True), ("adapt", adapt, False)):
        rows = pair_rows(plans, seed, negatives)
        files.jsonl(f"{split}/pairs.jsonl", rows)
        files.jsonl(
            f"{split}/truth.jsonl",
            (truth_row(p.job, by_path[p.job.path], "relation", p.relation) for p in plans),
        )
        counts[split] = {
            "images": len(plans),
            "pairs": len(rows),
            "mismatched": sum(r["itm"] == 0 for r in rows),
            "relations": dict(sorted(Counter(p.relation for p in plans).items())),
            "objects": dict(sorted(Counter(o.cls for p in plans for o in p.job.objects).items())),
        }
    return counts


def _write_mner(files: Files, ner, by_path) -> dict:
    """mner/: the splits, the test set's image-dependent spans, the images' truth; counts."""
    counts: dict = {}
    for plan in ner:
        files.text(f"mner/{plan.split}.txt", ner_text(plan))
        dep_types = Counter(t for s in plan.sentences for *_, t in s.image_dependent)
        counts[plan.split] = {
            "sentences": len(plan.sentences),
            "image_dependent": sum(bool(s.image_dependent) for s in plan.sentences),
            "image_dependent_types": dict(sorted(dep_types.items())),
        }
    test = ner[-1]
    files.jsonl(
        "mner/test_image_dependent.jsonl",
        (
            {"index": i, "spans": [list(span) for span in s.image_dependent]}
            for i, s in enumerate(test.sentences)
        ),
    )
    files.jsonl("mner/truth.jsonl", _truths(ner, by_path))
    return counts


def _write_mre(files: Files, rel, by_path) -> dict:
    """mre/: the splits, rel2id.json, the test set's image-dependent lines, the truth; counts."""
    counts: dict = {}
    for plan in rel:
        files.text(f"mre/{plan.split}.txt", mre_text(plan))
        counts[plan.split] = {
            "samples": len(plan.samples),
            "image_dependent": sum(plan.dependent),
            "labels": dict(sorted(Counter(plan.labels).items())),
        }
    files.text("mre/rel2id.json", json.dumps({lb: i for i, lb in enumerate(MRE_LABELS)}) + "\n")
    files.jsonl(
        "mre/test_image_dependent.jsonl",
        ({"index": i, "image_dependent": d} for i, d in enumerate(rel[-1].dependent)),
    )
    files.jsonl("mre/truth.jsonl", _truths(rel, by_path))
    return counts


def _truths(plans, by_path: dict[str, Rendered]) -> Iterable[dict]:
    """Truth of the MNER / MRE images; `relations` lists every rule the image matches."""
    for plan in plans:
        for job in plan.jobs:
            classes = [o.cls for o in job.objects]
            yield truth_row(job, by_path[job.path], "relations", matching_rules(classes))


def run_stage(settings: SynthWorldSettings) -> str:
    """synth-world as the command runs it; returns what it prints."""
    st = settings
    s = build_world(
        st.out,
        n=st.n,
        seed=st.seed,
        n_adapt=st.n_adapt,
        mner=(st.mner_train, st.mner_dev, st.mner_test),
        mre=(st.mre_train, st.mre_dev, st.mre_test),
        image_size_px=st.image_size,
        workers=st.workers,
        progress=st.progress,
    )
    c = s["counts"]
    ner = {k: v["sentences"] for k, v in c["mner"].items()}
    rel = {k: v["samples"] for k, v in c["mre"].items()}
    return (
        f"synth-world: {s['jobs']} images, {s['files']} files in {s['seconds']} s -> {s['out']}\n"
        f"  corpus/  {c['corpus']['images']} images, {c['corpus']['pairs']} pairs "
        f"({c['corpus']['mismatched']} mismatched); truth.jsonl\n"
        f"  adapt/   {c['adapt']['images']} images; yolo/ {c['yolo']['train']} train + "
        f"{c['yolo']['val']} val\n"
        f"  mner/    train/dev/test {ner['train']}/{ner['dev']}/{ner['test']} sentences\n"
        f"  mre/     train/dev/test {rel['train']}/{rel['dev']}/{rel['test']} samples\n"
        f"  relations.tsv, world.json (tables, counts, sha256 of every file)\n"
        f"  next: pipeline prepare --source world --input {s['out']}"
    )
