"""
Train TaxaDiffusion stage by stage: coarse ranks first, then one finer rank per stage.

    python train.py --level order      # the class stage, then the order stage (about 3.5 min on 2 CPU cores)
    python train.py --level species    # continues down to species, reusing out/class.pt and out/order.pt
    python train.py --data train.json --image-size 64   # your own data (docs/data.md)
    torchrun --nproc_per_node=4 train.py --level species    # the same in 4 processes (GPUs), one DDP model
    python train.py --level species --schedule flat --out out/flat   # an ablation: species ids only, one stage
    python train.py --latent --image-size 64 --level species --stage-steps 200,200,600,800,2300 --out out/latent64
                                       # on an autoencoder's latents (README, "Pixel or latent")

The method in three lines of the loop (train_stage): stage `order` sees each
lineage cut below order (kingdom, phylum, class, order); condition dropout
sometimes cuts it shorter or drops it (partial lineages and guidance); the
loss is DDPM's noise regression (Algorithm 1), weighted as the v-error by default
(Diffusion.loss). Each stage starts from the weights of the one
before it, with the new rank's embedding table at zero, so a new taxon begins
exactly as its parent (build_stage). A missing earlier stage is trained first.

Each stage writes out/<level>.pt (plain data, opens with
torch.load(weights_only=True)) and out/<level>.png: one row per taxon of that
rank, drawn with the EMA weights and a fixed seed. While a stage trains,
out/<level>.last.pt holds all it needs to carry on, rewritten every
--save-every steps and on Ctrl-C or SIGTERM; the same command resumes from it
and ends with the same weights, bit for bit on a CPU (docs/training.md).

With --latent the stages learn the latents of an autoencoder (unet.py), trained
first as a stage of its own (plumbing/latent.py: out/autoencoder.pt, and
out/autoencoder.png, held-out originals over their reconstructions); the
images are encoded once, and the loop below is the same: a latent is the x0.

What makes this safe to run (checkpoints, resuming, torchrun, Ctrl-C, the
checks of every flag) is in plumbing/, which a first read skips.

Read next: sample.py.
"""
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from model import Diffusion, DiffusionConfig, TaxaDiffusion, condition_dropout, cut_lineage, update_ema
from plumbing.checkpoints import (CheckpointError, by_name, check_checkpoint, read_checkpoint, run_header,
                                  stage_flags, to_device)
from plumbing.cli import (GUIDE_FROM, SAMPLERS, check_flag_pairs, check_run, config_parser, device_name,
                          downsampling_factor, finite_float, flag, fraction, input_path, nonneg_int, noise_interval,
                          output_path, per_species, positive_float, positive_int, positive_int_list, sampling_steps)
from plumbing.images import draw, save_grid
from plumbing.latent import autoencoder_stage, encode_dataset, held_out_split
from plumbing.randomness import stage_batches, step_randomness
from plumbing.readers import FORMATS, read_data
from plumbing.signals import catch_stop_signals, loss_error, run_guard, stopped
from plumbing.torchrun import barrier, load_resumable, mean_over_processes, save_resumable, start_processes, wrap_model
from taxonomy import RANKS, LineageError, TaxonDataset, Taxonomy
from unet import SIZES, UNetConfig

SCHEDULES, FREEZE = ("progressive", "all", "random", "flat"), ("none", "unet", "new-rank")
INITS, EXTEND_TRAINS = ("zero", "random"), ("new-rows", "all")
BETAS, ATTENTION = ("auto", "linear", "cosine", "scaled-linear"), ("auto", "triton", "sdpa", "torch")
EDGE_LOSSES = ("fft", "gradient", "ssim", "none")


