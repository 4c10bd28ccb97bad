"""Pretraining end to end: overfitting a fixed batch, exact resume, the CLI, DDP with 2 ranks."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pmu.optim import build_optimizer
from trainer import data, pretrain
from trainer.factory import build_model, build_tokenizer, load_pretrained
from trainer.losses import pretrain_loss
from trainer.model import ModelConfig

REPO = Path(__file__).resolve().parents[1]
LAMBDAS = {"itm": 1.0, "cit": 1.0, "coe": 1.0, "cir": 1.0}


def test_overfits_a_fixed_tiny_batch(tmp_path):
    from pipeline.random_shards import write_random_shards

    torch.set_num_threads(1)
    folder = write_random_shards(tmp_path / "s", n_samples=8, samples_per_shard=8)
    tok = build_tokenizer(ModelConfig())
    cfg = data.DataConfig(
        shard_dir=str(folder), batch_size=8, n_entities=20, n_relations=10, shuffle_buffer=0
    )
    batch = next(iter(data.make_loader(cfg, tok)))
    assert batch["itm"].tolist().count(1) >= 2 and bool(batch["box_mask"].any())
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_entities=20, n_relations=10)).train()
    opt = build_optimizer([(model, 1e-3)], 1e-3)
    history = []
    for _ in range(80):  # bounded: 80 steps, about 3 s on one CPU thread
        out = model(
            batch["input_ids"], batch["attention_mask"], batch["pixel_values"], boxes=batch["boxes"]
        )
        loss, parts = pretrain_loss(out, batch, LAMBDAS)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        history.append({"loss": float(loss.detach()), **{k: float(v) for k, v in parts.items()}})

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    first, last = history[:3], history[-5:]
    assert mean("loss", last) <= 0.5 * mean("loss", first), (history[0], history[-1])
    for key in LAMBDAS:  # every enabled component falls
        assert mean(key, last) < mean(key, first), (key, history[0], history[-1])


def small_config(tmp_path, shards, **kw):
    values = dict(
        shards=str(shards),
        out=str(tmp_path / "ckpt" / "pretrain"),
        metrics=str(tmp_path / "metrics.json"),
        report=str(tmp_path / "report.json"),
        live_dir="",
        plot="",
        steps=6,
        batch_size=4,
        warmup_steps=2,
        ckpt_every=3,
        num_workers=0,
        shuffle_buffer=8,
        threads=1,
        log_every=1,
        export_hf=False,
        lr=1e-3,
    )
    values.update(kw)
    return pretrain.TrainConfig(**values)


class Interrupt(Exception):
    pass


def test_resume_reaches_the_same_parameters_as_an_uninterrupted_run(tmp_path, synthetic_shards):
    """Tolerance: exact equality (CPU, fp32, deterministic data order and restored RNG)."""
    full = small_config(tmp_path / "a", synthetic_shards)
    metrics_full = pretrain.train(full)
    ref, _, _ = load_pretrained(full.out)

    cut = small_config(tmp_path / "b", synthetic_shards)

    def crash(step):  # dies after step 5: the checkpoint of step 3 survives, step 4-5 are lost
        if step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain.train(cut, on_step=crash)
    assert json.loads((cut.state_dir / "latest.json").read_text())["step"] == 3
    resumed_metrics = pretrain.train(dataclass_replace(cut, resume=True))
    got, _, _ = load_pretrained(cut.out)
    assert resumed_metrics["steps"] == metrics_full["steps"] == 6
    ref_state, got_state = ref.state_dict(), got.state_dict()
    assert ref_state.keys() == got_state.keys()
    for k in ref_state:
        assert torch.equal(ref_state[k], got_state[k]), k
    assert resumed_metrics["train"] == metrics_full["train"]  # same losses at the last step


def test_resume_refuses_another_runs_state_and_allows_more_steps(tmp_path, synthetic_shards):
    from pipeline.random_shards import write_random_shards
    from pmu.errors import InputError

    cfg = small_config(tmp_path, synthetic_shards, steps=3)
    pretrain.train(cfg)
    other_shards = write_random_shards(tmp_path / "other", seed=5)
    cases = {
        "params.lr: 0.001 -> 0.0003": {"lr": 3e-4},
        "params.seed: 0 -> 1": {"seed": 1},
        "params.lambda_coe: 1.0 -> 0.0": {"lambda_coe": 0.0},
        "files.manifest.json: content changed": {"shards": str(other_shards)},
    }
    for expected, change in cases.items():
        with pytest.raises(InputError, match="--resume refused") as err:
            pretrain.train(dataclass_replace(cfg, resume=True, **change))
        assert expected in str(err.value), str(err.value)
    assert json.loads((cfg.state_dir / "latest.json").read_text())["step"] == 3  # untouched
    longer = pretrain.train(dataclass_replace(cfg, resume=True, steps=5, threads=2))
    assert longer["steps"] == 5


def test_cli_refuses_another_runs_state_in_one_line(tmp_path, synthetic_shards):
    args = [sys.executable, str(REPO / "trainer" / "run.py"), "--shards", str(synthetic_shards),
            "--out", str(tmp_path / "ckpt"), "--steps", "2", "--batch-size", "4",
            "--num-workers", "0", "--threads", "1", "--no-export-hf", "--metrics", "",
            "--report", "", "--live-dir", "", "--plot", ""]  # fmt: skip
    subprocess.run(args, check=True, capture_output=True, cwd=tmp_path)
    res = subprocess.run(args + ["--resume", "--lr", "5e-4"], capture_output=True, text=True,
                         cwd=tmp_path)  # fmt: skip
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: --resume refused") and "params.lr" in lines[0]
    assert "Traceback" not in res.stderr and len(lines) <= 2


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_zero_lambda_removes_loss_and_head(tmp_path, synthetic_shards):
    cfg = small_config(tmp_path, synthetic_shards, steps=2, lambda_coe=0.0, hard_labels=True)
    metrics = pretrain.train(cfg)
    assert set(metrics["train"]) == {"step", "loss", "itm", "cit", "cir"}
    model, mcfg, _ = load_pretrained(cfg.out)
    assert model.fc_ent is None and mcfg.n_entities == 0 and mcfg.n_relations == 10


def test_vision_lr_and_align_on_reach_the_optimizer_and_the_saved_model(tmp_path, synthetic_shards):
    cfg = small_config(tmp_path, synthetic_shards, steps=2, lr_vision=5e-3, align_on="vision")
    r = pretrain.setup(cfg)
    lr_of = {id(p): g["initial_lr"] for g in r.optimizer.param_groups for p in g["params"]}
    vision = {id(p) for p in r.core.vision_modules().parameters()}
    assert len(lr_of) == sum(1 for _ in r.core.parameters())  # every parameter, once
    assert {lr_of[i] for i in vision} == {5e-3}
    assert {v for i, v in lr_of.items() if i not in vision} == {1e-3}
    pretrain.train(cfg)
    _, mcfg, _ = load_pretrained(cfg.out)
    assert mcfg.align_on == "vision"


def cli_env():
    env = dict(os.environ, PYTHONPATH="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"})
    return env


def test_cli_trains_and_writes_checkpoints_metrics_and_plots(tmp_path, synthetic_shards):
    from transformers import AutoModel

    cmd = [
        sys.executable,
        str(REPO / "trainer" / "run.py"),
        "--shards",
        str(synthetic_shards),
        "--preset",
        "tiny",
        "--steps",
        "8",
        "--batch-size",
        "4",
        "--num-workers",
        "1",
        "--log-every",
        "2",
        "--ckpt-every",
        "4",
        "--threads",
        "1",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "settings: code defaults (no params.yaml" in proc.stdout
    assert "pretrain done: 8 steps" in proc.stdout
    assert "itm=" in proc.stderr and "coe=" in proc.stderr  # the progress bar shows each loss
    runs = tmp_path / "runs" / "pretrain"  # a manual run writes under runs/, never DVC outputs
    metrics = json.loads((runs / "metrics.json").read_text())  # headline figures only
    assert metrics["steps"] == 8 and metrics["bad_samples"] == 0
    assert set(metrics) == {"steps", "bad_samples", "loss", "itm", "cit", "coe", "cir"}
    assert set(metrics["coe"]) == {"first", "last"}
    report = json.loads((runs / "report.json").read_text())
    assert report["samples_per_s"] > 0 and report["train"]["loss"] == metrics["loss"]["last"]
    assert [row["step"] for row in report["history"]] == [2, 4, 6, 8]
    assert (runs / "loss.png").read_bytes()[:4] == b"\x89PNG"
    out = runs / "model"
    model, cfg, tok = load_pretrained(out)
    assert cfg.n_entities == 20 and tok is not None
    for sub in ("text", "vision", "fusion", "bert"):
        assert AutoModel.from_pretrained(out / "hf" / sub) is not None
    states = sorted(p.name for p in (runs / "model_state").glob("step-*"))
    assert states == ["step-00000004", "step-00000008"]
    loss_plot = runs / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv"
    rows = [line.split("\t") for line in loss_plot.read_text().splitlines()]
    assert rows[0] == ["step", "loss"] and [int(r[0]) for r in rows[1:]] == [2, 4, 6, 8]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_agree_on_parameters(tmp_path, synthetic_shards):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(REPO / "trainer" / "run.py"),
        "--shards",
        str(synthetic_shards),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--num-workers",
        "1",
        "--log-every",
        "1",
        "--threads",
        "1",
        "--no-export-hf",
        "--live-dir",
        "",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    metrics = json.loads((tmp_path / "runs" / "pretrain" / "report.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    assert metrics["steps_per_epoch"] == 16 // (2 * 2)
    checksums = metrics["param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    assert metrics["samples_seen"] == 3 * 2 * 2


def test_loss_plots_also_in_a_git_repo_without_commits(tmp_path, synthetic_shards, monkeypatch):
    """dvclive raises in a fresh `git init`; the trainer then writes the same TSV plots itself."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)
    cfg = small_config(tmp_path, synthetic_shards, steps=2, live_dir="dvclive/pretrain")
    pretrain.train(cfg)
    rows = (tmp_path / "dvclive/pretrain/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert rows[0] == "step\tloss" and [r.split("\t")[0] for r in rows[1:]] == ["1", "2"]


def test_a_folder_smaller_than_one_batch_trains_with_a_smaller_batch(tmp_path, synthetic_shards):
    """The README's `--steps 50` on the 27-sample bundled shards must not fail on batch 32."""
    metrics = pretrain.train(small_config(tmp_path, synthetic_shards, batch_size=32, steps=2))
    assert metrics["steps"] == 2
    assert metrics["batch_size"] == 16  # the synthetic folder holds 16 samples
    assert metrics["steps_per_epoch"] == 1


def test_compiled_model_follows_the_same_loss_trajectory(tmp_path, synthetic_shards):
    """--compile runs the same step through torch.compile. The suite uses the aot_eager backend
    (dynamo capture + AOT autograd, the parts that can change the graph) because inductor's
    C++ compilation takes minutes on a 2-core CPU; CUDA users get inductor by default."""
    from torch._dynamo.utils import counters

    plain = pretrain.train(small_config(tmp_path / "plain", synthetic_shards, steps=2))
    counters.clear()
    compiled = pretrain.train(
        small_config(
            tmp_path / "compiled", synthetic_shards, steps=2, compile=True,
            compile_backend="aot_eager",
        )
    )  # fmt: skip
    assert compiled["compile"] is True and len(compiled["history"]) == 2
    assert counters["stats"]["unique_graphs"] >= 1  # the model really ran through dynamo
    for a, b in zip(plain["history"], compiled["history"], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (k, a, b)


def test_bad_samples_are_reported_when_they_happen(tmp_path, synthetic_shards, capsys):
    """The first bad sample is reported at once with its reason, later ones periodically."""
    from pmu import shards as contract
    from pmu.io import write_json_atomic

    folder = tmp_path / "with_bad"
    folder.mkdir()
    for name in ("entities.json", "relations.json", "manifest.json"):
        (folder / name).write_bytes((synthetic_shards / name).read_bytes())
    samples = [
        contract.decode_sample(raw)
        for path in contract.shard_paths(synthetic_shards)
        for raw in contract.iter_raw_samples(path)
    ]
    written = []
    for i, s in enumerate(samples):
        written.append(
            contract.LabelledSample(
                id=s["meta"]["id"],
                jpg=b"not a jpeg" if i % 5 == 2 else s["jpg"],
                caption=s["caption"],
                meta={k: v for k, v in s["meta"].items() if k != "id"},
                ent_idx=s["ent_idx"],
                ent_prob=s["ent_prob"],
                rel_idx=s["rel_idx"],
                rel_prob=s["rel_prob"],
            )
        )
    contract.write_shard(folder / "shard-000000.tar", written)
    write_json_atomic(folder / "sizes.json", {"shard-000000.tar": len(written)})
    report = pretrain.train(
        small_config(tmp_path, folder, steps=4, batch_size=2, shuffle_buffer=0,
                     bad_warn_every_s=0.0)
    )  # fmt: skip
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert warnings[0].startswith("warning: skipped a bad sample (") and "image" in warnings[0]
    assert any("more bad samples" in w and "so far); most frequent:" in w for w in warnings[1:])
    assert report["bad_samples"] >= 2 and len(warnings) >= 2, warnings
