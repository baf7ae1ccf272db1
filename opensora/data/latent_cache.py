"""Precomputed VAE latents and text embeddings, under keys that make a stale entry unreachable.

The VAE and the text encoder are frozen, and at 256px they cost more per step than STDiT-S itself, so
encoding each clip once and training from the cache is the cheap path (Open-Sora's own latent
pre-extraction). The danger of any cache is using an entry made from other inputs; here every entry's
name is the sha256 of everything it depends on:

- the clip file's content (sha256 of its bytes, not its path or mtime) and its caption text;
- the encoders' identity: class, config, and a fingerprint of every weight tensor (and, for the text
  encoder, its tokenizer and ``max_length``) — see :func:`encoder_identity`;
- the sample shape and sampling: bucket (T, H, W), ``frame_interval``, ``short_clips``, and
  :data:`CACHE_FORMAT` (bumped when the preprocessing code changes meaning).

Change any of them and the key changes, so the old entry is simply never found: :class:`CachedLatentDataset`
reports the clip as missing (recorded in the failures file) instead of returning stale latents.

Cached samples use a fixed temporal window (frames ``0, k, 2k, ...``) and the posterior *mode* of the VAE,
so they lose the random window start and posterior sampling of live encoding (the usual cost of a cache).

Layout: ``cache_dir/<key[:2]>/<key>.safetensors`` with tensors ``latent`` (C, T, h, w), ``y`` (1, L, D)
and ``mask`` (L,). Writes are atomic (temp file + rename), so :func:`precompute` can be killed and re-run:
it skips entries that exist. Ranks split the clips (``index % world_size == rank``).

Example::

    vae, te = build_vae(vae_cfg, "cuda"), build_text_encoder(te_cfg, "cuda")
    precompute(data_cfg, vae, te, data_cfg.cache_dir, rank=rank, world_size=world_size)
    identity = encoder_identity(vae, te)     # the trainer needs only this, not the encoders
    loader, sampler = build_dataloader(data_cfg, 4, rank, world_size, seed, encoder_identity=identity)
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from opensora.data.buckets import BucketKey
from opensora.data.dataset import DataConfig, VideoDataset, record_failure
from opensora.models.text_encoder import T5TextEncoder
from opensora.models.vae import IdentityAutoencoder, VideoAutoencoderKL
from opensora.utils import atomic_write_path

CACHE_FORMAT = 1
"""Version of what an entry means (preprocessing, window choice, tensor layout); part of every key."""


@dataclass(frozen=True)
class EncoderIdentity:
    """Fingerprints (sha256 hex) of the VAE and the text encoder that a cache entry was made with."""

    vae: str
    text_encoder: str


def _public_config(config: Any) -> dict[str, Any]:
    """A config dict without bookkeeping keys (``_name_or_path``, library versions) that do not change outputs."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and k != "transformers_version"}


def fingerprint_module(module: nn.Module, config: dict[str, Any]) -> str:
    """sha256 of a module's class, ``config`` and every tensor of its state dict (names, dtypes, shapes, bytes).

    Hashing the weights (not the path they came from) means re-saved or moved weights keep their identity
    and fine-tuned weights get a new one. Cost: one pass over the weights (about 5 s for T5-XXL's 9.5 GB).

    Args:
        module: the encoder.
        config: whatever else decides its outputs (JSON-serialisable; non-JSON values are turned into str).
    """
    digest = hashlib.sha256()
    head = {"class": f"{type(module).__module__}.{type(module).__qualname__}", "config": config}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vae_identity(vae: VideoAutoencoderKL | IdentityAutoencoder) -> str:
    """Fingerprint of an autoencoder from ``opensora.models.vae`` (config, scaling factor, weights)."""
    config: dict[str, Any] = {"out_channels": vae.out_channels, "patch_size": list(vae.patch_size)}
    if isinstance(vae, VideoAutoencoderKL):
        # micro_batch_size is left out: the posterior mode that is cached does not depend on it.
        config.update(scaling_factor=vae.scaling_factor, module=_public_config(vae.module.config))
    return fingerprint_module(vae, config)


def text_encoder_identity(text_encoder: T5TextEncoder) -> str:
    """Fingerprint of a text encoder: model config and weights, tokenizer vocabulary/rules, ``max_length``."""
    tokenizer = text_encoder.tokenizer
    if getattr(tokenizer, "backend_tokenizer", None) is not None:  # fast tokenizers serialise completely
        rules = json.loads(tokenizer.backend_tokenizer.to_str())
        # Calling the tokenizer stores its last padding/truncation settings here; encode() sets both
        # from max_length (hashed below), so they are state, not identity.
        rules.pop("padding", None)
        rules.pop("truncation", None)
        vocab = json.dumps(rules, sort_keys=True)
    else:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    config = {
        "model": _public_config(text_encoder.model.config.to_dict()),
        "max_length": text_encoder.max_length,
        "tokenizer": hashlib.sha256(vocab.encode()).hexdigest(),
    }
    return fingerprint_module(text_encoder.model, config)


