"""AdamW and the learning-rate schedule: linear warm-up, then constant or cosine decay."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from opensora.training.config import OptimConfig, StageConfig


def build_optimizer(model: nn.Module, optim: OptimConfig, lr: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` (fused kernel on CUDA when ``optim.fused``).

    Args:
        model: the model (before or after ``parallelize``; ``Engine.prepare`` rebinds a fresh optimizer).
        optim: betas, eps, weight decay.
        lr: peak learning rate of the stage (the schedule scales it).
        device: where the parameters live; the fused kernel exists only for CUDA.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params, lr=lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay,
        fused=bool(optim.fused and device.type == "cuda"),
    )


class WarmupSchedule:
    """LR multiplier at a step: ``step / warmup`` during warm-up, then 1 (constant) or a cosine to ``min_lr``.

    A callable object rather than a closure so that ``LambdaLR.state_dict`` saves it with the checkpoint.

    Args:
        warmup_steps: linear ramp length (0: no warm-up).
        total_steps: the stage's steps (end of the cosine).
        schedule: "constant" or "cosine".
        min_ratio: ``min_lr / lr``, the cosine's floor.
    """

    def __init__(self, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float):
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.schedule = schedule
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        # LambdaLR calls this with the number of scheduler steps taken; the update of optimizer step s (1-based)
        # uses lr(s - 1), so the first update of a warm-up uses lr / warmup_steps, never 0.
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig) -> LambdaLR:
    """The stage's schedule over ``optimizer`` (step it once after every optimizer step)."""
    schedule = WarmupSchedule(stage.warmup_steps, stage.steps, stage.lr_schedule, stage.min_lr / stage.lr)
    return LambdaLR(optimizer, schedule)
