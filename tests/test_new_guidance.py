"""Guidance only inside a noise interval (model.guided_eps_fn), the tree figure (sample.py --tree), and fid.py's
taxon classifier for data other than the toy tree (fid.data_classifier)."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import sample
from conftest import inception_stand_in, run_script, toy_checkpoint
from fixtures import make_folder_tree
from model import Diffusion, DiffusionConfig, guided_eps_fn
from plumbing.cli import noise_interval
from taxonomy import RANKS


class Branches(torch.nn.Module):
    """A stand-in network whose output says which lineage it was given: v = the lineage's id sum, everywhere."""

    def __init__(self):
        super().__init__()
        self.calls = []  # (t, batch size) of every call

    def forward(self, x, t, ids):
        self.calls.append((int(t[0]), len(x)))
        return ids.sum(1, dtype=x.dtype).view(-1, 1, 1, 1).expand_as(x)


def sigmas_of_a_run(diffusion, steps):
    """The noise level of each DPM-Solver++ step, in the order the sampler takes them."""
    return [math.sqrt((1 - a) / a) for a in diffusion.alpha_bar[diffusion.timesteps(steps, "logsnr")].tolist()]


@pytest.mark.parametrize("interval, guided", [(None, "all"), ((0.0, math.inf), "all"), ((1e9, 2e9), "none"),
                                              ((0.5, 5.0), "inside")])
def test_guidance_applies_exactly_where_sigma_lies_in_the_interval(interval, guided):
    """Every step of a 15-step run is guided (two branches in one batch of 2B), none is, or exactly those with
    sigma_t in [lo, hi]; an unguided step is one call of B."""
    diffusion, net, B = Diffusion(DiffusionConfig()), Branches(), 3
    ids = torch.tensor([[1, 1, 2, 1, 3, 2, 1]] * B)
    diffusion.sample(guided_eps_fn(diffusion, net, ids, 3.0, "parent", 2, interval), (B, 3, 4, 4), steps=15,
                     generator=torch.Generator().manual_seed(0))
    sigmas = sigmas_of_a_run(diffusion, 15)
    inside = {"all": [True] * 15, "none": [False] * 15,
              "inside": [0.5 <= s <= 5.0 for s in sigmas]}[guided]
    assert 0 < sum(inside) < 15 or guided != "inside"  # the interval cuts the run somewhere
    assert [n for _, n in net.calls] == [2 * B if g else B for g in inside]


def test_a_step_outside_the_interval_is_the_conditional_prediction():
    """Outside [lo, hi] the guided eps is eps(c) itself, whatever the scale and the negative; inside it is
    eps(neg) + s (eps(c) - eps(neg)), here with the stand-in's outputs known in closed form."""
    diffusion, net = Diffusion(DiffusionConfig()), Branches()
    ids = torch.tensor([[1, 1, 2, 1, 3, 2, 4]])  # parent = the lineage without its species id 4
    x = torch.randn(1, 3, 4, 4)
    t_low, t_high = torch.tensor([5]), torch.tensor([900])  # sigma 0.03 and 74 on Ho's betas
    lo_hi = (1.0, 1000.0)
    eps_fn = guided_eps_fn(diffusion, net, ids, 5.0, "parent", 2, lo_hi)
    plain = diffusion.eps(net, x, t_low, ids)
    torch.testing.assert_close(eps_fn(x, t_low), plain, rtol=0, atol=0)  # bit for bit: one conditional call
    a = diffusion.alpha_bar[900]
    eps = lambda v: (1 - a).sqrt() * x + a.sqrt() * v  # v -> eps (Diffusion.eps)
    torch.testing.assert_close(eps_fn(x, t_high), eps(torch.tensor(10.0)) + 5 * (eps(torch.tensor(14.0)) - eps(torch.tensor(10.0))))


@pytest.mark.parametrize("text, value", [("0.28,5.42", (0.28, 5.42)), ("0,inf", (0.0, math.inf)), ("", None)])
def test_interval_flag_values(text, value):
    assert noise_interval(text) == value


@pytest.mark.parametrize("text", ["5,1", "-1,2", "1", "a,b", "1,2,3"])
def test_interval_flag_refuses_bad_values_in_one_line(text):
    proc = run_script("sample.py", "--guidance-interval", text)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--guidance-interval" in proc.stderr


