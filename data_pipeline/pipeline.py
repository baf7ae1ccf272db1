"""Stages by name, and running one stage or a whole pipeline (optionally sharded over torchrun ranks)."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import pandas as pd

from data_pipeline.caption import caption_batch, caption_row
from data_pipeline.config import (
    CaptionConfig, DownloadConfig, FilterConfig, PipelineConfig, ProbeConfig, RunnerConfig, SplitConfig,
)
from data_pipeline.download import download
from data_pipeline.filter import filter_clip
from data_pipeline.probe import probe
from data_pipeline.runner import Stage, Summary, run_stage
from data_pipeline.sources import resolve_input
from data_pipeline.split import split
from opensora.data.manifest import read_manifest, usable_mask, write_manifest


class StageSpec(NamedTuple):
    """What a stage name stands for; the functions are module-level, so they pickle by reference."""

    fn: Callable[..., list]  # row function, ``fn(row, cfg)``
    batch_fn: Callable[..., list] | None  # batch function, or None (see runner.Stage)
    schema: type  # the stage's config dataclass


# The functions themselves, not their names: a renamed function is an import error here, not a failure at
# run time. caption imports torch/transformers inside its functions, so the CPU stages do not load them.
STAGES: dict[str, StageSpec] = {
    "download": StageSpec(download, None, DownloadConfig),
    "probe": StageSpec(probe, None, ProbeConfig),
    "split": StageSpec(split, None, SplitConfig),
    "filter": StageSpec(filter_clip, None, FilterConfig),
    "caption": StageSpec(caption_row, caption_batch, CaptionConfig),
}
MEDIA_DIRS = {"download": "videos", "split": "clips"}


def make_stage(name: str, cfg, output: str | Path) -> Stage:
    """Builds the :class:`Stage` ``name`` with ``cfg``; an empty ``out_dir`` becomes ``<output folder>/<media>``.

    Args:
        name: one of :data:`STAGES`.
        cfg: that stage's config dataclass.
        output: the stage's output manifest (locates default media folders).
    """
    spec = STAGES[name]
    if name in MEDIA_DIRS:
        out_dir = cfg.out_dir or str(Path(output).resolve().parent / MEDIA_DIRS[name])
        cfg = dataclasses.replace(cfg, out_dir=str(Path(out_dir).resolve()))
    return Stage(name=name, fn=spec.fn, cfg=cfg, batch_fn=spec.batch_fn)


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) outside it."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard(df: pd.DataFrame, rank: int, world: int) -> pd.DataFrame:
    """Rows ``rank, rank + world, ...``: every row in exactly one shard, shards within one row in size."""
    return df.iloc[rank::world].reset_index(drop=True)


def shard_path(output: str | Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` writes its part of ``output``."""
    output = Path(output)
    return output.with_name(f"{output.stem}.rank{rank}-of-{world}{output.suffix}")


def merge_shards(input_df: pd.DataFrame, output: str | Path, world: int) -> pd.DataFrame:
    """Concatenates the ranks' outputs in input order and writes ``output`` atomically."""
    parts = [read_manifest(shard_path(output, r, world), usable_only=False) for r in range(world)]
    merged = pd.concat(parts, ignore_index=True)
    order = {row_id: i for i, row_id in enumerate(input_df["id"])}
    # Derived rows ("<id>_0003") sort under their parent; unknown ids go last in a stable order.
    parent = merged["id"].map(lambda i: order.get(i, order.get(str(i).rsplit("_", 1)[0], len(order))))
    merged = merged.assign(_order=parent).sort_values("_order", kind="stable").drop(columns="_order")
    write_manifest(merged, output)
    return merged


def run_one(name: str, cfg, input: str | Path | pd.DataFrame, output: str | Path, runner: RunnerConfig) -> Summary:
    """Runs stage ``name``; under torchrun each rank takes its shard and rank 0 merges (gloo barrier).

    Args:
        name: stage name.
        cfg: its config.
        input: manifest path, folder, URL list or DataFrame.
        output: output manifest.
        runner: execution settings.
    """
    df = input if isinstance(input, pd.DataFrame) else resolve_input(input)
    stage = make_stage(name, cfg, output)
    if name == "caption":  # a task holds several generate batches: the frames of the next ones decode meanwhile
        runner = dataclasses.replace(runner, batch_rows=max(runner.batch_rows, cfg.batch_size * cfg.task_batches))
    rank, world = dist_env()
    if world == 1:
        return run_stage(stage, df, output, runner)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    summary = run_stage(stage, shard(df, rank, world), shard_path(output, rank, world), runner)
    dist.barrier()
    if rank == 0:
        merge_shards(df, output, world)
    dist.barrier()
    return summary


def run_pipeline(cfg: PipelineConfig) -> list[Summary]:
    """Runs ``cfg.stages`` in order: WORK_DIR/NN_STAGE.parquet each, then the usable rows to ``cfg.output``.

    Args:
        cfg: the whole pipeline config.
    Returns:
        one :class:`Summary` per stage.
    """
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    current: str | Path = cfg.input
    summaries = []
    for i, name in enumerate(cfg.stages):
        output = work / f"{i:02d}_{name}.parquet"
        stage_cfg = getattr(cfg, name)
        if name in MEDIA_DIRS and not stage_cfg.out_dir:
            stage_cfg = dataclasses.replace(stage_cfg, out_dir=str(work / MEDIA_DIRS[name]))
        summaries.append(run_one(name, stage_cfg, current, output, cfg.runner))
        current = output
    rank, _ = dist_env()
    if rank == 0:
        final = read_manifest(current, usable_only=False)
        out = Path(cfg.output) if cfg.output else work / "manifest.parquet"
        write_manifest(final[usable_mask(final)], out)
        print(f"pipeline: {int(usable_mask(final).sum())} usable rows -> {out}", file=sys.stderr)
    return summaries
