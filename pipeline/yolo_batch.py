"""YOLO on uint8 batches: ultralytics' predict letterbox, the fused raw model, batched NMS.

Reproduces what `YOLO.predict` does for a list of images, as batch operations that run on the
model's device: LetterBox (predict's `rect` batching: a batch of equal shapes gets the minimum
stride-aligned rectangle, a mixed batch the full `imgsz` square; centre padding with 114; OpenCV
INTER_LINEAR resize), the Conv+BN-fused model, `non_max_suppression` (best class per anchor,
`conf > threshold`, class-aware NMS with ultralytics' class offset) and `scale_boxes` (same
rounding, clipped to the image). Workers resize and pad; only the uint8 batch crosses the
process boundary and the host->device link. See docs/labeling.md for the guarantees.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.images import ImageRejected

PAD_VALUE = 114  # ultralytics LetterBox padding
MAX_WH = 7680  # ultralytics non_max_suppression: per-class box offset (class-aware NMS)


# ----------------------------------------------------------------------------- letterbox


def letterbox_unpadded(shape_hw: tuple[int, int], new_shape: Sequence[int]) -> tuple[int, int]:
    """(width, height) an image is resized to inside the letterbox (LetterBox.get_params)."""
    h, w = shape_hw
    r = min(new_shape[0] / h, new_shape[1] / w)
    return max(round(w * r), 1), max(round(h * r), 1)


def letterbox_padding(
    shape_hw: tuple[int, int], new_shape: Sequence[int], auto: bool, stride: int
) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding, exactly as ultralytics' LetterBox computes it."""
    new_w, new_h = letterbox_unpadded(shape_hw, new_shape)
    dw, dh = new_shape[1] - new_w, new_shape[0] - new_h
    if auto:  # minimum rectangle
        dw, dh = np.mod(dw, stride), np.mod(dh, stride)
    dw /= 2
    dh /= 2
    return round(dh - 0.1), round(dh + 0.1), round(dw - 0.1), round(dw + 0.1)


