"""Video autoencoders: Open-Sora 1.0's per-frame image VAE, the 3D causal VAEs of current video models, identity.

Open-Sora 1.0 encodes every frame independently with ``stabilityai/sd-vae-ft-ema`` (a diffusers
``AutoencoderKL``, 8x spatial downsampling, 4 latent channels) and multiplies the latent by 0.18215 so that it
has roughly unit variance. Time is not compressed: the latent is (B, 4, T, H/8, W/8). Current open video models
compress time as well, with causal 3D VAEs (diffusers ``AutoencoderKLWan``, ``AutoencoderKLHunyuanVideo``,
``AutoencoderKLCogVideoX``, ``AutoencoderKLLTXVideo``): 4x8x8 to 8x32x32, 16 to 128 channels, and 4k+1 frames
in (LTX-Video, CogVideoX: 8k+1; ``opensora.models.autoencoders`` has the shape arithmetic and says why).

All share one interface (:class:`VideoAutoencoder`), used by training, latent caching and sampling:
``encode(x) -> z`` (normalised as the autoencoder's authors do), ``decode(z) -> x``, ``compression`` (t, h, w)
(``patch_size`` is the same tuple, its older name), ``out_channels``, ``causal``, ``get_latent_size``,
``valid_num_frames`` / ``nearest_valid_num_frames`` and ``describe()``.

Weights load from a local directory or the local Hugging Face cache, never from the network;
:func:`load_autoencoder` picks the class from the directory's ``config.json`` (``_class_name``), so a path is all
a config needs to name.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
)
from diffusers.models.modeling_utils import ModelMixin
from einops import rearrange
from torch import nn

from opensora.models.autoencoders import AutoencoderShape

# Scale of sd-vae-ft-ema latents (Stable Diffusion's value, and AutoencoderKL's config default), used by Open-Sora 1.0.
SD_SCALING_FACTOR = 0.18215

# Default work per VAE call (VAEConfig.micro_batch_size). Per-frame image VAE: 32 frames. One 256x256 frame is
# ~0.27 TFLOP through sd-vae-ft-ema's encoder (4.36 TFLOP for 16 frames, torch FlopCounterMode), so Open-Sora
# 1.0's 4 frames per call gave an H100 about a millisecond of math at peak, against ~150 operator launches per
# call at a few microseconds each: per-call overhead as large as the work. 32 frames is ~9 TFLOP per call; its
# largest activations (128 channels at full resolution, bf16) are 0.5 GiB per tensor at 256x256 and 2 GiB at
# 512x512, a few GiB in all beside the DiT's tens. (Chosen from these counts; not yet timed on a GPU.) 3D VAEs:
# 1 clip per call, as diffusers' slicing does: one 17x256x256 clip is already ~6 TFLOP (Wan 2.1) to ~14
# (HunyuanVideo) through the encoder (tools/cost.py autoencoders --vae-flops).
FRAMES_PER_CALL = 32
CLIPS_PER_CALL = 1


@dataclass
class VAEConfig:
    # "auto": the class named by config.json's _class_name (AutoencoderKL per frame, or a 3D video VAE);
    # "kl": diffusers AutoencoderKL per frame (what bundles before "auto" say); "identity": pixel space (CPU demos)
    type: str = "auto"
    path: str | None = None  # local dir, or a Hugging Face repo id already in the local cache (never downloaded)
    subfolder: str | None = None  # e.g. "vae" inside a full diffusers pipeline repo
    # Work per VAE call, bounding activation memory: frames for a per-frame VAE, clips for a 3D one. None: 32 frames
    # / 1 clip (FRAMES_PER_CALL / CLIPS_PER_CALL above say why). Posterior modes (what the latent cache stores) do
    # not depend on it; sampled latents do, through the order of the noise draws.
    micro_batch_size: int | None = None
    # Latents are normalised by this after encoding (undone before decoding). None: the model config's value
    # (sd-vae-ft-ema: 0.18215, Open-Sora 1.0's; bundles that wrote 0.18215 encode exactly as before), or for
    # classes normalised per channel (Wan, LTX), the latents_mean / latents_std their authors ship.
    scaling_factor: float | None = None
    tiling: bool = False  # diffusers' tiled encode/decode (enable_tiling): bounded memory at 512x512 and beyond

    def __post_init__(self):
        if self.type not in ("auto", "kl", "identity"):
            raise ValueError(f"vae.type must be 'auto', 'kl' or 'identity', got {self.type!r}")
        if self.type != "identity" and not self.path:
            raise ValueError(f"vae.path is required for vae.type={self.type!r} (a local dir or a cached repo id)")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"vae.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.scaling_factor is not None and not self.scaling_factor > 0:
            raise ValueError(f"vae.scaling_factor must be > 0, got {self.scaling_factor}")


# ------------------------------------------------------------------------------------- per-class facts


def _kl_compression(c: Mapping[str, Any]) -> tuple[int, int, int]:
    # diffusers Encoder: every down block but the last halves H and W; one image at a time, so time is untouched.
    f = 2 ** (len(c["block_out_channels"]) - 1)
    return 1, f, f


def _wan_compression(c: Mapping[str, Any]) -> tuple[int, int, int]:
    # WanEncoder3d: every stage but the last halves H and W, temperal_downsample says which also halve time;
    # Wan 2.2 patchifies patch_size x patch_size pixels first (the config's scale_factor_spatial is the product).
    f = 2 ** (len(c["dim_mult"]) - 1) * (c["patch_size"] or 1)
    return 2 ** sum(bool(d) for d in c["temperal_downsample"]), f, f


def _hunyuan_compression(c: Mapping[str, Any]) -> tuple[int, int, int]:
    # HunyuanVideoEncoder3D places its down-sampling layers from these two config fields.
    f = int(c["spatial_compression_ratio"])
    return int(c["temporal_compression_ratio"]), f, f


def _cogvideox_compression(c: Mapping[str, Any]) -> tuple[int, int, int]:
    # CogVideoXEncoder3D: every down block but the last halves H and W; the first log2(ratio) also halve time.
    f = 2 ** (len(c["block_out_channels"]) - 1)
    return int(c["temporal_compression_ratio"]), f, f


def _ltx_compression(c: Mapping[str, Any]) -> tuple[int, int, int]:
    # AutoencoderKLLTXVideo.__init__: explicit ratios if the config has them (0.9.5+), else patchify x 2 per
    # spatio-temporal down block.
    blocks = 2 ** sum(bool(s) for s in c["spatio_temporal_scaling"])
    f = c["spatial_compression_ratio"] or c["patch_size"] * blocks
    return int(c["temporal_compression_ratio"] or c["patch_size_t"] * blocks), int(f), int(f)


@dataclass(frozen=True)
class LatentNorm:
    """What an autoencoder's authors do to latents: ``(z - mean) / std * scale`` (None: 0 / 1)."""

    mean: list[float] | float | None
    std: list[float] | None
    scale: float


