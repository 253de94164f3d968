"""
How fast is our UNet against what a reader would otherwise pick, at the same size (a script, not a test).

    python tests/benchmarks/speed.py                  # 2-core CPU, 32x32, fp32: about 25 min
    python tests/benchmarks/speed.py --repeats 1      # a first look, about 6 min
    python tests/benchmarks/speed.py --device cuda    # the same on a GPU (fp32 weights, TF32 matmuls)

On a GPU this script turns on TF32 for matmuls and convolutions; train.py does not enable TF32
for matmuls, so its fp32 steps may be slower than this table's. The table is printed as markdown,
after a line that names the command and the commit.

The peers, used only if they are installed (this script installs nothing):

    pip install diffusers denoising-diffusion-pytorch

- diffusers' UNet2DConditionModel, the Stable Diffusion UNet, shrunk to our
  parameter count: cross-attention at the two coarser levels, over the same
  8 context tokens of width 128 (our RankConditioner feeds it);
- lucidrains' classifier-free-guidance Unet (denoising_diffusion_pytorch.
  classifier_free_guidance), shrunk likewise; it has no cross-attention: its
  design conditions on one class id (our 48 species) through an embedding.

Every network gets the same diffusion around it (our q_sample, loss and DDIM
sampler), so the table compares the networks and the training step, not
three diffusion libraries. Measured, with warm-up, as the median of --repeats
rounds, each round timing every model in turn so that machine drift hits
them all alike:
- train: one step (noising, forward, backward, AdamW) at batch 32 and 64, in images/s;
- sample: 64 images with 50 DDIM steps, without and with guidance (guidance
  doubles the batch; lucidrains uses its own forward_with_cond_scale, two passes);
- peak RSS (on a GPU: peak GPU memory) of a separate process that runs one train
  step at batch 64 and a short guided sampling.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from model import Diffusion, DiffusionConfig, RankConditioner, TaxaDiffusion, guided_eps_fn, to_device  # noqa: E402
from model import device_name, positive_int, script_parser  # noqa: E402
from taxonomy import Taxonomy, toy_species  # noqa: E402
from unet import UNetConfig  # noqa: E402

SIZE, CONTEXT_DIM = 32, 128  # the toy tree's images; our default context width


def commit():
    """The short hash of the checked-out commit (with '+changes' when the tree differs), for the table's caption."""
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    try:
        return (git("rev-parse", "--short", "HEAD") or "an unknown commit") + ("+changes" if git("status", "--porcelain") else "")
    except OSError:  # no git
        return "an unknown commit"


def toy_ids():
    """The 48 toy species as lineage ids (48, R), and the vocabulary sizes of each rank."""
    taxonomy = Taxonomy([lineage for lineage, _ in toy_species()])
    leaf = len(taxonomy.vocab) - 1
    ids = torch.tensor([taxonomy.ancestors(leaf, i) for i in range(1, len(taxonomy.vocab[leaf]))])
    return ids, [len(v) for v in taxonomy.vocab]


class Ours(nn.Module):
    """Our default network (the `small` UNet and its conditioner); build_models moves it as train.py does."""
    name = "ours"

    def __init__(self, vocab_sizes):
        super().__init__()
        self.net = TaxaDiffusion(UNetConfig(), vocab_sizes)

    def forward(self, x, t, ids):
        return self.net(x, t, ids)


class Diffusers(nn.Module):
    """diffusers' UNet2DConditionModel over the same 8 rank tokens."""
    name = "diffusers"

    def __init__(self, vocab_sizes):
        super().__init__()
        from diffusers import UNet2DConditionModel
        self.conditioner = RankConditioner(vocab_sizes, CONTEXT_DIM)
        self.net = UNet2DConditionModel(
            sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
            block_out_channels=(32, 56, 56), norm_num_groups=8, cross_attention_dim=CONTEXT_DIM,
            attention_head_dim=2,  # diffusers' name for the number of heads: 2 heads of 28 channels
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))

    def forward(self, x, t, ids):
        return self.net(x, t, encoder_hidden_states=self.conditioner(ids)).sample


class Lucidrains(nn.Module):
    """lucidrains' classifier-free-guidance Unet, conditioned on the species id."""
    name = "lucidrains"

    def __init__(self, vocab_sizes):
        super().__init__()
        from denoising_diffusion_pytorch.classifier_free_guidance import Unet
        self.net = Unet(dim=30, num_classes=vocab_sizes[-1], dim_mults=(1, 2, 2), channels=3,
                        attn_dim_head=32, attn_heads=2)

    def forward(self, x, t, ids, cond_drop_prob=0.0):
        return self.net(x, t, ids[:, -1], cond_drop_prob=cond_drop_prob)


PEERS = {"diffusers": ("diffusers", Diffusers), "lucidrains": ("denoising_diffusion_pytorch", Lucidrains)}


