"""The samplers against closed forms: data from a Gaussian, where the exact eps is known, so no network is needed."""
import pytest
import torch

from model import Diffusion, DiffusionConfig

SAMPLERS = ["ddim", "ddpm", "dpm++"]


def gaussian_eps(d, mu, s):
    """The exact eps for data x_0 ~ N(mu, s^2) in every dimension.

    x_t = sqrt(a) x_0 + sqrt(1 - a) eps is then N(sqrt(a) mu, a s^2 + 1 - a), a = alpha_bar_t, and the best
    guess of the noise is E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a). s = 0 is a point mass.
    """
    def eps_fn(x, t):
        a = d.alpha_bar[t].view(-1, *[1] * (x.dim() - 1))  # (B, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)
    return eps_fn


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_samplers_recover_a_point_mass(sampler):
    # For data that is always x*, every x_0 prediction is x*: each sampler must land on it, in few steps or many.
    d = Diffusion(DiffusionConfig())
    x_star = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    for steps in [3, 20]:
        out = d.sample(gaussian_eps(d, x_star, 0.0), x_star.shape, steps=steps, sampler=sampler,
                       generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, x_star, atol=1e-4, rtol=0)


def test_dpm_solver_is_closer_to_the_truth_than_ddim_in_10_steps():
    # The exact probability-flow ODE maps N(0, 1) onto N(mu, s^2); few first-order DDIM steps shrink the spread.
    # clip=None: the comparison is about the solvers, not the clamp.
    d = Diffusion(DiffusionConfig())
    mu, s = 0.3, 0.2
    x_T = torch.randn(4096, 1, 4, 4, generator=torch.Generator().manual_seed(0))  # 65,536 draws
    moments = {}
    for sampler in ["ddim", "dpm++"]:
        out = d.sample(gaussian_eps(d, mu, s), x_T.shape, steps=10, sampler=sampler, x_T=x_T, clip=None)
        moments[sampler] = out.mean().item(), out.std().item()
    for m, _ in moments.values():
        assert abs(m - mu) < 0.01  # both keep the mean (standard error 0.001)
    (_, sd_ddim), (_, sd_dpm) = moments["ddim"], moments["dpm++"]
    assert abs(sd_dpm - s) < 0.05 * s, moments  # measured 0.2034 (5 % would be 0.19 to 0.21)
    assert abs(sd_dpm - s) < abs(sd_ddim - s) / 5, moments  # DDIM: 0.0977, half the true spread


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_steps_is_the_number_of_network_calls(sampler):
    d = Diffusion(DiffusionConfig())
    for steps in [2, 3, 10, 50]:
        calls = []
        eps_fn = gaussian_eps(d, 0.0, 0.5)
        d.sample(lambda x, t: calls.append(t[0].item()) or eps_fn(x, t), (2, 3, 4, 4), steps=steps, sampler=sampler)
        assert len(calls) == steps
        assert calls[0] == d.T - 1 and calls[-1] == 0 and calls == sorted(set(calls), reverse=True)  # distinct


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logsnr_timesteps_are_distinct_and_even_in_lambda(schedule):
    d = Diffusion(DiffusionConfig(schedule=schedule))
    for steps in [2, 10, 50, 200, 1000]:
        ts = d.timesteps(steps, "logsnr")
        assert len(ts) == steps and ts[0] == d.T - 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    for steps in [0, 1001]:  # 1001 distinct timesteps would reach t = -1, which indexes alpha_bar from its end
        with pytest.raises(ValueError, match=rf"^steps must be 1 to T = 1000 \(got {steps}\)$"):
            d.timesteps(steps, "logsnr")
    if schedule == "linear":  # (the cosine schedule's clipped last beta makes lambda fall off a cliff at t = T - 1)
        ts = d.timesteps(10, "logsnr")
        h = torch.log(d.alpha_bar[ts] / (1 - d.alpha_bar[ts])).diff() / 2  # (9,) steps in lambda
        torch.testing.assert_close(h, torch.full_like(h, h.mean().item()), atol=0.05 * h.mean().item(), rtol=0)


