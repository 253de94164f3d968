"""
Small datasets in each format taxonomy.py reads, drawn from the toy tree of life.

Used by tests/test_readers.py and tests/benchmarks/loader.py. Each maker writes into a
folder and returns what --data (and the other flags) should point at. By default a
dataset holds every 4th toy species: 12 species in 6 orders of 3 classes.
"""
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from taxonomy import render_toy, toy_species  # noqa: E402


def species(step=4):
    """[(index, lineage names, traits)] of every step-th toy species."""
    return [(s, lineage, traits) for s, (lineage, traits) in enumerate(toy_species()) if s % step == 0]


def toy_image(s, traits, k, size=32, upscale=1):
    """Toy image k of species s as a PIL image, drawn at size and upscaled by `upscale`."""
    img = Image.fromarray(render_toy(traits, np.random.default_rng([0, s, k]), size))
    return img.resize((size * upscale,) * 2, Image.BICUBIC) if upscale > 1 else img


def save(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=90)  # quality is used by JPEG only


def add_broken(folder):
    """A file that is no image and a JPEG cut in half: both must be skipped as unreadable."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    whole = folder / "whole.tmp.jpg"
    save(Image.fromarray(np.full((64, 64, 3), 90, np.uint8)), whole)
    (folder / "truncated.jpg").write_bytes(whole.read_bytes()[:300])
    whole.unlink()


def make_folder_tree(root, per_species=2, start=2, ext=".png", upscale=1, step=4):
    """root/Aves/Passeriformes/Corvidae/Corvus/Corvus corax/0.png (from class down, by default)."""
    root = Path(root)
    for s, lineage, traits in species(step):
        for k in range(per_species):
            save(toy_image(s, traits, k, upscale=upscale), root.joinpath(*lineage[start:]) / f"{k}{ext}")
    return root


def make_fishnet(root, per_species=2):
    """FishNet layout: fishnet.csv (image, Folder, Class, ..., species) + <Folder>/<image> + bbox.json.

    Each toy animal sits at a random place on a larger grey canvas; its box in bbox.json crops it out.
    The first image of each species is named by a FishBase URL; every other species gives its epithet only.
    """
    root, rows, boxes = Path(root), [], {}
    rng = np.random.default_rng(0)
    for s, lineage, traits in species():
        genus, binomial = lineage[5], lineage[6]
        for k in range(per_species):
            name = f"{binomial.replace(' ', '_')}_{k}.jpg"
            x, y = (int(v) for v in rng.integers(0, 24, 2))
            canvas = Image.new("RGB", (64, 56), (128, 128, 128))
            canvas.paste(toy_image(s, traits, k), (x, y))
            save(canvas, root / genus / name)
            boxes[name[:-4]] = {"x": x, "y": y, "w": 32, "h": 32}
            image = f"https://www.fishbase.se/images/species/{name}" if k == 0 else name
            rows.append([image, genus, *lineage[2:6], binomial if s % 8 else binomial.split()[1]])
    with open(root / "fishnet.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "Folder", "Class", "Order", "Family", "Genus", "species"], *rows])
    (root / "bbox.json").write_text(json.dumps(boxes))
    return root / "fishnet.csv", root / "bbox.json"


def make_bioscan(root, per_species=2):
    """BIOSCAN-1M layout: metadata.tsv + images/part{chunk}/<image_file>, images wider than tall (to pad)."""
    root, rows = Path(root), []
    for s, lineage, traits in species():
        for k in range(per_species):
            name, chunk = f"{s:03d}_{k}.jpg", 1 + (s + k) % 3
            save(toy_image(s, traits, k).crop((0, 6, 32, 26)), root / "images" / f"part{chunk}" / name)  # 32x20
            rows.append([name, chunk, f"BIOUG{s:03d}{k}", *lineage[2:7]])
    with open(root / "metadata.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows(
            [["image_file", "chunk_number", "sampleid", "class", "order", "family", "genus", "species"], *rows])
    return root / "metadata.tsv", root / "images"


def inat_folder_name(c, lineage):
    genus, epithet = lineage[6].split(" ", 1)
    return f"{c:05d}_" + "_".join(lineage[:6]) + f"_{epithet}"


def make_inat_json(root, per_species=2):
    """iNaturalist 2021 layout: train.json (images, annotations, categories) + train/<folder>/<file>.jpg."""
    root, meta = Path(root), {"images": [], "annotations": [], "categories": []}
    for c, (s, lineage, traits) in enumerate(species()):
        folder = inat_folder_name(c, lineage)
        meta["categories"].append({"id": c, "name": lineage[6], "image_dir_name": folder,
                                   **dict(zip(["kingdom", "phylum", "class", "order", "family", "genus"], lineage)),
                                   "specific_epithet": lineage[6].split(" ", 1)[1]})
        for k in range(per_species):
            file_name = f"train/{folder}/{s:03d}-{k}.jpg"
            save(toy_image(s, traits, k), root / file_name)
            meta["images"].append({"id": len(meta["images"]), "file_name": file_name, "width": 32, "height": 32})
            meta["annotations"].append({"id": k, "image_id": meta["images"][-1]["id"], "category_id": c})
    (root / "train.json").write_text(json.dumps(meta))
    return root / "train.json"


def make_jpeg_tree(root, n_images, size=256):
    """A folder tree of about n_images JPEGs of size x size over all 48 toy species (for the benchmark)."""
    per_species = max(1, round(n_images / 48))
    make_folder_tree(root, per_species, ext=".jpg", upscale=size // 32, step=1)
    return per_species * 48


if __name__ == "__main__":  # write every fixture into one folder, to look at or to train on
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/fixtures")
    print(make_folder_tree(out / "tree"), make_fishnet(out / "fishnet"), make_bioscan(out / "bioscan"),
          make_inat_json(out / "inat"), sep="\n")
