"""Shard streaming for pretraining: batches, determinism, node/worker splits, bad samples."""

import io
import itertools
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from pmu import shards
from pmu.io import write_json_atomic
from trainer import data
from trainer.factory import build_tokenizer
from trainer.model import ModelConfig


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig())


def config(shard_dir, **kw):
    kw = {"batch_size": 4, "n_entities": 20, "n_relations": 10, **kw}
    return data.DataConfig(shard_dir=str(shard_dir), **kw)


def epoch_ids(cfg, tok, epoch=0, n_batches=None):
    n = n_batches or data.steps_per_epoch(data.total_samples(cfg.shard_dir), 1, cfg.batch_size)
    return [b["ids"] for b in itertools.islice(data.make_loader(cfg, tok, epoch), n)]


def test_batch_contents(synthetic_shards, tok):
    cfg = config(synthetic_shards, shuffle_buffer=0)
    batch = next(iter(data.make_loader(cfg, tok)))
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"][:, 0].eq(tok.cls_token_id).all()
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    # raw resized RGB; the model normalises on its device with its encoder's mean / std
    assert batch["pixel_values"].dtype == torch.uint8 and int(batch["pixel_values"].max()) > 0
    raw = [
        shards.decode_sample(r)
        for path in shards.shard_paths(synthetic_shards)
        for r in shards.iter_raw_samples(path)
    ]
    by_id = {s["meta"]["id"]: s for s in raw}
    n_obj = batch["box_mask"].shape[1]
    assert n_obj >= 1
    for i, sid in enumerate(batch["ids"]):
        s = by_id[sid]
        k = len(s["meta"]["boxes"])
        assert batch["box_mask"][i].tolist() == [True] * k + [False] * (n_obj - k)
        assert batch["itm"][i] == s["meta"]["itm"]
        if k:
            assert np.allclose(batch["boxes"][i, :k].numpy(), s["meta"]["boxes"])
            assert np.array_equal(batch["ent_idx"][i, :k].numpy(), s["ent_idx"])
            assert np.allclose(batch["ent_prob"][i, :k].numpy(), s["ent_prob"])
        assert batch["ent_prob"][i, k:].eq(0).all()
        assert np.array_equal(batch["rel_idx"][i].numpy(), s["rel_idx"])
    assert batch["bad"] == {}


def test_epoch_order_is_seeded_and_covers_the_data(synthetic_shards, tok):
    cfg = config(synthetic_shards, shuffle_buffer=8)
    a, b = epoch_ids(cfg, tok, 0), epoch_ids(cfg, tok, 0)
    assert a == b
    assert sorted(itertools.chain(*a)) == [f"synthetic-{i:05d}" for i in range(16)]
    assert epoch_ids(cfg, tok, 1) != a  # shards and samples reshuffled per epoch
    other_seed = config(synthetic_shards, shuffle_buffer=8, seed=1)
    assert epoch_ids(other_seed, tok, 0) != a


def test_split_by_worker(synthetic_shards, tok):
    cfg = config(synthetic_shards, num_workers=2, shuffle_buffer=8)
    ids = epoch_ids(cfg, tok)
    assert sorted(itertools.chain(*ids)) == [f"synthetic-{i:05d}" for i in range(16)]
    assert ids == epoch_ids(cfg, tok)  # deterministic with workers too
    # each worker reads its own shard (8 samples each): batches alternate between them
    shard_of = [{int(s.split("-")[1]) // 8 for s in b} for b in ids]
    assert all(len(s) == 1 for s in shard_of) and shard_of[0] != shard_of[1]


def test_split_by_node_gives_ranks_disjoint_shards_and_equal_lengths(
    synthetic_shards, tok, monkeypatch
):
    cfg = config(synthetic_shards, shuffle_buffer=8)
    per_rank = data.steps_per_epoch(16, 2, 4)
    assert per_rank == 2
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(list(itertools.chain(*epoch_ids(cfg, tok, n_batches=per_rank))))
    assert len(seen[0]) == len(seen[1]) == 8
    assert not set(seen[0]) & set(seen[1])
    # fewer shards than ranks: the endless shard stream still feeds every rank
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert len(epoch_ids(cfg, tok, n_batches=3)) == 3


def test_steps_per_epoch():
    assert data.steps_per_epoch(100, 1, 32) == 3
    assert data.steps_per_epoch(100, 2, 16) == 3
    with pytest.raises(ValueError, match="lower the batch size"):
        data.steps_per_epoch(10, 2, 8)


def _sample(i, **over):
    meta = {
        "source": "t",
        "itm": 1,
        "width": 32,
        "height": 32,
        "boxes": [[0, 0, 0.5, 0.5]],
        "box_classes": ["x"],
        "box_confs": [0.5],
    }
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (32, 32), (i * 10 % 255, 0, 0)).save(buf, format="JPEG")
    fields = dict(
        id=f"s{i}",
        jpg=buf.getvalue(),
        caption=f"caption {i}",
        meta=meta,
        ent_idx=np.array([[1, 2]], np.int32),
        ent_prob=np.array([[0.5, 0.2]], np.float32),
        rel_idx=np.array([0, 1], np.int32),
        rel_prob=np.array([0.6, 0.3], np.float32),
    )
    fields.update(over)
    return shards.LabelledSample(**fields)


def _write_folder(tmp_path, samples, extra_members=()):
    folder = tmp_path / "bad_shards"
    folder.mkdir()
    shards.write_shard(folder / "shard-000000.tar", samples)
    if extra_members:  # append raw members (e.g. a pickle) the pipeline writer would never write
        with tarfile.open(folder / "shard-000000.tar", "a") as tar:
            for name, payload in extra_members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    write_json_atomic(folder / "sizes.json", {"shard-000000.tar": len(samples)})
    return folder


def test_bad_samples_are_counted_with_reasons_not_fatal(tmp_path, tok):
    good = [_sample(i) for i in range(6)]
    bad = [
        _sample(10, jpg=b"not a jpeg"),
        _sample(11, ent_idx=np.zeros((2, 2), np.int32), ent_prob=np.zeros((2, 2), np.float32)),
        _sample(
            12,
            meta={"itm": 7, "boxes": []},
            ent_idx=np.zeros((0, 2), np.int32),
            ent_prob=np.zeros((0, 2), np.float32),
        ),
        _sample(13, rel_idx=np.array([0, 99], np.int32)),
    ]
    folder = _write_folder(tmp_path, good[:3] + bad + good[3:], [("evil.pkl", b"\x80\x04N.")])
    cfg = config(folder, batch_size=3, shuffle_buffer=0)
    batches = list(itertools.islice(data.make_loader(cfg, tok), 4))
    ids = [i for b in batches for i in b["ids"]]
    assert not any(i in ids for i in ("s10", "s11", "s12", "s13"))
    reasons = sum((Counter(b["bad"]) for b in batches), Counter())
    text = " | ".join(reasons)
    assert sum(reasons.values()) >= 5  # 4 bad samples + the pickle member, per pass
    for needle in (
        "cannot identify image",
        "entity labels",
        "itm must be 0 or 1",
        "relation index out of range",
        "unexpected members",
    ):
        assert needle in text, (needle, text)


def test_only_bad_samples_stop_with_a_clear_error(tmp_path, tok):
    folder = _write_folder(tmp_path, [_sample(i, jpg=b"junk") for i in range(3)])
    cfg = config(folder, batch_size=2, shuffle_buffer=0)
    cfg.max_consecutive_bad = 20
    with pytest.raises(RuntimeError, match="bad samples in a row"):
        next(iter(data.make_loader(cfg, tok)))
