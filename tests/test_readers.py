"""plumbing/readers.py on small fixtures made in tmp_path (tests/fixtures.py): each format, bad input in one line,
the cache of decoded images, and two stages trained from each format."""
import csv
import os
import subprocess
import sys
import unicodedata
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import train
from conftest import TINY, argv
from fixtures import (add_broken, make_bioscan, make_fishnet, make_folder_tree, make_inat_json, inat_folder_name,
                      save, species, toy_image)
from plumbing import readers
from plumbing.readers import DataError, build_taxonomy, load_data, read_items
from taxonomy import RANKS, TaxonDataset

CORAX = ("Animalia", "Chordata", "Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax")


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def png(path, value=100, size=(20, 20)):
    save(Image.fromarray(np.full((*size[::-1], 3), value, np.uint8)), path)


# -----------------------------------------------------------------------------
# Each format


@pytest.mark.parametrize("start,flag", [(2, "auto"), (3, "auto"), (4, "auto"), (3, "order")])
def test_folder_tree_starts_at_any_rank(tmp_path, start, flag):
    make_folder_tree(tmp_path, start=start)
    items = read_items(tmp_path, top_rank=flag)
    assert len(items) == 24
    assert (None,) * start + CORAX[start:] in {item.lineage for item in items}


def test_folder_tree_auto_rank(tmp_path):
    png(tmp_path / "a/Aves/Passeriformes/Corvidae/Corvus/0.png")  # ends at genus: found by the family's ending
    png(tmp_path / "a/Aves/Strigiformes/Strigidae/Bubo/0.png")
    assert read_items(tmp_path / "a")[0].lineage == (None, None) + CORAX[2:6] + (None,)
    png(tmp_path / "b/Corvus/Corvus corax/0.png")  # no family level: the deepest folders are species
    assert read_items(tmp_path / "b")[0].lineage == (None,) * 5 + CORAX[5:]
    png(tmp_path / "c/1/2/3/4/5/6/7/8/0.png")
    with pytest.raises(DataError, match="c: folders nest 8 deep.*--top-rank"):
        read_items(tmp_path / "c")


def test_unicode_names_are_kept(tmp_path):
    nfd = unicodedata.normalize("NFD", "Pica séricá")  # as macOS writes folder names
    png(tmp_path / "Corvidae" / "Pica" / nfd / "0.png")
    png(tmp_path / "Corvidae" / "Corvus" / "Corvus corax" / "0.png")
    png(tmp_path / "Corvidae" / "Nucifraga" / "星鸦" / "0.png")  # any script: an epithet alone gets its genus
    images, lineages, wheres = load_data(str(tmp_path), size=8)
    tax, lineages = build_taxonomy(lineages, wheres)
    assert "Pica séricá" in tax.vocab[6] and "Nucifraga 星鸦" in tax.vocab[6]  # NFC, as typed
    assert tax.lineage_str(tax.parse("pica SÉRICÁ")) == "Corvidae/Pica/Pica séricá"
    assert tax.lineage_str(tax.parse(nfd)) == "Corvidae/Pica/Pica séricá"


def test_fishnet_csv_with_boxes(tmp_path):
    table, boxes = make_fishnet(tmp_path)
    images, lineages, _ = load_data(str(table), size=32, boxes=str(boxes))
    assert len(images) == 24 and (None, None) + CORAX[2:] in lineages  # URL prefixes stripped: nothing missing
    assert all(len(lin[6].split()) == 2 for lin in lineages)  # epithets became binomials
    s, lineage, traits = species()[0]
    i = lineages.index((None, None) + lineage[2:])
    toy = np.asarray(toy_image(s, traits, 0)).transpose(2, 0, 1).astype(float)
    assert np.abs(np.asarray(images[i], float) - toy).mean() < 8  # the box crops the animal out of the canvas
    uncropped, _, _ = load_data(str(table), size=32)
    assert np.abs(np.asarray(uncropped[i], float) - toy).mean() > 20


