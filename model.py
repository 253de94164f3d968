"""
The diffusion side of TaxaDiffusion: the rank-token conditioner, the DDPM
process (schedule, loss, samplers) and guidance. The idea: a lineage becomes
one token per rank, each the sum of the embeddings from kingdom down to that
rank, and the UNet cross-attends to them. Ranks finer than the current stage
are id 0 and add nothing; when their stage comes, their table starts at zero
(train.py), so every new taxon starts exactly as its parent. Condition
dropout drops the whole lineage at random (the unconditional model that
classifier-free guidance needs) or cuts it at a coarser rank (the partial
lineages TaxaGuide guides from). Then, in an appendix, what the
scripts share: EMA, checkpoints, the picture grid, train.py's plumbing (reading
the data, the randomness a resumed run draws again, torchrun, Ctrl-C, a stage's
grid), latent space (the autoencoder stage of train.py --latent, the latent
cache, decoding), the one-line errors of a bad checkpoint or a full disk, and
the checks of every flag.

The diffusion process knows nothing about the network's insides: it calls
model(x_t, t, ids) and reads the output as v (by default) or as the noise eps,
see Diffusion.eps. Names follow the DDPM paper (Ho et al. 2020): beta_t,
alpha_t = 1 - beta_t, alpha_bar_t = prod_{s<=t} alpha_s. The checkpoint helpers
at the end also read the taxonomy (taxonomy.py), to match taxa by name.

Read next: train.py (the stage-by-stage training loop), then sample.py.
"""
import argparse
import contextlib
import datetime
import errno
import hashlib
import inspect
import io
import math
import os
import pickle
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from taxonomy import FORMATS, RANKS, DataError, build_taxonomy, load_data, normalize, species_counts
from unet import SIZES, Autoencoder, AutoencoderConfig, UNet, UNetConfig, autoencoder_loss

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


def cut_lineage(ids, level):
    """Forget every rank finer than `level` (an int, or a (B,) tensor of ints): ids beyond it become 0."""
    ranks = torch.arange(ids.shape[-1], device=ids.device)
    level = torch.as_tensor(level, device=ids.device).reshape(-1, 1)  # (B or 1, 1)
    return ids * (ranks <= level)


def deepest_rank(ids):
    """Index of the finest known rank of each lineage, -1 if none is known: (B, R) -> (B,)."""
    ranks = torch.arange(ids.shape[-1], device=ids.device)
    return torch.where(ids > 0, ranks, -1).amax(dim=-1)


def condition_dropout(ids, p_uncond, p_cut, generator=None, u=None):
    """Training-time dropout of the lineage: this is what makes guidance and partial lineages work.

    With probability p_uncond the whole lineage is dropped (the null condition
    of classifier-free guidance); with probability p_cut it is cut at a random
    coarser rank, so the model learns "an Aves/Passeriformes with any family".
    u, (2, B) uniforms in [0, 1), makes both choices; it is drawn from `generator` unless given.
    """
    if u is None:
        u = torch.rand(2, ids.shape[0], generator=generator, device=ids.device)
    deepest = deepest_rank(ids)
    random_level = (u[1] * deepest.clamp(min=0)).long()  # in [0, deepest)
    level = torch.where(u[0] < p_uncond, -1, torch.where(u[0] < p_uncond + p_cut, random_level, deepest))
    return cut_lineage(ids, level)


# -----------------------------------------------------------------------------
# The DDPM process


@dataclass
class DiffusionConfig:
    timesteps: int = 1000  # T
    schedule: str = "linear"  # "linear" (Ho et al.), "cosine" (Nichol & Dhariwal) or "scaled-linear" (LDM's, for latents)
    prediction: str = "v"  # what the network outputs: "eps", or "v" turned into eps by Diffusion.eps


