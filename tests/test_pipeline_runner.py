"""The runner: failure records, resume (also after kill -9), crashed workers, systemic errors (disk full),
the Ray executor."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from data_helpers import flaky_stage, make_video
from data_pipeline.config import RunnerConfig, SplitConfig
from data_pipeline.pipeline import make_stage
from data_pipeline import __main__ as cli
from data_pipeline.runner import Journal, Stage, SystemicError, run_stage
from opensora.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parent.parent


def _rows(n):
    return pd.DataFrame({"path": [f"/data/v{i}.mp4" for i in range(n)]})


@pytest.mark.parametrize("workers", [0, 2])
def test_failures_are_records_and_resume_skips_finished(tmp_path, workers):
    df = read_manifest(_write(tmp_path, _rows(6)), usable_only=False)
    bad = df["id"].iloc[[1, 4]].tolist()
    stage = Stage("flaky", flaky_stage, {"fail": bad})
    cfg = RunnerConfig(workers=workers, progress=False, batch_rows=2)
    summary = run_stage(stage, df, tmp_path / "out.parquet", cfg)
    assert (summary.done, summary.failed, summary.rows_out) == (4, 2, 6)
    assert "ValueError: bad row N" in str(summary)
    out = read_manifest(tmp_path / "out.parquet", usable_only=False)
    assert out["id"].tolist() == df["id"].tolist()
    assert out.set_index("id").loc[bad, "flaky_status"].tolist() == ["failed", "failed"]
    assert out.set_index("id").loc[bad[0], "flaky_error"] == f"ValueError: bad row {bad[0]}"
    # A re-run does nothing new; with retry_failed the failed rows run again (and now succeed).
    again = run_stage(stage, df, tmp_path / "out.parquet", cfg)
    assert (again.resumed, again.done, again.failed) == (6, 0, 0)
    fixed = Stage("flaky", fixed_stage, {"fail": bad})  # the code fixed, the settings as they were
    retried = run_stage(fixed, df, tmp_path / "out.parquet", RunnerConfig(workers=0, progress=False, retry_failed=True))
    assert (retried.resumed, retried.done) == (4, 2)
    assert (read_manifest(tmp_path / "out.parquet")["flaky_status"] == "done").all()


def fixed_stage(row: dict, cfg: dict) -> list[dict]:
    """``flaky_stage`` with its bug fixed: no row fails (a changed setting would redo every row instead)."""
    return [{**row, "seen": 1}]


def _write(tmp_path, df):
    path = tmp_path / "in.csv"
    df.to_csv(path, index=False)
    return path


def test_journal_drops_a_half_written_line(tmp_path):
    journal = Journal(tmp_path / "o.parquet")
    journal.append([{"id": "a", "status": "done", "error": None, "rows": [{"id": "a"}]}])
    journal.close()
    with open(journal.path, "a") as f:
        f.write('{"id": "b", "status": "do')  # kill -9 in the middle of a write
    again = Journal(tmp_path / "o.parquet")
    assert set(again.entries) == {"a"}
    again.append([{"id": "c", "status": "done", "error": None, "rows": []}])
    again.close()
    lines = journal.path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a", "c"]


@pytest.mark.slow
def test_crashed_worker_fails_only_its_row(tmp_path):
    df = read_manifest(_write(tmp_path, _rows(4)), usable_only=False)
    crash = df["id"].iloc[2]
    summary = run_stage(Stage("flaky", flaky_stage, {"crash": [crash]}), df, tmp_path / "o.parquet",
                        RunnerConfig(workers=2, progress=False))
    out = read_manifest(tmp_path / "o.parquet", usable_only=False).set_index("id")
    assert out.loc[crash, "flaky_status"] == "failed" and "crashed" in out.loc[crash, "flaky_error"]
    assert (summary.done, summary.failed) == (3, 1)


@pytest.mark.slow
def test_resume_after_kill9_has_no_duplicate_and_no_lost_row(tmp_path):
    n = 8
    for i in range(n):
        make_video(tmp_path / "in" / f"v{i}.mp4", [30, 30, 30])
    cmd = [sys.executable, "-m", "data_pipeline", "split", "--input", str(tmp_path / "in"),
           "--output", str(tmp_path / "s.parquet"), "--workers", "1", "--min-clip-s", "0.5", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    journal = tmp_path / "s.parquet.journal.jsonl"
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if journal.exists() and journal.read_text().count("\n") >= 2:
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its pool worker, mid-run
    proc.wait()
    assert not (tmp_path / "s.parquet").exists()
    finished = journal.read_text().count("\n")
    assert 2 <= finished < n
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"finished before: {finished}" in rerun.stderr
    out = read_manifest(tmp_path / "s.parquet")
    assert out["id"].is_unique and len(out) == 3 * n
    assert sorted(out["source_video"].unique()) == sorted(str(tmp_path / "in" / f"v{i}.mp4") for i in range(n))
    clips = sorted(p.name for p in (tmp_path / "clips").iterdir())
    assert clips == sorted(Path(p).name for p in out["path"])  # no stray temp or duplicate clip files


@pytest.mark.slow
def test_ray_executor_on_two_local_cpus(tmp_path):
    ray = pytest.importorskip("ray")
    for i in range(3):
        make_video(tmp_path / "in" / f"v{i}.mp4", [30, 30])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        stage = make_stage("split", SplitConfig(min_clip_s=0.5), tmp_path / "ray.parquet")
        from data_pipeline.sources import resolve_input

        df = resolve_input(tmp_path / "in")
        summary = run_stage(stage, df, tmp_path / "ray.parquet", RunnerConfig(executor="ray", progress=False))
    finally:
        ray.shutdown()
    assert (summary.done, summary.rows_out) == (3, 6)
    local = run_stage(make_stage("split", SplitConfig(min_clip_s=0.5, out_dir=str(tmp_path / "lc")),
                                 tmp_path / "local.parquet"), df, tmp_path / "local.parquet",
                      RunnerConfig(workers=0, progress=False))
    a, b = read_manifest(tmp_path / "ray.parquet"), read_manifest(tmp_path / "local.parquet")
    assert a["id"].tolist() == b["id"].tolist() and a["num_frames"].tolist() == b["num_frames"].tolist()
    assert local.done == 3


def disk_stage(row: dict, cfg: dict) -> list[dict]:
    """A test stage on a disk that holds as many files as ``<base>/room`` says (the disk, not a setting: freeing
    space changes no fingerprint): each row marks ``attempts/`` (outside the "disk"), then writes ``out/<id>``
    without creating ``out/``, and raises ENOSPC once ``out/`` is full."""
    base = Path(cfg["base"])
    room = int((base / "room").read_text()) if (base / "room").exists() else 100
    (base / "attempts" / row["id"]).touch()
    out = base / "out"
    if out.is_dir() and len(list(out.iterdir())) >= room:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / row["id"]))
    if not Path(row["path"]).parent.is_dir():  # the row's own input is missing: its failure, not the disk's
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), row["path"])
    with open(out / row["id"], "w") as f:
        f.write("clip")
    return [{**row, "seen": 1}]


def _disk(tmp_path, n):
    (tmp_path / "attempts").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in").mkdir()
    rows = pd.DataFrame({"path": [str(tmp_path / "in" / f"v{i}.mp4") for i in range(n)]})
    return read_manifest(_write(tmp_path, rows), usable_only=False)


def _journal_ids(path):
    return [json.loads(line)["id"] for line in Path(f"{path}.journal.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("workers", [0, 2])
def test_full_disk_stops_the_stage_and_a_rerun_finishes(tmp_path, workers):
    n, room = 24, 5
    df = _disk(tmp_path, n)
    out = tmp_path / "o.parquet"
    (tmp_path / "room").write_text(str(room))
    stage = Stage("disk", disk_stage, {"base": str(tmp_path)}, out_dirs=(str(tmp_path / "out"),))
    with pytest.raises(SystemicError) as info:
        run_stage(stage, df, out, RunnerConfig(workers=workers, progress=False, batch_rows=2))
    message = str(info.value)
    assert "no space left on device (ENOSPC)" in message and str(tmp_path / "out") in message
    assert not out.exists()  # no manifest that would look complete
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    journaled = _journal_ids(out)
    assert sorted(journaled) == written and len(written) >= room  # every finished row, no failed one
    attempted = len(list((tmp_path / "attempts").iterdir()))
    assert attempted <= len(written) + 2 * workers * 2 + 2 < n  # it stopped instead of failing every row
    # After space is freed, a re-run does exactly the rest.
    (tmp_path / "room").write_text(str(n))
    summary = run_stage(stage, df, out, RunnerConfig(workers=workers, progress=False, batch_rows=2))
    assert (summary.resumed, summary.done, summary.failed) == (len(written), n - len(written), 0)
    result = read_manifest(out)
    assert result["id"].tolist() == df["id"].tolist()
    assert sorted(_journal_ids(out)) == sorted(df["id"])  # each row journaled exactly once


def test_a_missing_input_fails_its_row_but_a_vanished_output_folder_stops(tmp_path):
    df = _disk(tmp_path, 4)
    df.loc[1, "path"] = str(tmp_path / "gone" / "v1.mp4")
    stage = Stage("disk", disk_stage, {"base": str(tmp_path)}, out_dirs=(str(tmp_path / "out"),))
    summary = run_stage(stage, df, tmp_path / "a.parquet", RunnerConfig(workers=0, progress=False))
    assert (summary.done, summary.failed) == (3, 1) and "FileNotFoundError" in str(summary)
    (tmp_path / "out").rename(tmp_path / "unmounted")
    with pytest.raises(SystemicError, match=r"output folder vanished \(ENOENT: .*out\)"):
        run_stage(stage, df, tmp_path / "b.parquet", RunnerConfig(workers=0, progress=False))
    # With an output folder gone every ENOENT counts as systemic (the missing input too): nothing is journaled.
    assert _journal_ids(tmp_path / "b.parquet") == []


def test_a_journal_write_on_a_full_disk_stops_and_keeps_whole_lines(tmp_path, monkeypatch):
    df = read_manifest(_write(tmp_path, _rows(8)), usable_only=False)
    out = tmp_path / "o.parquet"
    real_write, calls = os.write, []

    def write(fd, data):  # the 4th journal write gets 10 bytes onto the disk, then the disk is full
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(".journal.jsonl"):
            return real_write(fd, data)
        calls.append(len(data))
        if len(calls) == 4:
            return real_write(fd, bytes(data[:10]))
        if len(calls) > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(SystemicError, match=r"journal .*o\.parquet\.journal\.jsonl could not be written: no space left on device \(ENOSPC\)"):
        run_stage(Stage("flaky", flaky_stage, {}), df, out, RunnerConfig(workers=0, progress=False))
    monkeypatch.setattr(os, "write", real_write)
    assert _journal_ids(out) == df["id"].iloc[:3].tolist()  # the torn 4th line was cut back off
    summary = run_stage(Stage("flaky", flaky_stage, {}), df, out, RunnerConfig(workers=0, progress=False))
    assert (summary.resumed, summary.done) == (3, 5)
    assert sorted(_journal_ids(out)) == sorted(df["id"])


def test_cli_exits_3_on_a_systemic_error(tmp_path, monkeypatch, capsys):
    def full(*args):
        raise SystemicError("split: stopped: no space left on device (ENOSPC) at /data/clips/x.mp4")

    monkeypatch.setattr(cli, "run_one", full)
    code = cli.main(["split", "--input", str(tmp_path / "in.csv"), "--output", str(tmp_path / "o.parquet")])
    assert code == 3 and "ENOSPC) at /data/clips/x.mp4" in capsys.readouterr().err


@pytest.mark.parametrize("workers,batch_rows", [(2, 1), (2, 3), (0, 1), (0, 3)])
def test_a_row_that_hangs_times_out_and_the_rest_of_the_stage_finishes(tmp_path, workers, batch_rows):
    """A row that never returns (a hung decoder or model) fails with 'timed out after N s' once it has run for the
    stage's row_timeout_s; its worker is replaced (the other rows finish on the pool) and the run ends. A task of
    several rows that times out is split, so only the hung row fails."""
    df = read_manifest(_write(tmp_path, _rows(6)), usable_only=False)
    hang = df["id"].iloc[1]
    stage = Stage("flaky", flaky_stage, {"hang": [hang]}, row_timeout_s=2.0)
    start = time.monotonic()
    summary = run_stage(stage, df, tmp_path / "o.parquet",
                        RunnerConfig(workers=workers, progress=False, batch_rows=batch_rows))
    assert time.monotonic() - start < 60
    assert (summary.done, summary.failed) == (5, 1)
    assert "timed out after N s" in str(summary)
    out = read_manifest(tmp_path / "o.parquet", usable_only=False).set_index("id")
    assert out.loc[hang, "flaky_status"] == "failed"
    assert out.loc[hang, "flaky_error"].startswith("RowTimeout: timed out after 2 s")
    assert (out.drop(index=hang)["seen"] == 1).all()
    assert run_stage(stage, df, tmp_path / "o.parquet", RunnerConfig(workers=workers, progress=False)).resumed == 6


def test_the_clock_of_a_row_starts_when_its_worker_takes_it(tmp_path):
    """Rows that queue behind others or wait for a worker to start are not timed out for the wait: 4 rows of 1.2 s
    on one worker take ~5 s in all, each well within its 2 s."""
    df = read_manifest(_write(tmp_path, _rows(4)), usable_only=False)
    stage = Stage("flaky", flaky_stage, {"sleep": 1.2}, row_timeout_s=2.0)
    summary = run_stage(stage, df, tmp_path / "o.parquet", RunnerConfig(workers=1, progress=False))
    assert (summary.done, summary.failed) == (4, 0)


def test_every_stage_has_a_row_time_limit_by_default(tmp_path):
    from data_pipeline.config import CaptionConfig, DownloadConfig, FilterConfig, ProbeConfig

    configs = {"download": DownloadConfig(), "probe": ProbeConfig(), "split": SplitConfig(), "filter": FilterConfig(),
               "caption": CaptionConfig()}
    limits = {name: make_stage(name, cfg, tmp_path / "o.parquet").row_timeout_s for name, cfg in configs.items()}
    assert all(limit > 0 for limit in limits.values()), limits
    assert limits["split"] >= 3600 and limits["caption"] >= 600  # generous where a row is long work
    assert limits["download"] > DownloadConfig().max_seconds  # the download's own limit ends it first
    with pytest.raises(ValueError, match="download.row_timeout_s"):
        DownloadConfig(max_seconds=7200.0, row_timeout_s=3600.0)
    # a setting of how to run, not of what comes out: changing it redoes nothing
    from data_pipeline.config import output_settings

    assert "row_timeout_s" not in output_settings(SplitConfig())


@pytest.mark.slow
def test_a_hung_row_on_ray_is_cancelled_and_the_rest_finish(tmp_path):
    ray = pytest.importorskip("ray")
    df = read_manifest(_write(tmp_path, _rows(4)), usable_only=False)
    hang = df["id"].iloc[2]
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests")])  # the workers import flaky_stage from data_helpers
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        stage = Stage("flaky", flaky_stage, {"hang": [hang]}, row_timeout_s=2.0)
        summary = run_stage(stage, df, tmp_path / "o.parquet",
                            RunnerConfig(executor="ray", progress=False, batch_rows=2))
    finally:
        ray.shutdown()
    assert (summary.done, summary.failed) == (3, 1)
    out = read_manifest(tmp_path / "o.parquet", usable_only=False).set_index("id")
    assert out.loc[hang, "flaky_error"].startswith("RowTimeout: timed out after 4 s")  # twice the limit on Ray
