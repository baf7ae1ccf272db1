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

    The cosine reaches ``min_lr`` at the stage's last update (scheduler step ``total_steps - 1``). Its settings come
    from the recipe of the run that is going on: :func:`apply_schedule_config` puts them back after a resume
    (``LambdaLR.load_state_dict`` restores a callable object's attributes from the checkpoint).

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
        span = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def stage_schedule(stage: StageConfig) -> WarmupSchedule:
    """The LR multiplier of a stage's recipe settings."""
    return WarmupSchedule(stage.warmup_steps, stage.steps, stage.lr_schedule, stage.min_lr / stage.lr)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, stage: StageConfig) -> LambdaLR:
    """The stage's schedule over ``optimizer`` (step it once after every applied optimizer update)."""
    return LambdaLR(optimizer, stage_schedule(stage))


def apply_schedule_config(optimizer: torch.optim.Optimizer, scheduler: LambdaLR, stage: StageConfig,
                          optim: OptimConfig) -> list[str]:
    """Puts the recipe's schedule and AdamW settings back after a checkpoint load; returns what changed.

    A checkpoint restores the step count and the moments, and with them, silently, the schedule object's
    ``total_steps`` / ``warmup_steps`` / ``min_ratio``, the ``base_lrs`` and the optimizer's param groups (lr, betas,
    eps, weight decay) of the run that wrote it: a resume with ``--set stages.1.steps=2000`` or a new ``lr`` would
    keep the old ones. Settings come from the config; only the position (``last_epoch``) comes from the checkpoint.

    Args:
        optimizer: the optimizer the scheduler drives (``Engine.schedule_optimizer``), state loaded.
        scheduler: the stage's ``LambdaLR``, state loaded.
        stage, optim: the recipe's settings for this run.
    Returns:
        one ``"name old -> new"`` entry per setting that differs from the checkpoint's.
    """
    old = scheduler.lr_lambdas[0]
    new = stage_schedule(stage)
    old_lr = scheduler.base_lrs[0] if scheduler.base_lrs else stage.lr
    group = optimizer.param_groups[0]
    pairs = [
        ("steps", old.total_steps, new.total_steps),
        ("warmup_steps", old.warmup_steps, new.warmup_steps),
        ("lr_schedule", old.schedule, new.schedule),
        ("lr", old_lr, stage.lr),
        ("min_lr", old.min_ratio * old_lr, stage.min_lr),
        ("betas", tuple(float(b) for b in group["betas"]), tuple(float(b) for b in optim.betas)),
        ("eps", group["eps"], optim.eps),
        ("weight_decay", group["weight_decay"], optim.weight_decay),
    ]
    changes = [f"{name} {a!r} -> {b!r}" for name, a, b in pairs if not _same(a, b)]
    scheduler.lr_lambdas = [new for _ in optimizer.param_groups]
    scheduler.base_lrs = [stage.lr for _ in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["initial_lr"] = stage.lr
        g["betas"] = tuple(optim.betas)
        g["eps"] = optim.eps
        g["weight_decay"] = optim.weight_decay
    set_schedule_position(scheduler, scheduler.last_epoch, force=True)
    return changes


def set_schedule_position(scheduler: LambdaLR, position: int, force: bool = False) -> None:
    """Puts the schedule at ``position`` applied updates and sets the rate of the next update from it.

    The same rate ``LambdaLR.step`` would set after ``position`` steps (``base_lr * lambda(position)``); the
    trainer uses it instead of ``step()`` because a skipped non-finite step does not advance the schedule, and
    where the skip is known on the host only later, the position is corrected then.
    """
    if position == scheduler.last_epoch and not force:
        return
    scheduler.last_epoch = int(position)
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports (LambdaLR keeps it the same way)


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b
