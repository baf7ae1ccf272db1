"""What a video autoencoder does to the shape of a video, without its weights: compression, channels, frame rule.

A video autoencoder compresses (T, H, W) by factors (t, h, w). The image VAE of Open-Sora 1.0 works frame by
frame, (1, 8, 8); the 3D VAEs of current video models also compress time. Those are *causal*: the first frame
is encoded alone and every following group of t frames becomes one latent frame, so they take T = t*k + 1
frames and give T' = (T - 1) / t + 1 latent frames (Wan 2.1 and 2.2, HunyuanVideo: 4k+1; LTX-Video: 8k+1).
CogVideoX compresses time 4x too but decodes latent frames two at a time after the first, so only an odd
latent count comes back at its own length: it takes 8k+1 frames (its 49-frame clips), the *frame step* 8.
One frame (k = 0) is always valid: an image is a one-frame video.

This module is the shape arithmetic shared by the autoencoders (``opensora.models.vae``), which read their
factors from the loaded model, and by the cost forecast (``opensora.accounting``), which must price a recipe
before any weights exist: it takes an :class:`AutoencoderShape`, declared by the recipe or one of
:data:`AUTOENCODER_PRESETS`, the published autoencoders.
It imports neither torch nor diffusers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence


def _factors(compression: Sequence[int]) -> tuple[int, int, int]:
    """(t, h, w) as ints; ValueError unless three factors >= 1."""
    if len(compression) != 3 or any(int(f) != f or f < 1 for f in compression):
        raise ValueError(f"compression must be three integer factors (t, h, w) >= 1, got {tuple(compression)}")
    return int(compression[0]), int(compression[1]), int(compression[2])


def frame_rule(step: int, causal: bool) -> str:
    """The frame counts an autoencoder takes, in words: "any", "4k+1", "a multiple of 4"."""
    if step == 1:
        return "any"
    return f"{step}k+1" if causal else f"a multiple of {step}"


def valid_num_frames(num_frames: int, step: int, causal: bool) -> bool:
    """Whether ``num_frames`` fits: causal, ``step*k + 1``; otherwise a multiple of ``step`` (see module docstring).

    ``step`` is the temporal factor t, or a multiple of it where a decoder needs a latent frame count of a given
    form (CogVideoX decodes an odd number of latent frames: step 2t = 8).
    """
    if num_frames < 1:
        return False
    if causal:
        return (num_frames - 1) % step == 0
    return num_frames % step == 0


def nearest_valid_num_frames(num_frames: int, step: int, causal: bool) -> tuple[int, ...]:
    """The valid frame counts nearest ``num_frames``: itself if valid, else the one below (if any) and above.

    Args:
        num_frames: a frame count, e.g. 16.
        step: valid counts are ``step*k + 1`` (causal) or ``step*k`` (k >= 1), e.g. 4.
        causal: the first frame is encoded alone.
    Returns:
        e.g. (17,) for 17, (13, 17) for 16 with step 4 causal, (1,) for 0.
    """
    if valid_num_frames(num_frames, step, causal):
        return (num_frames,)
    offset = 1 if causal else 0  # valid counts are step*k + offset
    smallest = 1 if causal else step
    if num_frames < smallest:
        return (smallest,)
    below = (num_frames - offset) // step * step + offset
    return below, below + step


def compressed_size(
    input_size: Sequence[int],
    compression: Sequence[int],
    causal: bool,
    name: str = "the autoencoder",
    frame_step: int | None = None,
) -> tuple[int, int, int]:
    """(T, H, W) of a video -> (T', H', W') of its latent.

    Args:
        input_size: (T, H, W) of the video.
        compression: (t, h, w) factors.
        causal: T' = (T - 1) // t + 1 (T must be t*k + 1); otherwise T' = T // t (T must divide by t).
        name: names the autoencoder in errors.
        frame_step: valid frame counts step by this (None: t); a multiple of t, see :func:`valid_num_frames`.
    Raises:
        ValueError naming the size: a frame count that does not fit (with the nearest valid counts), or H / W
        not divisible by the spatial factor.
    """
    if len(input_size) != 3:
        raise ValueError(f"input size must be (T, H, W), got {tuple(input_size)}")
    t, h, w = _factors(compression)
    step = t if frame_step is None else int(frame_step)
    if step < 1 or step % t:
        raise ValueError(f"frame_step must be a multiple of the temporal factor {t}, got {frame_step}")
    T, H, W = (int(v) for v in input_size)
    for size, factor, axis in ((H, h, "H"), (W, w, "W")):
        if size < 1 or size % factor:
            raise ValueError(
                f"video size (T, H, W) = {(T, H, W)}: {axis}={size} is not divisible by {name}'s downsampling factor "
                f"{factor}"
            )
    if not valid_num_frames(T, step, causal):
        near = " and ".join(str(n) for n in nearest_valid_num_frames(T, step, causal))
        kind = "causal " if causal else ""
        raise ValueError(
            f"video size (T, H, W) = {(T, H, W)}: {T} frames do not fit {name} ({t}x {kind}temporal compression: "
            f"{frame_rule(step, causal)} frames); nearest valid frame counts: {near}"
        )
    T_latent = (T - 1) // t + 1 if causal else T // t
    return T_latent, H // h, W // w


@dataclass(frozen=True)
class AutoencoderShape:
    """What an autoencoder does to shapes, all a FLOP count needs of it: factors, frame rule, channels."""

    compression: tuple[int, int, int]  # (t, h, w)
    causal: bool = False  # valid frame counts frame_step*k + 1; T' = (T - 1) // t + 1
    frame_step: int | None = None  # valid frame counts step by this (None: t); 2t where a decoder wants odd T'
    latent_channels: int | None = None  # None: not known (a forecast keeps the model's in_channels)
    name: str = "the VAE"  # names it in errors

    def __post_init__(self):
        object.__setattr__(self, "compression", _factors(self.compression))

    @classmethod
    def per_frame(cls, downsample: int, latent_channels: int | None = None) -> "AutoencoderShape":
        """An image VAE applied frame by frame, (1, f, f): what a recipe's ``vae_downsample: f`` means."""
        return cls((1, downsample, downsample), causal=False, latent_channels=latent_channels,
                   name=f"the VAE (1x{downsample}x{downsample})")

    @classmethod
    def parse(cls, text: str) -> "AutoencoderShape":
        """``"4x8x8"`` -> (4, 8, 8), causal when it compresses time (as every such VAE here is)."""
        try:
            t, h, w = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"autoencoder compression {text!r}: give T x H x W factors, e.g. 4x8x8") from None
        return cls((t, h, w), causal=t > 1, name=f"the VAE ({t}x{h}x{w})")

    @property
    def step(self) -> int:
        """Valid frame counts step by this."""
        return self.compression[0] if self.frame_step is None else self.frame_step

    def valid_num_frames(self, num_frames: int) -> bool:
        return valid_num_frames(num_frames, self.step, self.causal)

    def nearest_valid_num_frames(self, num_frames: int) -> tuple[int, ...]:
        return nearest_valid_num_frames(num_frames, self.step, self.causal)

    def latent_size(self, input_size: Sequence[int]) -> tuple[int, int, int]:
        """(T, H, W) -> latent (T', H', W'); ValueError naming the size and the nearest valid frame counts."""
        return compressed_size(input_size, self.compression, self.causal, self.name, self.frame_step)

    def differences(self, other: "AutoencoderShape") -> list[str]:
        """What differs between two shapes in what they do to a video, in words (empty: the same latents' shape).

        Compression and the frame rule always count; causality only where it changes the latent (t > 1 or a
        frame step > 1: a per-frame VAE and a "causal" 1x8x8 one give the same latent); latent channels only
        where both know them.
        """
        out = []
        if self.compression != other.compression:
            out.append(f"compression {'x'.join(map(str, self.compression))} vs "
                       f"{'x'.join(map(str, other.compression))}")
        steps_matter = max(self.compression[0], self.step, other.compression[0], other.step) > 1
        if self.step != other.step or (steps_matter and self.causal != other.causal):
            out.append(f"frames {frame_rule(self.step, self.causal)} vs {frame_rule(other.step, other.causal)}")
        if None not in (self.latent_channels, other.latent_channels) and self.latent_channels != other.latent_channels:
            out.append(f"latent channels {self.latent_channels} vs {other.latent_channels}")
        return out

    def summary(self) -> str:
        """E.g. "4x8x8 causal (4k+1 frames), 16 ch"."""
        t, h, w = self.compression
        causal = " causal" if self.causal and t > 1 else ""
        channels = f", {self.latent_channels} ch" if self.latent_channels is not None else ""
        return f"{t}x{h}x{w}{causal} ({frame_rule(self.step, self.causal)} frames){channels}"


