"""
Real data: each reader turns its source (a folder tree, a CSV/TSV table such as FishNet or BIOSCAN-1M, an
iNaturalist 2021 JSON or folder) into Items, an image file and its lineage as names; decode_images() then
decodes them all once, in DataLoader workers, into one uint8 array cached in the output folder. Bad input
raises a DataError: one line that names the file (and row) and says what to fix. docs/data.md has the formats.
"""
import csv
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

from plumbing.torchrun import barrier
from taxonomy import RANKS, UNKNOWN, LineageError, Taxonomy, normalize, toy_dataset

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """Input data that cannot be read as asked; the message names the file and what to fix."""


def load_data(data="toy", size=32, per_species=64, seed=0, fmt="auto", top_rank="auto", columns="",
              image_root="", boxes="", cache_dir=None, workers=0, hold_out=""):
    """(images uint8 (N, 3, size, size), lineages as names, where each was read) from any source.

    data="toy" renders the toy tree in memory; anything else goes through read_items() and is
    decoded once by decode_images(), cached in cache_dir.
    """
    if data in (None, "toy") or fmt == "toy":
        images, lineages = toy_dataset(per_species, size, seed, hold_out)
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


class ImageFiles(torch.utils.data.Dataset):
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
    loader = torch.utils.data.DataLoader(ImageFiles([items[i] for i in present], size), batch_size=64, num_workers=workers)
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


def read_data(cfg, rank=0, world=1):
    """train.py's images, lineages and their taxonomy as read, or one line that names what is wrong with the data.
    With several processes, process 0 decodes the images into the cache in out/ first and the others then
    read it (two processes writing one cache would race)."""
    try:
        if rank > 0:
            barrier(world)
        images, lineages, wheres = load_data(
            cfg.data, cfg.image_size, cfg.per_species, cfg.seed, fmt=cfg.format, top_rank=cfg.top_rank,
            columns=cfg.columns, image_root=cfg.image_root, boxes=cfg.boxes, cache_dir=cfg.out, workers=cfg.workers,
            hold_out=cfg.hold_out)
        if rank == 0:
            barrier(world)
        tree, lineages = build_taxonomy(lineages, wheres, keep_first=cfg.conflicts == "keep-first")
    except DataError as e:
        raise SystemExit(f"error: {e}")
    return images, lineages, tree
