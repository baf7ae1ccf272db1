"""Precomputed VAE latents and text embeddings, under keys that make a stale entry unreachable.

The VAE and the text encoder are frozen, and at 256px they cost more per step than STDiT-S itself, so
encoding each clip once and training from the cache is the cheap path (Open-Sora's own latent
pre-extraction). The danger of any cache is using an entry made from other inputs; here every entry's
name is the sha256 of everything it depends on:

- the clip file's content (sha256 of its bytes, not its path or mtime) and its caption text; for a
  reference row of the split stage (``path`` is the source video) the source's sha256 plus the row's span
  (start/end frame, source and clip fps: ``SourceSpan.cache_part``), so two shots of one source never share
  an entry;
- the encoders' identity: class, config, and a fingerprint of every weight tensor (and, for the text
  encoder, its tokenizer and ``max_length``) — see :func:`encoder_identity`. The dtype the encoders
  compute in is not part of it (see :func:`fingerprint_module`); it is recorded next to each entry;
- the sample shape and sampling: bucket (T, H, W), ``frame_interval``, ``short_clips``, and
  :data:`CACHE_FORMAT` (bumped when the preprocessing code changes meaning).

Change any of them and the key changes, so the old entry is simply never found: :class:`CachedLatentDataset`
reports the clip as missing (recorded in the failures file) instead of returning stale latents. When a
process's first :data:`MAX_LEADING_MISSES` lookups all miss, the cache was not made for this run (other
encoders, other stage shape) and it stops with :class:`CacheMismatchError`, which compares what the cache
recorded with what training asks for, instead of spending an epoch on misses.

Reading a warm cache never opens a clip. The content hash comes from the manifest's ``sha256`` column
(the split stage writes it with the clip), else from ``cache_dir/content_sha256.jsonl``, where a clip is
hashed once and recorded under (path, size, mtime); a clip deleted after precompute keeps the hash last
recorded for its path, as a manifest column would. :func:`precompute` checks those hashes against the
bytes of every clip it encodes, so an entry's key always names the bytes that were encoded.

Cached samples use a fixed temporal window (frames ``0, k, 2k, ...``) and the posterior *mode* of the VAE,
so they lose the random window start and posterior sampling of live encoding (the usual cost of a cache).

Layout: ``cache_dir/<key[:2]>/<key>.safetensors`` with tensors ``latent`` (C, T, h, w), ``y`` (1, L, D)
and ``mask`` (L,); ``cache_dir/precompute.jsonl`` has one line per precompute run (encoder identities,
compute and stored dtypes, sample shape), ``cache_dir/content_sha256.jsonl`` the recorded clip hashes.
Writes are atomic (temp file + rename), so :func:`precompute` can be killed and re-run: it skips entries
that exist. Ranks split the clips (``index % world_size == rank``). The command is ``tools/precompute.py``.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from opensora.data.buckets import BucketKey
from opensora.data.dataset import DataConfig, Holdout, VideoDataset, record_failure
from opensora.models.text_encoder import T5TextEncoder
from opensora.models.autoencoders import AutoencoderShape
from opensora.models.vae import IdentityAutoencoder, VideoAutoencoder, VideoAutoencoderKL
from opensora.utils import append_jsonl, atomic_write_path, file_sha256, read_jsonl

CACHE_FORMAT = 1
"""Version of what an entry means (preprocessing, window choice, tensor layout); part of every key."""

RUNS_FILE = "precompute.jsonl"
"""In the cache root: one line per :func:`precompute` run (identities, dtypes, sample shape)."""

CONTENT_HASHES_FILE = "content_sha256.jsonl"
"""In the cache root: ``{path, size, mtime_ns, sha256}`` of clips hashed for manifests without ``sha256``."""

MAX_LEADING_MISSES = 64
"""Lookups that may all miss, before the first hit, before a process stops with :class:`CacheMismatchError`.
A cache made for the run misses only its broken clips; one made with other encoders or for another shape
misses everything. 64 in a row from a cache that is 90% full happens once in a thousand runs."""


@dataclass(frozen=True)
class EncoderIdentity:
    """Fingerprints (sha256 hex) of the VAE and the text encoder that a cache entry was made with.

    ``vae_dtype`` / ``text_encoder_dtype`` say what the encoders compute in; they are for information
    (recorded with entries, shown in errors) and take no part in equality or in cache keys.
    """

    vae: str
    text_encoder: str
    vae_dtype: str = field(default="", compare=False)
    text_encoder_dtype: str = field(default="", compare=False)


class CacheMismatchError(RuntimeError):
    """The latent cache holds no entry for the samples of this run (other encoders or another sample shape)."""


# Config keys that record how a model was loaded, not what it computes: the dtype is the compute precision
# (see fingerprint_module), the others are bookkeeping (``_name_or_path``, library versions).
_LOAD_KEYS = ("transformers_version", "torch_dtype", "dtype")


def _public_config(config: Any) -> dict[str, Any]:
    """A config dict without bookkeeping keys that do not change what the model is (see ``_LOAD_KEYS``)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_") and k not in _LOAD_KEYS}


