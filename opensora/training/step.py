"""The work of one optimizer step, shared by the :class:`~opensora.training.trainer.Trainer` and
``tools/benchmark.py``, so the throughput and MFU the benchmark reports (and the cost forecast prices) come
from the code path that trains.

One micro-step: encode the batch with the frozen VAE and text encoder (or take cached latents), seed the
generators from (recipe seed, step, micro-step, data-parallel rank), draw the frame-conditioning masks (if the
recipe asks for them, ``opensora/training/conditioning.py``), turn the engine's gradient sync on for
the last micro-step only, compute the diffusion loss under the engine's autocast, back-propagate it scaled
by 1/accum. Then one ``engine.optimizer_step`` (clip, update, clear; skipped when the loss or the gradient norm
is not finite, ``opensora/training/nonfinite.py``). Which engine runs is the engine's business alone.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from opensora.distributed import Engine
from opensora.training.conditioning import ConditioningConfig, sample_cond_mask


def step_seed(seed: int, step: int, micro: int, dp_rank: int) -> int:
    """A 63-bit seed for one micro-step of one data-parallel rank (distinct inputs give distinct seeds)."""
    x = (seed * 1_000_003 + step) * 1_000_033 + micro
    x = x * 1_000_037 + dp_rank
    return x % (2**63 - 1)


class ParallelModelView:
    """What a family's ``forward`` is given under a wrapping engine (DDP, ColossalAI): calls go through the wrapper
    (DDP's forward prepares its gradient sync), attribute reads (``config``, weights' dtype) reach the model."""

    def __init__(self, wrapper: torch.nn.Module, model: torch.nn.Module):
        self._wrapper, self._model = wrapper, model

    def __call__(self, *args, **kwargs):
        return self._wrapper(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def training_model_fn(family, engine: Engine):
    """``f(x, t, y=..., mask=...)`` for the objectives, calling the parallelized model through its family.

    A family whose ``model_fn`` is the model itself (STDiT) gets the engine's module, exactly as before families
    existed; the others get their ``forward`` around it (through :class:`ParallelModelView` under DDP).
    """
    model = engine.unwrap()
    if family.model_fn(model) is model:
        return engine.model
    return family.model_fn(model if engine.model is model else ParallelModelView(engine.model, model))


class TrainStep:
    """Forward, backward and update of the parallelized model, through an :class:`Engine`.

    Args:
        engine: a prepared engine (``engine.prepare`` was called).
        diffusion: the objective (``opensora.diffusion.build_scheduler``): ``training_losses(model, x, cond, ...)``.
        vae, text_encoder: the frozen encoders for batches of ``video`` + ``text``; None when every batch
            carries cached ``latent`` + ``y`` + ``mask``.
        accum: micro-steps per optimizer step (the loss is scaled by ``1/accum``).
        seed: the recipe seed; with the step, micro-step and ``dp_rank`` it fixes every random draw.
        dp_rank: this rank's data-parallel rank (the ranks of one sequence-parallel group share it).
        grad_clip: global gradient-norm threshold; None or 0 = no clipping (the norm is still returned).
        conditioning: frame-conditioning mask probabilities (image-to-video, extension, ...); None or all 0:
            plain text-to-video, with the same random draws as before.
        model_fn: what the objective calls (:func:`training_model_fn`); None: the engine's module (STDiT).
        caption_dropout, null_text: with ``null_text`` (the encoded empty prompt (1, 1, L, Ct) and its (1, L)
            mask), each caption is replaced by it with probability ``caption_dropout``, drawn from the step's
            generator (classifier-free guidance for models without in-model dropout). None: no dropout here.
    """

    def __init__(self, engine: Engine, diffusion, *, vae=None, text_encoder=None, accum: int = 1, seed: int = 0,
                 dp_rank: int = 0, grad_clip: float | None = None, conditioning: ConditioningConfig | None = None,
                 model_fn=None, caption_dropout: float = 0.0,
                 null_text: tuple[torch.Tensor, torch.Tensor] | None = None):
        if accum < 1:
            raise ValueError(f"accum must be >= 1, got {accum}")
        self.engine, self.diffusion = engine, diffusion
        self.conditioning = conditioning if conditioning is not None and conditioning.enabled else None
        self.vae, self.text_encoder = vae, text_encoder
        self.accum, self.seed, self.dp_rank = accum, seed, dp_rank
        self.max_norm = grad_clip or math.inf
        self.device = engine.dist.device
        self._model_fn = model_fn
        self.caption_dropout = caption_dropout if null_text is not None else 0.0
        self.null_text = null_text

    @property
    def model_fn(self):
        """The callable the objective trains (the engine's module unless the trainer gave a family's)."""
        return self.engine.model if self._model_fn is None else self._model_fn

    @torch.no_grad()
    def encode(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents (B, C, T, h, w) fp32, text tokens (B, 1, L, Ct) and mask (B, L) of a batch, on the device."""
        if "latent" in batch:  # from the latent cache
            x = batch["latent"].to(self.device, non_blocking=True)
            y, mask = batch["y"].to(self.device, non_blocking=True), batch["mask"].to(self.device, non_blocking=True)
        else:
            if self.vae is None or self.text_encoder is None:
                raise ValueError("this batch has videos and captions but the step was built without encoders")
            video = batch["video"].to(self.device, non_blocking=True)  # (B, 3, T, H, W) in [-1, 1]
            vae_dtype = next(self.vae.parameters(), video).dtype
            x = self.vae.encode(video.to(vae_dtype), generator=generator)
            text = self.text_encoder.encode(list(batch["text"]), device=self.device)
            y, mask = text["y"], text["mask"]
        return x.float(), y, mask

    def forward_backward(self, batch: dict, step: int, micro: int) -> torch.Tensor:
        """Loss and backward of one micro-batch; returns the detached mean loss (unscaled).

        Args:
            batch: a collated batch (``video`` + ``text``, or cached ``latent`` + ``y`` + ``mask``).
            step: optimizer steps taken so far (part of the seed).
            micro: index of the micro-step within the optimizer step; gradients are synchronised after the
                backward of the last one (``accum - 1``) only.
        """
        seed = step_seed(self.seed, step, micro, self.dp_rank)
        torch.manual_seed(seed)  # caption dropout inside the model draws from the global generator
        generator = torch.Generator(self.device).manual_seed(seed)
        x, y, mask = self.encode(batch, generator)
        frames = {}
        if self.conditioning is not None:  # (B, T_latent) given frames, drawn from the step's generator
            frames["cond_mask"] = sample_cond_mask(x.shape[0], x.shape[2], self.conditioning, generator)
        if self.caption_dropout > 0:
            y, mask = self.drop_captions(y, mask, generator)
        self.engine.set_grad_sync(micro == self.accum - 1)  # before the forward: DDP decides there
        with self.engine.autocast():
            terms = self.diffusion.training_losses(self.model_fn, x, dict(y=y, mask=mask), generator=generator,
                                                   **frames)
        loss = terms["loss"].mean()
        self.engine.backward(loss / self.accum)
        return loss.detach()

    def drop_captions(self, y: torch.Tensor, mask: torch.Tensor,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's caption (B, 1, L, Ct) and mask (B, L) replaced by the empty prompt's with probability
        ``caption_dropout`` (one uniform draw per sample from the step's ``generator``)."""
        null_y, null_mask = self.null_text
        drop = torch.rand(y.shape[0], generator=generator, device=generator.device) < self.caption_dropout  # (B,)
        drop = drop.to(y.device)
        y = torch.where(drop.view(-1, *[1] * (y.dim() - 1)), null_y.to(y), y)
        mask = torch.where(drop[:, None], null_mask.to(mask), mask)
        return y, mask

    def optimizer_step(self, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Clips, updates and clears the gradients; the update is skipped if the loss or the norm is not finite.

        Args:
            loss: this rank's micro-step losses (any shape) or None; a non-finite value on any rank skips the
                step on every rank (one all-reduce of a flag on the device, no host sync).
        Returns:
            (the gradient norm before clipping, the 0-dim bool "loss not finite" flag or None), on the device.
            The step was skipped iff ``nonfinite_flag(norm, loss_flag)``.
        """
        found_inf = None
        if loss is not None:
            found_inf = ~torch.isfinite(loss.detach()).all()
            if dist.is_initialized() and dist.get_world_size() > 1:
                flag = found_inf.to(torch.float32)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                found_inf = flag.bool()
        return self.engine.optimizer_step(self.max_norm, found_inf), found_inf
