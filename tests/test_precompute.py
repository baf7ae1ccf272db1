"""tools/precompute.py: fills a recipe's latent cache, resumes, reports, refuses bad input; and training then
runs from the cache alone, with every clip file deleted.

Tiny as tests/test_training.py: STDiT-debug in pixel space (identity VAE) with the tiny random T5.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from opensora.data.manifest import write_manifest
from opensora.data.video_io import write_video
from opensora.distributed import init_distributed
from opensora.training import load_recipe, run_recipe
from opensora.utils import file_sha256, read_jsonl

ROOT = Path(__file__).resolve().parents[1]

RECIPE = """
vae_downsample: 1
seed: 0
data:
  manifest: {manifest}
  frame_interval: 1
  num_workers: 0
  cache_dir: {cache}
parallel: {{engine: ddp, param_dtype: fp32}}
logging: {{log_every: 1, ckpt_every: 100, keep_checkpoints: 1, tensorboard: false, progress: false}}
accounting: {{price_per_gpu_hour: 1.0, heartbeat_s: 0}}
stages:
  - name: short
    model: STDiT-debug
    num_frames: 2
    image_size: [16, 16]
    batch_size: 2
    steps: 2
    lr: 1.0e-3
    init: {{vae: identity, text_encoder: tiny}}
  - name: long
    model: STDiT-debug
    num_frames: 4
    image_size: [16, 16]
    batch_size: 2
    steps: 2
    lr: 1.0e-3
"""


def load_tool():
    spec = importlib.util.spec_from_file_location("precompute_tool", ROOT / "tools" / "precompute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clips(out: Path, n: int = 4, hashed: bool = True) -> tuple[Path, list[Path]]:
    """n 6-frame 16x16 clips of a moving square and their manifest (with the split stage's sha256 column)."""
    rows, paths = [], []
    for i in range(n):
        frames = np.full((6, 16, 16, 3), 255, np.uint8)
        for t in range(6):
            frames[t, 6:10, 2 * t : 2 * t + 4] = (40 * i, 100, 200)
        path = write_video(out / f"clip{i}.mp4", frames, fps=8, crf=0)
        paths.append(path)
        row = dict(path=str(path), text=f"square number {i} moving right", num_frames=6, height=16, width=16)
        if hashed:
            row["sha256"] = file_sha256(path)
        rows.append(row)
    return write_manifest(pd.DataFrame(rows), out / "manifest.parquet"), paths


def write_recipe(tmp_path: Path, manifest: Path, cache: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(manifest=manifest, cache=cache))
    return path


def test_precompute_then_train_with_every_clip_deleted(tmp_path, capsys):
    tool = load_tool()
    manifest, paths = clips(tmp_path)
    cache, run = tmp_path / "cache", tmp_path / "run"
    recipe = write_recipe(tmp_path, manifest, cache)
    # bf16 encoders here, fp32 in training: the encoders' identity does not depend on the compute dtype.
    argv = ["--config", str(recipe), "--output-dir", str(run), "--dtype", "bfloat16", "--no-progress"]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    assert "stage 'short': 4 clips: 4 encoded, 0 skipped (already cached), 0 failed" in out
    assert "stage 'long': 4 clips: 4 encoded, 0 skipped" in out  # its encoders: those of the first stage's init
    assert "precompute: 2 stages, 8 clips: 8 encoded, 0 skipped (already cached), 0 failed" in out
    (record, _) = read_jsonl(cache / "precompute.jsonl")
    assert record["vae_dtype"] == "none" and record["text_encoder_dtype"] == "bfloat16"
    assert (run / "short" / "init" / "bundle.yaml").is_file()  # the init bundle training will reuse

    assert tool.main(argv + ["--stage", "long"]) == 0  # resumes: nothing left to encode
    assert "stage 'long': 4 clips: 0 encoded, 4 skipped (already cached), 0 failed" in capsys.readouterr().out

    for path in paths:  # a warm cache must never need a clip file
        path.unlink()
    assert run_recipe(load_recipe(recipe), run, init_distributed()) == "finished"
    for stage in ("short", "long"):
        rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
        assert not (run / stage / "failures.jsonl").exists(), "every sample came from the cache"


def test_precompute_reports_failed_clips_and_refuses_bad_input(tmp_path, capsys):
    tool = load_tool()
    manifest, paths = clips(tmp_path, n=3, hashed=False)
    paths[1].write_bytes(b"\0" * 500)  # a broken clip: recorded, the others are encoded
    cache, run = tmp_path / "cache", tmp_path / "run"
    recipe = write_recipe(tmp_path, manifest, cache)
    base = ["--config", str(recipe), "--output-dir", str(run), "--no-progress"]
    assert tool.main(base + ["--stage", "short"]) == 0
    out = capsys.readouterr().out
    assert "stage 'short': 3 clips: 2 encoded, 0 skipped (already cached), 1 failed" in out
    assert str(paths[1]) in out
    assert [f["path"] for f in read_jsonl(cache / "precompute_failures.jsonl")] == [str(paths[1])]
    # Without a manifest sha256 column the clips were hashed once and recorded for later runs.
    assert {r["path"] for r in read_jsonl(cache / "content_sha256.jsonl")} >= {str(paths[0]), str(paths[2])}

    for extra, message in [
        (["--stage", "nope"], "--stage 'nope': the recipe has no such stage; its stages: short, long"),
        (["--set", "data.cache_dir=null"], "no stage with steps > 0 has data.cache_dir"),
        (["--set", "data.cache_dir=null", "--stage", "long"], "stage 'long' has no data.cache_dir"),
        (["--set", "data.no_such_key=1"], "no_such_key"),
        (["--set", f"data.manifest={tmp_path / 'missing.parquet'}", "--stage", "short"], "manifest not found"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ]:
        assert tool.main(base + extra) == 2, extra
        assert message in capsys.readouterr().err, extra

    for path in (paths[0], paths[2]):
        path.write_bytes(b"\0" * 500)  # now every clip of stage long is broken, and none was cached
    assert tool.main(base + ["--stage", "long"]) == 1
    assert "every clip failed" in capsys.readouterr().err


def test_a_stage_init_bundle_that_is_not_one_is_refused(tmp_path, capsys):
    tool = load_tool()
    manifest, _ = clips(tmp_path, n=1)
    recipe = write_recipe(tmp_path, manifest, tmp_path / "cache")
    argv = ["--config", str(recipe), "--no-progress", "--set", "stages.0.init.vae=null",
            "--set", "stages.0.init.text_encoder=null", "--set", f"stages.0.init.bundle={tmp_path}"]
    assert tool.main(argv) == 2
    assert "is not a pipeline bundle" in capsys.readouterr().err
