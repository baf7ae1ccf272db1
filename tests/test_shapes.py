"""The shapes data source and the colour/direction check the demo reports with.

The check is only worth reporting if it separates right from wrong: it must score (close to) 100 % on
real generated clips, also after the pipeline re-encoded and shrank them, and about chance when the
captions are shuffled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import PipelineConfig
from data_pipeline.pipeline import run_pipeline
from data_pipeline.sources import SourceFile, resolve_input
from data_pipeline.sources.shapes import ShapesConfig, generate_shapes, plan_video, render_shot, train_combos
from opensora.config import ConfigError, load_config
from opensora.data.video_io import read_video
from opensora.eval import COLOURS, DIRECTIONS, SHAPES, ShapeCaption, analyze_video, check_videos, parse_caption

ROOT = Path(__file__).resolve().parents[1]


def tiny(out_dir, **kw) -> ShapesConfig:
    opts = dict(out_dir=str(out_dir), num_videos=2, shots_per_video=3, min_shot_frames=8, max_shot_frames=10, size=32)
    return ShapesConfig(**{**opts, **kw})


def shots_of(df) -> tuple[list[np.ndarray], list[str]]:
    """Every shot of every generated video, cut by its sidecar."""
    videos, captions = [], []
    for path in df["path"]:
        frames = read_video(path)
        sidecar = json.loads(Path(path).with_suffix(".json").read_text())
        assert sidecar["shots"][-1]["end_frame"] == len(frames)
        for shot in sidecar["shots"]:
            videos.append(frames[shot["start_frame"] : shot["end_frame"]])
            captions.append(shot["text"])
    return videos, captions


def test_caption_round_trip():
    facts = ShapeCaption("red", "circle", "left", "gray")
    assert facts.text == "a red circle moving left on a gray background"
    assert parse_caption(facts.text) == facts
    assert parse_caption("A Red circle moving left on a gray background.") == facts
    assert parse_caption("a purple circle moving left on a gray background") is None
    assert parse_caption("a cat on a sofa") is None


def test_check_reads_every_colour_and_direction_from_rendered_shots(tmp_path):
    cfg = tiny(tmp_path)
    for colour in COLOURS:
        for shape in SHAPES:
            for direction in DIRECTIONS:
                for background, cross in (("white", 0.0), ("black", 1.0)):
                    frames = render_shot(ShapeCaption(colour, shape, direction, background), 8, cross, cfg)
                    result = analyze_video(frames)
                    assert (result.colour, result.direction) == (colour, direction), (colour, shape, direction)
                    assert result.colour_share > 0.95


def test_check_says_none_without_object_or_motion(tmp_path):
    blank = np.full((6, 32, 32, 3), 160, np.uint8)
    result = analyze_video(blank)
    assert result.colour is None and result.direction is None and result.object_frames == 0
    still = np.repeat(render_shot(ShapeCaption("blue", "square", "up", "white"), 8, 0.5, tiny(""))[3:4], 6, axis=0)
    result = analyze_video(still)
    assert result.colour == "blue" and result.direction is None
    flash = render_shot(ShapeCaption("red", "circle", "left", "gray"), 8, 0.5, tiny(""))
    flash[2:] = 128  # the object in 2 of 8 frames (a collapsed sample): no direction from 2 centroids
    assert analyze_video(flash).direction is None and analyze_video(flash[:2]).direction == "left"
    noise = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    result = analyze_video(noise)
    assert result.colour is None and result.direction is None, "noise names no colour and no motion"
    with pytest.raises(ValueError, match="not a shapes caption"):
        check_videos([blank], ["a cat"])


def test_generator_videos_score_full_marks_and_shuffled_captions_score_chance(tmp_path):
    df = generate_shapes(tiny(tmp_path / "raw", num_videos=6, shots_per_video=4), progress=False)
    videos, captions = shots_of(df)
    assert len(videos) == 24
    report = check_videos(videos, captions)
    assert report.colour_share == 1.0 and report.direction_share == 1.0, "\n".join(report.lines())
    rng = np.random.default_rng(0)
    colour, direction = [], []
    for _ in range(20):
        shuffled = check_videos(videos, [captions[i] for i in rng.permutation(len(captions))])
        colour.append(shuffled.colour_share)
        direction.append(shuffled.direction_share)
    # 4 colours, 4 directions: chance is about 25 %.
    assert 0.1 < np.mean(colour) < 0.45 and 0.1 < np.mean(direction) < 0.45, (np.mean(colour), np.mean(direction))


def test_held_out_combinations_never_appear_and_sample_prompts_are_exactly_them():
    spec = load_config(SourceFile, ROOT / "configs/demo/shapes.yaml")
    cfg = spec.shapes
    seen = {f"{s['colour']} {s['shape']} {s['direction']}" for i in range(cfg.num_videos) for s in plan_video(i, cfg)}
    assert not seen & set(cfg.held_out)
    assert seen == set(train_combos(cfg)), "every training combination appears at least once"
    lines = (ROOT / "configs/demo/sample_prompts.txt").read_text().splitlines()
    prompts = [parse_caption(line) for line in lines if line.strip() and not line.startswith("#")]
    assert None not in prompts
    assert sorted(p.combo for p in prompts) == sorted(cfg.held_out)


def test_config_checks():
    with pytest.raises(ValueError, match="purple"):
        ShapesConfig(out_dir="x", colours=["red", "purple"])
    with pytest.raises(ValueError, match="held_out"):
        ShapesConfig(out_dir="x", held_out=["red circle sideways"])
    with pytest.raises(ValueError, match="cross_range"):
        ShapesConfig(out_dir="x", cross_range=[0.6, 0.4])
    with pytest.raises(ValueError, match="cross_range"):
        ShapesConfig(out_dir="x", cross_range=[0.5])
    narrow = ShapesConfig(out_dir="x", cross_range=[0.45, 0.55])
    crosses = [s["cross"] for i in range(narrow.num_videos) for s in plan_video(i, narrow)]
    assert min(crosses) >= 0.45 and max(crosses) <= 0.55 and max(crosses) - min(crosses) > 0.05
    with pytest.raises(ValueError, match="every training shot with colour"):
        ShapesConfig(out_dir="x", colours=["red", "blue"], shapes=["circle"], directions=["left"],
                     held_out=["red circle left"])


def test_generation_resumes_and_refuses_a_different_config(tmp_path):
    cfg = tiny(tmp_path / "raw")
    df = generate_shapes(cfg, progress=False)
    mtimes = [Path(p).stat().st_mtime_ns for p in df["path"]]
    more = generate_shapes(tiny(tmp_path / "raw", num_videos=3), progress=False)  # more videos, same look
    assert [Path(p).stat().st_mtime_ns for p in more["path"][:2]] == mtimes
    assert len(more) == 3 and all(Path(p).is_file() for p in more["path"])
    with pytest.raises(ValueError, match="different config"):
        generate_shapes(tiny(tmp_path / "raw", seed=1), progress=False)
    split = json.loads((tmp_path / "raw" / "split.json").read_text())
    assert set(split["held_out"]) == set(cfg.held_out) and not set(split["train"]) & set(cfg.held_out)


def test_source_file_as_pipeline_input(tmp_path):
    spec = tmp_path / "shapes.yaml"
    spec.write_text(f"shapes:\n  out_dir: {tmp_path / 'raw'}\n  num_videos: 1\n  size: 32\n")
    df = resolve_input(spec)
    assert len(df) == 1 and df["id"].notna().all() and Path(df["path"][0]).is_file()
    spec.write_text("shapes:\n  out_dir: x\n  num_video: 1\n")
    with pytest.raises(ConfigError, match="num_video"):
        resolve_input(spec)
    spec.write_text("{}\n")
    with pytest.raises(ConfigError, match="generator section"):
        resolve_input(spec)


def test_demo_pipeline_finds_every_cut_and_carries_the_shot_captions(tmp_path):
    spec = tmp_path / "shapes.yaml"
    spec.write_text(f"shapes:\n  out_dir: {tmp_path / 'raw'}\n  num_videos: 2\n  shots_per_video: 3\n")
    cfg = load_config(PipelineConfig, ROOT / "configs/demo/pipeline.yaml",
                      [f"input={spec}", f"work_dir={tmp_path / 'work'}", "runner.workers=0", "runner.progress=false"])
    run_pipeline(cfg)
    import pandas as pd

    clips = pd.read_parquet(tmp_path / "work" / "manifest.parquet")
    expected = []
    for i in range(2):
        sidecar = json.loads((tmp_path / "raw" / f"shapes_{i:04d}.json").read_text())
        expected += [(s["start_frame"], s["end_frame"], s["text"]) for s in sidecar["shots"]]
    got = list(zip(clips["start_frame"].astype(int), clips["end_frame"].astype(int), clips["text"]))
    assert got == expected, "PySceneDetect must cut exactly at the shot boundaries"
    assert (clips["caption_source"] == "sidecar").all() and (clips["width"] == 32).all()
    report = check_videos([read_video(p) for p in clips["path"]], list(clips["text"]))
    assert report.colour_share == 1.0 and report.direction_share == 1.0, "\n".join(report.lines())
