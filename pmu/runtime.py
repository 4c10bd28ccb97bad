"""Device, threads and autocast: the one place that decides where and how tensors run.

Reproducible mode (`PMU_REPRODUCIBLE=1`; `make repro` sets it) pins the CPU kernels so that the
same inputs give the same bytes on every x86-64 CPU (docs/reproducibility.md): ATen's portable
kernels instead of the AVX2 / AVX-512 ones chosen per CPU, MKL's one code path for every CPU
(conditional numerical reproducibility), no oneDNN, and a fixed thread count. Only CPU kernels
change; CUDA kernels are untouched.
"""

from __future__ import annotations

import contextlib
import os

from pmu.errors import InputError

REPRODUCIBLE_VAR = "PMU_REPRODUCIBLE"
THREADS_VAR = "PMU_THREADS"
REPRODUCIBLE_THREADS = 2  # the project's machines have 2 cores; fewer cores only run slower

# Read by torch and MKL when they first compute, so they are set before any tensor operation.
PINNED_CPU_ENV = {
    "ATEN_CPU_CAPABILITY": "default",  # ATen's portable kernels, not the per-CPU SIMD ones
    "MKL_CBWR": "COMPATIBLE",  # MKL's one branch for Intel and AMD CPUs alike (SSE2, no rcpps)
    "MKL_DYNAMIC": "FALSE",  # MKL keeps the thread count it is given
    "OMP_DYNAMIC": "FALSE",
}


def reproducible() -> bool:
    """`PMU_REPRODUCIBLE` = 1 (true, yes, on) turns reproducible mode on; unset or 0 (false, no,
    off) leaves the machine's fastest kernels. `make repro` sets it."""
    raw = os.environ.get(REPRODUCIBLE_VAR, "").strip().lower()
    if raw in {"", "0", "false", "no", "off"}:
        return False
    if raw in {"1", "true", "yes", "on"}:
        return True
    raise InputError(f"{REPRODUCIBLE_VAR} must be 1 or 0, got {raw!r}", "set it to 1 or 0")


def reproducible_threads() -> int:
    """Torch (and OpenMP / OpenBLAS) threads in reproducible mode: `PMU_THREADS`, default 2."""
    raw = os.environ.get(THREADS_VAR, "").strip()
    if not raw:
        return REPRODUCIBLE_THREADS
    if not raw.isdigit() or int(raw) < 1:
        raise InputError(f"{THREADS_VAR} must be a positive integer, got {raw!r}", "e.g. 2")
    return int(raw)


def reproducible_env() -> dict[str, str]:
    """The environment reproducible mode runs under (pinned kernels and thread counts)."""
    threads = str(reproducible_threads())
    return {**PINNED_CPU_ENV, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}


def configure_process() -> bool:
    """The first thing every command does. In reproducible mode, put the pinned kernel settings
    into this process's environment (before torch or MKL compute anything; child processes
    inherit them). Returns whether reproducible mode is on."""
    if not reproducible():
        return False
    os.environ.update(reproducible_env())
    return True


def pin_torch_cpu_kernels() -> None:
    """Reproducible mode inside torch: no oneDNN (its kernels and blocking differ per CPU; convs
    and GELU then use ATen + MKL), and a check that ATen really runs its portable kernels."""
    import torch

    configure_process()
    capability = torch.backends.cpu.get_cpu_capability()
    wanted = PINNED_CPU_ENV["ATEN_CPU_CAPABILITY"]
    if capability.lower() != wanted:
        raise RuntimeError(
            f"reproducible mode: torch chose its {capability} CPU kernels before "
            f"{REPRODUCIBLE_VAR}=1 took effect; set {REPRODUCIBLE_VAR}=1 in the environment that "
            f"starts the command (or ATEN_CPU_CAPABILITY={wanted})"
        )
    torch.backends.mkldnn.enabled = False


