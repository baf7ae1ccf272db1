"""``opensora.STDiTPipeline`` (the diffusers pipeline over a bundle) against ``tools/sample.py``: the same bundle,
prompt, seed and settings give the same frames; ``diffusers.utils.export_to_video`` writes a readable mp4."""

from __future__ import annotations

import dataclasses

import decord
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import export_to_video

from opensora import STDiTPipeline, pipeline
from opensora.bundle import Bundle, BUNDLE_FILE, load_bundle_config
from opensora.config import to_yaml
from opensora.sampling import write_samples
from tools import init_checkpoint, sample

from test_sampling_parallel import randomize

PROMPT = "a red circle moving left on a blue background"
SETTINGS = dict(num_frames=4, height=32, width=32, num_inference_steps=4, guidance_scale=4.0)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    assert init_checkpoint.main(["--model", "STDiT-debug", "--out", str(out)]) == 0  # tiny SD-VAE, tiny T5
    randomize(out)  # a fresh bundle's zero final layer would make every comparison trivially equal
    return out


@pytest.fixture(scope="module")
def pipe(bundle_dir):
    p = STDiTPipeline.from_pretrained(bundle_dir)
    p.set_progress_bar_config(disable=True)
    return p


def decode(path) -> np.ndarray:
    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr)))).asnumpy()  # (T, H, W, 3) uint8


def test_is_a_diffusion_pipeline_of_the_bundle(pipe):
    assert isinstance(pipe, DiffusionPipeline)
    assert set(pipe.components) == {"transformer", "vae", "text_encoder"}
    assert (pipe.device, pipe.dtype) == (torch.device("cpu"), torch.float32)
    assert pipeline.DEFAULT_NUM_FRAMES == sample.DEFAULT_NUM_FRAMES  # "same settings" includes the defaults


def test_same_frames_as_tools_sample(pipe, bundle_dir, tmp_path, monkeypatch):
    sampled = []  # what tools/sample.py's Bundle.generate returned, before the mp4 encoder
    real = Bundle.generate
    monkeypatch.setattr(Bundle, "generate", lambda self, *a, **k: sampled.append(real(self, *a, **k)) or sampled[-1])
    assert sample.main(["--ckpt", str(bundle_dir), "--prompt", PROMPT, "--num-frames", "4", "--height", "32",
                        "--width", "32", "--steps", "4", "--cfg-scale", "4.0", "--seed", "5", "--crf", "0",
                        "--out", str(tmp_path), "--no-progress"]) == 0
    monkeypatch.undo()
    (video,) = sampled  # (1, 3, T, H, W) in [-1, 1]
    expected = (video * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)  # (1, T, 3, H, W) in [0, 1]

    frames = pipe(PROMPT, seed=5, output_type="pt", **SETTINGS).frames
    torch.testing.assert_close(frames, expected, rtol=0, atol=0)
    fresh = torch.Generator().manual_seed(5)  # diffusers' way of saying seed 5
    torch.testing.assert_close(pipe(PROMPT, generator=fresh, output_type="pt", **SETTINGS).frames, expected,
                               rtol=0, atol=0)
    assert frames.std() > 0.05, "random weights: the video is not flat"
    other = pipe(PROMPT, seed=6, output_type="pt", **SETTINGS).frames
    assert (other - frames).abs().mean() > 0.01, "another seed gives another video"

    # and the file tools/sample.py wrote is the one these frames make through the same writer (lossless H.264;
    # the [0, 1] -> [-1, 1] float round trip may move a value across a uint8 rounding boundary: one level)
    (mp4,) = tmp_path.glob("*.mp4")
    (again,) = write_samples(tmp_path / "pipe", frames.permute(0, 2, 1, 3, 4) * 2 - 1, [PROMPT], fps=8, crf=0)
    written, rewritten = decode(mp4).astype(np.int16), decode(again).astype(np.int16)
    assert written.shape == (4, 32, 32, 3) and np.abs(written - rewritten).max() <= 1


def test_output_types_and_batch(pipe):
    np_out = pipe([PROMPT, "a green square"], seed=1, **SETTINGS).frames
    assert isinstance(np_out, np.ndarray) and np_out.shape == (2, 4, 32, 32, 3) and np_out.dtype == np.float32
    assert 0 <= np_out.min() and np_out.max() <= 1
    pil = pipe([PROMPT, "a green square"], seed=1, output_type="pil", **SETTINGS).frames
    assert len(pil) == 2 and len(pil[0]) == 4 and pil[0][0].size == (32, 32)
    assert np.abs(np.asarray(pil[1][3], dtype=np.float32) / 255 - np_out[1, 3]).max() <= 1 / 255 + 1e-6
    (tup,) = pipe(PROMPT, seed=1, num_videos_per_prompt=2, return_dict=False, **SETTINGS)
    assert tup.shape == (2, 4, 32, 32, 3) and not np.array_equal(tup[0], tup[1])  # own noise in the batch
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(PROMPT, output_type="latent", **SETTINGS)


