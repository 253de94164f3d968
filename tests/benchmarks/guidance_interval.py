"""
Guidance only where it helps: accuracy, FID and network calls of guidance limited to a noise interval (a script).

    python tests/benchmarks/guidance_interval.py --ckpt out/species.pt            # 480 images a row, ~25 min, 2 CPU cores
    python tests/benchmarks/guidance_interval.py --ckpt out/species.pt --no-fid   # accuracy and calls only, ~8 min

Every taxon of the checkpoint's finest rank is drawn --n-per-taxon times with DPM-Solver++ (15 steps, the default
sampler), guidance 3, from the same noise in every row, for each negative (null = CFG, root = TaxaGuide) and each
interval of sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) where guidance applies (model.guided_eps_fn). fid.py's
toy taxon classifier scores family, genus and species; FID is against as many real toy images (Inception pool3).
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fid  # noqa: E402
from model import Diffusion, DiffusionConfig  # noqa: E402
from plumbing.checkpoints import load_checkpoint  # noqa: E402
from plumbing.cli import device_name, nonneg_int, positive_int, script_parser  # noqa: E402
from plumbing.images import draw, to_uint8  # noqa: E402
from plumbing.inception import inception_features, load_inception  # noqa: E402
from taxonomy import RANKS, Taxonomy, toy_dataset  # noqa: E402

# (name, interval): every step; EDM2's interval of Kynkaanniemi et al. (t in [82, 579] on Ho's betas); none at the
# lowest noise; none at the highest; a narrower middle
INTERVALS = [("every step", None), ("[0.28, 5.42]", (0.28, 5.42)), ("[0.28, inf)", (0.28, float("inf"))),
             ("[0, 5.42]", (0.0, 5.42)), ("[1, 5.42]", (1.0, 5.42))]


def main(args):
    model, ckpt = load_checkpoint(args.ckpt, args.device)
    diffusion = Diffusion(DiffusionConfig(**ckpt["diffusion_config"])).to(args.device)
    taxonomy, finest = Taxonomy(ckpt["lineages"]), RANKS.index(ckpt["level"])
    ids = torch.tensor([taxonomy.ancestors(finest, i) for i in range(1, len(taxonomy.vocab[finest]))])
    ids = ids.repeat_interleave(args.n_per_taxon, 0).to(args.device)  # (N, R)
    clf, clf_tax = fid.load_classifier(model.unet.cfg.image_size, os.path.join(os.path.dirname(args.ckpt), "taxon_classifier.pt"))
    target = fid.toy_targets(clf_tax, taxonomy, ids.cpu())
    C, side = model.unet.cfg.in_channels, model.unet.cfg.image_size
    x_T = torch.randn((len(ids), C, side, side), generator=torch.Generator(args.device).manual_seed(args.seed),
                      device=args.device)
    net = None if args.no_fid else load_inception(device=args.device)
    real = None if net is None else inception_features(net, toy_dataset(args.n_per_taxon, side, fid.REAL_SEED)[0])
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    print(f"{args.ckpt}: {len(ids)} images a row, DPM-Solver++ {args.steps} steps, guidance {args.guidance}, "
          f"seed {args.seed}\n\n| negative | sigma interval | family | genus | species | FID | calls/image |\n|---|---|---|---|---|---|---|")
    for guide_from in args.negatives:
        for name, interval in INTERVALS:
            calls.clear()
            images = to_uint8(draw(diffusion, model, ids, x_T, args.guidance, guide_from, RANKS.index(ckpt["stages"][0]),
                                   args.steps, "dpm++", 64, args.seed, interval=interval)).cpu()
            acc = (fid.classify(clf, images)[1] == target).float().mean(0)[2:]  # family, genus, species
            fd = "-" if net is None else f"{fid.frechet_distance(*fid.statistics(inception_features(net, images)), *fid.statistics(real)):.2f}"
            print(f"| {guide_from} | {name} | " + " | ".join(f"{a:.1%}" for a in acc) +
                  f" | {fd} | {sum(calls) / len(ids):g} |", flush=True)


if __name__ == "__main__":
    p = script_parser(__doc__)
    p.add_argument("--ckpt", default="out/species.pt")
    p.add_argument("--n-per-taxon", type=positive_int, default=10)
    p.add_argument("--steps", type=positive_int, default=15)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--negatives", nargs="+", default=["null", "root"], choices=["null", "parent", "root"])
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--no-fid", action="store_true", help="accuracy and calls only (no Inception)")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu")
    main(p.parse_args())
