"""
Does progressive training help? The paper's three claims, tested on the toy tree.

    python tests/benchmarks/paper_claims.py --parallel 2 --no-fid   # the grid: ~2 h a pair of cells on 2 CPU cores; resumes
    python tests/benchmarks/paper_claims.py --schedules progressive --freeze unet new-rank --k 4   # freezing policies
    python tests/benchmarks/paper_claims.py --quick     # one seed, k = 4, short runs: checks the pipeline
    python tests/benchmarks/paper_claims.py --report    # only the table and figure of the cells done so far
    python tests/benchmarks/paper_claims.py --schedules progressive --no-fid --guidance-sweep 1 2 3 5   # no training
    python tests/benchmarks/paper_claims.py --schedules progressive flat --k 4 --p-cut 0 0.4 --no-fid   # dropout rates

The grid is schedule x images per species k x seed, at train.py's default budget
(the small UNet, its default stage steps and cool-down):
- schedule: progressive (coarse to fine, the paper), all (every rank from step 0),
  random (each example cut at a random rank), flat (species ids only),
  all with the same network, the same total number of optimizer steps and the same cool-down;
- k: images per species, a count (4: few-shot) or a long tail (pairs:64/4, a rich and a rare
  sibling in every genus; see taxonomy.species_counts): claim 2 says progressive helps most
  where a species has few images, so the tables give the rare species' accuracy apart;
- seeds {0, 1, 2}: a cell is a mean ± std over seeds, never one lucky seed.
Variants of a cell's training flags are one cell each: --freeze and --new-rank-init
(progressive only), --p-uncond, --p-cut and --stage-steps (every schedule).
Each trained model is then sampled with each guidance negative (null = vanilla
CFG, parent, root = the paper's TaxaGuide), and fid.py scores the images:
per-rank accuracy of the taxon classifier, its Frechet distance, and FID and KID
(unless --no-fid: Inception costs ~45 s per negative on one CPU thread).

Every cell trains with train.py in its own folder (out/claims/progressive-k4-s0/,
progressive+unet-k4-s0/ for a freezing policy, flat+pcut0-k4-s0/, ...) and writes result.json there
when it is done, so a killed grid loses its unfinished cells only. Cells run
seed by seed, so a grid stopped early has whole seeds. With --parallel N, N
copies of this script claim cells one at a time, each on 1/N of the cores.
"""
import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections import namedtuple

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fid  # noqa: E402
from model import Diffusion, DiffusionConfig  # noqa: E402
from plumbing.checkpoints import load_checkpoint  # noqa: E402
from plumbing.images import draw, to_uint8  # noqa: E402
from plumbing.cli import device_name, finite_float, fraction, nonneg_int, output_path, per_species, positive_int, positive_int_list, script_parser  # noqa: E402
from taxonomy import RANKS, Taxonomy, species_counts, toy_dataset  # noqa: E402
from unet import SIZES  # noqa: E402

SCHEDULES = ("progressive", "all", "random", "flat")
NEGATIVES = ("null", "parent", "root")
FREEZES = ("none", "unet", "new-rank")
INITS = ("zero", "random")
STAGE_STEPS = "200,200,600,800,1800"  # train.py's default stage lengths (an earlier grid used 100,100,200,250,350)

# A cell is one trained model. Everything but k and the seed is its variant: the schedule, and the train.py
# flags the grid varies (the freezing policy and new-rank init only for progressive; the dropout rates
# p_uncond and p_cut, and the stage lengths, for every schedule).
Cell = namedtuple("Cell", "schedule freeze init p_uncond p_cut stage_steps k seed")
BASE = {"freeze": "none", "init": "zero", "p_uncond": 0.1, "p_cut": 0.2, "stage_steps": STAGE_STEPS}


def variant_of(cell):
    """The cell without its k and seed: what a row of the tables averages over seeds."""
    return tuple(cell[:6])


