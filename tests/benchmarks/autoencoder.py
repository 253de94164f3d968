"""
Which loss keeps the autoencoder's edges sharp? train.py --latent's autoencoder stage, once per edge loss, each
scored on toy images it never saw (a script, not a test).

    python tests/benchmarks/autoencoder.py                   # 64 px, f = 4; gradient, ssim, fft, none (~25 min each
                                                             # on 2 busy CPU cores; two in parallel: see docs)
    python tests/benchmarks/autoencoder.py --edge-loss gradient --ae-steps 100 --n-per-species 2   # a first look

Each autoencoder is the one `python train.py --latent --image-size 64 --ae-edge-loss LOSS --out OUT/LOSS` trains
(model.autoencoder_stage, with the same flags and seed), so a run given that --out reuses it. It is scored on
toy images of another seed (fid.REAL_SEED, --n-per-species of each species), encoded (the posterior mean) and
decoded: PSNR; how often the taxon classifier (fid.py's, at this image size) names each rank right; and the
edge error, how far the reconstructions' finite differences (their edges) are from the originals', relative to
the originals' (0 = every edge as it was; a blurred edge and a speckle both count). Each score is kept in
OUT/LOSS/score.json (a rerun skips it); the table lists every one in OUT.
"""
import json
import os
import sys
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import fid  # noqa: E402
import train  # noqa: E402
from plumbing.images import psnr  # noqa: E402
from plumbing.latent import AUTOENCODER_FLAGS, autoencoder_config, autoencoder_stage, load_autoencoder, reconstruct  # noqa: E402
from plumbing.signals import catch_stop_signals  # noqa: E402
from plumbing.cli import device_name, downsampling_factor, nonneg_int, output_path, positive_float, positive_int, script_parser  # noqa: E402
from taxonomy import toy_dataset  # noqa: E402

LOSSES = ("gradient", "ssim", "fft", "none")


def edges(x):
    """The horizontal and vertical finite differences of uint8 images (N, 3, H, W), as float."""
    x = x.float()
    return x[..., 1:] - x[..., :-1], x[..., 1:, :] - x[..., :-1, :]  # (N, 3, H, W-1), (N, 3, H-1, W)


def edge_error(images, rec):
    """sum |d rec - d images| / sum |d images| over both directions' finite differences d."""
    diff = sum((a - b).abs().sum() for a, b in zip(edges(rec), edges(images)))
    return (diff / sum(a.abs().sum() for a in edges(images))).item()


def score(ae_path, size, n_per_species, clf_path, device):
    """PSNR, accuracy per rank and sharpness of the autoencoder's reconstructions of unseen toy images."""
    ae, ckpt = load_autoencoder(ae_path, device)
    images, lineages = toy_dataset(n_per_species, size, fid.REAL_SEED)
    rec = reconstruct(ae, images, device)
    clf, clf_tax = fid.load_classifier(size, clf_path)
    _, pred = fid.classify(clf, rec)
    _, pred_real = fid.classify(clf, images)
    target = fid.rank_targets(clf_tax, lineages)
    return {"psnr": psnr(images, rec), "held_out_psnr": ckpt["psnr"],
            "accuracy": dict(zip(fid.EVAL_RANKS, (pred == target).float().mean(0).tolist())),
            "accuracy_originals": dict(zip(fid.EVAL_RANKS, (pred_real == target).float().mean(0).tolist())),
            "edge_error": edge_error(images, rec), "images": len(images)}


def table(scores):
    lines = ["| edge loss | PSNR (dB) | species acc. | genus acc. | edge error | train.py's held-out PSNR |",
             "|---|---|---|---|---|---|"]
    for loss, s in scores.items():
        lines.append(f"| {loss} | {s['psnr']:.2f} | {s['accuracy']['species']:.1%} | {s['accuracy']['genus']:.1%} | "
                     f"{s['edge_error']:.3f} | {s['held_out_psnr']:.2f} |")
    first = next(iter(scores.values()), None)
    if first:
        lines.append(f"| (the originals) | - | {first['accuracy_originals']['species']:.1%} | "
                     f"{first['accuracy_originals']['genus']:.1%} | 0 | - |")
    return "\n".join(lines)


def main(args):
    base = train.TrainConfig(latent=True, image_size=args.image_size, latent_f=args.latent_f, ae_steps=args.ae_steps,
                             ae_lr=args.ae_lr, ae_crop=args.ae_crop, seed=args.seed, device=args.device)
    dataset = None
    for loss in args.edge_loss:
        cfg = replace(base, ae_edge_loss=loss, out=os.path.join(args.out, loss))
        done = os.path.join(cfg.out, "score.json")
        if os.path.exists(done):
            continue
        os.makedirs(cfg.out, exist_ok=True)
        dataset = dataset or train.load_dataset(cfg)[0]
        with open(os.path.join(cfg.out, "train.log"), "a") as log:
            ae, signum = autoencoder_stage(cfg, autoencoder_config(cfg), dataset, AUTOENCODER_FLAGS, log,
                                           stop=catch_stop_signals())
        if signum:
            raise SystemExit(128 + signum)
        s = score(os.path.join(cfg.out, "autoencoder.pt"), args.image_size, args.n_per_species,
                  os.path.join(args.out, "taxon_classifier.pt"), args.device)
        with open(done, "w") as f:
            json.dump(s, f, indent=1)
        print(f"{loss}: PSNR {s['psnr']:.2f} dB, species {s['accuracy']['species']:.1%}, "
              f"edge error {s['edge_error']:.3f}", flush=True)
    scores = {}
    for loss in LOSSES:
        path = os.path.join(args.out, loss, "score.json")
        if os.path.exists(path):
            with open(path) as f:
                scores[loss] = json.load(f)
    print("\n" + table(scores))


def build_parser():
    p = script_parser(__doc__)
    p.add_argument("--edge-loss", nargs="+", choices=LOSSES, default=list(LOSSES), help="the losses to compare")
    p.add_argument("--image-size", type=positive_int, default=64, help="toy image side")
    p.add_argument("--latent-f", type=downsampling_factor, default=4, help="downsampling factor: 2, 4 or 8")
    p.add_argument("--ae-steps", type=positive_int, default=train.TrainConfig.ae_steps, help="autoencoder steps")
    p.add_argument("--ae-lr", type=positive_float, default=train.TrainConfig.ae_lr, help="autoencoder learning rate")
    p.add_argument("--ae-crop", type=nonneg_int, default=train.TrainConfig.ae_crop, help="crop side (0: whole images)")
    p.add_argument("--n-per-species", type=positive_int, default=10, help="unseen toy images per species to score")
    p.add_argument("--seed", type=nonneg_int, default=0, help="train.py's --seed")
    p.add_argument("--out", type=output_path, default=os.path.join("out", "autoencoders"),
                   help="one --out per loss below it, and the classifier")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N")
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
