"""What reproducible mode (`PMU_REPRODUCIBLE=1`) costs on CPU, per model, at base sizes.

    python benchmarks/cpu_determinism.py                      # 1 thread, every workload
    python benchmarks/cpu_determinism.py --threads 2 --repeat 5 --json out.json

Each workload runs in a fresh subprocess per mode (torch and MKL read the kernel settings when
they first compute): `machine` = the kernels this CPU picks (AVX-512 / AVX2 ATen kernels, MKL's
own dispatch, oneDNN convolutions and GELU), `reproducible` = pmu.runtime's pinned kernels
(ATen `default`, MKL_CBWR=COMPATIBLE, no oneDNN); `aten-default`, `mkl-compatible` and
`no-onednn` apply one of those pins alone (what each costs), and `aten-avx2` is reproducible mode
with ATen's AVX2 kernels instead (same bytes on AVX2 CPUs only: the cost of choosing `default`).
Weights are random (base shapes, built offline); the timings are medians over `--repeat` calls
after one warm-up. Workloads: CLIP ViT-B/32 image tower (label-objects), its text tower
(embed-prompts), YOLO11n at 640 (detect-objects), BERT-base forward + backward (pretrain,
fine-tune).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("clip_image", "clip_text", "yolo", "bert_step")
MODES = {  # environment per mode; BENCH_NO_ONEDNN=1 turns oneDNN off in the child
    "machine": {},
    "reproducible": {"PMU_REPRODUCIBLE": "1"},
    "aten-default": {"ATEN_CPU_CAPABILITY": "default"},
    "mkl-compatible": {"MKL_CBWR": "COMPATIBLE"},
    "no-onednn": {"BENCH_NO_ONEDNN": "1"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "BENCH_NO_ONEDNN": "1"},
}


def build(name: str):
    """(callable running one batch, description) for a workload, weights random."""
    import torch

    torch.manual_seed(0)
    if name in ("clip_image", "clip_text"):
        import open_clip

        model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
        if name == "clip_image":
            x = torch.rand(16, 3, 224, 224)
            return lambda: model.encode_image(x), "ViT-B/32 encode_image, 16 images"
        tokens = open_clip.get_tokenizer("ViT-B-32")(
            [f"This is an image of w{i}." for i in range(64)]
        )
        return lambda: model.encode_text(tokens), "ViT-B/32 encode_text, 64 prompts"
    if name == "yolo":
        from ultralytics import YOLO

        model = YOLO("yolo11n.yaml").model.fuse(verbose=False).eval()
        x = torch.rand(4, 3, 640, 640)
        return lambda: model(x), "YOLO11n fused forward, 4 images at 640"
    if name == "bert_step":
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig()).train()
        ids = torch.randint(1000, 20000, (8, 80))

        def step():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids).last_hidden_state.float().pow(2).mean().backward()

        return step, "BERT-base forward + backward, 8 x 80 tokens"
    raise ValueError(name)


def child(name: str, repeat: int, threads: int) -> dict:
    from pmu import runtime

    runtime.configure_process()
    import torch

    used = runtime.set_threads(threads)
    if os.environ.get("BENCH_NO_ONEDNN") == "1":
        torch.backends.mkldnn.enabled = False
    fn, what = build(name)
    grad = torch.enable_grad() if name == "bert_step" else torch.inference_mode()
    times = []
    with grad:
        fn()  # warm-up
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return {
        "workload": name,
        "what": what,
        "seconds": round(statistics.median(times), 4),
        "threads": used,
        "aten": torch.backends.cpu.get_cpu_capability(),
        "onednn": torch.backends.mkldnn.enabled,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.repeat, args.threads)))
        return
    rows = []
    for name in args.workloads.split(","):
        base = None
        for mode in args.modes.split(","):
            pinned = ("PMU_REPRODUCIBLE", "ATEN_CPU_CAPABILITY", "MKL_CBWR", "BENCH_NO_ONEDNN")
            env = {k: v for k, v in os.environ.items() if k not in pinned}
            env.update(MODES[mode], PMU_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
            env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", YOLO_OFFLINE="1")
            cmd = [sys.executable, __file__, "--child", name, "--repeat", str(args.repeat),
                   "--threads", str(args.threads)]  # fmt: skip
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            row = {"mode": mode, **json.loads(out.stdout.strip().splitlines()[-1])}
            base = base or row["seconds"]
            row["vs_machine"] = round(row["seconds"] / base, 2)
            rows.append(row)
            kernels = f"aten={row['aten']} onednn={row['onednn']} threads={row['threads']}"
            print(
                f"{name:<11} {mode:<14} {row['seconds']:8.3f} s  x{row['vs_machine']:<5} {kernels}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
