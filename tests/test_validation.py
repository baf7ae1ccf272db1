"""Validation while training (opensora/training/validation.py): held-out clips never trained on, the loss at fixed
timesteps (deterministic; the same on 1 and 2 ranks), samples and grids at the right steps, metrics, the ledger's
validation time, bit-identical training weights with validation on or off, and the schedule kept across kill -9.

Tiny: STDiT-debug in pixel space with the tiny T5, the 16x16 clips of tests/test_training.py.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from opensora.accounting import read_ledger
from opensora.bundle import load_bundle
from opensora.config import ConfigError
from opensora.data.dataset import DataConfig, Holdout, VideoDataset
from opensora.data.manifest import read_manifest
from opensora.data.video_io import read_video
from opensora.distributed import init_distributed
from opensora.eval.clip_score import ClipScorer, make_tiny_clip
from opensora.training import EMA, load_recipe, run_recipe
from opensora.training.validation import plan_batches
from tests.test_training import ROOT, env, manifest, train_cmd  # noqa: F401  (manifest is a fixture)

PROMPTS = ["a red square moving left on a white background", "a blue square moving right on a white background"]

RECIPE = """
vae_downsample: 1
diffusion: {diffusion}
seed: 0
data: {{manifest: {manifest}, frame_interval: 1, num_workers: 0}}
parallel: {{engine: fsdp, param_dtype: fp32}}
ema: {{decay: 0.9, warmup: true}}
logging: {{log_every: 1, ckpt_every: {ckpt_every}, keep_checkpoints: 3, tensorboard: false, progress: false}}
accounting: {{price_per_gpu_hour: 1.0, heartbeat_s: 0}}
validation:
  every: {every}
  holdout_ids: {holdout}
  num_clips: 4
  batch_size: 1
  timesteps: [0.2, 0.8]
  prompts: {prompts}
  sample_steps: 2
  metrics: {metrics}
  clip_model: {clip}
stages:
  - name: short
    model: STDiT-debug
    num_frames: 4
    image_size: [16, 16]
    batch_size: 2
    steps: {steps}
    lr: 1.0e-3
    init: {{vae: identity, text_encoder: tiny}}
