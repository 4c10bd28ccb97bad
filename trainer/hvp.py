"""An HVPNeT-style fusion (`--fusion hvp`): a hierarchical visual prefix for every BERT layer.

Written from the description in Chen et al., "Good Visual Guidance Makes A Better Extractor:
Hierarchical Visual Prefix for Multimodal Entity and Relation Extraction" (NAACL 2022
Findings); no code of theirs is used.
- A CNN (a torchvision ResNet) encodes the whole image and up to `max_crops` object crops (the
  detector's boxes). The outputs of its four stages form a feature pyramid; each level is
  average-pooled to a 2 x 2 grid and projected to the BERT width: 4 tokens per image and level.
- Dynamic gated aggregation: for every BERT layer, a gate (a softmax over the pyramid levels,
  from the image's pooled features) mixes the levels into that layer's visual tokens.
- Visual prefix: each layer's visual tokens, through that layer's own key and value
  projections, are prepended to its self-attention keys and values. The text attends to them;
  nothing attends from them. Without an image there is no prefix, and the model is BERT.

How the pretraining losses read it (the paper does not say how it pretrained its MMIB; this is
the project's choice, docs/trainer.md): ITM and CIR read the fused text [CLS] (the last layer,
after every prefix); CIT the text-only [CLS] (a pass without prefix, the unimodal text) and the
whole image's pooled last-stage features; COE each box's crop after the last layer's gate
(the visual representation the prefix is made of), one per box.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline import models
from pmu.errors import InputError
from trainer.fusion import FusionModule, FusionStates, add_pretrain_heads, crop_boxes
from trainer.model import DEFAULT_IMAGE_MEAN, DEFAULT_IMAGE_STD, INIT_SEED, ModelConfig, _channels

HVP_SUMMARY = "HVPNeT-style: ResNet pyramid of the image and its object crops as a gated prefix"
GRID = 2  # each pyramid level pooled to GRID x GRID tokens
ARCHS = {"resnet10": [1, 1, 1, 1], "resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}
PRESET_CNN = {"tiny": ("resnet10", 64), "small": ("resnet10", 96), "base": ("resnet18", 224)}
MAX_CROPS = 3  # HVPNeT's visual objects per image


def build_cnn(arch: str) -> nn.Module:
    """A torchvision ResNet (BasicBlock) with random weights, seeded; no classifier."""
    from torchvision.models.resnet import BasicBlock, ResNet

    if arch not in ARCHS:
        raise InputError(f"unknown CNN {arch!r}", f"use one of: {', '.join(ARCHS)}")
    with models.seeded(models.TINY_SEED + 2):
        net = ResNet(BasicBlock, ARCHS[arch])
    net.fc = nn.Identity()
    return net


def pyramid(cnn: nn.Module, x: Tensor) -> list[Tensor]:
    """The four stages' feature maps of a ResNet."""
    x = cnn.maxpool(cnn.relu(cnn.bn1(cnn.conv1(x))))
    levels = []
    for stage in (cnn.layer1, cnn.layer2, cnn.layer3, cnn.layer4):
        x = stage(x)
        levels.append(x)
    return levels


