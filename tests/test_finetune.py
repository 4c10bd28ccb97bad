"""Fine-tuning loop: short real training runs on the bundled samples, images, CLI, checkpoints."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from pmu.errors import InputError
from trainer import ie_data
from trainer.finetune_config import FinetuneConfig
from trainer.finetune_data import length_grouped_batches
from trainer.finetune_loop import run_finetune
from trainer.finetune_model import ensure_vocab, load_encoder

SAMPLE = REPO_ROOT / "trainer" / "sample"


def sample_config(task: str, tmp_path, **kw) -> FinetuneConfig:
    d = SAMPLE / task
    base = dict(
        task=task,
        train=str(d / "train.txt"),
        dev=str(d / "dev.txt"),
        test=str(d / "test.txt"),
        init="tiny",
        out=str(tmp_path / task),
        epochs=12,
        batch_size=8,
        lr_encoder=1e-3,
        lr_head=3e-3,
        patience=0,
        threads=1,
        device="cpu",
    )
    base.update(kw)
    return FinetuneConfig(**base)


def test_mner_training_beats_majority_baseline(tmp_path):
    m = run_finetune(sample_config("mner", tmp_path))
    test = m["test"]["overall"]
    assert m["test_majority_baseline"]["f1"] == 0.0  # all-O tagging finds no entity
    assert test["f1"] > 0.4, m["history"]
    assert m["history"][-1]["train_loss"] < m["history"][0]["train_loss"] / 3
    assert set(m["test"]["per_type"]) == {"PER", "LOC", "ORG", "MISC"}
    assert m["text_only"]["samples"] == {"train": 48, "dev": 16, "test": 16}
    assert 1 <= m["best_epoch"] <= m["epochs_run"] == 12
    # predictions: CoNLL style, the same sentences and gold labels as the test file
    blocks = (tmp_path / "mner" / "predictions.txt").read_text().strip().split("\n\n")
    gold = ie_data.read_ner(SAMPLE / "mner" / "test.txt")
    assert len(blocks) == len(gold)
    first = blocks[0].split("\n")
    assert first[0] == f"IMGID:{gold[0].img_id}"
    assert [ln.split("\t")[:2] for ln in first[1:]] == [
        [t, g] for t, g in zip(gold[0].tokens, gold[0].labels, strict=True)
    ]
    saved = json.loads((tmp_path / "mner" / "metrics.json").read_text())  # headline only
    assert saved["test"] == {k: test[k] for k in ("precision", "recall", "f1")}
    assert set(saved) == {"task", "best_epoch", "test", "dev", "test_majority_baseline_f1"}
    report = json.loads((tmp_path / "mner" / "report.json").read_text())  # the detail
    assert report == json.loads(json.dumps(m)) and set(report["test"]["per_type"]) >= {"PER"}
    assert (tmp_path / "mner" / "dev.png").read_bytes()[:4] == b"\x89PNG"


def test_mre_training_beats_majority_baseline(tmp_path):
    m = run_finetune(sample_config("mre", tmp_path, epochs=15))
    test, base = m["test"]["overall"], m["test_majority_baseline"]
    assert base["accuracy"] == pytest.approx(0.4)  # "None" is the majority relation
    assert test["accuracy"] > base["accuracy"] + 0.15, m["history"]
    assert test["f1"] > 0.3
    assert m["encoder"]["embeddings_resized"] is True
    rows = [
        json.loads(x) for x in (tmp_path / "mre" / "predictions.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 20 and all(r["text_only"] for r in rows)
    assert sum(r["gold"] == r["pred"] for r in rows) / 20 == pytest.approx(test["accuracy"])


def test_same_seed_same_outputs(tmp_path):
    a = run_finetune(sample_config("mre", tmp_path / "a", epochs=2))
    b = run_finetune(sample_config("mre", tmp_path / "b", epochs=2))
    assert a["history"] == b["history"]
    pa = (tmp_path / "a" / "mre" / "predictions.jsonl").read_bytes()
    assert pa == (tmp_path / "b" / "mre" / "predictions.jsonl").read_bytes()


def test_marker_embeddings_resized_once(tmp_path):
    cfg = sample_config("mre", tmp_path)
    model, tok, _, _ = load_encoder(cfg)
    emb = model.bert.get_input_embeddings()
    n0, old = emb.num_embeddings, emb.weight[:5].detach().clone()
    ie_data.add_markers(tok)
    assert ensure_vocab(model, tok) is True
    emb = model.bert.get_input_embeddings()
    assert emb.num_embeddings == len(tok) == n0 + 4
    assert torch.equal(emb.weight[:5], old)  # existing rows untouched
    ie_data.add_markers(tok)
    assert ensure_vocab(model, tok) is False
    assert model.bert.get_input_embeddings().num_embeddings == n0 + 4


def test_saved_model_reloads_as_init_without_second_resize(tmp_path):
    run_finetune(sample_config("mre", tmp_path / "first", epochs=1, save_model=True))
    saved = tmp_path / "first" / "mre" / "model"
    assert (saved / "head.safetensors").is_file()
    m = run_finetune(sample_config("mre", tmp_path / "second", epochs=1, init=str(saved)))
    assert m["encoder"]["kind"] == "pretrain-checkpoint"
    assert m["encoder"]["embeddings_resized"] is False


def test_init_from_pretraining_checkpoint(tmp_path):
    from trainer.factory import build_model, build_tokenizer, save_pretrained
    from trainer.model import ModelConfig

    cfg = ModelConfig(n_entities=6, n_relations=3)  # a checkpoint with all pretraining heads
    save_pretrained(build_model(cfg), build_tokenizer(cfg), cfg, tmp_path / "pretrain")
    m = run_finetune(sample_config("mner", tmp_path, epochs=1, init=str(tmp_path / "pretrain")))
    assert m["encoder"]["kind"] == "pretrain-checkpoint"
    assert m["encoder"]["n_fusion_layers"] == 1 and m["encoder"]["n_layers"] == 2


def test_init_from_local_hf_directory(tmp_path):
    from pipeline.models import load_text_encoder, load_tokenizer

    hf = tmp_path / "hf-bert"
    load_text_encoder("tiny").save_pretrained(hf)
    load_tokenizer("tiny").save_pretrained(hf)
    m = run_finetune(sample_config("mner", tmp_path, epochs=1, init=str(hf)))
    assert m["encoder"]["kind"] == "hf-dir" and m["encoder"]["text_encoder"] == str(hf)


def test_images_missing_ones_run_text_only(tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    sents = {s: ie_data.read_ner(SAMPLE / "mner" / f"{s}.txt") for s in ("train", "dev", "test")}
    with_image = {s: v[::2] for s, v in sents.items()}  # every other sentence has an image
    for i, sent in enumerate(x for v in with_image.values() for x in v):
        Image.new("RGB", (40 + i, 30), (i * 7 % 255, 90, 160)).save(images / f"{sent.img_id}.jpg")
    (images / f"{sents['test'][2].img_id}.jpg").write_bytes(b"not a jpeg")  # unreadable
    # half of every split's images are missing: a multimodal run refuses to go on quietly
    with pytest.raises(InputError, match=r"train: \d+ of \d+ images not found.*missing-images 1"):
        run_finetune(sample_config("mner", tmp_path, epochs=1, images=str(images)))
    cfg = sample_config("mner", tmp_path, epochs=2, images=str(images), max_missing_images=1.0)
    m = run_finetune(cfg)
    expected = {s: len(v) - len(with_image[s]) for s, v in sents.items()}
    assert m["text_only"]["missing_images"] == expected
    expected["test"] += 1
    assert m["text_only"]["samples"] == expected
    assert m["text_only"]["unreadable_images"] == {"train": 0, "dev": 0, "test": 1}
    assert m["text_only"]["images"] == {s: str(images) for s in ("train", "dev", "test")}


def _split_images(root, sents, layout):
    from PIL import Image

    for split, folder in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i, sent in enumerate(sents[split]):
            Image.new("RGB", (32, 24 + i), (i * 9 % 255, 40, 90)).save(
                root / folder / f"{sent.img_id}.jpg"
            )


def test_per_split_image_folders(tmp_path):
    sents = {s: ie_data.read_ner(SAMPLE / "mner" / f"{s}.txt") for s in ("train", "dev", "test")}
    # MNRE's layout: one folder with train/ val/ test/ inside
    release = tmp_path / "img_org"
    _split_images(release, sents, {"train": "train", "dev": "val", "test": "test"})
    assert ie_data.image_folders(release, "dev") == [release, release / "val"]
    m = run_finetune(sample_config("mner", tmp_path / "a", epochs=1, images=str(release)))
    assert m["text_only"]["samples"] == {"train": 0, "dev": 0, "test": 0}
    # or a folder per split, each named by its flag
    own = tmp_path / "own"
    _split_images(own, sents, {"train": "tr", "dev": "de", "test": "te"})
    folders = {f"images_{s}": str(own / f) for s, f in (("train", "tr"), ("dev", "de"),
                                                      ("test", "te"))}  # fmt: skip
    m = run_finetune(sample_config("mner", tmp_path / "b", epochs=1, **folders))
    assert m["text_only"]["samples"] == {"train": 0, "dev": 0, "test": 0}
    assert m["text_only"]["images"]["dev"] == str(own / "de")
    # one folder for all splits finds only the top level's images: the split folders are
    # where the rest are, and the run says so instead of training text-only
    with pytest.raises(InputError, match="images-train DIR"):
        run_finetune(sample_config("mner", tmp_path / "c", epochs=1, images=str(own)))


def test_mixed_batch_fuses_each_sample_like_alone():
    cfg = FinetuneConfig(task="mner", train="", dev="", test="")
    model, *_ = load_encoder(cfg)
    model.eval()
    torch.manual_seed(0)
    ids = torch.randint(5, 100, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    size = model.cfg.image_size
    pixels = torch.randn(3, 3, size, size)
    has_image = torch.tensor([True, False, True])
    with torch.no_grad():
        mixed = model.text_states(ids, mask, pixels, has_image)
        for i in range(3):
            alone = model.text_states(
                ids[i : i + 1], mask[i : i + 1], pixels[i : i + 1], has_image[i : i + 1]
            )
            assert torch.allclose(mixed[i], alone[0], atol=1e-5)
        text_only = model.text_states(ids, mask, None, torch.zeros(3, dtype=torch.bool))
    assert torch.allclose(mixed[1], text_only[1], atol=1e-5)
    assert not torch.allclose(mixed[0], text_only[0], atol=1e-3)  # the image changed sample 0


def test_length_grouped_batches_cover_every_sample_once():
    lengths = [5, 30, 7, 12, 30, 2, 9, 18, 4, 25]
    batches = length_grouped_batches(lengths, 3, seed=1, group=2)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert batches == length_grouped_batches(lengths, 3, seed=1, group=2)
    assert batches != length_grouped_batches(lengths, 3, seed=2, group=2)
    evaluation = length_grouped_batches(lengths, 4, seed=None)
    assert [lengths[i] for b in evaluation for i in b] == sorted(lengths)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "trainer/finetune.py", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_as_script_and_malformed_input(tmp_path):
    d = SAMPLE / "mre"
    common = ["--task", "mre", "--dev", str(d / "dev.txt"), "--test", str(d / "test.txt")]
    common += ["--rel2id", str(d / "rel2id.json"), "--init", "tiny", "--threads", "1"]
    res = run_cli(
        *common, "--train", str(d / "train.txt"), "--epochs", "1", "--out", str(tmp_path / "o"),
        "--metrics", str(tmp_path / "m.json"),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "text-only" in res.stderr and "test P/R/F1" in res.stdout
    assert json.loads((tmp_path / "m.json").read_text())["task"] == "mre"
    assert (tmp_path / "o" / "predictions.jsonl").is_file()
    bad = tmp_path / "bad.txt"
    lines = (d / "train.txt").read_text().splitlines()
    bad.write_text("\n".join(lines[:3] + ["{'token': ['x'"] + lines[3:]) + "\n")
    res = run_cli(*common, "--train", str(bad), "--epochs", "1", "--out", str(tmp_path / "o2"))
    assert res.returncode == 2
    assert f"{bad}:4:" in res.stderr


@pytest.mark.parametrize(
    ("task", "settings", "stop"),
    [
        ("mre", dict(epochs=12, patience=2), 9),  # best epoch 8, early stop after epoch 10
        ("mner", dict(epochs=5, patience=0), 2),
    ],
)
def test_interrupted_then_resumed_run_writes_the_same_files(tmp_path, caplog, task, settings, stop):
    out = tmp_path / task
    names = ("metrics.json", "report.json", "predictions." + ("txt" if task == "mner" else "jsonl"))
    full = run_finetune(sample_config(task, tmp_path, **settings))
    expected = {n: (out / n).read_bytes() for n in names}
    for n in names:
        (out / n).unlink()
    # same OUT without --resume: the finished run's state is ignored, then replaced
    with caplog.at_level(logging.WARNING, logger="finetune"):
        part = run_finetune(sample_config(task, tmp_path, stop_after_epoch=stop, **settings))
    assert "no --resume: starting over" in caplog.text
    assert part["interrupted_after_epoch"] == stop
    assert not any((out / n).exists() for n in names)
    latest = json.loads((out / "state" / "latest.json").read_text())
    assert [p.name for p in (out / "state").glob("step-*")] == [latest["dir"]]
    saved = json.loads((out / "state" / latest["dir"] / "trainer_state.json").read_text())
    assert saved["trainer"]["epoch"] == stop and len(saved["trainer"]["history"]) == stop

    resumed = run_finetune(sample_config(task, tmp_path, resume=True, **settings))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resumed_after_epoch"] == stop
    assert stats["epochs_trained_now"] == full["epochs_run"] - stop > 0
    assert resumed["history"] == full["history"]
    assert resumed["best_epoch"] == full["best_epoch"]
    for n in names:
        assert (out / n).read_bytes() == expected[n], n
    if task == "mre":  # early stopping and best-epoch selection as in the uninterrupted run
        assert (full["best_epoch"], full["epochs_run"]) == (8, 10)
    # resuming a finished run trains nothing and evaluates the same best model again
    run_finetune(sample_config(task, tmp_path, resume=True, **settings))
    assert json.loads((out / "stats.json").read_text())["epochs_trained_now"] == 0
    for n in names:
        assert (out / n).read_bytes() == expected[n], n


def test_resume_with_other_settings_or_data_is_refused(tmp_path):
    d = SAMPLE / "mre"
    train = tmp_path / "train.txt"
    train.write_bytes((d / "train.txt").read_bytes())
    kw = dict(train=str(train), rel2id=str(d / "rel2id.json"), epochs=3, stop_after_epoch=1)
    run_finetune(sample_config("mre", tmp_path, **kw))
    kw.update(stop_after_epoch=None, resume=True)
    with pytest.raises(InputError, match=r"--resume refused: .*params\.epochs: 3 -> 4"):
        run_finetune(sample_config("mre", tmp_path, **{**kw, "epochs": 4}))
    with pytest.raises(InputError, match=r"params\.lr_head: 0\.003 -> 0\.002"):
        run_finetune(sample_config("mre", tmp_path, **kw, lr_head=2e-3))
    # the CLI: other data content, same path -> exit code 2 and the reason
    train.write_text("\n".join(train.read_text().splitlines()[:-1]) + "\n")
    res = run_cli(
        "--params", "none", "--task", "mre", "--train", str(train), "--dev", str(d / "dev.txt"),
        "--test", str(d / "test.txt"), "--rel2id", str(d / "rel2id.json"), "--epochs", "3",
        "--batch-size", "8", "--lr-encoder", "1e-3", "--lr-head", "3e-3", "--patience", "0",
        "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "mre"), "--resume",
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "--resume refused" in res.stderr and "files.train: content changed" in res.stderr
    assert "params." not in res.stderr  # only the data differs


def test_first_word_longer_than_max_len_trains_and_predicts(tmp_path):
    # Each sentence's first word alone exceeds max_len: it keeps its first pieces, so the CRF
    # always has a first word (pytorch-crf raises on an all-masked row).
    lines = []
    for i, sent in enumerate(ie_data.read_ner(SAMPLE / "mner" / "train.txt")[:12]):
        lines.append(f"IMGID:x{i}")
        lines += [
            f"{'qz' * 30}\tB-MISC",
            *(f"{t}\t{lab}" for t, lab in zip(sent.tokens, sent.labels, strict=True)),
        ]
        lines.append("")
    data = tmp_path / "long.txt"
    data.write_text("\n".join(lines) + "\n")
    m = run_finetune(
        sample_config("mner", tmp_path, train=str(data), dev=str(data), test=str(data), epochs=1,
                      max_len=6)
    )  # fmt: skip
    assert m["data"]["train"]["truncated"] > 0
    assert m["test"]["overall"]["support"] == 12 + sum(
        t.startswith("B-") for s in ie_data.read_ner(SAMPLE / "mner" / "train.txt")[:12]
        for t in s.labels
    )  # fmt: skip


def test_rel2id_without_the_none_label_is_refused(tmp_path):
    rel2id = json.loads((SAMPLE / "mre" / "rel2id.json").read_text())
    assert "None" in rel2id
    with pytest.raises(InputError, match="no 'NA' label"):
        run_finetune(sample_config("mre", tmp_path, epochs=1, none_label="NA"))


def test_seeds_report_each_run_and_mean_std(tmp_path):
    from trainer.finetune_loop import run_seeds

    cfg = sample_config("mre", tmp_path, epochs=2)
    summary = run_seeds(cfg, [1, 2])
    saved = json.loads((tmp_path / "mre" / "report.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    headline = json.loads((tmp_path / "mre" / "metrics.json").read_text())
    assert headline == {k: saved[k] for k in ("task", "seeds", "dev", "test")}
    runs = [
        json.loads((tmp_path / "mre" / f"seed-{s}" / "report.json").read_text()) for s in (1, 2)
    ]
    f1 = [r["test"]["overall"]["f1"] for r in runs]
    assert saved["seeds"] == [1, 2] and saved["runs"]["2"]["test"]["f1"] == f1[1]
    assert saved["test"]["f1"]["mean"] == pytest.approx(sum(f1) / 2)
    assert saved["test"]["f1"]["std"] == pytest.approx(abs(f1[0] - f1[1]) / 2**0.5)
    with pytest.raises(InputError, match="distinct"):
        run_seeds(cfg, [3, 3])


def task_flags(task: str, tmp_path, **files) -> list[str]:
    """The CLI flags of a short run on the sample of `task`, with some files replaced."""
    d = SAMPLE / task
    paths = {name: str(d / f"{name}.txt") for name in ("train", "dev", "test")}
    paths.update({name: str(path) for name, path in files.items()})
    flags = ["--task", task, "--init", "tiny", "--threads", "1", "--epochs", "1"]
    flags += ["--out", str(tmp_path / "out")]
    if task == "mre":
        flags += ["--rel2id", str(d / "rel2id.json")]
    return flags + [f"--{name}={path}" for name, path in paths.items()]


def assert_one_line_error(res: subprocess.CompletedProcess, message: str) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in res.stderr, lines
    assert lines[0].startswith("error: ") and message in lines[0], lines


@pytest.mark.parametrize("split", ["dev", "test"])
def test_a_label_type_train_lacks_is_one_line_naming_label_and_file(tmp_path, split):
    sentences = ie_data.read_ner(SAMPLE / "mner" / f"{split}.txt")
    text = (SAMPLE / "mner" / f"{split}.txt").read_text()
    first = sentences[0]
    at = next(i for i, lab in enumerate(first.labels) if lab == "B-PER")
    lines = text.splitlines()
    lines[first.line - 1 + at] = f"{first.tokens[at]}\tB-EVENT"  # a type train has not
    changed = tmp_path / f"{split}.txt"
    changed.write_text("\n".join(lines) + "\n")
    res = run_cli(*task_flags("mner", tmp_path, **{split: changed}))
    assert_one_line_error(
        res, f"{changed}:{first.line + at}: label 'B-EVENT' (--{split}) does not occur in --train"
    )


@pytest.mark.parametrize("task", ["mner", "mre"])
@pytest.mark.parametrize("content", ["", "\n\n"])
def test_an_empty_train_file_stops_before_a_model_with_one_line(tmp_path, task, content):
    empty = tmp_path / "train.txt"
    empty.write_text(content)
    res = run_cli(*task_flags(task, tmp_path, train=empty))
    assert_one_line_error(res, f"no examples in {empty} (--train)")
    assert "encoder" not in res.stderr  # nothing loaded: no "train N, dev N ... encoder" line
