"""plumbing/images.py: the one sampling loop (draw), uint8 as a PNG holds it, PSNR, picture grids, image folders."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_AUTOENCODER
from model import Diffusion, DiffusionConfig, guided_eps_fn
from plumbing.images import draw, from_uint8, load_folder, psnr, save_grid, to_uint8
from unet import Autoencoder


def test_uint8_round_trip_and_clamp():
    every = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = from_uint8(every)
    assert x.min() == -1 and x.max() == 1 and torch.equal(to_uint8(x), every)  # every value comes back
    assert to_uint8(torch.tensor([-3.0, 0.0, 0.999, 7.0])).tolist() == [0, 128, 255, 255]  # clamped, rounded


def test_psnr_of_known_errors():
    a = torch.full((2, 3, 4, 4), 100, dtype=torch.uint8)
    b = a.clone()
    b[0] += 1  # MSE 1: 20 log10(255) = 48.13 dB
    b[1] += 10  # MSE 100: 28.13 dB
    assert psnr(a, b) == pytest.approx((48.1308 + 28.1308) / 2, abs=1e-4)  # the mean over images, in dB
    assert psnr(a, a) == pytest.approx(10 * math.log10(255 ** 2 / 1e-10))  # identical: capped, not infinite


class Zero(torch.nn.Module):
    """A network that predicts v = 0 for everything: eps = sqrt(1 - alpha_bar) x_t (Diffusion.eps)."""

    def forward(self, x, t, ids):
        return torch.zeros_like(x)


def test_draw_is_the_sampler_batch_by_batch():
    d, ids = Diffusion(DiffusionConfig()), torch.tensor([[1, 1, 2, 0, 0, 0, 0]]).repeat(5, 1)
    x_T = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    one = draw(d, Zero(), ids, x_T, steps=3, sampler="ddim", batch_size=2)  # batches of 2, 2 and 1
    alone = d.sample(guided_eps_fn(d, Zero(), ids, 1.0), x_T.shape, steps=3, sampler="ddim", x_T=x_T)
    torch.testing.assert_close(one, alone)
    assert one.abs().max() <= 1  # pixels: each x_0 clamped to the data range


def test_draw_decodes_latents_drawn_unclamped():
    torch.manual_seed(0)
    ae = Autoencoder(TINY_AUTOENCODER)
    d, ids = Diffusion(DiffusionConfig()), torch.tensor([[1, 1, 2, 0, 0, 0, 0]]).repeat(2, 1)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3  # latents beyond [-1, 1]
    z = d.sample(guided_eps_fn(d, Zero(), ids, 1.0), x_T.shape, steps=3, sampler="ddim", x_T=x_T, clip=None)
    assert z.abs().max() > 1  # the unclamped latents leave the pixel range
    with torch.no_grad():
        images = draw(d, Zero(), ids, x_T, steps=3, sampler="ddim", autoencoder=ae)
        torch.testing.assert_close(images, ae.to_pixels(z))
    assert images.shape == (2, 3, 16, 16)


def test_grid_labels_keep_their_spaces(tmp_path):
    """'Corvus corax' must not read 'Corvuscorax': the label ends a whole character further right."""
    def label_end(label):
        save_grid(torch.zeros(1, 3, 16, 16), tmp_path / "g.png", 1, labels=[label])
        img = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
        return np.nonzero((img[:, :-16] < 128).any(0))[0].max()  # the rightmost dark column left of the image
    assert label_end("Corvus corax") - label_end("Corvuscorax") >= 5


def test_a_real_folder_for_a_checkpoint_is_read_at_the_models_resolution(tmp_path):
    (tmp_path / "real").mkdir()
    for i, (w, h) in enumerate([(40, 24), (32, 32)]):  # two sizes: refused as they are, squared and resized here
        Image.fromarray(np.full((h, w, 3), 50 * i, np.uint8)).save(tmp_path / "real" / f"{i}.png")
    images = load_folder(tmp_path / "real", 16)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8 and images[1].max() == 50
    with pytest.raises(ValueError, match="images of several sizes"):
        load_folder(tmp_path / "real")  # two folders compared as they are (pytorch-fid's way)
