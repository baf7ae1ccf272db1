"""Atomic media writes and a streaming H.264 clip writer (PyAV)."""

from __future__ import annotations

import contextlib
import os
import re
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np


def safe_name(text: str, max_len: int = 120) -> str:
    """A file-name-safe version of ``text``: no separators, no leading dot, bounded length."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return (name or "file")[:max_len]


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temp path next to ``path``; on success it replaces ``path`` in one ``os.replace``.

    The temp name keeps the suffix (muxers are chosen by it) and starts with a dot, so a half-written
    file is never mistaken for a finished one, and a crash leaves ``path`` untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def even_size(width: int, height: int, short_side: int = 0) -> tuple[int, int]:
    """Output (width, height): the shorter side scaled to ``short_side`` (0 = keep), both rounded to even
    (yuv420p H.264 needs even sizes)."""
    if short_side:
        scale = short_side / min(width, height)
        width, height = round(width * scale), round(height * scale)
    return max(2, width - width % 2), max(2, height - height % 2)


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.stem}.tmp{os.getpid()}{self.path.suffix}")
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
        self.interpolation = "AREA"  # downscaling without aliasing; costs about as much as the encode at 720p
        self.count = 0

    def write(self, frame: av.VideoFrame | np.ndarray) -> None:
        """Appends one frame (a decoded ``av.VideoFrame`` or an RGB uint8 array of shape (H, W, 3))."""
        if isinstance(frame, np.ndarray):
            frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
        out = frame.reformat(width=self.width, height=self.height, format="yuv420p", interpolation=self.interpolation)
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
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drops the partial clip."""
        with contextlib.suppress(Exception):
            self.container.close()
        if self.tmp.exists():
            self.tmp.unlink()