def _scale_only(module: ModelMixin) -> LatentNorm:
    # HunyuanVideo and CogVideoX pipelines: latents * vae.config.scaling_factor.
    return LatentNorm(None, None, float(module.config.scaling_factor))


def _wan_norm(module: ModelMixin) -> LatentNorm:
    # Wan pipelines: (z - config.latents_mean) * (1 / config.latents_std), per channel; no scaling factor.
    return LatentNorm(list(module.config.latents_mean), list(module.config.latents_std), 1.0)


def _ltx_norm(module: ModelMixin) -> LatentNorm:
    # LTX pipeline (_normalize_latents): (z - latents_mean) * scaling_factor / latents_std, per channel; mean and
    # std are buffers stored with the weights, not config fields.
    return LatentNorm(module.latents_mean.tolist(), module.latents_std.tolist(), float(module.config.scaling_factor))


def _kl_norm(module: ModelMixin) -> LatentNorm:
    # Stable Diffusion: z * scaling_factor; SD3 / Flux VAEs also subtract shift_factor first.
    return LatentNorm(module.config.shift_factor, None, float(module.config.scaling_factor))


def _no_decode_kwargs(module: ModelMixin, z: torch.Tensor) -> dict[str, Any]:
    return {}


def _ltx_decode_kwargs(module: ModelMixin, z: torch.Tensor) -> dict[str, Any]:
    # LTX-Video 0.9.1+ decoders are timestep-conditioned; the pipeline's default decode_timestep is 0 (clean latents).
    if not module.config.timestep_conditioning:
        return {}
    return {"temb": torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)}


