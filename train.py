"""
Train TaxaDiffusion stage by stage: coarse ranks first, then one finer rank per stage.

    python train.py --level order      # trains the class stage, then the order stage (~5 min on 2 CPU cores)
    python train.py --level species    # continues down to species, reusing out/class.pt and out/order.pt
    python train.py --data train.json --image-size 64   # your own data (README: Training on your own data)
    torchrun --nproc_per_node=4 train.py --level species    # the same in 4 processes (GPUs), one DDP model
    python train.py --level species --schedule flat --out out/flat   # an ablation: species ids only, one stage

Stage `order` conditions on the lineage down to order (kingdom, phylum, class,
order) and starts from the weights of the stage before it. A missing earlier
stage is trained first. Each stage writes out/<level>.pt (plain data, opens
with torch.load(weights_only=True)) and out/<level>.png: one row per taxon of
that rank, drawn with the EMA weights and a fixed seed.

While a stage trains, out/<level>.last.pt holds all it needs to carry on
(weights, EMA, optimizer, step, random states); it is rewritten every
--save-every steps and on Ctrl-C or SIGTERM. Running the same command again
resumes from it and ends with the same weights, bit for bit on a CPU, as a run
that was never stopped.

Read next: sample.py.
"""
import argparse
import contextlib
import copy
import inspect
import math
import os
import random
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from model import (Diffusion, DiffusionConfig, TaxaDiffusion, condition_dropout, cut_lineage,
                   guided_eps_fn, save_checkpoint, save_grid, to_device, update_ema)
from taxonomy import FORMATS, RANKS, DataError, TaxonDataset, Taxonomy, build_taxonomy, load_data, normalize
from unet import SIZES, UNetConfig
from model import (CheckpointError, device_name, finite_float, fraction, input_path, nonneg_int, output_path,
                   positive_float, positive_int, positive_int_list, read_checkpoint, size_multiple)


@dataclass
class TrainConfig:
    level: str = "order"  # train every stage down to this rank
    first_level: str = "class"  # the first stage; coarser ranks (kingdom, phylum) are folded into it
    steps: int = 0  # if not 0, every stage trains this many optimizer steps (overrides --stage-steps)
    batch_size: int = 32  # images per step, over all processes (torchrun)
    lr: float = 1e-3  # AdamW learning rate, after warm-up (a small UNet takes a large one)
    warmup: int = 100  # steps of linear learning-rate warm-up at the start of each stage
    cooldown: float = 0.3  # the last stage's final fraction of steps decays the learning rate linearly to 0
    #   (0.3 of the species stage: species accuracy 87.9 -> 91.0 %, family and genus +2.5, at no cost; README)
    embed_lr_mult: float = 30.0  # learning rate of the rank embedding tables = lr * this
    grad_clip: float = 1.0  # max gradient norm, as in the paper
    ema_decay: float = 0.995  # EMA of the weights, used for every picture
    p_uncond: float = 0.1  # probability of dropping the whole lineage (for guidance)
    p_cut: float = 0.2  # probability of cutting the lineage at a random coarser rank
    loss_weight: str = "v"  # v: the v-MSE, eps-MSE / alpha_bar_t (see Diffusion.loss); eps: Algorithm 1's eps-MSE
    stage_steps: str = "200,200,600,800,1800"  # steps of the 1st, 2nd, ... stage; the last number repeats
    size: str = "small"  # named UNet size, see unet.SIZES
    image_size: int = 32  # images are resized to image_size x image_size
    per_species: int = 64  # toy images per species (the few-shot knob)
    data: str = "toy"  # "toy", a folder tree, a .csv/.tsv table or an iNaturalist .json (README: your own data)
    format: str = "auto"  # reader of --data; auto = from what the path is (see taxonomy.FORMATS)
    top_rank: str = "auto"  # folder trees: rank of the top folders; auto = by family endings, else leaves = species
    columns: str = ""  # tables: our=their column names, e.g. "image=file,species=scientific_name"
    image_root: str = ""  # tables and iNat JSON: the folder image paths start from (default: the table's folder)
    boxes: str = ""  # FishNet: bounding-box JSON {file stem: {x, y, w, h}}; each box crops its image
    conflicts: str = "error"  # a taxon under two parents: error, or keep-first (warn, follow the first parent)
    workers: int = min(8, os.cpu_count() or 1)  # processes decoding images on the first pass (then cached in --out)
    schedule: str = "progressive"  # progressive: stage by stage, coarse to fine. One stage with the same total
    #   steps: all (every rank from step 0), random (each example cut at a random rank), flat (species ids only)
    freeze: str = "none"  # progressive stages after the first train: none = everything, unet = only the conditioner,
    #   cross-attention and the pooled token, new-rank = only the new rank's table (as the official code)
    new_rank_init: str = "zero"  # a progressive stage's new rank table: zero (each new taxon starts as its parent)
    #   or random (N(0, 1), as the tables of a one-stage schedule start)
    seed: int = 0  # seeds the toy data, the weights, the batches and the grids
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda or cuda:N; cuda when a GPU is visible
    out: str = "out"  # checkpoints, grids and the log go here
    guidance: float = 3.0  # guidance scale of the grids (1 = none)
    guide_from: str = "null"  # negative branch of the grids' guidance: null, parent or root (see sample.py)
    grid_cols: int = 8  # samples per row of the grids
    grid_steps: int = 20  # DDIM steps of the grids
    save_every: int = 200  # rewrite out/<level>.last.pt every this many steps (0: only on Ctrl-C or SIGTERM)
    amp: bool = False  # bf16 autocast, CUDA only (a CPU without bf16 hardware runs it many times slower)
    compile: bool = False  # torch.compile the network (for GPUs: on 2 CPU cores, 157 s to compile, then 3 % faster)
    attention: str = "auto"  # auto (the Triton kernel on CUDA, SDPA elsewhere), triton, sdpa or torch: see
    #   unet.attention. On an H100 sdpa trains the default network 18 % faster (README, "The fused attention kernel")


