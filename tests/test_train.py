"""train.py: the stages it plans and schedules, what its loop hands to the loss and the optimizer (watched from
outside the loop), each stage's model and learning rate, and the checks on its data before any training.
Resuming after a kill: test_resume.py; torchrun: test_torchrun.py; the checkpoint checker: test_checkpoints.py."""
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import model
import train
from conftest import TINY, argv
from fixtures import make_inat_json, save, species, toy_image
from model import TaxaDiffusion
from plumbing.checkpoints import build_model, load_checkpoint
from taxonomy import RANKS, Taxonomy, toy_species
from unet import SIZES, UNetConfig

STAGE_ARGV = argv(replace(TINY, level="order", steps=2, grid_cols=1, grid_steps=1, save_every=0))  # --level: each test

pytestmark = pytest.mark.usefixtures("one_thread")


# -----------------------------------------------------------------------------
# The stages: which ranks, how many steps, on which labels (--schedule, --freeze, --new-rank-init)


def test_every_schedule_trains_as_many_steps_and_cools_down_as_long():
    ranks = [2, 3, 4, 5, 6]  # class .. species
    cfg = train.TrainConfig()  # --cooldown 0.3 of the last stage's 1,800 steps: 540, in every schedule
    assert train.schedule_stages(cfg, ranks) == [(2, 200, 0), (3, 200, 0), (4, 600, 0), (5, 800, 0), (6, 1800, 540)]
    for schedule in ["all", "random", "flat"]:
        assert train.schedule_stages(train.TrainConfig(schedule=schedule), ranks) == [(6, 3600, 540)]
    assert train.schedule_stages(train.TrainConfig(schedule="all", steps=7, cooldown=0), ranks) == [(6, 35, 0)]
    two = train.TrainConfig(stage_steps="100,200", cooldown=0.5)  # the last number repeats
    assert train.schedule_stages(two, ranks) == [(2, 100, 0), (3, 200, 0), (4, 200, 0), (5, 200, 0), (6, 200, 100)]
    deeper = [0, 1, 2, 3, 4, 5, 6]  # kingdom .. species
    assert [n for _, n, _ in train.schedule_stages(cfg, deeper)] == [200, 200, 600, 800, 1800, 1800, 1800]


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
    train.main(train.parse_args(["--level", "order", "--freeze", "new-rank", "--out", str(tmp_path), *STAGE_ARGV]))
    before = torch.load(tmp_path / "class.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "order.pt", weights_only=True)["model"]
    changed = sorted(k for k in after if not torch.equal(before[k], after[k]))
    assert changed == ["conditioner.embed.3.weight"]  # the order table; the UNet is the class stage's


@pytest.mark.parametrize("schedule", ["random", "flat"])
def test_one_stage_schedules(tmp_path, schedule):
    train.main(train.parse_args(["--level", "species", "--schedule", schedule, "--out", str(tmp_path), *STAGE_ARGV]))
    assert not (tmp_path / "class.pt").exists()  # one stage, at the finest rank
    ckpt = torch.load(tmp_path / "species.pt", weights_only=True)
    assert ckpt["train_config"]["schedule"] == schedule
    assert ckpt["step"] == 2 * 5  # the steps of all five progressive stages
    known = {r for lin in ckpt["lineages"] for r, name in enumerate(lin) if name}
    assert known == ({6} if schedule == "flat" else set(range(len(RANKS))))


def test_flat_at_a_coarser_level_is_conditioned_on_that_rank(tmp_path):
    # --level order: order names alone (a flat run keeping species names would train at order with no label)
    train.main(train.parse_args(["--level", "order", "--schedule", "flat", "--out", str(tmp_path), *STAGE_ARGV]))
    ckpt = torch.load(tmp_path / "order.pt", weights_only=True)
    assert {r for lin in ckpt["lineages"] for r, name in enumerate(lin) if name} == {3}
    assert len({lin[3] for lin in ckpt["lineages"]}) == 6 and (tmp_path / "order.png").exists()  # a row per order


@pytest.mark.parametrize("init", ["zero", "random"])
def test_new_rank_init(tmp_path, init):
    # learning rate ~0: the order table after its stage is what it started as
    train.main(train.parse_args(["--level", "order", "--new-rank-init", init, "--lr", "1e-12", "--embed-lr-mult", "1",
                                 "--out", str(tmp_path), *STAGE_ARGV]))
    ckpt = torch.load(tmp_path / "order.pt", weights_only=True)
    for weights in ckpt["model"], ckpt["ema"]:
        order = weights["conditioner.embed.3.weight"][1:]  # (orders, D); row 0 is "unknown", never looked up
        if init == "zero":
            assert order.abs().max() < 1e-6
        else:
            assert 0.8 < order.std() < 1.2 and order.abs().max() > 1.5


# -----------------------------------------------------------------------------
# The loop's wiring: what reaches condition_dropout, the loss, the EMA and the optimizer (2 steps a stage)


def spy_run(monkeypatch, tmp_path, **flags):
    """Train class -> order for 2 steps each, recording what the loop hands to condition_dropout, the loss and
    the EMA, and each stage's optimizer."""
    cfg = replace(replace(TINY, level="order", steps=2), out=str(tmp_path), **flags)
    seen = {"dropout": [], "loss": [], "ema": [], "stages": [], "grid": []}
    real_dropout, real_build, real_ema = train.condition_dropout, train.build_stage, train.update_ema

    def dropout(ids, p_uncond, p_cut, **kw):
        out = real_dropout(ids, p_uncond, p_cut, **kw)
        seen["dropout"].append((ids.clone(), p_uncond, p_cut, out.clone()))
        return out

    class Diffusion(train.Diffusion):
        def loss(self, model, x0, ids, **kw):
            seen["loss"].append((x0.clone(), ids.clone(), kw["weight"]))
            seen.setdefault("t_eps", []).append((kw["t"].clone(), kw["eps"].clone()))
            return super().loss(model, x0, ids, **kw)

        def sample(self, eps_fn, shape, **kw):  # the stage grids
            seen["grid"].append((kw["sampler"], kw["steps"], shape[0]))
            return super().sample(eps_fn, shape, **kw)

    def build_stage(*args, **kw):
        seen["stages"].append(real_build(*args, **kw))
        return seen["stages"][-1]

    def update_ema(ema, model, decay):
        seen["ema"].append(decay)
        real_ema(ema, model, decay)
    for name, spy in [("condition_dropout", dropout), ("Diffusion", Diffusion), ("build_stage", build_stage),
                      ("update_ema", update_ema)]:
        monkeypatch.setattr(train, name, spy)
    train.main(cfg)
    return cfg, seen


def test_each_stage_conditions_on_its_lineage_cut_then_dropped(tmp_path, monkeypatch):
    cfg, seen = spy_run(monkeypatch, tmp_path, p_uncond=0.25, p_cut=0.35, loss_weight="eps")
    assert len(seen["dropout"]) == len(seen["loss"]) == 4  # 2 steps of class, 2 of order
    for step, ((ids, p_uncond, p_cut, dropped), (_, loss_ids, weight)) in enumerate(zip(seen["dropout"], seen["loss"])):
        level = 2 if step < 2 else 3  # class, then order
        assert (ids[:, :level + 1] > 0).all() and (ids[:, level + 1:] == 0).all()  # known down to the stage's rank
        assert (p_uncond, p_cut) == (0.25, 0.35) and weight == "eps"  # the run's flags
        assert torch.equal(loss_ids, dropped)  # what dropout returns is what the loss sees


def test_dropout_reaches_the_loss(tmp_path, monkeypatch):
    _, seen = spy_run(monkeypatch, tmp_path, p_uncond=1.0, p_cut=0.0)
    assert all((ids == 0).all() for _, ids, _ in seen["loss"])  # every lineage dropped: the unconditional model
    _, seen = spy_run(monkeypatch, tmp_path / "kept", p_uncond=0.0, p_cut=0.0)
    assert all(torch.equal(ids, cut) for (cut, *_), (_, ids, _) in zip(seen["dropout"], seen["loss"]))


def test_the_loss_sees_the_data_or_its_mirror_image(tmp_path, monkeypatch):
    cfg, seen = spy_run(monkeypatch, tmp_path, batch_size=16)
    images = train.load_dataset(cfg)[0].images.float() / 127.5 - 1  # (N, 3, H, W), as the dataset gives them
    mirrored = 0
    for x0, _, _ in seen["loss"]:
        for x in x0:
            plain = (images == x).flatten(1).all(1).any().item()
            flipped = (images.flip(-1) == x).flatten(1).all(1).any().item()
            assert plain or flipped  # an image of the data, unchanged or mirrored left to right
            mirrored += flipped and not plain
    assert 0.25 < mirrored / (4 * 16) < 0.75  # about half: p = 0.5 (64 draws)


def test_the_loss_gets_fresh_timesteps_over_all_of_t_and_standard_noise(tmp_path, monkeypatch):
    _, seen = spy_run(monkeypatch, tmp_path, batch_size=64)  # 4 steps of 64
    t = torch.stack([t for t, _ in seen["t_eps"]])  # (4, 64)
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.long
    assert (t < 250).any() and (t >= 750).any()  # all of [0, T): 256 draws miss a quarter with p ~ 1e-32
    assert all(not torch.equal(t[i], t[i + 1]) for i in range(3))  # fresh every step
    eps = torch.cat([e.flatten() for _, e in seen["t_eps"]])  # 196,608 draws
    assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1) < 0.01


