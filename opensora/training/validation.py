"""Validation while training: the held-out loss at fixed timesteps, sample videos, and metrics on them.

The training loss of a diffusion model is dominated by the random timestep of each step and barely moves;
a person paying for a multi-day run needs to see whether the model improves. Every ``validation.every``
steps (and at the stage's start with ``at_start``) the trainer calls :meth:`Validator.run`, which

1. swaps the EMA weights into the model (``use_ema``, the weights the stage exports), puts it in eval mode
   (no caption dropout) and forks the RNG, so the training weights, RNG streams and data order afterwards are
   exactly what they were: a run with validation produces bit-identical training weights to one without;
2. measures the **held-out loss**: the training objective's loss on ``num_clips`` held-out clips at each of the
   fixed ``timesteps``, with noise seeded per (validation seed, clip, timestep), so two validation points differ
   only because the model changed. The clips are split into batches once, the same on every world size, and the
   batches are dealt to the data-parallel ranks (every rank runs the same number of forwards: FSDP2 and sequence
   parallelism need that; a rank without a batch of its own re-runs one at weight 0); sums are all-reduced.
   Reported per timestep, per bucket (T x H x W) and as the mean;
3. samples the ``prompts`` through ``Bundle.generate`` (the sampler of ``tools/sample.py``) on every rank (the
   sharded model's forward is collective) and rank 0 writes ``<stage>/validation/step-NNNNNNNN/NNN_<slug>.mp4``
   and ``grid.png``;
4. computes the configured ``metrics`` on the samples: ``colour_motion`` (the shapes check of
   ``opensora.eval``, no model) and ``clip_score`` (CLIP from a local path, ``opensora.eval.clip_score``);
5. logs one ``val_*`` row to ``metrics.jsonl`` / TensorBoard / W&B (with the grid and videos), records the pass's
   wall time in the cost ledger as validation time, and writes ``result.json`` last: a pass whose
   ``result.json`` exists is never run again, so a resumed run re-runs no finished point and misses none (the
   trainer calls :meth:`run` at its resume step too).

Held-out clips come from ``validation.manifest`` (a separate manifest) or are held out of the training
manifest a whole source video at a time (``holdout_fraction``, ``holdout_ids``: :class:`~opensora.data.dataset.Holdout`:
split's consecutive pieces of one shot never land on both sides); every stage's training data leaves out the union
of all stages' held-out clips, so no stage trains on what another validates on.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from opensora.data.dataset import DataConfig, Holdout, collate
from opensora.utils import atomic_write_path

METRICS = ("loss", "colour_motion", "clip_score")
RESULT_FILE = "result.json"


@dataclass
class ValidationConfig:
    """The ``validation`` section of a recipe (shared; ``stages[i].validation`` overrides fields per stage)."""

    every: int = 0  # steps between validation passes; 0 = off
    at_start: bool = True  # with every > 0: also validate the stage's starting weights (step 0: the curve's origin)
    manifest: str | None = None  # held-out clips in a manifest of their own; or hold clips out of the training one:
    holdout_fraction: float = 0.0  # share of the training manifest's source videos held out (all their clips), by hash
    holdout_ids: list[str] = field(default_factory=list)  # clip ids held out, each with every clip of its source video
    num_clips: int = 16  # held-out clips the loss is measured on (one per source video in turn: spread_over_units)
    batch_size: int = 4  # held-out clips per forward on each rank
    timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])  # fractions of the schedule
    prompts: list[str] = field(default_factory=list)  # sampled at every pass (empty: no samples)
    prompt_file: str | None = None  # one prompt per line (blank lines and # comments skipped), after `prompts`
    num_frames: int | None = None  # samples' frames; None: the stage's
    image_size: list[int] | None = None  # samples' [H, W]; None: the stage's
    sample_steps: int = 30  # sampling steps
    cfg_scale: float = 4.0  # classifier-free guidance scale
    seed: int = 0  # noise of the loss and of the samples
    fps: float = 8.0  # frame rate written into the sample mp4s
    metrics: list[str] = field(default_factory=lambda: ["loss"])  # of METRICS; colour_motion and clip_score need prompts
    clip_model: str | None = None  # local CLIP dir (transformers CLIPModel + processor) for clip_score
    use_ema: bool = True  # validate the EMA weights (what the stage exports); False: the raw training weights

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"validation.every must be >= 0 (0 = off), got {self.every}")
        for name in ("num_clips", "batch_size", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"validation.{name} must be >= 1, got {getattr(self, name)}")
        Holdout(self.holdout_fraction)  # raises on a fraction outside [0, 1)
        if self.manifest is not None and (self.holdout_fraction > 0 or self.holdout_ids):
            raise ValueError("validation: give either manifest (separate held-out clips) or holdout_fraction / "
                             "holdout_ids (held out of the training manifest), not both")
        if not self.timesteps or any(not 0.0 <= t <= 1.0 for t in self.timesteps):
            raise ValueError(f"validation.timesteps must be fractions of the schedule in [0, 1], got "
                             f"{list(self.timesteps)}")
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"validation.metrics: unknown {unknown}; known: {list(METRICS)}")
        if any(not p.strip() for p in self.prompts):
            raise ValueError("validation.prompts: a prompt is empty")
        if self.image_size is not None and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ValueError(f"validation.image_size must be [H, W], got {list(self.image_size)}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"validation.num_frames must be >= 1, got {self.num_frames}")
        if "clip_score" in self.metrics and not self.clip_model:
            raise ValueError("validation.metrics has clip_score but validation.clip_model (a local CLIP dir) is not set")
        if self.cfg_scale < 1.0 or self.fps <= 0:
            raise ValueError("validation: need cfg_scale >= 1 and fps > 0")
        if self.enabled:
            if "loss" in self.metrics and self.manifest is None and not self.holdout:
                raise ValueError("validation.metrics has loss but no held-out clips are given: set validation.manifest, "
                                 "or holdout_fraction / holdout_ids (clips held out of the training manifest)")
            needs_prompts = [m for m in self.metrics if m != "loss"]
            if needs_prompts and not (self.prompts or self.prompt_file):
                raise ValueError(f"validation.metrics {needs_prompts} score sample videos: set validation.prompts "
                                 "or validation.prompt_file")
            if "loss" not in self.metrics and not (self.prompts or self.prompt_file):
                raise ValueError("validation is on (every > 0) but measures nothing: add loss to validation.metrics "
                                 "or give prompts to sample")

    @property
    def enabled(self) -> bool:
        return self.every > 0

    @property
    def holdout(self) -> Holdout:
        """The clips this config holds out of the training manifest (empty with a separate manifest)."""
        return Holdout(self.holdout_fraction, frozenset(str(i) for i in self.holdout_ids))

    def all_prompts(self) -> list[str]:
        """``prompts`` then the prompt file's lines; a missing file raises FileNotFoundError naming it."""
        prompts = list(self.prompts)
        if self.prompt_file:
            path = Path(self.prompt_file)
            if not path.is_file():
                raise FileNotFoundError(f"validation.prompt_file not found: {path}")
            from opensora.sampling import read_prompt_file

            prompts += read_prompt_file(path)
        return prompts

    def due(self, step: int, last_step: int | None = None) -> bool:
        """Whether ``step`` (optimizer steps done) is a validation point: a multiple of ``every``, the stage's
        ``last_step`` (its final weights are always measured), or 0 with ``at_start``."""
        if not self.enabled:
            return False
        if step == 0:
            return self.at_start
        return step % self.every == 0 or step == last_step


