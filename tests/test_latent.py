"""Latent diffusion (train.py --latent): the autoencoder, its loss, the latent cache, and the checkpoints that
name their autoencoder.

Tiny sizes throughout: 16x16 toy images, f = 2 (8x8x4 latents), a few steps, one thread.
"""
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import model
import sample
import train
from fixtures import make_folder_tree
from plumbing.checkpoints import CheckpointError, save_checkpoint, weights_hash
from plumbing.latent import encode_dataset, load_autoencoder
from taxonomy import toy_dataset
from train import TrainConfig
from unet import Autoencoder, AutoencoderConfig, autoencoder_loss, ssim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(image_size=16, f=2, base_channels=8, channel_mults=(1, 2, 2, 2), groups=4)
LATENT = TrainConfig(latent=True, latent_f=2, ae_steps=6, ae_batch_size=4, ae_crop=8, level="order", size="tiny", image_size=16,
                     per_species=2, batch_size=8, steps=3, grid_cols=2, grid_steps=2, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def toy(n=4, size=16):
    return toy_dataset(1, size)[0][:n].float() / 127.5 - 1  # (n, 3, size, size) in [-1, 1]


@pytest.mark.parametrize("edge", ["gradient", "ssim", "fft", "none"])
def test_autoencoder_loss_falls_on_a_tiny_batch(edge):
    torch.manual_seed(0)
    cfg = AutoencoderConfig(**SMALL, edge_loss=edge)
    ae, x = Autoencoder(cfg), toy()
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
    ae = Autoencoder(AutoencoderConfig(**{**SMALL, "image_size": 32, "f": f})).eval()
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
    ae = Autoencoder(AutoencoderConfig(**SMALL))
    x = toy()
    for a, b in zip(ae.encode(x.flip(-1)), ae.encode(x)):
        torch.testing.assert_close(a, b.flip(-1), atol=1e-5, rtol=0)
    # its raw half alone is not: the symmetrisation is what makes it so
    e = ae.encoder(x)
    assert (ae.encoder(x.flip(-1)) - e.flip(-1)).abs().max() > 1e-3


def test_ssim_of_an_image_with_itself_is_one_and_falls_with_noise():
    x = toy()
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    noisy = [ssim(x, (x + s * torch.randn_like(x)).clamp(-1, 1)).item() for s in (0.05, 0.2, 0.5)]
    assert noisy[0] > noisy[1] > noisy[2]


def test_weights_hash_names_the_weights_not_the_layout():
    ae = Autoencoder(AutoencoderConfig(**SMALL))
    h = weights_hash(ae.state_dict())
    assert weights_hash(ae.to(memory_format=torch.channels_last).state_dict()) == h
    with torch.no_grad():
        ae.scale.fill_(0.5)
    assert weights_hash(ae.state_dict()) != h


def test_the_latent_cache_is_rebuilt_when_the_autoencoder_changes(tmp_path):
    torch.manual_seed(0)
    images = toy_dataset(1, 16)[0][:6]  # uint8 (6, 3, 16, 16)
    ae = Autoencoder(AutoencoderConfig(**SMALL)).eval()
    z = encode_dataset(ae, images, tmp_path)
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
# A tiny --latent run, shared by the tests below (about 15 s)


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """train.py --latent from a folder tree: the autoencoder, then the class and order stages."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("latent")
    tree = make_folder_tree(root / "tree", per_species=4)  # 12 species, 48 images of 32 px (read at 16)
    cfg = replace(LATENT, data=str(tree), out=str(root / "out"), workers=0)
    train.main(cfg)
    return cfg, root / "out"


def test_a_tiny_latent_run_trains_two_stages_from_a_folder_tree(latent_run):
    cfg, out = latent_run
    for name in ("autoencoder.pt", "autoencoder.png", "class.pt", "class.png", "order.pt", "order.png"):
        assert (out / name).exists(), name
    assert len(list(out.glob("latents-*.npy"))) == 1 and not list(out.glob("*.last.pt"))
    ae, ae_ckpt = load_autoencoder(out / "autoencoder.pt")
    assert ae_ckpt["held_out"] == 2  # 5 % of 48
    # the recorded PSNR and scale are those of these weights, on the held-out images and the training ones
    dataset = train.load_dataset(cfg)[0]
    held, rest = model.held_out_split(len(dataset), cfg.seed)
    with torch.no_grad():
        x = torch.stack([dataset[j][0] for j in held.tolist()])  # (2, 3, 16, 16) in [-1, 1]
        mse = ((model.to_uint8(ae.decode(ae.encode(x)[0])).float() - model.to_uint8(x).float()) ** 2).mean((1, 2, 3))
        assert ae_ckpt["psnr"] == pytest.approx((10 * torch.log10(255 ** 2 / mse)).mean().item(), rel=1e-5)
        means = ae.encode(torch.stack([dataset[j][0] for j in rest.tolist()]))[0]  # (46, 4, 4, 4)
        assert ae_ckpt["scale"] == pytest.approx(1 / means.std().item(), rel=1e-4)  # LDM's scale_by_std
    for stage in ("class", "order"):
        ckpt = torch.load(out / f"{stage}.pt", weights_only=True)
        assert ckpt["unet_config"]["in_channels"] == 4 and ckpt["unet_config"]["image_size"] == 8
        # --noise-schedule auto: LDM's betas on latents, recorded as such
        assert ckpt["diffusion_config"]["schedule"] == ckpt["train_config"]["noise_schedule"] == "scaled-linear"
        assert ckpt["autoencoder"] == dict(file="autoencoder.pt", config=ae_ckpt["autoencoder_config"],
                                           sha256=weights_hash(ae.state_dict()))
    assert Image.open(out / "order.png").height == 6 * 16  # 6 orders, each a row of decoded 16 px images
    assert "autoencoder done: held-out PSNR" in (out / "train.log").read_text()
    # the same command again reuses everything: the autoencoder, the cache, both stages
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    train.main(cfg)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "train.log"} == \
           {k: v for k, v in before.items() if k != "train.log"}


def test_every_new_checkpoint_opens_with_weights_only(latent_run, tmp_path, monkeypatch):
    cfg, out = latent_run
    for name in ("autoencoder.pt", "class.pt", "order.pt"):
        ckpt = torch.load(out / name, weights_only=True)
        assert isinstance(ckpt, dict)
    # the resumable one, written when the autoencoder stage is stopped (Ctrl-C at its 3rd step)
    stop_at_step(monkeypatch, 3)
    with pytest.raises(SystemExit) as exit:
        train.main(replace(cfg, out=str(tmp_path)))
    assert exit.value.code == 128 + signal.SIGINT
    last = torch.load(tmp_path / "autoencoder.last.pt", weights_only=True)
    assert last["step"] == 3 and {"autoencoder", "optimizer", "scheduler", "rng"} <= set(last)


def stop_at_step(monkeypatch, step):
    """A Ctrl-C during the autoencoder's step `step`: it saves out/autoencoder.last.pt after that step and stops."""
    calls, loss = [], model.autoencoder_loss

    def stopping_loss(*args):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signal.SIGINT)
        return loss(*args)
    monkeypatch.setattr(model, "autoencoder_loss", stopping_loss)


