"""Pretrain the fusion encoder on labelled shards: ITM + CIT + COE + CIR (the loop, end to end).

python trainer/run.py --shards shards/ --preset tiny --steps 50
python trainer/run.py --params params.yaml            # the `pretrain:` group, flags override
torchrun --nproc_per_node 2 trainer/run.py --shards shards/ ...   # DDP (gloo CPU / nccl GPU)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline import runtime
from pipeline.shards import read_vocabularies, write_json_atomic
from trainer import checkpoint, data
from trainer.losses import LOSS_NAMES, TEMP_MAX, TEMP_MIN, pretrain_loss
from trainer.model import ModelConfig, build_model, build_tokenizer, export_hf, save_pretrained
from trainer.optim import build_optimizer, build_scheduler


@dataclass
class TrainConfig:
    # data and outputs
    shards: str = "shards"
    out: str = "checkpoints/pretrain"  # final model; resume states go to {out}_state/
    metrics: str = "metrics/pretrain.json"
    live_dir: str = "dvclive/pretrain"  # dvclive logs and plots ("" to switch off)
    # model
    preset: str = "tiny"
    text_encoder: str | None = None
    vision_encoder: str | None = None
    random_init: bool = False
    n_fusion_layers: int | None = None
    proj_dim: int = 256
    # losses (lambda = 0 removes the loss and its head)
    lambda_itm: float = 1.0
    lambda_cit: float = 1.0
    lambda_coe: float = 1.0
    lambda_cir: float = 1.0
    hard_labels: bool = False
    label_mass: str = "spread"  # top-k labels: spread the leftover mass | renormalise the top-k
    min_cover: float = 0.5  # fraction of a patch a box must cover to pool it (COE)
    # optimisation (paper: AdamW, lr 1e-4, weight decay 1e-3)
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 1e-3
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    # data loading
    max_len: int = 40
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # runtime
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA (no-op on CPU)
    threads: int = 0  # CPU threads per process (0: cores / processes)
    ckpt_every: int = 500
    keep_ckpts: int = 2
    resume: bool = False
    log_every: int = 10
    export_hf: bool = True

    @property
    def lambdas(self) -> dict[str, float]:
        return {k: float(getattr(self, f"lambda_{k}")) for k in LOSS_NAMES}

    @property
    def state_dir(self) -> Path:
        out = Path(self.out)
        return out.with_name(out.name + "_state")


# ------------------------------------------------------------------------------ setup


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = runtime.select_device(cfg.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def _reduce_mean(values: dict[str, float], world: int, device) -> dict[str, float]:
    if world == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return {k: float(v) / world for k, v in zip(keys, t.tolist(), strict=True)}


# ------------------------------------------------------------------------------ train


def train(cfg: TrainConfig, on_step=None) -> dict[str, Any]:
    """Run (or resume) pretraining; return the metrics written to cfg.metrics.

    `on_step(step)` is called after every optimiser step (tests use it to interrupt a run).
    """
    rank, world, device = setup_distributed(cfg)
    is_main = rank == 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    runtime.set_threads(cfg.threads or max(1, cores // world))
    seed_everything(cfg.seed)  # same init on every rank; DDP also broadcasts rank 0's weights

    entities, relations = read_vocabularies(cfg.shards)
    lambdas = cfg.lambdas
    model_cfg = ModelConfig(
        preset=cfg.preset,
        text_encoder=cfg.text_encoder,
        vision_encoder=cfg.vision_encoder,
        random_init=cfg.random_init,
        n_fusion_layers=cfg.n_fusion_layers,
        n_entities=len(entities) if lambdas["coe"] > 0 else 0,
        n_relations=len(relations) if lambdas["cir"] > 0 else 0,
        itm_head=lambdas["itm"] > 0,
        proj_dim=cfg.proj_dim if lambdas["cit"] > 0 else 0,
    )
    model = build_model(model_cfg)
    tokenizer = build_tokenizer(model_cfg)
    model.to(device)
    core = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = build_optimizer([(core, cfg.lr)], cfg.weight_decay, device)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps)
    torch.manual_seed(cfg.seed + 1000 * rank)  # dropout streams differ per rank

    n_samples = data.total_samples(cfg.shards)
    if 0 < n_samples // world < cfg.batch_size:
        # A small folder (the bundled sample) still trains: one smaller batch per rank and epoch.
        if is_main:
            print(
                f"pretrain: only {n_samples} samples for {world} rank(s): "
                f"batch size {cfg.batch_size} -> {n_samples // world}"
            )
        cfg = dataclasses.replace(cfg, batch_size=n_samples // world)
    data_cfg = data.DataConfig(
        shard_dir=cfg.shards,
        batch_size=cfg.batch_size,
        max_len=cfg.max_len,
        image_size=core.cfg.image_size,
        num_workers=cfg.num_workers,
        shuffle_buffer=cfg.shuffle_buffer,
        seed=cfg.seed,
        n_entities=len(entities),
        n_relations=len(relations),
    )
    per_epoch = data.steps_per_epoch(n_samples, world, cfg.batch_size)

    step, bad = 0, Counter()
    history: list[dict[str, float]] = []
    if cfg.resume:
        latest = checkpoint.latest_state(cfg.state_dir)
        if latest is not None:
            restored = checkpoint.load_state(latest, model, optimizer, scheduler, rank)
            step = restored["step"]
            bad.update(restored.get("bad", {}))
            history = restored.get("history", [])
            if is_main:
                print(f"resumed from {latest} at step {step}")
        elif is_main:
            print(f"--resume: no checkpoint in {cfg.state_dir}, starting at step 0")

    live = open_live(cfg.live_dir, resume=step > 0) if is_main and cfg.live_dir else None
    if live is not None:
        live.log_params({k: v for k, v in dataclasses.asdict(cfg).items() if v is not None})
    if is_main:
        n_params = sum(p.numel() for p in core.parameters())
        print(
            f"pretrain: {n_samples} samples, {per_epoch} steps/epoch on {world} rank(s), "
            f"batch {cfg.batch_size}/rank, {n_params / 1e6:.1f}M params, device {device}, "
            f"losses {', '.join(k for k, v in lambdas.items() if v > 0)}"
        )

    bar = tqdm(total=cfg.steps, initial=step, disable=not is_main, desc="pretrain", unit="step")
    window: dict[str, list[torch.Tensor]] = {}
    t_start, seen_start, t_data = time.perf_counter(), step, 0.0
    pin = device.type == "cuda"
    while step < cfg.steps:
        epoch, skip = divmod(step, per_epoch)
        loader = data.make_loader(data_cfg, tokenizer, epoch=epoch, pin_memory=pin)
        n_batches = 0
        t_fetch = time.perf_counter()
        for i, batch in enumerate(loader):
            n_batches = i + 1
            batch_bad = batch.pop("bad")
            if i < skip:  # resumed mid-epoch: trained on (and bad samples counted) before
                continue
            bad.update(batch_bad)
            t_data += time.perf_counter() - t_fetch
            batch = data.to_device(batch, device)
            model.train()
            with runtime.autocast(device, cfg.amp):
                out = model(
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["pixel_values"],
                    boxes=batch["boxes"] if lambdas["coe"] > 0 else None,
                    min_cover=cfg.min_cover,
                )
            loss, parts = pretrain_loss(
                out, batch, lambdas, hard=cfg.hard_labels, label_mass=cfg.label_mass
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(core.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if core.temp is not None:
                with torch.no_grad():
                    core.temp.clamp_(TEMP_MIN, TEMP_MAX)
            step += 1

            # losses stay on the device between log steps: no host sync per step on CUDA
            for k, v in {"loss": loss.detach(), **parts}.items():
                window.setdefault(k, []).append(v)
            if step % cfg.log_every == 0 or step == cfg.steps:
                means = {k: float(torch.stack(v).float().mean()) for k, v in window.items()}
                avg = _reduce_mean(means, world, device)
                window = {}
                elapsed = time.perf_counter() - t_start
                sps = (step - seen_start) * cfg.batch_size * world / max(elapsed, 1e-9)
                lr = scheduler.get_last_lr()[0]
                history.append({"step": step, **avg})
                if is_main:
                    bar.set_postfix(
                        {k: f"{v:.3f}" for k, v in avg.items()}
                        | {"lr": f"{lr:.1e}", "sps": f"{sps:.1f}"}
                    )
                if live is not None:
                    live.step = step  # dvclive's x axis is the optimiser step
                    for k, v in avg.items():
                        live.log_metric(f"train/{k}", v)
                    live.log_metric("train/lr", lr)
                    live.log_metric("train/samples_per_s", sps)
                    live.log_metric("train/grad_norm", float(grad_norm))
                    live.next_step()
            bar.update(1)

            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_checkpoint(
                    cfg,
                    step,
                    model,
                    tokenizer,
                    model_cfg,
                    optimizer,
                    scheduler,
                    {"bad": dict(bad), "history": history},
                    rank,
                    world,
                )
            if on_step is not None:
                on_step(step)
            if step >= cfg.steps or i + 1 >= per_epoch:
                break
            t_fetch = time.perf_counter()
        if step < cfg.steps and n_batches < per_epoch:
            raise RuntimeError(
                f"epoch {epoch}: the data stream ended after {n_batches} of {per_epoch} batches "
                f"(bad samples: {dict(bad)})"
            )
    bar.close()
    elapsed = time.perf_counter() - t_start

    checksums = [param_checksum(core)]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"checksum": checksums[0], "bad": dict(bad)})
        checksums = [g["checksum"] for g in gathered]
        bad = sum((Counter(g["bad"]) for g in gathered), Counter())
    metrics = {
        "steps": step,
        "epochs": round(step / per_epoch, 4),
        "steps_per_epoch": per_epoch,
        "world_size": world,
        "batch_size": cfg.batch_size,
        "samples_seen": step * cfg.batch_size * world,
        "samples_per_s": round((step - seen_start) * cfg.batch_size * world / elapsed, 3)
        if elapsed > 0
        else 0.0,
        "data_wait_fraction": round(t_data / elapsed, 4) if elapsed > 0 else 0.0,
        "train": history[-1] if history else {},
        "first": history[0] if history else {},
        "bad_samples": int(sum(bad.values())),
        "bad_reasons": dict(bad.most_common(20)),
        "param_checksums": checksums,
        "device": str(device),
        "preset": cfg.preset,
        "lambdas": lambdas,
        "hard_labels": cfg.hard_labels,
        "label_mass": cfg.label_mass,
    }
    if is_main:
        save_pretrained(
            core, tokenizer, model_cfg, cfg.out, extra={"train": dataclasses.asdict(cfg)}
        )
        if cfg.export_hf:
            export_hf(core, Path(cfg.out) / "hf", tokenizer)
        Path(cfg.metrics).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cfg.metrics, metrics)
        if live is not None:
            live.end()
        print_summary(cfg, metrics, elapsed)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return metrics


class TsvLive:
    """dvclive's plot layout (plots/metrics/<name>.tsv with step and value) without dvclive."""

    def __init__(self, directory: str, resume: bool = False):
        self.dir, self.step = Path(directory), 0
        if not resume and (self.dir / "plots").exists():
            import shutil

            shutil.rmtree(self.dir / "plots")

    def log_params(self, params: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "params.json").write_text(json.dumps(params, indent=1), encoding="utf-8")

    def log_metric(self, name: str, value: float) -> None:
        path = self.dir / "plots" / "metrics" / f"{name}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with open(path, "a", encoding="utf-8") as f:
            if new:
                f.write(f"step\t{path.stem}\n")
            f.write(f"{self.step}\t{value}\n")

    def next_step(self) -> None:
        self.step += 1

    def end(self) -> None:
        pass


