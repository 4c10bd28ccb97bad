"""One writer per output, and outputs checked before any work: real processes (a labeler held
stopped while a second one starts, a labeler killed with SIGKILL and its lock taken over), and
unwritable outputs refused at once by every kind of command."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from labeling_inputs import write_label_stage_inputs

from pmu.errors import InputError
from pmu.outputs import check_writable, lock_path, writer_lock

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture
def label_inputs(tmp_path):
    return write_label_stage_inputs(tmp_path, n=6)


def label_command(paths, out):
    names = ("pairs", "boxes", "prompts", "entities", "relations", "rejected")
    args = [x for n in names for x in (f"--{n}", str(paths[n]))]
    return [sys.executable, "-m", "pipeline", "label-objects", *args, "--out", str(out),
            "--num-workers", "0"]  # fmt: skip


def wait_for_lock(out: Path, pid: int, timeout: float = 120.0) -> None:
    """Until the process `pid` has recorded itself in the lock of `out`."""
    lock, t0 = lock_path(out), time.monotonic()
    while time.monotonic() - t0 < timeout:
        if lock.is_file():
            try:
                if json.loads(lock.read_text() or "{}").get("pid") == pid:
                    return
            except ValueError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"no lock of pid {pid} at {lock}")


def verify(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "verify", str(out)], env=ENV,
                          capture_output=True, text=True)  # fmt: skip


def test_a_second_labeler_on_the_same_out_fails_at_once_naming_the_holder(label_inputs, tmp_path):
    out = tmp_path / "shards"
    first = subprocess.Popen(label_command(label_inputs, out), env=ENV, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for_lock(out, first.pid)
        first.send_signal(signal.SIGSTOP)  # holds the lock, mid-run, for as long as we need
        t0 = time.monotonic()
        second = subprocess.run(label_command(label_inputs, out), env=ENV, capture_output=True,
                                text=True, timeout=120)  # fmt: skip
        first.send_signal(signal.SIGCONT)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert lines[0].startswith("error: ") and len(lines) <= 2, second.stderr
        assert f"being written by another run: pid {first.pid}" in lines[0]
        assert "Traceback" not in second.stderr
        assert time.monotonic() - t0 < 60  # at once: no model loaded, nothing read
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert verify(out).returncode == 0  # the first run's shards, whole
    assert not lock_path(out).exists()  # released at the end


def test_a_killed_labelers_lock_is_taken_over(label_inputs, tmp_path):
    out = tmp_path / "shards"
    first = subprocess.Popen(label_command(label_inputs, out), env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_lock(out, first.pid)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert lock_path(out).is_file()  # left behind by the killed run
    again = subprocess.run(label_command(label_inputs, out), env=ENV, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert f"took over the lock of a run that is gone: pid {first.pid}" in again.stderr
    assert verify(out).returncode == 0
    assert not lock_path(out).exists()


def test_the_lock_in_process_refuses_a_second_holder_and_is_released(tmp_path):
    out = tmp_path / "o"
    with writer_lock(out):
        child = subprocess.run(
            [sys.executable, "-c", "import sys; from pmu.outputs import writer_lock\n"
             f"with writer_lock({str(out)!r}): pass"],
            env=ENV, capture_output=True, text=True,
        )  # fmt: skip
        assert child.returncode != 0 and "being written by another run" in child.stderr
    with writer_lock(out):  # free again
        pass


def test_unwritable_outputs_are_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="is a file, not a folder"):
        check_writable(blocker / "shards")
    if os.path.isdir("/proc/self"):
        with pytest.raises(InputError, match="cannot be written"):
            check_writable("/proc/pmu-test/shards")
    check_writable(tmp_path / "new" / "deep" / "out.json")  # creatable: fine


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "pipeline", "prepare", "--source", "sample", "--out", "{bad}"],
        ["-m", "pipeline", "detect-objects", "--pairs", "{tmp}/none.parquet", "--out",
         "{bad}/boxes.parquet"],
        ["-m", "pipeline", "inspect", "{tmp}", "--out", "{bad}/r.html"],
        ["trainer/run.py", "--shards", "{tmp}", "--out", "{bad}/ckpt"],
        ["trainer/finetune.py", "--task", "mner", "--train", "{tmp}/t.txt", "--dev", "{tmp}/t.txt",
         "--test", "{tmp}/t.txt", "--out", "{bad}/ft"],
    ],
)  # fmt: skip
def test_commands_refuse_an_unwritable_out_in_one_line(tmp_path, command):
    (tmp_path / "a-file").write_text("x")
    bad = str(tmp_path / "a-file" / "sub")
    args = [a.format(bad=bad, tmp=tmp_path) for a in command]
    res = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True,
                         cwd=REPO, timeout=120)  # fmt: skip
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and "not a folder" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and len(lines) <= 2
