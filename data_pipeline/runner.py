"""One runner for every stage: parallel execution, resume, failure records, progress, summary.

A stage is a plain function ``fn(row, cfg) -> list[row]`` (see :class:`Stage`). The runner

1. reads the input manifest and the output's *journal* (``OUTPUT.journal.jsonl``): one JSON line per
   finished input row, appended and fsync'd by this (the driver) process as results arrive, so that
   after ``kill -9`` a re-run skips exactly the rows that finished and redoes the rest - no duplicate,
   no lost row (a half-written last line is cut off). Each entry carries the row's *fingerprint*: a hash
   of the stage's output settings (:func:`~data_pipeline.config.output_settings`) and one of the input
   row. A re-run redoes a row whose fingerprint changed (other settings, or an input row an earlier stage
   changed, so a change flows downstream) and keeps the others;
2. passes through rows that an earlier stage marked failed/rejected (counted as skipped);
3. runs the rest on a local process pool (``executor=local``), in this process (``workers=0``) or as
   Ray tasks (``executor=ray``), a batch of ``batch_rows`` rows per task;
4. bounds each row's time (:attr:`Stage.row_timeout_s`; a task of N rows gets N times it): a worker process
   still on a task past it is killed and replaced, a row that ran out of time alone is failed with
   ``RowTimeout: timed out after N s`` and the rows of a longer task are run again one by one, so only the
   hung one fails; the rest of the stage goes on. In this process (``workers=0``) a ``SIGALRM`` raises
   :class:`RowTimeout` in the row instead, which ends Python code and blocking calls but not a call stuck in C;
5. turns an exception on a row into a failure record (``<stage>_status=failed``, ``<stage>_error``)
   and :class:`~data_pipeline.rows.Reject` into ``rejected`` (:class:`~data_pipeline.rows.Vanished`, a source gone
   for good, too, counted apart as ``vanished``); the run goes on - unless the exception is
   *systemic* (:func:`systemic_cause`: a full disk or quota, a read-only or vanished output folder, an I/O
   error on output) or an error of the set-up (:func:`setup_cause`: a missing model folder, a broken CUDA
   context), which would fail every remaining row the same way: then the stage stops submitting,
   journals what the rows in flight finished, leaves the systemic rows out of the journal (a re-run redoes
   them) and raises :class:`SystemicError`; a failed journal write stops it the same way;
6. writes the output manifest atomically and prints a summary line
   (done / skipped / failed / rejected / vanished, with reasons).

Stages write their media atomically themselves (temp file + ``os.replace``), with names derived from
the row id, so a redone row overwrites its own half-finished work instead of duplicating it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import math
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pandas as pd
from tqdm import tqdm

import hashlib

from data_pipeline.config import RunnerConfig, output_settings
from data_pipeline.rows import Reject, Row, SetupError, Vanished, plain, plain_row
from opensora.data.manifest import OK_STATUS, read_manifest, write_manifest

BatchResult = list[dict]
"""Per input row of a batch: ``{"id", "status", "error", "rows"}``, and ``"oserror": (errno, path)`` on a
failure caused by an ``OSError``, ``"setup": reason`` on an error of the set-up (:func:`setup_cause`); the
driver classifies them and removes the keys before journaling."""

# Errors of the storage rather than of the row: every later row would fail the same way, so a row that
# raises one stops its batch at once. ENOENT and EIO are systemic only where they concern the output
# (a vanished output folder, an I/O error writing there): a missing or unreadable input is the row's.
ALWAYS_SYSTEMIC = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EROFS: "read-only file system"}
OUTPUT_SYSTEMIC = {errno.ENOENT: "output folder vanished", errno.EIO: "I/O error on the output storage"}


# A broken CUDA context (a device-side assert, a lost device, a driver error) fails every later row on that
# process: every CUDA call after it fails. Out-of-memory is left to the row (a smaller batch may fit).
CUDA_BROKEN = re.compile(r"CUDA error|CUDA driver|cuDNN error|CUBLAS_STATUS_|NCCL error|device-side assert")


def setup_cause(err: BaseException) -> str | None:
    """Why ``err`` is an error of the stage's set-up rather than of the row (a :class:`SetupError`, a broken
    CUDA context), or None. Looks through the chain, as a stage may wrap it."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = _error_text(err)
        if isinstance(err, SetupError):
            return text
        if (type(err).__name__ == "AcceleratorError" or CUDA_BROKEN.search(text)) and "out of memory" not in text:
            return f"the CUDA context is broken: {text}"
        err = err.__cause__ or err.__context__
    return None