"""


def ids_of(manifest: Path) -> list[str]:
    return list(read_manifest(manifest)["id"])


def write_recipe(tmp_path: Path, manifest: Path, every: int = 2, steps: int = 4, ckpt_every: int = 100,
                 metrics=("loss", "colour_motion"), clip: str | None = None, diffusion: str = "rflow",
                 prompts=PROMPTS, name: str = "recipe.yaml") -> Path:
    held = ids_of(manifest)[:2]  # red left, red right
    path = tmp_path / name
    path.write_text(RECIPE.format(manifest=manifest, every=every, steps=steps, ckpt_every=ckpt_every,
                                  holdout=json.dumps(held), prompts=json.dumps(list(prompts)),
                                  metrics=json.dumps(list(metrics)), clip=json.dumps(clip), diffusion=diffusion))
    return path


def val_rows(run: Path, stage: str = "short") -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows if "val_loss" in r or "val_colour" in r}


def weights(path: Path) -> dict:
    return load_bundle(path, device="cpu").model.state_dict()


# -- pieces -----------------------------------------------------------------------------------------------------
def test_holdout_is_stable_and_the_training_set_never_sees_it(manifest):
    ids = ids_of(manifest)
    h = Holdout(0.5, frozenset({ids[0]}))
    assert ids[0] in h
    picked = [i for i in ids if i in h]
    assert picked == [i for i in ids if i in Holdout(0.5, frozenset({ids[0]}))], "the same clips every time"
    many = [f"clip-{k}" for k in range(4000)]
    share = sum(c in Holdout(0.1) for c in many) / len(many)
    assert 0.08 < share < 0.12
    assert set(c for c in many if c in Holdout(0.05)) <= set(c for c in many if c in Holdout(0.1)), "shares nest"
    cfg = DataConfig(manifest=str(manifest), num_frames=4, frame_interval=1, image_size=(16, 16), num_workers=0)
    train = VideoDataset(cfg, holdout=h)
    held = VideoDataset(cfg, holdout=h, held_out=True)
    assert sorted(train.ids + held.ids) == sorted(ids) and not set(train.ids) & set(held.ids)
    assert train.num_held_out == len(held.ids) >= 1
    with pytest.raises(ValueError, match="in \\[0, 1\\)"):
        Holdout(1.0)


def test_validation_config_errors_name_the_key(tmp_path, manifest):
    good = write_recipe(tmp_path, manifest)
    load_recipe(good)
    cases = {
        "validation.metrics=[fid]": "unknown \\['fid'\\]",
        "validation.holdout_ids=[]": "no held-out clips are given",
        "validation.manifest=x.parquet": "either manifest .* or holdout_fraction",
        "validation.timesteps=[1.5]": "fractions of the schedule",
        "validation.metrics=[loss,clip_score]": "clip_model",
        "validation.evry=3": "evry",
        "stages.0.validation.every=-1": "validation.every must be >= 0",
        "validation.num_frames=0": "num_frames must be >= 1",
    }
    for override, pattern in cases.items():
        with pytest.raises(ConfigError, match=pattern):
            load_recipe(good, [override])
            print("no error:", override)
    recipe = write_recipe(tmp_path, manifest, prompts=["a cat"], name="bad.yaml")
    with pytest.raises(ConfigError, match="not: \\['a cat'\\]"):
        run_recipe(load_recipe(recipe), tmp_path / "run", init_distributed())


def test_plan_batches_and_ema_swap_restore_exactly():
    keys = [(4, 16, 16), (4, 16, 16), (4, 8, 8), (4, 16, 16)]
    assert plan_batches(keys, [0, 1, 2, 3], 2) == [[0, 1], [3], [2]]
    model = torch.nn.Linear(3, 5)
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    ema = EMA(model, decay=0.5)
    shadow = [torch.zeros(5, 3), torch.ones(5)]
    for s, v in zip(ema.shadow, shadow):
        s.copy_(v)
    with ema.swapped_in():
        assert torch.equal(params[0], shadow[0]) and torch.equal(params[1], shadow[1])
    assert all(torch.equal(p, b) for p, b in zip(params, before))


def test_clip_score_is_cosine_similarity_times_100_clamped_at_zero(tmp_path):
    from transformers import CLIPModel

    path = make_tiny_clip(tmp_path / "clip", seed=2)  # seed 2: positive similarities, so the clamp is not all
    scorer = ClipScorer(path)
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8) for _ in range(3)]
    prompts = ["a red circle", "a blue square moving up", "green"]
    got = scorer.scores(videos, prompts)
    assert min(got) > 0 and len(set(got)) == 3
    model = CLIPModel.from_pretrained(str(path)).eval()  # the reference: the model's own logits / logit scale
    for video, prompt, score in zip(videos, prompts, got):
        inputs = scorer.processor(text=[prompt], images=list(video), return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model(**inputs)
        cos = out.logits_per_image[:, 0] / model.logit_scale.exp().detach()
        assert score == pytest.approx(float((100 * cos).clamp(min=0).mean()), abs=1e-3)
    assert scorer(videos, prompts)["val_clip_score"] == pytest.approx(np.mean(got))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ClipScorer(tmp_path / "nowhere")


# -- in the trainer ---------------------------------------------------------------------------------------------
def test_validation_runs_at_its_steps_writes_samples_and_is_paid_time(tmp_path, manifest, capsys):
    clip = make_tiny_clip(tmp_path / "clip", seed=2)  # seed 2: positive similarities, so the clamp at 0 hides nothing
    scorer = ClipScorer(clip)
    recipe = load_recipe(write_recipe(tmp_path, manifest, every=2, steps=5,
                                      metrics=("loss", "colour_motion", "clip_score"), clip=str(clip)))
    run = tmp_path / "run"
    assert run_recipe(recipe, run, init_distributed()) == "finished"
    rows = val_rows(run)
    assert sorted(rows) == [0, 2, 4, 5], "at the start, every 2 steps, and the stage's last step"
    for step, row in rows.items():
        assert math.isfinite(row["val_loss"]) and row["val_clips"] == 2, row
        assert row["val_loss"] == pytest.approx((row["val_loss_t0.2"] + row["val_loss_t0.8"]) / 2)
        assert 0 <= row["val_colour"] <= 1 and 0 <= row["val_direction"] <= 1
        assert row["val_weights"] == "ema" and row["val_time_s"] > 0
        out = run / "short" / "validation" / f"step-{step:08d}"
        videos = sorted(out.glob("*.mp4"))
        assert [p.name for p in videos] == [
            "000_a-red-square-moving-left-on-a-white-background.mp4",
            "001_a-blue-square-moving-right-on-a-white-background.mp4"]
        # the score is CLIP's on these samples and prompts (on the written files: H.264 moves the 16x16 pixels, ~5 %)
        decoded = [read_video(p) for p in videos]
        rescored = scorer(decoded, PROMPTS)["val_clip_score"]
        assert rescored > 0 and row["val_clip_score"] == pytest.approx(rescored, rel=0.1), (row, rescored)
        assert (out / "grid.png").is_file() and (out / "result.json").is_file()
    assert rows[0]["val_loss"] != rows[5]["val_loss"], "the model changed between the first and the last pass"
    train_rows = [json.loads(x) for x in (run / "short" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in train_rows if "loss" in r) == [1, 2, 3, 4, 5]
    # Validation time is its own kind of paid time in the ledger and the cost report.
    segment = read_ledger(run)[0]
    assert [m.step for m in segment.marks if m.kind == "validation"] == [0, 2, 4, 5]
    total_val = sum(r["val_time_s"] for r in rows.values())
    assert segment.val_s == pytest.approx(total_val, rel=0.05, abs=0.05) and segment.val_s < segment.wall_s
    report = subprocess.run([sys.executable, str(ROOT / "tools" / "cost.py"), "report", str(run), "--json"],
                            capture_output=True, text=True, env=env(), check=True)
    stage = json.loads(report.stdout)["stages"][0]
    assert stage["validation_s"] == pytest.approx(segment.val_s) and stage["validation_dollars"] > 0
    assert "validation at step 4" in capsys.readouterr().out


def test_the_loss_is_deterministic_and_validation_does_not_touch_training(tmp_path, manifest):
    """Same weights -> the same numbers (IDDPM too); with validation on or off the trained weights are identical."""
    on, off = tmp_path / "on", tmp_path / "off"
    for diffusion in ("rflow", "iddpm"):
        recipe_on = load_recipe(write_recipe(tmp_path, manifest, every=1, steps=3, diffusion=diffusion))
        recipe_off = load_recipe(write_recipe(tmp_path, manifest, every=0, steps=3, diffusion=diffusion))
        assert run_recipe(recipe_on, on / diffusion, init_distributed()) == "finished"
        assert run_recipe(recipe_off, off / diffusion, init_distributed()) == "finished"
        wa, wb = weights(on / diffusion / "short" / "export"), weights(off / diffusion / "short" / "export")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), "validation changed the training weights"
        assert not (off / diffusion / "short" / "validation").exists()
        # Re-measure step 3 in a fresh run of the same recipe: the same weights give the same numbers.
        again = tmp_path / "again" / diffusion
        assert run_recipe(recipe_on, again, init_distributed()) == "finished"
        a, b = val_rows(on / diffusion)[3], val_rows(again)[3]
        assert {k: v for k, v in a.items() if k.startswith("val_loss")} == \
            {k: v for k, v in b.items() if k.startswith("val_loss")}


@pytest.mark.slow
def test_two_ranks_measure_what_one_rank_measures(tmp_path, manifest):
    """FSDP2 on 2 gloo ranks, data-parallel (the batches are dealt to the ranks and the sums all-reduced) and
    sequence-parallel (one SP group of 2: both ranks run every batch, split over frames inside the model, and it is
    counted once) measure what the 1-rank run measured with the same weights (up to the order of the float sums):
    trained weights, not only the zero-output start, under both."""
    recipe = write_recipe(tmp_path, manifest, every=2, steps=2, metrics=("loss",))
    one = tmp_path / "one"
    assert run_recipe(load_recipe(recipe), one, init_distributed()) == "finished"
    a0, a2 = val_rows(one)[0], val_rows(one)[2]
    assert a2["val_loss"] != a0["val_loss"], "the model changed in 2 steps"
    # At step 0 STDiT's output layer is zero, so the loss depends on the batching and the sums only. So the
    # data-parallel run starts from the 1-rank run's export (its EMA weights after 2 steps, which its step-2 pass
    # measured): its step-0 pass must give that number, and the forward matters. Under SP (one data-parallel rank:
    # the same data and noise as the 1-rank run) the weights after 2 steps differ only by the order of float sums.
    start_from_export = [f"stages.0.init.bundle={one / 'short' / 'export'}", "stages.0.init.vae=null",
                         "stages.0.init.text_encoder=null"]
    for name, sets, expected in (("dp", ["stages.0.micro_batch_size=1", *start_from_export], {0: (a2, 1e-5)}),
                                 ("sp", ["parallel.sp_size=2"], {0: (a0, 1e-6), 2: (a2, 1e-4)})):
        run = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(ROOT / "train" / "train.py"), "--config", str(recipe), "--output-dir", str(run),
               "--set", "validation.num_clips=3", *(arg for s in sets for arg in ("--set", s))]
        proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = val_rows(run)
        for step, (want, rel) in expected.items():
            got = rows[step]
            assert got["val_clips"] == 2, (name, "3 asked, 2 held out: each counted once, however many ranks ran it")
            for key in ("val_loss", "val_loss_t0.2", "val_loss_t0.8"):
                assert got[key] == pytest.approx(want[key], rel=rel), (name, step, key)


@pytest.mark.slow
def test_a_broken_held_out_clip_is_left_out_and_the_ranks_stay_in_step(tmp_path, manifest):
    """One of the two held-out clips is garbage. On 2 FSDP2 ranks it is the only clip of rank 1, whose batch then
    fails entirely: rank 1 must still run the forwards rank 0 runs (a stand-in batch at weight 0), or the ranks'
    collectives fall out of step and the job hangs. Both world sizes measure the one good clip, and record the bad."""
    import pandas as pd

    from opensora.data.manifest import write_manifest

    df = read_manifest(manifest)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    df.loc[df["id"] == ids_of(manifest)[1], "path"] = str(bad)
    broken = write_manifest(pd.DataFrame(df), tmp_path / "broken.parquet")
    recipe = write_recipe(tmp_path, broken, every=2, steps=2, metrics=("loss",), prompts=())
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_recipe(load_recipe(recipe), one, init_distributed()) == "finished"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train" / "train.py"), "--config", str(recipe), "--output-dir", str(two),
           "--set", "stages.0.micro_batch_size=1"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = val_rows(one)[0], val_rows(two)[0]
    assert a["val_clips"] == b["val_clips"] == 1
    assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-6)
    failures = (two / "short" / "validation" / "failures.jsonl").read_text()
    assert "broken.mp4" in failures


@pytest.mark.slow
def test_resume_after_kill_9_reruns_no_finished_validation_and_misses_none(tmp_path, manifest):
    recipe = write_recipe(tmp_path, manifest, every=2, steps=6, ckpt_every=3, metrics=("loss",), prompts=())
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(recipe, run), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    done4 = run / "short" / "validation" / "step-00000004" / "result.json"
    while time.time() < deadline and proc.poll() is None and not done4.is_file():
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (run / "short" / "checkpoints" / "step-00000003").is_dir() and not (run / "short" / "export").exists()
    first = done4.read_text()
    subprocess.run(train_cmd(recipe, run), env=env(), check=True, capture_output=True, timeout=300)
    assert done4.read_text() == first, "the finished pass of step 4 was not run again"
    events = [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines() if x.strip()]
    steps = [e["step"] for e in events if e.get("event") == "validation"]
    assert steps == [0, 2, 4, 6], "each validation point exactly once across the crash"
    assert sorted(p.name for p in (run / "short" / "validation").iterdir()) == [
        f"step-{s:08d}" for s in (0, 2, 4, 6)]


def test_validation_rows_reach_tensorboard_and_wandb(tmp_path, monkeypatch):
    """The writers' validation paths (neither tensorboard nor wandb is installed here: recording fakes)."""
    import types

    from opensora.sampling import frame_grid
    from opensora.training.metrics import _TensorBoard, _WandB

    grid = frame_grid([np.zeros((2, 4, 4, 3), np.uint8)], ["x"], tmp_path / "grid.png")
    video = tmp_path / "000_x.mp4"
    row = {"step": 7, "val_loss": 0.5, "val_loss_t0.2": 0.4, "val_clips": 2, "val_weights": "ema", "val_time_s": 1.0}
    calls = []

    class Writer:
        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, value, step))

        def add_image(self, tag, image, step, dataformats):
            calls.append(("image", tag, image.shape, step, dataformats))

        def flush(self):
            pass

    _TensorBoard(Writer()).log_validation(row, grid, [video])
    assert ("scalar", "val/loss", 0.5, 7) in calls and ("scalar", "val/loss_t0.2", 0.4, 7) in calls
    assert not any(c[1] == "val/weights" for c in calls), "strings are not scalars"
    image = [c for c in calls if c[0] == "image"][0]
    assert image[1] == "val/samples" and image[3] == 7 and image[4] == "HWC" and image[2][2] == 3

    logged = []
    fake = types.SimpleNamespace(Image=lambda path: ("image", path), Video=lambda path, format: ("video", path, format))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = types.SimpleNamespace(log=lambda data, step: logged.append((data, step)))
    _WandB(run).log_validation(row, grid, [video])
    data, step = logged[0]
    assert step == 7 and data["val/loss"] == 0.5 and data["val/samples"] == ("image", str(grid))
    assert data["val/video/000_x"] == ("video", str(video), "mp4")


