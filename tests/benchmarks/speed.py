"""
How fast is our UNet against what a reader would otherwise pick, at the same size (a script, not a test).

    python tests/benchmarks/speed.py                  # 2-core CPU, 32x32, fp32: about 25 min when idle
    python tests/benchmarks/speed.py --repeats 1      # a first look
    python tests/benchmarks/speed.py --device cuda    # the same on a GPU (fp32 weights, TF32 matmuls)

On a GPU this script turns on TF32 for matmuls and convolutions; train.py does not enable TF32
for matmuls, so its fp32 steps may be slower than this table's. The table is printed as markdown,
after a line that names the command and the commit.

The peers, used only if they are installed (this script installs nothing; they are not
dependencies of the repository, so give them a venv of their own):

    pip install diffusers denoising-diffusion-pytorch==2.3.4

- diffusers' UNet2DConditionModel, the Stable Diffusion UNet, shrunk to our
  parameter count: cross-attention at the two coarser levels, over the same
  8 context tokens of width 128 (our RankConditioner feeds it);
- lucidrains' classifier-free-guidance Unet (denoising_diffusion_pytorch.
  classifier_free_guidance), shrunk likewise; it has no cross-attention: its
  design conditions on one class id (our 48 species) through an embedding.

What makes it a fair comparison:
- the same diffusion around every network (our q_sample, v-loss and DDIM sampler) and the same
  training step (fused AdamW), so the table compares the networks, not three diffusion libraries;
- the same memory format: on a CPU every network's weights go channels-last (model.to_device, what
  train.py does to ours; it speeds up all three), on a GPU none does;
- guidance as one batch of 2B with one formula for all three (model.guided_eps_fn): the null half is
  our null lineage, diffusers' conditioner fed the null lineage, lucidrains' null class embedding
  (its forward's cond_keep_mask), not its forward_with_cond_scale (two passes and a projected update);
- the work each network does: GFLOP per image (convolutions, matmuls and attention, counted by
  torch.utils.flop_counter on one forward, and on one forward + backward for training), and the
  GFLOP/s each achieves, so "faster" can be told apart from "does less";
- peak memory over what the process held after its imports and building the network, on the same
  functions as the timing (a fresh process per network and measure);
- attention through each network's fastest path: PyTorch's SDPA for ours (UNetConfig(attention_impl=
  "sdpa"): on a GPU it beats our Triton kernel at these sizes, docs/performance.md) and for diffusers,
  lucidrains' own einsums (its 2.3.4 Attend takes flash=False by default).

Each figure is the median of --repeats rounds, each round timing every model in turn so that
machine drift hits them all alike. The load average before and after is printed: on a busy
machine torch's threads wait for each other, steps take many times longer, and the ratios
stop meaning much (docs/performance.md):
- train: one step (noising, forward, backward, AdamW) at batch 32 and 64, in images/s;
- sample: 64 images with 50 DDIM steps, without and with guidance 3 (a batch of 128);
- peak memory: one train step at batch 64, and one guided sampling run, each in a fresh process.
"""
import argparse
import importlib.metadata
import os
import re
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from model import Diffusion, DiffusionConfig, RankConditioner, TaxaDiffusion, guided_eps_fn  # noqa: E402
from plumbing.checkpoints import to_device  # noqa: E402
from plumbing.cli import device_name, positive_int, script_parser  # noqa: E402
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


# -----------------------------------------------------------------------------
# The three networks, each called as model(x_t, t, ids); ids of all zeros is the null condition


class Ours(nn.Module):
    """Our default network (the `small` UNet and its conditioner), with SDPA attention on every device."""
    name = "ours"

    def __init__(self, vocab_sizes):
        super().__init__()
        self.net = TaxaDiffusion(UNetConfig(attention_impl="sdpa"), vocab_sizes)

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
    """lucidrains' classifier-free-guidance Unet, conditioned on the species id; a null lineage
    (species id 0) takes its learned null class embedding, the one its own guidance uses."""
    name = "lucidrains"

    def __init__(self, vocab_sizes):
        super().__init__()
        from denoising_diffusion_pytorch.classifier_free_guidance import Unet
        self.net = Unet(dim=30, num_classes=vocab_sizes[-1], dim_mults=(1, 2, 2), channels=3,
                        attn_dim_head=32, attn_heads=2)

    def forward(self, x, t, ids):
        species = ids[:, -1]
        return self.net(x, t, species, cond_keep_mask=species > 0)  # False: the null class embedding