def cell_name(cell):
    """The cell's folder under --out: progressive-k4-s0 for the base flags; progressive+unet-k4-s0 (a freezing
    policy), progressive+random-init-k4-s0, flat+puncond0.2-k4-s0, progressive+steps50,50,100,200,600-k4-s0."""
    c = cell
    variant = ("" if c.freeze == "none" else "+" + c.freeze) + ("" if c.init == "zero" else f"+{c.init}-init") \
        + ("" if c.p_uncond == BASE["p_uncond"] else f"+puncond{c.p_uncond:g}") \
        + ("" if c.p_cut == BASE["p_cut"] else f"+pcut{c.p_cut:g}") \
        + ("" if c.stage_steps == STAGE_STEPS else f"+steps{c.stage_steps}")
    k = str(c.k).replace(":", "").replace("/", "-")  # pairs:64/4 -> pairs64-4, a folder name
    return f"{c.schedule}{variant}-k{k}-s{c.seed}"


def grid_cells(args):
    """Every Cell of the grid, seed by seed: a grid stopped early has whole seeds.
    The freezing policies and new-rank inits are variants of the progressive schedule only."""
    cells = []
    for seed, k, schedule in itertools.product(args.seeds, args.k, args.schedules):
        freezes, inits = (args.freeze, args.new_rank_init) if schedule == "progressive" else (["none"], ["zero"])
        for freeze, init, p_uncond, p_cut, steps in itertools.product(freezes, inits, args.p_uncond, args.p_cut,
                                                                     args.stage_steps):
            cells.append(Cell(schedule, freeze, init, p_uncond, p_cut, steps, k, seed))
    return cells