class Diffusion(nn.Module):
    """The forward process q(x_t | x_0), the loss (Algorithm 1's, or the v-error) and the samplers."""

    def __init__(self, cfg: DiffusionConfig):
        super().__init__()
        T = cfg.timesteps
        if cfg.schedule == "linear":
            beta = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
        elif cfg.schedule == "cosine":
            # alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2), beta clipped at 0.999 (improved DDPM, eq. 17)
            s = 0.008
            f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
            beta = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        elif cfg.schedule == "scaled-linear":
            # latent diffusion's (and Stable Diffusion's): sqrt(beta) rises linearly from sqrt(0.00085) to
            # sqrt(0.012): much less noise than Ho's above t = 100 (alpha_bar 0.28 against 0.08 at t = 500,
            # 0.0047 at T), for small, dense latents
            beta = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"unknown schedule '{cfg.schedule}' (use 'linear', 'cosine' or 'scaled-linear')")
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
    def sample(self, eps_fn, shape, steps=50, sampler="ddim", generator=None, device="cpu", x_T=None, clip=1.0):
        """Draw x_0 from noise with `steps` calls of eps_fn(x_t, t) -> eps, whatever the sampler.

        sampler: "ddim" (deterministic), "ddpm" (ancestral: fresh noise at every step), both in `ddim`; or "dpm++"
        (DPM-Solver++(2M), a second-order ODE solver, in `dpm_solver`: on the Gaussian of tests/test_samplers.py its
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
        # Ours are 32x32; on the Gaussian of tests/test_samplers.py it beats even spacing in t, too.
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


def negative_lineage(ids, guide_from, root_level):
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
        return cut_lineage(ids, root_level)
    raise ValueError(f"unknown guidance negative '{guide_from}' (use null, parent or root)")


def guided_eps_fn(diffusion, model, ids, scale, guide_from="null", root_level=2):
    """eps = eps(c_neg) + s * (eps(c) - eps(c_neg)); both halves in one batch. s = 1 is plain conditioning."""
    if scale == 1.0:
        return lambda x, t: diffusion.eps(model, x, t, ids)
    both = torch.cat([ids, negative_lineage(ids, guide_from, root_level)])  # (2B, R)

    def eps_fn(x, t):
        # one batch of both branches, (2B, C, H, W), split back into two (B, C, H, W)
        eps_c, eps_neg = diffusion.eps(model, torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return eps_neg + scale * (eps_c - eps_neg)
    return eps_fn


# =============================================================================
# Appendix: what the scripts share besides the method. EMA, checkpoints (save, load,
# what a run's checkpoints record and which flags must match, taxa by name), sampling rows
# of a picture grid, train.py's plumbing (resumable randomness, torchrun, Ctrl-C, the
# checks before a run), latent space (the autoencoder stage, the
# latent cache, decoding), then one-line errors for bad checkpoints and the checks of
# every command-line value. A first read stops here.

# -----------------------------------------------------------------------------
# EMA and checkpoints


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, in one fused call over all tensors."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


def save_checkpoint(path, **state):
    """Write plain data atomically: a killed run leaves the old file or the new one, never half of one.

    The data goes to a temporary file in the same folder and reaches the disk (fsync) before a rename
    puts it in place; the rename is atomic, and the folder's fsync makes the rename itself durable.
    If the write fails (a full disk), the temporary file is removed and the old checkpoint stays as it was;
    a full disk raises a CheckpointError that says where, how much was needed and what is intact.
    """
    data = io.BytesIO()
    torch.save(state, data)  # in memory first: its size is what the disk has to hold
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # also Ctrl-C: no half-written .tmp stays behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(no_space_message(path, data.getbuffer().nbytes)) from None
        raise
    if os.name == "posix":  # a folder can be opened and fsynced there
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_checkpoint(path, device="cpu"):
    """Open a checkpoint and rebuild the EMA model from it. Returns (ema model in eval mode, checkpoint dict)."""
    ckpt = read_checkpoint(path, device)
    model = build_model(ckpt)
    try:
        model.load_state_dict(ckpt["ema"])
    except RuntimeError as e:  # e.g. written before the upsampling convolutions were narrowed
        lines = str(e).splitlines()
        first = next((ln.strip().rstrip(".") for ln in lines if "size mismatch" in ln), lines[0])
        raise CheckpointError(f"{path}: its weights do not fit this version of the network ({first}); "
                              "train it again with `python train.py`") from None
    return to_device(model, device).eval(), ckpt


def finest_checkpoint(folder):
    """The checkpoint of the finest rank trained in `folder` (out/species.pt before out/order.pt)."""
    found = [os.path.join(folder, f"{r}.pt") for r in RANKS if os.path.exists(os.path.join(folder, f"{r}.pt"))]
    if not found:
        raise CheckpointError(f"no stage checkpoint (<rank>.pt) in {folder}/: run `python train.py` first")
    return found[-1]


def check_checkpoint(ckpt, path, header, free, resuming):
    """Refuse, in one line naming what differs, a checkpoint that cannot continue a run.

    header: what the run's own checkpoints would record (run_header, below); free: the training flags
    that may differ (where it runs, how often it saves). A resumed stage must also number the taxa alike,
    since its optimizer state is in its own id order; a finished stage is reordered by name (by_name).
    """
    fix = f"use the flags it was trained with, another --out, or delete {path}"
    theirs, ours = ckpt.get("autoencoder"), header.get("autoencoder")  # None: pixels
    if (theirs or {}).get("sha256") != (ours or {}).get("sha256"):
        if theirs and ours:
            raise CheckpointError(f"{path} was trained on the latents of another autoencoder (weights sha256 "
                                  f"{theirs['sha256'][:12]}, this run's {ours['file']} {ours['sha256'][:12]}); "
                                  f"delete it to train this stage again on the new latents, or use another --out")
        raise CheckpointError(f"{path} was trained on {'latents (--latent)' if theirs else 'pixels'}, this run on "
                              f"{'latents (--latent)' if ours else 'pixels'}; {fix}")
    if ckpt.get("ranks") != header["ranks"]:
        ranks = "/".join(ckpt["ranks"]) if ckpt.get("ranks") else "not recorded (an older train.py)"
        raise CheckpointError(f"{path} has ranks {ranks}, this run {'/'.join(header['ranks'])}; {fix}")
    ours, theirs = set(map(tuple, header["lineages"])), set(map(tuple, ckpt["lineages"]))
    if ours != theirs:
        def some(lineages):
            return f"{len(lineages)} (e.g. '{'/'.join(n for n in min(lineages, key=str) if n)}')"
        diffs = ([f"lineages only in the data: {some(ours - theirs)}"] if ours - theirs else []) + \
                ([f"lineages only in the checkpoint: {some(theirs - ours)}"] if theirs - ours else [])
        raise CheckpointError(f"{path} was trained on another taxonomy ({'; '.join(diffs)}); {fix}")
    for k, v in header["train_config"].items():
        flag = "--" + k.replace("_", "-")
        if k in free:
            continue
        theirs = ckpt["train_config"].get(k, ADDED_FLAGS.get(k, MISSING))  # an older train.py had no such flag
        if theirs is MISSING:
            raise CheckpointError(f"{path} was written before {flag} existed, so this train.py cannot resume or "
                                  f"reuse it; delete it to train this stage again, or finish it with the train.py "
                                  f"that wrote it")
        if theirs != v:
            raise CheckpointError(f"{path} was trained with {flag} {theirs}, this run has "
                                  f"{flag} {v}; {fix}")
    for what in ("unet_config", "diffusion_config"):
        for k, v in header[what].items():
            if k != "attention_impl" and ckpt[what].get(k) != v:  # the attention path computes the same function
                raise CheckpointError(f"{path} has {what} {k}={ckpt[what].get(k)}, this run {k}={v}; {fix}")
    if resuming and ckpt["vocab"] != header["vocab"]:
        raise CheckpointError(f"{path} numbers the taxa in another order than the data lists them; "
                              "delete it to train this stage again")


# Flags added after checkpoints were first written, with the value every train.py before them used:
# a checkpoint without the flag was trained that way, so a run with that value may resume or reuse it.
ADDED_FLAGS = {"noise_schedule": "linear"}
MISSING = object()

# Flags a stage may change when it resumes or is reused: where it runs, how often it saves, its grids and the
# arithmetic (--amp, --compile, --attention). Any other flag changes what the stage computes, so it must match.
FREE_ON_RESUME = ("level", "device", "out", "workers", "save_every", "amp", "compile", "attention",
                  "guidance", "guide_from", "grid_cols", "grid_steps", "grid_sampler")


def noise_schedule(cfg):
    """train.py's --noise-schedule; auto = LDM's scaled-linear on latents, where it trains far better than Ho's
    linear betas (docs/results.md, "Pixel or latent"), and Ho's on pixels, where the defaults were measured."""
    if cfg.noise_schedule == "auto":
        return "scaled-linear" if cfg.latent else "linear"
    return cfg.noise_schedule


