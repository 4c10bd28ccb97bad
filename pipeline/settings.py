"""Every pipeline stage's settings, declared once: one dataclass per stage, each field with its
default and help text (`pmu.settings.opt`).

The `pipeline` commands are generated from these classes (`pipeline/command.py`); params.yaml's
group of the stage (`label:`, `detect:`, ...) and its `models:` group set them in `dvc repro`
(the stages pass `--params params.yaml`); the stage functions take them. A field is an option
of its command as soon as it is declared here. A `*Params` class holds what shapes a stage's
output and is recorded with it (boxes.parquet's metadata, the shard manifest, the teacher's
summary); its stage's `*Settings` nests it beside the inputs, outputs and engine options.

Light on purpose (stdlib only): `pipeline --help` builds every command from this module.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from pmu.errors import InputError
from pmu.settings import opt

ENGINES = ("local", "ray")
RESIZE_MODES = ("letterbox", "center_crop")
DECODE_PLACES = ("auto", "workers", "device")
DETECT_IMPLS = ("fast", "ultralytics")
TEMPLATE_LOSSES = ("each", "ensemble")
SOURCES = ("sample", "newsclippings", "table", "wds", "hf", "world")
RELATION_ORDERS = ("relevance", "pid")
DEFAULT_MAX_PIXELS = 50_000_000  # decoded size above which an image is a decompression bomb
DEVICE_HELP = "auto | cpu | cuda | cuda:N."


def nested(cls: type) -> Any:
    """A field holding another settings class, whose fields become options of the command."""
    return dataclasses.field(default_factory=cls, metadata={"settings": cls})


def need(ok: bool, message: str, hint: str = "") -> None:
    """An InputError naming the option unless `ok`."""
    if not ok:
        raise InputError(message, hint)


def recorded(params: Any) -> dict[str, Any]:
    """The fields of a `*Params` that shape the output (those not marked `recorded=False`)."""
    return {
        f.name: getattr(params, f.name)
        for f in dataclasses.fields(params)
        if f.metadata.get("recorded", True)
    }


def parse_logit_scale(value: Any, name: str = "--logit-scale") -> float | None:
    """`model` (or empty) -> None (read from the CLIP); otherwise a positive number."""
    if value is None or str(value).strip().lower() in ("model", "auto", ""):
        return None
    try:
        scale = float(value)
    except ValueError:
        raise InputError(f"{name} must be 'model' or a number, not {value!r}", "") from None
    need(scale > 0 and math.isfinite(scale), f"{name} must be > 0, not {value!r}")
    return scale


@dataclass(frozen=True)
class RaySettings:
    """Where `--engine ray` runs (docs/scale.md)."""

    ray_address: str = opt(
        "", "Ray cluster to use (default: $RAY_ADDRESS, else a Ray started on this machine)."
    )
    ray_actors: int = opt(0, "Ray actors (0: as many as the cluster fits).", min=0)
    ray_cpus_per_actor: float = opt(2.0, "CPUs (= torch threads) per Ray actor.", min=0.0)
    ray_gpus_per_actor: float = opt(-1.0, "GPUs per Ray actor (-1: 1 if the cluster has GPUs).")


# ----------------------------------------------------------------------------- prepare


@dataclass(frozen=True)
class PrepareSettings:
    source: str = opt(
        "sample", "sample | newsclippings | table | wds | hf | world.", choices=SOURCES
    )
    input: str | None = opt(
        None,
        "sample: folder (default: bundled); newsclippings: annotation JSON; table: "
        ".parquet/.csv/.jsonl; wds: a tar or a folder of tars; hf: a save_to_disk folder or a "
        "hub dataset name; world: a synth-world folder (its corpus) or one of its split folders "
        "(e.g. DIR/adapt).",
    )
    out: str = opt("data/prepared", "Output folder for pairs.parquet etc.")
    image_root: str | None = opt(
        None,
        "Root of relative image paths (default: the input's folder); paths may not leave it.",
    )
    allow_outside_root: bool = opt(
        False,
        "Read image paths that leave the image root (../, absolute elsewhere) too.",
        flags=("--allow-outside-root",),
    )
    visualnews_data: str | None = opt(None, "VisualNews data.json (newsclippings).")
    id_col: str = opt("id", "table, hf: id column (row number when absent).")
    image_col: str = opt(
        "image_path", "table, hf: image column (a path; hf: also an Image feature)."
    )
    caption_col: str = opt("caption", "table, hf: caption column.")
    itm_col: str = opt("itm", "table, hf: optional match column (exactly 0 or 1).")
    split: str | None = opt(None, "hf: the split to read (default: train, or the only one).")
    negatives: bool = opt(
        True, "true|false: generate mismatched pairs for sources that have none.", values=True
    )
    negative_ratio: float = opt(1.0, "Negatives per positive.", min=0.0, max=1.0)
    seed: int = opt(0, "Seed of the negative-pair shuffle.")
    max_pixels: int = opt(DEFAULT_MAX_PIXELS, "Reject larger images (header).", min=1)
    max_caption_chars: int = opt(
        2000,
        "Cut longer captions to this many characters, at a word boundary (counted in the "
        "summary); only captions over 100000 characters are rejected.",
        min=1,
    )
    workers: int = opt(1, "Processes decoding images.", min=1)
    chunk_size: int = opt(
        4096, "Records per saved chunk (a killed run resumes after the last one).", min=1
    )
    progress: bool = opt(True, "Show a progress bar.")


# ----------------------------------------------------------------------------- vocabularies


@dataclass(frozen=True)
class MineNounsSettings:
    pairs: str = opt("data/prepared/pairs.parquet", "pairs.parquet from prepare.")
    out: str = opt("data/vocab/entities.json", "Entity vocabulary to write.")
    m: int = opt(1000, "Keep the M most frequent noun lemmas.", min=1, flags=("--m",))
    spacy_model: str = opt("auto", "spaCy model name or path; auto prefers en_core_web_sm.")
    batch_size: int = opt(256, "nlp.pipe batch size.", min=1)
    include_propn: bool = opt(False, "Count proper nouns too.")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass(frozen=True)
class FetchRelationsSettings:
    out: str = opt("data/vocab/relations.json", "Relation vocabulary to write.")
    l: int = opt(1000, "Keep the first L relations (see --order).", min=1, flags=("--l",))  # noqa: E741
    live: bool = opt(
        False, "true|false: query Wikidata SPARQL (else the bundled snapshot).", values=True
    )
    order: str = opt(
        "relevance",
        "relevance: properties about people, organisations, places, works and events first, "
        "off-topic domains last (pid order within each); pid: numeric pid order.",
        choices=RELATION_ORDERS,
    )
    from_file: str | None = opt(
        None,
        "Your own relation list instead of Wikidata: TSV with pid/label header, JSON, or one "
        "label per line; kept in file order.",
        flags=("--from",),
    )
    endpoint: str = opt("https://query.wikidata.org/sparql", "SPARQL endpoint.")
    timeout: float = opt(30.0, "Seconds per HTTP attempt.", min=0.01)
    retries: int = opt(3, "Retries after the first attempt.", min=0)
    backoff: float = opt(2.0, "First retry delay (doubles).", min=0.0)
    cache: str | None = opt(
        "data/vocab/wikidata_sparql_cache.json",
        "Cache of the live answer ('' = none).",
        output=True,
    )


# ----------------------------------------------------------------------------- detector


@dataclass(frozen=True)
class DetectorTrainParams:
    epochs: int = opt(30, "Training epochs.", min=1)
    imgsz: int = opt(160, "Training and validation image size.", min=32)
    batch: int = opt(32, "Images per batch.", min=1)
    workers: int = opt(0, "Dataloader workers (0: main process).", min=0)
    patience: int = opt(0, "Stop after N epochs without gain (0: never).", min=0)
    seed: int = opt(0, "Training seed (deterministic on CPU).")
    # From scratch, AdamW at a fixed 4e-3 with one warmup epoch converges several times faster
    # than ultralytics' `auto` choice (AdamW at 6e-4 for 12 classes) on the synthetic world.
    optimizer: str = "AdamW"
    lr0: float = opt(0.004, "Initial learning rate (AdamW).", min=0.0)
    warmup_epochs: float = 1.0
    mosaic: float = opt(
        0.0, "Mosaic augmentation share (slows convergence on simple scenes).", min=0.0, max=1.0
    )
    cache: bool = True  # keep decoded images in RAM (small datasets)


@dataclass(frozen=True)
class TrainDetectorSettings:
    data: str = opt(None, "YOLO dataset yaml (train, val, names), e.g. WORLD/yolo.", required=True)
    out: str = opt(
        "models/detector.safetensors",
        "Trained weights: .safetensors (no pickle) or .pt (ultralytics' checkpoint).",
    )
    preset: str = opt("tiny", "Preset whose detector architecture starts.")
    detector: str | None = opt(None, "Start from these local YOLO weights instead.")
    device: str = opt("auto", DEVICE_HELP)
    resume: bool = opt(False, "Continue from OUT's .runs/train/weights/last.pt.")
    params: DetectorTrainParams = nested(DetectorTrainParams)


@dataclass(frozen=True)
class DetectParams:
    batch_size: int = opt(16, "Images per YOLO forward.", min=1)
    imgsz: int = opt(640, "YOLO input size.", min=32)
    conf: float = opt(0.25, "Confidence threshold (base: 0.25; tiny: ~0).", min=0.0, max=1.0)
    iou: float = opt(0.7, "NMS IoU threshold.", min=0.0, max=1.0)
    top_k: int = opt(10, "Boxes kept per image (by confidence).", min=0)
    max_pixels: int = DEFAULT_MAX_PIXELS
    num_workers: int = opt(
        -1, "DataLoader workers decoding images (-1: auto, 0 on CPU).", min=-1, recorded=False
    )
    impl: str = opt(
        "fast",
        "fast (uint8 batches, batched NMS) | ultralytics (YOLO.predict, reference).",
        choices=DETECT_IMPLS,
    )
    pre_nms_top_k: int = opt(1000, "fast: candidates per image into NMS.", min=1)

    def recorded(self) -> dict[str, Any]:
        """The parameters that shape the output (worker counts do not)."""
        return recorded(self)

    def check(self) -> None:
        need(
            self.batch_size >= 1 and self.top_k >= 0 and self.pre_nms_top_k >= 1,
            "--batch-size and --pre-nms-top-k must be >= 1 and --top-k >= 0",
        )
        need(self.impl in DETECT_IMPLS, f"--impl must be one of {DETECT_IMPLS}, not {self.impl!r}")


@dataclass(frozen=True)
class DetectSettings:
    pairs: str = opt("data/prepared/pairs.parquet", "Prepared pairs.")
    out: str = opt("data/objects/boxes.parquet", "Boxes parquet to write.")
    preset: str = opt("tiny", "Model preset: tiny | small | base.")
    detector: str | None = opt(None, "Local YOLO weights file (overrides the preset).")
    device: str = opt("auto", DEVICE_HELP)
    params: DetectParams = nested(DetectParams)
    engine: str = opt("local", "local (this process) | ray (Ray Data actor pool).", choices=ENGINES)
    ray: RaySettings = nested(RaySettings)


# ----------------------------------------------------------------------------- teacher


@dataclass(frozen=True)
class TeacherParams:
    steps: int = opt(1000, "Optimiser steps.", min=1)
    batch_size: int = opt(64, "Items per objective per step.", min=2)
    lr: float = opt(5e-4, "AdamW peak learning rate.", min=0.0)
    weight_decay: float = opt(0.05, "AdamW weight decay (weight matrices).", min=0.0)
    warmup_steps: int = opt(50, "Linear warmup, then cosine decay.", min=0)
    seed: int = opt(0, "Seed of the batches, jitter and held-out images.")
    weight_caption: float = opt(1.0, "Caption objective (0: off).", min=0.0)
    weight_entity: float = opt(1.0, "Crop-entity objective (0: off).", min=0.0)
    weight_relation: float = opt(1.0, "Image-relation objective (0: off).", min=0.0)
    # Whole images against the entity prompts of every class they contain (mass spread evenly
    # over them): objects at the scale they have in a whole image, which relations depend on.
    weight_scene: float = opt(1.0, "Whole image vs the entities it contains (0: off).", min=0.0)
    # Auxiliary linear probes on the image features (entity class of a crop, relation of an
    # image), dropped after training. From random weights, prompts that share a template start
    # nearly identical (cosine ~0.99) and so do the image features: the prompt objective alone
    # then sits at its symmetric saddle (chance) for hundreds of steps. The probes make the image
    # features class-specific at once, which gives the prompts their gradient.
    weight_probe: float = opt(
        1.0, "Auxiliary linear probes on the image features (0: off).", min=0.0
    )
    box_jitter: float = opt(0.1, "Crop box jitter, fraction of its size.", min=0.0)
    # Whole annotated images are cut to a random window that keeps every true box (this share
    # of each margin may go; 0: off), and every image and crop is mirrored half the time. A
    # from-scratch teacher memorises its ~1,400 relation images within a few hundred steps.
    crop_margin: float = opt(
        0.0,
        "Whole images: cut up to this share of the margins around the true boxes (0: off).",
        min=0.0,
        max=1.0,
    )
    flip: bool = opt(False, "Mirror half the images and crops.")
    crop_padding: float = 0.0  # as label-objects' crop_padding
    resize_mode: str = opt(
        "letterbox", "letterbox | center_crop (as labeling).", choices=RESIZE_MODES
    )
    holdout: float = opt(0.1, "Annotated images held out.", min=0.0, max=0.9)
    negatives: int = opt(64, "Vocabulary negatives sampled per step.", min=0)
    # With several templates: `each` scores against every template's prompts separately (one
    # loss each, averaged), so any one template labels well on its own; `ensemble` against
    # their normalised mean only (what labeling with all of them ensembled uses).
    template_loss: str = opt(
        "each",
        "each (one loss per template: each labels alone) | ensemble (their mean).",
        choices=TEMPLATE_LOSSES,
    )
    max_logit_scale: float = 100.0

    def check(self) -> None:
        need(self.steps >= 1 and self.batch_size >= 2, "--steps must be >= 1, --batch-size >= 2")
        need(self.resize_mode in RESIZE_MODES, f"--resize-mode must be one of {RESIZE_MODES}")
        need(0 <= self.holdout < 1, "--holdout must be in [0, 1)")
        need(
            self.template_loss in TEMPLATE_LOSSES,
            f"--template-loss must be one of {TEMPLATE_LOSSES}",
        )
        need(0 <= self.crop_margin <= 1, "--crop-margin must be in [0, 1]")


@dataclass(frozen=True)
class AdaptTeacherSettings:
    out: str = opt("models/teacher.safetensors", "Adapted open_clip weights.")
    pairs: str | None = opt(None, "Prepared pairs.parquet: image-caption InfoNCE.")
    annotations: str | None = opt(
        None, "truth.jsonl (image, boxes, classes, relation): crop / image-prompt InfoNCE."
    )
    entities: str | None = opt(
        None, "Entity vocabulary (entities.json): its other nouns become negatives."
    )
    relations: str | None = opt(
        None, "Relation vocabulary (relations.json): its other labels become negatives."
    )
    preset: str = opt("tiny", "Model preset whose CLIP is adapted.")
    clip: str | None = opt(None, "Start from this local CLIP checkpoint instead.")
    entity_templates: str = opt(
        "all", "Entity templates by name (embed-prompts' names: 1, 2, 1+2, all)."
    )
    relation_templates: str = opt("all", "Relation templates by name (A, B, C, A+B, all).")
    resume: bool = opt(False, "Continue from OUT's .state folder.")
    ckpt_every: int = opt(200, "Save a resumable state every N steps.", min=1)
    params: TeacherParams = nested(TeacherParams)


# ----------------------------------------------------------------------------- labels


@dataclass(frozen=True)
class EmbedPromptsSettings:
    entities: str = opt("data/vocab/entities.json", "Entity vocabulary.")
    relations: str = opt("data/vocab/relations.json", "Relation vocabulary.")
    out: str = opt("data/vocab/prompts.safetensors", "Embeddings to write.")
    preset: str = opt("tiny", "Model preset: tiny | small | base.")
    clip: str | None = opt(None, "Local CLIP checkpoint (.safetensors) for the preset.")
    device: str = opt("auto", DEVICE_HELP)
    entity_templates: str = opt(
        "1",
        "The paper's entity templates by name: 1 'This is an image of {entity}.', 2 'An image "
        "of {entity} is shown here.'; 1+2 or all ensembles them.",
    )
    relation_templates: str = opt(
        "A",
        "The paper's relation templates by name: A 'This image shows the relation of "
        "{relation}.', B 'The relation of {relation} is shown in this image.', C 'The relation "
        "between the objects in the image is {relation}.'; e.g. A+B+C or all ensembles them.",
    )
    entity_template: list[str] = opt(
        (),
        "Your own entity template with {entity} (repeat to ensemble); replaces --entity-templates.",
        flags=("--entity-template",),
    )
    relation_template: list[str] = opt(
        (),
        "Your own relation template with {relation} (repeat to ensemble); replaces "
        "--relation-templates.",
        flags=("--relation-template",),
    )
    batch_size: int = opt(256, "Prompts per text-tower forward.", min=1)


@dataclass(frozen=True)
class LabelParams:
    samples_per_shard: int = opt(1000, "Samples per shard (shard i = pairs [i*n, (i+1)*n)).", min=1)
    image_batch_size: int = opt(32, "Whole images per CLIP forward.", min=1)
    crop_batch_size: int = opt(128, "Object crops per CLIP forward, gathered across images.", min=1)
    num_workers: int = opt(
        -1, "DataLoader workers (0: in-process; -1: auto, 2 on CPU).", min=-1, recorded=False
    )
    tau: float = opt(1.0, "Softmax temperature: q = softmax(s * cos / tau).", min=1e-6)
    logit_scale: float | None = opt(
        None,
        "CLIP logit scale s: 'model' (the loaded CLIP's exp(logit_scale)) or a number.",
        "model",
        parse=parse_logit_scale,
    )
    k_ent: int = opt(10, "Kept q_ent entries per object (>= M keeps all).", min=1)
    k_rel: int = opt(10, "Kept q_rel entries per image (>= L keeps all).", min=1)
    crop_padding: float = opt(0.0, "Crop padding, fraction of box size per side.", min=0.0)
    max_side: int = opt(512, "Longest side of the stored jpg.", min=1)
    jpeg_quality: int = opt(90, "Stored jpg quality.", min=1, max=100)
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int = opt(0, "Seed (recorded; labeling itself draws no randomness).")
    resize_mode: str = opt(
        "letterbox",
        "letterbox (pad to square: whole image) | center_crop (open_clip's).",
        choices=RESIZE_MODES,
    )
    decode: str = opt(
        "auto",
        "workers (PIL) | device (torchvision; nvjpeg on CUDA) | auto (device on CUDA).",
        choices=DECODE_PLACES,
    )

    def recorded(self) -> dict[str, Any]:
        """The parameters that shape the shards (worker counts do not)."""
        return recorded(self)

    def check(self) -> None:
        need(
            min(self.samples_per_shard, self.image_batch_size, self.crop_batch_size) >= 1,
            "--samples-per-shard, --image-batch-size and --crop-batch-size must be >= 1",
        )
        need(self.tau > 0 and min(self.k_ent, self.k_rel) >= 1, "--tau > 0, --k-ent, --k-rel >= 1")
        need(
            self.logit_scale is None or self.logit_scale > 0,
            "--logit-scale must be > 0 (or model: read it from the CLIP)",
        )
        need(self.resize_mode in RESIZE_MODES, f"--resize-mode must be one of {RESIZE_MODES}")
        need(self.decode in DECODE_PLACES, f"--decode must be one of {DECODE_PLACES}")


@dataclass(frozen=True)
class LabelSettings:
    pairs: str = opt("data/prepared/pairs.parquet", "Prepared pairs.")
    boxes: str = opt("data/objects/boxes.parquet", "Detections.")
    prompts: str = opt("data/vocab/prompts.safetensors", "Prompt embeddings.")
    entities: str = opt("data/vocab/entities.json", "Entity vocabulary.")
    relations: str = opt("data/vocab/relations.json", "Relation vocabulary.")
    rejected: str | None = opt(
        "data/prepared/rejected.jsonl", "prepare's rejections, counted into the manifest."
    )
    out: str = opt("shards", "Shard folder.")
    stats: str | None = opt(
        None, "Where to write timings (JSON); not written if empty.", output=True
    )
    metrics: str | None = opt(
        None,
        "Where to write the headline counts (JSON, no timings); not written if empty.",
        output=True,
    )
    preset: str = opt("tiny", "Model preset: tiny | small | base.")
    clip: str | None = opt(None, "Local CLIP checkpoint (.safetensors) for the preset.")
    device: str = opt("auto", DEVICE_HELP)
    stage_params: str | None = opt(None, "A params.yaml to record in the manifest.")
    params: LabelParams = nested(LabelParams)
    engine: str = opt(
        "local", "local (this process) | ray (one shard per Ray task).", choices=ENGINES
    )
    ray: RaySettings = nested(RaySettings)


# ----------------------------------------------------------------------------- checks, reports


@dataclass(frozen=True)
class ScoreLabelsSettings:
    shard_dir: str = opt("shards", "Labelled shard folder.", argument=True)
    pairs: str = opt("data/prepared/pairs.parquet", "Prepared pairs (id -> image).")
    truth: str = opt(None, "truth.jsonl: per image boxes, classes and relation.", required=True)
    out: str | None = opt(None, "Write the figures as JSON here ('' = do not).")
    iou: float = opt(0.5, "IoU for a detection to match.", min=0.0, max=1.0)


@dataclass(frozen=True)
class VerifySettings:
    shard_dir: str = opt("shards", "Folder with shard-*.tar, sizes.json, ...", argument=True)
    tol: float = opt(1e-4, "Tolerance of probability sums.", min=0.0)
    limit: int = opt(50, "Problems listed at most.", min=1)
    quick: bool = opt(
        False, "Skip the sha256 check of the files against manifest.json.", flags=("--quick",)
    )


@dataclass(frozen=True)
class CompareShardsSettings:
    first: str = opt(
        None, "A shard folder, or its members.sha256 file.", argument=True, required=True
    )
    second: str = opt(
        None, "The other shard folder, or its members.sha256 file.", argument=True, required=True
    )
    limit: int = opt(20, "Differing members listed at most.", min=1)


@dataclass(frozen=True)
class InspectSettings:
    shard_dir: str = opt(
        None, "Folder with shard-*.tar, manifest.json, vocabs.", argument=True, required=True
    )
    out: str = opt("reports/labels.html", "The self-contained HTML report to write.")
    samples: int = opt(48, "Samples shown as cards (seeded reservoir).", min=0)
    seed: int = opt(0, "Seed of the sample choice.")


@dataclass(frozen=True)
class SynthWorldSettings:
    out: str = opt(None, "World folder to write (replaced if a world).", required=True)
    n: int = opt(2000, "Corpus images (unlabeled pretraining pairs).", min=2, flags=("--n",))
    seed: int = opt(0, "World seed: the same seed gives byte-identical files.")
    n_adapt: int = opt(2000, "Adapt images (teacher/detector adaptation).", min=8)
    mner_train: int = opt(400, "MNER train sentences.", min=1)
    mner_dev: int = opt(200, "MNER dev sentences.", min=1)
    mner_test: int = opt(400, "MNER test sentences.", min=1)
    mre_train: int = opt(400, "MRE train samples.", min=1)
    mre_dev: int = opt(200, "MRE dev samples.", min=1)
    mre_test: int = opt(400, "MRE test samples.", min=1)
    image_size: int = opt(160, "Longest image side (pixels).", min=64, max=2048)
    workers: int = opt(1, "Processes rendering images (same bytes).", min=1)
    progress: bool = opt(True, "Show a progress bar.")
