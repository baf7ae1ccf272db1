"""Frame conditioning for the diffusion objectives and samplers: some latent frames are *given*.

A ``cond_mask`` of shape (B, T) over the latent frames (True = given) says which frames a sample knows: the
first one (image-to-video), the first K (video extension), the last, the first and last (interpolation), or
any. The idea is Open-Sora 1.1/1.2's (``x_mask`` there; written here from the idea, not their code):

* training: given frames stay clean (x_t = x_0 there) and the model sees t = 0 for them, through STDiT's
  per-frame timestep; the loss is averaged over the generated frames only;
* sampling: at every step the given frames are reset to the given latents with t = 0, and once more at the
  end, so they come out exactly as given (an identity autoencoder gives them back bit for bit).

The mask types and how training draws them are in ``opensora/training/conditioning.py``; how pixel frames map
to latent frames (a causal 3D VAE encodes frame 0 alone) is :func:`latent_frames_given`.
"""

from __future__ import annotations

import torch

from opensora.diffusion.losses import mean_flat


def check_cond_mask(cond_mask: torch.Tensor, x: torch.Tensor, cond_latent: torch.Tensor | None = None) -> None:
    """ValueError unless ``cond_mask`` is a (B, T) bool mask over the frame axis (dim 2) of ``x`` (B, C, T, ...),
    and ``cond_latent`` (when given) has ``x``'s shape."""
    if x.dim() < 3:
        raise ValueError(f"frame conditioning needs (B, C, T, ...) latents, got shape {tuple(x.shape)}")
    if cond_mask.dtype != torch.bool or tuple(cond_mask.shape) != (x.shape[0], x.shape[2]):
        raise ValueError(f"cond_mask must be a bool (B, T) = {(x.shape[0], x.shape[2])} mask over the latent "
                         f"frames, got {cond_mask.dtype} {tuple(cond_mask.shape)}")
    if cond_latent is not None and cond_latent.shape != x.shape:
        raise ValueError(f"cond_latent must have the latents' shape {tuple(x.shape)}, got {tuple(cond_latent.shape)}")


def frame_view(cond_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B, 1, T, 1, ...) to broadcast over ``like`` (B, C, T, ...)."""
    return cond_mask.reshape(cond_mask.shape[0], 1, cond_mask.shape[1], *([1] * (like.dim() - 3)))


def keep_given(x: torch.Tensor, given: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
    """``x`` with the given frames (True in ``cond_mask``) taken from ``given``; (B, C, T, ...)."""
    return torch.where(frame_view(cond_mask, x), given.to(x.dtype), x)


def frame_timesteps(t: torch.Tensor, cond_mask: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample timesteps -> (B, T) per frame: 0 on given frames, the sample's t elsewhere."""
    return torch.where(cond_mask, torch.zeros((), dtype=t.dtype, device=t.device), t[:, None])


def masked_mean_flat(x: torch.Tensor, cond_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, C, T, ...) -> (B,) mean over the *generated* frames (False in ``cond_mask``) of each sample; over every
    element (:func:`mean_flat`) when ``cond_mask`` is None.

    A sample whose frames are all given gets 0 (not NaN), and no gradient. Computed as the mean over all
    frames with the given ones zeroed, times T / (generated frames): with nothing given the factor is exactly 1,
    so the result is bit-identical to :func:`mean_flat`.
    """
    if cond_mask is None:
        return mean_flat(x)
    generated = ~cond_mask
    zeroed = torch.where(frame_view(generated, x), x, torch.zeros((), dtype=x.dtype, device=x.device))
    scale = cond_mask.shape[1] / generated.sum(dim=1).clamp(min=1).to(x.dtype)  # (B,)
    return mean_flat(zeroed) * scale


def check_condition(noise: torch.Tensor, cond_latent: torch.Tensor | None, cond_mask: torch.Tensor | None) -> None:
    """A sampler's given frames: both ``cond_latent`` and ``cond_mask`` or neither, with matching shapes."""
    if (cond_latent is None) != (cond_mask is None):
        raise ValueError("frame conditioning needs both cond_latent and cond_mask")
    if cond_mask is not None:
        check_cond_mask(cond_mask, noise, cond_latent)


def latent_frames_given(num_frames: int, temporal_factor: int, causal: bool, start: int = 0,
                        end: int = 0) -> tuple[int, int, int]:
    """Latent frames made by the first ``start`` and the last ``end`` of a ``num_frames``-frame video.

    The rule: a given latent frame must come from given pixel frames only.

    * per-frame / non-causal autoencoder of temporal factor t: latent frame j is pixel frames t*j .. t*j+t-1,
      so ``start`` and ``end`` must be multiples of t;
    * causal 3D autoencoder (Wan, HunyuanVideo, CogVideoX, LTX): latent frame 0 encodes pixel frame 0 alone,
      latent frame j >= 1 pixel frames t*(j-1)+1 .. t*j; so ``start`` must be t*k + 1 (1, 5, 9 at 4x: the first
      frame alone is one latent frame) and ``end`` a multiple of t (the last latent frame covers t frames).

    Args:
        num_frames: frames of the whole video (already valid for the autoencoder).
        temporal_factor: t of the autoencoder's compression.
        causal: whether the first frame is encoded alone.
        start, end: given frames at the start and at the end (0: none).
    Returns:
        (latent frames at the start, latent frames at the end, latent frames in all).
    Raises:
        ValueError naming the count: more given frames than the video has, a count off the rule above, or no
        frame left to generate.
    """
    t = int(temporal_factor)
    total = (num_frames - 1) // t + 1 if causal else num_frames // t
    out = []
    for name, k in (("first", start), ("last", end)):
        if k < 0:
            raise ValueError(f"{name} {k} frames: a frame count must be >= 0")
        if k > num_frames:
            raise ValueError(f"{k} given {name} frames are more than the {num_frames} frames to generate")
        if k == 0:
            out.append(0)
        elif causal and name == "first":
            if (k - 1) % t:
                raise ValueError(f"{k} given first frames do not fit the causal {t}x autoencoder: it encodes frame 0 "
                                 f"alone and then groups of {t}, so give {t}k+1 frames (1, {t + 1}, {2 * t + 1}, ...)")
            out.append((k - 1) // t + 1)
        else:
            if k % t:
                kind = "causal " if causal else ""
                raise ValueError(f"{k} given {name} frames do not fit the {kind}{t}x autoencoder: each latent frame "
                                 f"covers {t} frames, so give a multiple of {t}")
            out.append(k // t)
    if out[0] + out[1] >= total:
        raise ValueError(f"{start} first + {end} last given frames make {out[0] + out[1]} of the {total} latent "
                         f"frames of a {num_frames}-frame video: none would be left to generate")
    return out[0], out[1], total


def cond_mask_for(batch: int, total: int, start: int, end: int, device=None) -> torch.Tensor:
    """(batch, total) bool mask: the first ``start`` and last ``end`` latent frames given."""
    frames = torch.arange(total, device=device)
    return ((frames < start) | (frames >= total - end)).expand(batch, total).clone()


def default_start_frames(num_frames: int, temporal_factor: int, causal: bool) -> int:
    """The given first-frame count video extension uses when none is asked for: the largest count that fits the
    frame rule (:func:`latent_frames_given`) and is at most half of ``num_frames`` (at least the smallest that fits:
    1, or t for a non-causal autoencoder). E.g. 4 of 8 frames per-frame, 5 of 17 at 4x causal."""
    t = int(temporal_factor)
    if causal:
        return max(1, (num_frames // 2 - 1) // t * t + 1)
    return max(t, num_frames // 2 // t * t)
