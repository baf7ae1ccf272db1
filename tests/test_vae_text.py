"""VAE and T5 wrappers: tiny random models saved to disk and loaded back through the real loaders."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from opensora.config import ConfigError, load_config
from opensora.models.text_encoder import TextEncoderConfig, T5TextEncoder, build_text_encoder, make_tiny_t5
from opensora.models.vae import (
    VAEConfig,
    VideoAutoencoderKL,
    build_vae,
    make_tiny_vae,
)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return make_tiny_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    return make_tiny_t5(tmp_path_factory.mktemp("t5"))


def _video(B: int = 2, T: int = 5, H: int = 16, W: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(B, 3, T, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _fake_hf_cache(cache: Path, repo_id: str, src: Path) -> None:
    """Lays ``src`` out as the huggingface_hub cache does after a download of ``repo_id``."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)


# ----------------------------------------------------------------------------------------------- VAE


def test_vae_config_checks():
    assert load_config(VAEConfig, overrides=["type=identity"]).type == "identity"
    with pytest.raises(ConfigError, match="vae.type"):
        load_config(VAEConfig, overrides=["type=vqgan"])
    with pytest.raises(ValueError, match="vae.path"):
        VAEConfig(type="kl", path=None)
    with pytest.raises(ValueError, match="micro_batch_size"):
        VAEConfig(path="x", micro_batch_size=0)


def test_vae_shapes_and_frozen(vae_dir: Path):
    vae = build_vae(VAEConfig(path=str(vae_dir)))
    assert isinstance(vae, VideoAutoencoderKL)
    assert vae.out_channels == 4 and vae.patch_size == (1, 2, 2)
    assert vae.get_latent_size((5, 16, 24)) == (5, 8, 12)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    x = _video()
    z = vae.encode(x, sample_posterior=False)
    assert z.shape == (2, 4, 5, 8, 8)
    out = vae.decode(z)
    assert out.shape == x.shape
    assert out.min() >= -1 and out.max() <= 1


def test_vae_is_per_frame_and_scaled(vae_dir: Path):
    vae = VideoAutoencoderKL.from_pretrained(vae_dir, scaling_factor=0.5)
    x = _video(B=2, T=3)
    with torch.no_grad():
        z = vae.encode(x, sample_posterior=False)
        for b in range(2):
            for t in range(3):
                frame_z = vae.module.encode(x[b : b + 1, :, t]).latent_dist.mode() * 0.5  # (1, 4, 8, 8)
                torch.testing.assert_close(z[b : b + 1, :, t], frame_z, rtol=1e-5, atol=1e-5)
        frame_x = vae.module.decode(z[1:2, :, 2] / 0.5).sample.clamp(-1, 1)
        torch.testing.assert_close(vae.decode(z)[1:2, :, 2], frame_x, rtol=1e-5, atol=1e-5)


def test_vae_micro_batching_matches_one_shot(vae_dir: Path):
    x = _video(B=2, T=5)
    one_shot = VideoAutoencoderKL.from_pretrained(vae_dir, micro_batch_size=100)
    with torch.no_grad():
        z_ref = one_shot.encode(x, sample_posterior=False)
        x_ref = one_shot.decode(z_ref)
        for micro_batch_size in (1, 3, 4):
            vae = VideoAutoencoderKL.from_pretrained(vae_dir, micro_batch_size=micro_batch_size)
            torch.testing.assert_close(vae.encode(x, sample_posterior=False), z_ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(vae.decode(z_ref), x_ref, rtol=1e-5, atol=1e-5)


def test_vae_posterior_sampling_follows_generator(vae_dir: Path):
    vae = build_vae(VAEConfig(path=str(vae_dir)))
    x = _video(B=1, T=2)
    with torch.no_grad():
        a = vae.encode(x, generator=torch.Generator().manual_seed(1))
        b = vae.encode(x, generator=torch.Generator().manual_seed(1))
        c = vae.encode(x, generator=torch.Generator().manual_seed(2))
        mode = vae.encode(x, sample_posterior=False)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, mode)


def test_vae_save_load_round_trip_and_subfolder(vae_dir: Path, tmp_path: Path):
    vae = VideoAutoencoderKL.from_pretrained(vae_dir)
    vae.save_pretrained(tmp_path / "repo" / "vae")
    again = VideoAutoencoderKL.from_pretrained(tmp_path / "repo", subfolder="vae")
    x = _video(B=1, T=2)
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x, sample_posterior=False), vae.encode(x, sample_posterior=False))


def test_vae_errors_name_the_input(tmp_path: Path, vae_dir: Path):
    missing = tmp_path / "no_such_vae"
    with pytest.raises(FileNotFoundError, match="no_such_vae"):
        build_vae(VAEConfig(path=str(missing)))
    with pytest.raises(FileNotFoundError, match="not-a-real-org/vae"):
        VideoAutoencoderKL.from_pretrained("not-a-real-org/vae")
    vae = VideoAutoencoderKL.from_pretrained(vae_dir)
    with pytest.raises(ValueError, match=r"\(8, 15, 16\).*H=15"):
        vae.get_latent_size((8, 15, 16))


