"""
Evaluation: FID and KID on Inception pool3 features, and per-rank accuracy of generated species.

    python fid.py out/species.pt                      # every species of the checkpoint, one table (toy tree)
    python fid.py out/species.pt --guidance 1 3 --n-per-taxon 20 --guidance-interval 0.28,5.42
    python fid.py out/mine/species.pt --real my_images/   # your own data: FID against a folder, and accuracy
    python fid.py real_images/ generated_images/      # FID and KID between two folders
    python fid.py real_images/ --save-stats real.npz  # mu and sigma, interchangeable with pytorch-fid's .npz

FID (Heusel et al. 2017) fits a Gaussian to the 2048-d pool3 features of each set of images and measures the
Frechet distance between the two, FID = |mu_1 - mu_2|^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)).
KID (Binkowski et al. 2018) is the unbiased squared MMD with the kernel k(x, y) = (x.y / d + 1)^3, averaged over
random subsets: no bias in the number of images. Both follow the reference implementations exactly: the
TensorFlow FID Inception (plumbing/inception.py) with the reference's resize (--mode), float64 statistics with
the unbiased covariance, and the trace from eigenvalues as torchmetrics does (pytorch-fid's sqrtm beside it).

The taxonomic accuracy is our stand-in for the paper's BioCLIP score: a small CNN with one head per rank says
which taxa it sees in a generated image, and we count how often they match the lineage the image was drawn
for. On the toy tree it learns from many rendered toy images; on other data, from the checkpoint's own
training images, with a held-out split as its ceiling. Its features also give a "classifier Frechet distance"
(not FID). On a long-tailed toy tree the rare and common species are scored apart (the paper's claim 2). A
latent checkpoint's table has one more row: real images through its autoencoder, the best it could draw.

Read next: tests/ (docs/testing.md says what each file checks), or docs/ for the measured record.
"""
import argparse
import hashlib
import io
import math
import os
import sys
import warnings

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Diffusion, DiffusionConfig
from plumbing.checkpoints import atomic_write, finest_checkpoint, load_checkpoint
from plumbing.cli import add_sampling_flags, input_path, output_path, positive_int, script_parser
from plumbing.images import draw, from_uint8, load_folder, psnr, to_uint8
from plumbing.inception import MODES, cached_features, inception_features, load_inception
from plumbing.latent import autoencoder_of, reconstruct
from plumbing.readers import load_data
from taxonomy import RANKS, Taxonomy, normalize, species_counts, toy_dataset, toy_species

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
# Taxonomic accuracy: a small CNN with one head per rank that names the taxa it sees in an image. On the toy
# tree it learns from freshly rendered toy images (a seed the diffusion model never saw); on other data, from
# the checkpoint's own training images, minus a held-out split (the classifier's ceiling). Cached in out/.

EVAL_RANKS = RANKS[2:]  # the toy tree's: class .. species (kingdom is one, and phylum follows from class)
TOY_RANKS = tuple(RANKS.index(r) for r in EVAL_RANKS)  # as indices
TOY_LINEAGES = {tuple(lineage) for lineage, _ in toy_species()}
CLASSIFIER_SEED = 1000  # toy images the classifier learns from; also its weights' and batches' seed
REAL_SEED = 2000  # toy images that stand in for "real" in FID and in the held-out accuracy


class TaxonClassifier(nn.Module):
    """Images in [-1, 1], (B, 3, H, W) -> (features (B, 256), logits per rank [(B, V_r) for r in ranks])."""

    def __init__(self, vocab_sizes, ranks=TOY_RANKS, width=32):
        super().__init__()

        def block(cin, cout):  # a 3x3 conv, then halve the resolution
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))
        self.body = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten(),  # (B, 4w * 4 * 4): keeps where a trait is
                                  nn.Linear(4 * width * 16, 256), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(256, vocab_sizes[r]) for r in ranks])

    def forward(self, x):
        f = self.body(x)
        return f, [head(f) for head in self.heads]


def rank_targets(taxonomy, lineages, ranks=TOY_RANKS):
    """Lineages (names) -> ids (N, len(ranks)) in `taxonomy`'s vocabulary, 0 where it does not know a name."""
    return torch.tensor([[taxonomy.index[r].get(normalize(lin[r] or ""), 0) for r in ranks] for lin in lineages])


