"""
Train TaxaDiffusion stage by stage: coarse ranks first, then one finer rank per stage.

    python train.py --level order      # the class stage, then the order stage (3 min 34 s on 2 CPU cores)
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
first as a stage of its own (model.py's autoencoder_stage: out/autoencoder.pt,
and out/autoencoder.png, held-out originals over their reconstructions); the
images are encoded once, and the loop below is the same: a latent is the x0.

Read next: sample.py.
"""
import copy
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from model import (CheckpointError, Diffusion, DiffusionConfig, TaxaDiffusion, by_name, check_checkpoint,
                   condition_dropout, cut_lineage, free_flags, read_checkpoint, run_header, to_device, update_ema)
from model import (catch_stop_signals, check_run, describe_run, finish_stage, mean_over_processes, noise_schedule,
                   read_data, run_guard, save_resumable, set_rng_states, skipped_ranks_note, stage_batches,
                   start_processes, step_randomness, wrap_model)
from model import AUTOENCODER_FLAGS, autoencoder_config, autoencoder_stage, encode_dataset, held_out_split
from model import TRAIN_FLAG_CHECKS, check_flag_pairs, config_parser
from taxonomy import RANKS, TaxonDataset, Taxonomy
from unet import UNetConfig

@dataclass
class TrainConfig:
    # the method
    level: str = "order"  # train every stage down to this rank
    first_level: str = "class"  # the first stage; coarser ranks (kingdom, phylum) are folded into it
    schedule: str = "progressive"  # progressive (stage by stage), or one stage of as many steps: all, random, flat
    p_uncond: float = 0.1  # probability of dropping the whole lineage (for guidance)
    p_cut: float = 0.2  # probability of cutting the lineage at a random coarser rank
    freeze: str = "none"  # what a later progressive stage trains: none = all, unet = the lineage readers, new-rank
    new_rank_init: str = "zero"  # a new rank's table starts at zero (each taxon as its parent) or random (ablation)
    loss_weight: str = "v"  # v: the v-error, eps-error / alpha_bar_t (Diffusion.loss); eps: Algorithm 1's
    noise_schedule: str = "auto"  # betas: linear (Ho's), cosine, scaled-linear (LDM's); auto = LDM's on latents, else Ho's
    # the schedule
    stage_steps: str = "200,200,600,800,1800"  # steps of the 1st, 2nd, ... stage; the last number repeats
    steps: int = 0  # if not 0, every stage trains this many optimizer steps (overrides --stage-steps)
    batch_size: int = 32  # images per step, over all processes (torchrun)
    lr: float = 1e-3  # AdamW learning rate after warm-up (a small UNet trained from scratch takes a large one)
    embed_lr_mult: float = 30.0  # the rank tables' learning rate = lr * this (a new table has one stage to move)
    warmup: int = 100  # steps of linear learning-rate warm-up at the start of each stage
    cooldown: float = 0.3  # the last stage decays the rate to 0 over this fraction of the plan's last stage (every schedule)
    grad_clip: float = 1.0  # max gradient norm, as in the paper
    ema_decay: float = 0.995  # EMA of the weights, used for every picture
    size: str = "small"  # named UNet size, see unet.SIZES
    # pixels or latents (README, "Pixel or latent")
    latent: bool = False  # train on the latents of an autoencoder, trained first as a stage of its own (out/autoencoder.pt)
    latent_f: int = 4  # the autoencoder's downsampling factor, 2, 4 or 8: latents of image_size / f
    latent_channels: int = 4  # channels of a latent
    ae_steps: int = 1500  # optimizer steps of the autoencoder stage
    ae_batch_size: int = 16  # images per autoencoder step, over all processes
    ae_crop: int = 32  # the autoencoder trains on random crops of this side (a multiple of --latent-f; 0: whole images)
    ae_lr: float = 3e-4  # the autoencoder's AdamW learning rate
    ae_edge_loss: str = "fft"  # what keeps its edges sharp beside L1: fft, gradient, ssim or none (unet.autoencoder_loss)
    # the data
    data: str = "toy"  # "toy", a folder tree, a .csv/.tsv table or an iNaturalist .json (docs/data.md)
    image_size: int = 32  # images are resized to image_size x image_size
    per_species: str = "64"  # toy images per species (the few-shot knob), or a long tail: pairs:64/4, zipf:64
    format: str = "auto"  # reader of --data; auto = from what the path is (see taxonomy.FORMATS)
    top_rank: str = "auto"  # folder trees: rank of the top folders; auto = by family endings, else leaves = species
    columns: str = ""  # tables: our=their column names, e.g. "image=file,species=scientific_name"
    image_root: str = ""  # tables and iNat JSON: the folder image paths start from (default: the table's folder)
    boxes: str = ""  # FishNet: bounding-box JSON {file stem: {x, y, w, h}}; each box crops its image
    conflicts: str = "error"  # a taxon under two parents: error, or keep-first (warn, follow the first parent)
    # the run
    seed: int = 0  # seeds the toy data, the weights, the batches and the grids
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda or cuda:N; cuda when a GPU is visible
    out: str = "out"  # checkpoints, grids, the image cache and the log go here
    workers: int = min(8, os.cpu_count() or 1)  # processes decoding images on the first pass (then cached in --out)
    save_every: int = 200  # rewrite out/<level>.last.pt every this many steps (0: only on Ctrl-C or SIGTERM)
    guidance: float = 3.0  # guidance scale of the stage grids (1 = none)
    guide_from: str = "null"  # negative branch of the grids' guidance: null, parent or root (see sample.py)
    grid_cols: int = 8  # samples per row of the grids
    grid_steps: int = 20  # sampling steps of the grids
    grid_sampler: str = "ddim"  # sampler of the grids: ddim, ddpm or dpm++ (model.Diffusion.sample)
    amp: bool = False  # bf16 autocast, CUDA only (a CPU without bf16 hardware runs it many times slower)
    compile: bool = False  # torch.compile the network (pays off on GPUs; on 2 CPU cores the compile costs more)
    attention: str = "auto"  # auto (Triton kernel on CUDA, SDPA elsewhere), triton, sdpa or torch: unet.attention

    def __post_init__(self):
        self.per_species = str(self.per_species)  # 64 and "64" are one run (checkpoints compare the two)