class RowTimeout(BaseException):
    """A row ran past its stage's ``row_timeout_s``.

    A ``BaseException``, like ``KeyboardInterrupt``: where it is raised inside the row (``workers=0``), a stage's
    own ``except Exception`` (a download's retry loop) must not swallow it."""


def _timed_out(stage: "Stage", seconds: float) -> RowTimeout:
    return RowTimeout(f"timed out after {seconds:g} s ({stage.name}.row_timeout_s)")


@contextlib.contextmanager
def _alarm(stage: "Stage", seconds: float):
    """Raises :class:`RowTimeout` in the block after ``seconds`` (0 = never), by ``SIGALRM``: the limit of a row
    run in the driver process, which nobody can kill for it. Only in the main thread (signals go there); an
    earlier alarm already set (pytest-timeout's) is kept and re-armed with what is left of it."""
    if seconds <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer, interval = signal.getitimer(signal.ITIMER_REAL)
    if outer and outer <= seconds:  # the outer alarm comes first anyway
        yield
        return
    armed = [True]

    def expire(signum, frame):
        if armed[0]:
            armed[0] = False
            raise _timed_out(stage, seconds)

    start = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        try:
            armed[0] = False  # from here on a late signal is ignored, so the restoring below always runs
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            if outer:
                signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - start), 1e-3), interval)


class SystemicError(RuntimeError):
    """A stage stopped on an error of its storage (disk full, read-only, output folder gone) or of its set-up
    (a missing model folder, a broken CUDA context: :func:`setup_cause`), not of a row.

    ``python -m data_pipeline`` exits with status 3 on it. The journal holds every row that finished; a
    re-run after the cause is fixed redoes the rest.
    """


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
    out_dirs: tuple[str, ...] = ()  # folders the stage writes media to (an ENOENT there is systemic)
    row_timeout_s: float = 0.0  # a row still running after this long fails (a task of N rows: N times it); 0 = never
    # ``report(output rows of the rows done in this run, seconds)`` -> what the summary line adds (caption's
    # videos/s and tokens/s), or None
    report: Callable[[list[Row], float], str] | None = None

    def __post_init__(self):
        if self.row_timeout_s < 0:
            raise ValueError(f"{self.name}.row_timeout_s must be >= 0 (0 = no limit), got {self.row_timeout_s}")


def _oserror(err: BaseException) -> tuple[int, str | None] | None:
    """(errno, path) of the first ``OSError`` with an errno in ``err``'s chain (a stage may wrap it)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno is not None:
            return err.errno, None if err.filename is None else str(err.filename)
        text = str(err)  # e.g. an ffmpeg subprocess's stderr in a RuntimeError
        for code in ALWAYS_SYSTEMIC:
            if os.strerror(code) in text:
                return code, None
        err = err.__cause__ or err.__context__
    return None


def systemic_cause(code: int, path: str | None, out_dirs: Iterable[str | Path]) -> str | None:
    """Why an ``OSError`` (``code``, ``path``) stops the stage, e.g. ``"no space left on device (ENOSPC)"``;
    None when it is the row's own failure (a missing input file)."""
    name = f"{errno.errorcode.get(code, code)}"
    if code in ALWAYS_SYSTEMIC:
        return f"{ALWAYS_SYSTEMIC[code]} ({name})"
    dirs = [Path(d) for d in out_dirs]
    if code == errno.ENOENT and any(not d.is_dir() for d in dirs):
        return f"{OUTPUT_SYSTEMIC[code]} ({name}: {', '.join(str(d) for d in dirs if not d.is_dir())})"
    if code == errno.EIO and path is not None and any(Path(path).is_relative_to(d) for d in dirs):
        return f"{OUTPUT_SYSTEMIC[code]} ({name})"
    return None


