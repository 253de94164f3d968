"""
The data side of TaxaDiffusion: ranks, the taxonomy tree, lineage parsing,
the built-in toy tree of life and the dataset the training loop reads; after a
banner, the readers of real data (folder trees, CSV/TSV tables such as FishNet
and BIOSCAN-1M, iNaturalist 2021) and their image cache, which a first read skips.

Nothing here knows about the network. A lineage becomes a row of integer ids,
one per rank (0 = unknown), and that is all the model ever sees.

    python taxonomy.py            # prints the toy tree and writes out/toy_tree.png

Read next: unet.py (the network), then model.py (diffusion + conditioning).
"""
import colorsys
import csv
import difflib
import hashlib
import json
import math
import os
import re
import stat
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
UNKNOWN = "<unknown>"  # id 0 at every rank
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def normalize(name):
    """Matching key for a taxon name: case-insensitive, '_' reads as a space, accents in one Unicode form."""
    return " ".join(unicodedata.normalize("NFC", name).replace("_", " ").split()).casefold()


class LineageError(ValueError):
    """A lineage that does not fit the tree; the message says how to fix it."""

    def __init__(self, message, node=None):
        super().__init__(message)
        self.node = node  # (rank, id) of the taxon that would get a second parent, if that is the problem


# -----------------------------------------------------------------------------
# The taxonomy tree


class Taxonomy:
    """A tree of names, one vocabulary per rank; built from full lineages.

    A lineage is a tuple of len(RANKS) names, None where the rank is unknown.
    vocab[r][i] is the name with id i at rank r; vocab[r][0] is UNKNOWN.
    """

    def __init__(self, lineages):
        self.vocab = [[UNKNOWN] for _ in RANKS]
        self.index = [{} for _ in RANKS]  # normalized name -> id, per rank
        self.parent = [{} for _ in RANKS]  # id -> (rank, id) of the nearest known ancestor
        self.where = {}  # (rank, id) -> where the taxon was first read ("train.csv row 7"), for error messages
        for lineage in lineages:
            self.add(lineage)

    def add(self, lineage, where=None):
        """Insert a lineage; returns its ids. A taxon under two parents is an error naming both places.

        An empty rank is unknown, not absent: Aves/Passeriformes/-/Corvus and Aves/Passeriformes/Corvidae/Corvus
        agree, and Corvus's parent is the more precise of the two (Corvidae), whichever came first.
        A lineage that conflicts inserts nothing, so the caller may skip or fix it and go on.
        """
        assert len(lineage) == len(RANKS), f"a lineage has {len(RANKS)} ranks, got {lineage}"
        ids, above, new, moved = [], None, [], []  # above = (rank, id) of the nearest known ancestor
        pending = {}  # (rank, id) -> parent, of the taxa this lineage adds

        def is_above(a, node):  # a (None = the root) is a proper ancestor of node
            while node is not None:
                node = pending[node] if node in pending else self.parent[node[0]][node[1]]
                if node == a:
                    return True
            return a is None
        for r, name in enumerate(lineage):
            if not name:
                ids.append(0)
                continue
            i = self.index[r].get(normalize(name))
            if i is None:
                i = len(self.vocab[r])  # a new taxon, inserted once the whole lineage has been checked
                new.append((r, i, name, above))
                pending[r, i] = above
            elif self.parent[r][i] != above and is_above(above, self.parent[r][i]):
                pass  # this lineage leaves a rank empty that the tree knows: the same parent, less precisely
            elif self.parent[r][i] != above and is_above(self.parent[r][i], above):
                moved.append((r, i, above))  # the tree had it under a gap that this lineage fills in
            elif self.parent[r][i] != above:
                first = self.describe(self.parent[r][i]) + (f" ({self.where[r, i]})" if (r, i) in self.where else "")
                again = f"{RANKS[above[0]]} '{lineage[above[0]]}'" if above else "the root"
                again += f" ({where})" if where else ""
                raise LineageError(f"{RANKS[r]} '{name}' is placed under both {first} and {again}; "
                                   "fix the data so each taxon has one parent", node=(r, i))
            ids.append(i)
            above = (r, i)
        for r, i, name, parent in new:
            self.vocab[r].append(name)
            self.index[r][normalize(name)] = i
            self.parent[r][i] = parent
            if where:
                self.where[(r, i)] = where
        for r, i, parent in moved:
            self.parent[r][i] = parent
        return ids

    def describe(self, node):
        return "the root" if node is None else f"{RANKS[node[0]]} '{self.vocab[node[0]][node[1]]}'"

    def ancestors(self, r, i):
        """Ids of the full lineage that ends at taxon i of rank r (0 below r)."""
        ids = [0] * len(RANKS)
        node = (r, i)
        while node is not None:
            ids[node[0]] = node[1]
            node = self.parent[node[0]][node[1]]
        return ids

    def children(self, node):
        """(rank, id) of the taxa whose nearest known ancestor is node (None = root)."""
        return [(r, i) for r in range(len(RANKS)) for i, p in self.parent[r].items() if p == node]

    def size(self, r):
        return len(self.vocab[r]) - 1

    def lineage_str(self, ids):
        return "/".join(self.vocab[r][i] for r, i in enumerate(ids) if i)

    def parse(self, text):
        """'Aves/Passeriformes/...' -> ids per rank (0 = unspecified).

        Names may start at any rank; '...' or a missing tail means "unspecified
        below"; each name must lie under the one before it. The deepest name
        fixes the whole lineage above it.
        """
        names = [n.strip() for n in text.strip().split("/")]
        while names and names[-1] in ("", "...", "…"):
            names.pop()
        if not names or any(n in ("", "...", "…") for n in names):
            raise LineageError(f"cannot read lineage '{text}': write names from coarse to fine, "
                               "separated by '/', e.g. 'Aves/Passeriformes/...'")
        node, start = None, 0  # node = (rank, id) of the last name matched
        for name in names:
            key = normalize(name)
            hits = [(r, self.index[r][key]) for r in range(start, len(RANKS)) if key in self.index[r]]
            if not hits:
                raise LineageError(self._unknown(name, node, start))
            r, i = hits[0]
            lineage = self.ancestors(r, i)
            if node is not None and lineage[node[0]] != node[1]:
                raise LineageError(
                    f"{RANKS[r]} '{self.vocab[r][i]}' is not under {self.describe(node)}: its "
                    f"{RANKS[node[0]]} is '{self.vocab[node[0]][lineage[node[0]]] if lineage[node[0]] else '?'}'"
                    f" (write '{self.lineage_str(lineage)}')")
            node, start = (r, i), r + 1
        return self.ancestors(*node)

    def _unknown(self, name, node, start):
        # suggest first among the children of the previous name, then anywhere
        near = [self.vocab[r][i] for r, i in self.children(node)] if node else []
        everywhere = [n for r in range(start, len(RANKS)) for n in self.vocab[r][1:]]
        guesses = difflib.get_close_matches(name, near, n=3, cutoff=0.6) or \
            difflib.get_close_matches(name, everywhere, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(g) for g in guesses)}?" if guesses else \
            "see `python sample.py --list` for the names in this checkpoint"
        where = f" under {self.describe(node)}" if node else ""
        return f"unknown taxon '{name}'{where}: {hint}"

    def lineages(self):
        """Every leaf-to-root lineage as names: the plain-data form saved in checkpoints."""
        internal = {p for r in range(len(RANKS)) for p in self.parent[r].values() if p}
        return [[self.vocab[q][j] if j else None for q, j in enumerate(self.ancestors(r, i))]
                for r in range(len(RANKS)) for i in range(1, len(self.vocab[r]))
                if (r, i) not in internal]

    def stage_ranks(self):
        """Ranks worth a training stage: those that split some taxon into several.

        A rank with a single taxon (one kingdom) adds nothing to learn and is
        folded into the first stage that does.
        """
        stages, prev = [], 1
        for r in range(len(RANKS)):
            if self.size(r) > prev:
                stages.append(r)
            prev = max(prev, self.size(r))
        return stages

    def print_tree(self, node=None, depth=0):
        for r, i in self.children(node):
            print("  " * depth + f"{self.vocab[r][i]}  ({RANKS[r]})")
            self.print_tree((r, i), depth + 1)