@dataclass(frozen=True)
class AutoencoderPreset:
    """A published autoencoder: what it does to shapes, and the diffusers config that builds it (no weights)."""

    name: str  # short name used by `tools/cost.py forecast --vae NAME`
    class_name: str  # the diffusers class (`_class_name` in its config.json)
    shape: AutoencoderShape
    normalisation: str  # what its authors do to latents before the diffusion model sees them, in words
    weights: str  # where the weights are published (a Hugging Face repo id; never downloaded here)
    # Constructor arguments that differ from the diffusers class's defaults (what the published config.json
    # sets that decides shapes and cost); {} when the class defaults are that autoencoder.
    config: dict[str, Any] = field(default_factory=dict)


def _preset(name: str, class_name: str, compression: tuple[int, int, int], channels: int, frame_step: int,
            normalisation: str, weights: str, config: dict[str, Any] | None = None) -> AutoencoderPreset:
    shape = AutoencoderShape(compression, causal=compression[0] > 1, frame_step=frame_step, latent_channels=channels,
                             name=name)
    return AutoencoderPreset(name, class_name, shape, normalisation, weights, config or {})


_WAN22_CONFIG = dict(  # Wan2.2-TI2V-5B's VAE: residual blocks, 2x2 patchify in front, 48 channels
    base_dim=160, decoder_base_dim=256, z_dim=48, is_residual=True, patch_size=2, in_channels=12, out_channels=12,
    scale_factor_spatial=16, scale_factor_temporal=4,
)

