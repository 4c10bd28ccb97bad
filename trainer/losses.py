"""Pretraining losses (ITM, CIT, COE, CIR) and their helpers, as pure functions of tensors.

Every loss returns a scalar that stays connected to its inputs even when no row is valid (it is
then 0), so DDP always sees gradients for every head.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

TEMP_MIN, TEMP_MAX = 0.001, 0.5  # CIT temperature clamp (ALBEF's range)
LOSS_NAMES = ("itm", "cit", "coe", "cir")


def _masked_mean(values: Tensor, valid: Tensor | None) -> Tensor:
    if valid is None:
        return values.mean()
    w = valid.to(values.dtype)
    return (values * w).sum() / w.sum().clamp(min=1.0)


def itm_loss(logits: Tensor, itm: Tensor) -> Tensor:
    """Image-text matching: 2-way cross-entropy on the fused [CLS] logits [B, 2]; itm in {0, 1}."""
    return F.cross_entropy(logits.float(), itm.long())


def cit_loss(
    text_emb: Tensor,
    image_emb: Tensor,
    temp: Tensor | float,
    matched: Tensor | None = None,
    temp_min: float = TEMP_MIN,
    temp_max: float = TEMP_MAX,
) -> Tensor:
    """Symmetric InfoNCE between L2-normalised text and image embeddings of matched pairs only.

    Row i of `text_emb` and `image_emb` form a pair; rows with matched == 0 are dropped (their
    caption does not describe the image, so they are neither positives nor negatives).
    """
    temp = torch.as_tensor(temp, dtype=torch.float32, device=text_emb.device)
    t = temp.clamp(temp_min, temp_max)
    if matched is not None:
        keep = matched.bool()
        anchor = (text_emb.sum() + image_emb.sum()) * 0.0 + t * 0.0  # keeps the graph connected
        if int(keep.sum()) == 0:
            return anchor
        text_emb, image_emb = text_emb[keep], image_emb[keep]
    logits = text_emb.float() @ image_emb.float().t() / t
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


def box_patch_mask(boxes: Tensor, grid: tuple[int, int], min_cover: float = 0.5) -> Tensor:
    """Which patches a box covers: bool [..., rows*cols] (row-major, ViT order).

    `boxes` are xyxy normalised to [0, 1] on the (square-resized) image. A patch belongs to a box
    when the box covers at least `min_cover` of the patch's area; a box that covers no patch that
    much (e.g. smaller than one patch) gets the patch holding its centre, so no object is empty.
    """
    rows, cols = grid
    b = boxes.float().clamp(0.0, 1.0)
    x0, y0 = b[..., 0:1], b[..., 1:2]
    x1, y1 = torch.maximum(b[..., 2:3], x0), torch.maximum(b[..., 3:4], y0)
    px = torch.arange(cols, device=b.device, dtype=b.dtype) / cols
    py = torch.arange(rows, device=b.device, dtype=b.dtype) / rows
    ox = (torch.minimum(x1, px + 1 / cols) - torch.maximum(x0, px)).clamp(min=0) * cols  # [...,C]
    oy = (torch.minimum(y1, py + 1 / rows) - torch.maximum(y0, py)).clamp(min=0) * rows  # [...,R]
    cover = oy.unsqueeze(-1) * ox.unsqueeze(-2)  # [..., R, C] fraction of each patch covered
    mask = (cover >= min_cover - 1e-6).flatten(-2)
    cx = ((x0 + x1) / 2 * cols).long().clamp(0, cols - 1)
    cy = ((y0 + y1) / 2 * rows).long().clamp(0, rows - 1)
    centre = F.one_hot((cy * cols + cx).squeeze(-1), rows * cols).bool()
    empty = ~mask.any(-1, keepdim=True)
    return torch.where(empty, centre, mask)


def pool_patches(patch_states: Tensor, masks: Tensor) -> Tensor:
    """Mean of patch states [B, P, H] under per-object masks [B, O, P] -> [B, O, H]."""
    w = masks.to(patch_states.dtype)
    return (w @ patch_states) / w.sum(-1, keepdim=True).clamp(min=1.0)


LABEL_MASS_MODES = ("spread", "renormalise")


def dense_soft_labels(
    idx: Tensor, prob: Tensor, n_classes: int, label_mass: str = "spread"
) -> Tensor:
    """Top-k (indices, probabilities) [..., K] -> dense distributions [..., n_classes].

    The shards keep the top-k entries of q (eq. 6 / 9) and their kept mass. `spread` (default)
    rebuilds a full distribution: the mass the top-k do not hold (1 - sum of the kept entries)
    is spread evenly over the classes that were not kept, so the target keeps q's entropy.
    `renormalise` scales the top-k to sum to 1 (a sharper target than the paper's). Rows with
    no stored mass (padding) stay all-zero either way.
    """
    if label_mass not in LABEL_MASS_MODES:
        raise ValueError(f"label_mass must be one of {LABEL_MASS_MODES}, got {label_mass!r}")
    index = idx.long().clamp(0, n_classes - 1)
    p = prob.float().clamp(min=0)
    dense = torch.zeros(*idx.shape[:-1], n_classes, dtype=torch.float32, device=idx.device)
    dense.scatter_add_(-1, index, p)
    kept_mass = dense.sum(-1, keepdim=True)
    if label_mass == "renormalise":
        return dense / kept_mass.clamp(min=1e-12)
    kept = torch.zeros_like(dense, dtype=torch.bool).scatter_(-1, index, p > 0)
    n_other = (n_classes - kept.sum(-1, keepdim=True)).clamp(min=1)
    leftover = (1.0 - kept_mass).clamp(min=0) * (kept_mass > 0)
    return torch.where(kept, dense, leftover / n_other)


def hard_labels(q: Tensor) -> Tensor:
    """One-hot argmax of soft labels (the paper's hard-label ablation); zero rows stay zero."""
    one_hot = F.one_hot(q.argmax(-1), q.shape[-1]).to(q.dtype)
    return one_hot * (q.sum(-1, keepdim=True) > 0)


def soft_cross_entropy(logits: Tensor, q: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over valid rows of -sum_c q_c log softmax(logits)_c."""
    per_row = -(q.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return _masked_mean(per_row, valid)


def coe_loss(ent_logits: Tensor, q_ent: Tensor, valid: Tensor) -> Tensor:
    """Object-entity loss: fc_ent(pooled object states) [B, O, M] vs q_ent [B, O, M]."""
    return soft_cross_entropy(ent_logits, q_ent, valid)


def cir_loss(rel_logits: Tensor, q_rel: Tensor, valid: Tensor | None = None) -> Tensor:
    """Image-relation loss: fc_rel(fused [CLS]) [B, L] vs q_rel [B, L]."""
    return soft_cross_entropy(rel_logits, q_rel, valid)


def pretrain_loss(
    out: Mapping[str, Tensor],
    batch: Mapping[str, Tensor],
    lambdas: Mapping[str, float],
    hard: bool = False,
    label_mass: str = "spread",
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = sum of lambda * loss over the enabled losses; returns (total, detached components).

    `out` is PretrainModel.forward's output (with boxes given, for COE); `batch` the collated
    batch on the same device; n_entities / n_relations come from the label rows' sizes.
    `label_mass`: how truncated top-k labels become full distributions (dense_soft_labels).

    COE and CIR use matched pairs only (a mismatched caption says nothing about the image's
    objects, and the fused states then mix in the wrong text); ITM uses every pair.
    """
    parts: dict[str, Tensor] = {}
    matched = batch["itm"] == 1
    if lambdas.get("itm", 0) > 0:
        parts["itm"] = itm_loss(out["itm_logits"], batch["itm"])
    if lambdas.get("cit", 0) > 0:
        parts["cit"] = cit_loss(out["text_emb"], out["image_emb"], out["temp"], matched)
    if lambdas.get("coe", 0) > 0:
        n_ent = out["ent_logits"].shape[-1]
        q_ent = dense_soft_labels(batch["ent_idx"], batch["ent_prob"], n_ent, label_mass)
        if hard:
            q_ent = hard_labels(q_ent)
        valid = batch["box_mask"] & matched[:, None]
        parts["coe"] = coe_loss(out["ent_logits"], q_ent, valid)
    if lambdas.get("cir", 0) > 0:
        n_rel = out["rel_logits"].shape[-1]
        q_rel = dense_soft_labels(batch["rel_idx"], batch["rel_prob"], n_rel, label_mass)
        if hard:
            q_rel = hard_labels(q_rel)
        parts["cir"] = cir_loss(out["rel_logits"], q_rel, matched)
    if not parts:
        raise ValueError("every loss weight is 0: nothing to train")
    total = sum(lambdas[k] * v for k, v in parts.items())
    return total, {k: v.detach() for k, v in parts.items()}
