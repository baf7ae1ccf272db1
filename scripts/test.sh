#!/usr/bin/env bash
# The one test command: sets up .venv (see setup.sh) and runs the whole suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec python -m pytest -q -ra "$@"
