"""Stages by name, and running one stage or a whole pipeline (optionally sharded over torchrun ranks)."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, NamedTuple

import pandas as pd

from data_pipeline.caption import caption_batch, caption_row, throughput
from data_pipeline.config import (
    CaptionConfig, DedupConfig, DownloadConfig, FilterConfig, PipelineConfig, ProbeConfig, RunnerConfig, SplitConfig,
)
from data_pipeline.datasets import dataset_input
from data_pipeline.dedup import dedup_signature, group_duplicates
from data_pipeline.download import download
from data_pipeline.filter import filter_clip
from data_pipeline.probe import probe
from data_pipeline.runner import Stage, Summary, check_failure_share, run_stage
from data_pipeline.sources import resolve_input
from data_pipeline.split import split
from opensora.data.manifest import OK_STATUS, read_manifest, usable_mask, write_manifest
from opensora.utils import atomic_write_path, read_jsonl


class StageSpec(NamedTuple):
    """What a stage name stands for; the functions are module-level, so they pickle by reference."""

    fn: Callable[..., list]  # row function, ``fn(row, cfg)``
    batch_fn: Callable[..., list] | None  # batch function, or None (see runner.Stage)
    schema: type  # the stage's config dataclass
    # Once every row is done, ``finish(output, cfg)`` rewrites the whole output manifest (dedup's grouping),
    # on rank 0 after the merge; it runs again on every re-run, the row results come from the journal.
    finish: Callable[..., object] | None = None
    # ``report(rows done in this run, seconds)`` -> the stage's figures in its summary line (runner.Stage.report)
    report: Callable[[list, float], str] | None = None


# The functions themselves, not their names: a renamed function is an import error here, not a failure at
# run time. caption imports torch/transformers inside its functions, so the CPU stages do not load them.
STAGES: dict[str, StageSpec] = {
    "download": StageSpec(download, None, DownloadConfig),
    "probe": StageSpec(probe, None, ProbeConfig),
    "split": StageSpec(split, None, SplitConfig),
    "filter": StageSpec(filter_clip, None, FilterConfig),
    "dedup": StageSpec(dedup_signature, None, DedupConfig, group_duplicates),
    "caption": StageSpec(caption_row, caption_batch, CaptionConfig, report=throughput),
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
    out_dirs: tuple[str, ...] = ()
    if name in MEDIA_DIRS:
        out_dir = cfg.out_dir or str(Path(output).resolve().parent / MEDIA_DIRS[name])
        cfg = dataclasses.replace(cfg, out_dir=str(Path(out_dir).resolve()))
        out_dirs = (cfg.out_dir,)
    return Stage(name=name, fn=spec.fn, cfg=cfg, batch_fn=spec.batch_fn, out_dirs=out_dirs,
                 row_timeout_s=cfg.row_timeout_s, report=spec.report)


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


def seed_journal(name: str, output: str | Path, rank: int, world: int, ids: set[str]) -> int:
    """Resume across a change in the number of processes: adds to the journal of this process's part of
    ``output`` (all of it, or its shard) the rows of ``ids`` that journals of other layouts finished and it
    lacks (``OUTPUT.journal.jsonl``, ``OUTPUT.rankR-of-W.EXT.journal.jsonl``). Returns how many rows it added."""
    output = Path(output)

    def journal_of(r: int, w: int) -> Path:  # the runner's journal of a part (runner.Journal)
        return Path(f"{output if w == 1 else shard_path(output, r, w)}.journal.jsonl")

    journal, layout = journal_of(rank, world), {journal_of(r, world) for r in range(world)}
    pattern = f"{glob.escape(output.stem)}.rank*-of-*{glob.escape(output.suffix)}.journal.jsonl"
    others = [p for p in [journal_of(0, 1), *sorted(output.parent.glob(pattern))] if p not in layout]
    if not any(p.exists() for p in others):
        return 0
    own = {e["id"]: e["status"] for e in read_jsonl(journal)}
    found: dict[str, dict] = {}
    for other in others:
        for entry in read_jsonl(other):
            row_id, finished = entry.get("id"), entry.get("status") == OK_STATUS
            if row_id not in ids or own.get(row_id) == OK_STATUS or (row_id in own and not finished):
                continue
            if row_id not in found or finished:  # finished in one layout, failed in another: finished
                found[row_id] = entry
    if found:
        kept = journal.read_bytes() if journal.exists() else b""
        kept = kept[: kept.rfind(b"\n") + 1]  # without a half-written last line
        with atomic_write_path(journal) as tmp:
            tmp.write_bytes(kept + "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in found.values()).encode())
        print(f"{name}: {len(found)} rows finished by runs on another number of processes, taken from their journals",
              file=sys.stderr, flush=True)
    return len(found)


# Waiting for the other ranks' shards (run_one), in seconds. Ranks may finish hours apart, so the wait is no
# collective with a timeout: files on the shared output folder say who is done, and a heartbeat file per rank
# tells a slow rank (it keeps changing) from a dead one, and, by the rows it has finished, from a stuck one.
SHARD_POLL_S = 5.0  # how often a waiting rank looks at the files
SHARD_HEARTBEAT_S = 15.0  # how often every rank rewrites its heartbeat file (from a background thread)
SHARD_STALL_S = 600.0  # a rank whose heartbeat has not changed for this long is taken for dead; also the margin
# of the derived progress limit (stall_limit)
SHARD_REPORT_S = 300.0  # how often rank 0 prints what it is waiting for


class ShardError(RuntimeError):
    """Another rank failed or died, so this rank cannot finish the stage; a re-run resumes from the journals."""


def _done_path(output: str | Path, rank: int, world: int) -> Path:
    return Path(f"{shard_path(output, rank, world)}.done.json")


def _alive_path(output: str | Path, rank: int, world: int) -> Path:
    return Path(f"{shard_path(output, rank, world)}.alive.json")


def _merged_path(output: str | Path) -> Path:
    return Path(f"{output}.merged.json")


def _write_json(path: Path, data: dict) -> None:
    with atomic_write_path(path) as tmp:  # a reader sees the old file or the whole new one
        tmp.write_text(json.dumps(data), encoding="utf-8")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def stall_limit(stage: Stage, runner: RunnerConfig) -> float:
    """How long a rank running its shard may go without finishing a row before it counts as stuck (0 = no check).

    ``runner.stall_s``, or else the longest a task may take while all is well: its rows' time limit, then,
    split row by row, the hung row's again, plus ``SHARD_STALL_S``. Past that a row's limit failed to end it
    (a call stuck in C with ``workers=0``), or the driver itself hangs."""
    if runner.stall_s:
        return runner.stall_s
    if not stage.row_timeout_s:
        return 0.0
    return (runner.batch_rows + 1) * stage.row_timeout_s + SHARD_STALL_S


class _Heartbeat:
    """Rewrites ``path`` every ``SHARD_HEARTBEAT_S`` from a daemon thread while the block runs: a rank busy in
    a long ``generate`` keeps beating, a killed one (segfault, OOM killer, lost node) stops. Each beat carries
    the rank's progress: ``state`` (``running`` its shard, or ``waiting`` for the others), ``rows`` finished in
    this run (:meth:`progress`) and its ``stall_s`` (:func:`stall_limit`), so that a rank hung in a row, whose
    heartbeat thread beats on, is found too (:class:`_Liveness`)."""

    def __init__(self, path: Path, token: str, stall_s: float = 0.0):
        self.path, self.token, self.stall_s = path, token, stall_s
        self.state, self.rows = "running", 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="shard-heartbeat", daemon=True)

    def progress(self, rows: int) -> None:
        """The runner's ``on_progress``: rows journaled so far."""
        self.rows = rows

    def _beat(self) -> None:
        beat = 0
        while True:
            with contextlib.suppress(OSError):  # a flaky disk: the next beat tries again, waiters allow SHARD_STALL_S
                _write_json(self.path, {"token": self.token, "beat": beat, "host": socket.gethostname(),
                                        "pid": os.getpid(), "state": self.state, "rows": self.rows,
                                        "stall_s": self.stall_s})
            beat += 1
            if self._stop.wait(SHARD_HEARTBEAT_S):
                return

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