# The autoencoders of issue 13. The factors here are checked against what opensora.models.vae reads from each
# class's config (tests/test_autoencoders.py), so the forecast and the loaded model cannot disagree.
AUTOENCODER_PRESETS: dict[str, AutoencoderPreset] = {
    p.name: p
    for p in (
        _preset("sd", "AutoencoderKL", (1, 8, 8), 4, 1, "z * 0.18215 (Open-Sora 1.0)", "stabilityai/sd-vae-ft-ema",
                dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                     up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)),
        _preset("wan2.1", "AutoencoderKLWan", (4, 8, 8), 16, 4, "(z - latents_mean) / latents_std, per channel",
                "Wan-AI/Wan2.1-T2V-1.3B-Diffusers (subfolder vae)"),
        _preset("wan2.2", "AutoencoderKLWan", (4, 16, 16), 48, 4, "(z - latents_mean) / latents_std, per channel",
                "Wan-AI/Wan2.2-TI2V-5B-Diffusers (subfolder vae)", _WAN22_CONFIG),
        _preset("hunyuan", "AutoencoderKLHunyuanVideo", (4, 8, 8), 16, 4, "z * 0.476986",
                "hunyuanvideo-community/HunyuanVideo (subfolder vae)"),
        _preset("cogvideox", "AutoencoderKLCogVideoX", (4, 8, 8), 16, 8, "z * 1.15258426 (CogVideoX-2b; 0.7 for 5b)",
                "THUDM/CogVideoX-2b (subfolder vae)"),
        _preset("ltx", "AutoencoderKLLTXVideo", (8, 32, 32), 128, 8,
                "(z - latents_mean) * scaling_factor / latents_std, per channel (mean/std stored with the weights)",
                "Lightricks/LTX-Video (0.9.0, subfolder vae)"),
    )
}