def _dtype_name(module: nn.Module) -> str:
    """The dtype a module computes in (its first floating-point parameter's), e.g. "bfloat16"; "none" if none."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return str(tensor.dtype).removeprefix("torch.")
    return "none"


def fingerprint_module(module: nn.Module, config: dict[str, Any]) -> str:
    """sha256 of a module's class, ``config`` and every tensor of its state dict (names, shapes, values).

    Hashing the weights (not the path they came from) means re-saved or moved weights keep their identity
    and fine-tuned weights get a new one. Cost: one pass over the weights (about 5 s for T5-XXL's 9.5 GB).

    Floating-point tensors are hashed in one canonical form, rounded to bfloat16, whatever dtype they were
    loaded in: the identity names the pretrained encoder, not the precision it runs in. The trainer builds
    the encoders in bf16 on CUDA while a precompute job may build them in fp32, and the same checkpoint
    must find the same entries. Rounding down to bf16 (not widening to fp32) is what makes them agree: a
    bf16 copy of fp32 weights is those weights rounded, so bf16 is the only form the two share exactly
    (and a bf16 checkpoint read in fp32 rounds back to itself). The price: two checkpoints that differ
    only below bf16 precision (about 3 significant digits) in every weight share an identity; their
    outputs differ by less than bf16 computation itself changes them. An fp16 copy is not promised the
    same identity (rounding to fp16 then bf16 can differ from rounding once). What the entries were
    computed in is recorded next to them (``EncoderIdentity.vae_dtype`` / ``text_encoder_dtype``).

    Args:
        module: the encoder.
        config: whatever else decides its outputs (JSON-serialisable; non-JSON values are turned into str).
    """
    digest = hashlib.sha256()
    head = {"class": f"{type(module).__module__}.{type(module).__qualname__}", "config": config}
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach()
        kind = str(tensor.dtype)
        if tensor.is_floating_point():
            # Rounded where it lives (the same round-to-nearest-even on any device), then half the bytes move.
            tensor, kind = tensor.to(torch.bfloat16), "float"
        tensor = tensor.to("cpu").contiguous()
        digest.update(f"{name}|{kind}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def vae_identity(vae: VideoAutoencoder) -> str:
    """Fingerprint of an autoencoder from ``opensora.models.vae`` (config, normalisation, weights).

    The per-frame ``VideoAutoencoderKL`` and the identity hash exactly what they hashed before 3D VAEs came, so
    existing caches stay valid. Any other autoencoder (the 3D ones) also hashes ``describe()`` (class, factors,
    frame rule, channels, normalisation) and its diffusers config, so a cache made with one autoencoder is never
    read with another, even one whose weights happened to hash alike, and whether it encodes in spatial tiles
    (blended tiles give other latents). ``micro_batch_size`` is left out: the posterior mode that is cached
    does not depend on it.
    """
    config: dict[str, Any] = {"out_channels": vae.out_channels, "patch_size": list(vae.patch_size)}
    if isinstance(vae, VideoAutoencoderKL):
        config.update(scaling_factor=vae.scaling_factor, module=_public_config(vae.module.config))
    elif not isinstance(vae, IdentityAutoencoder):
        config.update(autoencoder=vae.describe(), module=_public_config(vae.module.config),
                      tiling=bool(getattr(vae.module, "use_tiling", False)))
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


def encoder_identity(vae: VideoAutoencoder, text_encoder: T5TextEncoder) -> EncoderIdentity:
    """The :class:`EncoderIdentity` of loaded encoders (hashes their weights once; notes their compute dtypes)."""
    return EncoderIdentity(vae=vae_identity(vae), text_encoder=text_encoder_identity(text_encoder),
                           vae_dtype=_dtype_name(vae), text_encoder_dtype=_dtype_name(text_encoder.model))


def known_content_hashes(videos: VideoDataset, cache_dir: str | Path) -> list[str | None]:
    """Per index, the clip's sha256 as far as it is known without reading the clip; None where it is not.

    The manifest's ``sha256`` column wins; otherwise ``cache_dir/content_sha256.jsonl`` (read only if some
    row needs it) by (path, size, mtime_ns), which costs one ``stat`` per clip; for a clip that no longer
    exists, the hash last recorded for its path (its entries can still be found; decoding it could not).
    """
    hashes = list(videos.sha256s)
    if all(h is not None for h in hashes):
        return hashes
    by_stat: dict[tuple[str, int, int], str] = {}
    by_path: dict[str, str] = {}
    for rec in read_jsonl(Path(cache_dir) / CONTENT_HASHES_FILE):
        try:
            path, sha = str(rec["path"]), str(rec["sha256"])
            by_stat[(path, int(rec["size"]), int(rec["mtime_ns"]))] = sha
        except (KeyError, TypeError, ValueError):  # a line of another shape: not ours to trust
            continue
        by_path[path] = sha  # later lines are later hashes of the same path
    for index, sha in enumerate(hashes):
        if sha is not None:
            continue
        path = os.path.abspath(videos.paths[index])
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            hashes[index] = by_path.get(path)
            continue
        hashes[index] = by_stat.get((path, stat.st_size, stat.st_mtime_ns))
    return hashes


def hash_and_record(path: str | Path, cache_dir: str | Path) -> str:
    """Reads a clip once for its sha256 and records it in ``cache_dir/content_sha256.jsonl`` for later runs."""
    path = os.path.abspath(path)
    stat = os.stat(path)  # before reading: a file changed meanwhile gets a new mtime, so a later lookup misses
    sha = file_sha256(path)
    append_jsonl(Path(cache_dir) / CONTENT_HASHES_FILE,
                 dict(path=path, size=stat.st_size, mtime_ns=stat.st_mtime_ns, sha256=sha))
    return sha


def cache_key(
    content_sha256: str,
    text: str,
    identity: EncoderIdentity,
    bucket: BucketKey,
    frame_interval: int,
    short_clips: str,
    span: dict[str, Any] | None = None,
) -> str:
    """The name of a cache entry: sha256 over everything the cached tensors depend on.

    Args:
        content_sha256: sha256 of the clip file.
        text: the caption that was embedded.
        identity: the encoders.
        bucket: (T, H, W) the clip was resized/cropped to.
        frame_interval: frame step of the window.
        short_clips: "skip" or "pad" (padding changes the frames of short clips).
        span: for a reference row, its span in the file (``SourceSpan.cache_part()``); None for a clip file
            (its keys stay what they were before reference rows existed).
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
    if span is not None:
        parts["span"] = span
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def entry_path(cache_dir: str | Path, key: str) -> Path:
    """Where the entry ``key`` lives (two hex digits of fan-out keep directories small)."""
    return Path(cache_dir) / key[:2] / f"{key}.safetensors"


