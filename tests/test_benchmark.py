"""tools/benchmark.py on CPU with STDiT-debug: the JSON record is complete and internally consistent."""

import json

import pytest

from opensora.accounting.flops import train_flops_per_sample, video_tokens
from opensora.models.stdit import stdit_config
from tools import benchmark

BASE = ["--model", "STDiT-debug", "--frames", "4", "--height", "32", "--width", "32", "--batch", "2",
        "--steps", "2", "--warmup", "1", "--engine", "ddp"]


@pytest.mark.parametrize("extra", [["--cached-latents", "--vae-downsample", "1"],
                                   ["--vae-downsample", "1", "--grad-ckpt-blocks", "1"],
                                   ["--cached-latents", "--vae-downsample", "1", "--engine", "fsdp"]])
def test_benchmark_record(tmp_path, extra, capsys):
    out = tmp_path / "b.json"
    assert benchmark.main(BASE + extra + ["--out", str(out)]) == 0
    r = json.loads(out.read_text())
    cfg = stdit_config("STDiT-debug", **({} if "--cached-latents" in extra else {"in_channels": 3}))
    assert r["latent"] == [4, 32, 32]
    assert r["samples_per_s_per_device"] == pytest.approx(2 / r["step_s"])
    assert r["train_tflop_per_sample"] == pytest.approx(train_flops_per_sample(cfg, (4, 32, 32), 16) / 1e12)
    assert r["tokens_per_s_per_device"] == pytest.approx(r["samples_per_s_per_device"] * video_tokens(cfg, (4, 32, 32)))
    assert r["achieved_tflops_per_device"] == pytest.approx(r["samples_per_s_per_device"] * r["train_tflop_per_sample"])
    assert 0 < r["mfu_vs_matmul_peak"] == pytest.approx(r["achieved_tflops_per_device"] / r["matmul_peak_tflops"])
    assert r["peak_memory_gib"] > 0 and r["mean_loss"] > 0
    if "--cached-latents" in extra:
        assert r["time_shares"] == {}
    else:
        assert sum(r["time_shares"].values()) == pytest.approx(1.0) and r["grad_ckpt"]
        assert (r["grad_ckpt_blocks"], r["depth"]) == (1, 2)
    assert "samples/s/device" in capsys.readouterr().out


def test_benchmark_on_a_3d_vaes_latents(tmp_path):
    """--vae-compression / --latent-channels: the step sees a causal VAE's latent (17 frames -> 5) and channels."""
    out = tmp_path / "b.json"
    wan = ["--frames", "17", "--cached-latents", "--vae-compression", "4x8x8", "--latent-channels", "16"]
    assert benchmark.main(BASE[:2] + BASE[4:] + wan + ["--out", str(out), "--no-matmul-peak"]) == 0
    r = json.loads(out.read_text())
    cfg = stdit_config("STDiT-debug", in_channels=16)
    assert (r["latent"], r["latent_channels"]) == ([5, 4, 4], 16)
    assert (r["vae_compression"], r["vae_causal"]) == ([4, 8, 8], True)
    assert r["train_tflop_per_sample"] == pytest.approx(train_flops_per_sample(cfg, (5, 4, 4), 16) / 1e12)
    with pytest.raises(SystemExit, match="16 frames do not fit.*13 and 17"):
        benchmark.main(BASE + ["--frames", "16"] + wan[2:])
    with pytest.raises(SystemExit):  # two latent shapes
        benchmark.main(BASE + wan + ["--vae-downsample", "8"])


def test_benchmark_rejects_bad_sizes():
    with pytest.raises(SystemExit, match="not divisible"):
        benchmark.main(BASE[:5] + ["31"] + BASE[6:] + ["--cached-latents", "--vae-downsample", "1"])
    with pytest.raises(SystemExit, match="--set"):
        benchmark.main(BASE + ["--cached-latents", "--set", "no_such_field=1"])


def test_benchmark_json_feeds_the_cost_forecast(tmp_path, capsys):
    """The benchmark's measured MFU is what `tools/cost.py forecast --benchmark` prices Open-Sora 1.0's stage 2 at."""
    from tools import cost

    out = tmp_path / "b.json"
    benchmark.main(BASE + ["--cached-latents", "--vae-downsample", "1", "--out", str(out), "--no-matmul-peak"])
    mfu = json.loads(out.read_text())["mfu"]
    capsys.readouterr()
    assert cost.main(["forecast", "--gpus", "64", "--gpu-type", "h800", "--benchmark", str(out), "--opensora-v1",
                      "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    v1 = report["opensora_v1"]
    assert report["mfu"] == v1["forecast"]["mfu"] == mfu
    # GPU-hours scale inversely with MFU: the reported 2808 h at its implied MFU, rescaled to ours.
    assert v1["forecast"]["gpu_hours"] == pytest.approx(v1["reported_gpu_hours"] * v1["implied_mfu"] / mfu, rel=1e-6)


@pytest.mark.parametrize("lora", [None, 4])
def test_benchmark_of_a_family_full_and_lora(tmp_path, lora):
    """Any family's size (tiny Wan here, on Wan 2.1's latent layout): the family's FLOPs, tokens and text length;
    with --lora only the adapters train."""
    from opensora.models.families import FAMILIES

    wan = FAMILIES["wan"]
    out = tmp_path / "b.json"
    argv = ["--model", "tiny-wan2.1", "--frames", "17", "--height", "32", "--width", "32", "--batch", "2", "--steps",
            "2", "--warmup", "1", "--engine", "fsdp", "--cached-latents", "--vae-compression", "4x8x8",
            "--latent-channels", "4", "--no-matmul-peak", "--out", str(out)] + (["--lora", str(lora)] if lora else [])
    assert benchmark.main(argv) == 0
    r = json.loads(out.read_text())
    cfg = wan.size_config("tiny-wan2.1")
    assert (r["family"], r["latent"], r["text_len"], r["depth"], r["lora_rank"]) == ("wan", [5, 4, 4], 512, 2, lora)
    assert r["train_tflop_per_sample"] == pytest.approx(wan.train_flops_per_sample(cfg, (5, 4, 4), 512) / 1e12)
    assert r["tokens_per_s_per_device"] == pytest.approx(r["samples_per_s_per_device"] * 20)  # 5 x 2 x 2
    assert (r["trainable_params"] < 0.2 * r["params"]) == bool(lora) and r["mean_loss"] > 0
    with pytest.raises(SystemExit, match="cached-latents"):
        benchmark.main([a for a in argv if a not in ("--cached-latents", "--vae-compression", "4x8x8")])