def stage_plan(taxonomy, first_level, level):
    """Ranks to train, coarse to fine: first_level, then every finer rank that splits a taxon, down to level."""
    first, last = RANKS.index(first_level), RANKS.index(level)
    if last < first:  # the command line refuses it too (check_flag_pairs); a TrainConfig built in Python may not
        raise SystemExit(f"error: --level {level} is coarser than the first stage --first-level {first_level}")
    while taxonomy.size(first) == 0 and first < last:  # data that starts below first_level (e.g. at order)
        first += 1
    return [first] + [r for r in taxonomy.stage_ranks() if first < r <= last]


def schedule_stages(cfg, plan):
    """(level, steps, cool-down steps) of each stage to train. progressive trains the plan's stages one
    after another; the other schedules train one stage, at the finest rank, for as many steps as all of
    them. Only the command's last stage cools down, and by as many steps in every schedule: --cooldown
    times the plan's last stage (so a one-stage schedule is not given a longer decay than progressive)."""
    given = [int(n) for n in cfg.stage_steps.split(",")]  # the fine traits take longer
    steps = [cfg.steps or given[min(i, len(given) - 1)] for i in range(len(plan))]
    cool = round(cfg.cooldown * steps[-1])
    if cfg.schedule == "progressive":
        return [(level, n, cool if i == len(plan) - 1 else 0) for i, (level, n) in enumerate(zip(plan, steps))]
    return [(plan[-1], sum(steps), cool)]


# -----------------------------------------------------------------------------
# One stage: the loop, then how its model is built