def _canonical(value: Any) -> Any:
    """A value as it hashes: plain Python, whole floats as ints (a column with a gap reads back as float)."""
    value = plain(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value


def _digest(data: Any) -> str:
    text = json.dumps(_canonical(data), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def settings_fingerprint(stage: Stage) -> str:
    """Hash of the stage's name and the settings that can change its output (not workers, devices, retries)."""
    return _digest({"stage": stage.name, "settings": output_settings(stage.cfg)})


def row_fingerprint(row: Row) -> str:
    """Hash of an input row's values; a missing column and a missing value are the same (columns come and go
    with the other rows of a manifest)."""
    return _digest({k: v for k, v in plain_row(row).items() if v is not None})


def _error_text(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text.splitlines()[0][:500] if text else type(err).__name__


def _record(stage: str, row_in: Row, outcome: list[Row] | BaseException) -> dict:
    """Turns one row's outcome into a journal entry (the rows it contributes to the output)."""
    status_col, error_col = f"{stage}_status", f"{stage}_error"
    if isinstance(outcome, Reject):
        row = {**row_in, **plain_row(outcome.updates), status_col: "rejected", error_col: outcome.reason}
        # The row says rejected (later stages pass it by); the journal tells a vanished source apart for the summary.
        status = "vanished" if isinstance(outcome, Vanished) else "rejected"
        return {"id": row_in["id"], "status": status, "error": outcome.reason, "rows": [row]}
    if isinstance(outcome, BaseException):
        err = _error_text(outcome)
        row = {**row_in, status_col: "failed", error_col: err}
        entry = {"id": row_in["id"], "status": "failed", "error": err, "rows": [row]}
        oserror = _oserror(outcome)
        if oserror is not None:
            entry["oserror"] = oserror
        setup = setup_cause(outcome)
        if setup is not None:
            entry["setup"] = setup
        return entry
    rows = [{**plain_row(r), status_col: OK_STATUS, error_col: None} for r in outcome]
    return {"id": row_in["id"], "status": OK_STATUS, "error": None, "rows": rows}


def _systemic(oserror: Any) -> bool:
    """Whether an ``_oserror`` record (errno first, or None) fails every later row too (full disk, read-only)."""
    return oserror is not None and oserror[0] in ALWAYS_SYSTEMIC


def _stops(outcome: Any) -> bool:
    """Whether a row's outcome is an error that fails every later row too (its batch stops there)."""
    if not isinstance(outcome, BaseException):
        return False
    return _systemic(_oserror(outcome)) or setup_cause(outcome) is not None


def process_batch(stage: Stage, rows: list[Row], alarm: bool = False) -> BatchResult:
    """Runs ``stage`` on ``rows`` in the current process, catching each row's failure (worker entry point).

    A row that fails on a full disk or read-only storage ends the batch: the rows after it are not tried
    and not in the result (the driver stops the stage; a re-run does them). ``alarm``: time each row here
    (:func:`_alarm`), for rows run in the driver; a worker process is timed by the driver, which kills it."""
    limit = stage.row_timeout_s if alarm else 0.0
    if stage.batch_fn is not None:
        try:
            with _alarm(stage, limit * len(rows)):
                outcomes = stage.batch_fn(rows, stage.cfg)
            if len(outcomes) != len(rows):
                raise RuntimeError(f"{stage.name}: batch_fn returned {len(outcomes)} results for {len(rows)} rows")
        except (Exception, RowTimeout) as err:  # a batch-level failure: retry the rows one by one to find the bad one
            if len(rows) == 1 or _stops(err):
                outcomes = [err]
            else:
                result: BatchResult = []
                for row in rows:
                    result += process_batch(stage, [row], alarm)
                    if _systemic(result[-1].get("oserror")) or "setup" in result[-1]:
                        break
                return result
    else:
        outcomes = []
        for row in rows:
            try:
                with _alarm(stage, limit):
                    outcome = stage.fn(dict(row), stage.cfg)
            except (Exception, RowTimeout) as err:
                outcome = err
            outcomes.append(outcome)
            if _stops(outcome):
                break
    cut = next((i + 1 for i, outcome in enumerate(outcomes) if _stops(outcome)), len(outcomes))
    return [_record(stage.name, row, outcome) for row, outcome in zip(rows[:cut], outcomes[:cut])]


class Journal:
    """Append-only JSONL of finished input rows next to the output manifest (the resume state)."""

    def __init__(self, output: str | Path):
        self.path = Path(f"{output}.journal.jsonl")
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            self._load()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

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
        """Writes entries and fsyncs them before returning: what is journaled survives ``kill -9``.

        A failed write (disk full) is cut back off the file as far as the disk allows (a torn last line
        left behind is cut on the next load) and raises; the entries then count as not journaled."""
        entries = list(entries)
        data = "".join(json.dumps(e, default=plain, ensure_ascii=False) + "\n" for e in entries).encode("utf-8")
        if not data:
            return
        start = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, start)
            except OSError:
                pass
            raise
        for entry in entries:
            self.entries[entry["id"]] = entry

    def close(self) -> None:
        os.close(self._fd)


@dataclass
class Summary:
    """What a stage run did. ``str()`` is the one-line summary the CLI prints."""

    stage: str
    rows_in: int = 0
    done: int = 0
    rows_out: int = 0
    resumed: int = 0
    upstream: int = 0
    redone_settings: int = 0  # journaled rows run again because the stage's output settings changed
    redone_input: int = 0  # ... because their input row changed (an earlier stage redid it)
    failed: int = 0
    rejected: int = 0
    vanished: int = 0  # rejected because the source is gone for good (rows.Vanished): neither failed nor rejected
    reasons: collections.Counter = field(default_factory=collections.Counter)
    seconds: float = 0.0
    report: str = ""  # the stage's own figures for this run (Stage.report)

    def __str__(self) -> str:
        parts = [
            f"{self.stage}: {self.rows_in} rows in {self.seconds:.1f}s",
            f"redone {self.redone_settings + self.redone_input} (settings changed: {self.redone_settings}, "
            f"input changed: {self.redone_input})",
            f"done {self.done}",
            f"skipped {self.resumed + self.upstream} (finished before: {self.resumed}, failed upstream: {self.upstream})",
            f"failed {self.failed}",
            f"rejected {self.rejected}",
            f"vanished {self.vanished}",
            f"-> {self.rows_out} output rows",
        ]
        line = ", ".join(parts)
        if self.report:
            line += f" | {self.report}"
        if self.reasons:
            line += " | reasons: " + "; ".join(f"{r} x{n}" for r, n in self.reasons.most_common(10))
        return line


class FailureShareError(RuntimeError):
    """A stage failed more than ``runner.max_failed_share`` of the rows it ran: its manifest and journal are
    written (the failures are the rows' own), but something is likely wrong with the inputs or the set-up.
    ``python -m data_pipeline`` exits with status 4 on it; ``run`` stops before the next stage."""


def check_failure_share(summary: Summary, cfg: RunnerConfig) -> None:
    """Raises :class:`FailureShareError` when ``summary``'s failed rows exceed ``cfg.max_failed_share`` of
    the rows the stage ran in this run (rejected rows and vanished sources are no failures, but count as ran)."""
    ran = summary.done + summary.failed + summary.rejected + summary.vanished
    if ran and summary.failed > cfg.max_failed_share * ran:
        raise FailureShareError(
            f"{summary.stage}: {summary.failed} of the {ran} rows it ran failed, more than runner.max_failed_share="
            f"{cfg.max_failed_share:g}; the manifest is written, see <stage>_error for why ({summary})")


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


class _Sink:
    """The driver's side of results: journals the finished rows of each batch and notes the first systemic
    failure (:func:`systemic_cause`) in ``stopped``, after which the executors submit nothing more."""

    def __init__(self, stage: Stage, journal: Journal, out_dirs: list[Path], bar: tqdm, fingerprints: dict[str, dict],
                 on_progress: Callable[[int], None] | None = None):
        self.stage, self.journal, self.out_dirs, self.bar = stage, journal, out_dirs, bar
        self.on_progress = on_progress  # told the rows journaled so far (a sharded rank's heartbeat)
        self.fingerprints = fingerprints  # row id -> {"settings", "row"}, written with its entry
        self.stopped: str | None = None
        self.journaled = 0

    def __call__(self, entries: BatchResult) -> None:
        finished = []
        for entry in entries:
            oserror, setup = entry.pop("oserror", None), entry.pop("setup", None)
            cause = None if oserror is None else systemic_cause(*oserror, self.out_dirs)
            if setup is not None:
                if self.stopped is None:
                    self.stopped = f"an error of its set-up, not of a row (row {entry['id']}): {setup}"
            elif cause is None:
                finished.append({**entry, "fingerprint": self.fingerprints[entry["id"]]})
            elif self.stopped is None:
                where = oserror[1] or " / ".join(str(d) for d in self.out_dirs)
                self.stopped = f"{cause} at {where} (row {entry['id']}: {entry['error']})"
        try:
            self.journal.append(finished)
        except OSError as err:
            code = err.errno if err.errno is not None else 0
            cause = systemic_cause(code, str(self.journal.path), self.out_dirs) or _error_text(err)
            raise SystemicError(f"{self.stage.name}: stopped: its journal {self.journal.path} could not be "
                                f"written: {cause}. {self.journaled} rows finished in this run are journaled; "
                                f"fix the cause and re-run to do the rest") from err
        self.journaled += len(finished)
        self.bar.update(len(finished))
        if self.on_progress is not None:
            self.on_progress(self.journaled)


def _run_inline(stage: Stage, batches: list[list[Row]], on_result: _Sink) -> None:
    for batch in batches:
        if on_result.stopped:
            return
        on_result(process_batch(stage, batch, alarm=True))


# A worker process must take the task it is sent within this long (spawn and imports); its row clock starts then.
WORKER_START_S = 300.0


def _serve(conn: mp.connection.Connection, stage: Stage) -> None:
    """A worker process: runs the batches it is sent one at a time, and says when it starts one (its clock)."""
    while True:
        try:
            batch = conn.recv()
        except EOFError:  # the driver is gone
            return
        if batch is None:
            return
        conn.send("started")
        conn.send(process_batch(stage, batch))


class _Worker:
    """One worker process and its pipe; the driver gives it a batch at a time and can kill it alone."""

    def __init__(self, ctx, stage: Stage):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, stage), name=f"{stage.name}-worker")
        self.proc.start()
        child.close()  # so that the driver's end reads EOF when the process dies
        self.batch: list[Row] = []
        self.tries, self.limit, self.deadline, self.started = 0, 0.0, math.inf, False

    def give(self, batch: list[Row], tries: int, limit: float) -> None:
        self.conn.send(batch)
        self.batch, self.tries, self.limit, self.started = batch, tries, limit, False
        self.deadline = time.monotonic() + WORKER_START_S  # until it says "started"

    def poll(self) -> BatchResult | str | None:
        """The batch's result, "crashed", "late" (did not start it in time), "timed out", or None (still on it)."""
        try:
            while self.conn.poll():
                message = self.conn.recv()
                if message != "started":
                    return message
                self.started = True
                self.deadline = time.monotonic() + self.limit if self.limit else math.inf
        except (EOFError, OSError):  # the process died (a segfault in a decoder, the OOM killer)
            return "crashed"
        if not self.proc.is_alive():
            return "crashed"
        if time.monotonic() >= self.deadline:
            return "timed out" if self.started else "late"
        return None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)


