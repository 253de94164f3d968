"""
Train TaxaDiffusion stage by stage: coarse ranks first, then one finer rank per stage.

    python train.py --level order      # trains the class stage, then the order stage (~9 min on 2 CPU cores)
    python train.py --level species    # continues down to species, reusing out/class.pt and out/order.pt
    python train.py --data train.json --image-size 64   # your own data (README: Training on your own data)

Stage `order` conditions on the lineage down to order (kingdom, phylum, class,
order) and starts from the weights of the stage before it. A missing earlier
stage is trained first. Each stage writes out/<level>.pt (plain data, opens
with torch.load(weights_only=True)) and out/<level>.png: one row per taxon of
that rank, drawn with the EMA weights and a fixed seed.

Read next: sample.py.
"""
import argparse
import copy
import os
import time
from dataclasses import asdict, dataclass, fields

import torch
from tqdm import tqdm

from model import (Diffusion, DiffusionConfig, TaxaDiffusion, condition_dropout, cut_lineage,
                   guided_eps_fn, save_checkpoint, save_grid, update_ema)
from taxonomy import FORMATS, RANKS, DataError, TaxonDataset, build_taxonomy, load_data
from unet import SIZES, UNetConfig


@dataclass
class TrainConfig:
    level: str = "order"  # train every stage down to this rank
    first_level: str = "class"  # the first stage; coarser ranks (kingdom, phylum) are folded into it
    steps: int = 0  # optimizer steps per stage; 0 = 500 for the first two stages, 1000 for each finer one
    batch_size: int = 32  # images per step
    lr: float = 1e-3  # AdamW learning rate, after warm-up (a small UNet takes a large one)
    warmup: int = 100  # steps of linear learning-rate warm-up at the start of each stage
    embed_lr_mult: float = 10.0  # learning rate of the rank embedding tables = lr * this
    grad_clip: float = 1.0  # max gradient norm, as in the paper
    ema_decay: float = 0.995  # EMA of the weights, used for every picture
    p_uncond: float = 0.1  # probability of dropping the whole lineage (for guidance)
    p_cut: float = 0.2  # probability of cutting the lineage at a random coarser rank
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
    seed: int = 0  # seeds the toy data, the weights, the batches and the grids
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    out: str = "out"  # checkpoints, grids and the log go here
    guidance: float = 3.0  # guidance scale of the grids (1 = none)
    guide_from: str = "null"  # negative branch of the grids' guidance: null, parent or root (see sample.py)
    grid_cols: int = 8  # samples per row of the grids
    grid_steps: int = 25  # DDIM steps of the grids


def stage_plan(taxonomy, first_level, level):
    """Ranks to train, coarse to fine: first_level, then every finer rank that splits a taxon, down to level."""
    first, last = RANKS.index(first_level), RANKS.index(level)
    while taxonomy.size(first) == 0 and first < last:  # data that starts below first_level (e.g. at order)
        first += 1
    if last < first:
        raise SystemExit(f"error: --level {level} is coarser than the first stage --first-level {first_level}")
    return [first] + [r for r in taxonomy.stage_ranks() if first < r <= last]


def check_same_taxonomy(ckpt, lineages, path):
    """Stage checkpoints are chained by taxon id, so they must come from the same tree."""
    if set(map(tuple, ckpt["lineages"])) != set(map(tuple, lineages)):
        raise SystemExit(f"error: {path} was trained on another taxonomy than --data; "
                         f"use another --out or delete {path}")


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


