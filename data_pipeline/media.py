"""Media helpers of the data pipeline: safe file names, even sizes, a yuv420p resize and a streaming H.264
clip writer (PyAV)."""

from __future__ import annotations

import contextlib
import re
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from opensora.utils import AtomicPath


def safe_name(text: str, max_len: int = 120) -> str:
    """A file-name-safe version of ``text``: no separators, no leading dot, bounded length."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return (name or "file")[:max_len]


def even_size(width: int, height: int, short_side: int = 0) -> tuple[int, int]:
    """Output (width, height): the shorter side scaled to ``short_side`` (0 = keep), both rounded to even
    (yuv420p H.264 needs even sizes)."""
    if short_side:
        scale = short_side / min(width, height)
        width, height = round(width * scale), round(height * scale)
    return max(2, width - width % 2), max(2, height - height % 2)


def _plane(frame: av.VideoFrame, index: int, height: int, width: int) -> np.ndarray:
    """A zero-copy (height, width) view of one plane (planes are padded to ``line_size`` bytes per row)."""
    plane = frame.planes[index]
    return np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:height, :width]


def resize_yuv420p(frame: av.VideoFrame, width: int, height: int) -> av.VideoFrame:
    """Resizes a yuv420p frame plane by plane with OpenCV (AREA when shrinking, bilinear when enlarging).

    Measured on 720p -> 360p: about 2.5x cheaper than swscale's AREA on the same frame, with the same
    anti-aliasing (a box filter); the planes stay YUV, so there is no colour conversion either way.

    Args:
        frame: a decoded ``yuv420p`` frame.
        width, height: the output size (even).
    """
    src_w, src_h = frame.width, frame.height
    shrink = width * height <= src_w * src_h
    interp = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    out = np.empty((height * 3 // 2, width), np.uint8)  # (H*3/2, W): Y, then U and V of (H/2, W/2) each
    cv2.resize(_plane(frame, 0, src_h, src_w), (width, height), dst=out[:height], interpolation=interp)
    chroma = out[height:].reshape(2, height // 2, width // 2)
    for i in (1, 2):
        src = _plane(frame, i, (src_h + 1) // 2, (src_w + 1) // 2)
        cv2.resize(src, (width // 2, height // 2), dst=chroma[i - 1], interpolation=interp)
    return av.VideoFrame.from_ndarray(out, format="yuv420p")


class ClipWriter:
    """Encodes frames into ``path`` (H.264 by default) through a temp file; ``close()`` publishes it.

    Args:
        path: final file (``.mp4``).
        fps: frame rate of the clip.
        width, height: output size (even); input frames are scaled to it.
        codec, crf, preset: encoder settings.
    """

    def __init__(self, path: str | Path, fps: Fraction | float, width: int, height: int,
                 codec: str = "libx264", crf: int = 18, preset: str = "veryfast"):
        self.path = Path(path)
        self.target = AtomicPath(self.path, keep_suffix=True)  # FFmpeg picks the muxer by the suffix
        self.tmp = self.target.tmp
        self.rate = Fraction(fps).limit_denominator(100000)
        self.width, self.height = width, height
        self.container = av.open(str(self.tmp), "w")
        self.stream = self.container.add_stream(codec, rate=self.rate)
        self.stream.width, self.stream.height, self.stream.pix_fmt = width, height, "yuv420p"
        self.stream.codec_context.time_base = 1 / self.rate
        # One thread per encoder: parallelism comes from running many videos at once.
        self.stream.codec_context.thread_count = 1
        if codec in ("libx264", "libx265"):
            self.stream.options = {"crf": str(crf), "preset": preset}
        self.count = 0

    def write(self, frame: av.VideoFrame | np.ndarray) -> None:
        """Appends one frame (a decoded ``av.VideoFrame`` or an RGB uint8 array of shape (H, W, 3))."""
        if isinstance(frame, np.ndarray):
            frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        if frame.format.name == "yuv420p" and (frame.width, frame.height) != (self.width, self.height):
            out = resize_yuv420p(frame, self.width, self.height)
        else:
            # Same size and format: swscale hands the frame back untouched; other formats need its conversion
            # (yuvj420p is full range, rgb24 is not YUV), where AREA avoids aliasing when shrinking.
            out = frame.reformat(width=self.width, height=self.height, format="yuv420p", interpolation="AREA")
        out.pts = self.count
        out.time_base = self.stream.codec_context.time_base
        out.pict_type = av.video.frame.PictureType.NONE  # do not inherit the source's frame types
        for packet in self.stream.encode(out):
            self.container.mux(packet)
        self.count += 1

    def close(self) -> Path:
        """Flushes the encoder and atomically moves the finished clip into place."""
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        return self.target.commit()

    def abort(self) -> None:
        """Drops the partial clip."""
        with contextlib.suppress(Exception):
            self.container.close()
        self.target.discard()