# -----------------------------------------------------------------------------
# The built-in toy tree of life
#
# 3 classes x 2 orders x 2 families x 2 genera x 2 species = 48 real species.
# Each rank carries one visual trait, the way morphology follows ancestry:
#   class   -> body plan (bird, fish, insect silhouette)
#   order   -> hue of the body
#   family  -> pattern type on the body (stripes or spots)
#   genus   -> pattern colour (dark or light)
#   species -> colour of a small accent part (tail, tail fin, head): black or white

TOY_TREE = {
    ("Chordata", "Aves"): {
        "Passeriformes": {"Corvidae": {"Corvus": ["corax", "corone"], "Pica": ["pica", "serica"]},
                          "Paridae": {"Parus": ["major", "minor"], "Poecile": ["atricapillus", "palustris"]}},
        "Strigiformes": {"Strigidae": {"Bubo": ["bubo", "virginianus"], "Strix": ["aluco", "varia"]},
                         "Tytonidae": {"Tyto": ["alba", "furcata"], "Phodilus": ["badius", "assimilis"]}},
    },
    ("Chordata", "Actinopterygii"): {
        "Cypriniformes": {"Cyprinidae": {"Cyprinus": ["carpio", "rubrofuscus"], "Carassius": ["auratus", "carassius"]},
                          "Cobitidae": {"Cobitis": ["taenia", "elongata"], "Misgurnus": ["anguillicaudatus", "fossilis"]}},
        "Tetraodontiformes": {"Tetraodontidae": {"Tetraodon": ["mbu", "lineatus"], "Takifugu": ["rubripes", "niphobles"]},
                              "Balistidae": {"Balistes": ["capriscus", "vetula"], "Rhinecanthus": ["aculeatus", "rectangulus"]}},
    },
    ("Arthropoda", "Insecta"): {
        "Lepidoptera": {"Papilionidae": {"Papilio": ["machaon", "glaucus"], "Parnassius": ["apollo", "mnemosyne"]},
                        "Nymphalidae": {"Vanessa": ["atalanta", "cardui"], "Danaus": ["plexippus", "chrysippus"]}},
        "Coleoptera": {"Coccinellidae": {"Coccinella": ["septempunctata", "magnifica"], "Harmonia": ["axyridis", "quadripunctata"]},
                       "Carabidae": {"Carabus": ["auratus", "nemoralis"], "Calosoma": ["sycophanta", "scrutator"]}},
    },
}


