"""The project's own fusion (`--fusion albef`, the paper's student): BERT text layers, ViT, and
BERT fusion layers over text + patches; and `ModelConfig`, the config every fusion is built from.

ALBEF-style split of one BERT-like encoder: its embeddings and lower layers encode the text; its
upper `n_fusion_layers` layers (initialised from the same pretrained weights) run over
concat(text tokens, projected ViT tokens + an image type embedding), paper eq. 2. With no image
the fusion layers see the text alone, so a text-only forward equals the original HF encoder.
It implements the fusion interface of `trainer/fusion.py`; models come from `trainer/factory.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import models
from pmu.errors import InputError
from pmu.io import atomic_dir
from pmu.settings import settings_dict
from trainer.fusion import FusionModule, FusionStates, add_pretrain_heads, crop_boxes

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FUSION_EXTRAS_FILE = "fusion_extras.safetensors"
INIT_SEED = 4321  # heads and projections are initialised under this seed (reproducible models)
# ViT-in21k's normalisation, also used by the tiny and random-init ViTs (they have no processor)
DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)
PROCESSOR_FILE = "preprocessor_config.json"
ALIGN_ON = ("fused", "vision")
ALBEF_SUMMARY = "ALBEF-style split BERT: text layers, ViT patches, fusion layers (the paper's)"


@dataclass
class ModelConfig:
    """Everything needed to rebuild the architecture (weights come from the preset or a file)."""

    preset: str = "tiny"
    text_encoder: str | None = None  # local HF dir / hub name overriding the preset's BERT
    vision_encoder: str | None = None  # local HF dir / hub name overriding the preset's ViT
    tokenizer: str | None = None  # defaults to text_encoder's tokenizer (tiny: shipped vocab)
    random_init: bool = False  # build the preset's architecture with random weights (no download)
    n_fusion_layers: int | None = None  # None: half of the BERT layers (at least 1)
    n_entities: int = 0  # 0: no fc_ent head (COE off)
    n_relations: int = 0  # 0: no fc_rel head (CIR off)
    itm_head: bool = True  # False: no ITM head (ITM off)
    proj_dim: int = 256  # 0: no CIT projections/temperature (CIT off)
    temp_init: float = 0.07
    image_size: int | None = None  # filled from the ViT config
    patch_size: int | None = None  # filled from the ViT config
    # pixel normalisation, from the vision encoder's preprocessor_config.json (build_model);
    # saved with the model, so fine-tuning and the alignment plot normalise the same way
    image_mean: list[float] | None = None  # None: DEFAULT_IMAGE_MEAN
    image_std: list[float] | None = None
    attn_implementation: str = "sdpa"  # BERT and ViT attention: sdpa (fused kernels) | eager
    # states COE and CIR read: "fused" (the paper: patches and [CLS] after the fusion layers) or
    # "vision" (projected ViT states before fusion, so only the image can answer them)
    align_on: str = "fused"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form (e.g. vocab sizes, notes)
    # Fields added after checkpoints were first written are saved only when not at their
    # default, so an older model's config.json (and its bytes) stays as it was.
    fusion: str = field(default="albef", metadata={"omit_default": True})  # trainer/fusion.py
    max_crops: int = field(default=0, metadata={"omit_default": True})  # object crops fused
    vision_arch: str = field(default="", metadata={"omit_default": True})  # hvp: its CNN

    def to_dict(self) -> dict[str, Any]:
        return settings_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class PretrainModel(FusionModule):
    """Text encoder + vision encoder + fusion layers + the four pretraining heads."""

    def __init__(self, cfg: ModelConfig, bert: nn.Module, vit: nn.Module):
        super().__init__()
        if not (hasattr(bert, "embeddings") and hasattr(bert, "encoder")):
            raise InputError(f"text encoder {type(bert).__name__} is not a BERT-like encoder")
        self.cfg = cfg
        self.bert = bert
        self.vit = vit
        for encoder in (bert, vit):
            if encoder.config._attn_implementation != cfg.attn_implementation:
                encoder.set_attn_implementation(cfg.attn_implementation)
        if cfg.align_on not in ALIGN_ON:
            raise ValueError(f"align_on must be one of {ALIGN_ON}, got {cfg.align_on!r}")
        cfg.image_mean = list(cfg.image_mean or DEFAULT_IMAGE_MEAN)
        cfg.image_std = list(cfg.image_std or DEFAULT_IMAGE_STD)
        # [1, 3, 1, 1] buffers, not saved: the values live in the config
        self.register_buffer("pixel_mean", _channels(cfg.image_mean), persistent=False)
        self.register_buffer("pixel_std", _channels(cfg.image_std), persistent=False)
        n_layers = len(bert.encoder.layer)
        n_fusion = cfg.n_fusion_layers if cfg.n_fusion_layers is not None else max(1, n_layers // 2)
        if not 1 <= n_fusion <= n_layers:
            raise InputError(f"n_fusion_layers={n_fusion} must be in [1, {n_layers}]")
        cfg.n_fusion_layers = n_fusion
        self.n_text_layers = n_layers - n_fusion
        cfg.image_size = int(vit.config.image_size)
        cfg.patch_size = int(vit.config.patch_size)
        hidden, v_hidden = bert.config.hidden_size, vit.config.hidden_size
        with models.seeded(INIT_SEED):
            # patch projection ViT width -> BERT width, and the image modality type embedding
            # (text tokens keep BERT's own token-type-0 embedding as their modality embedding).
            self.patch_proj = nn.Sequential(nn.Linear(v_hidden, hidden), nn.LayerNorm(hidden))
            self.image_type_embedding = nn.Parameter(torch.randn(hidden) * 0.02)
            add_pretrain_heads(self, cfg, hidden, hidden, v_hidden)

    # -------------------------------------------------------------------------- geometry

    def patch_grid(self) -> tuple[int, int]:
        """(rows, cols) of ViT patches."""
        n = self.cfg.image_size // self.cfg.patch_size
        return n, n

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    def vision_modules(self) -> nn.ModuleList:
        """The image side (ViT, patch projection, CIT image projection): its own lr group."""
        return nn.ModuleList(
            [m for m in (self.vit, self.patch_proj, self.image_proj) if m is not None]
        )

    def resize_token_embeddings(self, n: int) -> nn.Embedding:
        """Grow the text vocabulary (e.g. entity markers for MRE)."""
        return self.bert.resize_token_embeddings(n)

    # -------------------------------------------------------------------------- encoders

    def _mask(self, hidden: Tensor, attention_mask: Tensor | None):
        """The attention mask the BERT layers take: for SDPA a boolean [B, 1, 1, T] (True =
        attend), built here because create_bidirectional_mask reads the mask back to the host
        (`.all()`) to drop it when nothing is padded; for other kernels HF's own mask."""
        if attention_mask is not None and self.bert.config._attn_implementation == "sdpa":
            return attention_mask.bool()[:, None, None, :]
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(
            config=self.bert.config, inputs_embeds=hidden, attention_mask=attention_mask
        )

    def _run_layers(self, layers, hidden: Tensor, attention_mask: Tensor | None) -> Tensor:
        mask = self._mask(hidden, attention_mask)
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Unimodal text token states [B, T, H] (embeddings + lower BERT layers)."""
        hidden = self.bert.embeddings(input_ids=input_ids)
        return self._run_layers(
            self.bert.encoder.layer[: self.n_text_layers], hidden, attention_mask
        )

    def normalise(self, pixel_values: Tensor) -> Tensor:
        """uint8 RGB [B, 3, S, S] (trainer.data.vit_pixels) -> the ViT's normalised float input,
        with this model's own mean and std; a floating tensor is taken as normalised already."""
        if pixel_values.is_floating_point():
            return pixel_values
        return (pixel_values.float() / 255.0 - self.pixel_mean) / self.pixel_std

    def vision_states(self, pixel_values: Tensor) -> Tensor:
        """Raw ViT token states [B, 1+P, Hv] (CLS first); pixels as in `normalise`."""
        return self.vit(pixel_values=self.normalise(pixel_values)).last_hidden_state

    def project_image(self, vision_states: Tensor) -> Tensor:
        return self.patch_proj(vision_states)

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """Projected ViT tokens [B, 1+P, H] (CLS first), ready for `fuse`."""
        return self.project_image(self.vision_states(pixel_values))

    def fuse(
        self,
        text_states: Tensor,
        attention_mask: Tensor | None,
        image_states: Tensor | None = None,
        image_mask: Tensor | None = None,
    ) -> Tensor:
        """Fusion layers over concat(text, image tokens): [B, T(+1+P), H], text positions first
        (`image_mask`: which image tokens are real; default all)."""
        if image_states is None:
            return self._run_layers(
                self.bert.encoder.layer[self.n_text_layers :], text_states, attention_mask
            )
        b, t = text_states.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=text_states.device)
        image_states = image_states + self.image_type_embedding.to(image_states.dtype)
        hidden = torch.cat([text_states, image_states.to(text_states.dtype)], dim=1)
        if image_mask is None:
            image_mask = torch.ones(b, image_states.shape[1], device=attention_mask.device)
        mask = torch.cat([attention_mask, image_mask.to(attention_mask.dtype)], dim=1)
        return self._run_layers(self.bert.encoder.layer[self.n_text_layers :], hidden, mask)

    def text_embedding(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        *,
        text_states: Tensor | None = None,
    ) -> Tensor:
        """L2-normalised projected unimodal text [CLS] [B, proj_dim]."""
        if self.text_proj is None:
            raise RuntimeError("this model has no CIT projections (proj_dim=0)")
        if text_states is None:
            text_states = self.encode_text(input_ids, attention_mask)
        return F.normalize(self.text_proj(text_states[:, 0]).float(), dim=-1)

    def image_embedding(
        self, pixel_values: Tensor | None = None, *, vision_states: Tensor | None = None
    ) -> Tensor:
        """L2-normalised projected unimodal image [CLS] [B, proj_dim]."""
        if self.image_proj is None:
            raise RuntimeError("this model has no CIT projections (proj_dim=0)")
        if vision_states is None:
            vision_states = self.vision_states(pixel_values)
        return F.normalize(self.image_proj(vision_states[:, 0]).float(), dim=-1)

    def object_states(self, patches: Tensor, boxes: Tensor, min_cover: float = 0.5) -> Tensor:
        """COE object pooling: mean patch state under each box [B, O, H]."""
        from trainer.losses import box_patch_mask, pool_patches

        return pool_patches(patches, box_patch_mask(boxes, self.patch_grid(), min_cover))

    def states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor,
        boxes: Tensor | None = None,
        min_cover: float = 0.5,
    ) -> tuple[FusionStates, dict[str, Tensor]]:
        """The fusion interface's states (the ViT runs once; boxes [B, O, 4] for COE), and the
        fused sequence itself (`fused`, `fused_patches`)."""
        text_states = self.encode_text(input_ids, attention_mask)
        vis = self.vision_states(pixel_values)
        image_states = self.project_image(vis)
        fused = self.fuse(text_states, attention_mask, image_states)
        t = input_ids.shape[1]
        fused_patches = fused[:, t + 1 :]  # image patch tokens, CLS of the image skipped
        # COE / CIR inputs: fused states (paper) or the image's own, before the text joins
        if self.cfg.align_on == "vision":
            align_patches, align_cls = image_states[:, 1:], image_states[:, 0]
        else:
            align_patches, align_cls = fused_patches, fused[:, 0]
        objects = None  # every box's state (COE; also read by trainer/plot_fused.py)
        if boxes is not None:
            objects = self.object_states(align_patches, boxes, min_cover)
        states = FusionStates(
            cls=fused[:, 0],
            relation=align_cls,
            text_cls=text_states[:, 0],
            image_cls=vis[:, 0],
            objects=objects,
        )
        return states, {"fused": fused, "fused_patches": fused_patches}

    def text_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None,
        has_image: Tensor,
        boxes: Tensor | None = None,
    ) -> Tensor:
        """Fused states at the text positions [B, T, H] (fine-tuning); samples without an image
        fuse text-only. With `cfg.max_crops` > 0 and `boxes`, each object crop's ViT [CLS]
        joins the image tokens (the prior fusions' object-level visual tokens)."""
        text = self.encode_text(input_ids, attention_mask)
        if pixel_values is None or not bool(has_image.any()):
            return self.fuse(text, attention_mask)
        img_idx = has_image.nonzero().squeeze(1)
        txt_idx = (~has_image).nonzero().squeeze(1)
        t = text.shape[1]
        image, image_mask = self.image_tokens(
            pixel_values[img_idx], None if boxes is None else boxes[img_idx]
        )
        fused = self.fuse(text[img_idx], attention_mask[img_idx], image, image_mask)
        parts = [fused[:, :t]]
        if len(txt_idx):
            parts.append(self.fuse(text[txt_idx], attention_mask[txt_idx]))
        order = torch.cat([img_idx, txt_idx])
        return torch.cat(parts)[torch.argsort(order)]

    def image_tokens(
        self, pixel_values: Tensor, boxes: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The image's projected ViT tokens, then (with crops) each object crop's [CLS]; the
        mask of real tokens (None: all real)."""
        image = self.encode_image(pixel_values)
        n_crops = self.cfg.max_crops
        if boxes is None or n_crops <= 0 or boxes.shape[1] == 0:
            return image, None
        boxes = boxes[:, :n_crops]
        b, c = boxes.shape[:2]
        crops = crop_boxes(self.normalise(pixel_values), boxes, self.cfg.image_size)
        crop_cls = self.encode_image(crops.flatten(0, 1))[:, 0].unflatten(0, (b, c))
        present = boxes[..., 2:].gt(boxes[..., :2]).all(-1)
        mask = torch.cat([torch.ones(b, image.shape[1], device=image.device), present.float()], 1)
        return torch.cat([image, crop_cls], dim=1), mask

    def sub_configs(self) -> dict[str, dict[str, Any]]:
        """The HF configs a checkpoint saves beside `model_config` to rebuild this model."""
        return {"bert_config": self.bert.config.to_dict(), "vit_config": self.vit.config.to_dict()}


def _channels(values) -> Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------ factory


def image_normalisation(source: str) -> tuple[list[float], list[float]] | None:
    """(image_mean, image_std) from a vision encoder's preprocessor_config.json (a local HF
    folder, or a hub model in the cache / online); None when it has no such file."""
    from transformers.utils import cached_file

    local = Path(source) / PROCESSOR_FILE
    if local.is_file():
        path = str(local)
    elif Path(source).is_dir():
        return None
    else:
        try:
            path = cached_file(
                source,
                PROCESSOR_FILE,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except OSError:
            return None
    if not path:
        return None
    processor = json.loads(Path(path).read_text(encoding="utf-8"))
    mean, std = processor.get("image_mean"), processor.get("image_std")
    if mean is None or std is None:
        return None
    as_list = lambda v: [float(x) for x in (v if isinstance(v, list) else [v] * 3)]  # noqa: E731
    return as_list(mean), as_list(std)


def _random_bert(vocab_size: int):
    from transformers import BertConfig, BertModel

    with models.seeded(models.TINY_SEED):
        return BertModel(BertConfig(vocab_size=vocab_size), add_pooling_layer=False)


def _random_vit():
    from transformers import ViTConfig, ViTModel

    with models.seeded(models.TINY_SEED + 1):
        return ViTModel(ViTConfig(), add_pooling_layer=False)


def build_albef(cfg: ModelConfig) -> PretrainModel:
    """The ALBEF student for `cfg`: preset weights (tiny: seeded random; base: pretrained) or
    overrides.

    `random_init=True` with preset `base` builds bert-base-uncased / ViT-B/16 shapes (the
    BertConfig()/ViTConfig() defaults) with random weights, for benchmarks without downloads.
    """
    if cfg.text_encoder:
        bert = models.load_text_encoder(cfg.preset, cfg.text_encoder)
    elif cfg.random_init and cfg.preset == "base":
        bert = _random_bert(30522)  # bert-base-uncased vocabulary size
    else:
        bert = models.load_text_encoder(cfg.preset)
    vision_source = None  # a real ViT (folder or hub): its image processor normalises
    if cfg.vision_encoder:
        vit = models.load_vision_encoder(cfg.preset, cfg.vision_encoder)
        vision_source = cfg.vision_encoder
    elif cfg.random_init and cfg.preset == "base":
        vit = _random_vit()
    else:
        vit = models.load_vision_encoder(cfg.preset)
        vision_source = models.get_preset(cfg.preset).vision_encoder
    if vision_source not in (None, *models.RANDOM_VIT) and cfg.image_mean is None:
        found = image_normalisation(vision_source)
        if found is None:
            print(
                f"model: {vision_source} has no {PROCESSOR_FILE} with image_mean/image_std: "
                f"normalising with mean {DEFAULT_IMAGE_MEAN}, std {DEFAULT_IMAGE_STD}"
            )
        else:
            cfg.image_mean, cfg.image_std = found
    return PretrainModel(cfg, bert, vit)


def albef_from_configs(cfg: ModelConfig, configs: dict[str, dict]) -> PretrainModel:
    """The ALBEF student rebuilt from a checkpoint's saved HF configs (weights loaded after)."""
    from transformers import AutoConfig, AutoModel

    bert_config = AutoConfig.for_model(**configs["bert_config"])
    vit_config = AutoConfig.for_model(**configs["vit_config"])
    kw = {"add_pooling_layer": False}
    with models.seeded(models.TINY_SEED):
        bert = AutoModel.from_config(bert_config, **kw)
        vit = AutoModel.from_config(vit_config, **kw)
    return PretrainModel(cfg, bert, vit)


