"""A new species from a few pictures: --hold-out, train.py --extend and sample.py's unseen name.

A tiny species checkpoint of the toy tree with two species held out (Corvus corone, Pica serica) is trained once;
each test extends it with a folder of their pictures, rendered as the toy tree renders them.
"""
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from plumbing.checkpoints import load_checkpoint
from taxonomy import LineageError, Taxonomy, held_out, render_toy, species_counts, toy_dataset, toy_species
from train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")
HELD = ("Corvus corone", "Pica serica")
TINY = TrainConfig(level="species", first_level="genus", size="tiny", image_size=16, per_species=2, batch_size=8,
                   steps=2, grid_cols=2, grid_steps=2, device="cpu", hold_out=",".join(HELD))


def write_species(folder, names, k=3, under=None):
    """k toy pictures of each species in folder/<genus>/<species>/ (under another genus: a conflict)."""
    for s, (lineage, traits) in enumerate(toy_species()):
        if lineage[-1] in names:
            leaf = os.path.join(folder, under or lineage[-2], lineage[-1])
            os.makedirs(leaf, exist_ok=True)
            for i in range(k):
                Image.fromarray(render_toy(traits, np.random.default_rng([0, s, i]), 16)).save(f"{leaf}/{i}.png")
    return str(folder)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("base")
    train.main(replace(TINY, out=str(out)))
    torch.set_num_threads(n)
    return str(out / "species.pt")


def extend(base, data, out, **flags):
    """train.main of `python train.py --extend base --data data --out out` (a few steps); its checkpoint."""
    train.main(replace(TrainConfig(extend=base, data=data, out=str(out), batch_size=8, grid_cols=2, grid_steps=2,
                                   device="cpu", extend_steps=3, save_every=1), **flags))
    return torch.load(os.path.join(out, "species.pt"), weights_only=True)


