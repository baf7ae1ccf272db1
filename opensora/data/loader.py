"""The training loader of one data-parallel rank: decoded clips (``VideoDataset``) or cached latents
(``CachedLatentDataset``), bucketed batches, and a sampler whose state is the data position.

It lives apart from ``dataset.py`` because it chooses between the two datasets, and the cache builds on the
video dataset: here both are plain imports, with no cycle between ``dataset`` and ``latent_cache``.

Example::

    loader, sampler = build_dataloader(cfg, batch_size=4, rank=0, world_size=1, seed=0,
                                       failures_path="run/stage1/failures.jsonl")
    for batch in loader:            # the rest of one epoch; iterate again for the next
        batch["video"]              # (B, 3, T, H, W) float in [-1, 1], one bucket per batch
    state = sampler.state_dict()    # save with the checkpoint; sampler.load_state_dict(state) resumes exactly
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from opensora.data.dataset import DataConfig, Holdout, LoadFailureWindow, VideoDataset, check_captions, collate
from opensora.data.latent_cache import CachedLatentDataset, EncoderIdentity
from opensora.data.sampler import DistributedBucketSampler, ResumableDataLoader
from opensora.models.autoencoders import AutoencoderShape


def _worker_init(_: int) -> None:
    # Each worker decodes one clip at a time; torch's intra-op threads would only oversubscribe the CPUs.
    torch.set_num_threads(1)


def build_dataloader(
    cfg: DataConfig,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    failures_path: str | Path | None = None,
    encoder_identity: EncoderIdentity | None = None,
    drop_last: bool = True,
    pin_memory: bool = False,
    agree_group=None,
    step_group=None,
    autoencoder: AutoencoderShape | None = None,
    holdout: Holdout | None = None,
) -> tuple[ResumableDataLoader, DistributedBucketSampler]:
    """The training loader of one data-parallel rank and its sampler (whose state is the data position).

    Args:
        cfg: the data config. With ``cfg.cache_dir`` set, batches hold cached ``latent``/``y``/``mask``
            instead of ``video`` (see ``opensora.data.latent_cache``).
        batch_size: samples per rank per step (global batch / world_size).
        rank: data-parallel rank.
        world_size: data-parallel size.
        seed: data order and window-start seed.
        failures_path: JSONL file for broken and skipped clips (the run dir's ``<stage>/failures.jsonl``).
        encoder_identity: ``EncoderIdentity`` of the current VAE and text encoder; required with
            ``cfg.cache_dir`` (it is part of every cache key, so latents of other encoders are never used).
        drop_last: see :class:`DistributedBucketSampler`.
        pin_memory: pin batches for faster host-to-GPU copies.
        agree_group: with sequence parallelism, the gloo group of this rank's SP group: its ranks load the
            same batches and must train on the same samples even when a clip fails on one of them only
            (see :class:`ResumableDataLoader`). None without SP.
        step_group: with several data-parallel ranks, a gloo group of all ranks: a global batch broken on one
            rank is skipped by all, and failed loads are counted over all (see :class:`ResumableDataLoader`).
        autoencoder: the shape of the autoencoder the samples are for (the trainer passes the recipe's): a
            ``num_frames`` or size it cannot take fails here, naming the nearest valid frame counts.
        holdout: clips kept out of training for validation (``opensora.training.validation``); None: none.
    Returns:
        ``(loader, sampler)``: each ``for batch in loader`` runs the rest of the current epoch; save
        ``sampler.state_dict()`` with checkpoints and ``sampler.load_state_dict`` it on resume.
    Raises:
        DataError: more empty captions than ``cfg.max_empty_caption_share`` (here), or, while iterating, more
            failed loads than ``cfg.max_failed_share`` of a ``cfg.failure_window`` (``LoadFailureWindow``).
    """
    if cfg.cache_dir is not None:
        if encoder_identity is None:
            raise ValueError(
                f"data.cache_dir={cfg.cache_dir!r} needs the encoder identity (opensora.data.latent_cache."
                f"encoder_identity(vae, text_encoder)) to pick entries made by the same encoders"
            )
        dataset: Dataset = CachedLatentDataset(
            cfg, encoder_identity, failures_path=failures_path, seed=seed, log_skipped=rank == 0,
            autoencoder=autoencoder, holdout=holdout,
        )
    else:
        dataset = VideoDataset(cfg, failures_path=failures_path, seed=seed, log_skipped=rank == 0,
                               autoencoder=autoencoder, holdout=holdout)
    videos = dataset.videos if isinstance(dataset, CachedLatentDataset) else dataset
    check_captions(videos.texts, cfg, warn=rank == 0)  # every rank raises alike; one warns
    sampler = DistributedBucketSampler(dataset, batch_size, rank=rank, world_size=world_size, seed=seed,
                                       drop_last=drop_last)  # type: ignore[arg-type]
    workers = cfg.num_workers
    loader = ResumableDataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        # Workers live for the whole stage: restarting them every epoch re-imports and re-copies the dataset
        # (seconds to minutes for a large manifest, while the GPUs wait). The datasets keep their epoch in
        # shared memory, so set_epoch still reaches the running workers.
        persistent_workers=workers > 0,
        agree_group=agree_group,
        step_group=step_group,
        failures=LoadFailureWindow(cfg, len(dataset), failures_path),  # type: ignore[arg-type]
    )
    return loader, sampler