def test_the_loss_is_reported_per_bucket_and_its_mean_weighs_clips_equally():
    """Validator._loss on a dataset of two buckets (3 clips at 2x8x8, 1 at 2x16x16), one process."""
    import contextlib
    import types

    from opensora.diffusion import build_scheduler
    from opensora.models.stdit import STDiT, stdit_config
    from opensora.training.validation import ValidationConfig, Validator

    torch.manual_seed(0)
    model = STDiT(stdit_config("STDiT-debug", in_channels=3)).eval()
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)  # else the output ignores the model

    class Clips:
        bucket_keys = [(2, 8, 8), (2, 16, 16), (2, 8, 8), (2, 8, 8)]
        units = ["v0", "v1", "v2", "v3"]  # one source video each

        def __len__(self):
            return 4

        def __getitem__(self, i):
            g = torch.Generator().manual_seed(i)
            return dict(video=torch.rand((3, *self.bucket_keys[i]), generator=g) * 2 - 1, text=f"clip {i}",
                        index=i, bucket=self.bucket_keys[i])

    def encode(batch, generator):
        B = batch["video"].shape[0]
        return batch["video"], torch.ones(B, 1, 16, 32), torch.ones(B, 16, dtype=torch.long)

    engine = types.SimpleNamespace(dist=types.SimpleNamespace(device=torch.device("cpu")), model=model,
                                   autocast=contextlib.nullcontext, reshard=lambda: None)
    cfg = ValidationConfig(every=1, manifest="held_out.parquet", num_clips=4, batch_size=2, timesteps=[0.5])
    validator = Validator(cfg, Path("unused"), "rflow", build_scheduler("rflow"), engine, model, None, Clips(),
                          encode, None)
    assert validator.batches == [[0, 2], [3], [1]]
    row = validator._loss()
    small, large = row["val_loss_2x8x8"], row["val_loss_2x16x16"]
    assert row["val_clips"] == 4 and small != large
    assert row["val_loss"] == pytest.approx((3 * small + large) / 4)
    assert row["val_loss"] == validator._loss()["val_loss"], "the same weights give the same number"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine", ["fsdp", "ddp", "colossalai"])
