"""Model families (opensora/models/families): STDiT delegates unchanged; the Wan and LTX wrappers equal the diffusers
modules called as their pipelines call them; FLOP formulas vs FlopCounterMode; LoRA through peft and its diffusers
export. Tiny random models built here; nothing is downloaded."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, WanPipeline
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from opensora.accounting import stdit_forward_flops
from opensora.diffusion import RFlow
from opensora.models import STDiT, stdit_config
from opensora.models.families import FAMILIES, family_of_size, get_family
from opensora.models.text_encoder import TextEncoderConfig, build_text_encoder, make_tiny_t5
from opensora.models.lora import (
    LORA_WEIGHTS_NAME, LoraSettings, apply_lora, lora_parameter_names, lora_state_dict, save_diffusers_lora,
)

WAN, LTX, STDIT = FAMILIES["wan"], FAMILIES["ltx"], FAMILIES["stdit"]
TINY = {"wan": "tiny-wan2.1", "ltx": "tiny-ltx", "stdit": "STDiT-debug"}


def _tiny(family, seed=0, **overrides):
    torch.manual_seed(seed)
    return family.build(TINY[family.name], **overrides).eval()


def _inputs(family, model, B=2, latent=(3, 4, 4), L=7, seed=1):
    """x (B, C, T, H, W), t (B,), y (B, 1, L, Ct) whose padded positions hold non-zero states (as a T5 encoder's
    output does), and a mask with a short and a full prompt."""
    g = torch.Generator().manual_seed(seed)
    cfg = family.config_of(model)
    x = torch.randn(B, family.in_channels(cfg), *latent, generator=g)
    y = torch.randn(B, 1, L, family.text_dim(cfg), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 4:] = 0
    return x, torch.tensor([250.0, 900.0])[:B], y, mask


# ---------------------------------------------------------------------------------------------------- the dict


def test_sizes_name_their_family_and_unknown_names_list_the_known_ones():
    assert family_of_size("Wan2.1-T2V-1.3B") is WAN
    assert family_of_size("tiny-ltx") is LTX
    assert family_of_size("STDiT-XL/2") is STDIT
    with pytest.raises(KeyError, match="Wan2.1-T2V-1.3B"):
        family_of_size("Wan2.1-T2V-1.4B")
    with pytest.raises(KeyError, match="stdit, wan, ltx"):
        get_family("hunyuan")


def test_published_sizes_have_their_published_parameter_counts():
    # Wan2.1-T2V-1.3B is 1.42e9 parameters, LTX-Video 2B 1.92e9 (meta device: no memory).
    with torch.device("meta"):
        wan = WAN.build("Wan2.1-T2V-1.3B")
        ltx = LTX.build("LTX-Video-2B")
    assert sum(p.numel() for p in wan.parameters()) == pytest.approx(1.42e9, rel=0.01)
    assert sum(p.numel() for p in ltx.parameters()) == pytest.approx(1.92e9, rel=0.01)


# ---------------------------------------------------------------------------------------------------- STDiT


def test_stdit_family_is_the_stdit_code_unchanged():
    model = _tiny(STDIT)
    assert STDIT.model_fn(model) is model  # the objectives call the model itself: every number bit for bit
    assert STDIT.blocks(model) is model.blocks
    assert model.config == stdit_config("STDiT-debug")
    x, t, y, mask = _inputs(STDIT, model, latent=(2, 8, 8), L=16)
    torch.testing.assert_close(STDIT.forward(model, x, t, y, mask), model(x, t, y, mask), rtol=0, atol=0)
    for latent in [(16, 32, 32), (4, 8, 8)]:
        for cfg in (model.config, stdit_config("STDiT-XL/2")):
            assert STDIT.forward_flops(cfg, latent) == stdit_forward_flops(cfg, latent)
            assert STDIT.train_flops_per_sample(cfg, latent) == 3 * stdit_forward_flops(cfg, latent)


# ---------------------------------------------------------------------------------------------------- Wan


def _wan_pipeline_text(y, mask):
    """Text states as WanPipeline._get_t5_prompt_embeds makes them: cut to the real length, zero-padded."""
    out = torch.zeros_like(y[:, 0])
    for i, n in enumerate(mask.sum(1).tolist()):
        out[i, :n] = y[i, 0, :n]
    return out


def test_wan_forward_equals_the_diffusers_module_called_as_wan_pipeline_calls_it():
    model = _tiny(WAN)
    x, t, y, mask = _inputs(WAN, model)
    with torch.no_grad():
        ours = WAN.forward(model, x, t, y, mask)
        theirs = model(hidden_states=x, timestep=t, encoder_hidden_states=_wan_pipeline_text(y, mask),
                       return_dict=False)[0]
    assert ours.shape == x.shape and ours.dtype == torch.float32
    torch.testing.assert_close(ours, -theirs, rtol=0, atol=0)  # prediction sign: noise - x_0 -> x_0 - noise


def test_wan_text_from_our_umt5_encoder_is_wan_pipelines_prompt_embeds(tmp_path):
    assert TextEncoderConfig(type=WAN.text.encoder, path="x").type == "umt5"
    encoder = build_text_encoder(TextEncoderConfig(type="umt5", path=str(make_tiny_t5(tmp_path, encoder_type="umt5")),
                                                   max_length=16))
    prompts = ["a red ball rolls left", "two small birds fly over the blue sea at sunset"]
    model = _tiny(WAN)
    pipe = WanPipeline(tokenizer=encoder.tokenizer, text_encoder=encoder.model, vae=None, scheduler=None,
                       transformer=model)
    with torch.no_grad():
        text = encoder.encode(prompts)
        theirs = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=16, device=torch.device("cpu"))
        x = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10.0, 990.0])
        ours = WAN.forward(model, x, t, text["y"], text["mask"])
        ref = model(hidden_states=x, timestep=t, encoder_hidden_states=theirs, return_dict=False)[0]
    assert text["mask"][0].sum() < 16 and theirs[0, -1].abs().max() == 0  # a padded prompt, zero-padded there
    torch.testing.assert_close(ours, -ref, rtol=0, atol=0)


def test_wan_per_frame_timesteps_are_wan22_ti2v_per_token_timesteps():
    model = _tiny(WAN)
    x, _, y, mask = _inputs(WAN, model)
    t_frames = torch.tensor([[0.0, 600.0, 600.0], [0.0, 80.0, 80.0]])  # latent frame 0 given (t = 0)
    # WanPipeline with expand_timesteps: (mask[0][0][:, ::2, ::2] * t).flatten() over a (T, H, W) latent mask.
    latent_mask = torch.ones(3, 4, 4)
    latent_mask[0] = 0
    per_token = torch.stack([(latent_mask[:, ::2, ::2] * t).flatten() for t in (600.0, 80.0)])
    with torch.no_grad():
        ours = WAN.forward(model, x, t_frames, y, mask)
        theirs = model(hidden_states=x, timestep=per_token, encoder_hidden_states=_wan_pipeline_text(y, mask),
                       return_dict=False)[0]
    torch.testing.assert_close(ours, -theirs, rtol=0, atol=0)


def test_wan_frame_timesteps_only_for_the_ti2v_model():
    assert not WAN.frame_timesteps(WAN.size_config("Wan2.1-T2V-1.3B"))
    assert WAN.frame_timesteps(WAN.size_config("Wan2.2-TI2V-5B"))


def test_a_euler_step_with_our_sign_equals_diffusers_flow_match_euler():
    """One step from t = 1 (timestep 1000) to 0: our RFlow on the family's model_fn and diffusers' scheduler on the
    raw transformer output agree, so sign and timestep scale match the pipelines'."""
    model = _tiny(WAN)
    x, _, y, mask = _inputs(WAN, model)
    with torch.no_grad():
        ours = RFlow(num_sampling_steps=1).sample(WAN.model_fn(model), x, model_kwargs=dict(y=y, mask=mask))
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
        scheduler.set_timesteps(1)
        (t,) = scheduler.timesteps
        pred = model(hidden_states=x, timestep=t.expand(2), encoder_hidden_states=_wan_pipeline_text(y, mask),
                     return_dict=False)[0]
        theirs = scheduler.step(pred, t, x, return_dict=False)[0]
    assert float(t) == 1000.0
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- LTX


