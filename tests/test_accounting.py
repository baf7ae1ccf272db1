"""Accounting: STDiT FLOP formula (checked against torch's FlopCounterMode), GPU table, ledger across crashes,
budgets, and the report / forecast CLI."""

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from opensora.accounting import (
    BudgetConfig,
    Ledger,
    canonical_gpu_name,
    check_budget,
    detect_gpu_type,
    measure_matmul_tflops,
    peak_tflops,
    read_ledger,
    stdit_forward_flops,
    summarize,
    train_flops_per_sample,
    video_tokens,
)
from opensora.accounting.flops import latent_size_of
from opensora.accounting.forecast import cost_stages, forecast_stage, opensora_v1_stage
from opensora.config import ConfigError
from opensora.models import STDiT, STDiT_models, stdit_config
from opensora.models.autoencoders import AUTOENCODER_PRESETS, AutoencoderShape
from opensora.training import load_recipe
from tools import cost

ROOT = Path(__file__).resolve().parents[1]
XL2 = STDiT_models["STDiT-XL/2"]


# ---------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------


def test_xl2_training_flops_match_the_issue_figures():
    # Issue 6: ~17 TFLOP per 16x256x256 sample and ~73 per 16x512x512 sample (latent /8, 120 tokens).
    at256 = train_flops_per_sample(XL2, (16, 32, 32), 120)
    at512 = train_flops_per_sample(XL2, (16, 64, 64), 120)
    assert at256 == pytest.approx(17e12, rel=0.03)
    assert at512 == pytest.approx(73e12, rel=0.03)
    assert at256 == 3 * stdit_forward_flops(XL2, (16, 32, 32), 120)
    assert video_tokens(XL2, (16, 32, 32)) == 16 * 16 * 16


def _counted_flops(model, B, latent, L, backward=False):
    """FLOPs torch counts for one forward (and backward) of ``model`` on a batch of B, per sample."""
    T, H, W = latent
    g = torch.Generator().manual_seed(0)
    c = model.config
    x = torch.randn(B, c.in_channels, T, H, W, generator=g)
    y = torch.randn(B, 1, L, c.caption_channels, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    # The math backend decomposes attention into bmm's, which the counter sees (the fused CPU kernel is not counted).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, torch.tensor([3.0] * B), y, mask)
        if backward:
            out.square().mean().backward()
    return counter.get_total_flops() / B


@pytest.mark.parametrize(
    "fields, latent, L",
    [
        (dict(), (4, 8, 8), 6),
        (dict(pred_sigma=False, mlp_ratio=2.0, num_heads=4), (2, 6, 10), 5),
        (dict(patch_size=(2, 2, 2), in_channels=3), (4, 8, 4), 6),
    ],
)
def test_forward_formula_equals_flop_counter_on_a_real_stdit(fields, latent, L):
    cfg = stdit_config("STDiT-debug", **{**dict(depth=2, hidden_size=32, num_heads=2, caption_channels=16,
                                               model_max_length=L), **fields})
    torch.manual_seed(0)
    model = STDiT(cfg)
    assert _counted_flops(model, 2, latent, L) == stdit_forward_flops(cfg, latent, L)


def test_backward_is_about_twice_the_forward():
    cfg = stdit_config("STDiT-debug", depth=2, hidden_size=32, num_heads=2, caption_channels=16, model_max_length=6)
    torch.manual_seed(0)
    model = STDiT(cfg)
    counted = _counted_flops(model, 2, (4, 8, 8), 6, backward=True)
    # Exactly 3x except the patch embedding, whose input (the latent) needs no gradient.
    assert counted == pytest.approx(train_flops_per_sample(cfg, (4, 8, 8), 6), rel=0.03)
    assert counted < train_flops_per_sample(cfg, (4, 8, 8), 6)


def test_latent_not_divisible_by_patch_is_an_error():
    with pytest.raises(ValueError, match=r"\(16, 33, 32\).*patch size"):
        stdit_forward_flops(XL2, (16, 33, 32), 120)


# ---------------------------------------------------------------------------------------------------
# GPU table
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device_name, expected",
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA H100 NVL", "h100-nvl"),
        ("NVIDIA H200 NVL", "h200-nvl"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H800", "h800"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA A800-SXM4-80GB", "a800"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA GeForce RTX 4090", "4090"),
        ("NVIDIA RTX A6000", "nvidia-rtx-a6000"),
    ],
)
def test_canonical_gpu_names(device_name, expected):
    assert canonical_gpu_name(device_name) == expected