@dataclass(frozen=True)
class AutoencoderClass:
    """How to read one diffusers autoencoder class: its factors, channels, normalisation, decode arguments."""

    module_class: type[ModelMixin]
    compression: Callable[[Mapping[str, Any]], tuple[int, int, int]]  # (t, h, w) from the config
    latent_channels: Callable[[Mapping[str, Any]], int]  # from the config
    norm: Callable[[ModelMixin], LatentNorm]
    causal: bool  # t*k + 1 frames: the first frame is encoded alone
    per_frame: bool = False  # an image VAE, applied to each frame
    # Latent frame counts that decode back to (T' - 1) * t + 1 frames are 1 + latent_frame_step * j. CogVideoX's
    # decoder takes latent frames in pairs after the first (num_latent_frames_batch_size = 2): an even count
    # comes back one frame per latent frame too long (4 -> 16 frames, not 13), so it needs 8k+1 frames.
    latent_frame_step: int = 1
    decode_kwargs: Callable[[ModelMixin, torch.Tensor], dict[str, Any]] = field(default=_no_decode_kwargs)


# The classes `vae.type: auto` loads, by config.json's _class_name. Facts read from diffusers 0.42's
# models/autoencoders/autoencoder_kl*.py and the matching pipelines (see docs/autoencoders.md).
AUTOENCODER_CLASSES: dict[str, AutoencoderClass] = {
    "AutoencoderKL": AutoencoderClass(
        AutoencoderKL, _kl_compression, lambda c: int(c["latent_channels"]), _kl_norm, causal=False, per_frame=True
    ),
    "AutoencoderKLWan": AutoencoderClass(
        AutoencoderKLWan, _wan_compression, lambda c: int(c["z_dim"]), _wan_norm, causal=True
    ),
    "AutoencoderKLHunyuanVideo": AutoencoderClass(
        AutoencoderKLHunyuanVideo, _hunyuan_compression, lambda c: int(c["latent_channels"]), _scale_only, causal=True
    ),
    "AutoencoderKLCogVideoX": AutoencoderClass(
        AutoencoderKLCogVideoX, _cogvideox_compression, lambda c: int(c["latent_channels"]), _scale_only, causal=True,
        latent_frame_step=2,
    ),
    "AutoencoderKLLTXVideo": AutoencoderClass(
        AutoencoderKLLTXVideo, _ltx_compression, lambda c: int(c["latent_channels"]), _ltx_norm, causal=True,
        decode_kwargs=_ltx_decode_kwargs,
    ),
}


# ------------------------------------------------------------------------------------------- interface


