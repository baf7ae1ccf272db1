"""Training on a 3D causal VAE's latents (issue 13, part B): the recipe declares the autoencoder, the dataset
takes t*k + 1 frames, the trainer checks the VAE and counts FLOPs on the compressed latent, the latent cache
keeps autoencoders apart, bundles and sampling follow the autoencoder, and the shipped Wan 2.1 recipe loads and
prices.

Everything is tiny: STDiT-debug, the tiny random T5 and a tiny random Wan 2.1 VAE (4x8x8, 4 channels: a
17x16x16 clip is a 5x2x2 latent), 20-frame 16x16 clips written in the test.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import decord
import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from opensora.accounting import read_ledger, train_flops_per_sample, video_tokens
from opensora.bundle import load_bundle, load_bundle_config
from opensora.config import ConfigError
from opensora.data.dataset import DataConfig, VideoDataset
from opensora.data.latent_cache import (
    CachedLatentDataset,
    _public_config,
    encoder_identity,
    fingerprint_module,
    precompute,
    vae_identity,
)
from opensora.data.manifest import write_manifest
from opensora.data.video_io import write_video
from opensora.distributed import init_distributed
from opensora.models import STDiT_models
from opensora.models.autoencoders import AUTOENCODER_PRESETS, AutoencoderShape
from opensora.models.text_encoder import T5TextEncoder, make_tiny_t5
from opensora.models.vae import (
    IdentityAutoencoder,
    VAEConfig,
    autoencoder_shape,
    build_vae,
    load_autoencoder,
    make_tiny_vae,
)
from opensora.training import load_recipe, run_recipe
from opensora.training.config import recipe_autoencoder
from tools import cost, init_checkpoint, precompute as precompute_tool, sample

ROOT = Path(__file__).resolve().parents[1]
CLIP_FRAMES = 20
NEAREST = r"16 frames do not fit AutoencoderKLWan .*4k\+1 frames\); nearest valid frame counts: 13 and 17"

RECIPE = """
vae_compression: [4, 8, 8]
seed: 0
data:
  manifest: {manifest}
  frame_interval: 1
  num_workers: 0
parallel: {{engine: ddp, param_dtype: fp32}}
ema: {{decay: 0.9, warmup: true}}
logging: {{log_every: 1, ckpt_every: 100, keep_checkpoints: 1, tensorboard: false, progress: false}}
accounting: {{price_per_gpu_hour: 1.0, heartbeat_s: 0}}
stages:
  - name: images
    model: STDiT-debug
    num_frames: 1
    image_size: [16, 16]
    batch_size: 2
    steps: 2
    lr: 1.0e-3
    init: {{vae: {vae}, text_encoder: tiny}}
  - name: video17
    model: STDiT-debug
    num_frames: 17
    image_size: [16, 16]
    batch_size: 2
    steps: 2
    lr: 1.0e-3
"""


@pytest.fixture(scope="module")
def vaes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vaes")
    return {"wan": make_tiny_vae(root / "wan", seed=0, kind="wan2.1"),
            "wan_seed1": make_tiny_vae(root / "wan1", seed=1, kind="wan2.1"),
            "hunyuan": make_tiny_vae(root / "hunyuan", seed=0, kind="hunyuan"),
            "kl": make_tiny_vae(root / "kl", seed=0, kind="kl")}


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Four 20-frame 16x16 clips of a coloured square moving right."""
    out = tmp_path_factory.mktemp("clips")
    rows = []
    for i, rgb in enumerate([(220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40)]):
        frames = np.full((CLIP_FRAMES, 16, 16, 3), 255, np.uint8)
        for t in range(CLIP_FRAMES):
            frames[t, 6:10, (t % 12) : (t % 12) + 4] = rgb
        path = write_video(out / f"clip{i}.mp4", frames, fps=8, crf=0)
        rows.append(dict(path=str(path), text=f"square {i} moving right", num_frames=CLIP_FRAMES, height=16,
                         width=16))
    return write_manifest(pd.DataFrame(rows), out / "manifest.parquet")