NETWORKS = {"ours": (None, Ours), "diffusers": ("diffusers", Diffusers),
            "lucidrains": ("denoising_diffusion_pytorch", Lucidrains)}


def installed(name):
    module = NETWORKS[name][0]
    try:
        module and __import__(module)
        return True
    except ImportError:
        return False


def build(name, vocab_sizes, device):
    """A network on `device`, placed as train.py places ours: channels-last weights on a CPU, for every network."""
    return to_device(NETWORKS[name][1](vocab_sizes), device)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# What is timed: the same functions for every network


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
    """DDIM sampling of n images; with `guidance`, scale 3 against the null condition, both halves in one batch."""
    ids = ids_all[torch.arange(n) % len(ids_all)].to(device)
    eps_fn = guided_eps_fn(diffusion, model, ids, 3.0 if guidance else 1.0)  # the same formula for every network

    def run():
        diffusion.sample(eps_fn, (n, 3, SIZE, SIZE), steps=steps, device=device,
                         generator=torch.Generator(device=device).manual_seed(0))
    return run


def jobs_for(model, diffusion, ids_all, device, n_sample, sample_steps):
    """{measure: (callable, images per call, network forwards per image per call)}."""
    jobs = {f"train b{b}": (train_step_fn(model, diffusion, b, ids_all, device), b, 1) for b in (32, 64)}
    for guidance in (False, True):
        jobs[f"sample{' cfg' if guidance else ''}"] = (
            sample_fn(model, diffusion, n_sample, sample_steps, guidance, ids_all, device), n_sample,
            sample_steps * (2 if guidance else 1))
    return jobs


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


# -----------------------------------------------------------------------------
# The work: FLOPs of one forward and of one training forward + backward

