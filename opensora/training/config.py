"""The schema of a training recipe: an ordered list of stages plus what they share.

A recipe file is data (YAML/TOML) validated against :class:`RecipeConfig`; every field has one line of
doc here and a default in one place. Load it with :func:`load_recipe` (``opensora.config.load_config`` on
this schema), whose dotted overrides index into the stage list (``stages.1.steps=2000``)::

    recipe = load_recipe("configs/demo/train.yaml", ["stages.0.steps=4", "optim.grad_clip=0.5"])

The cost forecast (``opensora.accounting.forecast.cost_stages``) prices a loaded recipe from its autoencoder's
shape (:func:`recipe_autoencoder`: ``vae_compression`` or ``vae_downsample``) and
``stages[*].{name, model, model_overrides, num_frames, image_size, batch_size, steps}``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from opensora.accounting import BudgetConfig
from opensora.config import ConfigError, load_config
from opensora.data.dataset import DataConfig, check_sample_shape
from opensora.diffusion import SCHEDULERS
from opensora.distributed import ParallelConfig
from opensora.models.autoencoders import AutoencoderShape
from opensora.models.families import ModelFamily, family_of_size
from opensora.models.lora import LoraSettings
from opensora.models.stdit import STDiT_models, STDiTConfig
from opensora.training.conditioning import ConditioningConfig
from opensora.training.validation import ValidationConfig, union_holdout

LR_SCHEDULES = ("constant", "cosine")
CHECKPOINT_FORMATS = ("opensora_v1", "pixart")
# How a stage after a LoRA stage takes its adapters: "merge" (its export, the adapters merged into the base) or
# "continue" (the previous stage's base, unmerged, and its EMA adapters, trained on).
INIT_LORA_MODES = ("merge", "continue")
# STDiTConfig fields that decide parameter shapes: a stage cannot change them (it continues the weights),
# and they must agree with the stage's named ``model`` size.
SHAPE_FIELDS = ("depth", "hidden_size", "num_heads", "mlp_ratio", "patch_size")
# Fields the stage's data config takes from the stage itself, not from ``data`` / ``stages[i].data``.
STAGE_DATA_FIELDS = ("num_frames", "image_size")


@dataclass
class InitConfig:
    """Where a stage's starting weights (and its VAE and text encoder) come from.

    All None (the default): the previous stage's export. Otherwise exactly one source of the model:
    ``bundle`` (a pipeline bundle), or ``vae`` + ``text_encoder`` (a new model of the stage's ``model``
    size fitted to them). ``checkpoint`` then optionally replaces the weights.
    """

    bundle: str | None = None  # pipeline bundle dir (tools/init_checkpoint.py or a stage export)
    # New model: a local autoencoder dir (SD-VAE, Wan, HunyuanVideo, CogVideoX, LTX: the class comes from its
    # config.json), "identity" (pixel space), "tiny" (random per-frame, built in) or "tiny-KIND" (e.g. tiny-wan2.1).
    vae: str | None = None
    vae_subfolder: str | None = None  # e.g. "vae" inside a diffusers pipeline repo (Wan2.1-T2V-1.3B-Diffusers)
    text_encoder: str | None = None  # new model: a local T5 encoder dir (with tokenizer) or "tiny"
    seed: int = 0  # seed of a new model's random initialisation (and of the tiny encoders)
    checkpoint: str | None = None  # weights file loaded over the model (.pth / .safetensors)
    checkpoint_format: str = "opensora_v1"  # "opensora_v1" (STDiT, strict) or "pixart" (PixArt-α: spatial part only)
    # After a LoRA stage: "merge" starts from its export (adapters merged into the base; this stage's own `lora`, if
    # any, is new adapters on it); "continue" trains the previous stage's EMA adapters on, over its frozen base,
    # unmerged (this stage's `lora` must have the same rank, alpha and target_modules).
    lora: str = "merge"

    def __post_init__(self):
        if self.bundle is not None and (self.vae is not None or self.text_encoder is not None):
            raise ValueError("init: give either init.bundle or init.vae + init.text_encoder, not both")
        if (self.vae is None) != (self.text_encoder is None):
            raise ValueError("init: a new model needs both init.vae and init.text_encoder")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(
                f"init.checkpoint_format must be one of {CHECKPOINT_FORMATS}, got {self.checkpoint_format!r}"
            )
        if self.lora not in INIT_LORA_MODES:
            raise ValueError(f"init.lora must be one of {INIT_LORA_MODES}, got {self.lora!r}")

    @property
    def from_previous(self) -> bool:
        """True when the model comes from the previous stage's export."""
        return self.bundle is None and self.vae is None