def train_stage(cfg, stage, plan, dataset, taxonomy, log, rank=0, world=1, stop=()):
    """Train one stage (a Stage from build_stage): condition on ranks 0..stage.level of each lineage.

    Returns the number of the signal that stopped it (SIGINT, SIGTERM), or None once out/<level>.pt is written.
    """
    model, ema, opt, sched, level, steps = stage.model, stage.ema, stage.opt, stage.sched, stage.level, stage.steps
    diffusion = Diffusion(DiffusionConfig(**stage.header["diffusion_config"])).to(cfg.device)  # --noise-schedule
    device, B = cfg.device, cfg.batch_size
    net, amp = wrap_model(model, cfg, world)
    mine = slice(rank * B // world, (rank + 1) * B // world)  # this process's part of every global batch
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=stage_batches(len(dataset), B, cfg.seed, level, stage.start + 1, steps, rank, world))
    model.train()
    t0, saved = time.time(), stage.start
    pbar = tqdm(loader, desc=f"{RANKS[level]:>8s}", initial=stage.start, total=steps, dynamic_ncols=True,
                disable=rank > 0)
    for step, (x0, ids) in enumerate(pbar, start=stage.start + 1):
        flip, t, eps, u, depth = step_randomness(cfg.seed, level, step, B, x0.shape[1:], device, mine)
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.to(device).flip(-1), x0.to(device))  # a random mirror image
        # The method: this stage knows the lineage down to `level`; dropout cuts it shorter or drops it
        ids = cut_lineage(ids.to(device), level)
        if cfg.schedule == "random":  # the ablation: each example its own depth, first stage's rank .. level
            ids = cut_lineage(ids, plan[0] + (depth * (level - plan[0] + 1)).long())
        ids = condition_dropout(ids, cfg.p_uncond, cfg.p_cut, u=u)
        with amp:
            loss = diffusion.loss(net, x0, ids, t=t, eps=eps, weight=cfg.loss_weight)  # Algorithm 1 (v-weighted)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))  # short memory early on

        mean_loss, stopping = mean_over_processes(loss, stop, world, device)
        if not math.isfinite(mean_loss):  # these weights are lost; the checkpoint on disk is not
            kept = f"{stage.last_path} (step {saved}) is intact" if saved else "no checkpoint of this stage was written"
            msg = f"error: loss is {mean_loss} at step {step} of stage {RANKS[level]}; {kept}; try a lower --lr"
            raise SystemExit(msg if rank == 0 else 1)
        pbar.set_postfix(loss=f"{mean_loss:.4f}")
        if step % 50 == 0 or step == steps:
            log.write(f"stage {RANKS[level]} step {step}/{steps} loss {mean_loss:.4f} lr {sched.get_last_lr()[0]:.2e} "
                      f"img/s {(step - stage.start) * B / (time.time() - t0):.1f}\n")
            log.flush()
        if stopping or (cfg.save_every and step % cfg.save_every == 0) or step == steps:
            save_resumable(stage.last_path, rank, world, **stage.header, model=model.state_dict(), ema=ema.state_dict(),
                           optimizer=opt.state_dict(), scheduler=sched.state_dict(), step=step,
                           cooldown_steps=stage.cool, level=RANKS[level])
            saved = step
        if stopping:
            if rank == 0:
                print(f"\nstopped at step {step}/{steps} of stage {RANKS[level]}: saved {stage.last_path}; "
                      f"run the same command again to resume", file=sys.stderr)
            return stop[0] if stop else signal.SIGINT
    finish_stage(cfg, stage, diffusion, taxonomy, plan, time.time() - t0, log, rank, world)
    return None


@dataclass
class Stage:
    """What one stage trains and where it stands: built by build_stage, stepped by train_stage."""
    level: int  # the finest rank this stage conditions on
    steps: int  # optimizer steps of the stage
    cool: int  # its last `cool` steps decay the learning rate to 0
    model: TaxaDiffusion
    ema: TaxaDiffusion
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    start: int  # steps already done (a resumed stage)
    header: dict  # what every checkpoint of this run records: configs, taxonomy (see run_header)
    path: str  # out/<level>.pt, written when the stage is done
    last_path: str  # out/<level>.last.pt, all it needs to carry on
    autoencoder: object  # --latent: the Autoencoder whose latents it learns (its grid is decoded); None in pixels


