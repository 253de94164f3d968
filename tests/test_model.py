"""model.py: the rank-token conditioner, condition dropout, the noise schedules, the loss, the samplers, guidance
and the EMA, each against a closed form, a paper's number or a property seen from outside."""

import math

import pytest
import torch
import torch.nn as nn

from conftest import TINY_UNET, VOCAB, randomize
from model import (Diffusion, DiffusionConfig, RankConditioner, TaxaDiffusion, condition_dropout, cut_lineage,
                   deepest_rank, guided_eps_fn, negative_lineage, update_ema)


# -----------------------------------------------------------------------------
# Conditioning: rank tokens, cuts and dropout


def test_changing_the_lineage_changes_the_output():
    model = randomize(TaxaDiffusion(TINY_UNET, VOCAB))
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    a = model(x, t, torch.tensor([[1, 1, 1, 2, 3, 4, 5]]))
    b = model(x, t, torch.tensor([[1, 1, 1, 2, 3, 4, 6]]))  # a sibling species
    assert (a - b).abs().max() > 1e-3


def test_conditioner_sums_down_the_lineage():
    cond = randomize(RankConditioner(VOCAB, 16))
    ids = torch.tensor([[1, 1, 1, 2, 3, 4, 5], [1, 1, 1, 2, 3, 4, 6], [1, 1, 1, 2, 0, 0, 0]])
    tok = cond(ids)  # (3, 8, 16): null token + one per rank
    assert tok.shape == (3, 8, 16)
    torch.testing.assert_close(tok[0, :7], tok[1, :7])  # siblings share every token but the species one
    assert (tok[0, 7] - tok[1, 7]).abs().max() > 0
    # another order: every token from order down moves, and by the same amount (the two orders' rows differ),
    # since each token sums the lineage down to its rank; the tokens above order stay
    other_order = torch.tensor([[1, 1, 1, 3, 3, 4, 5]])
    moved = cond(other_order)[0] - tok[0]  # (8, 16)
    assert moved[:4].abs().max() == 0
    for r in range(4, 8):
        torch.testing.assert_close(moved[r], cond.embed[3].weight[3] - cond.embed[3].weight[2])
    # the lineage cut at order: the tokens finer than order are the order token, each with its own rank vector
    # (nothing is added by the unknown ranks), so they differ from one another by the rank vectors alone
    cut = tok[2]
    for r in range(5, 8):
        torch.testing.assert_close(cut[r] - cut[4], cond.rank_vec[r - 1] - cond.rank_vec[3])
    # with the species table at zero (as when its stage begins), a species starts exactly as its genus
    nn.init.zeros_(cond.embed[6].weight)
    torch.testing.assert_close(cond(ids[:1]), cond(cut_lineage(ids[:1], 5)))


