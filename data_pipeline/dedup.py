"""dedup: near-duplicate clips (re-encodes, resized copies, re-uploads) found over the whole manifest, one kept.

Two steps. Per row, in parallel and journaled like any stage (``dedup_signature``): ``num_frames`` frames at
fixed relative positions, each reduced to a 64-bit perceptual hash (``imagehash.phash``: the low frequencies of
the DCT of a 32x32 grey thumbnail, which survive re-encoding, resizing and small colour shifts), written as
``dedup_phash`` (hex). Then once over the whole output (``group_duplicates``): clips whose signatures differ in at
most ``max_distance`` bits are duplicates; each group keeps one clip (the longest, then the largest picture,
then the smallest id) and the others are rejected with ``duplicate of <id>``.

No all-pairs comparison: the signature is cut into 16-bit bands and only clips that share a band exactly are
compared. Two signatures at most ``max_distance`` bits apart differ in at most that many bands, so with more
bands than that they share one (pigeonhole): no duplicate within the distance is missed. Work grows with the
number of clips times the clips per band value; 16-bit bands keep those buckets small unless many clips share
the same picture (flat frames, which filter rejects first).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.config import DedupConfig
from data_pipeline.rows import Row, SetupError, is_missing
from opensora.data.manifest import OK_STATUS, read_manifest, source_span, write_manifest

BAND_BITS = 16
HASH_BITS = 64  # imagehash.phash with hash_size=8


def frame_hashes(frames: np.ndarray) -> str:
    """Hex perceptual hashes of ``frames`` (N, h, w, 3) RGB, one 16-digit hash per frame, concatenated."""
    try:
        import imagehash
        from PIL import Image
    except ImportError as err:
        raise SetupError("dedup needs the imagehash package (pip install imagehash; scripts/setup.sh installs it)") \
            from err
    return "".join(str(imagehash.phash(Image.fromarray(f))) for f in frames)


def dedup_signature(row: Row, cfg: DedupConfig) -> list[Row]:
    """Stage function: the clip's signature (``dedup_phash``); grouping happens once all rows have one."""
    from data_pipeline.filter import sample_frames

    if is_missing(row.get("path")):
        raise RuntimeError("row has no path")
    span = source_span(row)
    frames = sample_frames(row["path"], cfg.num_frames, cfg.sample_width, span,
                           0 if span is None else int(row["num_frames"]))
    if len(frames) < cfg.num_frames:  # a clip shorter than num_frames frames: repeat to a comparable length
        frames = frames[np.linspace(0, len(frames) - 1, cfg.num_frames).round().astype(int)]
    return [{**row, "dedup_phash": frame_hashes(frames)}]


def _bits(signatures: list[str]) -> np.ndarray:
    """(N, bits) bool: the signatures as bit arrays (all of one length)."""
    raw = np.frombuffer(b"".join(bytes.fromhex(s) for s in signatures), np.uint8).reshape(len(signatures), -1)
    return np.unpackbits(raw, axis=1).astype(bool)


def find_groups(signatures: list[str], max_distance: int) -> list[int]:
    """The group of each signature: the index of the first signature of its group (itself when unique).

    Args:
        signatures: hex strings of equal length.
        max_distance: two signatures at most this many bits apart are in one group (transitively).
    """
    n = len(signatures)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    if n == 0:
        return []
    bits = _bits(signatures)  # (N, B)
    bands = bits.shape[1] // BAND_BITS
    if max_distance >= bands:
        raise ValueError(f"dedup.max_distance {max_distance} must be below the {bands} bands of {BAND_BITS} bits "
                         "in a signature (more frames give more bands)")
    weights = 1 << np.arange(BAND_BITS - 1, -1, -1)
    keys = bits.reshape(n, bands, BAND_BITS) @ weights  # (N, bands): the value of each band
    for band in range(bands):
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, key in enumerate(keys[:, band].tolist()):
            buckets[key].append(i)
        for members in buckets.values():
            for a_pos, a in enumerate(members):
                for b in members[a_pos + 1:]:
                    ra, rb = root(a), root(b)
                    if ra != rb and np.count_nonzero(bits[a] != bits[b]) <= max_distance:
                        parent[max(ra, rb)] = min(ra, rb)
    return [root(i) for i in range(n)]


def group_duplicates(output: str | Path, cfg: DedupConfig) -> tuple[int, int]:
    """Rejects, in the stage's output manifest, every duplicate but the one kept of its group.

    Rows the per-row step finished (``dedup_status`` done) take part; the kept one is the longest clip, then the
    one with the most pixels, then the smallest id. Returns (groups with duplicates, rows rejected).
    """
    df = read_manifest(output, usable_only=False)
    done = df.index[(df["dedup_status"] == OK_STATUS) & df["dedup_phash"].notna()]
    if len(done) == 0:
        return 0, 0
    rows = df.loc[done]
    groups = find_groups(rows["dedup_phash"].tolist(), cfg.max_distance)
    duration = pd.to_numeric(rows.get("duration", pd.Series(np.nan, rows.index)), errors="coerce").fillna(0.0)
    pixels = pd.to_numeric(rows.get("resolution", pd.Series(np.nan, rows.index)), errors="coerce").fillna(0.0)
    order = pd.DataFrame({"group": groups, "duration": duration.to_numpy(), "pixels": pixels.to_numpy(),
                          "id": rows["id"].astype(str).to_numpy()}, index=done)
    order = order.sort_values(["group", "duration", "pixels", "id"], ascending=[True, False, False, True])
    kept = order.groupby("group")["id"].first()
    df["dedup_group"] = pd.Series(order["group"].map(kept), index=done)
    duplicate = order.index[order["id"].to_numpy() != order["group"].map(kept).to_numpy()]
    df["dedup_of"] = None
    df.loc[duplicate, "dedup_of"] = order.loc[duplicate, "group"].map(kept)
    df.loc[duplicate, "dedup_status"] = "rejected"
    df.loc[duplicate, "dedup_error"] = "duplicate of " + df.loc[duplicate, "dedup_of"].astype(str)
    write_manifest(df, output)
    with_duplicates = int(order.loc[duplicate, "group"].nunique())
    print(f"dedup: {len(done)} clips, {with_duplicates} groups of near-duplicates, {len(duplicate)} rejected "
          "as duplicates", file=sys.stderr, flush=True)
    return with_duplicates, len(duplicate)