@dataclass
class TrainConfig:
    """Every field is a flag (--batch-size for batch_size): flag(default, help, the values it takes)."""
    # the method
    level: str = flag("order", "train every stage down to this rank", RANKS)
    first_level: str = flag("class", "the first stage; coarser ranks are folded into it", RANKS)
    schedule: str = flag("progressive", "stage by stage, or one stage of as many steps: all, random, flat", SCHEDULES)
    p_uncond: float = flag(0.1, "probability of dropping the whole lineage (for guidance)", fraction)
    p_cut: float = flag(0.2, "probability of cutting the lineage at a random coarser rank", fraction)
    freeze: str = flag("none", "what a later stage trains: none = all, unet = the lineage readers, new-rank", FREEZE)
    new_rank_init: str = flag("zero", "a new rank's table (or taxon's row) starts at 0 (its parent) or random", INITS)
    loss_weight: str = flag("v", "v: the v-error, eps-error / alpha_bar_t; eps: Algorithm 1's", ("eps", "v"))
    noise_schedule: str = flag("auto", "betas; auto = scaled-linear (LDM's) on latents, else linear (Ho's)", BETAS)
    # the steps
    stage_steps: str = flag("200,200,600,800,1800", "steps of each stage; the last number repeats", positive_int_list)
    steps: int = flag(0, "if not 0, every stage trains this many steps (overrides --stage-steps)", nonneg_int)
    batch_size: int = flag(32, "images per step, over all processes (torchrun)", positive_int)
    lr: float = flag(1e-3, "AdamW learning rate after warm-up (large: a small UNet from scratch)", positive_float)
    embed_lr_mult: float = flag(30.0, "the rank tables' learning rate = lr * this", positive_float)
    warmup: int = flag(100, "steps of linear learning-rate warm-up at the start of each stage", positive_int)
    cooldown: float = flag(0.3, "the last stage decays the rate to 0 over this fraction of its steps", fraction)
    grad_clip: float = flag(1.0, "max gradient norm, as in the paper", positive_float)
    ema_decay: float = flag(0.995, "EMA of the weights, used for every picture", fraction)
    size: str = flag("small", "named UNet size, see unet.SIZES", tuple(SIZES))
    # pixels or latents (README, "Pixel or latent")
    latent: bool = flag(False, "train on the latents of an autoencoder, trained first as a stage of its own")
    latent_f: int = flag(4, "the autoencoder's downsampling factor: latents of image_size / f", downsampling_factor)
    latent_channels: int = flag(4, "channels of a latent", positive_int)
    ae_steps: int = flag(1500, "optimizer steps of the autoencoder stage", positive_int)
    ae_batch_size: int = flag(16, "images per autoencoder step, over all processes", positive_int)
    ae_crop: int = flag(32, "the autoencoder trains on random crops of this side (0: whole images)", nonneg_int)
    ae_lr: float = flag(3e-4, "the autoencoder's AdamW learning rate", positive_float)
    ae_edge_loss: str = flag("fft", "what keeps its edges sharp beside L1 (unet.autoencoder_loss)", EDGE_LOSSES)
    # the data
    data: str = flag("toy", "'toy', a folder tree, a .csv/.tsv table or an iNaturalist .json (docs/data.md)")
    image_size: int = flag(32, "images are resized to image_size x image_size", positive_int)
    per_species: str = flag("64", "toy images per species, or a long tail: pairs:64/4, zipf:64", per_species)
    hold_out: str = flag("", "toy species left out: names, or one-per-genus:N (by --seed); /K keeps K images")
    format: str = flag("auto", "reader of --data; auto = from what the path is", FORMATS)
    top_rank: str = flag("auto", "folder trees: the rank of the top folders", ("auto",) + RANKS)
    columns: str = flag("", "tables: our=their column names, e.g. 'image=file,species=scientific_name'")
    image_root: str = flag("", "tables and iNat JSON: where image paths start (default: the file's folder)", input_path)
    boxes: str = flag("", "FishNet: bounding-box JSON {file stem: {x, y, w, h}} to crop each image", input_path)
    conflicts: str = flag("error", "a taxon under two parents: error, or keep-first", ("error", "keep-first"))
    # teaching a trained model new taxa (README, "Add a species")
    extend: str = flag("", "a stage checkpoint to teach the new taxa of --data, each as its parent first", input_path)
    extend_steps: int = flag(200, "--extend: fine-tune steps (0: only add the new taxa, as their parents)", nonneg_int)
    extend_trains: str = flag("new-rows", "--extend: the new taxa's rows (old ones kept exactly) or all", EXTEND_TRAINS)
    # the run
    seed: int = flag(0, "seeds the toy data, the weights, the batches and the grids", nonneg_int)
    device: str = flag("cuda" if torch.cuda.is_available() else "cpu", "cpu, cuda or cuda:N", device_name)
    out: str = flag("out", "checkpoints, grids, the image cache and the log go here", output_path)
    workers: int = flag(min(8, os.cpu_count() or 1), "processes decoding images on the first pass", nonneg_int)
    save_every: int = flag(200, "rewrite out/<level>.last.pt every this many steps (0: only when stopped)", nonneg_int)
    guidance: float = flag(3.0, "guidance scale of the stage grids (1 = none)", finite_float)
    guide_from: str = flag("null", "negative branch of the grids' guidance (see sample.py)", GUIDE_FROM)
    grid_cols: int = flag(8, "samples per row of the grids", positive_int)
    grid_steps: int = flag(15, "sampling steps of the grids", sampling_steps)
    grid_sampler: str = flag("dpm++", "sampler of the grids, as sample.py's --sampler", SAMPLERS)
    grid_interval: tuple = flag(None, "guide the grids only where sigma_t is in LO,HI (sample.py)", noise_interval)
    amp: bool = flag(False, "bf16 autocast, CUDA only (a CPU without bf16 hardware runs it many times slower)")
    compile: bool = flag(False, "torch.compile the network (pays off on GPUs, not on 2 CPU cores)")
    attention: str = flag("auto", "auto (SDPA), triton (unet.py's kernel), sdpa or torch", ATTENTION)

    def __post_init__(self):
        self.per_species = str(self.per_species)  # 64 and "64" are one run (checkpoints compare the two)


