"""The trainer of one stage: named steps (``forward_backward_step``, ``train_step``, ``train``, ``state_dict``,
``close``), each short, in the manner of torchtitan's ``Trainer``.

What one optimizer step does:

1. ``accum`` micro-batches, each: encode the video with the frozen VAE and the caption with the frozen text
   encoder (or take both from the latent cache), draw timesteps and noise, and back-propagate the diffusion
   loss of ``opensora.diffusion`` through the parallelized model, called through its family's ``model_fn``
   (caption dropout for classifier-free guidance happens inside STDiT's caption embedder while it is in training
   mode; for the other families the step replaces captions by the encoded empty prompt) — the work of
   ``opensora.training.step.TrainStep``, which ``tools/benchmark.py`` times;
2. clip the gradient norm and AdamW step (through the engine), LR schedule step, fp32 EMA update; a step whose
   loss or gradient norm is not finite changes none of them (``opensora/training/nonfinite.py``);
3. bookkeeping in Python numbers only (samples, tokens, FLOPs for the ledger); the loss and grad-norm
   tensors stay on the device until the next log step, the only place the loop synchronises
   (``opensora.training.metrics.MetricsLogger`` reduces and writes them).

The trainer never names a model class: the init bundle's ``family`` (``opensora.models.families``) loads the
model and says how to call it, what its tokens and FLOPs are, which modules are its blocks (checkpointing, compile,
FSDP2) and whether it takes sequence parallelism.

Randomness: before every micro-step the global generators and the diffusion generator are seeded from
(recipe seed, step, micro-step, data-parallel rank). A resumed run therefore draws exactly the numbers the
uninterrupted run drew, on any world size, and the ranks of one sequence-parallel group draw the same
ones. The data order is the sampler's (saved position); the dataset's random crops depend on (seed, epoch, index).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from opensora.accounting import Ledger, check_budget
from opensora.bundle import (
    Bundle, BundleConfig, check_compatible, load_bundle_config, load_bundle_model, load_encoders, resolve_path,
    write_bundle,
)
from opensora.checkpoint import CheckpointManager, FnState, RNGState, engine_state, export_bundle
from opensora.config import ConfigError, to_dict
from opensora.data.loader import build_dataloader
from opensora.diffusion import build_scheduler
from opensora.distributed import DistInfo, ParallelDims, build_engine
from opensora.distributed.engines import nonfinite_flag
from opensora.distributed.parallel import new_sp_group, uses_mixed_precision
from opensora.models.families import get_family
from opensora.models.lora import ADAPTERS_NAME, apply_lora, load_adapters, save_adapters, save_diffusers_lora
from opensora.training.config import (
    RecipeConfig,
    StageConfig,
    check_recipe_autoencoder,
    recipe_autoencoder,
    recipe_holdout,
    stage_data_config,
    stage_model_config,
    stage_validation_config,
)
from opensora.training.ema import EMA
from opensora.training.init import load_init_checkpoint
from opensora.training.metrics import MetricsLogger
from opensora.training.nonfinite import NonFiniteError, NonFiniteTracker
from opensora.training.optim import apply_schedule_config, build_lr_scheduler, build_optimizer, set_schedule_position
from opensora.training.step import TrainStep, training_model_fn
from opensora.training.validation import Validator, colour_motion_scorer, validation_data_config

# Ledger end reasons that stop the recipe early (the stage can be resumed later).
EARLY_STOPS = ("sigterm", "budget", "max_steps")


@dataclass
class StopFlag:
    """Set asynchronously (a signal handler) to ask the trainer to checkpoint and stop."""

    reason: str | None = None


def merge_lora_state(state: dict, scale: float) -> dict:
    """The state dict of the base model with peft's LoRA layers merged: ``X.base_layer.weight`` + ``scale`` *
    ``X.lora_B.default.weight`` @ ``X.lora_A.default.weight`` becomes ``X.weight`` (``X.base_layer.bias``, ``X.bias``),
    computed in fp32 as peft's ``merge`` does; the adapters' keys are dropped."""
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        prefix, name = key.split(".base_layer.")
        if name == "weight":
            a, b = state[f"{prefix}.lora_A.default.weight"], state[f"{prefix}.lora_B.default.weight"]
            value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
        merged[f"{prefix}.{name}"] = value
    return merged


class Trainer:
    """Trains one stage of a recipe from ``init_dir`` (a pipeline bundle) and exports ``<stage>/export``.

    Args:
        recipe: the whole recipe (shared sections: data, parallel, optim, ema, logging, accounting, budget).
        stage: the stage to train.
        run_dir: OUTPUT_DIR; the stage writes ``run_dir/<stage.name>/`` and appends to ``run_dir/ledger.jsonl``.
        init_dir: the bundle the stage starts from (model weights, VAE, text encoder).
        dist_info: from ``opensora.distributed.init_distributed``.
        stop: shared flag a signal handler sets (reason "sigterm").
        max_steps: stop with a checkpoint once the stage has reached this step (None: the stage's ``steps``).
        started: ``time.monotonic()`` when the process (or this stage, after an earlier one in the same process)
            started: the ledger bills from then. None: now.
        adapters: for a stage with ``init.lora: continue``, the previous stage's export, whose EMA adapters
            (``lora_adapters.safetensors``) this stage trains on over ``init_dir`` (that stage's base);
            ``opensora.training.recipe.adapters_of``. None otherwise.
    """

    def __init__(self, recipe: RecipeConfig, stage: StageConfig, run_dir: Path, init_dir: Path, dist_info: DistInfo,
                 stop: StopFlag | None = None, max_steps: int | None = None, started: float | None = None,
                 adapters: Path | None = None):
        if (adapters is not None) != (stage.init.lora == "continue"):
            raise ValueError(f"stage '{stage.name}': adapters to continue are given with init.lora "
                             f"{stage.init.lora!r}: pass them exactly when it is 'continue' (recipe.adapters_of)")
        self.adapters = adapters
        self.recipe, self.stage, self.dist = recipe, stage, dist_info
        self.run_dir, self.init_dir = Path(run_dir), Path(init_dir)
        self.stage_dir = self.run_dir / stage.name
        self.stop = stop or StopFlag()
        self.max_steps = max_steps
        self.device = dist_info.device
        self.is_main = dist_info.rank == 0
        self.step = 0
        self.dims = ParallelDims.build(recipe.parallel, dist_info)
        null_text = None
        self.micro_batch, self.accum = self._batch_split()
        self.autoencoder = recipe_autoencoder(recipe)  # the loaded VAE is checked against it; latents are counted by it

        # 0. The cost ledger first: start-up (loading the model, encoders, data and checkpoint) is paid time.
        self.ckpt = CheckpointManager(self.stage_dir / "checkpoints", keep=recipe.logging.keep_checkpoints)
        acc = recipe.accounting
        self.ledger = Ledger(self.run_dir, stage.name, num_gpus=dist_info.world_size, gpu_type=acc.gpu_type,
                             price_per_gpu_hour=acc.price_per_gpu_hour, heartbeat_s=acc.heartbeat_s,
                             enabled=self.is_main)
        self.ledger.start_segment(self.ckpt.latest_step() or 0,
                                  started=time.monotonic() if started is None else started)
        try:
            # 1. Model (fp32 master weights), encoders and the objective.
            bundle = load_bundle_config(self.init_dir)
            self.family = get_family(bundle.family)
            self.bundle_config = BundleConfig(family=bundle.family, vae=bundle.vae, text_encoder=bundle.text_encoder,
                                              diffusion=recipe.diffusion)
            model = load_bundle_model(self.init_dir, bundle)
            self._model_class = type(model)  # before FSDP2 swaps it for its FSDP subclass (the export's skeleton)
            self.model_config = stage_model_config(stage, self.family.config_of(model), self.family)
            if self.model_config != self.family.config_of(model):  # STDiT's model_overrides
                model = type(model).from_pretrained(resolve_path(self.init_dir, bundle.model_dir),
                                                    **stage.model_overrides)
            if stage.init.checkpoint is not None:
                if self.family.name != "stdit":
                    raise ConfigError(f"stage '{stage.name}': init.checkpoint converts Open-Sora 1.0 / PixArt-α "
                                      f"weights into an STDiT; {stage.model} starts from its bundle")
                load_init_checkpoint(model, stage.init.checkpoint, stage.init.checkpoint_format)
            if stage.lora is not None:
                model = self._apply_lora(model)
            self.diffusion = build_scheduler(recipe.diffusion, **self._objective_options())
            self.vae = self.text_encoder = self.loader = self.sampler = self._batches = None
            self.validation = stage_validation_config(recipe, stage)
            self._identity = None
            # Under SP, the gloo group in which the loaders of one SP group agree on the clips they loaded.
            self._agree_group = new_sp_group(recipe.parallel, dist_info, backend="gloo") if self.dims.sp_size > 1 else None
            # With several data-parallel ranks, the gloo group (all ranks) in which the loaders agree to skip a global
            # batch broken on any rank and count failed loads (opensora.data.sampler.ResumableDataLoader).
            self._step_group = dist.new_group(backend="gloo") if self.dims.dp_size > 1 else None
            if stage.steps > 0:  # a 0-step stage (a converted checkpoint) only exports: no encoders, no data
                self.vae, self.text_encoder = self._build_encoders(bundle, model)
                null_text = self._null_text(model)  # before a latent cache frees the text encoder

                # 2. Data: this data-parallel rank's loader; its sampler's state is the data position.
                data_cfg = stage_data_config(recipe, stage)
                identity = None
                if data_cfg.cache_dir is not None:
                    from opensora.data.latent_cache import encoder_identity

                    identity = self._identity = encoder_identity(self.vae, self.text_encoder)
                    self.vae = self.text_encoder = None  # training reads cached latents: free the encoders' memory
                self.loader, self.sampler = build_dataloader(
                    data_cfg, self.micro_batch, rank=self.dims.dp_rank, world_size=self.dims.dp_size, seed=recipe.seed,
                    failures_path=self.stage_dir / "failures.jsonl", encoder_identity=identity,
                    pin_memory=self.device.type == "cuda",
                    agree_group=self._agree_group, step_group=self._step_group,
                    autoencoder=self.autoencoder, holdout=recipe_holdout(recipe),  # no stage trains on validation clips
                )

            # 3. Parallelize; the optimizer, schedule and EMA follow the (possibly re-sharded) parameters.
            self.engine = build_engine(recipe.parallel, dist_info)
            self.engine.trainable_only = stage.lora is not None  # checkpoints: the adapters, not the frozen base
            optimizer = build_optimizer(model, recipe.optim, stage.lr, self.device)  # the trainable parameters
            try:
                self.model_fn, self.optimizer = self.engine.prepare(model, optimizer, family=self.family)
            except ValueError as err:  # e.g. sequence parallelism for a family that does not take it
                raise ConfigError(f"stage '{stage.name}': parallel: {err}") from err
            self.model = self.engine.unwrap()
            self.model.train()
            self.lr_scheduler = build_lr_scheduler(self.engine.schedule_optimizer, stage)
            self.steps = TrainStep(self.engine, self.diffusion, vae=self.vae, text_encoder=self.text_encoder,
                                   accum=self.accum, seed=recipe.seed, dp_rank=self.dims.dp_rank,
                                   grad_clip=recipe.optim.grad_clip, conditioning=stage.conditioning or recipe.conditioning,
                                   model_fn=training_model_fn(self.family, self.engine),
                                   caption_dropout=recipe.caption_dropout if stage.steps > 0 else 0.0,
                                   null_text=null_text if stage.steps > 0 else None)
            self.ema = EMA(self.model, recipe.ema.decay, recipe.ema.warmup, masters=self.engine.master_shards(),
                           trainable_only=stage.lora is not None)
            self.nonfinite = NonFiniteTracker(self.device, recipe.optim.max_nonfinite_steps)
            self.validator = None
            if self.validation.enabled and stage.steps > 0:
                try:
                    self.validator = self._build_validator()
                except (FileNotFoundError, ValueError) as err:  # a missing manifest / prompt file, no held-out clip
                    raise ConfigError(f"stage '{stage.name}': validation: {err}") from err

        except BaseException:  # a start-up that dies is billed up to here
            self.ledger.end_segment("error", self.ckpt.latest_step() or 0)
            raise

        # 4. Logs.
        self.metrics = MetricsLogger(self.stage_dir, self.run_dir.name, stage.name, stage.steps, recipe.logging,
                                     to_dict(recipe), self.ledger, dist_info.world_size, self.device, self.is_main)
        self._flops_cache: dict[tuple[int, int, int], float] = {}
        self._budget_message: str | None = None

    # -- set-up helpers ------------------------------------------------------------------------------------
    def _batch_split(self) -> tuple[int, int]:
        """(samples per rank per forward, micro-steps per optimizer step) from the stage's global batch."""
        stage, dp = self.stage, self.dims.dp_size
        micro = stage.micro_batch_size or stage.batch_size // dp
        if micro < 1 or stage.batch_size % (micro * dp):
            raise ConfigError(
                f"stage '{stage.name}': batch_size {stage.batch_size} must be a multiple of micro_batch_size "
                f"{micro} x data-parallel size {dp}"
            )
        return micro, stage.batch_size // (micro * dp)

    def _apply_lora(self, model):
        """Freezes ``model`` and injects the stage's LoRA adapters, initialised from the recipe seed or, with
        ``init.lora: continue``, the previous stage's EMA adapters (a resume rebuilds the same base and adapters,
        then loads the adapters' checkpoint)."""
        if self.recipe.parallel.engine == "colossalai":
            raise ConfigError(f"stage '{self.stage.name}': lora: use engine fsdp or ddp (the ColossalAI booster's ZeRO "
                              "masters are not set up for a frozen base)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.recipe.seed)  # lora_A's init draws from the global generator
            try:
                model = apply_lora(model, self.family, self.stage.lora)
            except ValueError as err:
                raise ConfigError(f"stage '{self.stage.name}': {err}") from err
        if self.adapters is not None:  # init.lora: continue; a resume then loads this stage's checkpoint over them
            path = self.adapters / ADAPTERS_NAME
            if not path.is_file():
                raise ConfigError(f"stage '{self.stage.name}': init.lora: continue needs the previous stage's "
                                  f"adapters, {path}, which its export does not hold")
            try:
                load_adapters(model, path, self.stage.lora)
            except ValueError as err:
                raise ConfigError(f"stage '{self.stage.name}': init.lora: continue: {err}") from err
        return model

    def _objective_options(self) -> dict:
        """Options of the training objective: rectified flow's timestep distribution, with the family's shift at the
        stage's latent size (Wan: 2 at 480p; STDiT: none, so its numbers are unchanged)."""
        if self.recipe.diffusion != "rflow":
            return {}
        stage = self.stage
        latent = self._latent_size((stage.num_frames, *stage.image_size))
        shift = self.family.objective.shift.at(self.family.video_tokens(self.model_config, latent))
        return {**asdict(self.recipe.rflow), "shift": shift}

    def _null_text(self, model) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The encoded empty prompt (1, 1, L, Ct) and its mask, which the step puts in place of dropped captions, for
        a family whose model has no caption dropout of its own; None for one that drops in-model (its model_fn is
        the model itself: STDiT's caption embedder)."""
        if self.family.model_fn(model) is model or self.recipe.caption_dropout == 0:
            return None
        text = self.text_encoder.encode([self.family.sampler.negative_prompt], device=self.device)
        return text["y"], text["mask"]

    def _build_encoders(self, bundle: BundleConfig, model):
        """The frozen VAE and text encoder of the init bundle, on the device (bf16 there when training in bf16)."""
        dtype = torch.bfloat16 if uses_mixed_precision(self.recipe.parallel, self.dist) else None
        vae, text_encoder = load_encoders(self.init_dir, device=self.device, dtype=dtype, config=bundle)
        check_compatible(model, vae, text_encoder, source=self.init_dir, family=self.family)
        check_recipe_autoencoder(self.recipe, vae.shape, self.init_dir)  # factors, frame rule (and channels)
        return vae, text_encoder

    def _build_validator(self) -> Validator:
        """The stage's validator: held-out clips, the sampler of ``tools/sample.py`` on the training model, scorers."""
        cfg, stage = self.validation, self.stage
        dataset = None
        if "loss" in cfg.metrics:
            data_cfg = validation_data_config(cfg, stage_data_config(self.recipe, stage))
            holdout = None if cfg.manifest else cfg.holdout
            common = dict(failures_path=self.stage_dir / "validation" / "failures.jsonl", seed=self.recipe.seed,
                          log_skipped=self.is_main, autoencoder=self.autoencoder, holdout=holdout,
                          held_out=holdout is not None)
            if data_cfg.cache_dir is not None:
                from opensora.data.latent_cache import CachedLatentDataset

                dataset = CachedLatentDataset(data_cfg, self._identity, **common)
            else:
                from opensora.data.dataset import VideoDataset

                dataset = VideoDataset(data_cfg, **common)
        sampler, prompts = None, cfg.all_prompts()
        if prompts:
            vae, text_encoder = self.vae, self.text_encoder
            if vae is None:  # training reads the latent cache: the samples still need the decoder and the captions
                dtype = torch.bfloat16 if uses_mixed_precision(self.recipe.parallel, self.dist) else None
                vae, text_encoder = load_encoders(self.init_dir, device=self.device, dtype=dtype)
            bundle = Bundle(self.model, vae, text_encoder, self.bundle_config, self.stage_dir)
            T = cfg.num_frames or stage.num_frames
            H, W = cfg.image_size or stage.image_size
            bundle.latent_size(T, H, W)  # a size the model or autoencoder cannot take fails now, not at step N

            def sampler(batch: list[str]) -> torch.Tensor:
                return bundle.generate(batch, T, H, W, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale, seed=cfg.seed,
                                       progress=False)
        scorers = {}
        if "colour_motion" in cfg.metrics:
            from opensora.eval import parse_caption

            bad = [p for p in prompts if parse_caption(p) is None]
            if bad:
                raise ConfigError(f"validation.metrics colour_motion scores shapes captions ('a red circle moving "
                                  f"left on a gray background'); these prompts are not: {bad}")
            scorers["colour_motion"] = colour_motion_scorer
        if "clip_score" in cfg.metrics and self.is_main:
            from opensora.eval.clip_score import ClipScorer

            scorers["clip_score"] = ClipScorer(cfg.clip_model, device=self.device)
        return Validator(cfg, self.stage_dir / "validation", self.recipe.diffusion, self.diffusion, self.engine,
                         self.model, self.ema, dataset, self.steps.encode, sampler, model_fn=self.steps.model_fn,
                         dp_rank=self.dims.dp_rank,
                         dp_size=self.dims.dp_size, sp_rank=self.dims.sp_rank, is_main=self.is_main, scorers=scorers,
                         agree_group=self._agree_group)

    def validate(self) -> None:
        """Runs the validation pass of the current step if it is due and has not run before (collective)."""
        if self.validator is None or not self.validation.due(self.step, self.stage.steps):
            return
        with self.metrics.paused():  # samples/s and MFU measure training only
            result = self.validator.run(self.step)
        if result is not None:
            self.ledger.validation_done(self.step, result.row["val_time_s"])
            self.metrics.log_validation(result)

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint's app state: model, optimizer, EMA, LR schedule, data position, RNG, step."""
        state = {
            **engine_state(self.engine),
            "ema": self.ema,
            "lr_scheduler": FnState(self.lr_scheduler.state_dict, self.lr_scheduler.load_state_dict),
            "rng": RNGState(),
            "train": FnState(lambda: {"step": self.step}, self._set_step),
        }
        if self.sampler is not None:
            state["data"] = FnState(self.sampler.state_dict, self.sampler.load_state_dict)
        return state

    def _set_step(self, state: dict) -> None:
        self.step = int(state["step"])

    def resume(self) -> None:
        """Loads the stage's latest checkpoint, if any (collective)."""
        if self.ckpt.latest_step() is None:
            return
        self.ckpt.load(self.state_dict())
        self._batches = None  # the next batch comes from the restored position
        self.metrics.print(f"stage '{self.stage.name}': resumed from step {self.step} ({self.ckpt.path(self.step)})")
        # The schedule counts applied updates: the steps it is behind the step counter were skipped (non-finite).
        self.nonfinite.skipped = self.step - self.lr_scheduler.last_epoch
        changes = apply_schedule_config(self.engine.schedule_optimizer, self.lr_scheduler, self.stage, self.recipe.optim)
        if changes:
            self.metrics.print(f"stage '{self.stage.name}': resumed with changed settings (checkpoint -> recipe): "
                               f"{', '.join(changes)}")

    def save(self) -> None:
        """Writes a checkpoint of the current step and records it in the ledger (collective).

        Raises NonFiniteError instead of writing a weight, EMA or moment that is not finite.
        """
        self._sync_nonfinite()
        self._check_finite("checkpoint")
        self.ckpt.save(self.step, self.state_dict())
        self.ledger.checkpoint_saved(self.step)

    def _sync_nonfinite(self) -> None:
        """Reads the skipped-step counters (a sync point), corrects the schedule, stops a diverged run."""
        before = self.nonfinite.skipped
        self.nonfinite.sync()
        if self.nonfinite.skipped != before:
            self.ledger.steps_skipped(self.nonfinite.skipped - before)
        set_schedule_position(self.lr_scheduler, self.step - self.nonfinite.skipped)

    def _check_finite(self, what: str) -> None:
        """Refuses to write state that is not finite (collective: the ranks agree on the answer).

        Skipped steps keep every weight finite; this is the last line of defence, one pass over the weights per
        checkpoint, so that nothing on disk can ever hold a NaN or an inf.
        """
        bad = []
        tensors = {"weight": self.model.parameters(), "EMA weight": iter(self.ema.shadow)}
        flags = torch.zeros(len(tensors), device=self.device)
        for i, group in enumerate(tensors.values()):
            for t in group:
                local = t.to_local() if hasattr(t, "to_local") else t
                if local.numel():
                    flags[i] = torch.maximum(flags[i], (~torch.isfinite(local.detach())).any().float())
        if self.dist.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        bad = [name for name, flag in zip(tensors, flags.tolist()) if flag]
        if bad:
            raise NonFiniteError(f"stage '{self.stage.name}': not writing the {what} of step {self.step}: a "
                                 f"{' and an '.join(bad)} is not finite")

    # -- one step ------------------------------------------------------------------------------------------
    def _next_batch(self) -> tuple[dict, float]:
        """The next batch and the seconds spent waiting for it (epochs roll over without end)."""
        t0 = time.perf_counter()
        while True:
            if self._batches is None:
                self._batches = iter(self.loader)
            try:
                batch = next(self._batches)
                return batch, time.perf_counter() - t0
            except StopIteration:
                self._batches = None

    def forward_backward_step(self, batch: dict, micro: int) -> torch.Tensor:
        """Loss and backward of one micro-batch (``opensora.training.step``); returns the detached mean loss.

        Args:
            batch: a collated batch (``video`` + ``text``, or cached ``latent`` + ``y`` + ``mask``).
            micro: index of the micro-step within the optimizer step (part of the seed; gradients are
                synchronised after the last one).
        """
        return self.steps.forward_backward(batch, self.step, micro)

    def train_step(self) -> dict:
        """One optimizer step over ``accum`` micro-batches; returns device tensors (no sync) and host numbers."""
        losses, wait, samples, tokens, flops = [], 0.0, 0, 0, 0.0
        for micro in range(self.accum):
            batch, waited = self._next_batch()
            wait += waited
            losses.append(self.forward_backward_step(batch, micro))
            n, latent = self._batch_shape(batch)
            samples += n
            tokens += n * self._tokens(latent)
            flops += n * self._flops(latent)
        lr = self.lr_scheduler.get_last_lr()[0]  # the rate this update uses
        loss = torch.stack(losses)
        grad_norm, loss_bad = self.steps.optimizer_step(loss)
        self.step += 1
        norm_bad = nonfinite_flag(grad_norm)
        self.nonfinite.add(self.step, loss_bad, norm_bad)
        if self.engine.skips_on_device:  # the skip is known on the device only: gate the EMA there
            self.ema.update(self.step, keep=~nonfinite_flag(grad_norm, loss_bad))
            set_schedule_position(self.lr_scheduler, self.step - self.nonfinite.skipped)  # corrected at sync points
        else:  # the engine read the flag on the host already: reading the counters costs nothing more
            before = self.nonfinite.skipped
            self._sync_nonfinite()
            if self.nonfinite.skipped == before:
                self.ema.update(self.step)
        scale = self.dims.dp_size  # every data-parallel rank did the same amount of work
        return dict(loss=loss.mean(), loss_max=loss.max(), grad_norm=grad_norm, lr=lr, data_wait=wait,
                    samples=samples * scale, tokens=tokens * scale, flops=flops * scale)

    def _batch_shape(self, batch: dict) -> tuple[int, tuple[int, int, int]]:
        """(samples, latent (T, h, w)) of a batch, from shapes only."""
        if "latent" in batch:
            return batch["latent"].shape[0], tuple(batch["latent"].shape[2:])
        T, H, W = batch["video"].shape[2:]
        return batch["video"].shape[0], tuple(self._latent_size((T, H, W)))

    def _latent_size(self, size: tuple[int, int, int]) -> tuple[int, int, int]:
        """Latent (T', h, w) of a video (T, H, W): time too, so a 3D VAE's 17 frames count as 5 latent frames."""
        return self.autoencoder.latent_size(size)

    def _tokens(self, latent: tuple[int, int, int]) -> int:
        return self.family.video_tokens(self.model_config, latent)

    def _flops(self, latent: tuple[int, int, int]) -> float:
        """Training FLOPs of one sample, the family's formula, with the text length the encoder pads to."""
        if latent not in self._flops_cache:
            text_len = self.bundle_config.text_encoder.max_length
            self._flops_cache[latent] = self.family.train_flops_per_sample(self.model_config, latent, text_len)
        return self._flops_cache[latent]

    # -- the loop ------------------------------------------------------------------------------------------
    def train(self) -> str:
        """Trains until the stage's ``steps`` (then exports), a stop request, the budget or ``max_steps``.

        Returns:
            the ledger end reason: "finished", "sigterm", "budget" or "max_steps".
        """
        target = self.stage.steps if self.max_steps is None else min(self.stage.steps, self.max_steps)
        log_every = self.recipe.logging.log_every
        reason = None
        try:
            self.resume()
            self.ledger.startup_done(self.step)  # the segment opened in __init__: start-up is billed
            self.metrics.open(self.step)
            self.validate()  # step 0 (at_start), or a point a killed run did not finish before its checkpoint
            while reason is None:
                reason = self._should_stop(target, check_all=self.step % log_every == 0)
                if reason is not None:
                    break
                out = self.train_step()
                self.ledger.update(self.step, out["samples"], out["tokens"], out["flops"])
                self.metrics.add(out)
                if self.step % log_every == 0 or self.step == target:
                    self._sync_nonfinite()
                    self.metrics.log(self.step, skipped=self.nonfinite.take_window())  # the loop's one sync point
                self.validate()  # before the checkpoint: a checkpoint at a validation point implies it ran
                if self.step % self.recipe.logging.ckpt_every == 0 and self.step < target:
                    with self.metrics.paused():  # samples/s and MFU measure training only
                        self.save()
            if self.step > 0 and (self.ckpt.latest_step() != self.step):
                self.save()
            if reason == "finished":
                self.export()
            self.ledger.end_segment(reason, self.step)
        except NonFiniteError as err:  # diverged: no checkpoint of this state; the last one is the one to resume
            self.ledger.end_segment("nonfinite", self.step)
            last = self.ckpt.latest_step()
            raise NonFiniteError(f"stage '{self.stage.name}' stopped at step {self.step}: {err}. Latest checkpoint: "
                                 f"{'step ' + str(last) if last is not None else 'none (the stage starts over)'}") from None
        except BaseException:
            self.ledger.end_segment("error", self.step)
            raise
        finally:
            self.metrics.close()
        self._report(reason)
        return reason

    def _should_stop(self, target: int, check_all: bool) -> str | None:
        """The reason to stop before the next step, agreed by all ranks, or None.

        A stage end or ``max_steps`` is known to every rank. A signal and the budget (decided on rank 0 from
        the ledger) are agreed with one all-reduce, only on log steps in a multi-rank job (a collective every
        step would synchronise the device every step).
        """
        if self.step >= self.stage.steps:
            return "finished"
        if self.step >= target:
            return "max_steps"
        if not check_all and self.dist.world_size > 1:
            return None
        flags = [self.stop.reason == "sigterm", False]
        if self.is_main and (check_all or self.dist.world_size == 1):
            self._budget_message = check_budget(self.ledger, self.stage.budget, self.recipe.budget)
            flags[1] = self._budget_message is not None
        if self.dist.world_size > 1:
            t = torch.tensor([float(f) for f in flags], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flags = [bool(v) for v in t.tolist()]
        if flags[0]:
            return "sigterm"
        if flags[1]:
            return "budget"
        return None

    def export(self) -> Path:
        """Writes ``<stage>/export``: a pipeline bundle of the EMA weights (``bundle.yaml`` last). Collective."""
        self._check_finite("export")
        state = {**self.model.state_dict(), **self.ema.state_dict()}  # buffers from the model, weights averaged
        if self.stage.lora is not None:
            state = self._export_lora(state)
        if self.family.name == "stdit":
            out = export_bundle(state, self.model_config, self.bundle_config, self.stage_dir / "export",
                                copy_from=self.init_dir)
        else:
            out = self._export_family(state)
        self.metrics.print(f"stage '{self.stage.name}': exported the EMA weights to {out}")
        return out

    def _export_lora(self, state: dict) -> dict:
        """A LoRA stage's export: writes the EMA adapters as ``lora_adapters.safetensors`` (as the model holds them:
        what ``init.lora: continue`` loads) and ``pytorch_lora_weights.safetensors`` (families with a diffusers
        pipeline) and returns the full state with them merged into the base (W + alpha/r B A), so the
        bundle is a plain model that any tool loads. Collective (gathers FSDP2 shards)."""
        from torch.distributed.tensor import DTensor

        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in state.items()}  # collective
        settings, out = self.stage.lora, self.stage_dir / "export"
        adapters = {k: v for k, v in state.items() if ".lora_A." in k or ".lora_B." in k}
        if self.is_main:  # before bundle.yaml, which is written last
            save_adapters(adapters, settings, out)  # what a following stage with init.lora: continue trains on
            if self.family.diffusers_pipeline is not None:
                save_diffusers_lora({k.replace(".default.", "."): v for k, v in adapters.items()}, self.family,
                                    settings, out)
        return merge_lora_state(state, settings.scale)

    def _export_family(self, state: dict) -> Path:
        """``export_bundle`` for a model of any family: gather the (possibly sharded) state, rank 0 writes the
        model's own ``save_pretrained`` layout. Collective."""
        from torch.distributed.tensor import DTensor

        out = self.stage_dir / "export"
        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in state.items()}  # collective
        if self.is_main:
            state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu() for k, v in state.items()}
            with torch.device("meta"):  # only the class and config are used; the weights come from ``state``
                skeleton = self._model_class.from_config(self.model_config)
            write_bundle(out, skeleton, self.bundle_config, copy_from=self.init_dir, state_dict=state)
        if self.dist.world_size > 1:
            dist.barrier()
        return out

    # -- report --------------------------------------------------------------------------------------------
    def _report(self, reason: str) -> None:
        spend = self.ledger.spent(self.stage.name)
        spent = f"{spend.gpu_hours:.4f} GPU-hours, ${spend.dollars:.2f}, {spend.samples} samples"
        if reason == "finished":
            self.metrics.print(f"stage '{self.stage.name}' finished at step {self.step}; spent {spent}")
            return
        saved = "with a checkpoint" if self.step > 0 else "before its first step (nothing to save)"
        if reason == "budget":
            self.metrics.print(f"stage '{self.stage.name}' stopped at step {self.step} {saved}: "
                               f"{self._budget_message}. Raise the budget and re-run to continue.")
        else:
            self.metrics.print(f"stage '{self.stage.name}' stopped ({reason}) at step {self.step} {saved}; "
                               f"spent {spent}. Re-run the same command to continue.")

    def close(self) -> None:
        """Stops the data workers and frees the stage's models (the next stage builds its own)."""
        self._batches = None
        self.metrics.close()
        self.loader = self.sampler = None
        self.model = self.model_fn = self.optimizer = self.ema = self.vae = self.text_encoder = self.steps = None
        self.validator = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
