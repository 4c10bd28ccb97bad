"""Model presets: one factory for every component (YOLO, CLIP, BERT, ViT), `tiny` or `base`.

`base` loads real checkpoints through each library's own loader (hub, cache or local path).
`tiny` builds the same architectures from small configs with seeded random weights, offline.
Any component can be pointed at a local path instead. There is no fallback from base to tiny:
missing weights raise `WeightsUnavailable` with instructions.

Before a download is tried, a quick TCP probe of the host (`hub_unreachable`) decides whether
the network is there: when it is not, the libraries run offline (cache only) for that load, so
a machine without internet fails within seconds instead of a minute of hub retries, whether or
not the offline environment variables are set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from pmu.errors import InputError
from pmu.presets import (
    RANDOM_BERT,
    RANDOM_VIT,
    SMALL_CLIP_NAME,
    TINY_CLIP_NAME,
    TINY_SEED,
    Preset,
    get_preset,
)

ASSETS = Path(__file__).parent / "assets"
TINY_VOCAB = ASSETS / "tiny_bert_vocab.txt"


class WeightsUnavailable(InputError, RuntimeError):
    """Real weights were asked for but cannot be loaded here (the message says how to get them)."""


HOW_TO_GET = {
    "detector": (
        "download yolo11n.pt (https://github.com/ultralytics/assets/releases) on a machine with "
        "internet and pass its path (--detector PATH / models.detector in params.yaml), "
        "or use --preset tiny"
    ),
    "clip": (
        "fetch the open_clip ViT-B-32 'openai' weights on a machine with internet (they land in "
        "the Hugging Face cache, ~/.cache/huggingface), copy that cache here, or pass a local "
        "checkpoint file (--clip PATH), or use --preset tiny"
    ),
    "hf": (
        "run `huggingface-cli download {name}` on a machine with internet and copy the cache "
        "(~/.cache/huggingface) here, or pass a local directory saved with save_pretrained, "
        "or use --preset tiny"
    ),
}


def is_offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("HF_HUB_OFFLINE", "YOLO_OFFLINE"))


# ----------------------------------------------------------------------------- network probe

PROBE_ENV = "PMU_NET_PROBE"  # "off": never probe; "HOST:PORT": probe that instead (tests)
PROBE_TIMEOUT_ENV = "PMU_NET_PROBE_TIMEOUT"  # seconds (default PROBE_TIMEOUT)
PROBE_TIMEOUT = 3.0
DETECTOR_URL = "https://github.com"  # ultralytics release assets


def hub_url() -> str:
    """Where huggingface_hub (and open_clip through it) downloads from."""
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def probe_target(url: str) -> tuple[str, int] | None:
    """(host, port) to probe before downloading from `url`: the PMU_NET_PROBE override, else
    the HTTPS proxy when one is set (downloads go through it), else the URL's host; None: off."""
    override = os.environ.get(PROBE_ENV, "").strip()
    if override.lower() in ("off", "0", "false", "no"):
        return None
    if override:
        host, _, port = override.rpartition(":")
        return host.strip("[]"), int(port)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if os.environ.get(name):
            url = os.environ[name] if "://" in os.environ[name] else "http://" + os.environ[name]
            break
    parts = urlsplit(url)
    default_port = 80 if parts.scheme == "http" else 443
    return parts.hostname or "", parts.port or default_port


