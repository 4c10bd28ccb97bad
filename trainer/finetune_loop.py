"""Fine-tune and evaluate MNER (CRF tagger) or MRE (entity markers) on the fusion encoder:
`prepare` builds the run, `run_finetune` is the epoch loop and `finish` evaluates and writes.

Trains, keeps the epoch with the best dev F1 (early stopping), evaluates it on test, and writes
the headline metrics JSON (test / dev P/R/F1), a full report (per type / per relation, history,
text-only counts), the predictions and a PNG of the dev scores per epoch. Every epoch ends with
a resumable state in OUT/state/; `--resume` continues from it. The command line is
`trainer/finetune.py`, the settings `trainer/finetune_config.py`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pmu.errors import InputError
from pmu.io import atomic_path, write_json_atomic
from pmu.optim import build_optimizer, build_scheduler
from pmu.outputs import claim_outputs
from pmu.settings import settings_dict
from trainer import finetune_state, ie_data, plots
from trainer.finetune_config import TASKS, FinetuneConfig, check_config
from trainer.finetune_data import (
    IEDataset,
    Split,
    check_images_found,
    check_known_labels,
    collate,
    encode_split,
    length_grouped_batches,
    read_samples,
)
from trainer.finetune_model import FinetuneModel, ensure_vocab, load_encoder, save_finetuned
from trainer.heads import CRFTagger, RelationHead
from trainer.metrics import majority_baseline_ner, majority_baseline_re, ner_scores, re_scores

__all__ = ["FinetuneConfig", "TASKS", "run_finetune", "run_seeds"]
log = logging.getLogger("finetune")


# ----------------------------------------------------------------------------- loop


def loss_fn(task: str, model: FinetuneModel, batch: dict[str, Any]) -> torch.Tensor:
    states = model.states(batch)
    if task == "mner":
        return model.head.loss(states, batch["word_index"], batch["word_mask"], batch["labels"])
    logits = model.head(states, batch["head_pos"], batch["tail_pos"])
    return nn.functional.cross_entropy(logits, batch["labels"])


def to_device(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def predict(task: str, model: FinetuneModel, loader, device, n: int) -> list:
    """Predicted label ids per sample (MNER: one per kept word)."""
    model.eval()
    out: list = [None] * n
    for batch in loader:
        batch = to_device(batch, device)
        states = model.states(batch)
        if task == "mner":
            preds = model.head.decode(states, batch["word_index"], batch["word_mask"])
        else:
            preds = model.head(states, batch["head_pos"], batch["tail_pos"]).argmax(-1).tolist()
        for i, p in zip(batch["index"], preds, strict=True):
            out[i] = p
    return out


def score(
    task: str, split: Split, pred_ids: list, id2label: list[str], none_label: str = "None"
) -> tuple[dict, list]:
    """Metrics and the predicted label strings (MNER: cut words predicted O)."""
    if task == "mner":
        gold = [s.labels for s in split.samples]
        pred = [
            [id2label[t] for t in p] + ["O"] * (len(s.tokens) - len(p))
            for s, p in zip(split.samples, pred_ids, strict=True)
        ]
        return ner_scores(gold, pred), pred
    gold = [s.relation for s in split.samples]
    pred = [id2label[p] for p in pred_ids]
    return re_scores(gold, pred, none_label), pred


def write_predictions(task: str, split: Split, pred: list, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        if task == "mner":
            # CoNLL style: IMGID line, token TAB gold TAB predicted, blank line
            for s, p in zip(split.samples, pred, strict=True):
                if s.img_id is not None:
                    f.write(f"IMGID:{s.img_id}\n")
                for tok, g, q in zip(s.tokens, s.labels, p, strict=True):
                    f.write(f"{tok}\t{g}\t{q}\n")
                f.write("\n")
        else:
            for s, feat, q in zip(split.samples, split.features, pred, strict=True):
                row = {
                    "line": s.line,
                    "img_id": s.img_id,
                    "text_only": feat.image is None,
                    "tokens": s.tokens,
                    "h": asdict(s.head),
                    "t": asdict(s.tail),
                    "gold": s.relation,
                    "pred": q,
                }
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- setup


@dataclass
class Finetune:
    """Everything the epoch loop uses, built once by `prepare`."""

    cfg: FinetuneConfig
    device: torch.device
    paths: dict[str, Path | None]  # out, metrics, report, predictions, plot
    model: FinetuneModel
    tokenizer: Any
    mcfg: Any  # trainer.model.ModelConfig
    desc: dict[str, Any]  # what the encoder is (for the report)
    id2label: list[str]
    splits: dict[str, Split]
    loader: Any  # loader(split, train, epoch) -> DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state_dir: Path
    fingerprint: dict[str, Any]


@dataclass
class Progress:
    """The epoch loop's state; saved with every epoch, restored by --resume."""

    epoch: int = 0  # last finished epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best_key: float = -math.inf
    best_epoch: int = 0
    best_dev: dict | None = None
    best_file: str | None = None
    stale: int = 0  # epochs without dev improvement
    stopped: bool = False
    best_state: dict | None = None  # weights of the best epoch (not in the JSON)
    trained_now: int = 0  # epochs trained by this process

    def record(self, epoch: int, train_loss: float, dev: dict, model: nn.Module, cfg) -> bool:
        """Add an epoch's figures; keep its weights when dev F1 improved; True if it did."""
        o = dev["overall"]
        self.epoch = epoch
        self.trained_now += 1
        self.history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "dev_precision": o["precision"],
                "dev_recall": o["recall"],
                "dev_f1": o["f1"],
            }
        )
        improved = o["f1"] > self.best_key
        if improved:
            self.best_key, self.best_epoch, self.best_dev, self.stale = o["f1"], epoch, dev, 0
            self.best_state = copy.deepcopy(model.state_dict())
        else:
            self.stale += 1
        self.stopped = bool(cfg.patience and self.stale >= cfg.patience and epoch < cfg.epochs)
        return improved

    def saved(self, fingerprint: dict[str, Any]) -> dict[str, Any]:
        keys = ("epoch", "history", "best_key", "best_epoch", "best_dev", "best_file", "stale")
        return {**{k: getattr(self, k) for k in keys}, "stopped": self.stopped,
                "fingerprint": fingerprint}  # fmt: skip