def test_make_tiny_vae_is_deterministic(tmp_path: Path):
    a = load_file(make_tiny_vae(tmp_path / "a") / "diffusion_pytorch_model.safetensors")
    b = load_file(make_tiny_vae(tmp_path / "b") / "diffusion_pytorch_model.safetensors")
    c = load_file(make_tiny_vae(tmp_path / "c", seed=1) / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------------------------------------ T5


def test_text_encoder_config_checks():
    assert load_config(TextEncoderConfig, overrides=["path=/x", "max_length=7"]).max_length == 7
    with pytest.raises(ConfigError, match="max_length"):
        load_config(TextEncoderConfig, overrides=["path=/x", "max_length=0"])
    with pytest.raises(ValueError, match="text_encoder.path"):
        TextEncoderConfig()
    with pytest.raises(ValueError, match="text_encoder.type"):
        TextEncoderConfig(type="clip", path="/x")


def test_t5_encode_shapes_and_mask(t5_dir: Path):
    encoder = build_text_encoder(TextEncoderConfig(path=str(t5_dir), max_length=12))
    assert encoder.output_dim == 32 and encoder.max_length == 12
    assert not encoder.model.training
    prompts = ["a red ball", "a blue cube moving slowly to the left"]
    out = encoder.encode(prompts)
    assert out["y"].shape == (2, 1, 12, 32) and out["y"].dtype == torch.float32
    assert out["mask"].shape == (2, 12) and out["mask"].dtype == torch.long
    lengths = [len(encoder.tokenizer(p)["input_ids"]) for p in prompts]  # words + </s>
    assert out["mask"].sum(dim=1).tolist() == lengths
    for row, n in zip(out["mask"], lengths):  # ones then zeros
        assert row[:n].all() and not row[n:].any()
    long_prompt = " ".join(["red"] * 50)
    assert encoder.encode([long_prompt])["mask"].sum() == 12  # truncated to max_length
    assert not out["y"].requires_grad


def test_t5_different_prompts_differ_and_padding_does_not_leak(t5_dir: Path):
    encoder = T5TextEncoder.from_pretrained(t5_dir, max_length=16)
    batch = encoder.encode(["a green sphere", "a yellow star spinning over the city at night"])
    n = int(batch["mask"][0].sum())
    assert n < 16
    # The same prompt with no padding at all: the pad tokens in the batch must be masked out of attention.
    alone = T5TextEncoder(encoder.model, encoder.tokenizer, max_length=n).encode(["a green sphere"])
    assert alone["mask"].all()
    torch.testing.assert_close(batch["y"][0, :, :n], alone["y"][0], rtol=1e-5, atol=1e-5)
    other = encoder.encode(["a purple sphere"])
    assert (other["y"][0, 0, :n] - alone["y"][0, 0, :n]).abs().max() > 1e-3


def test_t5_tokenizer_covers_unseen_words(t5_dir: Path):
    encoder = T5TextEncoder.from_pretrained(t5_dir)
    tokenizer = encoder.tokenizer
    ids = tokenizer("Xylophones zigzag quizzically, 2024!")["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(tokenizer.tokenize("a red ball rolling left")) == 5  # known words are single pieces
    # The transformers tokenizer gives the same ids as the raw tokenizer file it was saved as.
    raw = Tokenizer.from_file(str(t5_dir / "tokenizer.json"))
    for prompt in ["A dog runs across the beach at sunset.", "zooming camera, 3 birds", "unknownword"]:
        assert tokenizer(prompt)["input_ids"] == raw.encode(prompt).ids


def test_t5_deterministic_files_and_outputs(t5_dir: Path, tmp_path: Path):
    other = make_tiny_t5(tmp_path / "again")
    assert (other / "tokenizer.json").read_bytes() == (t5_dir / "tokenizer.json").read_bytes()
    a = load_file(t5_dir / "model.safetensors")
    b = load_file(other / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    prompts = ["a red ball bouncing", "waves on the sea"]
    y1 = T5TextEncoder.from_pretrained(t5_dir).encode(prompts)["y"]
    y2 = T5TextEncoder.from_pretrained(other).encode(prompts)["y"]
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)


def test_t5_dtype_device_and_hf_cache_repo_id(t5_dir: Path, tmp_path: Path, monkeypatch):
    _fake_hf_cache(tmp_path / "hub", "tiny-org/tiny-t5", t5_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = TextEncoderConfig(path="tiny-org/tiny-t5", max_length=8)
    encoder = build_text_encoder(cfg, device="cpu", dtype=torch.bfloat16)
    out = encoder.encode(["a cat"], device="cpu")
    assert out["y"].dtype == torch.bfloat16 and out["y"].shape == (1, 1, 8, 32)


def test_t5_subfolders(t5_dir: Path, tmp_path: Path):
    # Diffusers pipeline repos keep the encoder and the tokenizer in separate sub-directories.
    shutil.copytree(t5_dir, tmp_path / "pipe" / "text_encoder")
    shutil.copytree(t5_dir, tmp_path / "pipe" / "tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "pipe" / "text_encoder" / name).unlink()
    cfg = TextEncoderConfig(path=str(tmp_path / "pipe"), subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    assert build_text_encoder(cfg).encode(["a cat"])["y"].shape == (1, 1, 120, 32)


def test_t5_errors(t5_dir: Path, tmp_path: Path):
    encoder = T5TextEncoder.from_pretrained(t5_dir)
    with pytest.raises(ValueError, match="non-empty"):
        encoder.encode([])
    with pytest.raises(ValueError, match="non-empty list"):
        encoder.encode("a bare string")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match="no_such_t5"):
        build_text_encoder(TextEncoderConfig(path=str(tmp_path / "no_such_t5")))
