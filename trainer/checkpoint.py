"""Resumable training state: atomic step folders of safetensors + JSON (never pickle).

    {state_dir}/step-00000050/model/        save_pretrained folder (loadable with load_pretrained)
    {state_dir}/step-00000050/optimizer.safetensors + trainer_state.json
    {state_dir}/step-00000050/rng-rank{r}.safetensors + rng-rank{r}.json   (one per DDP rank)
    {state_dir}/latest.json                 {"step": 50, "dir": "step-00000050"}

A step folder is assembled under a temp name and renamed into place; latest.json is replaced
after it, so a crash at any moment leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pmu.io import write_json_atomic
from pmu.train_state import optimizer_from_flat, optimizer_to_flat, rng_state, set_rng_state
from trainer.factory import save_pretrained
from trainer.fusion import unwrap

LATEST = "latest.json"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


# ------------------------------------------------------------------------------ save / load


def _tmp_dir(state_dir: Path, step: int) -> Path:
    return state_dir / (step_dir_name(step) + ".tmp")


def save_rank_rng(state_dir: str | os.PathLike, step: int, rank: int) -> None:
    """Every rank writes its own RNG state into the step's temp folder (before `save_state`)."""
    tmp = _tmp_dir(Path(state_dir), step)
    tmp.mkdir(parents=True, exist_ok=True)
    tensors, meta = rng_state()
    save_file(tensors, str(tmp / f"rng-rank{rank}.safetensors"))
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(meta), encoding="utf-8")


def save_state(
    state_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    tokenizer,
    model_cfg,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    keep: int = 2,
    extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Rank 0: finish the step folder (model, optimizer, scheduler, counters), publish it.

    extra_tensors: more safetensors files for the folder, {file name: tensors} (e.g. a head).
    """
    state_dir = Path(state_dir)
    tmp = _tmp_dir(state_dir, step)
    tmp.mkdir(parents=True, exist_ok=True)
    for name, tensors in (extra_tensors or {}).items():
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / name))
    save_pretrained(unwrap(model), tokenizer, model_cfg, tmp / "model")
    tensors, meta = optimizer_to_flat(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "step": step,
        "optimizer": meta,
        "scheduler": scheduler.state_dict(),
        "trainer": trainer_state,
    }
    (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    final = state_dir / step_dir_name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_json_atomic(state_dir / LATEST, {"step": step, "dir": final.name})
    for old in sorted(state_dir.glob("step-*"))[:-keep] if keep > 0 else []:
        if old.name != final.name and not old.name.endswith(".tmp"):
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_state(state_dir: str | os.PathLike) -> Path | None:
    """The folder named by latest.json, or None when there is no checkpoint yet."""
    state_dir = Path(state_dir)
    if not (state_dir / LATEST).is_file():
        return None
    path = state_dir / json.loads((state_dir / LATEST).read_text(encoding="utf-8"))["dir"]
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{state_dir}/{LATEST} points at {path.name}, which is incomplete")
    return path


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """The `trainer` part of a step folder's trainer_state.json (what the run saved)."""
    state = json.loads((Path(path) / "trainer_state.json").read_text(encoding="utf-8"))
    return state["trainer"]


def load_state(
    path: str | os.PathLike,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    rank: int = 0,
) -> dict[str, Any]:
    """Restore model, optimizer, scheduler and this rank's RNG; return the trainer state."""
    from trainer.model import WEIGHTS_FILE

    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
    target = unwrap(model)
    device = next(target.parameters()).device
    weights = load_file(str(path / "model" / WEIGHTS_FILE), device=str(device))
    target.load_state_dict(weights, strict=True)
    # on CPU: load_state_dict moves moments to the parameters and keeps `step` where it belongs
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer.load_state_dict(optimizer_from_flat(opt_tensors, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():
        meta = json.loads((path / f"rng-rank{rank}.json").read_text(encoding="utf-8"))
        set_rng_state(load_file(str(rng_file)), meta)
    return {"step": int(state["step"]), **state["trainer"]}