def train_cell(args, cell, folder):
    """Train one model with train.py (a subprocess: the same command a reader would type)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--level", "species", "--schedule", cell.schedule,
           "--per-species", str(cell.k), "--seed", str(cell.seed), "--out", folder, "--size", args.size,
           "--stage-steps", cell.stage_steps, "--freeze", cell.freeze, "--new-rank-init", cell.init,
           "--p-uncond", str(cell.p_uncond), "--p-cut", str(cell.p_cut), "--cooldown", str(args.cooldown),
           "--device", args.device,
           "--grid-cols", "4", "--grid-steps", "10"]
    with open(os.path.join(folder, "stdout.txt"), "a") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def score_cell(args, folder, real, net, clf, clf_tax, guidance=None, negatives=None):
    """Sample every species n times per guidance negative; the scores of each as plain numbers.
    guidance: the scale (default --guidance); negatives: which ones (default all the model knows)."""
    guidance = args.guidance if guidance is None else guidance
    model, ckpt = load_checkpoint(os.path.join(folder, "species.pt"), args.device)
    diffusion = Diffusion(DiffusionConfig(**ckpt["diffusion_config"])).to(args.device)
    taxonomy = Taxonomy(ckpt["lineages"])
    root_level = RANKS.index(ckpt["stages"][0])
    ids = torch.tensor([taxonomy.ancestors(6, i) for i in range(1, len(taxonomy.vocab[6]))])
    ids = ids.repeat_interleave(args.n_per_species, 0)  # (48 n, R)
    target = fid.toy_targets(clf_tax, taxonomy, ids)
    # a flat model knows no parent or root: all three negatives are the null lineage, so score it once
    negatives = negatives or (["null"] if ckpt["train_config"]["schedule"] == "flat" else NEGATIVES)
    scores = {}
    for neg in negatives:
        x_T = torch.randn((len(ids), model.unet.cfg.in_channels, *(2 * [model.unet.cfg.image_size])),
                          generator=torch.Generator(args.device).manual_seed(args.seed_sampling), device=args.device)
        images = to_uint8(draw(diffusion, model, ids.to(args.device), x_T, guidance, neg, root_level,
                               args.sample_steps, "ddim", 64, args.seed_sampling)).cpu()
        cf, pred = fid.classify(clf, images)
        feats = fid.inception_features(net, images, "torchmetrics", 50, args.device) if net else None
        acc = (pred == target).float().mean(0)
        right = (pred[:, -1] == target[:, -1]).float().view(-1, args.n_per_species).mean(1)  # (48,) per species
        scores[neg] = {**{r: float(a) for r, a in zip(fid.EVAL_RANKS, acc)}, "per_species": right.tolist(),
                       "classifier_fd": fid.frechet_distance(*fid.statistics(cf), *fid.statistics(real["clf"]))}
        if net:
            scores[neg]["fid"] = fid.frechet_distance(*fid.statistics(feats), *fid.statistics(real["inception"]))
            scores[neg]["kid"] = fid.kernel_inception_distance(feats, real["inception"])[0]
    return scores


def sweep_guidance(args, real, clf, clf_tax):
    """Score the finished cells of the selected grid again at every scale of --guidance-sweep (CFG, the null
    negative), without training: <cell>/guidance.json maps each scale to its scores, written after each."""
    for cell in grid_cells(args):
        folder = os.path.join(args.out, cell_name(cell))
        if not os.path.exists(os.path.join(folder, "result.json")):
            continue
        path = os.path.join(folder, "guidance.json")
        done = json.load(open(path)) if os.path.exists(path) else {}
        with open(os.path.join(folder, "result.json")) as f:  # the grid's own scores, if made the same way
            r = json.load(f)
        if all(r["args"].get(a) == getattr(args, a) for a in ("n_per_species", "sample_steps", "seed_sampling")):
            done.setdefault(f"{r['args']['guidance']:g}", r["scores"]["null"])
        for scale in args.guidance_sweep:
            if f"{scale:g}" in done:
                continue
            t0 = time.time()
            done[f"{scale:g}"] = score_cell(args, folder, real, None, clf, clf_tax, scale, ["null"])["null"]
            print(f"{cell_name(cell)}: guidance {scale:g}: species {done[f'{scale:g}']['species']:.1%} "
                  f"({time.time() - t0:.0f} s)", flush=True)
            with open(path + ".tmp", "w") as f:
                json.dump(done, f, indent=1)
            os.replace(path + ".tmp", path)


def read_cell(result):
    """The Cell a result.json was trained as (cells from before a flag was varied have the base value)."""
    flags = {f: result.get(f, result.get("args", {}).get(f, BASE[f])) for f in BASE}
    return Cell(schedule=result["schedule"], k=str(result["k"]), seed=result["seed"], **flags)


def guidance_table(out):
    """Species accuracy (%) against the guidance scale (CFG), mean ± std over seeds, one row per
    variant and k: from the guidance.json files of --guidance-sweep."""
    by = {}  # (variant, k) -> scale -> [species accuracy of each seed]
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name, "guidance.json")
        if os.path.exists(path):
            cell = read_cell(json.load(open(os.path.join(out, name, "result.json"))))
            for scale, s in json.load(open(path)).items():
                key = (variant_of(cell), cell.k)
                by.setdefault(key, {}).setdefault(float(scale), []).append(100 * s["species"])
    if not by:
        return ""
    scales = sorted({scale for runs in by.values() for scale in runs})
    lines = ["| schedule | k | " + " | ".join(f"scale {s:g}" for s in scales) + " |", "|---" * (2 + len(scales)) + "|"]
    for key in sorted(by, key=lambda key: order((*key, "null"))):
        cols = [f"{np.mean(by[key][s]):.1f} ± {np.std(by[key][s]):.1f} ({len(by[key][s])})" if s in by[key] else "-"
                for s in scales]
        lines.append(f"| {label(key[0])} | {key[1]} | " + " | ".join(cols) + " |")
    return ("species accuracy (%) against the guidance scale (1 = no guidance), null negative, mean ± std over "
            "seeds (how many)\n\n" + "\n".join(lines) + "\n")


def k_order(k):
    """Counts by size (4 before 16), then the long-tailed trees."""
    return (not k.isdigit(), int(k) if k.isdigit() else 0, k)


def order(key):
    """Sort key of (variant, k, negative): the paper's schedule first, the base flags first, CFG first."""
    (schedule, freeze, init, p_uncond, p_cut, steps), k, neg = key
    return (SCHEDULES.index(schedule), FREEZES.index(freeze), INITS.index(init), steps != STAGE_STEPS, steps,
            p_uncond != BASE["p_uncond"], p_uncond, p_cut != BASE["p_cut"], p_cut, k_order(k), NEGATIVES.index(neg))