def test_peaks_are_dense_not_sparse():
    assert peak_tflops("h100") == pytest.approx(989, abs=1)
    assert peak_tflops("h800") == peak_tflops("h100")
    assert peak_tflops("a100") == 312
    assert peak_tflops("nvidia-rtx-a6000") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_detect_without_cuda_is_cpu():
    assert detect_gpu_type() == "cpu"


def test_measured_matmul_peak_on_cpu(monkeypatch):
    """2 * size^3 FLOPs per timed product over the timed seconds, with the clock read around the timed loop only."""
    import opensora.accounting.gpu as gpu_mod

    tflops = measure_matmul_tflops("cpu", torch.float32, size=128, iters=3)
    assert math.isfinite(tflops) and tflops > 0
    clock = iter([100.0, 100.25])  # a third read (e.g. around the warm-up too) raises StopIteration
    monkeypatch.setattr(gpu_mod.time, "perf_counter", lambda: next(clock))
    assert measure_matmul_tflops("cpu", torch.float32, size=128, iters=3) == pytest.approx(2 * 128**3 * 3 / 0.25 / 1e12)


# ---------------------------------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def run_steps(ledger, clock, first, last, seconds_per_step=10.0, batch=4, tokens=100, flops=1e12):
    """Steps first+1..last, one update each, ``seconds_per_step`` apart."""
    for step in range(first + 1, last + 1):
        clock.t += seconds_per_step
        ledger.update(step, samples=batch, tokens=batch * tokens, flops=batch * flops)


def new_ledger(tmp_path, clock, stage="stage1", **kw):
    args = dict(num_gpus=2, gpu_type="h100", price_per_gpu_hour=3.0, heartbeat_s=25.0, clock=clock)
    return Ledger(tmp_path, stage, **{**args, **kw})


def test_round_trip_of_a_finished_segment(tmp_path):
    clock = FakeClock()
    led = new_ledger(tmp_path, clock)
    led.start_segment(0)
    run_steps(led, clock, 0, 10)  # 100 s
    led.checkpoint_saved(10)
    led.end_segment("finished", 10)
    lines = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines] == ["start"] + ["heartbeat"] * 3 + ["checkpoint", "end"]
    assert lines[0]["gpu_type"] == "h100" and lines[0]["num_gpus"] == 2 and lines[0]["price_per_gpu_hour"] == 3.0

    (seg,) = read_ledger(tmp_path)
    assert seg.end_reason == "finished" and not seg.crashed
    assert seg.wall_s == pytest.approx(100.0) and seg.lost_s == 0.0
    assert seg.gpu_hours == pytest.approx(200 / 3600) and seg.dollars == pytest.approx(200 / 3600 * 3.0)
    spend = summarize(tmp_path).total.spend
    assert (spend.samples, spend.tokens, spend.flops) == (40, 4000, 40e12)
    assert spend.mfu == pytest.approx(40e12 / (100 * 2 * 989e12))
    assert spend.samples_per_s == pytest.approx(0.4)


def test_crashed_segment_counts_time_to_last_heartbeat_and_its_lost_work(tmp_path):
    clock = FakeClock()
    led = new_ledger(tmp_path, clock)
    led.start_segment(0)
    run_steps(led, clock, 0, 6)  # heartbeats at 30 s (step 3), 60 s (step 6)
    led.checkpoint_saved(6)  # at 60 s
    run_steps(led, clock, 6, 11)  # heartbeats at 90 s (step 9); steps 10-11 never reach the ledger
    # kill -9 here: no end record, and a write torn in the middle.
    with open(tmp_path / "ledger.jsonl", "a") as f:
        f.write('{"event": "heartbeat", "segm')

    (crashed,) = read_ledger(tmp_path)
    assert crashed.crashed and crashed.wall_s == pytest.approx(90.0)
    assert crashed.lost_s == pytest.approx(30.0)  # 60 s (checkpoint) -> 90 s (last heartbeat)
    assert crashed.useful.samples == 6 * 4

    # Resume from the checkpoint at step 6 on another ledger object (a new process), finish at 12.
    clock2 = FakeClock()
    led2 = new_ledger(tmp_path, clock2)
    led2.start_segment(6)
    run_steps(led2, clock2, 6, 12)
    led2.end_segment("finished", 12)

    first, second = read_ledger(tmp_path)  # the torn line did not swallow the new start record
    assert first.segment_id == crashed.segment_id and first.run_id == second.run_id
    assert first.lost_s == pytest.approx(30.0)
    summary = summarize(tmp_path)
    assert summary.damaged_lines == 1
    total = summary.total.spend
    assert total.segments == 2 and total.crashed_segments == 1
    assert total.wall_s == pytest.approx(90.0 + 60.0)
    assert total.gpu_hours == pytest.approx(150 * 2 / 3600)
    assert total.lost_gpu_hours == pytest.approx(30 * 2 / 3600)
    assert total.samples == 12 * 4  # steps 7-9 ran twice but are counted once
    assert total.flops == pytest.approx((9 + 6) * 4e12)  # executed work, redone steps included