def stage_plan(taxonomy, first_level, level):
    """The ranks of the stages (as indices), coarse to fine: first_level, then every finer rank that splits a
    taxon, down to level."""
    first, last = RANKS.index(first_level), RANKS.index(level)
    if last < first:  # the command line refuses it too (check_flag_pairs); a TrainConfig built in Python may not
        raise SystemExit(f"error: --level {level} is coarser than the first stage --first-level {first_level}")
    while taxonomy.size(first) == 0 and first < last:  # data that starts below first_level (e.g. at order)
        first += 1
    return [first] + [r for r in taxonomy.stage_ranks() if first < r <= last]


def schedule_stages(cfg, stage_ranks):
    """(finest rank, steps, cool-down steps) of each stage to train. progressive trains the stages one after
    another; the other schedules train one stage, at the finest rank, for as many steps as all of them. Only
    the command's last stage cools down, and by as many steps in every schedule: --cooldown times the last
    stage's steps (so a one-stage schedule is not given a longer decay than progressive)."""
    given = [int(n) for n in cfg.stage_steps.split(",")]  # the fine traits take longer
    steps = [cfg.steps or given[min(i, len(given) - 1)] for i in range(len(stage_ranks))]
    cool = round(cfg.cooldown * steps[-1])
    if cfg.schedule == "progressive":
        last = len(stage_ranks) - 1
        return [(r, n, cool if i == last else 0) for i, (r, n) in enumerate(zip(stage_ranks, steps))]
    return [(stage_ranks[-1], sum(steps), cool)]


# -----------------------------------------------------------------------------
# One stage: the loop, then how its model is built