# ------------------------------------------------------------------------------ HF export


def export_hf(model: PretrainModel, out_dir, tokenizer=None) -> Path:
    """HF `save_pretrained` folders for reuse in other fusion models.

    text/   BertModel: embeddings + the unimodal text layers
    vision/ ViTModel
    fusion/ BertModel holding the fusion layers (run `.encoder` over your own token states),
            plus fusion_extras.safetensors: patch projection and image type embedding
    bert/   BertModel with all layers: the text-only encoder (equals text -> fusion without image)
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per sub-model is noise in the trainer's output
    from trainer.fusion import unwrap

    model = unwrap(model)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        _export_parts(model, tmp, tokenizer)
    return out


def _export_parts(model: PretrainModel, tmp: Path, tokenizer) -> None:
    from safetensors.torch import save_file

    bert_state = model.bert.state_dict()
    n_text = model.n_text_layers

    def sub_bert(layers: range, folder: str) -> None:
        conf = model.bert.config.__class__.from_dict(model.bert.config.to_dict())
        conf.num_hidden_layers = len(layers)
        sub = model.bert.__class__(conf, add_pooling_layer=False)
        state = {}
        for k, v in bert_state.items():
            if k.startswith("encoder.layer."):
                i = int(k.split(".")[2])
                if i not in layers:
                    continue
                k = k.replace(f"encoder.layer.{i}.", f"encoder.layer.{i - layers.start}.", 1)
            state[k] = v
        sub.load_state_dict(state, strict=True)
        sub.save_pretrained(str(tmp / folder))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / folder))

    n_layers = len(model.bert.encoder.layer)
    sub_bert(range(0, n_text), "text")
    sub_bert(range(n_text, n_layers), "fusion")
    sub_bert(range(0, n_layers), "bert")
    model.vit.save_pretrained(str(tmp / "vision"))
    extras = {f"patch_proj.{k}": v for k, v in model.patch_proj.state_dict().items()}
    extras["image_type_embedding"] = model.image_type_embedding.detach()
    save_file(
        {k: v.contiguous().cpu() for k, v in extras.items()},
        str(tmp / "fusion" / FUSION_EXTRAS_FILE),
    )
