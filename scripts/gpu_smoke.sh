#!/usr/bin/env bash
# The first-GPU smoke check (tools/gpu_smoke.py): PASS / FAIL table + OUT/smoke.json, exit 1 on any FAIL.
#   bash scripts/gpu_smoke.sh OUT          # one H100/H200, about 5-8 minutes
#   bash scripts/gpu_smoke.sh OUT --cpu    # reduced CPU mode
# Every check runs in its own process under a time limit; the whole run is also capped here.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/gpu_smoke.sh OUT [--cpu] [--only CHECK ...]}
shift
[ -x .venv/bin/python ] || bash scripts/setup.sh
. .venv/bin/activate
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
exec timeout 900 python tools/gpu_smoke.py --out "$out" "$@"