# The flop counter knows SDPA's CUDA kernels but not the CPU one that F.scaled_dot_product_attention
# calls here; it does the same work (2 matmuls forward, 4 backward), so count it with the same formulas.
@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward)
def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def gflop_per_image(model, diffusion, ids_all, device, batch=4):
    """GFLOP per image of one forward, and of one training step's forward + backward (about 3 forwards: the
    backward computes the gradient of each layer's input and of its weights). Convolutions, matmuls and attention
    only, the ops that do almost all the arithmetic; norms, activations and the optimizer are not counted."""
    x0 = torch.rand(batch, 3, SIZE, SIZE, device=device) * 2 - 1
    ids = ids_all[:batch].to(device)
    t = torch.full((batch,), 500, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        model(x0, t, ids)
    with FlopCounterMode(display=False) as train:
        diffusion.loss(model, x0, ids, weight="v").backward()
    model.zero_grad(set_to_none=True)
    return forward.get_total_flops() / batch / 1e9, train.get_total_flops() / batch / 1e9


# -----------------------------------------------------------------------------
# Peak memory, in a fresh process per network and measure


def _proc_status_kb(field):
    with open("/proc/self/status") as f:  # VmRSS: resident now; VmHWM: its peak ("high water mark"), in kB
        return int(re.search(rf"^{field}:\s+(\d+)", f.read(), re.M).group(1))


def memory_child(name, what, device, n_sample, sample_steps):
    """Run one measure's function once; print the peak memory it took, in MB, over what the process held
    after its imports and building the network (so neither a library's import nor the weights count)."""
    ids_all, vocab_sizes = toy_ids()
    diffusion = Diffusion(DiffusionConfig()).to(device)
    model = build(name, vocab_sizes, device)  # imports the network's library
    fn = jobs_for(model, diffusion, ids_all, device, n_sample, sample_steps)[what][0]  # the timed call itself
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        print((torch.cuda.max_memory_allocated() - base) / 2 ** 20)
        return
    base = _proc_status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # Linux: reset VmHWM to the current resident set
    fn()
    print((_proc_status_kb("VmHWM") - base) / 1024)


def peak_memory(name, what, device, n_sample, sample_steps):
    out = subprocess.run([sys.executable, __file__, "--rss-child", f"{name},{what}", "--device", device,
                          "--n-sample", str(n_sample), "--sample-steps", str(sample_steps)], capture_output=True, text=True)
    return float(out.stdout.split()[-1]) if out.returncode == 0 else float("nan")


# -----------------------------------------------------------------------------


def build_parser():
    p = script_parser(__doc__)
    p.add_argument("--device", type=device_name, default="cpu", help="where to time: cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=positive_int, default=5, help="rounds; each figure is the median over them")
    p.add_argument("--train-steps", type=positive_int, default=5, help="timed train steps per round and batch size")
    p.add_argument("--n-sample", type=positive_int, default=64, help="images per sampling run")
    p.add_argument("--sample-steps", type=positive_int, default=50, help="DDIM steps per sampling run")
    p.add_argument("--rss-child", default="", help=argparse.SUPPRESS)  # "network,measure": see memory_child
    return p


def table(names, jobs, times, gflop, memory, device):
    """The markdown table: a row per measure, a column per network, then the ratios."""
    lines = ["| measure | " + " | ".join(names) + " | " + " | ".join(f"ours / {n}" for n in names[1:]) + " |",
             "|---" * (2 * len(names)) + "|",
             "| GFLOP per image: forward / train step | " + " | ".join(
                 f"{gflop[n][0]:.2f} / {gflop[n][1]:.2f}" for n in names) + " |" + " |" * (len(names) - 1)]
    for what in sorted({w for w, _ in jobs}, key=lambda w: (not w.startswith("train"), w)):
        med = {n: statistics.median(times[(what, n)]) for n in names}
        cells = []
        for n in names:
            _, images, forwards = jobs[(what, n)]
            if what.startswith("train"):
                rate = images * gflop[n][1] / med[n]
                cells.append(f"{images / med[n]:.1f} img/s, {rate:.0f} GFLOP/s")
            else:
                rate = images * forwards * gflop[n][0] / med[n]
                cells.append(f"{med[n]:.2f} s, {rate:.0f} GFLOP/s")
        ratios = [f"{med[n] / med['ours']:.2f}x" for n in names[1:]]
        lines.append(f"| {what} | " + " | ".join(cells + ratios) + " |")
    for what, peaks in memory.items():
        lines.append(f"| peak {'GPU memory' if device == 'cuda' else 'RSS'}, {what} | "
                     + " | ".join(f"+{peaks[n]:.0f} MB" for n in names) + " |" + " |" * (len(names) - 1))
    return "\n".join(lines)


def main():
    args = build_parser().parse_args()
    device = args.device
    if args.rss_child:
        return memory_child(*args.rss_child.split(","), device, args.n_sample, args.sample_steps)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(0)
    load_before = os.getloadavg()
    ids_all, vocab_sizes = toy_ids()
    diffusion = Diffusion(DiffusionConfig()).to(device)
    names = [n for n in NETWORKS if installed(n)]
    for n in NETWORKS:
        if n not in names:
            print(f"{n}: not installed, skipped (pip install diffusers denoising-diffusion-pytorch==2.3.4)")
    models = {n: build(n, vocab_sizes, device) for n in names}
    print(f"`python {' '.join(sys.argv)}` on {commit()}")
    print(f"{device}: {torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} threads'}, "
          f"torch {torch.__version__}, {SIZE}x{SIZE}, fp32{' with TF32 matmuls' if device == 'cuda' else ''}, "
          f"{'channels-last weights for every network' if device == 'cpu' else 'the default layout for every network'}")
    packages = {"diffusers": "diffusers", "lucidrains": "denoising-diffusion-pytorch"}
    for n, m in models.items():
        version = f", {packages[n]} {importlib.metadata.version(packages[n])}" if n in packages else ""
        print(f"  {n:10s} {n_params(m) / 1e6:.2f} M parameters{version}")
    gflop = {n: gflop_per_image(m, diffusion, ids_all, device) for n, m in models.items()}

    jobs = {}  # (measure, network) -> (callable, images per call, forwards per image per call)
    for n, m in models.items():
        for what, job in jobs_for(m, diffusion, ids_all, device, args.n_sample, args.sample_steps).items():
            jobs[(what, n)] = job
    for fn, _, _ in jobs.values():  # warm-up: first calls allocate, pick kernels, fill caches
        fn()
    times = {key: [] for key in jobs}
    for r in range(args.repeats):
        for (what, n), (fn, _, _) in jobs.items():
            k = args.train_steps if what.startswith("train") else 1
            times[(what, n)].append(timed(fn, device, k) / k)
        print(f"round {r + 1}/{args.repeats} done", flush=True)
    load_after = os.getloadavg()
    memory = {what: {n: peak_memory(n, what, device, args.n_sample, args.sample_steps) for n in names}
              for what in ("train b64", "sample cfg")}

    print("\n" + table(names, jobs, times, gflop, memory, device))
    print(f"(ratios: how many times faster ours is; sampling: {args.n_sample} images, {args.sample_steps} DDIM steps, "
          f"cfg = guidance 3 in one batch; GFLOP/s: the counted work over the measured time; peak memory: over "
          f"imports and weights; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after the timing)")


if __name__ == "__main__":
    main()
