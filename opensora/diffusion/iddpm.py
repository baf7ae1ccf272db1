"""IDDPM: Gaussian diffusion with learned variance, as Open-Sora 1.0 trains STDiT.

1000 steps, linear betas (1e-4 → 2e-2), the model predicts the noise ``eps`` and, in its second half of channels,
an interpolation ``v ∈ [-1, 1]`` between the log of the posterior variance and log(beta) ("learned range",
Nichol & Dhariwal 2021). The loss is MSE on eps plus the variational bound term for the variance (with the mean
detached, so the VLB only trains the variance). Sampling can be respaced to fewer steps (e.g. 100).

Why not diffusers' ``DDPMScheduler``: it has no training loss (no VLB term for learned sigma) and no respacing that
keeps the model's original timestep indices, both of which Open-Sora 1.0's checkpoints depend on. The forward
process and the posterior are checked against ``DDPMScheduler`` in the tests.

All schedule arithmetic is in float64 (as improved-diffusion) and cast to the sample's dtype on use.
"""

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from opensora.diffusion.callbacks import StepCallback, after_step
from opensora.diffusion.conditioning import (
    check_cond_mask, check_condition, frame_timesteps, keep_given, masked_mean_flat,
)
from opensora.diffusion.losses import discretized_gaussian_log_likelihood, normal_kl

ModelFn = Callable[..., torch.Tensor]


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2) -> torch.Tensor:
    """Linear schedule, scaled to ``num_timesteps`` as in improved-diffusion (so 1000 steps gives 1e-4 → 2e-2)."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """``num_steps`` timesteps of the original process, evenly spaced, first (0) and last included.

    Args:
        num_timesteps: length of the original process (1000).
        num_steps: how many to keep, 1 ≤ num_steps ≤ num_timesteps.
    Returns:
        Sorted, distinct original timestep indices.
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return [num_timesteps - 1]
    # Rounded linspace from 0 to T-1: distinct because the spacing is ≥ 1 when num_steps ≤ T.
    return sorted({round(i * (num_timesteps - 1) / (num_steps - 1)) for i in range(num_steps)})