def network_configs(cfg):
    """The UNet and diffusion configs of a run; checkpoints store them as dicts (sample.py needs no flags).
    On latents the UNet sees (latent_channels, image_size / f, image_size / f) instead of (3, image_size, image_size)."""
    channels, size = (cfg.latent_channels, cfg.image_size // cfg.latent_f) if cfg.latent else (3, cfg.image_size)
    return (UNetConfig(in_channels=channels, image_size=size, attention_impl=cfg.attention, **SIZES[cfg.size]),
            DiffusionConfig(schedule=noise_schedule(cfg)))


def run_header(cfg, taxonomy, plan, autoencoder=None):
    """What every checkpoint of this run records, as plain data: the configs, the stages, the taxonomy, and on
    latents the autoencoder they belong to (its file, config and weights' hash: sample.py finds and checks it)."""
    unet_config, diffusion_config = network_configs(cfg)
    ae = autoencoder and autoencoder_record(autoencoder, os.path.join(cfg.out, "autoencoder.pt"))
    return dict(ranks=list(RANKS), stages=[RANKS[r] for r in plan], unet_config=asdict(unet_config),
                diffusion_config=asdict(diffusion_config), train_config=asdict(cfg), autoencoder=ae,
                vocab_sizes=[len(v) for v in taxonomy.vocab], vocab=taxonomy.vocab, lineages=taxonomy.lineages())


def free_flags(cfg):
    """The flags a stage may change when it resumes or is reused: FREE_ON_RESUME, and in pixels the
    autoencoder's flags, which then change nothing (a pixel checkpoint from before --latent existed is reused)."""
    return FREE_ON_RESUME + (() if cfg.latent else LATENT_FLAGS)


def by_name(state, vocab, taxonomy):
    """A model state dict whose rank tables are reordered from the checkpoint's ids to ours.

    A taxon's id is its position in a vocabulary, which follows the order the data
    happened to list the taxa in; its name does not. vocab[r][j] is the name the
    checkpoint gave id j at rank r, so row j of its table moves to our id of that name.
    """
    state = dict(state)
    for r, names in enumerate(vocab):
        theirs = {normalize(name): j for j, name in enumerate(names)}
        rows = [theirs[normalize(name)] for name in taxonomy.vocab[r]]  # check_checkpoint: the same names
        state[f"conditioner.embed.{r}.weight"] = state[f"conditioner.embed.{r}.weight"][rows]
    return state


def build_model(ckpt, attention="auto"):
    """A fresh TaxaDiffusion shaped like the one in the checkpoint (configs are stored as dicts). The attention
    path is the loading machine's choice, not the run's: a GPU run with --attention triton still samples on a
    laptop, where "auto" takes SDPA (every path computes the same function)."""
    return TaxaDiffusion(UNetConfig(**{**ckpt["unet_config"], "attention_impl": attention}), ckpt["vocab_sizes"])


def to_device(model, device):
    """Move a model to `device`. On a CPU its convolution weights also go channels-last (NHWC), the layout
    oneDNN's convolutions prefer; a GPU keeps the default layout, where it gained nothing (docs/performance.md)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else model


def save_grid(x, path, ncols, labels=None):
    """Save images x in [-1, 1], (N, C, H, W), as a PNG grid of N / ncols rows, each row's label on its left."""
    N, C, H, W = x.shape
    rows = N // ncols
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    grid = x.view(rows, ncols, 3, H, W).permute(0, 3, 1, 4, 2).reshape(rows * H, ncols * W, 3)  # (rows*H, cols*W, 3)
    img = Image.fromarray(grid.numpy())
    if labels:
        margin = 7 * max(len(s) for s in labels) + 6  # the default bitmap font is ~6 px wide
        canvas = Image.new("RGB", (margin + img.width, img.height), "white")
        canvas.paste(img, (margin, 0))
        draw, font = ImageDraw.Draw(canvas), ImageFont.load_default_imagefont()  # the bitmap font: its spaces show
        for r, label in enumerate(labels):
            draw.text((3, r * H + H // 2 - 5), label, fill="black", font=font)
        img = canvas
    img.save(path)


@torch.no_grad()
def sample_rows(diffusion, model, row_ids, x_T, guidance, guide_from="null", root_level=2, steps=50, sampler="ddim",
                seed=None, rows_per_call=1, autoencoder=None):
    """One row of len(x_T) images for each lineage of row_ids (rows, R), every row from the same noise x_T
    (N, C, H, W), so that a column compares the lineages. seed: the DDPM sampler's fresh noise, the same in
    every call too (None: the global generator). With an autoencoder the model draws latents, which are left
    unclamped (their range is not the pixels') and decoded. Returns images (rows * N, 3, H, W), row by row."""
    N, images = len(x_T), []
    for first in range(0, len(row_ids), rows_per_call):  # a few rows per batch: the CPU is fastest on small ones
        ids = row_ids[first:first + rows_per_call].repeat_interleave(N, dim=0)  # (rows * N, R)
        eps_fn = guided_eps_fn(diffusion, model, ids, guidance, guide_from, root_level)
        noise = x_T.repeat(len(ids) // N, 1, 1, 1)  # (rows * N, C, H, W)
        gen = None if seed is None else torch.Generator(x_T.device).manual_seed(seed)
        x = diffusion.sample(eps_fn, noise.shape, steps=steps, sampler=sampler, generator=gen, device=x_T.device,
                             x_T=noise, clip=None if autoencoder else 1.0)
        images.append(to_pixels(x, autoencoder))
    return torch.cat(images)


# -----------------------------------------------------------------------------
# Training plumbing (train.py): randomness that a resumed run draws again, as a function of
# (seed, stage, step); the global generators' states; several processes (torchrun); Ctrl-C;
# a finished stage's grid; reading the data and the checks before a run


def seeded_generator(*key, device="cpu"):
    """A torch.Generator seeded by a tuple of ints such as (seed, stage, step); nearby keys give unrelated streams."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))


def step_randomness(seed, level, step, B, image_shape, device, mine):
    """This process's part of the step's random numbers: mirror flips, t, eps, dropout uniforms u (2, b), depth.

    Drawn for the whole global batch of B from a generator seeded by (seed, stage, step), of which this
    process keeps its slice `mine`: a resumed run, or N processes, draw exactly what one uninterrupted process does.
    """
    gen = seeded_generator(seed, level, 1, step, device=device)
    flip = (torch.rand(B, generator=gen, device=device) < 0.5)[mine]
    t = torch.randint(0, DiffusionConfig.timesteps, (B,), generator=gen, device=device)[mine]
    eps = torch.randn((B, *image_shape), generator=gen, device=device)[mine]
    u = torch.rand(2, B, generator=gen, device=device)[:, mine]
    depth = torch.rand(B, generator=gen, device=device)[mine]  # --schedule random's cut, in [0, 1)
    return flip, t, eps, u, depth


def stage_batches(n, batch_size, seed, level, first, last, rank=0, world=1):
    """The indices of this process's part of the global batch of each step from `first` to `last`.

    Epoch e is a permutation of the n images drawn from (seed, stage, e), and each
    step takes the next batch_size of it (the incomplete tail is dropped), so a
    batch depends on its step alone: a resumed run, or one on another number of
    processes, sees the same global batches. Process `rank` of `world` takes the
    rank-th of `world` equal parts (our DistributedSampler).
    """
    share = batch_size // world
    for step in range(first, last + 1):
        epoch, i = divmod(step - 1, n // batch_size)
        if i == 0 or step == first:  # a new epoch, or the first step after a resume
            # key (seed, stage, 0, epoch); the loop's draws use (seed, stage, 1, step): two separate streams
            order = torch.randperm(n, generator=seeded_generator(seed, level, 0, epoch))
        yield order[i * batch_size:(i + 1) * batch_size][rank * share:(rank + 1) * share].tolist()


def rng_states():
    """The global generators' states as plain data: the loop draws from its own, but dropout and user code may not."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]), "python": random.getstate()}


def set_rng_states(state):
    """Put back what rng_states() recorded (a resumed stage's, in each process)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])


def save_resumable(path, rank, world, **state):
    """Write a stage's resumable checkpoint (train.py's out/<level>.last.pt) with every process's generator
    states beside `state` (weights, optimizer, step): all it needs to carry on as if never stopped."""
    rngs = [rng_states()]
    if world > 1:  # every process's own states, in rank order
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_states())
    if rank == 0:
        save_checkpoint(path, **state, rng=rngs)


def start_processes(cfg):
    """Under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK) join the other processes: NCCL, one GPU
    each, or gloo on the CPU. Returns (rank, world size, cfg with this process's device)."""
    if "RANK" not in os.environ:
        return 0, 1, cfg
    on_gpu = cfg.device.startswith("cuda")
    # process 0 alone decodes the images, encodes the latents and draws the grids while the others wait at a
    # barrier: on a large dataset that outlasts NCCL's default 10-minute timeout, which would end the run
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=datetime.timedelta(hours=6))
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        cfg = replace(cfg, device=f"cuda:{os.environ['LOCAL_RANK']}")
    return dist.get_rank(), dist.get_world_size(), cfg


def wrap_model(model, cfg, world):
    """What runs the steps: DDP averages the processes' gradients in backward(), torch.compile fuses; and the
    autocast context. Checkpoints keep `model`, the plain module, so their keys have no "module." or "_orig_mod."."""
    net = DDP(model) if world > 1 else model
    net = torch.compile(net) if cfg.compile else net
    return net, torch.autocast("cuda", torch.bfloat16) if cfg.amp else contextlib.nullcontext()


def mean_over_processes(loss, stop, world, device):
    """One all-reduce gives every process the mean loss and whether any of them was asked to stop."""
    shared = torch.stack([loss.detach().float(), torch.tensor(float(len(stop)), device=device)])
    if world > 1:
        dist.all_reduce(shared)
    total_loss, stopping = shared.tolist()
    return total_loss / world, stopping


def describe_run(dataset, taxonomy, schedule, to_train):
    """train.py's first line: the data (a long tail shows as a spread of counts) and the stages it will train."""
    counts = torch.unique(dataset.ids, dim=0, return_counts=True)[1]  # images of each lineage
    spread = f" ({counts.min()} to {counts.max()} images each)" if counts.min() < counts.max() else ""
    stages = " -> ".join(f"{RANKS[r]} ({n} steps{f', the last {c} cooling down' if c else ''})" for r, n, c in to_train)
    return f"data: {len(dataset)} images, {taxonomy.size(len(RANKS) - 1)} species{spread}; schedule {schedule}: " + stages


@contextlib.contextmanager
def run_guard():
    """Around train.py's run: the signal handlers it found are put back and the process group (torchrun, also
    with one process) ended however it ends, and a checkpoint that cannot be read or written ends in one line."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def catch_stop_signals():
    """Ctrl-C (SIGINT) and SIGTERM (preemption) only note the signal; the loop saves and stops after its step.

    A second Ctrl-C stops at once (the last checkpoint is still whole). Returns the list of signals seen.
    """
    seen = []

    def note(signum, frame):
        seen.append(signum)
        signal.signal(signum, signal.SIG_DFL)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, note)
    return seen


def finish_stage(cfg, stage, diffusion, taxonomy, plan, train_time, log, rank, world):
    """Draw the stage's grid with its EMA weights, then make out/<level>.pt the stage's result."""
    if rank == 0:
        t1, name = time.time(), RANKS[stage.level]
        # one row per taxon of this rank, EMA weights, the same noise in every row (so columns compare)
        taxa = range(1, len(taxonomy.vocab[stage.level]))
        C, size = stage.model.unet.cfg.in_channels, stage.model.unet.cfg.image_size  # pixels, or latents
        x_T = torch.randn((cfg.grid_cols, C, size, size), generator=torch.Generator(cfg.device).manual_seed(cfg.seed),
                          device=cfg.device)
        rows = torch.tensor([taxonomy.ancestors(stage.level, i) for i in taxa], device=cfg.device)  # (taxa, R)
        images = sample_rows(diffusion, stage.ema.eval(), rows, x_T, cfg.guidance, cfg.guide_from, plan[0],
                             steps=cfg.grid_steps, sampler=cfg.grid_sampler, rows_per_call=max(1, 64 // cfg.grid_cols),
                             autoencoder=stage.autoencoder)  # decoded on latents
        save_grid(images, os.path.join(cfg.out, f"{name}.png"), cfg.grid_cols,
                  labels=[taxonomy.vocab[stage.level][i] for i in taxa])
        os.replace(stage.last_path, stage.path)  # what sample.py and the next stage read
        msg = (f"stage {name} done: {train_time:.0f} s training "
               f"({(stage.steps - stage.start) * cfg.batch_size / max(train_time, 1e-6):.1f} img/s), "
               f"{time.time() - t1:.0f} s grid -> {stage.path}, {os.path.join(cfg.out, name + '.png')}")
        print(msg)
        log.write(msg + "\n")
    if world > 1:
        dist.barrier()  # the next stage reads out/<level>.pt in every process


def read_data(cfg, rank=0, world=1):
    """train.py's images, lineages and found taxonomy, or one line that names what is wrong with the data.
    With several processes, process 0 decodes the images into the cache in out/ first and the others then
    read it (two processes writing one cache would race)."""
    try:
        if rank > 0:
            dist.barrier()
        images, lineages, wheres = load_data(
            cfg.data, cfg.image_size, cfg.per_species, cfg.seed, fmt=cfg.format, top_rank=cfg.top_rank,
            columns=cfg.columns, image_root=cfg.image_root, boxes=cfg.boxes, cache_dir=cfg.out, workers=cfg.workers)
        if rank == 0 and world > 1:
            dist.barrier()
        found, lineages = build_taxonomy(lineages, wheres, keep_first=cfg.conflicts == "keep-first")
    except DataError as e:
        raise SystemExit(f"error: {e}")
    return images, lineages, found


def skipped_ranks_note(found, plan, first_level, level):
    """Why a rank between first_level and level gets no stage (train.stage_plan), or None if every one does."""
    skipped = [r for r in range(RANKS.index(first_level), RANKS.index(level) + 1) if r not in plan]
    if not skipped:
        return None
    why = {"no more taxa in the data than a coarser rank: nothing new to split": [r for r in skipped if found.size(r)],
           "the data names none": [r for r in skipped if not found.size(r)]}
    return ("note: no stage for " + ", ".join(f"{', '.join(RANKS[r] for r in ranks)} ({reason})"
                                            for reason, ranks in why.items() if ranks)
            + "; training " + " -> ".join(RANKS[r] for r in plan))


def check_run(cfg, world):
    """Fail before any training: an --out that cannot be written, --amp on a CPU, a batch that does not split
    (the flags' own values are checked as they are parsed: parse_args)."""
    try:
        os.makedirs(cfg.out, exist_ok=True)
        tempfile.TemporaryFile(dir=cfg.out).close()
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out {cfg.out}: {e.strerror}")
    if cfg.amp and not cfg.device.startswith("cuda"):
        raise SystemExit(f"error: --amp is bf16 autocast for CUDA, and this run is on {cfg.device}, "
                         "where bf16 is many times slower than fp32; drop --amp")
    if cfg.batch_size % world:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} does not split evenly over {world} processes")
    if cfg.latent and cfg.ae_batch_size % world:
        raise SystemExit(f"error: --ae-batch-size {cfg.ae_batch_size} does not split evenly over {world} processes")


# -----------------------------------------------------------------------------
# Latent space (train.py --latent): the autoencoder stage, the latent cache, decoding
#
# The autoencoder (unet.py) trains first, as a stage of its own: out/autoencoder.pt, resumable from
# out/autoencoder.last.pt like any stage. The images are then encoded once (out/latents-<key>.npy)
# and the taxonomic stages learn those latents. Every stage checkpoint records its autoencoder
# (autoencoder_record: the file's name, its config and a hash of its weights), so sample.py and fid.py
# find it beside the checkpoint, decode with no extra flag, and refuse another one.

AUTOENCODER_KEY = 100  # the autoencoder stage's key in seeded_generator (the rank stages use 0..6)
LATENT_FLAGS = ("latent", "latent_f", "latent_channels", "ae_steps", "ae_batch_size", "ae_crop", "ae_lr",
                "ae_edge_loss")
# What the autoencoder stage computes from: its own flags and the images. A different value refuses out/autoencoder.pt.
AUTOENCODER_FLAGS = LATENT_FLAGS[1:] + ("grad_clip", "data", "image_size", "per_species", "format", "top_rank",
                                        "columns", "image_root", "boxes", "seed")


def autoencoder_config(cfg):
    """The autoencoder of a --latent run (unet.Autoencoder); its file stores it as a dict."""
    return AutoencoderConfig(in_channels=3, image_size=cfg.image_size, f=cfg.latent_f,
                             latent_channels=cfg.latent_channels, edge_loss=cfg.ae_edge_loss)


def weights_hash(state):
    """sha256 of a state dict's names and values: what names an autoencoder, whichever file holds it."""
    h = hashlib.sha256()
    for name, t in state.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())  # contiguous: channels-last or not, one hash
    return h.hexdigest()


def autoencoder_record(ae, path):
    """What a stage checkpoint keeps of its autoencoder: the file's name (beside it), its config, its weights' hash."""
    return dict(file=os.path.basename(path), config=asdict(ae.cfg), sha256=weights_hash(ae.state_dict()))


def load_autoencoder(path, device="cpu"):
    """Open an autoencoder file (torch.load(weights_only=True)) and rebuild it: (Autoencoder in eval mode, ckpt)."""
    ckpt = open_checkpoint(path, device)
    if not isinstance(ckpt, dict) or "autoencoder" not in ckpt or "autoencoder_config" not in ckpt:
        raise CheckpointError(f"{path} is not an autoencoder of train.py --latent: it holds no autoencoder, "
                              "autoencoder_config")
    unknown = [k for k in ckpt["autoencoder_config"] if k not in {f.name for f in fields(AutoencoderConfig)}]
    ae = Autoencoder(AutoencoderConfig(**{k: v for k, v in ckpt["autoencoder_config"].items() if k not in unknown}))
    try:
        if unknown:
            raise RuntimeError(f"autoencoder_config {', '.join(unknown)}, unknown here")
        ae.load_state_dict(ckpt["autoencoder"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} was written by another version of train.py ({str(e).splitlines()[0]}): "
                              "train it again, or use the version that wrote it") from None
    return to_device(ae, device).eval(), ckpt


def autoencoder_of(ckpt, path, device="cpu"):
    """The autoencoder whose latents the stage checkpoint at `path` generates, from the file beside it; None for a
    pixel checkpoint. Refused in one line when that file is missing or holds another autoencoder."""
    record = ckpt.get("autoencoder")
    if record is None:
        return None
    ae_path = os.path.join(os.path.dirname(path), record["file"])
    if not os.path.exists(ae_path):
        raise CheckpointError(f"{path} generates latents of the autoencoder {ae_path}, which is missing: put the "
                              f"{record['file']} it was trained with beside it")
    ae, _ = load_autoencoder(ae_path, device)
    if (found := weights_hash(ae.state_dict())) != record["sha256"]:
        raise CheckpointError(f"{ae_path} is another autoencoder than the one {path} was trained with (weights "
                              f"sha256 {found[:12]}, not {record['sha256'][:12]}): put the right one beside it, "
                              "or train the stages again")
    return ae


@torch.no_grad()
def to_pixels(x, autoencoder):
    """Samples as images in [-1, 1]: latents through the decoder (a batch of 64 at a time), pixels as they are."""
    if autoencoder is None:
        return x
    return torch.cat([autoencoder.to_pixels(z) for z in x.split(64)])


def encode_dataset(ae, images, cache_dir, device="cpu", batch_size=64, rank=0, world=1):
    """The latents of every image, (N, C_z, h, w) float32, encoded once into cache_dir/latents-<key>.npy
    (by process 0; the others wait, then read it).

    The key hashes the autoencoder's weights and the images' bytes, so a new autoencoder (or other images)
    encodes again; the outdated cache is then removed. images: uint8 (N, 3, H, W), a tensor or an array.
    """
    key = hashlib.sha256(weights_hash(ae.state_dict()).encode())
    for i in range(0, len(images), 4096):
        key.update(np.ascontiguousarray(images[i:i + 4096]).tobytes())
    path = os.path.join(cache_dir, f"latents-{key.hexdigest()[:16]}.npy")
    if rank == 0 and not os.path.exists(path):
        encode_into(ae, images, path, device, batch_size)
    elif rank == 0:
        print(f"latents: {path} (cached; encoded again when the autoencoder or the images change)")
    if world > 1:
        dist.barrier()
    return torch.from_numpy(np.load(path))


@torch.no_grad()
def encode_into(ae, images, path, device, batch_size):
    """Encode every image and save the latents at `path` (atomically); remove any older latents-*.npy beside it."""
    z = torch.cat([ae.to_latent(torch.as_tensor(images[i:i + batch_size]).to(device).float() / 127.5 - 1).cpu()
                   for i in range(0, len(images), batch_size)])  # (N, C_z, h, w)
    tmp = f"{path}.{os.getpid()}.tmp.npy"
    np.save(tmp, z.numpy())
    os.replace(tmp, path)
    for old in Path(path).parent.glob("latents-*.npy"):  # an older cache: another autoencoder's, or other images'
        if old.name != os.path.basename(path) and ".tmp" not in old.name:
            old.unlink()
    print(f"latents: {path} ({tuple(z.shape)}, encoded once; later runs and stages read it)")


def autoencoder_stage(cfg, ae_config, dataset, fixed_flags, log, rank=0, world=1, stop=()):
    """train.py --latent's first stage: out/autoencoder.pt, reused if it is there and fits this run (its config
    and the flags `fixed_flags` as asked), else trained (resumed from out/autoencoder.last.pt, like any stage).
    Returns (the autoencoder in eval mode, None), or (None, the signal that stopped it)."""
    path, last_path = (os.path.join(cfg.out, f"autoencoder{end}.pt") for end in ("", ".last"))
    header = dict(autoencoder_config=asdict(ae_config), train_config=asdict(cfg))
    resumed = None
    for found in (p for p in (path, last_path) if os.path.exists(p)):
        resumed = open_checkpoint(found)
        check_autoencoder(resumed, found, header, fixed_flags)
        if found == path:
            if rank == 0:
                print(f"autoencoder: using {path} (delete it to train it again)")
            return load_autoencoder(path, cfg.device)[0], None
    torch.manual_seed(cfg.seed + AUTOENCODER_KEY)  # the same initial weights in every process
    ae = to_device(Autoencoder(ae_config), cfg.device)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.ae_lr, weight_decay=0.0)
    cool = max(1, round(0.3 * cfg.ae_steps))  # warm up for 50 steps, decay to 0 over the last 30 %, as a stage
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50, (cfg.ae_steps - s) / cool))
    start = 0
    if resumed:  # an interrupted autoencoder stage: carry on exactly where it stopped
        for obj, key in ((ae, "autoencoder"), (opt, "optimizer"), (sched, "scheduler")):
            obj.load_state_dict(resumed[key])
        if len(resumed["rng"]) == world:
            set_rng_states(resumed["rng"][rank])
        start = resumed["step"]
    if rank == 0:
        print(f"autoencoder: f = {ae_config.f}, {ae_config.latent_channels} x {ae_config.image_size // ae_config.f}"
              f"^2 latents, {sum(p.numel() for p in ae.parameters()) / 1e6:.2f} M params, {cfg.ae_steps} steps of "
              f"{cfg.ae_batch_size}, {ae_config.edge_loss} edge loss, from "
              f"{f'{last_path} at step {start}' if start else 'scratch'}")
    held, train = held_out_split(len(dataset), cfg.seed)
    signum = train_autoencoder(cfg, ae, opt, sched, start, dataset, train, last_path, header, log, rank, world, stop)
    if signum:
        return None, signum
    if rank == 0:
        finish_autoencoder(cfg, ae, dataset, held, train, last_path, path, log)
    if world > 1:
        dist.barrier()  # every process reads the one autoencoder.pt
    return load_autoencoder(path, cfg.device)[0], None


