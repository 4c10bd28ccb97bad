"""Resumable training state without pickle: optimizer and RNG states as safetensors + JSON,
and a state folder (weights, optimizer, scheduler, counters) written atomically.

    {state}/model.safetensors      the trained module's state dict
    {state}/optimizer.safetensors  the optimizer's tensors (moments)
    {state}/state.json             counters, the optimizer's other fields, the scheduler

`trainer/checkpoint.py` builds the pretraining's step folders from the same helpers.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pmu.io import atomic_dir

# ------------------------------------------------------------------------------ optimizer


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------ RNG


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    np_state = np.random.get_state()
    meta = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *[float(x) for x in np_state[2:]]],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), cached))


# ------------------------------------------------------------------------------ a state folder


def save_training_state(
    state_dir: str | os.PathLike,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    info: dict[str, Any],
) -> None:
    """Weights, optimizer, scheduler and `info` (JSON) as one folder, replaced atomically."""
    with atomic_dir(state_dir) as tmp:
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()},
            str(tmp / "model.safetensors"),
        )
        tensors, meta = optimizer_to_flat(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {**info, "optimizer": meta, "scheduler": scheduler.state_dict()}
        (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")


def load_training_state(
    state_dir: str | os.PathLike,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
) -> dict[str, Any]:
    """Restore what `save_training_state` wrote; returns its `info` (with the step counters)."""
    state_dir = Path(state_dir)
    state = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
    module.load_state_dict(load_file(str(state_dir / "model.safetensors")), strict=True)
    flat = load_file(str(state_dir / "optimizer.safetensors"))
    optimizer.load_state_dict(optimizer_from_flat(flat, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    return state


def saved_info(state_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The state.json of a state folder, or None when there is none yet."""
    path = Path(state_dir) / "state.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