def test_ltx_forward_equals_the_diffusers_module_called_as_ltx_pipeline_calls_it():
    model = _tiny(LTX)
    x, t, y, mask = _inputs(LTX, model)
    T, H, W = x.shape[2:]
    with torch.no_grad():
        ours = LTX.forward(model, x, t, y, mask)
        packed = LTXPipeline._pack_latents(x, 1, 1)
        out = model(hidden_states=packed, encoder_hidden_states=y[:, 0], timestep=t,
                    encoder_attention_mask=mask.bool(), num_frames=T, height=H, width=W,
                    rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0]
        theirs = LTXPipeline._unpack_latents(out, T, H, W, 1, 1)
    torch.testing.assert_close(ours, -theirs, rtol=0, atol=0)


def test_ltx_per_frame_timesteps_give_each_frames_tokens_its_t():
    model = _tiny(LTX)
    x, _, y, mask = _inputs(LTX, model)
    T, H, W = x.shape[2:]
    t_frames = torch.tensor([[0.0, 500.0, 500.0], [0.0, 40.0, 40.0]])
    # LTXImageToVideoPipeline: timestep * (1 - conditioning_mask) per token, frame 0 given.
    cond = torch.zeros(1, 1, T, H, W)
    cond[:, :, 0] = 1
    per_token = torch.tensor([[500.0], [40.0]]) * (1 - LTXPipeline._pack_latents(cond, 1, 1)[..., 0])
    with torch.no_grad():
        ours = LTX.forward(model, x, t_frames, y, mask)
        out = model(hidden_states=LTXPipeline._pack_latents(x, 1, 1), encoder_hidden_states=y[:, 0],
                    timestep=per_token, encoder_attention_mask=mask.bool(), num_frames=T, height=H, width=W,
                    rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0]
    torch.testing.assert_close(ours, -LTXPipeline._unpack_latents(out, T, H, W, 1, 1), rtol=0, atol=0)


