"""caption: captions the data carries, clean-up, retries, a tiny random LLaVA loaded through the real path,
and the per-rank sharding used under torchrun."""

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_helpers import make_video
from data_pipeline import caption as cap, pipeline
from data_pipeline.captioners import FAMILIES
from data_pipeline.config import CaptionConfig, RunnerConfig
from data_pipeline.pipeline import make_stage, merge_shards, run_one, shard, shard_path
from data_pipeline.runner import run_stage
from opensora.data.manifest import normalize, read_manifest, write_manifest

SERIAL = RunnerConfig(workers=0, progress=False)
WORKER = Path(__file__).parent / "dist_workers" / "caption_worker.py"


@pytest.fixture(autouse=True)
def stand_in_model_is_an_image_family(monkeypatch):
    """The stand-in model names ("m", "stand-in": generate is replaced) are LLaVA folders to caption_batch, which
    asks the folder's family how to read the frames; real folders are read as they are."""
    real = cap.family_of
    monkeypatch.setattr(cap, "family_of", lambda model: FAMILIES["llava"] if model in ("m", "stand-in") else real(model))


def test_clean_caption_strips_openings():
    openings = CaptionConfig().strip_openings
    assert cap.clean_caption("The video shows a dog running on a beach.", openings) == "A dog running on a beach."
    assert cap.clean_caption("In this video, the clip depicts  two cats.", openings) == "Two cats."
    assert cap.clean_caption("A red car drives by.", openings) == "A red car drives by."
    assert cap.last_sentence_end("A cat sits. It looks at the") == "A cat sits."


def test_existing_captions_column_and_sidecars(tmp_path):
    make_video(tmp_path / "a.mp4", [20])
    (tmp_path / "a.txt").write_text("a caption from a txt sidecar\n")
    (tmp_path / "src.json").write_text(json.dumps({"shots": [
        {"start_frame": 0, "end_frame": 30, "text": "first shot"},
        {"start_frame": 30, "end_frame": 60, "text": "second shot"}]}))
    rows = [
        {"id": "1", "path": str(tmp_path / "x.mp4"), "text": "given text"},
        {"id": "2", "path": str(tmp_path / "a.mp4"), "text": None},
        {"id": "3", "path": str(tmp_path / "clip.mp4"), "source_video": str(tmp_path / "src.mp4"),
         "start_frame": 32, "end_frame": 58},
        {"id": "4", "path": str(tmp_path / "nothing.mp4")},
    ]
    out = cap.caption_batch(rows, CaptionConfig())
    assert [o[0]["text"] for o in out[:3]] == ["given text", "a caption from a txt sidecar", "second shot"]
    assert [o[0]["caption_source"] for o in out[:3]] == ["column", "sidecar", "sidecar"]
    assert isinstance(out[3], RuntimeError) and "no caption model" in str(out[3])


def test_a_video_name_at_the_length_limit_has_no_sidecar_and_no_error(tmp_path):
    # 251 + ".mp4" = 255 bytes, the most a name may have: "<name>.json" (256) cannot exist, and asking for it
    # must not fail the row with ENAMETOOLONG; a .txt sidecar (255 bytes) is still found.
    video = tmp_path / ("x" * 251 + ".mp4")
    make_video(video, [24])
    cfg = CaptionConfig()
    assert cap.existing_caption({"path": str(video)}, cfg) is None
    assert cap.existing_caption({"path": "clip.mp4", "source_video": str(video)}, cfg) is None
    (tmp_path / ("x" * 251 + ".txt")).write_text("a long name\n")
    assert cap.existing_caption({"path": str(video)}, cfg) == ("a long name", "sidecar")


