"""probe: duration, fps, frame count, size and codec of each video (PyAV).

A file that is missing, empty, not a video, truncated or without a decodable frame raises, and the
runner records the reason; nothing here can stop the run.
"""

from __future__ import annotations

import os
from fractions import Fraction

import av

from data_pipeline.config import ProbeConfig
from data_pipeline.rows import Row, is_missing


class ProbeError(RuntimeError):
    """The file is not a usable video; the message says why."""


def probe_video(path: str, cfg: ProbeConfig) -> dict:
    """Reads a video's properties.

    Args:
        path: the video file.
        cfg: whether to count frames by demuxing and to decode the first frame.
    Returns:
        ``num_frames, fps, height, width, aspect_ratio, resolution, duration, codec, pix_fmt``.
    """
    if not os.path.isfile(path):
        raise ProbeError(f"no such file: {path}")
    if os.path.getsize(path) == 0:
        raise ProbeError("empty file (0 bytes)")
    try:
        container = av.open(path)
    except av.error.FFmpegError as err:
        raise ProbeError(f"not a readable container: {err}") from err
    with container:
        if not container.streams.video:
            raise ProbeError("no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        rate = stream.average_rate or stream.guessed_rate
        if not rate or rate <= 0:
            raise ProbeError("unknown frame rate")
        fps = Fraction(rate)
        declared = int(stream.frames or 0)
        counted = 0
        if cfg.count_frames:
            try:
                for packet in container.demux(stream):
                    if packet.size:  # the final flush packet is empty
                        counted += 1
            except av.error.FFmpegError as err:
                raise ProbeError(f"truncated or corrupt after {counted} packets: {err}") from err
            if declared and counted < declared:
                raise ProbeError(f"truncated: header says {declared} frames, {counted} readable")
        num_frames = counted or declared
        if num_frames < max(cfg.min_frames, 1):
            raise ProbeError(f"{num_frames} frames (need >= {max(cfg.min_frames, 1)})")
        width, height = ctx.width, ctx.height
        if cfg.decode_check:
            container.seek(0)
            try:
                frame = next(container.decode(stream), None)
            except av.error.FFmpegError as err:
                raise ProbeError(f"first frame does not decode: {err}") from err
            if frame is None:
                raise ProbeError("no decodable frame")
            width, height = frame.width, frame.height
        if not width or not height:
            raise ProbeError("unknown frame size")
        return {
            "num_frames": num_frames,
            "fps": float(fps),
            "height": height,
            "width": width,
            "aspect_ratio": height / width,
            "resolution": height * width,
            "duration": float(num_frames / fps),
            "codec": ctx.name,
            "pix_fmt": ctx.pix_fmt,
        }


def probe(row: Row, cfg: ProbeConfig) -> list[Row]:
    """Stage function: adds the video's properties to the row (``path`` must be set)."""
    if is_missing(row.get("path")):
        raise ProbeError("row has no path (run download first?)")
    info = probe_video(row["path"], cfg)
    out = {**row, **info}
    if is_missing(out.get("source")):
        out["source"] = row.get("url") or row["path"]
    return [out]
