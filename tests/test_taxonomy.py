"""taxonomy.py: the tree and its ids, parsing the lineage a user types, the toy tree of life and its images, the
dataset. Reading real data: test_readers.py."""
import numpy as np
import pytest
import torch

from taxonomy import (RANKS, UNKNOWN, LineageError, TaxonDataset, Taxonomy, render_toy, species_counts, toy_dataset,
                      toy_species)


@pytest.fixture(scope="module")
def toy():
    return Taxonomy([lineage for lineage, _ in toy_species()])


def names(tax, ids):
    return [tax.vocab[r][i] if i else None for r, i in enumerate(ids)]


def test_toy_tree_shape(toy):
    assert toy.size(RANKS.index("species")) >= 48
    assert {"Aves", "Actinopterygii", "Insecta"} <= set(toy.vocab[2])
    assert "Passeriformes" in toy.vocab[3]
    assert toy.stage_ranks() == [1, 2, 3, 4, 5, 6]  # one kingdom: not a stage


def test_parse_partial_lineage_from_any_rank(toy):
    assert names(toy, toy.parse("Aves/Passeriformes/...")) == \
        ["Animalia", "Chordata", "Aves", "Passeriformes", None, None, None]
    assert names(toy, toy.parse("Animalia/Chordata/Aves")) == ["Animalia", "Chordata", "Aves"] + [None] * 4
    full = toy.parse("Corvus corax")  # a species alone fixes its whole lineage
    assert names(toy, full) == ["Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax"]
    assert toy.parse("aves/passeriformes/corvidae/CORVUS/corvus_corax") == full  # case and '_' are ignored
    assert toy.parse("Passeriformes/Corvus") == toy.parse("Aves/Passeriformes/Corvidae/Corvus")  # gaps allowed


def test_parse_errors_suggest_the_right_name(toy):
    with pytest.raises(LineageError, match="did you mean 'Passeriformes'"):
        toy.parse("Aves/Paseriformes")
    with pytest.raises(LineageError, match="its class is 'Aves'.*Aves/Passeriformes"):
        toy.parse("Insecta/Passeriformes")
    with pytest.raises(LineageError, match=r"^cannot read lineage 'Aves//Corvidae': write names from coarse to fine, "
                                           r"separated by '/', e\.g\. 'Aves/Passeriformes/\.\.\.'$"):
        toy.parse("Aves//Corvidae")


def test_taxon_under_two_parents_is_an_error():
    with pytest.raises(LineageError, match="genus 'Corvus' is placed under both family 'Corvidae' and family 'Paridae'"):
        Taxonomy([(None, None, "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax"),
                  (None, None, "Aves", "Passeriformes", "Paridae", "Corvus", "Corvus corone")])


@pytest.mark.parametrize("gap_first", [True, False])
def test_an_empty_rank_is_unknown_not_a_second_parent(gap_first):
    gapped = (None, None, "Aves", "Passeriformes", None, "Corvus", "Corvus corax")  # the family cell left empty
    full = (None, None, "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corone")
    tax = Taxonomy([gapped, full] if gap_first else [full, gapped])
    g = RANKS.index("genus")
    assert tax.lineage_str(tax.ancestors(g, tax.index[g]["corvus"])) == "Aves/Passeriformes/Corvidae/Corvus"
    assert tax.ancestors(6, tax.index[6]["corvus corax"])[:6] == tax.ancestors(6, tax.index[6]["corvus corone"])[:6]
    assert Taxonomy(tax.lineages()).vocab == tax.vocab  # a checkpoint's lineages rebuild the same ids
    tax.add((None, None, None, None, None, "Corvus", "Corvus cornix"))  # nothing above the genus: no conflict
    with pytest.raises(LineageError, match="genus 'Corvus' is placed under both family 'Corvidae' and order "
                                           "'Strigiformes'"):  # a gap, but under another order: a real conflict
        tax.add((None, None, "Aves", "Strigiformes", None, "Corvus", "Corvus monedula"))


