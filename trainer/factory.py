"""Models come from one factory: the fusion a config names (`ModelConfig.fusion`, `--fusion`),
its tokenizer, and checkpoints saved and loaded for any fusion.

The registry is `trainer/fusion.py` (`register_fusion`); the project's own fusions, `albef`
(trainer/model.py, the paper's student) and `hvp` (trainer/hvp.py, an HVPNeT-style prefix
fusion), are registered here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import models
from pmu.errors import InputError
from pmu.io import atomic_dir
from trainer import hvp, model
from trainer.fusion import FUSIONS, FusionSpec, fusion_spec, register_fusion, unwrap
from trainer.model import CONFIG_FILE, WEIGHTS_FILE, ModelConfig

register_fusion(
    "albef", FusionSpec(model.build_albef, model.albef_from_configs, model.ALBEF_SUMMARY)
)
register_fusion("hvp", FusionSpec(hvp.build_hvp, hvp.hvp_from_configs, hvp.HVP_SUMMARY))

__all__ = ["FUSIONS", "build_model", "build_tokenizer", "load_pretrained", "save_pretrained"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The fusion model `cfg.fusion` names, built from `cfg` (preset weights or overrides)."""
    return fusion_spec(cfg.fusion).build(cfg)


def build_tokenizer(cfg: ModelConfig):
    """The tokenizer that goes with cfg's text encoder (random_init uses the shipped vocab)."""
    if cfg.tokenizer:
        return models.load_tokenizer(cfg.preset, cfg.tokenizer)
    if cfg.text_encoder:
        return models.load_tokenizer(cfg.preset, cfg.text_encoder)
    if cfg.random_init:
        return models.load_tokenizer("tiny")
    return models.load_tokenizer(cfg.preset)


def save_pretrained(
    model: nn.Module, tokenizer, cfg: ModelConfig, out_dir, extra: dict | None = None
) -> Path:
    """safetensors weights + config.json (the model config and the fusion's sub-model configs)
    + tokenizer files, written to a temp dir, renamed."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    model = unwrap(model)
    with atomic_dir(out) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {"model_config": cfg.to_dict(), **model.sub_configs(), **(extra or {})}
        text = json.dumps(config, indent=2, sort_keys=True)
        (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def load_pretrained(path, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelConfig, Any]:
    """(model, cfg, tokenizer) from a `save_pretrained` folder; no pretrained download needed."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise InputError(
            f"{path} has no {CONFIG_FILE}: not a saved pretraining checkpoint",
            "pass the folder trainer/run.py wrote (--out)",
        )
    config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    cfg = ModelConfig.from_dict(config["model_config"])
    net = fusion_spec(cfg.fusion).from_configs(cfg, config)
    state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    net.load_state_dict(state, strict=True)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return net.to(device), cfg, tokenizer
