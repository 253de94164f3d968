"""What reaches the loss and the optimizer: the method's wiring in train.py, watched from outside the loop.

The resume and torchrun tests (test_train.py) compare the code with itself, so they cannot see a loop that forgets
condition dropout or the mirror flip; these record what the loop hands to condition_dropout, the loss, the EMA
and the optimizer, on the tiny UNet for 2 steps a stage.
"""
from dataclasses import replace

import pytest
import torch

import train
from train import TrainConfig

TINY = TrainConfig(level="order", size="tiny", image_size=16, per_species=2, batch_size=8, steps=2,
                   grid_cols=2, grid_steps=2, device="cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def spy_run(monkeypatch, tmp_path, **flags):
    """Train class -> order for 2 steps each, recording what the loop hands to condition_dropout, the loss and
    the EMA, and each stage's optimizer."""
    cfg = replace(TINY, out=str(tmp_path), **flags)
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
    cfg, seen = spy_run(monkeypatch, tmp_path, lr=2e-3, embed_lr_mult=7.0, ema_decay=0.2)
    for stage in seen["stages"]:
        others, tables = stage.opt.param_groups
        assert {id(p) for p in tables["params"]} == {id(p) for p in stage.model.conditioner.embed.parameters()}
        assert others["initial_lr"] == 2e-3 and tables["initial_lr"] == pytest.approx(2e-3 * 7.0)
        assert tables["lr"] == pytest.approx(7.0 * others["lr"])  # the schedule scales both alike
    # EMA decay min(--ema-decay, (1 + n) / (10 + n)) at step n: short memory while the weights move fast
    assert seen["ema"] == pytest.approx([2 / 11, 0.2] * 2)


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
