"""Fine-tuning resume state: per-epoch folders via trainer.checkpoint, best model, fingerprint.

    OUT/state/step-NNNNNNNN/   model/ (encoder), head.safetensors, optimizer.safetensors,
                               rng-rank0.*, trainer_state.json (epoch, history, best, patience)
    OUT/state/best-step-NNNNNNNN.safetensors   weights of the best dev epoch so far
    OUT/state/latest.json      the last complete epoch folder

Only the latest epoch folder is kept. The best file is written (temp + rename) before the
epoch folder that names it is published, and older best files are removed after, so a crash
at any moment leaves a consistent state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pmu.fingerprint import fingerprint as fingerprint_of
from pmu.fingerprint import refuse_other_run
from pmu.io import atomic_path
from pmu.settings import settings_dict
from trainer import checkpoint

# settings that do not change what is trained: a resume may change them
NOT_FINGERPRINTED = (
    "out",
    "metrics",
    "report",
    "predictions",
    "plot",
    "threads",
    "device",
    "save_model",
    "resume",
    "stop_after_epoch",
)
HASHED_FILES = ("train", "dev", "test")  # by content, not by path: the data may move


def fingerprint(cfg, rel2id: str | None, text_only: dict[str, int]) -> dict[str, Any]:
    """What determines the training run: params, data file contents, init files, images found."""
    from pmu.io import file_sha256

    params = {
        k: v
        for k, v in settings_dict(cfg).items()
        if k not in NOT_FINGERPRINTED and k not in HASHED_FILES and k != "rel2id"
    }
    files = {name: file_sha256(getattr(cfg, name)) for name in HASHED_FILES}
    if rel2id:
        files["rel2id"] = file_sha256(rel2id)
    init = Path(cfg.init)
    if init.is_dir():  # a checkpoint or HF folder: its config and weights
        for f in sorted(init.iterdir()):
            if f.is_file() and f.suffix in (".json", ".safetensors", ".bin", ".txt"):
                files[f"init/{f.name}"] = file_sha256(f)
    return fingerprint_of({"params": params, "files": files, "text_only": dict(text_only)})


def read_latest(state_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(latest epoch folder, its trainer_state.json) or None when there is no state."""
    path = checkpoint.latest_state(state_dir)
    if path is None:
        return None
    return path, json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], state_dir: Path) -> None:
    """Refuse a resume whose data or parameters differ from the run that wrote the state."""
    refuse_other_run(saved["trainer"]["fingerprint"], current, state_dir)


def write_best(state_dir: Path, step: int, state: dict[str, torch.Tensor]) -> str:
    """The best model's weights as their own file (temp + rename); returns the file name."""
    state_dir.mkdir(parents=True, exist_ok=True)
    name = f"best-{checkpoint.step_dir_name(step)}.safetensors"
    with atomic_path(state_dir / name) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp))
    return name


def save_epoch(
    state_dir: Path, step: int, model, tokenizer, mcfg, optimizer, scheduler, trainer: dict
) -> Path:
    """Publish one epoch's folder (atomic rename), then drop best files no longer named."""
    stale_tmp = state_dir / (checkpoint.step_dir_name(step) + ".tmp")
    if stale_tmp.exists():  # left by a run killed while saving this very step
        shutil.rmtree(stale_tmp)
    checkpoint.save_rank_rng(state_dir, step, 0)
    path = checkpoint.save_state(
        state_dir,
        step,
        model.encoder,
        tokenizer,
        mcfg,
        optimizer,
        scheduler,
        trainer,
        keep=1,
        extra_tensors={"head.safetensors": model.head.state_dict()},
    )
    for f in state_dir.glob("best-*.safetensors*"):
        if f.name != trainer["best_file"]:
            f.unlink(missing_ok=True)
    return path


def restore(
    path: Path, state_dir: Path, model, optimizer, scheduler
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Load weights, optimizer, scheduler and RNG from an epoch folder; (trainer state, best)."""
    trainer = checkpoint.load_state(path, model.encoder, optimizer, scheduler)
    device = str(next(model.parameters()).device)
    model.head.load_state_dict(load_file(str(path / "head.safetensors"), device=device))
    best = load_file(str(state_dir / trainer["best_file"]), device=device)
    return trainer, best
