"""The README's quickstart as a user types it: a tiny train.py run, then sample.py on its checkpoints, each a
process of its own; a bad lineage or no checkpoint ends in one line."""
import pytest
import torch
from PIL import Image

from conftest import run_script

QUICKSTART = ["--size", "tiny", "--steps", "3", "--batch-size", "8", "--per-species", "2",
              "--grid-cols", "2", "--grid-steps", "2", "--device", "cpu"]  # 32 px images, the default


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    run_script("train.py", "--level", "order", "--out", "out", *QUICKSTART, cwd=work, check=True)
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
    proc = run_script("train.py", "--level", "family", "--out", "out", *QUICKSTART, cwd=trained, check=True)
    assert "using out/order.pt" in proc.stdout
    assert (trained / "out" / "order.pt").stat().st_mtime_ns == before  # nothing already written is lost
    assert torch.load(trained / "out" / "family.pt", weights_only=True)["level"] == "family"


def test_sample_partial_lineage(trained):
    run_script("sample.py", "--lineage", "Aves/Passeriformes/...", "--n", "4", "--steps", "2", cwd=trained, check=True)
    assert Image.open(trained / "out" / "samples.png").size == (2 * 32, 2 * 32)  # 4 images as 2 x 2
    first = (trained / "out" / "samples.png").read_bytes()
    run_script("sample.py", "--lineage", "aves/passeriformes", "--n", "4", "--steps", "2", cwd=trained, check=True)
    assert (trained / "out" / "samples.png").read_bytes() == first  # same seed, same picture


def test_sample_refine_figure(trained):
    run_script("sample.py", "--lineage", "Parus major", "--refine", "--n", "3", "--steps", "2", "--sampler", "ddpm",
        "--out", "refine.png", "--ckpt", "out/order.pt", cwd=trained, check=True)
    assert Image.open(trained / "refine.png").height == 2 * 32  # class row, order row


def test_sample_with_dpm_solver(trained):
    run_script("sample.py", "--lineage", "Corvus corax", "--n", "2", "--steps", "3", "--sampler", "dpm++",
        "--out", "dpm.png", cwd=trained, check=True)
    assert Image.open(trained / "dpm.png").size == (2 * 32, 32)


def test_sample_list(trained):
    out = run_script("sample.py", "--list", cwd=trained, check=True).stdout
    assert "Passeriformes  (order)" in out and "Corvus corax  (species)" in out


def test_bad_lineage_is_one_clear_line(trained):
    proc = run_script("sample.py", "--lineage", "Insecta/Passeriformes", cwd=trained)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Aves/Passeriformes" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_misspelled_order_is_a_typo_with_a_suggestion(trained):
    """A name new to the checkpoint counts as a new taxon only as a species right after its genus (train.py
    --extend teaches it); a misspelled order is a typo, and one line suggests the names it may mean."""
    proc = run_script("sample.py", "--lineage", "Aves/Paseriformes", "--n", "1", "--steps", "1", cwd=trained)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: unknown taxon 'Paseriformes' under class 'Aves': did you mean "
                                   "'Passeriformes' or 'Strigiformes'?")


def test_sample_without_checkpoint_is_one_clear_line(tmp_path):
    proc = run_script("sample.py", cwd=tmp_path)
    assert proc.returncode != 0 and "python train.py" in proc.stderr and "Traceback" not in proc.stderr
