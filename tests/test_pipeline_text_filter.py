"""filter.max_text_area: RapidOCR's PP-OCR text detector (real weights from the rapidocr-onnxruntime wheel) on clips
made here: one with large rendered text is rejected, one without text is kept, both with their text_area score."""

import av
import cv2
import numpy as np
import pytest

from data_pipeline.config import FilterConfig, RunnerConfig
from data_pipeline.filter import filter_clip
from data_pipeline.pipeline import make_stage
from data_pipeline.runner import run_stage
from opensora.data.manifest import read_manifest
from tools.bench_pipeline import make_transition_video

pytest.importorskip("rapidocr_onnxruntime")


def make_text_clip(path, lines, n=24, size=(320, 180)):
    """A panning grey gradient with ``lines`` of large white text (a title card, a slide, subtitles)."""
    width, height = size
    ramp = np.linspace(40, 90, width * 2, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(n):
            img = np.ascontiguousarray(ramp[:, 2 * t : 2 * t + width]).astype(np.uint8)
            for k, line in enumerate(lines):
                cv2.putText(img, line, (12, 45 + 50 * k), cv2.FONT_HERSHEY_SIMPLEX, 1.3, (255, 255, 255), 3)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_text_filter_rejects_a_clip_of_text_and_keeps_one_without(tmp_path):
    make_text_clip(tmp_path / "text.mp4", ["BIG SALE TODAY", "50% OFF ALL", "CALL 555 0199"])
    make_transition_video(tmp_path / "plain.mp4", "cut", [24], size=(320, 180))
    cfg = FilterConfig(max_text_area=0.1, text_frames=2)
    (tmp_path / "in.csv").write_text(f"id,path\ntext,{tmp_path / 'text.mp4'}\nplain,{tmp_path / 'plain.mp4'}\n")
    summary = run_stage(make_stage("filter", cfg, tmp_path / "f.parquet"), tmp_path / "in.csv", tmp_path / "f.parquet",
                        RunnerConfig(workers=0, progress=False))
    assert (summary.done, summary.rejected) == (1, 1)
    df = read_manifest(tmp_path / "f.parquet", usable_only=False).set_index("id")
    assert df.loc["text", "filter_status"] == "rejected" and "text covers" in df.loc["text", "filter_error"]
    assert df.loc["text", "text_area"] > 0.2  # three lines of 1.3-scale text on a 320x180 frame
    assert df.loc["plain", "filter_status"] == "done" and df.loc["plain", "text_area"] < 0.01


def test_text_area_is_only_measured_when_asked(tmp_path):
    make_text_clip(tmp_path / "text.mp4", ["HELLO"])
    (row,) = filter_clip({"id": "t", "path": str(tmp_path / "text.mp4")}, FilterConfig())
    assert "text_area" not in row
    with pytest.raises(ValueError, match="max_text_area"):
        FilterConfig(max_text_area=1.5)
