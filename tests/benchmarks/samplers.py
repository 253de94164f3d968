"""
How many steps does each sampler need? Species accuracy and FID against the number of steps (a script, not a test).

    python tests/benchmarks/samplers.py          # out/species.pt, guidance 3, 480 images a cell: ~40 min, 2 CPU cores
    python tests/benchmarks/samplers.py --steps 5 10 --n-per-species 1     # a first look in a few minutes

Every species of the checkpoint is drawn --n-per-species times (plumbing.images.draw, the noise seeded with --seed)
for each sampler (DDIM; DPM-Solver++(2M), model.py's `dpm_solver`) and each number of steps, guided as sample.py
does by default (null negative: classifier-free guidance). A step is one network call per guidance branch for
both samplers, so a column compares equal work. fid.py scores the images: accuracy of the taxon classifier at the
checkpoint's finest rank (the toy tree's stand-in for BioCLIP), and FID against as many real toy images
(Inception pool3; skipped with a note if its weights are not found).
FID on 480 images is biased upwards: compare it across cells, not with published numbers.

Each cell is printed and added to <out>/samplers.json as soon as it is done; running the same command again
skips the cells already there. At the end: a markdown table and <out>/samplers.png (accuracy and FID vs steps).
"""
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fid  # noqa: E402
from model import Diffusion, DiffusionConfig  # noqa: E402
from plumbing.checkpoints import load_checkpoint  # noqa: E402
from plumbing.images import draw, to_uint8  # noqa: E402
from plumbing.cli import device_name, finite_float, input_path, nonneg_int, output_path, positive_int, script_parser  # noqa: E402
from taxonomy import RANKS, Taxonomy, toy_dataset  # noqa: E402