def check_autoencoder(ckpt, path, header, fixed_flags):
    """Refuse, in one line naming what differs, an autoencoder file that does not fit this run."""
    fix = f"use the flags it was trained with, another --out, or delete {path}"
    if "autoencoder_config" not in ckpt or "train_config" not in ckpt:
        raise CheckpointError(f"{path} is not an autoencoder of train.py --latent; {fix}")
    for k, v in header["autoencoder_config"].items():
        if ckpt["autoencoder_config"].get(k) != v:
            raise CheckpointError(f"{path} has autoencoder_config {k}={ckpt['autoencoder_config'].get(k)}, this run "
                                  f"{k}={v} (it does not fit these images); {fix}")
    for k in fixed_flags:
        if ckpt["train_config"].get(k) != header["train_config"][k]:
            flag = "--" + k.replace("_", "-")
            raise CheckpointError(f"{path} was trained with {flag} {ckpt['train_config'].get(k)}, this run has "
                                  f"{flag} {header['train_config'][k]}; {fix}")


def held_out_split(n, seed, share=0.05, most=256):
    """(held-out, training) image indices of the autoencoder: 5 % of the images (at most 256, at least 1) that
    it never trains on, for an honest PSNR. The diffusion stages train on every image."""
    order = torch.randperm(n, generator=seeded_generator(seed, AUTOENCODER_KEY, 2))
    k = max(1, min(most, round(share * n)))
    return order[:k], order[k:]


