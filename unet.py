"""
The network: a DDPM UNet that predicts the noise eps in a noisy image x_t,
given the timestep t and a few context tokens (the lineage's rank tokens).

    x_t (B, C, H, W), t (B,), context (B, M, D)  ->  eps (B, C, H, W)

It works on any (C, H, W): pixels (3, 32, 32) by default, or VAE latents.
Every block is: ResBlock (with the timestep and the pooled context) ->
self-attention (at low resolutions) -> cross-attention to the context tokens. All attention math goes
through one function, `attention(q, k, v)`.

    python unet.py          # prints the parameter count of each named size

Read next: model.py (the diffusion process and the rank-token conditioner).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


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


def attention(q, k, v):
    """Attention used by every layer of the UNet (a fused kernel can plug in here)."""
    return attention_reference(q, k, v)


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
    """Two 3x3 convolutions with the timestep embedding added in between, plus a skip."""

    def __init__(self, c_in, c_out, temb_dim, groups, dropout):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1) broadcast over H, W
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map."""

    def __init__(self, channels, head_dim, groups):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv2d(channels, channels, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        q, k, v = rearrange(qkv, "b (three h d) x y -> three b h (x y) d", three=3, h=self.heads)  # 3 x (B, heads, HW, d)
        out = attention(q, k, v)  # (B, heads, HW, d)
        out = rearrange(out, "b h (x y) d -> b (h d) x y", x=H, y=W)  # (B, C, H, W)
        return x + self.proj(out)


class CrossAttention(nn.Module):
    """Each image position attends to the context tokens (the lineage's rank tokens).

    Queries come from the image, keys and values from the context, so every
    pixel can read whichever rank it needs: the class for the body plan, the
    species for a small trait.
    """

    def __init__(self, channels, context_dim, head_dim, groups):
        super().__init__()
        self.heads = max(1, channels // head_dim)
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
        out = attention(q, k, v)  # (B, heads, HW, d)
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))  # (B, HW, C)
        return x + rearrange(out, "b (x y) c -> b c x y", x=H, y=W)  # (B, C, H, W)


class Block(nn.Module):
    """ResBlock -> self-attention (if this resolution has it) -> cross-attention."""

    def __init__(self, c_in, c_out, cfg, temb_dim, self_attn):
        super().__init__()
        self.res = ResBlock(c_in, c_out, temb_dim, cfg.groups, cfg.dropout)
        self.attn = SelfAttention(c_out, cfg.head_dim, cfg.groups) if self_attn else None
        self.cross = CrossAttention(c_out, cfg.context_dim, cfg.head_dim, cfg.groups)

    def forward(self, x, temb, context):
        x = self.res(x, temb)
        if self.attn is not None:
            x = self.attn(x)
        return self.cross(x, context)


# -----------------------------------------------------------------------------
# The UNet


class UNet(nn.Module):
    """eps_theta(x_t, t, context): an encoder-decoder with skip connections between matching resolutions."""

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
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)))
                res *= 2

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


if __name__ == "__main__":
    for name, overrides in SIZES.items():
        net = UNet(UNetConfig(**overrides))
        print(f"{name:6s} {sum(p.numel() for p in net.parameters()) / 1e6:.2f} M parameters")