def test_random_schedule_cuts_each_example_at_its_own_depth(tmp_path, monkeypatch):
    # --schedule random: one stage at species, each example's lineage cut at a rank drawn from class .. species
    _, seen = spy_run(monkeypatch, tmp_path, level="species", schedule="random")
    depths = torch.cat([(ids > 0).sum(1) - 1 for ids, *_ in seen["dropout"]])  # 10 steps of 8: (80,)
    assert set(depths.tolist()) == {2, 3, 4, 5, 6}
    assert all(len(set(((ids > 0).sum(1)).tolist())) > 1 for ids, *_ in seen["dropout"][:3])  # mixed in a batch


def test_rank_tables_learn_faster_and_ema_warms_up(tmp_path, monkeypatch):
    cfg, seen = spy_run(monkeypatch, tmp_path, lr=2e-3, embed_lr_mult=7.0, ema_decay=0.999)
    for stage in seen["stages"]:
        others, tables = stage.opt.param_groups
        assert {id(p) for p in tables["params"]} == {id(p) for p in stage.model.conditioner.embed.parameters()}
        assert others["initial_lr"] == 2e-3 and tables["initial_lr"] == pytest.approx(2e-3 * 7.0)
        assert tables["lr"] == pytest.approx(7.0 * others["lr"])  # the schedule scales both alike
    # The EMA warms up: with --ema-decay 0.999 a stage's first 2 steps would keep 0.998 of its starting weights
    # in the EMA; the warm-up's short memory keeps 1/22 (decays 2/11 and 1/4), and every decay is below 0.999
    for stage in (seen["ema"][:2], seen["ema"][2:]):
        assert stage[0] * stage[1] == pytest.approx(1 / 22) and max(stage) < 0.999
    # ... and no decay is above --ema-decay: a low one caps the warm-up
    _, seen = spy_run(monkeypatch, tmp_path / "low", ema_decay=0.2)
    assert max(seen["ema"]) == 0.2 and min(seen["ema"]) < 0.2


