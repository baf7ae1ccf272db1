"""probe / split / filter on synthetic videos made here (PyAV, 64x48, a few seconds)."""

import dataclasses
from fractions import Fraction

import av
import cv2
import decord
import numpy as np
import pytest

from data_helpers import PALETTE, first_frame_rgb, make_black_video, make_video, truncate
from data_pipeline.__main__ import main
from data_pipeline.config import FilterConfig, ProbeConfig, RunnerConfig, SplitConfig
from data_pipeline.pipeline import make_stage
from data_pipeline.runner import run_stage
from data_pipeline.split import detect_cuts, plan_clips, split, split_video
from opensora.data.manifest import read_manifest
from opensora.utils import file_sha256

SERIAL = RunnerConfig(workers=0, progress=False)


@pytest.mark.parametrize("detector", ["content", "adaptive"])
def test_cuts_found_within_one_frame(tmp_path, detector):
    true_cuts = make_video(tmp_path / "v.mp4", [30, 41, 17, 52], fps=24)
    cuts, n, fps, _ = detect_cuts(str(tmp_path / "v.mp4"), SplitConfig(detector=detector, min_scene_len=8))
    assert n == 140 and fps == 24
    assert len(cuts) == len(true_cuts)
    assert all(abs(c - t) <= 1 for c, t in zip(cuts, true_cuts)), (cuts, true_cuts)


def test_clips_are_frame_accurate_and_decode_to_manifest_count(tmp_path):
    true_cuts = make_video(tmp_path / "v.mp4", [30, 41, 17, 52], fps=24, gop=250)
    cfg = SplitConfig(out_dir=str(tmp_path / "clips"), min_clip_s=0.5, max_clip_s=0)
    clips = split({"id": "v", "path": str(tmp_path / "v.mp4")}, cfg)
    assert [c["start_frame"] for c in clips] == [0, *true_cuts]
    for shot, clip in enumerate(clips):
        reader = decord.VideoReader(clip["path"])
        assert len(reader) == clip["num_frames"] == clip["end_frame"] - clip["start_frame"]
        assert clip["source_video"] == str(tmp_path / "v.mp4")
        assert clip["start_time"] == pytest.approx(clip["start_frame"] / 24)
        assert clip["sha256"] == file_sha256(clip["path"])  # the latent cache's content key, of this clip
        # First and last frame belong to this shot (the cut is not rounded to a keyframe).
        for index in (0, clip["num_frames"] - 1):
            rgb = first_frame_rgb(clip["path"], index)
            assert np.abs(rgb - np.array(PALETTE[shot])).max() < 40, (shot, index, rgb)


def test_long_shots_are_split_and_retimed_and_resized(tmp_path):
    make_video(tmp_path / "v.mp4", [100], fps=24, size=(96, 64))
    cfg = SplitConfig(out_dir=str(tmp_path / "clips"), min_clip_s=1.0, max_clip_s=2.0, target_fps=12, short_side=32)
    clips = split({"id": "v", "path": str(tmp_path / "v.mp4")}, cfg)
    # 100 frames at 24 fps: pieces of 48, 48; the 4-frame remainder is below min_clip_s.
    assert [(c["start_frame"], c["end_frame"]) for c in clips] == [(0, 48), (48, 96)]
    for clip in clips:
        reader = decord.VideoReader(clip["path"])
        assert clip["num_frames"] == len(reader) == 24 and clip["fps"] == 12
        assert (clip["width"], clip["height"]) == (48, 32) == (reader[0].shape[1], reader[0].shape[0])


