"""A text file of URLs (one per line) as a manifest."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def read_url_list(path: str | Path) -> pd.DataFrame:
    """One row per non-empty, non-comment (``#``) line; repeated URLs are kept once.

    Args:
        path: the ``.txt`` file.
    Returns:
        a DataFrame with a ``url`` column.
    """
    urls: list[str] = []
    seen: set[str] = set()
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and line not in seen:
            seen.add(line)
            urls.append(line)
    return pd.DataFrame({"url": urls})