def relation_map(cfg: FinetuneConfig) -> tuple[dict[str, int] | None, str | None]:
    """MRE: (rel2id, its path), which must hold the no-relation label; MNER: (None, None)."""
    if cfg.task == "mner":
        return None, None
    rel2id_path = cfg.rel2id or str(Path(cfg.train).with_name("rel2id.json"))
    rel2id = ie_data.load_rel2id(rel2id_path)
    if cfg.none_label not in rel2id:
        raise InputError(
            f"{rel2id_path} has no {cfg.none_label!r} label (the no-relation class that "
            f"P/R/F1 exclude): add it, or name yours with --none-label"
        )
    return rel2id, rel2id_path


def task_labels(
    cfg: FinetuneConfig, samples: dict[str, list], rel2id: dict[str, int] | None
) -> tuple[dict[str, int], list[str]]:
    """(label -> id, id -> label): MNER's from the whole train split (and checked against dev
    and test), MRE's from rel2id."""
    if cfg.task == "mre":
        return rel2id, [r for r, _ in sorted(rel2id.items(), key=lambda kv: kv[1])]
    id2label = ie_data.ner_label_list(samples["train"])
    labels = {lab: i for i, lab in enumerate(id2label)}
    check_known_labels(cfg, samples, labels)
    return labels, id2label


def add_entity_markers(cfg: FinetuneConfig, tokenizer, encoder, desc, rel2id_path) -> Any:
    """MRE: the four marker tokens (the vocabulary grows once); their ids. MNER: None."""
    if cfg.task == "mner":
        return None
    markers = ie_data.add_markers(tokenizer)
    desc["embeddings_resized"] = ensure_vocab(encoder, tokenizer)
    desc["rel2id"] = rel2id_path
    return markers