class _Liveness:
    """When each watched rank's heartbeat, and the rows it reports finished, last changed, by this process's
    clock (other hosts' clocks may differ)."""

    def __init__(self, name: str, output: str | Path, world: int):
        self.name, self.output, self.world = name, output, world
        self.seen: dict[int, tuple[dict | None, float]] = {}
        self.rows: dict[int, tuple[int, float]] = {}

    def check(self, ranks: set[int]) -> None:
        """Raises :class:`ShardError` if one of ``ranks`` has not beaten for ``SHARD_STALL_S`` (dead), or beats
        but, running its shard, has finished no row for its ``stall_s`` (stuck)."""
        now = time.monotonic()
        for r in sorted(ranks):
            path = _alive_path(self.output, r, self.world)
            beat = _read_json(path)
            where = f" (pid {beat['pid']} on {beat['host']})" if beat else ""
            if r not in self.seen or beat != self.seen[r][0]:
                self.seen[r] = (beat, now)
            elif now - self.seen[r][1] > SHARD_STALL_S:
                raise ShardError(f"{self.name}: rank {r}{where} looks dead: its heartbeat {path} has not changed for "
                                 f"{SHARD_STALL_S:.0f}s. A re-run resumes; rows already finished are not redone.")
            if not beat or beat.get("state") != "running" or not beat.get("stall_s"):
                self.rows.pop(r, None)  # waiting for the others, or a heartbeat without progress: nothing to judge
                continue
            if r not in self.rows or beat["rows"] != self.rows[r][0]:
                self.rows[r] = (beat["rows"], now)
            elif now - self.rows[r][1] > beat["stall_s"]:
                raise ShardError(
                    f"{self.name}: rank {r}{where} looks stuck: its heartbeat goes on, but it has finished no row for "
                    f"{beat['stall_s']:.0f}s ({beat['rows']} rows finished in this run; runner.stall_s). A row past "
                    f"its time limit that nothing could end, e.g. a call stuck in C with workers=0; under torchrun "
                    f"the launcher ends it with the others, elsewhere end it by hand. A re-run resumes; rows already "
                    f"finished are not redone.")