def test_the_autoencoder_stage_resumes_exactly(latent_run, tmp_path, monkeypatch):
    cfg, out = latent_run
    stop_at_step(monkeypatch, 4)
    with pytest.raises(SystemExit):
        train.main(replace(cfg, out=str(tmp_path), level="class"))
    monkeypatch.undo()
    train.main(replace(cfg, out=str(tmp_path), level="class"))
    a, b = torch.load(out / "autoencoder.pt", weights_only=True), torch.load(tmp_path / "autoencoder.pt",
                                                                              weights_only=True)
    assert a["psnr"] == b["psnr"]
    for k, v in a["autoencoder"].items():
        assert torch.equal(v, b["autoencoder"][k]), k  # bit for bit with the uninterrupted run


def test_sample_on_a_latent_checkpoint_writes_a_decoded_png(latent_run, tmp_path):
    cfg, out = latent_run
    png = tmp_path / "s.png"
    sample.main(sample.parse_args(["--ckpt", str(out / "order.pt"), "--n", "3", "--steps", "2", "--out", str(png),
                                   "--device", "cpu"]))
    assert Image.open(png).size == (3 * 16, 16)  # 3 images of 16 px: decoded, not the 8 px latents


def run_sample(ckpt, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", ckpt, "--n", "2", "--steps",
                           "1", "--device", "cpu"], cwd=cwd, capture_output=True, text=True)