def test_ltx_dynamic_shift_is_the_diffusers_scheduler_time_shift():
    shift = LTX.sampler.shift
    assert math.log(shift.at(1024)) == pytest.approx(0.95) and math.log(shift.at(4096)) == pytest.approx(2.05)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.95, max_shift=2.05,
                                                base_image_seq_len=1024, max_image_seq_len=4096)
    sigmas = torch.linspace(0.05, 0.95, 7, dtype=torch.float64)
    s = shift.at(2000)
    mu = math.log(s)
    ours = RFlow(shift=s)._shift(sigmas)
    torch.testing.assert_close(ours, scheduler.time_shift(mu, 1.0, sigmas), rtol=1e-12, atol=1e-12)


def test_a_half_given_dynamic_shift_is_an_error():
    from opensora.models.families import FlowShift

    with pytest.raises(ValueError, match="max_shift"):
        FlowShift(base_tokens=1024, max_tokens=4096, base_shift=0.95)
    assert FlowShift(3.0).at(10_000) == 3.0


# ---------------------------------------------------------------------------------------------------- FLOPs


def _counted_flops(family, model, latent, L, per_frame):
    x, t, y, mask = _inputs(family, model, latent=latent, L=L)
    if per_frame:
        t = t[:, None].repeat(1, latent[0])
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        family.forward(model, x, t, y, mask)
    return counter.get_total_flops() / x.shape[0]


@pytest.mark.parametrize("name", ["wan", "ltx"])
@pytest.mark.parametrize("latent, L, per_frame", [((3, 4, 4), 7, False), ((2, 6, 8), 5, False),
                                                  ((3, 4, 4), 7, True)])
def test_flop_formula_is_within_5_percent_of_the_flop_counter(name, latent, L, per_frame):
    family = FAMILIES[name]
    model = _tiny(family)
    counted = _counted_flops(family, model, latent, L, per_frame)
    formula = family.forward_flops(model.config, latent, L, frame_timesteps=per_frame)
    assert formula == pytest.approx(counted, rel=0.05)


def test_wan_flops_count_the_512_padded_text_tokens():
    cfg = WAN.size_config("Wan2.1-T2V-1.3B")
    latent = (21, 60, 104)  # 81 x 480 x 832 through the 4x8x8 Wan VAE
    assert WAN.forward_flops(cfg, latent) == WAN.forward_flops(cfg, latent, 512)
    assert WAN.forward_flops(cfg, latent) > WAN.forward_flops(cfg, latent, 100)
    assert WAN.video_tokens(cfg, latent) == 21 * 30 * 52


