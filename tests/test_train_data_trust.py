"""Data that must not quietly mislead a run (issue 23): the validation holdout by source video, empty captions and
clips failing to load, and data-parallel ranks that stay on one global batch when a rank's whole batch fails.

Manifests here point at files that are never opened: rows carry ``num_frames``/``height``/``width``, so building a
dataset reads no video; the loader tests use a dataset whose loads fail where the test says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from opensora.data.dataset import DataConfig, Holdout, VideoDataset
from opensora.data.manifest import write_manifest
from opensora.training.validation import ValidationConfig, union_holdout
from tests.test_training import manifest  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def split_manifest(tmp_path: Path, sources: int = 40, pieces: int = 4, name: str = "clips.parquet", **columns) -> Path:
    """Rows as data_pipeline/split writes them: ids ``<source id>_<k>``, consecutive pieces of each source with its
    ``source_video``; sizes given so that no file is read."""
    rows = []
    for s in range(sources):
        for k in range(pieces):
            rows.append(dict(id=f"src{s:03d}_{k:04d}", path=f"clips/src{s:03d}_{k:04d}.mp4", text=f"clip {s} {k}",
                             num_frames=8, height=16, width=16, fps=8.0, source_video=f"/raw/src{s:03d}.mp4",
                             start_frame=8 * k, end_frame=8 * (k + 1)))
    df = pd.DataFrame(rows)
    for column, values in columns.items():
        df[column] = values
    return write_manifest(df, tmp_path / name)


def data_cfg(manifest: Path, **kw) -> DataConfig:
    return DataConfig(manifest=str(manifest), num_frames=4, frame_interval=1, image_size=(16, 16), num_workers=0, **kw)


def sources_of(dataset: VideoDataset) -> set[str]:
    return {i.rsplit("_", 1)[0] for i in dataset.ids}


# -- item 4: the holdout unit is the source video ---------------------------------------------------------------
def test_pieces_of_one_source_never_land_on_both_sides(tmp_path):
    """split cuts a long shot into consecutive pieces <source>_<k>: held out one by one (by a hash of the clip id),
    neighbours of a validation clip were trained on. The unit must be the source video."""
    cfg = data_cfg(split_manifest(tmp_path))
    holdout = Holdout(0.3)
    train, held = VideoDataset(cfg, holdout=holdout), VideoDataset(cfg, holdout=holdout, held_out=True)
    assert len(train) + len(held) == 160 and 0 < len(held) < 160
    assert not sources_of(train) & sources_of(held), "pieces of one source video on both sides of the holdout"
    assert len(held) % 4 == 0, "a held-out source takes all its pieces"


def test_a_listed_clip_takes_its_whole_source_video_with_it(tmp_path):
    cfg = data_cfg(split_manifest(tmp_path))
    holdout = Holdout(0.0, frozenset({"src007_0002"}))
    held = VideoDataset(cfg, holdout=holdout, held_out=True)
    train = VideoDataset(cfg, holdout=holdout)
    assert sorted(held.ids) == [f"src007_{k:04d}" for k in range(4)]
    assert "src007" not in sources_of(train) and len(train) == 156


def test_rows_without_a_source_video_are_held_out_one_by_one_and_stably(tmp_path):
    """Rows that were not cut by split (an Open-Sora CSV, images) are their own unit, keyed by their id; the choice
    depends on the manifest's contents only, not on its row order, and larger fractions nest."""
    manifest = split_manifest(tmp_path, sources=200, pieces=1, source_video=None)
    cfg = data_cfg(manifest)
    held = set(VideoDataset(cfg, holdout=Holdout(0.2), held_out=True).ids)
    assert 0.1 < len(held) / 200 < 0.3
    shuffled = pd.read_parquet(manifest).sample(frac=1.0, random_state=0)
    again = set(VideoDataset(data_cfg(write_manifest(shuffled, tmp_path / "shuffled.parquet")), holdout=Holdout(0.2),
                             held_out=True).ids)
    assert again == held
    assert set(VideoDataset(cfg, holdout=Holdout(0.1), held_out=True).ids) <= held


def test_every_stage_leaves_out_the_union_by_source(tmp_path):
    """union_holdout keeps the listed ids of every stage; each one still takes its source video along."""
    cfg = data_cfg(split_manifest(tmp_path))
    union = union_holdout([ValidationConfig(holdout_ids=["src001_0000"]),
                           ValidationConfig(holdout_ids=["src002_0003"])])
    train = VideoDataset(cfg, holdout=union)
    assert not {"src001", "src002"} & sources_of(train) and len(train) == 152


def test_the_validation_loss_spreads_its_clips_over_source_videos(tmp_path):
    """With whole videos held out, the first num_clips clips in manifest order would be a few videos' pieces."""
    from opensora.training.validation import spread_over_units

    held = VideoDataset(data_cfg(split_manifest(tmp_path)), holdout=Holdout(0.3), held_out=True)
    picked = [held.ids[i] for i in spread_over_units(held.units, 6)]
    assert len({i.rsplit("_", 1)[0] for i in picked}) == 6 and all(i.endswith("_0000") for i in picked)
    assert spread_over_units(["a", "a", "b"], 5) == [0, 2, 1]


