"""Forecasts: GPU-hours and dollars of a recipe from its FLOP count, an MFU, a GPU type and a price.

    GPU-seconds = steps * batch_size * train_flops_per_sample / (MFU * peak FLOP/s per GPU)

The recipe is the trainer's own (``opensora.training.load_recipe``: the same file, checks and ``--set``
overrides as ``train/train.py``); :func:`cost_stages` takes from it what decides the cost: the autoencoder's
shape (:func:`recipe_autoencoder`) and each stage's ``name``, ``model`` + ``model_overrides``, ``num_frames``,
``image_size``, ``batch_size`` and ``steps``.

The autoencoder is priced by what it does to shapes (``opensora.models.autoencoders.AutoencoderShape``:
compression (t, h, w), causal frame rule, latent channels), never by loading it: a 4x8x8 causal VAE turns 17
frames into 5 latent frames where Open-Sora 1.0's per-frame SD-VAE keeps 16, and the DiT's FLOPs follow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opensora.accounting.flops import train_flops_per_sample
from opensora.config import ConfigError
from opensora.models.autoencoders import AutoencoderShape
from opensora.models.stdit import STDiT_models, STDiTConfig

if TYPE_CHECKING:  # opensora.training imports this package (budgets), so only for the annotation
    from opensora.training.config import RecipeConfig


@dataclass
class CostStage:
    """The fields of one recipe stage that decide its cost."""

    name: str
    model: Any  # the model's config: an STDiTConfig, or a diffusers family's config fields (a dict)
    model_name: str  # the named size (opensora.models.families: STDiT-XL/2, Wan2.1-T2V-1.3B, ...)
    num_frames: int
    image_size: tuple[int, int]  # (H, W) pixels
    batch_size: int  # global samples per step
    steps: int
    vae: AutoencoderShape = field(default_factory=lambda: AutoencoderShape.per_frame(8))  # SD-VAE's (1, 8, 8)

    @property
    def latent_size(self) -> tuple[int, int, int]:
        return self.vae.latent_size((self.num_frames, *self.image_size))

    @property
    def samples(self) -> int:
        return self.steps * self.batch_size

    @property
    def flops_per_sample(self) -> float:
        """Training FLOPs of one sample: the family's formula (STDiT: ``accounting/flops.py``, unchanged)."""
        if isinstance(self.model, STDiTConfig):
            return train_flops_per_sample(self.model, self.latent_size, self.model.model_max_length)
        from opensora.models.families import family_of_size

        return family_of_size(self.model_name).train_flops_per_sample(self.model, self.latent_size)


def recipe_autoencoder(recipe: RecipeConfig) -> AutoencoderShape:
    """The autoencoder shape a recipe declares (``vae_compression`` + frame rule + channels, or the per-frame
    ``vae_downsample``): ``opensora.training.config.recipe_autoencoder``, the one the trainer checks the VAE with."""
    from opensora.training.config import recipe_autoencoder as declared  # imported here: training imports accounting

    return declared(recipe)


def cost_stages(recipe: RecipeConfig, source: str = "recipe", vae: AutoencoderShape | None = None) -> list[CostStage]:
    """The stages of a loaded recipe, with what decides their cost.

    Args:
        recipe: from ``opensora.training.load_recipe`` (already validated).
        source: names the recipe in errors (its file).
        vae: price the stages with this autoencoder instead of the recipe's (:func:`recipe_autoencoder`), e.g.
            ``AUTOENCODER_PRESETS["wan2.1"].shape`` to see what a 4x8x8 causal VAE would cost. Where its latent
            channels are known, they become the model's ``in_channels`` (unless ``model_overrides`` sets them).
    Returns:
        one :class:`CostStage` per stage, in order. The model is the stage's named size with its
        ``model_overrides`` (the text encoder's width of the init bundle is not known before the run).
    """
    vae = recipe_autoencoder(recipe) if vae is None else vae
    out = []
    for i, st in enumerate(recipe.stages):
        if st.model in STDiT_models:
            model = dataclasses.replace(STDiT_models[st.model], **st.model_overrides)
            if vae.latent_channels is not None and "in_channels" not in st.model_overrides:
                model = dataclasses.replace(model, in_channels=vae.latent_channels)
        else:  # another family's named size (Wan, LTX): its config fields, fitted to the declared latent channels
            from opensora.models.families import family_of_size

            model = family_of_size(st.model).size_config(st.model)
            if vae.latent_channels is not None:
                model.update({k: vae.latent_channels for k in ("in_channels", "out_channels") if k in model})
        stage = CostStage(
            name=st.name, model=model, model_name=st.model, num_frames=st.num_frames,
            image_size=(int(st.image_size[0]), int(st.image_size[1])), batch_size=st.batch_size, steps=st.steps,
            vae=vae,
        )
        try:
            stage.flops_per_sample  # the VAE's frame rule and factors, and the patch size, must fit the size
        except ValueError as err:
            raise ConfigError(f"{source}: stages[{i}] ('{st.name}'): {err}") from err
        out.append(stage)
    return out