def union_holdout(configs: list[ValidationConfig]) -> Holdout | None:
    """The clips every stage's training leaves out: the union of all stages' holdouts (None when there are none).

    Hash-chosen shares nest (a larger fraction holds out a superset), so the largest fraction covers them all.
    """
    fraction = max((c.holdout_fraction for c in configs), default=0.0)
    ids = frozenset(str(i) for c in configs for i in c.holdout_ids)
    holdout = Holdout(fraction, ids)
    return holdout if holdout else None


def validation_data_config(cfg: ValidationConfig, data: DataConfig) -> DataConfig:
    """The held-out clips' data config: the stage's, with the validation manifest if any and fixed windows."""
    return replace(data, manifest=cfg.manifest or data.manifest, random_start=False, num_workers=0)


def schedule_timesteps(diffusion: str, fractions: list[float], num_timesteps: int) -> list[Any]:
    """The objective's timestep for each fraction: rectified flow's t itself, IDDPM's nearest integer step."""
    if diffusion == "rflow":
        return [float(f) for f in fractions]
    return [int(round(f * (num_timesteps - 1))) for f in fractions]


def noise_seed(seed: int, clip: int, k: int) -> int:
    """Seed of the noise of held-out clip ``clip`` at timestep ``k``: independent of batching and world size."""
    return ((seed * 1_000_003 + clip) * 1_000_033 + k) % (2**63 - 1)


