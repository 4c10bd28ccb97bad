"""benchmarks/task_graph.py: dependencies are respected in one process and in worker processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.task_graph import Task, run_tasks


def write(path: str, text: str) -> str:
    Path(path).write_text(text)
    return text


def read_after(path: str, suffix: str) -> str:
    return Path(path).read_text() + suffix  # FileNotFoundError if run before its dependency


def copy_and_append(src: str, dst: str) -> str:
    return write(dst, Path(src).read_text() + "b")


def fail() -> None:
    raise RuntimeError("this task fails")


def graph(tmp_path: Path) -> dict[str, Task]:
    a, b = str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    return {  # listed dependents first: the order must come from `after`, not from the listing
        "c": Task(read_after, (b, "c"), ("b",)),
        "b": Task(copy_and_append, (a, b), ("a",)),
        "a": Task(write, (a, "a")),
        "d": Task(write, (str(tmp_path / "d.txt"), "d")),
    }


ALL_CORES = len(os.sched_getaffinity(0))  # jobs 1 pins this process: keep it on every core


@pytest.mark.parametrize("jobs", [1, 2])
def test_tasks_run_after_their_dependencies(tmp_path: Path, jobs: int) -> None:
    done = run_tasks(graph(tmp_path), jobs=jobs, threads=ALL_CORES if jobs == 1 else 1)
    assert done == {"a": "a", "b": "ab", "c": "abc", "d": "d"}


def cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@pytest.mark.skipif(ALL_CORES < 2, reason="needs 2 cores to confine a job to one")
def test_each_worker_is_confined_to_its_share_of_the_cores() -> None:
    mine = set(cores())
    done = run_tasks({f"t{i}": Task(cores, ()) for i in range(4)}, jobs=2, threads=1)
    for name, got in done.items():
        assert len(got) == 1 and set(got) <= mine, (name, got)
    assert set(cores()) == mine  # the parent keeps its cores


def test_a_failed_task_fails_the_run(tmp_path: Path) -> None:
    tasks = {"ok": Task(write, (str(tmp_path / "ok.txt"), "ok")), "bad": Task(fail, ())}
    with pytest.raises(RuntimeError, match="this task fails"):
        run_tasks(tasks, jobs=2, threads=1)


def test_missing_or_circular_dependencies_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="do not exist: \\['nope'\\]"):
        run_tasks({"a": Task(fail, (), ("nope",))}, jobs=1, threads=ALL_CORES)
    loop = {"a": Task(fail, (), ("b",)), "b": Task(fail, (), ("a",))}
    for jobs in (1, 2):
        with pytest.raises(ValueError, match="wait on each other"):
            run_tasks(loop, jobs=jobs, threads=ALL_CORES if jobs == 1 else 1)
    assert len(cores()) == ALL_CORES
