"""The staged trainer, validation, the sampler and the ledger on other model families (issue 31): a tiny Wan 2.1
(diffusers WanTransformer3DModel, 2 blocks, D = 32) with the tiny Wan 2.1 VAE (4x8x8, 4 channels) and a tiny UMT5,
all random and built in the test; the 6-frame 16x16 clips of tests/test_training.py (5 frames: 4k + 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from opensora.bundle import load_bundle, load_bundle_config
from opensora.config import ConfigError
from opensora.distributed import DistInfo, ParallelConfig
from opensora.distributed.parallel import parallelize
from opensora.models.families import FAMILIES
from opensora.training import load_recipe, run_recipe
from opensora.distributed import init_distributed
from tests.test_training import manifest  # noqa: F401  (manifest is a fixture)

WAN = FAMILIES["wan"]

RECIPE = """
vae_compression: [4, 8, 8]
vae_latent_channels: 4
diffusion: rflow
seed: 0
data: {{manifest: {manifest}, frame_interval: 1, num_workers: 0}}
parallel: {{engine: {engine}, param_dtype: fp32}}
ema: {{decay: 0.9, warmup: true}}
logging: {{log_every: 1, ckpt_every: {ckpt_every}, keep_checkpoints: 2, tensorboard: false, progress: false}}
accounting: {{price_per_gpu_hour: 1.0, heartbeat_s: 0}}
validation:
  every: {steps}
  prompts: ["a red square moving left"]
  sample_steps: 2
  cfg_scale: 3.0
  metrics: []
stages:
  - name: wan
    model: tiny-wan2.1
    num_frames: 5
    image_size: [16, 16]
    batch_size: 2
    steps: {steps}
    lr: 1.0e-3
    init: {{vae: tiny-wan2.1, text_encoder: tiny}}
