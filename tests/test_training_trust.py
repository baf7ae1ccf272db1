"""A paid run never goes on silently wrong (issue 23): a non-finite step changes nothing and a diverged run stops
with a non-zero exit and nothing non-finite on disk; a resume follows the recipe's schedule settings, not the
checkpoint's; start-up time is billed, also when the start-up dies.

Everything is tiny: STDiT-debug in pixel space with the tiny random T5 on 16x16 clips (the manifest fixture of
tests/test_training.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from opensora.accounting import read_ledger, summarize
from opensora.distributed import destroy_distributed, init_distributed
from opensora.training import NonFiniteError, load_recipe, run_recipe
from opensora.training.optim import WarmupSchedule
from opensora.training.recipe import init_dir_of
from opensora.training.trainer import Trainer
from test_training import ROOT, env, manifest, metrics  # noqa: F401  (manifest is a fixture)

RECIPE = """
vae_downsample: 1
seed: 0
data: {{manifest: {manifest}, frame_interval: 1, num_workers: 0}}
parallel: {{engine: {engine}, param_dtype: fp32}}
ema: {{decay: 0.9, warmup: true}}
optim: {{max_nonfinite_steps: 3}}
logging: {{log_every: {log_every}, ckpt_every: {ckpt_every}, keep_checkpoints: 5, tensorboard: false, progress: false}}
accounting: {{price_per_gpu_hour: 1.0, heartbeat_s: 0}}
stages:
  - name: s
    model: STDiT-debug
    num_frames: 2
    image_size: [16, 16]
    batch_size: 2
    steps: {steps}
    lr: 1.0e-3
    lr_schedule: cosine
    min_lr: 1.0e-4
    init: {{vae: identity, text_encoder: tiny}}
"""


def write_recipe(tmp_path: Path, manifest: Path, steps: int = 6, ckpt_every: int = 2, log_every: int = 1,
                 engine: str = "fsdp") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(manifest=manifest, steps=steps, ckpt_every=ckpt_every, log_every=log_every,
                                  engine=engine))
    return path


def nan_at(monkeypatch, steps: set[int] | None):
    """Makes the diffusion loss NaN at the given optimizer steps (0-based as TrainStep sees them; None: always)."""
    from opensora.training.step import TrainStep

    original = TrainStep.forward_backward

    def forward_backward(self, batch, step, micro):
        if steps is None or step in steps:
            inner = self.diffusion.training_losses

            def poisoned(*args, **kwargs):
                terms = inner(*args, **kwargs)
                return {**terms, "loss": terms["loss"] * math.nan}

            self.diffusion.training_losses = poisoned
            try:
                return original(self, batch, step, micro)
            finally:
                del self.diffusion.training_losses
        return original(self, batch, step, micro)

    monkeypatch.setattr(TrainStep, "forward_backward", forward_backward)


def snapshot(trainer: Trainer) -> dict:
    """Copies of everything a step may change: weights, AdamW state, EMA, schedule position and rate."""
    opt = trainer.engine.schedule_optimizer
    return dict(
        weights={n: p.detach().clone() for n, p in trainer.model.named_parameters()},
        adam={i: {k: v.clone() for k, v in st.items()} for i, st in enumerate(opt.state.values())},
        ema=[t.clone() for t in trainer.ema.shadow],
        schedule=(trainer.lr_scheduler.last_epoch, trainer.lr_scheduler.get_last_lr()[0]),
    )


def same(a: dict, b: dict) -> bool:
    return (all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"])
            and a["adam"].keys() == b["adam"].keys()
            and all(torch.equal(v, b["adam"][i][k]) for i in a["adam"] for k, v in a["adam"][i].items())
            and all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"])) and a["schedule"] == b["schedule"])


def all_finite_on_disk(run: Path) -> int:
    """Asserts that every tensor in the run's checkpoints and exports is finite; returns how many were read."""
    n = 0
    for path in run.rglob("*.safetensors"):
        for name, t in load_file(path).items():
            assert torch.isfinite(t).all(), f"{path}: {name} is not finite"
            n += 1
    for ckpt in run.rglob("step-*"):
        if not (ckpt / ".metadata").is_file():
            continue
        flat = ckpt.parent / f"{ckpt.name}.pt"
        dcp_to_torch_save(ckpt, flat)  # torch's own converter reads every entry of the sharded checkpoint
        stack = [torch.load(flat, weights_only=True)]
        flat.unlink()
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
            elif isinstance(item, torch.Tensor) and item.is_floating_point():
                assert torch.isfinite(item).all(), f"{ckpt} holds a non-finite tensor"
                n += 1
    return n