def toy_species():
    """[(lineage names, traits)] for the 48 toy species, in a fixed order.

    traits = (class index, order index, family, genus, species) where the last
    three are the position (0/1) of the taxon among its siblings.
    """
    out, n_order = [], 0
    for c, ((phylum, cls), orders) in enumerate(TOY_TREE.items()):
        for order, families in orders.items():
            for f, (family, genera) in enumerate(families.items()):
                for g, (genus, epithets) in enumerate(genera.items()):
                    for s, epithet in enumerate(epithets):
                        lineage = ("Animalia", phylum, cls, order, family, genus, f"{genus} {epithet}")
                        out.append((lineage, (c, n_order, f, g, s)))
            n_order += 1
    return out


def _in_triangle(u, v, a, b, c):
    """Boolean mask of points (u, v) inside triangle abc (any winding)."""
    def side(p, q):
        return (u - q[0]) * (p[1] - q[1]) - (p[0] - q[0]) * (v - q[1])
    d1, d2, d3 = side(a, b), side(b, c), side(c, a)
    return ~(((d1 < 0) | (d2 < 0) | (d3 < 0)) & ((d1 > 0) | (d2 > 0) | (d3 > 0)))


def _ellipse(u, v, cu, cv, ru, rv):
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1


def _near_segment(u, v, a, b, width):
    pu, pv, du, dv = u - a[0], v - a[1], b[0] - a[0], b[1] - a[1]
    t = np.clip((pu * du + pv * dv) / (du * du + dv * dv), 0, 1)
    return (pu - t * du) ** 2 + (pv - t * dv) ** 2 <= width ** 2


def render_toy(traits, rng, size=32, supersample=4):
    """Draw one toy animal as a (size, size, 3) uint8 image.

    Shapes are drawn as hard masks at supersample x the size and averaged down,
    which anti-aliases the edges. rng sets the pose and background.
    """
    cls, order, family, genus, species = traits
    n = size * supersample
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n * 2 - 1  # pixel centres in [-1, 1], (n, n) each

    # pose: where the animal sits, how big, tilted, facing left or right
    cx, cy = rng.uniform(-0.15, 0.15, 2)
    scale = rng.uniform(0.55, 0.72)
    theta = rng.uniform(-0.35, 0.35)
    flip = rng.choice([-1.0, 1.0])
    u = ((x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)) / scale * flip  # body frame, facing +u
    v = (-(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)) / scale

    # colours: background is a muted random colour, the body's hue is the order's
    bg = colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.25), rng.uniform(0.45, 0.75))
    hue = (order / 6 + rng.normal(0, 0.01)) % 1.0
    body = np.array(colorsys.hsv_to_rgb(hue, 0.75, 0.85))
    pattern_colour = body * 0.3 if genus == 0 else body * 0.25 + 0.75  # dark or light
    accent = np.array([0.08, 0.08, 0.08]) if species == 0 else np.array([0.97, 0.97, 0.97])
    dark = np.array([0.1, 0.1, 0.1])

    if cls == 0:  # bird: body, head, beak, tail (accent), eye
        body_mask = _ellipse(u, v, 0.0, 0.1, 0.5, 0.32) | _ellipse(u, v, 0.45, -0.25, 0.24, 0.24)
        accent_mask = _in_triangle(u, v, (-0.35, 0.05), (-0.9, -0.15), (-0.9, 0.3))
        extra = [(_in_triangle(u, v, (0.62, -0.33), (0.62, -0.17), (0.9, -0.25)), np.array([0.95, 0.7, 0.1])),
                 (_ellipse(u, v, 0.52, -0.3, 0.07, 0.07), dark)]
    elif cls == 1:  # fish: body, tail fin (accent), dorsal fin, eye
        body_mask = _ellipse(u, v, 0.08, 0.0, 0.6, 0.34)
        accent_mask = _in_triangle(u, v, (-0.42, 0.0), (-0.9, -0.35), (-0.9, 0.35))
        extra = [(_in_triangle(u, v, (-0.15, -0.3), (0.2, -0.3), (-0.2, -0.55)), body * 0.6),
                 (_ellipse(u, v, 0.45, -0.07, 0.07, 0.07), dark)]
    else:  # insect: wings and abdomen (body), thorax, head (accent), antennae
        body_mask = (_ellipse(u, v, -0.05, -0.38, 0.38, 0.26) | _ellipse(u, v, -0.05, 0.38, 0.38, 0.26)
                     | _ellipse(u, v, -0.4, 0.0, 0.4, 0.16))
        accent_mask = _ellipse(u, v, 0.42, 0.0, 0.16, 0.16)
        extra = [(_ellipse(u, v, 0.15, 0.0, 0.18, 0.15), dark),
                 (_near_segment(u, v, (0.5, -0.05), (0.85, -0.35), 0.035)
                  | _near_segment(u, v, (0.5, 0.05), (0.85, 0.35), 0.035), dark)]

    # family -> pattern type drawn on the body, in the body frame
    if family == 0:
        pattern = np.sin(u * 14.0) > 0.35  # stripes across the body
    else:
        pattern = ((u * 3.5) % 1 - 0.5) ** 2 + ((v * 3.5) % 1 - 0.5) ** 2 < 0.09  # spots

    img = np.empty((n, n, 3))
    img[:] = bg
    img[body_mask] = body
    img[body_mask & pattern] = pattern_colour
    img[accent_mask] = accent
    for mask, colour in extra:
        img[mask] = colour
    img = img.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))  # (size, size, 3)
    return (img * 255 + 0.5).clip(0, 255).astype(np.uint8)