def train_stage(cfg, stage, stage_ranks, dataset, taxonomy, log, rank=0, world=1, stop=()):
    """Train one stage (a Stage from build_stage): condition on ranks 0..stage.finest of each lineage.

    Returns the number of the signal that stopped it (SIGINT, SIGTERM), or None once out/<level>.pt is written.
    """
    model, ema, opt, scheduler, finest, steps = (stage.model, stage.ema, stage.opt, stage.scheduler, stage.finest,
                                                  stage.steps)
    diffusion = Diffusion(DiffusionConfig(**stage.header["diffusion_config"])).to(cfg.device)  # --noise-schedule
    device, B, name = cfg.device, cfg.batch_size, RANKS[finest]
    net, amp = wrap_model(model, cfg, world)
    share = slice(rank * B // world, (rank + 1) * B // world)  # this process's part of every global batch
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=stage_batches(len(dataset), B, cfg.seed, finest, stage.start + 1, steps, rank, world))
    model.train()
    t0, saved = time.time(), stage.start
    pbar = tqdm(loader, desc=f"{name:>8s}", initial=stage.start, total=steps, dynamic_ncols=True, disable=rank > 0)
    for step, (x0, ids) in enumerate(pbar, start=stage.start + 1):
        flip, t, eps, draws, depth = step_randomness(cfg.seed, finest, step, B, x0.shape[1:], device, share)
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.to(device).flip(-1), x0.to(device))  # a random mirror image
        # The method: this stage knows the lineage down to `finest`; dropout cuts it shorter or drops it
        ids = cut_lineage(ids.to(device), finest)
        if cfg.schedule == "random":  # the ablation: each example its own depth, first stage's rank .. finest
            ids = cut_lineage(ids, stage_ranks[0] + (depth * (finest - stage_ranks[0] + 1)).long())
        ids = condition_dropout(ids, cfg.p_uncond, cfg.p_cut, draws=draws)
        with amp:
            loss = diffusion.loss(net, x0, ids, t=t, eps=eps, weight=cfg.loss_weight)  # Algorithm 1 (v-weighted)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        scheduler.step()
        update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))  # short memory early on

        mean_loss, stopping = mean_over_processes(loss, stop, world, device)
        if not math.isfinite(mean_loss):
            raise SystemExit(loss_error(mean_loss, step, f"stage {name}", stage.last_path, saved, "--lr", rank))
        pbar.set_postfix(loss=f"{mean_loss:.4f}")
        if step % 50 == 0 or step == steps:
            log.write(f"stage {name} step {step}/{steps} loss {mean_loss:.4f} lr {scheduler.get_last_lr()[0]:.2e} "
                      f"img/s {(step - stage.start) * B / (time.time() - t0):.1f}\n")
            log.flush()
        if stopping or (cfg.save_every and step % cfg.save_every == 0) or step == steps:
            saved = save_stage(stage, step, rank, world)
        if stopping:
            return stopped(step, steps, f"stage {name}", stage.last_path, stop, rank)
    if not steps:  # train.py --extend --extend-steps 0: the new taxa added, as their parents, and nothing trained
        save_stage(stage, 0, rank, world)
    if rank == 0:
        finish_stage(cfg, stage, diffusion, taxonomy, stage_ranks[0], time.time() - t0, log)
    barrier(world)  # the next stage reads out/<level>.pt in every process
    return None


def save_stage(stage, step, rank, world):
    """Write out/<level>.last.pt: all the stage needs to carry on after `step`. Returns the step."""
    save_resumable(stage.last_path, rank, world, **stage.header, model=stage.model.state_dict(), step=step,
                   ema=stage.ema.state_dict(), optimizer=stage.opt.state_dict(), level=RANKS[stage.finest],
                   scheduler=stage.scheduler.state_dict(), cooldown_steps=stage.cool)
    return step


