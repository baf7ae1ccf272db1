"""The manifest: one table of videos or clips, shared by the data pipeline and training.

A manifest is a Parquet file (or a CSV, chosen by the file extension) with Open-Sora's columns
(:data:`OPENSORA_COLUMNS`), lineage columns (:data:`LINEAGE_COLUMNS`: where a clip came from) and, for
each pipeline stage that ran, ``<stage>_status`` (``done`` / ``failed`` / ``rejected``) and
``<stage>_error`` (the reason). Rows that failed or were rejected stay in the table so that nothing is
lost silently; :func:`read_manifest` drops them by default, which is what training wants.

A clip written by the pipeline also carries :data:`CONTENT_HASH_COLUMN` (``sha256`` of the file's bytes,
recorded when the clip is written), which the latent cache keys on without reading the clip again; it is
an optional column (a manifest without it still reads, and the cache then hashes each file once).

Open-Sora 1.0 CSVs (``path,text,num_frames,...``) and minimal inputs (a CSV with only ``url`` or ``path``)
read as they are; missing columns are added empty and every row gets a stable ``id``.

Example::

    df = read_manifest("data/clips.parquet")                   # usable rows only
    everything = read_manifest("data/clips.parquet", usable_only=False)
    write_manifest(df, "data/train.csv")                        # atomic; CSV because of the extension
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from opensora.utils import atomic_write_path

OPENSORA_COLUMNS = ["path", "text", "num_frames", "fps", "height", "width", "aspect_ratio", "resolution"]
"""Open-Sora 1.0's training columns. ``aspect_ratio`` is height / width, ``resolution`` is height * width."""

LINEAGE_COLUMNS = ["id", "url", "source", "source_video", "start_time", "end_time", "start_frame", "end_frame"]
"""Where a row came from: a stable ``id``; the ``url`` it was downloaded from; ``source`` (URL or original
file); ``source_video`` (the video a clip was cut from); the clip's span in that video, in seconds
(``start_time``/``end_time``) and frames (``start_frame`` inclusive, ``end_frame`` exclusive)."""

COLUMNS = ["id", *OPENSORA_COLUMNS, *[c for c in LINEAGE_COLUMNS if c != "id"]]
"""Columns every manifest written by :func:`write_manifest` has, in this order (extra columns follow)."""

CONTENT_HASH_COLUMN = "sha256"
"""Optional column: hex sha256 of the file at ``path``, written by whoever writes the file (the split stage).
It is trusted: a tool that rewrites a clip in place must rewrite or clear its ``sha256``."""

SPLIT_MODE_COLUMN = "split_mode"
"""Optional column written by the split stage: ``encode`` (``path`` is a clip file of its own) or ``reference``
(``path`` is the *source* video and the clip is its frames ``[start_frame, end_frame)``, re-timed from
``source_fps`` to ``fps`` by dropping frames; nothing was encoded). Rows without it are clip files."""

SOURCE_FPS_COLUMN = "source_fps"
"""Frame rate of ``source_video`` (written by split); a reference row needs it to re-time as the encoder would."""

_INT_COLUMNS = ["num_frames", "height", "width", "resolution", "start_frame", "end_frame"]
_FLOAT_COLUMNS = ["fps", "aspect_ratio", "start_time", "end_time"]
_OPTIONAL_TYPES = {SPLIT_MODE_COLUMN: "string", SOURCE_FPS_COLUMN: "float64", CONTENT_HASH_COLUMN: "string"}
_STR_COLUMNS = ["id", "path", "text", "url", "source", "source_video"]

OK_STATUS = "done"
"""The value of a ``<stage>_status`` column for a row the stage finished successfully."""


