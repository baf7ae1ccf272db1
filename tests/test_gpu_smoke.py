"""scripts/gpu_smoke.sh in its reduced CPU mode: every check runs, the table and smoke.json come out, a check
that hangs is a FAIL with its time limit (not a hung run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_script_runs_every_check_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh"), str(tmp_path), "--cpu"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["mode"] == "cpu"
    by_check: dict[str, list[dict]] = {}
    for r in report["rows"]:
        by_check.setdefault(r["check"], []).append(r)
    from tools.gpu_smoke import CHECKS

    assert set(by_check) == set(CHECKS)
    # On a CPU the GPU tests are collected and skipped: each is listed, none is silently missing.
    collect = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p",
                              "no:cacheprovider", str(ROOT / "tests")], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    collected = [line.split("::", 1)[1] for line in collect.stdout.splitlines() if "::" in line]
    assert len(collected) >= 15, collect.stdout[-2000:]
    assert sorted(r["name"] for r in by_check["gpu-tests"]) == sorted(collected)
    assert {r["status"] for r in by_check["gpu-tests"]} == {"SKIP"}
    for name in set(CHECKS) - {"gpu-tests"}:
        assert [r["status"] for r in by_check[name]] == ["PASS"] * len(by_check[name]), by_check[name]
    kernels = by_check["attention"][0]["figures"]["kernels"]
    assert any("scaled_dot_product" in k for k in kernels)
    assert by_check["benchmark"][0]["figures"]["samples_per_s"] > 0
    assert "passed, 0 failed" in proc.stdout


def test_a_check_past_its_time_limit_fails_and_the_run_goes_on(tmp_path, monkeypatch):
    from tools import gpu_smoke

    monkeypatch.setitem(gpu_smoke.LIMITS, "benchmark", (1, 1))  # far less than the child needs to start
    rows = gpu_smoke.run_all(tmp_path, cpu=True, only=["benchmark"])
    assert [r["status"] for r in rows] == ["FAIL"] and "timed out after 1 s" in rows[0]["figures"]["error"]
    assert "1 failed" in gpu_smoke.format_table(rows)
