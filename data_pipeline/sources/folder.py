"""A folder of videos (searched recursively) as a manifest.

Every entry the scan does not take as a video is a row too, with ``scan_status`` (``failed``: it may have
been meant as a video but cannot be read, e.g. a dangling symlink; ``rejected``: not a video, e.g. a
``.txt``) and ``scan_error`` saying why, so a user counting inputs against outputs finds each one:
inputs = done + rejected + failed. Later stages pass those rows through untouched, as any failure record.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pandas as pd

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".flv", ".ts", ".mpg", ".mpeg")
SIDECAR_EXTENSIONS = (".txt", ".json")  # captions next to a video (see caption.py); named as such when skipped


def _entry(path: Path, status: str, error: str | None) -> dict:
    return {"path": str(path), "source": str(path), "scan_status": status, "scan_error": error}


def _file_entry(path: Path, extensions: tuple[str, ...], names: set[str]) -> dict:
    """The row of one non-directory entry: a video (``done``) or why it is skipped."""
    try:
        info = path.stat()  # follows a symlink
    except FileNotFoundError:
        if path.is_symlink():
            return _entry(path, "failed", f"dangling symlink -> {os.readlink(path)}")
        return _entry(path, "failed", "vanished while the folder was scanned")
    except OSError as err:
        return _entry(path, "failed", f"unreadable: {err.strerror or err}")
    if not stat.S_ISREG(info.st_mode):
        return _entry(path, "rejected", "not a regular file (a device, pipe or socket)")
    suffix = path.suffix.lower()
    if suffix not in extensions:
        if suffix in SIDECAR_EXTENSIONS and any(path.stem.lower() + ext in names for ext in extensions):
            return _entry(path, "rejected", "caption sidecar of a video, not a video")
        return _entry(path, "rejected", f"not a video by its extension ({suffix or 'none'})")
    if not os.access(path, os.R_OK):
        return _entry(path, "failed", "unreadable: permission denied")
    return _entry(path, "done", None)


def scan_folder(root: str | Path, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> pd.DataFrame:
    """One row per entry under ``root`` (sorted): each video, and each entry skipped, with the reason.

    Hidden entries (names starting with ``.``, such as our own temp files) are one rejected row each, their
    contents unlisted; symlinked folders are followed once (a link back into a scanned folder is rejected).

    Args:
        root: the folder.
        extensions: file endings counted as videos (case-insensitive; written lower-case).
    Returns:
        a DataFrame with ``path`` (absolute), ``source``, ``scan_status`` (``done`` for the videos,
        ``rejected`` or ``failed``) and ``scan_error`` columns.
    """
    root = Path(root).resolve()
    rows: list[dict] = []
    seen: set[str] = set()

    def walk(folder: Path) -> None:
        seen.add(os.path.realpath(folder))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            rows.append(_entry(folder, "failed", f"unreadable folder: {err.strerror or err}"))
            return
        names = {e.name.lower() for e in entries}
        for e in entries:
            path = folder / e.name
            if e.name.startswith("."):
                rows.append(_entry(path, "rejected", "hidden (skipped with anything in it)"))
            elif e.is_dir():  # follows a symlink
                if os.path.realpath(path) in seen:
                    rows.append(_entry(path, "rejected", "symlink to a folder already scanned (a loop)"))
                    continue
                if path.suffix.lower() in extensions:
                    rows.append(_entry(path, "rejected", "a folder named like a video (its contents are scanned)"))
                walk(path)
            else:
                rows.append(_file_entry(path, extensions, names))

    walk(root)
    rows.sort(key=lambda r: r["path"])
    return pd.DataFrame(rows, columns=["path", "source", "scan_status", "scan_error"])
