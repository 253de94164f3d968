"""
A new species from a few pictures (docs/results.md): extend a trained model with held-out toy species, k images each.

    python train.py --level species --hold-out one-per-genus:8 --out out/holdout             # the base (~30-60 min)
    python train.py --level species --hold-out one-per-genus:8/4 --out out/scratch4          # from scratch, k = 4
    python tests/benchmarks/extend.py --base out/holdout/species.pt --scratch out/scratch4/species.pt
    python tests/benchmarks/extend.py --summary out/extend out/extend-s1 out/extend-s2     # over seeds (--seed 1, 2)

For each k it renders the held-out species as the toy tree does (the same first k pictures the /k run trains on)
into <out>/data-k<k>/<genus>/<species>/, runs `train.py --extend` for each cell (new rows at zero = the parent, or
random; the new rows only, or everything), and scores each checkpoint with fid.py's toy taxon classifier: the new
species drawn --n times each under guidance 3 with the null and the parent negative, and (where old weights may
have moved) the old species drawn --n-old times each with the null negative. A cell already in <out>/extend.json
is skipped: the same command carries on. Prints the markdown table of docs/results.md.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fid  # noqa: E402
from model import Diffusion, DiffusionConfig  # noqa: E402
from plumbing.checkpoints import load_checkpoint  # noqa: E402
from plumbing.images import draw, to_uint8  # noqa: E402
from taxonomy import RANKS, Taxonomy, held_out, normalize, render_toy, toy_species  # noqa: E402

# (name, --new-rank-init, --extend-trains): the extension cells
CELLS = [("new rows start at the parent", "zero", "new-rows"), ("new rows start random", "random", "new-rows"),
         ("everything trains, new rows at the parent", "zero", "all")]


def write_species(folder, held, k, seed, size):
    """The first k pictures of each held-out species, as toy_dataset renders them, in folder/<genus>/<species>/."""
    for s in held:
        lineage, traits = toy_species()[s]
        leaf = os.path.join(folder, lineage[-2], lineage[-1])
        os.makedirs(leaf, exist_ok=True)
        for i in range(k):
            Image.fromarray(render_toy(traits, np.random.default_rng([seed, s, i]), size)).save(f"{leaf}/{i}.png")
    return folder


def score(ckpt_path, species, n, negatives, seed=0):
    """Species and genus accuracy of the classifier on n images of each toy species in `species` (indices), per
    guidance negative. A species the checkpoint does not know is drawn as its genus (sample.py's unseen name)."""
    model, ckpt = load_checkpoint(ckpt_path)
    taxonomy, diffusion = Taxonomy(ckpt["lineages"]), Diffusion(DiffusionConfig(**ckpt["diffusion_config"]))
    clf, clf_tax = fid.load_classifier(model.unet.cfg.image_size)
    lineages = [toy_species()[s][0] for s in species]
    known = [lin if normalize(lin[-1]) in taxonomy.index[-1] else lin[:-1] + (None,) for lin in lineages]
    ids = torch.tensor([taxonomy.parse("/".join(n for n in lin if n)) for lin in known]).repeat_interleave(n, 0)
    target = fid.rank_targets(clf_tax, lineages).repeat_interleave(n, 0)  # (N, class..species)
    size, out = model.unet.cfg.image_size, {}
    x_T = torch.randn((len(ids), 3, size, size), generator=torch.Generator().manual_seed(seed))
    for neg in negatives:
        images = to_uint8(draw(diffusion, model, ids, x_T, 3.0, neg, RANKS.index(ckpt["stages"][0]), 15, seed=seed))
        _, pred = fid.classify(clf, images)
        acc = (pred == target).float().mean(0)
        out[neg] = {"species": 100 * acc[-1].item(), "genus": 100 * acc[-2].item()}
    return out


def run_cell(args, name, init, trains, k):
    """train.py --extend for one cell; its wall time and steps."""
    out = os.path.join(args.out, f"{init}-{trains}-k{k}")  # one folder per cell
    data = write_species(os.path.join(args.out, f"data-k{k}"), args.held, k, args.seed, args.image_size)
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--extend", args.base, "--data", data,
                    "--out", out, "--new-rank-init", init, "--extend-trains", trains,
                    "--extend-steps", str(args.steps), "--seed", str(args.seed)], check=True)
    return os.path.join(out, "species.pt"), time.time() - t0


def stage_seconds(ckpt_path):
    """Training plus grid seconds of a train.py run, from the 'stage ... done' lines of its train.log."""
    total = 0.0
    with open(os.path.join(os.path.dirname(ckpt_path), "train.log")) as f:
        for line in f:
            if " done: " in line:
                total += float(line.split(" done: ")[1].split(" s training")[0])
                total += float(line.split("img/s), ")[1].split(" s grid")[0])
    return total


