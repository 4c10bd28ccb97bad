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
    from trainer.model import ModelConfig, build_model, build_tokenizer, load_pretrained

    init = Path(cfg.init)
    config_file = init / "config.json"
    if config_file.is_file() and "model_config" in json.loads(config_file.read_text("utf-8")):
        model, mcfg, tokenizer = load_pretrained(init)
        kind = "pretrain-checkpoint"
        if tokenizer is None:
            tokenizer = build_tokenizer(mcfg)
    else:
        if cfg.init in PRESETS:
            mcfg = ModelConfig(preset=cfg.init, vision_encoder=cfg.vision_encoder)
            kind = "preset"
        elif init.is_dir():
            mcfg = ModelConfig(
                preset=cfg.preset, text_encoder=str(init), vision_encoder=cfg.vision_encoder
            )
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
    desc = {
        "init": cfg.init,
        "kind": kind,
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


def fused_text_states(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pixels: torch.Tensor | None,
    has_image: torch.Tensor,
) -> torch.Tensor:
    """Fused states at the text positions [B, T, H]; samples without an image fuse text-only."""
    text = model.encode_text(input_ids, attention_mask)
    if pixels is None or not bool(has_image.any()):
        return model.fuse(text, attention_mask)
    img_idx = has_image.nonzero().squeeze(1)
    txt_idx = (~has_image).nonzero().squeeze(1)
    t = text.shape[1]
    parts = [
        model.fuse(text[img_idx], attention_mask[img_idx], model.encode_image(pixels[img_idx]))[
            :, :t
        ]
    ]
    if len(txt_idx):
        parts.append(model.fuse(text[txt_idx], attention_mask[txt_idx]))
    order = torch.cat([img_idx, txt_idx])
    return torch.cat(parts)[torch.argsort(order)]


class FinetuneModel(nn.Module):
    """Encoder + task head; the forward returns the fused text states for the head."""

    def __init__(self, encoder, head: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def states(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return fused_text_states(
            self.encoder,
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("pixel_values"),
            batch["has_image"],
        )


def save_finetuned(model: FinetuneModel, tokenizer, mcfg, id2label, cfg, path: Path) -> None:
    """Encoder as a pretraining checkpoint (reusable as --init) + head weights and labels."""
    from safetensors.torch import save_file

    from trainer.model import save_pretrained

    save_pretrained(model.encoder, tokenizer, mcfg, path)
    state = {k: v.contiguous().cpu() for k, v in model.head.state_dict().items()}
    save_file(state, str(path / "head.safetensors"), metadata={"task": cfg.task})
    (path / "labels.json").write_text(json.dumps(id2label, indent=1), encoding="utf-8")