def test_resume_from_an_older_checkpoint_loses_the_work_after_it(tmp_path):
    clock = FakeClock()
    led = new_ledger(tmp_path, clock, heartbeat_s=0.0)
    led.start_segment(0)
    run_steps(led, clock, 0, 4)
    led.checkpoint_saved(4)
    run_steps(led, clock, 4, 8)
    led.end_segment("sigterm", 8)  # its checkpoint at 8 was lost, say: the user resumes from 4
    led2 = new_ledger(tmp_path, clock, heartbeat_s=0.0)
    led2.start_segment(4)
    first = led2.segments()[0]
    assert first.lost_s == pytest.approx(40.0) and first.useful.samples == 16


def test_two_segments_of_two_stages_sum(tmp_path):
    clock = FakeClock()
    a = new_ledger(tmp_path, clock, stage="stage1", num_gpus=4, price_per_gpu_hour=2.0)
    a.start_segment(0)
    run_steps(a, clock, 0, 36, seconds_per_step=100.0)  # 1 h
    a.end_segment("finished", 36)
    b = new_ledger(tmp_path, clock, stage="stage2", num_gpus=8, price_per_gpu_hour=3.0)
    b.start_segment(0)
    run_steps(b, clock, 0, 18, seconds_per_step=100.0)  # 0.5 h
    b.end_segment("max_steps", 18)
    summary = summarize(tmp_path)
    s1, s2 = summary.stages
    assert (s1.stage, s1.hardware, s2.stage, s2.hardware) == ("stage1", "4 x h100", "stage2", "8 x h100")
    assert s1.spend.gpu_hours == pytest.approx(4.0) and s1.spend.dollars == pytest.approx(8.0)
    assert s2.spend.gpu_hours == pytest.approx(4.0) and s2.spend.dollars == pytest.approx(12.0)
    assert summary.total.spend.dollars == pytest.approx(20.0)
    assert summary.total.spend.samples == (36 + 18) * 4


def test_rank_other_than_zero_writes_nothing(tmp_path):
    clock = FakeClock()
    led = new_ledger(tmp_path, clock, enabled=False, heartbeat_s=0.0)
    led.start_segment(0)
    run_steps(led, clock, 0, 5)
    led.checkpoint_saved(5)
    assert led.spent().gpu_hours == pytest.approx(50 * 2 / 3600)  # it can still answer
    led.end_segment("finished", 5)
    assert list(tmp_path.iterdir()) == []


def test_spent_includes_past_segments_and_the_running_one(tmp_path):
    clock = FakeClock()
    led = new_ledger(tmp_path, clock)
    led.start_segment(0)
    run_steps(led, clock, 0, 3)
    led.end_segment("finished", 3)
    led2 = new_ledger(tmp_path, clock)
    led2.start_segment(3)
    clock.t += 15  # no update yet: the running segment's time still counts
    spend = led2.spent("stage1")
    assert spend.segments == 2 and spend.wall_s == pytest.approx(45.0)
    assert led2.spent("other").segments == 0


def test_unknown_gpu_without_price_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="nvidia-rtx-a6000.*price_per_gpu_hour"):
        Ledger(tmp_path, "s", num_gpus=1, gpu_type="nvidia-rtx-a6000")


# ---------------------------------------------------------------------------------------------------
# Budgets
# ---------------------------------------------------------------------------------------------------


