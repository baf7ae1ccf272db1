"""Diffusion objectives and samplers: IDDPM (Open-Sora 1.0) and rectified flow (Open-Sora 1.2), plus CFG.

Both take frame conditioning (``conditioning.py``): ``training_losses(..., cond_mask=)`` and
``sample(..., cond_latent=, cond_mask=)`` keep given latent frames clean at t = 0.
"""

from opensora.diffusion.guidance import classifier_free_guidance
from opensora.diffusion.iddpm import IDDPM, linear_betas, space_timesteps
from opensora.diffusion.rflow import RFlow

SCHEDULERS = {"iddpm": IDDPM, "rflow": RFlow}


def build_scheduler(name: str, **kwargs) -> IDDPM | RFlow:
    """``build_scheduler("iddpm" | "rflow", num_timesteps=1000, num_sampling_steps=None, ...)``.

    Args:
        name: objective / sampler name.
        kwargs: passed to :class:`IDDPM` or :class:`RFlow` (``num_sampling_steps``: respaced IDDPM steps, or
            Euler steps for rectified flow).
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown diffusion {name!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](**kwargs)


__all__ = ["IDDPM", "RFlow", "SCHEDULERS", "build_scheduler", "classifier_free_guidance", "linear_betas",
           "space_timesteps"]