def train_stage(cfg, level, stages, dataset, taxonomy, lineages, prev_path, log):
    """Train one stage: condition on ranks 0..level, start from the previous stage's weights."""
    # The first stages learn to draw at all and the coarse traits; the finer traits are small, and took
    # about twice as long to show on the toy tree.
    steps = cfg.steps or (500 if stages.index(level) < 2 else 1000)
    torch.manual_seed(cfg.seed + level)
    device = cfg.device
    unet_config = UNetConfig(in_channels=3, image_size=cfg.image_size, **SIZES[cfg.size])
    vocab_sizes = [len(v) for v in taxonomy.vocab]
    model = TaxaDiffusion(unet_config, vocab_sizes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    if prev_path:
        prev = torch.load(prev_path, map_location=device, weights_only=True)
        check_same_taxonomy(prev, lineages, prev_path)
        # The new rank's embedding table was never used before, so it is still all
        # zeros: every new taxon starts exactly as its parent, and learns what differs.
        model.load_state_dict(prev["model"])
        ema.load_state_dict(prev["ema"])
    else:
        # From scratch, the first stage's ranks start random; every finer rank's table
        # starts at zero and stays zero (it is never looked up) until its stage begins.
        for r in range(level + 1, len(RANKS)):
            torch.nn.init.zeros_(model.conditioner.embed[r].weight)
        ema.load_state_dict(model.state_dict())
    diffusion_config = DiffusionConfig()
    diffusion = Diffusion(diffusion_config).to(device)
    n_params = sum(p.numel() for p in model.parameters())

    # The rank tables get a larger step: a new rank's table starts at zero and has one stage to
    # move from "same as the parent" to "different", while the UNet keeps what it learned.
    tables = list(model.conditioner.embed.parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("conditioner.embed.")]
    opt = torch.optim.AdamW([{"params": others}, {"params": tables, "lr": cfg.lr * cfg.embed_lr_mult}],
                            lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(cfg.seed + level))
    batches = (b for _ in iter(int, 1) for b in loader)  # endless stream of batches

    name = RANKS[level]
    print(f"stage {name}: ranks {'/'.join(RANKS[:level + 1])}, {n_params / 1e6:.2f} M params, "
          f"{steps} steps of {cfg.batch_size}, from {prev_path or 'scratch'}")
    model.train()
    t0 = time.time()
    pbar = tqdm(range(1, steps + 1), desc=f"{name:>8s}", dynamic_ncols=True)
    for step in pbar:
        x0, ids = next(batches)
        x0, ids = x0.to(device), ids.to(device)
        ids = condition_dropout(cut_lineage(ids, level), cfg.p_uncond, cfg.p_cut)
        loss = diffusion.loss(model, x0, ids)
        if not torch.isfinite(loss):
            raise SystemExit(f"error: loss is {loss.item()} at step {step} of stage {name}; "
                             f"{prev_path or 'no checkpoint'} is untouched; try a lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        update_ema(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))  # short memory early on
        pbar.set_postfix(loss=f"{loss.item():.4f}")
        if step % 50 == 0 or step == steps:
            ips = step * cfg.batch_size / (time.time() - t0)
            log.write(f"stage {name} step {step}/{steps} loss {loss.item():.4f} "
                      f"lr {sched.get_last_lr()[0]:.2e} img/s {ips:.1f}\n")
            log.flush()
    train_time = time.time() - t0

    path = os.path.join(cfg.out, f"{name}.pt")
    save_checkpoint(path, model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(),
                    step=steps, level=name, stages=[RANKS[r] for r in stages],
                    unet_config=asdict(unet_config), diffusion_config=asdict(diffusion_config),
                    train_config=asdict(cfg), vocab_sizes=vocab_sizes, lineages=lineages)
    t1 = time.time()
    draw_stage_grid(ema.eval(), diffusion, taxonomy, level, stages[0], cfg, os.path.join(cfg.out, f"{name}.png"))
    msg = (f"stage {name} done: {train_time:.0f} s training ({steps * cfg.batch_size / train_time:.1f} img/s), "
           f"{time.time() - t1:.0f} s grid -> {path}, {os.path.join(cfg.out, name + '.png')}")
    print(msg)
    log.write(msg + "\n")


def main(cfg):
    os.makedirs(cfg.out, exist_ok=True)
    try:  # bad data ends here, in one line, before any checkpoint is touched
        images, raw_lineages, wheres = load_data(
            cfg.data, cfg.image_size, cfg.per_species, cfg.seed, fmt=cfg.format, top_rank=cfg.top_rank,
            columns=cfg.columns, image_root=cfg.image_root, boxes=cfg.boxes, cache_dir=cfg.out, workers=cfg.workers)
        taxonomy, raw_lineages = build_taxonomy(raw_lineages, wheres, keep_first=cfg.conflicts == "keep-first")
    except DataError as e:
        raise SystemExit(f"error: {e}")
    dataset = TaxonDataset(images, raw_lineages, taxonomy)
    if len(dataset) < cfg.batch_size:  # batches drop the remainder: there would be none at all
        raise SystemExit(f"error: {cfg.data} has {len(dataset)} images, fewer than --batch-size {cfg.batch_size}")
    lineages = taxonomy.lineages()
    stages = stage_plan(taxonomy, cfg.first_level, cfg.level)
    print(f"data: {len(dataset)} images, {taxonomy.size(len(RANKS) - 1)} species; "
          f"stages: {' -> '.join(RANKS[r] for r in stages)}")
    prev_path = None
    with open(os.path.join(cfg.out, "train.log"), "a") as log:
        for level in stages:
            path = os.path.join(cfg.out, f"{RANKS[level]}.pt")
            if os.path.exists(path):
                check_same_taxonomy(torch.load(path, weights_only=True), lineages, path)
                print(f"stage {RANKS[level]}: using {path} (delete it to train this stage again)")
            else:
                train_stage(cfg, level, stages, dataset, taxonomy, lineages, prev_path, log)
            prev_path = path


def parse_args(argv=None):
    """Every TrainConfig field is a flag: --batch-size 64, --level species, ..."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(TrainConfig):
        choices = {"level": RANKS, "first_level": RANKS, "size": SIZES, "guide_from": ("null", "parent", "root"),
                   "format": FORMATS, "top_rank": ("auto",) + RANKS, "conflicts": ("error", "keep-first")}.get(f.name)
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                            choices=choices, help=f"default: {f.default}")
    return TrainConfig(**vars(parser.parse_args(argv)))


if __name__ == "__main__":
    main(parse_args())
