"""tools/sample.py over a prompt list: resume (nothing finished is rewritten, also after kill -9), the summary,
failed prompts, the long-prompt warning and the refusal to resume with other settings."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import decord
import numpy as np
import pytest

from opensora.bundle import load_bundle
from tools import init_checkpoint, sample

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"a {c} circle moving {d}" for c in ("red", "green", "blue") for d in ("left", "up")]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    assert init_checkpoint.main(["--model", "STDiT-debug", "--out", str(out), "--vae", "identity",
                                 "--diffusion", "rflow"]) == 0
    return out


def argv(bundle_dir, out, prompt_file, *extra):
    return ["--ckpt", str(bundle_dir), "--prompt-file", str(prompt_file), "--num-frames", "4", "--height", "32",
            "--width", "32", "--steps", "3", "--cfg-scale", "3.0", "--seed", "3", "--crf", "0", "--out", str(out),
            "--no-progress", *extra]


def prompt_file(tmp_path, prompts) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\n" + "\n".join(prompts) + "\n")
    return path


def stats(out: Path) -> dict:
    """name -> (inode, mtime_ns) of every finished mp4 (not the hidden temporaries of unfinished ones, which
    pathlib's glob also matches): a rewrite (atomic rename) changes the inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.mp4") if not p.name.startswith(".")}


def decode(path):
    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy()


def test_rerun_skips_finished_videos_and_samples_the_rest(bundle_dir, tmp_path, capsys):
    pf, out = prompt_file(tmp_path, PROMPTS[:3]), tmp_path / "out"
    assert sample.main(argv(bundle_dir, out, pf)) == 0
    reference = decode(out / "001_a-red-circle-moving-up.mp4")
    (out / "001_a-red-circle-moving-up.mp4").unlink()  # as if the run had been killed while writing it ...
    stale = out / ".001_a-red-circle-moving-up.mp4.4242-0a0b0c0d.tmp.mp4"  # ... leaving its temporary behind
    stale.write_bytes(b"half a video")
    before = stats(out)
    capsys.readouterr()
    assert sample.main(argv(bundle_dir, out, pf)) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "wrote 1 video(s)" in text and "skipped 2 finished" in text
    assert not stale.exists() and "removed 1 half-written video(s)" in captured.err
    after = stats(out)
    assert {k: after[k] for k in before} == before  # nothing finished was rewritten
    assert np.array_equal(decode(out / "001_a-red-circle-moving-up.mp4"), reference)
    rows = (out / "prompts.tsv").read_text().splitlines()[1:]
    assert [r.split("\t")[1] for r in rows] == PROMPTS[:3]  # the index lists finished videos of both runs


def test_partly_finished_batch_resamples_with_its_batch_noise(bundle_dir, tmp_path):
    # With --batch-size 2 a video's noise is its row of the batch's draw: re-run, the missing video of a batch
    # whose other video is finished must come out as it would have in the first run.
    pf, out = prompt_file(tmp_path, PROMPTS[:4]), tmp_path / "out"
    assert sample.main(argv(bundle_dir, out, pf, "--batch-size", "2")) == 0
    name = "003_a-green-circle-moving-up.mp4"
    reference = decode(out / name)
    (out / name).unlink()
    assert sample.main(argv(bundle_dir, out, pf, "--batch-size", "2")) == 0
    assert np.array_equal(decode(out / name), reference)


def test_rerun_with_other_settings_is_refused(bundle_dir, tmp_path):
    pf, out = prompt_file(tmp_path, PROMPTS[:1]), tmp_path / "out"
    assert sample.main(argv(bundle_dir, out, pf)) == 0
    with pytest.raises(SystemExit, match=r"other settings \(steps: 3 -> 4\)"):
        sample.main(argv(bundle_dir, out, pf, "--steps", "4"))
    assert sample.main(argv(bundle_dir, out, pf, "--sp-size", "1")) == 0  # how it is split is no setting


def test_summary_prices_each_video_at_the_given_rate(bundle_dir, tmp_path, capsys):
    pf, out = prompt_file(tmp_path, PROMPTS[:2]), tmp_path / "out"
    assert sample.main(argv(bundle_dir, out, pf, "--price", "3.6")) == 0
    text = capsys.readouterr().out
    m = re.search(r"in ([\d.]+) s;.*\n([\d.]+) s/video, ([\d.]+) CPU-s/video, \$([\d.]+)/video at \$3.60/GPU-hour",
                  text)
    assert m, text
    elapsed, per_video, gpu_s, dollars = map(float, m.groups())
    assert per_video == pytest.approx(elapsed / 2, abs=0.01)
    assert dollars == pytest.approx(gpu_s / 1000, abs=1e-4)  # 3.6 $/h = 0.001 $/s


def test_a_failing_prompt_is_counted_and_the_rest_written(bundle_dir, tmp_path, capsys, monkeypatch):
    from opensora.bundle import Bundle

    real = Bundle.generate

    def generate(self, prompts, *a, **kw):
        if "green" in prompts[0]:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, prompts, *a, **kw)

    monkeypatch.setattr(Bundle, "generate", generate)
    pf, out = prompt_file(tmp_path, PROMPTS[:4]), tmp_path / "out"
    assert sample.main(argv(bundle_dir, out, pf)) == 1
    captured = capsys.readouterr()
    assert "wrote 2 video(s)" in captured.out and "failed 2" in captured.out
    assert "prompt 2 ('a green circle moving left'): RuntimeError: CUDA out of memory" in captured.err
    assert sorted(p.name[:3] for p in out.glob("*.mp4")) == ["000", "001"]


def test_long_prompt_warns_with_the_tokens_dropped(bundle_dir, tmp_path, capsys):
    bundle = load_bundle(bundle_dir)
    long = " ".join(["red circle"] * 20)
    n_tokens = len(bundle.text_encoder.tokenizer(long)["input_ids"])
    limit = bundle.text_encoder.max_length
    assert n_tokens > limit
    pf, out = prompt_file(tmp_path, [PROMPTS[0], long]), tmp_path / "out"
    assert sample.main(argv(bundle_dir, out, pf)) == 0
    err = capsys.readouterr().err
    assert f"prompt 1 is {n_tokens} tokens, the text encoder keeps {limit}: {n_tokens - limit} token(s) dropped" in err
    assert "prompt 0 " not in err


@pytest.mark.slow
def test_kill_9_mid_list_then_rerun_finishes_the_rest_and_rewrites_nothing(bundle_dir, tmp_path):
    prompts = [f"a shape number {i} moving left" for i in range(12)]
    pf, out = prompt_file(tmp_path, prompts), tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "tools" / "sample.py"), *argv(bundle_dir, out, pf, "--steps", "20")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*.mp4"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = stats(out)
    assert 2 <= len(before) < len(prompts), "the run was not stopped mid-list"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    after = stats(out)
    assert len(after) == len(prompts)
    assert {k: after[k] for k in before} == before
    assert f"skipped {len(before)} finished" in done.stdout
    assert not list(out.glob(".*")), "a half-written video of the killed run was left behind"
