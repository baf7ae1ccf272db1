"""Media helpers of the data pipeline: safe file names and even output sizes. Clips are encoded with
``opensora.data.video_io.VideoWriter``."""

from __future__ import annotations

import re


def safe_name(text: str, max_len: int = 120) -> str:
    """A file-name-safe version of ``text``: no separators, no leading dot, bounded length."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return (name or "file")[:max_len]


def even_size(width: int, height: int, short_side: int = 0) -> tuple[int, int]:
    """Output (width, height): the shorter side shrunk to ``short_side`` (0 = keep), both rounded to even
    (yuv420p H.264 needs even sizes). Never enlarges: an upscaled clip only teaches a model blur."""
    if short_side and short_side < min(width, height):
        scale = short_side / min(width, height)
        width, height = round(width * scale), round(height * scale)
    return max(2, width - width % 2), max(2, height - height % 2)
