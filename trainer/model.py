"""The pretraining student: BERT text layers, ViT, and BERT fusion layers over text + patches.

ALBEF-style split of one BERT-like encoder: its embeddings and lower layers encode the text; its
upper `n_fusion_layers` layers (initialised from the same pretrained weights) run over
concat(text tokens, projected ViT tokens + an image type embedding), paper eq. 2. With no image
the fusion layers see the text alone, so a text-only forward equals the original HF encoder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import models
from pmu.errors import InputError
from pmu.io import atomic_dir

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FUSION_EXTRAS_FILE = "fusion_extras.safetensors"
INIT_SEED = 4321  # heads and projections are initialised under this seed (reproducible models)
# ViT-in21k's normalisation, also used by the tiny and random-init ViTs (they have no processor)
DEFAULT_IMAGE_MEAN = (0.5, 0.5, 0.5)
DEFAULT_IMAGE_STD = (0.5, 0.5, 0.5)
PROCESSOR_FILE = "preprocessor_config.json"
ALIGN_ON = ("fused", "vision")


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class PretrainModel(nn.Module):
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
            self.itm_head = nn.Linear(hidden, 2) if cfg.itm_head else None
            if cfg.proj_dim > 0:
                self.text_proj = nn.Linear(hidden, cfg.proj_dim)
                self.image_proj = nn.Linear(v_hidden, cfg.proj_dim)
                self.temp = nn.Parameter(torch.tensor(float(cfg.temp_init)))
            else:
                self.text_proj = self.image_proj = None
                self.temp = None
            self.fc_ent = nn.Linear(hidden, cfg.n_entities) if cfg.n_entities > 0 else None
            self.fc_rel = nn.Linear(hidden, cfg.n_relations) if cfg.n_relations > 0 else None

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
        self, text_states: Tensor, attention_mask: Tensor | None, image_states: Tensor | None = None
    ) -> Tensor:
        """Fusion layers over concat(text, image tokens): [B, T(+1+P), H], text positions first."""
        if image_states is None:
            return self._run_layers(
                self.bert.encoder.layer[self.n_text_layers :], text_states, attention_mask
            )
        b, t = text_states.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=text_states.device)
        image_states = image_states + self.image_type_embedding.to(image_states.dtype)
        hidden = torch.cat([text_states, image_states.to(text_states.dtype)], dim=1)
        image_mask = torch.ones(
            b, image_states.shape[1], dtype=attention_mask.dtype, device=attention_mask.device
        )
        mask = torch.cat([attention_mask, image_mask], dim=1)
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

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor,
        boxes: Tensor | None = None,
        min_cover: float = 0.5,
    ) -> dict[str, Tensor]:
        """All pretraining outputs from one pass (the ViT runs once); boxes [B, O, 4] for COE."""
        text_states = self.encode_text(input_ids, attention_mask)
        vis = self.vision_states(pixel_values)
        image_states = self.project_image(vis)
        fused = self.fuse(text_states, attention_mask, image_states)
        t = input_ids.shape[1]
        out: dict[str, Tensor] = {"fused": fused, "fused_cls": fused[:, 0]}
        out["fused_patches"] = fused[:, t + 1 :]  # image patch tokens, CLS of the image skipped
        # COE / CIR inputs: fused states (paper) or the image's own, before the text joins
        if self.cfg.align_on == "vision":
            align_patches, align_cls = image_states[:, 1:], image_states[:, 0]
        else:
            align_patches, align_cls = out["fused_patches"], fused[:, 0]
        if self.itm_head is not None:
            out["itm_logits"] = self.itm_head(fused[:, 0])
        if self.text_proj is not None:
            out["text_emb"] = self.text_embedding(text_states=text_states)
            out["image_emb"] = self.image_embedding(vision_states=vis)
            out["temp"] = self.temp
        if self.fc_ent is not None and boxes is not None:
            out["ent_logits"] = self.fc_ent(self.object_states(align_patches, boxes, min_cover))
        if self.fc_rel is not None:
            out["rel_logits"] = self.fc_rel(align_cls)
        return out


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


def build_tokenizer(cfg: ModelConfig):
    """The tokenizer that goes with cfg's text encoder (random_init uses the shipped vocab)."""
    if cfg.tokenizer:
        return models.load_tokenizer(cfg.preset, cfg.tokenizer)
    if cfg.text_encoder:
        return models.load_tokenizer(cfg.preset, cfg.text_encoder)
    if cfg.random_init:
        return models.load_tokenizer("tiny")
    return models.load_tokenizer(cfg.preset)


def build_model(cfg: ModelConfig) -> PretrainModel:
    """Student for `cfg`: preset weights (tiny: seeded random; base: pretrained) or overrides.

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


def _build_from_configs(cfg: ModelConfig, bert_cfg: dict, vit_cfg: dict) -> PretrainModel:
    from transformers import AutoConfig, AutoModel

    bert_config = AutoConfig.for_model(**bert_cfg)
    vit_config = AutoConfig.for_model(**vit_cfg)
    kw = {"add_pooling_layer": False}
    with models.seeded(models.TINY_SEED):
        bert = AutoModel.from_config(bert_config, **kw)
        vit = AutoModel.from_config(vit_config, **kw)
    return PretrainModel(cfg, bert, vit)


# ------------------------------------------------------------------------------ save / load


def save_pretrained(
    model: PretrainModel, tokenizer, cfg: ModelConfig, out_dir, extra: dict | None = None
) -> Path:
    """safetensors weights + config.json (+ tokenizer files), written to a temp dir, renamed."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    model = unwrap(model)
    with atomic_dir(out) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        config = {
            "model_config": cfg.to_dict(),
            "bert_config": model.bert.config.to_dict(),
            "vit_config": model.vit.config.to_dict(),
            **(extra or {}),
        }
        text = json.dumps(config, indent=2, sort_keys=True)
        (tmp / CONFIG_FILE).write_text(text, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out


def load_pretrained(path, device: str | torch.device = "cpu"):
    """(model, cfg, tokenizer) from a `save_pretrained` folder; no pretrained download needed."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise InputError(f"{path} has no {CONFIG_FILE}: not a saved PretrainModel")
    config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    cfg = ModelConfig.from_dict(config["model_config"])
    model = _build_from_configs(cfg, config["bert_config"], config["vit_config"])
    state = load_file(str(path / WEIGHTS_FILE), device=str(device))
    model.load_state_dict(state, strict=True)
    tokenizer = None
    if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model.to(device), cfg, tokenizer


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


def unwrap(model: nn.Module) -> PretrainModel:
    """The PretrainModel inside DDP / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model
