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
from opensora.training.validation import union_holdout, ValidationConfig

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
