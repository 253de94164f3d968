"""
Latent space (train.py --latent): the autoencoder stage, the latent cache, decoding.

The autoencoder (unet.py) trains first, as a stage of its own, built, resumed and refused as a rank stage
is (train.py's build_stage and train_stage): out/autoencoder.pt, resumable from out/autoencoder.last.pt,
checked by the one check_checkpoint. The images are then encoded once (out/latents-<key>.npy) and the
taxonomic stages learn those latents. Every stage checkpoint records its autoencoder (its file's name, its
config and a hash of its weights), so sample.py and fid.py find it beside the checkpoint, decode with no
extra flag, and refuse another one.
"""
import hashlib
import io
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from plumbing.checkpoints import (CheckpointError, atomic_write, check_checkpoint, load_weights, read_checkpoint,
                                  save_checkpoint, to_device, weights_hash)
from plumbing.images import from_uint8, psnr, save_grid, to_uint8
from plumbing.randomness import seeded_generator, stage_batches
from plumbing.signals import loss_error, stopped
from plumbing.torchrun import barrier, load_resumable, mean_over_processes, save_resumable, wrap_model
from unet import Autoencoder, AutoencoderConfig, autoencoder_loss

AUTOENCODER_KEY = 100  # the autoencoder stage's key in seeded_generator (the rank stages use 0..6)
AUTOENCODER_KEYS = ("autoencoder", "autoencoder_config", "train_config")
# What the autoencoder stage computes from: its own flags and the images. A different value refuses out/autoencoder.pt.
AUTOENCODER_FLAGS = ("latent_f", "latent_channels", "ae_steps", "ae_batch_size", "ae_crop", "ae_lr", "ae_edge_loss",
                     "grad_clip", "data", "image_size", "per_species", "format", "top_rank", "columns", "image_root",
                     "boxes", "seed")


def autoencoder_config(cfg):
    """The autoencoder of a --latent run (unet.Autoencoder); its file stores it as a dict."""
    return AutoencoderConfig(in_channels=3, image_size=cfg.image_size, f=cfg.latent_f,
                             latent_channels=cfg.latent_channels, edge_loss=cfg.ae_edge_loss)


def read_autoencoder(path, device="cpu"):
    """An autoencoder file, refused in one line if it is not one."""
    return read_checkpoint(path, device, AUTOENCODER_KEYS, "an autoencoder of train.py --latent")


def load_autoencoder(path, device="cpu"):
    """Open an autoencoder file (torch.load(weights_only=True)) and rebuild it: (Autoencoder in eval mode, ckpt)."""
    ckpt = read_autoencoder(path, device)
    ae = load_weights(Autoencoder(AutoencoderConfig(**ckpt["autoencoder_config"])), ckpt["autoencoder"], path)
    return to_device(ae, device).eval(), ckpt


def autoencoder_of(ckpt, path, device="cpu"):
    """The autoencoder whose latents the stage checkpoint at `path` generates, from the file beside it; None for a
    pixel checkpoint. Refused in one line when that file is missing or holds another autoencoder."""
    record = ckpt["autoencoder"]
    if record is None:
        return None
    ae_path = os.path.join(os.path.dirname(path), record["file"])
    if not os.path.exists(ae_path):
        raise CheckpointError(f"{path} generates latents of the autoencoder {ae_path}, which is missing: put the "
                              f"{record['file']} it was trained with beside it")
    ae, _ = load_autoencoder(ae_path, device)
    if (found := weights_hash(ae.state_dict())) != record["sha256"]:
        raise CheckpointError(f"{ae_path} is another autoencoder than the one {path} was trained with (weights "
                              f"sha256 {found[:12]}, not {record['sha256'][:12]}): put the right one beside it, "
                              "or train the stages again")
    return ae


@torch.no_grad()
def reconstruct(ae, images, device, batch_size=64):
    """uint8 images (N, 3, H, W) -> encoded (the posterior mean) and decoded, uint8: the best a latent model draws."""
    return torch.cat([to_uint8(ae.decode(ae.encode(from_uint8(x.to(device)))[0])).cpu()
                      for x in torch.as_tensor(images).split(batch_size)])


