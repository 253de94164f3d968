"""
Would the tests notice? Plant plausible bugs, one at a time, in a copy of the code, and run the tests on each.

    python tests/benchmarks/mutations.py             # every mutation against its test files: ~20 min on 2 CPU cores
    python tests/benchmarks/mutations.py --list      # what the tests guard, without running anything
    python tests/benchmarks/mutations.py --only eta-ignored cosine-no-square
    python tests/benchmarks/mutations.py --full      # each against the whole suite (hours): the strict version

A mutation "survives" when the tests still pass with the bug in: then no test checks that line's behaviour,
and one should be written (a property from the papers, not a copy of the line). Each mutation names the test
files that are meant to catch it, to keep the run short; --full runs the whole suite for each instead.
The script exits with status 1 if any mutation survives, so it can guard a refactor.

MUTATIONS is the list: (name, file, the exact text to replace, what replaces it, test files). Every text must
occur exactly once in its file; if the code moves on, the script says which one no longer applies.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL, UNET, TRAIN, SAMPLE, FID = (f"tests/test_{m}.py" for m in ("model", "unet", "train", "sample", "fid"))
IMAGES, LATENT = "tests/test_images.py", "tests/test_latent.py"

MUTATIONS = [
    # --- the samplers (model.py, Diffusion.timesteps / ddim / dpm_solver)
    ("ddim-never-reaches-0", "model.py",
     "return torch.linspace(self.T - 1, 0, steps, device=self.beta.device).round().long()",
     "return torch.linspace(self.T - 1, 1, steps, device=self.beta.device).round().long()", [MODEL]),
    ("ddim-timesteps-shifted", "model.py",
     "return torch.linspace(self.T - 1, 0, steps, device=self.beta.device).round().long()",
     "return (torch.linspace(self.T - 1, 0, steps, device=self.beta.device).round().long() + 1).clamp(max=self.T - 1)",
     [MODEL]),
    ("eta-1-without-minus-sigma2", "model.py",
     "(1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps", "(1 - a_prev).clamp(min=0).sqrt() * eps", [MODEL]),
    ("eta-ignored", "model.py", "sigma = eta * (", "sigma = 0.0 * (", [MODEL]),
    ("eta-always-1", "model.py", "eta=1.0 if sampler == \"ddpm\" else 0.0", "eta=1.0", [MODEL]),
    ("dpm-solver-first-order-only", "model.py", "D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev", "D = x0",
     [MODEL]),
    ("dpm-solver-ratio-taken-as-1", "model.py", "r = (lam[i] - lam[i - 1]) / h", "r = 1.0", [MODEL]),
    ("x0-not-clipped", "model.py", "x0 = x0.clamp(-clip, clip)  # ...kept", "x0 = x0  # ...kept", [MODEL]),
    ("latents-clamped", "plumbing/images.py", "clip=None if autoencoder else 1.0", "clip=1.0", [IMAGES, SAMPLE]),
    # --- the noise schedules and the loss (model.py)
    ("cosine-no-square", "model.py", "/ (1 + s) * math.pi / 2) ** 2", "/ (1 + s) * math.pi / 2)", [MODEL]),
    ("linear-ends-at-0.04", "model.py", "torch.linspace(1e-4, 0.02, T", "torch.linspace(1e-4, 0.04, T", [MODEL]),
    ("q-sample-roots-swapped", "model.py", "return a.sqrt() * x0 + (1 - a).sqrt() * eps",
     "return (1 - a).sqrt() * x0 + a.sqrt() * eps", [MODEL]),
    ("v-to-eps-swapped", "model.py", "return (1 - a).sqrt() * x_t + a.sqrt() * out",
     "return a.sqrt() * x_t + (1 - a).sqrt() * out", [MODEL]),
    ("v-weight-inverted", "model.py", "err = err / self.alpha_bar[t]", "err = err * self.alpha_bar[t]", [MODEL]),
    ("loss-drops-the-lineage", "model.py", "self.eps(model, self.q_sample(x0, t, eps), t, ids)",
     "self.eps(model, self.q_sample(x0, t, eps), t, 0 * ids)", [MODEL]),
    # --- the conditioning and guidance (model.py)
    ("rank-tokens-not-summed", "model.py", "tokens = (e * known).cumsum(dim=1) + self.rank_vec",
     "tokens = (e * known) + self.rank_vec", [MODEL]),
    ("unknown-rank-not-masked", "model.py", "tokens = (e * known).cumsum(dim=1)", "tokens = e.cumsum(dim=1)", [MODEL]),
    ("guidance-sign", "model.py", "return eps_neg + scale * (eps_c - eps_neg)",
     "return eps_c + scale * (eps_neg - eps_c)", [MODEL]),
    ("guidance-interval-ignored", "model.py", "if interval is not None and not interval[0] <=",
     "if False and not interval[0] <=", [MODEL]),
    ("sigma-without-the-root", "model.py", "return ((1 - self.alpha_bar[t]) / self.alpha_bar[t]).sqrt().item()",
     "return ((1 - self.alpha_bar[t]) / self.alpha_bar[t]).item()", [MODEL]),
    ("parent-is-the-lineage-itself", "model.py", "return cut_lineage(ids, deepest_rank(ids) - 1)",
     "return cut_lineage(ids, deepest_rank(ids))", [MODEL, SAMPLE]),
    ("dropout-never-drops", "model.py", "torch.where(draws[0] < p_uncond, -1,", "torch.where(draws[0] < 0, -1,",
     [MODEL, TRAIN]),
    ("cut-depth-from-the-drop-draw", "model.py", "random_rank = (draws[1] * deepest", "random_rank = (draws[0] * deepest",
     [MODEL]),
    ("parent-is-a-fixed-rank", "model.py", "return cut_lineage(ids, deepest_rank(ids) - 1)",
     "return cut_lineage(ids, ids.shape[1] - 2)", [MODEL]),
    # --- the autoencoder (unet.py) and the latent cache (plumbing/latent.py)
    ("ae-kl-averaged-not-summed", "unet.py", "- 1 - logvar).sum(dim=(1, 2, 3)).mean() / pixels",
     "- 1 - logvar).mean() / pixels", [UNET]),
    ("ae-kl-std-for-variance", "unet.py", "kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar)",
     "kl = 0.5 * (mean ** 2 + (0.5 * logvar).exp() - 1 - logvar)", [UNET]),
    ("ae-reparameterised-with-the-variance", "unet.py", "self.decode(mean + (0.5 * logvar).exp() * noise)",
     "self.decode(mean + logvar.exp() * noise)", [UNET]),
    ("latent-cache-unscaled", "plumbing/latent.py",
     "ae.to_latent(from_uint8(torch.as_tensor(images[i:i + batch_size]).to(device))).cpu()",
     "ae.encode(from_uint8(torch.as_tensor(images[i:i + batch_size]).to(device)))[0].cpu()", [LATENT]),
    # --- the training loop's wiring (train.py, plumbing/randomness.py)
    ("lineage-not-cut-at-the-stage", "train.py", "ids = cut_lineage(ids.to(device), finest)", "ids = ids.to(device)",
     [TRAIN]),
    ("no-condition-dropout", "train.py", "ids = condition_dropout(ids, cfg.p_uncond, cfg.p_cut, draws=draws)",
     "ids = ids", [TRAIN]),
    ("dropout-rates-swapped", "train.py", "ids = condition_dropout(ids, cfg.p_uncond, cfg.p_cut, draws=draws)",
     "ids = condition_dropout(ids, cfg.p_cut, cfg.p_uncond, draws=draws)", [TRAIN]),
    ("no-mirror-flip", "train.py",
     "x0 = torch.where(flip.view(-1, 1, 1, 1), x0.to(device).flip(-1), x0.to(device))", "x0 = x0.to(device)",
     [TRAIN]),
    ("rank-tables-at-the-base-lr", "train.py", "\"lr\": cfg.lr * cfg.embed_lr_mult", "\"lr\": cfg.lr", [TRAIN]),
    ("ema-without-warm-up", "train.py", "min(cfg.ema_decay, (1 + step) / (10 + step))", "cfg.ema_decay", [TRAIN]),
    ("loss-weight-flag-ignored", "train.py", "weight=cfg.loss_weight)", "weight=\"v\")", [TRAIN]),
    ("noise-schedule-flag-ignored", "train.py", "Diffusion(DiffusionConfig(**stage.header[\"diffusion_config\"]))",
     "Diffusion(DiffusionConfig())", [TRAIN]),
    ("new-rank-not-zeroed", "train.py", "torch.nn.init.zeros_(model.conditioner.embed[r].weight)", "pass", [TRAIN]),
    ("random-schedule-keeps-full-lineages", "train.py",
     "ids = cut_lineage(ids, stage_ranks[0] + (depth * (finest - stage_ranks[0] + 1)).long())", "ids = ids", [TRAIN]),
    ("timesteps-half-the-range", "plumbing/randomness.py", "t = torch.randint(0, DiffusionConfig.timesteps, (B,),",
     "t = torch.randint(0, DiffusionConfig.timesteps // 2, (B,),", [TRAIN]),
    # --- sampling a lineage (sample.py)
    ("root-is-always-class", "sample.py", 'root_rank = RANKS.index(ckpt["stages"][0])', "root_rank = 2", [SAMPLE]),
    ("refine-skips-the-first-stage", "sample.py", "levels = range(min(root_rank, deepest), deepest + 1)",
     "levels = range(min(root_rank, deepest) + 1, deepest + 1)", [SAMPLE]),
    # --- the metrics (fid.py)
    ("fid-product-of-roots", "fid.py", "covmean = sqrtm_real(sigma1 @ sigma2)\n",
     "covmean = sqrtm_real(sigma1) @ sqrtm_real(sigma2)\n", [FID]),
    ("fid-reference-trace-without-2", "fid.py", "- 2 * np.trace(covmean))", "- np.trace(covmean))", [FID]),
    ("fid-trace-without-2", "fid.py", "- 2 * tr_covmean)", "- tr_covmean)", [FID]),
    ("fid-eigenvalues-of-the-unsymmetric-product", "fid.py", "np.linalg.eigvalsh(root1 @ sigma2 @ root1)",
     "np.linalg.eigvalsh(sigma1 @ sigma2)", [FID]),
    ("fid-sigma-for-its-root", "fid.py", "root1 = (v * np.sqrt(w.clip(min=0))) @ v.T", "root1 = sigma1", [FID]),
]


def copy_tree(dst):
    """The tracked and untracked (not ignored) files, as git sees them: no venv, no out/."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dst, f)) or dst, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))