def spread_over_units(units: list[str], n: int) -> list[int]:
    """The first ``n`` indices taking one clip of each source video in turn (the first clip of every video in manifest
    order, then every second clip, ...): a whole video is held out with all its pieces, and the loss of the first
    ``n`` clips in manifest order would be measured on a few videos only."""
    turns: dict[str, int] = {}
    order = []
    for i, unit in enumerate(units):
        turns[unit] = turns.get(unit, -1) + 1
        order.append((turns[unit], i))
    return [i for _, i in sorted(order)[:n]]


def plan_batches(bucket_keys: list, indices: list[int], batch_size: int) -> list[list[int]]:
    """Held-out indices in batches of one bucket each, at most ``batch_size`` long, in a fixed order."""
    by_bucket: dict[Any, list[int]] = {}
    for i in indices:
        by_bucket.setdefault(tuple(bucket_keys[i]), []).append(i)
    return [idx[j:j + batch_size] for idx in by_bucket.values() for j in range(0, len(idx), batch_size)]


@dataclass
class ValidationResult:
    """One pass: the ``val_*`` numbers, where its files are, and how long it took."""

    step: int
    row: dict  # ``val_*`` metrics (and ``step``), as logged
    sample_paths: list[Path] = field(default_factory=list)
    grid: Path | None = None


