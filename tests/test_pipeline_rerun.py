"""Re-runs with changed settings: a journal entry is kept only while the stage's output settings and its input
row are what they were (issue 24, item 1)."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd

from data_helpers import make_video
from data_pipeline.__main__ import main
from data_pipeline.config import FilterConfig, RunnerConfig
from data_pipeline.rows import Reject
from data_pipeline.runner import Stage, run_stage
from opensora.data.manifest import read_manifest

SERIAL = RunnerConfig(workers=0, progress=False)


def score_stage(row: dict, cfg: dict) -> list[dict]:
    """Test stage: a score from the row's number and the config's factor."""
    return [{**row, "score": row["n"] * cfg["k"]}]


def gate_stage(row: dict, cfg: FilterConfig) -> list[dict]:
    """Test stage with a real stage config: rejects rows whose score is below ``min_motion``."""
    if row["score"] < cfg.min_motion:
        raise Reject(f"score {row['score']} < {cfg.min_motion}")
    return [row]


def test_changed_output_settings_redo_rows_and_the_change_flows_downstream(tmp_path):
    df = pd.DataFrame({"id": [f"r{i}" for i in range(4)], "path": [f"/v{i}.mp4" for i in range(4)], "n": [0, 1, 2, 3]})
    scored, gated = tmp_path / "1_score.parquet", tmp_path / "2_gate.parquet"

    def run(k: int, gate: FilterConfig):
        first = run_stage(Stage("score", score_stage, {"k": k}), df, scored, SERIAL)
        second = run_stage(Stage("gate", gate_stage, gate), scored, gated, SERIAL)
        return first, second, read_manifest(gated, usable_only=False).set_index("id")["gate_status"].to_dict()

    _, gate, status = run(1, FilterConfig(min_motion=1.0))
    assert (gate.done, gate.rejected) == (3, 1) and status["r0"] == "rejected"
    # A higher threshold redoes every gate row (not 'finished before') and the decisions follow it.
    score, gate, status = run(1, FilterConfig(min_motion=2.5))
    assert (score.resumed, score.redone_settings) == (4, 0)
    assert (gate.resumed, gate.redone_settings, gate.redone_input) == (0, 4, 0)
    assert (gate.done, gate.rejected) == (1, 3) and status == {"r0": "rejected", "r1": "rejected", "r2": "rejected",
                                                                  "r3": "done"}
    assert "redone 4 (settings changed: 4, input changed: 0)" in str(gate)
    # A setting that cannot change the output (the device) redoes nothing; neither do the runner's settings.
    _, gate, _ = run(1, FilterConfig(min_motion=2.5, device="cuda:3"))
    assert (gate.resumed, gate.redone_settings + gate.redone_input) == (4, 0)
    again = run_stage(Stage("gate", gate_stage, FilterConfig(min_motion=2.5)), scored, gated,
                      dataclasses.replace(SERIAL, batch_rows=3))
    assert (again.resumed, again.done) == (4, 0)
    # An earlier stage's change reaches the later one through its input rows: k=2 changes the scores of
    # r1..r3 (r0 stays 0), so the gate redoes exactly those three.
    score, gate, status = run(2, FilterConfig(min_motion=2.5))
    assert score.redone_settings == 4
    assert (gate.resumed, gate.redone_settings, gate.redone_input) == (1, 0, 3)
    assert status == {"r0": "rejected", "r1": "rejected", "r2": "done", "r3": "done"}
    entry = json.loads((tmp_path / "2_gate.parquet.journal.jsonl").read_text().splitlines()[-1])
    assert set(entry["fingerprint"]) == {"settings", "row"}


def test_a_journal_without_fingerprints_is_redone(tmp_path):
    """An entry written before fingerprints existed says nothing about its settings: the row is redone."""
    df = pd.DataFrame({"id": ["a"], "path": ["/a.mp4"], "n": [1]})
    out = tmp_path / "s.parquet"
    (tmp_path / "s.parquet.journal.jsonl").write_text(json.dumps(
        {"id": "a", "status": "done", "error": None, "rows": [{"id": "a", "path": "/a.mp4", "n": 1, "score": 99}]}) + "\n")
    summary = run_stage(Stage("score", score_stage, {"k": 1}), df, out, SERIAL)
    assert (summary.resumed, summary.redone_settings, summary.done) == (0, 1, 1)
    assert read_manifest(out)["score"].tolist() == [1]


def test_pipeline_rerun_with_a_higher_min_motion_redoes_filter_then_nothing(tmp_path, capsys):
    """The 'done means' of issue 24: run, re-run with a higher filter.min_motion (filter redone, its summary
    says why, the final manifest follows), then an identical run that redoes nothing."""
    make_video(tmp_path / "in" / "fast.mp4", [40], size=(64, 48))
    make_video(tmp_path / "in" / "still.mp4", [40], size=(64, 48), moving=False)
    (tmp_path / "run.yaml").write_text(
        f"input: {tmp_path / 'in'}\nwork_dir: {tmp_path / 'w'}\nstages: [probe, split, filter]\n"
        "runner: {workers: 0, progress: false}\nsplit: {min_clip_s: 0.5}\nfilter: {blank_std: 0.0}\n")
    config = ["run", "--config", str(tmp_path / "run.yaml")]
    assert main(config) == 0
    first = capsys.readouterr().err
    assert len(read_manifest(tmp_path / "w" / "manifest.parquet")) == 2
    motion = read_manifest(tmp_path / "w" / "02_filter.parquet").set_index("path")["motion"]
    threshold = (motion.max() + motion.min()) / 2

    assert main(config + ["--set", f"filter.min_motion={threshold}"]) == 0
    second = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("probe:", "split:", "filter:"))]
    assert "finished before: 2" in second[0] and "redone 0" in second[0], second
    assert "finished before: 2" in second[1] and "redone 0" in second[1], second
    assert "redone 2 (settings changed: 2, input changed: 0)" in second[2] and "rejected 1" in second[2], second
    assert len(read_manifest(tmp_path / "w" / "manifest.parquet")) == 1

    assert main(config + ["--set", f"filter.min_motion={threshold}"]) == 0
    third = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("probe:", "split:", "filter:"))]
    assert all("redone 0" in line and "finished before: 2" in line for line in third), third
    assert "redone" in first