# -- 1. non-finite steps -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True], ids=["host-decided", "fused-adamw-on-device"])
def test_a_non_finite_step_changes_nothing_and_is_counted(tmp_path, manifest, monkeypatch, fused):
    """Step 3 has a NaN loss: weights, AdamW moments and step count, EMA and the LR schedule are exactly as after
    step 2; step 4 trains on. The fused case is the CUDA path (found_inf on the device, no host sync), run on
    the CPU's fused AdamW; its schedule catches up at the next sync point."""
    if fused:
        from opensora.training import optim as optim_module

        original = torch.optim.AdamW
        monkeypatch.setattr(optim_module.torch.optim, "AdamW",
                            lambda params, **kw: original(params, **{**kw, "fused": True}))
    nan_at(monkeypatch, {2})
    recipe = load_recipe(write_recipe(tmp_path, manifest, steps=6, log_every=2))
    info = init_distributed()
    try:
        run = tmp_path / "run"
        trainer = Trainer(recipe, recipe.stages[0], run, init_dir_of(recipe, 0, run, info), info)
        assert trainer.engine.skips_on_device is fused
        trainer.ledger.startup_done(0)
        trainer.metrics.open(0)
        def step() -> dict:
            out = trainer.train_step()
            trainer.metrics.add(out)
            return out

        for _ in range(2):
            step()
        before = snapshot(trainer)
        out = step()  # step 3: NaN loss
        assert not math.isfinite(out["loss"].item())
        if fused:  # known on the host at the next sync point only (a log step)
            trainer._sync_nonfinite()
        assert same(before, snapshot(trainer)), "a non-finite step changed the training state"
        assert trainer.nonfinite.skipped == 1 and trainer.lr_scheduler.last_epoch == 2
        out = step()  # step 4 trains, at the rate step 3 would have used
        assert math.isfinite(out["loss"].item()) and out["lr"] == before["schedule"][1]
        trainer._sync_nonfinite()
        after = snapshot(trainer)
        assert not same(before, after) and all(torch.isfinite(w).all() for w in after["weights"].values())
        trainer.metrics.log(trainer.step, skipped=trainer.nonfinite.take_window())
        trainer.save()
        trainer.ledger.end_segment("max_steps", trainer.step)
        trainer.close()
    finally:
        destroy_distributed()
    row = metrics(run, "s")[4]
    assert row["skipped_steps"] == 1 and math.isfinite(row["loss"])
    assert summarize(run).total.spend.skipped_steps == 1


def test_a_diverging_run_stops_with_an_error_and_writes_nothing_non_finite(tmp_path, manifest, monkeypatch, capsys):
    """From step 4 on every loss is NaN: after max_nonfinite_steps (3) skipped steps the stage stops with
    NonFiniteError naming the steps; the checkpoints of steps 2 and 4 and everything else on disk are finite; no
    checkpoint is written at the stop; the ledger ends the segment as 'nonfinite'."""
    nan_at(monkeypatch, {3, 4, 5, 6, 7, 8, 9})
    recipe = load_recipe(write_recipe(tmp_path, manifest, steps=10, ckpt_every=2, log_every=1))
    run = tmp_path / "run"
    info = init_distributed()
    try:
        with pytest.raises(NonFiniteError, match=r"stopped at step 6: 3 consecutive optimizer steps from step 4 had "
                                                 r"a non-finite loss and gradient norm.*Latest checkpoint: step 4"):
            run_recipe(recipe, run, info)
    finally:
        destroy_distributed()
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "s" / "checkpoints").glob("step-*"))
    assert steps == [2, 4], "no checkpoint at the stop (step 6)"
    assert all_finite_on_disk(run) > 0
    assert not (run / "s" / "export").exists()
    assert read_ledger(run)[-1].end_reason == "nonfinite"
    rows = metrics(run, "s")
    assert [rows[s]["skipped_steps"] for s in (3, 4, 5)] == [0, 1, 1] and 6 not in rows


@pytest.mark.slow
def test_cli_lr_1e4_diverges_and_exits_non_zero_with_finite_files(tmp_path, manifest):
    """The issue's check through the command line: a learning rate large enough to diverge."""
    recipe = write_recipe(tmp_path, manifest, steps=200, ckpt_every=5, log_every=5)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train/train.py"), "--config", str(recipe), "--output-dir",
                           str(run), "--set", "stages.0.lr=1e4", "--set", "stages.0.min_lr=0",
                           "--set", "optim.grad_clip=0"], capture_output=True, text=True, env=env(), timeout=600)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "non-finite" in proc.stderr
    assert all_finite_on_disk(run) > 0


