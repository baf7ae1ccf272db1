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
