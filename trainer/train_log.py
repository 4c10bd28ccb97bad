"""Pretraining progress: the progress bar, loss history, dvclive curves and bad-sample warnings.

Losses stay on the device between logging steps: the values are read back (one host sync) only
every `log_every` steps, summed over ranks (each rank holds its share of the global mean).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

LOSS_KEYS = ("loss", "itm", "cit", "coe", "cir")


class TsvLive:
    """dvclive's plot layout (plots/metrics/<name>.tsv with step and value) without dvclive."""

    def __init__(self, directory: str, resume: bool = False):
        self.dir, self.step = Path(directory), 0
        if not resume and (self.dir / "plots").exists():
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


class TrainLog:
    """What the loop reports: losses per logging window, speed, bad samples."""

    def __init__(
        self,
        cfg,
        rank: int,
        world: int,
        start_step: int,
        history: list[dict[str, float]] | None = None,
        bad: dict[str, int] | None = None,
    ):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.is_main = rank == 0
        self.history = list(history or [])
        self.bad: Counter[str] = Counter(bad or {})
        self.window: dict[str, list[torch.Tensor]] = {}
        self.start_step = start_step
        self.t_start = time.perf_counter()
        self.data_wait = 0.0
        self._bad_warned_at: float | None = None
        self._bad_at_warning = sum(self.bad.values())
        self.live = None
        if self.is_main and cfg.live_dir:
            self.live = open_live(cfg.live_dir, resume=start_step > 0)
            self.live.log_params({k: v for k, v in vars(cfg).items() if v is not None})
        self.bar = tqdm(
            total=cfg.steps, initial=start_step, disable=not self.is_main, desc="pretrain"
        )

    # -------------------------------------------------------------------------- bad samples

    def bad_samples(self, counts: dict[str, int]) -> None:
        """Count a batch's rejected samples; warn at the first, then at most every
        `bad_warn_every_s` seconds with what came since."""
        if not counts:
            return
        self.bad.update(counts)
        total = sum(self.bad.values())
        now = time.monotonic()
        where = f"rank {self.rank}: " if self.world > 1 else ""
        if self._bad_warned_at is None:
            reason = next(iter(counts))
            self._warn(f"{where}skipped a bad sample ({reason}); the run goes on, all are counted")
        elif now - self._bad_warned_at >= self.cfg.bad_warn_every_s:
            new = total - self._bad_at_warning
            reason, n = self.bad.most_common(1)[0]
            self._warn(
                f"{where}{new} more bad samples ({total} so far); most frequent: {reason} x{n}"
            )
        else:
            return
        self._bad_warned_at, self._bad_at_warning = now, total

    def _warn(self, message: str) -> None:
        tqdm.write(f"warning: {message}")

    # -------------------------------------------------------------------------- losses

    def step(
        self,
        step: int,
        loss: torch.Tensor,
        parts: dict[str, torch.Tensor],
        grad_norm: torch.Tensor | None,
        lr: float,
    ) -> None:
        for k, v in {"loss": loss, **parts}.items():
            self.window.setdefault(k, []).append(v)
        self.bar.update(1)
        if step % self.cfg.log_every and step != self.cfg.steps:
            return
        keys = sorted(self.window)
        means = torch.stack([torch.stack(self.window[k]).float().mean() for k in keys])
        if self.world > 1:
            dist.all_reduce(means)  # shares of the global mean add up
        avg = dict(zip(keys, means.double().tolist(), strict=True))
        self.window = {}
        sps = self.samples_per_s(step)
        self.history.append({"step": step, **avg})
        if self.is_main:
            self.bar.set_postfix(
                {k: f"{avg[k]:.3f}" for k in LOSS_KEYS if k in avg}
                | {"lr": f"{lr:.1e}", "sps": f"{sps:.1f}"}
            )
        if self.live is not None:
            self.live.step = step  # dvclive's x axis is the optimiser step
            for k, v in avg.items():
                self.live.log_metric(f"train/{k}", v)
            self.live.log_metric("train/lr", lr)
            self.live.log_metric("train/samples_per_s", sps)
            if grad_norm is not None:
                self.live.log_metric("train/grad_norm", float(grad_norm))
            self.live.next_step()

    def samples_per_s(self, step: int) -> float:
        samples = (step - self.start_step) * self.cfg.batch_size * self.cfg.accum * self.world
        return samples / max(self.elapsed(), 1e-9)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the log (restored by --resume)."""
        return {"bad": dict(self.bad), "history": self.history}

    def close(self) -> None:
        self.bar.close()
        if self.live is not None:
            self.live.end()


def summary(metrics: dict[str, Any], report: dict[str, Any], cfg) -> str:
    """The closing table: first vs last logged loss per component, bad samples, outputs."""
    lines = [
        f"pretrain done: {report['steps']} steps ({report['epochs']} epochs) in "
        f"{report['wall_s']:.1f}s, {report['samples_per_s']} samples/s on "
        f"{report['world_size']} x {report['device']}",
        "loss     first    last",
    ]
    for k in LOSS_KEYS:
        if k in metrics:
            first, last = metrics[k]["first"], metrics[k]["last"]
            lines.append(f"{k:<8} {first if first is not None else math.nan:7.4f}  {last:7.4f}")
    lines.append(
        f"bad samples: {report['bad_samples']}"
        + (f" {report['bad_reasons']}" if report["bad_samples"] else "")
    )
    lines.append(f"model: {cfg.out} (+ hf/), resume states: {cfg.state_dir}")
    lines.append(f"metrics: {cfg.metrics}, report: {cfg.report}, plot: {cfg.plot or 'off'}")
    return "\n".join(lines)
