"""A distributed, deterministic, resumable batch sampler over shape buckets, and the loader that tracks its position.

Order of one epoch (a pure function of ``seed``, ``epoch`` and the global batch size G = per-rank batch x
world size): the indices of each bucket are shuffled; each bucket is cut into *global batches* of G
samples; the global batches of all buckets are shuffled together. Rank r takes the slice
``[r * b, (r + 1) * b)`` of every global batch. So all ranks train on the same shape at every step
(balanced step times; sequence-parallel groups see one shape), and each global batch is one bucket.

The position is the number of global batches consumed in the epoch, saved together with G. Resuming
with the same G (any split into ranks x per-rank batch, e.g. 8 x 4 -> 4 x 8) replays exactly the global
batches the interrupted run would have seen. Resuming with a different G re-cuts the *remaining* samples
of the epoch (each bucket in its shuffled order) into batches of the new size: the same samples are seen,
grouped differently (up to G-1 samples per bucket are dropped by ``drop_last`` as in any epoch).
Each such change is kept in the state (``segments``), so a run resumed several times stays exact.

The position must count batches the *trainer* consumed, not batches the DataLoader prefetched; use
:class:`ResumableDataLoader` (it calls :meth:`DistributedBucketSampler.advance` as it hands out a batch)
or call ``advance`` yourself after each step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Protocol, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from opensora.data.buckets import BucketKey

if TYPE_CHECKING:
    from opensora.data.dataset import LoadFailureWindow


class BucketedDataset(Protocol):
    """What the sampler needs from a dataset: the bucket of every index, known without decoding."""

    bucket_keys: Sequence[BucketKey]


class DistributedBucketSampler(Sampler[list[int]]):
    """Yields this rank's index lists for the rest of the current epoch; each global batch is one bucket.

    Args:
        dataset: anything with ``bucket_keys`` (one (T, H, W) per index), e.g. ``VideoDataset``.
        batch_size: samples per rank per step.
        rank: this data-parallel rank.
        world_size: number of data-parallel ranks (with sequence parallelism: the data-parallel size).
        seed: shuffling seed; the same (seed, epoch) gives the same order on every run.
        drop_last: drop each bucket's last incomplete global batch (True), or fill it up by repeating that
            bucket's samples from its start (False) so that every rank still gets ``batch_size`` samples.
    """

    def __init__(
        self,
        dataset: BucketedDataset,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.drop_last = drop_last
        self.global_batch_size = batch_size * world_size
        keys = [tuple(int(v) for v in key) for key in dataset.bucket_keys]
        self.num_samples = len(keys)
        groups: dict[BucketKey, list[int]] = {}
        for index, key in enumerate(keys):
            groups.setdefault(key, []).append(index)  # type: ignore[arg-type]
        # Sorted keys: the shuffle consumes the generator bucket by bucket, so the order must be fixed.
        self.buckets: dict[BucketKey, np.ndarray] = {k: np.asarray(groups[k], dtype=np.int64) for k in sorted(groups)}
        self.epoch = 0
        # [[G, global batches consumed], ...]: one entry per global batch size used in this epoch.
        self._segments: list[list[int]] = [[self.global_batch_size, 0]]
        self._plan_cache: tuple[Any, list[np.ndarray]] | None = None
        if not self._plan():
            sizes = {"x".join(map(str, k)): len(v) for k, v in self.buckets.items()}
            raise ValueError(
                f"no complete global batch of {self.global_batch_size} samples (batch_size {batch_size} x "
                f"world_size {world_size}) in any bucket: bucket sizes {sizes}; lower the batch size or add data"
            )

    # -- the order ---------------------------------------------------------------------------------------
    def _chunk(self, remaining: dict[BucketKey, np.ndarray], size: int, rng: np.random.Generator) -> list[np.ndarray]:
        """Cuts each bucket into global batches of ``size`` and shuffles the batches of all buckets together."""
        batches: list[np.ndarray] = []
        for order in remaining.values():
            full = len(order) // size
            batches += [order[i * size : (i + 1) * size] for i in range(full)]
            tail = order[full * size :]
            if len(tail) and not self.drop_last:
                # np.resize repeats cyclically: the tail is filled with the bucket's first samples.
                batches.append(np.concatenate([tail, np.resize(order, size - len(tail))]))
        return [batches[i] for i in rng.permutation(len(batches))]

    def _plan(self) -> list[np.ndarray]:
        """The global batches of the current segment of the current epoch (cached)."""
        token = (self.epoch, tuple(tuple(s) for s in self._segments[:-1]), self._segments[-1][0])
        if self._plan_cache is not None and self._plan_cache[0] == token:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        remaining = {key: rng.permutation(indices) for key, indices in self.buckets.items()}
        for segment, (size, consumed) in enumerate(self._segments):
            plan = self._chunk(remaining, size, np.random.default_rng([self.seed, self.epoch, segment + 1]))
            if segment == len(self._segments) - 1:
                break
            # An earlier global batch size: drop what was consumed under it, re-cut the rest.
            seen = np.concatenate(plan[:consumed]) if consumed else np.empty(0, dtype=np.int64)
            remaining = {key: order[~np.isin(order, seen)] for key, order in remaining.items()}
        self._plan_cache = (token, plan)
        return plan

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches from the current position to the end of the epoch (does not move the position)."""
        plan, start = self._plan(), self._segments[-1][1]
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for global_batch in plan[start:]:
            yield global_batch[lo:hi].tolist()

    def __len__(self) -> int:
        """Batches left in the current epoch (the same on every rank)."""
        return len(self._plan()) - self._segments[-1][1]

    # -- the position ------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Starts ``epoch`` from its beginning (as ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)
        self._segments = [[self.global_batch_size, 0]]

    def advance(self, num_batches: int = 1) -> None:
        """Records that the trainer consumed ``num_batches`` more batches; rolls over to the next epoch at its end.

        Args:
            num_batches: steps taken since the last call (each step consumes one batch on every rank).
        """
        left = len(self)
        if not 0 <= num_batches <= left:
            raise ValueError(f"cannot advance {num_batches} batches: {left} left in epoch {self.epoch}")
        self._segments[-1][1] += num_batches
        if num_batches == left:
            self.set_epoch(self.epoch + 1)

    def samples_consumed(self) -> int:
        """Global samples consumed in the current epoch."""
        return sum(size * consumed for size, consumed in self._segments)

    def state_dict(self) -> dict[str, Any]:
        """The position: ``epoch``, ``segments`` ([[global batch size, batches consumed], ...]), and checks."""
        return {
            "epoch": self.epoch,
            "segments": [list(s) for s in self._segments],
            "samples_consumed": self.samples_consumed(),
            "seed": self.seed,
            "num_samples": self.num_samples,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a position saved by :meth:`state_dict`, possibly from another world size or batch size.

        Args:
            state: the saved dict. Its ``seed``, ``num_samples`` and ``drop_last`` must match this sampler:
                a different data set or order cannot be resumed exactly, so it is an error, not a guess.
        """
        for name in ("seed", "num_samples", "drop_last"):
            if state[name] != getattr(self, name):
                raise ValueError(f"cannot resume the data order: saved {name}={state[name]!r} but this run "
                                 f"has {getattr(self, name)!r}")
        segments = [[int(size), int(consumed)] for size, consumed in state["segments"]]
        self.epoch = int(state["epoch"])
        if segments[-1][0] != self.global_batch_size:
            segments.append([self.global_batch_size, 0])
        self._segments = segments
        self._plan_cache = None
        left = len(self._plan()) - segments[-1][1]
        if left < 0:
            raise ValueError(f"saved data position {segments} is past the end of epoch {self.epoch}")
        if left == 0:
            self.set_epoch(self.epoch + 1)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`DistributedBucketSampler` that keeps the sampler's position exact.

    Each ``iter(loader)`` runs the rest of the current epoch. The sampler is advanced when a batch is
    handed to the caller, so that ``sampler.state_dict()`` taken after a training step counts that step's
    batch and not the batches the workers prefetched. A batch whose every sample was broken (the collate
    function returned None) is skipped: nothing is yielded for it, but it counts as consumed. With a
    ``step_group``, that global batch is skipped on every rank (see below). A full epoch in which every batch
    was broken is an error (a trainer would otherwise loop forever).

    Construct it like a DataLoader with ``batch_sampler=DistributedBucketSampler(...)``; the dataset may
    have ``set_epoch(epoch)`` (random temporal crops), which is called before each epoch's batches are sent
    to the workers.

    Args:
        agree_group: the ranks that must train on the same batch (a sequence-parallel group, as a gloo
            process group: the agreement is on host data and must not synchronise a GPU stream). Each of
            them loads the batch itself, and a clip that fails on one of them (a transient read error)
            would leave that rank with a smaller batch, and the group's all-to-alls with mismatched shapes:
            a hang. With a group, every batch is cut to the samples that every rank of the group loaded
            (:func:`agree_on_batch`). None: each rank keeps what it loaded.
        step_group: all ranks that take optimizer steps together (the world, as a gloo group), when there are
            several data-parallel ranks. Each rank loads its own slice of a global batch; a rank whose whole slice
            failed to load skipped it alone, and from then on the ranks trained on different global batches (a
            checkpoint then kept one rank's position). With a group, every rank learns, with one all-reduce of
            three integers per batch on the host, whether any rank's slice was broken, and all of them skip that
            global batch (the other ranks' loaded samples of it count as consumed). The same all-reduce sums the
            samples requested and failed for ``failures``, so every rank stops at the same batch. None: one rank.
        failures: counts the samples that failed to load and stops the run past a share
            (:class:`~opensora.data.dataset.LoadFailureWindow`); None: not counted.
        *args, **kwargs: as ``torch.utils.data.DataLoader``.
    """

    def __init__(self, *args: Any, agree_group: Any = None, step_group: Any = None,
                 failures: LoadFailureWindow | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.agree_group = agree_group
        self.step_group = step_group
        self.failures = failures
        # Under a step group, one rank of each SP group counts its samples (its group's ranks hold the same batch).
        self._counts = agree_group is None or dist.get_rank(agree_group) == 0

    def __iter__(self) -> Iterator[Any]:
        sampler = self.batch_sampler
        if not isinstance(sampler, DistributedBucketSampler):
            raise TypeError("ResumableDataLoader needs batch_sampler=DistributedBucketSampler(...)")
        epoch, fresh = sampler.epoch, sampler.samples_consumed() == 0
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)  # before super().__iter__(): workers copy the dataset when they start
        yielded = 0
        for batch in super().__iter__():
            sampler.advance(1)
            if self.agree_group is not None:
                batch = agree_on_batch(batch, self.agree_group, sampler.batch_size)
            batch = self._tally(batch, sampler.batch_size)
            if batch is None:
                continue
            yielded += 1
            yield batch
        if fresh and yielded == 0:
            raise RuntimeError(
                f"every batch of epoch {epoch} was broken (no sample could be loaded); see the failures file"
            )

    def _tally(self, batch: dict[str, Any] | None, capacity: int) -> dict[str, Any] | None:
        """``batch``, or None where it must be skipped (on every rank of ``step_group``); counts its failed loads."""
        loaded = 0 if batch is None else len(batch["index"])
        requested, failed, broken = capacity, capacity - loaded, int(batch is None)
        if self.step_group is not None:
            counted = int(self._counts)
            counts = torch.tensor([requested * counted, failed * counted, broken], dtype=torch.long)
            dist.all_reduce(counts, group=self.step_group)  # gloo: host integers, no device sync
            requested, failed, broken = counts.tolist()
        if self.failures is not None:
            self.failures.add(requested, failed)
        return None if broken else batch



def agree_on_batch(batch: dict[str, Any] | None, group: Any, capacity: int) -> dict[str, Any] | None:
    """The part of ``batch`` that every rank of ``group`` loaded; None if no sample was loaded by all.

    The ranks of ``group`` draw the same indices from their samplers; what differs is which clips failed
    to load on which rank. One all-gather of the loaded indices (at most ``capacity`` each) per batch, on
    every rank of the group, whatever it loaded (a rank whose whole batch failed still takes part), so the
    ranks stay in step. Collective over ``group``.

    Args:
        batch: a collated batch with an ``index`` (B,) tensor, or None when every sample failed here.
        group: the process group of the ranks that must agree (gloo: the indices stay on the host).
        capacity: the per-rank batch size of the sampler (no batch holds more samples).
    Returns:
        ``batch`` itself when every rank loaded all of it, else a new batch with only the common samples
        (tensors and lists cut alike, the order kept), or None when no sample is common.
    """
    loaded = torch.full((capacity,), -1, dtype=torch.long)
    if batch is not None:
        index = batch["index"]
        loaded[: len(index)] = index
    everyone = [torch.empty_like(loaded) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, loaded, group=group)
    common = set(everyone[0].tolist())
    for other in everyone[1:]:
        common &= set(other.tolist())
    common.discard(-1)
    if batch is None or not common:
        return None
    keep = [k for k, i in enumerate(batch["index"].tolist()) if i in common]
    if len(keep) == len(batch["index"]):
        return batch
    rows = torch.tensor(keep, dtype=torch.long)
    out: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            out[name] = value.index_select(0, rows)
        elif isinstance(value, list):
            out[name] = [value[k] for k in keep]
        else:  # the batch's one bucket
            out[name] = value
    return out