def train_autoencoder(cfg, ae, opt, sched, start, dataset, train, last_path, header, log, rank, world, stop):
    """The autoencoder's loop, as train_stage's: seeded batches and draws (so it resumes exactly), DDP, Ctrl-C.
    Returns the signal that stopped it, or None when its last step is done."""
    B, device = cfg.ae_batch_size, cfg.device
    net, _ = wrap_model(ae, replace(cfg, compile=False), world)
    mine = slice(rank * B // world, (rank + 1) * B // world)
    batches = stage_batches(len(train), B, cfg.seed, AUTOENCODER_KEY, start + 1, cfg.ae_steps, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=(train[b].tolist() for b in batches))
    size, f = ae.cfg.image_size, ae.cfg.f
    crop = cfg.ae_crop if 0 < cfg.ae_crop < size else size  # the side of what each step trains on
    z_shape = (ae.cfg.latent_channels, crop // f, crop // f)
    ae.train()
    t0 = time.time()
    pbar = tqdm(loader, desc="autoencoder", initial=start, total=cfg.ae_steps, dynamic_ncols=True, disable=rank > 0)
    for step, (x, _) in enumerate(pbar, start=start + 1):
        gen = seeded_generator(cfg.seed, AUTOENCODER_KEY, 1, step, device=device)
        flip = (torch.rand(B, generator=gen, device=device) < 0.5)[mine]
        noise = torch.randn((B, *z_shape), generator=gen, device=device)[mine]  # for z = mean + std * noise
        corner = (torch.randint(0, (size - crop) // f + 1, (B, 2), generator=gen, device=device) * f)[mine].tolist()
        x = torch.where(flip.view(-1, 1, 1, 1), x.to(device).flip(-1), x.to(device))  # a random mirror image
        # a random crop of each (on the latent grid): the network is convolutional, so it learns from crops at
        # a fraction of the cost (a quarter at 32 of 64) what it then does on whole images
        x = torch.stack([im[:, i:i + crop, j:j + crop] for im, (i, j) in zip(x, corner)])  # (b, 3, crop, crop)
        loss, parts = autoencoder_loss(net, x, noise, ae.cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        mean_loss, stopping = mean_over_processes(loss, stop, world, device)
        if not math.isfinite(mean_loss):
            raise SystemExit(f"error: loss is {mean_loss} at step {step} of the autoencoder; try a lower --ae-lr"
                             if rank == 0 else 1)
        pbar.set_postfix(loss=f"{mean_loss:.4f}", l1=f"{parts['l1']:.4f}")
        if step % 50 == 0 or step == cfg.ae_steps:
            log.write(f"autoencoder step {step}/{cfg.ae_steps} loss {mean_loss:.4f} l1 {parts['l1']:.4f} "
                      f"edge {parts['edge']:.4f} kl {parts['kl']:.4f} img/s {(step - start) * B / (time.time() - t0):.1f}\n")
            log.flush()
        if stopping or (cfg.save_every and step % cfg.save_every == 0) or step == cfg.ae_steps:
            save_resumable(last_path, rank, world, **header, autoencoder=ae.state_dict(), optimizer=opt.state_dict(),
                           scheduler=sched.state_dict(), step=step)
        if stopping:
            if rank == 0:
                print(f"\nstopped at step {step}/{cfg.ae_steps} of the autoencoder: saved {last_path}; "
                      "run the same command again to resume", file=sys.stderr)
            return stop[0] if stop else signal.SIGINT
    if rank == 0:
        log.write(f"autoencoder: {time.time() - t0:.0f} s training ({(cfg.ae_steps - start) * B / max(time.time() - t0, 1e-6):.1f} img/s)\n")
    return None


@torch.no_grad()
def finish_autoencoder(cfg, ae, dataset, held, train, last_path, path, log):
    """Set the latents' scale (LDM's scale_by_std), measure PSNR on the held-out images, draw originals over
    reconstructions (out/autoencoder.png), then make out/autoencoder.pt the stage's result."""
    ae.eval()
    device = cfg.device
    means, stds = [], []
    for i in train[:4096].split(64):  # the std of the training latents, over at most 4096 images
        mean, logvar = ae.encode(torch.stack([dataset[j][0] for j in i.tolist()]).to(device))
        means.append(mean.cpu())
        stds.append((0.5 * logvar).exp().mean().cpu())
    ae.scale.fill_(1 / torch.cat(means).std().item())
    x = torch.stack([dataset[j][0] for j in held.tolist()]).to(device)  # (n_held, 3, H, W)
    x_rec = torch.cat([ae.decode(ae.encode(b)[0]) for b in x.split(64)])
    mse = ((to_uint8(x_rec).float() - to_uint8(x).float()) ** 2).mean(dim=(1, 2, 3))  # as the PNGs would be
    psnr = (10 * torch.log10(255 ** 2 / mse.clamp(min=1e-10))).mean().item()
    cols = min(8, len(held))
    save_grid(torch.cat([x[:cols], x_rec[:cols]]), os.path.join(cfg.out, "autoencoder.png"), cols,
              labels=["original", "decoded"])
    state = open_checkpoint(last_path)
    save_checkpoint(last_path, **{**state, "autoencoder": ae.state_dict(), "psnr": psnr, "held_out": len(held),
                                  "scale": ae.scale.item(), "posterior_std": torch.stack(stds).mean().item()})
    os.replace(last_path, path)
    msg = (f"autoencoder done: held-out PSNR {psnr:.2f} dB ({len(held)} images), latent scale {ae.scale.item():.3f} "
           f"(posterior std {torch.stack(stds).mean().item():.4f} of a latent std {1 / ae.scale.item():.3f}) -> {path}, "
           f"{os.path.join(cfg.out, 'autoencoder.png')}")
    print(msg)
    log.write(msg + "\n")


def to_uint8(x):
    """Images in [-1, 1] -> uint8, exactly as saving them as PNG would."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# -----------------------------------------------------------------------------
# Checkpoints that cannot be read or written: one line that names the file and what is wrong


class CheckpointError(ValueError):
    """A checkpoint that cannot be opened or saved; the message names the file and says why."""


CHECKPOINT_KEYS = ("ema", "unet_config", "vocab_sizes", "lineages")  # what rebuilds a model and names its taxa


def read_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True) of a checkpoint train.py wrote, or one line saying which way the file is bad:
    missing, not a checkpoint, truncated or damaged, holding Python objects, or from another version."""
    ckpt = open_checkpoint(path, device)
    if not isinstance(ckpt, dict) or not any(k in ckpt for k in CHECKPOINT_KEYS):
        raise CheckpointError(f"{path} is not a checkpoint of train.py: it holds no {', '.join(CHECKPOINT_KEYS)}")
    configs = {"unet_config": UNetConfig, "diffusion_config": DiffusionConfig}
    differences = [f"no {k}" for k in CHECKPOINT_KEYS if k not in ckpt] + [
        f"{what} {k}, unknown here" for what, cls in configs.items()
        for k in ckpt.get(what, {}) if k not in {f.name for f in fields(cls)}]
    if differences:
        raise CheckpointError(f"{path} was written by another version of train.py ({', '.join(differences)}): "
                              "train it again, or use the version that wrote it")
    return ckpt


def open_checkpoint(path, device="cpu"):
    """torch.load(weights_only=True) of any file torch.save wrote, or one line saying which way the file is bad."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} not found: train one first with `python train.py`")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:  # a folder, no permission
        raise CheckpointError(f"{path} cannot be read as a checkpoint ({e.strerror})") from None
    if head != b"PK\x03\x04":  # torch.save writes a zip archive, and every zip archive starts so
        raise CheckpointError(f"{path} is not a checkpoint ({'an empty file' if not head else 'not a zip archive'}: "
                              "torch.save writes zip archives)")
    if not zipfile.is_zipfile(path):  # the archive's directory, written last, is missing: the file was cut short
        raise CheckpointError(f"{path} is truncated (the end of its zip archive is missing): "
                              "copy it again, or delete it and train it again")
    with zipfile.ZipFile(path) as archive:
        if not any(name.endswith("/data.pkl") for name in archive.namelist()):
            raise CheckpointError(f"{path} is not a checkpoint: a zip archive, but not one torch.save wrote")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        if "Unsupported global" in str(e):  # weights_only met a class or function: rebuilding it runs code
            raise CheckpointError(f"{path} holds pickled Python objects, and only plain-data checkpoints are opened "
                                  "(tensors, numbers, strings, lists, dicts): no code from a file is run") from None
        why = "its pickled data is garbled" if isinstance(e, pickle.UnpicklingError) else str(e).split(". ")[0]
        raise CheckpointError(f"{path} is damaged ({why}): copy it again, or delete it and train it again") from None
    return ckpt


def no_space_message(path, nbytes):
    """What save_checkpoint says when the disk is full: where, how much it needed, and what is intact."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(path):
        try:  # its step, if it has one (a stage checkpoint has)
            step = f" (step {torch.load(path, weights_only=True, mmap=True)['step']})"
        except Exception:
            step = ""
        kept = f"the previous {path}{step} is intact"
    else:
        kept = f"no earlier {path} exists"
    return (f"no space left in {folder} to write {path}: it needs {nbytes / 1e6:,.1f} MB and "
            f"{shutil.disk_usage(folder).free / 1e6:,.1f} MB are free; {kept}")


# -----------------------------------------------------------------------------
# Command-line values
#
# The type functions of every script's flags. Each turns the text after a flag into a value or raises
# ArgumentTypeError saying what is allowed; argparse then ends with one line, exit status 2:
#     train.py: error: argument --batch-size: must be a positive integer (got 0)

class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad value ends in its one error line alone: the usage, which runs to 20 lines
    for train.py, would bury it (--help still shows everything). Every script builds its parser with this one."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def script_parser(doc):
    """The parser of a script whose docstring is its --help description (kept as written: it holds commands)."""
    return ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def config_parser(config, doc, checks):
    """A parser with a flag for every field of the dataclass `config` (--batch-size for batch_size), whose help
    is the comment after the field. checks[name]: the values allowed, as a type function of this section
    or a tuple of choices; a field without one takes any text, a bool field is a switch."""
    comments = {}
    for line in inspect.getsource(config).splitlines():
        if re.match(r"    \w+: ", line):  # a field: "    name: type = default  # comment"
            comments[line.split(":")[0].strip()] = line.partition("  # ")[2].replace("%", "%%")  # argparse formats %
    parser = script_parser(doc)
    for f in fields(config):
        flag, check = "--" + f.name.replace("_", "-"), checks.get(f.name, str)
        if f.type is bool:
            parser.add_argument(flag, action="store_true", help=comments[f.name])
            continue
        default = " (default: %(default)s)" if f.default != "" else ""
        parser.add_argument(flag, default=f.default, help=comments[f.name] + default,
                            type=str if isinstance(check, tuple) else check,
                            choices=check if isinstance(check, tuple) else None)
    return parser


MAX_INT = 2 ** 31 - 1  # the largest count or seed taken: every library it is handed to holds it


def _integer(text, low, what):
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what} (got '{text}')") from None
    if not low <= n <= MAX_INT:
        raise argparse.ArgumentTypeError(f"must be {what}{f' up to {MAX_INT}' if n > MAX_INT else ''} (got {n})")
    return n


def positive_int(text):
    """1, 2, ...: a batch size, a number of steps or images."""
    return _integer(text, 1, "a positive integer")


def sampling_steps(text):
    """1 .. T: a sampler's network calls, one per timestep of the T the model was trained on (more would reach
    below t = 0, where the log-SNR spacing indexes alpha_bar from its end)."""
    n = positive_int(text)
    if n > DiffusionConfig.timesteps:
        raise argparse.ArgumentTypeError(f"must be at most T = {DiffusionConfig.timesteps} (got {n})")
    return n


def nonneg_int(text):
    """0, 1, 2, ...: a seed, or a count where 0 means none (or the default)."""
    return _integer(text, 0, "a non-negative integer")


def per_species(text):
    """--per-species: a count of images, or a long-tailed tree (taxonomy.species_counts)."""
    try:
        if min(species_counts(text)) < 1:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive count (64), pairs:RICH/RARE (pairs:64/4) or "
                                         f"zipf:MAX (zipf:64), all at least 1 (got '{text}')") from None
    return text


def positive_int_list(text):
    """Comma-separated positive integers such as '200,200,600', kept as the text (train.py stores it so)."""
    try:
        [positive_int(n) for n in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, e.g. 200,200,600 "
                                         f"(got '{text}')") from None
    return text


def _number(text, ok, what):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what} (got '{text}')") from None
    if not (math.isfinite(x) and ok(x)):  # nan and inf fail here
        raise argparse.ArgumentTypeError(f"must be {what} (got {text})")
    return x


def finite_float(text):
    """Any number but nan and inf: a guidance scale."""
    return _number(text, lambda x: True, "a finite number")


def positive_float(text):
    """A number > 0: a learning rate, a gradient-norm limit."""
    return _number(text, lambda x: x > 0, "a positive number")


def fraction(text):
    """A number from 0 to 1: a probability, a decay, a share of the steps."""
    return _number(text, lambda x: 0 <= x <= 1, "a number from 0 to 1")


def input_path(text):
    """A file or folder that exists; '' is the flag left unset."""
    if text and not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"must be an existing file or folder (got '{text}': not found)")
    return text


def image_path(text):
    """An image file that can be written, in a format PIL saves (by its extension: .png, .jpg, ...)."""
    text = output_path(text)
    ext = os.path.splitext(text)[1].lower()
    if os.path.isdir(text) or Image.registered_extensions().get(ext) not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"must be an image file name such as out/samples.png (got '{text}')")
    return text


