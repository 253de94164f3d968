"""
The method: the rank-token conditioner, condition dropout, the DDPM process (schedule, loss, samplers),
guidance and the EMA. The idea: a lineage becomes one token per rank, each the sum of the embeddings from
kingdom down to that rank, and the UNet cross-attends to them. Ranks finer than the current stage are id 0
and add nothing; when their stage comes, their table starts at zero (train.py), so every new taxon starts
exactly as its parent. Condition dropout drops the whole lineage at random (the unconditional model that
classifier-free guidance needs) or cuts it at a coarser rank (the partial lineages TaxaGuide guides from).

The diffusion process knows nothing about the network's insides: it calls
model(x_t, t, ids) and reads the output as v (by default) or as the noise eps,
see Diffusion.eps. Names follow the DDPM paper (Ho et al. 2020): beta_t,
alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s.

Read next: train.py (the stage-by-stage training loop), then sample.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from unet import UNet, UNetConfig

# -----------------------------------------------------------------------------
# Conditioning: a lineage of R ranks becomes R + 1 context tokens


class RankConditioner(nn.Module):
    """Lineage ids (B, R) -> context tokens (B, R + 1, D).

    Output token 0 is a learned null token; output token r + 1 is the sum of the
    lineage's embeddings at ranks 0..r plus a learned rank vector (README's
    table numbers them so), so two species of one genus share every token but
    the last and start out close together. An id of 0 (unknown, or beyond the
    current stage) adds nothing. The null token is always there, so a fully
    unknown lineage still gives attention something to look at.
    """

    def __init__(self, vocab_sizes, dim):
        super().__init__()
        self.embed = nn.ModuleList(nn.Embedding(n, dim) for n in vocab_sizes)  # N(0, 1) init; train.py zeros the finer ranks
        self.rank_vec = nn.Parameter(torch.randn(len(vocab_sizes), dim) * 0.5)
        self.null = nn.Parameter(torch.randn(1, dim) * 0.5)

    def forward(self, ids):
        known = (ids > 0).unsqueeze(-1)  # (B, R, 1)
        e = torch.stack([table(ids[:, r]) for r, table in enumerate(self.embed)], dim=1)  # (B, R, D)
        tokens = (e * known).cumsum(dim=1) + self.rank_vec  # (B, R, D): token r sums ranks 0..r
        null = self.null.expand(ids.shape[0], 1, -1)  # (B, 1, D)
        return torch.cat([null, tokens], dim=1)  # (B, R + 1, D)


class TaxaDiffusion(nn.Module):
    """The network: lineage ids -> rank tokens (the conditioner) -> the UNet's cross-attention; outputs v (or eps)."""

    def __init__(self, unet_config: UNetConfig, vocab_sizes):
        super().__init__()
        self.conditioner = RankConditioner(vocab_sizes, unet_config.context_dim)
        self.unet = UNet(unet_config)

    def forward(self, x_t, t, ids):
        return self.unet(x_t, t, self.conditioner(ids))


def cut_lineage(ids, finest):
    """Forget every rank finer than `finest` (an int, or a (B,) tensor of ints): ids beyond it become 0."""
    ranks = torch.arange(ids.shape[-1], device=ids.device)
    finest = torch.as_tensor(finest, device=ids.device).reshape(-1, 1)  # (B or 1, 1)
    return ids * (ranks <= finest)


def deepest_rank(ids):
    """Index of the finest known rank of each lineage, -1 if none is known: (B, R) -> (B,)."""
    ranks = torch.arange(ids.shape[-1], device=ids.device)
    return torch.where(ids > 0, ranks, -1).amax(dim=-1)


def condition_dropout(ids, p_uncond, p_cut, generator=None, draws=None):
    """Training-time dropout of the lineage: this is what makes guidance and partial lineages work.

    With probability p_uncond the whole lineage is dropped (the null condition
    of classifier-free guidance); with probability p_cut it is cut at a random
    coarser rank, so the model learns "an Aves/Passeriformes with any family".
    draws, (2, B) uniforms in [0, 1), makes both choices; it is drawn from `generator` unless given.
    """
    if draws is None:
        draws = torch.rand(2, ids.shape[0], generator=generator, device=ids.device)
    deepest = deepest_rank(ids)
    random_rank = (draws[1] * deepest.clamp(min=0)).long()  # in [0, deepest)
    finest = torch.where(draws[0] < p_uncond, -1, torch.where(draws[0] < p_uncond + p_cut, random_rank, deepest))
    return cut_lineage(ids, finest)


