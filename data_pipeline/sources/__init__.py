"""Data sources: turn something a user has (a folder of videos, a list of URLs, a generator's options) into
a first manifest.

Each source is a function returning a DataFrame with a ``path`` or ``url`` column (ids are added by
:func:`opensora.data.manifest.normalize`). :func:`resolve_input` picks one from the shape of the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from data_pipeline.sources.folder import scan_folder
from data_pipeline.sources.shapes import ShapesConfig, generate_shapes
from data_pipeline.sources.urls import read_url_list
from opensora.config import ConfigError, load_config
from opensora.data.manifest import normalize, read_manifest

SOURCE_FILE_SUFFIXES = (".yaml", ".yml", ".toml")


@dataclass
class SourceFile:
    """A source file (``.yaml``/``.toml`` given as the pipeline input): exactly one generator section."""

    shapes: Optional[ShapesConfig] = None  # procedurally generated shapes videos with per-shot captions


def read_source_file(path: str | Path) -> pd.DataFrame:
    """Runs the generator a source file names (resuming its earlier output) and returns its videos.

    Args:
        path: ``.yaml``/``.yml``/``.toml`` matching :class:`SourceFile`; unknown keys are errors naming the key.
    """
    spec = load_config(SourceFile, path)
    if spec.shapes is None:
        raise ConfigError(f"{path}: a source file needs one generator section (known: shapes)")
    return generate_shapes(spec.shapes)


def resolve_input(input: str | Path) -> pd.DataFrame:
    """A manifest from ``input``: a folder (scanned for videos), a ``.txt`` URL list, a source file
    (``.yaml``/``.toml``: a generator's options) or a manifest file.

    Args:
        input: folder, ``.txt`` (one URL or path per line, ``#`` comments), source file or ``.parquet``/``.csv``.
    Returns:
        all rows (earlier failure records included), normalised.
    """
    input = Path(input)
    if input.is_dir():
        return normalize(scan_folder(input))
    if input.suffix.lower() == ".txt":
        return normalize(read_url_list(input))
    if input.suffix.lower() in SOURCE_FILE_SUFFIXES:
        return normalize(read_source_file(input))
    return read_manifest(input, usable_only=False)


__all__ = [
    "SourceFile", "ShapesConfig", "generate_shapes", "read_source_file", "read_url_list", "resolve_input", "scan_folder",
]
