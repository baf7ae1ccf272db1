"""tools/export_diffusers.py (issue 31): a bundle of a diffusers family becomes the family's own pipeline folder,
which ``DiffusionPipeline.from_pretrained`` loads and samples; a LoRA stage's adapters load on the base pipeline
with ``load_lora_weights``. Tiny random parts (tools/init_checkpoint.py's tiny-wan2.1 / tiny-ltx), built in the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    DiffusionPipeline, FlowMatchEulerDiscreteScheduler, LTXPipeline, UniPCMultistepScheduler, WanPipeline,
)

from opensora.bundle import load_bundle
from opensora.config import ConfigError
from opensora.diffusers_export import LORA_SUBFOLDER
from opensora.models.families import FAMILIES
from opensora.models.lora import LORA_WEIGHTS_NAME
from tests.test_training import manifest  # noqa: F401  (manifest is a fixture)
from tools import export_diffusers, init_checkpoint

PROMPT = "a red square moving left"


def _bundle(tmp_path: Path, size: str) -> Path:
    out = tmp_path / size
    assert init_checkpoint.main(["--model", size, "--out", str(out)]) == 0
    return out


def _export(bundle: Path, out: Path) -> Path:
    assert export_diffusers.main(["--bundle", str(bundle), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("size, pipeline_cls, scheduler_cls, frames, side", [
    ("tiny-wan2.1", WanPipeline, UniPCMultistepScheduler, 5, 16),
    ("tiny-ltx", LTXPipeline, FlowMatchEulerDiscreteScheduler, 9, 32),
])
def test_export_loads_as_the_familys_pipeline_with_its_published_scheduler_and_makes_frames(
        tmp_path, size, pipeline_cls, scheduler_cls, frames, side):
    bundle = _bundle(tmp_path, size)
    pipe = DiffusionPipeline.from_pretrained(str(_export(bundle, tmp_path / "diffusers")))
    assert type(pipe) is pipeline_cls and type(pipe.scheduler) is scheduler_cls
    family = FAMILIES[load_bundle(bundle, device="cpu").config.family]
    config = pipe.scheduler.config
    if size == "tiny-wan2.1":  # Wan2.1-T2V-*-Diffusers' scheduler_config.json
        assert (config.prediction_type, config.use_flow_sigmas, config.flow_shift) == ("flow_prediction", True, 3.0)
    else:  # convert_ltx_to_diffusers.py's
        assert (config.use_dynamic_shifting, config.base_shift, config.max_shift, config.base_image_seq_len,
                config.max_image_seq_len, config.shift_terminal) == (True, 0.95, 2.05, 1024, 4096, 0.1)
    ours = load_bundle(bundle, device="cpu").model.state_dict()
    theirs = pipe.transformer.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    video = pipe(PROMPT, num_frames=frames, height=side, width=side, num_inference_steps=2, output_type="pt",
                 guidance_scale=family.sampler.cfg_scale, generator=torch.Generator().manual_seed(0)).frames
    assert video.shape == (1, frames, 3, side, side) and torch.isfinite(video).all()  # (B, T, C, H, W) in [0, 1]


def test_the_exported_wan_pipeline_samples_what_our_sampler_samples(tmp_path):
    """With diffusers' Euler scheduler in place of UniPC, the exported pipeline draws the same noise, encodes the
    prompt and the empty negative prompt alike, guides alike and decodes with the same latent statistics as
    ``Bundle.generate``: the videos agree up to the schedules' last step (diffusers stops at its shifted
    sigma_min, ours at 0), where a sign, scale or normalisation error would be far off."""
    bundle = _bundle(tmp_path, "tiny-wan2.1")
    pipe = DiffusionPipeline.from_pretrained(str(_export(bundle, tmp_path / "diffusers")))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=FAMILIES["wan"].sampler.shift.shift)
    ours = load_bundle(bundle, device="cpu").generate([PROMPT], 5, 16, 16, steps=3, cfg_scale=5.0, seed=0,
                                                      sampler="rflow", progress=False)  # (B, C, T, H, W) in [-1, 1]
    theirs = pipe(PROMPT, num_frames=5, height=16, width=16, num_inference_steps=3, guidance_scale=5.0,
                  output_type="pt", generator=torch.Generator().manual_seed(0)).frames
    theirs = theirs.permute(0, 2, 1, 3, 4) * 2 - 1
    assert ours.std() > 0.05
    torch.testing.assert_close(theirs, ours, atol=0.05, rtol=0)


def test_a_lora_stages_adapters_load_on_the_base_pipeline_and_give_the_merged_export(tmp_path, manifest):
    from opensora.training import load_recipe, run_recipe
    from opensora.distributed import init_distributed
    from tests.test_family_training import lora_recipe

    path = lora_recipe(tmp_path, manifest, steps=3)
    path.write_text(path.read_text().replace("lr: 1.0e-3", "lr: 3.0e-2"))  # adapters that visibly move in 3 steps
    run = tmp_path / "run"
    assert run_recipe(load_recipe(path), run, init_distributed()) == "finished"
    base = DiffusionPipeline.from_pretrained(str(_export(run / "wan" / "init", tmp_path / "base")))
    tuned_dir = _export(run / "wan" / "export", tmp_path / "tuned")
    assert (tuned_dir / LORA_SUBFOLDER / LORA_WEIGHTS_NAME).is_file()
    assert not (tuned_dir / LORA_WEIGHTS_NAME).exists(), "not where load_lora_weights(DIR) would apply it twice"
    tuned = DiffusionPipeline.from_pretrained(str(tuned_dir))

    def video(pipe):
        return pipe(PROMPT, num_frames=5, height=16, width=16, num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).frames

    before = video(base)
    base.load_lora_weights(str(tuned_dir / LORA_SUBFOLDER))
    after = video(base)
    merged = video(tuned)
    assert (after - before).abs().max() > 1e-3, "the LoRA changes the output"
    torch.testing.assert_close(after, merged, atol=1e-4, rtol=0)  # base + adapters = the merged export


def test_refusals_name_the_reason(tmp_path):
    stdit = tmp_path / "stdit"
    assert init_checkpoint.main(["--model", "STDiT-debug", "--out", str(stdit)]) == 0
    with pytest.raises(SystemExit, match="no diffusers pipeline"):
        export_diffusers.main(["--bundle", str(stdit), "--out", str(tmp_path / "x")])
    bundle = _bundle(tmp_path, "tiny-wan2.1")
    text = (bundle / "bundle.yaml").read_text()
    (bundle / "bundle.yaml").write_text(text.replace("max_length: 512", "max_length: 64"))
    with pytest.raises(ConfigError, match="pads to 64 tokens"):
        from opensora.diffusers_export import export_diffusers as export

        export(bundle, tmp_path / "y")
    (bundle / "bundle.yaml").write_text(text)
    (tmp_path / "exists").mkdir()
    with pytest.raises(SystemExit, match="exists"):
        export_diffusers.main(["--bundle", str(bundle), "--out", str(tmp_path / "exists")])
    assert not list(tmp_path.glob(".*partial")), "no half-written folder left"
