"""Cost report of a run, and cost forecast of a recipe.

    # What a run has cost so far, per stage (reads RUN_DIR/ledger.jsonl; works while the run is going on):
    python tools/cost.py report outputs/my_run [--json]

    # What a recipe will cost, from its FLOP count and an MFU (given, or measured by tools/benchmark.py):
    python tools/cost.py forecast --config configs/my_recipe.yaml --gpus 64 --gpu-type h800 --mfu 0.4
    python tools/cost.py forecast --config configs/my_recipe.yaml --gpus 8 --gpu-type h100 \\
        --benchmark bench.json --run-dir outputs/my_run          # actual figures beside the forecast
    python tools/cost.py forecast --config configs/my_recipe.yaml --set stages.1.steps=40000 ...  # as train.py

    # Open-Sora 1.0's video-pretraining budget (2808 H800 GPU-hours, ~$7,000) at a given MFU:
    python tools/cost.py forecast --opensora-v1 --gpus 8 --gpu-type h100 --mfu 0.45

    # The same with another autoencoder (a published one by name, or any T x H x W factors; no weights needed):
    python tools/cost.py forecast --opensora-v1 --vae wan2.1 --gpus 8 --gpu-type h100 --mfu 0.45
    python tools/cost.py forecast --config configs/my_recipe.yaml --vae-compression 4x8x8 ...

    # Autoencoders side by side: latent size, DiT tokens and training TFLOP per sample (docs/autoencoders.md):
    python tools/cost.py autoencoders --size 17x256x256 --size 17x512x512 [--vae-flops]

See docs/cost_accounting.md for the formulas and the ledger format.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python tools/x.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from opensora.accounting.flops import mfu as mfu_of
from opensora.accounting.flops import train_flops_per_sample, video_tokens
from opensora.accounting.forecast import (
    OPENSORA_V1_STAGE2,
    StageForecast,
    cost_stages,
    forecast_stage,
    opensora_v1_stage,
    recipe_autoencoder,
)
from opensora.accounting.gpu import GPU_SPECS
from opensora.accounting.ledger import CostSummary, StageSummary, ledger_files, summarize
from opensora.config import ConfigError
from opensora.models.autoencoders import AUTOENCODER_PRESETS, AutoencoderShape, frame_rule
from opensora.models.stdit import STDiT_models
from opensora.training.config import load_recipe


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:,.1f} h"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns except the first."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells))
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _summary_row(row: StageSummary) -> dict:
    s = row.spend
    return {
        "stage": row.stage, "hardware": row.hardware, "segments": s.segments, "crashed_segments": s.crashed_segments,
        "gpu_hours": s.gpu_hours, "dollars": s.dollars, "wall_s": s.wall_s, "samples": s.samples, "tokens": s.tokens,
        "flops": s.flops, "samples_per_s": s.samples_per_s, "samples_per_gpu_s": s.samples_per_gpu_s,
        "tokens_per_s": s.tokens_per_s, "mfu": s.mfu, "lost_s": s.lost_s, "lost_gpu_hours": s.lost_gpu_hours,
        "validation_s": s.val_s, "validation_gpu_hours": s.val_gpu_hours, "validation_dollars": s.val_dollars,
        "startup_s": s.startup_s, "startup_gpu_hours": s.startup_gpu_hours, "startup_dollars": s.startup_dollars,
        "skipped_steps": s.skipped_steps,
    }


def report_text(summary: CostSummary) -> str:
    """The cost report as a table: one row per stage, then the total."""
    header = ["stage", "hardware", "segs", "crashed", "wall", "GPU-h", "dollars", "samples", "samples/s", "/GPU",
              "tokens/s", "MFU", "lost GPU-h", "val GPU-h", "val $", "startup GPU-h", "startup $", "skipped"]
    rows = []
    for r in [*summary.stages, summary.total]:
        s = r.spend
        rows.append([
            r.stage, r.hardware, str(s.segments), str(s.crashed_segments), _duration(s.wall_s), f"{s.gpu_hours:,.3f}",
            f"${s.dollars:,.2f}", f"{s.samples:,}", f"{s.samples_per_s:,.2f}", f"{s.samples_per_gpu_s:,.3f}",
            f"{s.tokens_per_s:,.0f}", _pct(s.mfu), f"{s.lost_gpu_hours:,.3f}", f"{s.val_gpu_hours:,.3f}",
            f"${s.val_dollars:,.2f}", f"{s.startup_gpu_hours:,.3f}", f"${s.startup_dollars:,.2f}",
            f"{s.skipped_steps:,}",
        ])
    text = _table(header, rows)
    notes = ["samples are counted once per step (redone steps after a crash are not counted twice); "
             "throughput and MFU are over all paid time; lost = GPU-hours whose work was redone after a crash; "
             "val = the part of GPU-hours and dollars spent validating (held-out loss, sample videos); "
             "startup = the part from process start until training began (loading models, data, checkpoint), "
             "start-ups that died included; skipped = optimizer steps skipped as non-finite"]
    if summary.damaged_lines:
        notes.append(f"{summary.damaged_lines} damaged ledger line(s) skipped (a write torn by a crash)")
    return text + "\n" + "\n".join(f"note: {n}" for n in notes)


def cmd_report(args: argparse.Namespace) -> int:
    if not ledger_files(args.run_dir):
        print(f"error: no ledger.jsonl in {args.run_dir}", file=sys.stderr)
        return 2
    summary = summarize(args.run_dir)
    if args.json:
        print(json.dumps({"run_dir": str(args.run_dir), "stages": [_summary_row(r) for r in summary.stages],
                          "total": _summary_row(summary.total), "damaged_lines": summary.damaged_lines}, indent=2))
    else:
        print(f"cost report: {args.run_dir}")
        print(report_text(summary))
    return 0


def _mfu_source(args: argparse.Namespace, actual: CostSummary | None) -> tuple[float, str]:
    """The MFU to forecast with, and where it comes from."""
    if args.mfu is not None:
        return args.mfu, "given"
    if args.benchmark is not None:
        data = json.loads(Path(args.benchmark).read_text())
        if "mfu" not in data or not isinstance(data["mfu"], (int, float)):
            raise ConfigError(f"{args.benchmark}: no numeric 'mfu' field")
        return float(data["mfu"]), f"from benchmark {args.benchmark}"
    if actual is not None and actual.total.spend.mfu:
        return actual.total.spend.mfu, f"measured over the run in {args.run_dir}"
    raise ConfigError("no MFU: give --mfu, --benchmark FILE.json, or a --run-dir whose ledger has one")


def cmd_forecast(args: argparse.Namespace) -> int:
    if args.config is None and not args.opensora_v1:
        raise ConfigError("give --config FILE, --opensora-v1, or both")
    if args.config is None and args.set:
        raise ConfigError("--set overrides the recipe: give --config FILE")
    spec = GPU_SPECS.get(args.gpu_type)
    peak = args.peak_tflops if args.peak_tflops is not None else (spec.peak_bf16_tflops if spec else None)
    price = args.price if args.price is not None else (spec.price_per_hour if spec else None)
    if peak is None or price is None:
        raise ConfigError(f"GPU type {args.gpu_type!r} is not in the table ({', '.join(GPU_SPECS)}); "
                          "give --peak-tflops and --price")
    actual = None
    if args.run_dir is not None:
        if not ledger_files(args.run_dir):
            raise ConfigError(f"--run-dir {args.run_dir}: no ledger.jsonl there")
        actual = summarize(args.run_dir)
    mfu, mfu_from = _mfu_source(args, actual)
    if not 0 < mfu <= 1:
        raise ConfigError(f"MFU must be a fraction in (0, 1], got {mfu} ({mfu_from})")

    vae, vae_from = _vae_source(args)
    recipe = load_recipe(args.config, args.set) if args.config is not None else None
    stages = cost_stages(recipe, str(args.config), vae=vae) if recipe is not None else []
    forecasts = [forecast_stage(s, args.gpus, args.gpu_type, peak, price, mfu) for s in stages]
    actual_by_stage = {r.stage: r.spend for r in actual.stages} if actual is not None else {}
    if vae is None and recipe is not None:
        vae = recipe_autoencoder(recipe)
        vae_from = (f"recipe vae_compression {list(recipe.vae_compression)}" if recipe.vae_compression is not None
                    else f"recipe vae_downsample {vae.compression[1]}")

    if args.json:
        out = {"gpus": args.gpus, "gpu_type": args.gpu_type, "peak_tflops": peak, "price_per_gpu_hour": price,
               "mfu": mfu, "mfu_source": mfu_from, "stages": []}
        if vae is not None:
            out["vae"] = {**dataclasses.asdict(vae), "source": vae_from}
        for st, f in zip(stages, forecasts):
            row = dataclasses.asdict(f)
            row.update(num_frames=st.num_frames, latent_size=list(st.latent_size))
            if f.stage in actual_by_stage:
                row["actual"] = {k: v for k, v in _summary_row(StageSummary(f.stage, "", actual_by_stage[f.stage])).items()
                                 if k not in ("stage", "hardware")}
            out["stages"].append(row)
        if args.opensora_v1:
            out["opensora_v1"] = _opensora_v1(args.gpus, args.gpu_type, peak, price, mfu, _given(args, vae))
        print(json.dumps(out, indent=2))
        return 0

    price_from = "given" if args.price is not None else f"default for {args.gpu_type}"
    print(f"forecast: {args.gpus} x {args.gpu_type} (peak {peak:g} TFLOP/s dense bf16 per GPU), "
          f"MFU {_pct(mfu)} ({mfu_from}), ${price:.2f} per GPU-hour ({price_from})")
    if vae is not None and forecasts:
        print(f"autoencoder: {vae.summary()} ({vae_from})")
    if forecasts:
        header = ["stage", "model", "video", "latent", "batch", "steps", "samples", "TFLOP/sample", "GPU-h", "wall h",
                  "dollars"]
        if actual is not None:
            header += ["actual GPU-h", "actual $", "actual samples", "actual MFU"]
        rows = []
        for st, f in zip(stages, forecasts):
            row = [f.stage, st.model_name, f"{st.num_frames}x{st.image_size[0]}x{st.image_size[1]}",
                   "x".join(str(v) for v in st.latent_size), str(st.batch_size), f"{st.steps:,}", f"{f.samples:,}",
                   f"{f.flops_per_sample / 1e12:.3f}", f"{f.gpu_hours:,.1f}",
                   f"{f.wall_hours:,.1f}", f"${f.dollars:,.0f}"]
            if actual is not None:
                a = actual_by_stage.get(f.stage)
                row += ([f"{a.gpu_hours:,.3f}", f"${a.dollars:,.2f}", f"{a.samples:,}", _pct(a.mfu)] if a
                        else ["-", "-", "-", "-"])
            rows.append(row)
        total = ["total", "", "", "", "", "", f"{sum(f.samples for f in forecasts):,}", "",
                 f"{sum(f.gpu_hours for f in forecasts):,.1f}", f"{sum(f.wall_hours for f in forecasts):,.1f}",
                 f"${sum(f.dollars for f in forecasts):,.0f}"]
        if actual is not None:
            t = actual.total.spend
            total += [f"{t.gpu_hours:,.3f}", f"${t.dollars:,.2f}", f"{t.samples:,}", _pct(t.mfu)]
        rows.append(total)
        print(_table(header, rows))
    if args.opensora_v1:
        print(_opensora_v1_line(_opensora_v1(args.gpus, args.gpu_type, peak, price, mfu, _given(args, vae))))
    return 0


def _vae_source(args: argparse.Namespace) -> tuple[AutoencoderShape | None, str]:
    """The autoencoder given on the command line (--vae NAME or --vae-compression TxHxW), and where it is from."""
    if args.vae is not None:
        return AUTOENCODER_PRESETS[args.vae].shape, f"--vae {args.vae}"
    if args.vae_compression is not None:
        return AutoencoderShape.parse(args.vae_compression), f"--vae-compression {args.vae_compression}"
    return None, ""


def _given(args: argparse.Namespace, vae: AutoencoderShape | None) -> AutoencoderShape | None:
    """The autoencoder to compare Open-Sora 1.0's budget with: only one given on the command line."""
    return vae if args.vae is not None or args.vae_compression is not None else None