@dataclass(frozen=True)
class SourceSpan:
    """Where a reference row's frames are in its source video (see :data:`SPLIT_MODE_COLUMN`).

    Clip frame ``j`` is source frame ``start_frame + ceil(j * source_fps / fps)``: the first source frame of
    each output frame interval, which is the frame split's encoder keeps when it re-times by dropping frames
    (``data_pipeline.split._keep``); without re-timing it is simply ``start_frame + j``.
    """

    start_frame: int  # inclusive, source frames counted from 0 in presentation order
    end_frame: int  # exclusive
    source_fps: float
    fps: float  # of the clip (<= source_fps)

    def source_indices(self, clip_indices: np.ndarray | list[int]) -> np.ndarray:
        """int64 source frame numbers of clip frames ``clip_indices``."""
        j = np.asarray(clip_indices, dtype=np.int64)
        if self.fps >= self.source_fps:
            out = self.start_frame + j
        else:
            # 1e-9: j * src / out is an integer in exact arithmetic when the rates divide (e.g. 60 -> 30)
            out = self.start_frame + np.ceil(j * (self.source_fps / self.fps) - 1e-9).astype(np.int64)
        if out.size and (out.min() < self.start_frame or out.max() >= self.end_frame):
            raise IndexError(f"clip frames {j.tolist()} fall outside source frames [{self.start_frame}, {self.end_frame})")
        return out

    def cache_part(self) -> dict[str, Any]:
        """What the latent cache adds to a source file's hash to name this span's content."""
        return dict(start_frame=self.start_frame, end_frame=self.end_frame, source_fps=round(self.source_fps, 6),
                    fps=round(self.fps, 6))


def _value(row: Any, name: str) -> Any:
    value = row.get(name) if isinstance(row, dict) else getattr(row, name, None)
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else value


def source_span(row: Any) -> SourceSpan | None:
    """The :class:`SourceSpan` of a reference row (a dict or an ``itertuples`` row), None for a clip file.

    Raises ValueError for a reference row that lacks its span (start/end frame, fps, source_fps).
    """
    if _value(row, SPLIT_MODE_COLUMN) != "reference":
        return None
    values = {name: _value(row, name) for name in ("start_frame", "end_frame", SOURCE_FPS_COLUMN, "fps")}
    missing = [name for name, value in values.items() if value is None]
    if missing:
        raise ValueError(f"reference row {_value(row, 'id')!r} lacks {', '.join(missing)}")
    span = SourceSpan(int(values["start_frame"]), int(values["end_frame"]), float(values[SOURCE_FPS_COLUMN]),
                      float(values["fps"]))
    if not (0 <= span.start_frame < span.end_frame) or not math.isfinite(span.fps) or span.fps <= 0:
        raise ValueError(f"reference row {_value(row, 'id')!r} has a bad span {span}")
    return span


# Files the trainer reads as 1-frame samples (``opensora.data.dataset``) and the pipeline passes through as images.
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


def is_image(path: str | Path) -> bool:
    """Whether ``path`` is an image by its extension (:data:`IMAGE_EXTENSIONS`), the trainer's rule."""
    return Path(str(path)).suffix.lower() in IMAGE_EXTENSIONS


def status_columns(df: pd.DataFrame) -> list[str]:
    """The ``<stage>_status`` columns of ``df``, in table order."""
    return [c for c in df.columns if c.endswith("_status")]


def usable_mask(df: pd.DataFrame) -> pd.Series:
    """True for rows that no stage marked ``failed`` or ``rejected`` (empty status = stage not run)."""
    mask = pd.Series(True, index=df.index)
    for col in status_columns(df):
        status = df[col].fillna("").astype(str)
        mask &= status.isin(["", OK_STATUS])
    return mask


def row_id(key: str) -> str:
    """A stable short id for a URL or path (the first 16 hex digits of its sha1)."""
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]