def output_path(text):
    """A file or folder that can be written: it, or the nearest folder above it that exists, is writable."""
    up = os.path.abspath(text)
    while not os.path.exists(up):
        up = os.path.dirname(up)
    if not text:
        why = "empty"
    elif up != os.path.abspath(text) and not os.path.isdir(up):
        why = f"{up} is a file"
    elif not os.access(up, os.W_OK):
        why = f"{up} is not writable"
    else:
        return text
    raise argparse.ArgumentTypeError(f"must be a path that can be written (got '{text}': {why})")


def device_name(text):
    """cpu, or cuda / cuda:N where that GPU is visible."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N (got '{text}')")
    n = torch.cuda.device_count()
    if dev.type == "cuda" and (dev.index or 0) >= n:
        raise argparse.ArgumentTypeError(f"must be cpu{f' or cuda:0 to cuda:{n - 1}' if n else ': no GPU is visible'} "
                                         f"(got '{text}')")
    return text


def downsampling_factor(text):
    """2, 4 or 8: how much the autoencoder shrinks an image's side (unet.AutoencoderConfig.f)."""
    if text not in ("2", "4", "8"):
        raise argparse.ArgumentTypeError(f"must be 2, 4 or 8 (got '{text}')")
    return int(text)


SCHEDULES = ("progressive", "all", "random", "flat")  # train.py --schedule
# What each train.py flag may take: a type function of this section or a tuple of choices (config_parser).
TRAIN_FLAG_CHECKS = {
    "level": RANKS, "first_level": RANKS, "schedule": SCHEDULES, "freeze": ("none", "unet", "new-rank"),
    "new_rank_init": ("zero", "random"), "loss_weight": ("eps", "v"),
    "noise_schedule": ("auto", "linear", "cosine", "scaled-linear"), "size": tuple(SIZES), "format": FORMATS,
    "top_rank": ("auto",) + RANKS, "conflicts": ("error", "keep-first"), "guide_from": ("null", "parent", "root"),
    "grid_sampler": ("ddim", "ddpm", "dpm++"),
    "attention": ("auto", "triton", "sdpa", "torch"), "latent_f": downsampling_factor,
    "ae_edge_loss": ("gradient", "ssim", "fft", "none"), "latent_channels": positive_int, "ae_steps": positive_int,
    "ae_batch_size": positive_int, "ae_crop": nonneg_int, "ae_lr": positive_float,
    "p_uncond": fraction, "p_cut": fraction, "stage_steps": positive_int_list, "steps": nonneg_int,
    "batch_size": positive_int, "lr": positive_float, "embed_lr_mult": positive_float, "warmup": positive_int,
    "cooldown": fraction, "grad_clip": positive_float, "ema_decay": fraction, "image_size": positive_int,
    "per_species": per_species, "image_root": input_path, "boxes": input_path, "seed": nonneg_int,
    "device": device_name, "out": output_path, "workers": nonneg_int, "save_every": nonneg_int,
    "guidance": finite_float, "grid_cols": positive_int, "grid_steps": sampling_steps}


