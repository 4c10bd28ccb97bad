"""The CLIP teacher's label quality against its adaptation settings, on the synthetic world.

    python benchmarks/teacher_variants.py --work /tmp/abl-0 --name aug --steps 1200 \
        [--flip] [--crop-margin 1.0] [--template-loss each|ensemble] [--threads 1]

Builds (or reuses) the world, its prepared pairs and vocabularies in the work folder exactly as
`benchmarks/synthetic_ablation.py` does (same scale and seed), adapts one teacher on the adapt
split with the given settings (all entity and relation templates), and scores it twice:
- held out: the adapt split's held-out images (10 %), which no objective trained on;
- corpus: every corpus image, crops of the true boxes and whole images (what q_ent / q_rel
  would score with a perfect detector), for each template alone and for their ensemble.
Several variants may run side by side in one work folder (one process each, `--threads 1`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.synthetic_ablation import SCALES, Run, build_inputs  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--name", required=True, help="variant name (its files: models/teacher-NAME)")
    p.add_argument("--world-seed", type=int, default=0)
    p.add_argument("--scale", choices=sorted(SCALES), default="default")
    p.add_argument("--steps", type=int, default=None, help="default: the scale's teacher steps")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--crop-margin", type=float, default=0.0)
    p.add_argument("--template-loss", choices=("each", "ensemble"), default="each")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    from pipeline.prompts import named_templates
    from pipeline.settings import AdaptTeacherSettings, TeacherParams
    from pipeline.teacher import adapt_teacher, score_teacher
    from pmu.runtime import set_threads

    set_threads(args.threads)
    s = SCALES[args.scale]
    run = Run(Path(args.work))
    build_inputs(run, args.world_seed, s)
    params = TeacherParams(
        steps=args.steps or s.teacher_steps,
        batch_size=s.teacher_batch,
        lr=2e-3,
        seed=args.world_seed,
        flip=args.flip,
        crop_margin=args.crop_margin,
        template_loss=args.template_loss,
    )
    out = run.path("models", f"teacher-{args.name}.safetensors")
    ent, rel = named_templates("all", "entity"), named_templates("all", "relation")
    vocab = {
        "entities_path": run.path("vocab", "entities.json"),
        "relations_path": run.path("vocab", "relations.json"),
    }
    t0 = time.perf_counter()
    settings = AdaptTeacherSettings(
        out=str(out),
        pairs=str(run.path("prepared", "adapt", "pairs.parquet")),
        annotations=str(run.path("world", "adapt", "truth.jsonl")),
        entities=str(vocab["entities_path"]),
        relations=str(vocab["relations_path"]),
        preset="small",
        resume=True,
        params=params,
    )
    summary = adapt_teacher(settings, progress=False, threads=args.threads)
    seconds = round(time.perf_counter() - t0, 1)
    corpus = score_teacher(
        out, run.path("world", "corpus", "truth.jsonl"), "small", ent, rel, **vocab
    )
    result = {
        "name": args.name,
        "params": {k: v for k, v in summary["params"].items()},
        "seconds": seconds,
        "held_out": summary["held_out"],
        "corpus": corpus,
        "loss_last": summary["loss_last"],
    }
    path = run.path("teacher-variants", f"{args.name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