def build_stage(cfg, level, steps, cool, plan, taxonomy, prev_path, rank=0, world=1, autoencoder=None):
    """The model of the stage that conditions on ranks 0..level, and where it starts from: a half-trained
    run of this stage (out/<level>.last.pt), else the previous stage's weights, else scratch."""
    path, last_path = (os.path.join(cfg.out, f"{RANKS[level]}{end}.pt") for end in ("", ".last"))
    header = run_header(cfg, taxonomy, plan, autoencoder)
    torch.manual_seed(cfg.seed + level)  # the same initial weights in every process
    model = to_device(TaxaDiffusion(UNetConfig(**header["unet_config"]), header["vocab_sizes"]), cfg.device)
    # The first stage's ranks start random; every finer rank's table starts at zero, and stays so until its
    # stage begins (its ids are 0 until then, so RankConditioner's mask zeroes its output and its gradient):
    # a new taxon starts exactly as its parent, and learns what differs.
    for r in range(level + 1, len(RANKS)):
        torch.nn.init.zeros_(model.conditioner.embed[r].weight)
    ema = copy.deepcopy(model).requires_grad_(False)
    # The rank tables take a larger step: a new one has a single stage to move from "same as the parent".
    tables = list(model.conditioner.embed.parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("conditioner.embed.")]
    opt = torch.optim.AdamW([{"params": others}, {"params": tables, "lr": cfg.lr * cfg.embed_lr_mult}],
                            lr=cfg.lr, weight_decay=0.0, fused=True)  # fused: one kernel for every tensor's update
    resumed = read_checkpoint(last_path) if os.path.exists(last_path) else None
    if resumed:
        check_checkpoint(resumed, last_path, header, free_flags(cfg), resuming=True)
        cool = resumed.get("cooldown_steps", cool)  # a stage keeps the cool-down it started with, whatever --level says now
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, cfg.warmup, cool))
    # Each process its own seed for anything that draws from the global generator (dropout, if a UNet has it).
    torch.manual_seed(cfg.seed + level + 1000 * (rank + 1))

    start, source = 0, prev_path or "scratch"
    if resumed:  # an interrupted run of this stage: carry on exactly where it stopped
        for obj, key in ((model, "model"), (ema, "ema"), (opt, "optimizer"), (sched, "scheduler")):
            obj.load_state_dict(resumed[key])
        if len(resumed["rng"]) == world:  # one state per process; with another number of processes, fresh seeds
            set_rng_states(resumed["rng"][rank])
        start, source = resumed["step"], f"{last_path} at step {resumed['step']}"
    elif prev_path:  # the stage before: its rank tables reordered by taxon name into this run's ids
        prev = read_checkpoint(prev_path)
        check_checkpoint(prev, prev_path, header, free_flags(cfg), resuming=False)
        model.load_state_dict(by_name(prev["model"], prev["vocab"], taxonomy))
        ema.load_state_dict(by_name(prev["ema"], prev["vocab"], taxonomy))
        if cfg.new_rank_init == "random":  # the ablation: new taxa start apart, like a table trained from scratch
            for r in range(plan[plan.index(level) - 1] + 1, level + 1):
                torch.nn.init.normal_(model.conditioner.embed[r].weight)  # N(0, 1), nn.Embedding's own init
                ema.conditioner.embed[r].weight.copy_(model.conditioner.embed[r].weight)
    if prev_path:  # --freeze: what a later stage may change (AdamW skips what gets no gradient)
        new_ranks = range(plan[plan.index(level) - 1] + 1, level + 1)
        for n, p in model.named_parameters():
            p.requires_grad_(trainable(n, cfg.freeze, new_ranks))
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"stage {RANKS[level]}: ranks {'/'.join(RANKS[:level + 1])}, {n_params / 1e6:.2f} M params, "
              f"{steps} steps of {cfg.batch_size}{f' on {world} processes' if world > 1 else ''}, from {source}")
    return Stage(level, steps, cool, model, ema, opt, sched, start, header, path, last_path, autoencoder)


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
    cfg = replace(cfg, noise_schedule=noise_schedule(cfg))  # checkpoints record the betas, never "auto"
    rank, world, cfg = start_processes(cfg)
    with run_guard():  # on the way out: signal handlers put back, processes parted, a bad checkpoint in one line
        check_run(cfg, world)
        dataset, taxonomy, plan = load_dataset(cfg, rank, world)
        to_train = schedule_stages(cfg, plan)
        if rank == 0:
            print(describe_run(dataset, taxonomy, cfg.schedule, to_train))
        stop = catch_stop_signals()
        prev_path, autoencoder = None, None
        with open(os.path.join(cfg.out, "train.log") if rank == 0 else os.devnull, "a") as log:
            if cfg.latent:  # the autoencoder first, a stage of its own; the rank stages then learn its latents
                autoencoder, signum = autoencoder_stage(cfg, autoencoder_config(cfg), dataset, AUTOENCODER_FLAGS, log,
                                                        rank, world, stop)
                if signum:
                    raise SystemExit(128 + signum)
                dataset.images = encode_dataset(autoencoder, dataset.images, cfg.out, cfg.device, rank=rank, world=world)
            for level, steps, cool in to_train:
                path = os.path.join(cfg.out, f"{RANKS[level]}.pt")
                if os.path.exists(path):  # a finished stage is reused only if it was trained as this run asks
                    check_checkpoint(read_checkpoint(path), path, run_header(cfg, taxonomy, plan, autoencoder),
                                     free_flags(cfg), resuming=False)
                    if rank == 0:
                        print(f"stage {RANKS[level]}: using {path} (delete it to train this stage again)")
                else:
                    stage = build_stage(cfg, level, steps, cool, plan, taxonomy, prev_path, rank, world, autoencoder)
                    if signum := train_stage(cfg, stage, plan, dataset, taxonomy, log, rank, world, stop):
                        raise SystemExit(128 + signum)  # the shell's code for "ended by this signal"
                prev_path = path