def train_classifier(images, y, vocab_sizes, ranks, epochs=4, batch_size=128, min_steps=0, log=print):
    """Train a TaxonClassifier on uint8 images (N, 3, H, W) with targets y (N, len(ranks)); id 0 is not a target."""
    torch.manual_seed(CLASSIFIER_SEED)
    model = TaxonClassifier(vocab_sizes, ranks)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    per_epoch = max(1, len(images) // batch_size)
    steps = max(epochs * per_epoch, min_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(images))
        i = order[(step % per_epoch) * batch_size:][:batch_size]
        x = from_uint8(torch.as_tensor(images[i.numpy()]))
        x = torch.where(torch.rand(len(i), 1, 1, 1) < 0.5, x.flip(-1), x)  # flips: the diffusion model learned them
        _, logits = model(x)
        loss = sum(F.cross_entropy(l, y[i, r], ignore_index=0) for r, l in enumerate(logits) if y[i, r].any())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"classifier step {step}/{steps}: loss {loss.item():.4f}")
    return model.eval()


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
    """uint8 images (N, 3, H, W) -> (features (N, 256) float64, predicted ids (N, len(ranks)))."""
    feats, preds = [], []
    for i in range(0, len(images), batch_size):
        f, logits = model(from_uint8(torch.as_tensor(images[i:i + batch_size])))
        feats.append(f.double())
        preds.append(torch.stack([l.argmax(1) for l in logits], 1))
    return torch.cat(feats).numpy(), torch.cat(preds)


def cached_classifier(path, key, lineages, ranks, train, min_steps=0, log=print):
    """The classifier saved at `path` if it was made from the same `key`, else train() -> (images, targets), trained
    on them and saved (atomically) with the taxonomy of `lineages`. Returns (model, taxonomy)."""
    taxonomy = Taxonomy(lineages)
    vocab_sizes = [len(v) for v in taxonomy.vocab]
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("key") == key:
            model = TaxonClassifier([len(v) for v in Taxonomy(saved["lineages"]).vocab], saved["ranks"])
            model.load_state_dict(saved["model"])
            return model.eval(), Taxonomy(saved["lineages"])
        log(f"{path} was trained on other images; training it again")
    log(f"training the taxon classifier -> {path}")
    model = train_classifier(*train(taxonomy), vocab_sizes, ranks, min_steps=min_steps, log=log)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = io.BytesIO()
    torch.save({"model": model.state_dict(), "lineages": taxonomy.lineages(), "ranks": list(ranks), "key": key}, data)
    atomic_write(path, data.getbuffer())
    return model, taxonomy


def load_classifier(image_size=32, path="out/taxon_classifier.pt", log=print):
    """The toy tree's classifier for this image size, trained (under a minute on CPU) on 100 toy images a species."""
    images, lineages = toy_dataset(100, image_size, CLASSIFIER_SEED)
    return cached_classifier(path, f"toy {image_size} px, seed {CLASSIFIER_SEED}", lineages, TOY_RANKS,
                             lambda taxonomy: (images, rank_targets(taxonomy, lineages)), log=log)