def _run_local(stage: Stage, batches: list[list[Row]], workers: int, on_result: _Sink) -> None:
    """``workers`` processes, each with its own pipe, one batch at a time each; the driver watches each task's
    clock (:attr:`Stage.row_timeout_s` per row, from the moment the worker takes it).

    A worker that crashes (a segfault in a decoder) or runs past its limit (a hung decoder or model) is killed
    and replaced, and takes only its own task with it: a one-row task is failed (``RowTimeout: timed out after
    N s``; a crash is tried once more first, as the OOM killer may have picked it), and the rows of a longer
    task are run again one at a time, so only the one at fault fails. Once ``on_result.stopped``, nothing
    more is submitted and the tasks in flight are collected."""
    ctx = mp.get_context("spawn")  # fork after threads (tqdm, pyarrow, torch) can deadlock
    queue: collections.deque[tuple[list[Row], int]] = collections.deque((batch, 0) for batch in batches)
    idle: list[_Worker] = []
    busy: list[_Worker] = []
    try:
        while busy or (queue and not on_result.stopped):
            while queue and not on_result.stopped and len(busy) < workers:
                worker = idle.pop() if idle else _Worker(ctx, stage)
                batch, tries = queue.popleft()
                worker.give(batch, tries, stage.row_timeout_s * len(batch))
                busy.append(worker)
            wait = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            mp.connection.wait([w.conn for w in busy] + [w.proc.sentinel for w in busy],
                               timeout=None if wait == math.inf else wait)
            for worker in list(busy):
                outcome = worker.poll()
                if outcome is None:
                    continue
                busy.remove(worker)
                if not isinstance(outcome, str):
                    idle.append(worker)
                    on_result(outcome)
                    continue
                worker.kill()  # replaced by a new process when the next task needs one
                batch = worker.batch
                if len(batch) > 1:  # which of its rows? each alone, in its place in the queue
                    queue.extendleft((row_batch, 1) for row_batch in reversed([[row] for row in batch]))
                elif outcome == "crashed" and worker.tries == 0:
                    queue.appendleft((batch, 1))
                else:
                    error = {"timed out": lambda: _timed_out(stage, worker.limit),
                             "crashed": lambda: RuntimeError("worker process crashed on this row"),
                             "late": lambda: RuntimeError(f"worker process did not start the row within "
                                                          f"{WORKER_START_S:g} s")}[outcome]()
                    on_result([_record(stage.name, batch[0], error)])
            if on_result.stopped:
                queue.clear()
    finally:
        for worker in idle:
            worker.stop()
        for worker in busy:  # an error of the driver (the journal cannot be written, Ctrl-C): end their work
            worker.kill()
        for worker in idle:
            worker.proc.join(timeout=10)
            if worker.proc.is_alive():
                worker.kill()


