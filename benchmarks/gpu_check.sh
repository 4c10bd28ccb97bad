#!/usr/bin/env bash
# The GPU figures the CPU-only development machine cannot take, in one run on a GPU machine
# (written for one H100, 16 cores, no network):
#   1. labeling throughput: detect-objects (conf 0 and 0.25) and label-objects, 2048 images,
#      M = L = 1000 (benchmarks/label_throughput.py --device cuda);
#   2. trainer throughput, tiny and base, eager and torch.compile (benchmarks/trainer_throughput.py);
#   3. CUDA run-to-run byte identity of boxes.parquet and every shard member, both decode places
#      (benchmarks/shard_bytes.py twice, compared);
#   4. the 2-rank DDP step agreement (tests/test_pretrain_step.py, gloo; NCCL needs 2 GPUs);
# then prints a short table and the GPU name. Logs and JSON go to $OUT (default runs/gpu_check).
#
#   benchmarks/gpu_check.sh [WHEELS_DIR]      # or WHEELS=... ; wheels: see below
#   SIZE=tiny benchmarks/gpu_check.sh         # tiny sizes, --device cpu: a dry run anywhere
#
# Wheels (no network): put open_clip_torch, ultralytics, ultralytics-thop, webdataset,
# braceexpand, ftfy, wcwidth, pytorch-crf (and their own missing dependencies) in WHEELS_DIR,
# e.g. `pip download --no-deps -d wheels/ open_clip_torch ...` on a machine with network
# (`wheels/` is git-ignored). The GPU image already has torch, transformers, timm, typer,
# pyarrow, pillow. Packages that import already are not reinstalled.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
SIZE="${SIZE:-full}"
WHEELS="${1:-${WHEELS:-$REPO/wheels}}"
OUT="${OUT:-$REPO/runs/gpu_check}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 YOLO_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ "$SIZE" = tiny ]; then
  DEVICE=cpu
  LABEL_ARGS=(--images 8 --entities 16 --relations 8 --naive-images 1 --rss-images 0
              --skip-cpu-figures --detect-workers 1 --workers 2 --decode device
              --detect-conf 0 0.25 --samples-per-shard 4)
  TRAIN_ARGS=(--arch tiny --batch-size 4 --workers 1 --steps 2 --loader-batches 2 --compile no)
  BYTES_PRESET=tiny
else
  DEVICE=cuda
  LABEL_ARGS=(--images 2048 --entities 1000 --relations 1000 --detect-conf 0 0.25)
  TRAIN_ARGS=(--arch both --batch-size 128 --workers 15 --compile both)
  BYTES_PRESET=base-random
fi

declare -A STATUS
step() {  # step NAME command...: run, log to $OUT/NAME.log, remember pass / FAIL
  local name=$1
  shift
  echo "== $name: $*"
  local t0=$SECONDS
  if "$@" >"$OUT/$name.log" 2>&1; then
    STATUS[$name]="pass ($((SECONDS - t0)) s)"
  else
    STATUS[$name]="FAIL rc=$? ($((SECONDS - t0)) s; see $OUT/$name.log)"
    tail -n 20 "$OUT/$name.log"
  fi
}