def test_short_side_never_upscales_and_min_short_side_rejects(tmp_path):
    # A 64x48 source asked for short_side=360 keeps its size: an upscaled clip only teaches blur.
    make_video(tmp_path / "small.mp4", [30], size=(64, 48))
    cfg = SplitConfig(out_dir=str(tmp_path / "clips"), min_clip_s=0.5, short_side=360)
    (clip,) = split({"id": "small", "path": str(tmp_path / "small.mp4")}, cfg)
    frame = decord.VideoReader(clip["path"])[0]
    assert (clip["width"], clip["height"]) == (64, 48) == (frame.shape[1], frame.shape[0])
    # min_short_side rejects (not fails) a source that is too small, with the reason.
    make_video(tmp_path / "tiny.mp4", [30], size=(32, 24))
    (tmp_path / "in.csv").write_text(f"path\n{tmp_path / 'small.mp4'}\n{tmp_path / 'tiny.mp4'}\n")
    cfg = SplitConfig(out_dir=str(tmp_path / "clips2"), min_clip_s=0.5, short_side=360, min_short_side=48)
    summary = run_stage(make_stage("split", cfg, tmp_path / "s.parquet"), tmp_path / "in.csv", tmp_path / "s.parquet",
                        SERIAL)
    assert (summary.done, summary.rejected, summary.failed) == (1, 1, 0)
    df = read_manifest(tmp_path / "s.parquet", usable_only=False)
    tiny = df[df["split_status"] == "rejected"].iloc[0]
    assert tiny["path"] == str(tmp_path / "tiny.mp4")
    assert "short side 24 px < min_short_side 48" in tiny["split_error"]


def test_plan_clips_edges_and_limits():
    cfg = SplitConfig(min_clip_s=1.0, max_clip_s=2.0, drop_edge_frames=2, max_clips=3)
    assert plan_clips([30], 100, 10.0, cfg) == [(2, 22), (32, 52), (52, 72)]


