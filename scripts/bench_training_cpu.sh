#!/usr/bin/env bash
# The CPU rows of docs/benchmarks.md (training step): the demo's stage-2 shape, then STDiT-S/2 without, with
# all and with half of its blocks checkpointed. Usage: bash scripts/bench_training_cpu.sh [OUT_DIR]  (~2 min)
# Each run writes OUT_DIR/<name>.json (tools/benchmark.py); a summary table is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-cpu}
mkdir -p "$OUT"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
run() {  # name, then benchmark arguments
  local name=$1; shift
  echo "== $name"
  rm -f "$OUT/$name.json"  # a failed run must not leave an old record in the table
  $PY tools/benchmark.py --cached-latents "$@" --out "$OUT/$name.json" > /dev/null || echo "!! $name failed (exit $?)"
}
run debug-8x16x16-fsdp --model STDiT-debug --frames 8 --height 16 --width 16 --batch 8 --vae-downsample 1 \
    --engine fsdp --steps 30 --warmup 5
S2="--model STDiT-S/2 --frames 16 --height 128 --width 128 --batch 2 --engine ddp --steps 5 --warmup 2"
run s2-16x128x128-plain    $S2
run s2-16x128x128-ckpt-all $S2 --grad-ckpt
run s2-16x128x128-ckpt-6   $S2 --grad-ckpt-blocks 6
$PY - "$OUT" <<'PY'
import json, sys, pathlib
print("| run | batch | step s | samples/s | tokens/s | TFLOP/s | of measured matmul peak | peak GiB (RSS) |")
print("|---|---|---|---|---|---|---|---|")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    print(f"| {f.stem} | {r['batch_per_device']} | {r['step_s']:.3f} | {r['samples_per_s_per_device']:.3g} | "
          f"{r['tokens_per_s_per_device']:.0f} | {r['achieved_tflops_per_device']:.3f} | "
          f"{100 * r['mfu_vs_matmul_peak']:.0f}% of {r['matmul_peak_tflops']:.3f} | {r['peak_memory_gib']:.2f} |")
PY
