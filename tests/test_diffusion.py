"""IDDPM and rectified flow: checked against diffusers' DDPMScheduler, and by learning a known distribution."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from torch import nn

from opensora.diffusion import IDDPM, RFlow, build_scheduler, classifier_free_guidance, space_timesteps
from opensora.diffusion.iddpm import _Schedule, _extract


def _diffusers_float64(num_timesteps=1000, variance_type="fixed_small") -> DDPMScheduler:
    """DDPMScheduler with the same linear betas, its tables recomputed in float64 the way its __init__ does."""
    ref = DDPMScheduler(num_train_timesteps=num_timesteps, beta_start=1e-4, beta_end=2e-2, beta_schedule="linear",
                        prediction_type="sample", variance_type=variance_type, clip_sample=False)
    ref.betas = torch.linspace(1e-4, 2e-2, num_timesteps, dtype=torch.float64)
    ref.alphas = 1.0 - ref.betas
    ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


def test_forward_noising_matches_diffusers():
    ours, ref = IDDPM(), _diffusers_float64()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 2, 3, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(ours.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_posterior_matches_diffusers_step(t):
    ours, ref = IDDPM(), _diffusers_float64()
    g = torch.Generator().manual_seed(t)
    x0 = torch.randn(2, 4, 2, 3, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    tt = torch.full((2,), t)
    mean, var, log_var = ours.q_posterior_mean_variance(x0, x_t, tt)
    # diffusers adds sqrt(var) * randn(generator) to the posterior mean; replay the same draw.
    step = ref.step(x0, t, x_t, generator=torch.Generator().manual_seed(7)).prev_sample
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(step, mean + var.sqrt() * z, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var.flatten()[0], ref._get_variance(t).double(), rtol=1e-12, atol=0)
    torch.testing.assert_close(log_var.flatten()[0], torch.log(ref._get_variance(t).double()), rtol=1e-12, atol=0)


def test_learned_range_variance_matches_diffusers():
    ours, ref = IDDPM(), _diffusers_float64(variance_type="learned_range")
    C = 4
    for t in (1, 100, 999):
        v = torch.tensor(0.3, dtype=torch.float64)
        out = torch.cat([torch.zeros(1, C, 1, 1, 1, dtype=torch.float64), torch.full((1, C, 1, 1, 1), 0.3,
                                                                                      dtype=torch.float64)], 1)
        p = ours.p_mean_variance(out, torch.zeros(1, C, 1, 1, 1, dtype=torch.float64), torch.tensor([t]))
        expected = ref._get_variance(t, predicted_variance=v)  # a log-variance for "learned_range"
        torch.testing.assert_close(p["log_variance"].flatten()[0], expected.double(), rtol=1e-12, atol=1e-12)


def test_respacing_keeps_alphas_cumprod():
    d = IDDPM(num_sampling_steps=100)
    kept = d.timestep_map
    assert len(kept) == 100 and kept[0] == 0 and kept[-1] == 999
    torch.testing.assert_close(d.sampling.abar, d.train_schedule.abar[kept], rtol=1e-12, atol=0)
    assert space_timesteps(1000, 1000) == list(range(1000))
    with pytest.raises(ValueError, match="sampling steps"):
        IDDPM(num_sampling_steps=0)


def test_vlb_zero_for_true_posterior_and_loss_shapes():
    d = IDDPM(num_timesteps=50)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(3, 2, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 20, 49])

    def oracle(x_t, tt):  # exact eps, variance at the posterior end of the range (v = -1)
        return torch.cat([noise, -torch.ones_like(noise)], dim=1)

    terms = d.training_losses(oracle, x0, t=t, noise=noise)
    assert set(terms) >= {"loss", "mse", "vb"} and terms["loss"].shape == (3,)
    assert terms["mse"].abs().max() < 1e-20 and terms["vb"].abs().max() < 1e-12


def test_cfg_mixes_guided_channels_and_keeps_variance_from_cond():
    def fn(x, t, y):  # output: x*y in the first 2 channels, y in the last 2
        return torch.cat([x * y, y.expand_as(x)], dim=1)

    x = torch.ones(1, 2, 3)
    y = torch.cat([torch.full((1, 1, 1), 3.0), torch.full((1, 1, 1), 1.0)])  # cond row then uncond row
    out = classifier_free_guidance(fn, 4.0, guided_channels=2)(x, torch.zeros(1), y=y)
    torch.testing.assert_close(out[:, :2], torch.full((1, 2, 3), 1.0 + 4.0 * (3.0 - 1.0)))
    torch.testing.assert_close(out[:, 2:], torch.full((1, 2, 3), 3.0))


class _ToyNet(nn.Module):
    """An MLP eps/velocity model for 2-D points shaped (B, 2, 1), with sinusoidal time features."""

    def __init__(self, out_mult: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 + 16, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(),
                                 nn.Linear(128, 2 * out_mult))

    def forward(self, x, t):
        freqs = torch.exp(torch.arange(8) * (-math.log(1000.0) / 8)) * 1.0
        arg = t.float()[:, None] * freqs[None]
        h = torch.cat([x[..., 0], arg.sin(), arg.cos()], dim=1)
        return self.net(h)[..., None]


def _toy_data(n, g):
    """70 % around (0.5, 0.5), 30 % around (-0.5, -0.5), std 0.08: mean (0.2, 0.2), a known mode split."""
    pick = torch.rand(n, generator=g) < 0.7
    centre = torch.where(pick[:, None], torch.tensor([0.5, 0.5]), torch.tensor([-0.5, -0.5]))
    return (centre + 0.08 * torch.randn(n, 2, generator=g))[..., None]


@pytest.mark.parametrize("name,steps", [("iddpm", 50), ("rflow", 50)])
def test_learns_and_samples_a_known_distribution(name, steps):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sched = build_scheduler(name, num_timesteps=1000, num_sampling_steps=steps)
    net = _ToyNet(out_mult=2)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(2500):
        loss = sched.training_losses(net, _toy_data(256, g), generator=g)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    samples = sched.sample(net, torch.randn(4000, 2, 1, generator=g), generator=g)[..., 0]
    mean = samples.mean(0)
    upper = (samples.sum(1) > 0).float().mean()
    near_mode = ((samples - samples.sign().sum(1, keepdim=True).sign() * 0.5).norm(dim=1) < 0.3).float().mean()
    assert torch.allclose(mean, torch.tensor([0.2, 0.2]), atol=0.08), mean
    assert abs(upper.item() - 0.7) < 0.07, upper
    assert near_mode > 0.85, near_mode


def test_iddpm_sampling_follows_its_generator_and_rflow_is_an_ode():
    """IDDPM adds fresh noise at every step: the same seed gives the same video, another seed another one.
    Rectified flow integrates an ODE from the given start: the generator must not change its output."""
    net = _ToyNet(out_mult=2)

    def run(sched, seed):
        return sched.sample(net, torch.ones(3, 2, 1), generator=torch.Generator().manual_seed(seed))

    iddpm = IDDPM(num_sampling_steps=5)
    torch.testing.assert_close(run(iddpm, 1), run(iddpm, 1), rtol=0, atol=0)
    assert not torch.allclose(run(iddpm, 1), run(iddpm, 2)), "the generator reaches IDDPM's per-step noise"
    rflow = RFlow(num_sampling_steps=5)
    torch.testing.assert_close(run(rflow, 1), run(rflow, 2), rtol=0, atol=0)


def test_rflow_interpolation_endpoints_and_unknown_name():
    x0, eps = torch.zeros(2, 1), torch.ones(2, 1)
    assert RFlow.interpolate(x0, eps, torch.tensor([0.0, 1.0])).flatten().tolist() == [0.0, 1.0]
    with pytest.raises(ValueError, match="unknown diffusion"):
        build_scheduler("ddim")
    t = torch.tensor([3, 7])
    schedule = _Schedule(torch.linspace(0.1, 0.5, 10, dtype=torch.float64))
    out = _extract(schedule, "betas", t, torch.zeros(2, 4, 5))
    assert out.shape == (2, 1, 1) and out.dtype == torch.float32
    assert out.flatten().tolist() == pytest.approx(schedule.betas[t].tolist())
    assert schedule.on(torch.device("cpu")) is schedule.on(torch.device("cpu")), "one copy per device, reused"


@pytest.mark.parametrize("sched", [IDDPM(num_sampling_steps=5), RFlow(num_sampling_steps=5)], ids=["iddpm", "rflow"])
def test_step_callback_sees_every_step_and_may_replace_the_latents(sched):
    """``sample(callback=)``: called after each step with (step index, the model's timestep, latents); a tensor it
    returns is the sampler's next latents; returning None (or no callback) changes nothing, bit for bit."""
    net = _ToyNet(out_mult=2)
    seen_t = []

    def model(x, t):
        seen_t.append(float(t[0]))
        return net(x, t)

    def run(callback=None):
        return sched.sample(model, torch.ones(3, 2, 1), generator=torch.Generator().manual_seed(1), callback=callback)

    plain = run()
    calls = []
    watched = run(lambda i, t, x: calls.append((i, t, x.clone())))
    torch.testing.assert_close(watched, plain, rtol=0, atol=0)
    assert [i for i, _, _ in calls] == list(range(5))
    assert [t for _, t, _ in calls] == seen_t[-5:] and seen_t[-5] > seen_t[-1], "the model's timesteps, from noise"
    assert all(x.shape == (3, 2, 1) for _, _, x in calls)
    torch.testing.assert_close(calls[-1][2], plain, rtol=0, atol=0)  # the last step's latents are the result
    zeroed = run(lambda i, t, x: torch.zeros_like(x) if i == 4 else None)
    assert zeroed.abs().max() == 0, "the returned tensor replaced the latents"
    with pytest.raises(ValueError, match="shape"):
        run(lambda i, t, x: x[:1])
