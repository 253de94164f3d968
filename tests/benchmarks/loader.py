"""
Benchmark the data loader (a script, not a test): images/s into the model, first pass against cached.

    python tests/benchmarks/loader.py                  # 3,072 toy JPEGs of 256x256 in a temporary folder, 64x64 out
    python tests/benchmarks/loader.py --images 10000 --workers 8

Writes a folder tree of toy animals upscaled to 256x256 JPEGs (tests/fixtures.py), then times
  first pass:  load_data() decoding every JPEG in DataLoader workers and writing the cache,
               then one epoch of batches out of the training DataLoader;
  cached pass: load_data() again (it finds the cache), then one epoch;
  loader only: one more epoch, the steady state of every later epoch and stage;
and, for scale, training steps of the default UNet at the same size and batch (what the loader must keep up with).
"""
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]  # the repository root, tests/
from fixtures import make_jpeg_tree  # noqa: E402
from model import Diffusion, DiffusionConfig, TaxaDiffusion  # noqa: E402
from plumbing.cli import device_name, nonneg_int, output_path, positive_int, script_parser, size_multiple  # noqa: E402
from plumbing.readers import build_taxonomy, load_data  # noqa: E402
from taxonomy import TaxonDataset  # noqa: E402
from unet import SIZES, UNetConfig  # noqa: E402


def epoch(dataset, batch_size):
    """Seconds for one shuffled epoch of batches, as train.py draws them."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    t0 = time.perf_counter()
    for x, ids in loader:
        pass
    return time.perf_counter() - t0


def one_pass(root, args):
    """(seconds, dataset): load_data from root/tree with the cache in root/out, then one epoch."""
    t0 = time.perf_counter()
    images, lineages, wheres = load_data(os.path.join(root, "tree"), args.size, cache_dir=os.path.join(root, "out"), workers=args.workers)
    taxonomy, lineages = build_taxonomy(lineages, wheres)
    dataset = TaxonDataset(images, lineages, taxonomy)
    epoch(dataset, args.batch_size)
    return time.perf_counter() - t0, dataset


def train_rate(dataset, args):
    """Images/s of training steps (forward, backward, AdamW) of the default UNet on args.device."""
    taxonomy_sizes = [int(dataset.ids[:, r].max()) + 1 for r in range(dataset.ids.shape[1])]
    model = TaxaDiffusion(UNetConfig(in_channels=3, image_size=args.size, **SIZES[args.model]), taxonomy_sizes)
    model = model.to(args.device)
    diffusion = Diffusion(DiffusionConfig()).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x, ids = next(iter(torch.utils.data.DataLoader(dataset, batch_size=args.batch_size)))
    x, ids = x.to(args.device), ids.to(args.device)
    for step in range(args.train_steps + 1):
        if step == 1:  # the first step warms up
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        loss = diffusion.loss(model, x, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    return args.train_steps * args.batch_size / (time.perf_counter() - t0)


def main(args):
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or tmp
        t0 = time.perf_counter()
        n = make_jpeg_tree(os.path.join(root, "tree"), args.images, size=256)
        print(f"wrote {n} JPEGs of 256x256 in {time.perf_counter() - t0:.0f} s under {root}/tree")
        first, dataset = one_pass(root, args)
        cached, dataset = one_pass(root, args)
        steady = epoch(dataset, args.batch_size)
        rows = [("first pass (decode + cache + 1 epoch)", first), ("cached pass (load cache + 1 epoch)", cached),
                ("loader only (1 epoch)", steady)]
        print(f"\n{len(dataset)} images of {args.size}x{args.size}, batch {args.batch_size}, {args.workers} decoding workers")
        for name, seconds in rows:
            print(f"{name:40s} {seconds:7.2f} s {len(dataset) / seconds:10.0f} img/s")
        print(f"cached pass is {first / cached:.1f}x faster than the first")
        if args.train_steps:
            rate = train_rate(dataset, args)
            print(f"training steps ({args.model} UNet, {args.device}) {rate:21.0f} img/s: "
                  f"the cached loader is {len(dataset) / steady / rate:.0f}x faster than training needs")


def build_parser():
    p = script_parser(__doc__)
    p.add_argument("--images", type=positive_int, default=3072,
                   help="JPEGs to write (rounded to a multiple of 48 species)")
    p.add_argument("--size", type=positive_int, default=64, help="--image-size of the model")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per step")
    p.add_argument("--workers", type=nonneg_int, default=os.cpu_count(), help="decoding processes")
    p.add_argument("--dir", type=output_path, default=None,
                   help="write the JPEGs here instead of a temporary folder (kept)")
    p.add_argument("--model", default="small", choices=SIZES, help="UNet size for the training-step rate")
    p.add_argument("--train-steps", type=nonneg_int, default=3, help="training steps to time (0 = skip)")
    p.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train: cpu, cuda or cuda:N")
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.size % size_multiple(args.model):  # the UNet halves the image, then doubles it back
        p.error(f"argument --size: must be a multiple of {size_multiple(args.model)} for --model {args.model} "
                f"(got {args.size})")
    return args


if __name__ == "__main__":
    main(parse_args())