def test_finer_rank_tables_stay_zero_until_their_stage(tmp_path, monkeypatch):
    # A rank's table is zero until its stage begins, so a new taxon starts as exactly its parent (build_stage).
    spy_run(monkeypatch, tmp_path)
    for level, first_unused in [("class", 3), ("order", 4)]:
        state = torch.load(tmp_path / f"{level}.pt", weights_only=True)["model"]
        assert state[f"conditioner.embed.{first_unused - 1}.weight"].abs().sum() > 0  # its own rank has learned
        for r in range(first_unused, 7):
            assert (state[f"conditioner.embed.{r}.weight"] == 0).all(), (level, r)


def test_the_grid_flags_reach_the_sampler(tmp_path, monkeypatch):
    cfg, seen = spy_run(monkeypatch, tmp_path, grid_sampler="dpm++", grid_steps=3, grid_cols=2)
    assert seen["grid"] == [("dpm++", 3, 2 * 3), ("dpm++", 3, 2 * 6)]  # 3 classes, then 6 orders, 2 columns each


# -----------------------------------------------------------------------------
# A stage's model, learning rate and noise schedule


class FakeCompiled(nn.Module):
    """Stands in for torch.compile's wrapper (whose own state_dict keys start with '_orig_mod.'), without compiling."""

    def __init__(self, module):
        super().__init__()
        self._orig_mod, self.calls = module, 0

    def forward(self, *args):
        self.calls += 1
        return self._orig_mod(*args)