def _opensora_v1(gpus: int, gpu_type: str, peak: float, price: float, mfu: float,
                 vae: AutoencoderShape | None = None) -> dict:
    """Open-Sora 1.0's video pretraining stage: what it reported, the MFU that implies, and our forecast; with
    ``vae``, also the same budget with that autoencoder (``with_vae``) and how many times cheaper it is."""
    r = OPENSORA_V1_STAGE2
    stage = opensora_v1_stage()
    total = stage.samples * stage.flops_per_sample
    h800 = GPU_SPECS[r["gpu_type"]]
    implied_mfu = mfu_of(total / (r["gpu_hours"] * 3600.0), h800.peak_bf16_tflops * 1e12)
    ours = forecast_stage(stage, gpus, gpu_type, peak, price, mfu)
    out = {"samples": stage.samples, "flops_per_sample": stage.flops_per_sample, "total_flops": total,
           "reported_gpu_hours": r["gpu_hours"], "reported_gpu_type": r["gpu_type"],
           "reported_dollars": r["dollars"], "implied_mfu": implied_mfu,
           "forecast": dataclasses.asdict(ours)}
    if vae is not None:
        other = opensora_v1_stage(vae)
        out["with_vae"] = {"vae": vae.summary(), "num_frames": other.num_frames, "latent_size": list(other.latent_size),
                           "flops_per_sample": other.flops_per_sample,
                           "times_cheaper": stage.flops_per_sample / other.flops_per_sample,
                           "forecast": dataclasses.asdict(forecast_stage(other, gpus, gpu_type, peak, price, mfu))}
    return out