def load_results(path, settings):
    """The cells done so far, {"ddim-10": {...}, ...}, if they were made with these settings."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    if saved["settings"] != settings:
        raise SystemExit(f"error: {path} holds cells made with {saved['settings']}; this run has {settings}. "
                         "Give another --out, or delete the file to start over")
    return saved["cells"]


def save_results(path, settings, cells):
    with open(f"{path}.tmp", "w") as f:
        json.dump({"settings": settings, "cells": cells}, f, indent=1)
    os.replace(f"{path}.tmp", path)  # a killed run leaves the old file or the new one


def table(cells, samplers, steps, rank):
    lines = [f"| sampler | steps | {rank} accuracy | FID | seconds |", "|---|---|---|---|---|"]
    for sampler in samplers:
        for n in steps:
            c = cells.get(f"{sampler}-{n}")
            if c:
                fd = "-" if c["fid"] is None else f"{c['fid']:.2f}"
                lines.append(f"| {sampler} | {n} | {c['accuracy']:.1%} | {fd} | {c['seconds']:.0f} |")
    return "\n".join(lines)


def figure(cells, samplers, steps, rank, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for sampler in samplers:
        done = [n for n in steps if f"{sampler}-{n}" in cells]
        axes[0].plot(done, [100 * cells[f"{sampler}-{n}"]["accuracy"] for n in done], "o-", label=sampler)
        with_fid = [n for n in done if cells[f"{sampler}-{n}"]["fid"] is not None]
        axes[1].plot(with_fid, [cells[f"{sampler}-{n}"]["fid"] for n in with_fid], "o-", label=sampler)
    for ax, name in zip(axes, [f"{rank} accuracy (%)", "FID"]):
        ax.set_xlabel("steps (network calls per guidance branch)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args):
    args.ckpt = args.ckpt or os.path.join("out", "species.pt")
    model, ckpt = load_checkpoint(args.ckpt, args.device)
    os.makedirs(args.out, exist_ok=True)
    results_path = os.path.join(args.out, "samplers.json")
    if ckpt["train_config"].get("data", "toy") != "toy":
        raise SystemExit(f"error: {args.ckpt} was not trained on the toy tree: the taxon classifier cannot score it")
    settings = {"ckpt": os.path.abspath(args.ckpt), "ckpt_mtime": os.path.getmtime(args.ckpt),  # a retrained one is new
                "n_per_species": args.n_per_species, "guidance": args.guidance, "seed": args.seed}
    cells = load_results(results_path, settings)
    diffusion = Diffusion(DiffusionConfig(**ckpt["diffusion_config"])).to(args.device)
    taxonomy = Taxonomy(ckpt["lineages"])
    level, root_level = RANKS.index(ckpt["level"]), RANKS.index(ckpt["stages"][0])
    size = model.unet.cfg.image_size
    ids = torch.tensor([taxonomy.ancestors(level, i) for i in range(1, len(taxonomy.vocab[level]))])
    ids = ids.repeat_interleave(args.n_per_species, 0)  # (taxa * n, R)

    todo = [(sampler, steps) for sampler in args.samplers for steps in args.steps if f"{sampler}-{steps}" not in cells]
    print(f"{args.ckpt}: {len(ids)} images a cell, guidance {args.guidance:g}, {len(todo)} cells to do "
          f"-> {results_path}")
    net = None
    if todo:
        clf, clf_tax = fid.load_classifier(size, os.path.join(args.out, "taxon_classifier.pt"))
        target = fid.toy_targets(clf_tax, taxonomy, ids)[:, fid.EVAL_RANKS.index(ckpt["level"])]  # (N,)
        try:
            net = fid.load_inception(device=args.device, download=False)
            real, _ = toy_dataset(args.n_per_species, size, fid.REAL_SEED)  # as many real images, as fid.py takes
            real_stats = fid.statistics(fid.inception_features(net, real, device=args.device, desc="inception (real)"))
        except FileNotFoundError as e:
            print(f"note: no FID: {str(e).splitlines()[0]}")

    for sampler, steps in todo:
        t0 = time.time()
        x_T = torch.randn((len(ids), model.unet.cfg.in_channels, size, size),
                          generator=torch.Generator(args.device).manual_seed(args.seed), device=args.device)
        images = to_uint8(draw(diffusion, model, ids.to(args.device), x_T, args.guidance, "null", root_level, steps,
                               sampler, 64, args.seed)).cpu()
        seconds = time.time() - t0  # the sampling alone
        _, pred = fid.classify(clf, images)
        accuracy = (pred[:, fid.EVAL_RANKS.index(ckpt["level"])] == target).float().mean().item()
        fd = None
        if net is not None:
            feats = fid.inception_features(net, images, device=args.device, desc="inception (generated)")
            fd = fid.frechet_distance(*fid.statistics(feats), *real_stats)
        cells[f"{sampler}-{steps}"] = {"accuracy": accuracy, "fid": fd, "seconds": seconds}
        save_results(results_path, settings, cells)
        print(f"{sampler:>6s} {steps:3d} steps: {ckpt['level']} accuracy {accuracy:.1%}, "
              f"FID {'-' if fd is None else f'{fd:.2f}'}, {seconds:.0f} s sampling", flush=True)

    print("\n" + table(cells, args.samplers, args.steps, ckpt["level"]))
    figure(cells, args.samplers, args.steps, ckpt["level"], os.path.join(args.out, "samplers.png"))
    print(f"\n-> {os.path.join(args.out, 'samplers.png')}")


def build_parser():
    p = script_parser(__doc__)
    p.add_argument("--ckpt", type=input_path, default=None, help="the species checkpoint to sample (default: out/species.pt)")
    p.add_argument("--steps", type=positive_int, nargs="+", default=[5, 10, 15, 20, 30, 50],
                   help="numbers of steps (network calls per guidance branch), one cell each")
    p.add_argument("--samplers", nargs="+", choices=["ddim", "ddpm", "dpm++"], default=["ddim", "dpm++"],
                   help="samplers, one cell each")
    p.add_argument("--n-per-species", type=positive_int, default=10, help="images per taxon (48 species x 10 = 480)")
    p.add_argument("--guidance", type=finite_float, default=3.0, help="guidance scale; 1 = none")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the sampling noise")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to sample: cpu, cuda or cuda:N")
    p.add_argument("--out", type=output_path, default="out",
                   help="folder for samplers.json, samplers.png and the taxon classifier")
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