def open_live(directory: str, resume: bool):
    """dvclive when it can start here; otherwise the same TSV plots written directly.

    (dvclive 3.49 raises on a git repository without commits, e.g. a fresh `git init`.)
    """
    try:
        from dvclive import Live

        return Live(directory, save_dvc_exp=False, dvcyaml=None, resume=resume)
    except Exception as e:  # noqa: BLE001 - logging must never stop training
        print(f"dvclive unavailable ({type(e).__name__}: {e}); writing TSV plots to {directory}")
        return TsvLive(directory, resume)


def save_checkpoint(
    cfg, step, model, tokenizer, model_cfg, optimizer, scheduler, state, rank, world
):
    """Every rank saves its RNG; rank 0 saves the rest and publishes the step atomically."""
    checkpoint.save_rank_rng(cfg.state_dir, step, rank)
    if world > 1:
        dist.barrier()
    if rank == 0:
        checkpoint.save_state(
            cfg.state_dir,
            step,
            model,
            tokenizer,
            model_cfg,
            optimizer,
            scheduler,
            state,
            keep=cfg.keep_ckpts,
        )
    if world > 1:
        dist.barrier()


def print_summary(cfg: TrainConfig, m: dict[str, Any], elapsed: float) -> None:
    first, last = m["first"], m["train"]
    lines = [
        f"pretrain done: {m['steps']} steps ({m['epochs']} epochs) in {elapsed:.1f}s, "
        f"{m['samples_per_s']} samples/s on {m['world_size']} x {m['device']}",
        "loss     first    last",
    ]
    for k in ("loss", *LOSS_NAMES):
        if k in last:
            lines.append(f"{k:<8} {first.get(k, math.nan):7.4f}  {last[k]:7.4f}")
    lines.append(
        f"bad samples: {m['bad_samples']}" + (f" {m['bad_reasons']}" if m["bad_samples"] else "")
    )
    lines.append(
        f"model: {cfg.out} (+ hf/), resume states: {cfg.state_dir}, metrics: {cfg.metrics}"
    )
    print("\n".join(lines))


# ------------------------------------------------------------------------------ CLI


def load_params(path: str | None, group: str = "pretrain") -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    with open(path, encoding="utf-8") as f:
        params = yaml.safe_load(f) or {}
    values = params.get(group, {})
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise SystemExit(f"{path}: unknown {group} parameters {unknown}")
    return values


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", help="YAML file whose `pretrain:` group sets the defaults")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
            if f.name == "n_fusion_layers":
                kind = int
            parser.add_argument(flag, type=kind, default=None, metavar=f.name.upper())
    args = vars(parser.parse_args(argv))
    values = load_params(args.pop("params"))
    values.update({k: v for k, v in args.items() if v is not None})
    return TrainConfig(**values)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