@pytest.mark.parametrize("detector,extra", [
    ("content", {"max_clip_s": 1.0, "drop_edge_frames": 2}),
    ("adaptive", {"max_clip_s": 1.0, "drop_edge_frames": 2}),
    ("content", {"max_clip_s": 0, "max_clips": 2}),
    ("content", {"max_clip_s": 1.5, "target_fps": 10, "short_side": 32}),
])
def test_one_pass_split_writes_exactly_the_planned_clips(tmp_path, detector, extra):
    # A 5-frame shot (shorter than min_clip_s) is written on the fly and must be dropped again.
    make_video(tmp_path / "v.mp4", [30, 41, 5, 52, 17], fps=24, gop=250)
    cfg = SplitConfig(detector=detector, min_scene_len=4, min_clip_s=0.5, **extra)
    cuts, n, fps, _ = detect_cuts(str(tmp_path / "v.mp4"), cfg)
    res = split_video(str(tmp_path / "v.mp4"), cfg, lambda k: tmp_path / "clips" / f"c{k}.mp4")
    assert len(cuts) == 4
    # max_clips stops the decode once its clips are written, so only the cuts seen so far are known.
    assert res.cuts == (cuts[: len(res.cuts)] if cfg.max_clips else cuts)
    assert res.num_frames < n if cfg.max_clips else res.num_frames == n
    assert res.spans == plan_clips(cuts, n, float(fps), cfg) and res.spans
    assert sorted((tmp_path / "clips").iterdir()) == sorted(res.paths)  # aborted clips leave no file
    shots = np.searchsorted(cuts, [start for start, _ in res.spans], side="right")
    for (start, end), count, path, shot in zip(res.spans, res.counts, res.paths, shots):
        reader = decord.VideoReader(str(path))
        assert len(reader) == count == (end - start if not cfg.target_fps else (end - start - 1) * 10 // 24 + 1)
        assert reader[0].shape[:2] == (res.height, res.width)
        for index in (0, count - 1):
            rgb = first_frame_rgb(path, index)
            assert np.abs(rgb - np.array(PALETTE[shot])).max() < 40, (path, index, rgb)


def test_a_cut_reported_after_its_frames_were_encoded_is_an_error(tmp_path):
    import av

    from data_pipeline.split import _ClipCutter

    cfg = SplitConfig(min_clip_s=0.1, max_clip_s=0, drop_edge_frames=1)
    cutter = _ClipCutter(cfg, Fraction(24), Fraction(24), (64, 48), lambda k: tmp_path / f"c{k}.mp4")
    for index in range(4):
        cutter.commit(index, av.VideoFrame(64, 48, "yuv420p"))
    cutter.add_cut(8)
    cutter.add_cut(6)  # late and out of order, but frames 5.. (its trimmed edge and shot) are not encoded yet
    assert cutter.cuts == [6, 8]
    with pytest.raises(RuntimeError, match="cut at frame 4 after frame 3"):
        cutter.add_cut(4)  # would move frame 3 into the trimmed edge, but it is already in the clip
    cutter.abort()
    assert not list(tmp_path.iterdir())


def test_broken_inputs_are_recorded_not_fatal(tmp_path):
    make_video(tmp_path / "good.mp4", [40, 40])
    truncate(tmp_path / "good.mp4", tmp_path / "trunc.mp4", 0.5)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "text.mp4").write_text("hello, not a video")
    # A still renamed to .mp4: FFmpeg's image demuxer opens it, so only a look at what it is gives an honest reason.
    ok, png = cv2.imencode(".png", np.full((48, 64, 3), 128, np.uint8))
    (tmp_path / "image.mp4").write_bytes(png.tobytes())
    with av.open(str(tmp_path / "audio.mp4"), "w", format="wav") as container:  # audio only, named like a video
        stream = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    names = ["good", "trunc", "empty", "text", "missing", "image", "audio"]
    (tmp_path / "in.csv").write_text("path\n" + "\n".join(str(tmp_path / f"{n}.mp4") for n in names) + "\n")
    summary = run_stage(make_stage("probe", ProbeConfig(), tmp_path / "p.parquet"), tmp_path / "in.csv",
                        tmp_path / "p.parquet", SERIAL)
    assert (summary.done, summary.failed) == (1, 6)
    df = read_manifest(tmp_path / "p.parquet", usable_only=False).set_index("path")
    status = {n: df.loc[str(tmp_path / f"{n}.mp4"), "probe_status"] for n in names}
    error = {n: df.loc[str(tmp_path / f"{n}.mp4"), "probe_error"] for n in names}
    assert status == {"good": "done", **{n: "failed" for n in names[1:]}}
    assert "empty" in error["empty"] and "no such file" in error["missing"]
    assert "truncated MP4: no index (moov box" in error["trunc"]
    assert error["text"] == "ProbeError: not a video container (text)"
    assert error["image"] == "ProbeError: not a video container (PNG image data)"
    assert "no video stream" in error["audio"]
    assert df.loc[str(tmp_path / "good.mp4"), "num_frames"] == 80
    # The next stage carries failures through without touching them.
    split_summary = run_stage(make_stage("split", SplitConfig(min_clip_s=0.5), tmp_path / "s.parquet"),
                              tmp_path / "p.parquet", tmp_path / "s.parquet", SERIAL)
    assert (split_summary.upstream, split_summary.done) == (6, 1)
    assert len(read_manifest(tmp_path / "s.parquet")) == 2


def test_filter_rejects_black_static_and_short(tmp_path):
    make_video(tmp_path / "moving.mp4", [48], size=(64, 48))
    make_video(tmp_path / "static.mp4", [48], size=(64, 48), moving=False)
    make_black_video(tmp_path / "black.mp4")
    make_video(tmp_path / "short.mp4", [10])
    paths = [str(tmp_path / f"{n}.mp4") for n in ("moving", "static", "black", "short")]
    (tmp_path / "in.csv").write_text("path,num_frames,fps\n" + "\n".join(
        f"{p},{10 if 'short' in p else 48},24" for p in paths) + "\n")
    cfg = FilterConfig(min_duration_s=1.0, min_motion=0.1, blank_std=1.0)
    summary = run_stage(make_stage("filter", cfg, tmp_path / "f.parquet"), tmp_path / "in.csv",
                        tmp_path / "f.parquet", SERIAL)
    assert (summary.done, summary.rejected) == (1, 3)
    df = read_manifest(tmp_path / "f.parquet", usable_only=False).set_index("path")
    assert df.loc[paths[0], "filter_status"] == "done" and df.loc[paths[0], "motion"] > 0.1
    assert df.loc[paths[1], "filter_error"].startswith("static")
    assert df.loc[paths[2], "filter_error"].startswith("black")
    assert df.loc[paths[3], "filter_error"].startswith("duration")