def stage_plan(taxonomy, first_level, level):
    """Ranks to train, coarse to fine: first_level, then every finer rank that splits a taxon, down to level."""
    first, last = RANKS.index(first_level), RANKS.index(level)
    while taxonomy.size(first) == 0 and first < last:  # data that starts below first_level (e.g. at order)
        first += 1
    if last < first:
        raise SystemExit(f"error: --level {level} is coarser than the first stage --first-level {first_level}")
    return [first] + [r for r in taxonomy.stage_ranks() if first < r <= last]


SCHEDULES = ("progressive", "all", "random", "flat")


def schedule_stages(cfg, plan):
    """(level, steps) of each stage to train. progressive trains the plan's stages one after another;
    the other schedules train one stage, at the finest rank, for as many steps as all of them."""
    given = [int(n) for n in cfg.stage_steps.split(",")]  # the fine traits take longer
    steps = [cfg.steps or given[min(i, len(given) - 1)] for i in range(len(plan))]
    if cfg.schedule == "progressive":
        return list(zip(plan, steps))
    return [(plan[-1], sum(steps))]


def lr_factor(s, steps, warmup, cooldown):
    """Learning rate of step s + 1 of `steps`, as a fraction of --lr: linear warm-up over `warmup` steps,
    then constant, then a linear decay to 0 over the last `cooldown` steps."""
    warm = min(1.0, (s + 1) / warmup)
    return min(warm, (steps - s) / cooldown) if cooldown else warm


def flat_lineage(lineage):
    """The flat baseline's label: the leaf name alone at its rank, no hierarchy above it."""
    leaf = max(r for r, name in enumerate(lineage) if name)
    return tuple(name if r == leaf else None for r, name in enumerate(lineage))


def trainable(name, freeze, new_ranks):
    """Whether parameter `name` trains in a progressive stage after the first, under policy `freeze`."""
    if freeze == "unet":  # what reads the lineage: the tables, the cross-attention, the pooled-token projection
        return name.startswith("conditioner.") or ".cross." in name or name.startswith("unet.pooled.")
    if freeze == "new-rank":
        return any(name == f"conditioner.embed.{r}.weight" for r in new_ranks)
    return True


