"""Frame conditioning (issue 16): given latent frames in the diffusion losses and samplers, on a tiny STDiT."""

import pytest
import torch

from opensora.diffusion import IDDPM, RFlow, classifier_free_guidance
from opensora.diffusion.conditioning import cond_mask_for, latent_frames_given, masked_mean_flat
from opensora.models.stdit import STDiT, stdit_config

B, C, T, H, W = 3, 3, 4, 8, 8


def tiny_stdit(seed=0):
    """STDiT-debug in pixel space with every parameter random (the zero-initialised output would hide errors)."""
    torch.manual_seed(seed)
    model = STDiT(stdit_config("STDiT-debug", in_channels=3, class_dropout_prob=0.0))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, T, H, W, generator=g) * 2 - 1
    y = torch.randn(B, 1, 16, 32, generator=g)
    return x0, dict(y=y, mask=torch.ones(B, 16, dtype=torch.long))


MASK = torch.tensor([[True, False, False, False],    # first frame
                     [True, False, False, True],     # first and last
                     [False, False, False, False]])  # none
SCHEDULERS = [lambda: IDDPM(num_timesteps=1000, num_sampling_steps=4), lambda: RFlow(num_sampling_steps=4)]


@pytest.mark.parametrize("make", SCHEDULERS, ids=["iddpm", "rflow"])
def test_nothing_given_is_bit_identical_to_unconditioned(make):
    """An all-False mask goes through the per-frame path (a (B, T) timestep, the masked mean) and still gives the
    unconditioned losses and samples bit for bit; the unconditioned path draws the same random numbers."""
    sched, model = make(), tiny_stdit()
    x0, kw = inputs()
    none = torch.zeros(B, T, dtype=torch.bool)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    plain = sched.training_losses(model, x0, kw, generator=g1)
    masked = sched.training_losses(model, x0, kw, generator=g2, cond_mask=none)
    for k in plain:
        torch.testing.assert_close(masked[k], plain[k], rtol=0, atol=0, msg=k)
    assert torch.equal(g1.get_state(), g2.get_state())
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = sched.sample(model, noise, kw, generator=torch.Generator().manual_seed(2))
        b = sched.sample(model, noise, kw, generator=torch.Generator().manual_seed(2), cond_latent=x0, cond_mask=none)
    torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("make", SCHEDULERS, ids=["iddpm", "rflow"])
def test_training_keeps_given_frames_clean_at_t0_and_excludes_them_from_the_loss(make):
    sched, model = make(), tiny_stdit()
    x0, kw = inputs()
    seen, outs = {}, []

    def model_fn(x_t, t, **k):
        seen.update(x_t=x_t.detach(), t=t)
        out = model(x_t, t, **k)
        out.retain_grad()
        outs.append(out)
        return out

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    terms = sched.training_losses(model_fn, x0, kw, noise=noise, generator=torch.Generator().manual_seed(3),
                                  cond_mask=MASK)
    # given frames are the clean latents, with timestep 0; the others are noised at the sample's t
    given = MASK[:, None, :, None, None].expand_as(x0)
    assert torch.equal(seen["x_t"][given], x0[given])
    assert not torch.isclose(seen["x_t"], x0)[~given].any()
    assert seen["t"].shape == (B, T)
    assert (seen["t"][MASK] == 0).all()
    t_model = terms["t"] * (sched.num_timesteps if isinstance(sched, RFlow) else 1)
    torch.testing.assert_close(seen["t"][~MASK], t_model[:, None].expand(B, T)[~MASK].to(seen["t"].dtype))
    # the loss gradient w.r.t. the model output is exactly zero on given frames, nonzero on generated ones
    terms["loss"].sum().backward()
    grad = outs[0].grad
    assert (grad.transpose(1, 2)[MASK] == 0).all()
    assert (grad[:, :C].transpose(1, 2)[~MASK].abs().flatten(1).amax(1) > 0).all()
    # the eps / velocity loss is the mean over the generated frames, written out by hand
    out = outs[0].detach()[:, :C]
    err = (out - (x0 - noise)) ** 2 if isinstance(sched, RFlow) else (out - noise) ** 2
    expected = torch.stack([err[b][:, ~MASK[b]].mean() for b in range(B)])
    torch.testing.assert_close(terms["loss" if isinstance(sched, RFlow) else "mse"], expected)
    if isinstance(sched, IDDPM):
        assert torch.isfinite(terms["vb"]).all() and (terms["vb"] > 0).all()