def test_folder_input_lists_every_skipped_entry(tmp_path):
    src = tmp_path / "in"
    make_video(src / "a.mp4", [30])
    (src / "a.txt").write_text("a caption")  # a sidecar, named as one
    (src / "notes.md").write_text("not a video")
    (src / "gone.mp4").symlink_to(tmp_path / "deleted.mp4")  # dangling
    (src / "folder.mp4").mkdir()
    make_video(src / "folder.mp4" / "b.mp4", [30])  # a folder named like a video is still scanned
    (src / ".a.mp4.tmp").write_bytes(b"")
    (tmp_path / "run.yaml").write_text(
        f"input: {src}\nwork_dir: {tmp_path / 'w'}\nstages: [probe]\nrunner: {{workers: 0, progress: false}}\n")
    assert main(["run", "--config", str(tmp_path / "run.yaml")]) == 0
    df = read_manifest(tmp_path / "w" / "00_probe.parquet", usable_only=False)
    entries = ["a.mp4", "a.txt", "notes.md", "gone.mp4", "folder.mp4", "folder.mp4/b.mp4", ".a.mp4.tmp"]
    assert sorted(df["path"]) == sorted(str(src / e) for e in entries)  # inputs: every entry, a row each
    df = df.set_index("path")
    scan = {e: (df.loc[str(src / e), "scan_status"], df.loc[str(src / e), "scan_error"]) for e in entries}
    assert scan["a.mp4"][0] == scan["folder.mp4/b.mp4"][0] == "done"
    assert scan["gone.mp4"] == ("failed", f"dangling symlink -> {tmp_path / 'deleted.mp4'}")
    assert scan["a.txt"] == ("rejected", "caption sidecar of a video, not a video")
    assert scan["notes.md"] == ("rejected", "not a video by its extension (.md)")
    assert scan["folder.mp4"][0] == "rejected" and "folder" in scan["folder.mp4"][1]
    assert scan[".a.mp4.tmp"][0] == "rejected" and "hidden" in scan[".a.mp4.tmp"][1]
    assert set(df["probe_status"].dropna()) == {"done"} and df["probe_status"].notna().sum() == 2
    assert len(read_manifest(tmp_path / "w" / "manifest.parquet")) == 2


def test_cli_stage_and_config_errors(tmp_path, capsys):
    make_video(tmp_path / "in" / "a.mp4", [30, 30])
    assert main(["probe", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "p.csv"),
                 "--workers", "0", "--no-progress"]) == 0
    assert read_manifest(tmp_path / "p.csv")["num_frames"].tolist() == [60]
    (tmp_path / "bad.yaml").write_text("threshhold: 3\n")
    assert main(["split", "--input", str(tmp_path / "p.csv"), "--output", str(tmp_path / "s.csv"),
                 "--config", str(tmp_path / "bad.yaml")]) == 1
    err = capsys.readouterr().err
    assert "threshhold" in err and "bad.yaml" in err
    (tmp_path / "run.yaml").write_text(f"input: {tmp_path / 'in'}\nwork_dir: {tmp_path / 'w'}\nstages: [probe, splitt]\n")
    assert main(["run", "--config", str(tmp_path / "run.yaml")]) == 1
    assert "splitt" in capsys.readouterr().err


