"""A folder of videos (searched recursively) as a manifest."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".flv", ".ts", ".mpg", ".mpeg")


def scan_folder(root: str | Path, extensions: tuple[str, ...] = VIDEO_EXTENSIONS) -> pd.DataFrame:
    """One row per video file under ``root`` (sorted, hidden files and temp files skipped).

    Args:
        root: the folder.
        extensions: file endings counted as videos (case-insensitive).
    Returns:
        a DataFrame with ``path`` (absolute) and ``source`` columns.
    """
    root = Path(root).resolve()
    paths = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in extensions and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    return pd.DataFrame({"path": [str(p) for p in paths], "source": [str(p) for p in paths]})
