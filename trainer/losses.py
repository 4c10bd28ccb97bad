"""Pretraining losses (ITM, CIT, COE, CIR) as pure functions of tensors, plus the two
distributed helpers that feed them (open_clip keeps its gather beside its loss the same way).

Every loss is a mean over rows (pairs, matched pairs or objects; `ALIGN_PAIRS`). `total`
makes the mean a share of a larger one: the sum over this batch's valid rows divided by
`total`, the number of valid rows in the whole global batch (all ranks, all accumulation
micro-batches). The shares of every rank and micro-batch then add up to the global mean
exactly (`batch_totals`, `global_totals`). Without `total` a loss is the plain mean over its
own valid rows.

Every loss returns a scalar that stays connected to its inputs even when no row is valid (it is
then 0), so DDP always sees gradients for every head. Nothing here reads a value back to the
host (no `.item()`, no boolean indexing): the step runs without device syncs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

TEMP_MIN, TEMP_MAX = 0.001, 0.5  # CIT temperature clamp (ALBEF's range)
LOSS_NAMES = ("itm", "cit", "coe", "cir")
# The pairs COE and CIR average over: every pair (eqs. 8 and 10: the whole batch B; the labels
# depend on the image alone) or the matched ones only (this project's first choice).
ALIGN_PAIRS = ("all", "matched")


def _mean(values: Tensor, valid: Tensor | None = None, total: Tensor | float | None = None):
    """sum(values over valid rows) / total; total defaults to the number of valid rows."""
    w = torch.ones_like(values) if valid is None else valid.to(values.dtype)
    denominator = w.sum() if total is None else torch.as_tensor(total, dtype=values.dtype)
    return (values * w).sum() / denominator.to(values.device).clamp(min=1.0)


def itm_loss(logits: Tensor, itm: Tensor, total: Tensor | float | None = None) -> Tensor:
    """Image-text matching: 2-way cross-entropy on the fused [CLS] logits [B, 2]; itm in {0, 1}."""
    return _mean(F.cross_entropy(logits.float(), itm.long(), reduction="none"), None, total)


class Pairs(NamedTuple):
    """CIT's inputs: the pairs whose embeddings serve as candidates, and the rows scored here.

    On one process all rows of the batch; under DDP the pairs of every rank (`gather_pairs`)
    with `rows` this rank's own slice, so each rank's InfoNCE has the global batch's negatives.
    """

    text_emb: Tensor  # [N, D] L2-normalised
    image_emb: Tensor  # [N, D] L2-normalised
    matched: Tensor  # [N] bool
    rows: slice


def cit_loss(
    text_emb: Tensor,
    image_emb: Tensor,
    temp: Tensor | float,
    matched: Tensor | None = None,
    temp_min: float = TEMP_MIN,
    temp_max: float = TEMP_MAX,
    *,
    rows: slice | None = None,
    total: Tensor | float | None = None,
) -> Tensor:
    """Symmetric InfoNCE between L2-normalised text and image embeddings of matched pairs only.

    Row i of `text_emb` and `image_emb` form a pair; rows with matched == 0 are dropped (their
    caption does not describe the image, so they are neither positives nor negatives). `rows`
    restricts the anchors to a slice (a rank's own pairs; every pair stays a candidate), `total`
    divides by the global number of matched pairs instead of the local one.
    """
    n = text_emb.shape[0]
    rows = rows if rows is not None else slice(0, n)
    keep = torch.ones(n, dtype=torch.bool, device=text_emb.device)
    if matched is not None:
        keep = matched.bool()
    t = torch.as_tensor(temp, dtype=torch.float32, device=text_emb.device).clamp(temp_min, temp_max)
    target = torch.arange(n, device=text_emb.device)[rows]
    # candidates: the matched pairs, and a row's own pair (keeps dropped rows finite; weight 0)
    candidate = keep[None, :] | (target[:, None] == torch.arange(n, device=target.device))
    text, image = text_emb.float(), image_emb.float()
    t2i = (text[rows] @ image.t() / t).masked_fill(~candidate, float("-inf"))
    i2t = (image[rows] @ text.t() / t).masked_fill(~candidate, float("-inf"))
    per_row = F.cross_entropy(t2i, target, reduction="none")
    per_row = (per_row + F.cross_entropy(i2t, target, reduction="none")) / 2
    return _mean(per_row, keep[rows], total)


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


def soft_cross_entropy(
    logits: Tensor, q: Tensor, valid: Tensor | None = None, total: Tensor | float | None = None
) -> Tensor:
    """Mean over valid rows of -sum_c q_c log softmax(logits)_c."""
    per_row = -(q.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1)
    return _mean(per_row, valid, total)


def coe_loss(
    ent_logits: Tensor, q_ent: Tensor, valid: Tensor, total: Tensor | float | None = None
) -> Tensor:
    """Object-entity loss: fc_ent(pooled object states) [B, O, M] vs q_ent [B, O, M]."""
    return soft_cross_entropy(ent_logits, q_ent, valid, total)


def cir_loss(
    rel_logits: Tensor,
    q_rel: Tensor,
    valid: Tensor | None = None,
    total: Tensor | float | None = None,
) -> Tensor:
    """Image-relation loss: fc_rel(fused [CLS]) [B, L] vs q_rel [B, L]."""
    return soft_cross_entropy(rel_logits, q_rel, valid, total)


def aligned_rows(batch: Mapping[str, Tensor], align_pairs: str = "all") -> Tensor:
    """bool [B]: the pairs COE and CIR average over (ALIGN_PAIRS)."""
    if align_pairs not in ALIGN_PAIRS:
        raise ValueError(f"align_pairs must be one of {ALIGN_PAIRS}, got {align_pairs!r}")
    matched = batch["itm"] == 1
    return torch.ones_like(matched) if align_pairs == "all" else matched


def batch_totals(batch: Mapping[str, Tensor], align_pairs: str = "all") -> Tensor:
    """Rows each loss averages over in this batch, [4] in LOSS_NAMES order: every pair (ITM),
    matched pairs (CIT), the aligned pairs' objects (COE) and the aligned pairs (CIR)."""
    matched = batch["itm"] == 1
    aligned = aligned_rows(batch, align_pairs)
    objects = batch["box_mask"] & aligned[:, None]
    return torch.stack(
        [torch.ones_like(matched.sum()) * matched.numel(), matched.sum(), objects.sum(),
         aligned.sum()]
    ).float()  # fmt: skip


def global_totals(
    batches: Sequence[Mapping[str, Tensor]], world: int = 1, align_pairs: str = "all"
) -> dict[str, Tensor]:
    """batch_totals summed over an optimiser step's micro-batches and over the ranks (one
    all_reduce; no host sync)."""
    totals = torch.stack([batch_totals(b, align_pairs) for b in batches]).sum(0)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(totals)
    return dict(zip(LOSS_NAMES, totals.unbind(), strict=True))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns each rank the summed gradient of its rows."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        import torch.distributed as dist

        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss may use every row
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_pairs(text_emb: Tensor, image_emb: Tensor, matched: Tensor, world: int = 1) -> Pairs:
    """The CIT pairs of all ranks, gathered with gradients (every rank holds the same number of
    rows: the loader's batches are never partial); `rows` is this rank's slice."""
    n = text_emb.shape[0]
    if world == 1:
        return Pairs(text_emb, image_emb, matched.bool(), slice(0, n))
    import torch.distributed as dist

    rank = dist.get_rank()
    flags = [torch.empty_like(matched) for _ in range(world)]
    dist.all_gather(flags, matched.contiguous())
    return Pairs(
        _GatherWithGrad.apply(text_emb),
        _GatherWithGrad.apply(image_emb),
        torch.cat(flags).bool(),
        slice(rank * n, (rank + 1) * n),
    )


def pretrain_loss(
    out: Mapping[str, Tensor],
    batch: Mapping[str, Tensor],
    lambdas: Mapping[str, float],
    hard: bool = False,
    label_mass: str = "spread",
    *,
    align_pairs: str = "all",
    totals: Mapping[str, Tensor] | None = None,
    pairs: Pairs | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = sum of lambda * loss over the enabled losses; returns (total, detached components).

    `out` is PretrainModel.forward's output (with boxes given, for COE); `batch` the collated
    batch on the same device; n_entities / n_relations come from the label rows' sizes.
    `label_mass`: how truncated top-k labels become full distributions (dense_soft_labels).
    `align_pairs`: the pairs COE and CIR average over: `all` (eqs. 8 and 10; the labels are
    the image's, right for a mismatched caption too) or `matched` only. ITM uses every pair,
    CIT the matched ones.
    `totals` (global_totals, with the same `align_pairs`): each loss becomes this batch's share
    of the global-batch mean. `pairs` (gather_pairs): CIT over every rank's pairs; default this
    batch's own.
    """
    totals = totals or {}
    parts: dict[str, Tensor] = {}
    matched = batch["itm"] == 1
    aligned = aligned_rows(batch, align_pairs)
    if lambdas.get("itm", 0) > 0:
        parts["itm"] = itm_loss(out["itm_logits"], batch["itm"], totals.get("itm"))
    if lambdas.get("cit", 0) > 0:
        p = pairs or Pairs(out["text_emb"], out["image_emb"], matched, slice(None))
        parts["cit"] = cit_loss(
            p.text_emb, p.image_emb, out["temp"], p.matched, rows=p.rows, total=totals.get("cit")
        )
    if lambdas.get("coe", 0) > 0:
        n_ent = out["ent_logits"].shape[-1]
        q_ent = dense_soft_labels(batch["ent_idx"], batch["ent_prob"], n_ent, label_mass)
        if hard:
            q_ent = hard_labels(q_ent)
        valid = batch["box_mask"] & aligned[:, None]
        parts["coe"] = coe_loss(out["ent_logits"], q_ent, valid, totals.get("coe"))
    if lambdas.get("cir", 0) > 0:
        n_rel = out["rel_logits"].shape[-1]
        q_rel = dense_soft_labels(batch["rel_idx"], batch["rel_prob"], n_rel, label_mass)
        if hard:
            q_rel = hard_labels(q_rel)
        parts["cir"] = cir_loss(out["rel_logits"], q_rel, aligned, totals.get("cir"))
    if not parts:
        raise ValueError("every loss weight is 0: nothing to train")
    total = sum(lambdas[k] * v for k, v in parts.items())
    return total, {k: v.detach() for k, v in parts.items()}