def test_clip_none_leaves_x0_free():
    # Data at 3 is outside the pixel range: clip=1.0 holds every sampler at 1, clip=None lets it reach 3 (latents).
    d = Diffusion(DiffusionConfig())
    for sampler in SAMPLERS:
        kw = dict(steps=10, sampler=sampler, generator=torch.Generator().manual_seed(0))
        assert d.sample(gaussian_eps(d, 3.0, 0.0), (2, 1, 2, 2), **kw).max() <= 1.0
        torch.testing.assert_close(d.sample(gaussian_eps(d, 3.0, 0.0), (2, 1, 2, 2), clip=None, **kw),
                                   torch.full((2, 1, 2, 2), 3.0), atol=1e-4, rtol=0)


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        Diffusion(DiffusionConfig()).sample(lambda x, t: x, (1, 1, 2, 2), steps=2, sampler="heun")


# The samplers on data N(mu, s^2), against what the papers say they compute. The probability-flow ODE that DDIM
# solves (Song et al. 2021, eq. 14) maps the noise linearly onto the data here: x_t is N(sqrt(a) mu, a s^2 + 1 - a),
# and the standardised value z = (x_t - sqrt(a) mu) / sqrt(a s^2 + 1 - a) stays the same along the ODE, so x_0 =
# mu + s z(x_T), pointwise. Ancestral DDPM (eta = 1) draws fresh noise at every step instead: its samples have the
# data's distribution as the step count grows, and forget the x_T they started from.
MU, S = 0.3, 0.5


def exact_flow(d, x_T):
    a = d.alpha_bar[-1]
    return MU + S * (x_T - a.sqrt() * MU) / (a * S ** 2 + 1 - a).sqrt()


def gaussian_samples(sampler, steps, n=20000):
    d = Diffusion(DiffusionConfig())
    x_T = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(0))
    out = d.sample(gaussian_eps(d, MU, S), x_T.shape, steps=steps, sampler=sampler, x_T=x_T, clip=None,
                   generator=torch.Generator().manual_seed(1))
    return d, x_T, out


def test_ddim_follows_the_probability_flow_and_converges_with_steps():
    errors = []
    for steps in [10, 50, 200, 1000]:
        d, x_T, out = gaussian_samples("ddim", steps)
        errors.append((out - exact_flow(d, x_T)).abs().max().item())
    assert errors == sorted(errors, reverse=True), errors  # first order: more steps, closer to the ODE
    assert errors[-1] < 0.02 and errors[-2] < 0.06, errors  # measured 0.0066 at 1000 steps, 0.031 at 200


@pytest.mark.parametrize("steps", [200, 1000])
def test_ddpm_draws_the_data_distribution_from_fresh_noise(steps):
    d, x_T, out = gaussian_samples("ddpm", steps)
    assert abs(out.mean().item() - MU) < 0.015  # standard error 0.0035
    assert abs(out.std().item() - S) < 0.04 * S  # measured 0.4854 at 200 steps, 0.4956 at 1000 (s = 0.5)
    # fresh noise at every step: the sample no longer depends on where it started (DDIM's correlation is 1)
    assert abs(torch.corrcoef(torch.stack([out.flatten(), x_T.flatten()]))[0, 1].item()) < 0.05


def test_ddpm_spread_grows_to_the_datas_with_steps():
    spreads = [gaussian_samples("ddpm", steps, n=8000)[2].std().item() for steps in [10, 50, 1000]]
    assert spreads == sorted(spreads) and spreads[-1] > 0.97 * S, spreads  # 0.32, 0.44, 0.50


def test_ddim_timesteps_run_evenly_from_T_to_0():
    # DDIM's "linear" spacing (Song et al. 2021, appendix D.2), both ends included: the last call sees t = 0
    d = Diffusion(DiffusionConfig())
    assert d.timesteps(5).tolist() == [999, 749, 500, 250, 0]
    assert d.timesteps(4).tolist() == [999, 666, 333, 0]
    assert d.timesteps(1000).tolist() == list(range(999, -1, -1))
