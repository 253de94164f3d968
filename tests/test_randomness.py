"""plumbing/randomness.py: a step's random numbers depend on (seed, stage, step) alone, so a resumed run or one
split over N processes draws what one uninterrupted process draws."""
import random

import numpy as np
import torch

from plumbing.randomness import rng_states, seeded_generator, set_rng_states, stage_batches, step_randomness


def test_seeded_generators_are_reproducible_and_unrelated():
    draw = lambda *key: torch.rand(1000, generator=seeded_generator(*key))  # noqa: E731
    assert torch.equal(draw(0, 2, 1, 5), draw(0, 2, 1, 5))
    near = [draw(0, 2, 1, 5), draw(0, 2, 1, 6), draw(0, 3, 1, 5), draw(1, 2, 1, 5)]  # neighbouring keys
    corr = torch.corrcoef(torch.stack(near))
    assert (corr - torch.eye(4)).abs().max() < 0.15  # unrelated streams (1000 draws: sd of a correlation 0.03)


def test_a_step_draws_the_same_whatever_the_processes():
    whole = step_randomness(0, 2, 7, 8, (3, 4, 4), "cpu", slice(0, 8))
    halves = [step_randomness(0, 2, 7, 8, (3, 4, 4), "cpu", slice(i * 4, (i + 1) * 4)) for i in range(2)]
    for k, (a, b, c) in enumerate(zip(whole, *halves)):
        torch.testing.assert_close(a, torch.cat([b, c], dim=-1 if k == 3 else 0))  # draws are (2, b)
    flip, t, eps, draws, depth = whole
    assert flip.dtype == torch.bool and t.dtype == torch.long and eps.shape == (8, 3, 4, 4) and draws.shape == (2, 8)
    assert not torch.equal(eps, step_randomness(0, 2, 8, 8, (3, 4, 4), "cpu", slice(0, 8))[2])  # fresh each step


def test_batches_resume_and_split_as_one_run():
    straight = list(stage_batches(20, 4, 0, 2, 1, 12))  # 12 steps over 20 images: 5 a epoch, then a new order
    assert all(sorted(sum(straight[e * 5:(e + 1) * 5], [])) == list(range(20)) for e in range(2))  # each epoch all
    assert straight[:5] != straight[5:10]  # a new permutation per epoch
    assert list(stage_batches(20, 4, 0, 2, 8, 12)) == straight[7:]  # resumed at step 8: the same batches
    two = [list(stage_batches(20, 4, 0, 2, 1, 12, rank, 2)) for rank in range(2)]
    assert [a + b for a, b in zip(*two)] == straight  # two processes: each half of every global batch


def test_global_generator_states_round_trip():
    state = rng_states()
    before = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(state)
    after = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
