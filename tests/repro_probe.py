"""Child process of tests/test_repro_cpu.py: the float stages on small inputs, as one command.

    python tests/repro_probe.py INPUTS OUT    # INPUTS from labeling_inputs.write_labeling_inputs

Runs embed-prompts, detect-objects, label-objects, a few pretraining steps on those shards and a
short fine-tuning, each through the stage's own function, then prints one JSON line: the sha256
of every output file DVC would hash (by path under OUT) and the CPU kernels torch used. Like
every command, it calls `runtime.configure_process()` before anything else.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tracked(path: str) -> bool:
    """What DVC would hash of these outputs: not the timings .dvcignore leaves out (fine-tuning's
    stats.json, the samples/s plot) nor dvclive's files outside its plots folder."""
    if Path(path).name in ("stats.json", "samples_per_s.tsv"):
        return False
    return not path.startswith("dvclive/") or path.startswith("dvclive/plots/metrics/")


def main(inputs: Path, out: Path) -> dict:
    from pmu import runtime

    runtime.configure_process()

    from pipeline.detect import detect_objects
    from pipeline.label import label_objects
    from pipeline.prompts import embed_prompts
    from pipeline.settings import DetectParams, DetectSettings, LabelParams, LabelSettings
    from trainer import pretrain
    from trainer.finetune_config import FinetuneConfig
    from trainer.finetune_loop import run_finetune

    vocab = {k: inputs / "vocab" / f"{k}.json" for k in ("entities", "relations")}
    pairs = inputs / "prepared" / "pairs.parquet"
    prompts, boxes, shards = out / "prompts.safetensors", out / "boxes.parquet", out / "shards"
    embed_prompts(vocab["entities"], vocab["relations"], prompts, device="cpu")
    detect = DetectParams(batch_size=4, imgsz=160, conf=0.0, top_k=3)
    detect_objects(
        DetectSettings(pairs=str(pairs), out=str(boxes), device="cpu", params=detect),
        progress=False,
    )
    label = LabelParams(samples_per_shard=4, image_batch_size=4, crop_batch_size=8, num_workers=0)
    labels = LabelSettings(
        pairs=str(pairs), boxes=str(boxes), prompts=str(prompts),
        entities=str(vocab["entities"]), relations=str(vocab["relations"]), out=str(shards),
        rejected=None, device="cpu", params=label,
    )  # fmt: skip
    label_objects(labels, progress=False)
    pretrain.train(
        pretrain.TrainConfig(
            shards=str(shards),
            preset="tiny",
            out=str(out / "pretrain"),
            report="",
            metrics=str(out / "pretrain.json"),
            live_dir=str(out / "dvclive"),
            plot=str(out / "pretrain_loss.png"),
            steps=3,
            batch_size=4,
            warmup_steps=1,
            ckpt_every=100,
            num_workers=0,
            shuffle_buffer=8,
            log_every=1,
            export_hf=False,
            lr=1e-3,
            device="cpu",
        )  # fmt: skip
    )
    sample = REPO / "trainer" / "sample" / "mner"
    run_finetune(
        FinetuneConfig(
            task="mner",
            train=str(sample / "train.txt"),
            dev=str(sample / "dev.txt"),
            test=str(sample / "test.txt"),
            init=str(out / "pretrain"),
            out=str(out / "mner"),
            epochs=1,
            batch_size=8,
            patience=0,
            device="cpu",
        )  # fmt: skip
    )
    import torch

    hashes = {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        if p.is_file() and tracked(str(p.relative_to(out)))
    }
    return {
        "files": hashes,
        "aten": torch.backends.cpu.get_cpu_capability(),
        "onednn": torch.backends.mkldnn.enabled,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    result = main(Path(sys.argv[1]), Path(sys.argv[2]))
    print("PROBE " + json.dumps(result))