def write_recipe(tmp_path: Path, manifest: Path, vae: str | Path) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(manifest=manifest, vae=vae))
    return path


# -- the recipe declares the autoencoder --------------------------------------------------------------------------
def test_recipe_declares_the_autoencoder(tmp_path, manifest):
    recipe = write_recipe(tmp_path, manifest, "tiny-wan2.1")
    wan = recipe_autoencoder(load_recipe(recipe))
    assert (wan.compression, wan.causal, wan.step) == ((4, 8, 8), True, 4)
    assert wan.latent_size((17, 16, 16)) == (5, 2, 2) and wan.latent_size((1, 16, 16)) == (1, 2, 2)  # images fit
    # Recipes that say only vae_downsample (or nothing) keep their per-frame meaning.
    legacy = ["vae_compression=null"]
    assert recipe_autoencoder(load_recipe(recipe, [*legacy, "vae_downsample=1"])) == AutoencoderShape.per_frame(1)
    assert recipe_autoencoder(load_recipe(recipe, legacy)) == AutoencoderShape.per_frame(8)
    agreeing = load_recipe(recipe, ["vae_downsample=8", "vae_compression=[1,8,8]"])
    assert recipe_autoencoder(agreeing).compression == (1, 8, 8)
    for old in (ROOT / "configs/opensora_v1/recipe.yaml", ROOT / "configs/demo/train.yaml"):
        cfg = load_recipe(old)
        assert recipe_autoencoder(cfg) == AutoencoderShape.per_frame(cfg.vae_downsample)

    # A frame count the autoencoder cannot take fails at load, naming the stage and the nearest valid counts.
    with pytest.raises(ConfigError, match=r"stages\[1\] \('video17'\).*16 frames do not fit.*4k\+1.*13 and 17"):
        load_recipe(recipe, ["stages.1.num_frames=16"])
    with pytest.raises(ConfigError, match=r"stages\[1\].*8k\+1.*9 and 17"):  # CogVideoX's frame step
        load_recipe(recipe, ["vae_frame_step=8", "stages.1.num_frames=13"])
    with pytest.raises(ConfigError, match=r"stages\[0\] \(.images.\): data\.buckets \[16, 20\].*W=20 is not divisible"):
        load_recipe(recipe, ["data.buckets=[[16,16],[16,20]]"])
    with pytest.raises(ConfigError, match=r"vae_downsample 8 .*disagrees with vae_compression \[4, 8, 8\]"):
        load_recipe(recipe, ["vae_downsample=8"])
    with pytest.raises(ConfigError, match=r"vae_compression must be three integer factors"):
        load_recipe(recipe, ["vae_compression=[4,8]"])
    with pytest.raises(ConfigError, match=r"vae_compression must be three integer factors"):
        load_recipe(recipe, ["vae_compression=[0,8,8]"])
    with pytest.raises(ConfigError, match=r"vae_frame_step must be a multiple of the temporal factor 4"):
        load_recipe(recipe, ["vae_frame_step=6"])
    with pytest.raises(ConfigError, match=r"vae_frame_step needs vae_compression"):
        load_recipe(recipe, [*legacy, "vae_frame_step=4"])
    # Not causal: multiples of t, and no single images.
    with pytest.raises(ConfigError, match=r"stages\[0\].*1 frames do not fit.*a multiple of 4.*: 4"):
        load_recipe(recipe, ["vae_causal=false", "stages.1.num_frames=16"])


