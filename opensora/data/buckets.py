"""Shape buckets: every clip is assigned one output shape (T, H, W) so that a batch stacks into one tensor.

A bucket is the key ``(T, H, W)``: frames, height and width after temporal sampling, resize and centre crop.
Clips are placed by aspect ratio (and, among sizes of the same aspect ratio, by resolution), so that a
portrait clip is cropped to a portrait size instead of losing half its content to a square crop
(the aspect-ratio bucketing of Open-Sora 1.1 / SDXL, reduced to an explicit list of sizes).
Images and videos differ in T (1 vs ``num_frames``), so they never share a batch either.

Example::

    sizes = parse_sizes([[256, 256], [192, 320], [320, 192]], default=(256, 256))
    nearest_size(720, 1280, sizes)   # (192, 320): 16:9 footage -> the landscape bucket
"""

from __future__ import annotations

import math
from typing import Sequence

BucketKey = tuple[int, int, int]
"""(T, H, W) of every sample in a bucket, in pixels (before the autoencoder)."""


def parse_sizes(buckets: Sequence[Sequence[int]] | None, default: tuple[int, int]) -> list[tuple[int, int]]:
    """Validates a bucket list of ``[H, W]`` sizes; no list (or an empty one) means the single size ``default``.

    Args:
        buckets: ``[[H, W], ...]`` in pixels, or None.
        default: the stage's ``image_size`` (H, W), used when ``buckets`` is empty.
    Returns:
        the sizes as (H, W) tuples, in the given order (order breaks ties in :func:`nearest_size`).
    """
    sizes = [tuple(int(v) for v in size) for size in (buckets or [default])]
    for size in sizes:
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"a bucket size must be [H, W] with positive integers, got {list(size)}")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"bucket sizes must be distinct, got {[list(s) for s in sizes]}")
    return sizes  # type: ignore[return-value]


def nearest_size(height: int, width: int, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket size for a clip of ``height`` x ``width`` pixels.

    Closest aspect ratio first (distance in log(H/W), so 1:2 and 2:1 are equally far from 1:1). Among sizes
    of that aspect ratio: the largest one that needs no upscaling, else the smallest one (upscaling the
    least). Remaining ties go to the earlier size in the list.

    Args:
        height: clip height in pixels (> 0).
        width: clip width in pixels (> 0).
        sizes: candidate (H, W) sizes, see :func:`parse_sizes`.
    """
    if height < 1 or width < 1:
        raise ValueError(f"clip size must be positive, got {height}x{width}")
    ratio = math.log(height / width)
    # Round so that float noise cannot split sizes of the same ratio (e.g. 144x256 vs 288x512).
    dist = [round(abs(math.log(h / w) - ratio), 9) for h, w in sizes]
    best = min(dist)
    same_ratio = [s for s, d in zip(sizes, dist) if d == best]
    fitting = [s for s in same_ratio if s[0] <= height and s[1] <= width]
    if fitting:
        return max(fitting, key=lambda s: s[0] * s[1])  # max/min keep the first of equal areas
    return min(same_ratio, key=lambda s: s[0] * s[1])


def bucket_key(num_frames: int, size: tuple[int, int]) -> BucketKey:
    """The key (T, H, W) of a bucket."""
    return (int(num_frames), int(size[0]), int(size[1]))
