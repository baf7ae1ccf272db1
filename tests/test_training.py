"""Training: recipe schema and its errors, LR schedule, EMA, a 2-stage recipe end to end in-process, budget
stop, and (slow) exact resume after kill -9, SIGTERM checkpoint, and a 2-process torchrun run of FSDP2.

Everything is tiny: STDiT-debug in pixel space (identity VAE) with the tiny random T5, 16x16 clips of a few
frames written in the test.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from opensora.accounting import read_ledger
from opensora.bundle import load_bundle
from opensora.config import ConfigError
from opensora.data.manifest import write_manifest
from opensora.data.video_io import write_video
from opensora.distributed import init_distributed
from opensora.models.stdit import STDiT, stdit_config
from opensora.training import EMA, StopFlag, WarmupSchedule, load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 70, 230), "yellow": (230, 210, 40)}

RECIPE = """
vae_downsample: 1
seed: 0
data:
  manifest: {manifest}
  frame_interval: 1
  num_workers: 0
parallel: {{engine: fsdp, param_dtype: fp32}}
ema: {{decay: 0.9, warmup: true}}
logging: {{log_every: 1, ckpt_every: {ckpt_every}, keep_checkpoints: 2, tensorboard: false, progress: false}}
accounting: {{price_per_gpu_hour: 1.0, heartbeat_s: 0}}
stages:
  - name: short
    model: STDiT-debug
    num_frames: 2
    image_size: [16, 16]
    batch_size: 4
    micro_batch_size: 2
    steps: {steps0}
    lr: 1.0e-3
    warmup_steps: 2
    init: {{vae: identity, text_encoder: tiny}}
  - name: long
    model: STDiT-debug
    model_overrides: {{class_dropout_prob: 0.2}}
    num_frames: 4
    image_size: [16, 16]
    batch_size: 4
    steps: {steps1}
    lr: 5.0e-4
    lr_schedule: cosine
"""


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Eight 6-frame 16x16 clips: a coloured square moving left or right on white."""
    out = tmp_path_factory.mktemp("clips")
    rows = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        for direction in ("left", "right"):
            frames = np.full((6, 16, 16, 3), 255, np.uint8)
            for t in range(6):
                x = 2 + 2 * t if direction == "right" else 12 - 2 * t
                frames[t, 6:10, x : x + 4] = rgb
            path = write_video(out / f"{name}_{direction}.mp4", frames, fps=8, crf=0)
            rows.append(dict(path=str(path), text=f"a {name} square moving {direction}", num_frames=6,
                             height=16, width=16, fps=8.0))
    return write_manifest(pd.DataFrame(rows), out / "manifest.parquet")


def write_recipe(tmp_path: Path, manifest: Path, steps0: int = 3, steps1: int = 2, ckpt_every: int = 100) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(manifest=manifest, steps0=steps0, steps1=steps1, ckpt_every=ckpt_every))
    return path


def metrics(run: Path, stage: str) -> dict[int, dict]:
    """Rows of a stage's metrics.jsonl by step (a resumed run's later row for a step wins)."""
    rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row for row in rows}


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# -- schema -----------------------------------------------------------------------------------------------------
def test_config_errors_name_the_key_and_the_file(tmp_path, manifest):
    recipe = write_recipe(tmp_path, manifest)
    cfg = load_recipe(recipe, ["stages.1.steps=7", "optim.grad_clip=0.5"])
    assert cfg.stages[1].steps == 7 and cfg.optim.grad_clip == 0.5 and cfg.stages[0].image_size == (16, 16)

    bad = tmp_path / "bad.yaml"
    bad.write_text(recipe.read_text().replace("warmup_steps: 2", "warmup_stepz: 2"))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*warmup_stepz"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match=r"--set stages\.0\.lr=fast.*stages\[0\]\.lr"):
        load_recipe(recipe, ["stages.0.lr=fast"])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.init.*first stage"):
        load_recipe(recipe, ["stages.0.init.vae=null", "stages.0.init.text_encoder=null"])
    with pytest.raises(ConfigError, match=r"unknown STDiT size 'STDiT-XXL'"):
        load_recipe(recipe, ["stages.1.model=STDiT-XXL"])
    with pytest.raises(ConfigError, match=r"model_overrides\.depth.*parameter shapes"):
        load_recipe(recipe, ["stages.1.model_overrides.depth=3"])
    with pytest.raises(ConfigError, match=r"stages\[1\]\.data\.num_workerz"):
        load_recipe(recipe, ["stages.1.data.num_workerz=1"])
    with pytest.raises(ConfigError, match=r"names must be unique"):
        load_recipe(recipe, ["stages.1.name=short"])
    with pytest.raises(ConfigError, match=r"rflow: timestep options.*'iddpm'"):
        load_recipe(recipe, ["diffusion=iddpm", "rflow.logit_mean=1.0"])
    with pytest.raises(ConfigError, match=r"rflow\.logit_std"):
        load_recipe(recipe, ["diffusion=rflow", "rflow.logit_std=0"])