def test_bioscan_tsv_is_padded_white(tmp_path):
    table, image_root = make_bioscan(tmp_path)
    images, lineages, _ = load_data(str(table), size=16, image_root=str(image_root))
    assert len(images) == 24 and (None, None) + CORAX[2:] in lineages
    assert all(lin[:2] == (None, None) for lin in lineages)  # no kingdom or phylum column: those ranks are absent
    images = np.asarray(images)
    assert (images[:, :, 0] > 235).all() and (images[:, :, -1] > 235).all()  # 32x20 padded to a square
    assert images[:, :, 8].mean() < 200


def test_inat_json_and_folder_names_agree(tmp_path):
    table = make_inat_json(tmp_path)
    _, from_json, _ = load_data(str(table), size=8)
    _, from_folders, wheres = load_data(str(tmp_path / "train"), size=8)  # auto-detected as iNat folders
    assert CORAX in from_json and sorted(from_json) == sorted(from_folders)
    assert wheres[0].endswith(inat_folder_name(0, species()[0][1]))


def test_generic_csv_mapping_gaps_and_empty_rank(tmp_path):
    for name in "abcd":
        png(tmp_path / f"{name}.png")
    rows = [["file", "Scientific Name", "genus", "family", "ORDER"],
            ["a.png", "Corvus corax", "Corvus", "", "Passeriformes"],
            ["b.png", "Corvus corone", "Corvus", "", "Passeriformes"],
            ["c.png", "Strix aluco", "", "", "Strigiformes"],  # a gap: genus unknown
            ["d.png", "NA", "Tyto", "", "Strigiformes"]]  # species unknown
    table = write_csv(tmp_path / "mine.csv", rows)
    _, lineages, wheres = load_data(str(table), size=8, columns="image=file, species=Scientific Name")
    tax, _ = build_taxonomy(lineages, wheres)
    assert tax.size(RANKS.index("family")) == 0  # an empty column: the rank is absent
    assert tax.lineage_str(tax.parse("Strix aluco")) == "Strigiformes/Strix aluco"
    assert RANKS.index("family") not in tax.stage_ranks()
    assert wheres[2] == "mine.csv row 4"


# -----------------------------------------------------------------------------
# Bad input: a clear message, nothing lost


def test_missing_and_unreadable_files_are_skipped_and_counted(tmp_path, capsys):
    make_folder_tree(tmp_path / "tree")
    add_broken(tmp_path / "tree/Aves/Passeriformes/Corvidae/Corvus/Corvus corax")
    images, lineages, _ = load_data(str(tmp_path / "tree"), size=8)
    assert len(images) == len(lineages) == 24
    assert "skipped 2 of 26 images: 0 missing, 2 unreadable; first: " in capsys.readouterr().out

    table, boxes = make_fishnet(tmp_path / "fish")
    os.remove(tmp_path / "fish/Corvus/Corvus_corax_1.jpg")
    add_broken(tmp_path / "fish/Corvus")
    with open(table, "a", newline="") as f:
        csv.writer(f).writerows([["broken.jpg", "Corvus", *CORAX[2:]], ["truncated.jpg", "Corvus", *CORAX[2:]]])
    images, _, _ = load_data(str(table), size=8, boxes=str(boxes))
    assert len(images) == 23
    out = capsys.readouterr().out
    assert "skipped 3 of 26 images: 1 missing, 2 unreadable; first: " in out and "Corvus_corax_1.jpg (missing)" in out


