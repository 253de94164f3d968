"""fid.py: the Frechet distance and KID against closed forms, the statistics files, the taxon classifier, and
fid.py on a checkpoint (with stand-ins for the slow networks) or on two image folders. The Inception network
and its weights: test_inception.py."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import train
from fixtures import make_folder_tree
from conftest import inception_stand_in, needs_fid_weights, run_script, toy_checkpoint
from model import Diffusion
from plumbing.inception import inception_features, load_inception
from taxonomy import Taxonomy, species_counts, toy_dataset, toy_species

pytestmark = pytest.mark.usefixtures("private_cache")

# -----------------------------------------------------------------------------
# The Frechet distance and KID


# The eigenvalue form (fid.py's) and pytorch-fid's scipy sqrtm (the reference) pass the same properties.
FRECHET = [fid.frechet_distance, fid.frechet_distance_sqrtm]


@pytest.mark.parametrize("frechet", FRECHET)
def test_frechet_distance_closed_forms(frechet):
    d = 512  # Inception's 2048 costs seconds here and catches nothing more
    assert frechet(np.zeros(d), np.eye(d), np.ones(d), np.eye(d)) == pytest.approx(d, abs=1e-6)
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # diagonal covariances: sum (sqrt a - sqrt b)^2
    assert frechet(np.zeros(3), np.diag(a), np.zeros(3), np.diag(b)) == pytest.approx(expected)


@pytest.mark.parametrize("frechet", FRECHET)
def test_frechet_distance_with_covariances_that_do_not_commute(frechet):
    # For 2 x 2 covariances, tr sqrt(S1 S2) has a closed form without any matrix root: S1 S2 has the eigenvalues
    # of S1^(1/2) S2 S1^(1/2) (positive), and (sqrt l1 + sqrt l2)^2 = tr(S1 S2) + 2 sqrt(det S1 det S2).
    # Rotated ellipses do not commute, so sqrtm(S1) @ sqrtm(S2) in place of sqrtm(S1 @ S2) gives another number.
    def rotated(var, angle):
        c, s = np.cos(angle), np.sin(angle)
        r = np.array([[c, -s], [s, c]])
        return r @ np.diag(var) @ r.T
    s1, s2 = rotated([4.0, 0.25], 0.3), rotated([1.0, 9.0], 1.1)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    m1, m2 = np.array([0.5, -1.0]), np.array([2.0, 0.0])
    tr_root = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_root
    assert frechet(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("frechet", FRECHET)
def test_frechet_distance_self_symmetry_and_scale(frechet):
    rng = np.random.default_rng(0)
    f1, f2 = rng.normal(size=(300, 16)), rng.normal(0.3, 1.5, size=(300, 16))
    s1, s2 = fid.statistics(f1), fid.statistics(f2)
    assert frechet(*s1, *s1) == pytest.approx(0, abs=1e-6)
    d12 = frechet(*s1, *s2)
    assert d12 > 1 and frechet(*s2, *s1) == pytest.approx(d12, rel=1e-9)
    c = 3.0
    assert frechet(*fid.statistics(c * f1), *fid.statistics(c * f2)) == pytest.approx(c ** 2 * d12)


@pytest.mark.parametrize("n, d", [(400, 96), (10, 64), (48, 256)])  # full rank, then singular (fewer images than d)
def test_eigenvalue_form_matches_the_scipy_sqrtm_reference(n, d):
    # Non-commuting, correlated features (a random mixing, then ReLU, as Inception's pool3 is)
    rng = np.random.default_rng(n)
    f1 = np.maximum(rng.normal(size=(n, d)) @ rng.normal(size=(d, d)), 0)
    f2 = np.maximum(rng.normal(0.2, 1.0, size=(n, d)) @ rng.normal(size=(d, d)), 0)
    s1, s2 = fid.statistics(f1), fid.statistics(f2)
    # singular: the reference may have added eps * I before its root (pytorch-fid's retry), which moves it a little
    rel = 1e-9 if n > d else 1e-5
    assert fid.frechet_distance(*s1, *s2) == pytest.approx(fid.frechet_distance_sqrtm(*s1, *s2), rel=rel)


def test_the_reference_retries_a_complex_root_with_an_offset(monkeypatch):
    # 48 images in 256 dimensions: scipy's first root can have an imaginary part of ~1e-2 (whether it
    # does depends on the BLAS and its threads), which pytorch-fid would reject; the first root is
    # refused here in any case, and the eps retry agrees with the eigenvalues of S1 S2 (torchmetrics' form)
    rng = np.random.default_rng(1)
    f1 = np.maximum(rng.normal(size=(48, 256)) @ rng.normal(size=(256, 256)) * 3, 0)
    f2 = np.maximum(rng.normal(size=(48, 256)) @ rng.normal(size=(256, 256)) * 3, 0)
    (m1, s1), (m2, s2) = fid.statistics(f1), fid.statistics(f2)
    calls, real_sqrtm = [], fid.sqrtm_real
    monkeypatch.setattr(fid, "sqrtm_real", lambda a: calls.append(a) or (real_sqrtm(a) if len(calls) > 1 else None))
    eig = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * eig
    assert fid.frechet_distance_sqrtm(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-8)
    assert len(calls) == 2  # the first root, refused, and the retry with eps on the diagonal


@pytest.mark.parametrize("frechet", FRECHET)
@pytest.mark.parametrize("bad", [[[1.0, 0.0], [0.0, -4.0]],  # a negative variance: no real square root
                                 [[1.0, 2.0], [2.0, 1.0]],    # eigenvalues 3 and -1
                                 [[1.0, 0.5], [0.0, 1.0]]])   # not symmetric
def test_frechet_distance_rejects_broken_statistics(frechet, bad):
    with pytest.raises(ValueError, match="not valid covariances"):
        frechet(np.zeros(2), np.array(bad), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="different dimensions"):
        frechet(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_statistics_are_unbiased_float64():
    f = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]], dtype=np.float32)
    mu, sigma = fid.statistics(f)
    assert mu.dtype == np.float64 and np.allclose(mu, [2, 4])
    assert np.allclose(sigma, np.cov(f.astype(np.float64).T, ddof=1))


def test_kid_matches_the_unbiased_formula():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(20, 8)), rng.normal(0.5, 1, size=(20, 8))
    k = lambda a, b: (a @ b / 8 + 1) ** 3  # noqa: E731
    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    mean, std = fid.kernel_inception_distance(x, y, subsets=3, subset_size=m)  # every subset is the whole set
    assert mean == pytest.approx(xx + yy - 2 * xy) and std == pytest.approx(0, abs=1e-12)


def test_kid_of_sets_of_two_sizes_is_the_unbiased_mmd_of_all_their_images():
    # fid.py scores 12 generated images against 96 real ones at a coarse rank: the subsets must draw from all of
    # each set. Averaged over random subsets, the subset estimate is the U-statistic over both whole sets.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(12, 8))
    y = np.concatenate([rng.normal(size=(12, 8)), rng.normal(1.0, 1, size=(24, 8))])  # its last 24 rows shifted
    k = lambda a, b: (a @ b.T / 8 + 1) ** 3  # noqa: E731
    off_diagonal = lambda K: (K.sum() - np.trace(K)) / (len(K) * (len(K) - 1))  # noqa: E731
    whole = off_diagonal(k(x, x)) + off_diagonal(k(y, y)) - 2 * k(x, y).mean()  # 5.81
    first_rows = off_diagonal(k(x, x)) + off_diagonal(k(y[:12], y[:12])) - 2 * k(x, y[:12]).mean()  # 0.09
    mean, std = fid.kernel_inception_distance(x, y, subsets=4000)
    assert abs(mean - whole) < 4 * std / 4000 ** 0.5  # measured 1.3 standard errors; first_rows is 80 away
    assert abs(mean - first_rows) > 40 * std / 4000 ** 0.5
    assert (mean, std) == fid.kernel_inception_distance(x, y, subsets=4000, subset_size=6)  # default: half of 12


def test_kid_near_zero_for_one_distribution():
    rng = np.random.default_rng(3)
    same = fid.kernel_inception_distance(rng.normal(size=(400, 16)), rng.normal(size=(400, 16)), subset_size=200)
    shifted = fid.kernel_inception_distance(rng.normal(size=(400, 16)), rng.normal(1, 1, size=(400, 16)))
    assert abs(same[0]) < 3 * same[1] + 1e-3 and shifted[0] > 0.1


def test_statistics_npz_round_trip(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    fid.save_statistics(tmp_path / "s.npz", mu, sigma, "clean")
    with np.load(tmp_path / "s.npz") as f:  # the keys pytorch-fid reads, and the resize they were made with
        assert set(f) == {"mu", "sigma", "mode"}
    m2, s2 = fid.load_statistics(tmp_path / "s.npz", "clean")
    assert np.array_equal(m2, mu) and np.array_equal(s2, sigma)
    with pytest.raises(ValueError, match=r"s.npz: statistics of images resized with --mode clean; this run resizes "
                                         r"with --mode torchmetrics: give --mode clean, or make the statistics again$"):
        fid.load_statistics(tmp_path / "s.npz", "torchmetrics")
    np.savez(tmp_path / "pytorch_fid.npz", mu=mu, sigma=sigma)  # pytorch-fid's own: no mode, taken as it is
    assert np.array_equal(fid.load_statistics(tmp_path / "pytorch_fid.npz", "torchmetrics")[0], mu)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.load_statistics(tmp_path / "bad.npz")


# -----------------------------------------------------------------------------
# fid.py on image folders and checkpoints


@needs_fid_weights
def test_torchmetrics_documented_example():
    # torchmetrics' FrechetInceptionDistance example: 50 + 50 random uint8 images of 64 x 64 -> 13.5367
    net = load_inception()
    a = torch.randint(255, (50, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(42))
    b = torch.randint(255, (50, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(43))
    fa, fb = inception_features(net, a, "torchmetrics"), inception_features(net, b, "torchmetrics")
    assert fid.frechet_distance(*fid.statistics(fa), *fid.statistics(fb)) == pytest.approx(13.5367, abs=1e-3)


def test_image_sets_that_cannot_give_a_fid_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: inception_stand_in())
    for name, n in [("a", 3), ("one", 1)]:  # folders of 3 images and of 1
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / name / f"{i}.png")
    run = lambda *argv: fid.main(fid.parse_args([*map(str, argv), "--device", "cpu"]))  # noqa: E731
    with pytest.raises(ValueError, match=rf"^{tmp_path}/one: FID needs at least 2 images to estimate a covariance "
                                         r"\(got 1\)$"):
        run(tmp_path / "a", tmp_path / "one")  # was a misleading "not valid covariances", or NaN statistics saved
    run(tmp_path / "a", "--save-stats", tmp_path / "stats")  # exactly that name (np.savez would add .npz)
    assert fid.load_statistics(tmp_path / "stats")[0].shape == (12,) and not (tmp_path / "stats.npz").exists()
    (tmp_path / "a" / "zz.jpg").write_text("not an image")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/a/zz.jpg: cannot read it as an image \(.*\); remove it or "
                                         r"replace it$"):
        run(tmp_path / "a", tmp_path / "a")  # was PIL's UnidentifiedImageError and a stack trace
    np.savez(tmp_path / "nan.npz", mu=np.zeros(3), sigma=np.full((3, 3), np.nan))
    with pytest.raises(ValueError, match=r"nan.npz: expected finite statistics, mu \(d,\) and sigma \(d, d\); found "
                                         r"mu \(3,\) and sigma \(3, 3\) holding NaN or inf$"):
        fid.load_statistics(tmp_path / "nan.npz")


@pytest.mark.parametrize("argv, message", [
    (["a", "a", "--ckpt", "x.pt"], "give one checkpoint, or image folders and .npz files, not both"),
    (["a", "a", "--real", "a"], "argument --real: scores a checkpoint's samples; two folders or .npz files are "
                                "compared as they are"),
    (["a", "a", "--guidance", "5"], "argument --guidance: scores a checkpoint's samples;"),
    (["a", "a", "--guidance", "1", "3"], "argument --guidance: scores a checkpoint's samples;"),  # the default, by hand
    (["a", "a", "--steps", "50"], "argument --steps: scores a checkpoint's samples;"),
    (["a", "a", "--sample-batch", "8"], "argument --sample-batch-size: scores a checkpoint's samples;"),  # abbreviated
    (["a", "--save-stats", "a"], "argument --save-stats: a is a folder; give a file name, e.g. real.npz"),
])
def test_flags_that_would_be_ignored_are_refused(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "x.pt").touch()
    with pytest.raises(SystemExit):
        fid.parse_args(argv)
    assert f"error: {message}" in capsys.readouterr().err


def test_real_statistics_of_another_dimension_are_refused_before_sampling(tmp_path, monkeypatch):
    path, _ = toy_checkpoint(tmp_path, level="order")
    ckpt = torch.load(path, weights_only=True)
    torch.save({**ckpt, "train_config": {**ckpt["train_config"], "data": "birds.csv"}}, path)  # not the toy tree
    np.savez(tmp_path / "real768.npz", mu=np.zeros(768), sigma=np.eye(768))  # pytorch-fid --dims 768
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: inception_stand_in())
    vocab_sizes = [len(v) for v in Taxonomy(ckpt["lineages"]).vocab]  # its own classifier: a stand-in too
    monkeypatch.setattr(fid, "data_classifier", lambda *a, **k: (
        fid.TaxonClassifier(vocab_sizes, (2, 3)).eval(), [2, 3], torch.zeros(2, 3, 16, 16, dtype=torch.uint8),
        torch.zeros(2, 2, dtype=torch.long)))
    monkeypatch.setattr(fid, "draw", lambda *a, **k: pytest.fail("sampled before the statistics were checked"))
    with pytest.raises(ValueError, match=r"real768.npz: statistics of 768-d features; FID here uses Inception's "
                                         r"2048-d pool3"):
        fid.main(fid.parse_args([str(tmp_path / "order.pt"), "--real", str(tmp_path / "real768.npz"),
                                 "--device", "cpu"]))


@needs_fid_weights
def test_cli_two_folders_and_saved_statistics(tmp_path):
    for name, value in [("a", 40), ("b", 200)]:
        (tmp_path / name).mkdir()
        for i in range(4):
            img = np.full((32, 32, 3), value + 5 * i, dtype=np.uint8)
            Image.fromarray(img).save(tmp_path / name / f"{i}.png")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))
    run = lambda *a: run_script("fid.py", *a, "--device", "cpu", cwd=tmp_path, env=env)  # noqa: E731
    p = run("a", "b")
    assert p.returncode == 0, p.stderr
    fd = float(p.stdout.split("FID:")[1].split()[0])
    assert fd > 1 and "KID:" in p.stdout
    assert run("a", "--save-stats", "a.npz").returncode == 0
    p2 = run("a.npz", "b")
    assert float(p2.stdout.split("FID:")[1].split()[0]) == pytest.approx(fd, abs=1e-3)
    p3 = run("a", "missing")
    assert p3.returncode != 0 and "missing" in p3.stderr and "Traceback" not in p3.stderr


# -----------------------------------------------------------------------------
# Taxonomic accuracy


def test_taxon_classifier_names_held_out_toy_species(tmp_path):
    model, taxonomy = fid.load_classifier(32, str(tmp_path / "classifier.pt"), log=lambda s: None)
    images, lineages = toy_dataset(10, 32, fid.REAL_SEED)  # 480 images the classifier never saw
    feats, pred = fid.classify(model, images)
    acc = (pred == fid.rank_targets(taxonomy, lineages)).float().mean(0)  # class, order, family, genus, species
    assert feats.shape == (480, 256)
    assert (acc >= 0.99).all(), dict(zip(fid.EVAL_RANKS, acc.tolist()))


def test_rare_and_common_species_of_a_long_tailed_tree():
    names = [lineage[-1] for lineage, _ in toy_species()]
    assert fid.rare_and_common({"per_species": "64", "seed": 0}, names) is None  # balanced: nothing to split
    rare, rare_counts, common_counts = fid.rare_and_common({"per_species": "pairs:64/4", "seed": 5}, names)
    assert (rare_counts, common_counts) == ([4], [64])
    assert rare.tolist() == [c == 4 for c in species_counts("pairs:64/4", 5)]
    assert rare.reshape(-1, 2).sum(1).tolist() == [1] * 24  # one rare sibling in every genus
    rare, rare_counts, common_counts = fid.rare_and_common({"per_species": "zipf:64", "seed": 0}, names)
    assert 20 <= rare.sum() <= 24 and max(rare_counts) < min(common_counts)  # below the median: the rarer half


def test_long_tailed_checkpoint_reports_rare_and_common_species(tmp_path, monkeypatch, capsys):
    """fid.py on a species checkpoint of a pairs:64/4 tree: one line per guidance row, rare and common apart,
    and the two (equal numbers of images) average to the table's species column."""
    path, taxonomy = toy_checkpoint(tmp_path, per_species="pairs:64/4", seed=3)  # the tree it was trained on
    vocab_sizes = [len(v) for v in taxonomy.vocab]
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: inception_stand_in())
    clf = fid.TaxonClassifier(vocab_sizes).eval()
    monkeypatch.setattr(fid, "load_classifier", lambda *a, **k: (clf, taxonomy))
    # a classifier that names the species right on the rare species' images only: rare 100 %, common 0 %
    rare_names = {lineage[-1] for (lineage, _), c in zip(toy_species(), species_counts("pairs:64/4", 3)) if c == 4}
    real_classify = fid.classify

    def classify(model, imgs, *a):
        feats, pred = real_classify(model, imgs, *a)
        if len(imgs) == 96:  # the generated images: 48 species x 2, in the vocabulary's order
            species = [taxonomy.vocab[-1][i] for i in range(1, 49) for _ in range(2)]
            right = torch.tensor([taxonomy.vocab[-1].index(n) for n in species])
            pred[:, -1] = torch.where(torch.tensor([n in rare_names for n in species]), right, 0)
        return feats, pred
    monkeypatch.setattr(fid, "classify", classify)
    fid.main(fid.parse_args([str(tmp_path / "species.pt"), "--n-per-taxon", "2", "--steps", "2", "--guidance", "1",
                             "3", "--device", "cpu"]))
    out = capsys.readouterr().out
    assert "rare species (4 training images each; 48 images drawn) and of the common ones (64; 48 drawn)" in out
    assert "  no guidance, 2 calls/image: rare 100.0%, common 0.0%" in out  # 2 steps, one branch
    assert "  guidance 3 (null), 4 calls/image: rare 100.0%, common 0.0%" in out  # and the negative branch
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| no guidance")]
    assert rows[0][8] == "50.0%"  # the species column: both halves together