def test_shipped_recipes_load():  # the cost forecast reads them too (tests/test_accounting.py)
    assert load_recipe(ROOT / "configs/opensora_v1/recipe.yaml").stages[0].init.checkpoint_format == "pixart"
    demo = load_recipe(ROOT / "configs/demo/train.yaml")
    assert [s.num_frames for s in demo.stages] == [4, 8]


# -- LR schedule and EMA ---------------------------------------------------------------------------------------
def test_warmup_then_constant_or_cosine():
    constant = WarmupSchedule(warmup_steps=4, total_steps=10, schedule="constant", min_ratio=0.0)
    assert [constant(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # 11 updates: 2 of warm-up, then the cosine from the peak (update 3, scheduler step 2) to min_lr at the last
    # update (scheduler step 10 = total_steps - 1), over 8 scheduler steps: the midpoint is step 6.
    cosine = WarmupSchedule(warmup_steps=2, total_steps=11, schedule="cosine", min_ratio=0.1)
    assert cosine(0) == 0.5 and cosine(2) == pytest.approx(1.0)
    assert cosine(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine(10) == pytest.approx(0.1) and cosine(9) > 0.1 and cosine(50) == pytest.approx(0.1)
    values = [cosine(s) for s in range(2, 11)]
    assert all(a > b for a, b in zip(values, values[1:])), "decreasing after warm-up"


def test_ema_is_an_fp32_average_of_the_weights():
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    assert all(v.dtype == torch.float32 for v in start.values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(step=1)
    for name, p in model.named_parameters():
        expected = 0.9 * start[name] + 0.1 * p.float()
        torch.testing.assert_close(ema.state_dict()[name], expected)
    warm = EMA(model, decay=0.999, warmup=True)
    assert warm.decay_at(1) == pytest.approx(2 / 11) and warm.decay_at(10**6) == 0.999


def test_ema_upcasts_low_precision_weights_a_bounded_chunk_at_a_time(monkeypatch):
    """Under ZeRO the model holds bf16 weights: the update must not make an fp32 copy of all of them at once."""
    from opensora.training import ema as ema_module

    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)).to(torch.bfloat16)
    model[1].float()  # an fp32 layer among bf16 ones is read in place
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    upcast, lerp = [], torch._foreach_lerp_
    storage = {p.data_ptr() for p in model.parameters()}

    def counting_lerp(shadow, current, weight):
        upcast.append(sum(c.numel() for c in current if c.data_ptr() not in storage))  # copies only
        return lerp(shadow, current, weight)

    monkeypatch.setattr(ema_module, "UPDATE_CHUNK", 12)
    monkeypatch.setattr(torch, "_foreach_lerp_", counting_lerp)
    ema.update(step=1)
    largest = max(p.numel() for p in model.parameters())
    assert len(upcast) > 1 and max(upcast) <= max(12, largest)
    for name, p in model.named_parameters():
        torch.testing.assert_close(ema.state_dict()[name], 0.9 * start[name] + 0.1 * p.float())


# -- end to end --------------------------------------------------------------------------------------------------
def test_two_stage_recipe_end_to_end_and_rerun_skips(tmp_path, manifest, capsys):
    recipe = load_recipe(write_recipe(tmp_path, manifest))
    run = tmp_path / "run"
    assert run_recipe(recipe, run, init_distributed()) == "finished"

    # The agreed run-dir layout.
    assert (run / "recipe.yaml").is_file() and (run / "ledger.jsonl").is_file()
    for stage, steps in (("short", 3), ("long", 2)):
        rows = metrics(run, stage)
        assert sorted(rows) == list(range(1, steps + 1))
        for row in rows.values():
            assert math.isfinite(row["loss"]) and row["grad_norm"] > 0 and row["samples_per_s"] > 0
            assert 0 <= row["data_wait"] <= 1 and row["mfu"] > 0 and row["dollars"] >= 0
        assert (run / stage / "checkpoints" / f"step-{steps:08d}").is_dir()
    assert metrics(run, "short")[1]["lr"] == pytest.approx(1e-3 / 2), "warm-up: first update at lr/2"

    # Each export is a bundle tools/sample.py can load; the second stage started from the first one's export
    # and carries the stage's own model overrides.
    bundle = load_bundle(run / "long" / "export", device="cpu")
    assert bundle.model.config.class_dropout_prob == 0.2 and bundle.config.vae.type == "identity"
    video = bundle.generate(["a red square moving left"], num_frames=4, height=16, width=16, steps=2, progress=False)
    assert video.shape == (1, 3, 4, 16, 16)
    short = load_bundle(run / "short" / "export", device="cpu")
    assert short.model.final_layer.linear.weight.any(), "the zero-initialised output layer was trained"

    segments = read_ledger(run)
    assert [(s.stage, s.end_reason) for s in segments] == [("short", "finished"), ("long", "finished")]
    assert segments[0].marks[-1].samples == 3 * 4

    capsys.readouterr()
    assert run_recipe(recipe, run, init_distributed()) == "finished"
    out = capsys.readouterr().out
    assert "stage 'short': finished before" in out and "stage 'long': finished before" in out
    assert len(read_ledger(run)) == 2, "skipped stages open no ledger segment"


def test_budget_stop_writes_a_checkpoint_and_says_what_was_spent(tmp_path, manifest, capsys):
    # 3 GPU-seconds at $3600/GPU-hour: reached after a few steps of the 1000.
    recipe = load_recipe(write_recipe(tmp_path, manifest, steps0=1000),
                         ["accounting.price_per_gpu_hour=3600", "stages.0.budget.max_dollars=3"])
    run = tmp_path / "run"
    assert run_recipe(recipe, run, init_distributed()) == "budget"
    out = capsys.readouterr().out
    segment = read_ledger(run)[-1]
    step = segment.last_step
    assert segment.end_reason == "budget" and 1 <= step < 1000 and segment.dollars >= 3
    assert f"stopped at step {step} with a checkpoint: budget reached: stage 'short' spent" in out
    assert "cap max_dollars $3.00" in out
    assert (run / "short" / "checkpoints" / f"step-{step:08d}").is_dir()
    assert not (run / "short" / "export").exists() and not (run / "long").exists()

    # Raising the cap continues from the checkpoint.
    recipe = load_recipe(write_recipe(tmp_path, manifest, steps0=step + 1))
    assert run_recipe(recipe, run, init_distributed(), only_stage="short") == "finished"
    assert read_ledger(run)[-1].start_step == step
    assert sorted(metrics(run, "short")) == list(range(1, step + 2))


def test_max_steps_and_stop_flag_checkpoint_and_a_stage_needs_its_init(tmp_path, manifest, capsys):
    recipe = load_recipe(write_recipe(tmp_path, manifest))
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="starts from the export of stage 'short'"):
        run_recipe(recipe, run, init_distributed(), only_stage="long")
    assert run_recipe(recipe, run, init_distributed(), max_steps=1) == "max_steps"
    assert (run / "short" / "checkpoints" / "step-00000001").is_dir() and not (run / "short" / "export").exists()
    assert "stopped (max_steps) at step 1 with a checkpoint" in capsys.readouterr().out
    stop = StopFlag(reason="sigterm")  # what the SIGTERM handler sets
    assert run_recipe(recipe, run, init_distributed(), stop=stop) == "sigterm"
    assert [(s.start_step, s.end_reason) for s in read_ledger(run)] == [(0, "max_steps"), (1, "sigterm")]


def test_cli_config_error_exit_code(tmp_path, manifest, capsys):
    spec = importlib.util.spec_from_file_location("train_entry", ROOT / "train" / "train.py")
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    recipe = write_recipe(tmp_path, manifest)
    assert entry.main(["--config", str(recipe), "--output-dir", str(tmp_path / "run"), "--set", "optim.lr=1"]) == 2
    assert "--set optim.lr=1: key 'optim.lr'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_pixart_checkpoint_into_a_zero_step_stage(tmp_path, manifest):
    """A 0-step stage converts a PixArt-α checkpoint: spatial weights taken over, temporal attention an identity."""
    pixart = STDiT(stdit_config("STDiT-debug", in_channels=3))
    state = {k: v for k, v in pixart.state_dict().items() if ".attn_temp." not in k}
    state["x_embedder.proj.weight"] = state["x_embedder.proj.weight"][:, :, 0]  # PixArt's Conv2d patch embedding
    state["pos_embed"] = torch.zeros(1, 64, 64)  # a fixed-size buffer PixArt saved
    torch.save({"state_dict": state}, tmp_path / "PixArt-debug.pth")
    recipe = load_recipe(write_recipe(tmp_path, manifest), [
        "stages.0.steps=0", f"stages.0.init.checkpoint={tmp_path / 'PixArt-debug.pth'}",
        "stages.0.init.checkpoint_format=pixart",
    ])
    run = tmp_path / "run"
    assert run_recipe(recipe, run, init_distributed(), only_stage="short") == "finished"
    exported = load_bundle(run / "short" / "export", device="cpu").model.state_dict()
    for key, value in pixart.state_dict().items():
        if ".attn_temp." not in key:
            assert torch.equal(exported[key], value), key
    assert not exported["blocks.0.attn_temp.proj.weight"].any(), "temporal attention starts with a zero output"
    assert not (run / "short" / "checkpoints").exists(), "nothing trained, nothing to checkpoint"

    wrong = STDiT(stdit_config("STDiT-debug", in_channels=3, hidden_size=32))
    torch.save(wrong.state_dict(), tmp_path / "wrong.pth")
    bad = load_recipe(write_recipe(tmp_path, manifest), [
        "stages.0.steps=0", f"stages.0.init.checkpoint={tmp_path / 'wrong.pth'}",
        "stages.0.init.checkpoint_format=pixart",
    ])
    with pytest.raises(ValueError, match="wrong.pth is not a PixArt-α checkpoint"):
        run_recipe(bad, tmp_path / "run2", init_distributed(), only_stage="short")


@pytest.mark.slow
def test_engines_agree_in_one_process(tmp_path, manifest):
    """FSDP2, DDP and the ColossalAI booster (TorchDDPPlugin on CPU) train the same first steps."""
    losses = {}
    for engine in ("fsdp", "ddp", "colossalai"):
        recipe = load_recipe(write_recipe(tmp_path, manifest, steps0=2), [f"parallel.engine={engine}"])
        run = tmp_path / engine
        assert run_recipe(recipe, run, init_distributed(), only_stage="short") == "finished"
        losses[engine] = [metrics(run, "short")[s]["loss"] for s in (1, 2)]
    assert losses["ddp"] == pytest.approx(losses["fsdp"], rel=1e-5)
    assert losses["colossalai"] == pytest.approx(losses["fsdp"], rel=1e-5)


def test_rflow_timestep_options_reach_the_trainer(tmp_path, manifest):
    """rflow.logit_mean moves the training timesteps: same data and seed, different losses once the model moved.

    Step 1 is the same for both: a fresh model (zero final layer) predicts zero velocity, and the velocity
    target x0 - noise does not depend on t. After one update the prediction depends on x_t, so on t."""
    losses = {}
    for mean in (-3.0, 3.0):
        recipe = load_recipe(write_recipe(tmp_path, manifest, steps0=3), ["diffusion=rflow", f"rflow.logit_mean={mean}"])
        run = tmp_path / f"mean{mean}"
        assert run_recipe(recipe, run, init_distributed(), only_stage="short") == "finished"
        losses[mean] = [metrics(run, "short")[s]["loss"] for s in (1, 2, 3)]
    assert losses[-3.0][0] == pytest.approx(losses[3.0][0], rel=1e-6), losses
    assert all(abs(a - b) > 1e-4 for a, b in zip(losses[-3.0][1:], losses[3.0][1:])), losses


# -- slow: real processes ------------------------------------------------------------------------------------------
def train_cmd(recipe: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train" / "train.py"), "--config", str(recipe), "--output-dir", str(run), *extra]


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_same_losses(tmp_path, manifest):
    """N steps straight vs. killed (-9) after its checkpoint at N/2 and resumed: identical losses, bit for bit."""
    recipe = write_recipe(tmp_path, manifest, steps0=6, steps1=1, ckpt_every=3)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = ("--stage", "short")
    # The straight run goes alongside the one to be killed (separate processes, same thread count).
    reference = subprocess.Popen(train_cmd(recipe, straight, *args), env=env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    proc = subprocess.Popen(train_cmd(recipe, killed, *args), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    # Kill once the checkpoint of step 3 exists and step 4 has been logged (so work after it is lost).
    while time.time() < deadline and proc.poll() is None:
        path = killed / "short" / "metrics.jsonl"
        saved = (killed / "short" / "checkpoints" / "step-00000003").is_dir()
        if saved and path.is_file() and 4 in metrics(killed, "short"):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "short" / "export").exists()
    subprocess.run(train_cmd(recipe, killed, *args), env=env(), check=True, capture_output=True, timeout=300)
    assert reference.wait(timeout=300) == 0

    a, b = metrics(straight, "short"), metrics(killed, "short")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s]["loss"] for s in a] == [b[s]["loss"] for s in a]
    assert [a[s]["grad_norm"] for s in a] == [b[s]["grad_norm"] for s in a]
    wa = load_bundle(straight / "short" / "export", device="cpu").model.state_dict()
    wb = load_bundle(killed / "short" / "export", device="cpu").model.state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "the exported EMA weights are identical"
    segments = read_ledger(killed)
    assert segments[0].crashed and segments[1].start_step == 3 and segments[1].end_reason == "finished"


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path, manifest):
    recipe = write_recipe(tmp_path, manifest, steps0=1000, ckpt_every=1000)
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(recipe, run), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        path = run / "short" / "metrics.jsonl"
        if path.is_file() and len(metrics(run, "short")) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped (sigterm)" in out
    step = read_ledger(run)[-1].last_step
    assert read_ledger(run)[-1].end_reason == "sigterm" and 2 <= step < 1000
    assert (run / "short" / "checkpoints" / f"step-{step:08d}").is_dir()