def image_coverage(cfg: FinetuneConfig, splits: dict[str, Split]) -> dict[str, int]:
    """Samples per split that run text-only; too many missing images stop the run."""
    text_only = {name: sp.text_only for name, sp in splits.items()}
    if not cfg.multimodal:
        log.info("no --images: running text-only (%s samples)", sum(text_only.values()))
    else:
        check_images_found(cfg, splits)
        if any(text_only.values()):
            log.info("images missing for %s samples: those run text-only", text_only)
    return text_only


def build_finetune_model(
    cfg: FinetuneConfig, encoder: nn.Module, n_labels: int, device: torch.device
) -> FinetuneModel:
    """The encoder with the task's head (CRF tagger or relation classifier), seeded."""
    torch.manual_seed(cfg.seed)
    if cfg.task == "mner":
        head: nn.Module = CRFTagger(encoder.hidden_size, n_labels, cfg.dropout)
    else:
        head = RelationHead(encoder.hidden_size, n_labels, cfg.dropout)
    return FinetuneModel(encoder, head).to(device)


def prepare(cfg: FinetuneConfig) -> Finetune:
    """Encoder, labels, the three splits, head, loaders, optimizer and schedule."""
    from pmu.runtime import select_device, set_threads

    check_config(cfg)
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)  # nothing draws from these, but resumable states save them: seeded
    np.random.seed(cfg.seed)
    device = select_device(cfg.device)
    paths = cfg.output_paths()
    paths["out"].mkdir(parents=True, exist_ok=True)

    # the data and its labels first: an empty split or an unknown label fails before a model
    rel2id, rel2id_path = relation_map(cfg)
    samples = read_samples(cfg, rel2id)
    labels, id2label = task_labels(cfg, samples, rel2id)
    encoder, tokenizer, mcfg, desc = load_encoder(cfg)
    max_pos = encoder.bert.config.max_position_embeddings
    if cfg.max_len > max_pos:
        raise InputError(f"--max-len {cfg.max_len} exceeds the encoder's {max_pos} positions")
    markers = add_entity_markers(cfg, tokenizer, encoder, desc, rel2id_path)
    splits = {
        name: encode_split(cfg, name, rows, tokenizer, labels, markers)
        for name, rows in samples.items()
    }
    text_only = image_coverage(cfg, splits)
    model = build_finetune_model(cfg, encoder, len(id2label), device)

    image_size = mcfg.image_size if cfg.multimodal else None
    boxes = None
    if image_size and mcfg.max_crops > 0:  # the crops' boxes: the detector on every image
        from trainer.finetune_boxes import image_boxes

        images = [str(f.image) for sp in splits.values() for f in sp.features if f.image]
        boxes = image_boxes(cfg, mcfg.max_crops, images, cfg.output_paths()["out"])
    datasets = {name: IEDataset(sp, image_size, boxes) for name, sp in splits.items()}

    def loader(split: Split, train: bool, epoch: int = 0):
        lengths = [len(f.input_ids) for f in split.features]
        size = cfg.batch_size if train else cfg.eval_batch_size
        seed = cfg.seed + epoch if train else None
        return torch.utils.data.DataLoader(
            datasets[split.name],
            batch_sampler=length_grouped_batches(lengths, size, seed),
            collate_fn=lambda items: collate(
                items, tokenizer.pad_token_id, cfg.task, image_size, mcfg.max_crops
            ),
        )

    steps = max(1, cfg.epochs * len(loader(splits["train"], True)))
    crf = list(model.head.crf.parameters()) if cfg.task == "mner" else []
    parts = [(model.encoder, cfg.lr_encoder), (model.head, cfg.lr_head, crf)]
    if crf:  # the CRF transitions need a far larger step than the encoder (issue: BIO rules)
        parts.append((model.head.crf, cfg.lr_crf))
    optimizer = build_optimizer(parts, cfg.weight_decay, device)
    scheduler = build_scheduler(optimizer, int(cfg.warmup * steps), steps)
    log.info(
        "%s: train %d, dev %d, test %d; encoder %s (%s), %d epochs x %d steps",
        cfg.task,
        *(len(splits[s].samples) for s in ("train", "dev", "test")),
        desc["text_encoder"],
        desc["kind"],
        cfg.epochs,
        steps // cfg.epochs,
    )
    state_dir = paths["out"] / "state"
    fingerprint = finetune_state.fingerprint(cfg, rel2id_path, text_only)
    return Finetune(
        cfg, device, paths, model, tokenizer, mcfg, desc, id2label, splits, loader,
        optimizer, scheduler, state_dir, fingerprint,
    )  # fmt: skip


