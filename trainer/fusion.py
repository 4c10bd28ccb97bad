"""The fusion interface: what pretraining and fine-tuning need from a multimodal model, the
pretraining heads every fusion shares, and the registry (`--fusion NAME`).

A fusion model turns a caption (token ids and mask), an image (uint8 pixels) and its object
boxes into `FusionStates`, the states the losses read:

| state | shape | read by |
|---|---|---|
| `cls` | [B, H] | ITM (`itm_head`): the fused [CLS] |
| `relation` | [B, H] | CIR (`fc_rel`): the fused [CLS] (or what `align_on` names) |
| `text_cls` | [B, Ht] | CIT (`text_proj`): the unimodal text [CLS] |
| `image_cls` | [B, Hv] | CIT (`image_proj`): the unimodal image embedding |
| `objects` | [B, O, H] | COE (`fc_ent`): one state per box |

and, for fine-tuning, `text_states(...)` -> [B, T, H]: the fused states at the text positions,
which the MNER (CRF) and MRE (entity-marker) heads read. Text-only samples fuse nothing.

Every fusion is an `nn.Module` with `cfg` (a `trainer.model.ModelConfig`), `hidden_size`,
`states(...)`, `text_states(...)`, `vision_modules()` (the image side, its own learning rate),
`resize_token_embeddings(n)`, `sub_configs()` (what a checkpoint saves to rebuild it) and the
heads below (`add_pretrain_heads`); its `forward` is `pretrain_outputs(self, self.states(...))`,
the dict `trainer.losses.pretrain_loss` takes (subclass `FusionModule` to get that forward).
`trainer/factory.py` makes every model from its registered spec; register a new one with
`register_fusion` (docs/trainer.md: "Add your own fusion").
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pmu.errors import InputError


@dataclass
class FusionStates:
    """What the four pretraining losses read from a fusion model (see the module docstring)."""

    cls: Tensor
    relation: Tensor
    text_cls: Tensor | None = None
    image_cls: Tensor | None = None
    objects: Tensor | None = None


def add_pretrain_heads(
    module: nn.Module, cfg: Any, hidden: int, text_width: int, image_width: int
) -> None:
    """The heads of the enabled losses as attributes of `module` (created in this order, under
    the caller's seed): `itm_head`, `text_proj` / `image_proj` / `temp` (CIT), `fc_ent`, `fc_rel`.
    A head whose loss is off is None (its weight is 0: the paper's ablations)."""
    module.itm_head = nn.Linear(hidden, 2) if cfg.itm_head else None
    if cfg.proj_dim > 0:
        module.text_proj = nn.Linear(text_width, cfg.proj_dim)
        module.image_proj = nn.Linear(image_width, cfg.proj_dim)
        module.temp = nn.Parameter(torch.tensor(float(cfg.temp_init)))
    else:
        module.text_proj = module.image_proj = None
        module.temp = None
    module.fc_ent = nn.Linear(hidden, cfg.n_entities) if cfg.n_entities > 0 else None
    module.fc_rel = nn.Linear(hidden, cfg.n_relations) if cfg.n_relations > 0 else None


def pretrain_outputs(module: nn.Module, states: FusionStates) -> dict[str, Tensor]:
    """The heads applied to a fusion's states: the dict `trainer.losses.pretrain_loss` reads."""
    out: dict[str, Tensor] = {"fused_cls": states.cls}
    if module.itm_head is not None:
        out["itm_logits"] = module.itm_head(states.cls)
    if module.text_proj is not None and states.text_cls is not None:
        out["text_emb"] = F.normalize(module.text_proj(states.text_cls).float(), dim=-1)
        out["image_emb"] = F.normalize(module.image_proj(states.image_cls).float(), dim=-1)
        out["temp"] = module.temp
    if module.fc_ent is not None and states.objects is not None:
        out["ent_logits"] = module.fc_ent(states.objects)
    if module.fc_rel is not None:
        out["rel_logits"] = module.fc_rel(states.relation)
    return out


class FusionModule(nn.Module):
    """A base for fusions: `forward` is the pretraining heads on `states(...)` (plus whatever
    sequence the fusion returns beside them). Subclasses define `states` and the rest."""

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor,
        boxes: Tensor | None = None,
        min_cover: float = 0.5,
    ) -> dict[str, Tensor]:
        states, sequence = self.states(input_ids, attention_mask, pixel_values, boxes, min_cover)
        return {**sequence, **pretrain_outputs(self, states)}


@dataclass(frozen=True)
class FusionSpec:
    """How to make one fusion: `build(cfg)` from a config (preset or local weights), and
    `from_configs(cfg, configs)` from the sub-model configs a checkpoint saved (the model's own
    `sub_configs()`; its weights are loaded after)."""

    build: Callable[[Any], nn.Module]
    from_configs: Callable[[Any, dict[str, Any]], nn.Module]
    summary: str


FUSIONS: dict[str, FusionSpec] = {}


def register_fusion(name: str, spec: FusionSpec) -> None:
    """Make a fusion model available as `--fusion NAME` (pretraining and fine-tuning)."""
    FUSIONS[name] = spec


def fusion_spec(name: str) -> FusionSpec:
    """The registered fusion `name` (trainer.factory registers the project's own). A name
    `package.module:fusion` first imports the module, which registers `fusion`; a checkpoint
    saves the whole name, so loading it imports the module again."""
    module, _, short = name.rpartition(":")
    if module and short not in FUSIONS:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise InputError(
                f"--fusion {name}: cannot import {module} ({exc})",
                "put the module's folder on PYTHONPATH",
            ) from None
    if short not in FUSIONS:
        where = f" (importing {module} registered none by that name)" if module else ""
        raise InputError(
            f"unknown fusion {name!r}{where}",
            f"use --fusion with one of: {', '.join(sorted(FUSIONS))}, or module:name",
        )
    return FUSIONS[short]


def unwrap(model: nn.Module) -> nn.Module:
    """The fusion model inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def crop_boxes(pixels: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Object crops [B, O, 3, size, size] of images [B, 3, S, S] at normalised xyxy boxes."""
    from torchvision.ops import roi_align

    b, o = boxes.shape[:2]
    side = pixels.shape[-1]
    scaled = boxes.float().clamp(0, 1) * side
    index = torch.arange(b, device=pixels.device, dtype=scaled.dtype).repeat_interleave(o)
    rois = torch.cat([index[:, None], scaled.reshape(-1, 4)], dim=1)
    crops = roi_align(pixels.float(), rois, (size, size), spatial_scale=1.0, aligned=True)
    return crops.view(b, o, 3, size, size)
