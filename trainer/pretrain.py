"""Pretraining, end to end: `setup` builds everything, `train` is the loop, the step is
`forward_backward` + `optimizer_step`, and `finish` writes the model, metrics and plots.

The command line is `trainer/run.py` (flags, params.yaml, input checks); the settings are
`trainer/pretrain_config.TrainConfig`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pmu import runtime
from pmu.errors import InputError
from pmu.fingerprint import fingerprint, refuse_other_run
from pmu.io import file_sha256, write_json_atomic
from pmu.optim import build_optimizer, build_scheduler
from pmu.outputs import claim_outputs
from pmu.settings import settings_dict
from pmu.shards import read_vocabularies
from trainer import checkpoint, data, losses, plots
from trainer.factory import build_model, build_tokenizer, save_pretrained
from trainer.model import ModelConfig, PretrainModel, export_hf
from trainer.pretrain_config import TrainConfig, check_config, check_inputs
from trainer.train_log import TrainLog, summary

__all__ = ["TrainConfig", "train", "setup", "forward_backward", "optimizer_step"]


# ------------------------------------------------------------------------------ setup


@dataclass
class Run:
    """Everything the loop uses, built once by `setup`."""

    cfg: TrainConfig  # machine defaults filled in (batch size, workers)
    rank: int
    world: int
    device: torch.device
    core: PretrainModel  # the model itself: saving, clipping, the temperature
    model: torch.nn.Module  # what the step calls: core, DDP(core), maybe compiled
    ddp: torch.nn.parallel.DistributedDataParallel | None
    model_cfg: ModelConfig
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    data_cfg: data.DataConfig
    n_samples: int
    per_epoch: int  # optimiser steps per epoch
    fingerprint: dict[str, Any]  # what decides the training (a resume must match it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = runtime.select_device(cfg.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_defaults(cfg: TrainConfig, world: int, device: torch.device) -> TrainConfig:
    """Per-rank batch size and loader workers that fit this machine, when not given.

    Batch: 128 per GPU (the paper's batch; base in bf16 needs ~20 GB), 64 on GPUs under
    40 GiB, 8 on CPU. Workers: this rank's share of the cores minus its own, at most 16."""
    batch, workers = cfg.batch_size, cfg.num_workers
    if batch is None:
        batch = 8
        if device.type == "cuda":
            memory = torch.cuda.get_device_properties(device).total_memory
            batch = 128 if memory >= 40 * 2**30 else 64
    if workers is None:
        workers = max(1, min(16, cpu_cores() // world - 1))
    return dataclasses.replace(cfg, batch_size=batch, num_workers=workers)


def fit_batch_to_data(cfg: TrainConfig, n_samples: int, world: int, say: bool) -> TrainConfig:
    """A folder smaller than one step (the bundled sample) still trains, with smaller batches."""
    per_rank = n_samples // (world * cfg.accum)
    if per_rank < 1:
        raise InputError(
            f"{n_samples} samples cannot give every one of {world} rank(s) {cfg.accum} "
            "micro-batch(es): lower --accum or use fewer processes"
        )
    if per_rank >= cfg.batch_size:
        return cfg
    if say:
        print(
            f"pretrain: only {n_samples} samples for {world} rank(s) x {cfg.accum} "
            f"micro-batch(es): batch size {cfg.batch_size} -> {per_rank}"
        )
    return dataclasses.replace(cfg, batch_size=per_rank)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: TrainConfig) -> Run:
    """Process group, threads, seeds, model (DDP, compiled), optimizer, schedule, data config."""
    rank, world, device = setup_distributed(cfg)
    runtime.set_threads(cfg.threads or max(1, cpu_cores() // world))
    cfg = machine_defaults(cfg, world, device)
    n_samples = data.total_samples(cfg.shards)
    cfg = fit_batch_to_data(cfg, n_samples, world, say=rank == 0)
    seed_everything(cfg.seed)  # same init on every rank; DDP also broadcasts rank 0's weights

    entities, relations = read_vocabularies(cfg.shards)
    # before the model: a folder with no usable sample is an input error, not a loader crash
    data.require_valid_sample(
        data.DataConfig(cfg.shards, n_entities=len(entities), n_relations=len(relations))
    )
    lambdas = cfg.lambdas
    model_cfg = ModelConfig(
        fusion=cfg.fusion,
        preset=cfg.preset,
        text_encoder=cfg.text_encoder,
        vision_encoder=cfg.vision_encoder,
        random_init=cfg.random_init,
        n_fusion_layers=cfg.n_fusion_layers,
        n_entities=len(entities) if lambdas["coe"] > 0 else 0,
        n_relations=len(relations) if lambdas["cir"] > 0 else 0,
        itm_head=lambdas["itm"] > 0,
        proj_dim=cfg.proj_dim if lambdas["cit"] > 0 else 0,
        align_on=cfg.align_on,
    )
    core = build_model(model_cfg).to(device).train()
    tokenizer = build_tokenizer(model_cfg)
    ddp = None
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(core, device_ids=ids)
    model = ddp or core
    if cfg.compile:
        model = torch.compile(model, backend=cfg.compile_backend)
    vision = core.vision_modules()
    optimizer = build_optimizer(
        [(core, cfg.lr, vision.parameters()), (vision, cfg.lr_vision or cfg.lr)],
        cfg.weight_decay,
        device,
    )
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, cfg.steps)
    torch.manual_seed(cfg.seed + 1000 * rank)  # dropout streams differ per rank

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
    per_epoch = data.steps_per_epoch(n_samples, world, cfg.batch_size * cfg.accum)
    run = Run(
        cfg, rank, world, device, core, model, ddp, model_cfg, tokenizer, optimizer,
        scheduler, data_cfg, n_samples, per_epoch, run_fingerprint(cfg, model_cfg),
    )  # fmt: skip
    if run.is_main:
        n_params = sum(p.numel() for p in core.parameters())
        print(
            f"pretrain: {n_samples} samples, {per_epoch} steps/epoch on {world} rank(s), "
            f"batch {cfg.batch_size}/rank x {cfg.accum} micro-batch(es), "
            f"{cfg.num_workers} loader worker(s)/rank, {n_params / 1e6:.1f}M params, "
            f"device {device}, losses {', '.join(k for k, v in lambdas.items() if v > 0)}"
            + (f", torch.compile ({cfg.compile_backend})" if cfg.compile else "")
        )
    return run


# settings that do not change what is trained: a resume may change them (--steps: train on)
NOT_FINGERPRINTED = (
    "shards", "out", "metrics", "report", "live_dir", "plot", "steps", "device", "threads",
    "compile", "compile_backend", "ckpt_every", "keep_ckpts", "resume", "log_every",
    "bad_warn_every_s", "export_hf",
)  # fmt: skip
SHARD_FILES = ("manifest.json", "sizes.json", "entities.json", "relations.json")


def run_fingerprint(cfg: TrainConfig, model_cfg: ModelConfig) -> dict[str, Any]:
    """The run's settings (less NOT_FINGERPRINTED), its model config and its shards (their
    manifest, sizes and vocabularies, by content: the folder may move)."""
    params = {k: v for k, v in settings_dict(cfg).items() if k not in NOT_FINGERPRINTED}
    shard_dir = Path(cfg.shards)
    files = {name: file_sha256(shard_dir / name) for name in SHARD_FILES
             if (shard_dir / name).is_file()}  # fmt: skip
    return fingerprint({"params": params, "model": model_cfg.to_dict(), "files": files})


def resume(run: Run) -> tuple[int, dict[str, Any]]:
    """(step, saved log state) from the latest checkpoint, or (0, {}) without one; a checkpoint
    of another run (other shards, settings, model, seed) is refused before anything loads."""
    latest = checkpoint.latest_state(run.cfg.state_dir)
    if latest is None:
        if run.is_main:
            print(f"--resume: no checkpoint in {run.cfg.state_dir}, starting at step 0")
        return 0, {}
    saved = checkpoint.read_trainer_state(latest).get("fingerprint")
    if saved is None:  # written before runs had fingerprints
        print(f"--resume: {latest} records no fingerprint; resuming without the check")
    else:
        refuse_other_run(saved, run.fingerprint, run.cfg.state_dir)
    restored = checkpoint.load_state(latest, run.core, run.optimizer, run.scheduler, run.rank)
    if run.is_main:
        print(f"resumed from {latest} at step {restored['step']}")
    return restored["step"], restored


# ------------------------------------------------------------------------------ data


def step_batches(run: Run, start_step: int, log: TrainLog) -> Iterator[list[dict[str, Any]]]:
    """The micro-batches of every optimiser step from `start_step` on, on the device.

    Epoch e is `per_epoch` steps of the loader seeded with (seed, e); a resume mid-epoch
    rebuilds that epoch's stream and skips what was trained (bad samples counted then)."""
    cfg, step = run.cfg, start_step
    pin = run.device.type == "cuda"
    while True:
        epoch, done = divmod(step, run.per_epoch)
        batches = iter(data.make_loader(run.data_cfg, run.tokenizer, epoch=epoch, pin_memory=pin))
        for _ in range(done * cfg.accum):
            _next_batch(batches, epoch, run)
        for _ in range(done, run.per_epoch):
            micro = []
            for _ in range(cfg.accum):
                t0 = time.perf_counter()
                batch = _next_batch(batches, epoch, run)
                log.data_wait += time.perf_counter() - t0
                log.bad_samples(batch.pop("bad"))
                micro.append(data.to_device(batch, run.device))
            yield micro
            step += 1


def _next_batch(batches: Iterator[dict[str, Any]], epoch: int, run: Run) -> dict[str, Any]:
    try:
        return next(batches)
    except StopIteration:
        raise RuntimeError(
            f"epoch {epoch}: the data stream ended before {run.per_epoch} steps; "
            "the shards hold fewer readable samples than sizes.json says"
        ) from None


# ------------------------------------------------------------------------------ the step


def forward_backward(
    run: Run, micro_batches: list[dict[str, Any]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward over one optimiser step's micro-batches.

    Every loss is the mean over the global batch: all ranks and all micro-batches, weighted by
    their valid rows (pairs, matched pairs, objects), as on one process holding the whole
    batch. Each micro-batch adds its share (losses.global_totals); DDP averages gradients over
    ranks, so each rank back-propagates world x its share. CIT draws its negatives from every
    rank (losses.gather_pairs) but only from the current micro-batch: with --accum N, the
    InfoNCE sees global batch / N candidates, not the whole step's.

    Returns (loss, parts): this rank's shares, detached (they add up over ranks).
    """
    cfg, world = run.cfg, run.world
    totals = losses.global_totals(micro_batches, world, cfg.align_pairs)
    loss_sum, parts_sum = torch.zeros((), device=run.device), {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or run.ddp is None else run.ddp.no_sync()
        with sync:
            with runtime.autocast(run.device, cfg.amp):
                out = run.model(
                    batch["input_ids"],
                    batch["attention_mask"],
                    batch["pixel_values"],
                    boxes=batch["boxes"],  # COE, and the crops of fusions that see them
                    min_cover=cfg.min_cover,
                )
            pairs = None
            if "text_emb" in out:
                pairs = losses.gather_pairs(
                    out["text_emb"], out["image_emb"], batch["itm"] == 1, world
                )
            loss, parts = losses.pretrain_loss(
                out,
                batch,
                cfg.lambdas,
                hard=cfg.hard_labels,
                label_mass=cfg.label_mass,
                align_pairs=cfg.align_pairs,
                totals=totals,
                pairs=pairs,
            )
            (loss * world).backward()
        loss_sum = loss_sum + loss.detach()
        for k, v in parts.items():
            parts_sum[k] = parts_sum.get(k, 0) + v
    return loss_sum, parts_sum


def optimizer_step(run: Run) -> torch.Tensor | None:
    """Clip, step, schedule, clamp the CIT temperature; returns the gradient norm (on device)."""
    grad_norm = None
    if run.cfg.grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(run.core.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.core.temp is not None:
        with torch.no_grad():
            run.core.temp.clamp_(losses.TEMP_MIN, losses.TEMP_MAX)
    return grad_norm


# ------------------------------------------------------------------------------ the loop


def train(cfg: TrainConfig, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run (or resume) pretraining; return the run report (report.json; headline: --metrics).

    `on_step(step)` is called after every optimiser step (tests use it to interrupt a run).
    The outputs are checked, and the output folder locked (rank 0), before anything is read.
    """
    check_config(cfg)
    lock = "--out" if int(os.environ.get("RANK", "0")) == 0 else None
    with claim_outputs(cfg.outputs(), lock=lock):
        check_inputs(cfg)
        return _train(cfg, on_step)


def _train(cfg: TrainConfig, on_step: Callable[[int], None] | None) -> dict[str, Any]:
    run = setup(cfg)
    cfg = run.cfg
    step, saved = resume(run) if cfg.resume else (0, {})
    log = TrainLog(cfg, run.rank, run.world, step, saved.get("history"), saved.get("bad"))
    batches = step_batches(run, step, log)
    while step < cfg.steps:
        loss, parts = forward_backward(run, next(batches))
        grad_norm = optimizer_step(run)
        step += 1
        log.step(step, loss, parts, grad_norm, run.scheduler.get_last_lr()[0])
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(run, step, {**log.state(), "fingerprint": run.fingerprint})
        if on_step is not None:
            on_step(step)
    batches.close()
    log.close()
    return finish(run, step, log)


# ------------------------------------------------------------------------------ outputs


def save_checkpoint(run: Run, step: int, state: dict[str, Any]) -> None:
    """Every rank saves its RNG; rank 0 saves the rest and publishes the step atomically."""
    checkpoint.save_rank_rng(run.cfg.state_dir, step, run.rank)
    if run.world > 1:
        dist.barrier()
    if run.is_main:
        checkpoint.save_state(
            run.cfg.state_dir,
            step,
            run.core,
            run.tokenizer,
            run.model_cfg,
            run.optimizer,
            run.scheduler,
            state,
            keep=run.cfg.keep_ckpts,
        )
    if run.world > 1:
        dist.barrier()


def param_checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def headline_metrics(history: list[dict[str, float]], step: int, bad: int) -> dict[str, Any]:
    """What `dvc metrics show` lists: first and last logged loss per component, no timings."""
    first, last = (history[0], history[-1]) if history else ({}, {})
    out: dict[str, Any] = {"steps": step, "bad_samples": bad}
    for k in ("loss", *losses.LOSS_NAMES):
        if k in last:
            out[k] = {"first": first.get(k), "last": last[k]}
    return out


def finish(run: Run, step: int, log: TrainLog) -> dict[str, Any]:
    """Gather checksums and bad samples from every rank; rank 0 writes the model, HF exports,
    the headline metrics, the full report and the loss plot."""
    cfg, elapsed = run.cfg, log.elapsed()
    checksums, bad = [param_checksum(run.core)], log.bad
    if run.world > 1:
        gathered: list[Any] = [None] * run.world
        dist.all_gather_object(gathered, {"checksum": checksums[0], "bad": dict(bad)})
        checksums = [g["checksum"] for g in gathered]
        bad = sum((Counter(g["bad"]) for g in gathered), Counter())
    report = {
        "steps": step,
        "epochs": round(step / run.per_epoch, 4),
        "steps_per_epoch": run.per_epoch,
        "world_size": run.world,
        "batch_size": cfg.batch_size,
        "accum": cfg.accum,
        "samples_seen": step * cfg.batch_size * cfg.accum * run.world,
        "samples_per_s": round(log.samples_per_s(step), 3),
        "wall_s": round(elapsed, 2),
        "data_wait_fraction": round(log.data_wait / elapsed, 4) if elapsed > 0 else 0.0,
        "train": log.history[-1] if log.history else {},
        "first": log.history[0] if log.history else {},
        "history": log.history,
        "bad_samples": int(sum(bad.values())),
        "bad_reasons": dict(bad.most_common(20)),
        "param_checksums": checksums,
        "device": str(run.device),
        "preset": cfg.preset,
        "lambdas": cfg.lambdas,
        "hard_labels": cfg.hard_labels,
        "label_mass": cfg.label_mass,
        "align_on": cfg.align_on,
        "align_pairs": cfg.align_pairs,
        "lr_vision": cfg.lr_vision,
        "compile": cfg.compile,
    }
    metrics = headline_metrics(log.history, step, report["bad_samples"])
    if run.is_main:
        save_pretrained(
            run.core,
            run.tokenizer,
            run.model_cfg,
            cfg.out,
            extra={"train": settings_dict(cfg)},
        )
        if cfg.export_hf:
            export_hf(run.core, Path(cfg.out) / "hf", run.tokenizer)
        for path, content in ((cfg.metrics, metrics), (cfg.report, report)):
            if path:
                write_json_atomic(path, content)
        if cfg.plot:
            plots.pretrain_losses(log.history, cfg.plot)
        print(summary(metrics, report, cfg))
    if run.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return report
