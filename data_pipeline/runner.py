"""One runner for every stage: parallel execution, resume, failure records, progress, summary.

A stage is a plain function ``fn(row, cfg) -> list[row]`` (see :class:`Stage`). The runner

1. reads the input manifest and the output's *journal* (``OUTPUT.journal.jsonl``): one JSON line per
   finished input row, appended and fsync'd by this (the driver) process as results arrive, so that
   after ``kill -9`` a re-run skips exactly the rows that finished and redoes the rest - no duplicate,
   no lost row (a half-written last line is cut off);
2. passes through rows that an earlier stage marked failed/rejected (counted as skipped);
3. runs the rest on a local process pool (``executor=local``), in this process (``workers=0``) or as
   Ray tasks (``executor=ray``), a batch of ``batch_rows`` rows per task;
4. turns an exception on a row into a failure record (``<stage>_status=failed``, ``<stage>_error``)
   and :class:`~data_pipeline.rows.Reject` into ``rejected``; the run goes on;
5. writes the output manifest atomically and prints a summary line
   (done / skipped / failed / rejected, with reasons).

Stages write their media atomically themselves (temp file + ``os.replace``), with names derived from
the row id, so a redone row overwrites its own half-finished work instead of duplicating it.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
from tqdm import tqdm

from data_pipeline.config import RunnerConfig
from data_pipeline.rows import Reject, Row, plain, plain_row
from opensora.data.manifest import OK_STATUS, read_manifest, write_manifest

BatchResult = list[dict]
"""Per input row of a batch: ``{"id", "status", "error", "rows"}``."""


@dataclass(frozen=True)
class Stage:
    """A named stage: ``fn(row, cfg) -> list[row]``, or ``batch_fn(rows, cfg) -> list[list[row] | Exception]``.

    ``batch_fn`` exists for stages that gain from seeing several rows at once (caption batches
    generation); it must return one entry per input row, an exception for a row that failed.
    Both must be importable top-level functions (they are pickled to worker processes / Ray).
    """

    name: str
    fn: Callable[[Row, Any], list[Row]]
    cfg: Any
    batch_fn: Callable[[list[Row], Any], list] | None = None


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text.splitlines()[0][:500] if text else type(err).__name__


def _record(stage: str, row_in: Row, outcome: list[Row] | BaseException) -> dict:
    """Turns one row's outcome into a journal entry (the rows it contributes to the output)."""
    status_col, error_col = f"{stage}_status", f"{stage}_error"
    if isinstance(outcome, Reject):
        row = {**row_in, **plain_row(outcome.updates), status_col: "rejected", error_col: outcome.reason}
        return {"id": row_in["id"], "status": "rejected", "error": outcome.reason, "rows": [row]}
    if isinstance(outcome, BaseException):
        err = _error_text(outcome)
        row = {**row_in, status_col: "failed", error_col: err}
        return {"id": row_in["id"], "status": "failed", "error": err, "rows": [row]}
    rows = [{**plain_row(r), status_col: OK_STATUS, error_col: None} for r in outcome]
    return {"id": row_in["id"], "status": OK_STATUS, "error": None, "rows": rows}


def process_batch(stage: Stage, rows: list[Row]) -> BatchResult:
    """Runs ``stage`` on ``rows`` in the current process, catching each row's failure (worker entry point)."""
    if stage.batch_fn is not None:
        try:
            outcomes = stage.batch_fn(rows, stage.cfg)
            if len(outcomes) != len(rows):
                raise RuntimeError(f"{stage.name}: batch_fn returned {len(outcomes)} results for {len(rows)} rows")
        except Exception as err:  # a batch-level failure: retry the rows one by one to find the bad one
            if len(rows) == 1:
                outcomes = [err]
            else:
                return [entry for row in rows for entry in process_batch(stage, [row])]
    else:
        outcomes = []
        for row in rows:
            try:
                outcomes.append(stage.fn(dict(row), stage.cfg))
            except Exception as err:
                outcomes.append(err)
    return [_record(stage.name, row, outcome) for row, outcome in zip(rows, outcomes)]


