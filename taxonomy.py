"""
The data side of TaxaDiffusion: ranks, the taxonomy tree and lineage parsing, the built-in toy tree of life,
and the dataset the training loop reads. (The readers of real data, folder trees, tables and iNaturalist,
are in plumbing/readers.py, which a first read skips.)

Nothing here knows about the network. A lineage becomes a row of integer ids,
one per rank (0 = unknown), and that is all the model ever sees.

    python taxonomy.py            # prints the toy tree and writes out/toy_tree.png

Read next: unet.py (the network), then model.py (diffusion + conditioning).
"""
import colorsys
import difflib
import os
import re
import unicodedata

import numpy as np
import torch

RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")
UNKNOWN = "<unknown>"  # id 0 at every rank


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

    def parse_new(self, text):
        """A lineage whose last name the tree does not know: (ids of its parent's lineage, the new name's rank, the
        name), or None. A new name counts only at the tree's finest rank (a species), at the end of a lineage whose
        every other name is known and whose last is its parent ('Aves/.../Corvus/Corvus novus'); else it is a typo."""
        parent, _, name = re.sub(r"(/\s*(\.\.\.|…)?\s*)+$", "", text.strip()).rpartition("/")
        try:
            ids = self.parse(parent) if parent else None
        except LineageError:
            return None
        r = ids and max(q for q, i in enumerate(ids) if i) + 1  # the rank below the parent
        finest = max(q for q in range(len(RANKS)) if self.size(q))
        new = ids and r == finest and not any(normalize(name) in index for index in self.index)
        return (ids, r, name.strip()) if new else None

    def merge(self, lineages):
        """Add an extension's lineages after the taxa already known, so every old id stays. Returns them completed
        from the tree (a folder 'Corvus/Corvus novus' gains Animalia/.../Corvidae) and the new taxa per rank;
        a known name under another parent raises add's LineageError, naming both."""
        before, full = [len(v) for v in self.vocab], []
        for lineage in lineages:
            ids = self.add(lineage)
            r = max(q for q, i in enumerate(ids) if i)
            full.append(tuple(self.vocab[q][i] if i else None for q, i in enumerate(self.ancestors(r, ids[r]))))
        return full, [len(v) - n for v, n in zip(self.vocab, before)]

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

    # Building the tree from data: a lineage may leave ranks empty, or place a taxon under a second parent

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


def held_out(spec, seed=0):
    """--hold-out: (indices in toy_species() order of the species a run leaves out, images each keeps).

    "Corvus corax,Pica pica" leaves those out; "one-per-genus:8" one species in each of 8 genera, all picked by
    the seed ("one-per-genus": every genus); a "/K" ending keeps K images of each (few-shot from scratch).
    """
    if not spec:
        return [], 0
    names = [lineage[-1] for lineage, _ in toy_species()]  # a genus's two species are neighbours
    keys, (spec, _, kept) = [normalize(n) for n in names], spec.partition("/")
    if m := re.fullmatch(r"one-per-genus(?::(\d+))?", spec):
        if not 0 < (n := int(m[1] or len(names) // 2)) <= len(names) // 2:
            raise ValueError(f"--hold-out one-per-genus:N takes 1 to {len(names) // 2} genera (got {n})")
        rng = np.random.default_rng([seed, 1000])  # no toy species has index 1000: no image's stream
        held = [2 * int(g) + int(rng.integers(2)) for g in sorted(rng.permutation(len(names) // 2)[:n])]
    elif unknown := [n for n in spec.split(",") if normalize(n) not in keys]:
        guess = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        raise ValueError(f"--hold-out: '{unknown[0]}' is no toy species{hint}")
    else:
        held = sorted({keys.index(normalize(n)) for n in spec.split(",")})
    if kept and not kept.isdigit():
        raise ValueError(f"--hold-out: after '/' comes how many images each held-out species keeps (got '{kept}')")
    return held, int(kept or 0)


def species_counts(per_species, seed=0, hold_out=""):
    """Training images of each toy species (in toy_species() order) for a --per-species value, and --hold-out.

    "64" gives every species 64 images. Real data has a long tail, which is where sharing
    ancestors should matter most, so two skewed trees are built in, deterministic in the seed:
    "pairs:64/4"  in every genus one sibling gets 64 images and the other 4 (which one is the seed's pick);
    "zipf:64"     species ranked in a seeded order get 64 / rank images (64, 32, 21, ..., at least 1).
    """
    spec, n = str(per_species), len(toy_species())
    if hold_out:
        held, kept = held_out(hold_out, seed)
        return [kept if s in held else c for s, c in enumerate(species_counts(per_species, seed))]
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


def toy_dataset(per_species=64, size=32, seed=0, hold_out=""):
    """Render the toy tree: (images uint8 (N, 3, size, size), lineages as names).
    per_species: images of every species, or a long-tailed tree; hold_out: species left out (species_counts)."""
    images, lineages = [], []
    for s, ((lineage, traits), count) in enumerate(zip(toy_species(), species_counts(per_species, seed, hold_out))):
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

    def __init__(self, images, lineages, taxonomy):
        # uint8 (N, 3, H, W): a tensor (toy), or an array memory-mapped from the cache; or float latents (train.py --latent)
        self.images = images
        self.ids = torch.tensor([taxonomy.add(lin) for lin in lineages])  # (N, len(RANKS))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = torch.as_tensor(self.images[i])
        x = x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x  # pixels to [-1, 1]; latents as they are
        return x, self.ids[i]  # the training loop mirrors a random half of each batch, with its own generator


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
