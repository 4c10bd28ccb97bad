"""Run a benchmark's steps after their dependencies, in this process or in N worker processes.

The steps cache their own results (the benchmark's work folder), so a failed run resumes where
it stopped; this module only orders and places them.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Task:
    """One step of the benchmark: fn(*args), once the tasks named in `after` are done."""

    fn: Callable[..., Any]
    args: tuple
    after: tuple[str, ...] = field(default_factory=tuple)


def pin_cores(slot: int, threads: int) -> None:
    """Keep this process on `threads` of its cores, the slot-th group of them (wrapping round).

    The stages size their thread pools from the cores a process may use, so this is what makes
    N jobs share the machine instead of each taking all of it. No-op where affinity is not
    available (macOS) or when every core is asked for."""
    if not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if threads >= len(cores):
        return
    os.sched_setaffinity(0, {cores[(slot * threads + i) % len(cores)] for i in range(threads)})


def _init_worker(next_slot: Any, threads: int) -> None:
    with next_slot.get_lock():
        slot = next_slot.value
        next_slot.value += 1
    pin_cores(slot, threads)


def _call(
    fn: Callable[..., Any], args: tuple, threads: int, start_method: str | None = None
) -> Any:
    from pmu.runtime import set_threads

    if start_method:  # a spawned worker: its DataLoaders start workers as the parent's would
        multiprocessing.set_start_method(start_method, force=True)
    set_threads(threads)
    return fn(*args)


def run_tasks(tasks: dict[str, Task], jobs: int, threads: int) -> dict[str, Any]:
    """Run every task after its dependencies; return name -> result.

    jobs 1: in this process, in order. jobs N: N worker processes, each pinned to `threads`
    cores of its own (pin_cores); a free worker takes the first ready task in `tasks`' order
    (so put the critical path, the teacher, first). A failed task stops the run; its finished
    steps stay cached."""
    unknown = {d for t in tasks.values() for d in t.after} - set(tasks)
    if unknown:
        raise ValueError(f"tasks wait on tasks that do not exist: {sorted(unknown)}")
    done: dict[str, Any] = {}
    pending = dict(tasks)

    def ready() -> list[str]:
        return [n for n, t in pending.items() if all(d in done for d in t.after)]

    if jobs <= 1:
        pin_cores(0, threads)
        while pending:
            if not ready():
                raise ValueError(f"tasks wait on each other: {sorted(pending)}")
            name = ready()[0]
            task = pending.pop(name)
            done[name] = _call(task.fn, task.args, threads)
        return done
    start_method = multiprocessing.get_start_method()
    ctx = multiprocessing.get_context("spawn")  # workers start clean (no forked torch threads)
    slots = ctx.Value("i", 0)
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=ctx, initializer=_init_worker, initargs=(slots, threads)
    ) as pool:
        running: dict[Any, str] = {}
        while pending or running:
            for name in ready()[: jobs - len(running)]:
                task = pending.pop(name)
                running[pool.submit(_call, task.fn, task.args, threads, start_method)] = name
            if not running:
                raise ValueError(f"tasks wait on each other: {sorted(pending)}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                try:
                    done[name] = future.result()
                except BaseException:
                    print(
                        f"{name} failed: waiting for {sorted(running.values())} to end (finished "
                        "steps stay cached: rerun to resume)",
                        file=sys.stderr,
                        flush=True,
                    )
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    return done
