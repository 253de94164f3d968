"""
Images in and out: the one sampling loop (lineages and their starting noise in, images out, a batch at a time,
latents decoded), uint8 as a PNG holds it, picture grids and the tree figure, PSNR, and reading a folder of
images.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from model import guided_eps_fn
from plumbing.readers import IMAGE_EXTS, load_image


def to_uint8(x):
    """Images in [-1, 1] -> uint8, exactly as saving them as PNG would."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def from_uint8(x):
    """uint8 images -> float in [-1, 1], the range the networks see."""
    return x.float() / 127.5 - 1


def psnr(a, b):
    """Mean over images of 10 log10(255^2 / MSE), for uint8 images (N, 3, H, W)."""
    mse = (a.float() - b.float()).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return (10 * torch.log10(255 ** 2 / mse)).mean().item()


@torch.inference_mode()
def draw(diffusion, model, ids, x_T, guidance=1.0, guide_from="null", root_rank=2, steps=15, sampler="dpm++",
         batch_size=64, seed=0, autoencoder=None, desc=None, interval=None):
    """Lineage ids (N, R), each with its starting noise x_T (N, C, h, w) -> images in [-1, 1] (N, 3, H, W).

    batch_size images at a time; guidance (and its noise interval) as model.guided_eps_fn; seed: the DDPM sampler's fresh noise, the
    same in every batch. With an autoencoder the model draws latents, which are left unclamped (their range is
    not the pixels') and decoded.
    """
    out = []
    for i in tqdm(range(0, len(ids), batch_size), desc=desc, unit="batch", leave=False, disable=desc is None):
        b, noise = ids[i:i + batch_size], x_T[i:i + batch_size]  # (b, R), (b, C, h, w)
        eps_fn = guided_eps_fn(diffusion, model, b, guidance, guide_from, root_rank, interval)
        gen = torch.Generator(x_T.device).manual_seed(seed)
        x = diffusion.sample(eps_fn, noise.shape, steps=steps, sampler=sampler, generator=gen, device=x_T.device,
                             x_T=noise, clip=None if autoencoder else 1.0)
        out.append(x if autoencoder is None else torch.cat([autoencoder.to_pixels(z) for z in x.split(64)]))
    return torch.cat(out)


def save_grid(x, path, ncols, labels=None):
    """Save images x in [-1, 1], (N, C, H, W), as a PNG grid of N / ncols rows, each row's label on its left."""
    N, C, H, W = x.shape
    rows = N // ncols
    grid = to_uint8(x).cpu().view(rows, ncols, 3, H, W).permute(0, 3, 1, 4, 2).reshape(rows * H, ncols * W, 3)
    img = Image.fromarray(grid.numpy())  # (rows * H, ncols * W, 3)
    if labels:
        margin = 7 * max(len(s) for s in labels) + 6  # the default bitmap font is ~6 px wide
        canvas = Image.new("RGB", (margin + img.width, img.height), "white")
        canvas.paste(img, (margin, 0))
        draw_, font = ImageDraw.Draw(canvas), ImageFont.load_default_imagefont()  # the bitmap font: its spaces show
        for r, label in enumerate(labels):
            draw_.text((3, r * H + H // 2 - 5), label, fill="black", font=font)
        img = canvas
    img.save(path)


def load_folder(folder, size=None):
    """Every image under a folder as uint8 (N, 3, H, W). As they are (all must have one size: FID compares like
    with like), or with `size` squared and resized as train.py reads images (centre crop): the real images a
    checkpoint's samples are compared with, at the resolution the model draws."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_EXTS)}) found")
    images = []
    for p in tqdm(files, desc=f"reading {folder}", leave=False):
        try:
            if size:
                images.append(load_image(p, size))  # (3, size, size)
                continue
            with Image.open(p) as im:
                images.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))  # (3, H, W)
        except OSError as e:  # not an image, or a truncated one: FID of a set with a hole would mislead
            raise ValueError(f"{p}: cannot read it as an image ({e}); remove it or replace it") from None
    sizes = {tuple(x.shape) for x in images}
    if len(sizes) > 1:
        raise ValueError(f"{folder}: images of several sizes {sorted(sizes)[:3]}; resize them to one size first")
    return torch.stack(images)


def save_tree(images, parents, columns, labels, headers, path, gap=24):
    """Save a tree of images in [-1, 1] (N, C, H, W) as a PNG, one column per rank, root on the left.

    Node i sits in column columns[i] with parent parents[i] (-1 for the root); a leaf sits on a row of its
    own, a parent halfway between its children's rows, and labels[i] (or '') is written right of node i.
    """
    N, C, H, W = images.shape
    children = [[j for j in range(N) if parents[j] == i] for i in range(N)]
    y, rows = [0.0] * N, 0

    def place(i):  # depth first: a leaf takes the next row, a parent the middle of its children
        nonlocal rows
        for j in children[i]:
            place(j)
        y[i] = sum(y[j] for j in children[i]) / len(children[i]) if children[i] else rows
        rows += not children[i]
    place(parents.index(-1))
    font = ImageFont.load_default_imagefont()
    step_x, step_y, top = W + gap, H + 4, 14  # a column's width, a row's height, the headers' band
    width = max(columns) * step_x + W + 7 * max(len(s) for s in labels) + 8
    canvas = Image.new("RGB", (width, top + rows * step_y), "white")
    pen = ImageDraw.Draw(canvas)
    xy = [(columns[i] * step_x, top + round(y[i] * step_y)) for i in range(N)]  # each node's top-left corner
    for c, header in enumerate(headers):
        pen.text((c * step_x, 1), header, fill="black", font=font)
    for i, j in enumerate(parents):  # an elbow from the parent's right edge to the child's left edge
        if j >= 0:
            (x0, y0), (x1, y1) = (xy[j][0] + W, xy[j][1] + H // 2), (xy[i][0], xy[i][1] + H // 2)
            pen.line([(x0, y0), (x0 + gap // 2, y0), (x0 + gap // 2, y1), (x1, y1)], fill="gray")
    pixels = to_uint8(images).cpu().permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    for i in range(N):
        canvas.paste(Image.fromarray(pixels[i]), xy[i])
        pen.text((xy[i][0] + W + 3, xy[i][1] + H // 2 - 5), labels[i], fill="black", font=font)
    canvas.save(path)