def encoder_identity(vae: VideoAutoencoderKL | IdentityAutoencoder, text_encoder: T5TextEncoder) -> EncoderIdentity:
    """The :class:`EncoderIdentity` of loaded encoders (hashes their weights once)."""
    return EncoderIdentity(vae=vae_identity(vae), text_encoder=text_encoder_identity(text_encoder))


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised per process by (path, size, mtime) so repeated epochs read it once."""
    stat = os.stat(path)
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[memo] = digest.hexdigest()
    return _FILE_HASHES[memo]


def cache_key(
    content_sha256: str,
    text: str,
    identity: EncoderIdentity,
    bucket: BucketKey,
    frame_interval: int,
    short_clips: str,
) -> str:
    """The name of a cache entry: sha256 over everything the cached tensors depend on.

    Args:
        content_sha256: sha256 of the clip file.
        text: the caption that was embedded.
        identity: the encoders.
        bucket: (T, H, W) the clip was resized/cropped to.
        frame_interval: frame step of the window.
        short_clips: "skip" or "pad" (padding changes the frames of short clips).
    """
    parts = {
        "format": CACHE_FORMAT,
        "content": content_sha256,
        "text": text,
        "vae": identity.vae,
        "text_encoder": identity.text_encoder,
        "frames": int(bucket[0]),
        "height": int(bucket[1]),
        "width": int(bucket[2]),
        "frame_interval": int(frame_interval),
        "short_clips": short_clips,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def entry_path(cache_dir: str | Path, key: str) -> Path:
    """Where the entry ``key`` lives (two hex digits of fan-out keep directories small)."""
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


def _key_of(videos: VideoDataset, index: int, identity: EncoderIdentity) -> str:
    cfg = videos.cfg
    return cache_key(file_sha256(videos.paths[index]), videos.texts[index], identity, videos.bucket_keys[index],
                     cfg.frame_interval, cfg.short_clips)


@dataclass
class PrecomputeReport:
    """What :func:`precompute` did on this rank."""

    total: int = 0  # clips assigned to this rank
    written: int = 0  # entries encoded and written now
    existing: int = 0  # entries already in the cache (skipped)
    failed: list[dict[str, str]] = field(default_factory=list)  # {path, error} of clips that could not be read


def _identity_collate(item: Any) -> Any:
    return item


class _PrecomputeJobs(Dataset):
    """Item k of this rank's clips -> (index, key, video (3, T, H, W) or None if cached, error or None)."""

    def __init__(self, videos: VideoDataset, indices: list[int], identity: EncoderIdentity, cache_dir: Path):
        self.videos, self.indices, self.identity, self.cache_dir = videos, indices, identity, cache_dir

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[int, str, torch.Tensor | None, str | None]:
        index, key = self.indices[k], ""
        try:
            key = _key_of(self.videos, index, self.identity)
            if entry_path(self.cache_dir, key).is_file():
                return index, key, None, None
            return index, key, self.videos.load(index, random_start=False), None
        except Exception as err:  # reported by precompute, which goes on with the other clips
            return index, key, None, f"{type(err).__name__}: {err}"