def _key(videos: VideoDataset, index: int, content_sha256: str, identity: EncoderIdentity) -> str:
    cfg = videos.cfg
    span = videos.spans[index]
    return cache_key(content_sha256, videos.texts[index], identity, videos.bucket_keys[index], cfg.frame_interval,
                     cfg.short_clips, None if span is None else span.cache_part())


def _shape(cfg: DataConfig) -> dict[str, Any]:
    """The data-config fields that enter the keys (besides content and captions), as recorded per run."""
    return dict(num_frames=cfg.num_frames, image_size=list(cfg.image_size), buckets=cfg.buckets,
                frame_interval=cfg.frame_interval, short_clips=cfg.short_clips)


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

    def __init__(self, videos: VideoDataset, indices: list[int], hashes: list[str | None],
                 identity: EncoderIdentity, cache_dir: Path):
        self.videos, self.indices, self.hashes = videos, indices, hashes
        self.identity, self.cache_dir = identity, cache_dir
        self._hashed: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, in this process

    def __len__(self) -> int:
        return len(self.indices)

    def _file_sha256(self, path: str) -> str:
        """sha256 of ``path``, once per file version in this process: the reference rows of one source (one per
        shot) all check the same file."""
        stat = os.stat(path)
        version = (path, stat.st_size, stat.st_mtime_ns)
        if version not in self._hashed:
            self._hashed[version] = file_sha256(path)
        return self._hashed[version]

    def __getitem__(self, k: int) -> tuple[int, str, torch.Tensor | None, str | None]:
        index, key = self.indices[k], ""
        path = self.videos.paths[index]
        try:
            sha = self.hashes[index]
            fresh = sha is None
            if fresh:
                sha = hash_and_record(path, self.cache_dir)
            key = _key(self.videos, index, sha, self.identity)
            if entry_path(self.cache_dir, key).is_file():
                return index, key, None, None
            # The key is about to be bound to what is decoded now: a recorded hash (the manifest's, trusted
            # when reading) must be that of these bytes. One more read of a clip that is being decoded anyway.
            if not fresh and (actual := self._file_sha256(path)) != sha:
                raise ValueError(
                    f"the manifest's sha256 {sha[:12]}... is not that of the file ({actual[:12]}...): the clip "
                    "changed after the manifest was written; rewrite the manifest row (or clear its sha256)"
                )
            return index, key, self.videos.load(index, random_start=False), None
        except Exception as err:  # reported by precompute, which goes on with the other clips
            return index, key, None, f"{type(err).__name__}: {err}"


