"""train.py --schedule and --freeze: what each trains, for how long, and on which labels."""
import pytest
import torch

import fid
import train
from model import TaxaDiffusion
from taxonomy import RANKS, Taxonomy, toy_species
from unet import SIZES, UNetConfig

TINY = ["--size", "tiny", "--steps", "2", "--batch-size", "8", "--per-species", "2", "--image-size", "16",
        "--grid-cols", "1", "--grid-steps", "1", "--device", "cpu", "--save-every", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_schedule_trains_as_many_steps_and_cools_down_as_long():
    plan = [2, 3, 4, 5, 6]  # class .. species
    cfg = train.TrainConfig()  # --cooldown 0.3 of the last stage's 1,800 steps: 540, in every schedule
    assert train.schedule_stages(cfg, plan) == [(2, 200, 0), (3, 200, 0), (4, 600, 0), (5, 800, 0), (6, 1800, 540)]
    for schedule in ["all", "random", "flat"]:
        assert train.schedule_stages(train.TrainConfig(schedule=schedule), plan) == [(6, 3600, 540)]
    assert train.schedule_stages(train.TrainConfig(schedule="all", steps=7, cooldown=0), plan) == [(6, 35, 0)]
    two = train.TrainConfig(stage_steps="100,200", cooldown=0.5)  # the last number repeats
    assert train.schedule_stages(two, plan) == [(2, 100, 0), (3, 200, 0), (4, 200, 0), (5, 200, 0), (6, 200, 100)]
    deeper = [0, 1, 2, 3, 4, 5, 6]  # kingdom .. species
    assert [n for _, n, _ in train.schedule_stages(cfg, deeper)] == [200, 200, 600, 800, 1800, 1800, 1800]


def test_bad_stage_steps_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--stage-steps", "300,x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1  # that line alone, "<prog>: error: ..."
    assert err.endswith(": error: argument --stage-steps: must be comma-separated positive integers, e.g. "
                        "200,200,600 (got '300,x') (see --help)\n")


def test_stage_plan_from_the_first_level_down_and_refuses_a_level_above_it():
    toy = Taxonomy([lineage for lineage, _ in toy_species()])
    assert train.stage_plan(toy, "class", "species") == [2, 3, 4, 5, 6]  # kingdom and phylum fold into class
    assert train.stage_plan(toy, "class", "family") == [2, 3, 4]
    with pytest.raises(SystemExit, match="^error: --level class is coarser than the first stage --first-level order$"):
        train.stage_plan(toy, "order", "class")  # a TrainConfig built in Python skips the parser's check


def test_flat_lineage_keeps_one_name_alone():
    lineage = ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax")
    assert train.flat_lineage(lineage, 6) == (None,) * 6 + ("Corvus corax",)
    assert train.flat_lineage(lineage, 3) == (None,) * 3 + ("Passeriformes",) + (None,) * 3  # --level order
    short = ("Animalia", None, "Aves", None, None, None, None)  # a lineage that stops above the rank: its leaf
    assert train.flat_lineage(short, 6) == (None, None, "Aves") + (None,) * 4
    genus_only = (None, None, None, None, None, "Corvus", "Corvus corax")  # nothing at order or above
    assert train.flat_lineage(genus_only, 3) == (None,) * 7


def test_freeze_policies_pick_parameters():
    names = [n for n, _ in TaxaDiffusion(UNetConfig(**SIZES["tiny"]), [2] * len(RANKS)).named_parameters()]
    assert all(train.trainable(n, "none", [4]) for n in names)
    unet = {n for n in names if train.trainable(n, "unet", [4])}
    assert {n for n in names if n.startswith("conditioner.")} <= unet
    assert any(".cross.to_k." in n for n in unet) and "unet.pooled.weight" in unet
    assert not any(".conv1." in n or ".attn.qkv." in n or n.startswith("unet.conv_in") for n in unet)
    assert [n for n in names if train.trainable(n, "new-rank", [4, 5])] == ["conditioner.embed.4.weight",
                                                                           "conditioner.embed.5.weight"]


def test_freeze_new_rank_changes_only_the_new_table(tmp_path):
    train.main(train.parse_args(["--level", "order", "--freeze", "new-rank", "--out", str(tmp_path), *TINY]))
    before = torch.load(tmp_path / "class.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "order.pt", weights_only=True)["model"]
    changed = sorted(k for k in after if not torch.equal(before[k], after[k]))
    assert changed == ["conditioner.embed.3.weight"]  # the order table; the UNet is the class stage's


@pytest.mark.parametrize("schedule", ["random", "flat"])
def test_one_stage_schedules(tmp_path, schedule):
    train.main(train.parse_args(["--level", "species", "--schedule", schedule, "--out", str(tmp_path), *TINY]))
    assert not (tmp_path / "class.pt").exists()  # one stage, at the finest rank
    ckpt = torch.load(tmp_path / "species.pt", weights_only=True)
    assert ckpt["train_config"]["schedule"] == schedule
    assert ckpt["step"] == 2 * 5  # the steps of all five progressive stages
    known = {r for lin in ckpt["lineages"] for r, name in enumerate(lin) if name}
    assert known == ({6} if schedule == "flat" else set(range(len(RANKS))))


def test_flat_at_a_coarser_level_is_conditioned_on_that_rank(tmp_path):
    # --level order: order names alone (a flat run keeping species names would train at order with no label)
    train.main(train.parse_args(["--level", "order", "--schedule", "flat", "--out", str(tmp_path), *TINY]))
    ckpt = torch.load(tmp_path / "order.pt", weights_only=True)
    assert {r for lin in ckpt["lineages"] for r, name in enumerate(lin) if name} == {3}
    assert len({lin[3] for lin in ckpt["lineages"]}) == 6 and (tmp_path / "order.png").exists()  # a row per order


def test_flat_models_are_scored_at_every_rank():
    toy = Taxonomy([lin for lin, _ in toy_species()])
    flat = Taxonomy([train.flat_lineage(lin, 6) for lin, _ in toy_species()])
    i = flat.vocab[6].index("Corvus corax")
    ids = torch.tensor([flat.ancestors(6, i)])  # species id only
    target = fid.toy_targets(toy, flat, ids)[0]
    expected = ["Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax"]
    assert [toy.vocab[r][j] for r, j in zip(range(2, 7), target.tolist())] == expected


@pytest.mark.parametrize("init", ["zero", "random"])
def test_new_rank_init(tmp_path, init):
    # learning rate ~0: the order table after its stage is what it started as
    train.main(train.parse_args(["--level", "order", "--new-rank-init", init, "--lr", "1e-12", "--embed-lr-mult", "1",
                                 "--out", str(tmp_path), *TINY]))
    ckpt = torch.load(tmp_path / "order.pt", weights_only=True)
    for weights in ckpt["model"], ckpt["ema"]:
        order = weights["conditioner.embed.3.weight"][1:]  # (orders, D); row 0 is "unknown", never looked up
        if init == "zero":
            assert order.abs().max() < 1e-6
        else:
            assert 0.8 < order.std() < 1.2 and order.abs().max() > 1.5