def test_evaluate_checkpoint_prints_one_table(tmp_path, monkeypatch, capsys):
    """The plumbing of `python fid.py --ckpt`, with stand-ins for the slow networks."""
    _, taxonomy = toy_checkpoint(tmp_path, level="order")
    vocab_sizes = [len(v) for v in taxonomy.vocab]
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: inception_stand_in())
    clf = fid.TaxonClassifier(vocab_sizes).eval()
    monkeypatch.setattr(fid, "load_classifier", lambda *a, **k: (clf, taxonomy))
    args = fid.parse_args([str(tmp_path / "order.pt"), "--n-per-taxon", "2", "--steps", "2", "--guidance", "1", "2",
                           "--sampler", "dpm++", "--device", "cpu"])
    samplers = []
    real_sample = Diffusion.sample
    monkeypatch.setattr(Diffusion, "sample", lambda self, *a, **k: samplers.append((k["sampler"], k["clip"])) or
                        real_sample(self, *a, **k))
    fid.main(args)
    out = capsys.readouterr().out
    assert "2 dpm++ steps" in out and set(samplers) == {("dpm++", 1.0)}  # pixels: clamped to [-1, 1]
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| images | n | FID | KID x1e3 | class | order | family | genus | species")
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| real toy images (a 2nd set)", "| no guidance, 2 calls/image",
                                                     "| guidance 2 (null), 4 calls/image"]
    assert rows[2].split(" | ")[1] == "12"  # 6 orders x 2
    assert rows[2].split(" | ")[6:9] == ["-", "-", "-"]  # family, genus, species: finer than the checkpoint
    assert "note: 12 images per row against 96 real ones;" in out  # an order checkpoint, 2 real per species
    assert "root negative" not in out
    torch.save({**torch.load(tmp_path / "order.pt", weights_only=True), "stages": ["order"]}, tmp_path / "first.pt")
    fid.main(fid.parse_args([str(tmp_path / "first.pt"), "--n-per-taxon", "1", "--steps", "1", "--guidance", "3",
                             "--guide-from", "root", "--device", "cpu"]))
    assert ("ends at its first stage (order), so the root negative is each lineage itself and its guided rows are "
            "unguided; use --guide-from null or parent") in capsys.readouterr().out
    with pytest.raises(ValueError, match="order.pt was trained on the toy tree, which draws its own real images: "
                                         "drop --real$"):
        fid.main(fid.parse_args([str(tmp_path / "order.pt"), "--real", str(tmp_path), "--device", "cpu"]))


