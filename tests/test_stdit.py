"""STDiT: shapes, determinism, gradients, checkpointing, save/load, Open-Sora 1.0 compatibility, size."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from opensora.models import STDiT, STDiT_models, convert_opensora_v1_state_dict, count_parameters, stdit_config
from opensora.models.stdit import load_opensora_v1_checkpoint

TINY = dict(depth=2, hidden_size=32, num_heads=2, caption_channels=16, model_max_length=6)


def tiny_model(**kw):
    torch.manual_seed(0)
    return STDiT(stdit_config("STDiT-debug", **{**TINY, **kw}))


def randomize(model, seed=1):
    """Zero-initialised layers (final layer, temporal/cross proj) would hide bugs: give every tensor noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def inputs(B=2, C=4, T=4, H=8, W=8, L=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, T, H, W, generator=g)
    t = torch.tensor([3.0, 700.0][:B])
    y = torch.randn(B, 1, L, 16, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[-1, 3:] = 0
    return x, t, y, mask


def test_output_shape_and_learned_sigma():
    x, t, y, mask = inputs()
    assert tiny_model()(x, t, y, mask).shape == (2, 8, 4, 8, 8)
    assert tiny_model(pred_sigma=False)(x, t, y, mask).shape == (2, 4, 4, 8, 8)
    # Other resolutions and frame counts run with the same weights (staged training).
    m = tiny_model().eval()
    x2, t2, y2, mask2 = inputs(T=2, H=12, W=4)
    assert m(x2, t2, y2, mask2).shape == (2, 8, 2, 12, 4)


def test_size_not_divisible_by_patch_names_it():
    m = tiny_model()
    x, t, y, mask = inputs(H=7)
    with pytest.raises(ValueError, match=r"\(4, 7, 8\).*patch size"):
        m(x, t, y, mask)


def test_determinism_and_eval_mode():
    """In eval mode the output is a function of the inputs: caption dropout (the model's one random draw, from the
    global generator) is off, so another global seed gives the same output; in train mode it does not."""
    m = randomize(tiny_model(class_dropout_prob=0.5))
    x, t, y, mask = inputs()

    def under_seed(seed):
        torch.manual_seed(seed)
        return m(x, t, y, mask)

    m.train()
    assert any(not torch.equal(under_seed(0), under_seed(s)) for s in range(1, 4)), "dropout draws in train mode"
    m.eval()
    torch.testing.assert_close(under_seed(0), under_seed(1), rtol=0, atol=0)
    torch.testing.assert_close(under_seed(2), m(x, t, y, mask, force_drop_ids=torch.zeros(2, dtype=torch.long)))


def test_padding_tokens_are_ignored():
    m = randomize(tiny_model()).eval()
    x, t, y, mask = inputs()
    y2 = y.clone()
    y2[-1, :, 3:] = torch.randn_like(y2[-1, :, 3:]) * 10  # only padded positions change
    torch.testing.assert_close(m(x, t, y, mask), m(x, t, y2, mask))
    y2[-1, :, 0] += 1.0  # a real token changes -> output changes
    assert not torch.allclose(m(x, t, y, mask), m(x, t, y2, mask))


def test_caption_dropout_uses_null_embedding():
    m = randomize(tiny_model()).eval()
    x, t, y, mask = inputs()
    dropped = m(x, t, y, mask, force_drop_ids=torch.tensor([1, 0]))
    null = m(x, t, m.null_caption(2).clone(), mask)
    torch.testing.assert_close(dropped[0], null[0])
    torch.testing.assert_close(dropped[1], m(x, t, y, mask)[1])
    assert "y_embedder.y_embedding" in m.state_dict()
    assert "y_embedder.y_embedding" not in dict(m.named_parameters())
    # In training mode with p=0.999... nearly every caption is replaced.
    m2 = randomize(tiny_model(class_dropout_prob=0.99)).train()
    torch.manual_seed(0)
    torch.testing.assert_close(m2(x, t, y, mask), m2(x, t, m2.null_caption(2).clone(), mask), rtol=1e-5, atol=1e-5)


def test_zero_init_layers():
    m = tiny_model()
    for blk in m.blocks:
        assert torch.count_nonzero(blk.attn_temp.proj.weight) == 0
        assert torch.count_nonzero(blk.cross_attn.proj.weight) == 0
    assert torch.count_nonzero(m.final_layer.linear.weight) == 0
    x, t, y, mask = inputs()
    assert torch.count_nonzero(m(x, t, y, mask)) == 0  # zero final layer: a fresh model predicts zeros


def test_temporal_position_on_tokens_makes_identical_frames_differ():
    """Open-Sora 1.0 puts the frame index only into block 0's temporal attention, whose output projection
    starts at zero: identical input frames then give identical output frames. With
    ``temporal_pos_on_tokens`` every token carries its frame index from the start."""
    x, t, y, mask = inputs()
    same = x[:, :, :1].expand_as(x).contiguous()  # every frame the same
    for on_tokens in (False, True):
        m = tiny_model(temporal_pos_on_tokens=on_tokens).eval()
        torch.manual_seed(3)
        torch.nn.init.normal_(m.final_layer.linear.weight, std=0.2)  # a fresh final layer predicts zeros
        out = m(same, t, y, mask)
        spread = (out - out[:, :, :1]).abs().max().item()
        assert (spread > 1e-3) if on_tokens else (spread < 1e-6), (on_tokens, spread)
    with pytest.raises(ValueError, match="temporal_pos_on_tokens"):
        stdit_config("STDiT-debug", no_temporal_pos_emb=True, temporal_pos_on_tokens=True)


def test_caption_projection_init(tmp_path):
    """``caption_proj_init``: "pixart" (the default, Open-Sora 1.0's std 0.02) leaves a small text encoder's caption
    tokens at a few % of their input size; "xavier" keeps them near the input's scale. The default is "pixart",
    bit for bit, and a saved model keeps its setting."""
    default, pixart, xavier = tiny_model(), tiny_model(caption_proj_init="pixart"), tiny_model(caption_proj_init="xavier")
    for (name, a), b in zip(default.state_dict().items(), pixart.state_dict().values()):
        assert torch.equal(a, b), name
    y = torch.randn(2, 1, 6, TINY.get("caption_channels", 32))
    size = {}
    for name, m in (("pixart", pixart), ("xavier", xavier)):
        assert m.config.caption_proj_init == name
        size[name] = (m.y_embedder(y, train=False).norm(dim=-1) / y.norm(dim=-1)).mean().item()
    assert size["pixart"] < 0.05 < 0.3 < size["xavier"], size
    fc1 = xavier.y_embedder.y_proj.fc1.weight
    bound = math.sqrt(6 / (fc1.shape[0] + fc1.shape[1]))  # xavier_uniform's
    assert fc1.abs().max() <= bound and fc1.std() > 0.4 * bound
    xavier.save_pretrained(tmp_path / "m")
    assert STDiT.from_pretrained(tmp_path / "m").config.caption_proj_init == "xavier"
    with pytest.raises(ValueError, match="caption_proj_init"):
        stdit_config("STDiT-debug", caption_proj_init="zeros")


def test_per_frame_timestep_equal_to_shared_is_bit_identical():
    """(B, T) timesteps that all equal the sample's t give exactly the (B,) path's output (and its gradients up to
    the rounding of summing T per-frame terms), so a model trained without frame conditioning keeps its function."""
    m = randomize(tiny_model()).train()
    m.y_embedder.uncond_prob = 0.0
    names = list(m.state_dict())
    x, t, y, mask = inputs()
    out = m(x, t, y, mask)
    out.square().mean().backward()
    shared = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    per_frame = m(x, t[:, None].expand(-1, x.shape[2]), y, mask)
    per_frame.square().mean().backward()
    torch.testing.assert_close(per_frame, out, rtol=0, atol=0)
    for n, p in m.named_parameters():  # t_embedder / t_block sum T per-frame terms: equal up to rounding
        assert (p.grad - shared[n]).abs().max() <= 1e-5 * shared[n].abs().max(), n
    assert list(m.state_dict()) == names  # no parameter added: old checkpoints load


def test_per_frame_timestep_modulates_each_frame_with_its_own_t():
    m = randomize(tiny_model()).eval()
    x, t, y, mask = inputs()
    t_frames = t[:, None].repeat(1, 4)
    t_frames[:, 0] = 0.0  # frame 0 given
    with torch.no_grad():
        shared, per_frame = m(x, t, y, mask), m(x, t_frames, y, mask)
        # frame 0's own modulation changes every frame (temporal attention mixes them) ...
        assert (per_frame - shared).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4
        # ... and equals what a model sees with t = 0 on frame 0 written out by hand
        t_ref, t0_ref = m.embed_timestep(torch.zeros(2), 4)
        t_pf, t0_pf = m.embed_timestep(t_frames, 4)
        torch.testing.assert_close(t0_pf[:, 0], t0_ref, rtol=0, atol=0)
        torch.testing.assert_close(t_pf[:, 1], m.embed_timestep(t, 4)[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"timestep must be \(B,\) or \(B, T=4\)"):
        m(x, t_frames[:, :3], y, mask)
    m3 = tiny_model(patch_size=(2, 2, 2))
    with pytest.raises(ValueError, match="temporal patch size of 1"):
        m3(x, t_frames, y, mask)


def _grads(model, ckpt, num_blocks=None):
    model.zero_grad()
    model.enable_gradient_checkpointing(ckpt, num_blocks)
    x, t, y, mask = inputs()
    model(x, t, y, mask).square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_every_parameter_gets_a_gradient():
    m = randomize(tiny_model()).train()
    m.y_embedder.uncond_prob = 0.0
    grads = _grads(m, False)
    assert set(grads) == {n for n, _ in m.named_parameters()}
    for name, g in grads.items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, name


def test_gradient_checkpointing_gives_same_gradients():
    m = randomize(tiny_model()).train()
    m.y_embedder.uncond_prob = 0.0
    plain = _grads(m, False)
    ckpt = _grads(m, True)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_selective_checkpointing_recomputes_only_the_first_blocks():
    m = randomize(tiny_model()).train()
    m.y_embedder.uncond_prob = 0.0
    calls = [0] * len(m.blocks)
    for i, block in enumerate(m.blocks):
        block.register_forward_pre_hook(lambda mod, args, i=i: calls.__setitem__(i, calls[i] + 1))
    plain = _grads(m, False)
    assert calls == [1] * len(m.blocks)
    calls[:] = [0] * len(m.blocks)
    partial = _grads(m, True, num_blocks=1)
    assert calls == [2] + [1] * (len(m.blocks) - 1)  # block 0 ran again in the backward, the others did not
    for name in plain:
        torch.testing.assert_close(partial[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="depth"):
        m.enable_gradient_checkpointing(True, num_blocks=len(m.blocks) + 1)


def test_save_load_round_trip(tmp_path):
    m = randomize(tiny_model()).eval()
    m.save_pretrained(tmp_path / "m")
    m2 = STDiT.from_pretrained(tmp_path / "m").eval()
    assert m2.config == m.config
    x, t, y, mask = inputs()
    torch.testing.assert_close(m(x, t, y, mask), m2(x, t, y, mask), rtol=0, atol=0)
    assert not list((tmp_path / "m").glob("*.tmp"))


def test_wrong_shape_checkpoint_names_the_file(tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match=r"(?s)model\.safetensors does not fit.*wrong shapes"):
        STDiT.from_pretrained(tmp_path / "m", hidden_size=64, num_heads=4)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        STDiT.from_pretrained(tmp_path / "nowhere")


def test_stdit_xl2_parameter_count():
    with torch.device("meta"):
        model = STDiT(STDiT_models["STDiT-XL/2"])
    n = count_parameters(model)
    # Open-Sora 1.0's own code gives 759.6M for STDiT-XL/2 (its report rounds to "724M").
    assert abs(n - 759.6e6) <= 0.001 * 759.6e6, n


def test_model_info_tool_prints_count(capsys):
    from tools.model_info import main

    main(["--model", "STDiT-XL/2"])
    out = capsys.readouterr().out
    assert "759.62M" in out


# ---------------------------------------------------------------------------------------------------
# Open-Sora 1.0 compatibility. The names and the reference forward below are written from Open-Sora's
# opensora/models/stdit/stdit.py (tag v1.0.0): flattened (B, N, C) tokens, numpy sin-cos tables with its
# meshgrid convention, and the block-diagonal (per-sample, padding-free) cross-attention of xformers.
# ---------------------------------------------------------------------------------------------------


def opensora_v1_state_dict(depth, D, Ct, L, Cin, patch, out_ch, num_frames, grid_hw, g):
    mlp_h = 4 * D
    shapes = {
        "pos_embed": (1, grid_hw[0] * grid_hw[1], D),
        "pos_embed_temporal": (1, num_frames, D),
        "x_embedder.proj.weight": (D, Cin, *patch),
        "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256),
        "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D),
        "t_embedder.mlp.2.bias": (D,),
        "t_block.1.weight": (6 * D, D),
        "t_block.1.bias": (6 * D,),
        "y_embedder.y_embedding": (L, Ct),
        "y_embedder.y_proj.fc1.weight": (D, Ct),
        "y_embedder.y_proj.fc1.bias": (D,),
        "y_embedder.y_proj.fc2.weight": (D, D),
        "y_embedder.y_proj.fc2.bias": (D,),
        "final_layer.linear.weight": (math.prod(patch) * out_ch, D),
        "final_layer.linear.bias": (math.prod(patch) * out_ch,),
        "final_layer.scale_shift_table": (2, D),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        shapes.update({
            p + "scale_shift_table": (6, D),
            p + "attn.qkv.weight": (3 * D, D), p + "attn.qkv.bias": (3 * D,),
            p + "attn.proj.weight": (D, D), p + "attn.proj.bias": (D,),
            p + "attn_temp.qkv.weight": (3 * D, D), p + "attn_temp.qkv.bias": (3 * D,),
            p + "attn_temp.proj.weight": (D, D), p + "attn_temp.proj.bias": (D,),
            p + "cross_attn.q_linear.weight": (D, D), p + "cross_attn.q_linear.bias": (D,),
            p + "cross_attn.kv_linear.weight": (2 * D, D), p + "cross_attn.kv_linear.bias": (2 * D,),
            p + "cross_attn.proj.weight": (D, D), p + "cross_attn.proj.bias": (D,),
            p + "mlp.fc1.weight": (mlp_h, D), p + "mlp.fc1.bias": (mlp_h,),
            p + "mlp.fc2.weight": (D, mlp_h), p + "mlp.fc2.bias": (D,),
        })
    return {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}


def np_1d(dim, pos):
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def np_2d(dim, grid_size, scale):
    grid_h = np.arange(grid_size[0], dtype=np.float32) / scale
    grid_w = np.arange(grid_size[1], dtype=np.float32) / scale
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size[0], grid_size[1]])
    return np.concatenate([np_1d(dim // 2, grid[0]), np_1d(dim // 2, grid[1])], axis=1)


def ref_attention(q, k, v):  # (B, N, H, d) -> (B, N, H, d), explicit softmax(QK^T/sqrt(d))V
    a = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bmhd->bnhd", a.softmax(-1), v)


def ref_forward(sd, x, t, y, mask, depth, D, H, patch, out_ch, space_scale, time_scale):
    """Open-Sora 1.0 STDiT.forward, op by op, on a raw state dict."""
    lin = lambda z, name: F.linear(z, sd[name + ".weight"], sd[name + ".bias"])
    B, _, Tl, Hl, Wl = x.shape
    Tn, Hn, Wn = Tl // patch[0], Hl // patch[1], Wl // patch[2]
    S, N, dh = Hn * Wn, Tn * Hn * Wn, D // H
    z = F.conv3d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    z = z.flatten(2).transpose(1, 2)  # (B, N, D)
    pos = torch.from_numpy(np_2d(D, (Hn, Wn), space_scale)).float()
    z = (z.view(B, Tn, S, D) + pos).view(B, N, D)
    tpe = torch.from_numpy(np_1d(D, np.arange(Tn) / time_scale)).float()
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    temb = lin(F.silu(lin(temb, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    t0 = lin(F.silu(temb), "t_block.1")
    yy = lin(F.gelu(lin(y[:, 0], "y_embedder.y_proj.fc1"), approximate="tanh"), "y_embedder.y_proj.fc2")
    lens = mask.sum(1).tolist()
    ln = lambda z: F.layer_norm(z, (D,), eps=1e-6)
    for i in range(depth):
        p = f"blocks.{i}."
        mods = (sd[p + "scale_shift_table"][None] + t0.reshape(B, 6, -1)).chunk(6, dim=1)
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = mods
        xm = ln(z) * (1 + sc_msa) + sh_msa
        xs = xm.reshape(B * Tn, S, D)
        qkv = lin(xs, p + "attn.qkv").view(B * Tn, S, 3, H, dh)
        xs = lin(ref_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(B * Tn, S, D), p + "attn.proj")
        z = z + g_msa * xs.view(B, N, D)
        xt = z.view(B, Tn, S, D).permute(0, 2, 1, 3).reshape(B * S, Tn, D)
        if i == 0:
            xt = xt + tpe
        qkv = lin(xt, p + "attn_temp.qkv").view(B * S, Tn, 3, H, dh)
        xt = lin(ref_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]).reshape(B * S, Tn, D), p + "attn_temp.proj")
        z = z + g_msa * xt.view(B, S, Tn, D).permute(0, 2, 1, 3).reshape(B, N, D)
        ca = []
        for b in range(B):  # block-diagonal attention: sample b sees only its own lens[b] real tokens
            q = lin(z[b : b + 1], p + "cross_attn.q_linear").view(1, N, H, dh)
            kv = lin(yy[b : b + 1, : lens[b]], p + "cross_attn.kv_linear").view(1, lens[b], 2, H, dh)
            ca.append(ref_attention(q, kv[:, :, 0], kv[:, :, 1]).reshape(1, N, D))
        z = z + lin(torch.cat(ca), p + "cross_attn.proj")
        h = ln(z) * (1 + sc_mlp) + sh_mlp
        z = z + g_mlp * lin(F.gelu(lin(h, p + "mlp.fc1"), approximate="tanh"), p + "mlp.fc2")
    shift, scale = (sd["final_layer.scale_shift_table"][None] + temb[:, None]).chunk(2, dim=1)
    z = lin(ln(z) * (1 + scale) + shift, "final_layer.linear")
    z = z.view(B, Tn, Hn, Wn, patch[0], patch[1], patch[2], out_ch)
    return z.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, out_ch, Tl, Hl, Wl)


@pytest.mark.parametrize("space_scale", [1.0, 0.5])
def test_opensora_v1_state_dict_loads_with_same_function(space_scale, tmp_path):
    depth, D, H, Ct, L, Cin = 2, 32, 2, 16, 6, 4
    g = torch.Generator().manual_seed(0)
    sd = opensora_v1_state_dict(depth, D, Ct, L, Cin, (1, 2, 2), 2 * Cin, num_frames=4, grid_hw=(4, 4), g=g)
    # Saved as Open-Sora did (a plain .pth of the state dict), then loaded through the public path.
    torch.save(sd, tmp_path / "opensora_v1.pth")
    model = STDiT(stdit_config("STDiT-debug", **TINY, space_scale=space_scale)).eval()
    converted = convert_opensora_v1_state_dict(dict(sd))
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert set(sd) - set(converted) == {"pos_embed", "pos_embed_temporal"}
    load_opensora_v1_checkpoint(model, tmp_path / "opensora_v1.pth")

    x, t, y, mask = inputs(T=4, H=8, W=8)
    mask[0, 5:] = 0
    ours = model(x, t, y, mask)
    ref = ref_forward(sd, x, t, y, mask, depth, D, H, (1, 2, 2), 2 * Cin, space_scale, 1.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # Non-square grid: the meshgrid convention (w in the first half of the channels) must match too.
    x, t, y, mask = inputs(T=2, H=4, W=12)
    ref = ref_forward(sd, x, t, y, mask, depth, D, H, (1, 2, 2), 2 * Cin, space_scale, 1.0)
    torch.testing.assert_close(model(x, t, y, mask), ref, rtol=1e-4, atol=1e-4)
