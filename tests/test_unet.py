"""unet.py: the UNet, attention against its definition, and the autoencoder (its loss against closed forms, the
reparameterised latent, the mirror-equivariant encoder). The Triton kernel: test_attention_kernel.py."""
import math
from dataclasses import replace

import pytest
import torch

from conftest import TINY_AUTOENCODER, TINY_UNET, randomize
from taxonomy import toy_dataset
from unet import SIZES, Autoencoder, UNet, UNetConfig, attention, attention_reference, autoencoder_loss, ssim



def toy_images(n=4, size=16):
    return toy_dataset(1, size)[0][:n].float() / 127.5 - 1  # (n, 3, size, size) in [-1, 1]


# -----------------------------------------------------------------------------
# The UNet and attention


def test_unet_shapes_pixels_and_latents():
    for cfg in [TINY_UNET, UNetConfig(**{**SIZES["tiny"], "in_channels": 4, "image_size": 16})]:
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
    nets = {impl: randomize(UNet(replace(TINY_UNET, attention_impl=impl))) for impl in ("sdpa", "torch")}
    x, t, ctx = torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), torch.randn(2, 8, TINY_UNET.context_dim)
    outs, grads = {}, {}
    for impl, net in nets.items():
        outs[impl] = net(x, t, ctx)
        outs[impl].square().mean().backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in net.parameters()])
    assert outs["torch"].abs().max() > 0.1  # random weights: attention changes the output
    torch.testing.assert_close(outs["sdpa"], outs["torch"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads["sdpa"], grads["torch"], rtol=1e-4, atol=1e-5)


# -----------------------------------------------------------------------------
# The autoencoder


@pytest.mark.parametrize("edge", ["gradient", "ssim", "fft", "none"])
def test_autoencoder_loss_falls_on_a_tiny_batch(edge):
    torch.manual_seed(0)
    cfg = replace(TINY_AUTOENCODER, edge_loss=edge)
    ae, x = Autoencoder(cfg), toy_images()
    opt = torch.optim.Adam(ae.parameters(), lr=3e-3)
    noise = torch.randn(4, 4, 8, 8)
    losses = []
    for _ in range(40):
        loss, parts = autoencoder_loss(ae, x, noise, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert set(parts) == {"l1", "kl", "edge"} and parts["l1"] < 0.25


@pytest.mark.parametrize("f", [2, 4, 8])
def test_encode_decode_keep_shapes_and_the_scale(f):
    torch.manual_seed(0)
    ae = Autoencoder(replace(TINY_AUTOENCODER, image_size=32, f=f)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (2, 4, 32 // f, 32 // f)
    assert ae.decode(mean).shape == (2, 3, 32, 32)
    ae.scale.fill_(2.5)  # to_latent multiplies by the scale, to_pixels divides it back out
    torch.testing.assert_close(ae.to_latent(x), 2.5 * mean)
    torch.testing.assert_close(ae.to_pixels(ae.to_latent(x)), ae.decode(mean))
    assert "scale" in ae.state_dict()  # saved with the weights, and part of their hash


def test_the_encoder_is_mirror_equivariant():
    """E(flip(x)) = flip(E(x)): so train.py's flip of a latent is the latent of the mirror image."""
    torch.manual_seed(0)
    ae = Autoencoder(TINY_AUTOENCODER)
    x = toy_images()
    for a, b in zip(ae.encode(x.flip(-1)), ae.encode(x)):
        torch.testing.assert_close(a, b.flip(-1), atol=1e-5, rtol=0)
    # its raw half alone is not: the symmetrisation is what makes it so
    e = ae.encoder(x)
    assert (ae.encoder(x.flip(-1)) - e.flip(-1)).abs().max() > 1e-3


def test_ssim_of_an_image_with_itself_is_one_and_falls_with_noise():
    x = toy_images()
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    noisy = [ssim(x, (x + s * torch.randn_like(x)).clamp(-1, 1)).item() for s in (0.05, 0.2, 0.5)]
    assert noisy[0] > noisy[1] > noisy[2]


def stub_posterior(ae, mean, logvar):
    """The encoder replaced by a fixed posterior q(z|x) = N(mean, exp(logvar)); returns the list of what the
    decoder is given."""
    seen, decode = [], ae.decode
    ae.encode = lambda x: (mean, logvar)
    ae.decode = lambda z: seen.append(z.detach().clone()) or decode(z)
    return seen


def test_the_kl_term_is_that_of_a_diagonal_gaussian_summed_per_image():
    """KL(q(z|x) || N(0, I)) summed over each image's latent (LDM's), averaged over the batch, divided by the
    pixels of an image: against torch.distributions, for images of unlike posteriors."""
    torch.manual_seed(0)
    cfg = replace(TINY_AUTOENCODER, edge_loss="none")
    ae, x, noise = Autoencoder(cfg), toy_images(2), torch.randn(2, 4, 8, 8)
    mean = torch.randn(2, 4, 8, 8) * torch.tensor([0.5, 2.0]).view(2, 1, 1, 1)  # (B, C_z, h, w)
    logvar = torch.randn(2, 4, 8, 8) - torch.tensor([0.0, 3.0]).view(2, 1, 1, 1)
    stub_posterior(ae, mean, logvar)
    q, prior = torch.distributions.Normal(mean, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    per_image = torch.distributions.kl_divergence(q, prior).sum(dim=(1, 2, 3))  # (2,)
    expected = per_image.mean() / (3 * 16 * 16)
    _, parts = autoencoder_loss(ae, x, noise, cfg)
    torch.testing.assert_close(parts["kl"], expected)
    # and it enters the loss with the weight kl_weight: the loss at weight 1 less the loss at weight 0
    with torch.no_grad():
        pair = [autoencoder_loss(ae, x, noise, replace(TINY_AUTOENCODER, edge_loss="none", kl_weight=w))[0]
                for w in (1.0, 0.0)]
    torch.testing.assert_close(pair[0] - pair[1], expected, rtol=1e-4, atol=1e-6)


def test_the_decoder_sees_a_reparameterised_draw_of_the_posterior():
    """z = mean + std * noise: over many noise draws the decoder's input has the posterior's mean and spread."""
    torch.manual_seed(0)
    ae = Autoencoder(TINY_AUTOENCODER)
    n = 2000
    mean = torch.tensor([0.3, -1.0, 0.0, 2.0]).view(1, 4, 1, 1).expand(n, 4, 8, 8)
    logvar = torch.tensor([math.log(0.25), 0.0, math.log(4.0), math.log(0.01)]).view(1, 4, 1, 1).expand(n, 4, 8, 8)
    seen = stub_posterior(ae, mean, logvar)
    noise = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ae(torch.zeros(n, 3, 16, 16), noise)
    z = seen[0]  # (n, 4, 8, 8): 128,000 draws per channel
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.tensor([0.3, -1.0, 0.0, 2.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3)), torch.tensor([0.5, 1.0, 2.0, 0.1]), rtol=0.02, atol=0)
    # each draw is its own noise: the decoder's input moved by std per unit of noise
    torch.testing.assert_close((z - mean) / (0.5 * logvar).exp(), noise, atol=1e-5, rtol=0)