def test_hold_out_leaves_species_out_deterministically():
    held, kept = held_out("one-per-genus:8", seed=3)
    assert len(held) == 8 and len({s // 2 for s in held}) == 8 and kept == 0  # one species in each of 8 genera
    assert held_out("one-per-genus:8", seed=3) == (held, 0) and held_out("one-per-genus:8", seed=4)[0] != held
    counts = species_counts(64, 3, "one-per-genus:8/4")
    assert [counts[s] for s in held] == [4] * 8 and sum(counts) == 40 * 64 + 8 * 4
    _, lineages = toy_dataset(1, 16, 0, "Corvus corone,pica SERICA")  # names as a user types them
    assert len(lineages) == 46 and not {lin[-1] for lin in lineages} & set(HELD)
    with pytest.raises(ValueError, match="'Corvus coronne' is no toy species \\(did you mean 'Corvus corone'\\?\\)"):
        held_out("Corvus coronne")


def test_merge_keeps_old_ids_and_completes_lineages():
    _, lineages = toy_dataset(1, 16, 0, "Corvus corone")
    taxonomy = Taxonomy(lineages)
    old = [list(v) for v in taxonomy.vocab]
    full, added = taxonomy.merge([(None,) * 5 + ("Corvus", "Corvus corone"), (None,) * 5 + ("Corvus", "Corvus corax")])
    assert added == [0] * 6 + [1] and [v[:len(o)] for v, o in zip(taxonomy.vocab, old)] == old
    assert full[0] == ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corone")
    with pytest.raises(LineageError, match="species 'Corvus corax' is placed under both genus 'Corvus' and genus "
                                           "'Pica'"):
        taxonomy.merge([(None,) * 5 + ("Pica", "Corvus corax")])


def test_new_rows_start_as_their_parent_and_old_weights_stay(base, tmp_path):
    data = write_species(tmp_path / "new", HELD)
    before = torch.load(base, weights_only=True)
    merged = extend(base, data, tmp_path / "zero", extend_steps=0)
    trained = extend(base, data, tmp_path / "trained")  # 3 steps: the new taxa's rows only
    for ckpt in (merged, trained):
        assert ckpt["lineages"][:len(before["lineages"])] == before["lineages"]  # old ids kept
        for key, old in before["ema"].items():
            assert torch.equal(ckpt["ema"][key][:len(old)], old)  # bit for bit, rows of old taxa included
    new_rows = merged["ema"]["conditioner.embed.6.weight"][len(before["vocab"][6]):]
    assert len(new_rows) == 2 and not new_rows.any()  # zero: as the parent
    assert trained["ema"]["conditioner.embed.6.weight"][len(before["vocab"][6]):].abs().amin(1).gt(0).all()
    # the tokens of a new species are its genus's, exactly: it draws what its parent draws
    model, _ = load_checkpoint(str(tmp_path / "zero" / "species.pt"))
    taxonomy = Taxonomy(merged["lineages"])
    species = torch.tensor([taxonomy.parse("Corvus corone"), taxonomy.parse("Corvus")])
    tokens = model.conditioner(species)
    assert torch.equal(tokens[0], tokens[1])
    random = extend(base, data, tmp_path / "random", extend_steps=0, new_rank_init="random")  # the ablation
    assert random["ema"]["conditioner.embed.6.weight"][len(before["vocab"][6]):].abs().amin(1).gt(0).all()


def test_nothing_new_and_zero_steps_reproduces_the_checkpoint(base, tmp_path):
    data = write_species(tmp_path / "old", ["Corvus corax"])
    before = torch.load(base, weights_only=True)
    after = extend(base, data, tmp_path / "copy", extend_steps=0)
    assert after["vocab"] == before["vocab"] and after["lineages"] == before["lineages"]
    assert all(torch.equal(after[w][k], v) for w in ("ema", "model") for k, v in before["ema"].items())
    with pytest.raises(SystemExit, match=r"^error: \S+ adds nothing to \S+species.pt: it knows every name down to "
                                         r"species$"):
        extend(base, data, tmp_path / "nothing")


def test_conflicting_parent_and_bad_checkpoint_end_in_one_line(base, tmp_path):
    data = write_species(tmp_path / "bad", ["Corvus corax"], under="Pica")
    with pytest.raises(SystemExit, match=r"^error: \S+ does not fit \S+: species 'Corvus corax' is placed under both "
                                         r"genus 'Corvus' and genus 'Pica'; fix the data so each taxon has one parent$"):
        extend(base, data, tmp_path / "out")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: \S+empty.pt is not a checkpoint \(an empty file"):
        extend(str(tmp_path / "empty.pt"), data, tmp_path / "out")
    with pytest.raises(SystemExit, match="holds .*species.pt; write the extended model to another --out"):
        extend(base, data, os.path.dirname(base))


def test_unseen_name_draws_its_ancestor_and_a_typo_is_refused(base, tmp_path, capsys):
    def draw(lineage):
        out = str(tmp_path / "samples.png")
        sample.main(sample.parse_args(["--ckpt", base, "--lineage", lineage, "--n", "2", "--steps", "2", "--out", out,
                                       "--device", "cpu"]))
        return np.asarray(Image.open(out)), capsys.readouterr().out

    new, said = draw("Aves/Passeriformes/Corvidae/Corvus/Corvus novus")
    genus, _ = draw("Aves/Passeriformes/Corvidae/Corvus")
    assert np.array_equal(new, genus)
    note = said.splitlines()[0]
    assert note.startswith(f"note: {base} does not know the species 'Corvus novus', so this draws its genus 'Corvus'; "
                           "to teach it,") and f"python train.py --extend {base} --data NEW" in note
    _, said = draw("Aves/Passeriformes/Corvidae/Corvus/Corvus coraxx")  # new by the rule, but close to a sibling
    assert "does not know the species 'Corvus coraxx' (or did you mean 'Corvus corax'?), so" in said
    # no parent given; a misspelt known name; a name new at a coarser rank than species reads as a typo
    for typo in ("Corvus novus", "Aves/Corvidea/Corvus/Corvus novus", "Aves/Paseriformes"):
        with pytest.raises(LineageError, match="did you mean"):
            draw(typo)


def test_interrupted_extension_resumes_bit_for_bit(base, tmp_path, monkeypatch):
    data = write_species(tmp_path / "new", HELD)
    extend(base, data, tmp_path / "straight", extend_steps=4, extend_trains="all")
    calls, update_ema = [], train.update_ema
    monkeypatch.setattr(train, "update_ema", lambda *a: update_ema(*a) or calls.append(1) or (
        len(calls) == 2 and signal.raise_signal(signal.SIGINT)))
    with pytest.raises(SystemExit) as stopped:
        extend(base, data, tmp_path / "resumed", extend_steps=4, extend_trains="all")
    assert stopped.value.code == 128 + signal.SIGINT
    monkeypatch.undo()
    a = extend(base, data, tmp_path / "resumed", extend_steps=4, extend_trains="all")
    b = torch.load(tmp_path / "straight" / "species.pt", weights_only=True)
    tensors = [(k, v) for k in ("model", "ema") for v in zip(a[k].values(), b[k].values())]
    tensors += [("opt", v) for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
                for v in zip(s.values(), t.values())]
    assert a["step"] == b["step"] == 4 and all(torch.equal(x, y) for _, (x, y) in tensors)
