"""Video autoencoders: a tiny random model of every supported diffusers class, saved to disk and loaded back
through the real path (``vae.type: auto`` reads config.json's ``_class_name``)."""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file

from opensora.models.autoencoders import (
    AUTOENCODER_PRESETS,
    compressed_size,
    nearest_valid_num_frames,
    valid_num_frames,
)
from opensora.models.vae import (
    AUTOENCODER_CLASSES,
    TINY_VAE_CONFIGS,
    IdentityAutoencoder,
    VAEConfig,
    VideoAutoencoder3D,
    VideoAutoencoderKL,
    build_vae,
    load_autoencoder,
    make_tiny_vae,
)

# kind -> (class name, compression (t, h, w), latent channels, frame step) of the tiny models.
TINY = {
    "kl": ("AutoencoderKL", (1, 2, 2), 4, 1),
    "wan2.1": ("AutoencoderKLWan", (4, 8, 8), 4, 4),
    "wan2.2": ("AutoencoderKLWan", (4, 16, 16), 8, 4),
    "hunyuan": ("AutoencoderKLHunyuanVideo", (4, 8, 8), 4, 4),
    "cogvideox": ("AutoencoderKLCogVideoX", (4, 8, 8), 4, 8),
    "ltx": ("AutoencoderKLLTXVideo", (8, 8, 8), 8, 8),
}
KINDS = list(TINY)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vaes")
    return {kind: make_tiny_vae(root / kind, kind=kind) for kind in KINDS}


