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
from pmu.runtime import configure_process  # noqa: E402
from pmu.settings import (  # noqa: E402
    check_types,
    config_values,
    describe_source,
    find_params,
    load_group,
    refuse_dvc_outputs,
    relative_to_cwd,
)
from trainer.finetune_config import (  # noqa: E402
    PARAMS_GROUP,
    PATH_FIELDS,
    SOURCE,
    TASKS,
    FinetuneConfig,
    check_config,
)
from trainer.settings import add_config_flags, run_main  # noqa: E402


def parse_args(argv: list[str] | None = None) -> tuple[FinetuneConfig, list[int] | None, Any]:
    """(config, seeds, extra flags): code defaults < params.yaml < flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--params")
    pre.add_argument("--task", choices=TASKS)
    known, _ = pre.parse_known_args(argv)
    params = find_params(known.params)
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    defaults: dict[str, Any] = {}
    if params is not None:
        defaults = load_group(params, PARAMS_GROUP, names, subgroup=known.task)
        defaults = check_types(FinetuneConfig, defaults, f"{params} `{PARAMS_GROUP}:`")
        for name in PATH_FIELDS:
            if name in defaults:
                defaults[name] = relative_to_cwd(defaults[name], params.parent)

    parser = argparse.ArgumentParser(
        prog="trainer/finetune.py",
        description="Fine-tune and evaluate MNER (CRF) or MRE (entity markers) on the fusion "
        "encoder: best dev epoch, evaluated on test.",
        epilog=describe_source(params, SOURCE),
    )
    parser.add_argument(
        "--params",
        metavar="FILE",
        help=f"YAML whose `{PARAMS_GROUP}:` group (and its `mner:` / `mre:` subgroup) sets the "
        f"defaults; `none` for the code defaults (found: {params or 'none'})",
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
    parser.add_argument(
        "--force", action="store_true", help="allow writing DVC-tracked outputs outside dvc repro"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors too")
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
        print(describe_source(args.params_file, SOURCE), flush=True)
        check_config(cfg)
        cfg = dataclasses.replace(cfg, out=str(cfg.output_paths()["out"]))
        paths = cfg.output_paths()
        refuse_dvc_outputs({f"--{k}": str(v) for k, v in paths.items() if v}, args.force)
        from trainer.finetune_loop import run_finetune, run_seeds

        return run_seeds(cfg, seeds) if seeds else run_finetune(cfg)

    from pipeline.models import WeightsUnavailable
    from trainer.ie_data import DataFormatError

    # bad data files, refused resumes and unavailable weights are the user's to fix
    return run_main(
        body,
        debug,
        (DataFormatError, FileNotFoundError, ValueError, WeightsUnavailable, InputError),
    )


if __name__ == "__main__":
    sys.exit(main())
