"""
Generate images for a (partial) lineage with a trained TaxaDiffusion checkpoint.

    python sample.py --lineage "Aves/Passeriformes/..."        # 16 passerines -> out/samples.png
    python sample.py --lineage "Corvus corax" --guide-from parent
    python sample.py --lineage "Parus major" --refine           # one row per rank, class -> species
    python sample.py --list                                     # the taxonomy the checkpoint knows
    python sample.py --tree                                     # every node of it, drawn -> out/tree.png
    python sample.py --lineage "Corvus corax" --guidance-interval 0.28,5.42   # guided only at middle noise
    python sample.py --lineage "Aves/Passeriformes/Corvidae/Corvus/Corvus novus"   # a new species: its genus

Names may start at any rank and are matched ignoring case ('_' reads as a
space); '...' or a missing tail leaves the finer ranks unspecified. A name the
checkpoint does not know is a typo, unless it is a species (its finest rank)
that ends a lineage right below its genus: then it is new, drawn as that genus
(train.py --extend teaches it). A latent checkpoint (train.py --latent) is
decoded by the autoencoder.pt beside it.

Read next: fid.py.
"""
import difflib
import math
import os
import sys

import torch

from model import Diffusion, DiffusionConfig, cut_lineage, deepest_rank, negative_lineage
from plumbing.checkpoints import CheckpointError, finest_checkpoint, load_checkpoint
from plumbing.cli import add_sampling_flags, image_path, positive_int, script_parser
from plumbing.images import draw, save_grid, save_tree
from plumbing.latent import autoencoder_of
from taxonomy import RANKS, LineageError, Taxonomy


def main(args):
    args.ckpt = args.ckpt or finest_checkpoint("out")
    model, ckpt = load_checkpoint(args.ckpt, args.device)
    taxonomy = Taxonomy(ckpt["lineages"])
    if args.list:
        print(f"{args.ckpt}: trained down to {ckpt['level']}")
        taxonomy.print_tree()
        return
    diffusion = Diffusion(DiffusionConfig(**ckpt["diffusion_config"])).to(args.device)
    autoencoder = autoencoder_of(ckpt, args.ckpt, args.device)  # a latent checkpoint's, from beside it; None in pixels
    finest = RANKS.index(ckpt["level"])  # the checkpoint knows ranks 0..finest
    root_rank = RANKS.index(ckpt["stages"][0])
    if args.tree is not None:
        return draw_tree(args, model, diffusion, autoencoder, taxonomy, [RANKS.index(r) for r in ckpt["stages"]])
    ids = torch.tensor(lineage_ids(taxonomy, args.lineage, args.ckpt), device=args.device)  # (R,)
    if deepest_rank(ids[None]).item() > finest:  # ids[None]: (1, R), a batch of one lineage
        print(f"note: this checkpoint was trained down to {ckpt['level']}; finer ranks of the lineage are ignored")
        ids = cut_lineage(ids[None], finest)[0]  # (1, R) -> (R,)
    name = taxonomy.lineage_str(ids.tolist())
    if args.guidance != 1 and torch.equal(negative_lineage(ids[None], args.guide_from, root_rank), ids[None]):
        print(f"note: the {args.guide_from} negative of '{name}' is the lineage itself (the first stage is "
              f"{RANKS[root_rank]}), so guidance changes nothing; use --guide-from null or parent")
    size = model.unet.cfg.image_size
    x_T = torch.randn((args.n, model.unet.cfg.in_channels, size, size), device=args.device,
                      generator=torch.Generator(args.device).manual_seed(args.seed))  # a seed gives the same pictures

    # one row for the lineage, or (--refine) one row per rank from the first stage down to it, same noise
    deepest = deepest_rank(ids[None]).item()  # (1, R) -> a rank index
    levels = range(min(root_rank, deepest), deepest + 1) if args.refine else [deepest]
    rows = torch.cat([cut_lineage(ids[None], lv) for lv in levels])  # (rows, R)
    images = draw(diffusion, model, rows.repeat_interleave(args.n, 0), x_T.repeat(len(rows), 1, 1, 1), args.guidance,
                  args.guide_from, root_rank, args.steps, args.sampler, seed=args.seed + 1, autoencoder=autoencoder,
                  interval=args.guidance_interval)
    out = args.out or os.path.join("out", "refine.png" if args.refine else "samples.png")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    if args.refine:  # a row per rank, labelled
        save_grid(images, out, args.n, labels=[taxonomy.vocab[lv][ids[lv].item()] for lv in levels])
    else:  # a near-square grid: 16 images as 4 x 4
        save_grid(images, out, next(c for c in range(math.isqrt(args.n - 1) + 1, args.n + 1) if args.n % c == 0))
    print(f"{len(images)} images of '{name}' -> {out}")