def test_a_latent_checkpoint_without_its_autoencoder_is_refused_in_one_line(latent_run, tmp_path):
    cfg, out = latent_run
    shutil.copy(out / "order.pt", tmp_path / "order.pt")
    proc = run_sample("order.pt", tmp_path)  # (a real run) no autoencoder.pt beside it
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: order.pt generates latents of the autoencoder autoencoder.pt, which is missing: put the "
        "autoencoder.pt it was trained with beside it")

    ae, ckpt = load_autoencoder(out / "autoencoder.pt")  # another autoencoder: one weight changed
    state = {k: v.clone() for k, v in ckpt["autoencoder"].items()}
    state["decoder.0.weight"][0, 0, 0, 0] += 1e-3
    save_checkpoint(str(tmp_path / "autoencoder.pt"), **{**ckpt, "autoencoder": state})
    with pytest.raises(CheckpointError) as error:  # what sample.py's last line prints after "error: "
        sample.main(sample.parse_args(["--ckpt", str(tmp_path / "order.pt"), "--device", "cpu"]))
    assert "\n" not in str(error.value) and str(error.value).startswith(
        f"{tmp_path / 'autoencoder.pt'} is another autoencoder than the one {tmp_path / 'order.pt'} was trained with "
        "(weights sha256 ")


def test_an_autoencoder_that_does_not_fit_is_refused_in_one_line(latent_run, tmp_path):
    cfg, out = latent_run
    shutil.copytree(out, tmp_path / "out")
    with pytest.raises(SystemExit) as exit:  # other images: 32 px instead of 16
        train.main(replace(cfg, out=str(tmp_path / "out"), image_size=32))
    assert str(exit.value) == (
        f"error: {tmp_path / 'out' / 'autoencoder.pt'} has autoencoder_config image_size=16, this run image_size=32 "
        f"(it does not fit these images); use the flags it was trained with, another --out, or delete "
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
                                         r"sha256 [0-9a-f]{12}, this run's autoencoder.pt [0-9a-f]{12}\); delete it"):
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
    for k in model.LATENT_FLAGS:
        del ckpt["train_config"][k]
    del ckpt["autoencoder"]
    save_checkpoint(str(tmp_path / "pixel" / "class.pt"), **ckpt)
    train.main(pixel)  # no SystemExit


def test_torchrun_two_processes_train_the_same_autoencoder_as_one(latent_run, tmp_path):
    """(a real run) --latent under torchrun: one DDP autoencoder, the latents encoded once, both stages."""
    cfg, out = latent_run
    args = []
    for k, v in vars(replace(cfg, out=str(tmp_path / "ddp"))).items():
        args += [f"--{k.replace('_', '-')}"] if v is True else [] if v is False else [f"--{k.replace('_', '-')}", str(v)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           os.path.join(ROOT, "train.py"), *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (torch.load(d / "autoencoder.pt", weights_only=True) for d in (out, tmp_path / "ddp"))
    for k, v in one["autoencoder"].items():
        torch.testing.assert_close(two["autoencoder"][k], v, atol=1e-5, rtol=1e-4)  # the same global batches
    ae, _ = load_autoencoder(tmp_path / "ddp" / "autoencoder.pt")
    assert torch.load(tmp_path / "ddp" / "order.pt", weights_only=True)["autoencoder"]["sha256"] == \
        weights_hash(ae.state_dict())
