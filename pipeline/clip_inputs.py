"""CLIP image inputs: whole images and object crops made square as uint8, normalised on the device.

Two ways to make an image square (`resize_mode`):
- `letterbox` (default): pad to a square with the CLIP mean colour (normalised ~0), then resize.
  The encoder sees the whole image, as the paper aligns the entire image with the relation
  prompts, and tall or wide crops keep their ends.
- `center_crop`: open_clip's own preprocess (resize the short side, centre-crop); it drops the
  ends of the long side.
Two places to do it:
- workers (PIL): decode, crop and resize with the preprocess's own Resize / CenterCrop objects,
  ship uint8; `normalise` on the device gives exactly the reference's floats on CPU;
- the device: `decode_jpegs` (torchvision, nvjpeg on CUDA, batched), crop and resize with
  torchvision's tensor ops (antialiased bicubic), the shard jpg re-encoded there too.
`reference_clip_input` is the per-sample PIL + open_clip preprocess path (tests, benchmark).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

RESIZE_MODES = ("letterbox", "center_crop")
DECODE_PLACES = ("auto", "workers", "device")


@dataclass(frozen=True)
class ClipInputSpec:
    """What turns an RGB image into the CLIP image tower's input (plain values: picklable)."""

    size: int  # square input side
    resize_size: int  # open_clip's Resize target (short side)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str
    geometry: tuple[Any, ...]  # the preprocess's own Resize and CenterCrop (PIL path)

    @property
    def fill(self) -> tuple[int, int, int]:
        """Letterbox padding colour: the CLIP mean, so padding normalises to ~0."""
        return tuple(int(round(255 * m)) for m in self.mean)

    @classmethod
    def from_preprocess(cls, preprocess: Any, mode: str) -> ClipInputSpec:
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, not {mode!r}")
        by_name = {type(t).__name__: t for t in getattr(preprocess, "transforms", [])}
        try:
            resize, crop, norm = by_name["Resize"], by_name["CenterCrop"], by_name["Normalize"]
        except KeyError as e:
            raise ValueError(f"cannot read the CLIP input geometry from {preprocess}") from e
        size = crop.size[0] if isinstance(crop.size, (tuple, list)) else crop.size
        rsize = resize.size[0] if isinstance(resize.size, (tuple, list)) else resize.size
        return cls(
            size=int(size),
            resize_size=int(rsize),
            mean=tuple(float(v) for v in norm.mean),
            std=tuple(float(v) for v in norm.std),
            mode=mode,
            geometry=(resize, crop),
        )


# ----------------------------------------------------------------------------- PIL (workers)


def pad_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square canvas of its longest side."""
    width, height = img.size
    side = max(width, height)
    if width == height:
        return img
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - width) // 2, (side - height) // 2))
    return canvas


def square_pil(img: Image.Image, spec: ClipInputSpec) -> Image.Image:
    """size x size RGB: letterboxed or centre-cropped with the preprocess's own transforms."""
    if spec.mode == "letterbox":
        img = pad_square(img, spec.fill)
    for transform in spec.geometry:
        img = transform(img)
    return img


def pil_to_chw(img: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W] (what crosses the process boundary)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def reference_clip_input(img: Image.Image, preprocess: Any, mode: str) -> torch.Tensor:
    """Float [3, S, S] from open_clip's preprocess, letterboxed first in `letterbox` mode."""
    if mode == "letterbox":
        img = pad_square(img, ClipInputSpec.from_preprocess(preprocess, mode).fill)
    return preprocess(img)


# ----------------------------------------------------------------------------- device


class Normaliser:
    """uint8 [N, 3, S, S] on the device -> CLIP float input, the reference's arithmetic
    (to_tensor's /255, then Normalize's subtract and divide) in float32."""

    def __init__(self, spec: ClipInputSpec, device: torch.device) -> None:
        self.mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float().div(255).sub(self.mean).div(self.std)


def square_tensor(
    img: torch.Tensor, spec: ClipInputSpec, out: torch.Tensor | None = None
) -> torch.Tensor:
    """uint8 [3, h, w] -> uint8 [3, S, S] on its device (antialiased bicubic), as `square_pil`
    does it: letterbox pads to a square of the longest side first, then resizes. With `out`
    (a [3, S, S] slot of a batch on the same device) the result is written there, so a batch
    is assembled on the device without a stack / cat copy afterwards."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    bicubic, size = InterpolationMode.BICUBIC, spec.size
    if spec.mode == "letterbox":
        _, h, w = img.shape
        if h != w:
            side = max(h, w)
            canvas = torch.empty((3, side, side), dtype=torch.uint8, device=img.device)
            for c, value in enumerate(spec.fill):  # scalar fills: no host->device copy
                canvas[c].fill_(value)
            top, left = (side - h) // 2, (side - w) // 2
            canvas[:, top : top + h, left : left + w] = img
            img = canvas
        result = TF.resize(img, [size, size], bicubic, antialias=True)
    else:
        img = TF.resize(img, [spec.resize_size], bicubic, antialias=True)
        result = TF.center_crop(img, [size, size])
    if out is None:
        return result
    return out.copy_(result)


def cap_tensor(img: torch.Tensor, max_side: int) -> torch.Tensor:
    """`images.cap_longest_side` for uint8 [3, h, w] tensors (antialiased bicubic)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    _, height, width = img.shape
    longest = max(width, height)
    if max_side <= 0 or longest <= max_side:
        return img
    scale = max_side / longest
    size = [max(1, round(height * scale)), max(1, round(width * scale))]
    return TF.resize(img, size, InterpolationMode.BICUBIC, antialias=True)


def _tvio():
    """torchvision.io, whose JPEG codecs warn from 0.29 on that TorchCodec will replace them."""
    import warnings

    import torchvision.io as tvio

    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io.image")
    return tvio


def decode_jpegs(data: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 [3, H, W] per JPEG on `device` (one batched call; nvjpeg on CUDA), None where a
    file does not decode there (the caller falls back to PIL for those)."""
    tvio = _tvio()
    if not data:
        return []
    mode = tvio.ImageReadMode.RGB
    try:
        return list(tvio.decode_jpeg(list(data), mode=mode, device=device))
    except RuntimeError:
        out: list[torch.Tensor | None] = []
        for d in data:
            try:
                out.append(tvio.decode_jpeg(d, mode=mode, device=device))
            except RuntimeError:
                out.append(None)
        return out


def encode_jpegs(images: Sequence[torch.Tensor], quality: int) -> list[bytes]:
    """JPEG bytes of uint8 [3, H, W] tensors (one batched call; nvjpeg on CUDA)."""
    tvio = _tvio()
    if not images:
        return []
    return [t.cpu().numpy().tobytes() for t in tvio.encode_jpeg(list(images), quality=quality)]


def jpeg_size_for_device(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG the device decoder can take as it is: baseline RGB without an
    EXIF rotation, ending in an EOI marker (else PIL decides, e.g. that it is truncated)."""
    import io

    from pipeline.images import pil_open

    if not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
        return None
    try:
        with pil_open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode != "RGB":
                return None
            if img.getexif().get(0x0112, 1) != 1:  # orientation
                return None
            if img.info.get("progressive") or img.info.get("progression"):
                return None  # nvjpeg's batched decoder takes baseline files
            return img.size
    except Exception:  # noqa: BLE001 - anything odd: the PIL path gives the reason
        return None
