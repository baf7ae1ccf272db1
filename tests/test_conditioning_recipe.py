"""The recipe's `conditioning` field (issue 16) reaches the trainer's step; a stage's own block replaces it.

Kept apart from tests/test_conditioning.py because it needs the field in opensora/training/config.py and the
keyword in opensora/training/trainer.py. Uses tests/test_training.py's clips and recipe (STDiT-debug, identity VAE).
"""

from __future__ import annotations

import pytest

from opensora.config import ConfigError
from opensora.distributed import init_distributed
from opensora.training import load_recipe, run_recipe
from tests.test_training import manifest, metrics, write_recipe  # noqa: F401  (manifest is a fixture)


def _losses(tmp_path, manifest, name, overrides, stage_block=None):
    path = write_recipe(tmp_path, manifest, steps0=2)
    if stage_block is not None:  # a conditioning block of the first stage ("short")
        path.write_text(path.read_text().replace("    init: {vae: identity, text_encoder: tiny}\n",
                                                 f"    init: {{vae: identity, text_encoder: tiny}}\n"
                                                 f"    conditioning: {stage_block}\n", 1))
    recipe = load_recipe(path, ["diffusion=rflow", *overrides])
    run = tmp_path / name
    assert run_recipe(recipe, run, init_distributed(), only_stage="short") == "finished"
    return [metrics(run, "short")[s]["loss"] for s in (1, 2)]


# Conditioning on but never firing: the same draws from the step's generator as any conditioning (a fixed number
# per step, whatever the probabilities), then no frame given. Plain training draws none, so its timesteps and noise
# differ and its losses would differ from conditioned ones even if the masks were ignored.
NEVER = "1.0e-12"


def test_recipe_conditioning_reaches_the_step_and_a_stage_block_replaces_it(tmp_path, manifest):
    never = _losses(tmp_path, manifest, "never", [f"conditioning.first_frame={NEVER}"])
    first = _losses(tmp_path, manifest, "first", ["conditioning.first_frame=1.0"])
    # a fresh model predicts zero velocity, so step 1's loss is the mean of (x0 - noise)^2 over the generated
    # frames: with the same x0 and noise, frame 1 of 2 instead of both
    assert first[0] != pytest.approx(never[0], rel=1e-4), "the masks changed what the loss measured"
    # the stage's block replaces the recipe's (not merged key by key: first_frame would stay 1.0)
    stage_off = _losses(tmp_path, manifest, "stage_off", ["conditioning.first_frame=1.0"],
                        stage_block=f"{{last_frame: {NEVER}}}")
    assert stage_off == never
    stage_on = _losses(tmp_path, manifest, "stage_on", [], stage_block="{first_frame: 1.0}")
    assert stage_on == first


def test_recipe_conditioning_errors_name_the_key(tmp_path, manifest):
    path = write_recipe(tmp_path, manifest)
    with pytest.raises(ConfigError, match=r"conditioning.first_frame: a probability must be in \[0, 1\]"):
        load_recipe(path, ["conditioning.first_frame=2"])
    with pytest.raises(ConfigError, match="conditioning.first_fram"):
        load_recipe(path, ["conditioning.first_fram=0.5"])