# -----------------------------------------------------------------------------
# Randomness that a resumed run draws again: every draw is a function of (seed, stage, step)


def seeded_generator(*key, device="cpu"):
    """A torch.Generator seeded by a tuple of ints such as (seed, stage, step); nearby keys give unrelated streams."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))


def stage_batches(n, batch_size, seed, level, first, last, rank=0, world=1):
    """The indices of this process's part of the global batch of each step from `first` to `last`.

    Epoch e is a permutation of the n images drawn from (seed, stage, e), and each
    step takes the next batch_size of it (the incomplete tail is dropped), so a
    batch depends on its step alone: a resumed run, or one on another number of
    processes, sees the same global batches. Process `rank` of `world` takes the
    rank-th of `world` equal parts (our DistributedSampler).
    """
    share = batch_size // world
    for step in range(first, last + 1):
        epoch, i = divmod(step - 1, n // batch_size)
        if i == 0 or step == first:  # a new epoch, or the first step after a resume
            # key (seed, stage, 0, epoch); the loop's draws use (seed, stage, 1, step): two separate streams
            order = torch.randperm(n, generator=seeded_generator(seed, level, 0, epoch))
        yield order[i * batch_size:(i + 1) * batch_size][rank * share:(rank + 1) * share].tolist()


def rng_states():
    """The global generators' states as plain data: the loop draws from its own, but dropout and user code may not."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]), "python": random.getstate()}


def set_rng_states(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])


# -----------------------------------------------------------------------------
# Checkpoints that fit this run, taxa matched by name


# Flags a resumed stage may change: where it runs, how often it saves, its grids, and the arithmetic
# (--amp, --compile, --attention). Any other flag changes what the stage computes, so it must match to resume.
FREE_ON_RESUME = ("level", "device", "out", "save_every", "amp", "compile", "attention",
                  "guidance", "guide_from", "grid_cols", "grid_steps", "workers")


def network_configs(cfg):
    """The UNet and diffusion configs of a run; checkpoints store them as dicts (sample.py needs no flags)."""
    return (UNetConfig(in_channels=3, image_size=cfg.image_size, attention_impl=cfg.attention, **SIZES[cfg.size]),
            DiffusionConfig())


def check_checkpoint(ckpt, path, cfg, taxonomy, resuming):
    """Stop with one line if the checkpoint at `path` cannot continue this run, naming what differs."""
    fix = f"use the flags it was trained with, another --out, or delete {path}"
    if ckpt.get("ranks") != list(RANKS):
        ranks = "/".join(ckpt["ranks"]) if ckpt.get("ranks") else "not recorded (an older train.py)"
        raise SystemExit(f"error: {path} has ranks {ranks}, this run {'/'.join(RANKS)}; {fix}")
    ours, theirs = set(map(tuple, taxonomy.lineages())), set(map(tuple, ckpt["lineages"]))
    if ours != theirs:
        def some(lineages):
            return f"{len(lineages)} (e.g. '{'/'.join(n for n in min(lineages, key=str) if n)}')"
        diffs = ([f"lineages only in the data: {some(ours - theirs)}"] if ours - theirs else []) + \
                ([f"lineages only in the checkpoint: {some(theirs - ours)}"] if theirs - ours else [])
        raise SystemExit(f"error: {path} was trained on another taxonomy ({'; '.join(diffs)}); {fix}")
    train_keys = [k for k in asdict(cfg) if k not in FREE_ON_RESUME] if resuming else ["size", "image_size"]
    for k in train_keys:
        flag = "--" + k.replace("_", "-")
        if k not in ckpt["train_config"]:  # written by a train.py that had no such flag
            raise SystemExit(f"error: {path} was written before {flag} existed, so this train.py cannot resume "
                             f"it; delete it to train this stage again, or finish it with the train.py that wrote it")
        if ckpt["train_config"][k] != getattr(cfg, k):
            raise SystemExit(f"error: {path} was trained with {flag} {ckpt['train_config'][k]}, "
                             f"this run has {flag} {getattr(cfg, k)}; {fix}")
    for what, config in zip(("unet_config", "diffusion_config"), network_configs(cfg)):
        for k, v in asdict(config).items():
            if k != "attention_impl" and ckpt[what].get(k) != v:  # the attention path computes the same function
                raise SystemExit(f"error: {path} has {what} {k}={ckpt[what].get(k)}, this run {k}={v}; {fix}")
    if resuming and ckpt["vocab"] != taxonomy.vocab:  # its optimizer state is in its own id order
        raise SystemExit(f"error: {path} numbers the taxa in another order than the data lists them; "
                         f"delete it to train this stage again")