def test_unknown_ranks_add_nothing_whatever_row_0_holds():
    """Id 0 (unknown, or finer than the stage) is masked: the tables' row 0 never reaches a token."""
    cond = randomize(RankConditioner(VOCAB, 16))
    ids = torch.tensor([[1, 1, 1, 2, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [1, 1, 2, 3, 0, 4, 5]])
    before = cond(ids)
    with torch.no_grad():
        for table in cond.embed:
            table.weight[0] += 10.0
    torch.testing.assert_close(cond(ids), before)


def test_cut_deepest_and_dropout():
    ids = torch.tensor([[1, 1, 2, 3, 4, 5, 6]]).repeat(4000, 1)
    assert cut_lineage(ids[:1], 3).tolist() == [[1, 1, 2, 3, 0, 0, 0]]
    assert deepest_rank(torch.tensor([[1, 2, 0, 0, 0, 0, 0], [0] * 7])).tolist() == [1, -1]
    out = condition_dropout(ids, p_uncond=0.1, p_cut=0.2, generator=torch.Generator().manual_seed(0))
    d = deepest_rank(out)
    assert abs((d == -1).float().mean() - 0.1) < 0.02
    assert abs(((d >= 0) & (d < 6)).float().mean() - 0.2) < 0.02
    assert torch.equal(out, cut_lineage(ids, d))  # dropout only ever cuts the tail
    cut = d[(d >= 0) & (d < 6)]  # ~800 cut rows, each cut at a rank drawn evenly from 0..5 (sd of a share: 0.013)
    shares = torch.bincount(cut, minlength=6).float() / len(cut)
    assert (shares - 1 / 6).abs().max() < 0.05, shares
    # rows of another depth are cut above their own deepest rank, not the batch's
    mixed = torch.tensor([[1, 1, 2, 3, 0, 0, 0], [1, 1, 2, 3, 4, 5, 6]]).repeat(2000, 1)
    d = deepest_rank(condition_dropout(mixed, 0.0, 1.0, generator=torch.Generator().manual_seed(1)))  # always cut
    assert set(d[::2].tolist()) == {0, 1, 2} and set(d[1::2].tolist()) == {0, 1, 2, 3, 4, 5}


def test_dropout_draws_choose_drop_cut_or_keep():
    """draws[0] picks drop (< p_uncond), cut (< p_uncond + p_cut) or keep; draws[1] picks the cut's rank."""
    ids = torch.tensor([[1, 1, 2, 3, 4, 5, 6]]).repeat(4, 1)
    draws = torch.tensor([[0.05, 0.15, 0.15, 0.9], [0.99, 0.0, 0.99, 0.0]])  # (2, B)
    out = condition_dropout(ids, 0.1, 0.2, draws=draws)
    assert deepest_rank(out).tolist() == [-1, 0, 5, 6]  # dropped; cut at the coarsest or finest below 6; kept


# -----------------------------------------------------------------------------
# The noise schedules


def test_noise_schedules():
    for schedule in ["linear", "cosine"]:
        d = Diffusion(DiffusionConfig(noise_schedule=schedule))
        assert d.beta.shape == (1000,) and (d.beta > 0).all() and (d.beta < 1).all()
        assert (d.alpha_bar[1:] < d.alpha_bar[:-1]).all()  # strictly more noise at every step
        assert d.alpha_bar[0] > 0.99 and d.alpha_bar[-1] < 1e-3  # x_T is almost pure noise
    # q_sample has the moments of eq. 4
    d = Diffusion(DiffusionConfig())
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    xt = d.q_sample(x0, torch.full((20000,), 300), torch.randn_like(x0))
    a = d.alpha_bar[300]
    assert abs(xt.mean() - a.sqrt() * 0.5) < 0.02 and abs(xt.var() - (1 - a)) < 0.02


def test_linear_schedule_is_ddpms():
    # Ho et al. 2020, section 4: beta rises linearly from beta_1 = 1e-4 to beta_T = 0.02 over T = 1000 steps,
    # which leaves alpha_bar_T = 4.04e-5 (the value quoted for DDPM's schedule); 1 / alpha_bar_t at t = 300 and
    # 700 (our 0-based 299 and 699: 2.52 and 144) is how much the v-loss up-weights those steps (docs/experiments.md)
    d = Diffusion(DiffusionConfig(noise_schedule="linear"))
    for t, beta in [(0, 1e-4), (499, 1e-4 + 0.0199 * 499 / 999), (999, 0.02)]:
        assert d.beta[t].item() == pytest.approx(beta, rel=1e-5)
    assert d.alpha_bar[999].item() == pytest.approx(4.0358e-5, rel=1e-3)
    assert d.alpha_bar[299].item() == pytest.approx(0.39642, rel=1e-3)
    assert d.alpha_bar[699].item() == pytest.approx(0.0069661, rel=1e-3)


def test_scaled_linear_schedule_is_latent_diffusions():
    # LDM / Stable Diffusion's "scaled_linear": sqrt(beta) rises linearly from sqrt(0.00085) to sqrt(0.012);
    # it leaves alpha_bar_T = 0.00466 (Stable Diffusion's last alphas_cumprod, 0.0047), about 115x Ho's 4.04e-5
    d = Diffusion(DiffusionConfig(noise_schedule="scaled-linear"))
    root = lambda t: 0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * t / 999  # noqa: E731
    for t in (0, 499, 999):
        assert d.beta[t].item() == pytest.approx(root(t) ** 2, rel=1e-6)
    assert d.alpha_bar[999].item() == pytest.approx(4.6601e-3, rel=1e-3)
    # a little more noise than Ho's below t = 102, and much less above: 0.276 against 0.078 at t = 500
    linear = Diffusion(DiffusionConfig(noise_schedule="linear")).alpha_bar
    assert (d.alpha_bar[:102] < linear[:102]).all() and (d.alpha_bar[102:] > linear[102:]).all()
    assert d.alpha_bar[500].item() == pytest.approx(0.2763, rel=1e-3)


def test_cosine_schedule_is_improved_ddpms():
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) * pi / 2),
    # s = 0.008, with each beta clipped at 0.999 (which only the last step reaches). Our index t is their t + 1.
    # The values, evaluated once in float64 from eq. 17: half the signal at half the steps.
    d = Diffusion(DiffusionConfig(noise_schedule="cosine"))
    for t, alpha_bar in [(0, 0.999959), (249, 0.847012), (499, 0.493844), (749, 0.144272), (989, 2.42857e-4)]:
        assert d.alpha_bar[t].item() == pytest.approx(alpha_bar, rel=1e-4)
    assert d.beta[999].item() == pytest.approx(0.999)