# -- 2. a resume follows the recipe's schedule ------------------------------------------------------------------
def test_resume_with_doubled_cosine_steps_follows_the_new_schedule(tmp_path, manifest, capsys):
    """4 steps of a 4-step cosine stage (stopped at 2), then resumed with steps=8 and a new lr/min_lr/weight decay:
    the updates 3..8 use the rates of a fresh 8-step schedule of the new settings, the last at min_lr, and the
    resume says what changed. (Before the fix, LambdaLR.load_state_dict restored total_steps=4 and base_lrs.)"""
    path = write_recipe(tmp_path, manifest, steps=4, ckpt_every=100)
    run = tmp_path / "run"
    info = init_distributed()
    try:
        assert run_recipe(load_recipe(path), run, info, max_steps=2) == "max_steps"
        capsys.readouterr()
        new = ["stages.0.steps=8", "stages.0.lr=2e-3", "stages.0.min_lr=2e-4", "optim.weight_decay=0.01"]
        assert run_recipe(load_recipe(path, new), run, info) == "finished"
    finally:
        destroy_distributed()
    out = capsys.readouterr().out
    assert ("resumed with changed settings (checkpoint -> recipe): steps 4 -> 8, lr 0.001 -> 0.002, "
            "min_lr 0.0001 -> 0.0002, weight_decay 0.0 -> 0.01") in out
    schedule = WarmupSchedule(0, 8, "cosine", 0.1)
    rows = metrics(run, "s")
    assert [rows[s]["lr"] for s in range(3, 9)] == pytest.approx([2e-3 * schedule(s - 1) for s in range(3, 9)])
    assert rows[8]["lr"] == pytest.approx(2e-4), "the last update is at min_lr"
    assert rows[3]["lr"] > 1e-3, "the old 4-step schedule was at its end here"


# -- 3. start-up is billed ----------------------------------------------------------------------------------------
def test_startup_is_billed_and_a_startup_that_dies_too(tmp_path, manifest, monkeypatch, capsys):
    """A normal run's ledger has start-up time from the process start given; a start-up that dies (here: while
    loading the data) is billed up to its death, and tools/cost.py report shows both."""
    path = write_recipe(tmp_path, manifest, steps=2)
    run = tmp_path / "run"
    info = init_distributed()
    try:
        started = time.monotonic() - 2.0  # "the process started 2 s ago"
        assert run_recipe(load_recipe(path), run, info, max_steps=1, started=started) == "max_steps"
        from opensora.training import trainer as trainer_module

        def broken(*args, **kwargs):
            time.sleep(0.3)
            raise OSError("disk went away while opening the manifest")

        monkeypatch.setattr(trainer_module, "build_dataloader", broken)
        with pytest.raises(OSError, match="disk went away"):
            run_recipe(load_recipe(path), run, info)
    finally:
        destroy_distributed()
    first, died = read_ledger(run)
    assert first.startup_s >= 2.0 and first.end_reason == "max_steps"
    assert died.end_reason == "error" and died.startup_s == died.wall_s >= 0.3 and died.start_step == 1
    spend = summarize(run).total.spend
    assert spend.startup_s == pytest.approx(first.startup_s + died.startup_s)
    assert spend.startup_dollars == pytest.approx(spend.startup_s / 3600.0)
    sys.path.insert(0, str(ROOT / "tools"))
    import cost

    capsys.readouterr()
    assert cost.main(["report", str(run), "--json"]) == 0
    total = json.loads(capsys.readouterr().out)["total"]
    assert total["startup_s"] == pytest.approx(spend.startup_s) and total["startup_gpu_hours"] > 0
    assert cost.main(["report", str(run)]) == 0
    assert "startup GPU-h" in capsys.readouterr().out


def test_a_startup_killed_before_it_ends_is_billed_up_to_its_last_heartbeat(tmp_path):
    """The start-up heartbeat thread writes while the main thread loads: a kill -9 then leaves a crashed segment
    whose time is all start-up."""
    from opensora.accounting import Ledger

    led = Ledger(tmp_path, "s", num_gpus=8, gpu_type="h100", price_per_gpu_hour=2.0, heartbeat_s=0.05)
    led.start_segment(0, started=time.monotonic() - 1.0)
    time.sleep(0.3)  # loading ...; then the process dies without an end record
    led._beating.set()
    led._beat_thread.join()
    (seg,) = read_ledger(tmp_path)
    assert seg.crashed and seg.startup_s == seg.wall_s and seg.wall_s >= 1.2
    assert summarize(tmp_path).total.spend.startup_gpu_hours == pytest.approx(seg.wall_s * 8 / 3600)