"""


def write_recipe(tmp_path: Path, manifest: Path, steps: int = 3, ckpt_every: int = 100, engine: str = "fsdp",
                 extra: str = "") -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(manifest=manifest, steps=steps, ckpt_every=ckpt_every, engine=engine) + extra)
    return path


def test_a_tiny_wan_stage_trains_and_its_validation_sample_is_sample_clis(tmp_path, manifest, monkeypatch):
    import opensora.sampling
    from tools import sample

    written = []  # what validation and tools/sample.py hand to the mp4 writer (the same function for both)
    real = opensora.sampling.write_samples
    monkeypatch.setattr(opensora.sampling, "write_samples",
                        lambda out, videos, prompts, **kw: written.append(videos.clone()) or real(out, videos, prompts, **kw))
    recipe = load_recipe(write_recipe(tmp_path, manifest, steps=3))
    run = tmp_path / "run"
    assert run_recipe(recipe, run, init_distributed()) == "finished"

    rows = [json.loads(x) for x in (run / "wan" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["grad_norm"] > 0 and row["mfu"] > 0 and torch.isfinite(torch.tensor(row["loss"]))
    export = run / "wan" / "export"
    assert load_bundle_config(export).family == "wan" and load_bundle_config(export).diffusion == "rflow"
    init = load_bundle(run / "wan" / "init", device="cpu").model.state_dict()
    trained = load_bundle(export, device="cpu").model.state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init), "the export holds trained weights"

    # The sample validation drew at the last step (EMA weights) is tools/sample.py's on the export, bit for bit.
    assert len(written) == 2  # step 0 and step 3
    assert sample.main(["--ckpt", str(export), "--prompt", "a red square moving left", "--num-frames", "5",
                        "--height", "16", "--width", "16", "--steps", "2", "--cfg-scale", "3.0", "--seed", "0",
                        "--out", str(tmp_path / "samples"), "--no-progress"]) == 0
    assert written[-1].shape == (1, 3, 5, 16, 16)
    assert torch.equal(written[-1], written[1]), "validation at the last step == tools/sample.py on the export"
    assert (tmp_path / "samples" / "000_a-red-square-moving-left.mp4").is_file()


def test_ledger_tokens_and_flops_are_the_familys(tmp_path, manifest):
    from opensora.accounting import read_ledger

    recipe = load_recipe(write_recipe(tmp_path, manifest, steps=1), ["validation.every=0"])
    run = tmp_path / "run"
    assert run_recipe(recipe, run, init_distributed()) == "finished"
    mark = read_ledger(run)[0].marks[-1]
    model = load_bundle(run / "wan" / "init", device="cpu").model
    latent = (2, 2, 2)  # 5x16x16 through the 4x8x8 causal VAE
    assert mark.samples == 2
    assert mark.flops == pytest.approx(2 * WAN.train_flops_per_sample(model.config, latent, 512))
    assert mark.tokens == 2 * WAN.video_tokens(model.config, latent) == 2 * 2


def test_recipe_errors_name_the_family(tmp_path, manifest):
    path = write_recipe(tmp_path, manifest)
    with pytest.raises(ConfigError, match=r"tiny-wan2.1 trains with rflow.*diffusion is 'iddpm'"):
        load_recipe(path, ["diffusion=iddpm"])
    with pytest.raises(ConfigError, match=r"model_overrides apply to STDiT sizes only"):
        load_recipe(path, ["stages.0.model_overrides={class_dropout_prob: 0.2}"])
    with pytest.raises(ConfigError, match=r"unknown STDiT size 'tiny-wan9'.*tiny-wan2.1"):
        load_recipe(path, ["stages.0.model=tiny-wan9"])


def test_sequence_parallelism_is_refused_for_a_family_without_it():
    model = WAN.build("tiny-wan2.1")
    info = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), backend="gloo")
    with pytest.raises(ValueError, match="wan family does not support sequence parallelism"):
        parallelize(model, ParallelConfig(sp_size=2), info, family=WAN)


def test_bundles_without_a_family_load_as_stdit(tmp_path):
    from opensora.training.init import write_random_bundle

    write_random_bundle(tmp_path / "b", "STDiT-debug", "identity", "tiny", "iddpm")
    text = (tmp_path / "b" / "bundle.yaml").read_text()
    assert "family: stdit" in text
    (tmp_path / "b" / "bundle.yaml").write_text(text.replace("family: stdit\n", ""))  # written before families
    bundle = load_bundle(tmp_path / "b", device="cpu")
    assert bundle.family is FAMILIES["stdit"] and type(bundle.model).__name__ == "STDiT"


# -- entry points -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size, frames", [("tiny-wan2.1", 17), ("tiny-ltx", 9)])
def test_init_checkpoint_writes_a_tiny_family_bundle_that_sample_cli_samples(tmp_path, size, frames):
    from opensora.data.video_io import video_info
    from tools import init_checkpoint, sample

    bundle = tmp_path / "bundle"
    assert init_checkpoint.main(["--model", size, "--out", str(bundle)]) == 0
    config = load_bundle_config(bundle)
    assert (config.family, config.diffusion) == ({"tiny-wan2.1": "wan", "tiny-ltx": "ltx"}[size], "rflow")
    args = ["--ckpt", str(bundle), "--prompt", "a blue ball", "--height", "16", "--width", "16", "--steps", "1",
            "--out", str(tmp_path / "out"), "--no-progress"]
    if size == "tiny-ltx":
        args += ["--num-frames", str(frames)]  # its VAE is 8x causal: 8k + 1
    assert sample.main(args) == 0  # tiny Wan: the default 16 frames become 17 (4k + 1)
    assert video_info(tmp_path / "out" / "000_a-blue-ball.mp4")["num_frames"] == frames


def test_init_checkpoint_references_a_pretrained_diffusers_folder(tmp_path):
    from opensora.models.text_encoder import make_tiny_t5, tiny_t5_tokenizer
    from opensora.models.vae import make_tiny_vae
    from tools import init_checkpoint

    pipe = tmp_path / "Wan-tiny-Diffusers"  # the layout of Wan2.1-T2V-1.3B-Diffusers
    WAN.build("tiny-wan2.1").save_pretrained(pipe / "transformer")
    make_tiny_vae(pipe / "vae", kind="wan2.1")
    make_tiny_t5(pipe / "text_encoder", encoder_type="umt5")
    tiny_t5_tokenizer().save_pretrained(pipe / "tokenizer")
    out = tmp_path / "bundle"
    assert init_checkpoint.main(["--model", str(pipe), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bundle.yaml"], "nothing is copied"
    config = load_bundle_config(out)
    assert (config.family, config.model_dir, config.text_encoder.type) == ("wan", str(pipe), "umt5")
    bundle = load_bundle(out, device="cpu")
    saved = WAN.from_pretrained(str(pipe / "transformer")).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in bundle.model.state_dict().items())
    assert bundle.generate(["a cat"], 5, 16, 16, steps=1, progress=False).shape == (1, 3, 5, 16, 16)
    with pytest.raises(SystemExit, match="neither a local diffusers folder nor a named size"):
        init_checkpoint.main(["--model", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="_class_name"):
        init_checkpoint.main(["--model", str(pipe / "vae"), "--out", str(tmp_path / "y")])


def test_caption_dropout_in_the_step_is_the_empty_prompt_drawn_from_the_steps_generator():
    from types import SimpleNamespace

    from opensora.training.step import TrainStep

    engine = SimpleNamespace(dist=SimpleNamespace(device=torch.device("cpu")), model=None)
    null_y, null_mask = torch.full((1, 1, 6, 4), 7.0), torch.tensor([[1, 0, 0, 0, 0, 0]])
    step = TrainStep(engine, None, caption_dropout=0.3, null_text=(null_y, null_mask))
    y, mask = torch.randn(200, 1, 6, 4), torch.ones(200, 6, dtype=torch.long)
    y1, m1 = step.drop_captions(y, mask, torch.Generator().manual_seed(5))
    y2, m2 = step.drop_captions(y, mask, torch.Generator().manual_seed(5))
    assert torch.equal(y1, y2) and torch.equal(m1, m2), "the step's seeded generator decides"
    dropped = (y1 == 7.0).flatten(1).all(1)
    assert torch.equal(dropped, (m1 == null_mask).all(1)) and torch.equal(y1[~dropped], y[~dropped])
    assert 40 <= int(dropped.sum()) <= 80  # about 30 % of 200
    assert TrainStep(engine, None, caption_dropout=0.3).caption_dropout == 0, "no empty prompt: no dropout here"


# -- LoRA stages ---------------------------------------------------------------------------------------------------
LORA = """
  - name: full
    model: tiny-wan2.1
    num_frames: 5
    image_size: [16, 16]
    batch_size: 2
    steps: 1
    lr: 1.0e-4
