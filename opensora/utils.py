"""Small helpers shared by every room."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, Iterator


class AtomicPath:
    """A temporary path next to ``path`` that becomes ``path`` on :meth:`commit`; for writers that outlive a
    ``with`` block (a streaming video writer). Everything else uses :func:`atomic_write_path`.

    The temporary name starts with a dot and is unique per process and call, so a half-written file is
    never taken for a finished one and parallel writers of one name do not collide. It is created by the
    writer, so the file gets the usual permissions (``tempfile.mkstemp`` would make it 0600).

    Args:
        path: the final path; parent folders are created.
        keep_suffix: end the temporary name with ``path``'s suffix, for writers that pick the format by it
            (FFmpeg's muxers: ``.mp4``); otherwise it ends in ``.tmp``.
    """

    def __init__(self, path: str | Path, keep_suffix: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tail = self.path.suffix if keep_suffix else ""
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{tail}")

    def commit(self) -> Path:
        """fsyncs the finished temporary file and renames it over ``path`` (atomic on one filesystem)."""
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        return self.path

    def discard(self) -> None:
        """Removes the temporary file, if any (after a failure; a no-op after :meth:`commit`)."""
        self.tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write_path(path: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it is fsync'd and renamed over ``path``.

    A crash (or a full disk) mid-write leaves the previous ``path`` untouched and no partial file under its
    name; an exception removes the temporary file. See :class:`AtomicPath` for the name and ``keep_suffix``.
    """
    target = AtomicPath(path, keep_suffix=keep_suffix)
    try:
        yield target.tmp
        target.commit()
    finally:
        target.discard()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (the content identity of downloads, clips and cache entries)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def append_jsonl(path: str | Path, fields: dict[str, Any]) -> None:
    """Appends ``fields`` as one JSON line to ``path`` (parents created).

    One ``os.write`` on an ``O_APPEND`` descriptor, so lines from several ranks and worker processes do
    not interleave; a process killed mid-write leaves at most one torn last line, which readers skip.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(fields, default=str) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file written by :func:`append_jsonl` ([] if absent; torn lines skipped)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # the torn last line of a killed writer
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe slug of ``text``: lowercase ASCII letters, digits and dashes, never empty."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return slug or "untitled"
