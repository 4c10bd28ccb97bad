"""Fine-tuning's settings (`FinetuneConfig`, one field per flag and params.yaml key) and the
checks of their values and input files, before anything heavy is imported.

Defaults come from params.yaml's `finetune:` group, with `finetune: <task>:` (data paths,
max_len) over it; flags override (`trainer/finetune.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmu.errors import InputError
from pmu.settings import (
    opt,
)

TASKS = ("mner", "mre")
PARAMS_GROUP = "finetune"
SOURCE = "`finetune:` with `finetune: TASK:` over it"
PATH_FIELDS = (
    "train",
    "dev",
    "test",
    "rel2id",
    "images",
    "images_train",
    "images_dev",
    "images_test",
    "init",
)  # fmt: skip  (project-relative in params.yaml)


def required(help: str) -> Any:  # noqa: A002
    return field(metadata={"help": help, "shown": "required"})


@dataclass
class FinetuneConfig:
    task: str = required("mner (CRF tagger) | mre (entity markers)")
    train: str = required("training file (Twitter-2015/2017 CoNLL or MNRE lines)")
    dev: str = required("dev file: the best epoch by dev F1 is kept")
    test: str = required("test file: evaluated once with the best epoch")
    rel2id: str | None = opt(None, "MRE label map JSON", "rel2id.json beside --train")
    none_label: str = opt("None", "MRE: the no-relation label, excluded from P/R/F1")
    images: str | None = opt(
        None,
        "folder of images named by IMGID / img_id, or holding train/ val|dev/ test/ subfolders "
        "('' = text-only)",
    )
    images_train: str | None = opt(None, "the train split's image folder", "--images")
    images_dev: str | None = opt(None, "the dev split's image folder", "--images")
    images_test: str | None = opt(None, "the test split's image folder", "--images")
    max_missing_images: float = opt(
        0.05, "stop when a split misses more than this share of its images (1 = go on)"
    )
    init: str = opt("tiny", "pretraining checkpoint folder, preset (tiny|base) or HF model folder")
    preset: str = opt("tiny", "vision encoder preset when --init is an HF text model")
    vision_encoder: str | None = opt(None, "local HF folder / hub name for the ViT")
    n_fusion_layers: int | None = opt(None, "upper BERT layers that fuse (HF / preset init)")
    fusion: str = opt(
        "albef",
        "fusion model for a preset / HF init (a checkpoint names its own): albef | hvp | "
        "package.module:name",
        omit_default=True,
    )
    crops: int = opt(
        -1,
        "object crops per image the fusion also sees (-1: the model's own: 0 albef, 3 hvp); "
        "their boxes come from --detector",
        omit_default=True,
    )
    detector: str | None = opt(
        None,
        "YOLO weights that find the crops' boxes (e.g. models/detector.safetensors)",
        omit_default=True,
    )
    detector_preset: str = opt("small", "preset of --detector's architecture", omit_default=True)
    detector_imgsz: int = opt(640, "--detector's input size", omit_default=True)
    detector_conf: float = opt(0.25, "--detector's confidence threshold", omit_default=True)
    out: str | None = opt(None, "output folder (state, predictions)", "runs/finetune-TASK")
    metrics: str | None = opt(None, "headline metrics JSON (test/dev P/R/F1)", "OUT/metrics.json")
    report: str | None = opt(None, "full report JSON (per type, history)", "OUT/report.json")
    predictions: str | None = opt(None, "predictions file", "OUT/predictions.{txt,jsonl}")
    plot: str | None = opt(None, "dev scores per epoch as a PNG ('none' = off)", "OUT/dev.png")
    max_len: int = opt(128, "sub-tokens per sequence incl. [CLS]/[SEP]")
    # a standard BERT-CRF recipe (best dev epoch of 5, batch 16, lr 5e-5 / 1e-3 / 5e-2)
    epochs: int = opt(5, "training epochs")
    batch_size: int = opt(16, "training batch size")
    eval_batch_size: int = opt(64, "evaluation batch size")
    lr_encoder: float = opt(5e-5, "encoder learning rate")
    lr_head: float = opt(1e-3, "head learning rate")
    lr_crf: float = opt(5e-2, "CRF transitions learning rate (MNER)")
    weight_decay: float = opt(0.01, "AdamW weight decay, weight matrices only")
    warmup: float = opt(0.1, "warmup fraction of the optimiser steps")
    dropout: float = opt(0.1, "head dropout")
    grad_clip: float = opt(1.0, "gradient norm clipping (0 = off)")
    patience: int = opt(3, "epochs without dev improvement before stopping (0 = never)")
    seed: int = opt(42, "seed of head init and data order")
    max_train_samples: int | None = opt(None, "use only the first N training samples", "all")
    threads: int | None = opt(None, "CPU threads", "all cores")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    save_model: bool = opt(False, "save encoder + head under OUT/model")
    resume: bool = opt(False, "continue from the latest epoch state in OUT/state")
    stop_after_epoch: int | None = opt(None, "stop once this epoch is saved (then --resume)")
    extra: dict[str, Any] = field(default_factory=dict)

    def split_images(self, split: str) -> str | None:
        """The image folder of a split: its own (--images-SPLIT), else --images."""
        return getattr(self, f"images_{split}") or self.images

    @property
    def multimodal(self) -> bool:
        return any(self.split_images(s) for s in ("train", "dev", "test"))

    def output_paths(self) -> dict[str, Path | None]:
        """Where this run writes: out, metrics, report, predictions, plot (None = off)."""
        out = Path(self.out or f"runs/finetune-{self.task}")
        suffix = "txt" if self.task == "mner" else "jsonl"
        plot = None if (self.plot or "").lower() == "none" else Path(self.plot or out / "dev.png")
        return {
            "out": out,
            "metrics": Path(self.metrics or out / "metrics.json"),
            "report": Path(self.report or out / "report.json"),
            "predictions": Path(self.predictions or out / f"predictions.{suffix}"),
            "plot": plot,
        }


def check_config(cfg: FinetuneConfig) -> None:
    """Values that cannot work, and input files that are not there: one InputError."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise InputError(message)

    need(cfg.task in TASKS, f"--task {cfg.task!r}: choose one of {list(TASKS)}")
    for name in ("train", "dev", "test"):
        path = getattr(cfg, name)
        need(bool(path), f"--{name} is required (or run in the project: params.yaml names one)")
        need(Path(path).is_file(), f"--{name} {path}: no such file")
    if cfg.task == "mre":
        rel2id = cfg.rel2id or str(Path(cfg.train).with_name("rel2id.json"))
        need(Path(rel2id).is_file(), f"--rel2id {rel2id}: no such file (the MRE label map)")
    for flag in ("images", "images_train", "images_dev", "images_test"):
        folder = getattr(cfg, flag)
        need(
            not folder or Path(folder).is_dir(),
            f"--{flag.replace('_', '-')} {folder}: no such folder",
        )
    need(
        0 <= cfg.max_missing_images <= 1,
        f"--max-missing-images {cfg.max_missing_images}: a share in [0, 1]",
    )
    from pmu.presets import PRESETS

    need(
        cfg.init in PRESETS or Path(cfg.init).is_dir(),
        f"--init {cfg.init}: no such folder (pretrain first: `dvc repro pretrain` or "
        f"trainer/run.py), or use a preset: --init {' | '.join(sorted(PRESETS))}",
    )
    need(cfg.epochs >= 1 and cfg.batch_size >= 1, "--epochs and --batch-size must be >= 1")
    need(cfg.eval_batch_size >= 1, "--eval-batch-size must be >= 1")
    need(cfg.max_len >= 4, f"--max-len {cfg.max_len}: must be >= 4")
    need(min(cfg.lr_encoder, cfg.lr_head, cfg.lr_crf) > 0, "learning rates must be > 0")
    need(0 <= cfg.warmup < 1, f"--warmup {cfg.warmup}: a fraction of the steps, in [0, 1)")
    need(0 <= cfg.dropout < 1, f"--dropout {cfg.dropout}: must be in [0, 1)")
    need(cfg.patience >= 0 and cfg.grad_clip >= 0, "--patience / --grad-clip must be >= 0")
    need(
        bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device)),
        f"--device {cfg.device!r}: use auto, cpu, cuda or cuda:N",
    )
