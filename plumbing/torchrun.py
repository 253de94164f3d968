"""
Several processes (torchrun): joining them, DDP, the one all-reduce per step, the resumable save that gathers
every process's generator states. With one process each is a plain call.
"""
import contextlib
import datetime
import os
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from plumbing.checkpoints import save_checkpoint
from plumbing.randomness import rng_states, set_rng_states


def start_processes(cfg):
    """Under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK) join the other processes: NCCL, one GPU
    each, or gloo on the CPU. Returns (rank, world size, cfg with this process's device)."""
    if "RANK" not in os.environ:
        return 0, 1, cfg
    on_gpu = cfg.device.startswith("cuda")
    # process 0 alone decodes the images, encodes the latents and draws the grids while the others wait at a
    # barrier: on a large dataset that outlasts NCCL's default 10-minute timeout, which would end the run
    dist.init_process_group("nccl" if on_gpu else "gloo", timeout=datetime.timedelta(hours=6))
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        cfg = replace(cfg, device=f"cuda:{os.environ['LOCAL_RANK']}")
    return dist.get_rank(), dist.get_world_size(), cfg


def wrap_model(model, cfg, world):
    """What runs the steps: DDP averages the processes' gradients in backward(), torch.compile fuses; and the
    autocast context. Checkpoints keep `model`, the plain module, so their keys have no "module." or "_orig_mod."."""
    net = DDP(model) if world > 1 else model
    net = torch.compile(net) if cfg.compile else net
    return net, torch.autocast("cuda", torch.bfloat16) if cfg.amp else contextlib.nullcontext()


def mean_over_processes(loss, stop, world, device):
    """One all-reduce gives every process the mean loss and whether any of them was asked to stop."""
    shared = torch.stack([loss.detach().float(), torch.tensor(float(len(stop)), device=device)])
    if world > 1:
        dist.all_reduce(shared)
    total_loss, stopping = shared.tolist()
    return total_loss / world, stopping


def save_resumable(path, rank, world, **state):
    """Write a stage's resumable checkpoint (train.py's out/<level>.last.pt) with every process's generator
    states beside `state` (weights, optimizer, step): all it needs to carry on as if never stopped."""
    rngs = [rng_states()]
    if world > 1:  # every process's own states, in rank order
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_states())
    if rank == 0:
        save_checkpoint(path, **state, rng=rngs)


def barrier(world):
    """Wait for every process (several processes only)."""
    if world > 1:
        dist.barrier()


def load_resumable(ckpt, objects, rank, world):
    """Put back what save_resumable wrote: objects[key].load_state_dict(ckpt[key]) for each, and this process's
    generator states (with another number of processes than wrote it, the seeds stay fresh). Returns the step."""
    for key, obj in objects.items():
        obj.load_state_dict(ckpt[key])
    if len(ckpt["rng"]) == world:
        set_rng_states(ckpt["rng"][rank])
    return ckpt["step"]
