"""sample.py: the lineage a user types reaches the network with the negative --guide-from asks for, --refine walks
down the lineage, and a latent checkpoint is drawn unclamped and decoded by the autoencoder beside it.
sample.py as a user runs it after train.py: test_quickstart.py."""
import shutil

import pytest
import torch
from PIL import Image

import model
import sample
from conftest import run_script, toy_checkpoint
from plumbing.checkpoints import CheckpointError, save_checkpoint
from plumbing.latent import load_autoencoder
from taxonomy import RANKS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def species_checkpoint(tmp_path_factory):
    """An untrained species checkpoint of the toy tree; its first stage: class."""
    return toy_checkpoint(tmp_path_factory.mktemp("ckpt"))


def conditions_seen(monkeypatch, *argv):
    """Run sample.py in this process; returns the lineage ids (B, R) of every network call."""
    seen, forward = [], model.TaxaDiffusion.forward

    def spy(self, x, t, ids):
        seen.append(ids.clone())
        return forward(self, x, t, ids)
    monkeypatch.setattr(model.TaxaDiffusion, "forward", spy)
    sample.main(sample.parse_args(["--n", "2", "--steps", "2", "--device", "cpu", *argv]))
    return seen


@pytest.mark.parametrize("guide_from, negative", [("null", "/"), ("parent", "Corvus"), ("root", "Aves")])
def test_the_lineage_and_its_negative_reach_the_network(species_checkpoint, tmp_path, monkeypatch, guide_from,
                                                        negative):
    path, taxonomy = species_checkpoint
    seen = conditions_seen(monkeypatch, "--ckpt", str(path), "--lineage", "corvus_corax", "--guide-from", guide_from,
                           "--out", str(tmp_path / "s.png"))
    raven = torch.tensor(taxonomy.parse("Corvus corax"))
    neg = torch.tensor(taxonomy.parse(negative)) if negative != "/" else torch.zeros_like(raven)
    assert len(seen) == 2  # one call per step: both guidance branches in one batch
    for ids in seen:
        assert torch.equal(ids, torch.stack([raven, raven, neg, neg]))  # (2 images, then their 2 negatives)


def test_the_root_negative_is_the_checkpoints_first_stage(tmp_path, monkeypatch):
    path, taxonomy = toy_checkpoint(tmp_path, first_level="order")  # stages order .. species
    seen = conditions_seen(monkeypatch, "--ckpt", str(path), "--lineage", "Corvus corax", "--guide-from", "root",
                           "--out", str(tmp_path / "s.png"))
    raven, root = (torch.tensor(taxonomy.parse(n)) for n in ("Corvus corax", "Aves/Passeriformes"))
    assert all(torch.equal(ids, torch.stack([raven, raven, root, root])) for ids in seen)


def test_a_root_negative_that_is_the_lineage_itself_is_noted(species_checkpoint, tmp_path, monkeypatch, capsys):
    path, _ = species_checkpoint  # first stage: class
    conditions_seen(monkeypatch, "--ckpt", str(path), "--lineage", "Aves", "--guide-from", "root",
                    "--out", str(tmp_path / "s.png"))
    assert ("note: the root negative of 'Animalia/Chordata/Aves' is the lineage itself (the first stage is class), "
            "so guidance changes nothing; use --guide-from null or parent") in capsys.readouterr().out
    conditions_seen(monkeypatch, "--ckpt", str(path), "--lineage", "Corvus", "--guide-from", "root",
                    "--out", str(tmp_path / "s.png"))
    assert "note:" not in capsys.readouterr().out


def test_refine_rows_walk_down_the_lineage(species_checkpoint, tmp_path, monkeypatch):
    path, taxonomy = species_checkpoint
    seen = conditions_seen(monkeypatch, "--ckpt", str(path), "--lineage", "Corvus corax", "--refine",
                           "--guidance", "1", "--out", str(tmp_path / "r.png"))
    rows = seen[0][::2]  # every row in one batch, 2 images each; no guidance: one branch
    names = ["Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax"]  # class (the first stage) .. species
    assert [r.tolist() for r in rows] == [taxonomy.parse(n) for n in names]
    assert Image.open(tmp_path / "r.png").height == len(names) * 16


def spy_clip(monkeypatch):
    """The clip every Diffusion.sample call is given."""
    clips, real = [], model.Diffusion.sample
    monkeypatch.setattr(model.Diffusion, "sample", lambda self, *a, **k: clips.append(k["clip"]) or real(self, *a, **k))
    return clips


def test_a_pixel_checkpoint_is_drawn_clamped_to_the_pixel_range(species_checkpoint, tmp_path, monkeypatch):
    path, _ = species_checkpoint
    clips = spy_clip(monkeypatch)
    sample.main(sample.parse_args(["--ckpt", path, "--n", "2", "--steps", "1", "--guidance", "1", "--device", "cpu",
                                   "--out", str(tmp_path / "s.png")]))
    assert clips == [1.0]


def test_sample_on_a_latent_checkpoint_writes_a_decoded_png(tmp_path, monkeypatch):
    path, _ = toy_checkpoint(tmp_path, level="order", latent=True)
    png = tmp_path / "s.png"
    clips = spy_clip(monkeypatch)
    sample.main(sample.parse_args(["--ckpt", path, "--n", "3", "--steps", "2", "--out", str(png), "--device", "cpu"]))
    assert Image.open(png).size == (3 * 16, 16)  # 3 images of 16 px: decoded, not the 8 px latents
    assert clips == [None]  # latents are drawn unclamped: their range is not the pixels' [-1, 1]


def test_a_latent_checkpoint_without_its_autoencoder_is_refused_in_one_line(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    toy_checkpoint(out, level="order", latent=True)
    shutil.copy(out / "order.pt", tmp_path / "order.pt")
    proc = run_script("sample.py", "--ckpt", "order.pt", "--n", "2", "--steps", "1", "--device", "cpu",
                      cwd=tmp_path)  # (a real run) no autoencoder.pt beside it
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


# -----------------------------------------------------------------------------
# sample.py --tree


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