def main(args):
    args.held = held_out(args.hold_out, args.seed)[0]
    old = [s for s in range(len(toy_species())) if s not in args.held]
    path = os.path.join(args.out, "extend.json")
    results = json.load(open(path)) if os.path.exists(path) else {}

    def cell(key, make):
        if key not in results:
            results[key] = make()
            os.makedirs(args.out, exist_ok=True)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
            print(key, results[key], flush=True)
        return results[key]

    both = ("null", "parent")
    cell("base", lambda: {"new": score(args.base, args.held, args.n, both),
                          "old": score(args.base, old, args.n_old, ("null",)), "wall": stage_seconds(args.base)})
    if args.scratch:
        cell("scratch", lambda: {"new": score(args.scratch, args.held, args.n, both),
                                 "old": score(args.scratch, old, args.n_old, ("null",)),
                                 "wall": stage_seconds(args.scratch)})
    for k in args.k:
        for name, init, trains in CELLS:
            if trains == "all" and k not in args.k_all:
                continue

            def make():
                ckpt, wall = run_cell(args, name, init, trains, k)
                moved = trains != "new-rows"  # new rows only: every old weight bit for bit (tests/test_extend.py)
                return {"new": score(ckpt, args.held, args.n, both), "wall": wall, "steps": args.steps,
                        "old": score(ckpt, old, args.n_old, ("null",)) if moved else None}
            cell(f"{name} k{k}", make)
    print_table(results, args)


def print_table(results, args):
    base = results["base"]
    print("\n| row | k | new: species (null / parent) | new: genus (null / parent) | old: species, before -> after "
          "| wall | steps |\n|---|---|---|---|---|---|---|")

    def row(name, k, r, steps):
        new, old = r["new"], r.get("old")
        after = f"{old['null']['species']:.1f}" if old else f"{base['old']['null']['species']:.1f} (bit for bit)"
        print(f"| {name} | {k} | {new['null']['species']:.1f} / {new['parent']['species']:.1f} | "
              f"{new['null']['genus']:.1f} / {new['parent']['genus']:.1f} | "
              f"{base['old']['null']['species']:.1f} -> {after} | {r['wall'] / 60:.1f} min | {steps} |")
    row("no extension (the genus drawn)", "-", {**base, "old": None, "wall": float("nan")}, "-")
    for key, r in results.items():
        if key not in ("base", "scratch"):
            name, k = key.rsplit(" k", 1)
            row(f"extend, {name}", k, r, r["steps"])
    if "scratch" in results:
        row("from scratch with those species at k images", 4, results["scratch"], 3600)


def summary(folders):
    """The key rows over seeds: mean and range of each number across the extend.json of several runs' --out."""
    runs = [json.load(open(os.path.join(f, "extend.json"))) for f in folders]
    print(f"\n{len(runs)} seeds ({', '.join(folders)}): mean (min-max)\n\n| row | new: species (null / parent) | "
          "new: genus (null / parent) | old: species |\n|---|---|---|---|")

    def spread(values):
        return f"{np.mean(values):.1f} ({min(values):.1f}-{max(values):.1f})"
    for key in dict.fromkeys(k for r in runs for k in r):
        rs = [r[key] for r in runs if key in r]
        new = {f"{neg} {rank}": [r["new"][neg][rank] for r in rs] for neg in ("null", "parent")
               for rank in ("species", "genus")}
        old = [(r["old"] or runs[i]["base"]["old"])["null"]["species"] for i, r in enumerate(rs)]
        print(f"| {'no extension' if key == 'base' else key} ({len(rs)}) | {spread(new['null species'])} / "
              f"{spread(new['parent species'])} | {spread(new['null genus'])} / {spread(new['parent genus'])} | "
              f"{spread(old)} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="out/holdout/species.pt", help="the species checkpoint trained with --hold-out")
    p.add_argument("--scratch", default="", help="the species checkpoint trained with --hold-out ...:8/4, if any")
    p.add_argument("--hold-out", default="one-per-genus:8", help="the base run's --hold-out")
    p.add_argument("--seed", type=int, default=0, help="the base run's --seed")
    p.add_argument("--k", type=int, nargs="+", default=[1, 4, 16], help="pictures of each new species")
    p.add_argument("--k-all", type=int, nargs="*", default=[4], help="k of the cells that train everything")
    p.add_argument("--steps", type=int, default=200, help="--extend-steps of every cell")
    p.add_argument("--n", type=int, default=16, help="images drawn of each new species, per negative")
    p.add_argument("--n-old", type=int, default=8, help="images drawn of each old species")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--out", default="out/extend")
    p.add_argument("--summary", nargs="+", default=None, metavar="OUT",
                   help="only print the rows over seeds: the --out folders of several runs (one per --seed)")
    args = p.parse_args()
    if args.summary:
        summary(args.summary)
    else:
        main(args)