def test_budget_stage_and_recipe_caps(tmp_path):
    clock = FakeClock()
    a = new_ledger(tmp_path, clock, stage="stage1", num_gpus=1, price_per_gpu_hour=10.0)
    a.start_segment(0)
    run_steps(a, clock, 0, 18, seconds_per_step=100.0)  # 0.5 GPU-h, $5
    a.end_segment("finished", 18)
    b = new_ledger(tmp_path, clock, stage="stage2", num_gpus=1, price_per_gpu_hour=10.0)
    b.start_segment(0)
    run_steps(b, clock, 0, 9, seconds_per_step=100.0)  # 0.25 GPU-h, $2.5
    assert check_budget(b, BudgetConfig(max_dollars=3.0), BudgetConfig(max_gpu_hours=1.0)) is None
    run_steps(b, clock, 9, 12, seconds_per_step=100.0)  # stage2: $3.33
    msg = check_budget(b, BudgetConfig(max_dollars=3.0), None)
    assert msg is not None and "stage 'stage2'" in msg and "$3.33" in msg and "max_dollars $3.00" in msg
    msg = check_budget(b, None, BudgetConfig(max_gpu_hours=0.8))
    assert msg is not None and "recipe spent 0.83 GPU-hours" in msg and "max_gpu_hours 0.80" in msg
    with pytest.raises(ValueError, match="max_dollars"):
        BudgetConfig(max_dollars=0)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def make_run(run_dir):
    """A run with a finished stage1 (2 x h100, 100 s) and a crashed stage2 (1 x a100, 60 s, 20 s lost)."""
    clock = FakeClock()
    a = new_ledger(run_dir, clock, stage="stage1", heartbeat_s=0.0)
    a.start_segment(0)
    run_steps(a, clock, 0, 10)
    a.end_segment("finished", 10)
    b = new_ledger(run_dir, clock, stage="stage2", num_gpus=1, gpu_type="a100", price_per_gpu_hour=None,
                   heartbeat_s=0.0)
    b.start_segment(0)
    run_steps(b, clock, 0, 4)
    b.checkpoint_saved(4)
    run_steps(b, clock, 4, 6)  # then crash