class VideoAutoencoder(nn.Module, abc.ABC):
    """The interface every autoencoder here has; the frame rule and size logic live here.

    Args:
        compression: (t, h, w) factors: a (T, H, W) video becomes a (T', H/h, W/w) latent.
        out_channels: latent channels.
        causal: the first frame is encoded alone, so T = t*k + 1 frames give T' = k + 1 latent frames.
        name: names the autoencoder in errors (its class).
        frame_step: valid frame counts are ``frame_step * k + 1`` (causal) or multiples of it; None: t.
    """

    def __init__(
        self, compression: tuple[int, int, int], out_channels: int, causal: bool, name: str,
        frame_step: int | None = None,
    ):
        super().__init__()
        self.compression: tuple[int, int, int] = tuple(int(f) for f in compression)  # type: ignore[assignment]
        self.out_channels: int = int(out_channels)
        self.causal: bool = bool(causal)
        self.name: str = name
        self.frame_step: int = self.compression[0] if frame_step is None else int(frame_step)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The (t, h, w) compression factors (the name Open-Sora 1.0 and older callers use)."""
        return self.compression

    @property
    def shape(self) -> AutoencoderShape:
        """What it does to shapes, as a recipe or the cost forecast declares it without weights."""
        return AutoencoderShape(self.compression, self.causal, self.frame_step, self.out_channels, self.name)

    def valid_num_frames(self, num_frames: int) -> bool:
        """Whether a ``num_frames``-frame video fits the frame rule (any / t*k + 1 / multiple of t)."""
        return self.shape.valid_num_frames(num_frames)

    def nearest_valid_num_frames(self, num_frames: int) -> tuple[int, ...]:
        """``num_frames`` if valid, else the valid counts just below and above it (e.g. 13 and 17 for 16)."""
        return self.shape.nearest_valid_num_frames(num_frames)

    def get_latent_size(self, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
        """(T, H, W) of a video -> (T', H', W') of its latent; ValueError naming the size (and, for a frame
        count that does not fit, the nearest valid ones)."""
        return self.shape.latent_size(input_size)

    def describe(self) -> dict[str, Any]:
        """What decides the latents apart from the weights: class, factors, frame rule, channels, normalisation.

        JSON-serialisable, for records and cache keys.
        """
        return {"class": self.name, "compression": list(self.compression), "causal": self.causal,
                "frame_step": self.frame_step, "latent_channels": self.out_channels,
                "normalisation": self._norm_description()}

    def _norm_description(self) -> dict[str, Any]:
        return {"mean": None, "std": None, "scale": 1.0}

    def _check_video(self, x: torch.Tensor) -> None:
        """A clear error (the nearest valid frame counts) before a model gets a size it would mangle."""
        if x.ndim != 5:
            raise ValueError(f"{self.name}: expected a (B, C, T, H, W) video, got shape {tuple(x.shape)}")
        self.get_latent_size(tuple(x.shape[2:]))  # type: ignore[arg-type]

    @abc.abstractmethod
    def encode(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True
    ) -> torch.Tensor:
        """(B, 3, T, H, W) video in [-1, 1] -> (B, C, T', H', W') normalised latents."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, T', H', W') latents from :meth:`encode` -> (B, 3, T, H, W) video in [-1, 1]."""


# --------------------------------------------------------------------------------------------- loading


def read_autoencoder_config(path: str | Path, subfolder: str | None = None) -> dict[str, Any]:
    """The ``config.json`` of a diffusers autoencoder, from a local dir or the local HF cache (never downloaded).

    Args:
        path: a directory, or a Hugging Face repo id already in the local cache.
        subfolder: sub-directory holding the autoencoder (``"vae"`` in a pipeline repo).
    Raises:
        FileNotFoundError naming the path: no such directory / cached repo, or no config.json in it.
    """
    where = f"{path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    try:
        return dict(AutoencoderKL.load_config(str(path), subfolder=subfolder, local_files_only=True))
    except OSError as err:  # diffusers raises EnvironmentError (= OSError) for a missing dir/repo/file
        folder = Path(path) / (subfolder or "")
        if folder.is_dir():
            hint = (" It looks like a diffusers pipeline repo: set subfolder 'vae'."
                    if (folder / "model_index.json").is_file() and (folder / "vae").is_dir() else "")
            raise FileNotFoundError(
                f"cannot load the VAE from {where}: the directory has no config.json, so the autoencoder class "
                f"cannot be told.{hint}"
            ) from err
        raise FileNotFoundError(
            f"cannot load the VAE from {where}: give a local directory with config.json and weights, or a "
            f"Hugging Face repo id already in the local cache (nothing is downloaded). Loader said: {err}"
        ) from err


def autoencoder_class(config: Mapping[str, Any], source: str) -> AutoencoderClass:
    """The :class:`AutoencoderClass` of a config.json's ``_class_name``; ValueError listing the supported ones."""
    name = config["_class_name"] if "_class_name" in config else None
    if name not in AUTOENCODER_CLASSES:
        raise ValueError(
            f"{source}: config.json names _class_name {name!r}, which is not a supported autoencoder; supported: "
            f"{', '.join(AUTOENCODER_CLASSES)}"
        )
    return AUTOENCODER_CLASSES[name]


def _load_module(
    module_class: type[ModelMixin], path: str | Path, subfolder: str | None, torch_dtype: torch.dtype | None
) -> ModelMixin:
    try:
        return module_class.from_pretrained(str(path), subfolder=subfolder, torch_dtype=torch_dtype,
                                            local_files_only=True)
    except OSError as err:  # config.json was there: the weights are not
        where = f"{path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        raise FileNotFoundError(f"cannot load the {module_class.__name__} weights from {where}: {err}") from err


def load_autoencoder(
    path: str | Path,
    subfolder: str | None = None,
    *,
    micro_batch_size: int | None = None,
    scaling_factor: float | None = None,
    tiling: bool = False,
    torch_dtype: torch.dtype | None = None,
) -> VideoAutoencoderKL | VideoAutoencoder3D:
    """Loads the autoencoder in ``path``, of the class its config.json names (``_class_name``).

    Args:
        path: a directory written by ``save_pretrained`` (or a diffusers snapshot), or a Hugging Face repo id
            already in the local cache.
        subfolder: sub-directory holding the autoencoder (``"vae"`` in a pipeline repo).
        micro_batch_size: frames (per-frame VAE) or clips (3D VAE) per call; None: the class's default.
        scaling_factor: overrides the normalisation's scale; None: the model's own (see :class:`VAEConfig`).
        tiling: turn on diffusers' tiled encode/decode.
        torch_dtype: load the weights in this dtype (default: as stored).
    """
    source = f"{path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
    cls = autoencoder_class(read_autoencoder_config(path, subfolder), source)
    wrapper = VideoAutoencoderKL if cls.per_frame else VideoAutoencoder3D
    return wrapper.from_pretrained(path, subfolder=subfolder, micro_batch_size=micro_batch_size,
                                   scaling_factor=scaling_factor, tiling=tiling, torch_dtype=torch_dtype)