def run_mutation(mutation, work, full, timeout):
    """'caught' (some test failed), 'survived' (all passed), or why it could not be tried."""
    name, path, old, new, tests = mutation
    original = open(os.path.join(ROOT, path)).read()
    if original.count(old) != 1:
        return f"not applied: the text occurs {original.count(old)} times in {path} (update MUTATIONS)"
    with open(os.path.join(work, path), "w") as f:
        f.write(original.replace(old, new))
    try:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *(["tests"] if full else tests)]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "caught (the tests timed out)"
    finally:
        with open(os.path.join(work, path), "w") as f:
            f.write(original)
    if proc.returncode == 0:
        return "survived"
    failed = [ln.split(" - ")[0].replace("FAILED ", "") for ln in proc.stdout.splitlines() if ln.startswith("FAILED")]
    return f"caught by {failed[0] if failed else 'an error (exit ' + str(proc.returncode) + ')'}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", metavar="NAME", help="run these mutations only")
    p.add_argument("--full", action="store_true", help="run the whole suite for each mutation, not its test files")
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per mutation's test run")
    args = p.parse_args()
    names = [m[0] for m in MUTATIONS]
    unknown = set(args.only or []) - set(names)
    if unknown:
        p.error(f"unknown mutation {', '.join(sorted(unknown))}; --list shows them")
    chosen = [m for m in MUTATIONS if not args.only or m[0] in args.only]
    if args.list:
        for name, path, old, new, tests in chosen:
            print(f"{name:32s} {path}: {old.strip()!r} -> {new.strip()!r}  [{', '.join(tests)}]")
        return
    survived = []
    with tempfile.TemporaryDirectory() as work:
        copy_tree(work)
        print("| mutation | result | seconds |\n|---|---|---|")
        for m in chosen:
            t0 = time.time()
            result = run_mutation(m, work, args.full, args.timeout)
            print(f"| {m[0]} | {result} | {time.time() - t0:.0f} |", flush=True)
            if not result.startswith("caught"):
                survived.append(m[0])
    print(f"\n{len(chosen) - len(survived)} of {len(chosen)} mutations caught"
          + (f"; not caught: {', '.join(survived)}" if survived else ""))
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