def test_generator_advances_and_seed_rules(pipe):
    g = torch.Generator().manual_seed(3)
    first = pipe(PROMPT, generator=g, output_type="pt", **SETTINGS).frames
    second = pipe(PROMPT, generator=g, output_type="pt", **SETTINGS).frames  # a loop over one generator
    assert (first - second).abs().mean() > 0.01
    torch.testing.assert_close(first, pipe(PROMPT, seed=3, output_type="pt", **SETTINGS).frames, rtol=0, atol=0)
    with pytest.raises(ValueError, match="either generator or seed"):
        pipe(PROMPT, generator=torch.Generator().manual_seed(0), seed=0, **SETTINGS)
    with pytest.raises(TypeError, match="one generator per prompt"):
        pipe([PROMPT, PROMPT], generator=[torch.Generator(), torch.Generator()], **SETTINGS)


def test_export_to_video_writes_a_readable_mp4(pipe, tmp_path):
    frames = pipe(PROMPT, seed=5, **SETTINGS).frames[0]
    path = export_to_video(frames, str(tmp_path / "out.mp4"), fps=8)
    written = decode(path)
    assert written.shape == (4, 32, 32, 3)
    # a lossy codec, but these frames: closer to them than to another seed's
    other = pipe(PROMPT, seed=6, **SETTINGS).frames[0]
    assert np.abs(written / 255 - frames).mean() < np.abs(written / 255 - other).mean()


def test_save_pretrained_is_a_bundle_that_loads_back(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / BUNDLE_FILE).is_file()
    again = STDiTPipeline.from_pretrained(tmp_path / "saved")
    again.set_progress_bar_config(disable=True)
    torch.testing.assert_close(again(PROMPT, seed=5, output_type="pt", **SETTINGS).frames,
                               pipe(PROMPT, seed=5, output_type="pt", **SETTINGS).frames, rtol=0, atol=0)


def test_other_families_and_missing_dirs_are_refused(bundle_dir, tmp_path):
    wan = dataclasses.replace(load_bundle_config(bundle_dir), family="wan", diffusion="rflow")
    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / BUNDLE_FILE).write_text(to_yaml(wan))
    with pytest.raises(ValueError, match="tools/export_diffusers.py"):
        STDiTPipeline.from_pretrained(tmp_path / "wan")
    with pytest.raises(FileNotFoundError, match="not found"):
        STDiTPipeline.from_pretrained(tmp_path / "no-such-bundle")


@pytest.mark.parametrize("sampler", ["iddpm", "rflow"])
def test_callback_on_step_end_sees_every_step_and_may_replace_the_latents(pipe, sampler):
    """diffusers' ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict``: once per step, in order,
    with the latents; a callback that returns its kwargs untouched changes no frame; returned latents are used."""
    plain = pipe(PROMPT, seed=5, sampler=sampler, output_type="pt", **SETTINGS).frames
    calls = []

    def watch(p, step, timestep, callback_kwargs):
        assert p is pipe and set(callback_kwargs) == {"latents"}
        calls.append((step, timestep, callback_kwargs["latents"].clone()))
        return callback_kwargs

    watched = pipe(PROMPT, seed=5, sampler=sampler, output_type="pt", callback_on_step_end=watch, **SETTINGS).frames
    torch.testing.assert_close(watched, plain, rtol=0, atol=0)
    steps = SETTINGS["num_inference_steps"]
    assert [s for s, _, _ in calls] == list(range(steps))
    timesteps = [t for _, t, _ in calls]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == steps, "from noise to data"
    bundle = pipe.bundle
    channels = bundle.family.in_channels(bundle.family.config_of(bundle.model))
    latent = (1, channels, *bundle.latent_size(4, 32, 32))  # (B, C, T', h, w)
    assert all(tuple(z.shape) == latent for _, _, z in calls)
    assert not torch.equal(calls[0][2], calls[-1][2])

    def zero_last(p, step, timestep, callback_kwargs):  # the last latents replaced: the decoder gets zeros
        z = callback_kwargs["latents"]
        return {"latents": torch.zeros_like(z) if step == steps - 1 else z}

    zeroed = pipe(PROMPT, seed=5, sampler=sampler, output_type="pt", callback_on_step_end=zero_last, **SETTINGS).frames
    decoded = bundle.decode(torch.zeros(latent)).float().clamp(-1, 1)  # (1, 3, T, H, W)
    torch.testing.assert_close(zeroed, (decoded * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4), rtol=0, atol=0)
    assert (zeroed - plain).abs().mean() > 0.01


def test_callback_tensor_inputs_are_checked(pipe):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(PROMPT, callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["prompt_embeds"],
             **SETTINGS)
    with pytest.raises(ValueError, match="returned"):  # a mistyped key would otherwise be ignored silently
        pipe(PROMPT, callback_on_step_end=lambda p, s, t, kw: {"latent": kw["latents"]}, **SETTINGS)