"""


def lora_recipe(tmp_path: Path, manifest: Path, steps: int = 4, **kw) -> Path:
    path = write_recipe(tmp_path, manifest, steps=steps, **kw)
    text = path.read_text().replace("validation:\n  every: {}".format(steps), "validation:\n  every: 0")
    text = text.replace("    init: {vae: tiny-wan2.1, text_encoder: tiny}",
                        "    init: {vae: tiny-wan2.1, text_encoder: tiny}\n    lora: {rank: 4, alpha: 8.0}")
    path.write_text(text)
    return path


def losses(run: Path, stage: str) -> dict[int, tuple[float, float]]:
    rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in rows if "loss" in r}


def test_a_lora_stage_trains_only_adapters_checkpoints_them_alone_and_resumes_bit_exactly(tmp_path, manifest):
    from torch.distributed.checkpoint import FileSystemReader

    from opensora.models.lora import LORA_WEIGHTS_NAME

    recipe = load_recipe(lora_recipe(tmp_path, manifest, steps=4, ckpt_every=2))
    assert recipe.stages[0].lora.rank == 4 and recipe.stages[0].lora.scale == 2.0
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_recipe(recipe, straight, init_distributed()) == "finished"
    assert run_recipe(recipe, stopped, init_distributed(), max_steps=2) == "max_steps"
    assert run_recipe(recipe, stopped, init_distributed()) == "finished"  # resumes from step 2
    assert losses(straight, "wan") == losses(stopped, "wan") and sorted(losses(straight, "wan")) == [1, 2, 3, 4]

    # The checkpoint holds the adapters (model, EMA, AdamW), not the frozen base.
    meta = FileSystemReader(str(straight / "wan" / "checkpoints" / "step-00000004")).read_metadata()
    model_keys = [k for k in meta.state_dict_metadata if k.startswith(("model.", "ema."))]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)

    # The export: the base with the EMA adapters merged (only the adapted layers changed), bit-exact after the
    # resume, and the adapters as diffusers' pytorch_lora_weights.safetensors.
    init = load_bundle(straight / "wan" / "init", device="cpu").model.state_dict()
    a = load_bundle(straight / "wan" / "export", device="cpu").model.state_dict()
    b = load_bundle(stopped / "wan" / "export", device="cpu").model.state_dict()
    assert a.keys() == init.keys() and all(torch.equal(a[k], b[k]) for k in a)
    changed = {k for k in a if not torch.equal(a[k], init[k])}
    adapted = {k for k in a if WAN_TARGETS.fullmatch(k.rsplit(".", 1)[0]) and k.endswith("weight")}
    assert changed == adapted and changed, "only the adapted Linears' weights moved"
    lora_file = straight / "wan" / "export" / LORA_WEIGHTS_NAME
    assert lora_file.is_file() and lora_file.stat().st_size < 0.2 * sum(v.numel() * 4 for v in a.values())


WAN_TARGETS = __import__("re").compile(WAN.lora_targets)


CONTINUE = """
  - name: more
    model: tiny-wan2.1
    num_frames: 5
    image_size: [16, 16]
    batch_size: 2
    steps: 3
    lr: 1.0e-3
    init: {lora: continue}
    lora: {rank: 4, alpha: 8.0}