def data_classifier(ckpt, path, log=print):
    """For a checkpoint not trained on the toy tree: a classifier of its own training images (read again as
    train.py read them), at the ranks of its stages, keyed by those images; and the held-out split it never saw
    (5 %, 2 to 500, fixed by the run's seed): (model, ranks, held-out images, their targets)."""
    cfg, taxonomy = ckpt["train_config"], Taxonomy(ckpt["lineages"])
    first, finest = RANKS.index(ckpt["stages"][0]), RANKS.index(ckpt["level"])
    ranks = [r for r in range(first, finest + 1) if taxonomy.size(r)]  # every rank it names, first stage to level
    images, lineages, _ = load_data(cfg["data"], cfg["image_size"], cfg["per_species"], cfg["seed"], cfg["format"],
                                    cfg["top_rank"], cfg["columns"], cfg["image_root"], cfg["boxes"],
                                    os.path.dirname(path) or ".")
    y = rank_targets(taxonomy, lineages, ranks)  # (N, len(ranks)), in the checkpoint's ids
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg["seed"]))
    n_held = max(2, min(500, len(images) // 20))  # two at least: FID needs a covariance
    held, train = order[:n_held], order[n_held:]
    key = hashlib.sha256(np.ascontiguousarray(images).tobytes() + y.numpy().tobytes() + str(ranks).encode())
    model, _ = cached_classifier(path, key.hexdigest(), ckpt["lineages"], ranks,
                                 lambda _: (images[train.numpy()], y[train]), min_steps=100, log=log)
    return model, ranks, torch.as_tensor(images[held.numpy()]), y[held]


# -----------------------------------------------------------------------------
# Evaluating a checkpoint: n images per taxon of its finest rank, for each
# guidance scale, against n real images per toy species; one markdown table.


def evaluate_checkpoint(args):
    """fid.py's default: draw n images of every taxon of the checkpoint's finest rank for each guidance scale,
    then print one table of FID, KID and (on the toy tree) the classifier's accuracy at every rank, with real
    toy images (and, on latents, their reconstructions) as the floor."""
    model, ckpt = load_checkpoint(args.ckpt, args.device)
    autoencoder = autoencoder_of(ckpt, args.ckpt, args.device)  # a latent checkpoint's, from beside it; None in pixels
    diffusion = Diffusion(DiffusionConfig(**ckpt["diffusion_config"])).to(args.device)
    taxonomy = Taxonomy(ckpt["lineages"])
    finest, root_rank = RANKS.index(ckpt["level"]), RANKS.index(ckpt["stages"][0])
    toy = ckpt["train_config"]["data"] == "toy" or (ckpt["train_config"]["extend"] and  # a toy model taught new
                                                    {tuple(x) for x in ckpt["lineages"]} <= TOY_LINEAGES)  # toy species
    if not toy and args.real is None:
        raise ValueError(f"{args.ckpt} was not trained on the toy tree: give the real images with --real DIR_OR_NPZ")
    if toy and args.real is not None:
        raise ValueError(f"{args.ckpt} was trained on the toy tree, which draws its own real images: drop --real")

    # every taxon of the finest trained rank, n_per_taxon times: (N, R)
    taxa = range(1, len(taxonomy.vocab[finest]))  # id 0 is "unknown"
    ids = torch.tensor([taxonomy.ancestors(finest, i) for i in taxa]).repeat_interleave(args.n_per_taxon, 0)
    print(f"{args.ckpt}: {len(taxa)} {RANKS[finest]} x {args.n_per_taxon} = {len(ids)} images per row, "
          f"{args.steps} {args.sampler} steps, --mode {args.mode}")
    if args.guide_from == "root" and finest <= root_rank:  # e.g. class.pt: its lineages are their own root
        print(f"note: {args.ckpt} ends at its first stage ({RANKS[root_rank]}), so the root negative is each lineage "
              "itself and its guided rows are unguided; use --guide-from null or parent")
    net = load_inception(args.inception, args.device)
    size = autoencoder.cfg.image_size if autoencoder else model.unet.cfg.image_size  # of the images, in pixels
    ref = toy_reference(args, net, size, len(ids), autoencoder) if toy else real_reference(args, net, size, ckpt)
    rows, tail = ref["rows"], []  # (name, n, FID features, accuracies, classifier features); species right per image
    C, side = model.unet.cfg.in_channels, model.unet.cfg.image_size  # pixels, or latents
    lo_hi = args.guidance_interval
    interval = f", sigma in [{lo_hi[0]:g}, {lo_hi[1]:g}]" if lo_hi else ""
    x_T = torch.randn((len(ids), C, side, side), generator=torch.Generator(args.device).manual_seed(args.seed),
                      device=args.device)
    calls = []  # the batch size of every network call: their sum / N is the calls per image
    model.register_forward_hook(lambda module, inputs, output: calls.append(len(inputs[0])))
    for scale in args.guidance:
        calls.clear()
        images = to_uint8(draw(diffusion, model, ids.to(args.device), x_T, scale, args.guide_from, root_rank,
                               args.steps, args.sampler, args.sample_batch_size, args.seed, autoencoder,
                               f"sampling (guidance {scale:g})", args.guidance_interval)).cpu()
        feats = inception_features(net, images, args.mode, args.batch_size, args.device, "inception (generated)")
        name = "no guidance" if scale == 1 else f"guidance {scale:g} ({args.guide_from}{interval})"
        name += f", {sum(calls) / len(ids):g} calls/image"
        cf, pred = classify(ref["clf"], images)
        target = toy_targets(ref["clf_tax"], taxonomy, ids) if toy else ids[:, ref["ranks"]]
        acc = (pred == target).float().mean(0)
        acc[target.eq(0).all(0)] = float("nan")  # ranks below the checkpoint's finest: not asked for
        if toy and RANKS[finest] == "species":
            tail.append((name, (pred[:, -1] == target[:, -1]).numpy()))
        rows.append((name, len(images), feats, acc, cf))

    print_table(rows, ref["real_f"], ref["real_cf"], ref.get("real_stats"), [RANKS[r] for r in ref["ranks"]])
    if not toy:
        print("The taxon classifier has seen only this checkpoint's training images (it is not BioCLIP); its "
              "accuracy on the held-out ones is the ceiling a generated image can reach.")
    if tail and (split := rare_and_common(ckpt["train_config"], [taxonomy.vocab[finest][i] for i in ids[:, finest]])):
        print_long_tail(tail, *split)


def toy_reference(args, net, size, n, autoencoder):
    """The toy tree's floor: a real set for FID and KID, and a second real set scored as a row (encoded and
    decoded too, on latents); their features are cached beside the checkpoint. Also the taxon classifier."""
    clf, clf_tax = load_classifier(size, os.path.join(os.path.dirname(args.ckpt) or ".", "taxon_classifier.pt"))
    real_set, _ = toy_dataset(args.n_per_taxon, size, REAL_SEED)  # one real set for FID and KID...
    if len(real_set) != n:  # a checkpoint above species: its rows are not scored at the real row's n
        print(f"note: {n} images per row against {len(real_set)} real ones; FID's small-sample bias grows "
              f"as n falls, so compare these rows with each other, not with the real row")
    cache = os.path.dirname(args.ckpt) or "."  # the real sets' features are kept beside the checkpoint
    real_f = cached_features(net, real_set, args.mode, args.batch_size, args.device, "inception (real)", cache)
    second, lineages = toy_dataset(args.n_per_taxon, size, REAL_SEED + 1)  # ...and a second one: the floor
    sets = [("real toy images (a 2nd set)", second)]
    if autoencoder:  # the 2nd set encoded and decoded: the best a latent model can draw
        rec = reconstruct(autoencoder, second, args.device)
        sets.append((f"the 2nd set through the autoencoder (PSNR {psnr(second, rec):.2f} dB)", rec))
    rows = []
    for name, images in sets:
        feats = cached_features(net, images, args.mode, args.batch_size, args.device, f"inception ({name})", cache)
        cf, pred = classify(clf, images)
        rows.append((name, len(images), feats, (pred == rank_targets(clf_tax, lineages)).float().mean(0), cf))
    return dict(rows=rows, real_f=real_f, real_cf=classify(clf, real_set)[0], clf=clf, clf_tax=clf_tax,
                ranks=TOY_RANKS)


def real_reference(args, net, size, ckpt):
    """--real: a folder of images (at the generated images' resolution, not the folder's own) or saved statistics;
    and the checkpoint's own classifier, with its held-out training images as a row: the accuracy ceiling."""
    clf, ranks, held, held_y = data_classifier(ckpt, os.path.join(os.path.dirname(args.ckpt) or ".",
                                                                  "taxon_classifier.pt"))
    held_cf, pred = classify(clf, held)
    held_f = inception_features(net, held, args.mode, args.batch_size, args.device, "inception (held out)")
    ref = dict(rows=[("held-out training images (the ceiling)", len(held), held_f, (pred == held_y).float().mean(0),
                      held_cf)], real_f=None, real_cf=held_cf, clf=clf, ranks=ranks)
    if str(args.real).endswith(".npz"):
        mu, sigma = load_statistics(args.real, args.mode)
        if mu.shape != (2048,):  # e.g. pytorch-fid --dims 768: said now, not after the sampling
            raise ValueError(f"{args.real}: statistics of {len(mu)}-d features; FID here uses Inception's "
                             "2048-d pool3 (pytorch-fid's default --dims 2048)")
        return {**ref, "real_stats": (mu, sigma)}
    real = load_folder(args.real, size)
    return {**ref, "real_f": inception_features(net, real, args.mode, args.batch_size, args.device)}


def print_table(rows, real_f, real_cf, real_stats=None, ranks=EVAL_RANKS):
    """One markdown table: a row (name, n, Inception features, accuracies at `ranks`, classifier features)
    against the real images' features real_f (FID and KID), or their saved (mu, sigma) real_stats (FID only)."""
    head = ["images", "n", "FID", "KID x1e3"] + list(ranks) + ["classifier FD"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name, count, feats, acc, cf in rows:
        if real_f is not None:
            fd = frechet_distance(*statistics(feats), *statistics(real_f))
            kid, kid_std = kernel_inception_distance(feats, real_f)
            kid_s = f"{1e3 * kid:.2f} ± {1e3 * kid_std:.2f}"
        else:
            fd, kid_s = frechet_distance(*statistics(feats), *real_stats), "-"
        accs = ["-" if math.isnan(a) else f"{a:.1%}" for a in acc]
        print(f"| {name} | {count} | {fd:.2f} | {kid_s} | " + " | ".join(accs) +
              f" | {frechet_distance(*statistics(cf), *statistics(real_cf)):.2f} |")
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
    """The command line; each flag's type (plumbing/cli.py) says what it takes."""
    p = script_parser(__doc__)
    p.add_argument("inputs", nargs="*", type=input_path,
                   help="two image folders or .npz files; or one checkpoint (.pt)")
    p.add_argument("--n-per-taxon", type=positive_int, default=10,
                   help="images generated per taxon of the finest rank")
    add_sampling_flags(p, "one table row per scale; 1 = off", nargs="+")
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
    return p


# flags that only mean something for a checkpoint's samples; with two folders they would be silently ignored
SAMPLING_FLAGS = ("real", "guidance", "n_per_taxon", "steps", "sampler", "guide_from", "guidance_interval", "seed",
                  "sample_batch_size")


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


if __name__ == "__main__":
    try:
        main(parse_args())
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