@dataclass
class StageConfig:
    """One stage: a data set at one resolution and length, a schedule, and where its weights start."""

    name: str = MISSING  # directory name under the output dir; unique in the recipe
    # A named size of a model family (opensora.models.families: STDiT-XL/2, STDiT-debug, Wan2.1-T2V-1.3B, tiny-wan2.1,
    # LTX-Video-2B, tiny-ltx); must be the family and shape of the init weights.
    model: str = MISSING
    model_overrides: dict[str, Any] = field(default_factory=dict)  # STDiT only: non-shape STDiTConfig fields, e.g. space_scale
    num_frames: int = MISSING  # frames per sample (1: images)
    image_size: tuple[int, int] = MISSING  # [H, W] in pixels
    batch_size: int = MISSING  # global samples per optimizer step (all ranks, all accumulation steps)
    micro_batch_size: int | None = None  # samples per rank per forward; None: batch_size / data-parallel size
    steps: int = MISSING  # optimizer steps; 0 exports the init unchanged (e.g. a converted PixArt-α checkpoint)
    lr: float = MISSING  # peak learning rate
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many steps
    lr_schedule: str = "constant"  # after warm-up: "constant" or "cosine" (down to min_lr at `steps`)
    min_lr: float = 0.0  # end of the cosine schedule
    data: dict[str, Any] = field(default_factory=dict)  # this stage's overrides of the recipe's `data` (e.g. manifest)
    init: InitConfig = field(default_factory=InitConfig)  # default: the previous stage's export
    budget: BudgetConfig = field(default_factory=BudgetConfig)  # caps for this stage alone
    # This stage's frame-conditioning probabilities; replaces the recipe's `conditioning` whole. None: the recipe's.
    conditioning: ConditioningConfig | None = None
    validation: dict[str, Any] = field(default_factory=dict)  # this stage's overrides of the recipe's `validation`
    # LoRA (peft): the base frozen, only these adapters train (optimizer, EMA, checkpoints); the export holds the base
    # with the adapters merged, lora_adapters.safetensors (for a next stage's init.lora: continue) and their
    # pytorch_lora_weights.safetensors for diffusers. None: a full fine-tune.
    lora: LoraSettings | None = None

    def __post_init__(self):
        try:
            family = family_of_size(self.model)
        except KeyError:
            raise ValueError(
                f"stage '{self.name}': model: unknown STDiT size {self.model!r} (nor a size of another family); "
                f"known: {', '.join(STDiT_models)}; other families: "
                f"{', '.join(s for s in _other_family_sizes())}"
            ) from None
        if family.name != "stdit" and self.model_overrides:
            raise ValueError(f"stage '{self.name}': model_overrides apply to STDiT sizes only, not {self.model}")
        known = {f.name for f in dataclasses.fields(STDiTConfig)}
        for key in self.model_overrides:
            if key not in known:
                raise ValueError(f"stage '{self.name}': model_overrides.{key}: not an STDiTConfig field")
            if key in SHAPE_FIELDS:
                raise ValueError(
                    f"stage '{self.name}': model_overrides.{key}: changes parameter shapes; pick another `model`"
                )
        for name, minimum in (("num_frames", 1), ("batch_size", 1), ("steps", 0), ("warmup_steps", 0)):
            if getattr(self, name) < minimum:
                raise ValueError(f"stage '{self.name}': {name} must be >= {minimum}, got {getattr(self, name)}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"stage '{self.name}': image_size must be [H, W], got {list(self.image_size)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"stage '{self.name}': micro_batch_size must be >= 1 or null, got {self.micro_batch_size}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(
                f"stage '{self.name}': need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"stage '{self.name}': lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )
        for key in self.data:
            if key in STAGE_DATA_FIELDS:
                raise ValueError(f"stage '{self.name}': data.{key}: set the stage's own `{key}` instead")


def _other_family_sizes() -> list[str]:
    from opensora.models.families import FAMILIES

    return [size for name, family in FAMILIES.items() if name != "stdit" for size in family.sizes]


@dataclass
class RFlowConfig:
    """Training timesteps of rectified flow (``diffusion: rflow``): t = sigmoid(N(logit_mean, logit_std^2)).

    Sampling does not depend on these, so bundles need not record them. A positive ``logit_mean`` trains
    more often near pure noise, where the layout of a video (and so its motion) is decided.
    """

    logit_mean: float = 0.0  # SD3 / Open-Sora 1.2: 0
    logit_std: float = 1.0

    def __post_init__(self):
        if self.logit_std <= 0:
            raise ValueError(f"rflow.logit_std must be > 0, got {self.logit_std}")


@dataclass
class OptimConfig:
    """AdamW and gradient handling, shared by all stages (the learning rate is per stage)."""

    betas: tuple[float, float] = (0.9, 0.999)  # Adam moments
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # decoupled weight decay (Open-Sora 1.0: 0)
    grad_clip: float = 1.0  # max global L2 norm of the gradients; 0 disables clipping
    fused: bool = True  # fused AdamW kernel on CUDA (ignored on CPU); it also skips non-finite steps without a sync
    # A step whose loss or gradient norm is not finite is skipped (changes nothing); this many in a row stop the
    # stage with an error (the run diverged). Checked at log steps and checkpoints (every step without fused AdamW).
    max_nonfinite_steps: int = 10

    def __post_init__(self):
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"optim.betas must be in [0, 1), got {list(self.betas)}")
        if self.max_nonfinite_steps < 1:
            raise ValueError(f"optim.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.weight_decay < 0 or self.grad_clip < 0 or not self.eps > 0:
            raise ValueError("optim: need weight_decay >= 0, grad_clip >= 0 and eps > 0")


@dataclass
class EMAConfig:
    """Exponential moving average of the weights, kept in fp32; the stage export holds the EMA weights."""

    decay: float = 0.9999  # Open-Sora 1.0's value
    warmup: bool = False  # use min(decay, (1 + step) / (10 + step)): lets short runs' EMA move off the init

    def __post_init__(self):
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {self.decay}")


@dataclass
class LoggingConfig:
    """How often the trainer reports and saves."""

    log_every: int = 10  # steps between metric lines (the only GPU->CPU syncs of the loop)
    ckpt_every: int = 1000  # steps between checkpoints (and one at every stop)
    keep_checkpoints: int = 3  # newest checkpoints kept per stage
    tensorboard: bool = True  # <stage>/tensorboard/ (needs the tensorboard package; skipped with a warning otherwise)
    wandb: bool = False  # also log to Weights & Biases (needs wandb installed and logged in)
    wandb_project: str = "opensora"  # W&B project
    progress: bool = True  # tqdm progress bar on rank 0

    def __post_init__(self):
        for name in ("log_every", "ckpt_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"logging.{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class AccountingConfig:
    """What one GPU-hour costs; recorded in OUTPUT_DIR/ledger.jsonl (opensora.accounting)."""

    gpu_type: str | None = None  # canonical GPU type; None detects it ("cpu" without CUDA)
    price_per_gpu_hour: float | None = None  # USD; None takes the table's price of gpu_type
    heartbeat_s: float = 30.0  # seconds between ledger heartbeats: the most paid time a crash can hide


@dataclass
class RecipeConfig:
    """A training recipe: stages run in order, each starting from the previous stage's export."""

    stages: list[StageConfig] = MISSING  # in order; at least one
    data: DataConfig = field(default_factory=DataConfig)  # data defaults (num_frames / image_size come from each stage)
    # The stages' autoencoder, as the cost forecast prices it (no weights needed) and the trainer checks the loaded
    # VAE against it (recipe_autoencoder below). A per-frame image VAE: vae_downsample alone; a 3D one:
    # vae_compression (+ vae_causal, vae_frame_step, vae_latent_channels).
    vae_downsample: int | None = None  # legacy: a per-frame VAE's spatial factor f, i.e. (1, f, f); None: 8 (SD-VAE)
    vae_compression: list[int] | None = None  # (t, h, w) factors, e.g. [4, 8, 8] for Wan 2.1; None: vae_downsample
    vae_causal: bool = True  # with vae_compression: first frame alone, so t*k + 1 frames give k + 1 latent frames
    vae_frame_step: int | None = None  # with vae_compression: valid frame counts step by this (None: t; CogVideoX: 8)
    vae_latent_channels: int | None = None  # latent channels (Wan 2.1: 16); None: undeclared (forecast: in_channels)
    diffusion: str = "iddpm"  # training objective: "iddpm" (Open-Sora 1.0) or "rflow"; recorded in the exports
    rflow: RFlowConfig = field(default_factory=RFlowConfig)  # timestep distribution when diffusion is rflow
    # Frame conditioning (image-to-video, video extension): how often each mask type is drawn; all 0 = text-to-video.
    conditioning: ConditioningConfig = field(default_factory=ConditioningConfig)
    seed: int = 0  # seed of the data order, noise, timesteps and caption dropout
    # Caption dropout for classifier-free guidance of the families whose model has none of its own (Wan, LTX): the
    # share of captions the step replaces by the encoded empty prompt. STDiT drops in-model: its config's
    # class_dropout_prob (model_overrides), and ignores this.
    caption_dropout: float = 0.1
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # engine, sequence parallelism, checkpointing
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    accounting: AccountingConfig = field(default_factory=AccountingConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)  # caps for all stages together
    # Held-out loss, sample videos and metrics while training (opensora.training.validation); off by default.
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self):
        if not self.stages:
            raise ValueError("stages: a recipe needs at least one stage")
        names = [s.name for s in self.stages]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"stages: names must be unique, repeated: {duplicates}")
        for i, stage in enumerate(self.stages):
            if not stage.name or Path(stage.name).name != stage.name or stage.name in (".", ".."):
                raise ValueError(f"stages[{i}].name: {stage.name!r} must be a plain directory name")
            try:
                stage_data_config(self, stage)
            except ConfigError as err:
                raise ValueError(f"stages[{i}].{err}") from err
        if self.stages[0].init.from_previous:
            raise ValueError(
                f"stages[0].init: the first stage ('{self.stages[0].name}') has no previous stage; "
                "set init.bundle, or init.vae + init.text_encoder"
            )
        for i, stage in enumerate(self.stages):
            if stage.init.lora == "continue":
                _check_lora_continue(self.stages, i)
        if self.diffusion not in SCHEDULERS:
            raise ValueError(f"diffusion must be one of {sorted(SCHEDULERS)}, got {self.diffusion!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        for i, stage in enumerate(self.stages):
            family = family_of_size(stage.model)
            if self.diffusion not in family.objectives:
                raise ValueError(f"stages[{i}] ('{stage.name}'): {stage.model} trains with "
                                 f"{' or '.join(family.objectives)}, the recipe's diffusion is {self.diffusion!r} "
                                 f"(set diffusion: {family.objective.name})")
        if self.diffusion != "rflow" and self.rflow != RFlowConfig():
            raise ValueError(f"rflow: timestep options are set but diffusion is {self.diffusion!r} (they apply to rflow only)")
        vae = recipe_autoencoder(self)  # raises on a bad or contradictory declaration
        for i, stage in enumerate(self.stages):
            try:  # frames and size of the stage (and of every bucket) must fit the autoencoder
                check_sample_shape(stage_data_config(self, stage), vae)
            except ValueError as err:
                raise ValueError(f"stages[{i}] ('{stage.name}'): {err}") from None
            try:
                val = stage_validation_config(self, stage)
                if val.enabled and (val.num_frames or val.image_size):  # the samples' size must fit it too
                    vae.latent_size((val.num_frames or stage.num_frames, *(val.image_size or stage.image_size)))
            except ConfigError as err:
                raise ValueError(f"stages[{i}].{err}") from None
            except ValueError as err:
                raise ValueError(f"stages[{i}] ('{stage.name}'): validation: {err}") from None


def _check_lora_continue(stages: list[StageConfig], i: int) -> None:
    """``stages[i].init.lora: continue`` needs the previous stage's LoRA and the same adapters; ValueError naming
    the keys that contradict it."""
    stage, key = stages[i], f"stages[{i}].init.lora: continue (train stage {i - 1}'s adapters on)"
    init = stage.init
    given = [f"stages[{i}].init.{k}" for k in ("bundle", "vae", "text_encoder", "checkpoint") if getattr(init, k)]
    if given:
        raise ValueError(f"{key} starts from the previous stage, not with {', '.join(given)}")
    if stage.lora is None:
        raise ValueError(f"{key} trains adapters, but stages[{i}].lora is null; set it as stages[{i - 1}].lora")
    previous = stages[i - 1].lora
    if previous is None:
        raise ValueError(f"{key}: stages[{i - 1}] ('{stages[i - 1].name}') trains no adapters (stages[{i - 1}].lora "
                         "is null); drop init.lora or make that stage a LoRA stage")
    for field_name in ("rank", "alpha", "target_modules"):  # what the adapters compute; dropout may change
        ours, theirs = getattr(stage.lora, field_name), getattr(previous, field_name)
        if ours != theirs:
            raise ValueError(f"{key}: stages[{i}].lora.{field_name} ({ours!r}) must equal "
                             f"stages[{i - 1}].lora.{field_name} ({theirs!r})")


def recipe_autoencoder(recipe: RecipeConfig) -> AutoencoderShape:
    """The autoencoder shape the recipe declares: what the forecast prices and the trainer checks the VAE against.

    ``vae_compression`` (with ``vae_causal``, ``vae_frame_step``, ``vae_latent_channels``), else a per-frame
    VAE's (1, f, f) from ``vae_downsample`` (8 when neither is set, SD-VAE as in Open-Sora 1.0).

    Raises:
        ValueError: factors that are not three integers >= 1, a frame step that is not a multiple of t, a
            ``vae_downsample`` that disagrees with ``vae_compression``, a frame step without a compression.
    """
    f, compression = recipe.vae_downsample, recipe.vae_compression
    if f is not None and f < 1:
        raise ValueError(f"vae_downsample must be >= 1, got {f}")
    if recipe.vae_latent_channels is not None and recipe.vae_latent_channels < 1:
        raise ValueError(f"vae_latent_channels must be >= 1, got {recipe.vae_latent_channels}")
    if compression is None:
        if recipe.vae_frame_step is not None:
            raise ValueError("vae_frame_step needs vae_compression (a per-frame VAE takes any frame count)")
        return AutoencoderShape.per_frame(8 if f is None else f, latent_channels=recipe.vae_latent_channels)
    if len(compression) != 3 or any(int(v) != v or v < 1 for v in compression):
        raise ValueError(f"vae_compression must be three integer factors [t, h, w] >= 1, got {list(compression)}")
    t, h, w = (int(v) for v in compression)
    if f is not None and (t, h, w) != (1, f, f):
        raise ValueError(f"vae_downsample {f} (a per-frame VAE, 1x{f}x{f}) disagrees with vae_compression "
                         f"{[t, h, w]}: give one of them")
    step = recipe.vae_frame_step
    if step is not None and (step < 1 or step % t):
        raise ValueError(f"vae_frame_step must be a multiple of the temporal factor {t}, got {step}")
    causal = recipe.vae_causal and t * (step or t) > 1  # t = 1 with step 1: the same as a per-frame VAE
    return AutoencoderShape((t, h, w), causal=causal, frame_step=step, latent_channels=recipe.vae_latent_channels,
                            name=f"the recipe's autoencoder ({t}x{h}x{w})")


def check_recipe_autoencoder(recipe: RecipeConfig, vae_shape: AutoencoderShape, source: str | Path) -> None:
    """Raises ConfigError naming both when the loaded autoencoder's shape is not the one the recipe declares.

    Args:
        recipe: the recipe (``vae_compression`` / ``vae_downsample`` and friends).
        vae_shape: ``vae.shape`` of the loaded autoencoder.
        source: where the autoencoder came from (the init bundle), for the message.
    """
    declared = recipe_autoencoder(recipe)
    differs = declared.differences(vae_shape)
    if differs:
        t, h, w = vae_shape.compression
        if t == 1 and h == w and vae_shape.step == 1:
            fix = [f"vae_downsample: {h}"]
        else:
            fix = [f"vae_compression: [{t}, {h}, {w}]", f"vae_causal: {str(vae_shape.causal).lower()}"]
            fix += [] if vae_shape.step == t else [f"vae_frame_step: {vae_shape.step}"]
        fix += [f"vae_latent_channels: {vae_shape.latent_channels}"] if declared.latent_channels is not None else []
        fix_text = ", ".join(fix)
        raise ConfigError(
            f"the recipe declares the autoencoder {declared.summary()} but the VAE of {source} "
            f"({vae_shape.name}) is {vae_shape.summary()} ({'; '.join(differs)}): set {fix_text} in the recipe, "
            "or start the stage from a bundle with the autoencoder it declares"
        )


def stage_data_config(recipe: RecipeConfig, stage: StageConfig) -> DataConfig:
    """The data config of ``stage``: the recipe's ``data``, the stage's ``data`` overrides, its frames and size."""
    base = OmegaConf.structured(recipe.data)
    try:
        merged = OmegaConf.merge(base, OmegaConf.create(dict(stage.data)))
        merged.num_frames = stage.num_frames
        merged.image_size = tuple(stage.image_size)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"data.{key}: {getattr(err, 'msg', err)}" if key else f"data: {err}") from err
    except (ValueError, TypeError) as err:
        raise ConfigError(f"data: {err}") from err


def stage_validation_config(recipe: RecipeConfig, stage: StageConfig) -> ValidationConfig:
    """The validation config of ``stage``: the recipe's ``validation`` with the stage's overrides."""
    base = OmegaConf.structured(recipe.validation)
    try:
        return OmegaConf.to_object(OmegaConf.merge(base, OmegaConf.create(dict(stage.validation))))  # type: ignore
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise ConfigError(f"validation.{key}: {getattr(err, 'msg', err)}" if key else f"validation: {err}") from err
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from err


def recipe_holdout(recipe: RecipeConfig):
    """The clips no stage trains on: the union of every stage's held-out clips (``Holdout`` or None)."""
    return union_holdout([stage_validation_config(recipe, stage) for stage in recipe.stages])


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> RecipeConfig:
    """Loads a recipe file (YAML/TOML) onto :class:`RecipeConfig` and applies ``key=value`` overrides.

    Args:
        path: the recipe file. A mistyped or unknown key raises :class:`ConfigError` naming the key and file.
        overrides: dotted ``key=value`` strings; list entries by index (``stages.1.lr=1e-5``).
    Returns:
        the validated recipe (all ``__post_init__`` checks have run).
    """
    return load_config(RecipeConfig, path, overrides)


# Config fields of a diffusers family's size that a bundle fits to its encoders (training/init.py), and so may
# differ from the named size.
FITTED_FIELDS = ("in_channels", "out_channels", "text_dim", "caption_channels")


def stage_family(stage: StageConfig) -> ModelFamily:
    """The family of the stage's named ``model`` size."""
    return family_of_size(stage.model)


def stage_model_config(stage: StageConfig, init_config: Any, family: ModelFamily | None = None) -> Any:
    """The model config a stage trains: the init weights' config with the stage's overrides applied.

    Args:
        stage: the stage (its named ``model`` size and, for STDiT, ``model_overrides``).
        init_config: the config of the init weights (``STDiTConfig``, or a diffusers model's config).
        family: the init bundle's family; it must be the named size's.
    Raises ConfigError if the init weights are not of the family, or not of the shape, of the stage's named
    ``model`` size (the forecast and the reader of the recipe trust that name).
    """
    named_family = stage_family(stage)
    if family is not None and family is not named_family:
        raise ConfigError(f"stage '{stage.name}': model {stage.model} is a {named_family.name} size but the init "
                          f"bundle holds a {family.name} model")
    if named_family.name != "stdit":
        named = named_family.size_config(stage.model)
        for key, value in named.items():
            if key not in FITTED_FIELDS and _as_tuple(init_config[key]) != _as_tuple(value):
                raise ConfigError(f"stage '{stage.name}': model {stage.model} has {key}={value} but the init "
                                  f"weights have {key}={init_config[key]}")
        return init_config
    named = STDiT_models[stage.model]
    for key in SHAPE_FIELDS:
        if tuple(_as_tuple(getattr(named, key))) != tuple(_as_tuple(getattr(init_config, key))):
            raise ConfigError(
                f"stage '{stage.name}': model {stage.model} has {key}={getattr(named, key)} but the init weights "
                f"have {key}={getattr(init_config, key)}"
            )
    return dataclasses.replace(init_config, **stage.model_overrides)


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