class Journal:
    """Append-only JSONL of finished input rows next to the output manifest (the resume state)."""

    def __init__(self, output: str | Path):
        self.path = Path(f"{output}.journal.jsonl")
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    def _load(self) -> None:
        data = self.path.read_bytes()
        good_end = data.rfind(b"\n") + 1
        if good_end < len(data):  # killed in the middle of a line: drop the fragment before appending
            with open(self.path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        for line in data[:good_end].decode("utf-8").splitlines():
            if line.strip():
                entry = json.loads(line)
                self.entries[entry["id"]] = entry  # a later entry (a retry) wins

    def append(self, entries: Iterable[dict]) -> None:
        """Writes entries and fsyncs them before returning: what is journaled survives ``kill -9``."""
        lines = []
        for entry in entries:
            self.entries[entry["id"]] = entry
            lines.append(json.dumps(entry, default=plain, ensure_ascii=False) + "\n")
        if lines:
            self._file.write("".join(lines))
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


@dataclass
class Summary:
    """What a stage run did. ``str()`` is the one-line summary the CLI prints."""

    stage: str
    rows_in: int = 0
    done: int = 0
    rows_out: int = 0
    resumed: int = 0
    upstream: int = 0
    failed: int = 0
    rejected: int = 0
    reasons: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0

    def __str__(self) -> str:
        parts = [
            f"{self.stage}: {self.rows_in} rows in {self.seconds:.1f}s",
            f"done {self.done}",
            f"skipped {self.resumed + self.upstream} (finished before: {self.resumed}, failed upstream: {self.upstream})",
            f"failed {self.failed}",
            f"rejected {self.rejected}",
            f"-> {self.rows_out} output rows",
        ]
        line = ", ".join(parts)
        if self.reasons:
            line += " | reasons: " + "; ".join(f"{r} x{n}" for r, n in self.reasons.most_common(10))
        return line


def _reason_key(error: str) -> str:
    """Groups reasons that differ only in numbers (sizes, scores) for the summary line."""
    return re.sub(r"\d+(?:\.\d+)?", "N", error)[:80]


def _upstream_failure(row: Row, stage: str) -> str | None:
    for key, value in row.items():
        if key.endswith("_status") and key != f"{stage}_status" and value in ("failed", "rejected"):
            return key[: -len("_status")]
    return None


def _batches(rows: list[Row], size: int) -> list[list[Row]]:
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _run_inline(stage: Stage, batches: list[list[Row]], on_result: Callable[[BatchResult], None]) -> None:
    for batch in batches:
        on_result(process_batch(stage, batch))


def _run_local(stage: Stage, batches: list[list[Row]], workers: int, on_result) -> None:
    """Process pool with a bounded queue. A crashed worker (a segfault in a decoder) breaks the whole
    pool, so the pool is rebuilt and the rows that were in flight are re-run one at a time, alone in the
    pool: a row that crashes its pool alone is the culprit and gets a failure record; the others finish."""
    queue = collections.deque(batches)
    suspects: collections.deque[Row] = collections.deque()
    ctx = mp.get_context("spawn")  # fork after threads (tqdm, pyarrow, torch) can deadlock
    while queue or suspects:
        broken: list[tuple[list[Row], bool]] = []
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            pending: dict[cf.Future, tuple[list[Row], bool]] = {}
            while queue or suspects or pending:
                if suspects:  # isolate: one suspect at a time, nothing else in flight
                    if not pending:
                        batch = [suspects.popleft()]
                        pending[pool.submit(process_batch, stage, batch)] = (batch, True)
                else:
                    while queue and len(pending) < 2 * workers:
                        batch = queue.popleft()
                        pending[pool.submit(process_batch, stage, batch)] = (batch, False)
                finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for fut in finished:
                    batch, alone = pending.pop(fut)
                    try:
                        on_result(fut.result())
                    except cf.process.BrokenProcessPool:
                        broken.append((batch, alone))
                if broken:
                    broken += list(pending.values())
                    pending.clear()
                    break
        for batch, alone in broken:
            if alone:
                on_result([_record(stage.name, batch[0], RuntimeError("worker process crashed on this row"))])
            else:
                suspects.extend(batch)


def _run_ray(stage: Stage, batches: list[list[Row]], cfg: RunnerConfig, on_result) -> None:
    import ray

    if not ray.is_initialized():
        root = str(Path(__file__).resolve().parent.parent)
        # Local Ray workers must import this package; on a cluster install it on the nodes instead.
        env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)}
        ray.init(address=cfg.ray_address or None, runtime_env={"env_vars": env}, log_to_driver=False)
    task = ray.remote(num_cpus=cfg.ray_num_cpus, num_gpus=cfg.ray_num_gpus)(process_batch)
    stage_ref = ray.put(stage)
    max_in_flight = max(2, int(2 * ray.cluster_resources().get("CPU", 2) / max(cfg.ray_num_cpus, 1e-3)))
    queue = collections.deque(batches)
    pending: dict[Any, list[Row]] = {}
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            batch = queue.popleft()
            pending[task.remote(stage_ref, batch)] = batch
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            batch = pending.pop(ref)
            try:
                on_result(ray.get(ref))
            except Exception as err:  # the task itself died (worker crash, OOM kill)
                on_result([_record(stage.name, row, err) for row in batch])


