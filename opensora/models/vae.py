"""Video autoencoders: the image VAE of Stable Diffusion applied frame by frame, and a pixel-space identity.

Open-Sora 1.0 encodes every frame independently with ``stabilityai/sd-vae-ft-ema`` (a diffusers
``AutoencoderKL`` with 8x spatial downsampling, 4 latent channels) and multiplies the latent by
0.18215 so that it has roughly unit variance. Time is not compressed, so the latent is (B, 4, T, H/8, W/8).

Both autoencoders share one interface, used by training, latent caching and sampling:
``encode(x) -> z``, ``decode(z) -> x``, ``out_channels``, ``patch_size`` (the (T, H, W) compression
factors) and ``get_latent_size((T, H, W))``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from einops import rearrange
from torch import nn

# Scale of sd-vae-ft-ema latents (Stable Diffusion's value), used by Open-Sora 1.0.
SD_SCALING_FACTOR = 0.18215


@dataclass
class VAEConfig:
    type: str = "kl"  # "kl": diffusers AutoencoderKL per frame; "identity": train in pixel space (CPU demos)
    path: str | None = None  # local dir, or a Hugging Face repo id already in the local cache (never downloaded)
    subfolder: str | None = None  # e.g. "vae" inside a full Stable Diffusion repo
    micro_batch_size: int = 4  # frames per VAE call; bounds activation memory at high resolution
    scaling_factor: float = SD_SCALING_FACTOR  # latents are multiplied by this after encoding

    def __post_init__(self):
        if self.type not in ("kl", "identity"):
            raise ValueError(f"vae.type must be 'kl' or 'identity', got {self.type!r}")
        if self.type == "kl" and not self.path:
            raise ValueError("vae.path is required for vae.type='kl' (a local dir or a cached repo id)")
        if self.micro_batch_size < 1:
            raise ValueError(f"vae.micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if not self.scaling_factor > 0:
            raise ValueError(f"vae.scaling_factor must be > 0, got {self.scaling_factor}")


def _check_latent_size(input_size: tuple[int, int, int], patch_size: tuple[int, int, int]) -> tuple[int, int, int]:
    """(T, H, W) -> latent (T', H', W'); every axis must divide by the autoencoder's factor on that axis."""
    if len(input_size) != 3:
        raise ValueError(f"input size must be (T, H, W), got {tuple(input_size)}")
    for size, factor, axis in zip(input_size, patch_size, "THW"):
        if size % factor:
            raise ValueError(
                f"video size (T, H, W) = {tuple(input_size)}: {axis}={size} is not divisible by the "
                f"autoencoder's downsampling factor {factor}"
            )
    return tuple(size // factor for size, factor in zip(input_size, patch_size))  # type: ignore[return-value]


class VideoAutoencoderKL(nn.Module):
    """A diffusers ``AutoencoderKL`` (an image VAE) applied to each frame of a video.

    Args:
        module: the image VAE.
        micro_batch_size: frames per VAE call (bounds memory; the posterior mode does not depend on it,
            sampled latents do through the order of the noise draws).
        scaling_factor: multiplies latents after encoding (divides before decoding).
    """

    def __init__(self, module: AutoencoderKL, micro_batch_size: int = 4, scaling_factor: float = SD_SCALING_FACTOR):
        super().__init__()
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.module = module
        self.micro_batch_size = micro_batch_size
        self.scaling_factor = scaling_factor
        self.out_channels: int = module.config.latent_channels
        # Each down block but the last halves H and W (diffusers Encoder); time is untouched.
        factor = 2 ** (len(module.config.block_out_channels) - 1)
        self.patch_size: tuple[int, int, int] = (1, factor, factor)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        subfolder: str | None = None,
        micro_batch_size: int = 4,
        scaling_factor: float = SD_SCALING_FACTOR,
        torch_dtype: torch.dtype | None = None,
    ) -> "VideoAutoencoderKL":
        """Loads the image VAE with diffusers' own loader, from local files only.

        Args:
            path: a directory written by ``save_pretrained`` (or a diffusers repo snapshot), or a Hugging Face
                repo id such as ``stabilityai/sd-vae-ft-ema`` that is already in the local cache.
            subfolder: sub-directory holding the VAE (``"vae"`` in a full pipeline repo).
            micro_batch_size: frames per VAE call.
            scaling_factor: latent scale (0.18215 for the Stable Diffusion VAEs).
            torch_dtype: load the weights in this dtype (default: as stored).
        """
        try:
            module = AutoencoderKL.from_pretrained(
                str(path), subfolder=subfolder, torch_dtype=torch_dtype, local_files_only=True
            )
        except OSError as err:  # diffusers raises EnvironmentError (= OSError) for a missing dir/repo/file
            where = f"{path}" + (f" (subfolder {subfolder!r})" if subfolder else "")
            raise FileNotFoundError(
                f"cannot load the VAE from {where}: give a local directory with config.json and weights, or a "
                f"Hugging Face repo id already in the local cache (nothing is downloaded). Loader said: {err}"
            ) from err
        return cls(module, micro_batch_size=micro_batch_size, scaling_factor=scaling_factor)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Writes the image VAE (config.json + safetensors) so that :meth:`from_pretrained` reads it back."""
        self.module.save_pretrained(str(out_dir))
        return Path(out_dir)

    def get_latent_size(self, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
        """(T, H, W) of a video -> (T, H/f, W/f) of its latent; ValueError naming the size if not divisible."""
        return _check_latent_size(input_size, self.patch_size)

    def encode(
        self, x: torch.Tensor, generator: torch.Generator | None = None, sample_posterior: bool = True
    ) -> torch.Tensor:
        """Encodes a video to scaled latents.

        Args:
            x: (B, 3, T, H, W) video in [-1, 1].
            generator: random source for sampling the posterior (ignored with ``sample_posterior=False``).
            sample_posterior: draw z ~ q(z|x) as Open-Sora does in training; False takes its mode (the mean),
                which is deterministic.
        Returns:
            (B, C, T, H/f, W/f) latents times ``scaling_factor``.
        """
        B = x.shape[0]
        x = rearrange(x, "B C T H W -> (B T) C H W").to(self.module.dtype)
        latents = []
        for chunk in x.split(self.micro_batch_size):
            dist = self.module.encode(chunk).latent_dist
            latents.append(dist.sample(generator) if sample_posterior else dist.mode())
        z = torch.cat(latents) * self.scaling_factor  # (B*T, C, h, w)
        return rearrange(z, "(B T) C H W -> B C T H W", B=B)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decodes scaled latents to a video.

        Args:
            z: (B, C, T, h, w) latents as returned by :meth:`encode`.
        Returns:
            (B, 3, T, h*f, w*f) video clamped to [-1, 1].
        """
        B = z.shape[0]
        z = rearrange(z, "B C T H W -> (B T) C H W").to(self.module.dtype) / self.scaling_factor
        frames = [self.module.decode(chunk).sample for chunk in z.split(self.micro_batch_size)]
        x = torch.cat(frames).clamp(-1, 1)  # (B*T, 3, H, W)
        return rearrange(x, "(B T) C H W -> B C T H W", B=B)


class IdentityAutoencoder(nn.Module):
    """Pixel space as "latent" space: encode and decode return the input.

    For CPU demos and tests, where a tiny random VAE would turn every sample into noise and make the
    result meaningless; the diffusion model then learns the pixels directly.
    """

    def __init__(self):
        super().__init__()
        self.out_channels: int = 3
        self.patch_size: tuple[int, int, int] = (1, 1, 1)

    def get_latent_size(self, input_size: tuple[int, int, int]) -> tuple[int, int, int]:
        """(T, H, W) -> the same (T, H, W)."""
        return _check_latent_size(input_size, self.patch_size)

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
) -> VideoAutoencoderKL | IdentityAutoencoder:
    """Builds the autoencoder named by ``cfg``, frozen (eval mode, no gradients): it is never trained here.

    Args:
        cfg: the VAE section of a config.
        device: move the weights there (default: CPU).
        dtype: weight dtype, e.g. ``torch.bfloat16`` on GPU (default: as stored).
    """
    if cfg.type == "identity":
        return IdentityAutoencoder()
    vae = VideoAutoencoderKL.from_pretrained(
        cfg.path,  # type: ignore[arg-type]  # __post_init__ guarantees a path for "kl"
        subfolder=cfg.subfolder,
        micro_batch_size=cfg.micro_batch_size,
        scaling_factor=cfg.scaling_factor,
        torch_dtype=dtype,
    )
    if device is not None:
        vae = vae.to(device)
    return vae.eval().requires_grad_(False)


def make_tiny_vae(out_dir: str | Path, seed: int = 0) -> Path:
    """Saves a tiny random ``AutoencoderKL`` (f=2, 4 latent channels; milliseconds on CPU) to ``out_dir``.

    For the debug model bundle and tests: it exercises the real loading and encode/decode code paths.
    Its latents carry no meaning (weights are random), so use the identity autoencoder for demos that
    should produce recognisable output.

    Args:
        out_dir: directory to write config.json and diffusion_pytorch_model.safetensors into.
        seed: weight initialisation seed (same seed -> same weights).
    Returns:
        ``out_dir`` as a Path, loadable with :meth:`VideoAutoencoderKL.from_pretrained`.
    """
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state untouched
        torch.manual_seed(seed)
        module = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),  # two blocks -> one 2x downsampling
            layers_per_block=1,
            norm_num_groups=8,  # must divide every entry of block_out_channels
            latent_channels=4,
            sample_size=32,
            scaling_factor=SD_SCALING_FACTOR,
        )
    module.save_pretrained(str(out_dir))
    return Path(out_dir)
