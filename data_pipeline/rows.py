"""What stage functions share: the row type, the rejection signal, and JSON-safe row values."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

Row = dict[str, Any]
"""One manifest row: column name -> a JSON-serialisable value (None for missing)."""


class Reject(Exception):
    """Raised by a stage for a row that is fine but unwanted (too short, static, black...).

    The runner records it as ``<stage>_status = rejected`` with ``reason``; ``updates`` (e.g. the scores
    that led to the decision) are kept on the row so a later look can tell why.
    """

    def __init__(self, reason: str, updates: Row | None = None):
        super().__init__(reason)
        self.reason = reason
        self.updates = dict(updates or {})


class Vanished(Reject):
    """Raised by download for a source that is gone for good: a private, deleted or removed video, an HTTP 404
    or 410 (a large share of any YouTube-based dataset).

    A rejection (``download_status=rejected``, the reason starting with ``vanished:``), counted apart in the
    summary (``vanished N``) and no failure: a re-run does not try it again, not even with ``retry_failed``,
    which is for transient failures (timeouts, 5xx). To look again, remove the stage's journal entries.
    """

    def __init__(self, reason: str):
        super().__init__(f"vanished: {reason}")


class SetupError(RuntimeError):
    """Raised by a stage for an error of its set-up, not of the row: a missing or unloadable model folder.

    Every later row would fail the same way, so the runner stops the stage (exit status 3) and journals none
    of the rows that hit it: a re-run after the set-up is fixed does them, without ``--retry-failed``.
    """


def plain(value: Any) -> Any:
    """Turns numpy/pandas scalars and missing markers into plain Python (JSON-safe) values."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def plain_row(row: Row) -> Row:
    """:func:`plain` applied to every value of a row."""
    return {k: plain(v) for k, v in row.items()}


def is_missing(value: Any) -> bool:
    """True for None / NaN / pd.NA / empty string."""
    value = plain(value)
    return value is None or (isinstance(value, str) and value.strip() == "")