"""


def test_a_lora_stage_continues_the_previous_stages_adapters_unmerged(tmp_path, manifest):
    """``init.lora: continue``: the stage rebuilds the previous stage's base (frozen, unchanged) and trains the
    previous stage's EMA adapters on, instead of fresh adapters on the merged weights (``merge``, the default)."""
    from safetensors.torch import load_file

    from opensora.models.lora import LORA_WEIGHTS_NAME
    from opensora.training.recipe import adapters_of, init_dir_of
    from opensora.training.trainer import Trainer, merge_lora_state

    path = lora_recipe(tmp_path, manifest, steps=2, ckpt_every=1)
    path.write_text(path.read_text() + CONTINUE)
    recipe = load_recipe(path)
    assert recipe.stages[0].init.lora == "merge" and recipe.stages[1].init.lora == "continue"
    straight, stopped, info = tmp_path / "straight", tmp_path / "stopped", init_distributed()
    assert run_recipe(recipe, straight, info, only_stage="wan") == "finished"
    base_dir = init_dir_of(recipe, 1, straight, info)
    assert base_dir == straight / "wan" / "init", "the base is the previous stage's, not its merged export"
    assert adapters_of(recipe, 1, straight) == straight / "wan" / "export"

    trainer = Trainer(recipe, recipe.stages[1], straight, base_dir, info, adapters=adapters_of(recipe, 1, straight))
    try:
        state = {k: v.full_tensor() for k, v in trainer.model.state_dict().items()}  # FSDP2's DTensors
        trainable = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    finally:
        trainer.close()
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), "the base stays frozen"
    base = load_bundle(straight / "wan" / "init", device="cpu").model.state_dict()
    own = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    assert own.keys() == base.keys() and all(torch.equal(own[k], base[k]) for k in base), "the previous base"
    # Its adapters are the previous stage's EMA adapters: merged, they give the previous export bit for bit, and
    # they are the diffusers file's (which folds alpha / r = 2 into lora_B).
    merged = merge_lora_state(state, recipe.stages[1].lora.scale)
    previous = load_bundle(straight / "wan" / "export", device="cpu").model.state_dict()
    assert merged.keys() == previous.keys() and all(torch.equal(merged[k], previous[k]) for k in previous)
    diffusers_file = load_file(straight / "wan" / "export" / LORA_WEIGHTS_NAME)
    for key, value in diffusers_file.items():
        ours = state[key.removeprefix("transformer.").replace(".weight", ".default.weight")]
        assert torch.equal(value, ours * 2.0 if ".lora_B." in key else ours), key
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k), "not fresh (zero) lora_B"

    # Both stages, straight vs stopped in the continued stage and resumed: bit-exact; the continued stage's export
    # is the same base with the adapters trained further.
    assert run_recipe(recipe, straight, info) == "finished"
    assert run_recipe(recipe, stopped, info, only_stage="wan") == "finished"
    assert run_recipe(recipe, stopped, info, max_steps=1) == "max_steps"
    assert run_recipe(recipe, stopped, info) == "finished"
    assert losses(straight, "more") == losses(stopped, "more") and sorted(losses(straight, "more")) == [1, 2, 3]
    a = load_bundle(straight / "more" / "export", device="cpu").model.state_dict()
    b = load_bundle(stopped / "more" / "export", device="cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    changed = {k for k in a if not torch.equal(a[k], base[k])}
    assert changed == {k for k in a if WAN_TARGETS.fullmatch(k.rsplit(".", 1)[0]) and k.endswith("weight")}
    assert any(not torch.equal(a[k], previous[k]) for k in changed), "the adapters trained on"
    assert not (straight / "more" / "init").exists()


@pytest.mark.parametrize("overrides, match", [
    (["stages.1.lora=null"], r"stages\[1\]\.init\.lora: continue .*stages\[1\]\.lora is null"),
    (["stages.1.lora.rank=8"], r"stages\[1\]\.lora\.rank \(8\) must equal stages\[0\]\.lora\.rank \(4\)"),
    (["stages.1.lora.alpha=4.0"], r"stages\[1\]\.lora\.alpha \(4\.0\) must equal stages\[0\]\.lora\.alpha"),
    (["stages.1.lora.target_modules=.*to_q"], r"stages\[1\]\.lora\.target_modules .* must equal stages\[0\]"),
    (["stages.0.lora=null"], r"stages\[1\]\.init\.lora: continue .*stages\[0\]\.lora is null"),
    (["stages.1.init.bundle=/x"], r"stages\[1\]\.init\.lora: continue .*not with stages\[1\]\.init\.bundle"),
    (["stages.1.init.lora=keep"], r"init\.lora must be one of \('merge', 'continue'\), got 'keep'"),
])
def test_contradictory_lora_continue_settings_are_refused_naming_the_keys(tmp_path, manifest, overrides, match):
    path = lora_recipe(tmp_path, manifest, steps=2)
    path.write_text(path.read_text() + CONTINUE)
    with pytest.raises(ConfigError, match=match):
        load_recipe(path, overrides)


def test_adapters_saved_with_other_lora_settings_are_refused(tmp_path):
    from opensora.models.lora import LoraSettings, apply_lora, load_adapters, save_adapters

    model = apply_lora(WAN.build("tiny-wan2.1"), WAN, LoraSettings(rank=4, alpha=8.0))
    state = {n: p.detach() + 1 for n, p in model.named_parameters() if p.requires_grad}
    file = save_adapters(state, LoraSettings(rank=4, alpha=8.0), tmp_path)
    load_adapters(model, file, LoraSettings(rank=4, alpha=8.0, dropout=0.1))  # dropout changes no weight
    assert all(torch.equal(p, state[n]) for n, p in model.named_parameters() if p.requires_grad)
    other = apply_lora(WAN.build("tiny-wan2.1"), WAN, LoraSettings(rank=8, alpha=8.0))
    with pytest.raises(ValueError, match=r"rank 4 .* rank 8"):
        load_adapters(other, file, LoraSettings(rank=8, alpha=8.0))
    with pytest.raises(ValueError, match=r"alpha 8.0 .* alpha 16.0"):
        load_adapters(model, file, LoraSettings(rank=4, alpha=16.0))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
def test_lora_then_full_fine_tune_on_two_gloo_ranks(tmp_path, manifest, engine):
    """A LoRA stage, then a full fine-tune of its export (the adapters merged), on 2 gloo ranks under torchrun."""
    import subprocess
    import sys

    from opensora.accounting import read_ledger
    from opensora.models.lora import LORA_WEIGHTS_NAME
    from tests.test_training import ROOT, env

    path = lora_recipe(tmp_path, manifest, steps=2, engine=engine)
    path.write_text(path.read_text() + LORA)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "train" / "train.py"), "--config", str(path), "--output-dir", str(run)]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [(s.stage, s.num_gpus, s.end_reason) for s in read_ledger(run)] == [("wan", 2, "finished"),
                                                                              ("full", 2, "finished")]
    assert (run / "wan" / "export" / LORA_WEIGHTS_NAME).is_file()
    assert not (run / "full" / "export" / LORA_WEIGHTS_NAME).exists(), "a full fine-tune exports no adapter"
    lora, full = (load_bundle(run / s / "export", device="cpu").model.state_dict() for s in ("wan", "full"))
    assert lora.keys() == full.keys() and all(torch.isfinite(v).all() for v in full.values())
    assert not torch.equal(lora["patch_embedding.weight"], full["patch_embedding.weight"]), "all weights train"