@pytest.mark.slow
def test_torchrun_two_processes_fsdp(tmp_path, manifest):
    recipe = write_recipe(tmp_path, manifest, steps0=2, steps1=1)
    run = tmp_path / "run"
    # --standalone: a free port on localhost, so parallel test runs do not collide. One sample per rank per
    # forward makes the first stage accumulate gradients over 2 micro-steps on each of the 2 ranks.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train" / "train.py"), "--config", str(recipe), "--output-dir", str(run),
           "--set", "stages.0.micro_batch_size=1"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("training finished") == 1, "only rank 0 reports"
    segments = read_ledger(run)
    assert [s.num_gpus for s in segments] == [2, 2] and all(s.end_reason == "finished" for s in segments)
    assert sorted(metrics(run, "short")) == [1, 2]
    bundle = load_bundle(run / "long" / "export", device="cpu")
    assert all(torch.isfinite(v).all() for v in bundle.model.state_dict().values())
    # One process on the same recipe: the same 4 samples a step, but each rank and micro-step seeds its own noise
    # and timesteps, so the losses agree only to the spread of a mean over 4 samples' noise (up to 5 % here); a loss
    # summed over ranks or micro-steps, or averaged twice, is off by 2x.
    one = tmp_path / "one"
    assert run_recipe(load_recipe(recipe), one, init_distributed()) == "finished"
    for stage in ("short", "long"):
        a, b = metrics(one, stage), metrics(run, stage)
        assert sorted(a) == sorted(b)
        for step in a:
            assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=0.1), (stage, step)


