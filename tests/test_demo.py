"""The one-command demo, shortened (``--quick``: 4 videos, a few training steps, 2 prompts), end to end.

Runs the same code path as ``bash scripts/demo.sh``: generated videos -> the real pipeline -> train/train.py
(two stages) -> tools/sample.py -> the report. Then runs it again: everything finished is reused.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from opensora.data.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]


def run_demo(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "tools" / "demo.py"), "--out", str(out), "--quick", "--workers", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_quick_demo_end_to_end_and_rerun_reuses_everything(tmp_path):
    out = tmp_path / "demo"
    first = run_demo(out)
    report = out / "report"
    summary = (report / "summary.txt").read_text()
    assert "clips cut exactly at a generated shot: 12/12" in summary
    for what in ("colour", "direction"):  # the shapes check of the 2 sampled videos: k of 2, and the share k / 2
        k, n, share = map(int, re.search(rf"{what} matches prompt: (\d+)/(\d+) = (\d+)%", summary).groups())
        assert n == 2 and 0 <= k <= n and share == round(100 * k / n), summary
    assert float(re.search(r"total wall time ([\d.]+) s", first.stdout).group(1)) > 0
    samples = sorted((report / "samples").glob("*.mp4"))
    assert len(samples) == 2
    for sample in samples:
        frames = read_video(sample)  # (T, H, W, 3) uint8, decodable, not blank
        assert frames.ndim == 4 and frames.shape[0] > 1 and frames.shape[3] == 3 and frames.std() > 1
    stages = [p.parent.parent.name for p in (out / "train").glob("*/export/bundle.yaml")]
    assert len(stages) == 2, "two training stages, each exported"
    pngs = [report / "samples_grid.png", report / "validation.png", *(report / f"loss_{s}.png" for s in stages)]
    for png in pngs:  # real images of a plot's size, not empty or truncated files
        with Image.open(png) as image:
            image.load()
            assert image.format == "PNG" and min(image.size) >= 64 and np.asarray(image).std() > 1, png
    assert (report / "cost.txt").read_text().strip()
    # Validation while training: a pass at the start and the end of each stage (steps 4 < every), on the held-out
    # clips (one per held-out combination) and prompts, plotted and summarised; its time is in the cost report.
    passes = re.findall(r"held-out loss ([\d.]+), colour (\d+)%, direction (\d+)% \(([\d.]+) s\)", summary)
    assert len(passes) == 4 and "validation time:" in summary, summary
    for loss, colour, direction, seconds in passes:
        assert 0 < float(loss) < 10 and 0 <= int(colour) <= 100 and 0 <= int(direction) <= 100 and float(seconds) > 0
    assert sorted(p.name for p in (out / "train" / "frames8" / "validation").iterdir()) == [
        "step-00000000", "step-00000004"]
    assert "val GPU-h" in (report / "cost.txt").read_text()

    mtimes = {p.name: p.stat().st_mtime_ns for p in samples}
    second = run_demo(out)
    assert "all 2 videos exist" in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in sorted((report / "samples").glob("*.mp4"))} == mtimes
    assert "finished before: 4" in second.stderr or "finished before: 4" in second.stdout, "the pipeline resumed"


@pytest.mark.parametrize("split_mode", ["encode", "reference"])
def test_demo_data_step_in_either_split_mode(tmp_path, split_mode):
    """The demo's pipeline (quick size) in both split modes: every generated shot is found, and the training
    dataset reads each row of the manifest (clip files, or reference rows seeking into the raw videos) as the
    same shape of sample. Reference mode writes no clip file."""
    from opensora.data.dataset import DataConfig, VideoDataset
    from tools import demo

    manifest = demo.make_data(tmp_path, workers=1, quick=True, split_mode=split_mode)
    summary = demo.data_summary(manifest, tmp_path / "data" / "raw")
    assert "clips cut exactly at a generated shot: 12/12" in summary[1], summary
    dataset = VideoDataset(DataConfig(manifest=str(manifest), num_frames=4, frame_interval=1, image_size=(16, 16),
                                      num_workers=0, random_start=False))
    assert len(dataset) == 12 and not dataset.skipped
    for index in range(len(dataset)):
        assert dataset[index]["video"].shape == (3, 4, 16, 16)
    held_out = tmp_path / "data" / "held_out"  # validation clips the demo renders itself (one per held-out combination)
    clips = [p for p in (tmp_path / "data").rglob("*.mp4") if held_out not in p.parents]
    raw = list((tmp_path / "data" / "raw").glob("*.mp4"))
    assert len(list(held_out.glob("*.mp4"))) == 8
    assert (len(clips) == len(raw)) == (split_mode == "reference")
