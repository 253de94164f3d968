import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from model import Diffusion, DiffusionConfig, RankConditioner, TaxaDiffusion, condition_dropout, cut_lineage, deepest_rank, guided_eps_fn, negative_lineage, update_ema
from plumbing.checkpoints import build_model, load_checkpoint, save_checkpoint
from plumbing.images import save_grid
from unet import SIZES, UNet, UNetConfig, attention, attention_reference

TINY = UNetConfig(**SIZES["tiny"])
VOCAB = [2, 3, 4, 5, 6, 7, 9]  # ids per rank, 0 = unknown


def randomize(module, seed=0, std=0.1):
    """Give every parameter random values (zero-initialised layers would hide the inputs' effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def test_unet_shapes_pixels_and_latents():
    for cfg in [TINY, UNetConfig(**{**SIZES["tiny"], "in_channels": 4, "image_size": 16})]:
        net = UNet(cfg)
        x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
        out = net(x, torch.tensor([0, 999]), torch.randn(2, 8, cfg.context_dim))
        assert out.shape == x.shape


def test_default_size_fits_a_cpu():
    n = sum(p.numel() for p in UNet(UNetConfig()).parameters())
    assert 1e6 <= n <= 3e6


def test_attention_matches_softmax_definition():
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    # the definition, one (batch, head) at a time, in float64: softmax over the keys of q k^T / sqrt(d), times v
    expected = torch.stack([torch.stack([torch.softmax(q[b, h].double() @ k[b, h].double().T / 8 ** 0.5, -1)
                                         @ v[b, h].double() for h in range(3)]) for b in range(2)]).float()
    torch.testing.assert_close(attention_reference(q, k, v), expected)
    for impl in ("auto", "sdpa", "torch"):  # on a CPU "auto" is SDPA
        torch.testing.assert_close(attention(q, k, v, impl), expected)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        attention(q, k, v, "flash")


def test_unet_with_sdpa_matches_the_reference():
    """The fast path (PyTorch's fused attention) and the plain einsum one give the same UNet, forward and backward."""
    nets = {impl: randomize(UNet(UNetConfig(**{**SIZES["tiny"], "attention_impl": impl}))) for impl in ("sdpa", "torch")}
    x, t, ctx = torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), torch.randn(2, 8, TINY.context_dim)
    outs, grads = {}, {}
    for impl, net in nets.items():
        outs[impl] = net(x, t, ctx)
        outs[impl].square().mean().backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert outs["torch"].abs().max() > 0.1  # random weights: attention changes the output
    torch.testing.assert_close(outs["sdpa"], outs["torch"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["sdpa"], grads["torch"], rtol=1e-4, atol=1e-5)


def test_changing_the_lineage_changes_the_output():
    model = randomize(TaxaDiffusion(TINY, VOCAB))
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
    # token r = sum of embeddings 0..r + rank vector; unknown ranks add nothing
    e = sum(cond.embed[r].weight[ids[2, r]] for r in range(4))
    torch.testing.assert_close(tok[2, 7], e + cond.rank_vec[6])
    # with the species table at zero (as when its stage begins), a species starts exactly as its genus
    nn.init.zeros_(cond.embed[6].weight)
    torch.testing.assert_close(cond(ids[:1]), cond(cut_lineage(ids[:1], 5)))


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


def test_schedules():
    for schedule in ["linear", "cosine"]:
        d = Diffusion(DiffusionConfig(schedule=schedule))
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
    d = Diffusion(DiffusionConfig(schedule="linear"))
    for t, beta in [(0, 1e-4), (499, 1e-4 + 0.0199 * 499 / 999), (999, 0.02)]:
        assert d.beta[t].item() == pytest.approx(beta, rel=1e-5)
    assert d.alpha_bar[999].item() == pytest.approx(4.0358e-5, rel=1e-3)
    assert d.alpha_bar[299].item() == pytest.approx(0.39642, rel=1e-3)
    assert d.alpha_bar[699].item() == pytest.approx(0.0069661, rel=1e-3)


def test_scaled_linear_schedule_is_latent_diffusions():
    # LDM / Stable Diffusion's "scaled_linear": sqrt(beta) rises linearly from sqrt(0.00085) to sqrt(0.012);
    # it leaves alpha_bar_T = 0.00466 (Stable Diffusion's last alphas_cumprod, 0.0047), about 115x Ho's 4.04e-5
    d = Diffusion(DiffusionConfig(schedule="scaled-linear"))
    root = lambda t: 0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * t / 999  # noqa: E731
    for t in (0, 499, 999):
        assert d.beta[t].item() == pytest.approx(root(t) ** 2, rel=1e-6)
    assert d.alpha_bar[999].item() == pytest.approx(4.6601e-3, rel=1e-3)
    # a little more noise than Ho's below t = 102, and much less above: 0.276 against 0.078 at t = 500
    linear = Diffusion(DiffusionConfig(schedule="linear")).alpha_bar
    assert (d.alpha_bar[:102] < linear[:102]).all() and (d.alpha_bar[102:] > linear[102:]).all()
    assert d.alpha_bar[500].item() == pytest.approx(0.2763, rel=1e-3)


def test_cosine_schedule_is_improved_ddpms():
    # Nichol & Dhariwal 2021, eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t / T + s) / (1 + s) * pi / 2),
    # s = 0.008, with each beta clipped at 0.999 (which only the last step reaches). Our index t is their t + 1.
    d = Diffusion(DiffusionConfig(schedule="cosine"))
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in [0, 249, 499, 749, 989]:
        assert d.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-4)
    assert d.alpha_bar[499].item() == pytest.approx(0.49384, rel=1e-4)  # half the signal at half the steps
    assert d.beta[999].item() == pytest.approx(0.999)


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
    model, d = TaxaDiffusion(TINY, VOCAB), Diffusion(DiffusionConfig())
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
    model, d = TaxaDiffusion(TINY, VOCAB), Diffusion(DiffusionConfig())
    x0, eps = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 3, 32, 32)
    ids, t = torch.tensor([[1, 1, 1, 2, 3, 4, 5]]).repeat(4, 1), torch.tensor([0, 300, 700, 999])
    a = d.alpha_bar[t].view(-1, 1, 1, 1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0  # the v target (Salimans & Ho 2022)
    with torch.no_grad():
        v_error = (v - model(d.q_sample(x0, t, eps), t, ids)).pow(2).mean()
        torch.testing.assert_close(d.loss(model, x0, ids, t=t, eps=eps, weight="v"), v_error)


def test_the_loss_reads_the_lineage_and_eps_weight_is_algorithm_1():
    # a randomized network (a fresh one outputs 0 whatever it is given, as its last conv starts at zero)
    model, d = randomize(TaxaDiffusion(TINY, VOCAB)), Diffusion(DiffusionConfig())
    x0, eps = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 3, 32, 32)
    ids, t = torch.tensor([[1, 1, 1, 2, 3, 4, 5]]).repeat(4, 1), torch.tensor([0, 300, 700, 999])
    x_t = d.q_sample(x0, t, eps)
    losses = []
    with torch.no_grad():
        for lineage in [ids, torch.zeros_like(ids)]:  # the loss sees the lineage it is given, not another one
            per_example = (eps - d.eps(model, x_t, t, lineage)).pow(2).mean(dim=(1, 2, 3))  # (4,)
            losses.append(d.loss(model, x0, lineage, t=t, eps=eps, weight="eps"))
            torch.testing.assert_close(losses[-1], per_example.mean())
            torch.testing.assert_close(d.loss(model, x0, lineage, t=t, eps=eps, weight="v"),
                                       (per_example / d.alpha_bar[t]).mean())
    # the two lineages give two losses (measured 3e-4 apart), far beyond assert_close's tolerance (1e-5) above
    assert (losses[0] - losses[1]).abs() > 1e-4, losses


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
    eps = guided_eps_fn(Diffusion(DiffusionConfig(prediction="eps")), fake_model, ids, 3.0, "root", 2)(torch.zeros(1, 3, 2, 2), torch.tensor([5]))
    assert torch.allclose(eps, torch.full_like(eps, 3 + 3.0 * (7 - 3)))  # eps(c0) + s (eps(c) - eps(c0))


