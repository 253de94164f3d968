"""A tiny train -> sample run through the command lines, as a user would type them."""
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = ["--size", "tiny", "--steps", "3", "--batch-size", "8", "--per-species", "2",
            "--grid-cols", "2", "--grid-steps", "2", "--device", "cpu"]


def run(script, *args, cwd=ROOT, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    run("train.py", "--level", "order", "--out", "out", *TINY_RUN, cwd=work)
    return work


def test_train_writes_each_stage(trained):
    out = trained / "out"
    for level in ["class", "order"]:
        ckpt = torch.load(out / f"{level}.pt", weights_only=True)  # plain data only
        assert ckpt["level"] == level and ckpt["stages"] == ["class", "order"]
        assert ckpt["train_config"]["steps"] == 3
        grid = Image.open(out / f"{level}.png")
        rows = {"class": 3, "order": 6}[level]  # one row per taxon of that rank
        assert grid.height == rows * 32
    assert "stage order step 3/3 loss" in (out / "train.log").read_text()
    assert not (out / "phylum.pt").exists()  # coarser ranks fold into the first stage


def test_next_level_reuses_earlier_stages(trained):
    before = (trained / "out" / "order.pt").stat().st_mtime_ns
    proc = run("train.py", "--level", "family", "--out", "out", *TINY_RUN, cwd=trained)
    assert "using out/order.pt" in proc.stdout
    assert (trained / "out" / "order.pt").stat().st_mtime_ns == before  # nothing already written is lost
    assert torch.load(trained / "out" / "family.pt", weights_only=True)["level"] == "family"


def test_sample_partial_lineage(trained):
    run("sample.py", "--lineage", "Aves/Passeriformes/...", "--n", "4", "--steps", "2", cwd=trained)
    assert Image.open(trained / "out" / "samples.png").size == (4 * 32, 32)
    first = (trained / "out" / "samples.png").read_bytes()
    run("sample.py", "--lineage", "aves/passeriformes", "--n", "4", "--steps", "2", cwd=trained)
    assert (trained / "out" / "samples.png").read_bytes() == first  # same seed, same picture


def test_sample_refine_figure(trained):
    run("sample.py", "--lineage", "Parus major", "--refine", "--n", "3", "--steps", "2", "--sampler", "ddpm",
        "--out", "refine.png", "--ckpt", "out/order.pt", cwd=trained)
    assert Image.open(trained / "refine.png").height == 2 * 32  # class row, order row


def test_sample_with_dpm_solver(trained):
    run("sample.py", "--lineage", "Corvus corax", "--n", "2", "--steps", "3", "--sampler", "dpm++",
        "--out", "dpm.png", cwd=trained)
    assert Image.open(trained / "dpm.png").size == (2 * 32, 32)


def test_sample_list(trained):
    out = run("sample.py", "--list", cwd=trained).stdout
    assert "Passeriformes  (order)" in out and "Corvus corax  (species)" in out


@pytest.mark.parametrize("lineage,hint", [("Aves/Paseriformes", "did you mean 'Passeriformes'"),
                                          ("Insecta/Passeriformes", "Aves/Passeriformes")])
def test_bad_lineage_is_one_clear_line(trained, lineage, hint):
    proc = run("sample.py", "--lineage", lineage, cwd=trained, check=False)
    assert proc.returncode != 0
    assert hint in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_sample_without_checkpoint_is_one_clear_line(tmp_path):
    proc = run("sample.py", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "python train.py" in proc.stderr and "Traceback" not in proc.stderr


# -----------------------------------------------------------------------------
# The lineage a user types reaches the network, with the negative --guide-from asks for


def untrained_checkpoint(folder, first_level="class"):
    """An untrained tiny species-level checkpoint of the toy tree, as train.py writes it."""
    import train
    from model import TaxaDiffusion, run_header, save_checkpoint
    from unet import UNetConfig
    cfg = train.TrainConfig(level="species", first_level=first_level, size="tiny", image_size=16, per_species=1,
                            batch_size=1, device="cpu")
    _, taxonomy, plan = train.load_dataset(cfg)
    header = run_header(cfg, taxonomy, plan)
    state = TaxaDiffusion(UNetConfig(**header["unet_config"]), header["vocab_sizes"]).state_dict()
    path = folder / "species.pt"
    save_checkpoint(path, **header, model=state, ema=state, level="species")
    return path, taxonomy


@pytest.fixture(scope="module")
def species_checkpoint(tmp_path_factory):
    """Its first stage: class."""
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt"))


def conditions_seen(monkeypatch, *argv):
    """Run sample.py in this process; returns the lineage ids (B, R) of every network call."""
    import model
    import sample
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
    path, taxonomy = untrained_checkpoint(tmp_path, first_level="order")  # stages order .. species
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
    rows = [ids[0] for ids in seen[::2]]  # 2 steps per row, no guidance: one branch
    names = ["Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax"]  # class (the first stage) .. species
    assert [r.tolist() for r in rows] == [taxonomy.parse(n) for n in names]
    assert Image.open(tmp_path / "r.png").height == len(names) * 16