def test_a_misspelled_column_an_unclosed_quote_and_a_list_of_boxes_are_one_line(tmp_path):
    png(tmp_path / "a.png")
    rows = [["image", "genus", "scientific_name"]] + [[f"{i}.png", "Corvus", "Corvus corax"] for i in range(5)]
    table = write_csv(tmp_path / "t.csv", rows)
    with pytest.raises(DataError, match=r"t.csv: missing column\(s\) scientific_nam; found: image, genus, "
                                        r"scientific_name; expected: image, kingdom/.*\(map yours with --columns\)$"):
        read_items(table, columns="species=scientific_nam")  # would have dropped the species rank silently
    table.write_text('image,genus,species\n0.png,Corvus,"corax\n1.png,Corvus,corone\n2.png,Corvus,frugilegus\n')
    with pytest.raises(DataError, match=r"^t.csv lines 2-4: one cell runs over them, from an unclosed quote \(\"\); "
                                        r"close it or remove it$"):
        read_items(table)  # would have read one row whose species is the rest of the file
    table.write_text('image,genus,species\n0.png,Corvus,"corax' + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"t.csv: cannot parse it as CSV \(field larger than field limit"):
        read_items(table)
    boxes = tmp_path / "boxes.json"
    boxes.write_text('[{"image": "0.png", "x": 0, "y": 0, "w": 4, "h": 4}]')
    write_csv(table, rows)
    with pytest.raises(DataError, match=r"boxes.json: expected a JSON object \{file stem: \{x, y, w, h\}\}, "
                                        r"found a list$"):
        read_items(table, "csv", boxes=str(boxes))


def test_nothing_readable_is_an_error_naming_the_path(tmp_path):
    add_broken(tmp_path / "Corvidae/Corvus/Corvus corax")
    with pytest.raises(DataError, match=f"{tmp_path}: no images to train on .skipped 2 of 2"):
        load_data(str(tmp_path), size=8)
    write_csv(tmp_path / "empty.csv", [["image", "species"]])
    with pytest.raises(DataError, match="empty.csv: no images to train on .it lists none"):
        load_data(str(tmp_path / "empty.csv"))


def test_taxon_under_two_parents_names_both_rows(tmp_path, capsys):
    png(tmp_path / "a.png")
    table = write_csv(tmp_path / "t.csv", [["image", "family", "genus", "species"],
                                            ["a.png", "Corvidae", "Corvus", "Corvus corax"],
                                            ["a.png", "Corvidae", "Corvus", "Corvus corone"],
                                            ["a.png", "Paridae", "Corvus", "Corvus corone"],
                                            ["a.png", "Paridae", "Parus", "Parus major"]])
    _, lineages, wheres = load_data(str(table), size=8)
    with pytest.raises(DataError, match=r"genus 'Corvus' is placed under both family 'Corvidae' \(t.csv row 2\) "
                                        r"and family 'Paridae' \(t.csv row 4\);.*--conflicts keep-first"):
        build_taxonomy(lineages, wheres)
    tax, fixed = build_taxonomy(lineages, wheres, keep_first=True)
    assert "warning: 1 taxa placed under two parents; kept the first parent, which relabels 1 images" \
        in capsys.readouterr().out
    assert fixed[2] == fixed[1] and tax.lineage_str(tax.parse("Parus major")) == "Paridae/Parus/Parus major"
    TaxonDataset(np.zeros((4, 3, 8, 8), np.uint8), fixed, tax)  # the fixed lineages fit the tree


def test_table_without_a_required_column_lists_found_and_expected(tmp_path):
    table, _ = make_bioscan(tmp_path)
    rows = [row[:1] + row[2:] for row in csv.reader(open(table), delimiter="\t")]  # drop chunk_number
    write_csv(table, rows, delimiter="\t")
    with pytest.raises(DataError, match="metadata.tsv: missing column.s. chunk_number; found: image_file, sampleid, "
                                        "class, order, family, genus, species; expected: image_file, chunk_number,"):
        read_items(table)  # still read as BIOSCAN: it has image_file
    write_csv(tmp_path / "x.csv", [["path", "name"], ["a.png", "Corvus corax"]])
    with pytest.raises(DataError, match="missing column.s. image; found: path, name; expected: image, kingdom/phylum/"):
        read_items(tmp_path / "x.csv")