def species_counts(per_species, seed=0):
    """Training images of each toy species (in toy_species() order) for a --per-species value.

    "64" gives every species 64 images. Real data has a long tail, which is where sharing
    ancestors should matter most, so two skewed trees are built in, deterministic in the seed:
    "pairs:64/4"  in every genus one sibling gets 64 images and the other 4 (which one is the seed's pick);
    "zipf:64"     species ranked in a seeded order get 64 / rank images (64, 32, 21, ..., at least 1).
    """
    spec, n = str(per_species), len(toy_species())
    # The tree's own stream. numpy pads a seed with zeros, so [seed, 7] is also the stream of species 7's
    # first image, [seed, 7, 0]: one image's pose tied to the coin flips, harmless, and kept so that the
    # long-tailed trees of the committed claims grid stay the same.
    rng = np.random.default_rng([seed, 7])
    if re.fullmatch(r"\d+", spec):
        return [int(spec)] * n
    if m := re.fullmatch(r"pairs:(\d+)/(\d+)", spec):
        rich, rare = int(m[1]), int(m[2])
        rare_first = rng.integers(0, 2, n // 2)  # per genus: is its first species the rare one?
        return [rare if s % 2 == rare_first[s // 2] else rich for s in range(n)]
    if (m := re.fullmatch(r"zipf:(\d+)", spec)) and int(m[1]) > 0:
        rank = rng.permutation(n) + 1  # species s is the rank[s]-th most common
        return [max(1, round(int(m[1]) / r)) for r in rank]
    raise ValueError(f"--per-species '{spec}' is not a count (64), pairs:RICH/RARE (pairs:64/4) or zipf:MAX (zipf:64)")


def toy_dataset(per_species=64, size=32, seed=0):
    """Render the toy tree: (images uint8 (N, 3, size, size), lineages as names).
    per_species: images of every species, or a long-tailed tree (see species_counts)."""
    images, lineages = [], []
    for s, ((lineage, traits), count) in enumerate(zip(toy_species(), species_counts(per_species, seed))):
        for k in range(count):
            rng = np.random.default_rng([seed, s, k])  # deterministic in (seed, species, index)
            images.append(render_toy(traits, rng, size))
            lineages.append(lineage)
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return images, lineages


# -----------------------------------------------------------------------------
# The dataset the training loop reads, from the toy tree or from real data


class TaxonDataset(torch.utils.data.Dataset):
    """(image in [-1, 1] as (3, H, W) float, or a latent (C, h, w) as it is; ids per rank as (len(RANKS),) long)."""

    def __init__(self, images, lineages, taxonomy, flip=True):
        # uint8 (N, 3, H, W): a tensor (toy), or an array memory-mapped from the cache; or float latents (train.py --latent)
        self.images = images
        self.ids = torch.tensor([taxonomy.add(lin) for lin in lineages])  # (N, len(RANKS))
        self.flip = flip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = torch.as_tensor(self.images[i])
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x  # pixels to [-1, 1]; latents as they are
        if self.flip and torch.rand(()) < 0.5:  # horizontal flip: a mirrored animal is the same species
            x = x.flip(-1)
        return x, self.ids[i]


class DataError(ValueError):
    """Input data that cannot be read as asked; the message names the file and what to fix."""


def load_data(data="toy", size=32, per_species=64, seed=0, fmt="auto", top_rank="auto", columns="",
              image_root="", boxes="", cache_dir=None, workers=0):
    """(images uint8 (N, 3, size, size), lineages as names, where each was read) from any source.

    data="toy" renders the toy tree in memory; anything else goes through read_items() and is
    decoded once by decode_images(), cached in cache_dir.
    """
    if data in (None, "toy") or fmt == "toy":
        images, lineages = toy_dataset(per_species, size, seed)
        return images, lineages, None
    items = read_items(data, fmt, top_rank, columns, image_root, boxes)
    images, kept, skipped = decode_images(items, size, cache_dir, workers)
    if not kept:
        raise DataError(f"{data}: no images to train on ({skipped or 'it lists none'})")
    if skipped:
        print(skipped)
    return images, [items[i].lineage for i in kept], [items[i].where for i in kept]


def build_taxonomy(lineages, wheres=None, keep_first=False):
    """The Taxonomy of a dataset, and its lineages; a taxon placed under two parents is a DataError.

    With keep_first, a lineage that places a taxon under a second parent is rewritten above that
    taxon to follow its first parent (the image is kept), and a warning counts them.
    """
    taxonomy, out, moved, first_conflict = Taxonomy([]), [], {}, None
    for n, lineage in enumerate(lineages):
        while True:  # each retry fixes a finer rank, so this ends
            try:
                taxonomy.add(lineage, wheres[n] if wheres else None)
                break
            except LineageError as e:
                if not keep_first:
                    raise DataError(f"{e}, or pass --conflicts keep-first") from None
                r, i = e.node
                first = taxonomy.ancestors(r, i)
                lineage = tuple(taxonomy.vocab[q][first[q]] if first[q] else None for q in range(r)) + lineage[r:]
                moved[e.node] = moved.get(e.node, 0) + 1
                first_conflict = first_conflict or str(e).split(";")[0]
        out.append(lineage)
    if moved:
        print(f"warning: {len(moved)} taxa placed under two parents; kept the first parent, which relabels "
              f"{sum(moved.values())} images (first: {first_conflict})")
    return taxonomy, out


# -----------------------------------------------------------------------------
# Reading real data
#
# Each reader turns its source into Items (an image file and its lineage as names).
# decode_images() then decodes them all once, in DataLoader workers, into one uint8
# array that is cached in the output folder. Bad input raises a DataError: one line
# that names the file (and row) and says what to fix.


@dataclass
class Item:
    """One image to read: its file, its lineage as names, and how to make it square."""
    path: str
    lineage: tuple  # len(RANKS) names, None where the rank is unknown
    where: str  # how messages name it: "fishnet.csv row 7", or its folder
    box: tuple = None  # (x, y, w, h) to crop first (FishNet's bounding boxes); None = the whole image
    pad: bool = False  # square it with a white pad (BIOSCAN) instead of a centre crop


MISSING = {"", "na", "n/a", "nan", "none", "null", "unknown", "not_classified", UNKNOWN}  # cells meaning "no name"


def clean_name(value):
    """A name as read from a file: one Unicode form (NFC), single spaces; None for an empty marker."""
    name = " ".join(unicodedata.normalize("NFC", "" if value is None else str(value)).split())
    return None if name.lower() in MISSING else name


def make_lineage(names):
    """len(RANKS) raw names -> a lineage; a species given by its epithet alone ('corax') gets its genus."""
    lineage = [clean_name(n) for n in names]
    genus, species = lineage[-2], lineage[-1]
    if genus and species and len(normalize(species).split()) == 1:
        lineage[-1] = f"{genus} {species}"  # epithets repeat across genera ('major'): alone they are no species
    return tuple(lineage)


def read_folder_tree(root, top_rank="auto"):
    """root/Aves/Passeriformes/Corvidae/Corvus/Corvus corax/*.jpg: the folder path is the lineage.

    top_rank is the rank of the top folders. "auto" reads the first level whose folders all
    end like families (-idae in zoology, -aceae in botany) as family, or else the deepest as species.
    """
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_EXTS)}) in this folder or below")
    folders = [p.relative_to(root).parts[:-1] for p in files]
    if () in folders:
        raise DataError(f"{files[folders.index(())]}: an image directly in --data; put it in its taxon's folder")
    depth = max(map(len, folders))
    if top_rank == "auto":
        family = [d for d in range(depth)
                  if all(f[d].lower().endswith(("idae", "aceae")) for f in folders if len(f) > d)]
        start = RANKS.index("family") - family[0] if family else len(RANKS) - depth
    else:
        start = RANKS.index(top_rank)
    if not 0 <= start <= len(RANKS) - depth:
        raise DataError(f"{root}: folders nest {depth} deep, which does not fit the ranks {'/'.join(RANKS)} "
                        f"from {RANKS[max(start, 0)]} down; set --top-rank")
    print(f"{root}: top folders read as {RANKS[start]}, the deepest as {RANKS[start + depth - 1]} "
          "(else set --top-rank)")
    return [Item(str(p), make_lineage((None,) * start + f + (None,) * (len(RANKS) - start - len(f))), str(p.parent))
            for p, f in zip(files, folders)]