def engine_worker(tmp_path: Path, manifest: Path, mode: str) -> list[dict]:
    """Runs a trainer mode of tests/dist_workers/engine_worker.py on 2 gloo ranks; returns each rank's result."""
    recipe = write_recipe(tmp_path, manifest, steps0=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_workers" / "engine_worker.py"), mode, "--recipe", str(recipe),
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "out" / "result.json").read_text())


@pytest.mark.slow
def test_gradient_accumulation_reduces_once_per_step_on_the_trainers_path(tmp_path, manifest):
    """Trainer.train_step on 2 ranks, 2 micro-steps each, on every engine: the backward of the first micro-step
    starts no gradient reduction, the last one does (counted at the collectives, not read from a flag)."""
    for rank in engine_worker(tmp_path, manifest, "trainer-sync"):
        for engine, r in rank.items():
            assert r["accum"] == 2, engine
            per_step = [r["per_micro"][i:i + 2] for i in (0, 2)]
            assert all(first == 0 and last > 0 for first, last in per_step), (engine, r["per_micro"])


@pytest.mark.slow
def test_a_clip_failing_on_one_rank_of_a_sequence_parallel_group_is_dropped_by_all(tmp_path, manifest):
    """Both ranks of an SP group load the same batches; a transient read error on one of them must not leave
    it with a smaller batch (the group's all-to-alls would get mismatched shapes and hang): the whole group
    drops that sample, trains on the rest, and the failure is recorded."""
    ranks = engine_worker(tmp_path, manifest, "sp-broken")
    assert ranks[0]["seen"] == ranks[1]["seen"], "the ranks of the SP group trained on different samples"
    assert [len(b) for b in ranks[0]["seen"]] == [1, 2, 2, 2]  # the failed clip was dropped from the first batch
    assert ranks[0]["losses"] == ranks[1]["losses"]
    failed = [json.loads(line) for line in (tmp_path / "out" / "run" / "short" / "failures.jsonl").read_text().splitlines()]
    assert len(failed) == 1 and "simulated transient read error on rank 1" in failed[0]["error"]