# ---------------------------------------------------------------------------- 1. install
missing=()
for mod in open_clip ultralytics thop webdataset braceexpand ftfy wcwidth torchcrf; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if [ ${#missing[@]} -eq 0 ]; then
  STATUS[install]="skipped (all packages import)"
elif [ -d "$WHEELS" ]; then
  step install "$PY" -m pip install --no-index --find-links "$WHEELS" \
    open_clip_torch ultralytics ultralytics-thop webdataset braceexpand ftfy wcwidth pytorch-crf
else
  STATUS[install]="FAIL: ${missing[*]} missing and no wheels folder $WHEELS"
fi
if "$PY" -c "import pipeline, importlib.metadata as m; m.version('prompt-me-up')" 2>/dev/null; then
  STATUS[project]="skipped (installed)"
else
  # setuptools>=77 builds it: the image's own, else one from the wheels folder.
  step project "$PY" -m pip install --no-index --no-deps --no-build-isolation -e "$REPO"
  if [[ "${STATUS[project]}" == FAIL* ]]; then
    step project "$PY" -m pip install --no-index --find-links "$WHEELS" --no-deps -e "$REPO"
  fi
  if [[ "${STATUS[project]}" == FAIL* ]]; then  # not fatal: PYTHONPATH points at the checkout
    STATUS[project]="not installed, running from PYTHONPATH=$REPO (see $OUT/project.log)"
  fi
fi

# ---------------------------------------------------------------------------- 2. benchmarks
step label "$PY" benchmarks/label_throughput.py --device "$DEVICE" "${LABEL_ARGS[@]}" \
  --json "$OUT/label.json"
step trainer "$PY" benchmarks/trainer_throughput.py --device "$DEVICE" "${TRAIN_ARGS[@]}" \
  --json "$OUT/trainer.json"

# ---------------------------------------------------------------------------- 3. run-to-run bytes
rm -rf "$OUT/bytes-ws"
step bytes_run1 "$PY" benchmarks/shard_bytes.py --device "$DEVICE" --preset "$BYTES_PRESET" \
  --workdir "$OUT/bytes-ws" --out "$OUT/bytes1.json"
rm -rf "$OUT/bytes-ws"
step bytes_run2 "$PY" benchmarks/shard_bytes.py --device "$DEVICE" --preset "$BYTES_PRESET" \
  --workdir "$OUT/bytes-ws" --out "$OUT/bytes2.json" --compare "$OUT/bytes1.json"

# ---------------------------------------------------------------------------- 4. DDP agreement
if "$PY" -c "import pytest" 2>/dev/null; then
  step ddp_gloo "$PY" -m pytest -q -p no:cacheprovider \
    "tests/test_pretrain_step.py::test_two_ddp_ranks_equal_one_process_on_the_global_batch"
else
  STATUS[ddp_gloo]="skipped (no pytest)"
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
STATUS[ddp_nccl]="not run: the repository's DDP agreement check runs gloo ranks on CPU; an NCCL version needs 2 GPUs (found $GPUS)"

# ---------------------------------------------------------------------------- 5. report
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
OUT="$OUT" SIZE="$SIZE" DEVICE="$DEVICE" GPU_NAME="${GPU_NAME:-none}" "$PY" - <<'PY' || true
import json, os
from pathlib import Path

out = Path(os.environ["OUT"])
print(f"\n== gpu_check ({os.environ['SIZE']}, device {os.environ['DEVICE']}) ==")
print(f"GPU: {os.environ['GPU_NAME']}")
label = out / "label.json"
if label.is_file():
    f = json.loads(label.read_text())
    stages = {f"detect {k}": v for k, v in f["detect"].items()} | {"label": f["label"]}
    keys = [("images/s", "images_per_s"), ("ratio to limit", "ratio_to_limit"),
            ("GPU util %", "gpu_util_mean_pct"), ("main CPU ms/img", "main_cpu_ms_per_image"),
            ("  host side", "main_cpu_ms_per_image_host_side"),
            ("h2d bytes/img", "h2d_bytes_per_image")]
    print("stage".ljust(16) + "".join(k.rjust(17) for k, _ in keys))
    for name, s in stages.items():
        print(name.ljust(16) + "".join(str(s.get(key)).rjust(17) for _, key in keys))
trainer = out / "trainer.json"
if trainer.is_file():
    t = json.loads(trainer.read_text())
    print(f"trainer ({t.get('device')}, torch {t.get('torch')}):")
    cols = ("arch", "step_samples_per_s", "mfu", "loader_over_step",
            "host_syncs_per_step")
    print("".join(c.rjust(20) for c in cols))
    for row in t.get("rows", []):
        vals = [row.get(c) for c in cols]
        print("".join((f"{v:.3g}" if isinstance(v, float) else str(v)).rjust(20) for v in vals))
PY
echo
for name in install project label trainer bytes_run1 bytes_run2 ddp_gloo ddp_nccl; do
  printf '%-11s %s\n' "$name" "${STATUS[$name]:-not run}"
done
fail=0
for name in "${!STATUS[@]}"; do
  case "${STATUS[$name]}" in FAIL*) fail=1 ;; esac
done
exit $fail