def _opensora_v1_line(d: dict) -> str:
    f = d["forecast"]
    r = OPENSORA_V1_STAGE2
    return (
        f"Open-Sora 1.0 stage 2 ({r['model']}, {r['num_frames']}x{r['image_size'][0]}x{r['image_size'][1]}, "
        f"{r['steps']:,} steps x {r['batch_size']} = {d['samples'] / 1e6:.2f}M samples x "
        f"{d['flops_per_sample'] / 1e12:.2f} TFLOP = {d['total_flops']:.3g} FLOP): reported "
        f"{d['reported_gpu_hours']:,.0f} {d['reported_gpu_type'].upper()} GPU-hours ~ ${d['reported_dollars']:,.0f} "
        f"(= {_pct(d['implied_mfu'])} MFU); at {_pct(f['mfu'])} MFU on {f['gpus']} x {f['gpu_type']} "
        f"(${f['price_per_gpu_hour']:.2f}/GPU-hour): {f['gpu_hours']:,.0f} GPU-hours, "
        f"{f['wall_hours']:,.1f} h wall, ${f['dollars']:,.0f}"
    ) + ("" if "with_vae" not in d else _with_vae_line(d["with_vae"]))


def _with_vae_line(w: dict) -> str:
    f, (t, h, wd) = w["forecast"], w["latent_size"]
    r = OPENSORA_V1_STAGE2
    return (
        f"\n  the same budget, autoencoder {w['vae']}, at {w['num_frames']}x{r['image_size'][0]}x"
        f"{r['image_size'][1]} (latent {t}x{h}x{wd}): {w['flops_per_sample'] / 1e12:.2f} TFLOP/sample, "
        f"{f['gpu_hours']:,.0f} GPU-hours, {f['wall_hours']:,.1f} h wall, ${f['dollars']:,.0f}: "
        f"{w['times_cheaper']:.2f}x cheaper than SD-VAE at {r['num_frames']} frames"
    )