def test_dataset_refuses_frames_the_autoencoder_cannot_take(manifest, vaes):
    shape = load_autoencoder(vaes["wan"]).shape
    assert shape == autoencoder_shape(VAEConfig(path=str(vaes["wan"])))  # read from config.json alone
    cfg = DataConfig(manifest=str(manifest), num_frames=16, frame_interval=1, image_size=(16, 16), num_workers=0)
    with pytest.raises(ValueError, match=NEAREST):
        VideoDataset(cfg, autoencoder=shape)
    VideoDataset(cfg)  # without an autoencoder nothing is checked (the identity / per-frame case)
    ok = VideoDataset(dataclasses.replace(cfg, num_frames=17), autoencoder=shape)
    assert len(ok) == 4 and ok.bucket_keys[0] == (17, 16, 16) and ok[0]["video"].shape == (3, 17, 16, 16)
    assert len(VideoDataset(dataclasses.replace(cfg, num_frames=1), autoencoder=shape)) == 4  # images: 1 frame


# -- the latent cache keeps autoencoders apart --------------------------------------------------------------------
def test_a_cache_is_only_used_with_the_autoencoder_that_made_it(tmp_path, manifest, vaes):
    te = T5TextEncoder.from_pretrained(make_tiny_t5(tmp_path / "t5"), max_length=8)
    loaded = {name: build_vae(VAEConfig(path=str(path))) for name, path in vaes.items()}
    ids = {name: vae_identity(vae) for name, vae in loaded.items()}
    assert len(set(ids.values())) == len(ids)
    # The same directory loaded again is the same autoencoder; another scale is another one.
    assert vae_identity(build_vae(VAEConfig(path=str(vaes["wan"])))) == ids["wan"]
    assert vae_identity(build_vae(VAEConfig(path=str(vaes["wan"]), scaling_factor=2.0))) != ids["wan"]
    # The per-frame VAE and the identity hash what they hashed before 3D VAEs came (existing caches stay valid).
    kl = loaded["kl"]
    assert ids["kl"] == fingerprint_module(kl, {"out_channels": 4, "patch_size": [1, 2, 2],
                                                "scaling_factor": kl.scaling_factor,
                                                "module": _public_config(kl.module.config)})
    ident = IdentityAutoencoder()
    assert vae_identity(ident) == fingerprint_module(ident, {"out_channels": 3, "patch_size": [1, 1, 1]})

    cfg = DataConfig(manifest=str(manifest), num_frames=17, frame_interval=1, image_size=(16, 16), num_workers=0)
    caches = {}
    for maker in ("wan", "hunyuan"):
        cache = tmp_path / f"cache-{maker}"
        report = precompute(dataclasses.replace(cfg, cache_dir=str(cache)), loaded[maker], te, cache, progress=False)
        assert report.written == 4
        caches[maker] = cache

    def found(cache: Path, reader: str) -> bool:
        data = CachedLatentDataset(dataclasses.replace(cfg, cache_dir=str(cache)), encoder_identity(loaded[reader], te),
                                   max_leading_misses=0)
        return data[0] is not None

    assert found(caches["wan"], "wan") and found(caches["hunyuan"], "hunyuan")
    assert not found(caches["wan"], "hunyuan") and not found(caches["wan"], "wan_seed1")
    assert not found(caches["hunyuan"], "wan") and not found(caches["hunyuan"], "wan_seed1")
    entry = CachedLatentDataset(dataclasses.replace(cfg, cache_dir=str(caches["wan"])),
                                encoder_identity(loaded["wan"], te))[0]
    assert entry["latent"].shape == (4, 5, 2, 2)  # 17 frames -> 5 latent frames