@torch.no_grad()
def precompute(
    cfg: DataConfig,
    vae: VideoAutoencoder,
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
        dtype: dtype of the stored tensors (bfloat16 halves the size; float32 keeps them exact). The
            encoders compute in their own dtype (build them in bf16 or fp32); either finds the same keys.
        failures_path: JSONL file for broken clips.
        progress: show a progress bar.
    Returns:
        a :class:`PrecomputeReport` for this rank.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    videos = VideoDataset(cfg, failures_path=failures_path, log_skipped=rank == 0, autoencoder=vae.shape)
    identity = encoder_identity(vae, text_encoder)
    device = text_encoder.device if device is None else torch.device(device)
    mine = list(range(rank, len(videos), world_size))
    report = PrecomputeReport(total=len(mine))
    stored = str(dtype).removeprefix("torch.")
    if rank == 0:  # what the cache was made with, for the error of a run that finds none of its entries
        append_jsonl(Path(cache_dir) / RUNS_FILE, dict(
            time=time.strftime("%Y-%m-%d %H:%M:%S"), format=CACHE_FORMAT, vae=identity.vae,
            text_encoder=identity.text_encoder, vae_dtype=identity.vae_dtype,
            text_encoder_dtype=identity.text_encoder_dtype, stored_dtype=stored, manifest=str(cfg.manifest),
            world_size=world_size, **_shape(cfg)))
    metadata = dict(vae=identity.vae, text_encoder=identity.text_encoder, vae_dtype=identity.vae_dtype,
                    text_encoder_dtype=identity.text_encoder_dtype, stored_dtype=stored)
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
                save_file(tensors, str(tmp), metadata={**metadata, "path": videos.paths[index],
                                                       "text": videos.texts[index]})
            report.written += 1

    # Hashing, the existence check and decoding run in DataLoader workers (cfg.num_workers): decoding
    # is the slow part on a GPU machine, and the encoders stay in this process.
    # Hashes known without reading the clips (manifest column, recorded hashes); workers hash the rest.
    hashes = known_content_hashes(videos, cache_dir)
    jobs = DataLoader(_PrecomputeJobs(videos, mine, hashes, identity, Path(cache_dir)), batch_size=None,
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
    failures line; it is never replaced by an entry made from something else. If the first
    ``max_leading_misses`` lookups of a process (a DataLoader worker counts its own) all miss, it raises
    :class:`CacheMismatchError` saying what the cache was made with and what this run asks for.

    No clip file is opened when the content hashes are known (see :func:`known_content_hashes`); a clip
    whose hash is unknown is hashed once and recorded for later runs.

    Args:
        cfg: the data config; ``cfg.cache_dir`` is the cache root.
        identity: the encoders training runs with (:func:`encoder_identity`).
        failures_path: JSONL file for missing entries and skipped clips.
        seed: unused by the cache (fixed windows); accepted so both datasets build alike.
        log_skipped: record rows left out at build time (True on one rank only).
        max_leading_misses: see above (default :data:`MAX_LEADING_MISSES`; 0 never raises).
        autoencoder: the autoencoder's shape; frames or sizes it cannot take are an error (as in VideoDataset).
        holdout, held_out: which rows (as in VideoDataset): training leaves the held-out clips out, validation
            keeps only them.

    Items: ``dict(latent=(C, T, h, w), y=(1, L, D), mask=(L,), text=str, index=int, bucket=(T, H, W))``.
    """

    def __init__(
        self,
        cfg: DataConfig,
        identity: EncoderIdentity,
        failures_path: str | Path | None = None,
        seed: int = 0,
        log_skipped: bool = True,
        max_leading_misses: int | None = None,
        autoencoder: AutoencoderShape | None = None,
        holdout: Holdout | None = None,
        held_out: bool = False,
    ):
        if cfg.cache_dir is None:
            raise ValueError("CachedLatentDataset needs data.cache_dir")
        self.cache_dir = Path(cfg.cache_dir)
        self.identity = identity
        self.failures_path = failures_path
        self.videos = VideoDataset(cfg, failures_path=failures_path, seed=seed, log_skipped=log_skipped,
                                   autoencoder=autoencoder, holdout=holdout, held_out=held_out)
        self.bucket_keys = self.videos.bucket_keys
        self.units = self.videos.units  # the validator spreads its clips over source videos
        self.sha256s = known_content_hashes(self.videos, self.cache_dir)
        self.max_leading_misses = MAX_LEADING_MISSES if max_leading_misses is None else int(max_leading_misses)
        # Per process (each worker has its copy): lookups so far, and whether any found its entry.
        self._misses, self._hit = 0, False

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path = self.videos.paths[index]
        try:
            sha = self.sha256s[index] or hash_and_record(path, self.cache_dir)
            key = _key(self.videos, index, sha, self.identity)
            entry = entry_path(self.cache_dir, key)
            if not entry.is_file():
                raise FileNotFoundError(
                    f"no cache entry {entry.name} for this clip with the current encoders/config "
                    f"(not precomputed, or the cache is stale): run precompute"
                )
            tensors = load_file(str(entry))
        except Exception as err:  # missing or unreadable entry: recorded, never fatal, never a stale substitute
            error = f"{type(err).__name__}: {err}"
            record_failure(self.failures_path, path=path, id=self.videos.ids[index], index=index, error=error)
            self._misses += 1
            if not self._hit and 0 < self.max_leading_misses <= self._misses:
                raise CacheMismatchError(self.mismatch_message(error)) from None
            return None
        self._hit = True
        return dict(latent=tensors["latent"], y=tensors["y"], mask=tensors["mask"], text=self.videos.texts[index],
                    index=index, bucket=self.bucket_keys[index])

    def mismatch_message(self, last_error: str = "") -> str:
        """Why this run finds nothing: the cache's recorded encoders and shapes against the current ones."""
        cur, shape = self.identity, _shape(self.videos.cfg)
        lines = [f"the first {self._misses} samples of this process found no entry in the latent cache "
                 f"{self.cache_dir}: it was not made for this run."]
        runs = read_jsonl(self.cache_dir / RUNS_FILE)
        if not runs:
            lines.append(f"It has no record of a precompute run ({RUNS_FILE} is missing): it is empty, or it "
                         "was filled by an older version.")
        elif all((r.get("vae"), r.get("text_encoder")) != (cur.vae, cur.text_encoder) for r in runs):
            lines.append("Its entries were made with other encoders:")
            seen = set()
            for r in runs:
                made = (r.get("vae"), r.get("text_encoder"), r.get("vae_dtype"), r.get("text_encoder_dtype"))
                if made not in seen:
                    seen.add(made)
                    lines.append(f"  cache:    {_describe(*made)} (precompute of {r.get('time', '?')})")
            lines.append(f"  training: {_describe(cur.vae, cur.text_encoder, cur.vae_dtype, cur.text_encoder_dtype)}")
            vaes = {r.get("vae") for r in runs}
            tes = {r.get("text_encoder") for r in runs}
            parts = [name for name, ok in (("VAE", cur.vae in vaes), ("text encoder", cur.text_encoder in tes))
                     if not ok]
            verb = "differ" if len(parts) > 1 else "differs"
            lines.append(f"The {' and the '.join(parts)} {verb}: other weights, config, tokenizer or max_length "
                         "(the compute dtype does not count).")
        else:
            same = [r for r in runs if (r.get("vae"), r.get("text_encoder")) == (cur.vae, cur.text_encoder)]
            made = [_shape_text(r) for r in same]
            lines.append("The encoders match, so the keys differ in sample shape, clip content or captions:")
            for text in dict.fromkeys(made):
                lines.append(f"  cache:    {text}")
            lines.append(f"  training: {_shape_text({**shape, 'manifest': str(self.videos.cfg.manifest)})}")
        if last_error:
            lines.append(f"Last error: {last_error}")
        lines.append("Fill it for this stage with its encoders: python tools/precompute.py --config RECIPE "
                     "--stage NAME (docs/training.md), or set data.cache_dir to the cache made for them.")
        return "\n".join(lines)


def _describe(vae: Any, text_encoder: Any, vae_dtype: Any, text_encoder_dtype: Any) -> str:
    return (f"vae {str(vae)[:12]} ({vae_dtype or '?'}), text_encoder {str(text_encoder)[:12]} "
            f"({text_encoder_dtype or '?'})")


def _shape_text(record: dict[str, Any]) -> str:
    keys = ("num_frames", "image_size", "buckets", "frame_interval", "short_clips", "manifest")
    return ", ".join(f"{k}={record.get(k)}" for k in keys)