def normalize(df: pd.DataFrame) -> pd.DataFrame:
    """Adds the missing :data:`COLUMNS`, fixes their dtypes and fills ``id`` where it is empty.

    Ids are derived from ``url`` (else ``path``) so that the same input gets the same id on every run,
    which is what resume keys on; a repeated URL/path gets ``#1``, ``#2``... appended.
    """
    df = df.copy()
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = pd.NA
    for col in _INT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    for col in _FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in _STR_COLUMNS:
        df[col] = df[col].astype("string")
    for col, dtype in _OPTIONAL_TYPES.items():
        if col in df.columns:
            df[col] = (pd.to_numeric(df[col], errors="coerce") if dtype == "float64" else df[col]).astype(dtype)
    missing = df["id"].isna() | (df["id"] == "")
    if missing.any():
        keys = df["url"].fillna(df["path"]).fillna("")
        if (missing & (keys == "")).any():
            bad = int((missing & (keys == "")).idxmax())
            raise ValueError(f"manifest row {bad} has no id, url or path")
        ids = keys[missing].map(row_id)
        # Repeats of the same key get a counter so ids stay unique (and stable for a fixed input order).
        counter = ids.groupby(ids).cumcount()
        ids = ids.where(counter == 0, ids + "#" + counter.astype(str))
        df.loc[missing, "id"] = ids
    dup = df["id"].duplicated()
    if dup.any():
        raise ValueError(f"manifest has duplicate ids, e.g. {df.loc[dup, 'id'].iloc[0]!r}")
    ordered = COLUMNS + [c for c in df.columns if c not in COLUMNS]
    return df[ordered].reset_index(drop=True)


def read_manifest(path: str | Path, usable_only: bool = True) -> pd.DataFrame:
    """Reads a manifest (``.parquet``, or ``.csv``/``.tsv``) into a DataFrame with all :data:`COLUMNS`.

    Args:
        path: the manifest file; the extension picks the format. Open-Sora CSVs read as they are.
        usable_only: drop rows that a pipeline stage marked ``failed`` or ``rejected`` (training wants
            this); the pipeline itself reads with ``False`` so that failure records carry through.
    Returns:
        the table, normalised by :func:`normalize` (stable ``id`` column, typed columns).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        df = pd.read_parquet(path)
    elif suffix in (".csv", ".tsv"):
        # keep_default_na=False then explicit "" -> NA: captions like "NA" or "null" stay text.
        df = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", keep_default_na=False, na_values=[""])
    else:
        raise ValueError(f"{path}: unknown manifest format '{path.suffix}' (use .parquet, .csv or .tsv)")
    if "path" not in df.columns and "url" not in df.columns:
        raise ValueError(f"{path}: a manifest needs a 'path' or 'url' column, found {list(df.columns)}")
    try:
        df = normalize(df)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    if usable_only:
        df = df[usable_mask(df)].reset_index(drop=True)
    return df


def write_manifest(df: pd.DataFrame, path: str | Path) -> Path:
    """Writes ``df`` atomically (``opensora.utils.atomic_write_path``: temp file in the same folder, fsync, rename).

    Args:
        df: the table; missing :data:`COLUMNS` are added.
        path: ``.parquet``, ``.csv`` or ``.tsv``; parent folders are created.
    Returns:
        the path written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv", ".tsv"):
        raise ValueError(f"{path}: unknown manifest format '{path.suffix}' (use .parquet, .csv or .tsv)")
    df = normalize(df)
    with atomic_write_path(path) as tmp, open(tmp, "wb") as f:
        if suffix == ".parquet":
            df.to_parquet(f, index=False)
        else:
            df.to_csv(f, index=False, sep="\t" if suffix == ".tsv" else ",")
    return path


def import_opensora_csv(csv_path: str | Path, out_path: str | Path) -> Path:
    """Converts an Open-Sora CSV (``path,text,num_frames,...``) into a manifest at ``out_path``.

    Relative ``path`` entries are resolved against the CSV's folder, as Open-Sora's scripts did when run
    from there.

    Args:
        csv_path: the Open-Sora CSV.
        out_path: the manifest to write (``.parquet`` or ``.csv``).
    Returns:
        the path written.
    """
    csv_path = Path(csv_path)
    df = read_manifest(csv_path, usable_only=False)
    base = csv_path.resolve().parent
    df["path"] = df["path"].map(lambda p: p if pd.isna(p) or os.path.isabs(p) else str(base / p)).astype("string")
    return write_manifest(df, out_path)