# ------------------------------------------------------------------------------------- implementations


class _DiffusersAutoencoder(VideoAutoencoder):
    """What the autoencoders that wrap a diffusers model share: loading from local files only, and saving."""

    module: ModelMixin

    @classmethod
    @abc.abstractmethod
    def _module_class(cls, config: Mapping[str, Any], source: str) -> type[ModelMixin]:
        """The diffusers class that ``config`` (a config.json) names, if this wrapper takes it; else ValueError."""

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        subfolder: str | None = None,
        micro_batch_size: int | None = None,
        scaling_factor: float | None = None,
        torch_dtype: torch.dtype | None = None,
        tiling: bool = False,
    ):
        """Loads the autoencoder with diffusers' own loader, from local files only.

        Args:
            path: a directory written by ``save_pretrained`` (or a diffusers snapshot), or a Hugging Face repo id
                already in the local cache (e.g. ``stabilityai/sd-vae-ft-ema``, or
                ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers`` with subfolder ``vae``).
            subfolder: sub-directory holding the VAE (``"vae"`` in a pipeline repo).
            micro_batch_size: frames (per-frame VAE) or clips (3D VAE) per VAE call; None: the class default.
            scaling_factor: overrides the normalisation's scale (None: the authors', e.g. 0.18215 for SD-VAE).
            torch_dtype: load the weights in this dtype (default: as stored).
            tiling: turn on diffusers' tiled encode/decode (bounded memory at large H, W).
        """
        source = f"{path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
        module = _load_module(cls._module_class(read_autoencoder_config(path, subfolder), source), path, subfolder,
                              torch_dtype)
        if tiling:
            module.enable_tiling()
        return cls(module, micro_batch_size=micro_batch_size, scaling_factor=scaling_factor)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Writes the VAE (config.json + safetensors) so that :meth:`from_pretrained` reads it back."""
        self.module.save_pretrained(str(out_dir))
        return Path(out_dir)


class VideoAutoencoderKL(_DiffusersAutoencoder):
    """A diffusers ``AutoencoderKL`` (an image VAE) applied to each frame of a video: compression (1, f, f).

    Args:
        module: the image VAE.
        micro_batch_size: frames per VAE call (bounds memory; the posterior mode does not depend on it,
            sampled latents do through the order of the noise draws). None: ``FRAMES_PER_CALL``.
        scaling_factor: multiplies latents after encoding (divides before decoding). None: the module config's
            (0.18215 for the Stable Diffusion VAEs); a config ``shift_factor`` (SD3 / Flux VAEs) is subtracted first.
    """

    def __init__(self, module: AutoencoderKL, micro_batch_size: int | None = None, scaling_factor: float | None = None):
        cls = AUTOENCODER_CLASSES["AutoencoderKL"]
        super().__init__(cls.compression(module.config), cls.latent_channels(module.config), cls.causal,
                         "AutoencoderKL")
        micro_batch_size = FRAMES_PER_CALL if micro_batch_size is None else micro_batch_size
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        norm = cls.norm(module)
        self.module = module
        self.micro_batch_size = micro_batch_size
        self.scaling_factor: float = norm.scale if scaling_factor is None else float(scaling_factor)
        self.shift_factor: float | None = norm.mean  # type: ignore[assignment]  # a scalar for AutoencoderKL

    @classmethod
    def _module_class(cls, config: Mapping[str, Any], source: str) -> type[ModelMixin]:
        name = config["_class_name"] if "_class_name" in config else "AutoencoderKL"  # very old configs lack it
        if name != "AutoencoderKL":
            raise ValueError(
                f"{source}: config.json names {name}, not the per-frame AutoencoderKL that vae.type 'kl' loads; "
                f"use vae.type 'auto' (load_autoencoder), which picks the class from config.json"
            )
        return AutoencoderKL

    def _norm_description(self) -> dict[str, Any]:
        return {"mean": self.shift_factor, "std": None, "scale": self.scaling_factor}

    def encode(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True
    ) -> torch.Tensor:
        """Encodes a video to scaled latents, frame by frame.

        Args:
            x: (B, 3, T, H, W) video in [-1, 1].
            generator: random source for sampling the posterior (ignored with ``sample_posterior=False``).
            sample_posterior: draw z ~ q(z|x) as Open-Sora does in training; False takes its mode (the mean),
                which is deterministic.
        Returns:
            (B, C, T, H/f, W/f) latents, ``(z - shift_factor) * scaling_factor``.
        """
        self._check_video(x)
        B = x.shape[0]
        x = rearrange(x, "B C T H W -> (B T) C H W").to(self.module.dtype)
        latents = []
        for chunk in x.split(self.micro_batch_size):
            dist = self.module.encode(chunk).latent_dist
            latents.append(dist.sample(generator) if sample_posterior else dist.mode())
        z = torch.cat(latents)  # (B*T, C, h, w)
        if self.shift_factor is not None:
            z = z - self.shift_factor
        z = z * self.scaling_factor
        return rearrange(z, "(B T) C H W -> B C T H W", B=B)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decodes scaled latents to a video, frame by frame.

        Args:
            z: (B, C, T, h, w) latents as returned by :meth:`encode`.
        Returns:
            (B, 3, T, h*f, w*f) video clamped to [-1, 1].
        """
        B = z.shape[0]
        z = rearrange(z, "B C T H W -> (B T) C H W").to(self.module.dtype) / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        frames = [self.module.decode(chunk).sample for chunk in z.split(self.micro_batch_size)]
        x = torch.cat(frames).clamp(-1, 1)  # (B*T, 3, H, W)
        return rearrange(x, "(B T) C H W -> B C T H W", B=B)


