"""PNG pictures of training runs (matplotlib, offline): pretraining loss curves and
fine-tuning dev scores per epoch. `dvc plots show` lists them as image plots."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pmu.io import save_figure


def _figure(n_panels: int, width: float = 3.2, height: float = 2.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), squeeze=False)
    return plt, fig, list(axes[0])


def _save(plt, fig, path: str | os.PathLike) -> Path:
    """Write atomically; no timestamp in the file, so reruns match."""
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)


def pretrain_losses(history: Sequence[dict[str, float]], path: str | os.PathLike) -> Path | None:
    """One panel per logged loss (total first), x = optimiser step."""
    if not history:
        return None
    names = [k for k in ("loss", "itm", "cit", "coe", "cir") if k in history[0]]
    plt, fig, axes = _figure(len(names))
    steps = [row["step"] for row in history]
    for ax, name in zip(axes, names, strict=True):
        ax.plot(steps, [row[name] for row in history], color="tab:blue", lw=1.5)
        ax.set_title("total loss" if name == "loss" else name.upper())
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("pretraining loss (mean over each logging window)", fontsize=10)
    return _save(plt, fig, path)


def finetune_scores(
    history: Sequence[dict[str, Any]], path: str | os.PathLike, title: str, best_epoch: int = 0
) -> Path | None:
    """Dev precision / recall / F1 per epoch (best epoch marked) and the train loss."""
    if not history:
        return None
    plt, fig, (scores, loss) = _figure(2, width=4.0)
    epochs = [row["epoch"] for row in history]
    for key, style in (("dev_f1", "-o"), ("dev_precision", "--"), ("dev_recall", ":")):
        scores.plot(epochs, [row[key] for row in history], style, label=key[4:], ms=4)
    if best_epoch:
        scores.axvline(best_epoch, color="grey", lw=0.8, ls="--", label=f"best ({best_epoch})")
    scores.set_ylim(-0.02, 1.02)
    scores.set_xlabel("epoch")
    scores.set_title("dev scores")
    scores.legend(fontsize=8)
    scores.grid(alpha=0.3)
    loss.plot(epochs, [row["train_loss"] for row in history], "-o", color="tab:red", ms=4)
    loss.set_xlabel("epoch")
    loss.set_title("train loss")
    loss.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)