# -----------------------------------------------------------------------------
# The DDPM process


@dataclass
class DiffusionConfig:
    timesteps: int = 1000  # T
    noise_schedule: str = "linear"  # "linear" (Ho et al.), "cosine" (Nichol & Dhariwal) or "scaled-linear" (LDM's, for latents)
    prediction: str = "v"  # what the network outputs: "eps", or "v" turned into eps by Diffusion.eps


class Diffusion(nn.Module):
    """The forward process q(x_t | x_0), the loss (Algorithm 1's, or the v-error) and the samplers."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        T = cfg.timesteps
        if cfg.noise_schedule == "linear":
            beta = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        elif cfg.noise_schedule == "cosine":
            # alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), beta clipped at 0.999 (improved DDPM, eq. 17)
            s = 0.008
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
            beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        elif cfg.noise_schedule == "scaled-linear":
            # latent diffusion's (and Stable Diffusion's): sqrt(beta) rises linearly from sqrt(0.00085) to
            # sqrt(0.012): much less noise than Ho's above t = 100 (alpha_bar 0.28 against 0.08 at t = 500,
            # 0.0047 at T), for small, dense latents
            beta = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"unknown noise schedule '{cfg.noise_schedule}' (use 'linear', 'cosine' or 'scaled-linear')")
        self.T = T
        if cfg.prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction '{cfg.prediction}' (use 'eps' or 'v')")
        self.prediction = cfg.prediction
        self.register_buffer("beta", beta.float())  # \beta_t, t = 0..T-1 (the paper's 1..T)
        self.register_buffer("alpha_bar", torch.cumprod(1 - beta, dim=0).float())  # \bar\alpha_t

    def q_sample(self, x0, t, eps):
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps   (DDPM eq. 4)."""
        a = self.alpha_bar[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return a.sqrt() * x0 + (1 - a).sqrt() * eps

    def sigma(self, t):
        """The noise level of step t, sqrt((1 - alpha_bar_t) / alpha_bar_t): x_t / sqrt(alpha_bar_t) = x_0 + sigma_t eps."""
        return ((1 - self.alpha_bar[t]) / self.alpha_bar[t]).sqrt().item()

    def eps(self, model, x_t, t, ids):
        """eps_theta(x_t, t): the network's output read as a noise prediction.

        With prediction="v" the network outputs v = sqrt(a) eps - sqrt(1 - a) x_0
        (Salimans & Ho 2022), so eps = sqrt(1 - a) x_t + sqrt(a) v, a = alpha_bar_t.
        Near t = T, eps is then almost x_t by construction. A network that
        outputs eps itself must copy x_t through the whole UNet very precisely
        there, since sampling divides its error by sqrt(alpha_bar_T) = 0.006 to
        get x_0; a small UNet trained for minutes cannot, and draws coloured
        noise. The loss (Diffusion.loss) compares eps, weighted per t as train.py asks.
        """
        out = model(x_t, t, ids)
        if self.prediction == "eps":
            return out
        a = self.alpha_bar[t].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return (1 - a).sqrt() * x_t + a.sqrt() * out

    def loss(self, model, x0, ids, generator=None, t=None, eps=None, weight="v"):
        """Algorithm 1: t ~ U{1..T}, eps ~ N(0, I), minimise ||eps - eps_theta(x_t, t)||^2.

        weight="v" divides each example's eps-error by alpha_bar_t, which makes it the v-error
        ||v - v_theta||^2 (eps = sqrt(1 - a) x_t + sqrt(a) v, so the eps-error is a times the v-error).
        The eps-loss all but ignores large t, where the image is still undecided and the condition
        matters most; the v-loss weighs every t about alike.
        t and eps are drawn from `generator` unless given (train.py draws them itself, see there).
        """
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device, generator=generator)
        if eps is None:
            eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        err = (eps - self.eps(model, self.q_sample(x0, t, eps), t, ids)).pow(2).mean(dim=(1, 2, 3))  # (B,)
        if weight == "v":
            err = err / self.alpha_bar[t]
        elif weight != "eps":
            raise ValueError(f"unknown loss weight '{weight}' (use eps or v)")
        return err.mean()

    def timesteps(self, steps, spacing="time"):
        """`steps` distinct timesteps from T - 1 down to 0, evenly spaced in t ("time") or in lambda_t ("logsnr").

        lambda_t = log(alpha_t / sigma_t) = log(alpha_bar_t / (1 - alpha_bar_t)) / 2 is half the log signal-to-noise
        ratio (alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t) in the DPM-Solver papers' names).
        """
        if not 1 <= steps <= self.T:  # T distinct timesteps exist; more would index alpha_bar below t = 0
            raise ValueError(f"steps must be 1 to T = {self.T} (got {steps})")
        if spacing == "time":
            return torch.linspace(self.T - 1, 0, steps, device=self.beta.device).round().long()  # e.g. 999, 979, ..., 0
        if spacing != "logsnr":
            raise ValueError(f"unknown timestep spacing '{spacing}' (use time or logsnr)")
        lam = 0.5 * torch.log(self.alpha_bar / (1 - self.alpha_bar))  # (T,), falling as t grows
        target = torch.linspace(lam[-1].item(), lam[0].item(), steps, device=lam.device)  # even; t = T - 1 first
        ts = (lam[None] - target[:, None]).abs().argmin(dim=1)  # (steps,) the timestep nearest each target
        # Near t = 0, lambda falls by more than a target's spacing per timestep, so neighbours can round to the same t.
        # Keep them apart: cap each so the ones before it still fit below T, then lift each above the next.
        ts = torch.minimum(ts, self.T - 1 - torch.arange(steps, device=ts.device))
        for i in reversed(range(steps - 1)):
            ts[i] = torch.maximum(ts[i], ts[i + 1] + 1)
        return ts

    @torch.inference_mode()
    def sample(self, eps_fn, shape, steps=15, sampler="dpm++", generator=None, device="cpu", x_T=None, clip=1.0):
        """Draw x_0 from noise with `steps` calls of eps_fn(x_t, t) -> eps, whatever the sampler.

        sampler: "ddim" (deterministic), "ddpm" (ancestral: fresh noise at every step), both in `ddim`; or "dpm++"
        (DPM-Solver++(2M), a second-order ODE solver, in `dpm_solver`: on the Gaussian of tests/test_model.py its
        10 steps land 5 times closer to the truth than 10 DDIM steps; tests/benchmarks/samplers.py measures a real
        model).
        Guidance lives in eps_fn (see guided_eps_fn), so one step is one network call per guidance branch.
        clip: each predicted x_0 is clamped to [-clip, clip] (1.0: the pixel range); None leaves it free (latents).
        x_T, if given, is the starting noise; otherwise it is drawn from `generator`.
        """
        x = torch.randn(shape, generator=generator, device=device) if x_T is None else x_T
        if sampler == "dpm++":
            return self.dpm_solver(eps_fn, x, steps, clip)
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler '{sampler}' (use ddim, ddpm or dpm++)")
        return self.ddim(eps_fn, x, steps, eta=1.0 if sampler == "ddpm" else 0.0, generator=generator, clip=clip)

    def ddim(self, eps_fn, x, steps, eta=0.0, generator=None, clip=1.0):
        """From x = x_T, walk `steps` evenly spaced timesteps from T down to 0: DDIM (Song et al. 2021, eq. 12).

        eta sets the noise: eta = 0 is the deterministic DDIM sampler; eta = 1 is ancestral DDPM
        (Algorithm 2 with sigma_t^2 = the posterior variance beta~_t), on the respaced schedule when steps < T.
        """
        ts = self.timesteps(steps)
        for i, t in enumerate(ts):
            a_t = self.alpha_bar[t]
            a_prev = self.alpha_bar[ts[i + 1]] if i + 1 < steps else torch.ones((), device=x.device)
            eps = eps_fn(x, t.expand(x.shape[0]))
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()  # predicted x_0
            if clip is not None:
                x0 = x0.clamp(-clip, clip)  # ...kept in the data range
                eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()  # eps consistent with the clipped x_0
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
            noise = torch.randn(x.shape, generator=generator, device=x.device)
            x = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * noise  # clamp: rounding
        return x

    def dpm_solver(self, eps_fn, x, steps, clip=1.0):
        """From x = x_T, DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2): the diffusion ODE
        solved to second order in its data-prediction (x_0) form, one eps_fn call per step like DDIM.

        In the paper's names alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), lambda_t =
        log(alpha_t / sigma_t), and a step from t_{i-1} to t_i, of length h_i = lambda_{t_i} - lambda_{t_{i-1}}, is
            x_{t_i} = sigma_{t_i} / sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i.
        With D_i = the x_0 predicted at t_{i-1} this is the first-order step, exactly DDIM. 2M extrapolates
        along the line through the last two predictions instead,
            D_i = (1 + 1 / (2 r_i)) x0_{t_{i-1}} - 1 / (2 r_i) x0_{t_{i-2}},   r_i = h_{i-1} / h_i,
        which costs no extra call: the previous prediction is kept from the step before.
        """
        # Timesteps evenly spaced in lambda ("logSNR"), which the DPM-Solver authors find best for low-resolution
        # images such as CIFAR-10 (even spacing in t for high resolution; README of github.com/LuChengTHU/dpm-solver).
        # Ours are 32x32; on the Gaussian of tests/test_model.py it beats even spacing in t, too.
        ts = self.timesteps(steps, "logsnr")
        alpha, sigma = self.alpha_bar[ts].sqrt(), (1 - self.alpha_bar[ts]).sqrt()  # (steps,)
        lam = torch.log(alpha / sigma)  # (steps,) lambda_{t_i}, rising as the noise falls
        x0_prev = None
        for i, t in enumerate(ts):
            eps = eps_fn(x, t.expand(x.shape[0]))
            x0 = (x - sigma[i] * eps) / alpha[i]  # predicted x_0, as in DDIM
            if clip is not None:
                x0 = x0.clamp(-clip, clip)
            if i == steps - 1:  # lower_order_final: the last step goes to sigma = 0 (lambda = inf), where only
                return x0  # the first-order step is defined, and it lands on x_0 (DDIM's last step does the same)
            h = lam[i + 1] - lam[i]
            D = x0  # the first step is first order: there is no earlier prediction yet
            if x0_prev is not None:
                r = (lam[i] - lam[i - 1]) / h
                D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
            x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * torch.expm1(-h) * D  # expm1(z) = e^z - 1
            x0_prev = x0