def encode_dataset(ae, images, cache_dir, device="cpu", batch_size=64, rank=0, world=1):
    """The latents of every image, (N, C_z, h, w) float32, encoded once into cache_dir/latents-<key>.npy
    (by process 0; the others wait, then read it).

    The key hashes the autoencoder's weights and the images' bytes, so a new autoencoder (or other images)
    encodes again; the outdated cache is then removed. images: uint8 (N, 3, H, W), a tensor or an array.
    """
    key = hashlib.sha256(weights_hash(ae.state_dict()).encode())
    for i in range(0, len(images), 4096):
        key.update(np.ascontiguousarray(images[i:i + 4096]).tobytes())
    path = os.path.join(cache_dir, f"latents-{key.hexdigest()[:16]}.npy")
    if rank == 0 and not os.path.exists(path):
        with torch.no_grad():
            z = torch.cat([ae.to_latent(from_uint8(torch.as_tensor(images[i:i + batch_size]).to(device))).cpu()
                           for i in range(0, len(images), batch_size)])  # (N, C_z, h, w)
        data = io.BytesIO()
        np.save(data, z.numpy())
        atomic_write(path, data.getbuffer())
        for old in Path(path).parent.glob("latents-*.npy"):  # an older cache: another autoencoder's, or other images'
            if old.name != os.path.basename(path):
                old.unlink()
        print(f"latents: {path} ({tuple(z.shape)}, encoded once; later runs and stages read it)")
    elif rank == 0:
        print(f"latents: {path} (cached; encoded again when the autoencoder or the images change)")
    barrier(world)
    return torch.from_numpy(np.load(path))


def held_out_split(n, seed, share=0.05, most=256):
    """(held-out, training) image indices of the autoencoder: 5 % of the images (at most 256, at least 1) that
    it never trains on, for an honest PSNR. The diffusion stages train on every image."""
    order = torch.randperm(n, generator=seeded_generator(seed, AUTOENCODER_KEY, 2))
    k = max(1, min(most, round(share * n)))
    return order[:k], order[k:]


def autoencoder_stage(cfg, dataset, log, rank=0, world=1, stop=()):
    """train.py --latent's first stage: out/autoencoder.pt, reused if it is there and fits this run, else trained
    (resumed from out/autoencoder.last.pt, like any stage). Returns (the autoencoder in eval mode, None), or
    (None, the signal that stopped it)."""
    path, last_path = (os.path.join(cfg.out, f"autoencoder{end}.pt") for end in ("", ".last"))
    ae_config = autoencoder_config(cfg)
    header = dict(autoencoder_config=asdict(ae_config), train_config=asdict(cfg))
    if os.path.exists(path):
        check_checkpoint(read_autoencoder(path), path, header, AUTOENCODER_FLAGS)
        if rank == 0:
            print(f"autoencoder: using {path} (delete it to train it again)")
        return load_autoencoder(path, cfg.device)[0], None
    torch.manual_seed(cfg.seed + AUTOENCODER_KEY)  # the same initial weights in every process
    ae = to_device(Autoencoder(ae_config), cfg.device)
    opt = torch.optim.AdamW(ae.parameters(), lr=cfg.ae_lr, weight_decay=0.0)
    cool = max(1, round(0.3 * cfg.ae_steps))  # warm up for 50 steps, decay to 0 over the last 30 %, as a stage
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50, (cfg.ae_steps - s) / cool))
    start = 0
    if os.path.exists(last_path):  # an interrupted autoencoder stage: carry on exactly where it stopped
        resumed = read_autoencoder(last_path)
        check_checkpoint(resumed, last_path, header, AUTOENCODER_FLAGS)
        start = load_resumable(resumed, {"autoencoder": ae, "optimizer": opt, "scheduler": sched}, rank, world)
    if rank == 0:
        print(f"autoencoder: f = {ae_config.f}, {ae_config.latent_channels} x {ae_config.image_size // ae_config.f}"
              f"^2 latents, {sum(p.numel() for p in ae.parameters()) / 1e6:.2f} M params, {cfg.ae_steps} steps of "
              f"{cfg.ae_batch_size}, {ae_config.edge_loss} edge loss, from "
              f"{f'{last_path} at step {start}' if start else 'scratch'}")
    held, train = held_out_split(len(dataset), cfg.seed)
    signum = train_autoencoder(cfg, ae, opt, sched, start, dataset, train, last_path, header, log, rank, world, stop)
    if signum:
        return None, signum
    if rank == 0:
        finish_autoencoder(cfg, ae, dataset, held, train, last_path, path, log)
    barrier(world)  # every process reads the one autoencoder.pt
    return load_autoencoder(path, cfg.device)[0], None


