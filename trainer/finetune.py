"""Fine-tune and evaluate MNER (CRF tagger) or MRE (entity markers) on the fusion encoder.

    python trainer/finetune.py --task mner --train T --dev D --test E [--images DIR]
        [--init checkpoints/pretrain | tiny | base | HF_MODEL_DIR] [--out DIR]

Trains, keeps the epoch with the best dev F1 (early stopping), evaluates it on test, and writes
metrics JSON (overall, per type / per relation, text-only counts) and a predictions file.
Samples without an image (no --images, or a missing / unreadable file) run text-only.
Every epoch ends with a resumable state in OUT/state/; `--resume` continues from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python trainer/finetune.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import nn

from trainer import finetune_state, ie_data
from trainer.heads import CRFTagger, RelationHead
from trainer.metrics import majority_baseline_ner, majority_baseline_re, ner_scores, re_scores
from trainer.optim import build_optimizer, build_scheduler

log = logging.getLogger("finetune")
TASKS = ("mner", "mre")
# ViT's own normalisation (google/vit-base-patch16-224-in21k and the tiny ViT): mean = std = 0.5.


@dataclass
class FinetuneConfig:
    task: str
    train: str
    dev: str
    test: str
    rel2id: str | None = None  # MRE label map (default: rel2id.json beside --train)
    none_label: str = "None"  # MRE: the no-relation label, excluded from P/R/F1
    images: str | None = None
    init: str = "tiny"  # pretraining checkpoint dir, preset name, or local HF model dir
    preset: str = "tiny"  # vision encoder preset when --init is an HF text model
    vision_encoder: str | None = None
    n_fusion_layers: int | None = None
    out: str = "checkpoints/finetune"
    metrics: str | None = None  # default OUT/metrics.json
    predictions: str | None = None  # default OUT/predictions.{txt,jsonl}
    max_len: int = 128
    # a standard BERT-CRF recipe (best dev epoch of 5, batch 16, lr 5e-5 / 1e-3 / 5e-2)
    epochs: int = 5
    batch_size: int = 16
    eval_batch_size: int = 64
    lr_encoder: float = 5e-5
    lr_head: float = 1e-3
    lr_crf: float = 5e-2  # CRF transitions (MNER): from U(-0.1, 0.1) they must move by ~1-10
    weight_decay: float = 0.01  # weight matrices only (trainer.optim)
    warmup: float = 0.1  # fraction of optimiser steps
    dropout: float = 0.1
    grad_clip: float = 1.0
    patience: int = 3  # epochs without dev improvement before stopping (0: never stop early)
    seed: int = 42
    max_train_samples: int | None = None
    threads: int | None = None
    device: str = "auto"
    save_model: bool = False
    resume: bool = False  # continue from the latest epoch state in OUT/state
    stop_after_epoch: int | None = None  # planned interruption: stop once this epoch is saved
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- encoder


def load_encoder(cfg: FinetuneConfig):
    """(model, tokenizer, model config, description) for --init: checkpoint, preset or HF dir."""
    from pipeline.models import PRESETS, WeightsUnavailable
    from trainer.model import ModelConfig, build_model, build_tokenizer, load_pretrained

    init = Path(cfg.init)
    config_file = init / "config.json"
    if config_file.is_file() and "model_config" in json.loads(config_file.read_text("utf-8")):
        model, mcfg, tokenizer = load_pretrained(init)
        kind = "pretrain-checkpoint"
        if tokenizer is None:
            tokenizer = build_tokenizer(mcfg)
    else:
        if cfg.init in PRESETS:
            mcfg = ModelConfig(preset=cfg.init, vision_encoder=cfg.vision_encoder)
            kind = "preset"
        elif init.is_dir():
            mcfg = ModelConfig(
                preset=cfg.preset, text_encoder=str(init), vision_encoder=cfg.vision_encoder
            )
            kind = "hf-dir"
        else:
            raise WeightsUnavailable(
                f"--init {cfg.init!r} is neither a pretraining checkpoint folder, a preset "
                f"({', '.join(PRESETS)}) nor a local Hugging Face model folder"
            )
        # fine-tuning needs none of the pretraining heads
        mcfg.itm_head, mcfg.proj_dim, mcfg.n_entities, mcfg.n_relations = False, 0, 0, 0
        mcfg.n_fusion_layers = cfg.n_fusion_layers
        model = build_model(mcfg)
        tokenizer = build_tokenizer(mcfg)
    desc = {
        "init": cfg.init,
        "kind": kind,
        "text_encoder": mcfg.text_encoder or f"preset:{mcfg.preset}",
        "hidden_size": model.hidden_size,
        "n_layers": len(model.bert.encoder.layer),
        "n_fusion_layers": mcfg.n_fusion_layers,
        "image_size": mcfg.image_size,
    }
    return model, tokenizer, mcfg, desc


def ensure_vocab(model, tokenizer) -> bool:
    """Grow the word embeddings to the tokenizer once (after adding markers); True if resized."""
    n_rows = model.bert.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_rows:
        model.resize_token_embeddings(len(tokenizer))
        return True
    return False


def fused_text_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixels: torch.Tensor | None,
    has_image: torch.Tensor,
) -> torch.Tensor:
    """Fused states at the text positions [B, T, H]; samples without an image fuse text-only."""
    text = model.encode_text(input_ids, attention_mask)
    if pixels is None or not bool(has_image.any()):
        return model.fuse(text, attention_mask)
    img_idx = has_image.nonzero().squeeze(1)
    txt_idx = (~has_image).nonzero().squeeze(1)
    t = text.shape[1]
    parts = [
        model.fuse(text[img_idx], attention_mask[img_idx], model.encode_image(pixels[img_idx]))[
            :, :t
        ]
    ]
    if len(txt_idx):
        parts.append(model.fuse(text[txt_idx], attention_mask[txt_idx]))
    order = torch.cat([img_idx, txt_idx])
    return torch.cat(parts)[torch.argsort(order)]


class FinetuneModel(nn.Module):
    """Encoder + task head; the forward returns the fused text states for the head."""

    def __init__(self, encoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return fused_text_states(
            self.encoder,
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            batch["has_image"],
        )


# ----------------------------------------------------------------------------- data


def load_pixels(path: Path, image_size: int) -> torch.Tensor:
    """Image file -> [3, S, S] float, preprocessed exactly as in pretraining."""
    from pipeline.images import decode_rgb, read_image_bytes
    from trainer.data import vit_pixels

    return torch.from_numpy(vit_pixels(decode_rgb(read_image_bytes(str(path))), image_size))


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int | None, group: int = 50
) -> list[list[int]]:
    """Batches of similar length (less padding, same samples per epoch).

    seed None: sorted by length (evaluation). Otherwise a seeded shuffle, sorted by length
    within windows of `group` batches, and the batches shuffled again.
    """
    if seed is None:
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(lengths), generator=gen).tolist()
    window = batch_size * group
    batches = []
    for w in range(0, len(perm), window):
        chunk = sorted(perm[w : w + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


@dataclass
class Split:
    name: str
    path: str
    samples: list  # NerSentence | RelSample
    features: list
    truncated: int = 0  # words (MNER) or samples (MRE) cut by max_len
    text_only: int = 0  # samples without a usable image file
    unreadable_images: int = 0  # image files present but not decodable


class IEDataset(torch.utils.data.Dataset):
    """A split's features; images are read lazily. An unreadable image makes its sample
    text-only from then on (logged once, counted in the split). Runs in-process (no workers),
    so the split's counters see every failure."""

    def __init__(self, split: Split, image_size: int | None):
        self.split = split
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.split.features)

    def __getitem__(self, i: int):
        feat = self.split.features[i]
        pixels = None
        if feat.image is not None and self.image_size:
            try:
                pixels = load_pixels(feat.image, self.image_size)
            except (OSError, ValueError) as e:
                log.warning("image %s unreadable (%s): sample runs text-only", feat.image, e)
                feat.image = None
                self.split.text_only += 1
                self.split.unreadable_images += 1
        return i, feat, pixels


