"""
Randomness a resumed run draws again. Every random number of a training step comes from a generator seeded by
(seed, stage, step), and every epoch's order from (seed, stage, epoch), so a run stopped and resumed, or split
over N processes, draws exactly what one uninterrupted process does. The global generators' states are saved
too, for whatever draws from them (dropout).
"""
import random

import numpy as np
import torch

from model import DiffusionConfig


def seeded_generator(*key, device="cpu"):
    """A torch.Generator seeded by a tuple of ints such as (seed, stage, step); nearby keys give unrelated streams."""
    return torch.Generator(device).manual_seed(int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0]))


def step_randomness(seed, stage, step, B, image_shape, device, share):
    """This process's part of the step's random numbers: mirror flips, t, eps, the dropout draws (2, b), depth.

    Drawn for the whole global batch of B from a generator seeded by (seed, stage, step), of which this
    process keeps its slice `share`: a resumed run, or N processes, draw exactly what one uninterrupted process does.
    """
    gen = seeded_generator(seed, stage, 1, step, device=device)
    flip = (torch.rand(B, generator=gen, device=device) < 0.5)[share]
    t = torch.randint(0, DiffusionConfig.timesteps, (B,), generator=gen, device=device)[share]
    eps = torch.randn((B, *image_shape), generator=gen, device=device)[share]
    draws = torch.rand(2, B, generator=gen, device=device)[:, share]
    depth = torch.rand(B, generator=gen, device=device)[share]  # --schedule random's cut, in [0, 1)
    return flip, t, eps, draws, depth


def stage_batches(n, batch_size, seed, stage, first, last, rank=0, world=1):
    """The indices of this process's part of the global batch of each step from `first` to `last`.

    Epoch e is a permutation of the n images drawn from (seed, stage, e), and each
    step takes the next batch_size of it (the incomplete tail is dropped), so a
    batch depends on its step alone: a resumed run, or one on another number of
    processes, sees the same global batches. Process `rank` of `world` takes the
    rank-th of `world` equal parts (our DistributedSampler).
    """
    part = batch_size // world
    for step in range(first, last + 1):
        epoch, i = divmod(step - 1, n // batch_size)
        if i == 0 or step == first:  # a new epoch, or the first step after a resume
            # key (seed, stage, 0, epoch); the loop's draws use (seed, stage, 1, step): two separate streams
            order = torch.randperm(n, generator=seeded_generator(seed, stage, 0, epoch))
        yield order[i * batch_size:(i + 1) * batch_size][rank * part:(rank + 1) * part].tolist()


def rng_states():
    """The global generators' states as plain data: the loop draws from its own, but dropout and user code may not."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]), "python": random.getstate()}


def set_rng_states(state):
    """Put back what rng_states() recorded (a resumed stage's, in each process)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(state["python"])
