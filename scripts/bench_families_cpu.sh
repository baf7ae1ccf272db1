#!/usr/bin/env bash
# The family rows of docs/benchmarks.md (issue 31): tiny Wan 2.1 vs STDiT-debug on the same latent (17x64x64
# through a 4x8x8 causal VAE: 5x8x8, 4 channels), full fine-tune vs LoRA rank 8, fp32, FSDP2 world of one, cached
# latents. Usage: bash scripts/bench_families_cpu.sh [OUT_DIR]   (~1 min). One JSON per run (tools/benchmark.py).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-families-cpu}
mkdir -p "$OUT"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
LATENT="--frames 17 --height 64 --width 64 --batch 4 --cached-latents --vae-compression 4x8x8 --latent-channels 4"
run() {  # name, then benchmark arguments
  local name=$1; shift
  echo "== $name"
  rm -f "$OUT/$name.json"  # a failed run must not leave an old record in the table
  $PY tools/benchmark.py $LATENT --engine fsdp --steps 20 --warmup 3 --no-matmul-peak "$@" \
      --out "$OUT/$name.json" > /dev/null || echo "!! $name failed (exit $?)"
}
run stdit-debug-full --model STDiT-debug
run stdit-debug-lora8 --model STDiT-debug --lora 8
run tiny-wan2.1-full --model tiny-wan2.1
run tiny-wan2.1-lora8 --model tiny-wan2.1 --lora 8
$PY - "$OUT" <<'PY'
import json, sys, pathlib
print("| run | params (trainable) | text tokens | video tokens | step s | samples/s | MFLOP/sample | peak GiB (RSS) |")
print("|---|---|---|---|---|---|---|---|")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    tokens = r["tokens_per_s_per_device"] / r["samples_per_s_per_device"]
    print(f"| {f.stem} | {r['params'] / 1e6:.3f}M ({r['trainable_params'] / 1e6:.3f}M) | {r['text_len']} | "
          f"{tokens:.0f} | {r['step_s']:.4f} | {r['samples_per_s_per_device']:.1f} | "
          f"{r['train_tflop_per_sample'] * 1e6:.1f} | {r['peak_memory_gib']:.3f} |")
PY