class Validator:
    """Runs validation passes for one stage (see the module docstring). Collective: every rank calls :meth:`run`.

    Args:
        cfg: the stage's validation config.
        out_dir: ``<stage>/validation``.
        diffusion_name: "iddpm" or "rflow" (how the fixed timesteps are expressed).
        diffusion: the training objective (``training_losses``).
        engine: the stage's engine (autocast; the forward of the parallelized model).
        model: the unwrapped model (its parameters are what the EMA averages; ``Bundle.generate`` calls it).
        ema: the stage's EMA, or None.
        dataset: the held-out clips (a ``VideoDataset`` or ``CachedLatentDataset`` built with fixed windows), or
            None when the loss is not measured.
        encode: ``(batch, generator) -> (x, y, mask)``: the training step's encoder of a batch (``TrainStep.encode``).
        sampler: ``(prompts) -> (B, 3, T, H, W)`` videos in [-1, 1] (the trainer wraps ``Bundle.generate``).
        model_fn: what the held-out loss calls (the training step's ``model_fn``: the family's forward around the
            parallelized model); None: ``engine.model`` (STDiT).
        dp_rank, dp_size, sp_rank: this rank's place (the ranks of a sequence-parallel group compute the same).
        is_main: rank 0 writes.
        scorers: metric name -> ``(uint8 videos, prompts) -> dict of val_* numbers``, for the sample metrics.
        agree_group: under sequence parallelism, the gloo group of this rank's SP group: its ranks keep only the
            clips every one of them loaded (``opensora.data.sampler.agree_on_batch``), as training does.
    """

    def __init__(self, cfg: ValidationConfig, out_dir: Path, diffusion_name: str, diffusion, engine, model, ema,
                 dataset, encode: Callable, sampler: Callable | None, *, model_fn: Callable | None = None,
                 dp_rank: int = 0, dp_size: int = 1,
                 sp_rank: int = 0, is_main: bool = True, scorers: dict[str, Callable] | None = None,
                 agree_group=None):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.diffusion, self.engine, self.model, self.ema = diffusion, engine, model, ema
        self.dataset, self.encode, self.sampler = dataset, encode, sampler
        self.model_fn = model_fn
        self.dp_rank, self.dp_size, self.sp_rank, self.is_main = dp_rank, dp_size, sp_rank, is_main
        self.scorers = scorers or {}
        self.agree_group = agree_group
        self._spare: dict | None = None  # the last batch that loaded: a failed batch's stand-in at weight 0
        self.prompts = cfg.all_prompts()
        self.timesteps = schedule_timesteps(diffusion_name, list(cfg.timesteps), diffusion.num_timesteps)
        self.batches: list[list[int]] = []
        if dataset is not None and "loss" in cfg.metrics:
            if len(dataset) == 0:
                raise ValueError("validation: no held-out clips to measure the loss on (the held-out set is empty: "
                                 "check validation.manifest / holdout_fraction / holdout_ids)")
            indices = spread_over_units(dataset.units, cfg.num_clips)
            self.batches = plan_batches(dataset.bucket_keys, indices, cfg.batch_size)

    def step_dir(self, step: int) -> Path:
        return self.out_dir / f"step-{step:08d}"

    def finished(self, step: int) -> bool:
        """Whether the pass of ``step`` finished before (decided on rank 0 and agreed by all ranks)."""
        done = float(self.is_main and (self.step_dir(step) / RESULT_FILE).is_file())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([done], device=self.engine.dist.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            done = flag.item()
        return bool(done)

    @torch.no_grad()
    def run(self, step: int) -> ValidationResult | None:
        """Validates the current weights as step ``step`` unless that pass finished before (then None)."""
        if self.finished(step):
            return None
        start = time.perf_counter()
        was_training = self.model.training
        use_ema = self.cfg.use_ema and self.ema is not None
        row: dict[str, Any] = {"step": step}
        videos = None
        devices = [self.engine.dist.device] if self.engine.dist.device.type == "cuda" else []
        self.engine.reshard()  # the swap below changes the sharded parameters: no gathered copy may outlive it
        with torch.random.fork_rng(devices=devices), (self.ema.swapped_in() if use_ema else contextlib.nullcontext()):
            self.model.eval()
            try:
                if self.batches:
                    row.update(self._loss())
                if self.prompts and self.sampler is not None:
                    with self.engine.autocast():
                        videos = self.sampler(self.prompts)
            finally:
                self.model.train(was_training)
                self.engine.reshard()  # else training's next forward would use the gathered validation weights
        result = ValidationResult(step, row)
        if videos is not None and self.is_main:
            result.sample_paths, result.grid = self._write_samples(step, videos, row)
        row["val_time_s"] = time.perf_counter() - start
        row["val_weights"] = "ema" if use_ema else "model"
        if self.is_main:
            with atomic_write_path(self.step_dir(step) / RESULT_FILE) as tmp:
                tmp.parent.mkdir(parents=True, exist_ok=True)
                tmp.write_text(json.dumps(row, indent=1))
        return result

    @torch.no_grad()
    def _loss(self) -> dict[str, float]:
        """Held-out loss per timestep, per bucket and mean (all ranks' sums, one all-reduce)."""
        cfg, K = self.cfg, len(self.timesteps)
        buckets = sorted({tuple(self.dataset.bucket_keys[b[0]]) for b in self.batches})
        sums = torch.zeros(K, len(buckets), dtype=torch.float64)
        counts = torch.zeros(len(buckets), dtype=torch.float64)
        device = self.engine.dist.device
        rounds = math.ceil(len(self.batches) / self.dp_size)
        for r in range(rounds):
            j = r * self.dp_size + self.dp_rank
            own = j < len(self.batches)
            indices = self.batches[j if own else 0]  # a rank without a batch repeats one at weight 0
            weight = float(own and self.sp_rank == 0)  # an SP group's ranks compute the same numbers: count once
            batch = self._load(indices)
            if batch is None:  # every clip of it failed (recorded): run a stand-in, so the forwards stay in step
                batch, weight = self._stand_in(), 0.0
            self._spare = batch
            clips = batch["index"].tolist()
            b = buckets.index(tuple(self.dataset.bucket_keys[clips[0]]))
            gen = torch.Generator(device).manual_seed(noise_seed(cfg.seed, clips[0], K))
            x, y, mask = self.encode(batch, gen)
            for k, t in enumerate(self.timesteps):
                noise = torch.stack([
                    torch.randn(x.shape[1:], generator=torch.Generator(device).manual_seed(noise_seed(cfg.seed, c, k)),
                                device=device, dtype=x.dtype)
                    for c in clips
                ])
                t_batch = torch.full((x.shape[0],), t, device=device,
                                     dtype=torch.float32 if isinstance(t, float) else torch.long)
                with self.engine.autocast():
                    model_fn = self.engine.model if self.model_fn is None else self.model_fn
                    terms = self.diffusion.training_losses(model_fn, x, dict(y=y, mask=mask), t=t_batch,
                                                           noise=noise)
                sums[k, b] += weight * terms["loss"].double().sum().cpu()
            counts[b] += weight * len(clips)  # broken clips (left out by collate) are not counted
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.cat([sums.flatten(), counts]).to(device)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            packed = packed.cpu()
            sums, counts = packed[: sums.numel()].view_as(sums), packed[sums.numel():]
        per_t = sums.sum(1) / counts.sum().clamp(min=1)
        row = {"val_loss": float(per_t.mean()), "val_clips": int(counts.sum())}
        for f, value in zip(cfg.timesteps, per_t.tolist()):
            row[f"val_loss_t{f:g}"] = value
        if len(buckets) > 1:
            for b, key in enumerate(buckets):
                row[f"val_loss_{'x'.join(str(v) for v in key)}"] = float(sums[:, b].mean() / counts[b].clamp(min=1))
        return row

    def _load(self, indices: list[int]) -> dict | None:
        """The batch of ``indices`` without the clips that failed to load (on any rank of the SP group)."""
        batch = collate([self.dataset[i] for i in indices])
        if self.agree_group is not None:
            from opensora.data.sampler import agree_on_batch

            batch = agree_on_batch(batch, self.agree_group, capacity=self.cfg.batch_size)
        return batch

    def _stand_in(self) -> dict:
        """A batch to run at weight 0 in place of one that failed: every rank must run the same number of forwards
        (FSDP2 gathers parameters in each, sequence parallelism exchanges activations). The last batch that loaded,
        else the first planned batch that loads; raises if none of the held-out clips loads."""
        if self._spare is not None:
            return self._spare
        for indices in self.batches:
            batch = self._load(indices)
            if batch is not None:
                return batch
        raise RuntimeError("validation: none of the held-out clips could be loaded (see the stage's "
                           "validation/failures.jsonl)")

    def _write_samples(self, step: int, videos: torch.Tensor, row: dict) -> tuple[list[Path], Path]:
        """Rank 0: the mp4s, the grid (labelled with what was measured) and the sample metrics into ``row``."""
        from opensora.data.video_io import tensor_to_frames
        from opensora.sampling import frame_grid, write_prompts_file, write_samples

        out = self.step_dir(step)
        paths = write_samples(out, videos, self.prompts, fps=self.cfg.fps)
        write_prompts_file(out, list(zip(paths, self.prompts)))
        frames = [tensor_to_frames(v) for v in videos]
        labels = list(self.prompts)
        for name in self.cfg.metrics:
            if name in self.scorers:
                scores = self.scorers[name](frames, self.prompts)
                labels = [f"{label} | {s}" for label, s in zip(labels, scores.pop("_labels", [""] * len(labels)))]
                row.update(scores)
        grid = frame_grid(frames, labels, out / "grid.png")
        return paths, grid


def colour_motion_scorer(frames: list, prompts: list[str]) -> dict:
    """``val_colour`` / ``val_direction``: shares of samples whose object has the prompt's colour / direction."""
    from opensora.eval import check_videos

    report = check_videos(frames, prompts)
    labels = [f"{a.colour} {'ok' if c else 'MISS'}, {a.direction} {'ok' if d else 'MISS'}"
              for a, c, d in zip(report.analyses, report.colour_ok, report.direction_ok)]
    return {"val_colour": report.colour_share, "val_direction": report.direction_share, "_labels": labels}
