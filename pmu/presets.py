"""Model presets as data: which weights each component loads, and the small random configs.

`base`: the real checkpoints (YOLO yolo11n.pt, open_clip ViT-B-32 / openai, bert-base-uncased,
ViT-B/16 in21k). `tiny`: the same architectures' code paths with small random-initialised
configs, for tests, CI and the offline demo. `small`: random-initialised models sized to be
trained on a CPU in minutes (the synthetic world). The loaders are `pipeline.models`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pmu.errors import InputError

TINY_CLIP_NAME = "pmu-tiny-clip"
SMALL_CLIP_NAME = "pmu-small-clip"
TINY_SEED = 1234  # tiny weights are random but identical on every run (deterministic shards)


@dataclass(frozen=True)
class Preset:
    name: str
    detector: str
    clip_model: str
    clip_pretrained: str | None
    text_encoder: str
    vision_encoder: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    "base": Preset(
        name="base",
        detector="yolo11n.pt",
        clip_model="ViT-B-32",
        clip_pretrained="openai",
        text_encoder="bert-base-uncased",
        vision_encoder="google/vit-base-patch16-224-in21k",
    ),
    "tiny": Preset(
        name="tiny",
        detector="yolo11n.yaml",
        clip_model=TINY_CLIP_NAME,
        clip_pretrained=None,
        text_encoder="tiny",
        vision_encoder="tiny",
    ),
    # Between tiny and base: sized to learn the synthetic world (docs/world.md) on a CPU in
    # minutes. Random weights until the project trains them (adapt-teacher, train-detector,
    # pretraining).
    "small": Preset(
        name="small",
        detector="pmu-yolo-small.yaml",
        clip_model=SMALL_CLIP_NAME,
        clip_pretrained=None,
        text_encoder="small",
        vision_encoder="small",
    ),
}

TINY_BERT = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=512,
)
TINY_VIT = dict(
    image_size=64,
    patch_size=16,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
)
SMALL_BERT = dict(
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=1024,
    max_position_embeddings=512,
)
SMALL_VIT = dict(
    image_size=96,
    patch_size=16,
    hidden_size=192,
    num_hidden_layers=4,
    num_attention_heads=3,
    intermediate_size=768,
)
# Random-initialised text / vision encoders built locally (with the shipped WordPiece vocab).
RANDOM_BERT = {"tiny": TINY_BERT, "small": SMALL_BERT}
RANDOM_VIT = {"tiny": TINY_VIT, "small": SMALL_VIT}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(
            f"unknown preset {name!r}", f"use one of: {', '.join(sorted(PRESETS))}"
        ) from None