def _extract(schedule: "_Schedule", name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``schedule.name[t]`` broadcast to ``like``'s shape: (B,) → (B, 1, ..., 1), in ``like``'s dtype and device.

    The coefficients come from the schedule's copy on ``like``'s device: copying a CPU table to the GPU on
    every call (about 14 per training step) would block the host each time, so it could not queue ahead.
    """
    arr = schedule.on(like.device)[name]
    out = arr[t.to(like.device, non_blocking=True).long()].to(like.dtype)
    return out.reshape(-1, *([1] * (like.dim() - 1)))


class IDDPM:
    """Gaussian diffusion with learned-range variance, eps prediction, MSE + VLB loss, optional respacing.

    Args:
        num_timesteps: length of the training process (Open-Sora 1.0: 1000).
        num_sampling_steps: timesteps kept for sampling (respacing); ``None`` keeps all.
        betas: a custom float64 schedule; default :func:`linear_betas`.
        learn_sigma: the model outputs 2C channels (eps, variance interpolation); else C channels and the
            fixed posterior variance (small) is used and the loss is plain MSE.
        clip_denoised: clamp the predicted x0 to [-1, 1] while sampling (useful in pixel space; Open-Sora 1.0
            samples latents and does not clip).
    """

    def __init__(self, num_timesteps: int = 1000, num_sampling_steps: int | None = None,
                 betas: torch.Tensor | None = None, learn_sigma: bool = True, clip_denoised: bool = False):
        base = linear_betas(num_timesteps) if betas is None else betas.to(torch.float64)
        self.num_timesteps = len(base)
        self.learn_sigma = learn_sigma
        self.clip_denoised = clip_denoised
        self.train_schedule = _Schedule(base)
        # Respacing: keep a subset of timesteps and recompute the betas so that alphas_cumprod at the kept steps is
        # unchanged; the model still sees the original indices (timestep_map).
        kept = list(range(self.num_timesteps)) if num_sampling_steps is None else space_timesteps(
            self.num_timesteps, num_sampling_steps)
        abar = torch.cumprod(1.0 - base, dim=0)
        prev, spaced = 1.0, []
        for i in kept:
            spaced.append(1.0 - abar[i].item() / prev)
            prev = abar[i].item()
        self.timestep_map = torch.tensor(kept, dtype=torch.long)
        self.sampling = _Schedule(torch.tensor(spaced, dtype=torch.float64))

    # ---------------------------------------------------------------- forward process (training schedule)
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        s = self.train_schedule
        return _extract(s, "sqrt_abar", t, x_start) * x_start + _extract(s, "sqrt_one_minus_abar", t, x_start) * noise

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                                  schedule: "_Schedule | None" = None):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        s = schedule or self.train_schedule
        mean = _extract(s, "post_coef1", t, x_t) * x_start + _extract(s, "post_coef2", t, x_t) * x_t
        return mean, _extract(s, "post_var", t, x_t), _extract(s, "post_log_var", t, x_t)

    # ---------------------------------------------------------------- the model's p(x_{t-1} | x_t)
    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                        schedule: "_Schedule | None" = None, clip_denoised: bool = False) -> dict:
        """Turns a model output at index ``t`` of ``schedule`` into p's mean / log-variance and the predicted x0.

        Args:
            model_output: (B, 2C, ...) eps and variance interpolation (or (B, C, ...) eps without learned sigma).
            x_t: (B, C, ...) current sample.
            t: (B,) indices into ``schedule`` (not the model's timestep values).
        """
        s = schedule or self.train_schedule
        C = x_t.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] < 2 * C:
                raise ValueError(f"learned sigma needs {2 * C} output channels, the model gave {model_output.shape[1]}")
            eps, var_values = model_output[:, :C], model_output[:, C:2 * C]
            min_log = _extract(s, "post_log_var", t, x_t)
            max_log = _extract(s, "log_betas", t, x_t)
            frac = (var_values + 1) / 2  # the model's [-1, 1] → [0, 1]
            log_var = frac * max_log + (1 - frac) * min_log
        else:
            eps = model_output[:, :C]
            log_var = _extract(s, "post_log_var", t, x_t)
        x0 = _extract(s, "sqrt_recip_abar", t, x_t) * x_t - _extract(s, "sqrt_recipm1_abar", t, x_t) * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(x0, x_t, t, schedule=s)
        return dict(mean=mean, log_variance=log_var, pred_xstart=x0, eps=eps)

    # ---------------------------------------------------------------- training
    def sample_timesteps(self, batch: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch,), device=device, generator=generator)

    def training_losses(self, model_fn: ModelFn, x_start: torch.Tensor, model_kwargs: dict | None = None,
                        t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None,
                        cond_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-sample loss: MSE on eps, plus the VLB term for the learned variance.

        Args:
            model_fn: ``model_fn(x_t, t, **model_kwargs)`` → (B, 2C, ...) (an STDiT is one).
            x_start: (B, C, ...) clean latents.
            t: (B,) integer timesteps; uniform over [0, T) (drawn with ``generator``) when None.
            noise: (B, C, ...) eps; standard normal (drawn with ``generator``) when None.
            cond_mask: (B, T) bool over the latent frames (dim 2), True = given: those frames stay clean, the
                model gets t = 0 for them (a (B, T) timestep), and the loss averages the generated frames only
                (a sample with every frame given contributes 0). None: plain text-to-video, as before.
        Returns:
            dict of (B,) tensors: ``loss`` (= mse + vb), ``mse``, ``vb``, and ``t`` (the generated frames' t).
        """
        B = x_start.shape[0]
        if t is None:
            t = self.sample_timesteps(B, x_start.device, generator)
        if noise is None:
            noise = torch.randn(x_start.shape, generator=generator, device=x_start.device, dtype=x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        t_model = t
        if cond_mask is not None:
            check_cond_mask(cond_mask, x_start)
            x_t = keep_given(x_t, x_start, cond_mask)
            t_model = frame_timesteps(t, cond_mask)
        out = model_fn(x_t, t_model, **(model_kwargs or {}))
        C = x_start.shape[1]
        f32 = torch.promote_types(x_start.dtype, torch.float32)  # loss math in ≥ fp32 even under bf16 autocast
        mse = masked_mean_flat((noise.to(f32) - out[:, :C].to(f32)) ** 2, cond_mask)
        terms = dict(mse=mse, t=t)
        if self.learn_sigma:
            # The VLB trains only the variance: the mean prediction is detached (improved-diffusion's "frozen_out").
            frozen = torch.cat([out[:, :C].detach(), out[:, C:2 * C]], dim=1).to(f32)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start.to(f32), x_t.to(f32), t, cond_mask)
            terms["loss"] = mse + terms["vb"]
        else:
            terms["loss"] = mse
        return terms

    def _vb_terms_bpd(self, model_output, x_start, x_t, t, cond_mask=None) -> torch.Tensor:
        """L_t (KL of posterior vs p, t > 0) or L_0 (decoder NLL, t = 0), in bits per dim, (B,); averaged over the
        generated frames (False in ``cond_mask``) when given."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        p = self.p_mean_variance(model_output, x_t, t)
        kl = masked_mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"]), cond_mask) / torch.log(
            torch.tensor(2.0))
        nll = -masked_mean_flat(discretized_gaussian_log_likelihood(x_start, p["mean"], 0.5 * p["log_variance"]),
                            cond_mask) / torch.log(torch.tensor(2.0))
        return torch.where(t == 0, nll, kl)

    # ---------------------------------------------------------------- sampling (respaced schedule)
    @torch.no_grad()
    def sample(self, model_fn: ModelFn, noise: torch.Tensor, model_kwargs: dict | None = None,
               progress: bool = False, generator: torch.Generator | None = None,
               cond_latent: torch.Tensor | None = None, cond_mask: torch.Tensor | None = None,
               callback: StepCallback | None = None) -> torch.Tensor:
        """Ancestral sampling over the respaced steps, from ``noise`` (B, C, ...) to x0.

        Args:
            model_fn: ``model_fn(x_t, t, **model_kwargs)`` with t the *original* timestep indices (B,), or (B, T)
                per frame when frames are given.
            noise: starting x_T.
            progress: show a tqdm bar over the steps.
            generator: draws the per-step noise (same generator → same sample).
            cond_latent: (B, C, T, ...) latents of the given frames (other frames' values are not read).
            cond_mask: (B, T) bool, True = given: before every step those frames are reset to ``cond_latent``
                with t = 0, and the result holds them exactly. None (with ``cond_latent`` None): as before.
            callback: ``callback(step, t, x)`` after each step (step = 0.., t the original timestep the model saw,
                x the latents after the step); a tensor it returns replaces them (given frames are still reset
                before the next step). None: as before.
        """
        check_condition(noise, cond_latent, cond_mask)
        s = self.sampling
        x = noise
        steps = list(range(len(self.timestep_map)))[::-1]
        for step, i in enumerate(tqdm(steps, desc="sampling", disable=not progress, leave=False)):
            idx = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            t_model = self.timestep_map.to(x.device)[idx]
            timestep = int(self.timestep_map[i])  # the model's, for the callback (host copy: no device sync)
            if cond_mask is not None:
                x = keep_given(x, cond_latent, cond_mask)
                t_model = frame_timesteps(t_model, cond_mask)
            out = model_fn(x, t_model, **(model_kwargs or {}))
            p = self.p_mean_variance(out.to(x.dtype), x, idx, schedule=s, clip_denoised=self.clip_denoised)
            if i > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                x = p["mean"] + torch.exp(0.5 * p["log_variance"]) * z
            else:
                x = p["mean"]
            x = after_step(callback, step, timestep, x)
        return x if cond_mask is None else keep_given(x, cond_latent, cond_mask)


class _Schedule:
    """Every per-timestep coefficient of a beta schedule, float64 (improved-diffusion's naming, shortened)."""

    def __init__(self, betas: torch.Tensor):
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D schedule in (0, 1]")
        self.betas = betas
        alphas = 1.0 - betas
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.abar = abar
        self.sqrt_abar = abar.sqrt()
        self.sqrt_one_minus_abar = (1.0 - abar).sqrt()
        self.sqrt_recip_abar = (1.0 / abar).sqrt()
        self.sqrt_recipm1_abar = (1.0 / abar - 1).sqrt()
        self.post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The posterior variance is 0 at t=0; its log is clipped to the value at t=1 (as improved-diffusion).
        self.post_log_var = torch.log(torch.cat([self.post_var[1:2], self.post_var[1:]])) if len(betas) > 1 else \
            torch.log(betas)
        self.log_betas = torch.log(betas)
        self.post_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.post_coef2 = (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar)
        self._on_device: dict[str, dict[str, torch.Tensor]] = {}

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Every coefficient table on ``device`` (copied once per device, then reused)."""
        key = str(device)
        if key not in self._on_device:
            tables = {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}
            self._on_device[key] = {k: v.to(device) for k, v in tables.items()}
        return self._on_device[key]

