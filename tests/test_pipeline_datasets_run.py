"""A dataset's metadata through the whole pipeline (issue 27): sources served on 127.0.0.1, each downloaded once,
cut at the dataset's spans within a frame (encode and reference modes) with their captions, a vanished source a
row with its reason, and a re-run that redoes nothing."""

from http.server import BaseHTTPRequestHandler

import av
import numpy as np
import pandas as pd
import pytest

from data_helpers import local_http_server
from data_pipeline.config import (
    CaptionConfig, DownloadConfig, PipelineConfig, RunnerConfig, SelectConfig, SplitConfig,
)
from data_pipeline.pipeline import run_pipeline
from opensora.data.manifest import read_manifest

FPS, FRAMES, STEP = 10, 60, 4  # frame i is a flat grey of level STEP * i: its picture says which frame it is


def numbered_video(path):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "10", "g": "50"}  # cuts fall between keyframes
        for i in range(FRAMES):
            img = np.full((48, 64, 3), STEP * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def frame_number(path, index):
    """Which source frame frame ``index`` of a video shows."""
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return round(frame.to_ndarray(format="rgb24").mean() / STEP)
    raise IndexError(index)


class Handler(BaseHTTPRequestHandler):
    files: dict = {}
    hits: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        name = self.path.strip("/")
        Handler.hits[name] = Handler.hits.get(name, 0) + 1
        if name not in Handler.files:
            return self.send_error(404)  # a deleted video
        body = Handler.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("mode", ["encode", "reference"])
def test_panda70m_metadata_to_captioned_clips(tmp_path, mode, capsys):
    numbered_video(tmp_path / "a.mp4")
    Handler.files, Handler.hits = {"a.mp4": (tmp_path / "a.mp4").read_bytes()}, {}
    with local_http_server(Handler) as url:
        # Panda-70M's published layout: one row per source, its clips as lists
        pd.DataFrame([
            {"videoID": "A", "url": f"{url}/a.mp4",
             "timestamp": str([["0:00:01.000", "0:00:02.500"], ["0:00:03.000", "0:00:04.000"],
                               ["0:00:00.000", "0:00:05.000"]]),
             "caption": str(["a grey fade", "a lighter grey", "filtered out"]), "matching_score": str([0.5, 0.6, 0.2])},
            {"videoID": "B", "url": f"{url}/gone.mp4", "timestamp": str([["0:00:00.000", "0:00:01.000"]]),
             "caption": str(["never seen"]), "matching_score": str([0.9])},
        ]).to_csv(tmp_path / "panda.csv", index=False)
        cfg = PipelineConfig(
            input=str(tmp_path / "panda.csv"), work_dir=str(tmp_path / "work"), input_format="auto",
            stages=["probe", "split", "caption"], select=SelectConfig(min_score=0.45),
            runner=RunnerConfig(workers=0, progress=False),  # a vanished source is no failure
            download=DownloadConfig(allow_private_hosts=True, retries=0, backoff_s=0.01),
            split=SplitConfig(mode=mode, min_clip_s=2.0, max_clip_s=3.0), caption=CaptionConfig(model=""))
        summaries = run_pipeline(cfg)
        assert Handler.hits == {"a.mp4": 1, "gone.mp4": 1}  # one download for all of a source's clips
        assert [s.stage for s in summaries] == ["download", "probe", "split", "caption"]
        assert (summaries[0].failed, summaries[0].vanished) == (0, 1)
        downloaded = read_manifest(tmp_path / "work" / "00_download.parquet", usable_only=False)
        gone = downloaded[downloaded["url"].str.endswith("gone.mp4")].iloc[0]
        assert gone["download_status"] == "rejected" and gone["download_error"] == "vanished: HTTP 404 Not Found"
        assert "vanished sources: 1" in capsys.readouterr().err.splitlines()[-1]  # the run's last word

        clips = read_manifest(tmp_path / "work" / "manifest.parquet")
        # split's own min/max clip length and shot detection do not touch a dataset's spans
        assert list(clips["text"]) == ["a grey fade", "a lighter grey"]
        assert list(clips["start_frame"]) == [10, 30] and list(clips["end_frame"]) == [25, 40]
        assert list(clips["num_frames"]) == [15, 10] and set(clips["split_mode"]) == {mode}
        assert set(clips["caption_source"]) != {None}
        for row in clips.itertuples():
            if mode == "encode":
                assert abs(frame_number(row.path, 0) - row.start_frame) <= 1
                assert abs(frame_number(row.path, row.num_frames - 1) - (row.end_frame - 1)) <= 1
            else:
                assert row.path == row.source_video

        before = {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*.mp4")}
        again = run_pipeline(cfg)
        assert all(s.done == 0 and s.redone_settings + s.redone_input == 0 for s in again), [str(s) for s in again]
        assert Handler.hits == {"a.mp4": 1, "gone.mp4": 1}
        assert {p: p.stat().st_mtime_ns for p in (tmp_path / "work").rglob("*.mp4")} == before


def test_overlapping_spans_and_a_span_past_the_end(tmp_path):
    import json

    from data_pipeline.split import split

    numbered_video(tmp_path / "a.mp4")
    spans = [{"start": 0.0, "end": 2.0, "text": "first", "clip_id": "c0"},
             {"start": 1.0, "end": 3.0, "text": "overlapping", "clip_id": "c1"},
             {"start": 5.0, "end": 9.0, "text": "too long", "clip_id": "c2"}]
    row = {"id": "a", "path": str(tmp_path / "a.mp4"), "dataset_clips": json.dumps(spans)}
    clips = split(row, SplitConfig(out_dir=str(tmp_path / "clips")))
    assert [(c["id"], c["text"], c["start_frame"], c["end_frame"]) for c in clips] == [
        ("a_0000", "first", 0, 20), ("a_0001", "overlapping", 10, 30)]
    assert all(c["dataset_spans_lost"] == 1 for c in clips)
    assert frame_number(clips[1]["path"], 0) == 10 and not (tmp_path / "clips" / "a_0002.mp4").exists()
    with pytest.raises(Exception, match="no dataset span could be cut: c2: span ends at frame 90, the source has 60"):
        split({**row, "dataset_clips": json.dumps(spans[2:])}, SplitConfig(out_dir=str(tmp_path / "clips")))


def test_one_command_per_format(tmp_path, capsys):
    """``python -m data_pipeline run --set input=... --set input_format=...``: hdvg and webvid from URLs on
    127.0.0.1, openvid and ucf101 from local files, each to a manifest of clips with the dataset's captions."""
    import json

    from data_pipeline.__main__ import main

    numbered_video(tmp_path / "a.mp4")
    Handler.files, Handler.hits = {"a.mp4": (tmp_path / "a.mp4").read_bytes()}, {}
    (tmp_path / "UCF-101" / "YoYo").mkdir(parents=True)
    numbered_video(tmp_path / "UCF-101" / "YoYo" / "v_YoYo_g01_c01.avi")
    (tmp_path / "ucf").mkdir()
    (tmp_path / "ucf" / "testlist01.txt").write_text("YoYo/v_YoYo_g01_c01.avi\n")
    numbered_video(tmp_path / "ov_1.mp4")
    config = tmp_path / "run.yaml"
    config.write_text("stages: [probe, split, caption]\nrunner: {workers: 0, progress: false}\n"
                      "download: {allow_private_hosts: true}\ncaption: {model: ''}\n")
    with local_http_server(Handler) as url:
        (tmp_path / "hdvg.json").write_text(json.dumps({"A": {
            "A.1_0": {"scene_id": 0, "title": "t", "url": f"{url}/a.mp4", "span": ["00:00:00.500", "00:00:02.000"],
                      "caption": "dark grey"},
            "A.2_0": {"scene_id": 1, "title": "t", "url": f"{url}/a.mp4", "span": ["00:00:04.000", "00:00:05.900"],
                      "caption": "light grey"}}}))
        pd.DataFrame([{"videoid": 7, "contentUrl": f"{url}/a.mp4", "duration": "PT00H00M06S", "page_dir": "001_050",
                       "name": "a grey ramp"}]).to_csv(tmp_path / "webvid.csv", index=False)
        pd.DataFrame([{"video": "ov_1.mp4", "caption": "brightening", "aesthetic score": 5.0, "motion score": 1.0,
                       "temporal consistency score": 1.0, "camera motion": "static", "frame": 60, "fps": 10,
                       "seconds": 6.0}]).to_csv(tmp_path / "openvid.csv", index=False)
        cases = {"hdvg": (tmp_path / "hdvg.json", [], [("dark grey", 5, 20), ("light grey", 40, 59)]),
                 "webvid": (tmp_path / "webvid.csv", [], [("a grey ramp", 0, 60)]),
                 "openvid": (tmp_path / "openvid.csv", ["--set", "select.min_score=4.5"], [("brightening", 0, 60)]),
                 "ucf101": (tmp_path / "ucf" / "testlist01.txt", ["--set", f"dataset_root={tmp_path / 'UCF-101'}"],
                            [("yo yo", 0, 60)])}
        for name, (meta, extra, expected) in cases.items():
            work = tmp_path / f"work_{name}"
            assert main(["run", "--config", str(config), "--set", f"input={meta}", "--set", f"input_format={name}",
                         "--set", f"work_dir={work}", *extra]) == 0
            clips = read_manifest(work / "manifest.parquet")
            assert list(zip(clips["text"], clips["start_frame"], clips["end_frame"])) == expected, name
            assert f"select: {name}" in capsys.readouterr().err
    assert Handler.hits == {"a.mp4": 2}  # hdvg's two clips from one download, webvid's video once


def numbered_section(path, first, count):
    """What yt-dlp's ranged download of ``numbered_video`` leaves: its frames ``first ..`` renumbered from 0."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "10", "g": "50"}
        for i in range(first, min(first + count, FRAMES)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), STEP * i, np.uint8),
                                                                   format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.mark.parametrize("mode", ["encode", "reference"])
def test_ytdlp_sections_download_one_range_and_split_shifts_the_spans(tmp_path, monkeypatch, mode):
    """``download.ytdlp_sections: true``: yt-dlp is asked for one time range around a source's clips (its
    ``download_ranges`` called as yt-dlp calls it, ``force_keyframes_at_cuts``), and split cuts the section it
    wrote (a local video standing in for it: frames 15.. of the source, renumbered from 0) at the dataset's spans
    shifted by the section's start, so each clip still shows the source frames of its span. No network: the
    YoutubeDL class is replaced, the site's host is not looked up."""
    import yt_dlp

    from data_pipeline import download as dl

    calls = []

    class FakeYoutubeDL:
        def __init__(self, params):
            self.params = params
            calls.append(params)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def extract_info(self, url, download=True, **kwargs):
            return {"id": url.rsplit("=", 1)[1], "ext": "mp4", "duration": FRAMES / FPS, "webpage_url": url}

        def process_ie_result(self, info, download=True):
            [section] = list(self.params["download_ranges"](info, self))  # one range, as yt-dlp would take it
            start, end = section["start_time"], min(section["end_time"], info["duration"])
            path = self.params["outtmpl"].replace("%(id).80s", info["id"]).replace("%(ext)s", "mp4")
            numbered_section(path, round(start * FPS), round((end - start) * FPS))
            return {**info, "requested_downloads": [{"filepath": path}]}

    monkeypatch.setattr(yt_dlp, "YoutubeDL", FakeYoutubeDL)
    monkeypatch.setattr(dl, "resolve_host", lambda host, port, cfg: [])
    pd.DataFrame([{"videoID": "XYZ", "url": "https://www.youtube.com/watch?v=XYZ",
                   "timestamp": str([["0:00:02.000", "0:00:03.000"], ["0:00:03.500", "0:00:04.500"]]),
                   "caption": str(["darker", "lighter"]), "matching_score": str([0.5, 0.5])}]
                 ).to_csv(tmp_path / "panda.csv", index=False)
    cfg = PipelineConfig(
        input=str(tmp_path / "panda.csv"), work_dir=str(tmp_path / "work"), input_format="panda70m",
        stages=["probe", "split"], runner=RunnerConfig(workers=0, progress=False),
        download=DownloadConfig(ytdlp_sections=True, ytdlp_section_margin_s=0.5), split=SplitConfig(mode=mode))
    run_pipeline(cfg)
    [params] = calls
    assert params["force_keyframes_at_cuts"] is True
    assert params["download_ranges"] == yt_dlp.utils.download_range_func(None, [(1.5, 5.0)])
    clips = read_manifest(tmp_path / "work" / "manifest.parquet")
    assert list(clips["text"]) == ["darker", "lighter"]
    assert set(clips["download_section_start_s"]) == {1.5} and set(clips["download_section_end_s"]) == {5.0}
    # Frames of the section file (it starts at 1.5 s = source frame 15); the source's own are 20-30 and 35-45.
    assert list(clips["start_frame"]) == [5, 20] and list(clips["end_frame"]) == [15, 30]
    for row in clips.itertuples():
        path, first = (row.path, 0) if mode == "encode" else (row.source_video, row.start_frame)
        assert abs(frame_number(path, first) - round((row.start_time + row.download_section_start_s) * FPS)) <= 1
    assert [round(row.start_time + row.download_section_start_s, 3) for row in clips.itertuples()] == [2.0, 3.5]


def test_which_sources_get_a_section():
    from data_pipeline.download import dataset_section

    import json

    spans = json.dumps([{"start": 30.0, "end": 32.0}, {"start": 0.4, "end": 3.0}])
    on = DownloadConfig(ytdlp_sections=True)
    assert dataset_section({"dataset_clips": spans}, on) == (0.0, 33.0)  # not before the source's start
    assert dataset_section({"dataset_clips": spans}, DownloadConfig()) is None  # default: the whole source
    assert dataset_section({"dataset_clips": json.dumps([{"start": 0.0, "end": None}])}, on) is None  # a whole video
    assert dataset_section({"url": "https://example.org/v"}, on) is None  # no dataset spans
    with pytest.raises(ValueError, match="ytdlp_section_margin_s"):
        DownloadConfig(ytdlp_section_margin_s=-1)


def test_imagenet_images_to_a_training_manifest(tmp_path):
    """``input_format: imagenet``: the images go through probe (size, 1 frame), split (each image its own clip,
    unchanged), filter (the pixel checks run; motion and duration do not apply to an image: skipped, with the
    reason on the row, not rejected) and caption (the class name kept) to a manifest the trainer reads as
    1-frame samples."""
    from data_helpers import make_imagenet

    from data_pipeline.config import FilterConfig
    from opensora.data.dataset import DataConfig, VideoDataset

    root = make_imagenet(tmp_path / "ILSVRC")
    cfg = PipelineConfig(
        input=str(root / "LOC_synset_mapping.txt"), work_dir=str(tmp_path / "work"), input_format="auto",
        runner=RunnerConfig(workers=0, progress=False), caption=CaptionConfig(model=""),
        filter=FilterConfig(min_motion=0.5, min_duration_s=1.0, min_width=32))
    summaries = run_pipeline(cfg)
    assert [s.stage for s in summaries] == ["probe", "split", "filter", "caption"]  # nothing to download
    assert all(s.done == 4 and s.failed == s.rejected == 0 for s in summaries), [str(s) for s in summaries]
    rows = read_manifest(tmp_path / "work" / "manifest.parquet")
    assert list(rows["text"]) == ["tench", "tench", "goldfish", "goldfish"]
    assert list(rows["path"]) == [str(root / "train" / w / f"{w}_{i}.JPEG") for w in ("n01440764", "n01443537")
                                  for i in (1, 2)]
    assert set(rows["num_frames"]) == {1} and set(rows["width"]) == {48} and set(rows["height"]) == {40}
    assert set(rows["caption_source"]) == {"column"}
    assert set(rows["filter_skipped"]) == {"an image: min_duration_s, min_motion not measured"}
    assert rows["black_frac"].notna().all() and rows["sha256"].notna().all()
    data = VideoDataset(DataConfig(manifest=str(tmp_path / "work" / "manifest.parquet"), num_frames=4,
                                   image_size=(16, 16), num_workers=0))
    item = data[2]
    assert item["video"].shape == (3, 1, 16, 16) and item["text"] == "goldfish"
    assert data.bucket_keys[2][0] == 1 and not data.skipped
    again = run_pipeline(cfg)  # a re-run redoes nothing
    assert all(s.done == 0 and s.redone_settings + s.redone_input == 0 for s in again), [str(s) for s in again]


def test_an_image_the_stages_cannot_use_says_why(tmp_path):
    from data_pipeline.caption import caption_row
    from data_pipeline.config import ProbeConfig
    from data_pipeline.probe import ProbeError, probe
    from data_pipeline.rows import Reject
    from data_pipeline.split import split

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    with pytest.raises(ProbeError, match="not a readable image"):
        probe({"id": "b", "path": str(tmp_path / "broken.jpg")}, ProbeConfig())
    with pytest.raises(RuntimeError, match="an image without a caption"):  # before any model folder is opened
        caption_row({"id": "b", "path": str(tmp_path / "a.jpg")}, CaptionConfig(model=str(tmp_path / "no-model")))
    with pytest.raises(Reject, match="short side 40 px < min_short_side 64"):
        split({"id": "b", "path": str(tmp_path / "a.jpg"), "width": 48, "height": 40},
              SplitConfig(min_short_side=64))