def _run_ray(stage: Stage, batches: list[list[Row]], cfg: RunnerConfig, on_result: _Sink) -> None:
    """Ray tasks, at most two per slot in flight. A task's clock starts when it is submitted, and it may first
    wait for the one before it on its slot, so a task of N rows gets ``2 * N * row_timeout_s``; then it is
    cancelled (its worker process killed, Ray starts another) and handled as :func:`_run_local` does."""
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
    pending: dict[Any, tuple[list[Row], float]] = {}  # ref -> (batch, deadline)
    while queue or pending:
        while queue and len(pending) < max_in_flight:
            batch = queue.popleft()
            budget = 2 * stage.row_timeout_s * len(batch)
            pending[task.remote(stage_ref, batch)] = (batch, time.monotonic() + budget if budget else math.inf)
        wait = max(0.0, min(deadline for _, deadline in pending.values()) - time.monotonic())
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=None if wait == math.inf else wait)
        for ref in ready:
            batch, _ = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as err:  # the task itself died (worker crash, OOM kill)
                result = [_record(stage.name, row, err) for row in batch]
            on_result(result)
        now = time.monotonic()
        for ref, (batch, deadline) in list(pending.items()):
            if now < deadline:
                continue
            del pending[ref]
            ray.cancel(ref, force=True)  # kills the worker process; Ray replaces it
            if len(batch) > 1:
                queue.extendleft([[row] for row in reversed(batch)])
            else:
                on_result([_record(stage.name, batch[0], _timed_out(stage, 2 * stage.row_timeout_s))])
        if on_result.stopped:
            queue.clear()