@dataclass
class StageForecast:
    """Predicted cost of one stage."""

    stage: str
    samples: int
    flops_per_sample: float  # training model FLOPs (3 x forward)
    total_flops: float
    mfu: float
    gpus: int
    gpu_type: str
    peak_tflops: float
    price_per_gpu_hour: float
    gpu_hours: float
    wall_hours: float
    dollars: float


def forecast_flops(
    total_flops: float, *, stage: str, samples: int, flops_per_sample: float, gpus: int, gpu_type: str,
    peak_tflops: float, price_per_gpu_hour: float, mfu: float,
) -> StageForecast:
    """Cost of ``total_flops`` model FLOPs at ``mfu`` of ``peak_tflops`` on ``gpus`` GPUs (see module docstring)."""
    if not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    gpu_hours = total_flops / (mfu * peak_tflops * 1e12) / 3600.0
    return StageForecast(
        stage=stage, samples=samples, flops_per_sample=flops_per_sample, total_flops=total_flops, mfu=mfu,
        gpus=gpus, gpu_type=gpu_type, peak_tflops=peak_tflops, price_per_gpu_hour=price_per_gpu_hour,
        gpu_hours=gpu_hours, wall_hours=gpu_hours / gpus, dollars=gpu_hours * price_per_gpu_hour,
    )


def forecast_stage(
    stage: CostStage, gpus: int, gpu_type: str, peak_tflops: float, price_per_gpu_hour: float, mfu: float
) -> StageForecast:
    """Predicted GPU-hours, wall hours and dollars of one recipe stage.

    Args:
        stage: from :func:`cost_stages`.
        gpus: GPUs of the job.
        gpu_type: canonical GPU type (for the record).
        peak_tflops: dense bf16 peak per GPU.
        price_per_gpu_hour: USD.
        mfu: model FLOPs utilisation to assume, in (0, 1].
    """
    return forecast_flops(
        stage.samples * stage.flops_per_sample, stage=stage.name, samples=stage.samples,
        flops_per_sample=stage.flops_per_sample, gpus=gpus, gpu_type=gpu_type, peak_tflops=peak_tflops,
        price_per_gpu_hour=price_per_gpu_hour, mfu=mfu,
    )


# Open-Sora 1.0, video pretraining stage (its report; also issues 4 and 6): STDiT-XL/2 at 16x256x256,
# 80k iterations x batch 512 (8 per GPU x 64 H800), 2808 H800 GPU-hours, about $7,000.
OPENSORA_V1_STAGE2 = dict(
    model="STDiT-XL/2", num_frames=16, image_size=(256, 256), steps=80_000, batch_size=512,
    gpu_type="h800", gpu_hours=2808.0, dollars=7000.0,
)


def opensora_v1_stage(vae: AutoencoderShape | None = None) -> CostStage:
    """Open-Sora 1.0's video pretraining stage as a :class:`CostStage`.

    Args:
        vae: the same budget (steps x batch at 256x256) with another autoencoder: the clip becomes the smallest
            frame count it takes that holds the 16 frames (17 for 4x causal), and the model takes its latent
            channels. None: Open-Sora 1.0's own sd-vae-ft-ema, (1, 8, 8), 4 channels, 16 frames.
    """
    r = OPENSORA_V1_STAGE2
    model, num_frames = STDiT_models[r["model"]], r["num_frames"]
    if vae is None:
        vae = AutoencoderShape.per_frame(8, latent_channels=model.in_channels)
    num_frames = max(vae.nearest_valid_num_frames(num_frames))
    if vae.latent_channels is not None:
        model = dataclasses.replace(model, in_channels=vae.latent_channels)
    return CostStage(
        name="opensora-v1-stage2", model=model, model_name=r["model"], num_frames=num_frames,
        image_size=r["image_size"], batch_size=r["batch_size"], steps=r["steps"], vae=vae,
    )