def _parse_size(text: str) -> tuple[int, int, int]:
    try:
        T, H, W = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size {text!r}: give frames x height x width, e.g. 17x256x256") from None
    return T, H, W


def autoencoder_rows(model_name: str, sizes: list[tuple[int, int, int]], vae_flops: bool = False) -> list[dict]:
    """Per published autoencoder and video size: the clip it takes, its latent, the DiT's tokens and training
    FLOPs per sample (the model taking the autoencoder's latent channels), and the ratio to SD-VAE's FLOPs.

    Args:
        model_name: an STDiT size (``STDiT_models``).
        sizes: (T, H, W) videos; T becomes the smallest valid frame count >= T for each autoencoder.
        vae_flops: also count the autoencoder's own encode / decode FLOPs per clip, and the training step's
            FLOPs when it encodes its clips itself (no latent cache): DiT training + one encode.
    """
    base = STDiT_models[model_name]
    rows = []
    for T, H, W in sizes:
        sd_flops = sd_total = None
        for name, preset in AUTOENCODER_PRESETS.items():
            shape = preset.shape
            frames = max(shape.nearest_valid_num_frames(T))
            model = dataclasses.replace(base, in_channels=shape.latent_channels)
            row: dict = {"vae": name, "class": preset.class_name, "compression": list(shape.compression),
                         "latent_channels": shape.latent_channels, "frame_rule": frame_rule(shape.step, shape.causal),
                         "video": [frames, H, W]}
            try:
                latent = shape.latent_size((frames, H, W))
                flops = train_flops_per_sample(model, latent)
                row.update(latent=list(latent), tokens=video_tokens(model, latent), train_flops=flops)
            except ValueError as err:  # the size does not divide by the factors or the patch
                row.update(latent=None, tokens=None, train_flops=None, error=str(err))
                flops = None
            if name == "sd":
                sd_flops = flops
            row["times_cheaper_than_sd"] = sd_flops / flops if sd_flops and flops else None
            if vae_flops:
                row["encode_flops"], row["decode_flops"] = _vae_flops(preset, (frames, H, W))
                # Encoding inside the training step (no latent cache): forward only, once per sample.
                row["train_and_encode_flops"] = flops + row["encode_flops"] if flops else None
                if name == "sd":
                    sd_total = row["train_and_encode_flops"]
                total = row["train_and_encode_flops"]
                row["times_cheaper_than_sd_with_encode"] = sd_total / total if sd_total and total else None
            rows.append(row)
    return rows


