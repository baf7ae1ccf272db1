#!/usr/bin/env bash
# What a 3D causal VAE's latents change (docs/autoencoders.md, docs/benchmarks.md), in one run on a CPU:
#  1. tokens and training TFLOP per sample of STDiT-XL/2 at 17x256x256 and 17x512x512 for every published
#     autoencoder's factors (tools/cost.py autoencoders; counted, not timed);
#  2. the measured training step of STDiT-S/2 (fp32, cached latents, DDP world of one) at 128x128 on SD-VAE-shaped
#     latents (1x8x8, 4 ch; 16 frames as Open-Sora 1.0, and 17) and on Wan-2.1-shaped latents (4x8x8 causal, 16 ch,
#     17 frames -> 5 latent frames), batch 2 and 4, and the step-time ratios;
#  3. Open-Sora 1.0's stage-2 budget (80k steps x 512 samples) priced with each autoencoder at the same MFU
#     (tools/cost.py forecast --opensora-v1 --vae NAME; 64 x H100 at 40% MFU).
# Usage: bash scripts/bench_autoencoders_cpu.sh [OUT_DIR]   (default docs/bench_results/autoencoders; 4 min on
# the 2-core VM of docs/benchmarks.md). Writes OUT_DIR/*.json and prints the tables of docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-docs/bench_results/autoencoders}
mkdir -p "$OUT"
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1

echo "== 1. STDiT-XL/2 tokens and TFLOP per sample"
$PY tools/cost.py autoencoders --model STDiT-XL/2 --size 17x256x256 --size 17x512x512 --json > "$OUT/xl2_per_sample.json"

echo "== 2. STDiT-S/2 training step at 128x128, SD-VAE vs Wan 2.1 latents"
S2="--model STDiT-S/2 --height 128 --width 128 --engine ddp --dtype fp32 --cached-latents --steps 5 --warmup 2"
rm -f "$OUT"/s2-*.json  # the table is this run's only: a failed run must not leave an old record in it
run() {  # name, then benchmark arguments
  local name=$1; shift
  echo "-- $name"
  $PY tools/benchmark.py $S2 "$@" --out "$OUT/$name.json" > /dev/null 2>&1 || echo "!! $name failed (exit $?)"
}
SD="--vae-downsample 8"                                # per frame, 4 channels (the model's default in_channels)
WAN="--vae-compression 4x8x8 --latent-channels 16"     # 17 frames -> 5 latent frames, 16 channels
run s2-sd-16x128x128-b2 --frames 16 --batch 2 $SD
run s2-sd-17x128x128-b2 --frames 17 --batch 2 $SD
run s2-wan21-17x128x128-b2 --frames 17 --batch 2 $WAN
# Batch 4 too: the optimizer step, gradient clipping and EMA cost the same per step whatever the latent, so
# they weigh less in the ratio at a larger batch (the CPU's own efficiency changes with the batch as well).
run s2-sd-16x128x128-b4 --frames 16 --batch 4 $SD
run s2-wan21-17x128x128-b4 --frames 17 --batch 4 $WAN

echo "== 3. Open-Sora 1.0 stage-2 budget with each autoencoder"
$PY - "$OUT" <<'PY'
import contextlib, io, json, pathlib, sys
from opensora.models.autoencoders import AUTOENCODER_PRESETS
from tools import cost
out = {}
for name in AUTOENCODER_PRESETS:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cost.main(["forecast", "--opensora-v1", "--vae", name, "--gpus", "64", "--gpu-type", "h100",
                          "--mfu", "0.4", "--json"]) == 0
    out[name] = json.loads(buf.getvalue())["opensora_v1"]
pathlib.Path(sys.argv[1], "opensora_v1_stage2.json").write_text(json.dumps(out, indent=2) + "\n")
PY

$PY - "$OUT" <<'PY'
import json, os, pathlib, platform, sys, time
import torch
out = pathlib.Path(sys.argv[1])
per_sample = json.loads((out / "xl2_per_sample.json").read_text())["rows"]
print("\nSTDiT-XL/2, DiT training TFLOP per sample (3 x forward), latent cache (the VAE's own cost not included):")
print("| autoencoder | compression | ch | video | latent | tokens | TFLOP/sample | vs sd |")
print("|---|---|---|---|---|---|---|---|")
for r in per_sample:
    print(f"| {r['vae']} | {'x'.join(map(str, r['compression']))} | {r['latent_channels']} | "
          f"{'x'.join(map(str, r['video']))} | {'x'.join(map(str, r['latent']))} | {r['tokens']:,} | "
          f"{r['train_flops'] / 1e12:.2f} | {r['times_cheaper_than_sd']:.2f}x |")

runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("s2-*.json"))}
print("\nSTDiT-S/2 training step, fp32, cached latents, DDP world of one:")
print("| run | batch | latent (T x h x w x C) | tokens/sample | TFLOP/sample | step s | samples/s | TFLOP/s | "
      "of measured matmul peak |")
print("|---|---|---|---|---|---|---|---|---|")
for name, r in runs.items():
    tokens = r["tokens_per_s_per_device"] / r["samples_per_s_per_device"]
    print(f"| {name} | {r['batch_per_device']} | {'x'.join(map(str, r['latent']))}x{r['latent_channels']} | "
          f"{tokens:,.0f} | {r['train_tflop_per_sample']:.4f} | {r['step_s']:.3f} | "
          f"{r['samples_per_s_per_device']:.3f} | {r['achieved_tflops_per_device']:.3f} | "
          f"{100 * r['mfu_vs_matmul_peak']:.0f}% of {r['matmul_peak_tflops']:.3f} |")
summary = {"machine": {"cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                       "processor": platform.processor() or platform.machine(), "torch": torch.__version__},
           "time": time.strftime("%Y-%m-%d %H:%M:%S")}
print()
summary["ratios"] = {}
for sd_name, wan_name in (("s2-sd-16x128x128-b2", "s2-wan21-17x128x128-b2"),
                          ("s2-sd-17x128x128-b2", "s2-wan21-17x128x128-b2"),
                          ("s2-sd-16x128x128-b4", "s2-wan21-17x128x128-b4")):
    sd, wan = runs.get(sd_name), runs.get(wan_name)
    if sd and wan:
        step = sd["step_s"] / wan["step_s"]
        flops = sd["train_tflop_per_sample"] / wan["train_tflop_per_sample"]
        summary["ratios"][f"{sd_name} / {wan_name}"] = {"step_time": step, "flops_per_sample": flops}
        print(f"step time {sd_name} / {wan_name}: {step:.2f}x (FLOPs per sample {flops:.2f}x)")

v1 = json.loads((out / "opensora_v1_stage2.json").read_text())
print("\nOpen-Sora 1.0 stage 2 (80,000 steps x 512 = 40.96M samples), 64 x H100 at 40% MFU, $2.50/GPU-hour:")
print("| autoencoder | video | latent | TFLOP/sample | GPU-hours | wall h | dollars | vs SD-VAE at 16 frames |")
print("|---|---|---|---|---|---|---|---|")
for name, d in v1.items():
    w = d["with_vae"]
    f = w["forecast"]
    print(f"| {name} | {w['num_frames']}x256x256 | {'x'.join(map(str, w['latent_size']))} | "
          f"{w['flops_per_sample'] / 1e12:.2f} | {f['gpu_hours']:,.0f} | {f['wall_hours']:.1f} | ${f['dollars']:,.0f} | "
          f"{w['times_cheaper']:.2f}x |")
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
PY