def test_empty_and_truncated_captions_are_retried_then_marked(tmp_path, monkeypatch):
    make_video(tmp_path / "a.mp4", [20])
    calls = []

    def fake_generate(images, cfg, max_new_tokens):
        calls.append((len(images), max_new_tokens))
        return [("The video shows", False, 2), ("A cat sits on a mat. It then", True, 16)][: len(images)]

    monkeypatch.setattr(cap, "generate", fake_generate)
    monkeypatch.setattr(cap, "read_frames", lambda path, positions, layout: [None])
    rows = [{"id": str(i), "path": str(tmp_path / "a.mp4")} for i in range(2)]
    out = cap.caption_batch(rows, CaptionConfig(model="m", retries=1, max_new_tokens=16, batch_size=2))
    assert calls == [(2, 16), (2, 32)]  # both retried once with twice the budget
    assert isinstance(out[0], RuntimeError) and "empty caption" in str(out[0])
    assert out[1][0]["text"] == "A cat sits on a mat." and out[1][0]["caption_flag"] == "truncated"


def _width_captions(images, cfg, max_new_tokens):
    """A stand-in for generate whose caption depends on the frames (their width), so a mix-up shows."""
    return [(f"a clip {frames[0].shape[1]} pixels wide", False, 5) for frames in images]


def test_prefetch_gives_the_serial_captions_in_order_and_a_broken_clip_fails_alone(tmp_path, monkeypatch):
    paths = []
    for i in range(7):
        paths.append(tmp_path / f"c{i}.mp4")
        make_video(paths[-1], [12], size=(32 + 32 * i, 32))
    (tmp_path / "c3.mp4").write_bytes(b"not a video")  # a broken clip in the middle of the second batch
    paths.append(tmp_path / "gone.mp4")
    rows = [{"id": str(i), "path": str(p)} for i, p in enumerate(paths)]
    batches = []

    def recording(images, cfg, max_new_tokens):
        batches.append([frames[0].shape[1] for frames in images])
        return _width_captions(images, cfg, max_new_tokens)

    monkeypatch.setattr(cap, "generate", recording)
    outs = {}
    for name, prefetch, workers in [("serial", 0, 1), ("prefetch", 2, 3), ("one ahead", 1, 1)]:
        batches.clear()
        cfg = CaptionConfig(model="m", batch_size=2, prefetch_batches=prefetch, decode_workers=workers, min_words=1)
        outs[name] = (cap.caption_batch(rows, cfg), list(batches))
    def comparable(results):
        return [o if isinstance(o, list) else repr(o) for o in results]

    out, serial_batches = outs["serial"]
    assert serial_batches == [[32, 64], [96, 160], [192, 224]]  # the broken clip is left out of its batch
    assert [o[0]["text"] if isinstance(o, list) else None for o in out] == [
        f"A clip {32 + 32 * i} pixels wide" if i not in (3, 7) else None for i in range(8)]
    assert "Error reading" in str(out[3]) and str(paths[3]) in str(out[3])
    assert isinstance(out[7], FileNotFoundError) and "clip not found" in str(out[7])
    for name in ("prefetch", "one ahead"):
        other, other_batches = outs[name]
        assert other_batches == serial_batches
        assert comparable(other) == comparable(out)


@pytest.mark.parametrize("prefetch", [0, 1])
def test_frames_of_the_next_batch_decode_while_one_generates(tmp_path, monkeypatch, prefetch):
    """Through the runner, as the caption command runs. Ordering by events, not timing: generate of batch 0
    waits (bounded) for a decode of batch 1 to begin. With prefetch it does; without, batch 1 is decoded only
    after generate returns. Prefetch is bounded: batch 2 is not decoded before batch 0 generates."""
    events, lock = [], threading.Lock()
    next_batch_decoding = threading.Event()

    def log(*event):
        with lock:
            events.append(event)

    def fake_read(path, positions, layout):
        log("decode", path)
        if {("decode", "/v/2.mp4"), ("decode", "/v/3.mp4")} <= set(events):
            next_batch_decoding.set()
        return [np.zeros((4, 4, 3), np.uint8)]

    def fake_generate(images, cfg, max_new_tokens):
        n = sum(e[0] == "generate" for e in events)
        log("generate", n)
        if n == 0:
            log("next batch decoding during generate", next_batch_decoding.wait(timeout=10 if prefetch else 0.5))
        log("generated", n)
        return [("a cat on a mat", False, 5)] * len(images)

    monkeypatch.setattr(cap, "read_frames", fake_read)
    monkeypatch.setattr(cap, "generate", fake_generate)
    df = normalize(pd.DataFrame({"path": [f"/v/{i}.mp4" for i in range(6)]}))
    cfg = CaptionConfig(model="m", batch_size=2, prefetch_batches=prefetch, decode_workers=2)
    summary = run_one("caption", cfg, df, tmp_path / "cap.parquet", SERIAL)
    assert summary.done == 6
    assert read_manifest(tmp_path / "cap.parquet")["id"].tolist() == df["id"].tolist()
    assert ("next batch decoding during generate", bool(prefetch)) in events
    first_done = events.index(("generated", 0))
    decoded_before = {e[1][len("/v/"):-len(".mp4")] for e in events[:first_done] if e[0] == "decode"}
    assert decoded_before == ({"0", "1", "2", "3"} if prefetch else {"0", "1"})
    assert events.index(("generate", 0)) < events.index(("decode", "/v/4.mp4"))


