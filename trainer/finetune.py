"""Fine-tune and evaluate MNER (CRF tagger) or MRE (entity markers) on the fusion encoder.

    python trainer/finetune.py --task mner     # in the project: params.yaml's sample data
    python trainer/finetune.py --task mner --train T --dev D --test E [--images DIR]
        [--init checkpoints/pretrain | tiny | base | HF_MODEL_DIR] [--out DIR]

The command line: flags, params.yaml defaults and input checks answer before torch is imported;
the run is `trainer/finetune_loop.py`, the settings `trainer/finetune_config.py`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python trainer/finetune.py`: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pmu.errors import InputError  # noqa: E402
from pmu.outputs import check_outputs  # noqa: E402
from pmu.runtime import configure_process  # noqa: E402
from pmu.settings import (  # noqa: E402
    changed_defaults,
    config_values,
    describe_source,
    refuse_dvc_outputs,
)
from trainer.finetune_config import (  # noqa: E402
    PARAMS_GROUP,
    PATH_FIELDS,
    SOURCE,
    TASKS,
    FinetuneConfig,
    check_config,
)
from trainer.settings import (  # noqa: E402
    add_config_flags,
    project_defaults,
    run_main,
    script_parser,
)


def parse_args(argv: list[str] | None = None) -> tuple[FinetuneConfig, list[int] | None, Any]:
    """(config, seeds, extra flags): code defaults < params.yaml < flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--params")
    pre.add_argument("--task", choices=TASKS)
    known, _ = pre.parse_known_args(argv)
    params, defaults = project_defaults(
        FinetuneConfig, PARAMS_GROUP, known.params, known.task, PATH_FIELDS
    )
    parser = script_parser(
        "trainer/finetune.py",
        "Fine-tune and evaluate MNER (CRF) or MRE (entity markers) on the fusion encoder: best "
        "dev epoch, evaluated on test.",
        params,
        SOURCE,
    )
    parser.add_argument("--task", choices=TASKS, help="mner | mre (required)")
    add_config_flags(parser, FinetuneConfig, defaults, skip=("task",))
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="N",
        help="run once per seed (OUT/seed-N/) and report each run plus mean +- std",
    )
    args = parser.parse_args(argv)
    if args.task is None:
        raise InputError("--task is required: mner or mre")
    values = {**defaults, **config_values(vars(args), FinetuneConfig)}
    missing = [f"--{n}" for n in ("train", "dev", "test") if not values.get(n)]
    if missing:
        raise InputError(
            f"{', '.join(missing)} required (no params.yaml with `{PARAMS_GROUP}: "
            f"{args.task}:` paths here or above)"
        )
    for name in (
        "images", "images_train", "images_dev", "images_test", "rel2id", "vision_encoder",
        "metrics", "predictions", "report",
    ):  # fmt: skip
        values[name] = values.get(name) or None  # "" (e.g. from params.yaml) means unset
    cfg = FinetuneConfig(**values)
    args.params_file = params
    args.params_changes = changed_defaults(FinetuneConfig, defaults)
    return cfg, args.seeds, args


def main(argv: list[str] | None = None) -> int:
    """`python trainer/finetune.py ...`: parse, check, run; exit 2 with a message on bad input."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # offline-first: no hub retries
        os.environ.setdefault(var, "1")
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)

    def body() -> Any:
        configure_process()  # PMU_REPRODUCIBLE=1: pin the CPU kernels before torch computes
        cfg, seeds, args = parse_args(argv)
        source = SOURCE.replace("TASK", cfg.task)
        print(describe_source(args.params_file, source, args.params_changes), flush=True)
        cfg = dataclasses.replace(cfg, out=str(cfg.output_paths()["out"]))
        outputs = {f"--{k}": str(v) for k, v in cfg.output_paths().items() if v}
        check_outputs(outputs)  # writable, before anything is read
        check_config(cfg)
        refuse_dvc_outputs(outputs, args.force)
        from trainer.finetune_loop import run_finetune, run_seeds

        return run_seeds(cfg, seeds) if seeds else run_finetune(cfg)

    return run_main(body, debug)


if __name__ == "__main__":
    sys.exit(main())