def test_same_seed_same_samples():
    model, d = randomize(TaxaDiffusion(TINY, VOCAB), std=0.02).eval(), Diffusion(DiffusionConfig())
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


def test_checkpoint_round_trip_weights_only(tmp_path):
    from dataclasses import asdict
    model = randomize(TaxaDiffusion(TINY, VOCAB))
    path = tmp_path / "genus.pt"
    save_checkpoint(path, model=model.state_dict(), ema=model.state_dict(), unet_config=asdict(TINY),
                    vocab_sizes=VOCAB, lineages=[["Animalia", None, "Aves"]], level="genus")
    assert not (tmp_path / "genus.pt.tmp").exists()
    loaded, ckpt = load_checkpoint(path)  # uses torch.load(weights_only=True)
    assert ckpt["level"] == "genus" and isinstance(build_model(ckpt), TaxaDiffusion)
    # weights of another network (here: another width) end in one line that names the file and what to do
    other = TaxaDiffusion(UNetConfig(**{**SIZES["tiny"], "base_channels": 8}), VOCAB)
    save_checkpoint(path, model=other.state_dict(), ema=other.state_dict(), unet_config=asdict(TINY),
                    vocab_sizes=VOCAB, lineages=[["Animalia", None, "Aves"]], level="genus")
    with pytest.raises(ValueError, match=r"genus.pt: its weights do not fit this version of the network "
                                         r"\(size mismatch for .*\); train it again"):
        load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_grid_labels_keep_their_spaces(tmp_path):
    """'Corvus corax' must not read 'Corvuscorax': the label ends a whole character further right."""
    def label_end(label):
        save_grid(torch.zeros(1, 3, 16, 16), tmp_path / "g.png", 1, labels=[label])
        img = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
        return np.nonzero((img[:, :-16] < 128).any(0))[0].max()  # the rightmost dark column left of the image
    assert label_end("Corvus corax") - label_end("Corvuscorax") >= 5