def check_flag_pairs(cfg, error):
    """train.py's values that only fail together: each pair ends in argparse's one line, error(message)."""
    if cfg.latent:  # the UNet halves the latent, which is the image divided by f
        if cfg.image_size % (cfg.latent_f * size_multiple(cfg.size)):
            error(f"argument --image-size: must be a multiple of {cfg.latent_f * size_multiple(cfg.size)} for "
                  f"--latent-f {cfg.latent_f} and --size {cfg.size} (got {cfg.image_size})")
        if cfg.ae_crop % cfg.latent_f:  # a crop is a whole number of latent positions
            error(f"argument --ae-crop: must be a multiple of --latent-f {cfg.latent_f} (got {cfg.ae_crop})")
    elif cfg.image_size % size_multiple(cfg.size):  # the UNet halves the image, then doubles it back
        error(f"argument --image-size: must be a multiple of {size_multiple(cfg.size)} for --size {cfg.size} "
              f"(got {cfg.image_size})")
    if RANKS.index(cfg.level) < RANKS.index(cfg.first_level):
        error(f"argument --level: must not be coarser than --first-level {cfg.first_level} (got {cfg.level})")
    if cfg.p_uncond + cfg.p_cut > 1:
        error(f"argument --p-cut: must be at most {1 - cfg.p_uncond:g} beside --p-uncond {cfg.p_uncond:g}, "
              f"as both are shares of one random draw (got {cfg.p_cut:g})")


def size_multiple(size):
    """The UNet of named size `size` halves the image len(channel_mults) - 1 times (unet.UNet): image sides
    must be multiples of 2 to that power, or the way up does not meet the way down."""
    return 2 ** (len(UNetConfig(**SIZES[size]).channel_mults) - 1)
