"""The sampler's step cache (``--cache``, opensora.sampling.StepCache): threshold 0 changes nothing, a larger one
skips model calls between the first and the last step, and sampling with it works for every model family."""

from __future__ import annotations

import pytest
import torch

from opensora.bundle import load_bundle, load_bundle_config
from opensora.sampling import StepCache
from tools import init_checkpoint, sample

from test_sampling_parallel import randomize

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    assert init_checkpoint.main(["--model", "STDiT-debug", "--out", str(out), "--vae", "identity",
                                 "--diffusion", "rflow"]) == 0
    randomize(out)
    return load_bundle(out)


def generate(bundle, cache=None, steps=10):
    return bundle.generate([PROMPT], 4, 32, 32, steps=steps, cfg_scale=4.0, seed=2, progress=False, cache=cache)


def test_threshold_zero_computes_every_step_and_changes_nothing(bundle):
    cache = StepCache(0.0)
    torch.testing.assert_close(generate(bundle, cache), generate(bundle), rtol=0, atol=0)
    assert (cache.calls, cache.skipped) == (10, 0)


def test_a_large_threshold_runs_only_the_first_and_last_steps(bundle):
    cache, calls = StepCache(1e9), []
    real = bundle.family.model_fn

    def counting(model):  # what actually reaches the model
        fn = real(model)
        return lambda *a, **kw: calls.append(1) or fn(*a, **kw)

    bundle.family.model_fn = counting
    try:
        cached = generate(bundle, cache)
    finally:
        del bundle.family.model_fn  # the class's method again
    assert (cache.calls, cache.skipped, len(calls)) == (10, 8, 2)
    assert cache.skipped_share == pytest.approx(0.8)
    assert torch.isfinite(cached).all() and not torch.equal(cached, generate(bundle))


def test_skips_follow_the_accumulated_input_change(bundle):
    # A threshold between the smallest and the largest per-step change skips some steps, not all.
    cache = StepCache(0.05)
    generate(bundle, cache, steps=20)
    assert 0 < cache.skipped < 18, (cache.calls, cache.skipped)


def test_negative_threshold_is_refused():
    with pytest.raises(ValueError, match="cache threshold must be >= 0"):
        StepCache(-0.1)


@pytest.mark.parametrize("model", ["STDiT-debug", "tiny-wan2.1", "tiny-ltx"])
def test_cached_sampling_works_for_every_family(model, tmp_path, capsys):
    init_checkpoint.main(["--model", model, "--out", str(tmp_path / "b")])
    family = load_bundle_config(tmp_path / "b").family
    frames = {"stdit": "4", "wan": "5", "ltx": "9"}[family]
    argv = ["--ckpt", str(tmp_path / "b"), "--prompt", PROMPT, "--num-frames", frames, "--height", "32",
            "--width", "32", "--steps", "6", "--cache", "1e9", "--out", str(tmp_path / "v"), "--no-progress"]
    assert sample.main(argv) == 0
    assert "): 4 of 6 model calls skipped (67%)" in capsys.readouterr().out  # all but the first and the last
    assert len(list((tmp_path / "v").glob("*.mp4"))) == 1