def test_unknown_noise_schedule_or_prediction_is_refused():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        Diffusion(DiffusionConfig(noise_schedule="quadratic"))
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        Diffusion(DiffusionConfig(prediction="x0"))


# -----------------------------------------------------------------------------
# The loss


def test_v_prediction_gives_back_eps():
    d = Diffusion(DiffusionConfig(prediction="v"))
    x0, eps, t = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999])
    a = d.alpha_bar[t].view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # what a perfect v-network outputs
    torch.testing.assert_close(d.eps(lambda x_t, t, ids: v, d.q_sample(x0, t, eps), t, None), eps, atol=1e-5, rtol=0)


def test_minimising_the_loss_recovers_x0_from_x_t():
    # What the loss asks for, seen from outside: a network trained on fixed (x_0, t, eps) until the loss is small
    # must predict the eps that turns x_t = sqrt(a) x_0 + sqrt(1 - a) eps (eq. 4, written out here) back into x_0.
    # A loss that merely fell could have fitted any target; this one must be DDPM's.
    torch.manual_seed(0)
    model, d = TaxaDiffusion(TINY_UNET, VOCAB), Diffusion(DiffusionConfig())
    x0 = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    eps = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ids, t = torch.tensor([[1, 1, 1, 2, 3, 4, 5]]).repeat(4, 1), torch.tensor([100, 300, 500, 700])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = d.loss(model, x0, ids, t=t, eps=eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
    a = d.alpha_bar[t].view(-1, 1, 1, 1)  # (4, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with torch.no_grad():
        x0_hat = (x_t - (1 - a).sqrt() * d.eps(model, x_t, t, ids)) / a.sqrt()
    assert (x0_hat - x0).abs().mean() < 0.05  # measured 0.02 (an untrained network: 0.44; guessing 0: 0.5)


def test_v_loss_weight_is_the_v_error():
    torch.manual_seed(0)
    model, d = TaxaDiffusion(TINY_UNET, VOCAB), Diffusion(DiffusionConfig())
    x0, eps = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 3, 32, 32)
    ids, t = torch.tensor([[1, 1, 1, 2, 3, 4, 5]]).repeat(4, 1), torch.tensor([0, 300, 700, 999])
    a = d.alpha_bar[t].view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # the v target (Salimans & Ho 2022)
    with torch.no_grad():
        v_error = (v - model(d.q_sample(x0, t, eps), t, ids)).pow(2).mean()
        torch.testing.assert_close(d.loss(model, x0, ids, t=t, eps=eps, weight="v"), v_error)


def test_the_loss_reads_the_lineage_and_eps_weight_is_algorithm_1():
    # a randomized network (a fresh one outputs 0 whatever it is given, as its last conv starts at zero)
    model, d = randomize(TaxaDiffusion(TINY_UNET, VOCAB)), Diffusion(DiffusionConfig())
    x0, eps = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 3, 32, 32)
    ids, t = torch.tensor([[1, 1, 1, 2, 3, 4, 5]]).repeat(4, 1), torch.tensor([0, 300, 700, 999])
    x_t = d.q_sample(x0, t, eps)
    losses = []
    with torch.no_grad():
        for lineage in [ids, torch.zeros_like(ids)]:  # the loss sees the lineage it is given, not another one
            per_example = (eps - d.eps(model, x_t, t, lineage)).pow(2).mean(dim=(1, 2, 3))  # (4,)
            losses.append(d.loss(model, x0, lineage, t=t, eps=eps, weight="eps"))
            torch.testing.assert_close(losses[-1], per_example.mean())  # (the v weight: the test above)
    # the two lineages give two losses (measured 3e-4 apart), far beyond assert_close's tolerance (1e-5) above
    assert (losses[0] - losses[1]).abs() > 1e-4, losses
    with pytest.raises(ValueError, match="unknown loss weight 'snr'"):
        d.loss(model, x0, ids, t=t, eps=eps, weight="snr")