def test_training_loss_of_a_sample_with_every_frame_given_is_zero_with_zero_finite_gradients():
    """A training sample whose frames are all given adds nothing to the loss and nothing (not NaN: no 0/0) to the
    gradients, which still flow to every parameter (a detached loss would also be 0)."""
    x0, kw = inputs()
    every = torch.ones(B, T, dtype=torch.bool)
    for sched in (IDDPM(num_timesteps=1000), RFlow()):
        model = tiny_stdit()
        terms = sched.training_losses(model, x0, kw, generator=torch.Generator().manual_seed(0), cond_mask=every)
        assert (terms["loss"] == 0).all()
        terms["loss"].mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
        assert all(torch.isfinite(g).all() and g.abs().max() == 0 for g in grads.values())


def test_masked_mean_is_the_mean_over_generated_frames():
    x = torch.arange(2 * 1 * 3, dtype=torch.float32).reshape(2, 1, 3)  # (B, C, T)
    mask = torch.tensor([[True, False, False], [False, False, False]])
    torch.testing.assert_close(masked_mean_flat(x, mask), torch.tensor([(1 + 2) / 2, (3 + 4 + 5) / 3]))
    torch.testing.assert_close(masked_mean_flat(x, torch.ones(2, 3, dtype=torch.bool)), torch.zeros(2))


