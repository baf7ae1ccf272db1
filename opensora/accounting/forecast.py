"""Forecasts: GPU-hours and dollars of a recipe from its FLOP count, an MFU, a GPU type and a price.

    GPU-seconds = steps * batch_size * train_flops_per_sample / (MFU * peak FLOP/s per GPU)

The recipe schema belongs to the trainer; this module reads only the few fields a forecast needs
(documented in docs/cost_accounting.md) and ignores the rest of the file, so it works on any recipe
that has them:

    vae_downsample: 8            # optional, spatial factor of the 2D VAE (latent = video / 8)
    stages:
      - name: stage2
        model: STDiT-XL/2        # a name of opensora.models.STDiT_models, or a dict of STDiTConfig fields
        num_frames: 16
        image_size: [256, 256]   # [H, W] in pixels
        batch_size: 512          # global samples per optimizer step
        steps: 80000
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from opensora.accounting.flops import latent_size_of, train_flops_per_sample
from opensora.config import ConfigError, read_file
from opensora.models.stdit import STDiT_models, STDiTConfig


@dataclass
class CostStage:
    """The fields of one recipe stage that decide its cost."""

    name: str
    model: STDiTConfig
    model_name: str  # the size name, or "custom" for a dict of fields
    num_frames: int
    image_size: tuple[int, int]  # (H, W) pixels
    batch_size: int  # global samples per step
    steps: int
    vae_downsample: int = 8

    @property
    def latent_size(self) -> tuple[int, int, int]:
        return latent_size_of(self.num_frames, self.image_size, self.vae_downsample)

    @property
    def samples(self) -> int:
        return self.steps * self.batch_size

    @property
    def flops_per_sample(self) -> float:
        return train_flops_per_sample(self.model, self.latent_size, self.model.model_max_length)


def _model_of(value, where: str) -> tuple[STDiTConfig, str]:
    if isinstance(value, str):
        if value not in STDiT_models:
            raise ConfigError(f"{where}: unknown model {value!r}; known: {', '.join(STDiT_models)}")
        return STDiT_models[value], value
    if isinstance(value, DictConfig):
        fields = OmegaConf.to_container(value, resolve=True)
        known = {f.name for f in dataclasses.fields(STDiTConfig)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown STDiT fields {unknown}; known: {sorted(known)}")
        try:
            return STDiTConfig(**fields), "custom"
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: {err}") from err
    raise ConfigError(f"{where}: expected a model name or a mapping of STDiTConfig fields, got {value!r}")


def _int(node: DictConfig, key: str, where: str, minimum: int = 1) -> int:
    if key not in node:
        raise ConfigError(f"{where}: missing key '{key}'")
    value = node[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{where}.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def read_cost_recipe(path: str | Path) -> list[CostStage]:
    """The stages of a recipe file (YAML/TOML), with only the fields a forecast needs.

    Args:
        path: recipe file; errors name the file and the key (``stages[1].image_size``).
    """
    node = read_file(path)
    vae_downsample = _int(node, "vae_downsample", str(path)) if "vae_downsample" in node else 8
    stages = node["stages"] if "stages" in node else None
    if not isinstance(stages, ListConfig) or len(stages) == 0:
        raise ConfigError(f"{path}: expected a non-empty list 'stages'")
    out = []
    for i, st in enumerate(stages):
        where = f"{path}: stages[{i}]"
        if not isinstance(st, DictConfig):
            raise ConfigError(f"{where}: expected a mapping, got {st!r}")
        for key in ("name", "model", "image_size"):
            if key not in st:
                raise ConfigError(f"{where}: missing key '{key}'")
        size = st["image_size"]
        if not isinstance(size, ListConfig) or len(size) != 2 or not all(isinstance(v, int) for v in size):
            raise ConfigError(f"{where}.image_size: expected [H, W] in pixels, got {size!r}")
        model, model_name = _model_of(st["model"], f"{where}.model")
        stage = CostStage(
            name=str(st["name"]), model=model, model_name=model_name,
            num_frames=_int(st, "num_frames", where), image_size=(int(size[0]), int(size[1])),
            batch_size=_int(st, "batch_size", where), steps=_int(st, "steps", where, minimum=0),
            vae_downsample=vae_downsample,
        )
        try:
            stage.flops_per_sample  # the patch and VAE factors must divide the size
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from err
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
        stage: from :func:`read_cost_recipe`.
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


def opensora_v1_stage(vae_downsample: int = 8) -> CostStage:
    """Open-Sora 1.0's video pretraining stage as a :class:`CostStage`."""
    r = OPENSORA_V1_STAGE2
    return CostStage(
        name="opensora-v1-stage2", model=STDiT_models[r["model"]], model_name=r["model"],
        num_frames=r["num_frames"], image_size=r["image_size"], batch_size=r["batch_size"], steps=r["steps"],
        vae_downsample=vae_downsample,
    )