def load_dataset(cfg, rank=0, world=1):
    """The images, the taxonomy and the plan of stage ranks (read_data ends bad data in one line, before
    any checkpoint is touched). The flat baseline keeps only each image's name at the finest rank trained."""
    images, lineages, found = read_data(cfg, rank, world)
    plan = stage_plan(found, cfg.first_level, cfg.level)  # from the full hierarchy, also for flat: the same steps
    if not found.size(plan[0]):  # e.g. folders that start at family, and the default --level order
        coarsest = RANKS[min(r for r in range(len(RANKS)) if found.size(r))]
        raise SystemExit(f"error: {cfg.data} names no {cfg.first_level} to {cfg.level} (its coarsest rank is "
                         f"{coarsest}): train with --level {coarsest} or finer")
    if rank == 0 and (note := skipped_ranks_note(found, plan, cfg.first_level, cfg.level)):
        print(note)  # a rank asked for that gets no stage: said before any training
    if len(images) < cfg.batch_size:
        raise SystemExit(f"error: {cfg.data} has {len(images)} images, fewer than --batch-size {cfg.batch_size}")
    if cfg.latent and (n := len(held_out_split(len(images), cfg.seed)[1])) < cfg.ae_batch_size:
        raise SystemExit(f"error: {cfg.data} has {n} images for the autoencoder to train on (5 % are held out), "
                         f"fewer than --ae-batch-size {cfg.ae_batch_size}")
    if cfg.schedule == "flat":  # the baseline without a hierarchy: names of one rank only, one table in use
        lineages = [flat_lineage(lin, plan[-1]) for lin in lineages]
        found = Taxonomy(lineages)
    # Ids in the order a checkpoint's lineages rebuild them (sample.py does Taxonomy(ckpt["lineages"])).
    taxonomy = Taxonomy(found.lineages())
    return TaxonDataset(images, lineages, taxonomy, flip=False), taxonomy, plan  # the loop flips, with its own generator


# -----------------------------------------------------------------------------
# The command line


def build_parser():
    """Every TrainConfig field is a flag (--batch-size 64, --level species, ...), its help the field's comment;
    the values each may take are checked as it is parsed (model.py's TRAIN_FLAG_CHECKS)."""
    return config_parser(TrainConfig, __doc__, TRAIN_FLAG_CHECKS)


def parse_args(argv=None):
    """The TrainConfig of a command line, its values checked one by one and then together (check_flag_pairs)."""
    parser = build_parser()
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    check_flag_pairs(cfg, parser.error)
    return cfg


if __name__ == "__main__":
    try:
        main(parse_args())
    except CheckpointError as e:  # a checkpoint that cannot be read or written (a full disk)
        sys.exit(f"error: {e}")