# -- bundles follow the autoencoder -------------------------------------------------------------------------------
def test_init_checkpoint_fits_the_model_to_a_3d_vae(tmp_path, vaes, capsys):
    out = tmp_path / "bundle"
    assert init_checkpoint.main(["--model", "STDiT-debug", "--vae", str(vaes["wan"]), "--out", str(out)]) == 0
    cfg = load_bundle_config(out)
    assert (cfg.vae.type, cfg.vae.path) == ("auto", str(vaes["wan"].resolve()))
    bundle = load_bundle(out, device="cpu")
    assert bundle.model.in_channels == bundle.vae.out_channels == 4
    assert type(bundle.vae.module).__name__ == "AutoencoderKLWan"
    assert bundle.latent_size(17, 16, 16) == (5, 2, 2)
    # Tiny kinds by name, written into the bundle.
    tiny = tmp_path / "tiny22"
    assert init_checkpoint.main(["--model", "STDiT-debug", "--vae", "tiny-wan2.2", "--out", str(tiny)]) == 0
    assert load_bundle_config(tiny).vae.path == "vae"
    assert load_bundle(tiny, device="cpu").model.in_channels == 8
    with pytest.raises(SystemExit, match=r"--vae: tiny-wan3: no such tiny VAE; one of .*tiny-wan2\.1"):
        init_checkpoint.main(["--model", "STDiT-debug", "--vae", "tiny-wan3", "--out", str(tmp_path / "x")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=r"--vae: cannot load the VAE from .*empty.*no config\.json"):
        init_checkpoint.main(["--model", "STDiT-debug", "--vae", str(tmp_path / "empty"), "--out", str(tmp_path / "y")])


# -- train, export, sample ----------------------------------------------------------------------------------------
def _flops_per_sample(run: Path, stage: str) -> tuple[float, float]:
    """(FLOPs, tokens) per sample the ledger recorded for a stage."""
    seg = next(s for s in read_ledger(run) if s.stage == stage)
    mark = seg.marks[-1]
    return mark.flops / mark.samples, mark.tokens / mark.samples


def test_two_stages_on_a_tiny_wan_vae_train_export_and_sample(tmp_path, manifest, vaes, monkeypatch, capsys):
    recipe = load_recipe(write_recipe(tmp_path, manifest, vaes["wan"]))
    run = tmp_path / "run"
    assert run_recipe(recipe, run, init_distributed()) == "finished"

    # The ledger counts FLOPs on the compressed latent: 17 frames are 5 latent frames, an image is 1.
    model = load_bundle(run / "video17" / "export", device="cpu").model.config
    assert model.in_channels == 4
    for stage, latent in (("images", (1, 2, 2)), ("video17", (5, 2, 2))):
        flops, tokens = _flops_per_sample(run, stage)
        assert flops == pytest.approx(train_flops_per_sample(model, latent, model.model_max_length), rel=1e-12)
        assert tokens == video_tokens(model, latent)

    # Sampling: exactly the requested frames; a count the VAE cannot take is refused before anything loads.
    out = tmp_path / "samples"
    argv = ["--ckpt", str(run / "video17" / "export"), "--prompt", "square 0 moving right", "--height", "16",
            "--width", "16", "--steps", "2", "--out", str(out), "--no-progress"]
    assert sample.main([*argv, "--num-frames", "17"]) == 0
    (mp4,) = out.glob("*.mp4")
    assert len(decord.VideoReader(str(mp4))) == 17

    def no_loading(*args, **kwargs):
        raise AssertionError("the bundle was loaded before the frame count was checked")

    monkeypatch.setattr(sample, "load_bundle", no_loading)
    with pytest.raises(SystemExit, match=NEAREST):
        sample.main([*argv, "--num-frames", "16"])

    # A recipe that declares another autoencoder than the one it loads stops with both named.
    per_frame = load_recipe(write_recipe(tmp_path, manifest, vaes["wan"]), ["vae_compression=null", "vae_downsample=8"])
    with pytest.raises(ConfigError, match=r"declares the autoencoder 1x8x8 \(any frames\) but the VAE of .*"
                                          r"\(AutoencoderKLWan\) is 4x8x8 causal \(4k\+1 frames\), 4 ch.*"
                                          r"set vae_compression: \[4, 8, 8\], vae_causal: true"):
        run_recipe(per_frame, tmp_path / "run-mismatch", init_distributed(), only_stage="images")


def test_precompute_with_a_tiny_wan_vae_then_train_from_the_cache(tmp_path, manifest, vaes, capsys):
    recipe = write_recipe(tmp_path, manifest, "tiny-wan2.1")
    cache, run = tmp_path / "cache", tmp_path / "run"
    sets = ["--set", f"data.cache_dir={cache}"]
    assert precompute_tool.main(["--config", str(recipe), "--output-dir", str(run), "--no-progress", *sets]) == 0
    out = capsys.readouterr().out
    assert "stage 'images': 4 clips: 4 encoded" in out and "stage 'video17': 4 clips: 4 encoded" in out
    shapes = sorted(tuple(load_file(e)["latent"].shape) for e in cache.glob("*/*.safetensors"))
    assert shapes == [(4, 1, 2, 2)] * 4 + [(4, 5, 2, 2)] * 4, "4 clips x 2 stages, latents of 1 and 17 frames"
    # Conditioning on but never firing (p = 1e-12): the same draws from the step's generator as the conditioned run
    # below, then no frame given, so the two runs differ only by their masks (plain training draws none).
    cfg = load_recipe(recipe, [f"data.cache_dir={cache}", "conditioning.first_frame=1.0e-12"])
    assert run_recipe(cfg, run, init_distributed()) == "finished"
    model = load_bundle(run / "video17" / "export", device="cpu").model.config
    flops, _ = _flops_per_sample(run, "video17")  # cached latents are counted as they are: 5x2x2
    assert flops == pytest.approx(train_flops_per_sample(model, (5, 2, 2), model.model_max_length), rel=1e-12)
    assert not (run / "video17" / "failures.jsonl").exists(), "every sample came from the cache"

    # Frame conditioning (issue 16) on cached latents of a causal 3D VAE: the masks are over the cached latent
    # frames (latent frame 0 = the first image alone), drawn after the cache gives the batch.
    conditioned = load_recipe(recipe, [f"data.cache_dir={cache}", "conditioning.first_frame=0.5",
                                       "conditioning.first_k=0.5"])
    run2 = tmp_path / "run-conditioned"
    assert run_recipe(conditioned, run2, init_distributed()) == "finished"
    never, cond = (_losses(r, "video17") for r in (run, run2))
    assert all(math.isfinite(v) for v in cond) and cond != never, "the masks changed what the loss measured"
    assert not (run2 / "video17" / "failures.jsonl").exists()


def _losses(run: Path, stage: str) -> list[float]:
    rows = [json.loads(line) for line in (run / stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


# -- the shipped Wan 2.1 recipe -----------------------------------------------------------------------------------
def test_shipped_wan21_recipe_loads_and_forecasts(capsys):
    path = ROOT / "configs/opensora_v1_wan21/recipe.yaml"
    recipe = load_recipe(path)  # no weights needed
    assert [s.num_frames for s in recipe.stages] == [1, 17, 17, 17]
    assert recipe_autoencoder(recipe).differences(AUTOENCODER_PRESETS["wan2.1"].shape) == []
    assert recipe_autoencoder(recipe).differences(AUTOENCODER_PRESETS["sd"].shape) == [
        "compression 4x8x8 vs 1x8x8", "frames 4k+1 vs any", "latent channels 16 vs 4"]
    assert recipe.stages[0].init.vae_subfolder == "vae"
    assert cost.main(["forecast", "--config", str(path), "--gpus", "64", "--gpu-type", "h800", "--mfu", "0.3",
                      "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["latent_size"] for s in data["stages"]] == [[1, 32, 32], [5, 32, 32], [5, 32, 32], [5, 64, 64]]
    xl2 = dataclasses.replace(STDiT_models["STDiT-XL/2"], in_channels=16, space_scale=0.5)
    assert data["stages"][1]["flops_per_sample"] == pytest.approx(train_flops_per_sample(xl2, (5, 32, 32), 120))
    assert data["vae"]["compression"] == [4, 8, 8] and data["vae"]["latent_channels"] == 16
    with pytest.raises(ConfigError, match=r"stages\[1\] \('pretrain-17x256'\).*16 frames.*13 and 17"):
        load_recipe(path, ["stages.1.num_frames=16"])