def test_tree_draws_every_node_from_its_partial_lineage_in_one_column_per_rank(tmp_path, monkeypatch):
    """sample.py --tree on a tiny (untrained) toy checkpoint: root + 3 classes + 6 orders + 12 families, each node's
    parent one column left and one rank up, every node from the same noise; the PNG has a row per leaf."""
    path, taxonomy = toy_checkpoint(str(tmp_path), level="family")
    seen = {}
    real_draw = sample.draw

    def spy(diffusion, model, ids, x_T, *args, **kwargs):
        seen["ids"], seen["x_T"] = ids.clone(), x_T.clone()
        return real_draw(diffusion, model, ids, x_T, *args, **kwargs)
    monkeypatch.setattr(sample, "draw", spy)
    out = tmp_path / "tree.png"
    sample.main(sample.parse_args(["--ckpt", path, "--tree", "--steps", "2", "--out", str(out), "--device", "cpu"]))
    ids = seen["ids"]
    assert len(ids) == 1 + 3 + 6 + 12 and ids[0].eq(0).all()  # the root knows nothing
    deepest = [max((r for r in range(len(RANKS)) if row[r]), default=-1) for row in ids.tolist()]
    assert deepest == [-1] + [2] * 3 + [3] * 6 + [4] * 12  # one column per stage rank, coarse to fine
    assert torch.equal(seen["x_T"], seen["x_T"][:1].expand_as(seen["x_T"]))  # one noise for every node
    width, height = Image.open(out).size
    assert height == 14 + 12 * (16 + 4)  # a header band, then one row per leaf (16 px images)
    assert width > 4 * (16 + 24)  # four columns: root, class, order, family


def test_tree_of_a_subtree(tmp_path, capsys):
    path, _ = toy_checkpoint(str(tmp_path), level="family")
    sample.main(sample.parse_args(["--ckpt", path, "--tree", "Aves", "--steps", "2", "--out",
                                   str(tmp_path / "aves.png"), "--device", "cpu"]))
    assert "7 nodes, 4 family" in capsys.readouterr().out  # Aves, its 2 orders and 4 families


@pytest.fixture
def folder_checkpoint(tmp_path):
    """A checkpoint whose train_config reads a folder tree of 12 toy species (2 images each, 16 px)."""
    data = make_folder_tree(tmp_path / "data", per_species=2)
    path, _ = toy_checkpoint(str(tmp_path), level="species", data=str(data))
    return path, data


def test_the_classifier_of_a_folder_tree_is_rebuilt_when_its_images_change(folder_checkpoint, monkeypatch):
    path, data = folder_checkpoint
    trained = []
    real_train = fid.train_classifier
    monkeypatch.setattr(fid, "train_classifier", lambda *a, **k: trained.append(len(a[0])) or
                        real_train(*a, **{**k, "min_steps": 1, "epochs": 1}))
    ckpt = torch.load(path, weights_only=True)
    clf_path = os.path.join(os.path.dirname(path), "taxon_classifier.pt")
    _, ranks, held, held_y = fid.data_classifier(ckpt, clf_path)
    assert trained == [22] and len(held) == 2  # trained on all but the 2 held-out images
    assert ranks == [2, 3, 4, 5, 6] and held_y.shape == (2, 5) and held_y.gt(0).all()  # in the checkpoint's ids
    fid.data_classifier(ckpt, clf_path)
    assert len(trained) == 1  # the same images: the cached classifier
    first = next(data.rglob("*.png"))
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(first)  # one training image changes
    fid.data_classifier(ckpt, clf_path)
    assert len(trained) == 2


def test_fid_on_a_folder_tree_checkpoint_prints_per_rank_accuracy_beside_the_ceiling(folder_checkpoint, monkeypatch,
                                                                                    capsys):
    path, data = folder_checkpoint
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: inception_stand_in())
    real_train = fid.train_classifier
    monkeypatch.setattr(fid, "train_classifier", lambda *a, **k: real_train(*a, **{**k, "min_steps": 1}))
    fid.main(fid.parse_args([path, "--real", str(data), "--n-per-taxon", "2", "--steps", "2", "--guidance", "1",
                             "--device", "cpu"]))
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0] == "| images | n | FID | KID x1e3 | class | order | family | genus | species | classifier FD |"
    assert table[2].startswith("| held-out training images (the ceiling) | 2 |")
    assert table[3].startswith("| no guidance, 2 calls/image | 24 |")
    assert all(cell.endswith("%") for cell in table[3].split(" | ")[4:9])  # an accuracy at every rank
    assert "it is not BioCLIP" in out
