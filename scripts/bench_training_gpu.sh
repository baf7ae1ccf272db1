#!/usr/bin/env bash
# The training-throughput matrix of docs/benchmarks.md, on one GPU: baseline, then one optimisation at a time.
# Usage: bash scripts/bench_training_gpu.sh [OUT_DIR]   (needs CUDA; about 12 minutes on one H100, a guess)
# Each run writes OUT_DIR/<name>.json (tools/benchmark.py); a summary table is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench-gpu}
mkdir -p "$OUT"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
XL="--model STDiT-XL/2 --frames 16 --steps 10 --warmup 3"
run() {  # name, then benchmark arguments
  local name=$1; shift
  echo "== $name"
  rm -f "$OUT/$name.json"  # a failed run must not leave an old record in the table
  $PY tools/benchmark.py "$@" --out "$OUT/$name.json" || echo "!! $name failed (exit $?)"
}
# 16x256x256
run 256-fp32-eager-inline      $XL --height 256 --width 256 --batch 4 --engine ddp --dtype fp32
run 256-bf16-eager-inline      $XL --height 256 --width 256 --batch 8 --engine ddp
run 256-bf16-eager-cached      $XL --height 256 --width 256 --batch 8 --engine ddp --cached-latents
run 256-bf16-compile-cached    $XL --height 256 --width 256 --batch 8 --engine ddp --cached-latents --compile
run 256-fsdp-compile-cached    $XL --height 256 --width 256 --batch 8 --engine fsdp --cached-latents --compile
run 256-fsdp-compile-cached-b16 $XL --height 256 --width 256 --batch 16 --engine fsdp --cached-latents --compile
run 256-fsdp-compile-ckpt-b32  $XL --height 256 --width 256 --batch 32 --engine fsdp --cached-latents --compile --grad-ckpt
# 16x512x512
run 512-fsdp-compile-cached    $XL --height 512 --width 512 --batch 2 --engine fsdp --cached-latents --compile
run 512-fsdp-compile-ckpt-b8   $XL --height 512 --width 512 --batch 8 --engine fsdp --cached-latents --compile --grad-ckpt
# Wan 2.1 T2V 1.3B (issue 31) at 81x480x832 (Wan 2.1 VAE latent 21x60x104x16: 32,760 tokens, 512 text tokens), random
# weights of the published architecture, bf16 through FSDP2, every block checkpointed: LoRA rank 32, then full.
WAN="--model Wan2.1-T2V-1.3B --frames 81 --height 480 --width 832 --batch 1 --cached-latents --vae-compression 4x8x8
     --latent-channels 16 --engine fsdp --grad-ckpt --steps 5 --warmup 2"
run wan13b-81x480x832-lora32   $WAN --lora 32
run wan13b-81x480x832-full     $WAN
$PY - "$OUT" <<'PY'
import json, sys, pathlib
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    rows.append(f"| {f.stem} | {r['batch_per_device']} | {r['samples_per_s_per_device']:.2f} | "
                f"{r['achieved_tflops_per_device']:.0f} | {mfu} | {r['peak_memory_gib']:.1f} | {r['attention_backend']} |")
print("| run | batch | samples/s/GPU | TFLOP/s | MFU | peak GiB | attention |\n|---|---|---|---|---|---|---|")
print("\n".join(rows))
PY