@pytest.mark.slow
def test_tiny_random_llava_through_the_real_loading_path(tmp_path):
    cap.make_tiny_llava(tmp_path / "llava")
    for i in range(3):
        make_video(tmp_path / "clips" / f"c{i}.mp4", [24])
    df = normalize(pd.DataFrame({"path": [str(tmp_path / "clips" / f"c{i}.mp4") for i in range(3)]}))
    cfg = CaptionConfig(model=str(tmp_path / "llava"), batch_size=2, max_new_tokens=6, min_words=1, retries=1,
                        device="cpu")
    summary = run_one("caption", cfg, df, tmp_path / "cap.parquet", SERIAL)
    assert summary.done + summary.failed == 3 and summary.done >= 1
    out = read_manifest(tmp_path / "cap.parquet", usable_only=False)
    done = out[out["caption_status"] == "done"]
    assert (done["caption_source"] == "model").all() and done["text"].str.len().gt(0).all()
    assert all(str(e).startswith("RuntimeError: empty caption") for e in out.loc[out["caption_status"] != "done", "caption_error"])
    # decoding in the background while generating changes nothing: same batches, same captions, same order
    rows = df.to_dict("records")
    plain = [o if isinstance(o, list) else repr(o) for o in cap.caption_batch(rows, cfg)]
    serial = cap.caption_batch(rows, dataclasses.replace(cfg, prefetch_batches=0))
    assert [o if isinstance(o, list) else repr(o) for o in serial] == plain
    # grid layout: the frames go in as one image
    cfg_grid = CaptionConfig(model=str(tmp_path / "llava"), layout="grid", max_new_tokens=4, min_words=1, device="cpu")
    [[row]] = [cap.caption_batch([df.iloc[0].to_dict()], cfg_grid)[0]]
    assert row["caption_source"] == "model"


def test_llava_loads_straight_onto_its_device(tmp_path, monkeypatch):
    """from_pretrained gets device_map={"": device}, so the weights land on the rank's device directly; the
    model is never built in host memory and moved afterwards (8 ranks = 8 host copies of a 7B model)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    cap.make_tiny_llava(tmp_path / "llava")
    real = LlavaForConditionalGeneration.from_pretrained.__func__
    calls = []

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        if kwargs["device_map"] == {"": "cuda:3"}:  # no GPU here: only the placement request is checked
            return torch.nn.Identity()
        return real(cls, *args, **kwargs)

    def moved(self, *args, **kwargs):
        raise AssertionError(f"model moved after loading: .to{args}")

    monkeypatch.setattr(LlavaForConditionalGeneration, "from_pretrained", classmethod(spy))
    monkeypatch.setattr(torch.nn.Module, "to", moved)
    monkeypatch.setattr(torch.nn.Module, "cuda", moved)
    cap.load_model.cache_clear()
    try:
        model, processor = cap.load_model(str(tmp_path / "llava"), "cpu", "float32")
        assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training
        cap.load_model(str(tmp_path / "llava"), "cuda:3", "bfloat16")
    finally:
        cap.load_model.cache_clear()
    assert [c["device_map"] for c in calls] == [{"": "cpu"}, {"": "cuda:3"}]
    assert [c["dtype"] for c in calls] == [torch.float32, torch.bfloat16]


def test_rank_shards_cover_every_row_once_and_merge_in_order(tmp_path):
    df = normalize(pd.DataFrame({"path": [f"/v/{i}.mp4" for i in range(7)]}))
    world = 3
    shards = [shard(df, r, world) for r in range(world)]
    assert sorted(sum((s["id"].tolist() for s in shards), [])) == sorted(df["id"])
    assert [len(s) for s in shards] == [3, 2, 2]
    for r, s in enumerate(shards):
        write_manifest(s.assign(text=[f"caption {p}" for p in s["path"]]), shard_path(tmp_path / "o.parquet", r, world))
    merged = merge_shards(df, tmp_path / "o.parquet", world)
    assert merged["id"].tolist() == df["id"].tolist()
    assert read_manifest(tmp_path / "o.parquet")["text"].tolist() == [f"caption /v/{i}.mp4" for i in range(7)]


def caption_torchrun(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """tests/dist_workers/caption_worker.py on 2 gloo ranks over ``tmp_path/in.parquet``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
           "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "cap.parquet"),
           "--record", str(tmp_path), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)


