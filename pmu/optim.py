"""One optimizer and schedule factory for every training loop (pretraining, fine-tuning,
teacher adaptation, the student ViT's start): AdamW, linear warmup, then a linear or cosine
decay to 0.

Weight decay follows one rule everywhere: only the weight matrices of linear and convolution
layers decay (nn.MultiheadAttention's packed q/k/v projection counts as linear). Biases, norms,
embeddings (word, position, token type, ViT position and CLS, the image type embedding), raw
projection and scale parameters, the CIT temperature and the CRF transitions do not (BERT /
ALBEF practice: decaying them only pulls scales and lookup rows towards zero).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

DECAYED_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8}  # torch's defaults (BERT, ALBEF)
DECAYS = ("linear", "cosine")


def decayed_parameters(module: nn.Module) -> set[int]:
    """ids of the parameters that take weight decay: `weight` of linear / conv layers and the
    packed input projection of attention layers."""
    out = set()
    for m in module.modules():
        if isinstance(m, DECAYED_MODULES) and isinstance(getattr(m, "weight", None), nn.Parameter):
            out.add(id(m.weight))
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight is not None:
            out.add(id(m.in_proj_weight))
    return out


def param_groups(
    module: nn.Module,
    weight_decay: float,
    lr: float | None = None,
    exclude: Iterable[nn.Parameter] = (),
) -> list[dict[str, Any]]:
    """Two AdamW groups (decay, no decay) for a module's trainable parameters.

    `exclude` leaves parameters out (they belong to another group, e.g. with another lr)."""
    decayed = decayed_parameters(module)
    skip = {id(p) for p in exclude}
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad and id(p) not in skip:
            (decay if id(p) in decayed else no_decay).append(p)
    extra = {} if lr is None else {"lr": lr}
    return [
        {"params": decay, "weight_decay": weight_decay, **extra},
        {"params": no_decay, "weight_decay": 0.0, **extra},
    ]


def build_optimizer(
    parts: Sequence[tuple[nn.Module, float] | tuple[nn.Module, float, Iterable[nn.Parameter]]],
    weight_decay: float,
    device: torch.device | str = "cpu",
    betas: tuple[float, float] = ADAMW["betas"],
    eps: float = ADAMW["eps"],
) -> torch.optim.AdamW:
    """AdamW over (module, lr[, excluded params]) parts, each split into decay / no decay.

    Empty groups are dropped. Fused kernels on CUDA (one launch per step instead of one per
    tensor); the CPU keeps the reference implementation, so CPU runs stay exact. `betas` /
    `eps`: CLIP's (0.9, 0.98) / 1e-6 for the teacher.
    """
    groups = []
    for part in parts:
        module, lr, *rest = part
        exclude = rest[0] if rest else ()
        groups += [g for g in param_groups(module, weight_decay, lr, exclude) if g["params"]]
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=fused or None)


def warmup_linear(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear warmup to 1 over `warmup` steps, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def warmup_cosine(warmup: int, total: int) -> Callable[[int], float]:
    """LR factor: linear warmup to 1 over `warmup` steps, then a cosine to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, warmup: int, total: int, decay: str = "linear"
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup, then `decay` (linear: pretraining and fine-tuning, as BERT; cosine: the
    teacher, as CLIP) to 0 at `total`."""
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, not {decay!r}")
    shape = warmup_linear if decay == "linear" else warmup_cosine
    return torch.optim.lr_scheduler.LambdaLR(optimizer, shape(warmup, total))