def test_conflict_names_both_places_and_inserts_nothing():
    tax = Taxonomy([])
    tax.add((None, None, "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax"), where="a.csv row 2")
    with pytest.raises(LineageError, match=r"genus 'Corvus' is placed under both family 'Corvidae' \(a.csv row 2\) "
                                           r"and family 'Paridae' \(a.csv row 9\)") as e:
        tax.add((None, None, "Aves", "Passeriformes", "Paridae", "Corvus", "Corvus corone"), where="a.csv row 9")
    assert e.value.node == (RANKS.index("genus"), 1)
    assert tax.vocab[4] == [UNKNOWN, "Corvidae"] and tax.size(6) == 1  # the conflicting lineage added nothing


def test_names_match_in_any_unicode_form():
    tax = Taxonomy([(None, None, "Aves", "Passeriformes", "Corvidae", "Pica", "Pica s\u00e9rica")])  # composed é
    assert tax.lineage_str(tax.parse("pica_se\u0301rica")) == "Aves/Passeriformes/Corvidae/Pica/Pica s\u00e9rica"


def test_lineages_round_trip(toy):
    again = Taxonomy(toy.lineages())
    assert again.vocab == toy.vocab


def test_toy_images_are_deterministic_and_vary():
    a, lin_a = toy_dataset(per_species=3, size=32, seed=1)
    b, _ = toy_dataset(per_species=3, size=32, seed=1)
    c, _ = toy_dataset(per_species=3, size=32, seed=2)
    assert a.shape == (48 * 3, 3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b)  # same (seed, species, index) -> same image
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # images vary within a species
    assert len(lin_a) == len(a)
    # anti-aliased: edge pixels take in-between values, not only the few flat colours
    assert len(torch.unique(a[0].reshape(3, -1), dim=1).T) > 20


def test_each_rank_changes_the_picture_and_finer_ranks_change_less():
    # the same pose and background (same rng seed), traits changed one rank at a time
    def draw(traits):
        return render_toy(traits, np.random.default_rng(0)).astype(float)
    base = draw((0, 0, 0, 0, 0))
    changed = {name: np.abs(draw(t) - base).max(-1) > 30 for name, t in
               [("class", (1, 2, 0, 0, 0)), ("order", (0, 1, 0, 0, 0)), ("species", (0, 0, 0, 0, 1))]}
    n = {name: int(mask.sum()) for name, mask in changed.items()}
    assert 5 < n["species"] < n["order"] and n["species"] < n["class"]  # small but visible trait


def test_dataset_items():
    imgs, lineages = toy_dataset(per_species=1)
    tax = Taxonomy(lineages)
    ds = TaxonDataset(imgs, lineages, tax)
    x, ids = ds[5]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert ids.shape == (len(RANKS),) and tax.lineage_str(ids.tolist()) == "/".join(lineages[5])


def test_long_tailed_toy_trees():
    """--per-species pairs:64/4 gives every genus one rich and one rare species; zipf:64 a 1/rank tail. Both
    depend on the seed alone, and the images of a species are the same as in the balanced tree."""
    species = [lin for lin, _ in toy_species()]
    pairs = species_counts("pairs:64/4", seed=3)
    for s in range(0, 48, 2):  # siblings s, s + 1 share a genus
        assert species[s][5] == species[s + 1][5] and sorted(pairs[s:s + 2]) == [4, 64]
    assert pairs == species_counts("pairs:64/4", seed=3) != species_counts("pairs:64/4", seed=4)
    zipf = species_counts("zipf:64", seed=0)
    assert sorted(zipf, reverse=True)[:4] == [64, 32, 21, 16] and min(zipf) == 1
    assert species_counts("7") == [7] * 48
    with pytest.raises(ValueError):
        species_counts("pairs:64")
    images, lineages = toy_dataset("pairs:3/1", size=16, seed=0)
    counts = species_counts("pairs:3/1", seed=0)
    assert len(images) == sum(counts) == 48 * 2 and [lineages.count(lin) for lin in species] == counts
    balanced, _ = toy_dataset(3, size=16, seed=0)
    assert torch.equal(images[:counts[0]], balanced[:counts[0]])  # species 0's first images, whatever the tree