# -- item 5: empty captions and clips failing to load ------------------------------------------------------------
def captioned(tmp_path: Path, empty: int, total: int = 40) -> Path:
    texts = ["" if i < empty // 2 else None if i < empty else f"clip {i}" for i in range(total)]
    return split_manifest(tmp_path, sources=total, pieces=1, text=texts)


def test_empty_captions_above_the_share_stop_the_run_before_it_starts(tmp_path):
    """A manifest with empty or missing captions trained without text conditioning, silently."""
    from opensora.config import ConfigError
    from opensora.data.loader import build_dataloader

    manifest = captioned(tmp_path, empty=4)
    with pytest.raises(ConfigError, match=r"clips.parquet: 4 of 40 training clips \(10.0%\) have an empty or "
                                          r"missing caption.*max_empty_caption_share"):
        build_dataloader(data_cfg(manifest), batch_size=2)
    with pytest.warns(UserWarning, match="4 of 40 training clips"):  # within a share the recipe allows: a warning
        build_dataloader(data_cfg(manifest, max_empty_caption_share=0.2), batch_size=2)


def test_empty_captions_exit_the_cli_with_status_2_and_the_message(tmp_path, manifest):
    from tests.test_training import train_cmd, write_recipe

    df = pd.read_parquet(manifest)
    df.loc[:2, "text"] = ""
    bad = write_manifest(df, tmp_path / "uncaptioned.parquet")
    proc = subprocess.run(train_cmd(write_recipe(tmp_path, bad, steps0=1), tmp_path / "run"),
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "uncaptioned.parquet: 3 of 8 training clips (37.5%) have an empty or missing caption" in proc.stderr
    assert "Traceback" not in proc.stderr


def flaky(monkeypatch, bad) -> None:
    """Clips whose index satisfies ``bad`` fail to load; the others give a blank sample without reading a file."""
    import torch

    def load(self, index, random_start=None):
        if bad(index):
            raise OSError(f"simulated: clip {index} is unreadable")
        return torch.zeros(3, *self.bucket_keys[index])

    monkeypatch.setattr(VideoDataset, "load", load)


def test_a_run_where_most_clips_fail_to_load_stops_with_the_counts(tmp_path, monkeypatch):
    """Before: it trained on the rest while failures.jsonl grew every epoch."""
    from opensora.config import ConfigError
    from opensora.data.loader import build_dataloader

    flaky(monkeypatch, lambda i: i % 3 != 0)  # two clips in three fail
    manifest, log = split_manifest(tmp_path, sources=40, pieces=1), tmp_path / "failures.jsonl"
    loader, sampler = build_dataloader(data_cfg(manifest), batch_size=2, failures_path=log)
    with pytest.raises(ConfigError, match=r"26 of the last 40 samples failed to load \(65%.*"
                                          r"/clips.parquet; .*failures.jsonl"):
        list(loader)
    assert (sampler.epoch, sampler.samples_consumed()) == (1, 0), "stopped once a window (here: all 40 clips) was seen"


def test_a_few_failed_loads_within_the_limit_train_on(tmp_path, monkeypatch):
    from opensora.data.loader import build_dataloader

    flaky(monkeypatch, lambda i: i == 0)  # one clip of 40: at most 1 in any window of 10 samples
    manifest = split_manifest(tmp_path, sources=40, pieces=1)
    loader, sampler = build_dataloader(data_cfg(manifest, failure_window=10), batch_size=2)
    for _ in range(3):
        assert sum(len(b["index"]) for b in loader) == 39
    strict, _ = build_dataloader(data_cfg(manifest, max_failed_share=0.05, failure_window=10), batch_size=2)
    with pytest.raises(ValueError, match="failed to load"):
        list(strict)


@pytest.mark.parametrize("field, value, message", [("max_empty_caption_share", 1.5, "a share in \\[0, 1\\]"),
                                                   ("max_failed_share", -0.1, "a share in \\[0, 1\\]"),
                                                   ("failure_window", 0, ">= 1 samples")])
def test_data_check_settings_are_checked(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=f"data.{field} must be {message}"):
        data_cfg(tmp_path / "m.parquet", **{field: value})


# -- item 6: data-parallel ranks agree on a batch broken on one of them ----------------------------------------
def data_worker(tmp_path: Path, manifest: Path, mode: str) -> list[dict]:
    """Runs a mode of tests/dist_workers/data_worker.py on 2 gloo ranks; returns each rank's result."""
    from tests.test_training import env, write_recipe

    recipe = write_recipe(tmp_path, manifest, steps0=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_workers" / "data_worker.py"), mode, "--recipe", str(recipe),
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp_path / "result.json").read_text())


@pytest.mark.slow
def test_a_batch_broken_on_one_data_parallel_rank_is_skipped_by_all(tmp_path, manifest):
    """Without sequence parallelism, a rank whose whole batch failed skipped it alone: from then on the ranks
    trained on different global batches (their samplers one batch apart) and a checkpoint kept one rank's
    position. Every rank must skip that global batch, and stay on one position."""
    rank0, rank1 = data_worker(tmp_path, manifest, "dp-broken")
    position = [(s["epoch"], s["consumed"]) for s in rank0["seen"]]
    assert position == [(s["epoch"], s["consumed"]) for s in rank1["seen"]], "ranks trained on different global batches"
    assert position[0] == (0, 4), "the first global batch (broken on rank 1) was skipped by both ranks"
    assert rank0["state"] == rank1["state"]
    failed = (tmp_path / "run" / "short" / "failures.jsonl").read_text().splitlines()
    assert len(failed) == 1 and "simulated read error on rank 1" in failed[0]


@pytest.mark.slow
def test_failed_loads_on_one_rank_stop_every_rank_at_the_same_batch(tmp_path, manifest):
    """Every load fails on rank 1 (half of all samples): the failed share is summed over the ranks, so both stop
    with the same message at the same position instead of one rank raising while the other waits in a collective."""
    rank0, rank1 = data_worker(tmp_path, manifest, "dp-failing")
    assert rank0["error"] == rank1["error"] and "4 of the last 8 samples failed to load (50%" in rank0["error"]
    assert rank0["state"] == rank1["state"] and rank0["step"] == rank1["step"] == 0