def build_models(vocab_sizes, device):
    models = [Ours(vocab_sizes)]
    for name, (module, cls) in PEERS.items():
        try:
            __import__(module)
        except ImportError:
            print(f"{name}: not installed, skipped (pip install diffusers denoising-diffusion-pytorch)")
            continue
        models.append(cls(vocab_sizes))
    return [to_device(models[0], device)] + [m.to(device) for m in models[1:]]


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def train_step_fn(model, diffusion, batch, ids_all, device):
    """One optimizer step on a fixed random batch: noising, forward, loss, backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # train.py's optimizer, for every network
    g = torch.Generator(device="cpu").manual_seed(0)
    x0 = (torch.rand(batch, 3, SIZE, SIZE, generator=g) * 2 - 1).to(device)
    ids = ids_all[torch.randint(len(ids_all), (batch,), generator=g)].to(device)

    def step():
        loss = diffusion.loss(model, x0, ids, weight="v")  # train.py's loss, the same for every network
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def sample_fn(model, diffusion, n, steps, guidance, ids_all, device):
    """DDIM sampling of n images; guidance 3 against the null condition when `guidance`."""
    ids = ids_all[torch.arange(n) % len(ids_all)].to(device)
    if isinstance(model, Lucidrains) and guidance:  # its own guidance: two passes
        def eps_fn(x, t):
            out, _ = model.net.forward_with_cond_scale(x, t, ids[:, -1], cond_scale=3.0)  # (guided, null)
            return diffusion.eps(lambda *_: out, x, t, ids)  # the network predicts v: turn it into eps
    else:
        eps_fn = guided_eps_fn(diffusion, model, ids, 3.0 if guidance else 1.0)

    def run():
        diffusion.sample(eps_fn, (n, 3, SIZE, SIZE), steps=steps, device=device,
                         generator=torch.Generator(device=device).manual_seed(0))
    return run


def timed(fn, device, n=1):
    """Seconds for n calls of fn."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def rss_child(name, device):
    """Run in a fresh process: one train step at batch 64 and 5 guided sampling steps; print peak RSS in MB."""
    ids_all, vocab_sizes = toy_ids()
    model = {m.name: m for m in (Ours, Diffusers, Lucidrains)}[name](vocab_sizes).to(device)
    diffusion = Diffusion(DiffusionConfig()).to(device)
    train_step_fn(model, diffusion, 64, ids_all, device)()
    ids = ids_all[torch.arange(64) % len(ids_all)].to(device)
    with torch.inference_mode():
        diffusion.sample(guided_eps_fn(diffusion, model, ids, 3.0), (64, 3, SIZE, SIZE), steps=5, device=device)
    if device == "cuda":
        print(torch.cuda.max_memory_allocated() / 2 ** 20)
        return
    with open("/proc/self/status") as f:  # VmHWM: the peak resident set of this process, in kB
        print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024)


def peak_rss(name, device):
    out = subprocess.run([sys.executable, __file__, "--rss-child", name, "--device", device],
                         capture_output=True, text=True)
    return float(out.stdout.split()[-1]) if out.returncode == 0 else float("nan")


def build_parser():
    p = script_parser(__doc__)
    p.add_argument("--device", type=device_name, default="cpu", help="where to time: cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=positive_int, default=5, help="rounds; each figure is the median over them")
    p.add_argument("--train-steps", type=positive_int, default=5, help="timed train steps per round and batch size")
    p.add_argument("--n-sample", type=positive_int, default=64, help="images per sampling run")
    p.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps per sampling run")
    p.add_argument("--rss-child", default="", help=argparse.SUPPRESS)
    return p


def main():
    args = build_parser().parse_args()
    device = args.device
    if args.rss_child:
        return rss_child(args.rss_child, device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    ids_all, vocab_sizes = toy_ids()
    diffusion = Diffusion(DiffusionConfig()).to(device)
    models = build_models(vocab_sizes, device)
    print(f"`python {' '.join(sys.argv)}` on {commit()}")
    print(f"{device}: {torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'}, "
          f"torch {torch.__version__}, {SIZE}x{SIZE}, fp32{' with TF32 matmuls' if device == 'cuda' else ''}")
    for m in models:
        print(f"  {m.name:10s} {n_params(m) / 1e6:.2f} M parameters")

    jobs = {}  # (what, model name) -> (callable, images per call)
    for m in models:
        for batch in (32, 64):
            jobs[(f"train b{batch}", m.name)] = (train_step_fn(m, diffusion, batch, ids_all, device), batch)
        for guidance in (False, True):
            jobs[(f"sample{' cfg' if guidance else ''}", m.name)] = (
                sample_fn(m, diffusion, args.n_sample, args.sample_steps, guidance, ids_all, device), args.n_sample)
    for fn, _ in jobs.values():  # warm-up: first calls allocate, pick kernels, fill caches
        fn()
    times = {key: [] for key in jobs}
    for r in range(args.repeats):
        for (what, name), (fn, _) in jobs.items():
            n = args.train_steps if what.startswith("train") else 1
            times[(what, name)].append(timed(fn, device, n) / n)
        print(f"round {r + 1}/{args.repeats} done", flush=True)

    names = [m.name for m in models]
    print(f"\n| measure | " + " | ".join(names) + " | " + " | ".join(f"ours / {n}" for n in names[1:]) + " |")
    print("|---" * (1 + 2 * len(names) - 1) + "|")
    whats = sorted({w for w, _ in jobs}, key=lambda w: (not w.startswith("train"), w))
    for what in whats:
        med = {n: statistics.median(times[(what, n)]) for n in names}
        if what.startswith("train"):
            cells = [f"{jobs[(what, n)][1] / med[n]:.1f} img/s" for n in names]
        else:
            cells = [f"{med[n]:.2f} s" for n in names]
        ratios = [f"{med[n] / med['ours']:.2f}x" for n in names[1:]]
        print(f"| {what} | " + " | ".join(cells + ratios) + " |")
    rss = {n: peak_rss(n, device) for n in names}
    print(f"| {'peak GPU memory' if device == 'cuda' else 'peak RSS'} | " + " | ".join(f"{rss[n]:.0f} MB" for n in names) + " |" + " |" * (len(names) - 1))
    print(f"(ratios: how many times faster ours is; sampling: {args.n_sample} images, {args.sample_steps} DDIM steps, "
          f"cfg = guidance 3)")


if __name__ == "__main__":
    main()