# ---------------------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("name", ["wan", "ltx", "stdit"])
def test_lora_targets_only_block_linears_and_fresh_adapters_change_nothing(name):
    family = FAMILIES[name]
    base = _tiny(family)
    x, t, y, mask = _inputs(family, base, latent=(2, 4, 4))
    with torch.no_grad():
        before = family.forward(base, x, t, y, mask)
    model = apply_lora(base, family, LoraSettings(rank=2, alpha=4.0))
    adapted = {n.split(".lora_A")[0] for n in lora_parameter_names(model) if ".lora_A." in n}
    block_prefix = "transformer_blocks." if name == "ltx" else "blocks."
    assert adapted and all(n.startswith(block_prefix) for n in adapted)
    per_block = {"wan": 10, "ltx": 10, "stdit": 9}[name]  # 2 x (q, k, v, out) + 2 FFN; STDiT: 7 attention + 2 MLP
    assert len(adapted) == per_block * len(family.blocks(model))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(lora_parameter_names(model))
    with torch.no_grad():
        torch.testing.assert_close(family.forward(model, x, t, y, mask), before, rtol=0, atol=0)  # lora_B = 0


@pytest.mark.parametrize("name", ["wan", "ltx"])
def test_a_lora_step_changes_only_the_adapters_and_their_state_is_small(name):
    family = FAMILIES[name]
    model = apply_lora(_tiny(family), family, LoraSettings(rank=2, alpha=2.0))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, _, y, mask = _inputs(family, model, latent=(2, 4, 4))
    loss = RFlow().training_losses(family.model_fn(model), x, dict(y=y, mask=mask),
                                   generator=torch.Generator().manual_seed(0))["loss"].mean()
    loss.backward()
    optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())
    assert all(not torch.equal(params[n], v) for n, v in trainable.items() if ".lora_A." in n or ".lora_B." in n)
    state = lora_state_dict(model)
    assert set(state) == {n.replace(".default", "") for n in trainable}
    adapter, total = sum(v.numel() for v in state.values()), sum(p.numel() for p in model.parameters())
    assert adapter < 0.1 * total


def test_lora_targets_that_match_nothing_are_an_error_naming_them():
    with pytest.raises(ValueError, match="no_such_layer"):
        apply_lora(_tiny(WAN), WAN, LoraSettings(target_modules=r"blocks\.\d+\.no_such_layer"))


@pytest.mark.parametrize("name, pipeline_cls", [("wan", WanPipeline), ("ltx", LTXPipeline)])
def test_exported_lora_loads_with_load_lora_weights_at_the_trained_strength(name, pipeline_cls, tmp_path):
    family = FAMILIES[name]
    settings = LoraSettings(rank=2, alpha=8.0)  # scale 4: a loader that lost alpha would be 4x off
    model = apply_lora(_tiny(family), family, settings)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(n)))
    path = save_diffusers_lora(lora_state_dict(model), family, settings, tmp_path)
    assert path.name == LORA_WEIGHTS_NAME and path.is_file()

    base = _tiny(family)  # same seed: the base weights the adapters were trained on
    pipe = pipeline_cls(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=base)
    x, t, y, mask = _inputs(family, model, latent=(2, 4, 4))
    with torch.no_grad():
        plain = family.forward(base, x, t, y, mask)
        pipe.load_lora_weights(str(tmp_path))
        loaded = family.forward(pipe.transformer, x, t, y, mask)
        trained = family.forward(model, x, t, y, mask)
    assert not torch.allclose(loaded, plain, atol=1e-3)  # the LoRA has an effect
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)  # ... and the trained one


# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["wan", "ltx"])
def test_from_pretrained_reads_a_diffusers_model_or_pipeline_folder_from_local_files(name, tmp_path):
    family = FAMILIES[name]
    model = _tiny(family, seed=3)
    model.save_pretrained(str(tmp_path / "pipe" / "transformer"))
    for directory in (tmp_path / "pipe", tmp_path / "pipe" / "transformer"):
        loaded = family.from_pretrained(str(directory))
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
        assert family.read_config(str(directory))["num_layers"] == 2
    assert family.from_pretrained(str(tmp_path / "pipe"), dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        family.from_pretrained(str(tmp_path / "missing"))


def test_stdit_from_pretrained_is_stdits(tmp_path):
    model = _tiny(STDIT)
    model.save_pretrained(tmp_path)
    loaded = STDIT.from_pretrained(str(tmp_path))
    assert isinstance(loaded, STDiT) and STDIT.read_config(str(tmp_path)) == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