def test_malformed_json_names_file_and_position(tmp_path):
    (tmp_path / "train.json").write_text('{"images": [],\n "annotations": [} ')
    with pytest.raises(DataError, match="train.json: malformed JSON at line 2 column 18"):
        read_items(tmp_path / "train.json")
    (tmp_path / "train.json").write_text('{"images": []}')
    with pytest.raises(DataError, match="train.json: not iNaturalist JSON .'categories' is missing"):
        read_items(tmp_path / "train.json")
    (tmp_path / "train.json").write_text('{"images": [], "annotations": [], "categories": [["id", 1]]}')
    with pytest.raises(DataError, match=r"train.json: not iNaturalist JSON \(a field holds the wrong kind of value\); "):
        read_items(tmp_path / "train.json")
    with pytest.raises(DataError, match="nope.csv: no such file or folder"):
        read_items(tmp_path / "nope.csv")


# -----------------------------------------------------------------------------
# The cache of decoded images


def test_cache_is_reused_and_invalidated(tmp_path, monkeypatch, capsys):
    root, out = make_folder_tree(tmp_path / "tree", per_species=1), str(tmp_path / "out")
    first, lineages, _ = load_data(str(root), size=8, cache_dir=out)
    assert "decoded once" in capsys.readouterr().out

    def no_decoding(*args):
        raise AssertionError("decoded again")
    monkeypatch.setattr(readers, "load_image", no_decoding)
    again, lineages2, _ = load_data(str(root), size=8, cache_dir=out)
    assert "cached" in capsys.readouterr().out
    assert np.array_equal(first, again) and lineages == lineages2
    monkeypatch.undo()

    png(root / "Aves/Passeriformes/Corvidae/Corvus/Corvus corax/0.png", value=7, size=(8, 8))  # a file changes
    changed, _, _ = load_data(str(root), size=8, cache_dir=out)
    assert "decoded once" in capsys.readouterr().out and not np.array_equal(first, changed)
    assert (changed[lineages.index((None, None) + CORAX[2:])] == 7).all()
    assert len(list((tmp_path / "out").glob("images-8px-*.npy"))) == 1  # the outdated cache is gone
    load_data(str(root), size=16, cache_dir=out)  # another size: decoded again
    assert "decoded once" in capsys.readouterr().out


def test_a_cached_run_keeps_each_image_with_its_row_when_rows_without_files_come_and_go(tmp_path, capsys):
    # a.png, an unreadable b.png and c.png: the cache must not remember b by its row number, which a row
    # added above it (its file missing: the key hashes only present files) would shift onto a's image
    png(tmp_path / "a.png", value=10)
    (tmp_path / "b.png").write_text("not an image")
    png(tmp_path / "c.png", value=200)
    rows = [["image", "genus", "species"], ["a.png", "Ga", "alpha"], ["b.png", "Gb", "beta"], ["c.png", "Gc", "gamma"]]
    out = str(tmp_path / "out")
    for table in (rows, rows[:1] + [["gone.png", "Gz", "zeta"]] + rows[1:]):  # decoded, then read from the cache
        images, lineages, _ = load_data(str(write_csv(tmp_path / "t.csv", table)), size=8, cache_dir=out)
        assert [(lin[-1], int(im.max())) for lin, im in zip(lineages, images)] == [("Ga alpha", 10), ("Gc gamma", 200)]
    assert "cached" in capsys.readouterr().out
    # the cache's array deleted by hand (its .json kept): decoded again, not a FileNotFoundError
    for f in (tmp_path / "out").glob("images-8px-*.npy"):
        f.unlink()
    images, _, _ = load_data(str(write_csv(tmp_path / "t.csv", rows)), size=8, cache_dir=out)
    assert [int(im.max()) for im in images] == [10, 200] and "decoded once" in capsys.readouterr().out