def resize_for_letterbox(rgb: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
    """The image resized (INTER_LINEAR) to its unpadded letterbox size; HxWx3 uint8."""
    import cv2

    new_unpad = letterbox_unpadded(rgb.shape[:2], new_shape)
    if rgb.shape[1::-1] != new_unpad:
        rgb = cv2.resize(rgb, new_unpad, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(rgb)


class LetterboxDataset(torch.utils.data.Dataset):
    """Image paths -> (index, resized RGB uint8 array or None, original (h, w), reason or None)."""

    def __init__(self, image_paths: Sequence[str], max_pixels: int, new_shape: Sequence[int]):
        self.image_paths = list(image_paths)
        self.max_pixels = max_pixels
        self.new_shape = tuple(new_shape)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, tuple[int, int], str | None]:
        from pipeline.labeling_data import load_rgb

        try:
            rgb = np.array(load_rgb(self.image_paths[i], self.max_pixels))  # writable
        except ImageRejected as e:
            return i, None, (0, 0), str(e)
        return i, resize_for_letterbox(rgb, self.new_shape), rgb.shape[:2], None


class LetterboxCollate:
    """Pads the resized images of one batch into a uint8 NHWC tensor (runs in the worker).

    As predict does, a batch whose images all have the same original shape is padded to the
    minimum stride-aligned rectangle, a mixed batch to the full square.
    """

    def __init__(self, new_shape: Sequence[int], stride: int) -> None:
        self.new_shape = tuple(new_shape)
        self.stride = stride

    def __call__(self, items: list) -> dict[str, Any]:
        ok = [(i, arr, hw) for i, arr, hw, reason in items if reason is None]
        batch: dict[str, Any] = {
            "rejected": [(i, reason) for i, _, _, reason in items if reason is not None],
            "index": [i for i, _, _ in ok],
        }
        if not ok:
            return batch
        auto = len({hw for _, _, hw in ok}) == 1
        pads = [letterbox_padding(hw, self.new_shape, auto, self.stride) for _, _, hw in ok]
        top, bottom, left, right = pads[0]
        arr0 = ok[0][1]
        height, width = arr0.shape[0] + top + bottom, arr0.shape[1] + left + right
        pixels = torch.full((len(ok), height, width, 3), PAD_VALUE, dtype=torch.uint8)
        for b, ((_, arr, _), (t, _, lft, _)) in enumerate(zip(ok, pads, strict=True)):
            pixels[b, t : t + arr.shape[0], lft : lft + arr.shape[1]] = torch.from_numpy(arr)
        batch["pixels"] = pixels
        batch["orig_hw"] = torch.tensor([hw for _, _, hw in ok], dtype=torch.int64)
        return batch


# ----------------------------------------------------------------------------- model


def fused_network(yolo: Any, device: torch.device) -> tuple[torch.nn.Module, int]:
    """(Conv+BN-fused copy of the raw model in eval mode on `device`, stride) as predict uses.

    Weights are channels-last where predict makes them so (x86 CPUs with oneDNN: the conv
    kernels, hence the last bits, depend on it) and on CUDA (NHWC is the tensor-core layout for
    bf16 convolutions; predict keeps NCHW there).
    """
    import platform

    net = copy.deepcopy(yolo.model)
    if hasattr(net, "fuse"):
        net = net.fuse(verbose=False)
    net = net.to(device).float().eval()
    x86_onednn = (
        platform.machine() in {"AMD64", "x86_64"}
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )
    if device.type == "cuda" or (device.type == "cpu" and x86_onednn):
        net = net.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        _fp32_head(net)
    for p in net.parameters():
        p.requires_grad_(False)
    stride = max(int(net.stride.max()), 32) if hasattr(net, "stride") else 32
    return net, stride


def _fp32_head(net: torch.nn.Module) -> None:
    """Run the detection head outside autocast: backbone and neck in bf16, but box regression
    (DFL) and class scores in fp32 (bf16 keeps ~3 significant digits: pixels at 640, and
    confidences near the threshold)."""
    head = net.model[-1] if hasattr(net, "model") else None
    if head is None or not hasattr(head, "forward"):
        return
    forward = head.forward

    def fp32_forward(x, *args, **kwargs):
        with torch.autocast(device_type="cuda", enabled=False):
            x = [t.float() for t in x] if isinstance(x, list) else x.float()
            return forward(x, *args, **kwargs)

    head.forward = fp32_forward


def to_model_input(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC (on the device) -> float NCHW in [0, 1], as ultralytics' preprocess."""
    return pixels.permute(0, 3, 1, 2).contiguous().float().div_(255)


# ----------------------------------------------------------------------------- postprocess


def _xywh2xyxy(x: torch.Tensor) -> torch.Tensor:
    y = torch.empty_like(x)
    xy, wh = x[..., :2], x[..., 2:] / 2
    y[..., :2] = xy - wh
    y[..., 2:] = xy + wh
    return y


def select_candidates(
    preds: torch.Tensor, conf: float, pre_nms_top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchors above `conf` (best class each), at most `pre_nms_top_k` per image by score.

    `preds` is the raw head output (B, 4 + classes, anchors). Returns (image index, xyxy boxes,
    score, class) of the candidates, per image in anchor order as ultralytics keeps them.
    """
    preds = preds.float().transpose(1, 2)  # (B, anchors, 4 + nc)
    scores, classes = preds[..., 4:].max(-1)
    above = scores > conf
    k = min(max(pre_nms_top_k, 1), scores.shape[1])
    top = scores.masked_fill(~above, float("-inf")).topk(k, dim=1).indices
    anchors = top.sort(dim=1).values  # back to anchor order: NMS ties resolve as in ultralytics
    valid = above.gather(1, anchors)
    image = torch.arange(preds.shape[0], device=preds.device)[:, None].expand_as(anchors)[valid]
    anchors = anchors[valid]
    boxes = _xywh2xyxy(preds[image, anchors, :4])
    return image, boxes, scores[image, anchors], classes[image, anchors]


def batched_nms(
    image: torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    classes: torch.Tensor,
    iou: float,
    n_images: int,
    group_boxes: int = 0,
) -> torch.Tensor:
    """Indices kept by class-aware NMS within each image, sorted by image then falling score.

    Boxes get ultralytics' class offset (class x 7680, float32), so a group of one image is
    exactly predict's call. Several images go into one `torchvision.ops.nms` call (groups of up
    to `group_boxes` boxes; 0 = one image per call) with a per-image offset in float64, exact,
    so images never interact; the coordinate trick of `torchvision.ops.batched_nms`, without its
    switch to a Python loop over (image, class) for large inputs.
    """
    import torchvision

    if image.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=image.device)
    nms_boxes = boxes + classes.float()[:, None] * MAX_WH
    counts = torch.bincount(image, minlength=n_images).tolist()
    starts = np.concatenate([[0], np.cumsum(counts)]).tolist()
    kept = []
    first = 0
    while first < n_images:
        last, size = first + 1, counts[first]
        while group_boxes > 0 and last < n_images and size + counts[last] <= group_boxes:
            size += counts[last]
            last += 1
        lo, hi = starts[first], starts[last]
        if hi > lo:
            b, s = nms_boxes[lo:hi], scores[lo:hi]
            if last - first > 1:  # float64 holds the offsets exactly (nms wants scores alike)
                b, s = b.double(), s.double()
                span = b.max() - b.min() + 1
                b = b + ((image[lo:hi] - first).double() * span)[:, None]
            kept.append(torchvision.ops.nms(b, s, iou) + lo)
        first = last
    keep = torch.cat(kept)
    # Stable by image keeps each image's falling-score order from NMS.
    return keep[torch.sort(image[keep], stable=True).indices]


def top_k_per_image(image: torch.Tensor, keep: torch.Tensor, top_k: int) -> torch.Tensor:
    """The first `top_k` of `keep` (sorted by image, then falling score) for every image."""
    if keep.numel() == 0:
        return keep
    img = image[keep]
    first_of_image = torch.ones_like(img, dtype=torch.bool)
    first_of_image[1:] = img[1:] != img[:-1]
    start = torch.cummax(
        torch.where(first_of_image, torch.arange(len(img), device=img.device), 0), dim=0
    ).values
    rank = torch.arange(len(img), device=img.device) - start
    return keep[rank < top_k]


def scale_boxes(
    boxes: torch.Tensor, input_hw: tuple[int, int], orig_hw: torch.Tensor
) -> torch.Tensor:
    """Letterboxed-input xyxy -> original image pixels, clipped (ultralytics scale_boxes).

    `orig_hw` holds each box's image (height, width). Gains and paddings are computed in Python
    per distinct image shape, as ultralytics does, then applied as float32 tensors.
    """
    if boxes.numel() == 0:
        return boxes
    shapes = orig_hw.tolist()
    table = {}
    for h0, w0 in set(map(tuple, shapes)):
        gain = min(input_hw[0] / h0, input_hw[1] / w0)
        new_h, new_w = (max(round(x * gain), 1) for x in (h0, w0))
        pad_x = round((input_hw[1] - new_w) / 2 - 0.1)
        pad_y = round((input_hw[0] - new_h) / 2 - 0.1)
        table[(h0, w0)] = (pad_x, pad_y, new_w / w0, new_h / h0)
    per_box = torch.tensor([table[tuple(s)] for s in shapes], dtype=torch.float32)
    per_box = per_box.to(boxes.device)
    pad_x, pad_y, gain_x, gain_y = per_box.unbind(1)
    out = torch.empty_like(boxes)
    out[:, 0] = (boxes[:, 0] - pad_x) / gain_x
    out[:, 1] = (boxes[:, 1] - pad_y) / gain_y
    out[:, 2] = (boxes[:, 2] - pad_x) / gain_x
    out[:, 3] = (boxes[:, 3] - pad_y) / gain_y
    zero = torch.zeros_like(out[:, 0])
    h, w = orig_hw[:, 0].to(out), orig_hw[:, 1].to(out)
    for c, limit in ((0, w), (1, h), (2, w), (3, h)):
        out[:, c] = torch.clamp(out[:, c], min=zero, max=limit)
    return out


def postprocess(
    preds: Any,
    orig_hw: torch.Tensor,
    input_hw: tuple[int, int],
    conf: float,
    iou: float,
    top_k: int,
    pre_nms_top_k: int,
    group_boxes: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image index, xyxy in original pixels, score, class) of the top-k detections per image,
    sorted by image then falling score; everything stays on the model's device."""
    if isinstance(preds, (list, tuple)):
        preds = preds[0]
    n = preds.shape[0]
    image, boxes, scores, classes = select_candidates(preds, conf, pre_nms_top_k)
    keep = batched_nms(image, boxes, scores, classes, iou, n, group_boxes)
    keep = top_k_per_image(image, keep, top_k)
    image = image[keep]
    xyxy = scale_boxes(boxes[keep], input_hw, orig_hw.to(boxes.device)[image])
    return image, xyxy, scores[keep], classes[keep]