def _vae_flops(preset, size: tuple[int, int, int]) -> tuple[float, float]:
    """(encode, decode) FLOPs of one clip through a published autoencoder, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from opensora.models.vae import AUTOENCODER_CLASSES

    cls = AUTOENCODER_CLASSES[preset.class_name]
    with torch.device("meta"):
        module = cls.module_class(**preset.config)
    T, H, W = size
    x = torch.empty((T, 3, H, W) if cls.per_frame else (1, 3, T, H, W), device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as enc:
        z = module.encode(x).latent_dist.mode()
    with torch.no_grad(), FlopCounterMode(display=False) as dec:
        module.decode(z, **cls.decode_kwargs(module, z))
    return float(enc.get_total_flops()), float(dec.get_total_flops())


def cmd_autoencoders(args: argparse.Namespace) -> int:
    sizes = [_parse_size(s) for s in (args.size or ["17x256x256", "17x512x512"])]
    rows = autoencoder_rows(args.model, sizes, args.vae_flops)
    if args.json:
        print(json.dumps({"model": args.model, "rows": rows}, indent=2))
        return 0
    print(f"{args.model} (patch {'x'.join(str(p) for p in STDiT_models[args.model].patch_size)}), training FLOPs "
          "per sample = 3 x forward, the DiT only; the model takes each autoencoder's latent channels")
    header = ["autoencoder", "compression", "ch", "frames", "video", "latent", "tokens", "TFLOP/sample", "vs sd"]
    if args.vae_flops:
        header += ["VAE enc TFLOP", "VAE dec TFLOP", "DiT+enc TFLOP", "vs sd"]
    table = []
    for r in rows:
        c = r["compression"]
        row = [r["vae"], f"{c[0]}x{c[1]}x{c[2]}", str(r["latent_channels"]), r["frame_rule"],
               "x".join(str(v) for v in r["video"]),
               "x".join(str(v) for v in r["latent"]) if r["latent"] else "n/a",
               f"{r['tokens']:,}" if r["tokens"] else "n/a",
               f"{r['train_flops'] / 1e12:.2f}" if r["train_flops"] else "n/a",
               f"{r['times_cheaper_than_sd']:.2f}x" if r["times_cheaper_than_sd"] else "-"]
        if args.vae_flops:
            total, ratio = r["train_and_encode_flops"], r["times_cheaper_than_sd_with_encode"]
            row += [f"{r['encode_flops'] / 1e12:.2f}", f"{r['decode_flops'] / 1e12:.2f}",
                    f"{total / 1e12:.2f}" if total else "n/a", f"{ratio:.2f}x" if ratio else "-"]
        table.append(row)
    print(_table(header, table))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("report", help="cost so far of a run, per stage")
    rep.add_argument("run_dir", type=Path, help="the run's output dir (holding ledger.jsonl)")
    rep.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rep.set_defaults(func=cmd_report)

    fc = sub.add_parser("forecast", help="predicted GPU-hours and dollars of a recipe")
    fc.add_argument("--config", type=Path, help="training recipe YAML/TOML (what train/train.py --config takes)")
    fc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe field as train/train.py does, e.g. --set stages.1.steps=40000")
    fc.add_argument("--gpus", type=int, required=True, help="GPUs of the job")
    fc.add_argument("--gpu-type", required=True, help=f"one of: {', '.join(GPU_SPECS)} (or any, with --peak-tflops and --price)")
    fc.add_argument("--price", type=float, help="USD per GPU-hour (default: the table's for --gpu-type)")
    fc.add_argument("--peak-tflops", type=float, help="dense bf16 peak per GPU (default: the table's)")
    fc.add_argument("--mfu", type=float, help="model FLOPs utilisation to assume, a fraction (0.4 = 40%%)")
    fc.add_argument("--benchmark", type=Path, help="JSON from tools/benchmark.py; its 'mfu' field is used")
    fc.add_argument("--run-dir", type=Path, help="a run of this recipe: its actual figures are shown beside")
    fc.add_argument("--opensora-v1", action="store_true",
                    help="also print what Open-Sora 1.0's stage-2 budget would cost at this MFU, GPU and price "
                         "(and, with --vae / --vae-compression, with that autoencoder)")
    vae = fc.add_mutually_exclusive_group()
    vae.add_argument("--vae", choices=list(AUTOENCODER_PRESETS),
                     help="price with this published autoencoder instead of the recipe's (factors, frame rule, "
                          "latent channels; no weights needed; docs/autoencoders.md)")
    vae.add_argument("--vae-compression", metavar="TxHxW",
                     help="price with an autoencoder of these factors, e.g. 4x8x8 (causal when T > 1: 4k+1 frames)")
    fc.add_argument("--json", action="store_true", help="print JSON instead of a table")
    fc.set_defaults(func=cmd_forecast)

    ae = sub.add_parser("autoencoders", help="the published autoencoders side by side: latent, tokens, TFLOP/sample")
    ae.add_argument("--model", default="STDiT-XL/2", choices=list(STDiT_models), help="the DiT to price")
    ae.add_argument("--size", action="append", metavar="TxHxW",
                    help="video size, repeatable (default 17x256x256 and 17x512x512); a frame count an autoencoder "
                         "does not take becomes the smallest larger one it does")
    ae.add_argument("--vae-flops", action="store_true",
                    help="also count each autoencoder's own encode / decode FLOPs per clip (torch FlopCounterMode on "
                         "the meta device: the published configs, no weights; a few seconds each)")
    ae.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ae.set_defaults(func=cmd_autoencoders)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, OSError, json.JSONDecodeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
