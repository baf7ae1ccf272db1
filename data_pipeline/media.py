"""Media helpers of the data pipeline: safe file names and even output sizes. Clips are encoded with
``opensora.data.video_io.VideoWriter``."""

from __future__ import annotations

import hashlib
import re

# Longest name a clip stem may have: with ``_NNNN.mp4`` and the writer's hidden temp name around it
# (``.NAME.PID-XXXXXXXX.tmp.mp4``, opensora.utils.AtomicPath) a clip's file name stays far below the 255
# bytes that Linux and macOS file systems allow for one name.
MAX_STEM = 120


def safe_name(text: str, max_len: int = 120) -> str:
    """A file-name-safe version of ``text``: no separators, no leading dot, bounded length."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return (name or "file")[:max_len]


def unique_stem(text: str, max_len: int = MAX_STEM) -> str:
    """A file-name stem for ``text`` (a row id) that is ``text`` itself when that is already safe and short,
    otherwise its :func:`safe_name` shortened to fit ``max_len`` with ``-`` and 12 hex digits of the sha1 of
    ``text`` appended: deterministic (a redone row overwrites its own files) and distinct for distinct
    texts, where a plain cut or character substitution would give ``a b`` and ``a_b``, or two long ids with
    one beginning, the same files."""
    name = safe_name(text, max_len=len(text) + 1)
    if name == text and len(name) <= max_len:
        return name
    digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:12]
    return f"{name[: max_len - len(digest) - 1].rstrip('._')}-{digest}"


def even_size(width: int, height: int, short_side: int = 0) -> tuple[int, int]:
    """Output (width, height): the shorter side shrunk to ``short_side`` (0 = keep), both rounded to even
    (yuv420p H.264 needs even sizes). Never enlarges: an upscaled clip only teaches a model blur."""
    if short_side and short_side < min(width, height):
        scale = short_side / min(width, height)
        width, height = round(width * scale), round(height * scale)
    return max(2, width - width % 2), max(2, height - height % 2)