def _decoded_paths(tmp_path) -> list[str]:
    """Rows the stand-in decoder saw (one per row (re)done), and forget them for the next run."""
    paths = []
    for log in tmp_path.glob("decoded.rank*.jsonl"):
        paths += [json.loads(line)["path"] for line in log.read_text().splitlines()]
        log.unlink()
    return sorted(paths)


@pytest.mark.slow
def test_ranks_finishing_far_apart_outlast_the_collective_timeout(tmp_path):
    """Rank 1 finishes ~8 s after rank 0 while collectives time out after 3 s (standing in for hours vs the
    30-minute default): waiting for a shard is no collective, and a rank busy in generate for longer than the
    stall limit counts as alive."""
    df = normalize(pd.DataFrame({"path": [f"/v/{i}.mp4" for i in range(8)]}))
    write_manifest(df, tmp_path / "in.parquet")
    proc = caption_torchrun(tmp_path, "--pg-timeout-s", "3", "--slow-rank", "1", "--slow-s", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    out = read_manifest(tmp_path / "cap.parquet")
    assert out["id"].tolist() == df["id"].tolist() and (out["text"] == "A cat sits on a mat").all()
    assert _decoded_paths(tmp_path) == sorted(df["path"])


@pytest.mark.slow
def test_a_crashed_rank_fails_the_run_and_a_rerun_redoes_only_unfinished_rows(tmp_path):
    df = normalize(pd.DataFrame({"path": [f"/v/{i}.mp4" for i in range(8)]}))
    write_manifest(df, tmp_path / "in.parquet")
    start = time.monotonic()
    proc = caption_torchrun(tmp_path, "--crash-rank", "1", "--crash-after", "1")
    assert proc.returncode != 0 and time.monotonic() - start < 120
    assert "exitcode  : 3" in proc.stderr and "rank      : 1" in proc.stderr, proc.stderr[-6000:]
    assert not (tmp_path / "cap.parquet").exists()
    journals = [Path(f"{shard_path(tmp_path / 'cap.parquet', r, 2)}.journal.jsonl") for r in range(2)]
    finished = [{json.loads(line)["id"] for line in j.read_text().splitlines()} if j.exists() else set()
                for j in journals]
    assert len(finished[1]) == 2  # rank 1's first task (batch_size 2) was journaled before it died
    _decoded_paths(tmp_path)
    proc = caption_torchrun(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert _decoded_paths(tmp_path) == sorted(df.loc[~df["id"].isin(finished[0] | finished[1]), "path"])
    out = read_manifest(tmp_path / "cap.parquet")
    assert out["id"].tolist() == df["id"].tolist() and (out["caption_status"] == "done").all()


@pytest.mark.slow
def test_a_rank_hung_in_a_row_is_declared_stuck_and_the_run_ends(tmp_path):
    """Rank 1 never returns from generate, and its row limit cannot end it (SIGALRM blocked, like a call stuck in
    C); its heartbeat thread beats on. Rank 0 declares it stuck once it has finished no row for runner.stall_s,
    and torchrun ends the run instead of waiting forever."""
    df = normalize(pd.DataFrame({"path": [f"/v/{i}.mp4" for i in range(8)]}))
    write_manifest(df, tmp_path / "in.parquet")
    start = time.monotonic()
    proc = caption_torchrun(tmp_path, "--hang-rank", "1", "--stall-s", "3")
    assert proc.returncode != 0 and time.monotonic() - start < 120
    assert "rank 1 (pid" in proc.stderr and "looks stuck" in proc.stderr, proc.stderr[-6000:]
    assert not (tmp_path / "cap.parquet").exists()
    assert len(read_manifest(shard_path(tmp_path / "cap.parquet", 0, 2))) == 4  # rank 0's part is kept


@pytest.fixture
def rank0_of_two(monkeypatch):
    """This process as rank 0 of 2 (a one-process gloo group underneath); the test plays rank 1 with its files."""
    import torch.distributed as dist

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(pipeline, "SHARD_POLL_S", 0.05)
    monkeypatch.setattr(pipeline, "SHARD_HEARTBEAT_S", 0.05)
    monkeypatch.setattr(pipeline, "SHARD_STALL_S", 1.0)
    monkeypatch.setattr(cap, "read_frames", lambda path, positions, layout: [np.zeros((4, 4, 3), np.uint8)])
    monkeypatch.setattr(cap, "generate", lambda images, cfg, budget: [("a cat sits on a mat", False, 6)] * len(images))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield normalize(pd.DataFrame({"path": [f"/v/{i}.mp4" for i in range(4)]}))
    dist.destroy_process_group()


def test_rank0_names_a_rank_that_failed_and_ignores_an_earlier_runs_marker(tmp_path, rank0_of_two):
    out = tmp_path / "cap.parquet"
    stale = {"token": "an earlier run", "status": "done", "summary": ""}
    (tmp_path / "cap.rank1-of-2.parquet.done.json").write_text(json.dumps(stale))

    def rank1():  # fails its shard once rank 0 is waiting, with this run's token
        while not (tmp_path / "cap.rank0-of-2.parquet.done.json").exists():
            time.sleep(0.01)
        token = json.loads((tmp_path / "cap.rank0-of-2.parquet.done.json").read_text())["token"]
        failed = {"token": token, "status": "failed", "error": "FileNotFoundError: caption model folder not found"}
        (tmp_path / "cap.rank1-of-2.parquet.done.json").write_text(json.dumps(failed))

    threading.Thread(target=rank1, daemon=True).start()
    with pytest.raises(pipeline.ShardError, match="rank 1 failed: FileNotFoundError: caption model folder"):
        run_one("caption", CaptionConfig(model="m"), rank0_of_two, out, SERIAL)
    assert json.loads((tmp_path / "cap.parquet.merged.json").read_text())["status"] == "failed"  # ranks > 0 stop too
    assert not out.exists() and len(read_manifest(shard_path(out, 0, 2))) == 2  # rank 0's shard is kept for a re-run


def test_rank0_declares_a_silent_rank_dead_after_the_stall_limit(tmp_path, rank0_of_two):
    """A rank killed outside torchrun (which would end the others itself) stops its heartbeat: no endless wait."""
    (tmp_path / "cap.rank1-of-2.parquet.alive.json").write_text('{"beat": 7, "pid": 1234, "host": "node-b"}')
    start = time.monotonic()
    with pytest.raises(pipeline.ShardError, match=r"rank 1 \(pid 1234 on node-b\) looks dead"):
        run_one("caption", CaptionConfig(model="m"), rank0_of_two, tmp_path / "cap.parquet", SERIAL)
    assert 1.0 <= time.monotonic() - start < 30
    assert not (tmp_path / "cap.rank0-of-2.parquet.alive.json").exists()  # its own heartbeat ends with it


def _rank1_heartbeat(tmp_path, rows, seconds, stall_s=1.0, then_done=False):
    """Plays rank 1 in a thread: its real heartbeat (still beating: the rank's process lives) reporting
    ``rows(t)`` rows finished for ``seconds``, then, if ``then_done``, its shard marked done with this run's token.
    Returns what rank 0's heartbeat said once rank 0 had finished its own shard."""
    seen = {}

    def rank1():
        with pipeline._Heartbeat(tmp_path / "cap.rank1-of-2.parquet.alive.json", "t", stall_s) as beat:
            start = time.monotonic()
            # at least ``seconds``, and until rank 0 has finished its shard (later on a loaded machine)
            while time.monotonic() - start < seconds or ("rank0" not in seen and time.monotonic() - start < 60):
                beat.progress(rows(time.monotonic() - start))
                done0 = tmp_path / "cap.rank0-of-2.parquet.done.json"
                if "rank0" not in seen and done0.exists():
                    seen["token"] = json.loads(done0.read_text())["token"]
                    time.sleep(0.2)  # a beat or two after its shard
                    seen["rank0"] = json.loads((tmp_path / "cap.rank0-of-2.parquet.alive.json").read_text())
                time.sleep(0.02)
            if then_done:
                marker = {"token": seen["token"], "status": "done", "summary": ""}
                (tmp_path / "cap.rank1-of-2.parquet.done.json").write_text(json.dumps(marker))

    thread = threading.Thread(target=rank1, daemon=True)
    thread.start()
    return seen, thread


def test_a_rank_that_beats_but_finishes_no_row_is_declared_stuck(tmp_path, rank0_of_two):
    """A rank hung in a row (a call stuck in C that its time limit cannot end) keeps its heartbeat thread going:
    the heartbeat carries its progress, and a rank whose progress has not moved for its stall limit is stuck."""
    seen, _ = _rank1_heartbeat(tmp_path, rows=lambda t: 3, seconds=20.0)
    start = time.monotonic()
    with pytest.raises(pipeline.ShardError, match=r"rank 1 \(pid \d+ on .*\) looks stuck: .* finished no row for 1s"):
        run_one("caption", CaptionConfig(model="m"), rank0_of_two, tmp_path / "cap.parquet", SERIAL)
    assert 1.0 <= time.monotonic() - start < 15
    assert json.loads((tmp_path / "cap.parquet.merged.json").read_text())["status"] == "failed"  # the others stop
    # rank 0's own heartbeat said how far it got, and that it was waiting (not to be judged by progress then)
    assert {k: seen["rank0"][k] for k in ("state", "rows")} == {"state": "waiting", "rows": 2}


def test_a_slow_rank_that_finishes_rows_is_not_stuck(tmp_path, rank0_of_two):
    _, thread = _rank1_heartbeat(tmp_path, rows=lambda t: int(t / 0.4), seconds=3.0, then_done=True)
    (tmp_path / "cap.rank1-of-2.parquet").parent.mkdir(exist_ok=True)
    write_manifest(shard(rank0_of_two, 1, 2).assign(text="a cat"), shard_path(tmp_path / "cap.parquet", 1, 2))
    run_one("caption", CaptionConfig(model="m"), rank0_of_two, tmp_path / "cap.parquet", SERIAL)
    thread.join()
    assert len(read_manifest(tmp_path / "cap.parquet")) == 4


def test_the_stall_limit_follows_the_row_time_limit(tmp_path):
    stage = make_stage("filter", pipeline.FilterConfig(row_timeout_s=100.0), tmp_path / "o.parquet")
    # a task of 4 rows may time out (400 s), then its rows run one by one and the hung one times out again
    assert pipeline.stall_limit(stage, RunnerConfig(batch_rows=4)) == 5 * 100.0 + pipeline.SHARD_STALL_S
    assert pipeline.stall_limit(stage, RunnerConfig(batch_rows=4, stall_s=30.0)) == 30.0
    unbounded = make_stage("filter", pipeline.FilterConfig(row_timeout_s=0.0), tmp_path / "o.parquet")
    assert pipeline.stall_limit(unbounded, RunnerConfig()) == 0.0  # no limit, no progress check


def test_ranks_waiting_for_the_merge_notice_a_dead_rank0(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "SHARD_POLL_S", 0.05)
    monkeypatch.setattr(pipeline, "SHARD_STALL_S", 0.5)
    with pytest.raises(pipeline.ShardError, match="rank 0 looks dead"):
        pipeline._wait_for_merge("caption", tmp_path / "cap.parquet", 2, "token")
    (tmp_path / "cap.parquet.merged.json").write_text(json.dumps({"token": "t", "status": "failed", "error": "E: x"}))
    with pytest.raises(pipeline.ShardError, match="rank 0 could not merge the shards: E: x"):
        pipeline._wait_for_merge("caption", tmp_path / "cap.parquet", 2, "t")


def test_a_rerun_on_another_number_of_processes_redoes_only_unfinished_rows(tmp_path, monkeypatch):
    decoded = []

    def fake_read(path, positions, layout):
        decoded.append(path)
        return [np.zeros((4, 4, 3), np.uint8)]

    monkeypatch.setattr(cap, "read_frames", fake_read)
    monkeypatch.setattr(cap, "generate", lambda images, cfg, budget: [("a cat sits on a mat", False, 6)] * len(images))
    df = normalize(pd.DataFrame({"path": [f"/v/{i}.mp4" for i in range(6)]}))
    out, cfg = tmp_path / "cap.parquet", CaptionConfig(model="m", batch_size=1, task_batches=1)
    # A 2-rank run in which rank 1 died after its first row; earlier, a 1-process run had failed row 0.
    stage = make_stage("caption", cfg, out)
    run_stage(stage, shard(df, 0, 2), shard_path(out, 0, 2), SERIAL)
    run_stage(stage, shard(df, 1, 2).iloc[:1], shard_path(out, 1, 2), SERIAL)
    failed = {"id": df["id"][0], "status": "failed", "error": "RuntimeError: x", "rows": [df.iloc[0].to_dict()]}
    Path(f"{out}.journal.jsonl").write_text(json.dumps(failed) + "\n")
    decoded.clear()
    summary = run_one("caption", cfg, df, out, SERIAL)  # now on one process
    assert decoded == ["/v/3.mp4", "/v/5.mp4"]
    assert (summary.resumed, summary.done, summary.failed) == (4, 2, 0)
    result = read_manifest(out)
    assert result["id"].tolist() == df["id"].tolist() and (result["caption_status"] == "done").all()
    decoded.clear()
    assert run_one("caption", cfg, df, out, SERIAL).resumed == 6 and decoded == []
    # and onto 3 ranks: rank 1 of 3 starts with its rows (1 and 4) finished
    ids = set(shard(df, 1, 3)["id"])
    assert pipeline.seed_journal("caption", out, 1, 3, ids) == 2
    entries = [json.loads(line) for line in Path(f"{shard_path(out, 1, 3)}.journal.jsonl").read_text().splitlines()]
    assert {e["id"] for e in entries} == ids and {e["status"] for e in entries} == {"done"}


def test_generation_stops_at_the_models_own_end_of_turn_token(tmp_path):
    """A chat model whose turns end with a token other than the tokenizer's eos (Llama-3 LLaVA: <|eot_id|>):
    generate stops there (the model's generation config), and the caption is not taken for truncated."""
    import json

    folder = cap.make_tiny_llava(tmp_path / "llava")
    make_video(tmp_path / "c.mp4", [24])
    frames = [cap.read_frames(str(tmp_path / "c.mp4"), [0.5], "separate")]
    cfg = CaptionConfig(model=str(folder), num_frames=1, frame_positions=[0.5], device="cpu")
    cap.load_model.cache_clear()
    model, processor = cap.load_model(str(folder), "cpu", "auto")
    [(text, truncated, _)] = cap.generate(frames, cfg, 8)
    words = text.split()
    assert truncated and len(words) >= 2, "the random model runs to the budget without its eos"
    end_of_turn = processor.tokenizer.convert_tokens_to_ids(words[1])  # the model's second word ends its turn
    assert end_of_turn != processor.tokenizer.eos_token_id
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [2, end_of_turn]}))
    cap.load_model.cache_clear()
    try:
        [(text, truncated, _)] = cap.generate(frames, cfg, 8)
    finally:
        cap.load_model.cache_clear()
    # (the stop word is an ordinary word here, so it is decoded; a real end-of-turn token is special and skipped)
    assert text.split() == words[:2] and not truncated