def run_stage(stage: Stage, input: str | Path | pd.DataFrame, output: str | Path, cfg: RunnerConfig) -> Summary:
    """Runs ``stage`` over every row of ``input`` and writes ``output``; resumes from ``output``'s journal.

    Args:
        stage: the stage (name, function, its config).
        input: a manifest path or a DataFrame (all rows, including earlier failures).
        output: the manifest to write (``.parquet`` / ``.csv``); its journal sits next to it.
        cfg: how to execute (executor, workers, batching, retry of earlier failures, progress bar).
    Returns:
        the :class:`Summary` (also printed to stderr).
    """
    t0 = time.time()
    df = input if isinstance(input, pd.DataFrame) else read_manifest(input, usable_only=False)
    rows = [plain_row(r) for r in df.to_dict("records")]
    journal = Journal(output)
    summary = Summary(stage=stage.name, rows_in=len(rows))
    todo: list[Row] = []
    upstream: set[str] = set()
    for row in rows:
        if _upstream_failure(row, stage.name):
            upstream.add(row["id"])
            summary.upstream += 1
            continue
        entry = journal.entries.get(row["id"])
        if entry is not None and not (cfg.retry_failed and entry["status"] == "failed"):
            summary.resumed += 1
            continue
        todo.append(row)

    bar = tqdm(total=len(todo), desc=stage.name, unit="row", disable=not cfg.progress, file=sys.stderr)

    def on_result(entries: BatchResult) -> None:
        journal.append(entries)
        bar.update(len(entries))

    batches = _batches(todo, cfg.batch_rows)
    try:
        if cfg.executor == "ray":
            _run_ray(stage, batches, cfg, on_result)
        elif cfg.workers == 0:
            _run_inline(stage, batches, on_result)
        else:
            _run_local(stage, batches, cfg.workers, on_result)
    finally:
        bar.close()
        journal.close()

    out_rows: list[Row] = []
    for row in rows:
        if row["id"] in upstream:
            out_rows.append(row)
            continue
        entry = journal.entries[row["id"]]
        out_rows += entry["rows"]
    todo_ids = {r["id"] for r in todo}
    for row in rows:
        if row["id"] not in todo_ids:
            continue
        entry = journal.entries[row["id"]]
        if entry["status"] == OK_STATUS:
            summary.done += 1
        elif entry["status"] == "rejected":
            summary.rejected += 1
            summary.reasons[_reason_key(entry["error"])] += 1
        else:
            summary.failed += 1
            summary.reasons[_reason_key(entry["error"])] += 1
    summary.rows_out = len(out_rows)
    out_df = pd.DataFrame(out_rows) if out_rows else df.iloc[:0].copy()
    write_manifest(out_df, output)
    summary.seconds = time.time() - t0
    print(str(summary), file=sys.stderr, flush=True)
    return summary