def label(variant):
    """How a variant reads in the table: progressive (unet frozen), flat (p_uncond 0.2), ..."""
    schedule, freeze, init, p_uncond, p_cut, steps = variant
    notes = {"none": [], "unet": ["unet frozen"], "new-rank": ["only new-rank"]}[freeze]
    notes += [] if init == "zero" else [f"{init} init"]
    notes += [] if p_uncond == BASE["p_uncond"] else [f"p_uncond {p_uncond:g}"]
    notes += [] if p_cut == BASE["p_cut"] else [f"p_cut {p_cut:g}"]
    notes += [] if steps == STAGE_STEPS else [f"steps {steps}"]
    return f"{schedule} ({', '.join(notes)})" if notes else schedule


def report(args):
    """A markdown table (mean ± std over seeds) of every finished cell in --out, and the figure:
    species accuracy against k."""
    results = {}
    for name in sorted(os.listdir(args.out)):
        path = os.path.join(args.out, name, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                r = json.load(f)
            cell = read_cell(r)
            for neg, s in r["scores"].items():
                results.setdefault((variant_of(cell), cell.k, neg), {})[cell.seed] = {**s, **rare_common(r, s)}
    if not results:
        print("no finished cells yet")
        return
    cols = ["species", "rare", "common", "genus", "family", "classifier_fd", "fid", "kid"]
    lines = ["| schedule | k | negative | seeds | " + " | ".join(cols) + " |", "|---" * (4 + len(cols)) + "|"]
    for (variant, k, neg), by_seed in sorted(results.items(), key=lambda item: order(item[0])):
        runs = list(by_seed.values())
        cells_txt = []
        for c in cols:
            v = np.array([r[c] for r in runs if c in r])
            if len(v) == 0:
                cells_txt.append("-")
            elif c in fid.EVAL_RANKS or c in ("rare", "common"):
                cells_txt.append(f"{100 * v.mean():.1f} ± {100 * v.std():.1f}")
            elif c == "kid":
                cells_txt.append(f"{1e3 * v.mean():.2f} ± {1e3 * v.std():.2f}")
            else:
                cells_txt.append(f"{v.mean():.1f} ± {v.std():.1f}")
        lines.append(f"| {label(variant)} | {k} | {neg} | {len(runs)} | " + " | ".join(cells_txt) + " |")
    table = "\n".join(lines) + "\n\naccuracy in %; kid x 1e3; mean ± std (population) over seeds\n\n" \
        + "species accuracy (%), CFG\n\n" + species_table(results) + "\n" + claims(results) + "\n" \
        + variants_table(results)
    sweep = guidance_table(args.out)
    table += "\n" + sweep if sweep else ""
    print(table)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for variant in sorted({key[0] for key in results}, key=lambda v: order((v, "0", "null"))):
        ks = sorted(int(key[1]) for key in results if key[0] == variant and key[2] == "null" and key[1].isdigit())
        if len(ks) > 1:  # a line per variant trained at several k; the others are in the variants table
            acc = [np.array([r["species"] for r in results[(variant, str(k), "null")].values()]) * 100 for k in ks]
            ax.errorbar(ks, [a.mean() for a in acc], yerr=[a.std() for a in acc], marker="o", capsize=3,
                        label=label(variant))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training images per species (k)")
    ax.set_ylabel("species accuracy (%), CFG")
    ax.axhline(100 / 48, color="grey", lw=0.5)
    if ax.get_legend_handles_labels()[0]:  # no line when no variant was trained at several k (the default-budget grid)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.figure, dpi=120)
    print(f"-> {os.path.join(args.out, 'table.md')}, {args.figure}")


def rare_common(result, scores):
    """Species accuracy of the rare and the common species of a long-tailed tree (rare: fewer training images
    than the median species; pairs:64/4 -> the 4-image siblings); nothing for a balanced tree."""
    counts, right = result.get("train_counts"), scores.get("per_species")
    if not counts or not right or len(set(counts)) == 1:
        return {}
    rare, right = fid.rare_species(counts), np.array(right)
    return {"rare": float(right[rare].mean()), "common": float(right[~rare].mean())}


def species_table(results):
    """Species accuracy (%) with CFG, one row per schedule and variant, one column per k: the README's table."""
    ks = sorted({key[1] for key in results}, key=k_order)
    lines = ["| schedule | " + " | ".join(f"k = {k}" for k in ks) + " |", "|---" * (1 + len(ks)) + "|"]
    for variant in sorted({key[0] for key in results}, key=lambda v: order((v, "0", "null"))):
        cols = []
        for k in ks:
            v = np.array([r["species"] for r in results.get((variant, k, "null"), {}).values()]) * 100
            cols.append(f"{v.mean():.1f} ± {v.std():.1f}" if len(v) else "-")
        lines.append(f"| {label(variant)} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def variants_table(results):
    """Every variant, one row per variant and k: species, genus and family accuracy (%) with CFG, and the species
    accuracy paired by seed against the base progressive cell (the same images): what each change does."""
    base = ("progressive", *BASE.values())
    lines = ["| variant | k | seeds | species | species - progressive | genus | family |", "|---" * 7 + "|"]
    for variant, k, neg in sorted(results, key=order):
        if neg != "null":
            continue
        runs, ref = results[(variant, k, neg)], results.get((base, k, neg), {})
        mean = {r: 100 * np.mean([s[r] for s in runs.values()]) for r in ("species", "genus", "family")}
        d = [100 * (runs[seed]["species"] - ref[seed]["species"]) for seed in runs if seed in ref]
        diff = "" if variant == base else f"{np.mean(d):+.1f} ± {np.std(d):.1f} ({len(d)})" if d else "-"
        std = 100 * np.std([s["species"] for s in runs.values()])
        lines.append(f"| {label(variant)} | {k} | {len(runs)} | {mean['species']:.1f} ± {std:.1f} | {diff} | "
                     f"{mean['genus']:.1f} | {mean['family']:.1f} |")
    return ("every variant against progressive, CFG: accuracy in % (mean over seeds), species difference in points "
            "paired by seed, mean ± std (pairs)\n\n" + "\n".join(lines) + "\n")


def claims(results):
    """The claims as paired differences of species accuracy (points): two cells with the same seed trained on
    the same images, so their difference cancels what the seed's images make easy or hard."""
    def diffs(pairs, score="species"):
        d = [100 * (results[a][seed][score] - results[b][seed][score]) for a, b in pairs if a in results
             and b in results for seed in results[a] if seed in results[b] and score in results[a][seed]]
        return f"{np.mean(d):+.1f} ± {np.std(d):.1f} ({len(d)})" if d else "-"

    base = lambda schedule, k, neg="null": ((schedule, *BASE.values()), k, neg)  # noqa: E731
    head = ["progressive - all", "progressive - random", "progressive - flat", "(rare species)", "root - null",
            "parent - null"]
    lines = ["| k | " + " | ".join(head) + " |", "|---" * (1 + len(head)) + "|"]
    for k in sorted({key[1] for key in results}, key=k_order):
        cols = [diffs([(base("progressive", k), base(other, k))]) for other in ("all", "random", "flat")]
        cols.append(diffs([(base("progressive", k), base("flat", k))], "rare"))
        for neg in ("root", "parent"):  # TaxaGuide against CFG, over every schedule that has a hierarchy
            cols.append(diffs([(base(s, k, neg), base(s, k)) for s in ("progressive", "all", "random")]))
        lines.append(f"| {k} | " + " | ".join(cols) + " |")
    return ("species accuracy differences in points, mean ± std over paired runs (how many); "
            "the guidance columns pool progressive, all and random\n\n" + "\n".join(lines) + "\n")


def commit():
    """The git commit the cell was trained with (the tables cite it)."""
    return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def run_cells(args, cells, real, net, clf, clf_tax):
    """Train and score every cell that has no result.json and that no other worker has claimed."""
    for i, cell in enumerate(cells):
        name = cell_name(cell)
        folder = os.path.join(args.out, name)
        result = os.path.join(folder, "result.json")
        os.makedirs(folder, exist_ok=True)
        try:  # claim the cell: creating the file fails if another worker did it first
            os.close(os.open(os.path.join(folder, "claimed"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue
        if os.path.exists(result):
            continue
        t0 = time.time()
        print(f"[{i + 1}/{len(cells)}] {name}: training", flush=True)
        train_cell(args, cell, folder)
        t1 = time.time()
        scores = score_cell(args, folder, real, net, clf, clf_tax)
        print(f"    {name}: {t1 - t0:.0f} s training, {time.time() - t1:.0f} s "
              "scoring: " + ", ".join(f"{neg} species {s['species']:.1%}" for neg, s in scores.items()), flush=True)
        counts = species_counts(cell.k, cell.seed)  # training images of each species, in toy_species() order
        with open(result + ".tmp", "w") as f:
            json.dump({**cell._asdict(), "scores": scores, "train_counts": counts, "commit": commit(),
                       "args": vars(args), "train_s": t1 - t0, "score_s": time.time() - t1}, f, indent=1)
        os.replace(result + ".tmp", result)
        if args.results:  # the scores (never the checkpoints) where git can keep them
            os.makedirs(os.path.join(args.results, name), exist_ok=True)
            shutil.copy(result, os.path.join(args.results, name, "result.json"))


def restore_results(args, cells):
    """A grid resumed in a fresh --out (a new machine, a new session) starts from the scores kept under
    --results: each finished cell's result.json is copied back, so it is skipped, not trained again."""
    for cell in cells if args.results else []:
        kept, result = (os.path.join(d, cell_name(cell), "result.json") for d in (args.results, args.out))
        if os.path.exists(kept) and not os.path.exists(result):
            os.makedirs(os.path.dirname(result), exist_ok=True)
            shutil.copy(kept, result)


def build_parser():
    p = script_parser(__doc__)
    p.add_argument("--schedules", nargs="+", default=["progressive", "flat"], choices=SCHEDULES,
                   help="training schedules, one cell each (progressive and flat first: the largest gap)")
    p.add_argument("--freeze", nargs="+", default=["none"], choices=FREEZES,
                   help="freezing policies of the progressive cells (train.py --freeze); one cell each")
    p.add_argument("--new-rank-init", nargs="+", default=["zero"], choices=INITS,
                   help="how the progressive cells' new rank tables start (train.py --new-rank-init); one cell each")
    p.add_argument("--k", type=per_species, nargs="+", default=["4", "pairs:64/4"],
                   help="train.py --per-species: images per species (4), or a long tail (pairs:64/4, zipf:64)")
    p.add_argument("--seeds", type=nonneg_int, nargs="+", default=[0, 1, 2], help="one cell each")
    p.add_argument("--size", default="small", choices=SIZES, help="UNet size (unet.SIZES)")
    p.add_argument("--stage-steps", type=positive_int_list, nargs="+", default=[STAGE_STEPS],
                   help="train.py --stage-steps, one cell each; the one-stage schedules train the sum "
                        "(default: train.py's, 3,600 steps)")
    p.add_argument("--p-uncond", type=fraction, nargs="+", default=[BASE["p_uncond"]],
                   help="train.py --p-uncond (the whole lineage dropped), one cell each")
    p.add_argument("--p-cut", type=fraction, nargs="+", default=[BASE["p_cut"]],
                   help="train.py --p-cut (the lineage cut at a coarser rank), one cell each")
    p.add_argument("--cooldown", type=fraction, default=0.3,
                   help="train.py --cooldown: the same number of decaying steps in every schedule (train.py's default)")
    p.add_argument("--guidance", type=finite_float, default=3.0, help="guidance scale of the scored samples")
    p.add_argument("--guidance-sweep", type=finite_float, nargs="+", default=None, metavar="SCALE",
                   help="no training: score the finished cells of the selected grid at these scales (CFG)")
    p.add_argument("--n-per-species", type=positive_int, default=8, help="generated images per species and negative")
    p.add_argument("--sample-steps", type=positive_int, default=20, help="DDIM steps of the scored samples")
    p.add_argument("--seed-sampling", type=nonneg_int, default=0, help="seed of the scored samples' noise")
    p.add_argument("--no-fid", action="store_true", help="skip FID/KID (no Inception weights, or to save time)")
    p.add_argument("--parallel", type=positive_int, default=1,
                   help="cells trained at once, each on cpu_count / N threads (2 on 2 cores: 1.2x the throughput)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set by --parallel for its children
    p.add_argument("--quick", action="store_true", help="k = 4, one seed, 20 steps per stage: a pipeline check")
    p.add_argument("--report", action="store_true", help="only write the table and figure")
    p.add_argument("--out", type=output_path, default=os.path.join("out", "claims"),
                   help="each cell trains in a folder of its own under here")
    p.add_argument("--results", type=output_path, default=os.path.join(ROOT, "tests", "benchmarks", "results", "claims"),
                   help="each finished cell's result.json is copied here (committed; --report --out reads it)")
    p.add_argument("--figure", type=output_path, default=None, help="default: <out>/species_vs_k.png")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train and sample: cpu, cuda or cuda:N")
    return p


def main():
    args = build_parser().parse_args()
    if args.quick:
        args.k, args.seeds, args.stage_steps, args.n_per_species, args.sample_steps = ["4"], [0], ["20"], 1, 5
        args.out, args.results = os.path.join(args.out, "quick"), None
    args.figure = args.figure or os.path.join(args.out, "species_vs_k.png")
    os.makedirs(args.out, exist_ok=True)
    if args.report:
        return report(args)
    cells = grid_cells(args)

    # what the generated images are compared with: real toy images from a seed no model trained on
    clf, clf_tax = fid.load_classifier(32, os.path.join(args.out, "taxon_classifier.pt"))
    net = None if args.no_fid else fid.load_inception(device=args.device)
    t_grid = time.time()
    if not args.worker:
        restore_results(args, cells)
        for cell in cells:  # claims left by a run that was killed
            claim = os.path.join(args.out, cell_name(cell), "claimed")
            if os.path.exists(claim) and not os.path.exists(os.path.join(os.path.dirname(claim), "result.json")):
                os.remove(claim)
    # N copies of this script share the cells, each on 1/N of the cores (a guidance sweep runs in one process)
    if args.parallel > 1 and not args.worker and not args.guidance_sweep:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.parallel))}
        workers = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--worker"], env=env)
                   for _ in range(args.parallel)]
        if any(w.wait() for w in workers):
            raise SystemExit("a worker failed: see the stdout.txt of the unfinished cell under " + args.out)
    else:
        real_images, _ = toy_dataset(args.n_per_species, 32, fid.REAL_SEED)
        real = {"clf": fid.classify(clf, real_images)[0],
                "inception": fid.inception_features(net, real_images, "torchmetrics", 50, args.device) if net else None}
        if args.guidance_sweep:
            sweep_guidance(args, real, clf, clf_tax)
        else:
            run_cells(args, cells, real, net, clf, clf_tax)
    print(f"grid: {time.time() - t_grid:.0f} s this run")
    if not args.worker:
        report(args)


if __name__ == "__main__":
    main()