def _tcp_connect_error(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` s, else why not. DNS is
    included: the attempt runs in a daemon thread, since name resolution has no timeout."""
    result: list[str | None] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(None)
        except OSError as exc:
            result.append(str(exc) or type(exc).__name__)

    thread = threading.Thread(target=attempt, daemon=True, name="pmu-net-probe")
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"no answer within {timeout:g} s"


def hub_unreachable(url: str) -> str | None:
    """None when a download from `url` may be tried, else why not (for the error message)."""
    target = probe_target(url)
    if target is None:
        return None
    timeout = float(os.environ.get(PROBE_TIMEOUT_ENV) or PROBE_TIMEOUT)
    host, port = target
    error = _tcp_connect_error(host, port, timeout)
    return None if error is None else f"no network: cannot reach {host}:{port} ({error})"


class _DropRootRecords(logging.Filter):
    """Drops records logged on the root logger itself (open_clip's `logging.error` lines)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL


@contextlib.contextmanager
def hub_session(url: str):
    """Around a library load that may download from `url`: yields None when the network is
    there, else the reason, with Hugging Face hub access switched to cache-only meanwhile.
    Hub retry warnings and open_clip's download error lines are silenced either way (the
    failure comes back as one WeightsUnavailable)."""
    reason = None if is_offline() else hub_unreachable(url)
    hub_logger = logging.getLogger("huggingface_hub")
    old_level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    root_filter = _DropRootRecords()
    logging.getLogger().addFilter(root_filter)
    old_env = os.environ.get("HF_HUB_OFFLINE")
    constants = sys.modules.get("huggingface_hub.constants")
    old_flag = getattr(constants, "HF_HUB_OFFLINE", None)
    if reason:
        # Read at import time by huggingface_hub, and as a module attribute at call time.
        os.environ["HF_HUB_OFFLINE"] = "1"
        if constants is not None:
            constants.HF_HUB_OFFLINE = True
    try:
        yield reason
    finally:
        hub_logger.setLevel(old_level)
        logging.getLogger().removeFilter(root_filter)
        if reason:
            if old_env is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old_env
            constants = sys.modules.get("huggingface_hub.constants")
            if constants is not None:
                constants.HF_HUB_OFFLINE = bool(old_flag)


def _unavailable(what: str, reason: str | None, exc: BaseException, how: str) -> WeightsUnavailable:
    cause = f"{type(exc).__name__}: {exc}"
    if reason:
        cause = f"{reason}, and they are not in the local cache"
    return WeightsUnavailable(f"cannot load {what} ({cause}): {how}")


@contextlib.contextmanager
def seeded(seed: int = TINY_SEED):
    """Run random initialisation under a fixed seed without disturbing the caller's RNG."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- detector (YOLO)


def coco_names() -> dict[int, str]:
    import yaml
    from ultralytics.utils import ROOT

    with open(ROOT / "cfg/datasets/coco.yaml", encoding="utf-8") as f:
        return {int(k): v for k, v in yaml.safe_load(f)["names"].items()}


def load_detector(preset: str | Preset = "tiny", path: str | os.PathLike | None = None):
    """An ultralytics YOLO: a local .pt or .safetensors file, base `yolo11n.pt`, or a random
    build of a yaml (tiny: `yolo11n.yaml`).

    YOLO .pt files are pickles (ultralytics' own format): load only weights you trust. The
    project's own detectors (`train-detector`) are also written as .safetensors (weights, the
    architecture and class names; nothing executable), which load without unpickling.
    """
    from ultralytics import YOLO

    p = get_preset(preset) if isinstance(preset, str) else preset
    source = str(path) if path else p.detector
    if source.endswith(".safetensors"):
        if not Path(source).is_file():
            raise WeightsUnavailable(f"detector weights {source!r} not found")
        return load_detector_safetensors(source)
    if source.endswith(".yaml"):
        if (ASSETS / "yolo" / source).is_file():  # the project's own architectures
            source = str(ASSETS / "yolo" / source)
        with seeded(), _quiet_ultralytics():
            model = YOLO(source)
        # ultralytics saves checkpoints in fp16: fp16-representable weights make a saved tiny
        # detector reload bit-identical.
        model.model.half().float()
        model.model.names = coco_names()  # random weights, but real class names
        return model
    if not Path(source).is_file():
        from ultralytics.utils import SETTINGS

        cached = Path(SETTINGS.get("weights_dir", "weights")) / source
        if cached.is_file():
            source = str(cached)
        elif path or is_offline():
            raise WeightsUnavailable(
                f"detector weights {source!r} not found: {HOW_TO_GET['detector']}"
            )
        elif reason := hub_unreachable(DETECTOR_URL):
            raise WeightsUnavailable(
                f"detector weights {source!r} not found here ({reason}): {HOW_TO_GET['detector']}"
            )
    try:
        return YOLO(source)
    except Exception as e:  # ultralytics raises assorted errors when a download fails
        raise WeightsUnavailable(
            f"cannot load detector {source!r} ({e}): {HOW_TO_GET['detector']}"
        ) from e


DETECTOR_FORMAT = "pmu-yolo-safetensors-1"


@contextlib.contextmanager
def _quiet_ultralytics():
    """Building a model from a yaml without a scale letter in its name logs a warning."""
    import logging

    from ultralytics.utils import LOGGER

    level = LOGGER.level
    LOGGER.setLevel(logging.ERROR)
    try:
        yield
    finally:
        LOGGER.setLevel(level)


def save_detector_safetensors(model, path: str | os.PathLike) -> Path:
    """An ultralytics YOLO's weights, architecture (its yaml dict) and class names as
    .safetensors (fp32; the header is written key-sorted, so equal weights give equal bytes)."""
    import json

    from pmu.io import safetensors_bytes, write_bytes_atomic

    net = model.model
    state = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    meta = {
        "format": DETECTOR_FORMAT,
        "yaml": json.dumps(net.yaml, sort_keys=True),
        "names": json.dumps({str(k): v for k, v in net.names.items()}, sort_keys=True),
    }
    path = Path(path)
    write_bytes_atomic(path, safetensors_bytes(state, meta))
    return path


def load_detector_safetensors(path: str | os.PathLike):
    """A YOLO from `save_detector_safetensors`: the model is rebuilt from its yaml, then the
    weights are loaded (no pickle involved)."""
    import json

    from safetensors import safe_open
    from ultralytics import YOLO
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.nn.tasks import DetectionModel

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != DETECTOR_FORMAT:
            raise WeightsUnavailable(
                f"{path} is not a detector saved by this project (format {meta.get('format')!r})"
            )
        state = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["yaml"])
    names = {int(k): v for k, v in json.loads(meta["names"]).items()}
    with seeded(), _quiet_ultralytics():
        yolo = YOLO(str(ASSETS / "yolo" / "pmu-yolo-small.yaml"), task="detect")
        net = DetectionModel(cfg, nc=len(names), verbose=False)
    net.load_state_dict(state, strict=True)
    net.names = names
    net.args = {**DEFAULT_CFG_DICT, **yolo.overrides}
    net.task = "detect"
    yolo.model = net.float().eval()
    return yolo


def save_tiny_detector(path: str | os.PathLike) -> Path:
    """Save the tiny detector with ultralytics' own checkpoint format (loadable by path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    load_detector("tiny").save(str(path))
    return path


# ----------------------------------------------------------------------------- CLIP (open_clip)


def _register_project_clips() -> None:
    """The project's own open_clip configs (tiny, small) in assets/open_clip/."""
    import open_clip

    if not {TINY_CLIP_NAME, SMALL_CLIP_NAME} <= set(open_clip.list_models()):
        open_clip.add_model_config(ASSETS / "open_clip")


def load_clip(preset: str | Preset = "tiny", path: str | os.PathLike | None = None):
    """(model, preprocess, tokenizer) from open_clip, in eval mode.

    `path` is a local checkpoint (state dict, .safetensors preferred) for the preset's architecture.
    """
    import open_clip

    p = get_preset(preset) if isinstance(preset, str) else preset
    _register_project_clips()
    pretrained = str(path) if path else p.clip_pretrained
    if path and not Path(path).is_file():
        raise WeightsUnavailable(f"CLIP checkpoint {str(path)!r} not found: {HOW_TO_GET['clip']}")
    downloads = pretrained is not None and not path
    session = hub_session(hub_url()) if downloads else contextlib.nullcontext()
    with session as reason:
        try:
            with seeded():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    p.clip_model, pretrained=pretrained
                )
        except Exception as e:
            if pretrained is None:
                raise
            what = f"CLIP {p.clip_model}/{pretrained}"
            raise _unavailable(what, reason, e, HOW_TO_GET["clip"]) from e
    tokenizer = open_clip.get_tokenizer(p.clip_model)
    return model.eval(), preprocess, tokenizer


def save_tiny_clip(path: str | os.PathLike) -> Path:
    """Save the tiny CLIP's state dict as .safetensors, loadable with `load_clip(path=...)`."""
    from safetensors.torch import save_file

    model, _, _ = load_clip("tiny")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _weights_id(source: str | None, seed: int) -> str:
    """What the weights are, independent of where they are: a file hash, a tag or a seed."""
    if source and Path(source).is_file():
        from pmu.io import file_sha256

        return f"sha256:{file_sha256(source)}"
    return source if source else f"random-init-seed-{seed}"


def detector_identity(preset: str | Preset = "tiny", path: str | os.PathLike | None = None) -> dict:
    """Which detector made an output (recorded in boxes.parquet and the shard manifest)."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    source = str(path) if path else p.detector
    seed_source = None if source.endswith(".yaml") else source
    return {"source": source, "weights": _weights_id(seed_source, TINY_SEED)}


def clip_identity(preset: str | Preset = "tiny", path: str | os.PathLike | None = None) -> dict:
    """Which CLIP made an output; equal `model` and `weights` mean the same embedding space."""
    p = get_preset(preset) if isinstance(preset, str) else preset
    weights = str(path) if path else p.clip_pretrained
    return {"model": p.clip_model, "source": weights, "weights": _weights_id(weights, TINY_SEED)}


# ----------------------------------------------------------------------------- BERT / ViT (HF)


def load_tokenizer(preset: str | Preset = "tiny", path: str | os.PathLike | None = None):
    """The BERT WordPiece tokenizer for the text encoder (tiny, small: the shipped vocab)."""
    from transformers import AutoTokenizer, BertTokenizerFast

    p = get_preset(preset) if isinstance(preset, str) else preset
    source = str(path) if path else p.text_encoder
    if source in RANDOM_BERT:
        # transformers 5 ignores vocab_file=; vocab= is the argument that reads the file.
        return BertTokenizerFast(vocab=str(TINY_VOCAB), do_lower_case=True)
    return _hf_load(AutoTokenizer, source)


def load_text_encoder(preset: str | Preset = "tiny", path: str | os.PathLike | None = None):
    """A HF BertModel (or any AutoModel encoder in a local dir), without pooler."""
    from transformers import AutoModel, BertConfig, BertModel

    p = get_preset(preset) if isinstance(preset, str) else preset
    source = str(path) if path else p.text_encoder
    if source in RANDOM_BERT:
        vocab_size = sum(1 for _ in open(TINY_VOCAB, encoding="utf-8"))
        with seeded():
            config = BertConfig(vocab_size=vocab_size, **RANDOM_BERT[source])
            return BertModel(config, add_pooling_layer=False)
    return _hf_load(AutoModel, source, add_pooling_layer=False)


def load_vision_encoder(preset: str | Preset = "tiny", path: str | os.PathLike | None = None):
    """A HF ViTModel, without pooler."""
    from transformers import ViTConfig, ViTModel

    p = get_preset(preset) if isinstance(preset, str) else preset
    source = str(path) if path else p.vision_encoder
    if source in RANDOM_VIT:
        with seeded(TINY_SEED + 1):
            return ViTModel(ViTConfig(**RANDOM_VIT[source]), add_pooling_layer=False)
    return _hf_load(ViTModel, source, add_pooling_layer=False)


def _hf_load(cls, source: str, **kwargs):
    local = Path(source)
    if source.startswith((".", "/")) and not local.is_dir():
        raise WeightsUnavailable(
            f"model directory {source!r} not found: {HOW_TO_GET['hf'].format(name=source)}"
        )
    session = contextlib.nullcontext() if local.is_dir() else hub_session(hub_url())
    with session as reason:
        try:
            return cls.from_pretrained(source, **kwargs)
        except OSError as e:
            how = HOW_TO_GET["hf"].format(name=source)
            if reason:
                raise _unavailable(repr(source), reason, e, how) from e
            raise WeightsUnavailable(
                f"cannot load {source!r} ({e.__class__.__name__}): {how}"
            ) from e
