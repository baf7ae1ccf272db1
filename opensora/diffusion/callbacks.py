"""The step callback both samplers call: what diffusers pipelines' ``callback_on_step_end`` is built on."""

from collections.abc import Callable

import torch

# (step index 0.., the timestep the model saw this step, the latents after the step) -> new latents or None
StepCallback = Callable[[int, float, torch.Tensor], "torch.Tensor | None"]


def after_step(callback: StepCallback | None, step: int, timestep: float, x: torch.Tensor) -> torch.Tensor:
    """The latents the sampler continues from: ``x``, or the tensor ``callback`` returned in its place."""
    if callback is None:
        return x
    new = callback(step, timestep, x)
    if new is None:
        return x
    if not isinstance(new, torch.Tensor) or new.shape != x.shape:
        # a wrong shape would fail steps later, inside the model; say it here, where the cause is
        raise ValueError(f"a step callback returned latents of shape {getattr(new, 'shape', type(new))}; the "
                         f"sampler's latents are {tuple(x.shape)}")
    return new.to(device=x.device, dtype=x.dtype)