def _journaled(path: Path) -> int:
    """Rows finished so far in a shard (lines of its runner journal, ``OUTPUT.journal.jsonl``)."""
    try:
        with open(f"{path}.journal.jsonl", "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0


def _wait_for_shards(name: str, df: pd.DataFrame, output: str | Path, world: int, token: str) -> None:
    """Rank 0: returns once every other rank has marked its shard done in this run (``token``)."""
    pending, live = set(range(1, world)), _Liveness(name, output, world)
    start = last_report = time.monotonic()
    while True:
        for r in sorted(pending):
            marker = _read_json(_done_path(output, r, world))
            if marker is None or marker.get("token") != token:  # absent, or left by an earlier run
                continue
            if marker["status"] != "done":
                raise ShardError(f"{name}: rank {r} failed: {marker['error']}. A re-run resumes; rows already "
                                 "finished are not redone.")
            pending.discard(r)
        if not pending:
            return
        live.check(pending)
        now = time.monotonic()
        if now - last_report >= SHARD_REPORT_S or last_report == start:
            counts = ", ".join(f"rank {r} at {_journaled(shard_path(output, r, world))}/{len(shard(df, r, world))} rows"
                               for r in sorted(pending))
            print(f"{name}: rank 0 waiting for the other shards ({now - start:.0f}s): {counts}", file=sys.stderr,
                  flush=True)
            last_report = now
        time.sleep(SHARD_POLL_S)


def _wait_for_merge(name: str, output: str | Path, world: int, token: str) -> None:
    """Ranks > 0: returns once rank 0 has merged the shards of this run (``token``)."""
    live = _Liveness(name, output, world)
    while True:
        marker = _read_json(_merged_path(output))
        if marker is not None and marker.get("token") == token:
            if marker["status"] != "done":
                raise ShardError(f"{name}: rank 0 could not merge the shards: {marker['error']}")
            return
        live.check({0})
        time.sleep(SHARD_POLL_S)


def run_one(name: str, cfg, input: str | Path | pd.DataFrame, output: str | Path, runner: RunnerConfig) -> Summary:
    """Runs stage ``name``; under torchrun each rank takes its shard and rank 0 merges them into ``output``.

    Ranks may finish hours apart (one GPU gets the long clips), so after its shard a rank does not wait in a
    collective, whose timeout would end the run: it writes ``<shard>.done.json``, and rank 0 polls for those,
    then merges and writes ``OUTPUT.merged.json``, which the other ranks poll for. A rank that raises marks
    its shard failed, and the waiting ranks raise :class:`ShardError` naming it; one that dies without a
    word stops its heartbeat file and is declared dead after ``SHARD_STALL_S`` (torchrun ends the others at
    once anyway). A rank whose heartbeat beats on but which finishes no row for :func:`stall_limit` (hung in
    a row its time limit could not end) is declared stuck the same way. Each shard has its own journal, so a re-run redoes only rows that had not finished (on
    another number of ranks too: :func:`seed_journal`). The files must be on storage every rank sees, like
    the shards themselves.

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
    finish = STAGES[name].finish
    if world == 1:
        seed_journal(name, output, 0, 1, set(df["id"]))
        summary = run_stage(stage, df, output, runner)
        if finish is not None:
            finish(output, cfg)
        return summary
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    # The run's token tells this run's marker files from an earlier run's. This is the only collective: the
    # ranks start together, so its timeout does not matter.
    box = [uuid.uuid4().hex if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    token = box[0]
    shard_done = False
    part, rows = shard_path(output, rank, world), shard(df, rank, world)
    with _Heartbeat(_alive_path(output, rank, world), token, stall_limit(stage, runner)) as heartbeat:
        try:
            seed_journal(name, output, rank, world, set(rows["id"]))
            summary = run_stage(stage, rows, part, runner, on_progress=heartbeat.progress)
            heartbeat.state = "waiting"  # no more rows to finish: judged by its beat alone from here on
            _write_json(_done_path(output, rank, world), {"token": token, "status": "done", "summary": str(summary)})
            shard_done = True
            if rank == 0:
                _wait_for_shards(name, df, output, world, token)
                merge_shards(df, output, world)
                if finish is not None:
                    finish(output, cfg)
                _write_json(_merged_path(output), {"token": token, "status": "done"})
            else:
                print(f"{name}: rank {rank} done, waiting for rank 0 to merge", file=sys.stderr, flush=True)
                _wait_for_merge(name, output, world, token)
        except BaseException as err:  # tell the waiting ranks, then fail here too
            failed = {"token": token, "status": "failed", "error": f"{type(err).__name__}: {err}"[:1000]}
            with contextlib.suppress(OSError):
                if not shard_done:
                    _write_json(_done_path(output, rank, world), failed)
                if rank == 0:
                    _write_json(_merged_path(output), failed)
            raise
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
    current: str | Path | pd.DataFrame = cfg.input
    stages = list(cfg.stages)
    if cfg.input_format:
        current = dataset_input(cfg.input, cfg.input_format, cfg.select, cfg.dataset_root)
        if "download" not in stages and current["url"].notna().any():
            stages.insert(0, "download")  # a dataset's sources are URLs: fetched once each, before anything else
    summaries = []
    for i, name in enumerate(stages):
        output = work / f"{i:02d}_{name}.parquet"
        stage_cfg = getattr(cfg, name)
        if name in MEDIA_DIRS and not stage_cfg.out_dir:
            stage_cfg = dataclasses.replace(stage_cfg, out_dir=str(work / MEDIA_DIRS[name]))
        summaries.append(run_one(name, stage_cfg, current, output, cfg.runner))
        check_failure_share(summaries[-1], cfg.runner)
        current = output
    rank, _ = dist_env()
    if rank == 0:
        final = read_manifest(current, usable_only=False)
        out = Path(cfg.output) if cfg.output else work / "manifest.parquet"
        write_manifest(final[usable_mask(final)], out)
        # Vanished sources are a dataset's loss, not the run's fault: said apart, next to the stages' failures.
        failed, vanished = sum(s.failed for s in summaries), sum(s.vanished for s in summaries)
        print(f"pipeline: {int(usable_mask(final).sum())} usable rows -> {out}; failed rows: {failed}, vanished "
              f"sources: {vanished}", file=sys.stderr)
    return summaries