def test_shipped_family_recipes_load_and_the_forecast_prices_the_familys_flops():
    from opensora.accounting.forecast import cost_stages
    from tests.test_training import ROOT

    tiny = load_recipe(ROOT / "configs/tiny_wan_lora/recipe.yaml")
    assert tiny.stages[0].model == "tiny-wan2.1" and tiny.stages[0].lora.rank == 8
    full = load_recipe(ROOT / "configs/wan21_1.3b_full/recipe.yaml")
    assert full.stages[0].lora is None
    lora = load_recipe(ROOT / "configs/wan21_1.3b_lora/recipe.yaml")
    (stage,) = cost_stages(lora)
    config = WAN.size_config("Wan2.1-T2V-1.3B")
    assert stage.latent_size == (21, 60, 104)  # 81x480x832 through the Wan 2.1 VAE
    assert stage.flops_per_sample == WAN.train_flops_per_sample(config, (21, 60, 104)) > 8e14


# -- bf16 under FSDP2 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["wan", "ltx"])
def test_a_family_trains_under_fsdp2_bf16_mixed_precision(name, monkeypatch):
    """FSDP2 with a bf16 MixedPrecisionPolicy (what GPU recipes run; on CPU here, gloo, 1 rank): outside its forward
    the root's parameters are the sharded fp32 masters, inside it their bf16 copies, so inputs cast to the weights'
    dtype before the call were fp32 against bf16 weights. The forward must run, agree with fp32 to bf16's precision,
    and give fp32 gradients to the fp32 masters; Wan's timestep embedding keeps fp32 weights (diffusers'
    _keep_in_fp32_modules) and the fp32 sinusoid of the float timestep."""
    import opensora.distributed.parallel as parallel
    from torch.distributed.tensor import DTensor
    from tests.test_model_families import TINY, _inputs

    family = FAMILIES[name]
    monkeypatch.setattr(parallel, "uses_mixed_precision", lambda pcfg, info: pcfg.param_dtype == "bf16")
    ref = family.build(TINY[name])
    with torch.no_grad():  # a non-zero output layer, so the gradients reach every block
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    model = family.build(TINY[name])
    model.load_state_dict(ref.state_dict())
    x, t, y, mask = _inputs(family, ref, latent=(2, 4, 4))
    t = t + 0.7  # a fractional timestep, as rectified flow draws them (bf16 would round it)
    expected = family.forward(ref, x, t, y, mask)
    model = parallelize(model, ParallelConfig(engine="fsdp", param_dtype="bf16"), init_distributed(), family=family)
    seen = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda m, args, out, n=n: seen.update({n: (args[0].dtype, m.weight.dtype)}))
    out = family.forward(model, x, t, y, mask)
    assert out.dtype == torch.float32
    for n, dtypes in seen.items():  # (input, weight) dtypes of every Linear inside the forward
        kept = any(k in n.split(".") for k in getattr(model, "_keep_in_fp32_modules", None) or ())
        assert dtypes == ((torch.float32,) * 2 if kept and "blocks." not in n else (torch.bfloat16,) * 2), (n, dtypes)
    assert name != "wan" or "condition_embedder.time_embedder.linear_1" in seen
    torch.testing.assert_close(out, expected, atol=0.05 * expected.abs().max().item(), rtol=0.05)
    out.square().mean().backward()
    for n, p in model.named_parameters():
        assert isinstance(p, DTensor) and p.dtype == torch.float32 and p.grad is not None, n
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad.full_tensor()).all(), n
