"""
The network: a DDPM UNet that looks at a noisy image x_t, the timestep t and a
few context tokens (the lineage's rank tokens), and outputs an image-shaped
prediction: v by default, which model.py's Diffusion.eps turns into the noise eps.

    x_t (B, C, H, W), t (B,), context (B, M, D)  ->  v (or eps) (B, C, H, W)

It works on any (C, H, W): pixels (3, 32, 32) by default, or latents.
Every block is: ResBlock (with the timestep and the pooled context) ->
self-attention (at low resolutions) -> cross-attention to the context tokens. All attention math goes
through one function, `attention(q, k, v)`. After the UNet, under its own banner, the autoencoder of
latent diffusion (train.py --latent), built from the same ResBlocks: images <-> latents.

    python unet.py          # prints the parameter count of each named size, and of the autoencoder

Read next: model.py (the diffusion process and the rank-token conditioner).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

try:  # the fused attention kernel needs triton (Linux); everything else runs without it
    import triton
    import triton.language as tl
except ImportError:
    triton = None


@dataclass
class UNetConfig:
    in_channels: int = 3  # 3 for pixels, 4 for SD-style latents
    image_size: int = 32  # H = W of the input (pixels or latents)
    base_channels: int = 32  # channels at full resolution
    channel_mults: tuple = (1, 2, 2)  # channels per level = base * mult; the image halves per level
    num_res_blocks: int = 1  # ResBlocks per level on the way down (one more on the way up)
    attn_resolutions: tuple = (8,)  # resolutions (in pixels) that get self-attention
    context_dim: int = 128  # width D of the context tokens
    head_dim: int = 32  # channels per attention head
    groups: int = 8  # GroupNorm groups
    dropout: float = 0.0  # dropout inside ResBlocks
    attention_impl: str = "auto"  # "auto" (PyTorch's SDPA), "triton" (the kernel below, CUDA), "sdpa" or "torch"


# named sizes; "small" is the default, fast enough to train on a laptop CPU
SIZES = {
    "tiny": dict(base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1, context_dim=64, head_dim=16),
    "small": dict(),
    "base": dict(base_channels=64, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16, 8),
                 context_dim=256),
}


# -----------------------------------------------------------------------------
# Attention: the one place where softmax(q k^T / sqrt(d)) v is computed


def attention_reference(q, k, v):
    """Plain attention. q (B, H, N, d), k and v (B, H, M, d) -> (B, H, N, d)."""
    scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * scale  # (B, H, N, M)
    weights = scores.softmax(dim=-1)  # each query's weights over the M keys sum to 1
    return torch.einsum("bhnm,bhmd->bhnd", weights, v)  # (B, H, N, d)


def attention(q, k, v, impl="auto"):
    """Attention for every layer of the UNet: the fused Triton kernel (end of this file), PyTorch's
    fused scaled_dot_product_attention (SDPA), or the reference above.

    "auto" takes SDPA everywhere: on a GPU it ran 18 % faster than our kernel at the default shape
    (docs/results.md, "The attention kernel"), and on a CPU its fused kernel runs the cross-attention
    (1,024 queries, 8 keys) 1.5x as fast as the reference's einsum and softmax over 8 numbers. The
    kernel is here to be read, and to be run with "triton" (CUDA only); "torch" runs the reference.
    """
    if impl in ("auto", "sdpa"):
        return F.scaled_dot_product_attention(q, k, v)  # the same scale, d ** -0.5
    if impl == "triton":
        return flash_attention(q, k, v)
    if impl == "torch":
        return attention_reference(q, k, v)
    raise ValueError(f"unknown attention impl '{impl}' (use auto, triton, sdpa or torch)")


# -----------------------------------------------------------------------------
# Building blocks


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps, as in the Transformer: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # (half,)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def zero_module(module):
    """Zero a layer's parameters, so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Two 3x3 convolutions with the timestep embedding added in between, plus a skip.
    With temb_dim=0 there is no embedding (the autoencoder at the end of this file)."""

    def __init__(self, c_in, c_out, temb_dim, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, c_out) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.temb is not None:
            h = h + self.temb(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1) broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map."""

    def __init__(self, channels, head_dim, groups, impl):
        super().__init__()
        self.heads, self.impl = max(1, channels // head_dim), impl
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        q, k, v = rearrange(qkv, "b (three h d) x y -> three b h (x y) d", three=3, h=self.heads)  # 3 x (B, heads, HW, d)
        out = attention(q, k, v, self.impl)  # (B, heads, HW, d)
        out = rearrange(out, "b h (x y) d -> b (h d) x y", x=H, y=W)  # (B, C, H, W)
        return x + self.proj(out)


class CrossAttention(nn.Module):
    """Each image position attends to the context tokens (the lineage's rank tokens).

    Queries come from the image, keys and values from the context, so every
    pixel can read whichever rank it needs: the class for the body plan, the
    species for a small trait.
    """

    def __init__(self, channels, context_dim, head_dim, groups, impl):
        super().__init__()
        self.heads, self.impl = max(1, channels // head_dim), impl
        self.norm = nn.GroupNorm(groups, channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim, channels, bias=False)
        self.to_v = nn.Linear(context_dim, channels, bias=False)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = rearrange(self.norm(x), "b c x y -> b (x y) c")  # (B, HW, C)
        q = rearrange(self.to_q(h), "b n (h d) -> b h n d", h=self.heads)  # (B, heads, HW, d)
        k = rearrange(self.to_k(context), "b m (h d) -> b h m d", h=self.heads)  # (B, heads, M, d)
        v = rearrange(self.to_v(context), "b m (h d) -> b h m d", h=self.heads)  # (B, heads, M, d)
        out = attention(q, k, v, self.impl)  # (B, heads, HW, d)
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, HW, C)
        return x + rearrange(out, "b (x y) c -> b c x y", x=H, y=W)  # (B, C, H, W)


class Block(nn.Module):
    """ResBlock -> self-attention (if this resolution has it) -> cross-attention."""

    def __init__(self, c_in, c_out, cfg, temb_dim, self_attn):
        super().__init__()
        self.res = ResBlock(c_in, c_out, temb_dim, cfg.groups, cfg.dropout)
        self.attn = SelfAttention(c_out, cfg.head_dim, cfg.groups, cfg.attention_impl) if self_attn else None
        self.cross = CrossAttention(c_out, cfg.context_dim, cfg.head_dim, cfg.groups, cfg.attention_impl)

    def forward(self, x, temb, context):
        x = self.res(x, temb)
        if self.attn is not None:
            x = self.attn(x)
        return self.cross(x, context)


# -----------------------------------------------------------------------------
# The UNet


class UNet(nn.Module):
    """v_theta(x_t, t, context) (or eps_theta): an encoder-decoder with skip connections between matching resolutions."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        chans = [cfg.base_channels * m for m in cfg.channel_mults]
        temb_dim = 4 * cfg.base_channels
        self.time_mlp = nn.Sequential(nn.Linear(cfg.base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.pooled = nn.Linear(cfg.context_dim, temb_dim)  # the last context token, added to the timestep embedding
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)

        # encoder: remember each block's output channels, the decoder concatenates them back
        self.down, skips, c, res = nn.ModuleList(), [chans[0]], chans[0], cfg.image_size
        for level, ch in enumerate(chans):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Block(c, ch, cfg, temb_dim, res in cfg.attn_resolutions))
                c = ch
                skips.append(c)
            if level < len(chans) - 1:
                self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # halve H and W
                skips.append(c)
                res //= 2

        self.mid = nn.ModuleList([Block(c, c, cfg, temb_dim, True), Block(c, c, cfg, temb_dim, False)])

        self.up = nn.ModuleList()
        for level, ch in reversed(list(enumerate(chans))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Block(c + skips.pop(), ch, cfg, temb_dim, res in cfg.attn_resolutions))
                c = ch
            if level > 0:  # double H and W; the conv narrows straight to the finer level's channels
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(c, chans[level - 1], 3, padding=1)))
                c, res = chans[level - 1], res * 2

        self.norm_out = nn.GroupNorm(cfg.groups, c)
        self.conv_out = zero_module(nn.Conv2d(c, cfg.in_channels, 3, padding=1))

    def forward(self, x, t, context):
        # As in Imagen and SDXL, a pooled summary of the context joins the timestep embedding, so every
        # ResBlock sees it; cross-attention still does the fine work. Our last token sums the whole lineage.
        temb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels)) + self.pooled(context[:, -1])  # (B, temb_dim)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb, context) if isinstance(layer, Block) else layer(h)
            hs.append(h)
        for block in self.mid:
            h = block(h, temb, context)
        for layer in self.up:
            if isinstance(layer, Block):
                h = layer(torch.cat([h, hs.pop()], dim=1), temb, context)  # (B, C + C_skip, H, W)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# =============================================================================
# The autoencoder of latent diffusion (train.py --latent)
#
# LDM's KL autoencoder (Rombach et al. 2022, sec. 3.1), small and trained from scratch, as no
# pretrained one can be downloaded here. The encoder maps an image (3, H, W) to a diagonal Gaussian
# over latents (C_z, H/f, W/f); the decoder maps a latent back to pixels. The diffusion model then
# works on the latents, which at f = 4 are 16x16x4 for a 64x64 image: 16 times fewer positions.
#
# Mirror images. train.py flips a random half of each batch; on latents it flips the latent. That is
# right only if the latent of a mirrored image is the mirrored latent, which a convolution does not
# give by itself (its kernels are not symmetric). So the encoder is made mirror-equivariant by
# construction: E(x) = (e(x) + flip(e(flip(x)))) / 2 gives E(flip(x)) = flip(E(x)) exactly.


@dataclass
class AutoencoderConfig:
    in_channels: int = 3  # image channels
    image_size: int = 64  # H = W of the images
    f: int = 4  # downsampling factor: latents are (latent_channels, H / f, W / f); 2, 4 or 8
    latent_channels: int = 4  # C_z, channels of the latent
    base_channels: int = 16  # channels at full resolution
    channel_mults: tuple = (1, 2, 4, 4)  # channels per level = base * mult; the first log2(f) + 1 are used
    num_res_blocks: int = 1  # ResBlocks per level
    groups: int = 8  # GroupNorm groups
    kl_weight: float = 1e-6  # weight of the KL term (LDM's), per image summed over the latent as in LDM
    edge_loss: str = "fft"  # what keeps edges sharp beside L1: fft, gradient, ssim or none (autoencoder_loss)
    edge_weight: float = 1.0  # weight of that term


class Autoencoder(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] <-> latents (B, C_z, H/f, W/f), from the UNet's ResBlocks (no timestep)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if cfg.f not in (2, 4, 8):
            raise ValueError(f"autoencoder f must be 2, 4 or 8 (got {cfg.f})")
        self.cfg = cfg
        levels = int(math.log2(cfg.f)) + 1  # f = 4: three resolutions, H, H/2, H/4
        chans = [cfg.base_channels * m for m in cfg.channel_mults[:levels]]
        g, n = cfg.groups, cfg.num_res_blocks

        enc, c = [nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)], chans[0]
        for level, ch in enumerate(chans):
            for _ in range(n):
                enc.append(ResBlock(c, ch, 0, g, 0.0))
                c = ch
            if level < levels - 1:
                enc.append(nn.Conv2d(c, c, 3, stride=2, padding=1))  # halve H and W
        enc += [ResBlock(c, c, 0, g, 0.0), nn.GroupNorm(g, c), nn.SiLU(),
                nn.Conv2d(c, 2 * cfg.latent_channels, 3, padding=1)]  # mean and log-variance
        # The log-variance starts at -8 (std 0.02), not 0: the KL weight of 1e-6 hardly asks for noise, and a
        # posterior std of 1 at the start would bury the decoder's input in it for the first many steps.
        nn.init.constant_(enc[-1].bias[cfg.latent_channels:], -8.0)
        self.encoder = nn.Sequential(*enc)

        dec = [nn.Conv2d(cfg.latent_channels, c, 3, padding=1), ResBlock(c, c, 0, g, 0.0)]
        for level, ch in reversed(list(enumerate(chans))):
            for _ in range(n + 1):  # one more on the way up, as in the UNet: decoding is the harder half
                dec.append(ResBlock(c, ch, 0, g, 0.0))
                c = ch
            if level > 0:  # double H and W; the conv narrows straight to the finer level's channels
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, chans[level - 1], 3, padding=1)]
                c = chans[level - 1]
        dec += [nn.GroupNorm(g, c), nn.SiLU(), nn.Conv2d(c, cfg.in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        # LDM's scale_by_std: latents are multiplied by 1 / (their std over the training set), so the diffusion
        # sees unit variance as it does on pixels. Set once after training (model.py); a buffer, so it is saved.
        self.register_buffer("scale", torch.ones(()))

    def encode(self, x):
        """x (B, 3, H, W) -> the posterior's (mean, logvar), each (B, C_z, H/f, W/f); mirror-equivariant."""
        both = self.encoder(torch.cat([x, x.flip(-1)]))  # (2B, 2 C_z, h, w): e(x), then e(flip(x))
        e, e_mirror = both.chunk(2)
        moments = (e + e_mirror.flip(-1)) / 2  # E(x) = (e(x) + flip(e(flip(x)))) / 2
        mean, logvar = moments.chunk(2, dim=1)  # 2 x (B, C_z, h, w)
        return mean, logvar.clamp(-30, 20)  # as LDM: exp(logvar) stays finite

    def decode(self, z):
        """z (B, C_z, H/f, W/f) -> images (B, 3, H, W)."""
        return self.decoder(z)

    def forward(self, x, noise):
        """The training pass: x -> q(z|x) -> z = mean + std * noise (reparameterised) -> x_rec.
        noise ~ N(0, I) is (B, C_z, H/f, W/f). Returns (x_rec, mean, logvar)."""
        mean, logvar = self.encode(x)
        return self.decode(mean + (0.5 * logvar).exp() * noise), mean, logvar

    def to_latent(self, x):
        """What the diffusion model learns: the posterior mean, scaled to unit variance (LDM samples z;
        at kl_weight 1e-6 the posterior's std is tiny beside the mean's spread: model.py logs both)."""
        return self.encode(x)[0] * self.scale

    def to_pixels(self, z):
        """A (generated) scaled latent -> images in about [-1, 1]."""
        return self.decode(z / self.scale)


def autoencoder_loss(net, x, noise, cfg):
    """L1 reconstruction + kl_weight * KL(q(z|x) || N(0, I)) + edge_weight * an edge term; returns (loss, parts).

    net: the Autoencoder (or DDP around it), cfg its AutoencoderConfig; noise as in Autoencoder.forward.
    As in LDM the KL is summed over each image's latent and the reconstruction over its pixels; both are
    divided by the pixel count here, so the L1 term reads as a mean. The edge term keeps what L1 blurs:
    "gradient" compares the images' finite differences (their edges), "ssim" is 1 - SSIM (structure),
    "fft" compares their 2D spectra (fine detail is the high frequencies).
    """
    x_rec, mean, logvar = net(x, noise)
    pixels = x[0].numel()  # C * H * W
    l1 = (x - x_rec).abs().mean()
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean() / pixels
    kind = cfg.edge_loss
    if kind == "gradient":  # |d/dx x - d/dx x_rec| + |d/dy x - d/dy x_rec|
        d = x - x_rec
        edge = (d[..., :, 1:] - d[..., :, :-1]).abs().mean() + (d[..., 1:, :] - d[..., :-1, :]).abs().mean()
    elif kind == "ssim":
        edge = 1 - ssim(x, x_rec)
    elif kind == "fft":  # mean |F(x) - F(x_rec)|, orthonormal: every frequency counts alike
        edge = torch.fft.fft2(x - x_rec, norm="ortho").abs().mean()
    elif kind == "none":
        edge = torch.zeros((), device=x.device)
    else:
        raise ValueError(f"unknown edge loss '{kind}' (use gradient, ssim, fft or none)")
    loss = l1 + cfg.kl_weight * kl + cfg.edge_weight * edge
    return loss, dict(l1=l1.detach(), kl=kl.detach(), edge=edge.detach())


def ssim(x, y, window=11, sigma=1.5, data_range=2.0):
    """Mean SSIM (Wang et al. 2004) of two image batches in [-1, 1], Gaussian window, per channel."""
    C, window = x.shape[1], min(window, *x.shape[-2:])  # a crop smaller than the window: the crop
    g = torch.exp(-(torch.arange(window, device=x.device) - window // 2) ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]  # (window, window), sums to 1
    k = g.expand(C, 1, window, window).to(x.dtype)  # one window per channel (groups=C)

    def blur(a):
        return F.conv2d(a, k, groups=C)  # (B, C, H - window + 1, W - window + 1)
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean()


# =============================================================================
# Fused attention in Triton (flash attention, forward and backward)
#
# The plain version above builds the whole (N, M) matrix of scores. The
# kernel below never does: each program owns BLOCK_N queries, walks over the
# keys BLOCK_M at a time, and keeps only a running softmax (the "online
# softmax" of Milakov & Gimelshein 2018, as used by FlashAttention):
#
#   m   = running max of the scores seen so far          (per query)
#   l   = running sum of exp(score - m)                  (per query)
#   acc = running sum of exp(score - m) * v              (per query, d wide)
#
# When a new block raises the max from m to m', everything summed so far is
# rescaled by exp(m - m'), so at the end acc / l is exactly softmax(s) @ v.
# Exponentials are taken in base 2 (exp2 is one hardware instruction), so the
# scores are multiplied by log2(e) once, up front.
#
# The backward recomputes the probabilities from q, k and the saved
# log-sum-exp instead of storing the (N, M) matrix:
#   p  = exp(s - lse),  dv = p^T do,  dp = do v^T,
#   ds = p * (dp - delta) with delta = rowsum(do * o),  dq = ds k,  dk = ds^T q.
# One kernel computes dq for a block of queries (looping over keys), and delta on
# the way; a second computes dk, dv for a block of keys (looping over queries).
# Each output is written by exactly one program (dk, dv as per-slice partial
# sums that are then added in a fixed order), so there are no atomics and the
# result is deterministic.
#
# Every length is masked, so N, M and d need not be multiples of the block:
# cross-attention has only M = 8 keys (padded to a block of 16, the smallest
# tl.dot accepts on the GPU).

if triton is not None:
    LOG2E = tl.constexpr(1.4426950408889634)  # 1 / ln(2): exp(x) = exp2(x * LOG2E)

    @triton.jit
    def _tile(ptr, b, h, rows, cols, sb, sh, sr, sc, row_ok, col_ok):
        """Load the (rows, cols) tile of head (b, h) of a (B, H, L, d) tensor with any strides; zeros outside."""
        return tl.load(ptr + b * sb + h * sh + rows[:, None] * sr + cols[None, :] * sc,
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0)

    @triton.jit
    def _store_tile(ptr, x, b, h, rows, cols, sb, sh, sr, sc, row_ok, col_ok):
        tl.store(ptr + b * sb + h * sh + rows[:, None] * sr + cols[None, :] * sc,
                 x.to(ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _attn_fwd(Q, K, V, O, LSE, sm_scale, N, M, H,
                  sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sob, soh, son, sod,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)  # a block of queries, of one (batch, head)
        b, h = pid_bh // H, pid_bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok, d_ok = offs_n < N, offs_d < D
        q = _tile(Q, b, h, offs_n, offs_d, sqb, sqh, sqn, sqd, n_ok, d_ok)  # (BLOCK_N, BLOCK_D)
        qk_scale = sm_scale * LOG2E  # the softmax scale and the change to base 2 in one multiply

        m_i = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of the scores
        l_i = tl.zeros((BLOCK_N,), tl.float32)  # running sum of exp2(score - m_i)
        acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)  # running sum of exp2(score - m_i) * v
        for start in range(0, M, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            k = _tile(K, b, h, offs_m, offs_d, skb, skh, skm, skd, m_ok, d_ok)  # (BLOCK_M, BLOCK_D)
            v = _tile(V, b, h, offs_m, offs_d, svb, svh, svm, svd, m_ok, d_ok)  # (BLOCK_M, BLOCK_D)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_N, BLOCK_M), in log2 units
            s = tl.where(m_ok[None, :], s, float("-inf"))  # padded keys get zero weight
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        _store_tile(O, acc / l_i[:, None], b, h, offs_n, offs_d, sob, soh, son, sod, n_ok, d_ok)
        tl.store(LSE + pid_bh * N + offs_n, m_i + tl.log2(l_i), mask=n_ok)  # log2-sum-exp2 of each row's scores

    @triton.jit
    def _attn_bwd_dq(Q, K, V, O, DO, LSE, DELTA, DQ, sm_scale, N, M, H,
                     sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sob, soh, son, sod,
                     sdb, sdh, sdn, sdd, sdqb, sdqh, sdqn, sdqd,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # dq for a block of queries, looping over the keys. It runs first and also stores
        # delta = rowsum(do * o) for the dk/dv kernel, which saves a launch of its own.
        pid_n, pid_bh = tl.program_id(0), tl.program_id(1)  # a block of queries, of one (batch, head)
        b, h = pid_bh // H, pid_bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok, d_ok = offs_n < N, offs_d < D
        q = _tile(Q, b, h, offs_n, offs_d, sqb, sqh, sqn, sqd, n_ok, d_ok)  # (BLOCK_N, BLOCK_D)
        do = _tile(DO, b, h, offs_n, offs_d, sdb, sdh, sdn, sdd, n_ok, d_ok)
        o = _tile(O, b, h, offs_n, offs_d, sob, soh, son, sod, n_ok, d_ok)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_N,)
        tl.store(DELTA + pid_bh * N + offs_n, delta, mask=n_ok)
        lse = tl.load(LSE + pid_bh * N + offs_n, mask=n_ok, other=0.0)
        qk_scale = sm_scale * LOG2E
        dq = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for start in range(0, M, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            m_ok = offs_m < M
            k = _tile(K, b, h, offs_m, offs_d, skb, skh, skm, skd, m_ok, d_ok)  # (BLOCK_M, BLOCK_D)
            v = _tile(V, b, h, offs_m, offs_d, svb, svh, svm, svd, m_ok, d_ok)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_N, BLOCK_M), recomputed
            p = tl.exp2(s - lse[:, None])  # the forward's softmax probabilities, exactly
            p = tl.where(n_ok[:, None] & m_ok[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v))  # (BLOCK_N, BLOCK_M)
            ds = p * (dp - delta[:, None])  # gradient of the scores (softmax backward)
            dq += tl.dot(ds.to(k.dtype), k)  # (BLOCK_N, BLOCK_D)
        _store_tile(DQ, dq * sm_scale, b, h, offs_n, offs_d, sdqb, sdqh, sdqn, sdqd, n_ok, d_ok)

    @triton.jit
    def _attn_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, N, M, H, SPLITS, split_stride,
                       sqb, sqh, sqn, sqd, skb, skh, skm, skd, svb, svh, svm, svd, sdb, sdh, sdn, sdd,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # dk, dv for a block of keys of one (batch, head), over one of SPLITS slices of the queries:
        # with only 8 keys there would otherwise be one program per (batch, head), too few to fill a GPU.
        pid_m, pid_bh, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        b, h = pid_bh // H, pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok, d_ok = offs_m < M, offs_d < D
        k = _tile(K, b, h, offs_m, offs_d, skb, skh, skm, skd, m_ok, d_ok)  # (BLOCK_M, BLOCK_D)
        v = _tile(V, b, h, offs_m, offs_d, svb, svh, svm, svd, m_ok, d_ok)
        qk_scale = sm_scale * LOG2E
        dk = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        per_split = tl.cdiv(tl.cdiv(N, BLOCK_N), SPLITS) * BLOCK_N  # queries per slice, whole blocks
        for start in range(pid_s * per_split, tl.minimum((pid_s + 1) * per_split, N), BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_ok = offs_n < N
            q = _tile(Q, b, h, offs_n, offs_d, sqb, sqh, sqn, sqd, n_ok, d_ok)  # (BLOCK_N, BLOCK_D)
            do = _tile(DO, b, h, offs_n, offs_d, sdb, sdh, sdn, sdd, n_ok, d_ok)
            lse = tl.load(LSE + pid_bh * N + offs_n, mask=n_ok, other=0.0)
            delta = tl.load(DELTA + pid_bh * N + offs_n, mask=n_ok, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_N, BLOCK_M)
            p = tl.exp2(s - lse[:, None])
            p = tl.where(n_ok[:, None] & m_ok[None, :], p, 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)  # (BLOCK_M, BLOCK_D)
            dp = tl.dot(do, tl.trans(v))  # (BLOCK_N, BLOCK_M)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)  # (BLOCK_M, BLOCK_D)
        # DK, DV: contiguous (SPLITS, B*H, M, D) buffers; the caller adds the slices in a fixed order
        # (with one slice they are dk and dv themselves, in the inputs' dtype)
        _store_tile(DK, dk * sm_scale, pid_s, pid_bh, offs_m, offs_d, split_stride, M * D, D, 1, m_ok, d_ok)
        _store_tile(DV, dv, pid_s, pid_bh, offs_m, offs_d, split_stride, M * D, D, 1, m_ok, d_ok)


# How many programs a backward launch aims for: enough to keep every SM of a large GPU busy.
BACKWARD_PROGRAMS = 512


def _blocks(M, D):
    """Launch configuration: 64 queries per program; 16 keys per step when there are few
    (cross-attention), else 64; the head dim padded to a power of 2, at least 16."""
    return dict(BLOCK_N=64, BLOCK_M=16 if M <= 16 else 64, BLOCK_D=max(16, triton.next_power_of_2(D)),
                num_warps=4, num_stages=3)


def _flash_forward(q, k, v):
    B, H, N, D = q.shape
    M = k.shape[2]
    o = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
    blocks = _blocks(M, D)
    grid = (triton.cdiv(N, blocks["BLOCK_N"]), B * H)  # one program per (query block, batch x head)
    _attn_fwd[grid](q, k, v, o, lse, D ** -0.5, N, M, H, *q.stride(), *k.stride(), *v.stride(), *o.stride(),
                    D=D, **blocks)
    return o, lse


def _flash_backward(q, k, v, o, lse, do):
    B, H, N, D = q.shape
    M = k.shape[2]
    blocks = _blocks(M, D)
    dq = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    n_blocks, m_blocks = triton.cdiv(N, blocks["BLOCK_N"]), triton.cdiv(M, blocks["BLOCK_M"])
    # slice the queries of the dk/dv pass so that there are enough programs to fill a GPU; each slice
    # writes its own partial dk, dv (fp32), added below. With one slice the kernel writes dk, dv directly.
    splits = min(n_blocks, max(1, BACKWARD_PROGRAMS // (m_blocks * B * H)))
    if splits == 1:
        dk_part = torch.empty((B, H, M, D), device=q.device, dtype=k.dtype)
        dv_part = torch.empty((B, H, M, D), device=q.device, dtype=v.dtype)
    else:
        dk_part = torch.empty((splits, B * H, M, D), device=q.device, dtype=torch.float32)
        dv_part = torch.empty_like(dk_part)
    strides = (*q.stride(), *k.stride(), *v.stride())
    delta = torch.empty_like(lse)  # (B*H, N), rowsum(do * o): written by the dq kernel, read by the dk/dv one
    _attn_bwd_dq[(n_blocks, B * H)](q, k, v, o, do, lse, delta, dq, D ** -0.5, N, M, H,
                                    *strides, *o.stride(), *do.stride(), *dq.stride(), D=D, **blocks)
    _attn_bwd_dkdv[(m_blocks, B * H, splits)](q, k, v, do, lse, delta, dk_part, dv_part, D ** -0.5, N, M, H,
                                              splits, B * H * M * D, *strides, *do.stride(), D=D, **blocks)
    if splits == 1:
        return dq, dk_part, dv_part
    dk = dk_part.sum(0).view(B, H, M, D).to(k.dtype)  # (splits, B*H, M, D) -> (B, H, M, D)
    dv = dv_part.sum(0).view(B, H, M, D).to(v.dtype)
    return dq, dk, dv


if triton is not None:
    # A torch custom op (with its fake shape function and autograd formula) rather than a bare
    # autograd.Function, so torch.compile can trace through the kernel instead of breaking the graph.
    @torch.library.custom_op("taxadiffusion::flash_attention", mutates_args=())
    def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _flash_forward(q, k, v)

    @_flash_attention_op.register_fake
    def _(q, k, v):
        B, H, N, D = q.shape
        return q.new_empty((B, H, N, D)), q.new_empty((B * H, N), dtype=torch.float32)

    @torch.library.custom_op("taxadiffusion::flash_attention_backward", mutates_args=())
    def _flash_attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                                     lse: torch.Tensor, do: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _flash_backward(q, k, v, o, lse, do)

    @_flash_attention_backward_op.register_fake
    def _(q, k, v, o, lse, do):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def _setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs, *output)  # q, k, v, o, lse

    def _backward(ctx, do, dlse):  # lse is an internal output: its gradient is never used
        return _flash_attention_backward_op(*ctx.saved_tensors, do)

    _flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _FlashAttention(torch.autograd.Function):
    """The same kernels for eager mode: a custom op's Python dispatch costs ~0.3 ms a call, more
    than the kernels themselves at the UNet's sizes."""

    @staticmethod
    def forward(ctx, q, k, v):
        o, lse = _flash_forward(q, k, v)
        ctx.save_for_backward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        return _flash_backward(*ctx.saved_tensors, do)


def flash_attention(q, k, v):
    """The fused kernel: same contract as attention_reference, q (B, H, N, d), k and v (B, H, M, d), any strides."""
    if triton is None:
        raise RuntimeError("the fused attention kernel needs triton: pip install triton (Linux x86_64)")
    if torch.compiler.is_compiling():
        return _flash_attention_op(q, k, v)[0]
    return _FlashAttention.apply(q, k, v)


if __name__ == "__main__":
    for name, overrides in SIZES.items():
        net = UNet(UNetConfig(**overrides))
        print(f"{name:6s} {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters")
    for f in (2, 4, 8):
        ae = Autoencoder(AutoencoderConfig(f=f))
        print(f"autoencoder f={f}: {sum(p.numel() for p in ae.parameters()) / 1e6:.2f} M parameters")