def finish_stage(cfg, stage, diffusion, taxonomy, root_rank, train_time, log):
    """Draw the stage's grid with its EMA weights, then make out/<level>.pt the stage's result."""
    t1, name = time.time(), RANKS[stage.finest]
    # one row per taxon of this rank, EMA weights, the same noise in every row (so columns compare)
    taxa = range(stage.grid_from, len(taxonomy.vocab[stage.finest]))
    C, size = stage.model.unet.cfg.in_channels, stage.model.unet.cfg.image_size  # pixels, or latents
    x_T = torch.randn((cfg.grid_cols, C, size, size), generator=torch.Generator(cfg.device).manual_seed(cfg.seed),
                      device=cfg.device)
    rows = torch.tensor([taxonomy.ancestors(stage.finest, i) for i in taxa], device=cfg.device)  # (taxa, R)
    images = draw(diffusion, stage.ema.eval(), rows.repeat_interleave(cfg.grid_cols, 0), x_T.repeat(len(taxa), 1, 1, 1),
                  cfg.guidance, cfg.guide_from, root_rank, cfg.grid_steps, cfg.grid_sampler, seed=cfg.seed,
                  autoencoder=stage.autoencoder, interval=cfg.grid_interval)  # decoded on latents
    save_grid(images, os.path.join(cfg.out, f"{name}.png"), cfg.grid_cols,
              labels=[taxonomy.vocab[stage.finest][i] for i in taxa])
    os.replace(stage.last_path, stage.path)  # what sample.py and the next stage read
    msg = (f"stage {name} done: {train_time:.0f} s training "
           f"({(stage.steps - stage.start) * cfg.batch_size / max(train_time, 1e-6):.1f} img/s), "
           f"{time.time() - t1:.0f} s grid -> {stage.path}, {os.path.join(cfg.out, name + '.png')}")
    print(msg)
    print(msg, file=log, flush=True)  # flushed: a run killed later still logs this stage


@dataclass
class Stage:
    """What one stage trains and where it stands: built by build_stage, stepped by train_stage."""
    finest: int  # the finest rank this stage conditions on (an index into RANKS)
    steps: int  # optimizer steps of the stage
    cool: int  # its last `cool` steps decay the learning rate to 0
    model: TaxaDiffusion
    ema: TaxaDiffusion
    opt: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    start: int  # steps already done (a resumed stage)
    header: dict  # what every checkpoint of this run records: configs, taxonomy (see run_header)
    path: str  # out/<level>.pt, written when the stage is done
    last_path: str  # out/<level>.last.pt, all it needs to carry on
    autoencoder: object  # --latent: the Autoencoder whose latents it learns (its grid is decoded); None in pixels
    grid_from: int = 1  # the grid's first taxon (an extension draws its new ones)