def train_autoencoder(cfg, ae, opt, sched, start, dataset, train, last_path, header, log, rank, world, stop):
    """The autoencoder's loop, as train.py's train_stage: seeded batches and draws (so it resumes exactly), DDP,
    Ctrl-C. Returns the signal that stopped it, or None when its last step is done."""
    B, device, steps = cfg.ae_batch_size, cfg.device, cfg.ae_steps
    net, _ = wrap_model(ae, replace(cfg, compile=False), world)
    share = slice(rank * B // world, (rank + 1) * B // world)
    batches = stage_batches(len(train), B, cfg.seed, AUTOENCODER_KEY, start + 1, steps, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=(train[b].tolist() for b in batches))
    size, f = ae.cfg.image_size, ae.cfg.f
    crop = cfg.ae_crop if 0 < cfg.ae_crop < size else size  # the side of what each step trains on
    z_shape = (ae.cfg.latent_channels, crop // f, crop // f)
    ae.train()
    t0, saved = time.time(), start
    pbar = tqdm(loader, desc="autoencoder", initial=start, total=steps, dynamic_ncols=True, disable=rank > 0)
    for step, (x, _) in enumerate(pbar, start=start + 1):
        gen = seeded_generator(cfg.seed, AUTOENCODER_KEY, 1, step, device=device)
        flip = (torch.rand(B, generator=gen, device=device) < 0.5)[share]
        noise = torch.randn((B, *z_shape), generator=gen, device=device)[share]  # for z = mean + std * noise
        corner = (torch.randint(0, (size - crop) // f + 1, (B, 2), generator=gen, device=device) * f)[share].tolist()
        x = torch.where(flip.view(-1, 1, 1, 1), x.to(device).flip(-1), x.to(device))  # a random mirror image
        # a random crop of each (on the latent grid): the network is convolutional, so it learns from crops at
        # a fraction of the cost (a quarter at 32 of 64) what it then does on whole images
        x = torch.stack([im[:, i:i + crop, j:j + crop] for im, (i, j) in zip(x, corner)])  # (b, 3, crop, crop)
        loss, parts = autoencoder_loss(net, x, noise, ae.cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()

        mean_loss, stopping = mean_over_processes(loss, stop, world, device)
        if not math.isfinite(mean_loss):
            raise SystemExit(loss_error(mean_loss, step, "the autoencoder", last_path, saved, "--ae-lr", rank))
        pbar.set_postfix(loss=f"{mean_loss:.4f}", l1=f"{parts['l1']:.4f}")
        if step % 50 == 0 or step == steps:
            log.write(f"autoencoder step {step}/{steps} loss {mean_loss:.4f} l1 {parts['l1']:.4f} "
                      f"edge {parts['edge']:.4f} kl {parts['kl']:.4f} img/s {(step - start) * B / (time.time() - t0):.1f}\n")
            log.flush()
        if stopping or (cfg.save_every and step % cfg.save_every == 0) or step == steps:
            save_resumable(last_path, rank, world, **header, autoencoder=ae.state_dict(), optimizer=opt.state_dict(),
                           scheduler=sched.state_dict(), step=step)
            saved = step
        if stopping:
            return stopped(step, steps, "the autoencoder", last_path, stop, rank)
    if rank == 0:
        log.write(f"autoencoder: {time.time() - t0:.0f} s training ({(steps - start) * B / max(time.time() - t0, 1e-6):.1f} img/s)\n")
    return None


@torch.no_grad()
def finish_autoencoder(cfg, ae, dataset, held, train, last_path, path, log):
    """Set the latents' scale (LDM's scale_by_std), measure PSNR on the held-out images, draw originals over
    reconstructions (out/autoencoder.png), then make out/autoencoder.pt the stage's result."""
    ae.eval()
    means, stds = [], []
    for i in train[:4096].split(64):  # the std of the training latents, over at most 4096 images
        mean, logvar = ae.encode(torch.stack([dataset[j][0] for j in i.tolist()]).to(cfg.device))
        means.append(mean.cpu())
        stds.append((0.5 * logvar).exp().mean().cpu())
    ae.scale.fill_(1 / torch.cat(means).std().item())
    x = torch.stack([dataset[j][0] for j in held.tolist()]).to(cfg.device)  # (n_held, 3, H, W)
    x_rec = torch.cat([ae.decode(ae.encode(b)[0]) for b in x.split(64)])
    db = psnr(to_uint8(x_rec), to_uint8(x))  # as the PNGs would be
    cols = min(8, len(held))
    save_grid(torch.cat([x[:cols], x_rec[:cols]]), os.path.join(cfg.out, "autoencoder.png"), cols,
              labels=["original", "decoded"])
    posterior_std = torch.stack(stds).mean().item()
    save_checkpoint(last_path, **{**read_autoencoder(last_path), "autoencoder": ae.state_dict(), "psnr": db,
                                  "held_out": len(held), "scale": ae.scale.item(), "posterior_std": posterior_std})
    os.replace(last_path, path)
    msg = (f"autoencoder done: held-out PSNR {db:.2f} dB ({len(held)} images), latent scale {ae.scale.item():.3f} "
           f"(posterior std {posterior_std:.4f} of a latent std {1 / ae.scale.item():.3f}) -> {path}, "
           f"{os.path.join(cfg.out, 'autoencoder.png')}")
    print(msg)
    print(msg, file=log, flush=True)  # flushed: a run killed later still logs this stage