def set_threads(n: int | None = None) -> int:
    """Use all cores once, explicitly (importing ultralytics sets OMP_NUM_THREADS=1).

    In reproducible mode the count is `PMU_THREADS` (default 2) whatever `n` or the machine says,
    since float reductions are split by thread, and the CPU kernels are pinned."""
    import torch

    if reproducible():
        pin_torch_cpu_kernels()
        n = reproducible_threads()
    elif not n:
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


MALLOC_VAR = "PMU_MALLOC"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
_KEEP_FREED_BYTES = 2**31 - 1  # trim the heap only above 2 GiB free at its top (mallopt's int)


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed blocks instead of returning them to the kernel.

    By default glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh
    `mmap` and gives it back with `munmap` when it is freed: each batch's image tensors, YOLO
    activations and crop batches are mapped, zero-filled page by page on first touch (one page
    fault per 4 KiB) and unmapped again. On the labeling stages' main process that kernel time
    was 60-80 % of the CPU left outside the model and the device-side ops (docs/labeling.md).
    Here large blocks come from the heap and freed memory stays in it, so the next batch reuses
    pages already mapped. Freed memory is not handed back to the system until the process ends.

    On by default (`PMU_MALLOC` unset or `reuse`; `system` keeps glibc's defaults). The heap does
    not keep growing: in the benchmark the main process's peak RSS was 1.21x the 1x run's at 20x
    the input and 1.12x at 40x (320 images, 40 shards), against 1.10x at 40x with glibc's
    defaults (docs/labeling.md). Applies to this process only (workers start fresh), on glibc
    only. Returns whether the setting was applied. Results are unchanged: only where the
    allocator takes memory from changes."""
    import ctypes
    import platform

    choice = os.environ.get(MALLOC_VAR, "").strip().lower() or "reuse"
    if choice not in {"reuse", "system"}:
        raise InputError(
            f"{MALLOC_VAR} must be reuse or system, got {choice!r}",
            "set reuse or system, or unset it",
        )
    if choice == "system" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _KEEP_FREED_BYTES))


WORKER_START_VAR = "PMU_WORKER_START"


def worker_context(num_workers: int, preload: tuple[str, ...] = ()):
    """The multiprocessing context of the stages' DataLoader workers (None: torch's default).

    `forkserver` (the default where the platform has it): workers fork from a small server
    process started once, not from this process. Forking this process (the default start on
    Linux) costs it page-table copies of every loaded model (~60 ms of this process's CPU per
    worker with ViT-B-32 + YOLO loaded, 15 workers on a GPU machine) and shares its pages with
    every worker copy-on-write while the loader runs. `PMU_WORKER_START=fork` (or `spawn`)
    chooses another start method. The work done in a worker is the same either way (same
    bytes)."""
    if num_workers <= 0:
        return None
    import multiprocessing as mp

    method = os.environ.get(WORKER_START_VAR, "").strip().lower() or "forkserver"
    if method not in mp.get_all_start_methods():
        if os.environ.get(WORKER_START_VAR):
            raise InputError(
                f"{WORKER_START_VAR}={method!r} is not a start method here",
                f"use one of: {', '.join(mp.get_all_start_methods())}",
            )
        return None
    ctx = mp.get_context(method)
    if method == "forkserver":
        start_worker_server(preload)
    return ctx


def start_worker_server(preload: tuple[str, ...] = ()) -> None:
    """Start the forkserver now, importing `preload` (the workers' modules) once, in parallel
    with whatever the caller does next (loading its model); a no-op when it runs already (the
    first caller's preload holds) or workers do not start through it."""
    import multiprocessing as mp
    from multiprocessing import forkserver

    method = os.environ.get(WORKER_START_VAR, "").strip().lower() or "forkserver"
    if method != "forkserver" or "forkserver" not in mp.get_all_start_methods():
        return
    mp.get_context("forkserver").set_forkserver_preload(["__main__", *preload])
    forkserver.ensure_running()


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
