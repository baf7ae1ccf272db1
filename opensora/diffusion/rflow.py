"""Rectified flow, Open-Sora 1.2 style: straight paths between noise and data, logit-normal timesteps, Euler sampling.

Time runs from t = 1 (pure noise) to t = 0 (data); the model sees ``t * num_timesteps`` so the STDiT timestep
embedder is used unchanged. With x_t = (1 - t) x_0 + t eps, the model predicts the velocity v = x_0 - eps, the
direction from noise to data, and the loss is the MSE to it. An STDiT with learned sigma has 2C output channels;
only the first C are the velocity (the rest get no gradient, so such a model is still a valid IDDPM start).
"""

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from opensora.diffusion.callbacks import StepCallback, after_step
from opensora.diffusion.conditioning import (
    check_cond_mask, check_condition, frame_timesteps, keep_given, masked_mean_flat,
)

ModelFn = Callable[..., torch.Tensor]


class RFlow:
    """Rectified-flow objective and Euler sampler.

    Args:
        num_timesteps: scale of the timestep passed to the model (t in [0, 1] → t * num_timesteps).
        num_sampling_steps: Euler steps from noise to data (default 50).
        logit_mean, logit_std: timesteps for training are sigmoid(N(logit_mean, logit_std²)) (SD3 / Open-Sora 1.2),
            which puts more training on the middle of the path than uniform sampling.
        shift: resolution shift t' = shift·t / (1 + (shift - 1)·t) applied to training and sampling times; >1 spends
            more time near noise, which larger videos need (Open-Sora 1.2 derives it from the resolution). 1 = off.
        clip_denoised: unused by the Euler sampler; accepted so both schedulers take the same options.
    """

    def __init__(self, num_timesteps: int = 1000, num_sampling_steps: int | None = None, logit_mean: float = 0.0,
                 logit_std: float = 1.0, shift: float = 1.0, clip_denoised: bool = False):
        if num_sampling_steps is not None and num_sampling_steps < 1:
            raise ValueError(f"sampling steps must be ≥ 1, got {num_sampling_steps}")
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        self.num_timesteps = num_timesteps
        self.num_sampling_steps = num_sampling_steps or 50
        self.logit_mean, self.logit_std, self.shift = logit_mean, logit_std, shift

    def _shift(self, t: torch.Tensor) -> torch.Tensor:
        return self.shift * t / (1 + (self.shift - 1) * t)

    def sample_timesteps(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) continuous times in (0, 1), logit-normal then shifted."""
        z = torch.randn(batch, device=device, generator=generator) * self.logit_std + self.logit_mean
        return self._shift(torch.sigmoid(z))

    @staticmethod
    def interpolate(x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x_0 + t eps with t (B,) in [0, 1]."""
        t = t.to(x_start.dtype).reshape(-1, *([1] * (x_start.dim() - 1)))
        return (1 - t) * x_start + t * noise

    def training_losses(self, model_fn: ModelFn, x_start: torch.Tensor, model_kwargs: dict | None = None,
                        t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None,
                        cond_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample velocity MSE.

        Args:
            model_fn: ``model_fn(x_t, t * num_timesteps, **model_kwargs)`` → (B, ≥C, ...).
            x_start: (B, C, ...) clean latents.
            t: (B,) times in [0, 1]; logit-normal (drawn with ``generator``) when None.
            noise: (B, C, ...) standard normal when None.
            cond_mask: (B, T) bool over the latent frames (dim 2), True = given: those frames stay clean (x_t = x_0),
                the model gets t = 0 for them (a (B, T) timestep), and the loss averages the generated frames
                only (a sample with every frame given contributes 0). None: plain text-to-video, as before.
        Returns:
            dict of (B,) tensors: ``loss`` and ``t`` (the generated frames' t).
        """
        if t is None:
            t = self.sample_timesteps(x_start.shape[0], x_start.device, generator)
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.interpolate(x_start, noise, t)
        t_model = t * self.num_timesteps
        if cond_mask is not None:
            check_cond_mask(cond_mask, x_start)
            x_t = keep_given(x_t, x_start, cond_mask)
            t_model = frame_timesteps(t_model, cond_mask)
        out = model_fn(x_t, t_model, **(model_kwargs or {}))
        C = x_start.shape[1]
        f32 = torch.promote_types(x_start.dtype, torch.float32)  # loss math in ≥ fp32 even under bf16 autocast
        err = (out[:, :C].to(f32) - (x_start - noise).to(f32)) ** 2
        loss = masked_mean_flat(err, cond_mask)
        return dict(loss=loss, t=t)

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, noise: torch.Tensor, model_kwargs: dict | None = None,
               progress: bool = False, generator: torch.Generator | None = None,
               cond_latent: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
               callback: StepCallback | None = None) -> torch.Tensor:
        """Euler integration of dx/dt = -v from t = 1 (``noise``) to t = 0. Deterministic; ``generator`` unused.

        ``cond_latent`` (B, C, T, ...) and ``cond_mask`` (B, T) bool (True = given): before every step the given
        frames are reset to ``cond_latent`` with t = 0 (a (B, T) model timestep), and the result holds them
        exactly. Both None: as before.
        ``callback(i, t * num_timesteps, x)`` after each step i = 0.. (x: the latents after it); a tensor it
        returns replaces them (given frames are still reset before the next step). None: as before.
        """
        check_condition(noise, cond_latent, cond_mask)
        times = self._shift(torch.linspace(1.0, 0.0, self.num_sampling_steps + 1, dtype=torch.float64))
        x = noise
        C = noise.shape[1]
        for i in tqdm(range(self.num_sampling_steps), desc="sampling", disable=not progress, leave=False):
            t, t_next = times[i].item(), times[i + 1].item()
            t_model = torch.full((x.shape[0],), t * self.num_timesteps, device=x.device, dtype=torch.float32)
            # the model's timestep for the callback, from the host copy (no device sync per step)
            timestep = float(torch.tensor(t * self.num_timesteps, dtype=torch.float32))
            if cond_mask is not None:
                x = keep_given(x, cond_latent, cond_mask)
                t_model = frame_timesteps(t_model, cond_mask)
            v = model_fn(x, t_model, **(model_kwargs or {}))[:, :C].to(x.dtype)
            x = after_step(callback, i, timestep, x + (t - t_next) * v)
        return x if cond_mask is None else keep_given(x, cond_latent, cond_mask)
