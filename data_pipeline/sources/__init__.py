"""Data sources: turn something a user has (a folder of videos, a list of URLs) into a first manifest.

Each source is a function returning a DataFrame with a ``path`` or ``url`` column (ids are added by
:func:`opensora.data.manifest.normalize`). :func:`resolve_input` picks one from the shape of the input.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from data_pipeline.sources.folder import scan_folder
from data_pipeline.sources.urls import read_url_list
from opensora.data.manifest import normalize, read_manifest


def resolve_input(input: str | Path) -> pd.DataFrame:
    """A manifest from ``input``: a folder (scanned for videos), a ``.txt`` URL list, or a manifest file.

    Args:
        input: folder, ``.txt`` (one URL or path per line, ``#`` comments) or ``.parquet``/``.csv``.
    Returns:
        all rows (earlier failure records included), normalised.
    """
    input = Path(input)
    if input.is_dir():
        return normalize(scan_folder(input))
    if input.suffix.lower() == ".txt":
        return normalize(read_url_list(input))
    return read_manifest(input, usable_only=False)


__all__ = ["resolve_input", "scan_folder", "read_url_list"]
