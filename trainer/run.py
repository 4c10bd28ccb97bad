"""Pretrain the fusion encoder on labelled shards: ITM + CIT + COE + CIR (the command line).

python trainer/run.py --shards shards/ --steps 50        # defaults: params.yaml `pretrain:`
python trainer/run.py --shards shards/ --steps 500 --resume   # continue runs/pretrain/model
torchrun --nproc_per_node 2 trainer/run.py --shards shards/   # DDP (gloo CPU / nccl GPU)

Settings and their checks are `trainer/pretrain_config.py`; the run itself is
`trainer/pretrain.py` (imported only once the arguments are checked, so `--help` and bad values
answer before torch loads).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo root importable
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
from trainer.pretrain_config import (  # noqa: E402
    PARAMS_GROUP,
    TrainConfig,
    check_config,
    check_inputs,
)
from trainer.settings import (  # noqa: E402
    add_config_flags,
    project_defaults,
    run_main,
    script_parser,
)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """(config, extra flags): code defaults < params.yaml `pretrain:` < flags."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--params")
    known, _ = pre.parse_known_args(argv)
    params, defaults = project_defaults(TrainConfig, PARAMS_GROUP, known.params)
    parser = script_parser(
        "trainer/run.py",
        "Pretrain the fusion encoder on labelled shards (ITM + CIT + COE + CIR).",
        params,
        f"`{PARAMS_GROUP}:`",
    )
    add_config_flags(parser, TrainConfig, defaults)
    args = parser.parse_args(argv)
    values = {**defaults, **config_values(vars(args), TrainConfig)}
    try:
        cfg = TrainConfig(**values)
    except TypeError as e:
        raise InputError(str(e)) from None
    args.params_file = params
    args.params_changes = changed_defaults(TrainConfig, defaults)
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    """`python trainer/run.py ...`: parse, check, train; exit 2 with a message on bad input."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    debug = "--debug" in (sys.argv[1:] if argv is None else argv)

    def body() -> Any:
        configure_process()  # PMU_REPRODUCIBLE=1: pin the CPU kernels before torch computes
        cfg, args = parse_args(argv)
        main_rank = int(os.environ.get("RANK", "0")) == 0
        if main_rank:
            source = describe_source(args.params_file, f"`{PARAMS_GROUP}:`", args.params_changes)
            print(source, flush=True)
            # writable, before anything is read (rank 0 only: the check removes the folders it
            # made, which must not race with another rank creating them)
            check_outputs(cfg.outputs())
        check_config(cfg)
        check_inputs(cfg)  # cheap, and before torch loads
        refuse_dvc_outputs(cfg.outputs(), args.force)
        from trainer.pretrain import train  # locks --out, then checks again

        return train(cfg)

    return run_main(body, debug)


if __name__ == "__main__":
    sys.exit(main())