def test_save_stats_with_a_checkpoint_is_one_line(tmp_path, capsys):
    (tmp_path / "order.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        fid.parse_args([str(tmp_path / "order.pt"), "--save-stats", str(tmp_path / "a.npz")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.endswith("error: argument --save-stats: saves the statistics of an image "
                                              "folder, not of a checkpoint's samples (see --help)\n")


def test_flat_models_are_scored_at_every_rank():
    toy = Taxonomy([lin for lin, _ in toy_species()])
    flat = Taxonomy([train.flat_lineage(lin, 6) for lin, _ in toy_species()])
    i = flat.vocab[6].index("Corvus corax")
    ids = torch.tensor([flat.ancestors(6, i)])  # species id only
    target = fid.toy_targets(toy, flat, ids)[0]
    expected = ["Aves", "Passeriformes", "Corvidae", "Corvus", "Corvus corax"]
    assert [toy.vocab[r][j] for r, j in zip(range(2, 7), target.tolist())] == expected


def test_a_latent_checkpoint_is_sampled_unclamped_and_decoded(tmp_path, monkeypatch, capsys):
    """fid.py on a latent checkpoint: the sampler draws latents with no clamp (clip=None), the autoencoder beside the
    checkpoint decodes them, and its reconstructions of real images are a row of their own."""
    _, taxonomy = toy_checkpoint(tmp_path, level="class", latent=True)
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: inception_stand_in())
    clf = fid.TaxonClassifier([len(v) for v in taxonomy.vocab]).eval()
    monkeypatch.setattr(fid, "load_classifier", lambda *a, **k: (clf, taxonomy))
    clips, shapes, real_sample = [], [], Diffusion.sample
    monkeypatch.setattr(Diffusion, "sample", lambda self, eps_fn, shape, **k: clips.append(k["clip"]) or
                        shapes.append(tuple(shape)) or real_sample(self, eps_fn, shape, **k))
    fid.main(fid.parse_args([str(tmp_path / "class.pt"), "--n-per-taxon", "1", "--steps", "1", "--guidance", "1",
                             "--device", "cpu"]))
    assert clips == [None] and shapes == [(3, 4, 8, 8)]  # 3 classes: latents of 4 x 8 x 8, unclamped
    assert "the 2nd set through the autoencoder (PSNR" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# The taxon classifier of data other than the toy tree


