"""The model fine-tuning trains: the encoder from --init (a pretraining checkpoint, a preset or
an HF BERT folder) with the task head on its fused text states."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from trainer.finetune_config import FinetuneConfig


def load_encoder(cfg: FinetuneConfig):
    """(model, tokenizer, model config, description) for --init: checkpoint, preset or HF dir."""
    from pipeline.models import WeightsUnavailable
    from pmu.presets import PRESETS
    from trainer.factory import build_model, build_tokenizer, load_pretrained
    from trainer.model import ModelConfig

    init = Path(cfg.init)
    config_file = init / "config.json"
    if config_file.is_file() and "model_config" in json.loads(config_file.read_text("utf-8")):
        model, mcfg, tokenizer = load_pretrained(init)
        kind = "pretrain-checkpoint"
        if tokenizer is None:
            tokenizer = build_tokenizer(mcfg)
    else:
        common = dict(vision_encoder=cfg.vision_encoder, fusion=cfg.fusion)
        if cfg.init in PRESETS:
            mcfg = ModelConfig(preset=cfg.init, **common)
            kind = "preset"
        elif init.is_dir():
            mcfg = ModelConfig(preset=cfg.preset, text_encoder=str(init), **common)
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
    mcfg.max_crops = cfg.crops if cfg.crops >= 0 else mcfg.max_crops
    desc = {
        "init": cfg.init,
        "kind": kind,
        **({"fusion": mcfg.fusion} if mcfg.fusion != "albef" else {}),
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


class FinetuneModel(nn.Module):
    """Encoder + task head; the forward returns the fused text states for the head."""

    def __init__(self, encoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The fusion's states at the text positions (`text_states` of the fusion interface),
        with the batch's object boxes when it carries them (`--crops`)."""
        return self.encoder.text_states(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            batch["has_image"],
            batch.get("boxes"),
        )


def save_finetuned(model: FinetuneModel, tokenizer, mcfg, id2label, cfg, path: Path) -> None:
    """Encoder as a pretraining checkpoint (reusable as --init) + head weights and labels."""
    from safetensors.torch import save_file

    from trainer.factory import save_pretrained

    save_pretrained(model.encoder, tokenizer, mcfg, path)
    state = {k: v.contiguous().cpu() for k, v in model.head.state_dict().items()}
    save_file(state, str(path / "head.safetensors"), metadata={"task": cfg.task})
    (path / "labels.json").write_text(json.dumps(id2label, indent=1), encoding="utf-8")