def test_gpu_validation_in_bf16_changes_no_training_weight(tmp_path, manifest, engine, monkeypatch):
    """On one GPU in bf16 (FSDP2's mixed precision, DDP's autocast, ZeRO-2's bf16 working copy): validation on or
    off gives bit-identical trained weights, and its loss and samples are finite (scripts/gpu_smoke.sh runs it).
    Every attention projection of the STDiT computes in bf16: a silent fall-back to fp32 would pass the rest."""
    import opensora.models.stdit as stdit_mod

    computed_in = compute_dtypes(monkeypatch, stdit_mod.Attention)
    sets = [f"parallel.engine={engine}", "parallel.param_dtype=bf16"]
    on, off = tmp_path / "on", tmp_path / "off"
    assert run_recipe(load_recipe(write_recipe(tmp_path, manifest, every=1, steps=3), sets), on,
                      init_distributed()) == "finished"
    assert run_recipe(load_recipe(write_recipe(tmp_path, manifest, every=0, steps=3, name="off.yaml"), sets), off,
                      init_distributed()) == "finished"
    wa, wb = weights(on / "short" / "export"), weights(off / "short" / "export")
    assert all(torch.equal(wa[k], wb[k]) for k in wa), f"validation changed the training weights ({engine})"
    rows = val_rows(on)
    assert sorted(rows) == [0, 1, 2, 3] and all(math.isfinite(r["val_loss"]) for r in rows.values())
    assert len(list((on / "short" / "validation" / "step-00000003").glob("*.mp4"))) == 2
    assert computed_in == {torch.bfloat16}, f"{engine}: the STDiT computed in {computed_in}"