@pytest.mark.parametrize("make", SCHEDULERS, ids=["iddpm", "rflow"])
@pytest.mark.parametrize("cfg_scale", [1.0, 4.0])
def test_given_frames_come_out_unchanged_and_both_cfg_branches_see_them(make, cfg_scale):
    sched, model = make(), tiny_stdit()
    x0, kw = inputs()
    calls = []

    def recording(x, t, **k):
        calls.append((x.clone(), t.clone()))
        return model(x, t, **k)

    if cfg_scale == 1.0:
        fn = recording
    else:
        fn = classifier_free_guidance(recording, cfg_scale, guided_channels=C)
        kw = dict(y=torch.cat([kw["y"], model.null_caption(B)]), mask=torch.cat([kw["mask"], kw["mask"]]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = sched.sample(fn, noise, kw, generator=torch.Generator().manual_seed(2), cond_latent=x0, cond_mask=MASK)
    given = MASK[:, None, :, None, None].expand_as(x0)
    assert torch.equal(out[given], x0[given])  # bit-exact: the identity autoencoder returns these pixels
    assert not torch.equal(out[~given], x0[~given])
    rows = 2 * B if cfg_scale != 1.0 else B
    for x, t in calls:  # every step, every branch: the given frames, at t = 0
        assert x.shape[0] == rows and t.shape == (rows, T)
        both = torch.cat([MASK] * (rows // B))
        assert torch.equal(x.transpose(1, 2)[both], torch.cat([x0] * (rows // B)).transpose(1, 2)[both])
        assert (t[both] == 0).all() and (t[~both] == t.max()).all()  # generated frames: the step's t
    assert len(calls) == 4 and min(t.max() for _, t in calls[:-1]) > 0


def test_sample_needs_both_latent_and_mask_of_the_right_shape():
    noise = torch.zeros(B, C, T, H, W)
    for sched in (IDDPM(num_sampling_steps=2), RFlow(num_sampling_steps=2)):
        with pytest.raises(ValueError, match="both cond_latent and cond_mask"):
            sched.sample(lambda x, t: x, noise, cond_mask=MASK)
        with pytest.raises(ValueError, match=r"cond_mask must be a bool \(B, T\)"):
            sched.sample(lambda x, t: x, noise, cond_latent=noise, cond_mask=MASK[:, :3])


@pytest.mark.parametrize("num_frames, t, causal, start, end, expected", [
    (8, 1, False, 1, 0, (1, 0, 8)),     # per-frame VAE / identity: one pixel frame = one latent frame
    (8, 1, False, 3, 2, (3, 2, 8)),
    (16, 4, False, 4, 4, (1, 1, 4)),    # non-causal 4x: groups of 4
    (17, 4, True, 1, 0, (1, 0, 5)),     # causal 4x: frame 0 alone is latent frame 0 (image-to-video)
    (17, 4, True, 5, 0, (2, 0, 5)),     # frame 0, then frames 1-4
    (17, 4, True, 0, 4, (0, 1, 5)),     # the last latent frame covers the last 4 frames
    (17, 4, True, 9, 4, (3, 1, 5)),
])
def test_latent_frames_given_follows_the_frame_rule(num_frames, t, causal, start, end, expected):
    assert latent_frames_given(num_frames, t, causal, start, end) == expected


@pytest.mark.parametrize("num_frames, t, causal, start, end, message", [
    (17, 4, True, 4, 0, r"4 given first frames do not fit the causal 4x autoencoder.*4k\+1 frames \(1, 5, 9"),
    (17, 4, True, 0, 1, "1 given last frames do not fit the causal 4x autoencoder.*multiple of 4"),
    (16, 4, False, 2, 0, "2 given first frames do not fit the 4x autoencoder"),
    (8, 1, False, 9, 0, "9 given first frames are more than the 8 frames"),
    (8, 1, False, 4, 4, "none would be left to generate"),
    (17, 4, True, 17, 0, "none would be left to generate"),
])
def test_latent_frames_given_errors_name_the_count(num_frames, t, causal, start, end, message):
    with pytest.raises(ValueError, match=message):
        latent_frames_given(num_frames, t, causal, start, end)


def test_cond_mask_for_marks_first_and_last():
    assert cond_mask_for(2, 5, 2, 1).tolist() == [[True, True, False, False, True]] * 2


# ----------------------------------------------------------------------------------------------------
# Training: the recipe's mask types and the training step
# ----------------------------------------------------------------------------------------------------

from opensora.config import ConfigError, load_config  # noqa: E402
from opensora.training.conditioning import MASK_TYPES, ConditioningConfig, sample_cond_mask  # noqa: E402


@pytest.mark.parametrize("kwargs, message", [
    (dict(first_frame=1.5), r"conditioning.first_frame: a probability must be in \[0, 1\], got 1.5"),
    (dict(random=-0.1), "conditioning.random: a probability must be in"),
    (dict(first_frame=0.6, first_k=0.5), "sum to 1.1 .*first_frame 0.6 \\+ first_k 0.5.*must sum to <= 1"),
    (dict(first_k_min=0), "conditioning.first_k_min: must be >= 1"),
    (dict(first_k_min=3, first_k_max=2), "conditioning.first_k_max: must be >= first_k_min"),
])
def test_conditioning_config_errors_name_the_key(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ConditioningConfig(**kwargs)


def test_conditioning_config_from_a_file_names_the_key_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("first_frame: 0.5\nlast_frame: 0.7\n")
    with pytest.raises(ConfigError, match="must sum to <= 1"):
        load_config(ConditioningConfig, path)
    path.write_text("first_fram: 0.5\n")
    with pytest.raises(ConfigError, match="first_fram"):
        load_config(ConditioningConfig, path)
    cfg = load_config(ConditioningConfig, None, ["first_frame=0.25", "first_k=0.25"])
    assert cfg.enabled and cfg.none == 0.5 and not ConditioningConfig().enabled


def _draw(T, seed=0, B=64, **probs):
    return sample_cond_mask(B, T, ConditioningConfig(**probs), torch.Generator().manual_seed(seed))


def test_each_mask_type_gives_its_frames():
    T = 6
    assert (_draw(T, first_frame=1.0) == (torch.arange(T) == 0)).all()
    assert (_draw(T, last_frame=1.0) == (torch.arange(T) == T - 1)).all()
    assert (_draw(T, first_last=1.0) == ((torch.arange(T) == 0) | (torch.arange(T) == T - 1))).all()
    assert not _draw(T).any() and not _draw(T, first_frame=0.0).any()
    k = _draw(T, first_k=1.0, first_k_min=2, first_k_max=4)
    counts = k.sum(1)
    assert (k == (torch.arange(T)[None] < counts[:, None])).all()  # a prefix
    assert set(counts.tolist()) == {2, 3, 4}
    unlimited = _draw(T, B=400, first_k=1.0).sum(1)
    assert set(unlimited.tolist()) == set(range(1, T))  # first_k_max None: up to T - 1
    r = _draw(T, B=400, random=1.0)
    assert set(r.sum(1).tolist()) == set(range(1, T))
    assert len({tuple(row) for row in r.tolist()}) > 30  # positions vary, not only counts


def test_mask_probabilities_and_every_row_leaves_a_frame():
    probs = dict(first_frame=0.3, first_k=0.2, last_frame=0.1, first_last=0.1, random=0.1)
    m = _draw(8, B=20000, **probs)
    only_last = m[:, -1] & ~m[:, :-1].any(1)
    assert abs((~m.any(1)).float().mean().item() - 0.2) < 0.02  # none
    assert abs(only_last.float().mean().item() - 0.1) < 0.02  # last_frame (random adds a few of these too)
    assert not m.all(1).any()
    for T in (1, 2):  # an image cannot be conditioned on itself; first_last at T = 2 would give both frames
        assert not _draw(T, first_last=1.0).any() and not _draw(T, random=1.0).all(1).any()


def test_masks_are_a_function_of_the_generator_seed():
    probs = dict(first_frame=0.2, first_k=0.2, random=0.3)
    assert torch.equal(_draw(5, seed=3, **probs), _draw(5, seed=3, **probs))
    assert not torch.equal(_draw(5, seed=3, **probs), _draw(5, seed=4, **probs))


def _train_step(diffusion, conditioning, steps=3):
    """Three steps of the trainer's TrainStep (DDP, world of one) on a cached-latent batch; returns the losses and
    the masks the objective got."""
    from opensora.diffusion import build_scheduler
    from opensora.distributed import ParallelConfig, build_engine, destroy_distributed, init_distributed
    from opensora.training.step import TrainStep

    torch.manual_seed(0)
    model = STDiT(stdit_config("STDiT-debug", in_channels=3))
    g = torch.Generator().manual_seed(0)
    batch = dict(latent=torch.rand(2, 3, 4, 8, 8, generator=g) * 2 - 1, y=torch.randn(2, 1, 16, 32, generator=g),
                 mask=torch.ones(2, 16, dtype=torch.long))
    info = init_distributed()
    try:
        engine = build_engine(ParallelConfig(engine="ddp", param_dtype="fp32"), info)
        engine.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
        sched = build_scheduler(diffusion)
        masks, losses = [], []
        inner = sched.training_losses

        def recording(*a, cond_mask=None, **k):
            masks.append(cond_mask)
            return inner(*a, cond_mask=cond_mask, **k)

        sched.training_losses = recording
        step = TrainStep(engine, sched, seed=1, grad_clip=1.0, conditioning=conditioning)
        for i in range(steps):
            losses.append(step.forward_backward(batch, i, 0))
            step.optimizer_step()
        return torch.stack(losses), masks
    finally:
        destroy_distributed()


@pytest.mark.parametrize("diffusion", ["iddpm", "rflow"])
@pytest.mark.parametrize("mask_type", MASK_TYPES)
def test_every_mask_type_trains_through_the_train_step(diffusion, mask_type):
    losses, masks = _train_step(diffusion, ConditioningConfig(**{mask_type: 1.0}))
    assert torch.isfinite(losses).all() and (losses > 0).all()
    assert all(m is not None and m.shape == (2, 4) and m.any(1).all() and not m.all(1).any() for m in masks)


def test_train_step_without_conditioning_is_unchanged_and_masks_follow_the_step_seed():
    base, none_masks = _train_step("rflow", None, steps=2)
    zero, zero_masks = _train_step("rflow", ConditioningConfig(), steps=2)
    assert none_masks == zero_masks == [None, None]  # all 0: not even drawn, so the random stream is as before
    torch.testing.assert_close(zero, base, rtol=0, atol=0)
    cfg = ConditioningConfig(first_k=0.5, random=0.5)
    _, a = _train_step("rflow", cfg, steps=2)
    _, b = _train_step("rflow", cfg, steps=2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # same seed and step -> same masks (resume is exact)


def test_default_start_frames_fit_the_rule_and_are_at_most_half():
    from opensora.diffusion.conditioning import default_start_frames

    for num_frames, t, causal, expected in [(8, 1, False, 4), (17, 4, True, 5), (16, 4, False, 8), (4, 1, False, 2),
                                            (9, 4, True, 1), (33, 4, True, 13)]:
        k = default_start_frames(num_frames, t, causal)
        assert k == expected, (num_frames, t, causal, k)
        latent_frames_given(num_frames, t, causal, k, 0)  # fits the rule