def test_compiled_run_saves_the_plain_module(tmp_path, monkeypatch):
    wrappers = []
    monkeypatch.setattr(torch, "compile", lambda m: wrappers.append(FakeCompiled(m)) or wrappers[-1])
    train.main(replace(TINY, steps=2, compile=True, out=str(tmp_path)))
    assert wrappers and wrappers[0].calls == 2  # the steps ran through the wrapper
    ckpt = torch.load(tmp_path / "class.pt", weights_only=True)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    build_model(ckpt).load_state_dict(ckpt["ema"])  # and it loads into a plain model


def test_learning_rate_warms_up_then_cools_down_in_the_last_stage_only(tmp_path):
    # steps 1..10 of a stage with 2 warm-up and 4 cool-down steps, as fractions of --lr
    assert [train.lr_factor(s, 10, 2, 4) for s in range(10)] == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    assert [train.lr_factor(s, 4, 2, 0) for s in range(4)] == [0.5, 1, 1, 1]
    train.main(replace(TINY, level="order", warmup=2, cooldown=0.5, out=str(tmp_path)))
    lr = {level: torch.load(tmp_path / f"{level}.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
          for level in ("class", "order")}
    assert lr == {"class": TINY.lr, "order": 0.0}  # after each stage's last step: only the last stage decayed


def test_attention_path_is_a_free_choice_between_stages(tmp_path):
    """--attention changes how attention is computed, not what: a stage trained with one path continues with
    another; the checkpoint records the path it ran, and sample.py and fid.py rebuild the network with the
    path that suits their own machine ("auto"), so a GPU run with --attention triton samples on a CPU."""
    train.main(replace(TINY, attention="sdpa", out=str(tmp_path)))
    assert torch.load(tmp_path / "class.pt", weights_only=True)["unet_config"]["attention_impl"] == "sdpa"
    train.main(replace(TINY, level="order", attention="torch", out=str(tmp_path)))  # from class.pt, no refusal
    order = torch.load(tmp_path / "order.pt", weights_only=True)
    assert order["unet_config"]["attention_impl"] == "torch"
    assert build_model(order).unet.cfg.attention_impl == "auto"
    # a checkpoint from a GPU run with --attention triton loads and runs here, on the CPU
    torch.save({**order, "unet_config": {**order["unet_config"], "attention_impl": "triton"}}, tmp_path / "gpu.pt")
    model, _ = load_checkpoint(str(tmp_path / "gpu.pt"))
    ids = torch.tensor([Taxonomy(order["lineages"]).ancestors(3, 1)])  # one order's lineage ids: (1, R)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():  # the same function as the checkpoint that ran "torch"
        torch.testing.assert_close(model(x, t, ids), load_checkpoint(str(tmp_path / "order.pt"))[0](x, t, ids),
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit):  # and the flag only takes the four paths
        train.parse_args(["--attention", "flash"])


def test_the_loop_trains_with_the_noise_schedule_the_checkpoint_records(tmp_path, monkeypatch):
    """--noise-schedule reaches the training loss, not only the checkpoint that sample.py reads."""
    used = []
    monkeypatch.setattr(train, "Diffusion", lambda cfg: used.append(cfg.noise_schedule) or model.Diffusion(cfg))
    train.main(replace(TINY, steps=1, noise_schedule="scaled-linear", out=str(tmp_path)))
    ckpt = torch.load(tmp_path / "class.pt", weights_only=True)
    assert used == ["scaled-linear"] and ckpt["diffusion_config"]["noise_schedule"] == "scaled-linear"
    # the default, auto, is Ho's linear betas in pixels (LDM's on latents: test_latent.py), recorded as such
    train.main(replace(TINY, steps=1, out=str(tmp_path / "auto")))
    ckpt = torch.load(tmp_path / "auto" / "class.pt", weights_only=True)
    assert used[-1] == "linear" and ckpt["diffusion_config"]["noise_schedule"] == "linear"
    assert ckpt["train_config"]["noise_schedule"] == "linear"


# -----------------------------------------------------------------------------
# The data, checked before any training


def test_data_that_names_nothing_down_to_the_level_is_one_line(tmp_path):
    """Folders that start at family, and the default --level order: no stage could condition on anything."""
    for s, lineage, traits in species()[:2]:
        for k in range(2):
            save(toy_image(s, traits, k), tmp_path.joinpath("data", *lineage[4:], f"{k}.png"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "class.pt").write_bytes(b"earlier work")
    cfg = train.TrainConfig(data=str(tmp_path / "data"), top_rank="family", workers=0, out=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match=rf"^error: {tmp_path}/data names no class to order \(its coarsest rank is "
                                         r"family\): train with --level family or finer$"):
        train.main(cfg)
    assert (tmp_path / "out" / "class.pt").read_bytes() == b"earlier work"


def test_ranks_without_a_stage_are_named_before_training(tmp_path, capsys):
    """One genus of one species: the ranks --level asks for get no stage, and train.py says why first."""
    s, lineage, traits = species()[0]  # Animalia/Chordata/Aves/Passeriformes/Corvidae/Corvus/Corvus corax
    for k in range(4):  # folders down to the genus: the data names no species
        save(toy_image(s, traits, k), tmp_path.joinpath("data", *lineage[2:6], f"{k}.png"))
    cfg = train.TrainConfig(level="species", data=str(tmp_path / "data"), top_rank="class", workers=0,
                            out=str(tmp_path / "out"))
    with pytest.raises(SystemExit, match="has 4 images, fewer than --batch-size 32"):  # stops before training
        train.main(cfg)
    assert ("note: no stage for order, family, genus (no more taxa in the data than a coarser rank: nothing new "
            "to split), species (the data names none); training class\n") in capsys.readouterr().out


def test_fewer_images_than_a_batch_is_an_error(tmp_path):
    args = ["--data", str(make_inat_json(tmp_path, per_species=1)), "--out", str(tmp_path / "out"), "--workers", "0"]
    with pytest.raises(SystemExit, match="has 12 images, fewer than --batch-size 32"):
        train.main(train.parse_args(args))  # and not an endless wait for a first batch


def test_fewer_images_than_an_autoencoder_batch_is_an_error(tmp_path):
    # 36 images, 2 held out: 34 to train the autoencoder on, fewer than its batch of 40
    args = ["--data", str(make_inat_json(tmp_path, per_species=3)), "--out", str(tmp_path / "out"), "--workers", "0",
            "--latent", "--batch-size", "8", "--ae-batch-size", "40"]
    with pytest.raises(SystemExit, match=r"has 34 images for the autoencoder to train on \(5 % are held out\), "
                                         r"fewer than --ae-batch-size 40$"):
        train.main(train.parse_args(args))  # and not a ZeroDivisionError in the autoencoder's batches
    assert not (tmp_path / "out" / "autoencoder.last.pt").exists()


def test_a_finished_stage_is_logged_before_the_next_begins(tmp_path, monkeypatch):
    """train.log holds each finished stage's line on disk at once: a run killed later (kill -9 flushes nothing)
    still records the stages it finished."""
    real, logged = train.build_stage, []

    def spy(cfg, finest, *args, **kwargs):
        logged.append((tmp_path / "train.log").read_text())  # what the disk holds as the stage begins
        return real(cfg, finest, *args, **kwargs)
    monkeypatch.setattr(train, "build_stage", spy)
    train.main(replace(TINY, level="order", steps=2, out=str(tmp_path)))
    assert len(logged) == 2 and "stage class done:" in logged[1] and "stage class step 2/2" in logged[1]
