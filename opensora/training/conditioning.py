"""Frame conditioning while training (issue 16): per sample, which latent frames are given.

One model learns text-to-video, image-to-video, video extension and interpolation when some of its training
samples show it a few frames of the answer (Open-Sora 1.1/1.2's mask ratios; written here from the idea).
A recipe's ``conditioning`` section (:class:`ConditioningConfig`) sets how often each mask type is drawn:

==============  =================================================  =====================================
type            given latent frames                                what it teaches
==============  =================================================  =====================================
none            none                                               text-to-video (the rest of the mass)
first_frame     frame 0                                            image-to-video
first_k         frames 0 .. K-1, K in [first_k_min, first_k_max]  video extension
last_frame      frame T-1                                          leading up to an end image
first_last      frames 0 and T-1                                   interpolation
random          a random 1 .. T-1 of the frames                    any frames given
==============  =================================================  =====================================

Masks are over *latent* frames. How pixel frames map to them depends on the autoencoder
(:func:`opensora.diffusion.conditioning.latent_frames_given`): a per-frame VAE or the identity makes one latent
frame per pixel frame; a non-causal one of temporal factor t makes latent frame j of pixel frames t*j .. t*j+t-1;
a causal 3D VAE (Wan, HunyuanVideo, CogVideoX, LTX) encodes pixel frame 0 *alone* as latent frame 0 and then
groups of t, so "first frame" is exactly the first image (what image-to-video gives at sampling time) and
"last frame" the last t pixel frames. At least one frame is always generated: a mask that would give every
frame (T = 1, i.e. images, or first_last at T = 2) is replaced by none.

The draws come from the training step's seeded generator (a fixed number of draws per call, whatever the
probabilities), so a resumed run draws the same masks, and the ranks of one sequence-parallel group (which
share the seed) draw the same mask, which SP then shards with T inside the model.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from opensora.config import ConfigError

MASK_TYPES = ("first_frame", "first_k", "last_frame", "first_last", "random")  # "none" takes the rest


@dataclass
class ConditioningConfig:
    """How often each frame-conditioning mask type is drawn per training sample; the rest is "none"
    (plain text-to-video). All 0 (the default): no conditioning, training exactly as before."""

    first_frame: float = 0.0  # P(latent frame 0 given): image-to-video
    first_k: float = 0.0  # P(the first K latent frames given): video extension
    first_k_min: int = 1  # smallest K of first_k (latent frames)
    first_k_max: int | None = None  # largest K of first_k; None: T - 1. Always capped at T - 1
    last_frame: float = 0.0  # P(the last latent frame given)
    first_last: float = 0.0  # P(the first and the last latent frames given): interpolation
    random: float = 0.0  # P(a uniformly random number, 1 .. T-1, of random latent frames given)

    def __post_init__(self):
        for name in MASK_TYPES:
            p = getattr(self, name)
            if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                raise ConfigError(f"conditioning.{name}: a probability must be in [0, 1], got {p}")
        total = sum(getattr(self, name) for name in MASK_TYPES)
        if total > 1.0 + 1e-9:
            parts = " + ".join(f"{name} {getattr(self, name)}" for name in MASK_TYPES if getattr(self, name))
            raise ConfigError(f"conditioning: the probabilities sum to {total:g} ({parts}); they must sum to <= 1 "
                              "(the rest is plain text-to-video)")
        if self.first_k_min < 1:
            raise ConfigError(f"conditioning.first_k_min: must be >= 1, got {self.first_k_min}")
        if self.first_k_max is not None and self.first_k_max < self.first_k_min:
            raise ConfigError(f"conditioning.first_k_max: must be >= first_k_min ({self.first_k_min}), "
                              f"got {self.first_k_max}")

    @property
    def enabled(self) -> bool:
        """Whether any mask type has a nonzero probability."""
        return any(getattr(self, name) > 0 for name in MASK_TYPES)

    @property
    def none(self) -> float:
        """Probability of plain text-to-video."""
        return max(0.0, 1.0 - sum(getattr(self, name) for name in MASK_TYPES))


def sample_cond_mask(batch: int, num_frames: int, config: ConditioningConfig,
                     generator: torch.Generator) -> torch.Tensor:
    """Draws one mask per sample.

    Args:
        batch: samples B.
        num_frames: latent frames T of the batch.
        config: the mask-type probabilities.
        generator: the step's seeded generator; the mask is made on its device without a host sync.
    Returns:
        (B, T) bool, True = given; every row leaves at least one frame to generate.
    """
    device, B, T = generator.device, batch, num_frames
    edges = list(itertools.accumulate(getattr(config, name) for name in MASK_TYPES))  # Python floats: no copy
    # Always the same four draws, so the stream of later draws does not depend on the probabilities.
    u_type = torch.rand(B, generator=generator, device=device)
    u_k = torch.rand(B, generator=generator, device=device)
    u_count = torch.rand(B, generator=generator, device=device)
    u_order = torch.rand(B, T, generator=generator, device=device)

    # (B,) 0..5, 5 = none: how many edges u reaches (bucketize against a tensor of edges would copy them to the
    # device every step, a host sync on CUDA; comparisons with Python floats stay on the device)
    kind = sum((u_type >= e).long() for e in edges)
    frames = torch.arange(T, device=device)[None]  # (1, T)
    k_max = max(1, T - 1 if config.first_k_max is None else min(config.first_k_max, T - 1))
    k_min = min(config.first_k_min, k_max)
    k = k_min + (u_k * (k_max - k_min + 1)).long().clamp(max=k_max - k_min)  # (B,) in [k_min, k_max]
    count = 1 + (u_count * max(T - 1, 1)).long().clamp(max=max(T - 2, 0))  # (B,) in [1, T-1]
    rank = u_order.argsort(dim=1).argsort(dim=1)  # (B, T) a random permutation's ranks
    first, last = (frames == 0).expand(B, T), (frames == T - 1).expand(B, T)
    masks = torch.stack([
        first,                       # first_frame
        frames < k[:, None],         # first_k
        last,                        # last_frame
        first | last,                # first_last
        rank < count[:, None],       # random
        torch.zeros_like(first),     # none
    ])  # (6, B, T)
    mask = masks[kind, torch.arange(B, device=device)]  # (B, T)
    return mask & ~mask.all(dim=1, keepdim=True)  # a mask giving every frame (T = 1, first_last at T = 2) -> none