def build_stage(cfg, finest, steps, cool, stage_ranks, taxonomy, prev_path, rank=0, world=1, autoencoder=None):
    """The model of the stage that conditions on ranks 0..finest, and where it starts from: a half-trained
    run of this stage (out/<level>.last.pt), else the previous stage's weights, else scratch."""
    path, last_path = (os.path.join(cfg.out, f"{RANKS[finest]}{end}.pt") for end in ("", ".last"))
    header = run_header(cfg, taxonomy, stage_ranks, autoencoder)
    torch.manual_seed(cfg.seed + finest)  # the same initial weights in every process
    model = to_device(TaxaDiffusion(UNetConfig(**header["unet_config"]), header["vocab_sizes"]), cfg.device)
    # The first stage's ranks start random; every finer rank's table starts at zero, and stays so until its
    # stage begins (its ids are 0 until then, so RankConditioner's mask zeroes its output and its gradient):
    # a new taxon starts exactly as its parent, and learns what differs.
    for r in range(finest + 1, len(RANKS)):
        torch.nn.init.zeros_(model.conditioner.embed[r].weight)
    ema = copy.deepcopy(model).requires_grad_(False)
    # The rank tables take a larger step: a new one has a single stage to move from "same as the parent".
    tables = list(model.conditioner.embed.parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("conditioner.embed.")]
    opt = torch.optim.AdamW([{"params": others}, {"params": tables, "lr": cfg.lr * cfg.embed_lr_mult}],
                            lr=cfg.lr, weight_decay=0.0, fused=True)  # fused: one kernel for every tensor's update
    resumed = read_checkpoint(last_path) if os.path.exists(last_path) else None
    if resumed:
        check_checkpoint(resumed, last_path, header, stage_flags(cfg), resuming=True)
        cool = resumed["cooldown_steps"]  # a stage keeps the cool-down it started with, whatever --level says now
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg.warmup, cool))
    # Each process its own seed for anything that draws from the global generator (dropout, if a UNet has it).
    torch.manual_seed(cfg.seed + finest + 1000 * (rank + 1))

    start, source = 0, prev_path or "scratch"
    prev = read_checkpoint(prev_path) if prev_path else None
    # What starts as its parent, {rank: its first new id}: a stage's new ranks, whole; an extension's new taxa
    new = ({r: len(v) for r, v in enumerate(prev["vocab"]) if len(v) < len(taxonomy.vocab[r])} if cfg.extend else
           {r: 0 for r in range(stage_ranks[stage_ranks.index(finest) - 1] + 1, finest + 1)} if prev else {})
    if resumed:  # an interrupted run of this stage: carry on exactly where it stopped
        objects = {"model": model, "ema": ema, "optimizer": opt, "scheduler": scheduler}
        start = load_resumable(resumed, objects, rank, world)
        source = f"{last_path} at step {start}"
    elif prev:  # the stage before (its rank tables reordered by taxon name into this run's ids), or the one extended
        if not cfg.extend:  # an extension has new taxa and data by design, and the network of its checkpoint
            check_checkpoint(prev, prev_path, header, stage_flags(cfg))
        model.load_state_dict(by_name(prev["ema" if cfg.extend else "model"], prev["vocab"], taxonomy))  # the
        ema.load_state_dict(by_name(prev["ema"], prev["vocab"], taxonomy))  # extension goes on from what draws
        if cfg.new_rank_init == "random":  # the ablation: new taxa start apart, like a table trained from scratch
            for r, first in new.items():
                torch.nn.init.normal_(model.conditioner.embed[r].weight[first:])  # N(0, 1), nn.Embedding's own
                ema.conditioner.embed[r].weight.copy_(model.conditioner.embed[r].weight)
    if prev:  # --freeze (--extend-trains): what may change (AdamW skips what gets no gradient)
        freeze = {"new-rows": "new-rank", "all": "none"}[cfg.extend_trains] if cfg.extend else cfg.freeze
        for n, p in model.named_parameters():
            p.requires_grad_(trainable(n, freeze, new))
        for r, first in new.items() if freeze == "new-rank" else ():  # an old taxon's row gets no gradient
            model.conditioner.embed[r].weight.register_hook(lambda g, k=first: torch.cat([0 * g[:k], g[k:]]))
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"stage {RANKS[finest]}: ranks {'/'.join(RANKS[:finest + 1])}, {n_params / 1e6:.2f} M params, "
              f"{steps} steps of {cfg.batch_size}{f' on {world} processes' if world > 1 else ''}, from {source}")
    return Stage(finest, steps, cool, model, ema, opt, scheduler, start, header, path, last_path, autoencoder,
                 new.get(finest, 1) if cfg.extend and new else 1)


def lr_factor(s, steps, warmup, cooldown):
    """Learning rate of step s + 1 of `steps`, as a fraction of --lr: linear warm-up over `warmup` steps,
    then constant, then a linear decay to 0 over the last `cooldown` steps."""
    warm = min(1.0, (s + 1) / warmup)
    return min(warm, (steps - s) / cooldown) if cooldown else warm


def trainable(name, freeze, new_ranks):
    """Whether parameter `name` trains in a progressive stage after the first, under policy `freeze`."""
    if freeze == "unet":  # what reads the lineage: the tables, the cross-attention, the pooled-token projection
        return name.startswith("conditioner.") or ".cross." in name or name.startswith("unet.pooled.")
    if freeze == "new-rank":
        return any(name == f"conditioner.embed.{r}.weight" for r in new_ranks)
    return True


def flat_lineage(lineage, finest):
    """The flat baseline's label: one name alone at its rank, no hierarchy above it. The name is the lineage's
    at rank `finest` (the rank the run trains down to), or its leaf where the lineage stops above that rank
    (none where it names nothing that coarse: that image trains unconditioned)."""
    leaf = max((r for r, name in enumerate(lineage[:finest + 1]) if name), default=None)
    return tuple(name if r == leaf else None for r, name in enumerate(lineage))


# -----------------------------------------------------------------------------
# The run: data, taxonomy and stages once, then each stage in turn