INAT_FOLDER = re.compile(r"\d+_(?:[^_]+_){6}.+")  # 00123_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax


def read_inat_folders(root):
    """iNaturalist 2021's folders: root/00123_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax/*.jpg."""
    items = []
    for folder in sorted(Path(root).iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        if not INAT_FOLDER.fullmatch(folder.name):
            raise DataError(f"{folder}: not an iNaturalist folder name like "
                            "00123_Animalia_Chordata_Aves_Passeriformes_Corvidae_Corvus_corax")
        names = folder.name.split("_", 7)[1:]  # kingdom, phylum, class, order, family, genus, epithet
        lineage = make_lineage(names[:6] + [f"{names[5]} {names[6]}"])
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
        items += [Item(str(p), lineage, str(folder)) for p in files]
    return items


# CSV/TSV layouts: the columns each needs, and where a row's image is under the image root
LAYOUTS = {
    "fishnet": (("image", "folder", "class", "order", "family", "genus", "species"),
                lambda row: os.path.join(row["folder"], row["image"].rsplit("/", 1)[-1])),  # drops a FishBase URL
    "bioscan": (("image_file", "chunk_number", "class", "order", "family", "genus", "species"),
                lambda row: os.path.join(f"part{row['chunk_number']}", row["image_file"])),
    "csv": (("image",), lambda row: row["image"]),
}


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it ({e})") from None


def read_table(path, layout="csv", columns="", image_root="", boxes=""):
    """A CSV or TSV with an image column and rank columns (named as in RANKS; an empty column = an absent rank).

    columns maps our column names to the file's: "image=file,species=scientific_name"; any case.
    Image paths start at image_root (default: the table's folder). boxes is FishNet's bounding-box
    JSON, {file stem: {"x", "y", "w", "h"}}.
    """
    path, (required, image_of) = Path(path), LAYOUTS[layout]
    root = Path(image_root) if image_root else path.parent
    try:
        rename = {k.strip().lower(): v.strip() for k, v in (p.split("=", 1) for p in columns.split(",") if p.strip())}
    except ValueError:
        raise DataError(f"--columns '{columns}': write ours=theirs pairs separated by commas, "
                        "e.g. image=file,species=scientific_name") from None
    if set(rename) - set(RANKS) - set(required):
        raise DataError(f"--columns: unknown name(s) {', '.join(set(rename) - set(RANKS) - set(required))}; "
                        f"ours are {', '.join(dict.fromkeys(required + RANKS))}")
    box_of = read_json(boxes) if boxes else {}
    if not isinstance(box_of, dict):
        raise DataError(f"{boxes}: expected a JSON object {{file stem: {{x, y, w, h}}}}, found a "
                        f"{type(box_of).__name__}")
    items = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            delimiter = "\t" if "\t" in f.readline() else ","
            f.seek(0)
            reader = csv.DictReader(f, delimiter=delimiter)
            found = {h.strip().lower(): h for h in reader.fieldnames or []}
            col = {c: found.get(rename.get(c, c).lower()) for c in dict.fromkeys(required + RANKS)}
            # a required column, or one --columns names, that the file lacks (a typo would drop its rank silently)
            absent = [rename.get(c, c) for c in dict.fromkeys([*required, *rename]) if col[c] is None]
            if absent or not any(col[r] for r in RANKS):
                expected = [rename.get(c, c) for c in required] + ["/".join(RANKS)] * (layout == "csv")
                raise DataError(f"{path}: missing column(s) {', '.join(absent) or 'of any rank'}; found: "
                                f"{', '.join(reader.fieldnames or [])}; expected: {', '.join(expected)} "
                                "(map yours with --columns)")
            end = reader.line_num  # the header's last line
            for row in reader:
                start, end = end + 1, reader.line_num  # the lines this row spans (after any blank ones)
                where = f"{path.name} row {end}"
                if any("\n" in (row[h] or "") for h in col.values() if h):  # a quote opened, never closed on its line
                    raise DataError(f"{path.name} lines {start}-{end}: one cell runs over them, from an unclosed "
                                    "quote (\"); close it or remove it")
                row = {c: (row[h] or "").strip() if h else "" for c, h in col.items()}  # a short row gives None
                image = image_of(row)
                box = box_of.get(Path(image).stem)
                try:
                    box = box and tuple(float(box[k]) for k in "xywh")
                except (KeyError, TypeError, ValueError):
                    raise DataError(f"{boxes}: the box of {Path(image).stem!r} is not {{x, y, w, h}}: {box}") from None
                lineage = make_lineage([row[r] for r in RANKS])
                items.append(Item(str(root / image), lineage, where, box, pad=layout == "bioscan"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:  # e.g. a cell over the csv module's size limit, after an unclosed quote
        raise DataError(f"{path}: cannot parse it as CSV ({e}), near line {reader.line_num}; look for an "
                        "unclosed quote (\") there or above") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror})") from None
    return items


def read_inat_json(path, image_root=""):
    """iNaturalist 2021's train.json: images, annotations, categories (kingdom ... genus, specific_epithet)."""
    path, meta = Path(path), read_json(path)
    root = Path(image_root) if image_root else path.parent
    try:
        files = {im["id"]: im["file_name"] for im in meta["images"]}
        taxa = {c["id"]: c for c in meta["categories"]}
        items = []
        for a in meta["annotations"]:
            taxon = taxa[a["category_id"]]
            names = [taxon.get(r) for r in RANKS[:-1]] + [taxon.get("specific_epithet")]  # species = genus + epithet
            items.append(Item(str(root / files[a["image_id"]]), make_lineage(names), f"{path.name} category {taxon['id']}"))
    except (KeyError, TypeError) as e:
        why = f"{e} is missing" if isinstance(e, KeyError) else "a field holds the wrong kind of value"
        raise DataError(f"{path}: not iNaturalist JSON ({why}); expected images (id, file_name), annotations "
                        "(image_id, category_id) and categories (id, kingdom ... genus, specific_epithet)") from None
    return items


FORMATS = ("auto", "folder", "inat-folder", "csv", "fishnet", "bioscan", "inat-json", "toy")


def detect_format(data):
    """The reader for data: a folder tree or iNat folders, a FishNet, BIOSCAN or other table, iNat JSON."""
    path = Path(data)
    if path.is_dir():
        folders = [d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")]
        return "inat-folder" if folders and all(INAT_FOLDER.fullmatch(d) for d in folders) else "folder"
    if not path.exists():
        raise DataError(f"--data {data}: no such file or folder")
    if path.suffix.lower() == ".json":
        return "inat-json"
    if path.suffix.lower() in (".csv", ".tsv", ".txt"):
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            header = {c.strip().lower() for c in re.split("[,\t]", f.readline())}
        if "image_file" in header:
            return "bioscan"
        return "fishnet" if {"image", "folder"} <= header else "csv"
    raise DataError(f"--data {data}: cannot tell its format from its name; pass --format ({', '.join(FORMATS[1:])})")


def read_items(data, fmt="auto", top_rank="auto", columns="", image_root="", boxes=""):
    """Every image data lists, as Items; fmt="auto" picks the reader from what data is."""
    fmt = detect_format(data) if fmt == "auto" else fmt
    if fmt in ("folder", "inat-folder") and not os.path.isdir(data):
        raise DataError(f"--data {data}: not a folder (--format {fmt})")
    if fmt == "folder":
        return read_folder_tree(data, top_rank)
    if fmt == "inat-folder":
        return read_inat_folders(data)
    if fmt == "inat-json":
        return read_inat_json(data, image_root)
    return read_table(data, fmt, columns, image_root, boxes)


def load_image(path, size, box=None, pad=False):
    """Open an image, crop it to box (x, y, w, h), square it (centre crop, or white pad) and resize.

    Returns uint8 (3, size, size).
    """
    with Image.open(path) as im:
        W, H = im.size
        x, y, w, h = box or (0, 0, W, H)
        side = max(1, max(w, h) if pad else min(w, h))
        # a JPEG can decode at 1/2, 1/4 or 1/8 scale for free: ask for the smallest that keeps `size` pixels
        im.draft("RGB", (math.ceil(W * size / side), math.ceil(H * size / side)))
        s = im.size[0] / W  # the scale the decoder chose (1 for other formats)
        im = im.convert("RGB")
        x0, y0, x1, y1 = max(0, x * s), max(0, y * s), min(im.width, (x + w) * s), min(im.height, (y + h) * s)
        if x1 - x0 < 1 or y1 - y0 < 1:
            raise ValueError(f"bounding box {box} lies outside the {W}x{H} image")
        im = im.crop((round(x0), round(y0), round(x1), round(y1)))
        w, h = im.size
        m = max(w, h) if pad else min(w, h)
        if pad:
            square = Image.new("RGB", (m, m), "white")
            square.paste(im, ((m - w) // 2, (m - h) // 2))
        else:
            square = im.crop(((w - m) // 2, (h - m) // 2, (w - m) // 2 + m, (h - m) // 2 + m))
        square = square.resize((size, size), Image.BICUBIC)
        return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)  # (3, size, size)


class Decoder(torch.utils.data.Dataset):
    """Item i -> (i, uint8 (3, size, size), "" or why it is unreadable); what the DataLoader workers run."""

    def __init__(self, items, size):
        self.items, self.size = items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        try:
            return i, load_image(item.path, self.size, item.box, item.pad), ""
        except Exception as e:  # whatever the decoder raises, the image is unreadable: count it, go on
            why = str(e).replace(f" {item.path!r}", "") or type(e).__name__  # the summary names the file
            return i, torch.zeros(3, self.size, self.size, dtype=torch.uint8), why


def decode_images(items, size, cache_dir=None, workers=0):
    """Decode every item once: (uint8 (n, 3, size, size) of the readable ones, their indices, skip summary).

    With cache_dir the array is kept there as images-<size>px-<key>.npy and read back memory-mapped.
    The key hashes every file's path, size and modification time, the crops and the image size, so
    changing any of them decodes again. Missing and unreadable files are skipped and counted.
    """
    present, missing, key = [], [], hashlib.sha1(f"v2 {size}".encode())  # bump v2 when load_image or the layout changes
    for i, item in enumerate(items):
        try:
            st = os.stat(item.path)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            missing.append(i)
            continue
        present.append(i)
        key.update(f"{os.path.abspath(item.path)}|{st.st_size}|{st.st_mtime_ns}|{item.box}|{item.pad}\n".encode())
    cache = cache_dir and os.path.join(cache_dir, f"images-{size}px-{key.hexdigest()[:16]}")
    if cache and os.path.exists(cache + ".json") and os.path.exists(cache + ".npy"):
        with open(cache + ".json") as f:  # positions among the present files: rows without a file may come and go
            unreadable = {present[j]: why for j, why in json.load(f)["unreadable"]}
        images = np.load(cache + ".npy", mmap_mode="c")  # copy-on-write: the file is never changed
        print(f"images: {cache}.npy (cached; decoded again when the files or --image-size change)")
    else:
        images, unreadable = decode_into(items, present, size, cache, workers)
    kept = [i for i in present if i not in unreadable]
    skipped = ""
    if missing or unreadable:
        first = min(missing[:1] + list(unreadable))
        skipped = (f"skipped {len(missing) + len(unreadable):,} of {len(items):,} images: {len(missing):,} missing, "
                   f"{len(unreadable):,} unreadable; first: {items[first].path} ({unreadable.get(first, 'missing')})")
    return images[:len(kept)], kept, skipped


def decode_into(items, present, size, cache, workers):
    """Decode items[present] in DataLoader workers, with a progress bar; the readable ones go first."""
    shape = (len(present), 3, size, size)
    if cache:  # written under a temporary name: an interrupted run leaves no half cache behind
        os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
        remove_stale_temporaries(Path(cache).parent, size)
        tmp = f"{cache}.{os.getpid()}.tmp"
        images = np.lib.format.open_memmap(tmp + ".npy", mode="w+", dtype=np.uint8, shape=shape)
    else:
        images = np.empty(shape, np.uint8)
    loader = torch.utils.data.DataLoader(Decoder([items[i] for i in present], size), batch_size=64, num_workers=workers)
    unreadable, n = {}, 0
    with tqdm(total=len(present), desc="decoding", unit="img", dynamic_ncols=True) as bar:
        for index, x, why in loader:  # (B,), (B, 3, size, size), B strings
            ok = torch.tensor([not w for w in why])
            images[n:n + int(ok.sum())] = x[ok].numpy()
            n += int(ok.sum())
            unreadable.update((present[j], w) for j, w in zip(index.tolist(), why) if w)
            bar.update(len(index))
    if not cache:
        return images, unreadable
    images.flush()
    del images
    for old in Path(cache).parent.glob(f"images-{size}px-*"):  # an older cache of this size is outdated
        if ".tmp" not in old.name and not old.name.startswith(os.path.basename(cache)):
            old.unlink()
    os.replace(tmp + ".npy", cache + ".npy")
    position = {i: j for j, i in enumerate(present)}
    with open(tmp + ".json", "w") as f:
        json.dump({"unreadable": sorted((position[i], why) for i, why in unreadable.items())}, f)
    os.replace(tmp + ".json", cache + ".json")  # last: the cache counts only once this exists
    print(f"images: {cache}.npy (decoded once; later runs and stages read it)")
    return np.load(cache + ".npy", mmap_mode="c"), unreadable


def remove_stale_temporaries(folder, size):
    """Delete the half-written caches of decodes that were interrupted (their process is gone): each is as large
    as the whole cache. Another process's decode in progress is left alone."""
    for tmp in folder.glob(f"images-{size}px-*.*.tmp.*"):
        pid = tmp.name.split(".")[-3]
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):  # not our naming, or another user's live process
            pass


if __name__ == "__main__":
    from torchvision.utils import save_image

    images, lineages = toy_dataset(per_species=8)
    taxonomy = Taxonomy(lineages)
    taxonomy.print_tree()
    os.makedirs("out", exist_ok=True)
    # 4 images per species, species in tree order: each row shows 4 species
    first4 = images.view(48, 8, 3, 32, 32)[:, :4].reshape(-1, 3, 32, 32)  # (48*4, 3, H, W)
    save_image(first4.float() / 255, "out/toy_tree.png", nrow=16, padding=1)
    print(f"{len(images)} images of {taxonomy.size(6)} species -> out/toy_tree.png")
