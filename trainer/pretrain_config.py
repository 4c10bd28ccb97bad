"""Pretraining's settings (`TrainConfig`, one field per flag and params.yaml key) and the
checks of their values and of the shard folder, before anything heavy is imported.

Light on purpose (stdlib + the settings helpers): `python trainer/run.py --help`, bad values and
a missing shard folder answer in about a second, before torch is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pmu.errors import InputError
from pmu.settings import (
    opt,
)

LOSSES = ("itm", "cit", "coe", "cir")  # trainer.losses.LOSS_NAMES (kept light here)
LABEL_MASS_MODES = ("spread", "renormalise")  # trainer.losses.LABEL_MASS_MODES
ALIGN_ON = ("fused", "vision")  # trainer.model.ALIGN_ON
ALIGN_PAIRS = ("all", "matched")  # trainer.losses.ALIGN_PAIRS
PARAMS_GROUP = "pretrain"


@dataclass
class TrainConfig:
    # data and outputs (defaults under runs/: a manual run never touches DVC-tracked outputs)
    shards: str = opt("shards", "shard folder written by `pipeline label-objects`")
    out: str = opt("runs/pretrain/model", "final model folder; resume states go to OUT_state/")
    metrics: str = opt("runs/pretrain/metrics.json", "headline metrics JSON (loss first/last)")
    report: str = opt("runs/pretrain/report.json", "full run report JSON (speed, bad samples)")
    live_dir: str = opt("runs/pretrain/dvclive", "dvclive logs and TSV plots ('' = off)")
    plot: str = opt("runs/pretrain/loss.png", "loss curves as a PNG ('' = off)")
    # model
    fusion: str = opt(
        "albef",
        "fusion model (trainer/fusion.py): albef (the paper's split BERT) | hvp (HVPNeT-style "
        "visual prefix) | package.module:name (your own: docs/trainer.md)",
        omit_default=True,
    )
    preset: str = opt("tiny", "model preset: tiny (random, offline) | base (pretrained)")
    text_encoder: str | None = opt(None, "local HF folder / hub name for the BERT")
    vision_encoder: str | None = opt(None, "local HF folder / hub name for the ViT")
    random_init: bool = opt(False, "the preset's shapes with random weights (no download)")
    n_fusion_layers: int | None = opt(None, "upper BERT layers that fuse text + image", "half")
    proj_dim: int = opt(256, "CIT projection size")
    # losses (lambda = 0 removes the loss and its head)
    lambda_itm: float = opt(1.0, "weight of ITM (0 = off, no head)")
    lambda_cit: float = opt(1.0, "weight of CIT (0 = off, no projections)")
    lambda_coe: float = opt(1.0, "weight of COE (0 = off, no fc_ent)")
    lambda_cir: float = opt(1.0, "weight of CIR (0 = off, no fc_rel)")
    hard_labels: bool = opt(False, "one-hot argmax instead of the soft q_ent / q_rel")
    label_mass: str = opt("spread", "top-k labels -> full q: spread the leftover | renormalise")
    min_cover: float = opt(0.5, "COE: fraction of a patch a box must cover to pool it")
    align_on: str = opt(
        "fused", "COE / CIR read: fused states (paper) | vision (ViT states, before fusion)"
    )
    align_pairs: str = opt(
        "all", "pairs COE / CIR average over: all (eqs. 8, 10) | matched (captions that fit)"
    )
    # optimisation (paper: AdamW, lr 1e-4, weight decay 1e-3)
    steps: int = opt(1000, "optimiser steps")
    batch_size: int | None = opt(None, "samples per rank and micro-batch", "CUDA 128 | CPU 8")
    accum: int = opt(1, "micro-batches per optimiser step (gradient accumulation)")
    lr: float = opt(1e-4, "AdamW learning rate (peak)")
    lr_vision: float | None = opt(
        None, "peak lr of the ViT and its projections (a ViT trained from scratch)", "--lr"
    )
    weight_decay: float = opt(1e-3, "AdamW weight decay, weight matrices only")
    warmup_steps: int = opt(100, "linear warmup steps, then linear decay to 0")
    grad_clip: float = opt(1.0, "gradient norm clipping (0 = off)")
    seed: int = opt(0, "seed of init, data order and dropout")
    # data loading
    max_len: int = opt(80, "caption tokens incl. [CLS]/[SEP] (the paper's 80)")
    num_workers: int | None = opt(None, "DataLoader workers per rank", "cores per rank - 1, <= 16")
    shuffle_buffer: int = opt(1000, "sample shuffle buffer per worker")
    # runtime
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    amp: bool = opt(True, "bf16 autocast on CUDA (no-op on CPU)")
    compile: bool = opt(False, "torch.compile the model (first step compiles: minutes)")
    compile_backend: str = opt("inductor", "torch.compile backend (inductor | aot_eager | ...)")
    threads: int = opt(0, "CPU threads per process (0 = cores / processes)")
    ckpt_every: int = opt(500, "resumable state every N steps")
    keep_ckpts: int = opt(2, "resumable states kept")
    resume: bool = opt(False, "continue from the latest state in OUT_state/")
    log_every: int = opt(10, "log losses every N steps (the only host syncs)")
    bad_warn_every_s: float = opt(60.0, "after the first bad sample, warn at most this often")
    export_hf: bool = opt(True, "also write HF folders to OUT/hf/")

    @property
    def lambdas(self) -> dict[str, float]:
        return {k: float(getattr(self, f"lambda_{k}")) for k in LOSSES}

    @property
    def state_dir(self) -> Path:
        out = Path(self.out)
        return out.with_name(out.name + "_state")

    def outputs(self) -> dict[str, str]:
        """flag -> path of everything this run writes."""
        return {
            "--out": self.out,
            "--out (resume states)": str(self.state_dir),
            "--metrics": self.metrics,
            "--report": self.report,
            "--live-dir": self.live_dir,
            "--plot": self.plot,
        }


# ------------------------------------------------------------------------------ checks


def check_config(cfg: TrainConfig) -> None:
    """Values that cannot work: one InputError naming the flag."""
    from pmu.presets import PRESETS

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise InputError(message)

    need(cfg.preset in PRESETS, f"--preset {cfg.preset!r}: choose one of {sorted(PRESETS)}")
    need(
        cfg.label_mass in LABEL_MASS_MODES,
        f"--label-mass {cfg.label_mass!r}: choose one of {list(LABEL_MASS_MODES)}",
    )
    for k, v in cfg.lambdas.items():
        need(v >= 0, f"--lambda-{k} {v}: loss weights must be >= 0 (0 switches a loss off)")
    need(any(v > 0 for v in cfg.lambdas.values()), "every loss weight is 0: nothing to train")
    need(cfg.steps >= 1, f"--steps {cfg.steps}: must be >= 1")
    need(cfg.batch_size is None or cfg.batch_size >= 1, "--batch-size must be >= 1")
    need(cfg.accum >= 1, f"--accum {cfg.accum}: must be >= 1")
    need(cfg.lr > 0, f"--lr {cfg.lr}: must be > 0")
    need(cfg.lr_vision is None or cfg.lr_vision > 0, f"--lr-vision {cfg.lr_vision}: must be > 0")
    need(cfg.align_on in ALIGN_ON, f"--align-on {cfg.align_on!r}: choose one of {list(ALIGN_ON)}")
    need(
        cfg.align_pairs in ALIGN_PAIRS,
        f"--align-pairs {cfg.align_pairs!r}: choose one of {list(ALIGN_PAIRS)}",
    )
    need(cfg.weight_decay >= 0, "--weight-decay must be >= 0")
    need(cfg.warmup_steps >= 0, "--warmup-steps must be >= 0")
    need(cfg.grad_clip >= 0, "--grad-clip must be >= 0 (0 = off)")
    need(2 <= cfg.max_len <= 512, f"--max-len {cfg.max_len}: must be in [2, 512]")
    need(0 < cfg.min_cover <= 1, f"--min-cover {cfg.min_cover}: must be in (0, 1]")
    need(cfg.proj_dim >= 1 or cfg.lambda_cit == 0, "--proj-dim must be >= 1 with CIT on")
    need(cfg.num_workers is None or cfg.num_workers >= 0, "--num-workers must be >= 0")
    need(cfg.shuffle_buffer >= 0, "--shuffle-buffer must be >= 0")
    need(cfg.threads >= 0, "--threads must be >= 0 (0 = auto)")
    need(cfg.log_every >= 1 and cfg.ckpt_every >= 1, "--log-every / --ckpt-every must be >= 1")
    need(cfg.keep_ckpts >= 1, "--keep-ckpts must be >= 1")
    need(
        bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device)),
        f"--device {cfg.device!r}: use auto, cpu, cuda or cuda:N",
    )
    need(bool(cfg.out), "--out must name a folder")


def check_inputs(cfg: TrainConfig) -> int:
    """The shard folder is complete (sizes.json, listed shards, vocabularies); returns the
    number of samples. Each problem is a InputError saying what to run."""
    folder = Path(cfg.shards)
    how = "label the pairs first: `pipeline label-objects --out DIR` (or `dvc repro`)"
    if not folder.is_dir():
        raise InputError(f"--shards {cfg.shards}: no such folder; {how}")
    sizes_file = folder / "sizes.json"
    if not sizes_file.is_file():
        raise InputError(f"no shards here: {folder} has no sizes.json; {how}")
    from pmu.shards import read_sizes  # numpy, not torch: still before torch loads

    sizes = read_sizes(folder)  # whole counts, else an InputError naming the entry
    n_samples = sum(sizes.values())
    if n_samples == 0:
        raise InputError(f"no samples: {sizes_file} lists {len(sizes)} shards with 0 samples")
    missing = sorted(name for name in sizes if not (folder / name).is_file())
    if missing:
        raise InputError(
            f"{folder}: {len(missing)} shard(s) listed in sizes.json are missing "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); re-run label-objects"
        )
    for name, key in (("entities.json", "entities"), ("relations.json", "relations")):
        path = folder / name
        try:
            vocab = json.loads(path.read_text(encoding="utf-8"))[key]
            if not isinstance(vocab, list):
                raise TypeError(f"`{key}` is not a list")
        except FileNotFoundError:
            raise InputError(f"{path} missing: the shard folder is incomplete; {how}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path} is not a vocabulary file ({e}); {how}") from None
    return n_samples