def main(cfg):
    if cfg.noise_schedule == "auto":  # LDM's betas on latents, where they train far better; Ho's on pixels
        cfg = replace(cfg, noise_schedule="scaled-linear" if cfg.latent else "linear")  # checkpoints record the betas
    rank, world, cfg = start_processes(cfg)
    with run_guard():  # on the way out: signal handlers put back, processes parted, a bad checkpoint in one line
        check_run(cfg, world)
        if cfg.extend:  # one stage at the checkpoint's level, its new taxa starting as their parents
            cfg, dataset, taxonomy, stage_ranks, stages = load_extension(cfg, rank, world)
        else:
            dataset, taxonomy, stage_ranks = load_dataset(cfg, rank, world)
            stages = schedule_stages(cfg, stage_ranks)
        if rank == 0:
            print(describe_run(dataset, taxonomy, cfg.schedule, stages))
        stop = catch_stop_signals()
        prev_path, autoencoder = cfg.extend or None, None
        with open(os.path.join(cfg.out, "train.log") if rank == 0 else os.devnull, "a") as log:
            if cfg.latent:  # the autoencoder first, a stage of its own; the rank stages then learn its latents
                autoencoder, signum = autoencoder_stage(cfg, dataset, log, rank, world, stop)
                if signum:
                    raise SystemExit(128 + signum)
                dataset.images = encode_dataset(autoencoder, dataset.images, cfg.out, cfg.device, rank=rank, world=world)
            for finest, steps, cool in stages:
                path = os.path.join(cfg.out, f"{RANKS[finest]}.pt")
                if os.path.exists(path):  # a finished stage is reused only if it was trained as this run asks
                    check_checkpoint(read_checkpoint(path), path, run_header(cfg, taxonomy, stage_ranks, autoencoder),
                                     stage_flags(cfg))
                    if rank == 0:
                        print(f"stage {RANKS[finest]}: using {path} (delete it to train this stage again)")
                else:
                    stage = build_stage(cfg, finest, steps, cool, stage_ranks, taxonomy, prev_path, rank, world,
                                        autoencoder)
                    if signum := train_stage(cfg, stage, stage_ranks, dataset, taxonomy, log, rank, world, stop):
                        raise SystemExit(128 + signum)  # the shell's code for "ended by this signal"
                prev_path = path


def load_dataset(cfg, rank=0, world=1):
    """The images, the taxonomy and the ranks of the stages (read_data ends bad data in one line, before any
    checkpoint is touched). The flat baseline keeps only each image's name at the finest rank trained."""
    images, lineages, tree = read_data(cfg, rank, world)
    stage_ranks = stage_plan(tree, cfg.first_level, cfg.level)  # from the full hierarchy, also for flat: the same steps
    if not tree.size(stage_ranks[0]):  # e.g. folders that start at family, and the default --level order
        coarsest = RANKS[min(r for r in range(len(RANKS)) if tree.size(r))]
        raise SystemExit(f"error: {cfg.data} names no {cfg.first_level} to {cfg.level} (its coarsest rank is "
                         f"{coarsest}): train with --level {coarsest} or finer")
    if rank == 0 and (note := skipped_ranks_note(tree, stage_ranks, cfg.first_level, cfg.level)):
        print(note)  # a rank asked for that gets no stage: said before any training
    if len(images) < cfg.batch_size:
        raise SystemExit(f"error: {cfg.data} has {len(images)} images, fewer than --batch-size {cfg.batch_size}")
    if cfg.latent and (n := len(held_out_split(len(images), cfg.seed)[1])) < cfg.ae_batch_size:
        raise SystemExit(f"error: {cfg.data} has {n} images for the autoencoder to train on (5 % are held out), "
                         f"fewer than --ae-batch-size {cfg.ae_batch_size}")
    if cfg.schedule == "flat":  # the baseline without a hierarchy: names of one rank only, one table in use
        lineages = [flat_lineage(lin, stage_ranks[-1]) for lin in lineages]
        tree = Taxonomy(lineages)
    # Ids in the order a checkpoint's lineages rebuild them (sample.py does Taxonomy(ckpt["lineages"])).
    taxonomy = Taxonomy(tree.lineages())
    return TaxonDataset(images, lineages, taxonomy), taxonomy, stage_ranks