def start_or_resume(ft: Finetune) -> tuple[Progress, bool]:
    """(progress, whether an old state must be cleared before the first save)."""
    found = finetune_state.read_latest(ft.state_dir)
    if not ft.cfg.resume:
        if found is not None:
            log.warning(
                "%s holds a resume state (epoch %d); no --resume: starting over, it is "
                "replaced at the end of epoch 1",
                ft.state_dir,
                found[1]["trainer"]["epoch"],
            )
        return Progress(), found is not None
    if found is None:
        log.info("--resume: no state in %s, starting at epoch 1", ft.state_dir)
        return Progress(), False
    path, saved = found
    finetune_state.check_fingerprint(saved, ft.fingerprint, ft.state_dir)
    t, best_state = finetune_state.restore(path, ft.state_dir, ft.model, ft.optimizer, ft.scheduler)
    keys = ("epoch", "history", "best_key", "best_epoch", "best_dev", "best_file", "stale")
    progress = Progress(**{k: t[k] for k in keys}, stopped=t["stopped"], best_state=best_state)
    log.info(
        "resumed from %s: epoch %d done, best epoch %d (dev F1 %.4f), %d without improvement",
        path,
        progress.epoch,
        progress.best_epoch,
        progress.best_key,
        progress.stale,
    )
    return progress, False


# ----------------------------------------------------------------------------- the loop


def train_epoch(ft: Finetune, epoch: int) -> float:
    """One pass over the training split; returns the mean loss (read back once, at the end)."""
    ft.model.train()
    total, n_batches = torch.zeros((), device=ft.device), 0
    for batch in _progress(ft.loader(ft.splits["train"], True, epoch), f"epoch {epoch}"):
        loss = loss_fn(ft.cfg.task, ft.model, to_device(batch, ft.device))
        ft.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ft.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(ft.model.parameters(), ft.cfg.grad_clip)
        ft.optimizer.step()
        ft.scheduler.step()
        total += loss.detach()
        n_batches += 1
    return float(total) / max(1, n_batches)


def evaluate(ft: Finetune, name: str) -> tuple[dict, list]:
    """(scores, predicted labels) of the current model on a split."""
    split = ft.splits[name]
    pred_ids = predict(
        ft.cfg.task, ft.model, ft.loader(split, False), ft.device, len(split.samples)
    )
    return score(ft.cfg.task, split, pred_ids, ft.id2label, ft.cfg.none_label)


