"""Test setup: never touch the network, keep torch to the machine's cores, shared fixtures."""

import os
from pathlib import Path

for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "YOLO_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Reproducible mode (DVC stages run in it; PMU_REPRODUCIBLE=1 runs the whole suite in it) keeps
# to the cores the suite was given.
os.environ.setdefault("PMU_THREADS", str(len(os.sched_getaffinity(0))))

import pytest  # noqa: E402

from pmu.runtime import configure_process  # noqa: E402

configure_process()  # before any test imports torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PMU_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def synthetic_shards(tmp_path):
    """A small contract-true shard folder (16 samples in 2 shards)."""
    from pipeline.random_shards import write_random_shards

    return write_random_shards(tmp_path / "shards")
