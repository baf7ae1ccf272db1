"""Errors of the set-up, not of a row, stop the stage instead of failing every row for good; a stage that fails
most of its rows exits non-zero (issue 24, item 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from data_helpers import make_video
from data_pipeline.__main__ import main
from data_pipeline.config import CaptionConfig, FilterConfig, RunnerConfig
from data_pipeline.pipeline import make_stage
from data_pipeline.runner import Stage, SystemicError, run_stage
from opensora.data.manifest import read_manifest

SERIAL = RunnerConfig(workers=0, progress=False)


def _journal(output: Path) -> list[dict]:
    path = Path(f"{output}.journal.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _clips(tmp_path: Path, n: int) -> pd.DataFrame:
    make_video(tmp_path / "clip.mp4", [30])
    return pd.DataFrame({"id": [f"c{i}" for i in range(n)], "path": [str(tmp_path / "clip.mp4")] * n,
                         "num_frames": [30] * n, "fps": [24.0] * n})


@pytest.mark.parametrize("workers", [0, 2])
def test_a_missing_caption_model_stops_the_stage_and_journals_no_row(tmp_path, workers):
    df = _clips(tmp_path, 6)
    out = tmp_path / "cap.parquet"
    cfg = CaptionConfig(model=str(tmp_path / "no-such-model"), use_existing=False, batch_size=2, task_batches=1)
    stage = make_stage("caption", cfg, out)
    with pytest.raises(SystemicError, match="caption model folder not found"):
        run_stage(stage, df, out, RunnerConfig(workers=workers, progress=False, batch_rows=2))
    assert _journal(out) == [] and not out.exists()  # nothing journaled failed: a fixed re-run does every row


def test_a_hub_id_for_the_aesthetic_model_is_a_setup_error_not_a_download(tmp_path, monkeypatch):
    """A name that is no local folder stops filter; nothing is looked up on a model hub."""
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError(f"from_pretrained called with {args} {kwargs}")

    monkeypatch.setattr(transformers.CLIPVisionModelWithProjection, "from_pretrained", no_hub)
    df = _clips(tmp_path, 3)
    out = tmp_path / "f.parquet"
    stage = make_stage("filter", FilterConfig(aesthetic_model="openai/clip-vit-large-patch14"), out)
    with pytest.raises(SystemicError, match="aesthetic model folder not found: openai/clip-vit-large-patch14"):
        run_stage(stage, df, out, SERIAL)
    assert _journal(out) == []


def test_aesthetic_model_loads_local_files_only(tmp_path, monkeypatch):
    """A folder that exists but lacks the model is loaded with local_files_only and stops the stage."""
    import transformers

    seen = {}

    def record(*args, **kwargs):
        seen.update(kwargs)
        raise OSError("no config.json in the folder")

    monkeypatch.setattr(transformers.CLIPVisionModelWithProjection, "from_pretrained", record)
    (tmp_path / "empty-model").mkdir()
    df = _clips(tmp_path, 2)
    out = tmp_path / "f.parquet"
    with pytest.raises(SystemicError, match="aesthetic model .* could not be loaded: OSError"):
        run_stage(make_stage("filter", FilterConfig(aesthetic_model=str(tmp_path / "empty-model")), out), df, out,
                  SERIAL)
    assert seen.get("local_files_only") is True and _journal(out) == []


def cuda_broken_stage(row: dict, cfg: dict) -> list[dict]:
    """Test stage: the first ``cfg['ok']`` rows (by number) pass, then the CUDA context is gone."""
    if row["n"] >= cfg["ok"]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...")
    return [row]


def oom_stage(row: dict, cfg: dict) -> list[dict]:
    """Test stage: out of memory on every row (the row's, e.g. a clip too large for the batch)."""
    raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_a_broken_cuda_context_stops_the_stage_but_out_of_memory_is_the_rows(tmp_path):
    df = pd.DataFrame({"id": [f"r{i}" for i in range(5)], "path": [f"/v{i}" for i in range(5)], "n": range(5)})
    out = tmp_path / "g.parquet"
    with pytest.raises(SystemicError, match="CUDA context is broken"):
        run_stage(Stage("gpu", cuda_broken_stage, {"ok": 2}), df, out, SERIAL)
    assert [e["id"] for e in _journal(out)] == ["r0", "r1"]  # what finished stays; the rest is redone
    summary = run_stage(Stage("gpu", oom_stage, {}), df, tmp_path / "o.parquet", SERIAL)
    assert summary.failed == 5


def test_a_stage_failing_most_of_its_rows_exits_non_zero(tmp_path, capsys):
    make_video(tmp_path / "in" / "good.mp4", [30])
    for name in ("bad1.mp4", "bad2.mp4"):
        (tmp_path / "in" / name).write_bytes(b"\x00" * 64)
    args = ["probe", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "p.parquet"), "--workers", "0",
            "--no-progress"]
    assert main(args) == 4
    assert "2 of the 3 rows it ran failed, more than runner.max_failed_share=0.5" in capsys.readouterr().err
    assert len(read_manifest(tmp_path / "p.parquet", usable_only=False)) == 3  # the records are written
    assert main(args + ["--max-failed-share", "1"]) == 0
    # In `run`, the next stage is not started.
    (tmp_path / "run.yaml").write_text(f"input: {tmp_path / 'in'}\nwork_dir: {tmp_path / 'w'}\nstages: [probe, split]\n"
                                       "runner: {workers: 0, progress: false}\n")
    assert main(["run", "--config", str(tmp_path / "run.yaml")]) == 4
    assert not (tmp_path / "w" / "01_split.parquet").exists()
