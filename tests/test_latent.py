"""plumbing/latent.py: the latent cache, a tiny train.py --latent run (the autoencoder's PSNR and scale, the
stages that name their autoencoder), and an autoencoder or stage that does not fit, refused in one line.
The autoencoder itself: test_unet.py; sampling a latent checkpoint: test_sample.py; resuming: test_resume.py.

Tiny sizes throughout: 16x16 toy images, f = 2 (8x8x4 latents), a few steps, one thread.
"""
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import TINY_AUTOENCODER
from plumbing.checkpoints import LATENT_FLAGS, save_checkpoint, weights_hash
from plumbing.latent import encode_dataset, held_out_split, load_autoencoder, reconstruct
from taxonomy import toy_dataset
from unet import Autoencoder


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_held_out_images_are_5_percent_and_never_trained_on():
    held, rest = held_out_split(1000, seed=0)
    assert len(held) == 50 and sorted(held.tolist() + rest.tolist()) == list(range(1000))
    assert torch.equal(held, held_out_split(1000, seed=0)[0]) and not torch.equal(held, held_out_split(1000, 1)[0])
    assert len(held_out_split(10, 0)[0]) == 1 and len(held_out_split(100_000, 0)[0]) == 256  # at least 1, at most 256


def test_the_latent_cache_is_rebuilt_when_the_autoencoder_changes(tmp_path):
    torch.manual_seed(0)
    images = toy_dataset(1, 16)[0][:6]  # uint8 (6, 3, 16, 16)
    ae = Autoencoder(TINY_AUTOENCODER).eval()
    ae.scale.fill_(2.5)  # a scale that is not 1: the cache holds what the diffusion learns, the scaled latents
    z = encode_dataset(ae, images, tmp_path, batch_size=4)  # two batches, the second a partial one
    with torch.no_grad():
        torch.testing.assert_close(z, ae.to_latent(images.float() / 127.5 - 1))  # each image's own latent, in order
    first = list(tmp_path.glob("latents-*.npy"))
    assert z.shape == (6, 4, 8, 8) and len(first) == 1
    np.save(first[0], np.zeros((6, 4, 8, 8), np.float32))  # the same key reads the file back, not the encoder
    assert encode_dataset(ae, images, tmp_path).abs().sum() == 0
    with torch.no_grad():
        ae.decoder[0].weight.add_(0.1)  # another autoencoder (only its decoder differs)
    z2 = encode_dataset(ae, images, tmp_path)
    now = list(tmp_path.glob("latents-*.npy"))
    assert len(now) == 1 and now != first  # encoded again, the outdated cache removed
    torch.testing.assert_close(z2, z)  # the same encoder: the same latents
    encode_dataset(ae, images[:5], tmp_path)  # other images: encoded again
    assert list(tmp_path.glob("latents-*.npy")) != now


# -----------------------------------------------------------------------------
# A tiny --latent run (conftest's latent_run, about 15 s)


