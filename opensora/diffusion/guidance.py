"""Classifier-free guidance as a wrapper around any model function."""

from collections.abc import Callable

import torch


def classifier_free_guidance(model_fn: Callable[..., torch.Tensor], cfg_scale: float,
                             guided_channels: int) -> Callable[..., torch.Tensor]:
    """Wraps ``model_fn`` so that one call evaluates the conditional and unconditional branch as one batch.

    The wrapped function takes x (B, C, ...) and t (B,) while every tensor in ``model_kwargs`` already holds 2B rows:
    the B conditional rows first, then the B unconditional ones (e.g. the null caption). It returns (B, C_out, ...):
    the first ``guided_channels`` mixed as ``uncond + cfg_scale * (cond - uncond)`` (the eps / velocity), the rest
    (a learned variance) from the conditional branch. Open-Sora 1.0 guided only the first 3 of 4 latent channels;
    here every predicted channel is guided.

    Args:
        model_fn: ``model_fn(x, t, **model_kwargs)``.
        cfg_scale: guidance scale; 1 returns the conditional prediction.
        guided_channels: number of leading output channels that are guided (the latent channel count).
    """

    def guided(x: torch.Tensor, t: torch.Tensor, **model_kwargs) -> torch.Tensor:
        out = model_fn(torch.cat([x, x]), torch.cat([t, t]), **model_kwargs)
        cond, uncond = out.chunk(2, dim=0)
        return mix_guidance(cond, uncond, cfg_scale, guided_channels)

    return guided


def mix_guidance(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float, guided_channels: int) -> torch.Tensor:
    """(B, C_out, ...) from the two branches' predictions: the guided channels mixed, the rest conditional (the
    one formula of batched and CFG-parallel guidance, so both give the same numbers)."""
    mixed = uncond[:, :guided_channels] + cfg_scale * (cond[:, :guided_channels] - uncond[:, :guided_channels])
    return torch.cat([mixed, cond[:, guided_channels:]], dim=1)
