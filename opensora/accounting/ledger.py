"""The cost ledger: an append-only JSONL file (``ledger.jsonl``) in a run's output dir.

Every time the trainer runs it opens a *segment* (one process lifetime: a fresh start, a resume after a
crash or a pre-emption). Rank 0 appends one JSON object per line, flushed and fsync'd, so a crash loses at
most the line being written:

    {"event": "start", "segment": ..., "run_id": ..., "stage": ..., "gpu_type": "h800", "num_gpus": 64,
     "price_per_gpu_hour": 2.5, "peak_tflops": 989.0, "host": ..., "time": <epoch s>, "step": <start step>}
    {"event": "heartbeat",  "segment": ..., "elapsed_s": ..., "step": ..., "samples": ..., "tokens": ..., "flops": ...}
    {"event": "startup", ... same fields ...}         # start-up done: the model, data and checkpoint are loaded
    {"event": "checkpoint", ... same fields ...}      # after a checkpoint at ``step`` is durable
    {"event": "validation", ... same fields ...}      # after a validation pass (opensora.training.validation)
    {"event": "end", ... same fields ..., "reason": "finished" | "budget" | "sigterm" | "max_steps" | "nonfinite" | ...}

``samples``/``tokens``/``flops`` in a record are cumulative *within the segment* and global (all ranks);
Start-up is paid time too. The trainer opens its segment before it loads anything, with the clock started at the
process start (``"startup": true`` in the start record), writes heartbeats from a thread while it loads the model,
encoders, data and checkpoint, and a ``startup`` record when it is ready: the segment's time up to that record (or
all of it, for a start-up that died) is reported as start-up time. Ledgers without the flag have no start-up time.
``skipped`` counts optimizer steps skipped because their loss or gradient norm was not finite (paid, trained nothing).
``val_s`` is the part of ``elapsed_s`` spent validating (held-out loss, sample videos): paid GPU time that is
not training, so the report shows it as its own kind of time (and it is in the wall time and GPU-hours too).
``elapsed_s`` is monotonic-clock seconds since the segment started, so a wall-clock jump cannot create or
destroy paid time. A segment's wall time is the ``elapsed_s`` of its last record: a crashed segment (no
end record) still counts its time up to its last heartbeat; time after that heartbeat is not known and is
not counted (at most ``heartbeat_s`` per crash).

Redone work. After a crash the next segment of the same stage resumes at an earlier step (its start step,
the last durable checkpoint). For each segment we call the *redo point* the step at which the work that
survived ends: the start step of the next segment of the same stage if there is one; otherwise the last
step for a segment with an end record, or its last checkpoint (else its start step) for one without.
Then:

* time lost = its wall time - the ``elapsed_s`` of its last record at or before the redo point. Those
  GPU-hours are still paid (they are in GPU-hours and dollars) and are reported separately.
* samples and tokens = the counters of that same record. So every optimizer step's samples are counted
  once, in the segment whose result survived, however often a crash made it run again.
* FLOPs count everything executed, redone steps included: MFU measures what the hardware did.

One ledger per recipe run holds all its stages (``stage`` is a field), so a recipe budget can see them all.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from opensora.accounting.gpu import default_price, detect_gpu_type, peak_tflops

LEDGER_NAME = "ledger.jsonl"


@dataclass
class Mark:
    """One progress record of a segment (start, heartbeat, checkpoint or end)."""

    kind: str  # "start" | "heartbeat" | "checkpoint" | "validation" | "end"; "live": the running counters, in memory
    elapsed_s: float  # seconds since the segment started
    step: int  # optimizer steps completed
    samples: int = 0  # cumulative within the segment, all ranks
    tokens: int = 0
    flops: float = 0.0
    val_s: float = 0.0  # of elapsed_s, seconds spent validating (cumulative within the segment)
    skipped: int = 0  # optimizer steps skipped as non-finite (cumulative within the segment)


@dataclass
class Segment:
    """One process lifetime of a run, as read back from the ledger."""

    segment_id: str
    run_id: str
    stage: str
    gpu_type: str
    num_gpus: int
    price_per_gpu_hour: float
    peak_tflops: float | None  # dense bf16 peak per device; None if the GPU type is not in the table
    host: str
    start_time: float  # epoch seconds
    start_step: int
    marks: list[Mark] = field(default_factory=list)  # in file order, starting with the start mark
    end_reason: str | None = None  # None: the segment crashed (or is still running)
    bills_startup: bool = False  # the clock started at process start; time up to the "startup" mark is start-up
    live: bool = False  # the segment of the Ledger asking (still running, never counted as lost)
    # Filled by resolve_segments():
    lost_s: float = 0.0  # wall time whose work a later segment redid (or will redo)
    useful: Mark | None = None  # the record whose counters are kept (see the module docstring)

    @property
    def wall_s(self) -> float:
        return self.marks[-1].elapsed_s

    @property
    def last_step(self) -> int:
        return self.marks[-1].step

    @property
    def crashed(self) -> bool:
        return self.end_reason is None and not self.live

    @property
    def gpu_hours(self) -> float:
        return self.wall_s * self.num_gpus / 3600.0

    @property
    def dollars(self) -> float:
        return self.gpu_hours * self.price_per_gpu_hour

    @property
    def flops(self) -> float:
        return self.marks[-1].flops

    @property
    def val_s(self) -> float:
        return self.marks[-1].val_s

    @property
    def skipped(self) -> int:
        return self.marks[-1].skipped

    @property
    def startup_s(self) -> float:
        """Seconds from process start until training could begin (all of the segment if start-up never ended)."""
        if not self.bills_startup:
            return 0.0
        done = next((m for m in self.marks if m.kind == "startup"), None)
        return done.elapsed_s if done is not None else self.wall_s


@dataclass
class Spend:
    """Totals over segments: what was paid and what it bought."""

    gpu_hours: float = 0.0
    dollars: float = 0.0
    wall_s: float = 0.0
    samples: int = 0  # counted once per optimizer step (redone steps not twice)
    tokens: int = 0
    flops: float = 0.0  # executed, redone steps included
    segments: int = 0
    crashed_segments: int = 0
    lost_s: float = 0.0  # wall time whose work was redone
    lost_gpu_hours: float = 0.0
    peak_flop_s: float | None = None  # sum over segments of wall_s * num_gpus * peak FLOP/s; None if any peak unknown
    val_s: float = 0.0  # of wall_s, time spent validating (executed, like flops: a redone validation counts twice)
    val_gpu_hours: float = 0.0  # of gpu_hours, validation's
    val_dollars: float = 0.0  # of dollars, validation's
    skipped_steps: int = 0  # optimizer steps skipped because their loss or gradient norm was not finite (executed)
    startup_s: float = 0.0  # of wall_s, time from process start until training began (loading, resuming)
    startup_gpu_hours: float = 0.0  # of gpu_hours, start-up's
    startup_dollars: float = 0.0  # of dollars, start-up's

    @property
    def samples_per_s(self) -> float:
        """Samples per wall second of the whole job (all paid time, so crashes and start-ups lower it)."""
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def samples_per_gpu_s(self) -> float:
        return self.samples / (self.gpu_hours * 3600.0) if self.gpu_hours > 0 else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def mfu(self) -> float | None:
        """Executed model FLOPs over the peak for the whole paid time (start-up, saves and crashes included)."""
        if self.peak_flop_s is None or self.peak_flop_s <= 0:
            return None
        return self.flops / self.peak_flop_s


def _fresh_id() -> str:
    return uuid.uuid4().hex[:12]


def resolve_segments(segments: list[Segment]) -> list[Segment]:
    """Sets ``lost_s`` and ``useful`` of every segment from the order of segments (see the module docstring)."""
    for i, seg in enumerate(segments):
        later = next((s for s in segments[i + 1 :] if s.stage == seg.stage), None)
        if later is not None:
            redo = later.start_step
        elif seg.end_reason is not None or seg.live:
            redo = seg.last_step
        else:
            ckpts = [m.step for m in seg.marks if m.kind == "checkpoint"]
            redo = ckpts[-1] if ckpts else seg.start_step
        if redo >= seg.last_step:
            seg.useful, seg.lost_s = seg.marks[-1], 0.0
            continue
        kept = [m for m in seg.marks if m.step <= redo]
        seg.useful = kept[-1] if kept else Mark("start", 0.0, seg.start_step)
        seg.lost_s = seg.wall_s - seg.useful.elapsed_s
    return segments


def ledger_files(run_dir: str | Path) -> list[Path]:
    """The ledger of ``run_dir`` (a file, or a dir holding ``ledger.jsonl``; failing that, any below it)."""
    path = Path(run_dir)
    if path.is_file():
        return [path]
    if (path / LEDGER_NAME).is_file():
        return [path / LEDGER_NAME]
    return sorted(path.rglob(LEDGER_NAME)) if path.is_dir() else []


def parse_records(lines: Iterable[str]) -> tuple[list[Segment], int]:
    """Segments from ledger lines, and the number of lines that could not be used.

    A torn line (a crash mid-write; only ever the last line of a segment) or a record of a segment whose
    start record is missing is skipped and counted, never fatal: the ledger must be readable after any crash.
    """
    segments: dict[str, Segment] = {}
    bad = 0
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
            event, sid = rec["event"], rec["segment"]
            if event == "start":
                segments[sid] = Segment(
                    segment_id=sid,
                    run_id=rec["run_id"],
                    stage=rec["stage"],
                    gpu_type=rec["gpu_type"],
                    num_gpus=int(rec["num_gpus"]),
                    price_per_gpu_hour=float(rec["price_per_gpu_hour"]),
                    peak_tflops=rec["peak_tflops"],
                    host=rec["host"],
                    start_time=float(rec["time"]),
                    start_step=int(rec["step"]),
                    marks=[Mark("start", 0.0, int(rec["step"]))],
                    bills_startup=bool(rec.get("startup", False)),
                )
                continue
            seg = segments[sid]
            seg.marks.append(
                Mark(event, float(rec["elapsed_s"]), int(rec["step"]), int(rec["samples"]),
                     int(rec["tokens"]), float(rec["flops"]), float(rec.get("val_s", 0.0)),
                     int(rec.get("skipped", 0)))  # both absent in ledgers written before they existed
            )
            if event == "end":
                seg.end_reason = rec["reason"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
    return list(segments.values()), bad


def read_ledger(run_dir: str | Path) -> list[Segment]:
    """All segments recorded under ``run_dir``, in the order they started, with lost time resolved.

    Args:
        run_dir: a run's output dir (or the ``ledger.jsonl`` itself). A missing ledger gives [].
    """
    files = ledger_files(run_dir)
    segments: list[Segment] = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            segments += parse_records(f)[0]
    if len(files) > 1:  # one file is already in order; several (one per stage dir) are merged by start time
        segments.sort(key=lambda s: s.start_time)
    return resolve_segments(segments)


def spend_of(segments: Iterable[Segment]) -> Spend:
    """Totals of resolved segments."""
    out = Spend()
    peak_known = True
    for seg in segments:
        useful = seg.useful or seg.marks[-1]
        out.gpu_hours += seg.gpu_hours
        out.dollars += seg.dollars
        out.wall_s += seg.wall_s
        out.samples += useful.samples
        out.tokens += useful.tokens
        out.flops += seg.flops
        out.segments += 1
        out.crashed_segments += int(seg.crashed)
        out.lost_s += seg.lost_s
        out.lost_gpu_hours += seg.lost_s * seg.num_gpus / 3600.0
        out.val_s += seg.val_s
        out.val_gpu_hours += seg.val_s * seg.num_gpus / 3600.0
        out.val_dollars += seg.val_s * seg.num_gpus / 3600.0 * seg.price_per_gpu_hour
        out.skipped_steps += seg.skipped
        out.startup_s += seg.startup_s
        out.startup_gpu_hours += seg.startup_s * seg.num_gpus / 3600.0
        out.startup_dollars += seg.startup_s * seg.num_gpus / 3600.0 * seg.price_per_gpu_hour
        if seg.peak_tflops is None:
            peak_known = False
        else:
            out.peak_flop_s = (out.peak_flop_s or 0.0) + seg.wall_s * seg.num_gpus * seg.peak_tflops * 1e12
    if not peak_known:
        out.peak_flop_s = None
    return out


class Ledger:
    """The trainer's handle on the ledger. Rank 0 passes ``enabled=True``; the others ``enabled=False``
    (they write nothing but can still answer :meth:`spent`).

    Example::

        ledger = Ledger(out_dir, stage="stage2", num_gpus=world_size, enabled=rank == 0)
        ledger.start_segment(step)
        for ...:                                     # every step; cheap unless a heartbeat is due
            ledger.update(step, samples=global_batch, tokens=global_batch * N, flops=global_batch * f)
        ledger.checkpoint_saved(step)                # after the checkpoint is durable
        ledger.end_segment("finished", step)

    Budget decisions (:func:`opensora.accounting.check_budget`) should be taken on rank 0 and broadcast:
    each rank's clock differs by milliseconds, and ranks that disagree about stopping hang the job.
    """

    def __init__(
        self,
        run_dir: str | Path,
        stage: str,
        num_gpus: int,
        gpu_type: str | None = None,
        price_per_gpu_hour: float | None = None,
        heartbeat_s: float = 30.0,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        """
        Args:
            run_dir: the run's output dir; the ledger is ``run_dir/ledger.jsonl``.
            stage: the stage name recorded with every segment.
            num_gpus: devices of the whole job (world size), billed for the segment's wall time.
            gpu_type: canonical GPU type (``opensora.accounting.gpu``); None detects it.
            price_per_gpu_hour: USD; None takes the table's default for ``gpu_type`` (an unknown type
                without a price is an error, so a run is never silently priced at zero).
            heartbeat_s: seconds between heartbeats: the most paid time a crash can hide.
            enabled: False on ranks other than 0: nothing is written.
            clock: monotonic seconds (tests pass a fake one).
        """
        if num_gpus < 1:
            raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
        if heartbeat_s < 0:
            raise ValueError(f"heartbeat_s must be >= 0, got {heartbeat_s}")
        self.path = Path(run_dir) / LEDGER_NAME
        self.stage = stage
        self.num_gpus = int(num_gpus)
        self.gpu_type = gpu_type or detect_gpu_type()
        if price_per_gpu_hour is None:
            price_per_gpu_hour = default_price(self.gpu_type)
            if price_per_gpu_hour is None:
                raise ValueError(
                    f"no default price per GPU-hour for GPU type {self.gpu_type!r}; "
                    "set price_per_gpu_hour in the config"
                )
        if price_per_gpu_hour < 0:
            raise ValueError(f"price_per_gpu_hour must be >= 0, got {price_per_gpu_hour}")
        self.price_per_gpu_hour = float(price_per_gpu_hour)
        self.peak_tflops = peak_tflops(self.gpu_type)
        self.heartbeat_s = float(heartbeat_s)
        self.enabled = enabled
        self.clock = clock
        self._file = None
        self._current: Segment | None = None
        self._past: list[Segment] = []
        self._t0 = 0.0
        self._last_write = 0.0
        self._lock = threading.Lock()  # the start-up heartbeat thread writes too
        self._beating: threading.Event | None = None
        self._beat_thread: threading.Thread | None = None

    # -- writing -----------------------------------------------------------------------------------------
    def _write(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._last_write = self.clock()

    def _progress(self, kind: str, step: int) -> dict:
        """Appends a mark of the current counters to the live segment and returns its record."""
        seg = self._current
        assert seg is not None
        last = seg.marks[-1]
        mark = Mark(kind, self.clock() - self._t0, int(step), last.samples, last.tokens, last.flops, last.val_s,
                    last.skipped)
        if last.kind == "live":  # the running counters become a real mark
            seg.marks[-1] = mark
        else:
            seg.marks.append(mark)
        seg.marks.append(Mark("live", mark.elapsed_s, mark.step, mark.samples, mark.tokens, mark.flops, mark.val_s,
                              mark.skipped))
        return {"event": kind, "segment": seg.segment_id, "time": time.time(), "elapsed_s": round(mark.elapsed_s, 3),
                "step": mark.step, "samples": mark.samples, "tokens": mark.tokens, "flops": mark.flops,
                "val_s": round(mark.val_s, 3), "skipped": mark.skipped}

    def start_segment(self, step: int, started: float | None = None) -> None:
        """Opens a segment at ``step`` (0 for a fresh run, the checkpoint's step on resume).

        Args:
            step: optimizer steps already completed.
            started: for a segment that bills its start-up (:meth:`startup_done` follows): the ``clock()`` time
                the process (or, for a later stage of the same process, the stage) started; its time counts
                from then. A heartbeat thread writes until :meth:`startup_done`, so a start-up that dies is billed
                up to its last heartbeat. None: the segment starts now and training follows at once.
        """
        if self._current is not None:
            raise RuntimeError("start_segment called twice without end_segment")
        self._past = read_ledger(self.path) if self.path.is_file() else []
        run_id = self._past[0].run_id if self._past else _fresh_id()
        now = self.clock()
        self._t0 = min(now, started) if started is not None else now
        self._current = Segment(
            segment_id=_fresh_id(), run_id=run_id, stage=self.stage, gpu_type=self.gpu_type,
            num_gpus=self.num_gpus, price_per_gpu_hour=self.price_per_gpu_hour, peak_tflops=self.peak_tflops,
            host=socket.gethostname(), start_time=time.time() - (now - self._t0), start_step=int(step),
            marks=[Mark("start", 0.0, int(step)), Mark("live", now - self._t0, int(step))], live=True,
            bills_startup=started is not None,
        )
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a+", encoding="utf-8")
            # A crash can leave a torn last line without its newline; start on a line of our own.
            if self._file.tell() > 0:
                self._file.seek(self._file.tell() - 1)
                last_char = self._file.read(1)
                self._file.seek(0, os.SEEK_END)
                if last_char != "\n":
                    self._file.write("\n")
        seg = self._current
        record = {"event": "start", "segment": seg.segment_id, "run_id": seg.run_id, "stage": seg.stage,
                  "gpu_type": seg.gpu_type, "num_gpus": seg.num_gpus, "price_per_gpu_hour": seg.price_per_gpu_hour,
                  "peak_tflops": seg.peak_tflops, "host": seg.host, "time": seg.start_time, "step": seg.start_step}
        if seg.bills_startup:
            record["startup"] = True
        self._write(record)
        if seg.bills_startup:
            self._write(self._progress("heartbeat", step))  # the time since process start, at once
            if not self.enabled:
                return
            self._beating = threading.Event()
            self._beat_thread = threading.Thread(target=self._beat, args=(int(step),), daemon=True,
                                                 name="ledger-startup-heartbeat")
            self._beat_thread.start()

    def _beat(self, step: int) -> None:
        """Start-up heartbeats, every ``heartbeat_s`` (at least 1 s) until :meth:`startup_done` or the end."""
        period = self.heartbeat_s if self.heartbeat_s > 0 else 1.0
        while not self._beating.wait(period):
            with self._lock:
                if self._current is None or self._beating.is_set():
                    return
                record = self._progress("heartbeat", step)
                if self.enabled:
                    self._write(record)

    def _stop_beating(self) -> None:
        if self._beating is not None:
            self._beating.set()
            self._beat_thread.join()
            self._beating = self._beat_thread = None

    def startup_done(self, step: int) -> None:
        """Records that start-up is over (the checkpoint of ``step`` is loaded): training time starts here.

        Args:
            step: the step training starts from.
        """
        if self._current is None:
            raise RuntimeError("startup_done called before start_segment")
        self._stop_beating()
        self._write(self._progress("startup", step))

    def update(self, step: int, samples: int, tokens: int, flops: float) -> None:
        """Adds work done since the previous call; writes a heartbeat when one is due. No I/O otherwise.

        Args:
            step: optimizer steps completed so far.
            samples: samples since the previous call, summed over all ranks (e.g. the global batch).
            tokens: video tokens in those samples (samples * N).
            flops: model FLOPs of those samples (``train_flops_per_sample`` * samples).

        Pass Python numbers (known from the batch shape), never tensors: reading a CUDA tensor here would
        synchronise the GPU every step.
        """
        seg = self._current
        if seg is None:
            raise RuntimeError("update called before start_segment")
        live = seg.marks[-1]
        live.step = int(step)
        live.samples += int(samples)
        live.tokens += int(tokens)
        live.flops += float(flops)
        now = self.clock()
        live.elapsed_s = now - self._t0
        if now - max(self._last_write, self._t0) >= self.heartbeat_s:
            record = self._progress("heartbeat", step)
            if self.enabled:
                self._write(record)
            else:
                self._last_write = now

    def checkpoint_saved(self, step: int) -> None:
        """Records that the checkpoint of ``step`` is durable: work up to it survives a crash.

        Args:
            step: the step of the checkpoint.
        """
        if self._current is None:
            raise RuntimeError("checkpoint_saved called before start_segment")
        self._write(self._progress("checkpoint", step))

    def validation_done(self, step: int, seconds: float) -> None:
        """Records a finished validation pass of ``seconds`` at ``step`` (written at once: it is paid time that is
        not training, and a crash right after it must not hide it).

        Args:
            step: the step whose weights were validated.
            seconds: wall time of the pass (every rank took part; the job's GPUs are billed for it).
        """
        seg = self._current
        if seg is None:
            raise RuntimeError("validation_done called before start_segment")
        seg.marks[-1].val_s += float(seconds)
        self._write(self._progress("validation", step))

    def steps_skipped(self, count: int) -> None:
        """Adds ``count`` optimizer steps skipped as non-finite (known at a sync point); written with the next record."""
        seg = self._current
        if seg is None:
            raise RuntimeError("steps_skipped called before start_segment")
        seg.marks[-1].skipped += int(count)

    def end_segment(self, reason: str, step: int) -> None:
        """Closes the segment (no-op if none is open).

        Args:
            reason: why the process stops: "finished", "budget", "sigterm", "max_steps", "error", ...
            step: optimizer steps completed.
        """
        if self._current is None:
            return
        self._stop_beating()
        record = self._progress("end", step)
        record["reason"] = reason
        self._write(record)
        seg = self._current
        seg.marks.pop()  # the live mark
        seg.end_reason, seg.live = reason, False
        self._past.append(seg)
        self._current = None
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- reading -----------------------------------------------------------------------------------------
    def segments(self) -> list[Segment]:
        """Past segments of this ledger plus the running one (its time up to now), resolved."""
        segs = list(self._past)
        if self._current is not None:
            live = self._current.marks[-1]
            live.elapsed_s = self.clock() - self._t0
            segs.append(self._current)
        return resolve_segments(segs)

    def spent(self, stage: str | None = None) -> Spend:
        """What the run has spent so far, all segments (crashed ones included) and the running one.

        Args:
            stage: only this stage; None for all stages in the ledger (the recipe).
        """
        return spend_of(s for s in self.segments() if stage is None or s.stage == stage)


@dataclass
class StageSummary:
    """One row of the cost report."""

    stage: str  # stage name, or "total"
    hardware: str  # "64 x h800"; several, comma-separated, when segments ran on different machines
    spend: Spend


@dataclass
class CostSummary:
    """The cost report of a run: one row per stage (in order of first appearance) and the total."""

    stages: list[StageSummary]
    total: StageSummary
    damaged_lines: int  # ledger lines skipped (a torn write after a crash)


def _hardware(segments: list[Segment]) -> str:
    kinds = dict.fromkeys(f"{s.num_gpus} x {s.gpu_type}" for s in segments)
    return ", ".join(kinds)


def summarize(run_dir: str | Path) -> CostSummary:
    """Per-stage GPU-hours, dollars, samples, throughput, MFU and time lost to crashes of a run.

    Args:
        run_dir: a run's output dir (or its ``ledger.jsonl``).
    """
    damaged = 0
    for path in ledger_files(run_dir):
        with open(path, encoding="utf-8", errors="replace") as f:
            damaged += parse_records(f)[1]
    segments = read_ledger(run_dir)
    by_stage: dict[str, list[Segment]] = {}
    for seg in segments:
        by_stage.setdefault(seg.stage, []).append(seg)
    rows = [StageSummary(name, _hardware(segs), spend_of(segs)) for name, segs in by_stage.items()]
    return CostSummary(rows, StageSummary("total", _hardware(segments), spend_of(segments)), damaged)