def test_a_tiny_latent_run_trains_two_stages_from_a_folder_tree(latent_run):
    cfg, out = latent_run
    for name in ("autoencoder.pt", "autoencoder.png", "class.pt", "class.png", "order.pt", "order.png"):
        assert (out / name).exists(), name
    assert len(list(out.glob("latents-*.npy"))) == 1 and not list(out.glob("*.last.pt"))
    ae, ae_ckpt = load_autoencoder(out / "autoencoder.pt")
    assert ae_ckpt["held_out"] == 2  # 5 % of 48
    # the recorded PSNR and scale are those of these weights, on the held-out images and the training ones
    images = torch.as_tensor(train.load_dataset(cfg)[0].images)  # uint8 (48, 3, 16, 16)
    held, rest = held_out_split(len(images), cfg.seed)
    decoded = reconstruct(ae, images[held], "cpu").numpy().astype(np.float64)  # as the PNGs would be
    mse = ((decoded - images[held].numpy()) ** 2).reshape(len(held), -1).mean(1)
    assert ae_ckpt["psnr"] == pytest.approx(np.mean(20 * np.log10(255) - 10 * np.log10(mse)), rel=1e-5)
    with torch.no_grad():  # LDM's scale_by_std: the training images' latents have unit spread
        z = ae.to_latent(images[rest].float() / 127.5 - 1)  # (46, 4, 8, 8)
    assert z.std().item() == pytest.approx(1.0, rel=1e-4)
    # the cache the stages learned from holds these latents of every image, in order
    cache = torch.from_numpy(np.load(next(out.glob("latents-*.npy"))))
    with torch.no_grad():
        torch.testing.assert_close(cache, ae.to_latent(images.float() / 127.5 - 1))
    for stage in ("class", "order"):
        ckpt = torch.load(out / f"{stage}.pt", weights_only=True)
        assert ckpt["unet_config"]["in_channels"] == 4 and ckpt["unet_config"]["image_size"] == 8
        # --noise-schedule auto: LDM's betas on latents, recorded as such
        assert ckpt["diffusion_config"]["noise_schedule"] == ckpt["train_config"]["noise_schedule"] == "scaled-linear"
        assert ckpt["autoencoder"] == dict(file="autoencoder.pt", config=ae_ckpt["autoencoder_config"],
                                           sha256=weights_hash(ae.state_dict()))
    assert Image.open(out / "order.png").height == 6 * 16  # 6 orders, each a row of decoded 16 px images
    assert "autoencoder done: held-out PSNR" in (out / "train.log").read_text()
    # the same command again reuses everything: the autoencoder, the cache, both stages
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    train.main(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "train.log"} == \
           {k: v for k, v in before.items() if k != "train.log"}


def test_an_autoencoder_that_does_not_fit_is_refused_in_one_line(latent_run, tmp_path):
    cfg, out = latent_run
    shutil.copytree(out, tmp_path / "out")
    with pytest.raises(SystemExit) as exit:  # other images: 32 px instead of 16
        train.main(replace(cfg, out=str(tmp_path / "out"), image_size=32))
    assert str(exit.value) == (
        f"error: {tmp_path / 'out' / 'autoencoder.pt'} was trained with --image-size 16, this run has --image-size 32; "
        f"use the flags it was trained with, another --out, or delete "
        f"{tmp_path / 'out' / 'autoencoder.pt'}")
    with pytest.raises(SystemExit, match=r"autoencoder.pt was trained with --ae-steps 6, this run has --ae-steps 7"):
        train.main(replace(cfg, out=str(tmp_path / "out"), ae_steps=7))


def test_a_stage_of_another_autoencoder_is_refused(latent_run, tmp_path):
    """An autoencoder retrained under the same flags (here: one weight changed) makes the stages' latents stale."""
    cfg, out = latent_run
    shutil.copytree(out, tmp_path / "out")
    ckpt = torch.load(out / "autoencoder.pt", weights_only=True)
    ckpt["autoencoder"]["decoder.0.weight"][0, 0, 0, 0] += 1e-3
    save_checkpoint(str(tmp_path / "out" / "autoencoder.pt"), **ckpt)
    with pytest.raises(SystemExit, match=r"class.pt was trained on the latents of another autoencoder \(weights "
                                         r"sha256 [0-9a-f]{12}, this run's [0-9a-f]{12}\); delete it"):
        train.main(replace(cfg, out=str(tmp_path / "out")))
    assert len(list((tmp_path / "out").glob("latents-*.npy"))) == 1  # the new autoencoder's: encoded again


def test_a_pixel_run_refuses_latent_stages_and_reuses_old_pixel_checkpoints(latent_run, tmp_path):
    cfg, out = latent_run
    shutil.copytree(out, tmp_path / "out")
    with pytest.raises(SystemExit, match="class.pt was trained on latents \\(--latent\\), this run on pixels"):
        train.main(replace(cfg, out=str(tmp_path / "out"), latent=False))
    # a pixel checkpoint written before --latent existed (no latent flags, no autoencoder) is reused
    pixel = replace(cfg, latent=False, level="class", out=str(tmp_path / "pixel"))
    train.main(pixel)
    ckpt = torch.load(tmp_path / "pixel" / "class.pt", weights_only=True)
    for k in LATENT_FLAGS:
        del ckpt["train_config"][k]
    del ckpt["autoencoder"]
    save_checkpoint(str(tmp_path / "pixel" / "class.pt"), **ckpt)
    train.main(pixel)  # no SystemExit