def save_epoch(ft: Finetune, progress: Progress, improved: bool, clear_old: bool) -> Path:
    """The epoch's resumable state (and the best weights when they changed)."""
    if clear_old:  # the first epoch of a fresh run replaces an old state
        shutil.rmtree(ft.state_dir)
    step = ft.scheduler.last_epoch  # optimiser steps so far
    if improved:
        progress.best_file = finetune_state.write_best(ft.state_dir, step, progress.best_state)
    return finetune_state.save_epoch(
        ft.state_dir,
        step,
        ft.model,
        ft.tokenizer,
        ft.mcfg,
        ft.optimizer,
        ft.scheduler,
        progress.saved(ft.fingerprint),
    )


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train, select the best dev epoch, evaluate on test; return the full report. The outputs
    are checked and the output folder locked before anything is read."""
    outputs = {f"--{k}": str(v) for k, v in cfg.output_paths().items() if v}
    with claim_outputs(outputs):
        return _run_finetune(cfg)


def _run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    ft = prepare(cfg)
    progress, clear_old = start_or_resume(ft)
    resumed_after = progress.epoch
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        if progress.stopped:
            break  # resumed from a run that had already stopped early
        t0 = time.perf_counter()
        train_loss = train_epoch(ft, epoch)
        dev, _ = evaluate(ft, "dev")
        improved = progress.record(epoch, train_loss, dev, ft.model, cfg)
        state_path = save_epoch(ft, progress, improved, clear_old)
        clear_old = False
        h = progress.history[-1]
        log.info(
            "epoch %d: loss %.4f, dev P/R/F1 %.4f/%.4f/%.4f (%.1fs)",
            epoch, h["train_loss"], h["dev_precision"], h["dev_recall"], h["dev_f1"],
            time.perf_counter() - t0,
        )  # fmt: skip
        if progress.stopped:
            log.info("early stop: no dev improvement for %d epochs", progress.stale)
            break
        if cfg.stop_after_epoch == epoch and epoch < cfg.epochs:
            log.info("stopping after epoch %d as asked: continue with --resume", epoch)
            print(f"interrupted after epoch {epoch}; state -> {state_path}", flush=True)
            return {"interrupted_after_epoch": epoch, "state": str(state_path)}
    return finish(ft, progress, resumed_after, time.perf_counter() - t_start)


# ----------------------------------------------------------------------------- outputs


def headline(report: dict[str, Any]) -> dict[str, Any]:
    """What `dvc metrics show` lists: overall test and dev figures, no per-type detail."""
    keys = ("precision", "recall", "f1", "accuracy")
    return {
        "task": report["task"],
        "best_epoch": report["best_epoch"],
        "test": {k: report["test"]["overall"][k] for k in keys if k in report["test"]["overall"]},
        "dev": {k: report["dev"]["overall"][k] for k in keys if k in report["dev"]["overall"]},
        "test_majority_baseline_f1": report["test_majority_baseline"]["f1"],
    }


def finish(ft: Finetune, progress: Progress, resumed_after: int, wall: float) -> dict[str, Any]:
    """Best epoch's weights on test: predictions, report, headline metrics, plot, stats."""
    cfg, splits, paths = ft.cfg, ft.splits, ft.paths
    ft.model.load_state_dict(progress.best_state)
    test_scores, test_pred = evaluate(ft, "test")
    write_predictions(cfg.task, splits["test"], test_pred, paths["predictions"])
    if cfg.task == "mner":
        baseline = majority_baseline_ner([s.labels for s in splits["test"].samples])
    else:
        baseline = majority_baseline_re(
            [s.relation for s in splits["train"].samples],
            [s.relation for s in splits["test"].samples],
            cfg.none_label,
        )
    report = {
        "task": cfg.task,
        "encoder": ft.desc,
        "text_only": {
            "images": {name: cfg.split_images(name) for name in splits},
            "samples": {name: sp.text_only for name, sp in splits.items()},
            "missing_images": {name: len(sp.missing_images) for name, sp in splits.items()},
            "unreadable_images": {name: sp.unreadable_images for name, sp in splits.items()},
            "note": "no --images: all samples text-only"
            if not cfg.multimodal
            else "samples whose image file is missing or unreadable ran text-only",
        },
        "data": {
            name: {"path": sp.path, "samples": len(sp.samples), "truncated": sp.truncated}
            for name, sp in splits.items()
        },
        "best_epoch": progress.best_epoch,
        "epochs_run": len(progress.history),
        "history": progress.history,
        "dev": progress.best_dev,
        "test": test_scores,
        "test_majority_baseline": baseline["overall"],
        "params": {
            k: v
            for k, v in settings_dict(cfg).items()
            if k not in ("extra", "resume", "stop_after_epoch")  # same report when resumed
        },
    }
    for key, content in (("report", report), ("metrics", headline(report))):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(paths[key], content)
    if paths["plot"] is not None:
        title = f"fine-tuning {cfg.task.upper()}: dev scores per epoch"
        plots.finetune_scores(progress.history, paths["plot"], title, progress.best_epoch)
    if cfg.save_model:
        save_finetuned(ft.model, ft.tokenizer, ft.mcfg, ft.id2label, cfg, paths["out"] / "model")
    stats = {
        "wall_s": round(wall, 2),
        "epochs_run": len(progress.history),
        "epochs_trained_now": progress.trained_now,
        "resumed_after_epoch": resumed_after,
    }
    write_json_atomic(paths["out"] / "stats.json", stats)
    _summary(cfg, report, wall, paths)
    return report


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single run)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std}