# -- 7. the EMA follows the fp32 masters where the model holds a bf16 working copy ---------------------------------
def flat_masters(model: torch.nn.Module, pad_to: int = 4):
    """ZeRO's layout on one rank, built by hand: a flat fp32 master per parameter, padded to ``pad_to``, and the
    model's parameters turned into its bf16 working copy."""
    from opensora.training.ema import MasterShards

    params = dict(model.named_parameters())
    masters = {}
    for name, p in params.items():
        flat = p.detach().float().flatten()
        masters[name] = torch.nn.functional.pad(flat, [0, -flat.numel() % pad_to]).clone()
        p.data = p.data.to(torch.bfloat16)

    def gather(name, shard):
        return shard[: params[name].numel()].view(params[name].shape)

    def scatter(name, full, shard):
        shard.copy_(torch.nn.functional.pad(full.detach().float().flatten(), [0, shard.numel() - full.numel()]))

    return masters, MasterShards(masters, gather, scatter)


def test_ema_follows_the_fp32_masters_not_the_bf16_working_copy():
    """Before: the EMA averaged the model's parameters, under ZeRO the bf16 working copy (rounded to 8 bits of
    mantissa every step). Now it averages the engine's fp32 masters; its state dict and the validation swap give
    whole tensors shaped like the parameters."""
    from opensora.training import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(7, 5)
    masters, shards = flat_masters(model)
    ema = EMA(model, decay=0.5, masters=shards)
    expected = {n: m.clone() for n, m in masters.items()}
    for step in range(1, 4):  # "optimizer steps": small fp32 updates of the masters, the working copy re-rounded
        for name, p in model.named_parameters():
            masters[name] += 1e-3 * torch.randn_like(masters[name])
            p.data.copy_(shards.gather(name, masters[name]).to(torch.bfloat16))
            expected[name] = expected[name].lerp(masters[name], 0.5)
        ema.update(step)
    state = ema.state_dict()
    for name, p in model.named_parameters():
        want = shards.gather(name, expected[name])
        assert state[name].shape == p.shape and state[name].dtype == torch.float32
        torch.testing.assert_close(state[name], want, rtol=0, atol=0)
        rounded = shards.gather(name, masters[name]).to(torch.bfloat16).float()
        assert not torch.equal(want, rounded), "the test must tell the masters from the working copy"
    working = [p.detach().clone() for p in model.parameters()]
    with ema.swapped_in():
        for (name, p) in model.named_parameters():
            assert torch.equal(p, state[name].to(torch.bfloat16))
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), working))
    reloaded = EMA(model, decay=0.5, masters=flat_masters(torch.nn.Linear(7, 5))[1])
    reloaded.masters = shards  # same layout; a fresh average loaded from the state dict lands in the shards
    reloaded.shadow = [torch.zeros_like(s) for s in ema.shadow]
    reloaded.load_state_dict(state)
    assert all(torch.equal(reloaded.whole(i), ema.whole(i)) for i in range(len(ema.names)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_zero2_bf16_ema_tracks_masters_and_a_nan_step_changes_nothing():
    """ColossalAI ZeRO-2 in bf16 on one GPU: the EMA equals an fp32 average of the gathered masters, and a step
    with a NaN gradient leaves masters, working copy and AdamW state as they were (colossalai alone would
    apply it: BF16MixedPrecisionMixin never skips)."""
    from opensora.distributed import ParallelConfig, build_engine
    from opensora.training import EMA
    from tests.dist_workers.engine_worker import loss_fn, make_batch, make_model

    info = init_distributed()
    try:
        batch = {k: v.cuda() for k, v in make_batch(2).items()}
        eng = build_engine(ParallelConfig(engine="colossalai", zero_stage=2), info)
        model = make_model()
        model, _ = eng.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        assert next(eng.unwrap().parameters()).dtype == torch.bfloat16, "ZeRO must hold a bf16 working copy"
        ema = EMA(eng.unwrap(), decay=0.5, masters=eng.master_shards())
        expected = {k: v.clone() for k, v in eng._gathered_masters().items()}
        for step in range(1, 3):
            with eng.autocast():
                loss, _ = loss_fn(model, batch)
            eng.backward(loss)
            assert torch.isfinite(eng.optimizer_step(1.0))
            ema.update(step)
            for k, v in eng._gathered_masters().items():
                expected[k] = expected[k].lerp(v, 0.5)
        for k, v in ema.state_dict().items():
            torch.testing.assert_close(v, expected[k], rtol=0, atol=0, msg=k)
        masters = {k: v.clone() for k, v in eng._gathered_masters().items()}
        working = [p.detach().clone() for p in eng.unwrap().parameters()]
        with eng.autocast():
            loss, _ = loss_fn(model, batch)
        eng.backward(loss * math.nan)
        assert not torch.isfinite(eng.optimizer_step(1.0))
        assert all(torch.equal(v, masters[k]) for k, v in eng._gathered_masters().items())
        assert all(torch.equal(p, w) for p, w in zip(eng.unwrap().parameters(), working))
    finally:
        destroy_distributed()
