"""tools/sample.py under torchrun on 2 gloo ranks vs one process: Ulysses SP, CFG-parallel and prompt-parallel
sampling give the same videos (lossless mp4s, decoded), written once each into one folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import decord
import numpy as np
import pytest
import torch

from opensora.bundle import load_bundle_model
from opensora.distributed.sequence_parallel import SamplingLayout
from tools import init_checkpoint, sample

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a red circle moving left", "a green square moving up", "a blue dot moving right"]


def randomize(bundle: Path, seed: int = 0) -> None:
    """Every weight random: a fresh bundle's zero final layer predicts 0, and any split would 'agree'."""
    model = load_bundle_model(bundle)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(bundle / "model")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    # the tiny per-frame SD-VAE: its decode is split over the ranks of a group
    assert init_checkpoint.main(["--model", "STDiT-debug", "--out", str(out)]) == 0
    randomize(out)
    return out


def sample_argv(bundle_dir, out, *extra, prompts=PROMPTS):
    argv = ["--ckpt", str(bundle_dir), "--num-frames", "4", "--height", "32", "--width", "32", "--steps", "4",
            "--cfg-scale", "4.0", "--seed", "5", "--crf", "0", "--out", str(out), "--no-progress", *extra]
    for p in prompts:
        argv += ["--prompt", p]
    return argv


def torchrun(*argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tools" / "sample.py"), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def videos(out: Path) -> dict[str, np.ndarray]:
    def decode(path):
        vr = decord.VideoReader(str(path))
        return vr.get_batch(list(range(len(vr)))).asnumpy().astype(np.int16)

    return {p.name: decode(p) for p in sorted(out.glob("*.mp4"))}


@pytest.fixture(scope="module")
def reference(bundle_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    assert sample.main(sample_argv(bundle_dir, out)) == 0
    return out


def test_layout_splits_the_world_into_video_groups():
    # 8 ranks, SP 2, CFG split: 2 video groups of 4 consecutive ranks; rank 5 = group 1, unconditional, slice 1
    assert SamplingLayout.build(8, 5, sp_size=2, cfg_parallel=True) == SamplingLayout(2, 1, 2, 0, 2, 1)
    assert SamplingLayout.build(8, 4, sp_size=2, cfg_parallel=True).is_owner
    assert not SamplingLayout.build(8, 6, sp_size=2, cfg_parallel=True).is_owner  # the unconditional pass
    with pytest.raises(ValueError, match=r"--sp-size 3 must divide the number of ranks \(8\)"):
        SamplingLayout.build(8, 0, sp_size=3)
    with pytest.raises(ValueError, match="x 2 \\(--cfg-parallel\\)"):
        SamplingLayout.build(2, 0, sp_size=2, cfg_parallel=True)


def assert_same_videos(a: Path, b: Path, atol: int) -> None:
    va, vb = videos(a), videos(b)
    assert list(va) == list(vb) and len(va) == len(PROMPTS)
    for name in va:
        diff = np.abs(va[name] - vb[name])
        # parallel sums in another order differ in the last float bits; one 8-bit level at most, rarely
        assert diff.max() <= atol and diff.mean() < 0.01, (name, diff.max(), diff.mean())
    assert (b / "prompts.tsv").read_text() == (a / "prompts.tsv").read_text()
    assert not [p for p in b.iterdir() if p.name.startswith(".")]  # no temporary files left behind


@pytest.mark.slow
def test_two_ranks_split_the_prompts_and_write_what_one_process_writes(bundle_dir, reference, tmp_path):
    proc = torchrun(*sample_argv(bundle_dir, tmp_path / "dp"))
    assert "2 prompt group(s) x cfg 1 x sp 1" in proc.stdout and "wrote 3 video(s)" in proc.stdout
    assert_same_videos(reference, tmp_path / "dp", atol=0)  # the same computation, only elsewhere


@pytest.mark.slow
def test_sequence_parallel_sampling_equals_one_process(bundle_dir, reference, tmp_path):
    proc = torchrun(*sample_argv(bundle_dir, tmp_path / "sp", "--sp-size", "2"))
    assert "1 prompt group(s) x cfg 1 x sp 2" in proc.stdout
    assert_same_videos(reference, tmp_path / "sp", atol=1)


@pytest.mark.slow
def test_cfg_parallel_sampling_equals_one_process(bundle_dir, reference, tmp_path):
    proc = torchrun(*sample_argv(bundle_dir, tmp_path / "cfg", "--cfg-parallel"))
    assert "1 prompt group(s) x cfg 2 x sp 1" in proc.stdout
    assert_same_videos(reference, tmp_path / "cfg", atol=1)


def test_sequence_parallel_is_refused_where_it_cannot_run(bundle_dir, tmp_path):
    with pytest.raises(SystemExit, match=r"--sp-size 2 must divide the number of ranks \(1\)"):
        sample.main(sample_argv(bundle_dir, tmp_path, "--sp-size", "2"))
    with pytest.raises(SystemExit, match="--cfg-parallel needs guidance"):
        sample.main(sample_argv(bundle_dir, tmp_path, "--cfg-parallel", "--cfg-scale", "1"))