def by_name(state, vocab, taxonomy):
    """A model state dict whose rank tables are reordered from the checkpoint's ids to ours.

    A taxon's id is its position in a vocabulary, which follows the order the data
    happened to list the taxa in; its name does not. vocab[r][j] is the name the
    checkpoint gave id j at rank r, so row j of its table moves to our id of that name.
    """
    state = dict(state)
    for r, names in enumerate(vocab):
        theirs = {normalize(name): j for j, name in enumerate(names)}
        rows = [theirs[normalize(name)] for name in taxonomy.vocab[r]]  # check_checkpoint: the same names
        state[f"conditioner.embed.{r}.weight"] = state[f"conditioner.embed.{r}.weight"][rows]
    return state


# -----------------------------------------------------------------------------
# Processes (torchrun), Ctrl-C


def start_processes(cfg):
    """Under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK) join the other processes: NCCL, one GPU
    each, or gloo on the CPU. Returns (rank, world size, cfg with this process's device)."""
    if "RANK" not in os.environ:
        return 0, 1, cfg
    on_gpu = cfg.device.startswith("cuda")
    dist.init_process_group("nccl" if on_gpu else "gloo")
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        cfg = replace(cfg, device=f"cuda:{os.environ['LOCAL_RANK']}")
    return dist.get_rank(), dist.get_world_size(), cfg


def catch_stop_signals():
    """Ctrl-C (SIGINT) and SIGTERM (preemption) only note the signal; the loop saves and stops after its step.

    A second Ctrl-C stops at once (the last checkpoint is still whole). Returns the list of signals seen.
    """
    seen = []

    def note(signum, frame):
        seen.append(signum)
        signal.signal(signum, signal.SIG_DFL)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, note)
    return seen


