"""The main process's cheap paths give the bytes of the paths they replaced: shard tars written
without tarfile, .npy members without np.save, crop batches without concatenating the queue,
device-side batches without stack / cat, one JPEG buffer per batch, forkserver workers."""

import io
import multiprocessing as mp
import tarfile

import numpy as np
import pytest
import torch
from test_label import _folder_bytes, _inputs, _label

from pipeline.clip_inputs import ClipInputSpec, square_tensor
from pipeline.label import _take_rows
from pipeline.labeling_data import batch_jpegs, collate_label_batch
from pipeline.models import load_clip
from pmu import runtime, shards
from pmu.errors import InputError


def _samples(rng: np.random.Generator, n: int) -> list[shards.LabelledSample]:
    out = []
    for i in range(n):
        objects = i % 4
        sample_id = f"pair-{i:04d}" if i % 3 else f"odd id/{i}.with dots" + "x" * (i * 9)
        out.append(
            shards.LabelledSample(
                id=sample_id,
                jpg=rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes(),
                caption=f"caption {i} ünïcode" * (i % 3),
                meta={"source": "t", "itm": i % 2, "boxes": [[0.1, 0.2, 0.3, 0.4]] * objects},
                ent_idx=rng.integers(0, 50, (objects, 5)).astype(np.int32),
                ent_prob=rng.random((objects, 5)).astype(np.float32),
                rel_idx=rng.integers(0, 9, 3).astype(np.int32),
                rel_prob=rng.random(3).astype(np.float32),
            )
        )
    return out


@pytest.mark.parametrize("name_len", [1, 50, 99, 100, 101, 160])
def test_member_headers_are_tarfiles(name_len):
    name = ("k" * name_len)[: name_len - 4] + ".npy" if name_len > 4 else "k" * name_len
    for size in (0, 1, 511, 512, 513, 10**6, 8**11 - 1, 8**11):
        expected = shards._tarinfo(name, size).tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
        assert shards.member_header(name, size) == expected


def test_npy_members_are_np_save_bytes():
    rng = np.random.default_rng(0)
    for shape in [(0, 5), (3, 5), (5,), (1, 1), (0,), (2, 3, 4)]:
        for dtype in (np.int32, np.float32, np.int64):
            a = (rng.random(shape) * 100).astype(dtype)
            for arr in (a, a + 1, np.asfortranarray(a)):  # the cached header is reused
                assert shards._npy_bytes(arr) == shards._npy_bytes_slow(arr)


@pytest.mark.parametrize("n", [0, 1, 7, 40])
def test_direct_shard_writer_equals_tarfile(tmp_path, n):
    samples = _samples(np.random.default_rng(n), n)
    a, b = tmp_path / "direct.tar", tmp_path / "tarfile.tar"
    assert shards.write_shard(a, samples) == shards.write_shard_tarfile(b, samples) == n
    assert a.read_bytes() == b.read_bytes()
    assert len(a.read_bytes()) % tarfile.RECORDSIZE == 0
    raws = list(shards.iter_raw_samples(a))
    assert [r["__key__"] for r in raws] == [s.key for s in samples]


def test_crop_batches_are_the_concatenated_queues():
    """_take_rows gives the fixed batches the old cat-the-queue-then-slice code gave."""
    rng = torch.Generator().manual_seed(0)
    sizes = [3, 0, 7, 1, 12, 2, 5]
    parts = [torch.randint(0, 255, (k, 3, 2, 2), generator=rng, dtype=torch.uint8) for k in sizes]
    everything = torch.cat(parts)
    for batch in (1, 4, 5, 30):
        queue = [p for p in parts if p.shape[0]]
        got, left = [], int(everything.shape[0])
        while left:
            got.append(_take_rows(queue, min(batch, left)))
            left -= got[-1].shape[0]
        expected = list(torch.split(everything, batch))
        assert len(got) == len(expected) and not queue
        assert all(
            torch.equal(g, e) and g.is_contiguous() for g, e in zip(got, expected, strict=True)
        )


@pytest.mark.parametrize("mode", ["letterbox", "center_crop"])
def test_square_tensor_into_a_batch_slot_is_the_same_pixels(mode):
    _, preprocess, _ = load_clip("tiny")
    spec = ClipInputSpec.from_preprocess(preprocess, mode)
    img = torch.randint(0, 256, (3, 70, 113), dtype=torch.uint8)
    batch = torch.zeros((3, 3, spec.size, spec.size), dtype=torch.uint8)
    for k, crop in enumerate((img, img[:, 5:60, 10:40], img[:, :, 50:])):
        square_tensor(crop, spec, out=batch[k])
        assert torch.equal(batch[k], square_tensor(crop, spec))


def test_undecoded_jpegs_travel_as_one_buffer():
    items = [
        {"index": 0, "error": None, "jpeg": b"\xff\xd8abc", "windows": [(0, 0, 1, 1)], "width": 2,
         "height": 2},
        {"index": 1, "error": "image: truncated", "detail": ""},
        {"index": 2, "error": None, "jpeg": b"\xff\xd8" + bytes(range(256)), "windows": [],
         "width": 3, "height": 4},
    ]  # fmt: skip
    batch = collate_label_batch(items)
    assert batch["jpeg"].dtype == torch.uint8 and batch["jpeg"].dim() == 1
    views = batch_jpegs(batch)
    assert [v.numpy().tobytes() for v in views] == [items[0]["jpeg"], items[2]["jpeg"]]
    assert batch["undecoded"] == [0, 1] and batch["n_crops"] == [1, 0]
    assert collate_label_batch(items[1:2])["jpeg"] is None


