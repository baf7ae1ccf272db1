"""Skipped non-finite steps: counted on the device, decided on the host only where the loop synchronises anyway.

A step whose loss (on any rank) or gradient norm is not finite changes nothing: ``Engine.optimizer_step`` skips
the update (weights, moments, Adam's step count), the EMA is not moved, and the LR schedule does not advance
(it counts applied updates, as Megatron-LM's scheduler does). The trainer's step counter, the data position
and the seeds still advance: the next step draws a new batch and new noise.

Where the engine skips on the device (torch's fused AdamW with ``found_inf``, the default on CUDA), the skip
is known on the host only at the next *sync point* (a log step or a checkpoint save): the counters below are
device tensors updated without a sync, :meth:`NonFiniteTracker.sync` reads them all at once. Until then the LR
schedule may run ahead of the applied updates by the steps skipped since the last sync point (it is corrected
there: ``Trainer._set_schedule_position``). Elsewhere (CPU, unfused AdamW, ColossalAI) the engine reads the flag
on the host at every step anyway, and so does the tracker.

After ``max_nonfinite_steps`` consecutive skipped steps the stage stops with :class:`NonFiniteError`, found at
the first sync point after the streak reached the limit.
"""

from __future__ import annotations

import torch

LOSS, GRAD_NORM = 1, 2  # bits of what was not finite


class NonFiniteError(RuntimeError):
    """A stage stopped because too many consecutive steps were not finite (the run diverged)."""


class NonFiniteTracker:
    """Device counters of skipped steps.

    Args:
        device: where the step's flags live.
        limit: consecutive skipped steps that stop the stage (``optim.max_nonfinite_steps``).
        skipped: skipped steps before this process (from the checkpoint: ``step - scheduler position``).
    """

    def __init__(self, device: torch.device, limit: int, skipped: int = 0):
        self.limit = int(limit)
        self.skipped = int(skipped)  # host: total skipped steps known at the last sync point
        self.window = 0  # host: skipped steps since the last call of :meth:`take_window`
        # streak, longest streak since the last sync, total since the last sync, what was bad (bits) in the
        # streak that reached the longest, the step that streak started at.
        self._c = torch.zeros(5, dtype=torch.int64, device=device)

    def add(self, step: int, loss_bad: torch.Tensor | None, norm_bad: torch.Tensor) -> None:
        """Counts optimizer step ``step`` (1-based) from its 0-dim bool flags; no host sync."""
        norm_bad = norm_bad.to(torch.bool)
        bad = norm_bad if loss_bad is None else norm_bad | loss_bad.to(torch.bool)
        kind = norm_bad.long() * GRAD_NORM + (0 if loss_bad is None else loss_bad.long() * LOSS)
        streak, longest, total, kinds, start = self._c.unbind()
        new_streak = (streak + 1) * bad.long()
        start = torch.where(bad & (streak == 0), torch.full_like(start, step), start)
        kinds = torch.where(bad, torch.where(streak == 0, kind, kinds | kind), kinds)
        better = new_streak > longest
        self._c = torch.stack([new_streak, torch.where(better, new_streak, longest), total + bad.long(), kinds, start])

    def sync(self) -> None:
        """Reads the counters on the host (one sync); raises :class:`NonFiniteError` past the limit."""
        streak, longest, total, kinds, start = (int(v) for v in self._c.tolist())
        self.skipped += total
        self.window += total
        self._c = torch.stack([self._c[0], self._c[0], torch.zeros_like(self._c[2]), self._c[3], self._c[4]])
        if longest >= self.limit:
            what = " and ".join(name for bit, name in ((LOSS, "loss"), (GRAD_NORM, "gradient norm")) if kinds & bit)
            raise NonFiniteError(
                f"{longest} consecutive optimizer steps from step {start} had a non-finite {what or 'value'} "
                f"(optim.max_nonfinite_steps is {self.limit}); their updates were skipped, so the weights, "
                f"optimizer state and EMA hold only finite values. The run diverged: resume from the last "
                f"checkpoint with a lower learning rate (e.g. --set stages.N.lr=...) or stronger clipping "
                f"(optim.grad_clip)"
            )

    def take_window(self) -> int:
        """Skipped steps since the previous call (known at the last sync), for the metrics row."""
        n, self.window = self.window, 0
        return n