@pytest.fixture
def folder_checkpoint(tmp_path):
    """A checkpoint whose train_config reads a folder tree of 12 toy species (2 images each, 16 px)."""
    data = make_folder_tree(tmp_path / "data", per_species=2)
    path, _ = toy_checkpoint(str(tmp_path), level="species", data=str(data))
    return path, data


def test_the_classifier_of_a_folder_tree_is_rebuilt_when_its_images_change(folder_checkpoint, monkeypatch):
    path, data = folder_checkpoint
    trained = []
    real_train = fid.train_classifier
    monkeypatch.setattr(fid, "train_classifier", lambda *a, **k: trained.append(len(a[0])) or
                        real_train(*a, **{**k, "min_steps": 1, "epochs": 1}))
    ckpt = torch.load(path, weights_only=True)
    clf_path = os.path.join(os.path.dirname(path), "taxon_classifier.pt")
    _, ranks, held, held_y = fid.data_classifier(ckpt, clf_path)
    assert trained == [22] and len(held) == 2  # trained on all but the 2 held-out images
    assert ranks == [2, 3, 4, 5, 6] and held_y.shape == (2, 5) and held_y.gt(0).all()  # in the checkpoint's ids
    fid.data_classifier(ckpt, clf_path)
    assert len(trained) == 1  # the same images: the cached classifier
    first = next(data.rglob("*.png"))
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(first)  # one training image changes
    fid.data_classifier(ckpt, clf_path)
    assert len(trained) == 2


def test_fid_on_a_folder_tree_checkpoint_prints_per_rank_accuracy_beside_the_ceiling(folder_checkpoint, monkeypatch,
                                                                                    capsys):
    path, data = folder_checkpoint
    monkeypatch.setattr(fid, "load_inception", lambda *a, **k: inception_stand_in())
    real_train = fid.train_classifier
    monkeypatch.setattr(fid, "train_classifier", lambda *a, **k: real_train(*a, **{**k, "min_steps": 1}))
    fid.main(fid.parse_args([path, "--real", str(data), "--n-per-taxon", "2", "--steps", "2", "--guidance", "1",
                             "--device", "cpu"]))
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert table[0] == "| images | n | FID | KID x1e3 | class | order | family | genus | species | classifier FD |"
    assert table[2].startswith("| held-out training images (the ceiling) | 2 |")
    assert table[3].startswith("| no guidance, 2 calls/image | 24 |")
    assert all(cell.endswith("%") for cell in table[3].split(" | ")[4:9])  # an accuracy at every rank
    assert "it is not BioCLIP" in out
