#!/usr/bin/env bash
# The whole project on built-in data, CPU only, no downloads: generated shapes videos -> data pipeline ->
# two-stage training -> sampling of held-out prompts -> report (demo_out/report/summary.txt).
# Re-running (also after Ctrl-C) reuses finished work. Extra arguments go to tools/demo.py, e.g.
#   bash scripts/demo.sh --out /tmp/demo --quick
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python tools/demo.py --out demo_out "$@"