def collate(items, pad_id: int, task: str, image_size: int | None) -> dict[str, Any]:
    n = len(items)
    width = max(len(f.input_ids) for _, f, _ in items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    has_image = torch.tensor([p is not None for *_, p in items], dtype=torch.bool)
    batch: dict[str, Any] = {"index": [i for i, *_ in items], "has_image": has_image}
    for row, (_, f, _) in enumerate(items):
        input_ids[row, : len(f.input_ids)] = torch.tensor(f.input_ids)
        attention_mask[row, : len(f.input_ids)] = 1
    batch.update(input_ids=input_ids, attention_mask=attention_mask)
    if bool(has_image.any()):
        pix = torch.zeros((n, 3, image_size, image_size))
        for row, (*_, p) in enumerate(items):
            if p is not None:
                pix[row] = p
        batch["pixel_values"] = pix
    if task == "mner":
        n_words = max(1, max(len(f.word_index) for _, f, _ in items))
        word_index = torch.zeros((n, n_words), dtype=torch.long)
        word_mask = torch.zeros((n, n_words), dtype=torch.bool)
        labels = torch.zeros((n, n_words), dtype=torch.long)
        for row, (_, f, _) in enumerate(items):
            k = len(f.word_index)
            word_index[row, :k] = torch.tensor(f.word_index, dtype=torch.long)
            word_mask[row, :k] = True
            labels[row, :k] = torch.tensor(f.label_ids, dtype=torch.long)
        batch.update(word_index=word_index, word_mask=word_mask, labels=labels)
    else:
        batch["head_pos"] = torch.tensor([f.head_pos for _, f, _ in items])
        batch["tail_pos"] = torch.tensor([f.tail_pos for _, f, _ in items])
        batch["labels"] = torch.tensor([f.label_id for _, f, _ in items])
    return batch


def read_split(
    cfg: FinetuneConfig, name: str, path: str, tokenizer, labels: dict[str, int], markers
) -> Split:
    if cfg.task == "mner":
        samples = ie_data.read_ner(path)
    else:
        samples = ie_data.read_mnre(path, labels)
    if name == "train" and cfg.max_train_samples:
        samples = samples[: cfg.max_train_samples]
    split = Split(name, path, samples, [])
    for s in samples:
        if cfg.task == "mner":
            feat, cut = ie_data.encode_ner(s, tokenizer, labels, cfg.max_len)
            split.truncated += cut
        else:
            feat = ie_data.encode_rel(s, tokenizer, labels, cfg.max_len, markers)
            split.truncated += int(feat.truncated)
        feat.image = ie_data.find_image(cfg.images, s.img_id)
        split.text_only += feat.image is None
        split.features.append(feat)
    return split


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
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
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
    os.replace(tmp, path)


def run_finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train, select the best dev epoch, evaluate on test, write metrics and predictions."""
    from pipeline.runtime import select_device, set_threads
    from pipeline.shards import write_json_atomic

    if cfg.task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, not {cfg.task!r}")
    set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = Path(cfg.metrics) if cfg.metrics else out / "metrics.json"
    suffix = "txt" if cfg.task == "mner" else "jsonl"
    pred_path = Path(cfg.predictions) if cfg.predictions else out / f"predictions.{suffix}"
    t_start = time.perf_counter()

    encoder, tokenizer, mcfg, desc = load_encoder(cfg)
    max_pos = encoder.bert.config.max_position_embeddings
    if cfg.max_len > max_pos:
        raise ValueError(f"--max-len {cfg.max_len} exceeds the encoder's {max_pos} positions")

    markers, rel2id_path = None, None
    if cfg.task == "mner":
        train_sents = ie_data.read_ner(cfg.train)
        id2label = ie_data.ner_label_list(train_sents)
        labels = {lab: i for i, lab in enumerate(id2label)}
    else:
        rel2id_path = cfg.rel2id or str(Path(cfg.train).with_name("rel2id.json"))
        labels = ie_data.load_rel2id(rel2id_path)
        if cfg.none_label not in labels:
            raise ValueError(
                f"{rel2id_path} has no {cfg.none_label!r} label (the no-relation class that "
                f"P/R/F1 exclude): add it, or name yours with --none-label"
            )
        id2label = [r for r, _ in sorted(labels.items(), key=lambda kv: kv[1])]
        markers = ie_data.add_markers(tokenizer)
        desc["embeddings_resized"] = ensure_vocab(encoder, tokenizer)
        desc["rel2id"] = rel2id_path
    splits = {
        name: read_split(cfg, name, path, tokenizer, labels, markers)
        for name, path in (("train", cfg.train), ("dev", cfg.dev), ("test", cfg.test))
    }
    if cfg.task == "mner":  # a dev/test type unseen in train cannot be predicted; say so
        unseen = {lab for sp in splits.values() for s in sp.samples for lab in s.labels} - set(
            labels
        )
        if unseen:
            raise ValueError(f"labels {sorted(unseen)} in dev/test do not occur in --train")

    missing = {name: sp.text_only for name, sp in splits.items()}
    if cfg.images is None:
        log.info("no --images: running text-only (%s samples)", sum(missing.values()))
    elif any(missing.values()):
        log.info("images missing for %s samples: those run text-only", missing)
    image_size = mcfg.image_size if cfg.images else None

    hidden = encoder.hidden_size
    torch.manual_seed(cfg.seed)
    if cfg.task == "mner":
        head: nn.Module = CRFTagger(hidden, len(id2label), cfg.dropout)
    else:
        head = RelationHead(hidden, len(id2label), cfg.dropout)
    model = FinetuneModel(encoder, head).to(device)

    datasets = {name: IEDataset(sp, image_size) for name, sp in splits.items()}

    def loader(split: Split, train: bool, epoch: int = 0):
        lengths = [len(f.input_ids) for f in split.features]
        size = cfg.batch_size if train else cfg.eval_batch_size
        seed = cfg.seed + epoch if train else None
        return torch.utils.data.DataLoader(
            datasets[split.name],
            batch_sampler=length_grouped_batches(lengths, size, seed),
            collate_fn=lambda items: collate(items, tokenizer.pad_token_id, cfg.task, image_size),
        )

    train_loader = loader(splits["train"], True)
    steps = max(1, cfg.epochs * len(train_loader))
    crf = list(model.head.crf.parameters()) if cfg.task == "mner" else []
    parts = [(model.encoder, cfg.lr_encoder), (model.head, cfg.lr_head, crf)]
    if crf:  # the CRF transitions need a far larger step than the encoder (issue: BIO rules)
        parts.append((model.head.crf, cfg.lr_crf))
    optimizer = build_optimizer(parts, cfg.weight_decay, device)
    scheduler = build_scheduler(optimizer, int(cfg.warmup * steps), steps)

    log.info(
        "%s: train %d, dev %d, test %d; encoder %s (%s), %d epochs x %d steps",
        cfg.task,
        len(splits["train"].samples),
        len(splits["dev"].samples),
        len(splits["test"].samples),
        desc["text_encoder"],
        desc["kind"],
        cfg.epochs,
        len(train_loader),
    )
    history = []
    best_key, best_epoch, best_state, best_dev = -math.inf, 0, None, None
    stale, stopped, best_file, start = 0, False, None, 1
    state_dir = out / "state"
    fingerprint = finetune_state.fingerprint(cfg, rel2id_path, missing)
    found = finetune_state.read_latest(state_dir)
    clear_old_state = False
    if cfg.resume and found is None:
        log.info("--resume: no state in %s, starting at epoch 1", state_dir)
    elif cfg.resume:
        path, saved = found
        finetune_state.check_fingerprint(saved, fingerprint, state_dir)
        t, best_state = finetune_state.restore(path, state_dir, model, optimizer, scheduler)
        start, history, stale, stopped = t["epoch"] + 1, t["history"], t["stale"], t["stopped"]
        best_key, best_epoch, best_dev, best_file = (
            t["best_key"],
            t["best_epoch"],
            t["best_dev"],
            t["best_file"],
        )
        log.info(
            "resumed from %s: epoch %d done, best epoch %d (dev F1 %.4f), %d without improvement",
            path,
            t["epoch"],
            best_epoch,
            best_key,
            stale,
        )
    elif found is not None:
        clear_old_state = True
        log.warning(
            "%s holds a resume state (epoch %d); no --resume: starting over, it is replaced "
            "at the end of epoch 1",
            state_dir,
            found[1]["trainer"]["epoch"],
        )
    dev_loader = loader(splits["dev"], False)
    trained = 0
    for epoch in range(start, cfg.epochs + 1):
        if stopped:
            break  # resumed from a run that had already stopped early
        train_loader = loader(splits["train"], True, epoch)
        model.train()
        t0 = time.perf_counter()
        total, n_batches = 0.0, 0
        for batch in _progress(train_loader, f"epoch {epoch}"):
            batch = to_device(batch, device)
            loss = loss_fn(cfg.task, model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            total += loss.item()
            n_batches += 1
        trained += 1
        pred_ids = predict(cfg.task, model, dev_loader, device, len(splits["dev"].samples))
        dev_scores, _ = score(cfg.task, splits["dev"], pred_ids, id2label, cfg.none_label)
        key = dev_scores["overall"]["f1"]
        o = dev_scores["overall"]
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / max(1, n_batches),
                "dev_precision": o["precision"],
                "dev_recall": o["recall"],
                "dev_f1": o["f1"],
            }
        )
        log.info(
            "epoch %d: loss %.4f, dev P/R/F1 %.4f/%.4f/%.4f (%.1fs)",
            epoch,
            history[-1]["train_loss"],
            o["precision"],
            o["recall"],
            o["f1"],
            time.perf_counter() - t0,
        )
        improved = key > best_key
        if improved:
            best_key, best_epoch, best_dev, stale = key, epoch, dev_scores, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        stopped = bool(cfg.patience and stale >= cfg.patience and epoch < cfg.epochs)
        if clear_old_state:  # the first epoch of a fresh run replaces an old state
            shutil.rmtree(state_dir)
            clear_old_state = False
        step = scheduler.last_epoch  # optimiser steps so far
        if improved:
            best_file = finetune_state.write_best(state_dir, step, best_state)
        trainer_state = {
            "epoch": epoch,
            "history": history,
            "best_key": best_key,
            "best_epoch": best_epoch,
            "best_dev": best_dev,
            "best_file": best_file,
            "stale": stale,
            "stopped": stopped,
            "fingerprint": fingerprint,
        }
        state_path = finetune_state.save_epoch(
            state_dir, step, model, tokenizer, mcfg, optimizer, scheduler, trainer_state
        )
        if stopped:
            log.info("early stop: no dev improvement for %d epochs", stale)
            break
        if cfg.stop_after_epoch == epoch and epoch < cfg.epochs:
            log.info("stopping after epoch %d as asked: continue with --resume", epoch)
            print(f"interrupted after epoch {epoch}; state -> {state_path}", flush=True)
            return {"interrupted_after_epoch": epoch, "state": str(state_path)}
    model.load_state_dict(best_state)

    test_split = splits["test"]
    pred_ids = predict(cfg.task, model, loader(test_split, False), device, len(test_split.samples))
    test_scores, test_pred = score(cfg.task, test_split, pred_ids, id2label, cfg.none_label)
    write_predictions(cfg.task, test_split, test_pred, pred_path)
    if cfg.task == "mner":
        baseline = majority_baseline_ner([s.labels for s in test_split.samples])
    else:
        baseline = majority_baseline_re(
            [s.relation for s in splits["train"].samples],
            [s.relation for s in test_split.samples],
            cfg.none_label,
        )
    text_only = {name: sp.text_only for name, sp in splits.items()}
    metrics = {
        "task": cfg.task,
        "encoder": desc,
        "text_only": {
            "images": cfg.images,
            "samples": text_only,
            "unreadable_images": {name: sp.unreadable_images for name, sp in splits.items()},
            "note": "no --images: all samples text-only"
            if cfg.images is None
            else "samples whose image file is missing or unreadable ran text-only",
        },
        "data": {
            name: {"path": sp.path, "samples": len(sp.samples), "truncated": sp.truncated}
            for name, sp in splits.items()
        },
        "best_epoch": best_epoch,
        "epochs_run": len(history),
        "history": history,
        "dev": best_dev,
        "test": test_scores,
        "test_majority_baseline": baseline["overall"],
        "params": {
            k: v
            for k, v in asdict(cfg).items()
            if k not in ("extra", "resume", "stop_after_epoch")  # same metrics when resumed
        },
    }
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(metrics_path, metrics)
    if cfg.save_model:
        save_finetuned(model, tokenizer, mcfg, id2label, cfg, out / "model")
    wall = time.perf_counter() - t_start
    stats = {
        "wall_s": round(wall, 2),
        "epochs_run": len(history),
        "epochs_trained_now": trained,
        "resumed_after_epoch": start - 1,
    }
    write_json_atomic(out / "stats.json", stats)
    _summary(cfg, metrics, wall, metrics_path, pred_path)
    return metrics


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
    """run_finetune once per seed into OUT/seed-N/; the metrics file gets each run + mean +- std."""
    from pipeline.shards import write_json_atomic

    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct, got {list(seeds)}")
    out = Path(cfg.out)
    runs = {}
    for seed in seeds:
        run_dir = out / f"seed-{seed}"
        runs[seed] = run_finetune(replace(cfg, seed=seed, out=str(run_dir), metrics=None))
        if "interrupted_after_epoch" in runs[seed]:
            return runs[seed]
    summary = {"task": cfg.task, **seed_summary(runs)}
    metrics_path = Path(cfg.metrics) if cfg.metrics else out / "metrics.json"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(metrics_path, summary)
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
    lines.append(f"metrics -> {metrics_path}")
    print("\n".join(lines), flush=True)
    return summary


def save_finetuned(model: FinetuneModel, tokenizer, mcfg, id2label, cfg, path: Path) -> None:
    """Encoder as a pretraining checkpoint (reusable as --init) + head weights and labels."""
    from safetensors.torch import save_file

    from trainer.model import save_pretrained

    save_pretrained(model.encoder, tokenizer, mcfg, path)
    state = {k: v.contiguous().cpu() for k, v in model.head.state_dict().items()}
    save_file(state, str(path / "head.safetensors"), metadata={"task": cfg.task})
    (path / "labels.json").write_text(json.dumps(id2label, indent=1), encoding="utf-8")


def _progress(iterable, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False, disable=not sys.stderr.isatty())


def _summary(cfg, metrics, wall, metrics_path, pred_path) -> None:
    t = metrics["test"]["overall"]
    d = metrics["dev"]["overall"]
    per = metrics["test"].get("per_type") or metrics["test"].get("per_relation")
    lines = [
        f"== finetune {cfg.task}: {metrics['encoder']['text_encoder']} "
        f"({metrics['encoder']['kind']}) ==",
        f"epochs run {metrics['epochs_run']}, best epoch {metrics['best_epoch']}, wall {wall:.1f}s",
        f"text-only samples: {metrics['text_only']['samples']}",
        f"dev  P/R/F1 {d['precision']:.4f} / {d['recall']:.4f} / {d['f1']:.4f}",
        f"test P/R/F1 {t['precision']:.4f} / {t['recall']:.4f} / {t['f1']:.4f}"
        + (f"  acc {t['accuracy']:.4f}" if "accuracy" in t else ""),
        "per "
        + ("type" if cfg.task == "mner" else "relation")
        + " (test F1): "
        + ", ".join(f"{k} {v['f1']:.3f}" for k, v in per.items()),
        f"metrics -> {metrics_path}; predictions -> {pred_path}",
    ]
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> tuple[FinetuneConfig, list[int] | None]:
    defaults = FinetuneConfig(task="mner", train="", dev="", test="")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=TASKS, required=True)
    for name in ("train", "dev", "test"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--rel2id", help="MRE label map (default: rel2id.json beside --train)")
    p.add_argument("--images", help="folder of images named by IMGID / img_id (jpg)")
    p.add_argument(
        "--init",
        default=defaults.init,
        help="pretraining checkpoint dir, preset name (tiny|base) or local HF model dir",
    )
    p.add_argument("--none-label", default=defaults.none_label, help="MRE no-relation label")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="run once per seed (OUT/seed-N/) and report each run plus mean +- std",
    )
    for name in ("preset", "vision_encoder", "out", "metrics", "predictions", "device"):
        p.add_argument(f"--{name.replace('_', '-')}", default=getattr(defaults, name))
    for name in ("max_len", "epochs", "batch_size", "eval_batch_size", "patience", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("n_fusion_layers", "max_train_samples", "threads"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    floats = ("lr_encoder", "lr_head", "lr_crf", "weight_decay", "warmup", "dropout", "grad_clip")
    for name in floats:
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    p.add_argument("--save-model", action="store_true", help="save encoder + head under OUT/model")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest epoch state in OUT/state (same data and parameters)",
    )
    p.add_argument(
        "--stop-after-epoch",
        type=int,
        default=None,
        help="stop once this epoch's state is saved (a planned interruption; then --resume)",
    )
    args = vars(p.parse_args(argv))
    for name in ("images", "rel2id", "vision_encoder", "metrics", "predictions"):
        args[name] = args[name] or None  # "" (e.g. from params.yaml) means unset
    seeds = args.pop("seeds")
    return FinetuneConfig(**args), seeds


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # offline-first: no hub retries
        os.environ.setdefault(var, "1")
    from pipeline.models import WeightsUnavailable

    cfg, seeds = parse_args(argv)
    try:
        if seeds:
            run_seeds(cfg, seeds)
        else:
            run_finetune(cfg)
    except (ie_data.DataFormatError, FileNotFoundError, ValueError, WeightsUnavailable) as e:
        log.error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