def lineage_ids(taxonomy, text, ckpt):
    """The ids of --lineage. A lineage that ends in a name new to the checkpoint, after its parent
    (taxonomy.parse_new), draws the parent and says how to teach it; any other unknown name is a typo."""
    try:
        return taxonomy.parse(text)
    except LineageError:
        if not (new := taxonomy.parse_new(text)):
            raise
        ids, r, name = new
        parent = taxonomy.vocab[r - 1][ids[r - 1]]
        siblings = [taxonomy.vocab[q][i] for q, i in taxonomy.children((r - 1, ids[r - 1]))]
        typo = "".join(f" (or did you mean '{n}'?)" for n in difflib.get_close_matches(name, siblings, 1, 0.85))
        print(f"note: {ckpt} does not know the {RANKS[r]} '{name}'{typo}, so this draws its {RANKS[r - 1]} '{parent}'"
              f"; to teach it, put its pictures in NEW/{parent}/{name}/ and run python train.py --extend {ckpt} "
              f"--data NEW --out out/extended")
        return ids


def draw_tree(args, model, diffusion, autoencoder, taxonomy, stage_ranks):
    """--tree: the checkpoint's tree, root to leaves, one column per stage rank; each node drawn from its partial
    lineage and every node from the same noise, so a reader sees each rank add its trait. --tree LINEAGE: a subtree."""
    top = taxonomy.parse(args.tree) if args.tree else [0] * len(RANKS)  # the root: nothing known
    ranks = [r for r in stage_ranks if r > max((q for q, i in enumerate(top) if i), default=-1)]
    nodes, columns, parents = [top], [0], [-1]  # lineage ids, column and parent of each node, root first
    for c, r in enumerate(ranks, start=1):
        for i in range(1, len(taxonomy.vocab[r])):
            ids = taxonomy.ancestors(r, i)
            above = [j if q <= ranks[c - 2] else 0 for q, j in enumerate(ids)] if c > 1 else (  # its parent's
                top if all(a == b for a, b in zip(top, ids) if a) else None)  # under the top node: shares its names
            if above in nodes:
                nodes.append(ids), columns.append(c), parents.append(nodes.index(above))
    size = model.unet.cfg.image_size
    x_T = torch.randn((1, model.unet.cfg.in_channels, size, size), device=args.device,
                      generator=torch.Generator(args.device).manual_seed(args.seed))  # one noise for every node
    images = draw(diffusion, model, torch.tensor(nodes, device=args.device), x_T.expand(len(nodes), -1, -1, -1),
                  args.guidance, args.guide_from, stage_ranks[0], args.steps, args.sampler, seed=args.seed + 1,
                  autoencoder=autoencoder, interval=args.guidance_interval)
    leaf = [i not in parents for i in range(len(nodes))]
    labels = [taxonomy.lineage_str(ids).split("/")[-1] if is_leaf else "" for ids, is_leaf in zip(nodes, leaf)]
    headers = [taxonomy.lineage_str(top).split("/")[-1] if args.tree else "root"] + [RANKS[r] for r in ranks]
    out = args.out or os.path.join("out", "tree.png")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    save_tree(images, parents, columns, labels, headers, out)
    print(f"{len(nodes)} nodes, {sum(leaf)} {RANKS[ranks[-1]] if ranks else 'leaves'} -> {out}")


def build_parser():
    """The command line; each flag's type (plumbing/cli.py) says what it takes."""
    p = script_parser(__doc__)
    p.add_argument("--lineage", default="Aves/Passeriformes/...", help="e.g. 'Aves/Passeriformes/...' or 'Corvus corax'")
    p.add_argument("--n", type=positive_int, default=16, help="images (per row with --refine)")
    p.add_argument("--refine", action="store_true", help="one row per rank, from the first stage down to the lineage")
    p.add_argument("--out", type=image_path, default=None,
                   help="PNG to write (default: out/samples.png, or out/refine.png)")
    p.add_argument("--tree", nargs="?", const="", default=None, metavar="LINEAGE",
                   help="draw the checkpoint's tree, every node from its partial lineage -> out/tree.png (or a subtree)")
    p.add_argument("--list", action="store_true", help="print the checkpoint's taxonomy tree and exit")
    add_sampling_flags(p)
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (LineageError, CheckpointError) as e:
        sys.exit(f"error: {e}")
