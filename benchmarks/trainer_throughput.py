"""Trainer vs data-loader throughput (samples/s) for the tiny and base architectures.

    python benchmarks/trainer_throughput.py                       # tiny and base, CPU or CUDA
    python benchmarks/trainer_throughput.py --arch base --batch-size 32 --workers 8

Base is bert-base-uncased + ViT-B/16 shapes with random weights (no download). The loader reads
synthetic contract-true shards (JPEGs of --image-wh, decoded, resized, tokenised and batched in
workers); the step is forward + backward + AdamW on one batch kept on the device (bf16 autocast
on CUDA). loader/step > 1 means the GPU/CPU step, not the data, is the bottleneck.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import itertools
import os
import tempfile
import time

import torch

from pipeline import runtime
from pipeline.synthetic import write_synthetic_shards
from trainer import data
from trainer.losses import pretrain_loss
from trainer.model import ModelConfig, build_model, build_tokenizer
from trainer.optim import build_optimizer

LAMBDAS = {"itm": 1.0, "cit": 1.0, "coe": 1.0, "cir": 1.0}


def loader_rate(shard_dir, tokenizer, image_size, batch_size, workers, batches) -> float:
    cfg = data.DataConfig(
        shard_dir=str(shard_dir),
        batch_size=batch_size,
        image_size=image_size,
        num_workers=workers,
        shuffle_buffer=256,
    )
    it = iter(data.make_loader(cfg, tokenizer, pin_memory=torch.cuda.is_available()))
    for _ in range(max(2, workers)):  # warm up: workers started, first batches decoded
        next(it)
    start = time.perf_counter()
    for _ in itertools.islice(it, batches):
        pass
    return batches * batch_size / (time.perf_counter() - start)


def step_rate(model, batch, device, steps) -> float:
    opt = build_optimizer([(model, 1e-4)], 1e-3)
    model.train()

    def step():
        with runtime.autocast(device):
            out = model(
                batch["input_ids"],
                batch["attention_mask"],
                batch["pixel_values"],
                boxes=batch["boxes"],
            )
        loss, _ = pretrain_loss(out, batch, LAMBDAS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (allocations, autotuning)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch["input_ids"].shape[0] / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["tiny", "base", "both"], default="both")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=0, help="timed steps (0: 20 tiny, 3 base on CPU)")
    p.add_argument("--loader-batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--image-wh", type=int, nargs=2, default=(320, 240))
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = runtime.set_threads(args.threads or None)
    device = runtime.select_device(args.device)
    archs = ["tiny", "base"] if args.arch == "both" else [args.arch]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        n = max(256, args.batch_size * (args.loader_batches + 2 * args.workers + 4))
        shard_dir = write_synthetic_shards(
            Path(tmp) / "shards",
            n_samples=n,
            samples_per_shard=64,
            n_entities=1000,
            n_relations=1000,
            top_k=10,
            max_objects=4,
            image_size=tuple(args.image_wh),
        )
        for arch in archs:
            cfg = ModelConfig(
                preset=arch, random_init=arch != "tiny", n_entities=1000, n_relations=1000
            )
            model = build_model(cfg).to(device)
            tok = build_tokenizer(cfg)
            n_params = sum(q.numel() for q in model.parameters()) / 1e6
            loader = loader_rate(
                shard_dir, tok, cfg.image_size, args.batch_size, args.workers, args.loader_batches
            )
            dcfg = data.DataConfig(
                shard_dir=str(shard_dir),
                batch_size=args.batch_size,
                image_size=cfg.image_size,
                shuffle_buffer=0,
            )
            batch = next(iter(data.make_loader(dcfg, tok)))
            batch.pop("bad")
            batch = data.to_device(batch, device)
            steps = args.steps or (3 if arch == "base" and device.type == "cpu" else 20)
            trainer = step_rate(model, batch, device, steps)
            rows.append((arch, n_params, cfg.image_size, trainer, loader))
            del model

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{threads}"
    print(
        f"device {name}, batch {args.batch_size}, loader workers {args.workers}, "
        f"source JPEG {args.image_wh[0]}x{args.image_wh[1]}"
    )
    header = ("arch", "params", "img", "trainer s/s", "loader s/s", "loader/step")
    print(
        f"{header[0]:<6}{header[1]:>9}{header[2]:>5}{header[3]:>13}{header[4]:>12}{header[5]:>13}"
    )
    for arch, n_params, size, trainer, loader in rows:
        print(
            f"{arch:<6}{n_params:>8.1f}M{size:>5}{trainer:>13.1f}{loader:>12.1f}"
            f"{loader / trainer:>13.1f}"
        )


if __name__ == "__main__":
    main()
