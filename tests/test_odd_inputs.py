"""A corpus of odd and broken inputs, made here (PyAV/numpy, no bytes in the repository), through
probe -> split -> filter: nothing crashes, every input is accounted for, and each outcome has its reason."""

from fractions import Fraction

import av
import numpy as np
import pandas as pd

from data_helpers import damage, make_video, shot_frames, truncate
from data_pipeline.config import FilterConfig, ProbeConfig, RunnerConfig, SplitConfig
from data_pipeline.pipeline import make_stage
from data_pipeline.runner import run_stage
from opensora.data.manifest import read_manifest

SERIAL = RunnerConfig(workers=0, progress=False)


def _encode(path, codec: str, size: tuple[int, int], n: int, pix_fmt: str = "yuv420p", fps: int = 24,
            options: dict | None = None, times: list[float] | None = None, shots: int = 2) -> None:
    """``n`` frames in ``shots`` hard-cut shots; ``times`` (seconds) gives each frame its own time stamp (VFR)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        stream.options = options or {}
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        per = -(-n // shots)
        frames = np.concatenate([shot_frames(per, size, s) for s in range(shots)])[:n]
        for i, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _corpus(d) -> dict[str, str]:
    """name -> path of every input."""
    x264 = {"preset": "ultrafast", "g": "12"}
    make_video(d / "good.mp4", [48, 48], size=(96, 64), gop=12)
    damage(d / "good.mp4", d / "damaged middle.mp4", range(30, 32))
    damage(d / "good.mp4", d / "damaged head.mp4", range(0, 1))
    damage(d / "good.mp4", d / "mostly damaged.mp4", range(6, 90))
    truncate(d / "good.mp4", d / "truncated.mp4", 0.5)
    _encode(d / "whole.mkv", "libx264", (64, 48), 96, options={"preset": "ultrafast", "g": "12"})
    truncate(d / "whole.mkv", d / "truncated.mkv", 0.6)  # no index at the end to lose: the first half is usable
    (d / "whole.mkv").unlink()
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("not a video\n")
    with av.open(str(d / "audio.mp4"), "w") as container:  # audio only, in a real mp4
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    _encode(d / "one frame.mp4", "libx264", (64, 48), 1, options=x264, shots=1)
    _encode(d / "2x2.mp4", "libx264", (2, 2), 48, options=x264)
    _encode(d / "odd 63x47.mp4", "libx264", (63, 47), 48, pix_fmt="yuv444p", options=x264)
    _encode(d / "yuv444.mp4", "libx264", (64, 48), 48, pix_fmt="yuv444p", options=x264)
    _encode(d / "vp9.webm", "libvpx-vp9", (64, 48), 48, options={"deadline": "realtime", "cpu-used": "8"})
    _encode(d / "mpeg2.mpg", "mpeg2video", (64, 48), 48)
    rng = np.random.default_rng(0)
    _encode(d / "vfr.mkv", "libx264", (64, 48), 48, options=x264,
            times=list(np.cumsum(rng.choice([1 / 24, 1 / 12, 1 / 30], 48)) - 1 / 24))
    make_video(d / "ünïcødé ✓.mp4", [48], size=(64, 48))
    make_video(d / "-leading dash.mp4", [48], size=(64, 48))
    return {p.name: str(p) for p in sorted(d.iterdir())}


def test_odd_inputs_through_probe_split_filter(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    inputs = _corpus(src)
    pd.DataFrame({"path": list(inputs.values())}).to_csv(tmp_path / "in.csv", index=False)
    manifest = tmp_path / "in.csv"
    stages = [("probe", ProbeConfig()), ("split", SplitConfig(min_clip_s=0.5)), ("filter", FilterConfig(max_bad_frac=1.0))]  # flat synthetic shots look blank
    for name, cfg in stages:
        out = tmp_path / f"{name}.parquet"
        summary = run_stage(make_stage(name, cfg, out), manifest, out, SERIAL)
        assert summary.done + summary.failed + summary.rejected + summary.upstream == summary.rows_in, summary
        manifest = out
    df = read_manifest(manifest, usable_only=False)
    outcome = {}  # name -> ("done", clips, damaged packets of the source) or (stage, status, reason)
    for name, path in inputs.items():
        rows = df[df["source_video"].eq(path) | df["path"].eq(path)]
        assert len(rows), f"{name} vanished"
        for stage, _ in stages:
            bad = rows[rows[f"{stage}_status"].ne("done")]
            if len(bad):
                outcome[name] = (stage, bad.iloc[0][f"{stage}_status"], bad.iloc[0][f"{stage}_error"])
                break
        else:
            assert (rows["damaged_packets"] == 0).all(), name  # no clip holds damage
            outcome[name] = ("done", len(rows), int(rows["split_damaged_packets"].max()))
    assert outcome == {
        "-leading dash.mp4": ("done", 1, 0),
        "2x2.mp4": ("done", 2, 0),
        "audio.mp4": ("probe", "failed", "ProbeError: no video stream"),
        "damaged head.mp4": ("done", 2, 1),  # the first keyframe's GOP lost, the rest kept
        "damaged middle.mp4": ("done", 3, 2),  # the damaged shot cut at the damage
        "empty.mp4": ("probe", "failed", "ProbeError: empty file (0 bytes)"),
        "good.mp4": ("done", 2, 0),
        "mostly damaged.mp4": ("split", "rejected", "mostly damaged: 90 of 96 frames unusable, 84 damaged packets"),
        "mpeg2.mpg": ("done", 2, 0),
        "odd 63x47.mp4": ("done", 2, 0),
        "one frame.mp4": ("split", "rejected", "no shot of at least 0.5s (1 shots, 1 frames)"),
        "text.mp4": ("probe", "failed", "ProbeError: not a video container (text)"),
        "truncated.mkv": ("done", 1, 0),  # the shot that was complete before the cut-off
        "truncated.mp4": ("probe", "failed",  # the index (moov) was at the end, in the lost half
                          "ProbeError: not a readable container: Invalid data found when processing input"),
        "vfr.mkv": ("done", 2, 0),
        "vp9.webm": ("done", 2, 0),
        "yuv444.mp4": ("done", 2, 0),
        "ünïcødé ✓.mp4": ("done", 1, 0),
    }