@torch.no_grad()
def precompute(
    cfg: DataConfig,
    vae: VideoAutoencoderKL | IdentityAutoencoder,
    text_encoder: T5TextEncoder,
    cache_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    failures_path: str | Path | None = None,
    progress: bool = True,
) -> PrecomputeReport:
    """Encodes this rank's clips of ``cfg.manifest`` into the cache; resumable (existing entries are skipped).

    Args:
        cfg: the data config of the stage (its buckets, frames and interval decide the keys;
            ``cfg.num_workers`` processes hash and decode clips while this one encodes).
        vae: the autoencoder training will use (eval mode).
        text_encoder: the text encoder training will use.
        cache_dir: cache root (usually ``cfg.cache_dir``); shared by all ranks.
        rank: this process's rank; it handles the clips with ``index % world_size == rank``.
        world_size: number of processes splitting the work.
        batch_size: clips of one bucket encoded together.
        device: where inputs go (default: the text encoder's device; put the VAE there too).
        dtype: dtype of the stored tensors (bfloat16 halves the size; float32 keeps them exact).
        failures_path: JSONL file for broken clips.
        progress: show a progress bar.
    Returns:
        a :class:`PrecomputeReport` for this rank.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    videos = VideoDataset(cfg, failures_path=failures_path, log_skipped=rank == 0)
    identity = encoder_identity(vae, text_encoder)
    device = text_encoder.device if device is None else torch.device(device)
    mine = list(range(rank, len(videos), world_size))
    report = PrecomputeReport(total=len(mine))
    pending: dict[BucketKey, list[tuple[int, str, torch.Tensor]]] = {}

    def flush(bucket: BucketKey) -> None:
        group = pending.pop(bucket, [])
        if not group:
            return
        x = torch.stack([video for _, _, video in group]).to(device)  # (B, 3, T, H, W)
        # The mode, not a sample: a cached sample would freeze one noise draw for every epoch.
        latents = vae.encode(x, sample_posterior=False)  # (B, C, T, h, w)
        text = text_encoder.encode([videos.texts[i] for i, _, _ in group], device=device)  # y (B, 1, L, D)
        for b, (index, key, _) in enumerate(group):
            tensors = {
                "latent": latents[b].to("cpu", dtype).contiguous(),  # (C, T, h, w)
                "y": text["y"][b].to("cpu", dtype).contiguous(),  # (1, L, D)
                "mask": text["mask"][b].to("cpu", torch.long).contiguous(),  # (L,)
            }
            with atomic_write_path(entry_path(cache_dir, key)) as tmp:
                save_file(tensors, str(tmp), metadata={"path": videos.paths[index], "text": videos.texts[index]})
            report.written += 1

    # Hashing, the existence check and decoding run in DataLoader workers (cfg.num_workers): decoding
    # is the slow part on a GPU machine, and the encoders stay in this process.
    jobs = DataLoader(_PrecomputeJobs(videos, mine, identity, Path(cache_dir)), batch_size=None,
                      num_workers=cfg.num_workers, collate_fn=_identity_collate)
    for index, key, video, error in tqdm(jobs, total=len(mine), desc=f"precompute rank {rank}", disable=not progress):
        if error is not None:  # broken clip: record it and go on with the others
            failure = dict(path=videos.paths[index], error=error)
            report.failed.append(failure)
            record_failure(failures_path, id=videos.ids[index], index=index, **failure)
        elif video is None:
            report.existing += 1
        else:
            bucket = videos.bucket_keys[index]
            pending.setdefault(bucket, []).append((index, key, video))
            if len(pending[bucket]) >= batch_size:
                flush(bucket)
    for bucket in list(pending):
        flush(bucket)
    return report


class CachedLatentDataset(Dataset):
    """The clips of a manifest as cached latents and text embeddings (written by :func:`precompute`).

    Indices and buckets are those of :class:`VideoDataset` for the same config, so the sampler, its saved
    position and the failures file behave the same. An entry that is not in the cache under the current
    key (never computed, or computed from other content, caption, encoders or shape) gives None and a
    failures line; it is never replaced by an entry made from something else.

    Args:
        cfg: the data config; ``cfg.cache_dir`` is the cache root.
        identity: the encoders training runs with (:func:`encoder_identity`).
        failures_path: JSONL file for missing entries and skipped clips.
        seed: unused by the cache (fixed windows); accepted so both datasets build alike.
        log_skipped: record rows left out at build time (True on one rank only).

    Items: ``dict(latent=(C, T, h, w), y=(1, L, D), mask=(L,), text=str, index=int, bucket=(T, H, W))``.
    """

    def __init__(
        self,
        cfg: DataConfig,
        identity: EncoderIdentity,
        failures_path: str | Path | None = None,
        seed: int = 0,
        log_skipped: bool = True,
    ):
        if cfg.cache_dir is None:
            raise ValueError("CachedLatentDataset needs data.cache_dir")
        self.cache_dir = Path(cfg.cache_dir)
        self.identity = identity
        self.failures_path = failures_path
        self.videos = VideoDataset(cfg, failures_path=failures_path, seed=seed, log_skipped=log_skipped)
        self.bucket_keys = self.videos.bucket_keys

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path = self.videos.paths[index]
        try:
            key = _key_of(self.videos, index, self.identity)
            entry = entry_path(self.cache_dir, key)
            if not entry.is_file():
                raise FileNotFoundError(
                    f"no cache entry {entry.name} for this clip with the current encoders/config "
                    f"(not precomputed, or the cache is stale): run precompute"
                )
            tensors = load_file(str(entry))
        except Exception as err:  # missing or unreadable entry: recorded, never fatal, never a stale substitute
            record_failure(self.failures_path, path=path, id=self.videos.ids[index], index=index,
                           error=f"{type(err).__name__}: {err}")
            return None
        return dict(latent=tensors["latent"], y=tensors["y"], mask=tensors["mask"], text=self.videos.texts[index],
                    index=index, bucket=self.bucket_keys[index])