def test_benchmark_times_the_trainers_step(tmp_path, manifest):
    """tools/benchmark.py's step and the trainer's give the same loss for the same weights, inputs and seed."""
    from tools import benchmark
    from opensora.distributed import destroy_distributed
    from opensora.training import Trainer
    from opensora.training.recipe import init_dir_of

    recipe = load_recipe(write_recipe(tmp_path, manifest), ["parallel.engine=ddp"])
    stage, info = recipe.stages[0], init_distributed()
    try:
        trainer = Trainer(recipe, stage, tmp_path / "run", init_dir_of(recipe, 0, tmp_path / "run", info), info)
        batch, _ = trainer._next_batch()
        x, y, mask = trainer.steps.encode(batch, torch.Generator().manual_seed(0))
        model = STDiT.from_pretrained(trainer.init_dir / "model")  # the weights the trainer starts from
        trainer_loss = trainer.forward_backward_step(batch, 0)

        args = benchmark.parse_args(["--model", "STDiT-debug", "--engine", "ddp", "--cached-latents", "--batch",
                                     str(x.shape[0]), "--seed", str(recipe.seed), "--vae-downsample", "1"])
        steps, _, _ = benchmark.build_step(args, info, model.config, torch.float32, model=model)
        bench_loss = steps.forward_backward(dict(latent=x, y=y, mask=mask), 0, 0)
        trainer.close()
    finally:
        destroy_distributed()
    assert float(bench_loss) == float(trainer_loss)
