"""Pretraining throughput: step samples/s, MFU from counted FLOPs, and the loader's rate.

    python benchmarks/trainer_throughput.py --arch tiny --batch-size 8 --device cpu
    python benchmarks/trainer_throughput.py --device cuda --arch both --batch-size 128 \\
        --workers 15 --compile both --json trainer_gpu.json    # the GPU check, one command

Everything is the trainer's own code: `trainer.pretrain.setup` builds the model, optimizer and data
config from a TrainConfig (base = bert-base-uncased + ViT-B/16 shapes with random weights, no
download) over synthetic contract-true shards (JPEGs of --image-wh); the step is
`forward_backward` + `optimizer_step` (bf16 autocast on CUDA, fp32 on CPU). FLOPs are counted
with torch.utils.flop_counter over one forward + backward of that step; MFU divides the achieved
FLOP rate by this machine's matmul rate measured in the same run (bf16 on CUDA, fp32 on CPU).
The loader rate is the real DataLoader (decode, resize, tokenise, collate in workers, pinned
copies to the device); it should stay >= 2x the step rate.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import itertools
import json
import os
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from pipeline.random_shards import write_random_shards
from pmu import runtime
from trainer import data, pretrain
from trainer.pretrain_config import TrainConfig

LOADER_TARGET = 2.0  # loader samples/s over step samples/s


# FlopCounterMode hands custom counters the argument shapes (its shape_wrapper)
def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU SDPA kernels (torch counts only the CUDA ones)."""
    aten = torch.ops.aten
    custom = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        custom[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
        custom[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    return FlopCounterMode(display=False, custom_mapping=custom)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, seconds: float = 2.0) -> tuple[float, str]:
    """Measured dense matmul FLOP/s: bf16 on CUDA (tensor cores), fp32 on CPU."""
    if device.type == "cuda":
        n, dtype = 8192, torch.bfloat16
    else:
        n, dtype = 1024, torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(5):
            a @ b
        reps += 5
        sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start), str(dtype).replace("torch.", "")


def loader_rate(r: pretrain.Run, batches: int) -> float:
    """Samples/s of the trainer's DataLoader, batches copied to the device as in training."""
    pin = r.device.type == "cuda"
    it = iter(data.make_loader(r.data_cfg, r.tokenizer, pin_memory=pin))
    for _ in range(max(2, r.cfg.num_workers)):  # warm up: workers started, first batches
        data.to_device(next(it), r.device)
    sync(r.device)
    start = time.perf_counter()
    for batch in itertools.islice(it, batches):
        data.to_device(batch, r.device)
    sync(r.device)
    return batches * r.cfg.batch_size / (time.perf_counter() - start)