@torch.no_grad()
def draw_stage_grid(model, diffusion, taxonomy, level, root_level, cfg, path):
    """One row per taxon of rank `level`, the same noise in every row (so columns compare), EMA weights."""
    rows = range(1, len(taxonomy.vocab[level]))
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed)
    x_T = torch.randn((cfg.grid_cols, model.unet.cfg.in_channels, cfg.image_size, cfg.image_size),
                      generator=gen, device=cfg.device)  # (cols, C, H, W): the same noise in every row
    chunk = max(1, 64 // cfg.grid_cols)  # rows per sampling batch (the CPU is fastest on small batches)
    images = []
    for first in range(0, len(rows), chunk):
        taxa = rows[first:first + chunk]
        ids = torch.tensor([taxonomy.ancestors(level, i) for i in taxa for _ in range(cfg.grid_cols)], device=cfg.device)
        eps_fn = guided_eps_fn(diffusion, model, ids, cfg.guidance, cfg.guide_from, root_level)
        noise = x_T.repeat(len(taxa), 1, 1, 1)  # (len(taxa) * cols, C, H, W)
        images.append(diffusion.sample(eps_fn, noise.shape, steps=cfg.grid_steps, x_T=noise, device=cfg.device))
    save_grid(torch.cat(images), path, cfg.grid_cols, labels=[taxonomy.vocab[level][i] for i in rows])


def train_stage(cfg, level, steps, stages, dataset, taxonomy, prev_path, log, rank, world, stop):
    """Train one stage: condition on ranks 0..level, start from the previous stage's weights.

    Resumes from out/<level>.last.pt when it exists. Returns the number of the
    signal that stopped it (SIGINT, SIGTERM), or None once out/<level>.pt is written.
    """
    name, device = RANKS[level], cfg.device
    path, last_path = os.path.join(cfg.out, f"{name}.pt"), os.path.join(cfg.out, f"{name}.last.pt")
    torch.manual_seed(cfg.seed + level)  # the same initial weights in every process
    unet_config, diffusion_config = network_configs(cfg)
    vocab_sizes = [len(v) for v in taxonomy.vocab]
    model = to_device(TaxaDiffusion(unet_config, vocab_sizes), device)
    # From scratch, the first stage's ranks start random; every finer rank's table starts at zero and
    # stays zero (it is never looked up) until its stage begins: a new taxon starts as its parent.
    for r in range(level + 1, len(RANKS)):
        torch.nn.init.zeros_(model.conditioner.embed[r].weight)
    ema = copy.deepcopy(model).requires_grad_(False)
    diffusion = Diffusion(diffusion_config).to(device)
    n_params = sum(p.numel() for p in model.parameters())

    # The rank tables get a larger step: a new rank's table starts at zero and has one stage to
    # move from "same as the parent" to "different", while the UNet keeps what it learned.
    tables = list(model.conditioner.embed.parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("conditioner.embed.")]
    # fused=True: one kernel for every tensor's update (CPU and CUDA), 4x faster than the per-tensor loop
    opt = torch.optim.AdamW([{"params": others}, {"params": tables, "lr": cfg.lr * cfg.embed_lr_mult}],
                            lr=cfg.lr, weight_decay=0.0, fused=True)
    cool = round(cfg.cooldown * steps) if level == stages[-1] else 0  # only the last stage cools down
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg.warmup, cool))
    # Each process its own seed for anything that draws from the global generator (dropout, if a UNet has it).
    torch.manual_seed(cfg.seed + level + 1000 * (rank + 1))

    start, source = 0, prev_path or "scratch"
    if os.path.exists(last_path):  # an interrupted run of this stage: carry on exactly where it stopped
        ckpt = read_checkpoint(last_path)
        check_checkpoint(ckpt, last_path, cfg, taxonomy, resuming=True)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if len(ckpt["rng"]) == world:  # one state per process; with another number of processes, fresh seeds
            set_rng_states(ckpt["rng"][rank])
        start, source = ckpt["step"], f"{last_path} at step {ckpt['step']}"
    elif prev_path:
        prev = read_checkpoint(prev_path)
        check_checkpoint(prev, prev_path, cfg, taxonomy, resuming=False)
        # The new rank's table was never used before, so it is still all zeros: every new taxon
        # starts exactly as its parent, and learns what differs.
        model.load_state_dict(by_name(prev["model"], prev["vocab"], taxonomy))
        ema.load_state_dict(by_name(prev["ema"], prev["vocab"], taxonomy))
        if cfg.new_rank_init == "random":  # the ablation: new taxa start apart, like a table trained from scratch
            for r in range(stages[stages.index(level) - 1] + 1, level + 1):
                torch.nn.init.normal_(model.conditioner.embed[r].weight)  # N(0, 1), nn.Embedding's own init
                ema.conditioner.embed[r].weight.copy_(model.conditioner.embed[r].weight)

    if prev_path:  # --freeze: what a later stage may change (AdamW skips what gets no gradient)
        prev_level = stages[stages.index(level) - 1]
        for n, p in model.named_parameters():
            p.requires_grad_(trainable(n, cfg.freeze, range(prev_level + 1, level + 1)))

    def save(step):
        """Write out/<level>.last.pt: everything needed to carry on from `step` as if never stopped."""
        rngs = [rng_states()]
        if world > 1:  # every process's own states, in rank order
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_states())
        if rank == 0:
            save_checkpoint(last_path, model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                            scheduler=sched.state_dict(), rng=rngs, step=step, level=name,
                            stages=[RANKS[r] for r in stages], ranks=list(RANKS), unet_config=asdict(unet_config),
                            diffusion_config=asdict(diffusion_config), train_config=asdict(cfg),
                            vocab_sizes=vocab_sizes, vocab=taxonomy.vocab, lineages=taxonomy.lineages())

    # DDP averages the gradients of the processes in backward(); torch.compile wraps what runs the
    # steps. Checkpoints keep `model`, the plain module, so their keys have no "module." or "_orig_mod.".
    net = DDP(model) if world > 1 else model
    net = torch.compile(net) if cfg.compile else net
    amp = torch.autocast("cuda", torch.bfloat16) if cfg.amp else contextlib.nullcontext()
    B, share = cfg.batch_size, cfg.batch_size // world
    mine = slice(rank * share, (rank + 1) * share)  # this process's part of every global batch
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=stage_batches(len(dataset), B, cfg.seed, level, start + 1, steps, rank, world))

    if rank == 0:
        print(f"stage {name}: ranks {'/'.join(RANKS[:level + 1])}, {n_params / 1e6:.2f} M params, "
              f"{steps} steps of {B}{f' on {world} processes' if world > 1 else ''}, from {source}")
    model.train()
    t0, saved = time.time(), start
    pbar = tqdm(loader, desc=f"{name:>8s}", initial=start, total=steps, dynamic_ncols=True, disable=rank > 0)
    for step, (x0, ids) in enumerate(pbar, start=start + 1):
        x0, ids = x0.to(device), ids.to(device)
        # Every random number of the step comes from a generator seeded by (seed, stage, step), drawn
        # for the whole global batch, of which this process keeps its part: a resumed run, or N
        # processes, draw exactly what one uninterrupted process does.
        gen = seeded_generator(cfg.seed, level, 1, step, device=device)
        flip = (torch.rand(B, generator=gen, device=device) < 0.5)[mine]
        t = torch.randint(0, diffusion.T, (B,), generator=gen, device=device)[mine]
        eps = torch.randn((B, *x0.shape[1:]), generator=gen, device=device)[mine]
        u = torch.rand(2, B, generator=gen, device=device)[:, mine]
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)  # a random mirror image
        if cfg.schedule == "random":  # each example its own depth, from the first stage's rank to this one
            depth = stages[0] + (torch.rand(B, generator=gen, device=device) * (level - stages[0] + 1)).long()[mine]
            ids = cut_lineage(ids, depth)
        ids = condition_dropout(cut_lineage(ids, level), cfg.p_uncond, cfg.p_cut, u=u)
        with amp:
            loss = diffusion.loss(net, x0, ids, t=t, eps=eps, weight=cfg.loss_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))  # short memory early on
        # One all-reduce gives every process the mean loss and whether any of them was asked to stop.
        shared = torch.stack([loss.detach().float(), torch.tensor(float(len(stop)), device=device)])
        if world > 1:
            dist.all_reduce(shared)
        total_loss, stopping = shared.tolist()
        mean_loss = total_loss / world
        if not math.isfinite(mean_loss):  # these weights are lost; the checkpoint on disk is not
            kept = f"{last_path} (step {saved}) is intact" if saved else "no checkpoint of this stage was written"
            msg = f"error: loss is {mean_loss} at step {step} of stage {name}; {kept}; try a lower --lr"
            raise SystemExit(msg if rank == 0 else 1)
        pbar.set_postfix(loss=f"{mean_loss:.4f}")
        if step % 50 == 0 or step == steps:
            ips = (step - start) * B / (time.time() - t0)
            log.write(f"stage {name} step {step}/{steps} loss {mean_loss:.4f} "
                      f"lr {sched.get_last_lr()[0]:.2e} img/s {ips:.1f}\n")
            log.flush()
        if stopping or (cfg.save_every and step % cfg.save_every == 0) or step == steps:
            save(step)
            saved = step
        if stopping:
            if rank == 0:
                print(f"\nstopped at step {step}/{steps} of stage {name}: saved {last_path}; "
                      f"run the same command again to resume", file=sys.stderr)
            return stop[0] if stop else signal.SIGINT
    train_time = max(time.time() - t0, 1e-6)

    if rank == 0:
        t1 = time.time()
        draw_stage_grid(ema.eval(), diffusion, taxonomy, level, stages[0], cfg, os.path.join(cfg.out, f"{name}.png"))
        os.replace(last_path, path)  # the stage is done: out/<level>.pt is what sample.py and the next stage read
        msg = (f"stage {name} done: {train_time:.0f} s training ({(steps - start) * B / train_time:.1f} img/s), "
               f"{time.time() - t1:.0f} s grid -> {path}, {os.path.join(cfg.out, name + '.png')}")
        print(msg)
        log.write(msg + "\n")
    if world > 1:
        dist.barrier()  # the next stage reads out/<level>.pt in every process
    return None