def run_stage(stage: Stage, input: str | Path | pd.DataFrame, output: str | Path, cfg: RunnerConfig,
              on_progress: Callable[[int], None] | None = None) -> Summary:
    """Runs ``stage`` over every row of ``input`` and writes ``output``; resumes from ``output``'s journal.

    Args:
        stage: the stage (name, function, its config).
        input: a manifest path or a DataFrame (all rows, including earlier failures).
        output: the manifest to write (``.parquet`` / ``.csv``); its journal sits next to it.
        cfg: how to execute (executor, workers, batching, retry of earlier failures, progress bar).
        on_progress: called with the number of rows journaled in this run so far, after each result.
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
    settings = settings_fingerprint(stage)
    fingerprints: dict[str, dict] = {}
    for row in rows:
        if _upstream_failure(row, stage.name):
            upstream.add(row["id"])
            summary.upstream += 1
            continue
        fingerprint = fingerprints[row["id"]] = {"settings": settings, "row": row_fingerprint(row)}
        entry = journal.entries.get(row["id"])
        if entry is not None:
            # An entry of a version without fingerprints: the settings it was made with are unknown.
            before = entry.get("fingerprint") or {"settings": None, "row": None}
            if before["settings"] != settings:
                summary.redone_settings += 1
            elif before["row"] != fingerprint["row"]:
                summary.redone_input += 1
            elif not (cfg.retry_failed and entry["status"] == "failed"):
                summary.resumed += 1
                continue
        todo.append(row)

    bar = tqdm(total=len(todo), desc=stage.name, unit="row", disable=not cfg.progress, file=sys.stderr)
    out_dirs = [Path(d).resolve() for d in stage.out_dirs] + [Path(output).resolve().parent]
    on_result = _Sink(stage, journal, out_dirs, bar, fingerprints, on_progress)
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
    if on_result.stopped:
        raise SystemicError(f"{stage.name}: stopped: {on_result.stopped}. {on_result.journaled} rows finished in "
                            f"this run are journaled in {journal.path}, the rows that failed this way are not; "
                            f"fix the cause and re-run to do the {len(todo) - on_result.journaled} rows left")

    out_rows: list[Row] = []
    for row in rows:
        if row["id"] in upstream:
            out_rows.append(row)
            continue
        entry = journal.entries[row["id"]]
        out_rows += entry["rows"]
    todo_ids = {r["id"] for r in todo}
    done_rows: list[Row] = []
    for row in rows:
        if row["id"] not in todo_ids:
            continue
        entry = journal.entries[row["id"]]
        if entry["status"] == OK_STATUS:
            summary.done += 1
            done_rows += entry["rows"]
        elif entry["status"] in ("rejected", "vanished"):
            if entry["status"] == "vanished":
                summary.vanished += 1
            else:
                summary.rejected += 1
            summary.reasons[_reason_key(entry["error"])] += 1
        else:
            summary.failed += 1
            summary.reasons[_reason_key(entry["error"])] += 1
    summary.rows_out = len(out_rows)
    out_df = pd.DataFrame(out_rows) if out_rows else df.iloc[:0].copy()
    try:
        write_manifest(out_df, output)
    except OSError as err:
        cause = None if err.errno is None else systemic_cause(err.errno, str(output), out_dirs)
        if cause is None:
            raise
        raise SystemicError(f"{stage.name}: every row is journaled in {journal.path}, but the manifest {output} "
                            f"could not be written: {cause}; fix the cause and re-run to write it") from err
    summary.seconds = time.time() - t0
    if stage.report is not None:
        summary.report = stage.report(done_rows, summary.seconds)
    print(str(summary), file=sys.stderr, flush=True)
    return summary