def host_syncs(r: pretrain.Run, micro: list) -> int | None:
    """Device-to-host syncs in one step (CUDA's sync debug mode; None on CPU)."""
    if r.device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            pretrain.forward_backward(r, micro)
            pretrain.optimizer_step(r)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def step_figures(r: pretrain.Run, steps: int) -> dict[str, float]:
    """FLOPs of one step (counted), then samples/s over `steps` timed steps."""
    in_process = dataclasses.replace(r.data_cfg, num_workers=0)  # no workers left running
    batch = next(iter(data.make_loader(in_process, r.tokenizer)))
    batch.pop("bad")
    micro = [data.to_device(batch, r.device) for _ in range(r.cfg.accum)]
    for _ in range(2):  # warm-up: allocations, autotuning, torch.compile
        pretrain.forward_backward(r, micro)
        pretrain.optimizer_step(r)
    syncs = host_syncs(r, micro)
    with flop_counter() as counter:  # eager: compiled kernels would bypass the counter
        pretrain.forward_backward(dataclasses.replace(r, model=r.core), micro)
    flops = counter.get_total_flops()
    pretrain.optimizer_step(r)
    sync(r.device)
    start = time.perf_counter()
    for _ in range(steps):
        pretrain.forward_backward(r, micro)
        pretrain.optimizer_step(r)
    sync(r.device)
    elapsed = time.perf_counter() - start
    samples = r.cfg.batch_size * r.cfg.accum
    return {
        "text_tokens": int(batch["input_ids"].shape[1]),  # padded caption length of the batch
        "host_syncs_per_step": syncs,
        "flops_per_step": flops,
        "flops_per_sample": flops / samples,
        "step_samples_per_s": steps * samples / elapsed,
        "achieved_flops_per_s": flops * steps / elapsed,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["tiny", "base", "both"], default="both")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--steps", type=int, default=0, help="timed steps (0: 20, base on CPU 3)")
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--image-wh", type=int, nargs=2, default=(320, 240))
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--compile",
        choices=["no", "yes", "both"],
        default="no",
        help="torch.compile the model (inductor); both: eager and compiled rows",
    )
    p.add_argument("--no-amp", action="store_true", help="fp32 on CUDA too")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = runtime.set_threads(args.threads or None)
    device = runtime.select_device(args.device)
    archs = ["tiny", "base"] if args.arch == "both" else [args.arch]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{threads}"

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        per_step = args.batch_size * args.accum
        n = max(256, per_step * 2, args.batch_size * (args.loader_batches + 2 * args.workers + 4))
        shard_dir = write_random_shards(
            Path(tmp) / "shards",
            n_samples=n,
            samples_per_shard=64,
            n_entities=1000,
            n_relations=1000,
            top_k=10,
            max_objects=4,
            image_size=tuple(args.image_wh),
        )
        variants = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
        for arch, compiled in itertools.product(archs, variants):
            cfg = TrainConfig(
                shards=str(shard_dir),
                preset=arch,
                random_init=arch != "tiny",
                batch_size=args.batch_size,
                accum=args.accum,
                num_workers=args.workers,
                shuffle_buffer=256,
                device=str(device),
                amp=not args.no_amp,
                compile=compiled,
                threads=threads,
            )
            r = pretrain.setup(cfg)
            n_params = sum(q.numel() for q in r.core.parameters())
            steps = args.steps or (3 if arch == "base" and device.type == "cpu" else 20)
            # the machine's matmul rate just before and after the timed steps (the higher one:
            # on a shared machine, load from others depresses a single measurement)
            peak, peak_dtype = matmul_rate(device)
            figures = step_figures(r, steps)
            peak = max(peak, matmul_rate(device)[0])
            loader = loader_rate(r, args.loader_batches)
            figures.update(
                arch=arch + ("+c" if compiled else ""),
                params=n_params,
                image_size=r.core.cfg.image_size,
                loader_samples_per_s=loader,
                loader_over_step=loader / figures["step_samples_per_s"],
                matmul_flops_per_s=peak,
                matmul_dtype=peak_dtype,
                mfu=figures["achieved_flops_per_s"] / peak,
            )
            rows.append(figures)
            del r

    print(
        f"device {name}, torch {torch.__version__}, batch {args.batch_size} x accum "
        f"{args.accum}, loader workers {args.workers}, source JPEG "
        f"{args.image_wh[0]}x{args.image_wh[1]}, "
        f"{'fp32' if device.type == 'cpu' or args.no_amp else 'bf16 autocast'}"
    )
    print(
        f"MFU = counted step FLOPs x steps/s / the {rows[0]['matmul_dtype']} matmul rate "
        "measured around the timed steps; +c = torch.compile"
    )
    header = (
        f"{'arch':<7}{'params':>9}{'img':>5}{'tok':>5}{'GFLOP/sample':>14}{'step s/s':>10}"
        f"{'TFLOP/s':>9}{'matmul TFLOP/s':>16}{'MFU':>7}{'loader s/s':>12}{'loader/step':>13}"
    )
    print(header)
    syncs = {f["arch"]: f["host_syncs_per_step"] for f in rows}
    if any(v is not None for v in syncs.values()):
        print(f"device-to-host syncs in one training step (want 0): {syncs}")
    for f in rows:
        flag = "" if f["loader_over_step"] >= LOADER_TARGET else f"  < {LOADER_TARGET:.0f}x target"
        print(
            f"{f['arch']:<7}{f['params'] / 1e6:>8.1f}M{f['image_size']:>5}{f['text_tokens']:>5}"
            f"{f['flops_per_sample'] / 1e9:>14.2f}{f['step_samples_per_s']:>10.2f}"
            f"{f['achieved_flops_per_s'] / 1e12:>9.3f}{f['matmul_flops_per_s'] / 1e12:>16.3f}"
            f"{100 * f['mfu']:>6.1f}%"
            f"{f['loader_samples_per_s']:>12.1f}{f['loader_over_step']:>13.1f}{flag}"
        )
    if args.json:
        result = {"device": name, "torch": torch.__version__, "args": vars(args), "rows": rows}
        Path(args.json).write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