def main(cfg):
    rank, world, cfg = start_processes(cfg)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:  # fail before any training: an --out that cannot be written, --amp on a CPU, a batch that does not split
            os.makedirs(cfg.out, exist_ok=True)
            tempfile.TemporaryFile(dir=cfg.out).close()
        except OSError as e:
            raise SystemExit(f"error: cannot write to --out {cfg.out}: {e.strerror}")
        if cfg.amp and not cfg.device.startswith("cuda"):
            raise SystemExit(f"error: --amp is bf16 autocast for CUDA, and this run is on {cfg.device}, "
                             "where bf16 is many times slower than fp32; drop --amp")
        if not all(n.strip().isdigit() and int(n) > 0 for n in cfg.stage_steps.split(",")):
            raise SystemExit(f"error: --stage-steps '{cfg.stage_steps}' is not a comma-separated list of positive "
                             "step counts, e.g. 200,200,600,800,1800")
        if cfg.batch_size % world:
            raise SystemExit(f"error: --batch-size {cfg.batch_size} does not split evenly over {world} processes")
        try:  # bad data ends here, in one line, before any checkpoint is touched
            images, raw_lineages, wheres = load_data(
                cfg.data, cfg.image_size, cfg.per_species, cfg.seed, fmt=cfg.format, top_rank=cfg.top_rank,
                columns=cfg.columns, image_root=cfg.image_root, boxes=cfg.boxes, cache_dir=cfg.out,
                workers=cfg.workers)
            found, raw_lineages = build_taxonomy(raw_lineages, wheres, keep_first=cfg.conflicts == "keep-first")
        except DataError as e:
            raise SystemExit(f"error: {e}")
        # The stages come from the full hierarchy, also for --schedule flat: the same total steps.
        plan = stage_plan(found, cfg.first_level, cfg.level)
        skipped = [r for r in range(RANKS.index(cfg.first_level), RANKS.index(cfg.level) + 1) if r not in plan]
        if skipped and rank == 0:  # a rank asked for gets no stage: say why before any training
            why = {"no more taxa in the data than a coarser rank: nothing new to split":
                   [r for r in skipped if found.size(r)], "the data names none": [r for r in skipped if not found.size(r)]}
            print("note: no stage for " + ", ".join(f"{', '.join(RANKS[r] for r in ranks)} ({reason})"
                                                   for reason, ranks in why.items() if ranks)
                  + "; training " + " -> ".join(RANKS[r] for r in plan))
        if cfg.schedule == "flat":  # the baseline without a hierarchy: leaf names only, one table in use
            raw_lineages = [flat_lineage(lin) for lin in raw_lineages]
            found = Taxonomy(raw_lineages)
        # Ids in the order a checkpoint's lineages rebuild them (sample.py does Taxonomy(ckpt["lineages"])).
        taxonomy = Taxonomy(found.lineages())
        dataset = TaxonDataset(images, raw_lineages, taxonomy, flip=False)  # the loop flips, with its own generator
        if len(dataset) < cfg.batch_size:
            raise SystemExit(f"error: {cfg.data} has {len(dataset)} images, fewer than --batch-size {cfg.batch_size}")
        to_train = schedule_stages(cfg, plan)
        # the ranks the run covers (the first is the root of TaxaGuide); flat has the leaf's alone
        stages = stage_plan(taxonomy, cfg.first_level, cfg.level) if cfg.schedule == "flat" else plan
        if rank == 0:
            print(f"data: {len(dataset)} images, {taxonomy.size(len(RANKS) - 1)} species; schedule {cfg.schedule}: "
                  + " -> ".join(f"{RANKS[r]} ({n} steps)" for r, n in to_train))
        stop = catch_stop_signals()
        prev_path = None
        with open(os.path.join(cfg.out, "train.log") if rank == 0 else os.devnull, "a") as log:
            for level, steps in to_train:
                path = os.path.join(cfg.out, f"{RANKS[level]}.pt")
                if os.path.exists(path):
                    check_checkpoint(read_checkpoint(path), path, cfg, taxonomy, resuming=False)
                    if rank == 0:
                        print(f"stage {RANKS[level]}: using {path} (delete it to train this stage again)")
                elif signum := train_stage(cfg, level, steps, stages, dataset, taxonomy, prev_path, log, rank, world,
                                           stop):
                    raise SystemExit(128 + signum)  # the shell's code for "ended by this signal"
                prev_path = path
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        if dist.is_initialized():  # also under torchrun with one process
            dist.destroy_process_group()


