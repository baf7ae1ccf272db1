"""The trainer's one metrics path: ``<stage>/metrics.jsonl``, TensorBoard, W&B, the console and a tqdm bar.

Kept beside the trainer, as torchtitan keeps its ``MetricsProcessor``: the trainer hands over each step's
results and says when to log; this module accumulates them, reduces them over ranks and writes them.

A step's loss and grad norm are device tensors: they are only collected between log steps, and
``MetricsLogger.log`` reduces the window's with one all-reduce pair, the training loop's one GPU->CPU sync.
Throughput and MFU divide the window's work by its wall time, less the time spent saving checkpoints.
Only rank 0 writes; every rank calls ``log`` (it is collective).
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from opensora.accounting import Ledger
from opensora.training.config import LoggingConfig


class MetricsLogger:
    """Accumulates a stage's step results and writes one row per log step on rank 0.

    Args:
        stage_dir: ``run_dir/<stage>``; holds ``metrics.jsonl`` and ``tensorboard/``.
        run_name: the W&B run is named ``<run_name>/<stage_name>``.
        stage_name: shown in the console lines and the progress bar.
        total_steps: the stage's ``steps`` (the bar's total, the "step N/total" of the console line).
        config: the recipe's logging section.
        hparams: the recipe as a plain dict, recorded in W&B.
        ledger: the stage's cost ledger (spend, and the peak TFLOP/s that MFU divides by).
        world_size: ranks whose losses are averaged (all of them, data- and sequence-parallel).
        device: where the step tensors live (and whose peak memory is reported).
        is_main: rank 0, the only rank that writes.
    """

    def __init__(self, stage_dir: Path, run_name: str, stage_name: str, total_steps: int, config: LoggingConfig,
                 hparams: dict, ledger: Ledger, world_size: int, device: torch.device, is_main: bool):
        self.stage_dir, self.run_name, self.stage_name = Path(stage_dir), run_name, stage_name
        self.total_steps, self.config, self.hparams, self.ledger = total_steps, config, hparams, ledger
        self.world_size, self.device, self.is_main = world_size, device, is_main
        self._window = _Window()
        self._writers: list = []
        self._metrics_file = None
        self._bar = None

    def open(self, step: int) -> None:
        """Opens the outputs (rank 0) and starts the first window; ``step`` is where the bar starts."""
        self._window = _Window()
        if not self.is_main:
            return
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self._metrics_file = open(self.stage_dir / "metrics.jsonl", "a", encoding="utf-8")
        if self.config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("logging.tensorboard is on but the tensorboard package is not installed; skipped")
            else:
                self._writers.append(_TensorBoard(SummaryWriter(str(self.stage_dir / "tensorboard"))))
        if self.config.wandb:
            import wandb  # an explicit opt-in: a missing package is an error, not a silent skip

            run = wandb.init(project=self.config.wandb_project, name=f"{self.run_name}/{self.stage_name}",
                             dir=str(self.stage_dir), config=self.hparams, resume="allow")
            self._writers.append(_WandB(run))
        if self.config.progress:
            self._bar = tqdm(total=self.total_steps, initial=step, desc=self.stage_name, dynamic_ncols=True,
                             file=sys.stderr)

    def add(self, out: dict) -> None:
        """Adds one optimizer step's results (``Trainer.train_step``'s dict) to the window; no sync."""
        self._window.add(out)
        if self._bar is not None:
            self._bar.update(1)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (a checkpoint save) does not count in the window's samples/s and MFU."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._window.start += time.perf_counter() - start

    def log(self, step: int, skipped: int = 0) -> None:
        """Reduces the window's metrics over ranks (the loop's one sync point), writes them on rank 0 and
        starts a new window. Collective: every rank calls it at the same steps.

        Args:
            step: the step just taken.
            skipped: steps of the window skipped as non-finite (``opensora.training.nonfinite``); the loss is the
                mean of the finite step losses, so one bad step does not turn the window's figure into NaN.
        """
        window, self._window = self._window, _Window()
        losses = torch.stack(window.losses)
        finite = torch.isfinite(losses)
        # [sum of finite losses, their count]: the mean over ranks and steps, weighing every finite step alike
        loss = torch.stack([torch.where(finite, losses, 0.0).sum(), finite.sum().to(losses.dtype)])
        loss_max = torch.where(torch.isfinite(torch.stack(window.loss_maxes)), torch.stack(window.loss_maxes),
                               -math.inf).max()
        if self.world_size > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            dist.all_reduce(loss_max, op=dist.ReduceOp.MAX)
        loss = loss[0] / loss[1] if loss[1] > 0 else torch.tensor(math.nan)
        elapsed = max(time.perf_counter() - window.start, 1e-9)
        spend = self.ledger.spent(self.stage_name)
        peak = self.ledger.peak_tflops
        row = dict(
            step=step,
            loss=loss.item(),
            loss_max=loss_max.item(),
            grad_norm=window.grad_norm.item(),
            lr=window.lr,
            samples_per_s=window.samples / elapsed,
            tokens_per_s=window.tokens / elapsed,
            mfu=(window.flops / elapsed / (peak * 1e12 * self.world_size)) if peak else None,
            data_wait=window.data_wait / elapsed,
            memory_gb=peak_memory_gb(self.device),
            gpu_hours=spend.gpu_hours,
            dollars=spend.dollars,
            skipped_steps=int(skipped),
            time=time.time(),
        )
        if not self.is_main:
            return
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        for writer in self._writers:
            writer.log(row)
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        line = (f"[{self.stage_name}] step {step}/{self.total_steps} loss {row['loss']:.4f} "
                f"grad_norm {row['grad_norm']:.3f} lr {row['lr']:.3g} {row['samples_per_s']:.2f} samples/s "
                f"MFU {mfu} data_wait {row['data_wait']:.0%} mem {row['memory_gb']:.2f} GB ${row['dollars']:.2f}")
        if skipped:
            line += f" | skipped {skipped} non-finite step{'s' if skipped > 1 else ''}"
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        self.print(line)

    def log_validation(self, result) -> None:
        """Writes a validation pass (``opensora.training.validation.ValidationResult``) on rank 0: its ``val_*`` row to
        ``metrics.jsonl`` (a line of its own, told apart from the training rows by its keys), the scalars, the
        grid and the videos to TensorBoard / W&B, and a console line."""
        if not self.is_main:
            return
        row = {**result.row, "time": time.time()}
        self._metrics_file.write(json.dumps(row) + "\n")
        self._metrics_file.flush()
        for writer in self._writers:
            writer.log_validation(row, result.grid, result.sample_paths)
        shown = [f"{k[4:]} {v:.4f}" for k, v in row.items()
                 if k in ("val_loss", "val_colour", "val_direction", "val_clip_score")]
        self.print(f"[{self.stage_name}] validation at step {result.step}: {', '.join(shown) or 'samples written'} "
                   f"({row['val_time_s']:.1f} s, {row['val_weights']} weights)")

    def print(self, message: str) -> None:
        """A console line on rank 0 (through the bar while it is open, so the two do not garble each other)."""
        if not self.is_main:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        """Closes the outputs; may be called again."""
        for writer in self._writers:
            writer.close()
        self._writers = []
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory in GiB: allocated on a CUDA device, else the process's maximum resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class _Window:
    """Metrics accumulated between two log steps (device tensors stay on the device)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.losses: list[torch.Tensor] = []
        self.loss_maxes: list[torch.Tensor] = []
        self.grad_norm = torch.zeros(())
        self.lr = 0.0
        self.samples = self.tokens = 0
        self.flops = self.data_wait = 0.0

    def add(self, out: dict) -> None:
        self.losses.append(out["loss"])
        self.loss_maxes.append(out["loss_max"])
        self.grad_norm = out["grad_norm"]
        self.lr = out["lr"]
        self.samples += out["samples"]
        self.tokens += out["tokens"]
        self.flops += out["flops"]
        self.data_wait += out["data_wait"]


