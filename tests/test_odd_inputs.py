"""A corpus of odd and broken inputs, made here (PyAV/numpy/OpenCV, no bytes in the repository), scanned as a
folder and run through probe -> split -> filter: nothing crashes, every input is accounted for (inputs = done +
rejected + failed, each with its rows), and each outcome has its reason. The same probe output split in
``mode: reference`` must give rows that read back (through decord, the reader of reference rows) as the encoded
clips of the same spans, or be refused with the reason."""

import os
import re
import struct
from fractions import Fraction

import av
import cv2
import numpy as np
import pandas as pd
import pytest

from data_helpers import damage, make_video, shot_frames, truncate
from data_pipeline.config import FilterConfig, ProbeConfig, RunnerConfig, SplitConfig
from data_pipeline.media import MAX_STEM, unique_stem
from data_pipeline.pipeline import make_stage
from data_pipeline.rows import Reject
from data_pipeline.runner import run_stage
from data_pipeline.sources import scan_folder
from data_pipeline.split import split
from opensora.data.manifest import normalize, read_manifest, source_span
from opensora.data.video_io import read_video

SERIAL = RunnerConfig(workers=0, progress=False)
X264 = {"preset": "ultrafast", "g": "12"}
# Two manifest rows with ids of 250 characters that differ only at the end (ids come from the user's manifest,
# e.g. file names): their clips must get distinct names of bounded length.
LONG_IDS = ["clip of " + "é" * 241 + " a", "clip of " + "é" * 241 + " b"]