def build_parser():
    """Every TrainConfig field is a flag (--batch-size 64, --level species, ...); its help is the field's comment."""
    comments = {}
    for line in inspect.getsource(TrainConfig).splitlines():
        if re.match(r"    \w+: ", line):  # a field: "    name: type = default  # comment"
            name = line.split(":")[0].strip()
            comments[name] = line.partition("  # ")[2]
        elif line.strip().startswith("#"):  # "    #   more of the comment above"
            comments[name] += " " + line.strip(" #")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        flag, text = "--" + f.name.replace("_", "-"), comments[f.name].replace("%", "%%")  # argparse formats help
        if f.type is bool:  # --amp, --compile: switches
            parser.add_argument(flag, action="store_true", help=text)
            continue
        choices = {"level": RANKS, "first_level": RANKS, "size": SIZES, "guide_from": ("null", "parent", "root"),
                   "format": FORMATS, "top_rank": ("auto",) + RANKS, "conflicts": ("error", "keep-first"),
                   "schedule": SCHEDULES, "freeze": ("none", "unet", "new-rank"), "new_rank_init": ("zero", "random"),
                   "loss_weight": ("eps", "v"), "attention": ("auto", "triton", "sdpa", "torch")}.get(f.name)
        # what each value may be (model.py, "Command-line values"); the other strings are free text
        kind = {"steps": nonneg_int, "batch_size": positive_int, "lr": positive_float, "warmup": positive_int,
                "cooldown": fraction, "embed_lr_mult": positive_float, "grad_clip": positive_float,
                "ema_decay": fraction, "p_uncond": fraction, "p_cut": fraction, "stage_steps": positive_int_list,
                "image_size": positive_int, "per_species": positive_int, "image_root": input_path,
                "boxes": input_path, "workers": nonneg_int, "seed": nonneg_int, "device": device_name,
                "out": output_path, "guidance": finite_float, "grid_cols": positive_int, "grid_steps": positive_int,
                "save_every": nonneg_int}.get(f.name, str)
        default = " (default: %(default)s)" if f.default != "" else ""
        parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=text + default)
    return parser


def parse_args(argv=None):
    """The TrainConfig of a command line; values that only fail together end here too, in argparse's one line."""
    parser = build_parser()
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    if cfg.image_size % size_multiple(cfg.size):  # the UNet halves the image, then doubles it back
        parser.error(f"argument --image-size: must be a multiple of {size_multiple(cfg.size)} for --size {cfg.size} "
                     f"(got {cfg.image_size})")
    if RANKS.index(cfg.level) < RANKS.index(cfg.first_level):
        parser.error(f"argument --level: must not be coarser than --first-level {cfg.first_level} (got {cfg.level})")
    if cfg.p_uncond + cfg.p_cut > 1:
        parser.error(f"argument --p-cut: must be at most {1 - cfg.p_uncond:g} beside --p-uncond {cfg.p_uncond:g}, "
                     f"as both are shares of one random draw (got {cfg.p_cut:g})")
    return cfg


if __name__ == "__main__":
    try:
        main(parse_args())
    except CheckpointError as e:  # a checkpoint that cannot be read or written (a full disk)
        sys.exit(f"error: {e}")