def _video(B: int = 2, T: int = 17, H: int = 16, W: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 3, T, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _authors_norm(directory: Path, class_name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, std, scale) read straight from the saved files, as each class's diffusers pipeline reads them."""
    config = json.loads((directory / "config.json").read_text())
    if class_name == "AutoencoderKLWan":
        return torch.tensor(config["latents_mean"]), torch.tensor(config["latents_std"]), 1.0
    if class_name == "AutoencoderKLLTXVideo":  # buffers saved with the weights
        weights = load_file(directory / "diffusion_pytorch_model.safetensors")
        return weights["latents_mean"], weights["latents_std"], config["scaling_factor"]
    return torch.zeros(1), torch.ones(1), config["scaling_factor"]


def test_tiny_kinds_are_all_tested():
    assert set(TINY) == set(TINY_VAE_CONFIGS)
    assert {name for name, *_ in TINY.values()} == set(AUTOENCODER_CLASSES)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_follow_the_factors_and_round_trip(kind, tiny_dirs):
    class_name, compression, channels, step = TINY[kind]
    vae = build_vae(VAEConfig(path=str(tiny_dirs[kind])))  # type "auto": the class comes from config.json
    assert isinstance(vae, VideoAutoencoderKL if kind == "kl" else VideoAutoencoder3D)
    assert type(vae.module).__name__ == class_name
    assert vae.compression == vae.patch_size == compression and vae.out_channels == channels
    assert vae.causal == (kind != "kl") and vae.frame_step == step
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    t, h, w = compression
    T = 2 * step + 1  # 17 frames (9 for the per-frame VAE)
    expected = ((T - 1) // t + 1, 16 // h, 32 // w) if vae.causal else (T, 16 // h, 32 // w)
    assert vae.get_latent_size((T, 16, 32)) == expected
    x = _video(T=T, W=32)
    with torch.no_grad():
        z = vae.encode(x, sample_posterior=False)
        out = vae.decode(z)
    assert z.shape == (2, channels, *expected)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    desc = vae.describe()
    json.dumps(desc)
    assert (desc["class"], desc["compression"], desc["latent_channels"]) == (class_name, list(compression), channels)


@pytest.mark.parametrize("kind", KINDS)
def test_normalisation_is_the_authors_and_round_trips(kind, tiny_dirs):
    class_name = TINY[kind][0]
    vae = load_autoencoder(tiny_dirs[kind])
    mean, std, scale = _authors_norm(tiny_dirs[kind], class_name)
    assert scale != 1.0 or not torch.equal(std, torch.ones_like(std))  # the tiny models make the norm visible
    x = _video(B=1, T=2 * vae.frame_step + 1)
    with torch.no_grad():
        if kind == "kl":  # per frame: the module sees (B*T, C, H, W)
            frames = x[0].transpose(0, 1)  # (T, 3, H, W)
            raw = vae.module.encode(frames).latent_dist.mode().transpose(0, 1)[None]  # (1, C, T, h, w)
            decode_raw = lambda r: vae.module.decode(r[0].transpose(0, 1)).sample.transpose(0, 1)[None]  # noqa: E731
        else:
            raw = vae.module.encode(x).latent_dist.mode()  # (1, C, T', h, w)
            decode_raw = lambda r: vae.module.decode(r).sample  # noqa: E731
        shape = (1, -1, 1, 1, 1)
        expected = (raw - mean.view(shape)) / std.view(shape) * scale
        z = vae.encode(x, sample_posterior=False)
        torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vae.decode(z), decode_raw(raw).clamp(-1, 1), rtol=1e-4, atol=1e-5)
    if isinstance(vae, VideoAutoencoder3D):
        torch.testing.assert_close(vae.denormalize(vae.normalize(raw)), raw, rtol=1e-5, atol=1e-6)


def test_scaling_factor_override_and_per_frame_defaults_unchanged(tiny_dirs):
    x = _video(B=1, T=9)
    with torch.no_grad():
        own = build_vae(VAEConfig(path=str(tiny_dirs["hunyuan"]))).encode(x, sample_posterior=False)
        doubled = build_vae(VAEConfig(path=str(tiny_dirs["hunyuan"]), scaling_factor=2 * 0.476986))
        torch.testing.assert_close(doubled.encode(x, sample_posterior=False), 2 * own, rtol=1e-5, atol=1e-6)
        # A bundle written before "auto" says type kl, 0.18215, 4 frames per call: "auto" and the config's scale
        # give the same latents bit for bit; the new default of 32 frames per call only moves float rounding.
        old = build_vae(VAEConfig(type="kl", path=str(tiny_dirs["kl"]), scaling_factor=0.18215, micro_batch_size=4))
        auto = build_vae(VAEConfig(path=str(tiny_dirs["kl"]), micro_batch_size=4))
        default = build_vae(VAEConfig(path=str(tiny_dirs["kl"])))
        assert default.scaling_factor == 0.18215 and default.micro_batch_size == 32
        z_old = old.encode(x, sample_posterior=False)
        assert torch.equal(auto.encode(x, sample_posterior=False), z_old)
        torch.testing.assert_close(default.encode(x, sample_posterior=False), z_old, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["wan2.1", "ltx"])
def test_micro_batching_over_clips_and_posterior_sampling(kind, tiny_dirs):
    x = _video(B=2, T=9)
    one = load_autoencoder(tiny_dirs[kind], micro_batch_size=1)
    all_ = load_autoencoder(tiny_dirs[kind], micro_batch_size=2)
    assert (one.micro_batch_size, load_autoencoder(tiny_dirs[kind]).micro_batch_size) == (1, 1)
    with torch.no_grad():
        z = one.encode(x, sample_posterior=False)
        torch.testing.assert_close(all_.encode(x, sample_posterior=False), z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(all_.decode(z), one.decode(z), rtol=1e-5, atol=1e-5)
        a = one.encode(x, generator=torch.Generator().manual_seed(1))
        b = one.encode(x, generator=torch.Generator().manual_seed(1))
        c = one.encode(x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, z)


def test_wrong_frame_counts_name_the_nearest_valid_ones(tiny_dirs):
    wan = load_autoencoder(tiny_dirs["wan2.1"])
    with pytest.raises(ValueError, match=r"16 frames do not fit AutoencoderKLWan \(4x causal .*4k\+1.*13 and 17"):
        wan.get_latent_size((16, 16, 16))
    with pytest.raises(ValueError, match="13 and 17"):
        wan.encode(_video(B=1, T=16))
    assert wan.nearest_valid_num_frames(16) == (13, 17) and wan.nearest_valid_num_frames(17) == (17,)
    assert wan.valid_num_frames(1) and wan.valid_num_frames(17) and not wan.valid_num_frames(16)
    ltx = load_autoencoder(tiny_dirs["ltx"])
    with pytest.raises(ValueError, match=r"8k\+1 frames\); nearest valid frame counts: 9 and 17"):
        ltx.get_latent_size((16, 16, 16))
    cog = load_autoencoder(tiny_dirs["cogvideox"])  # 4x in time, but 13 frames would decode to 16
    assert cog.get_latent_size((17, 16, 16)) == (5, 2, 2) and cog.nearest_valid_num_frames(13) == (9, 17)
    with pytest.raises(ValueError, match=r"H=12 is not divisible .* 8"):
        wan.get_latent_size((17, 12, 16))
    per_frame = load_autoencoder(tiny_dirs["kl"])
    assert per_frame.get_latent_size((16, 16, 16)) == (16, 8, 8) and per_frame.nearest_valid_num_frames(16) == (16,)


def test_frame_rule_arithmetic():
    assert [n for n in range(30) if valid_num_frames(n, 4, causal=True)] == [1, 5, 9, 13, 17, 21, 25, 29]
    assert [n for n in range(13) if valid_num_frames(n, 4, causal=False)] == [4, 8, 12]
    assert nearest_valid_num_frames(0, 4, True) == (1,) and nearest_valid_num_frames(2, 8, True) == (1, 9)
    assert nearest_valid_num_frames(3, 4, False) == (4,) and nearest_valid_num_frames(10, 4, False) == (8, 12)
    assert compressed_size((17, 512, 512), (4, 8, 8), causal=True) == (5, 64, 64)
    assert compressed_size((16, 256, 256), (1, 8, 8), causal=False) == (16, 32, 32)
    assert compressed_size((16, 256, 256), (4, 8, 8), causal=False) == (4, 32, 32)
    with pytest.raises(ValueError, match="frame_step must be a multiple"):
        compressed_size((17, 16, 16), (4, 8, 8), causal=True, frame_step=6)


def test_tiling_switch_and_tiled_shapes(tiny_dirs):
    vae = build_vae(VAEConfig(path=str(tiny_dirs["wan2.1"]), tiling=True))
    assert vae.module.use_tiling and not load_autoencoder(tiny_dirs["wan2.1"]).module.use_tiling
    assert build_vae(VAEConfig(path=str(tiny_dirs["kl"]), tiling=True)).module.use_tiling
    vae.module.enable_tiling(16, 16, 8, 8)  # tiles smaller than the clip, so the tiled path really runs
    x = _video(B=1, T=9, H=32, W=32)
    with torch.no_grad():
        z = vae.encode(x, sample_posterior=False)
        assert z.shape == (1, 4, 3, 4, 4) and vae.decode(z).shape == x.shape


def test_loads_from_hf_cache_subfolder_in_bf16(tiny_dirs, tmp_path, monkeypatch):
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--tiny-org--tiny-wan"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_dirs["wan2.1"], repo / "snapshots" / commit / "vae")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    vae = build_vae(VAEConfig(path="tiny-org/tiny-wan", subfolder="vae"), dtype=torch.bfloat16)
    assert isinstance(vae, VideoAutoencoder3D) and vae.module.dtype == torch.bfloat16
    with torch.no_grad():
        z = vae.encode(_video(B=1, T=5))
    assert z.dtype == torch.bfloat16 and z.shape == (1, 4, 2, 2, 2)


def test_loading_errors_name_the_input(tiny_dirs, tmp_path):
    empty = tmp_path / "no_config"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no_config.*has no config.json"):
        build_vae(VAEConfig(path=str(empty)))
    pipe = tmp_path / "pipe"
    shutil.copytree(tiny_dirs["wan2.1"], pipe / "vae")
    (pipe / "model_index.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="subfolder 'vae'"):
        load_autoencoder(pipe)
    assert load_autoencoder(pipe, subfolder="vae").compression == (4, 8, 8)
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        load_autoencoder(tmp_path / "no_such_vae")
    mochi = tmp_path / "mochi"
    mochi.mkdir()
    (mochi / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLMochi"}))
    with pytest.raises(ValueError, match=r"'AutoencoderKLMochi'.*supported: AutoencoderKL, AutoencoderKLWan"):
        build_vae(VAEConfig(path=str(mochi)))
    with pytest.raises(ValueError, match="names AutoencoderKLWan.*vae.type 'auto'"):
        build_vae(VAEConfig(type="kl", path=str(tiny_dirs["wan2.1"])))
    with pytest.raises(ValueError, match="per-frame AutoencoderKL"):
        VideoAutoencoder3D.from_pretrained(tiny_dirs["kl"])
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny_dirs["hunyuan"] / "config.json", no_weights)
    with pytest.raises(FileNotFoundError, match="AutoencoderKLHunyuanVideo weights from .*no_weights"):
        load_autoencoder(no_weights)
    with pytest.raises(ValueError, match="unknown tiny VAE kind 'mochi'"):
        make_tiny_vae(tmp_path / "x", kind="mochi")
    with pytest.raises(ValueError, match="vae.type must be 'auto', 'kl' or 'identity'"):
        VAEConfig(type="wan", path="x")


def test_identity_is_an_autoencoder_too():
    vae = build_vae(VAEConfig(type="identity"))
    assert isinstance(vae, IdentityAutoencoder)
    assert (vae.compression, vae.causal, vae.out_channels, vae.patch_size) == ((1, 1, 1), False, 3, (1, 1, 1))
    assert vae.describe()["class"] == "identity" and list(vae.state_dict()) == []
    assert vae.get_latent_size((3, 7, 9)) == (3, 7, 9)
    x = _video(B=1, T=2, H=7, W=9)
    torch.testing.assert_close(vae.decode(vae.encode(x)), x)
    assert vae.decode(x * 3).abs().max() == 1  # decode clamps to [-1, 1] like the real autoencoders


@pytest.mark.parametrize("name", list(AUTOENCODER_PRESETS))
def test_presets_agree_with_what_the_loader_reads(name):
    """The forecast's factors (no weights) are what the loaded model's config gives, for the published configs."""
    preset = AUTOENCODER_PRESETS[name]
    cls = AUTOENCODER_CLASSES[preset.class_name]
    params = inspect.signature(cls.module_class.__init__).parameters
    config = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    config.update(preset.config)
    shape = preset.shape
    assert cls.compression(config) == shape.compression
    assert cls.latent_channels(config) == shape.latent_channels
    assert cls.causal == shape.causal and shape.compression[0] * cls.latent_frame_step == shape.step
