"""Small helpers shared by every room."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_write_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to ``path``; on success it is fsync'd and renamed over ``path``.

    A crash (or a full disk) mid-write leaves the previous ``path`` untouched and no partial file under its name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


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
