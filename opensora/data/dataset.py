"""The training dataset: manifest rows -> fixed-shape video tensors, with broken clips recorded, never fatal.

One item is ``num_frames`` frames taken every ``frame_interval`` frames of a clip (Open-Sora 1.0: 16 frames
at interval 3), resized so that it covers its bucket's (H, W) and centre-cropped to it, as a float tensor
(3, T, H, W) in [-1, 1]. Images (``.png``/``.jpg``/...) are 1-frame videos; with ``num_frames == 1`` every
clip gives one frame. Where the window starts is random per (seed, epoch, index) by default, as
Open-Sora's ``TemporalRandomCrop``, and reproducible on resume. ``num_frames`` must be a count the autoencoder
takes: any for a per-frame VAE, t*k + 1 for a causal 3D one (17, not 16, at 4x: 5 latent frames); told the
autoencoder's shape, the dataset refuses any other count when it is built, naming the nearest valid ones.

Clips shorter than the window (``(num_frames - 1) * frame_interval + 1`` frames) are, by default,
*skipped*: left out of the dataset when it is built and recorded in the failures file, because padding
teaches the model frozen endings. ``short_clips="pad"`` keeps them and repeats their last frame instead.

A clip that fails to load (missing, truncated, undecodable) gives ``None`` and one JSONL line
``{"path", "id", "index", "error"}`` in ``failures_path``; :func:`collate` drops the Nones, and the
loader yields nothing for a batch that was all broken.

The loader over it (or over the latent cache) is ``opensora.data.loader.build_dataloader``::

    cfg = DataConfig(manifest="work/manifest.parquet", num_frames=16, frame_interval=3, image_size=(256, 256))
    loader, sampler = build_dataloader(cfg, batch_size=4, rank=0, world_size=1, seed=0,
                                       failures_path="run/stage1/failures.jsonl")
    for batch in loader:            # the rest of one epoch; iterate again for the next
        batch["video"]              # (B, 3, T, H, W) float in [-1, 1], one bucket per batch
        batch["text"]               # list of B captions
    state = sampler.state_dict()    # save with the checkpoint; sampler.load_state_dict(state) resumes exactly
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import MISSING
from PIL import Image
from torch.utils.data import Dataset

from opensora.config import ConfigError
from opensora.data.buckets import BucketKey, bucket_key, nearest_size, parse_sizes
from opensora.data.manifest import CONTENT_HASH_COLUMN, SourceSpan, is_image, read_manifest, source_span
from opensora.data.video_io import read_video, video_info
from opensora.models.autoencoders import AutoencoderShape
from opensora.utils import append_jsonl

SHORT_CLIP_POLICIES = ("skip", "pad")


HOLDOUT_UNIT_COLUMN = "source_video"
"""The manifest column whose value is the holdout's unit: the video a clip was cut from (split writes it on every
piece). A row without it is its own unit, keyed by its ``id``."""


def holdout_units(df: pd.DataFrame) -> pd.Series:
    """The holdout unit of every manifest row: its ``source_video``, or its ``id`` where that is empty."""
    source = df[HOLDOUT_UNIT_COLUMN].astype("string").fillna("")
    return source.where(source != "", df["id"].astype("string"))


@dataclass(frozen=True)
class Holdout:
    """Clips kept out of training for validation, a whole source video at a time (:func:`holdout_units`).

    split cuts a long shot into consecutive pieces ``<source>_<k>`` that look alike: held out one clip at a time,
    the neighbours of a validation clip would be trained on and the held-out loss would flatter the model. So a
    source video is held out with all its pieces when the sha256 of its unit key falls below ``fraction`` (the same
    videos on every machine, world size, resume and manifest order; a video added later does not move others
    across the line; larger fractions hold out supersets), or when one of its clips is listed in ``ids``.

    ``key in holdout`` says whether a unit key (or a listed clip id) is held out by itself; :meth:`mask` applies
    the holdout to a manifest.
    """

    fraction: float = 0.0
    ids: frozenset[str] = frozenset()

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"holdout fraction must be in [0, 1), got {self.fraction}")

    def __contains__(self, key: object) -> bool:
        key = str(key)
        if key in self.ids:
            return True
        if self.fraction <= 0.0:
            return False
        return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") < self.fraction * 2**64

    def __bool__(self) -> bool:
        return self.fraction > 0.0 or bool(self.ids)

    def mask(self, df: pd.DataFrame) -> np.ndarray:
        """bool (rows,): True for the rows of manifest ``df`` held out (every clip of a held-out source video)."""
        units = holdout_units(df)
        listed = set(units[df["id"].astype("string").isin(self.ids)])
        return np.array([unit in listed or unit in self for unit in units], dtype=bool)


@dataclass
class DataConfig:
    manifest: str = MISSING  # Parquet/CSV manifest (read_manifest); relative clip paths are relative to its folder
    num_frames: int = 16  # frames per sample (T); 1 trains on single frames; a causal 3D VAE takes t*k + 1 (17)
    frame_interval: int = 3  # take every k-th frame of the clip (Open-Sora 1.0: 3)
    image_size: tuple[int, int] = (256, 256)  # (H, W) of every sample when `buckets` is not set
    buckets: list[list[int]] | None = None  # [[H, W], ...]: each clip goes to the closest aspect ratio (buckets.py)
    num_workers: int = 2  # DataLoader worker processes (decode + resize run there)
    cache_dir: str | None = None  # precomputed latents + text embeddings (latent_cache.py); None decodes videos
    short_clips: str = "skip"  # clips shorter than the window: "skip" (record, leave out) or "pad" (repeat last frame)
    random_start: bool = True  # random window start per (seed, epoch, clip); False always starts at frame 0
    prefetch_factor: int = 2  # batches each worker prepares ahead
    # Error at start when more of the training clips than this share have an empty or missing caption (they would
    # train without text conditioning); a warning below it. 1.0: data without captions (unconditional training).
    max_empty_caption_share: float = 0.01
    max_failed_share: float = 0.2  # stop when more than this share of the last failure_window samples failed to load
    failure_window: int = 1000  # samples (all ranks together) the failed share is taken over

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"data.num_frames must be >= 1, got {self.num_frames}")
        if self.frame_interval < 1:
            raise ValueError(f"data.frame_interval must be >= 1, got {self.frame_interval}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"data.image_size must be [H, W] with positive integers, got {list(self.image_size)}")
        parse_sizes(self.buckets, tuple(self.image_size))  # type: ignore[arg-type]  # raises naming the bad size
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.short_clips not in SHORT_CLIP_POLICIES:
            raise ValueError(f"data.short_clips must be one of {SHORT_CLIP_POLICIES}, got {self.short_clips!r}")
        if self.prefetch_factor < 1:
            raise ValueError(f"data.prefetch_factor must be >= 1, got {self.prefetch_factor}")
        for name in ("max_empty_caption_share", "max_failed_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"data.{name} must be a share in [0, 1], got {getattr(self, name)}")
        if self.failure_window < 1:
            raise ValueError(f"data.failure_window must be >= 1 samples, got {self.failure_window}")

    @property
    def window(self) -> int:
        """Frames a clip needs to give ``num_frames`` frames at ``frame_interval`` without padding."""
        return (self.num_frames - 1) * self.frame_interval + 1


def check_sample_shape(cfg: DataConfig, autoencoder: AutoencoderShape | None) -> None:
    """Raises ValueError when a sample of ``cfg`` would not fit ``autoencoder``: ``num_frames`` outside its frame
    rule (the message names the nearest valid counts, e.g. 13 and 17 for 16 frames at 4x causal), or an
    ``image_size`` / bucket size not divisible by its spatial factors. Images (1 frame) need no check for a
    causal or per-frame autoencoder: 1 is always valid there. No-op for None.
    """
    if autoencoder is None:
        return
    for size in parse_sizes(cfg.buckets, tuple(cfg.image_size)):  # type: ignore[arg-type]
        try:
            autoencoder.latent_size((cfg.num_frames, *size))
        except ValueError as err:
            raise ValueError(f"data.buckets {list(size)}: {err}" if cfg.buckets else str(err)) from None


class DataError(ConfigError):
    """The training data cannot give the run it asks for (too many empty captions, too many clips failing to load).

    A ``ConfigError``, so that ``train/train.py`` stops with the message and exit status 2, as for a bad recipe: the
    message names the manifest, the counts and the ``data.*`` setting that decides.
    """


def check_captions(texts: list[str], cfg: DataConfig, warn: bool = True) -> int:
    """Counts the empty or missing captions of the training clips; raises :class:`DataError` when their share is
    above ``cfg.max_empty_caption_share``, warns (``warn``) when there are some below it. Returns the count.

    Such clips train as unconditional samples, on top of the model's own caption dropout: without a word, a
    manifest whose captioning failed would train a text-to-video model that ignores its text.
    """
    empty = sum(not text.strip() for text in texts)
    if not empty:
        return 0
    share = empty / len(texts)
    what = f"{cfg.manifest}: {empty} of {len(texts)} training clips ({share:.1%}) have an empty or missing caption"
    if share > cfg.max_empty_caption_share:
        raise DataError(f"{what}, more than data.max_empty_caption_share={cfg.max_empty_caption_share:g}: they would "
                        "train without text conditioning. Caption them (python -m data_pipeline caption), leave them "
                        "out of the manifest, or raise data.max_empty_caption_share (1.0 for data without captions)")
    if warn:
        warnings.warn(f"{what}, within data.max_empty_caption_share={cfg.max_empty_caption_share:g}: they train "
                      "without text conditioning", stacklevel=2)
    return empty


class LoadFailureWindow:
    """The share of samples that failed to load over the last ``cfg.failure_window`` requested samples; raises
    :class:`DataError` once it is above ``cfg.max_failed_share``.

    A clip that fails to load is recorded and left out, which keeps a run alive through a few bad files, and also
    kept a run whose data was mostly unreadable (moved, truncated, a stale cache) training on the rest while the
    failures file grew every epoch. The share is checked once the window is full, or once as many samples as the
    data set has were requested (a data set smaller than the window).

    Args:
        cfg: the data config (manifest, ``max_failed_share``, ``failure_window``).
        num_samples: clips in the data set.
        failures_path: the failures file the message points to.
    """

    def __init__(self, cfg: DataConfig, num_samples: int, failures_path: str | Path | None = None):
        self.cfg, self.failures_path = cfg, failures_path
        self.needed = min(cfg.failure_window, num_samples)
        self._batches: deque[tuple[int, int]] = deque()  # (requested, failed) per batch, oldest first
        self.requested = self.failed = 0

    def add(self, requested: int, failed: int) -> None:
        """Counts one batch (all ranks' samples); raises DataError when the window's failed share is too high."""
        self._batches.append((requested, failed))
        self.requested += requested
        self.failed += failed
        while self.requested - self._batches[0][0] >= self.cfg.failure_window:
            old_requested, old_failed = self._batches.popleft()
            self.requested -= old_requested
            self.failed -= old_failed
        if self.requested >= self.needed and self.failed > self.cfg.max_failed_share * self.requested:
            where = f"; each clip and its error are in {self.failures_path}" if self.failures_path else ""
            raise DataError(
                f"{self.failed} of the last {self.requested} samples failed to load "
                f"({self.failed / self.requested:.0%}, more than data.max_failed_share={self.cfg.max_failed_share:g} "
                f"over data.failure_window={self.cfg.failure_window}) from {self.cfg.manifest}{where}. Fix or "
                "leave out the broken rows (or the latent cache), or raise data.max_failed_share (1.0: never stop)"
            )


def record_failure(failures_path: str | Path | None, **fields: Any) -> None:
    """Appends one JSON line to ``failures_path`` (no-op for None); safe across ranks and workers (append_jsonl)."""
    if failures_path is not None:
        append_jsonl(failures_path, fields)


def resize_center_crop(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """Resizes frames to cover ``size`` (keeping the aspect ratio), centre-crops, and scales to [-1, 1].

    Args:
        frames: uint8 (T, h, w, 3) RGB.
        size: output (H, W).
    Returns:
        float32 (3, T, H, W) in [-1, 1].
    """
    (h, w), (H, W) = frames.shape[1:3], size
    scale = max(H / h, W / w)
    # Crop first (the source region that maps onto the output), then resize only that region.
    ch, cw = min(h, max(1, round(H / scale))), min(w, max(1, round(W / scale)))
    top, left = (h - ch) // 2, (w - cw) // 2
    # (T, h, w, 3) storage viewed as (T, 3, h, w) is channels-last, where torch's antialiased bilinear
    # has a fast uint8 kernel (~15x faster than on float). Antialias matters when shrinking 720p to 256;
    # bilinear weights are non-negative, so there is no overshoot (bicubic would have some).
    x = rearrange(torch.from_numpy(np.ascontiguousarray(frames)), "T H W C -> T C H W")
    x = x[:, :, top : top + ch, left : left + cw]  # (T, 3, ch, cw) uint8
    if (ch, cw) != (H, W):
        x = F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False)  # (T, 3, H, W) uint8
    x = x.float() / 127.5 - 1.0
    return rearrange(x, "T C H W -> C T H W").contiguous()


def read_image(path: Path) -> np.ndarray:
    """(1, H, W, 3) uint8 RGB of an image file."""
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))[None]  # a writable copy: torch.from_numpy needs one


class VideoDataset(Dataset):
    """Clips of a manifest as fixed-shape tensors, grouped into shape buckets.

    Building it reads the manifest and assigns every clip its bucket from the manifest's ``height``,
    ``width`` and ``num_frames`` (probing the file only where those are missing); no frame is decoded.
    Rows that cannot be used (too short under ``short_clips="skip"``, unreadable when probed) are left
    out and recorded, so indices are stable for a given manifest and config (the sampler relies on it).

    Args:
        cfg: the data config.
        failures_path: JSONL file that receives one line per broken or skipped clip (None: not recorded).
        seed: seed of the random window starts (combined with the epoch and the index).
        log_skipped: record the rows left out at build time (set False on all ranks but one, so that a
            multi-rank run records them once).
        autoencoder: the shape of the autoencoder the samples are for: a ``num_frames`` or size it cannot
            take is an error here (:func:`check_sample_shape`), before any clip is read. None: not checked.
        holdout: clips kept out of training for validation, whole source videos (:class:`Holdout`); None keeps
            every row.
        held_out: False (training): leave the held-out rows out; True (validation): keep only them.

    Attributes:
        bucket_keys: (T, H, W) of each index.
        paths, texts, ids: per index.
        units: per index, the clip's holdout unit (:func:`holdout_units`: its source video, else its id).
        sha256s: per index, the clip's content hash from the manifest's ``sha256`` column (written by the
            data pipeline's split stage), or None where the manifest has none.
        spans: per index, the :class:`~opensora.data.manifest.SourceSpan` of a reference row (``path`` is the
            source video; its frames are read by seeking there), None for a clip file.
    """

    def __init__(
        self, cfg: DataConfig, failures_path: str | Path | None = None, seed: int = 0, log_skipped: bool = True,
        autoencoder: AutoencoderShape | None = None, holdout: Holdout | None = None, held_out: bool = False,
    ):
        check_sample_shape(cfg, autoencoder)
        if held_out and not holdout:
            raise ValueError("held_out=True needs a holdout (fraction or ids) to select the held-out clips")
        self.cfg = cfg
        self.autoencoder = autoencoder
        self.failures_path = failures_path
        self.seed = int(seed)
        # In shared memory: the loader's workers persist across epochs, and set_epoch in the main process
        # must change the random window starts they draw.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        manifest = Path(cfg.manifest)
        df = read_manifest(manifest)
        sizes = parse_sizes(cfg.buckets, tuple(cfg.image_size))  # type: ignore[arg-type]
        self.paths: list[str] = []
        self.texts: list[str] = []
        self.ids: list[str] = []
        self.units: list[str] = []
        self.sha256s: list[str | None] = []
        self.spans: list[SourceSpan | None] = []
        hashed = CONTENT_HASH_COLUMN in df.columns
        self.frame_counts: list[int] = []
        self.bucket_keys: list[BucketKey] = []
        self.skipped: list[dict[str, str]] = []
        self.num_held_out = 0  # rows left out by ``holdout`` (training) or outside it (validation)
        keep = holdout.mask(df) == held_out if holdout else np.ones(len(df), dtype=bool)
        for row, kept, unit in zip(df.itertuples(index=False), keep, holdout_units(df)):
            if not kept:
                self.num_held_out += 1
                continue
            path = str(row.path) if not pd.isna(row.path) else ""
            if path and not os.path.isabs(path):
                path = str(manifest.parent / path)
            try:
                span = source_span(row)
                key, frames = self._assign(path, row, sizes)
            except Exception as err:  # a bad row must not stop the run: it is recorded and left out
                skip = dict(path=path, id=str(row.id), error=f"{type(err).__name__}: {err}")
                self.skipped.append(skip)
                if log_skipped:
                    record_failure(failures_path, **skip)
                continue
            self.paths.append(path)
            self.texts.append("" if pd.isna(row.text) else str(row.text))
            self.ids.append(str(row.id))
            self.units.append(str(unit))
            sha = getattr(row, CONTENT_HASH_COLUMN) if hashed else None
            self.sha256s.append(None if sha is None or pd.isna(sha) or not str(sha) else str(sha))
            self.frame_counts.append(frames)
            self.bucket_keys.append(key)
            self.spans.append(span)

    def _assign(self, path: str, row: Any, sizes: list[tuple[int, int]]) -> tuple[BucketKey, int]:
        """(bucket key, frame count) of one manifest row; raises for a row that cannot be used."""
        if not path:
            raise ValueError("manifest row has no path")
        height, width, frames = row.height, row.width, row.num_frames
        image = is_image(path)
        if pd.isna(height) or pd.isna(width) or (pd.isna(frames) and not image):
            if image:
                with Image.open(path) as img:
                    width, height = img.size
            else:
                info = video_info(path)
                height, width, frames = info["height"], info["width"], info["num_frames"]
        frames = 1 if image else int(frames)
        if not image and frames < self.cfg.window and self.cfg.short_clips == "skip":
            raise ValueError(
                f"clip too short: {frames} frames < {self.cfg.window} needed for {self.cfg.num_frames} frames "
                f"at interval {self.cfg.frame_interval} (data.short_clips='skip')"
            )
        num_out = 1 if image else self.cfg.num_frames
        key = bucket_key(num_out, nearest_size(int(height), int(width), sizes))
        if image and self.autoencoder is not None:  # 1 frame: only a non-causal temporal compression refuses it
            self.autoencoder.latent_size(key)
        return key, frames

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Selects the random window starts of ``epoch`` (the loader calls it before each epoch; running
        workers see the change)."""
        self._epoch.fill_(int(epoch))

    def frame_indices(self, index: int, random_start: bool | None = None) -> np.ndarray:
        """Which frames of clip ``index`` make its sample.

        Args:
            index: dataset index (a video, not an image).
            random_start: override ``cfg.random_start`` (the latent cache always uses False).
        Returns:
            int64 (T,): ``start + k * frame_interval``; for padded short clips, indices past the end repeat
            the last frame.
        """
        random_start = self.cfg.random_start if random_start is None else random_start
        count, T = self.frame_counts[index], self.bucket_keys[index][0]
        steps = np.arange(T, dtype=np.int64) * self.cfg.frame_interval
        last_start = count - (steps[-1] + 1)  # the window must end inside the clip
        if last_start < 0:  # short clip kept by short_clips="pad"
            return np.minimum(steps, count - 1)
        start = 0
        if random_start and last_start > 0:
            start = int(np.random.default_rng([self.seed, self.epoch, index]).integers(last_start + 1))
        return start + steps

    def load(self, index: int, random_start: bool | None = None) -> torch.Tensor:
        """Decodes clip ``index`` into its bucket's shape; raises if the file is broken.

        Args:
            index: dataset index.
            random_start: override ``cfg.random_start``.
        Returns:
            float32 (3, T, H, W) in [-1, 1].
        """
        path, (_, H, W) = self.paths[index], self.bucket_keys[index]
        if is_image(path):
            frames = read_image(Path(path))  # (1, h, w, 3)
        else:
            indices, span = self.frame_indices(index, random_start), self.spans[index]
            # A reference row reads the same frames from its source at the source's size: one resize to the
            # bucket instead of the encoded clip's two (split's short_side, then this), no H.264 loss.
            frames = read_video(path, indices if span is None else span.source_indices(indices))  # (T, h, w, 3)
        return resize_center_crop(frames, (H, W))

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        """``dict(video=(3, T, H, W) float in [-1, 1], text=str, index=int, bucket=(T, H, W))``, or None if broken."""
        try:
            video = self.load(index)
        except Exception as err:  # decode errors come in many types (decord, PyAV, PIL, OS); none may stop training
            record_failure(self.failures_path, path=self.paths[index], id=self.ids[index], index=index,
                           error=f"{type(err).__name__}: {err}")
            return None
        return dict(video=video, text=self.texts[index], index=index, bucket=self.bucket_keys[index])


def collate(items: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Stacks dataset items into a batch, dropping None (broken) items; None if all were broken.

    Tensors are stacked on a new first axis, strings become a list, ``index`` a (B,) long tensor, and
    ``bucket`` the one (T, H, W) of the batch (the sampler guarantees one per batch).
    """
    items = [item for item in items if item is not None]
    if not items:
        return None
    buckets = {item["bucket"] for item in items}
    if len(buckets) != 1:
        raise ValueError(f"a batch mixes buckets {sorted(buckets)}: use DistributedBucketSampler")
    batch: dict[str, Any] = {}
    for name, value in items[0].items():
        values = [item[name] for item in items]
        if isinstance(value, torch.Tensor):
            batch[name] = torch.stack(values)
        elif name == "index":
            batch[name] = torch.tensor(values, dtype=torch.long)
        elif name == "bucket":
            batch[name] = value
        else:
            batch[name] = values
    return batch