def _encode(path, codec: str, size: tuple[int, int], n: int, pix_fmt: str = "yuv420p", fps: int = 24,
            options: dict | None = None, times: list[float] | None = None, shots: int = 2, rotation: int = 0,
            fmt: str | None = None, container_options: dict | None = None) -> None:
    """``n`` frames in ``shots`` hard-cut shots; ``times`` (seconds) gives each frame its own time stamp (VFR);
    ``rotation`` writes a display matrix (degrees counter-clockwise); ``fmt`` forces the muxer."""
    with av.open(str(path), "w", format=fmt, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        stream.options = options or {}
        if rotation:
            stream.set_display_rotation(rotation)
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


def _corpus(d) -> None:
    """Writes every input under ``d``: files, a dangling link and a folder named like a video."""
    x264 = X264
    make_video(d / "good.mp4", [48, 48], size=(96, 64), gop=12)
    damage(d / "good.mp4", d / "damaged middle.mp4", range(30, 32))
    damage(d / "good.mp4", d / "damaged head.mp4", range(0, 1))
    damage(d / "good.mp4", d / "mostly damaged.mp4", range(6, 90))
    truncate(d / "good.mp4", d / "truncated.mp4", 0.5)
    truncate(d / "good.mp4", d / "truncated index.mp4", 0.95)  # the end of the index (moov, after the media) lost
    _encode(d / "whole.mkv", "libx264", (64, 48), 96, options={"preset": "ultrafast", "g": "12"})
    truncate(d / "whole.mkv", d / "truncated.mkv", 0.6)  # no index at the end to lose: the first half is usable
    (d / "whole.mkv").unlink()
    (d / "empty.mp4").write_bytes(b"")
    (d / "text.mp4").write_text("not a video\n")
    (d / "404 page.mp4").write_text("<!DOCTYPE html><html><body>Not Found</body></html>\n")  # a failed download
    (d / "random bytes.mp4").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes())
    (d / "photo.mp4").write_bytes(cv2.imencode(".png", np.full((16, 16, 3), 128, np.uint8))[1].tobytes())
    _encode(d / "animated gif.mp4", "gif", (64, 48), 48, pix_fmt="rgb8", fmt="gif")  # a GIF under a video's name
    with av.open(str(d / "audio.mp4"), "w") as container:  # audio only, in a real mp4
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    with av.open(str(d / "song with cover.mp4"), "w") as container:  # audio + its cover image (attached picture)
        audio = container.add_stream("aac", rate=8000)
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 64, 64, "yuvj420p"
        cover.disposition = av.stream.Disposition.attached_pic
        container.mux(cover.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 99, np.uint8), format="rgb24")))
        container.mux(cover.encode())
        container.mux([*audio.encode(frame), *audio.encode()])
    with av.open(str(d / "no frames.mp4"), "w") as container:  # a recording that stopped before its first frame
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    _encode(d / "one frame.mp4", "libx264", (64, 48), 1, options=x264, shots=1)
    _encode(d / "two frames.mp4", "libx264", (64, 48), 2, options=x264, shots=1)
    _encode(d / "2x2.mp4", "libx264", (2, 2), 48, options=x264)
    _encode(d / "odd 63x47.mp4", "libx264", (63, 47), 48, pix_fmt="yuv444p", options=x264)
    _encode(d / "odd 65x49 ffv1.mkv", "ffv1", (65, 49), 48)  # odd size in 4:2:0 (x264 refuses it)
    _encode(d / "yuv444.mp4", "libx264", (64, 48), 48, pix_fmt="yuv444p", options=x264)
    _encode(d / "b-frames.mp4", "libx264", (64, 48), 48,  # reordered frames and an edit list, as most H.264 has
            options={"preset": "veryfast", "g": "12", "x264-params": "bframes=3:b-pyramid=normal"})
    _encode(d / "10-bit.mp4", "libx264", (64, 48), 48, pix_fmt="yuv420p10le", options=x264)  # High 10
    _encode(d / "hevc 10-bit.mkv", "libx265", (64, 48), 48, pix_fmt="yuv420p10le",
            options={"preset": "ultrafast", "x265-params": "log-level=error:keyint=12"})
    _encode(d / "prores 422 10-bit.mov", "prores_ks", (64, 48), 48, pix_fmt="yuv422p10le")
    _encode(d / "av1.mp4", "libsvtav1", (64, 64), 48, options={"preset": "12", "svtav1-params": "log-level=0"})
    _encode(d / "vp9.webm", "libvpx-vp9", (64, 48), 48, options={"deadline": "realtime", "cpu-used": "8"})
    _encode(d / "vp8.webm", "libvpx", (64, 48), 48, options={"deadline": "realtime", "cpu-used": "8"})
    _encode(d / "mpeg2.mpg", "mpeg2video", (64, 48), 48)
    _encode(d / "mpeg4.avi", "mpeg4", (64, 48), 48)
    _encode(d / "mjpeg.avi", "mjpeg", (64, 48), 48, pix_fmt="yuvj420p")
    _encode(d / "h264.ts", "libx264", (64, 48), 48, options=x264)
    _encode(d / "raw h264.mp4", "libx264", (64, 48), 48, options=x264, fmt="h264")  # no container at all
    _encode(d / "moov first.mp4", "libx264", (64, 48), 48, options=x264, container_options={"movflags": "+faststart"})
    _encode(d / "fragmented.mp4", "libx264", (64, 48), 48, options=x264,
            container_options={"movflags": "+frag_keyframe+empty_moov"})
    _encode(d / "rotated.mp4", "libx264", (64, 48), 48, options=x264, rotation=90)  # a phone held upright
    rng = np.random.default_rng(0)
    _encode(d / "vfr.mkv", "libx264", (64, 48), 48, options=x264,
            times=list(np.cumsum(rng.choice([1 / 24, 1 / 12, 1 / 30], 48)) - 1 / 24))
    _encode(d / "clock jump.mkv", "libx264", (64, 48), 48, options=x264,  # an hour between two frames
            times=[*(np.arange(24) / 24), *(3600 + np.arange(24) / 24)])
    make_video(d / "huge duration.mp4", [24, 24], size=(64, 48))  # the header claims ~49 days
    data = bytearray((d / "huge duration.mp4").read_bytes())
    struct.pack_into(">I", data, data.find(b"mvhd") + 20, 0xFFFFFFF0)  # mvhd v0: type, flags, 2 dates, scale
    (d / "huge duration.mp4").write_bytes(bytes(data))
    with av.open(str(d / "two video streams.mkv"), "w") as container:  # a main picture and a small second one
        streams = []
        for k, size in enumerate([(64, 48), (32, 24)]):
            stream = container.add_stream("libx264", rate=24)
            stream.width, stream.height, stream.pix_fmt, stream.options = *size, "yuv420p", x264
            streams.append((stream, np.concatenate([shot_frames(24, size, k + j) for j in range(2)])))
        for i in range(48):
            for stream, frames in streams:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frames[i], format="rgb24")))
        container.mux([p for stream, _ in streams for p in stream.encode()])
    for part, size, t0 in (("a", (64, 48), 0), ("b", (96, 64), 1)):  # segments of a stream joined, size changes
        _encode(d / f"{part}.ts", "libx264", size, 24, options=x264, shots=1, times=list(t0 + np.arange(24) / 24))
    (d / "size change.ts").write_bytes((d / "a.ts").read_bytes() + (d / "b.ts").read_bytes())
    (d / "a.ts").unlink(), (d / "b.ts").unlink()
    make_video(d / "ünïcødé ✓.mp4", [48], size=(64, 48))
    make_video(d / "-leading dash.mp4", [48], size=(64, 48))
    make_video(d / ("long " + "é" * 123 + ".mp4"), [48], size=(64, 48))  # 255 bytes, the most a name may have
    os.symlink(d / "gone.mp4", d / "dangling link.mp4")
    (d / "folder.mp4").mkdir()
    make_video(d / "folder.mp4" / "inside.mp4", [48], size=(64, 48))