def test_workers_start_from_a_forkserver_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv(runtime.WORKER_START_VAR, raising=False)
    assert runtime.worker_context(0) is None
    if "forkserver" in mp.get_all_start_methods():
        assert runtime.worker_context(2).get_start_method() == "forkserver"
    monkeypatch.setenv(runtime.WORKER_START_VAR, "fork")
    assert runtime.worker_context(2).get_start_method() == "fork"
    monkeypatch.setenv(runtime.WORKER_START_VAR, "teleport")
    with pytest.raises(InputError, match="start method"):
        runtime.worker_context(2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return _inputs(tmp_path_factory.mktemp("host"), n=10, broken=(5,))


@pytest.mark.parametrize("decode", ["device", "workers"])
def test_worker_start_and_counts_do_not_change_the_bytes(inputs, tmp_path, monkeypatch, decode):
    """In-process, forkserver workers and forked workers give the same shard folder, and a run
    stopped after one shard resumes to it (both decode places)."""
    params = {"decode": decode}
    _label(inputs, tmp_path / "w0", params=params)
    _label(inputs, tmp_path / "forkserver", params={**params, "num_workers": 2})
    monkeypatch.setenv(runtime.WORKER_START_VAR, "fork")
    _label(inputs, tmp_path / "fork", params={**params, "num_workers": 2})
    _label(inputs, tmp_path / "resumed", params={**params, "num_workers": 2}, stop_after_shards=1)
    monkeypatch.delenv(runtime.WORKER_START_VAR)
    resumed = _label(inputs, tmp_path / "resumed", params={**params, "num_workers": 2})
    assert resumed["timing"]["shards_resumed"] == 1
    reference = _folder_bytes(tmp_path / "w0")
    for run in ("forkserver", "fork", "resumed"):
        assert _folder_bytes(tmp_path / run) == reference, run
    tar = tmp_path / "w0" / "shard-000000.tar"
    raws = list(shards.iter_raw_samples(tar))
    assert len(raws) == 4 and all(len(r) == 8 for r in raws)  # 7 members + __key__
    assert io.BytesIO(raws[0]["jpg"]).read(2) == b"\xff\xd8"


_FAULTS_OF_REPEATED_BATCHES = """
import ctypes, resource
from pmu import runtime
applied = runtime.keep_freed_memory()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
def batch():  # one 64 MiB batch tensor: allocated, filled, freed
    block = libc.malloc(1 << 26)
    ctypes.memset(block, 1, 1 << 26)
    libc.free(block)
batch()  # the first batch maps its pages either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    batch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(monkeypatch, choice: str) -> tuple[str, int]:
    import subprocess
    import sys

    monkeypatch.setenv(runtime.MALLOC_VAR, choice)
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS_OF_REPEATED_BATCHES],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return out[0], int(out[1])


def test_freed_batches_reuse_their_pages(monkeypatch):
    """With glibc's defaults every 64 MiB block is mapped and zero-faulted afresh; kept, the
    next block reuses the pages (the kernel time that dominated the host side)."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the allocator setting applies to glibc only")
    applied, kept = _faults(monkeypatch, "reuse")
    opted_out, system = _faults(monkeypatch, "system")
    by_default, _ = _faults(monkeypatch, "")  # unset: reuse
    assert (applied, opted_out, by_default) == ("True", "False", "True")
    assert system >= 5 * 32  # at least one fault per 2 MiB page (transparent huge pages)
    assert kept < system // 10
    monkeypatch.setenv(runtime.MALLOC_VAR, "jemalloc")
    with pytest.raises(InputError, match="PMU_MALLOC"):
        runtime.keep_freed_memory()


_LABEL_IN_A_FRESH_PROCESS = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from test_label import _label
paths = {k: Path(v) for k, v in json.loads(sys.argv[2]).items()}
_label(paths, Path(sys.argv[3]), params={"decode": sys.argv[4]})
"""


@pytest.mark.parametrize("decode", ["device", "workers"])
def test_the_allocator_setting_does_not_change_the_bytes(inputs, tmp_path, monkeypatch, decode):
    """A process that reuses freed memory writes the shards one on glibc's defaults writes
    (each in a fresh process: the setting is per process and the default is reuse)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    paths = json.dumps({k: str(v) for k, v in inputs.items() if isinstance(v, Path)})
    tests = Path(__file__).parent
    monkeypatch.setenv("PYTHONPATH", str(tests.parent))
    script = [sys.executable, "-c", _LABEL_IN_A_FRESH_PROCESS]
    for choice in ("system", "reuse"):
        monkeypatch.setenv(runtime.MALLOC_VAR, choice)
        subprocess.run(
            [*script, str(tests), paths, str(tmp_path / choice), decode],
            check=True, capture_output=True,
        )  # fmt: skip
    assert _folder_bytes(tmp_path / "system") == _folder_bytes(tmp_path / "reuse")