class VideoAutoencoder3D(_DiffusersAutoencoder):
    """A diffusers 3D video VAE (Wan 2.1 / 2.2, HunyuanVideo, CogVideoX, LTX-Video) on whole clips.

    What differs between the classes (how to read the factors, the normalisation, extra decode arguments) is
    in :data:`AUTOENCODER_CLASSES`; this class does what they share: micro-batching over clips, the frame rule,
    and ``(z - mean) / std * scale`` after encoding (undone before decoding), in float32.

    Args:
        module: one of the classes in :data:`AUTOENCODER_CLASSES` that is not per-frame.
        micro_batch_size: clips per VAE call (None: ``CLIPS_PER_CALL``).
        scaling_factor: overrides the normalisation's scale (None: the authors').
    """

    def __init__(self, module: ModelMixin, micro_batch_size: int | None = None, scaling_factor: float | None = None):
        name = type(module).__name__
        if name not in AUTOENCODER_CLASSES or AUTOENCODER_CLASSES[name].per_frame:
            raise ValueError(f"{name} is not a 3D video autoencoder; supported: "
                             f"{', '.join(n for n, c in AUTOENCODER_CLASSES.items() if not c.per_frame)}")
        cls = AUTOENCODER_CLASSES[name]
        compression = cls.compression(module.config)
        super().__init__(compression, cls.latent_channels(module.config), cls.causal, name,
                         frame_step=compression[0] * cls.latent_frame_step)
        micro_batch_size = CLIPS_PER_CALL if micro_batch_size is None else micro_batch_size
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.module = module
        self.micro_batch_size = micro_batch_size
        self._decode_kwargs = cls.decode_kwargs
        norm = cls.norm(module)
        self.scaling_factor: float = norm.scale if scaling_factor is None else float(scaling_factor)
        C = self.out_channels
        stats = {}
        for what, values, neutral in (("mean", norm.mean, 0.0), ("std", norm.std, 1.0)):
            values = [neutral] * C if values is None else list(values)
            if len(values) != C:
                raise ValueError(f"{name}: latents_{what} has {len(values)} entries for {C} latent channels")
            stats[what] = torch.tensor(values, dtype=torch.float32)
        # Buffers, so that .to(device) moves them and the weights' fingerprint (latent cache) covers them.
        self.register_buffer("latents_mean", stats["mean"])
        self.register_buffer("latents_std", stats["std"])
        self._norm = norm

    @classmethod
    def _module_class(cls, config: Mapping[str, Any], source: str) -> type[ModelMixin]:
        ae = autoencoder_class(config, source)
        if ae.per_frame:
            raise ValueError(f"{source}: config.json names the per-frame AutoencoderKL: load it with "
                             "VideoAutoencoderKL, or load_autoencoder, which picks the class")
        return ae.module_class

    def _norm_description(self) -> dict[str, Any]:
        return {"mean": self._norm.mean, "std": self._norm.std, "scale": self.scaling_factor}

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1, 1, 1, 1)  # per channel of (B, C, T, H, W)
        return self.latents_mean.view(shape).float(), self.latents_std.view(shape).float()

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> what the diffusion model sees: ``(z - mean) / std * scale`` (float32 inside)."""
        mean, std = self._stats(z)
        return ((z.float() - mean) / std * self.scaling_factor).to(z.dtype)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        mean, std = self._stats(z)
        return (z.float() / self.scaling_factor * std + mean).to(z.dtype)

    def encode(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True
    ) -> torch.Tensor:
        """Encodes clips to normalised latents, ``micro_batch_size`` clips per call.

        Args:
            x: (B, 3, T, H, W) video in [-1, 1]; T must fit the frame rule (e.g. 4k+1), H and W divide by h, w.
            generator: random source for sampling the posterior (ignored with ``sample_posterior=False``).
            sample_posterior: draw z ~ q(z|x); False takes its mode (the mean), which is deterministic.
        Returns:
            (B, C, T', H/h, W/w) latents, normalised as the autoencoder's authors do.
        """
        self._check_video(x)
        x = x.to(self.module.dtype)
        latents = []
        for chunk in x.split(self.micro_batch_size):
            dist = self.module.encode(chunk).latent_dist
            latents.append(dist.sample(generator) if sample_posterior else dist.mode())
        return self.normalize(torch.cat(latents))  # (B, C, T', h, w)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decodes normalised latents to clips, ``micro_batch_size`` clips per call.

        Args:
            z: (B, C, T', h, w) latents as returned by :meth:`encode`.
        Returns:
            (B, 3, T, h*f, w*f) video clamped to [-1, 1], T = (T' - 1) * t + 1 for a causal VAE.
        """
        z = self.denormalize(z).to(self.module.dtype)
        clips = [self.module.decode(chunk, **self._decode_kwargs(self.module, chunk)).sample
                 for chunk in z.split(self.micro_batch_size)]
        return torch.cat(clips).clamp(-1, 1)


class IdentityAutoencoder(VideoAutoencoder):
    """Pixel space as "latent" space: encode and decode return the input.

    For CPU demos and tests, where a tiny random VAE would turn every sample into noise and make the
    result meaningless; the diffusion model then learns the pixels directly.
    """

    def __init__(self):
        super().__init__((1, 1, 1), 3, causal=False, name="identity")

    def encode(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True
    ) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> the same tensor (``generator``/``sample_posterior`` unused)."""
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, 3, T, H, W) -> the same values clamped to [-1, 1], as a VAE's output would be."""
        return z.clamp(-1, 1)


def build_vae(
    cfg: VAEConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> VideoAutoencoder:
    """Builds the autoencoder named by ``cfg``, frozen (eval mode, no gradients): it is never trained here.

    Args:
        cfg: the VAE section of a config.
        device: move the weights there (default: CPU).
        dtype: weight dtype, e.g. ``torch.bfloat16`` on GPU (default: as stored).
    """
    if cfg.type == "identity":
        return IdentityAutoencoder()
    kwargs = dict(subfolder=cfg.subfolder, micro_batch_size=cfg.micro_batch_size, scaling_factor=cfg.scaling_factor,
                  tiling=cfg.tiling, torch_dtype=dtype)
    path: str = cfg.path  # type: ignore[assignment]  # __post_init__ guarantees a path for "auto" / "kl"
    vae = VideoAutoencoderKL.from_pretrained(path, **kwargs) if cfg.type == "kl" else load_autoencoder(path, **kwargs)
    if device is not None:
        vae = vae.to(device)
    return vae.eval().requires_grad_(False)


def autoencoder_shape(cfg: VAEConfig) -> AutoencoderShape:
    """What the autoencoder ``cfg`` names does to shapes (factors, frame rule, channels), from its config.json
    alone: no weights are loaded, so a wrong frame count can be refused before any work. The same shape as
    ``build_vae(cfg).shape``.

    Raises:
        FileNotFoundError / ValueError as :func:`build_vae` would for a missing directory or unsupported class.
    """
    if cfg.type == "identity":
        return IdentityAutoencoder().shape
    path: str = cfg.path  # type: ignore[assignment]  # __post_init__ guarantees a path for "auto" / "kl"
    config = read_autoencoder_config(path, cfg.subfolder)
    source = f"{path}" + (f" (subfolder {cfg.subfolder!r})" if cfg.subfolder else "")
    cls = AUTOENCODER_CLASSES["AutoencoderKL"] if cfg.type == "kl" else autoencoder_class(config, source)
    compression = cls.compression(config)
    name = config["_class_name"] if "_class_name" in config else "AutoencoderKL"
    return AutoencoderShape(compression, cls.causal, compression[0] * cls.latent_frame_step,
                            cls.latent_channels(config), name)


# ---------------------------------------------------------------------------------- tiny random models


def _tiny_wan_norm(channels: int) -> dict[str, list[float]]:
    # Not 0 / 1, so that tests see the normalisation act.
    return {"latents_mean": [0.25 * (i % 4) - 0.4 for i in range(channels)],
            "latents_std": [0.5 + 0.5 * (i % 3) for i in range(channels)]}


# kind -> (class, constructor arguments). Real factors where they cost nothing on CPU (Wan 2.1, HunyuanVideo,
# CogVideoX 4x8x8, Wan 2.2 4x16x16); LTX keeps its 8x time but drops the 4x4 patchify (8x8x8), so that a
# 17x16x16 clip still has a 2x2 latent. Channels are 8 wide, one layer per block: tens of ms per clip on CPU.
TINY_VAE_CONFIGS: dict[str, tuple[type[ModelMixin], dict[str, Any]]] = {
    "kl": (AutoencoderKL, dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),  # two blocks -> one 2x downsampling
        layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32, scaling_factor=SD_SCALING_FACTOR,
    )),
    "wan2.1": (AutoencoderKLWan, dict(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        scale_factor_temporal=4, scale_factor_spatial=8, **_tiny_wan_norm(4),
    )),
    "wan2.2": (AutoencoderKLWan, dict(
        base_dim=8, z_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_temporal=4,
        scale_factor_spatial=16, **_tiny_wan_norm(8),
    )),
    "hunyuan": (AutoencoderKLHunyuanVideo, dict(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
    )),
    "cogvideox": (AutoencoderKLCogVideoX, dict(
        latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
    )),
    "ltx": (AutoencoderKLLTXVideo, dict(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1), patch_size=1,
        scaling_factor=0.5,  # LTX-Video's own is 1.0; 0.5 lets tests see the scale act
    )),
}