# The checkpoint's choices an extension keeps: its network, betas, ranks and condition dropout
INHERITED = ("level", "first_level", "schedule", "p_uncond", "p_cut", "loss_weight", "noise_schedule", "size",
             "image_size")


def load_extension(cfg, rank=0, world=1):
    """--extend: the run of the checkpoint cfg.extend (INHERITED) on the images of --data, whose new taxa join its
    taxonomy after the old ones (old ids kept: build_stage gives them zero rows), and its one stage to train."""
    old = read_checkpoint(cfg.extend)
    cfg, finest = replace(cfg, **{k: old["train_config"][k] for k in INHERITED}), RANKS.index(old["level"])
    if old["autoencoder"]:
        raise SystemExit(f"error: {cfg.extend} draws latents; --extend teaches pixel checkpoints only")
    if os.path.abspath(os.path.dirname(cfg.extend)) == os.path.abspath(cfg.out):
        raise SystemExit(f"error: --out {cfg.out} holds {cfg.extend}; write the extended model to another --out")
    images, lineages, _ = read_data(cfg, rank, world)
    taxonomy = Taxonomy(old["lineages"])
    try:
        lineages, added = taxonomy.merge(lineages)
    except LineageError as e:
        raise SystemExit(f"error: {cfg.data} does not fit {cfg.extend}: {e}") from None
    if cfg.extend_steps and not any(added[:finest + 1]):
        raise SystemExit(f"error: {cfg.data} adds nothing to {cfg.extend}: it knows every name down to {old['level']}")
    if rank == 0:
        print(f"{cfg.data}: {len(images)} images, new to {cfg.extend}: "
              + ", ".join(f"{n} {RANKS[r]}" for r, n in enumerate(added) if n))
    keep = [i % len(images) for i in range(max(len(images), cfg.batch_size))]  # a few pictures fill a batch
    dataset = TaxonDataset(images[keep], [lineages[i] for i in keep], taxonomy)
    stages = [(finest, cfg.extend_steps, round(cfg.cooldown * cfg.extend_steps))]
    return cfg, dataset, taxonomy, [RANKS.index(r) for r in old["stages"]], stages


def skipped_ranks_note(tree, stage_ranks, first_level, level):
    """Why a rank between first_level and level gets no stage (stage_plan), or None if every one does."""
    skipped = [r for r in range(RANKS.index(first_level), RANKS.index(level) + 1) if r not in stage_ranks]
    if not skipped:
        return None
    why = {"no more taxa in the data than a coarser rank: nothing new to split": [r for r in skipped if tree.size(r)],
           "the data names none": [r for r in skipped if not tree.size(r)]}
    return ("note: no stage for " + ", ".join(f"{', '.join(RANKS[r] for r in ranks)} ({reason})"
                                            for reason, ranks in why.items() if ranks)
            + "; training " + " -> ".join(RANKS[r] for r in stage_ranks))


def describe_run(dataset, taxonomy, schedule, stages):
    """train.py's first line: the data (a long tail shows as a spread of counts) and the stages it will train."""
    counts = torch.unique(dataset.ids, dim=0, return_counts=True)[1]  # images of each lineage
    spread = f" ({counts.min()} to {counts.max()} images each)" if counts.min() < counts.max() else ""
    plan = " -> ".join(f"{RANKS[r]} ({n} steps{f', the last {c} cooling down' if c else ''})" for r, n, c in stages)
    return f"data: {len(dataset)} images, {taxonomy.size(len(RANKS) - 1)} species{spread}; schedule {schedule}: " + plan


def parse_args(argv=None):
    """The TrainConfig of a command line, its values checked one by one and then together (check_flag_pairs)."""
    parser = config_parser(TrainConfig, __doc__)
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    check_flag_pairs(cfg, parser.error)
    return cfg


if __name__ == "__main__":
    try:
        main(parse_args())
    except CheckpointError as e:  # a checkpoint that cannot be read or written (a full disk)
        sys.exit(f"error: {e}")