# -----------------------------------------------------------------------------
# Guidance: TaxaGuide and classifier-free guidance in one formula


def negative_lineage(ids, guide_from, root_rank):
    """The lineage that guidance pushes away from.

    "null"   -> nothing known: vanilla classifier-free guidance
    "parent" -> the lineage one rank up: push towards what separates siblings
    "root"   -> the lineage cut at the first stage's rank: the paper's TaxaGuide
    """
    if guide_from == "null":
        return torch.zeros_like(ids)
    if guide_from == "parent":
        return cut_lineage(ids, deepest_rank(ids) - 1)
    if guide_from == "root":
        return cut_lineage(ids, root_rank)
    raise ValueError(f"unknown guidance negative '{guide_from}' (use null, parent or root)")


def guided_eps_fn(diffusion, model, ids, scale, guide_from="null", root_rank=2, interval=None):
    """eps = eps(c_neg) + s * (eps(c) - eps(c_neg)); both halves in one batch. s = 1 is plain conditioning.

    interval = (lo, hi) guides only at the steps whose noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)
    lies in [lo, hi] (Kynkaanniemi et al. 2024, arXiv 2404.07724); elsewhere a step is one conditional call.
    Sigma, not t, because it is the noise itself: the same interval means the same noise on every beta schedule.
    """
    if scale == 1.0:
        return lambda x, t: diffusion.eps(model, x, t, ids)
    both = torch.cat([ids, negative_lineage(ids, guide_from, root_rank)])  # (2B, R)

    def eps_fn(x, t):  # a sampler's t is one timestep for the whole batch
        if interval is not None and not interval[0] <= diffusion.sigma(t[0]) <= interval[1]:
            return diffusion.eps(model, x, t, ids)
        # one batch of both branches, (2B, C, H, W), split back into two (B, C, H, W)
        eps_c, eps_neg = diffusion.eps(model, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return eps_neg + scale * (eps_c - eps_neg)
    return eps_fn


# -----------------------------------------------------------------------------
# EMA: the weights every picture is drawn with


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, in one fused call over all tensors."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