def test_pipeline_run_folder_to_training_manifest(tmp_path):
    make_video(tmp_path / "in" / "a.mp4", [30, 41])
    make_video(tmp_path / "in" / "b.mp4", [50])
    (tmp_path / "in" / "broken.mp4").write_bytes(b"\x00" * 100)
    (tmp_path / "run.yaml").write_text(
        f"input: {tmp_path / 'in'}\nwork_dir: {tmp_path / 'w'}\nstages: [probe, split, filter]\n"
        "runner: {workers: 0, progress: false}\nsplit: {min_clip_s: 0.5}\nfilter: {blank_std: 0.0}\n"
    )
    assert main(["run", "--config", str(tmp_path / "run.yaml")]) == 0
    final = read_manifest(tmp_path / "w" / "manifest.parquet")
    assert sorted(final["num_frames"].tolist()) == [30, 41, 50]
    assert (final["filter_status"] == "done").all()
    assert [file_sha256(p) for p in final["path"]] == final["sha256"].tolist()  # split's hashes reach training
    assert len(read_manifest(tmp_path / "w" / "02_filter.parquet", usable_only=False)) == 4


def test_aesthetic_score_from_a_tiny_random_local_model(tmp_path):
    """A random CLIP tower and a random two-layer head through the real loading path: the score is the mean over
    the sampled frames of head(normalised image embedding), computed here from the transformers model itself."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from data_pipeline.filter import filter_clip, sample_pairs
    from data_pipeline.rows import Reject

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=16, projection_dim=16)
    tower = CLIPVisionModelWithProjection(config).eval()
    tower.save_pretrained(tmp_path / "aes")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "aes")
    head = {"layers.0.weight": torch.randn(8, 16), "layers.0.bias": torch.randn(8),
            "layers.1.weight": torch.randn(1, 8), "layers.1.bias": torch.full((1,), 5.0)}
    save_file(head, str(tmp_path / "aes" / "aesthetic_head.safetensors"))
    make_video(tmp_path / "v.mp4", [30])
    row = {"id": "v", "path": str(tmp_path / "v.mp4")}
    cfg = FilterConfig(aesthetic_model=str(tmp_path / "aes"), blank_std=0.0, min_aesthetic=-100.0)

    frames = sample_pairs(row["path"], cfg.num_samples, cfg.sample_width)[:, 0]  # what the filter scores
    with torch.no_grad():
        embeds = tower(**processor(images=list(frames), return_tensors="pt")).image_embeds  # (N, 16)
        embeds = embeds / embeds.norm(dim=-1, keepdim=True)
        hidden = embeds @ head["layers.0.weight"].T + head["layers.0.bias"]
        per_frame = (hidden @ head["layers.1.weight"].T + head["layers.1.bias"])[:, 0]  # (N,)
    assert len(frames) > 1 and float(per_frame.max() - per_frame.min()) > 1e-3, "the frames score differently"
    expected = float(per_frame.mean())
    assert abs(expected - 5.0) > 0.1, "the head's weights, not only its bias, make the score"

    [out] = filter_clip(row, cfg)
    assert out["aesthetic"] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(Reject, match=f"aesthetic {expected:.2f} < {expected + 0.5}"):
        filter_clip(row, dataclasses.replace(cfg, min_aesthetic=expected + 0.5))


def test_bench_pipeline_reports_split_per_cpu_second(tmp_path):
    from tools.bench_pipeline import main as bench

    out = bench(["--seconds", "1.2", "--videos", "1", "--presets", "ultrafast", "--sizes", "360",
                 "--json", str(tmp_path / "b.json")])
    rows = {row["stage"]: row for row in out["stages"]}
    split_row = rows["split, 360p clips, ultrafast"]
    assert split_row["clips"] == 1 and split_row["clip_psnr_db"] > 30 and split_row["clip_mbit_s"] > 0
    # Detection and cutting both decode every frame, so neither can beat decoding alone by much.
    assert 0 < split_row["x_realtime_per_cpu_s"] < 1.5 * rows["decode only (PyAV, 1 thread)"]["x_realtime_per_cpu_s"]
    assert {"probe", "detect only (ContentDetector)", "filter (on the 360p clips)"} <= set(rows)
    assert (tmp_path / "b.json").exists()