def test_a_decode_that_was_interrupted_leaves_no_temporary_behind(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f"images-8px-0123456789abcdef.{int(dead.stdout)}.tmp.npy"  # a pid that has exited
    live = folder / f"images-8px-0123456789abcdef.{os.getpid()}.tmp.npy"  # a decode in progress
    stale.write_bytes(b"half")
    live.write_bytes(b"half")
    readers.remove_stale_temporaries(folder, 8)
    assert not stale.exists() and live.exists()


def test_with_several_processes_process_0_decodes_and_the_others_read_its_cache(tmp_path, monkeypatch):
    """Two processes decoding into one cache raced (one deleted the file the other had just written): process 0
    decodes, then the barrier; the others wait at the barrier, then read the cache without decoding."""
    root = make_folder_tree(tmp_path / "tree", per_species=1)
    cfg = train.TrainConfig(data=str(root), image_size=8, out=str(tmp_path / "out"), level="order", workers=0,
                            batch_size=4)
    events = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda: events.append("barrier"))
    decode = readers.load_image
    monkeypatch.setattr(readers, "load_image", lambda *a: events.append("decode") or decode(*a))
    train.load_dataset(cfg, rank=0, world=2)
    assert events[-1] == "barrier" and events.count("barrier") == 1 and events.count("decode") > 1
    events.clear()
    train.load_dataset(cfg, rank=1, world=2)
    assert events == ["barrier"]  # waited first, then read process 0's cache: nothing decoded
    events.clear()
    train.load_dataset(cfg)  # one process: no barrier
    assert "barrier" not in events


# -----------------------------------------------------------------------------
# Two stages train end to end from each format

FORMAT_ARGV = argv(replace(TINY, level="order", steps=2, batch_size=4, grid_cols=1, grid_steps=1, workers=0))


def fixture_args(fmt, root):
    if fmt == "folder":  # with two broken files: the run skips them and still trains
        make_folder_tree(root)
        add_broken(root / "Insecta/Coleoptera/Carabidae/Carabus/Carabus auratus")
        return ["--data", str(root), "--workers", "2"]
    if fmt == "fishnet":
        table, boxes = make_fishnet(root)
        return ["--data", str(table), "--boxes", str(boxes)]
    if fmt == "bioscan":
        table, image_root = make_bioscan(root)
        return ["--data", str(table), "--image-root", str(image_root)]
    return ["--data", str(make_inat_json(root))]


@pytest.mark.parametrize("fmt", ["folder", "fishnet", "bioscan", "inat-json"])
def test_two_stages_train_from_each_format(tmp_path, fmt, capsys, one_thread):
    out = tmp_path / "out"
    train.main(train.parse_args(FORMAT_ARGV + ["--out", str(out)] + fixture_args(fmt, tmp_path / "data")))
    log = capsys.readouterr().out
    assert ("data: 24 images, 12 species; schedule progressive: class (2 steps) -> order (2 steps, the last 1 cooling "
            "down)") in log
    for level in ["class", "order"]:
        ckpt = torch.load(out / f"{level}.pt", weights_only=True)
        assert ckpt["train_config"]["data"].startswith(str(tmp_path)) and len(ckpt["lineages"]) == 12
    assert ("skipped 2 of 26 images" in log) == (fmt == "folder")


def test_bad_data_ends_train_py_in_one_line(tmp_path):
    write_csv(tmp_path / "bad.csv", [["file", "species"], ["a.png", "Corvus corax"]])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "class.pt").write_bytes(b"earlier work")
    proc = subprocess.run([sys.executable, os.path.abspath(train.__file__), "--data", "bad.csv", "--out", "out"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: bad.csv: missing")
    assert (tmp_path / "out" / "class.pt").read_bytes() == b"earlier work"  # nothing already written is lost


def test_missing_data_is_one_line(tmp_path):
    """--data is read at run time: a missing one ends before any training, in one line."""
    with pytest.raises(SystemExit) as exit:
        train.main(replace(TINY, data="/nonexistent/taxa/data", out=str(tmp_path)))
    assert str(exit.value) == "error: --data /nonexistent/taxa/data: no such file or folder"
