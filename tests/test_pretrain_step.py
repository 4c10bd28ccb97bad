"""The pretraining step on one process vs two DDP ranks and vs gradient accumulation.

The losses are means over the global batch: DDP with 2 gloo ranks (CIT gathering every rank's
pairs with gradients, counts all-reduced) must give the loss and gradients of one process
holding the whole batch; accumulation likewise, except CIT, whose negatives are the current
micro-batch's. Dropout is off (eval mode) so the runs are comparable.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from trainer import data, losses, pretrain

TENSOR_KEYS = (
    "input_ids", "attention_mask", "pixel_values", "itm", "boxes", "box_mask", "ent_idx",
    "ent_prob", "rel_idx", "rel_prob",
)  # fmt: skip


def step_config(shards, **kw) -> pretrain.TrainConfig:
    values = dict(
        shards=str(shards),
        batch_size=8,
        num_workers=0,
        shuffle_buffer=0,
        threads=1,
        device="cpu",
        live_dir="",
        plot="",
    )
    return pretrain.TrainConfig(**{**values, **kw})


def global_batch(shards) -> dict[str, torch.Tensor]:
    from trainer.factory import build_tokenizer
    from trainer.model import ModelConfig

    cfg = data.DataConfig(
        shard_dir=str(shards), batch_size=8, shuffle_buffer=0, n_entities=20, n_relations=10
    )
    batch = next(iter(data.make_loader(cfg, build_tokenizer(ModelConfig()))))
    batch = {k: batch[k] for k in TENSOR_KEYS}
    matched = batch["itm"] == 1
    assert 2 <= int(matched.sum()) < 8 and bool(batch["box_mask"][matched].any())
    return batch


def rows(batch, lo, hi):
    return {k: v[lo:hi] for k, v in batch.items()}


def grads(r: pretrain.Run) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in r.core.named_parameters() if p.grad is not None}


def one_step(cfg, micro_batches):
    r = pretrain.setup(cfg)
    r.core.eval()  # no dropout: one process and two ranks must compute the same function
    loss, parts = pretrain.forward_backward(r, micro_batches)
    return r, loss, parts


def ddp_rank(rank: int, port: int, cfg, batch_file: str, out_file: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank)
    )
    batch = load_file(batch_file)
    r, loss, parts = one_step(cfg, [rows(batch, 4 * rank, 4 * rank + 4)])
    shares = torch.stack([loss, *parts.values()])
    torch.distributed.all_reduce(shares)  # the rank shares add up to the global means
    if rank == 0:
        names = ["loss", *parts]
        result = {f"loss/{k}": v.reshape(1) for k, v in zip(names, shares, strict=True)}
        result.update({f"grad/{k}": v for k, v in grads(r).items()})
        save_file(result, out_file)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_grads(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 20
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-6), (
            name,
            float((a[name] - b[name]).abs().max()),
        )


def test_two_ddp_ranks_equal_one_process_on_the_global_batch(tmp_path, synthetic_shards):
    cfg = step_config(synthetic_shards, batch_size=4)
    batch = global_batch(synthetic_shards)
    save_file({k: v.contiguous() for k, v in batch.items()}, str(tmp_path / "batch.safetensors"))
    out = tmp_path / "ddp.safetensors"
    mp.spawn(
        ddp_rank,
        args=(free_port(), cfg, str(tmp_path / "batch.safetensors"), str(out)),
        nprocs=2,
    )
    ddp = load_file(str(out))

    r, loss, parts = one_step(step_config(synthetic_shards), [batch])
    assert set(parts) == {"itm", "cit", "coe", "cir"}
    for k, v in {"loss": loss, **parts}.items():
        assert float(ddp[f"loss/{k}"]) == pytest.approx(float(v), rel=1e-5), k
    single = grads(r)
    assert_same_grads({k[5:]: v for k, v in ddp.items() if k.startswith("grad/")}, single)
    # the gradient reaches the CIT projections through the other rank's negatives too
    assert float(single["text_proj.weight"].abs().sum()) > 0


@pytest.mark.parametrize("align_pairs", ["all", "matched"])
def test_accumulation_of_two_micro_batches_equals_one_batch_apart_from_cit(
    synthetic_shards, align_pairs
):
    batch = global_batch(synthetic_shards)
    halves = [rows(batch, 0, 4), rows(batch, 4, 8)]
    no_cit = dict(lambda_cit=0.0, align_pairs=align_pairs)
    r1, loss1, parts1 = one_step(step_config(synthetic_shards, **no_cit), [batch])
    r2, loss2, parts2 = one_step(step_config(synthetic_shards, accum=2, **no_cit), halves)
    assert float(loss2) == pytest.approx(float(loss1), rel=1e-5)
    assert_same_grads(grads(r2), grads(r1))

    # CIT: each micro-batch's own InfoNCE, weighted by its matched pairs
    _, _, parts = one_step(step_config(synthetic_shards, accum=2, align_pairs=align_pairs), halves)
    own, counts = [], []
    with torch.no_grad():
        r = pretrain.setup(step_config(synthetic_shards))
        r.core.eval()
        for half in halves:
            out = r.core(half["input_ids"], half["attention_mask"], half["pixel_values"])
            matched = half["itm"] == 1
            own.append(losses.cit_loss(out["text_emb"], out["image_emb"], out["temp"], matched))
            counts.append(int(matched.sum()))
    expected = sum(n * v for n, v in zip(counts, own, strict=True)) / sum(counts)
    assert float(parts["cit"]) == pytest.approx(float(expected), rel=1e-5)


def test_machine_defaults_fill_batch_and_workers_per_rank(monkeypatch):
    cfg = pretrain.TrainConfig()
    assert cfg.batch_size is None and cfg.num_workers is None  # "fit the machine"
    monkeypatch.setattr(pretrain, "cpu_cores", lambda: 16)
    filled = pretrain.machine_defaults(cfg, world=2, device=torch.device("cpu"))
    assert (filled.batch_size, filled.num_workers) == (8, 7)  # 16 cores / 2 ranks, minus the rank
    filled = pretrain.machine_defaults(cfg, world=1, device=torch.device("cpu"))
    assert filled.num_workers == 15
    monkeypatch.setattr(pretrain, "cpu_cores", lambda: 2)
    assert pretrain.machine_defaults(cfg, world=2, device=torch.device("cpu")).num_workers == 1
    given = pretrain.TrainConfig(batch_size=3, num_workers=0)
    assert pretrain.machine_defaults(given, 1, torch.device("cpu")) == given