def _val_scalars(row: dict) -> dict:
    """The numeric ``val_*`` entries of a validation row, without the prefix."""
    return {k[4:]: v for k, v in row.items()
            if k.startswith("val_") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard:
    def __init__(self, writer):
        self.writer = writer

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key not in ("step", "time") and value is not None:
                self.writer.add_scalar(f"train/{key}", value, row["step"])
        self.writer.flush()

    def log_validation(self, row: dict, grid: Path | None, videos: list[Path]) -> None:
        for key, value in _val_scalars(row).items():
            self.writer.add_scalar(f"val/{key}", value, row["step"])
        if grid is not None:
            import numpy as np
            from PIL import Image

            with Image.open(grid) as img:
                self.writer.add_image("val/samples", np.asarray(img.convert("RGB")), row["step"], dataformats="HWC")
        self.writer.flush()  # the mp4s stay on disk: TensorBoard's add_video needs moviepy and re-encodes to GIF

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run):
        self.run = run

    def log(self, row: dict) -> None:
        self.run.log({f"train/{k}": v for k, v in row.items() if k != "step" and v is not None}, step=row["step"])

    def log_validation(self, row: dict, grid: Path | None, videos: list[Path]) -> None:
        import wandb

        data = {f"val/{k}": v for k, v in _val_scalars(row).items()}
        if grid is not None:
            data["val/samples"] = wandb.Image(str(grid))
        for path in videos:
            data[f"val/video/{path.stem}"] = wandb.Video(str(path), format="mp4")
        self.run.log(data, step=row["step"])

    def close(self) -> None:
        self.run.finish()