def seed_summary(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Per-seed dev/test P/R/F1 and their mean +- std (the paper reports every figure so)."""
    out: dict[str, Any] = {"seeds": sorted(runs), "runs": {}}
    for seed, m in sorted(runs.items()):
        out["runs"][str(seed)] = {
            "best_epoch": m["best_epoch"],
            "dev": {k: m["dev"]["overall"][k] for k in ("precision", "recall", "f1")},
            "test": {k: m["test"]["overall"][k] for k in ("precision", "recall", "f1")},
        }
    for split in ("dev", "test"):
        out[split] = {
            k: mean_std([r[split][k] for r in out["runs"].values()])
            for k in ("precision", "recall", "f1")
        }
    return out


def run_seeds(cfg: FinetuneConfig, seeds: Sequence[int]) -> dict[str, Any]:
    """run_finetune once per seed into OUT/seed-N/; the report gets each run + mean +- std,
    the headline metrics the mean +- std."""
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds must be distinct, got {list(seeds)}")
    paths = cfg.output_paths()
    runs = {}
    for seed in seeds:
        run_dir = paths["out"] / f"seed-{seed}"
        per_seed = dict(out=str(run_dir), metrics=None, report=None, predictions=None, plot=None)
        runs[seed] = run_finetune(replace(cfg, seed=seed, **per_seed))
        if "interrupted_after_epoch" in runs[seed]:
            return runs[seed]
    summary = {"task": cfg.task, **seed_summary(runs)}
    metrics = {k: summary[k] for k in ("task", "seeds", "dev", "test")}
    for key, content in (("report", summary), ("metrics", metrics)):
        paths[key].parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(paths[key], content)
    lines = [f"== finetune {cfg.task}: {len(seeds)} seeds =="]
    for seed, r in summary["runs"].items():
        t = r["test"]
        lines.append(
            f"seed {seed}: best epoch {r['best_epoch']}, test P/R/F1 "
            f"{t['precision']:.4f} / {t['recall']:.4f} / {t['f1']:.4f}"
        )
    for split in ("dev", "test"):
        s = summary[split]
        lines.append(
            f"{split} mean +- std: "
            + ", ".join(f"{k[0].upper()} {s[k]['mean']:.4f} +- {s[k]['std']:.4f}" for k in s)
        )
    lines.append(f"metrics -> {paths['metrics']}; report -> {paths['report']}")
    print("\n".join(lines), flush=True)
    return summary


def _progress(iterable, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, disable=not sys.stderr.isatty())


def _summary(cfg, report, wall, paths) -> None:
    t = report["test"]["overall"]
    d = report["dev"]["overall"]
    per = report["test"].get("per_type") or report["test"].get("per_relation")
    lines = [
        f"== finetune {cfg.task}: {report['encoder']['text_encoder']} "
        f"({report['encoder']['kind']}) ==",
        f"epochs run {report['epochs_run']}, best epoch {report['best_epoch']}, wall {wall:.1f}s",
        f"text-only samples: {report['text_only']['samples']}",
        f"dev  P/R/F1 {d['precision']:.4f} / {d['recall']:.4f} / {d['f1']:.4f}",
        f"test P/R/F1 {t['precision']:.4f} / {t['recall']:.4f} / {t['f1']:.4f}"
        + (f"  acc {t['accuracy']:.4f}" if "accuracy" in t else ""),
        "per "
        + ("type" if cfg.task == "mner" else "relation")
        + " (test F1): "
        + ", ".join(f"{k} {v['f1']:.3f}" for k, v in per.items()),
        f"metrics -> {paths['metrics']}; report -> {paths['report']}; "
        f"predictions -> {paths['predictions']}"
        + (f"; plot -> {paths['plot']}" if paths["plot"] else ""),
    ]
    print("\n".join(lines), flush=True)