def make_tiny_vae(out_dir: str | Path, seed: int = 0, kind: str = "kl") -> Path:
    """Saves a tiny random autoencoder of one class to ``out_dir`` (milliseconds per clip on CPU).

    For the debug model bundle and tests: it exercises the real loading and encode/decode code paths.
    Its latents carry no meaning (weights are random), so use the identity autoencoder for demos that
    should produce recognisable output.

    Args:
        out_dir: directory to write config.json and diffusion_pytorch_model.safetensors into.
        seed: weight initialisation seed (same seed -> same weights).
        kind: one of :data:`TINY_VAE_CONFIGS`: ``"kl"`` (per-frame AutoencoderKL, f=2, 4 channels; the
            default), ``"wan2.1"`` (4x8x8, 4 ch, 17x16x16 -> 5x2x2), ``"wan2.2"`` (4x16x16, 8 ch),
            ``"hunyuan"``, ``"cogvideox"`` (4x8x8, 4 ch), ``"ltx"`` (8x8x8, 8 ch).
    Returns:
        ``out_dir`` as a Path, loadable with :func:`load_autoencoder` (and, for "kl",
        :meth:`VideoAutoencoderKL.from_pretrained`).
    """
    if kind not in TINY_VAE_CONFIGS:
        raise ValueError(f"unknown tiny VAE kind {kind!r}; one of {', '.join(TINY_VAE_CONFIGS)}")
    module_class, kwargs = TINY_VAE_CONFIGS[kind]
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state untouched
        torch.manual_seed(seed)
        module = module_class(**kwargs)
        if module_class is AutoencoderKLLTXVideo:  # per-channel statistics live in buffers, saved with the weights
            C = kwargs["latent_channels"]
            module.latents_mean.copy_(torch.linspace(-0.5, 0.5, C))
            module.latents_std.copy_(torch.linspace(0.5, 2.0, C))
    module.save_pretrained(str(out_dir))
    return Path(out_dir)

