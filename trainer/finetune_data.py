"""Fine-tuning's data: the splits read and checked (`read_samples`), encoded (`encode_split`),
their images found (per-split folders, `check_images_found`), batches of similar length and
their collation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pmu.errors import InputError
from trainer import ie_data
from trainer.finetune_config import FinetuneConfig

log = logging.getLogger("finetune")


def load_pixels(path: Path, image_size: int) -> torch.Tensor:
    """Image file -> [3, S, S] uint8, preprocessed exactly as in pretraining (the model
    normalises with its own encoder's mean and std)."""
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
    missing_images: list[str] = field(default_factory=list)  # img_ids not found


class IEDataset(torch.utils.data.Dataset):
    """A split's features; images are read lazily. An unreadable image makes its sample
    text-only from then on (logged once, counted in the split). Runs in-process (no workers),
    so the split's counters see every failure."""

    def __init__(self, split: Split, image_size: int | None, boxes: dict[str, list] | None = None):
        self.split = split
        self.image_size = image_size
        self.boxes = boxes  # image path -> its object boxes (the crops), or None

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
        crops = self.boxes.get(str(feat.image), []) if self.boxes and pixels is not None else None
        return i, feat, pixels, crops


def collate(
    items, pad_id: int, task: str, image_size: int | None, n_crops: int = 0
) -> dict[str, Any]:
    """Padded token ids, uint8 images, the crops' boxes ([B, n_crops, 4], zero rows where a
    sample has fewer) and the task's labels."""
    n = len(items)
    width = max(len(f.input_ids) for _, f, *_ in items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    has_image = torch.tensor([p is not None for _, _, p, _ in items], dtype=torch.bool)
    batch: dict[str, Any] = {"index": [i for i, *_ in items], "has_image": has_image}
    for row, (_, f, *_) in enumerate(items):
        input_ids[row, : len(f.input_ids)] = torch.tensor(f.input_ids)
        attention_mask[row, : len(f.input_ids)] = 1
    batch.update(input_ids=input_ids, attention_mask=attention_mask)
    if bool(has_image.any()):
        pix = torch.zeros((n, 3, image_size, image_size), dtype=torch.uint8)
        for row, (_, _, p, _) in enumerate(items):
            if p is not None:
                pix[row] = p
        batch["pixel_values"] = pix
        if n_crops > 0:
            boxes = torch.zeros((n, n_crops, 4))
            for row, (*_, crops) in enumerate(items):
                for c, box in enumerate((crops or [])[:n_crops]):
                    boxes[row, c] = torch.tensor(box)
            batch["boxes"] = boxes
    if task == "mner":
        n_words = max(1, max(len(f.word_index) for _, f, *_ in items))
        word_index = torch.zeros((n, n_words), dtype=torch.long)
        word_mask = torch.zeros((n, n_words), dtype=torch.bool)
        labels = torch.zeros((n, n_words), dtype=torch.long)
        for row, (_, f, *_) in enumerate(items):
            k = len(f.word_index)
            word_index[row, :k] = torch.tensor(f.word_index, dtype=torch.long)
            word_mask[row, :k] = True
            labels[row, :k] = torch.tensor(f.label_ids, dtype=torch.long)
        batch.update(word_index=word_index, word_mask=word_mask, labels=labels)
    else:
        batch["head_pos"] = torch.tensor([f.head_pos for _, f, *_ in items])
        batch["tail_pos"] = torch.tensor([f.tail_pos for _, f, *_ in items])
        batch["labels"] = torch.tensor([f.label_id for _, f, *_ in items])
    return batch


SPLITS = ("train", "dev", "test")
EXAMPLES = {"mner": "sentences (IMGID line, token<TAB>label lines)", "mre": "dict-literal lines"}


def read_samples(cfg: FinetuneConfig, rel2id: dict[str, int] | None) -> dict[str, list]:
    """The three splits' samples (NerSentence | RelSample), read before any model loads: a
    split without examples is an InputError naming its file (an empty train split would
    "train" nothing, an empty dev or test split score nothing)."""
    samples = {}
    for name in SPLITS:
        path = getattr(cfg, name)
        rows = ie_data.read_ner(path) if cfg.task == "mner" else ie_data.read_mnre(path, rel2id)
        if not rows:
            raise InputError(f"no examples in {path} (--{name}): expected {EXAMPLES[cfg.task]}")
        samples[name] = rows
    return samples


def check_known_labels(cfg: FinetuneConfig, samples: dict[str, list], labels: dict) -> None:
    """MNER: every dev / test label is one the tagger has (the four standard types and the
    types train has): the CRF cannot predict another, and encoding would fail on it."""
    for name in SPLITS[1:]:
        for s in samples[name]:
            unknown = [(i, lab) for i, lab in enumerate(s.labels) if lab not in labels]
            if unknown:
                i, lab = unknown[0]
                raise InputError(
                    f"{getattr(cfg, name)}:{s.line + i}: label {lab!r} (--{name}) does not "
                    f"occur in --train {cfg.train}: the tagger cannot predict it; add "
                    "training sentences with it or map it to a type train has"
                )


def encode_split(
    cfg: FinetuneConfig, name: str, samples: list, tokenizer, labels: dict[str, int], markers
) -> Split:
    """A split's samples encoded for the model, with their image files found."""
    path = getattr(cfg, name)
    if name == "train" and cfg.max_train_samples:
        samples = samples[: cfg.max_train_samples]
    split = Split(name, path, samples, [])
    folders = ie_data.image_folders(cfg.split_images(name), name)
    for s in samples:
        if cfg.task == "mner":
            feat, cut = ie_data.encode_ner(s, tokenizer, labels, cfg.max_len)
            split.truncated += cut
        else:
            feat = ie_data.encode_rel(s, tokenizer, labels, cfg.max_len, markers)
            split.truncated += int(feat.truncated)
        feat.image = ie_data.find_image(folders, s.img_id)
        split.text_only += feat.image is None
        if folders and s.img_id and feat.image is None:
            split.missing_images.append(s.img_id)
        split.features.append(feat)
    return split


def check_images_found(cfg: FinetuneConfig, splits: dict[str, Split]) -> None:
    """A run given images must see them: a split that misses more than
    `max_missing_images` of its images stops the run (it would quietly train text-only)."""
    for name, sp in splits.items():
        wanted = sum(1 for s in sp.samples if s.img_id)
        missing = len(sp.missing_images)
        if wanted and missing / wanted > cfg.max_missing_images:
            folders = ", ".join(str(f) for f in ie_data.image_folders(cfg.split_images(name), name))
            raise InputError(
                f"{name}: {missing} of {wanted} images not found in {folders} (e.g. "
                f"{sp.missing_images[0]!r}); pass the split's folder (--images-{name} DIR, or "
                f"--images DIR with {'/'.join(ie_data.SPLIT_FOLDERS[name])}/ inside), or "
                "--max-missing-images 1 to run those samples text-only"
            )
