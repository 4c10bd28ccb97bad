"""Device, threads and autocast: the one place that decides where and how tensors run."""

from __future__ import annotations

import contextlib
import os


def set_threads(n: int | None = None) -> int:
    """Use all cores once, explicitly (importing ultralytics sets OMP_NUM_THREADS=1)."""
    import torch

    if not n:
        n = usable_cores()
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def select_device(name: str = "auto"):
    """`auto` picks CUDA when available, else CPU; anything else is passed to torch.device."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def usable_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def auto_workers(requested: int, device, cpu_default: int) -> int:
    """DataLoader workers: `requested` if >= 0; else, on CUDA, every core but one (at most 15:
    the main process feeds the GPU), on CPU `cpu_default` (the model needs the cores there)."""
    if requested >= 0:
        return requested
    if device.type == "cuda":
        return max(1, min(15, usable_cores() - 1))
    return cpu_default


def autocast(device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op on CPU so CPU results stay exact fp32."""
    import torch

    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def offline_env() -> dict[str, str]:
    """Environment switches that stop the model libraries from trying the network."""
    return {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "YOLO_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
    }