class HVPModel(FusionModule):
    """BERT whose every layer attends to a gated visual prefix of the image and its crops."""

    def __init__(self, cfg: ModelConfig, bert: nn.Module, cnn: nn.Module, image_size: int):
        super().__init__()
        if not (hasattr(bert, "embeddings") and hasattr(bert, "encoder")):
            raise InputError(f"text encoder {type(bert).__name__} is not a BERT-like encoder")
        self.cfg, self.bert, self.cnn = cfg, bert, cnn
        cfg.image_size, cfg.patch_size = int(image_size), None
        cfg.max_crops = cfg.max_crops or MAX_CROPS
        cfg.image_mean = list(cfg.image_mean or DEFAULT_IMAGE_MEAN)
        cfg.image_std = list(cfg.image_std or DEFAULT_IMAGE_STD)
        self.register_buffer("pixel_mean", _channels(cfg.image_mean), persistent=False)
        self.register_buffer("pixel_std", _channels(cfg.image_std), persistent=False)
        hidden = bert.config.hidden_size
        n_layers = len(bert.encoder.layer)
        widths = [stage[-1].conv2.out_channels for stage in
                  (cnn.layer1, cnn.layer2, cnn.layer3, cnn.layer4)]  # fmt: skip
        with models.seeded(INIT_SEED):
            self.levels = nn.ModuleList(
                [nn.Sequential(nn.Linear(w, hidden), nn.LayerNorm(hidden)) for w in widths]
            )
            self.gates = nn.Linear(len(widths) * hidden, n_layers * len(widths))
            self.prefix_key = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(n_layers)])
            self.prefix_value = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(n_layers)])
            add_pretrain_heads(self, cfg, hidden, hidden, widths[-1])

    @property
    def hidden_size(self) -> int:
        return self.bert.config.hidden_size

    def vision_modules(self) -> nn.ModuleList:
        """The image side (the CNN, its level projections, the CIT image projection)."""
        return nn.ModuleList([m for m in (self.cnn, self.levels, self.image_proj) if m is not None])

    def resize_token_embeddings(self, n: int) -> nn.Embedding:
        return self.bert.resize_token_embeddings(n)

    def sub_configs(self) -> dict[str, dict[str, Any]]:
        return {
            "bert_config": self.bert.config.to_dict(),
            "cnn_config": {"arch": self.cfg.vision_arch, "image_size": self.cfg.image_size},
        }

    # -------------------------------------------------------------------------- vision

    def normalise(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.is_floating_point():
            return pixel_values
        return (pixel_values.float() / 255.0 - self.pixel_mean) / self.pixel_std

    def visual_tokens(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(per-layer gated tokens [L, N, GRID^2, H], gate weights [N, L, levels], pooled
        last-stage features [N, C]) of N normalised images."""
        feats = pyramid(self.cnn, images)
        tokens = [
            proj(F.adaptive_avg_pool2d(f, GRID).flatten(2).transpose(1, 2))
            for proj, f in zip(self.levels, feats, strict=True)
        ]  # levels x [N, GRID^2, H]
        stacked = torch.stack(tokens, dim=1)  # [N, levels, GRID^2, H]
        n, k = stacked.shape[:2]
        gate = self.gates(stacked.mean(2).flatten(1)).view(n, -1, k).softmax(-1)  # [N, L, k]
        layered = torch.einsum("nlk,nkth->lnth", gate, stacked)
        return layered, gate, F.adaptive_avg_pool2d(feats[-1], 1).flatten(1)

    def prefix(
        self, pixel_values: Tensor, boxes: Tensor | None, n_crops: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(per-layer prefix tokens [L, B, P, H], prefix mask [B, P], the whole images' pooled
        features [B, C], each box's gated crop state [B, O, H] or None): the image and its
        first `n_crops` boxes make the prefix; every box gets its crop state."""
        images = self.normalise(pixel_values)
        b = images.shape[0]
        whole, _, pooled = self.visual_tokens(images)  # [L, B, t, H]
        layers = [whole]
        masks = [torch.ones(b, whole.shape[2], dtype=torch.bool, device=images.device)]
        objects = None
        if boxes is not None and boxes.shape[1] > 0:
            o = boxes.shape[1]
            crops = crop_boxes(images, boxes, max(32, images.shape[-1] // 2))
            crop_tokens, _, _ = self.visual_tokens(crops.flatten(0, 1))  # [L, B*O, t, H]
            crop_tokens = crop_tokens.unflatten(1, (b, o))  # [L, B, O, t, H]
            objects = crop_tokens[-1].mean(2)  # the last layer's gate: [B, O, H]
            present = boxes[..., 2:].gt(boxes[..., :2]).all(-1)  # [B, O] a real box
            keep = min(n_crops, o)
            if keep:
                layers.append(crop_tokens[:, :, :keep].flatten(2, 3))
                t = crop_tokens.shape[3]
                masks.append(present[:, :keep, None].expand(b, keep, t).reshape(b, keep * t))
        return torch.cat(layers, dim=2), torch.cat(masks, dim=1), pooled, objects

    # -------------------------------------------------------------------------- text

    def encode(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        prefix: Tensor | None = None,
        prefix_mask: Tensor | None = None,
        attentions: list | None = None,
    ) -> Tensor:
        """BERT over the text, each layer's self-attention also over its prefix (if any):
        token states [B, T, H]. `attentions`, when a list, receives each layer's attention
        weights [B, heads, T, P + T] (computed explicitly then)."""
        hidden = self.bert.embeddings(input_ids=input_ids)
        b, t = input_ids.shape
        keep = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
        )
        for i, layer in enumerate(self.bert.encoder.layer):
            pk = pv = None
            if prefix is not None:
                pk, pv = self.prefix_key[i](prefix[i]), self.prefix_value[i](prefix[i])
            hidden = _prefix_layer(layer, hidden, keep, pk, pv, prefix_mask, attentions)
        return hidden

    def states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor,
        boxes: Tensor | None = None,
        min_cover: float = 0.5,
    ) -> tuple[FusionStates, dict[str, Tensor]]:
        """The fusion interface's states (`min_cover` is the ALBEF patch rule: unused here)."""
        prefix, mask, pooled, objects = self.prefix(pixel_values, boxes, self.cfg.max_crops)
        fused = self.encode(input_ids, attention_mask, prefix, mask)
        text_cls = None
        if self.text_proj is not None:  # CIT: the unimodal text, a pass without prefix
            text_cls = self.encode(input_ids, attention_mask)[:, 0]
        states = FusionStates(
            cls=fused[:, 0],
            relation=fused[:, 0],
            text_cls=text_cls,
            image_cls=pooled,
            objects=objects,
        )
        return states, {"fused": fused}

    def text_states(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        pixel_values: Tensor | None,
        has_image: Tensor,
        boxes: Tensor | None = None,
        attentions: list | None = None,
    ) -> Tensor:
        """Fused text states [B, T, H] (fine-tuning); a sample without an image gets no prefix
        (its prefix is masked out: exactly BERT)."""
        if pixel_values is None or not bool(has_image.any()):
            return self.encode(input_ids, attention_mask, attentions=attentions)
        prefix, mask, _, _ = self.prefix(pixel_values, boxes, self.cfg.max_crops)
        mask = mask & has_image[:, None]
        return self.encode(input_ids, attention_mask, prefix, mask, attentions)


def _prefix_layer(
    layer: nn.Module,
    hidden: Tensor,
    keep: Tensor,
    prefix_key: Tensor | None,
    prefix_value: Tensor | None,
    prefix_mask: Tensor | None,
    attentions: list | None,
) -> Tensor:
    """One HF BertLayer with a key / value prefix in its self-attention (its own weights)."""
    sa = layer.attention.self
    b, t, _ = hidden.shape
    heads, size = sa.num_attention_heads, sa.attention_head_size

    def split(x: Tensor) -> Tensor:
        return x.view(b, x.shape[1], heads, size).transpose(1, 2)

    q, k, v = split(sa.query(hidden)), split(sa.key(hidden)), split(sa.value(hidden))
    mask = keep
    if prefix_key is not None:
        k = torch.cat([split(prefix_key), k], dim=2)
        v = torch.cat([split(prefix_value), v], dim=2)
        mask = torch.cat([prefix_mask, keep], dim=1)
    mask = mask[:, None, None, :]
    p_drop = sa.dropout.p if sa.training else 0.0
    scale = getattr(sa, "scaling", size**-0.5)
    if attentions is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop, scale=scale)
    else:  # explicit weights for the attention pictures (eval only)
        scores = (q @ k.transpose(-1, -2)) * scale
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        attentions.append(weights.detach())
        out = weights @ v
    out = out.transpose(1, 2).reshape(b, t, heads * size)
    return layer.feed_forward_chunk(layer.attention.output(out, hidden))


# ------------------------------------------------------------------------------ factory


def _cnn_for(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """The CNN and its input size: the preset's (random, seeded), or weights saved by
    `trainer/vision_init.py --arch` (a .safetensors file with its arch and size)."""
    arch, size = PRESET_CNN.get(cfg.preset, ("resnet18", 224))
    if cfg.vision_encoder:
        from safetensors import safe_open

        path = cfg.vision_encoder
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types
            raise models.WeightsUnavailable(
                f"--vision-encoder {path}: not a CNN saved by trainer/vision_init.py ({exc})"
            ) from None
        arch, size = meta.get("arch", arch), int(meta.get("image_size", size))
        cnn = build_cnn(arch)
        cnn.load_state_dict(state, strict=True)
        return cnn, size
    if cfg.preset == "base" and not cfg.random_init:
        raise models.WeightsUnavailable(
            "--fusion hvp with --preset base needs ImageNet ResNet weights, which cannot be "
            "downloaded here: pass a CNN saved by trainer/vision_init.py --arch (--vision-encoder "
            "FILE), or --random-init"
        )
    return build_cnn(cfg.vision_arch or arch), size


def build_hvp(cfg: ModelConfig) -> HVPModel:
    """The HVP model for `cfg`: the preset's BERT (or `text_encoder`) and its CNN."""
    from trainer.model import _random_bert

    if cfg.text_encoder:
        bert = models.load_text_encoder(cfg.preset, cfg.text_encoder)
    elif cfg.random_init and cfg.preset == "base":
        bert = _random_bert(30522)
    else:
        bert = models.load_text_encoder(cfg.preset)
    cnn, size = _cnn_for(cfg)
    if not cfg.vision_arch:
        cfg.vision_arch = next(a for a, blocks in ARCHS.items() if _blocks(cnn) == blocks)
    return HVPModel(cfg, bert, cnn, size)


def _blocks(cnn: nn.Module) -> list[int]:
    return [len(s) for s in (cnn.layer1, cnn.layer2, cnn.layer3, cnn.layer4)]


def hvp_from_configs(cfg: ModelConfig, configs: dict[str, dict]) -> HVPModel:
    """The HVP model rebuilt from a checkpoint's saved configs (weights loaded after)."""
    from transformers import AutoConfig, AutoModel

    bert_config = AutoConfig.for_model(**configs["bert_config"])
    with models.seeded(models.TINY_SEED):
        bert = AutoModel.from_config(bert_config, add_pooling_layer=False)
    cnn_config = configs["cnn_config"]
    return HVPModel(cfg, bert, build_cnn(cnn_config["arch"]), cnn_config["image_size"])