def compute_dtypes(monkeypatch, attention_cls) -> set:
    """The dtypes the qkv projection of every ``attention_cls`` built from now on computes in (a forward hook on
    the Linear: under DDP's autocast the activations between ops stay fp32, the matmuls run in bf16)."""
    seen: set = set()
    init = attention_cls.__init__

    def hooked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.qkv.register_forward_hook(lambda m, a, out: seen.add(out.dtype))

    monkeypatch.setattr(attention_cls, "__init__", hooked_init)
    return seen


def test_a_missing_held_out_manifest_or_prompt_file_is_a_config_error_naming_it(tmp_path, manifest):
    recipe = write_recipe(tmp_path, manifest)
    for override, pattern in (("validation.prompt_file=nowhere.txt", "validation.prompt_file not found: nowhere.txt"),
                              ("validation.holdout_ids=[no-such-clip]", "no held-out clips")):
        with pytest.raises(ConfigError, match=f"stage 'short': validation: .*{pattern}"):
            run_recipe(load_recipe(recipe, [override]), tmp_path / "run", init_distributed())
    cmd = train_cmd(recipe, tmp_path / "cli") + ["--set", f"validation.holdout_ids=[]", "--set",
                                                 f"validation.manifest={tmp_path / 'missing.parquet'}"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "missing.parquet" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