# -----------------------------------------------------------------------------
# The samplers, against closed forms: data from a Gaussian, where the exact eps is known, so no network is needed


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
    d = Diffusion(DiffusionConfig(noise_schedule=schedule))
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


def test_dpm_solver_is_second_order_on_an_uneven_grid():
    """DPM-Solver++(2M) on steps alternately h and 2h long in lambda, where its ratio r_i = h_{i-1} / h_i is 2 or
    1/2: in float64, against the exact flow of Gaussian data, its error falls about 4x when the steps double
    (second order); an extrapolation that took r = 1 there would fall 2x (first order). A dense, smooth schedule
    (lambda even in t over [-3, 3], 10^6 timesteps) keeps the grid free of rounding."""
    n_t = 1_000_000
    d = Diffusion(DiffusionConfig()).double()
    d.alpha_bar = torch.sigmoid(2 * torch.linspace(3, -3, n_t + 1, dtype=torch.float64))  # lambda_t = 3 - 6 t / n_t
    x_T = torch.linspace(-3, 3, 101, dtype=torch.float64).view(-1, 1, 1, 1)
    a_T, a_0 = d.alpha_bar[n_t], d.alpha_bar[0]
    z = (x_T - a_T.sqrt() * MU) / (a_T * S ** 2 + 1 - a_T).sqrt()  # the standardised value the ODE keeps
    # the solver's last step returns E[x_0 | x_{t=0}] for the exact x_{t=0} = sqrt(a_0) MU + sqrt(a_0 S^2 + 1 - a_0) z
    exact = MU + a_0.sqrt() * S ** 2 * z / (a_0 * S ** 2 + 1 - a_0).sqrt()
    errors = []
    for intervals in (16, 32, 64):
        h = torch.tensor([1.0, 2.0], dtype=torch.float64).repeat(intervals // 2)  # h, 2h, h, 2h, ...
        u = torch.cat([torch.zeros(1, dtype=torch.float64), h.cumsum(0) / h.sum()])  # (intervals + 1,) 0 .. 1
        ts = (n_t * (1 - u)).round().long()  # from t = n_t down to 0
        d.timesteps = lambda steps, spacing, ts=ts: ts
        out = d.dpm_solver(gaussian_eps(d, MU, S), x_T, intervals + 1, clip=None)
        errors.append((out - exact).abs().max().item())
    assert errors[0] / errors[1] > 3.2 and errors[1] / errors[2] > 3.5, errors  # measured 3.51, 3.85 (r = 1: 1.8)
    assert errors[2] < 1e-3, errors  # measured 6.7e-4


# -----------------------------------------------------------------------------
# Guidance and the EMA


def test_guidance_formula_and_negatives():
    ids = torch.tensor([[1, 1, 2, 3, 4, 5, 6]])
    assert negative_lineage(ids, "null", 2).tolist() == [[0] * 7]
    assert negative_lineage(ids, "parent", 2).tolist() == [[1, 1, 2, 3, 4, 5, 0]]
    assert negative_lineage(ids, "root", 2).tolist() == [[1, 1, 2, 0, 0, 0, 0]]
    mixed = torch.tensor([[1, 1, 2, 3, 4, 5, 0], [1, 1, 2, 3, 0, 0, 0]])  # a genus and an order: one rank up each
    assert negative_lineage(mixed, "parent", 2).tolist() == [[1, 1, 2, 3, 4, 0, 0], [1, 1, 2, 0, 0, 0, 0]]
    assert negative_lineage(mixed, "root", 3).tolist() == [[1, 1, 2, 3, 0, 0, 0]] * 2  # a first stage at order

    def fake_model(x, t, ids):  # "eps" = how many ranks are known, per example
        return x * 0 + (ids > 0).sum(-1).float().view(-1, 1, 1, 1)
    eps_fn = guided_eps_fn(Diffusion(DiffusionConfig(prediction="eps")), fake_model, ids, 3.0, "root", 2)
    eps = eps_fn(torch.zeros(1, 3, 2, 2), torch.tensor([5]))
    assert torch.allclose(eps, torch.full_like(eps, 3 + 3.0 * (7 - 3)))  # eps(c0) + s (eps(c) - eps(c0))


def test_same_seed_same_samples():
    model, d = randomize(TaxaDiffusion(TINY_UNET, VOCAB), std=0.02).eval(), Diffusion(DiffusionConfig())
    ids = torch.tensor([[1, 1, 1, 2, 3, 4, 5]]).repeat(2, 1)
    run = lambda seed: d.sample(guided_eps_fn(d, model, ids, 2.0), (2, 3, 32, 32), steps=3, sampler="ddpm",
                                generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_ema_update():
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    expected = [0.9 * p + 0.1 * q for p, q in zip(a.parameters(), b.parameters())]
    update_ema(a, b, 0.9)
    for p, e in zip(a.parameters(), expected):
        torch.testing.assert_close(p, e)


def test_ema_of_a_constant_model_forgets_its_start_geometrically():
    """n updates towards a model that stays put leave decay^n of the distance (float64, no rounding to speak of)."""
    ema, target = nn.Linear(3, 3).double(), nn.Linear(3, 3).double()
    start = [p.clone() for p in ema.parameters()]
    for _ in range(10):
        update_ema(ema, target, 0.8)
    for p, p0, q in zip(ema.parameters(), start, target.parameters()):
        torch.testing.assert_close(p - q, 0.8 ** 10 * (p0 - q))


# -----------------------------------------------------------------------------
# Guidance inside a noise interval (guided_eps_fn's interval)


class Branches(torch.nn.Module):
    """A stand-in network whose output says which lineage it was given: v = the lineage's id sum, everywhere."""

    def __init__(self):
        super().__init__()
        self.calls = []  # (t, batch size) of every call

    def forward(self, x, t, ids):
        self.calls.append((int(t[0]), len(x)))
        return ids.sum(1, dtype=x.dtype).view(-1, 1, 1, 1).expand_as(x)


def sigmas_of_a_run(diffusion, steps):
    """The noise level of each DPM-Solver++ step, in the order the sampler takes them."""
    return [math.sqrt((1 - a) / a) for a in diffusion.alpha_bar[diffusion.timesteps(steps, "logsnr")].tolist()]


@pytest.mark.parametrize("interval, guided", [(None, "all"), ((0.0, math.inf), "all"), ((1e9, 2e9), "none"),
                                              ((0.5, 5.0), "inside")])
def test_guidance_applies_exactly_where_sigma_lies_in_the_interval(interval, guided):
    """Every step of a 15-step run is guided (two branches in one batch of 2B), none is, or exactly those with
    sigma_t in [lo, hi]; an unguided step is one call of B."""
    diffusion, net, B = Diffusion(DiffusionConfig()), Branches(), 3
    ids = torch.tensor([[1, 1, 2, 1, 3, 2, 1]] * B)
    diffusion.sample(guided_eps_fn(diffusion, net, ids, 3.0, "parent", 2, interval), (B, 3, 4, 4), steps=15,
                     generator=torch.Generator().manual_seed(0))
    sigmas = sigmas_of_a_run(diffusion, 15)
    inside = {"all": [True] * 15, "none": [False] * 15,
              "inside": [0.5 <= s <= 5.0 for s in sigmas]}[guided]
    assert 0 < sum(inside) < 15 or guided != "inside"  # the interval cuts the run somewhere
    assert [n for _, n in net.calls] == [2 * B if g else B for g in inside]


def test_a_step_outside_the_interval_is_the_conditional_prediction():
    """Outside [lo, hi] the guided eps is eps(c) itself, whatever the scale and the negative; inside it is
    eps(neg) + s (eps(c) - eps(neg)), here with the stand-in's outputs known in closed form."""
    diffusion, net = Diffusion(DiffusionConfig()), Branches()
    ids = torch.tensor([[1, 1, 2, 1, 3, 2, 4]])  # parent = the lineage without its species id 4
    x = torch.randn(1, 3, 4, 4)
    t_low, t_high = torch.tensor([5]), torch.tensor([900])  # sigma 0.03 and 74 on Ho's betas
    lo_hi = (1.0, 1000.0)
    eps_fn = guided_eps_fn(diffusion, net, ids, 5.0, "parent", 2, lo_hi)
    plain = diffusion.eps(net, x, t_low, ids)
    torch.testing.assert_close(eps_fn(x, t_low), plain, rtol=0, atol=0)  # bit for bit: one conditional call
    a = diffusion.alpha_bar[900]
    eps = lambda v: (1 - a).sqrt() * x + a.sqrt() * v  # v -> eps (Diffusion.eps)
    torch.testing.assert_close(eps_fn(x, t_high), eps(torch.tensor(10.0)) + 5 * (eps(torch.tensor(14.0)) - eps(torch.tensor(10.0))))