def _outcomes(df: pd.DataFrame, inputs: pd.DataFrame, stages: list[str]) -> dict[str, tuple]:
    """name -> ("done", clips, damaged packets of the source) or (stage, status, reason), for every input; the
    rows of an input are its own (id) and its clips' (id_NNNN)."""
    outcome = {}
    for row in inputs.itertuples():
        name = row.name
        rows = df[df["id"].str.fullmatch(re.escape(row.id) + r"(_\d{4})?")]
        assert len(rows), f"{name} vanished"
        for stage in stages:
            status = rows[f"{stage}_status"]
            bad = rows[(status.fillna("done") if stage == "scan" else status).ne("done")]  # rows not from the scan
            if len(bad):
                outcome[name] = (stage, bad.iloc[0][f"{stage}_status"], bad.iloc[0][f"{stage}_error"])
                break
        else:
            assert (rows["damaged_packets"] == 0).all(), name  # no clip holds damage
            outcome[name] = ("done", len(rows), int(rows["split_damaged_packets"].max()))
    return outcome


def test_odd_inputs_through_probe_split_filter(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    _corpus(src)
    scanned = scan_folder(src)
    extra = pd.DataFrame({"id": LONG_IDS, "path": [str(src / "good.mp4")] * 2})
    inputs = normalize(pd.concat([scanned, extra], ignore_index=True))
    names = [os.path.relpath(p, src) for p in scanned["path"]] + ["long id a", "long id b"]
    inputs["name"] = names
    assert len(inputs) >= 30 + 2 and len(set(names)) == len(names)
    manifest = inputs.drop(columns="name")
    stages = [("probe", ProbeConfig()), ("split", SplitConfig(min_clip_s=0.5)), ("filter", FilterConfig(max_bad_frac=1.0))]  # flat synthetic shots look blank
    for name, cfg in stages:
        out = tmp_path / f"{name}.parquet"
        summary = run_stage(make_stage(name, cfg, out), manifest, out, SERIAL)
        assert summary.done + summary.failed + summary.rejected + summary.upstream == summary.rows_in, summary
        manifest = out
    df = read_manifest(manifest, usable_only=False)
    raw = "ProbeError: raw h264 stream without a container (no time stamps, the frame rate unknown): remux it, " \
          "e.g. ffmpeg -i IN -c copy OUT.mp4"
    outcome = _outcomes(df, inputs, ["scan", "probe", "split", "filter"])
    assert outcome == {
        "-leading dash.mp4": ("done", 1, 0),
        "10-bit.mp4": ("done", 2, 0),
        "2x2.mp4": ("done", 2, 0),
        "404 page.mp4": ("probe", "failed", "ProbeError: not a video container (HTML document)"),
        "animated gif.mp4": ("done", 1, 0),
        "b-frames.mp4": ("done", 2, 0),  # a GIF is a (palette) video; its clip is H.264 like any other
        "audio.mp4": ("probe", "failed", "ProbeError: no video stream"),
        "av1.mp4": ("done", 2, 0),
        "clock jump.mkv": ("done", 2, 0),  # frames are numbered in order, the gap in time stamps does not count
        "damaged head.mp4": ("done", 2, 1),  # the first keyframe's GOP lost, the rest kept
        "damaged middle.mp4": ("done", 3, 2),  # the damaged shot cut at the damage
        "dangling link.mp4": ("scan", "failed", f"dangling symlink -> {src / 'gone.mp4'}"),
        "empty.mp4": ("probe", "failed", "ProbeError: empty file (0 bytes)"),
        "folder.mp4": ("scan", "rejected", "a folder named like a video (its contents are scanned)"),
        "folder.mp4/inside.mp4": ("done", 1, 0),
        "fragmented.mp4": ("done", 2, 0),
        "good.mp4": ("done", 2, 0),
        "h264.ts": ("done", 2, 0),
        "hevc 10-bit.mkv": ("done", 2, 0),
        "huge duration.mp4": ("done", 2, 0),  # frames are counted, the header's duration is not believed
        "long " + "é" * 123 + ".mp4": ("done", 1, 0),
        "long id a": ("done", 2, 0),
        "long id b": ("done", 2, 0),
        "mjpeg.avi": ("done", 2, 0),
        "moov first.mp4": ("done", 2, 0),
        "mostly damaged.mp4": ("split", "rejected", "mostly damaged: 90 of 96 frames unusable, 84 damaged packets"),
        "mpeg2.mpg": ("done", 2, 0),
        "mpeg4.avi": ("done", 2, 0),
        "no frames.mp4": ("probe", "failed", "ProbeError: no video stream (no streams at all: an empty recording)"),
        "odd 63x47.mp4": ("done", 2, 0),
        "odd 65x49 ffv1.mkv": ("done", 2, 0),
        "one frame.mp4": ("split", "rejected", "no shot of at least 0.5s (1 shots, 1 frames)"),
        "photo.mp4": ("probe", "failed", "ProbeError: not a video container (PNG image data)"),
        "prores 422 10-bit.mov": ("done", 2, 0),
        "random bytes.mp4": ("probe", "failed",
                             "ProbeError: not a readable container: Invalid data found when processing input"),
        "raw h264.mp4": ("probe", "failed", raw),
        "rotated.mp4": ("done", 2, 0),
        "size change.ts": ("done", 2, 0),  # the size change is a cut; both sizes give clips
        "song with cover.mp4": ("probe", "failed", "ProbeError: no video stream (only a cover image: an audio file)"),
        "text.mp4": ("probe", "failed", "ProbeError: not a video container (text)"),
        "truncated.mkv": ("done", 1, 0),  # the shot that was complete before the cut-off
        "truncated.mp4": ("probe", "failed",  # the index (moov) was at the end, in the lost half
                          "ProbeError: truncated MP4: no index (moov box, written after the media data), the file "
                          "ends inside its 'mdat' box"),
        "truncated index.mp4": ("probe", "failed", "ProbeError: truncated MP4: the file ends inside its index (moov box)"),
        "two frames.mp4": ("split", "rejected", "no shot of at least 0.5s (1 shots, 2 frames)"),
        "two video streams.mkv": ("done", 2, 0),
        "vfr.mkv": ("done", 2, 0),
        "vp8.webm": ("done", 2, 0),
        "vp9.webm": ("done", 2, 0),
        "yuv444.mp4": ("done", 2, 0),
        "ünïcødé ✓.mp4": ("done", 1, 0),
    }
    clips = df[df["split_status"].eq("done")]
    assert clips["path"].is_unique and all(os.path.isfile(p) for p in clips["path"])
    assert max(len(os.path.basename(p).encode()) for p in clips["path"]) <= MAX_STEM + len("_0000.mp4")
    long_clips = clips[clips["id"].str.startswith(LONG_IDS[0][:100])]
    assert len(long_clips) == 4 and long_clips["path"].is_unique
    # The phone video's clips are upright (48 wide, 64 high), like the probe's size as shown.
    rotated = df[df["path"].eq(str(src / "rotated.mp4")) | df["source_video"].eq(str(src / "rotated.mp4"))]
    assert set(zip(rotated["width"], rotated["height"])) == {(48, 64)}
    # The size change is a cut, and each clip keeps its own pictures' size (no 3:2 picture squeezed into 4:3).
    changed = clips[clips["source_video"].eq(str(src / "size change.ts"))]
    assert list(zip(changed["start_frame"], changed["width"], changed["height"])) == [(0, 64, 48), (24, 96, 64)]
    for clip in changed.itertuples():
        assert read_video(clip.path).shape == (24, clip.height, clip.width, 3)

    # The same probe output split in reference mode: rows that read back as the encoded clips, or a reason.
    out = tmp_path / "reference.parquet"
    run_stage(make_stage("split", SplitConfig(min_clip_s=0.5, mode="reference"), out), tmp_path / "probe.parquet",
              out, SERIAL)
    ref = read_manifest(out, usable_only=False)
    ref_outcome = _outcomes(ref.assign(damaged_packets=ref["damaged_packets"].fillna(0)), inputs,
                            ["scan", "probe", "split"])
    encoded = _outcomes(df, inputs, ["scan", "probe", "split"])
    unread = "reference rows would not read back: "
    refused = {name: (*o[:2], re.sub(r"\d+\.\d", "N", o[2])) for name, o in ref_outcome.items() if o != encoded[name]}
    damaged = "damaged source ({} damaged packets): split.mode=reference needs an intact source; split it with mode=encode"
    assert refused == {  # what decord, the reader of reference rows, does not read as split numbered it
        "2x2.mp4": ("split", "rejected", unread + "decord cannot read it: DECORDArrayCopyFromTo: The size must exactly "
                    "match; split it with mode=encode"),
        "animated gif.mp4": ("split", "rejected", unread + "decord cannot read it: Failed to measure duration/"
                             "frame-count due to broken metadata.; split it with mode=encode"),
        "av1.mp4": ("split", "rejected", unread + "decord cannot read it: ERROR cannot find video stream with wanted "
                    "index: -1; split it with mode=encode"),  # its FFmpeg has no AV1 decoder
        "damaged head.mp4": ("split", "rejected", damaged.format(1)),
        "damaged middle.mp4": ("split", "rejected", damaged.format(2)),
        "hevc 10-bit.mkv": ("split", "rejected", unread + "decord's frame 24 differs from split's by N (mean, 0-255): "
                            "its seek lands elsewhere; split it with mode=encode"),
        "mpeg2.mpg": ("split", "rejected", unread + "decord's frame 24 differs from split's by N (mean, 0-255): "
                      "its seek lands elsewhere; split it with mode=encode"),  # MPEG-PS: seeks by byte position
        "rotated.mp4": ("split", "rejected", "rotated source (display matrix turns it 90 degrees): reference rows "
                        "would be read on their side; split it with mode=encode"),
        "size change.ts": ("split", "rejected", unread + "decord reads frame 24 as 64x48, split decoded 96x64; "
                           "split it with mode=encode"),
    }
    # Every reference row gives the frames of the encoded clip of the same span (within the x264 re-encode).
    done = ref[ref["split_status"].eq("done")].set_index("id")
    assert len(done) > 40
    for clip in clips.itertuples():
        if clip.id not in done.index:
            continue
        row = done.loc[clip.id]
        assert (row["start_frame"], row["end_frame"]) == (clip.start_frame, clip.end_frame), clip.id
        span = source_span(row)
        got = read_video(row["path"], span.source_indices(np.arange(row["num_frames"]))).astype(np.float32)
        want = read_video(clip.path).astype(np.float32)
        if (row["width"], row["height"]) != (got.shape[2], got.shape[1]):  # odd sources: the clip is cut to even
            got = got[:, : want.shape[1], : want.shape[2]]
        assert got.shape == want.shape, clip.id
        assert np.abs(got - want).mean() < 4, (clip.id, np.abs(got - want).mean())  # measured <= 3.0


def test_a_rotated_source_gives_upright_clips(tmp_path):
    # A landscape picture with a white block in its top-left corner, shown turned 90 degrees counter-clockwise
    # (a phone held upright): the block is shown bottom-left, and the clip must hold it there, 48 wide, 64 high.
    picture = np.full((48, 64, 3), 60, np.uint8)
    picture[:16, :16] = 255
    with av.open(str(tmp_path / "r.mp4"), "w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt, stream.options = 64, 48, "yuv420p", X264
        stream.set_display_rotation(90)
        for _ in range(24):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")))
        container.mux(stream.encode())
    row = {"id": "r", "path": str(tmp_path / "r.mp4")}
    from data_pipeline.probe import probe

    probed = probe(row, ProbeConfig())[0]
    assert (probed["width"], probed["height"], probed["rotation"]) == (48, 64, 90)
    (clip,) = split(probed, SplitConfig(out_dir=str(tmp_path / "clips"), min_clip_s=0.5))
    frames = read_video(clip["path"])
    assert (clip["width"], clip["height"]) == (48, 64) and frames.shape == (24, 64, 48, 3)
    assert "rotation" not in clip  # the clip itself is upright
    assert np.abs(frames.astype(np.float32).mean(axis=0) - np.rot90(picture, 1)).mean() < 3
    with pytest.raises(Reject, match="rotated source .*90 degrees.*mode=encode"):
        split(probed, SplitConfig(out_dir=str(tmp_path / "ref"), min_clip_s=0.5, mode="reference"))


def test_clip_names_are_distinct_and_bounded():
    ids = ["a b", "a_b", "a/b", "../x", "x" * 300, "x" * 299 + "y", "é" * 200, "è" * 200, "", "abc#1", "abc_1"]
    stems = [unique_stem(i) for i in ids]
    assert len(set(stems)) == len(ids)
    assert stems == [unique_stem(i) for i in ids]  # the same id, the same name: a redone row overwrites its files
    assert unique_stem("0123abcd_0001") == "0123abcd_0001"  # ids the pipeline makes are kept as they are
    for stem in stems:
        assert 0 < len(stem) <= MAX_STEM and re.fullmatch(r"[A-Za-z0-9._-]+", stem) and not stem.startswith(".")
        # the clip's name, and the hidden temp name it is written under, fit the 255 bytes of a file name
        assert len(f".{stem}_0000.mp4.{2**22}-{'f' * 8}.tmp.mp4".encode()) <= 255