def test_report_cli_table_and_json(tmp_path, capsys):
    make_run(tmp_path)
    assert cost.main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "2 x h100" in lines["stage1"] and "$0.17" in lines["stage1"]  # 200 GPU-s x $3/h
    assert "1 x a100" in lines["stage2"] and "0.006" in lines["stage2"]  # 20 GPU-s lost = 0.0056 GPU-h
    assert "$0.19" in lines["total"]  # + 60 s x $1.5/h (a100 default)

    assert cost.main(["report", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in data["stages"]] == ["stage1", "stage2"]
    stage2 = data["stages"][1]
    assert stage2["crashed_segments"] == 1 and stage2["lost_s"] == pytest.approx(20.0)
    assert stage2["samples"] == 16 and stage2["mfu"] == pytest.approx(24e12 / (60 * 312e12))
    assert data["total"]["dollars"] == pytest.approx(200 / 3600 * 3.0 + 60 / 3600 * 1.5)


def test_report_cli_without_ledger(tmp_path, capsys):
    assert cost.main(["report", str(tmp_path)]) == 2
    assert "no ledger.jsonl" in capsys.readouterr().err


# A training recipe (RecipeConfig, what train/train.py takes): the forecast reads the same file and checks.
RECIPE = """
vae_downsample: 8
data: {manifest: data/manifest.parquet}
optim: {grad_clip: 0.5}
stages:
  - name: stage1
    model: STDiT-XL/2
    num_frames: 16
    image_size: [256, 256]
    batch_size: 512
    steps: 1000
    lr: 2.0e-5
    init: {vae: /models/sd-vae-ft-ema, text_encoder: /models/t5-v1_1-xxl}
  - name: stage2
    model: STDiT-debug
    num_frames: 8
    image_size: [64, 64]
    batch_size: 4
    steps: 50
    lr: 1.0e-4
"""


def test_forecast_cli(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    assert cost.main(["forecast", "--config", str(recipe), "--gpus", "8", "--gpu-type", "h100", "--mfu", "0.4",
                      "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    s1 = data["stages"][0]
    expected_gpu_h = 512_000 * train_flops_per_sample(XL2, (16, 32, 32), 120) / (0.4 * 989e12) / 3600
    assert s1["gpu_hours"] == pytest.approx(expected_gpu_h)
    assert s1["wall_hours"] == pytest.approx(expected_gpu_h / 8) and s1["dollars"] == pytest.approx(expected_gpu_h * 2.5)
    assert data["stages"][1]["samples"] == 200

    # MFU from a benchmark file, actual figures beside, and the Open-Sora 1.0 line.
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"mfu": 0.25, "samples_per_s": 1.0}))
    run = tmp_path / "run"
    make_run(run)
    assert cost.main(["forecast", "--config", str(recipe), "--gpus", "8", "--gpu-type", "h800", "--price", "2",
                      "--benchmark", str(bench), "--run-dir", str(run), "--opensora-v1"]) == 0
    out = capsys.readouterr().out
    assert "MFU 25.0% (from benchmark" in out and "$2.00 per GPU-hour (given)" in out
    stage1 = next(line for line in out.splitlines() if line.startswith("stage1"))
    assert stage1.split()[-4:] == ["0.056", "$0.17", "40", "0.0%"]  # actual: 200 GPU-s, 40 samples
    v1 = next(line for line in out.splitlines() if line.startswith("Open-Sora 1.0"))
    assert "2,808 H800 GPU-hours" in v1 and "(= 7.0% MFU)" in v1  # issue 6: "averaged about 7 %"
    v1_gpu_h = 40.96e6 * train_flops_per_sample(XL2, (16, 32, 32), 120) / (0.25 * 989e12) / 3600
    assert f"{v1_gpu_h:,.0f} GPU-hours" in v1


def test_forecast_cli_errors(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    assert cost.main(["forecast", "--config", str(recipe), "--gpus", "8", "--gpu-type", "h100"]) == 2
    assert "no MFU" in capsys.readouterr().err
    assert cost.main(["forecast", "--config", str(recipe), "--gpus", "8", "--gpu-type", "tpu", "--mfu", "0.4"]) == 2
    assert "'tpu' is not in the table" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.replace("image_size: [64, 64]", "image_size: [60, 64]"))
    # A size the recipe's autoencoder cannot take fails when the recipe loads (the trainer's check too).
    with pytest.raises(ConfigError, match=r"stages\[1\] \('stage2'\).*\(8, 60, 64\): H=60.*downsampling.*bad\.yaml"):
        load_recipe(bad)
    assert cost.main(["forecast", "--config", str(bad), "--gpus", "8", "--gpu-type", "h100", "--mfu", "0.4"]) == 2
    assert "stages[1] ('stage2'): video size (T, H, W) = (8, 60, 64): H=60" in capsys.readouterr().err
    # The recipe's own schema and checks: a mistyped key, a missing field, a bad override name the source.
    bad.write_text(RECIPE.replace("steps: 50", "stepz: 50"))
    assert cost.main(["forecast", "--config", str(bad), "--gpus", "8", "--gpu-type", "h100", "--mfu", "0.4"]) == 2
    assert re.search(r"bad\.yaml: key 'stepz': Key 'stepz' not in 'StageConfig'", capsys.readouterr().err)
    bad.write_text(RECIPE.replace("    steps: 50\n", ""))
    assert cost.main(["forecast", "--config", str(bad), "--gpus", "8", "--gpu-type", "h100", "--mfu", "0.4"]) == 2
    assert re.search(r"key .stages\[1\]\.steps.: .*missing mandatory value.*bad\.yaml", capsys.readouterr().err)
    assert cost.main(["forecast", "--config", str(recipe), "--gpus", "8", "--gpu-type", "h100", "--mfu", "0.4",
                      "--set", "stages.2.steps=1"]) == 2
    assert "--set stages.2.steps=1: key 'stages.2': index 2 is out of range" in capsys.readouterr().err
    assert cost.main(["forecast", "--opensora-v1", "--gpus", "8", "--gpu-type", "h100", "--mfu", "0.4",
                      "--set", "stages.0.steps=1"]) == 2
    assert "give --config" in capsys.readouterr().err


def test_forecast_follows_recipe_overrides(tmp_path, capsys):
    """`--set` overrides the recipe exactly as train/train.py does; the forecast prices what would be trained."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)

    def forecast(*overrides: str) -> list[dict]:
        sets = [a for o in overrides for a in ("--set", o)]
        assert cost.main(["forecast", "--config", str(recipe), "--gpus", "8", "--gpu-type", "h100", "--mfu", "0.4",
                          "--json", *sets]) == 0
        return json.loads(capsys.readouterr().out)["stages"]

    base = forecast()
    more = forecast("stages.1.steps=500", "stages.1.batch_size=8")
    assert more[0] == base[0]
    assert (base[1]["samples"], more[1]["samples"]) == (200, 4000)
    assert more[1]["gpu_hours"] == pytest.approx(20 * base[1]["gpu_hours"])
    # model_overrides reach the FLOP count: fewer text tokens, fewer cross-attention FLOPs.
    shorter = forecast("stages.1.model_overrides={model_max_length: 8}")
    debug = STDiT_models["STDiT-debug"]
    assert shorter[1]["flops_per_sample"] == pytest.approx(train_flops_per_sample(debug, (8, 8, 8), 8))
    assert shorter[1]["flops_per_sample"] < base[1]["flops_per_sample"]


def test_forecast_reads_the_shipped_recipes():
    v1 = cost_stages(load_recipe(ROOT / "configs/opensora_v1/recipe.yaml"))
    pretrain = next(s for s in v1 if s.name == "pretrain-16x256")
    assert (pretrain.batch_size, pretrain.steps, pretrain.image_size) == (512, 80_000, (256, 256))
    assert pretrain.model.space_scale == 0.5  # the stage's model_overrides
    demo = cost_stages(load_recipe(ROOT / "configs/demo/train.yaml"))
    assert [(s.num_frames, s.vae.compression) for s in demo] == [(4, (1, 1, 1)), (8, (1, 1, 1))]


# ---------------------------------------------------------------------------------------------------
# Compressed latents (issue 13): the forecast takes the autoencoder's factors, no weights
# ---------------------------------------------------------------------------------------------------


def test_latent_size_of_takes_compression_and_causality():
    assert latent_size_of(16, (256, 256)) == latent_size_of(16, (256, 256), 8) == (16, 32, 32)  # SD-VAE per frame
    assert latent_size_of(17, (256, 256), (4, 8, 8), causal=True) == (5, 32, 32)
    assert latent_size_of(17, (512, 512), (8, 32, 32), causal=True) == (3, 16, 16)
    assert latent_size_of(16, (256, 256), (4, 8, 8), causal=False) == (4, 32, 32)
    with pytest.raises(ValueError, match="16 frames do not fit .*4k\\+1.*13 and 17"):
        latent_size_of(16, (256, 256), (4, 8, 8), causal=True)
    with pytest.raises(ValueError, match="8k\\+1.*9 and 17"):
        latent_size_of(13, (256, 256), (4, 8, 8), causal=True, frame_step=8)  # CogVideoX


def test_4x8x8_causal_forecast_is_over_3x_cheaper_than_sd_vae():
    """Issue 13's target: Open-Sora 1.0's stage-2 budget, 17 frames through a 4x8x8 causal VAE vs 16 through SD-VAE,
    at the same MFU. The ratio is 3.18 (5 latent frames of 16 channels vs 16 of 4; FLOPs are nearly linear in
    tokens, the temporal attention's T^2 and the wider patch embedding move it off 16/5 = 3.2)."""
    sd = opensora_v1_stage()
    wan = opensora_v1_stage(AutoencoderShape((4, 8, 8), causal=True, latent_channels=16))
    assert (sd.num_frames, sd.latent_size, sd.model.in_channels) == (16, (16, 32, 32), 4)
    assert (wan.num_frames, wan.latent_size, wan.model.in_channels) == (17, (5, 32, 32), 16)
    assert wan.samples == sd.samples
    f_sd, f_wan = (forecast_stage(s, 64, "h800", 989.0, 2.0, 0.3) for s in (sd, wan))
    ratio = f_sd.gpu_hours / f_wan.gpu_hours
    assert ratio == pytest.approx(sd.flops_per_sample / wan.flops_per_sample)
    assert 3.0 <= ratio < 3.2
    xl2_16 = dataclasses.replace(XL2, in_channels=16)
    assert ratio == pytest.approx(train_flops_per_sample(XL2, (16, 32, 32), 120)
                                  / train_flops_per_sample(xl2_16, (5, 32, 32), 120), rel=1e-12)
    # Every 4x8x8 preset prices the same; the presets' shapes are the forecast's.
    for name in ("wan2.1", "hunyuan", "cogvideox"):
        assert opensora_v1_stage(AUTOENCODER_PRESETS[name].shape).flops_per_sample == wan.flops_per_sample


def test_forecast_cli_with_another_autoencoder(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    base = ["forecast", "--config", str(recipe), "--gpus", "8", "--gpu-type", "h100", "--mfu", "0.4"]
    # The recipe's 16 and 8 frames do not fit a 4x causal VAE: the error names the stage and the counts to use.
    assert cost.main([*base, "--vae", "wan2.1"]) == 2
    assert re.search(r"stages\[0\] \('stage1'\).*16 frames do not fit wan2.1.*13 and 17", capsys.readouterr().err)
    frames = ["--set", "stages.0.num_frames=17", "--set", "stages.1.num_frames=9"]
    assert cost.main([*base, *frames, "--vae", "wan2.1", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    s1 = data["stages"][0]
    assert s1["latent_size"] == [5, 32, 32] and data["vae"]["compression"] == [4, 8, 8] and data["vae"]["causal"]
    xl2_16 = dataclasses.replace(XL2, in_channels=16)
    assert s1["flops_per_sample"] == pytest.approx(train_flops_per_sample(xl2_16, (5, 32, 32), 120))
    # Explicit factors: channels unknown, so the model keeps its own (4).
    assert cost.main([*base, *frames, "--vae-compression", "4x8x8", "--json"]) == 0
    s1 = json.loads(capsys.readouterr().out)["stages"][0]
    assert s1["flops_per_sample"] == pytest.approx(train_flops_per_sample(XL2, (5, 32, 32), 120))
    assert cost.main([*base, *frames, "--vae-compression", "4x8"]) == 2
    assert "give T x H x W factors" in capsys.readouterr().err
    # The table shows the latent; the Open-Sora 1.0 line compares its budget with the given autoencoder.
    assert cost.main([*base, *frames, "--vae", "wan2.1", "--opensora-v1"]) == 0
    out = capsys.readouterr().out
    assert "autoencoder: 4x8x8 causal (4k+1 frames), 16 ch (--vae wan2.1)" in out
    assert "5x32x32" in next(line for line in out.splitlines() if line.startswith("stage1"))
    wan_flops = train_flops_per_sample(xl2_16, (5, 32, 32), 120)
    times = train_flops_per_sample(XL2, (16, 32, 32), 120) / wan_flops
    assert re.search(rf"at 17x256x256 \(latent 5x32x32\): {wan_flops / 1e12:.2f} TFLOP/sample.*"
                     rf"{times:.2f}x cheaper than SD-VAE at 16", out)
    assert cost.main([*base, "--json"]) == 0  # no --vae: the recipe's vae_downsample
    assert json.loads(capsys.readouterr().out)["vae"]["compression"] == [1, 8, 8]


def test_autoencoders_table(capsys):
    rows = cost.autoencoder_rows("STDiT-XL/2", [(16, 256, 256)])
    by = {r["vae"]: r for r in rows}
    assert set(by) == set(AUTOENCODER_PRESETS)
    assert by["sd"]["video"] == [16, 256, 256] and by["sd"]["latent"] == [16, 32, 32]
    assert by["wan2.1"]["video"] == [17, 256, 256] and by["wan2.1"]["tokens"] == 5 * 16 * 16
    assert by["ltx"]["video"] == [17, 256, 256] and by["ltx"]["latent"] == [3, 8, 8]
    assert by["wan2.1"]["times_cheaper_than_sd"] == pytest.approx(by["sd"]["train_flops"] / by["wan2.1"]["train_flops"])
    assert cost.main(["autoencoders", "--size", "17x256x256"]) == 0
    out = capsys.readouterr().out
    wan_flops = train_flops_per_sample(dataclasses.replace(XL2, in_channels=16), (5, 32, 32), 120)
    times = train_flops_per_sample(XL2, (17, 32, 32), 120) / wan_flops  # SD-VAE at the same 17 frames
    assert re.search(rf"wan2\.1 +4x8x8 +16 +4k\+1 +17x256x256 +5x32x32 +1,280 +{wan_flops / 1e12:.2f} +{times:.2f}x", out)
    assert cost.main(["autoencoders", "--size", "17x256"]) == 2
    # The autoencoders' own FLOPs, counted on the meta device: per frame, SD-VAE's grow with the frames.
    sd = AUTOENCODER_PRESETS["sd"]
    one, nine = cost._vae_flops(sd, (1, 64, 64)), cost._vae_flops(sd, (9, 64, 64))
    assert nine[0] == pytest.approx(9 * one[0]) and nine[1] == pytest.approx(9 * one[1]) and one[0] > 0
