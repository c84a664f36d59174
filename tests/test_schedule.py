"""The student's learning-rate schedule: warm-up, then cosine decay over steps × μ optimiser steps."""

import math
import random

import pytest
import torch

from ril_fast.config import load_config
from ril_fast.schedule import lr_factor, make_scheduler


def test_factor_by_hand():
    # warm-up 4 of 10: 1/4, 2/4, 3/4, 1, then (1 + cos(π j / 7)) / 2 for j = 1..6
    expected = [0.25, 0.5, 0.75, 1.0] + [(1 + math.cos(math.pi * j / 7)) / 2 for j in range(1, 7)]
    assert [lr_factor(k, 4, 10) for k in range(10)] == pytest.approx(expected, abs=1e-12)
    # no warm-up (0 or 1): the first step at the peak, then the decay
    assert lr_factor(0, 0, 5) == lr_factor(0, 1, 5) == 1.0
    assert lr_factor(1, 0, 5) == pytest.approx((1 + math.cos(math.pi / 5)) / 2)


def test_shape_on_random_lengths(_fresh_seed):
    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    total, warmup = rng.randint(20, 500), rng.randint(0, 9)
    f = [lr_factor(k, warmup, total) for k in range(total)]
    peak = max(warmup, 1) - 1
    assert f[peak] == 1.0 and all(a < b for a, b in zip(f[:peak], f[1:peak + 1]))  # rising warm-up
    assert all(a > b for a, b in zip(f[peak + 1:], f[peak + 2:]))  # then strictly falling
    assert 0 < f[-1] < 0.5 / (total - max(warmup, 1))  # the last step still moves, barely


@pytest.mark.parametrize("mus", [(1, 1), (2, 3)], ids=["mu1", "mu>1"])  # mu > 1 every run: steps x mu != steps
def test_scheduler_follows_the_config_over_steps_times_mu(_fresh_seed, mus):
    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    steps, mu, warmup, lr = rng.randint(3, 30), rng.randint(*mus), rng.randint(0, 3), rng.uniform(1e-4, 1e-2)
    cfg = load_config([f"steps={steps}", f"mu={mu}", f"optim.warmup_steps={warmup}", f"optim.lr={lr}"])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    scheduler = make_scheduler(optimizer, cfg)
    seen = []
    for _ in range(steps * mu):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr * lr_factor(k, warmup, steps * mu) for k in range(steps * mu)], rel=1e-12)
    restored = make_scheduler(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr), cfg)
    restored.load_state_dict(scheduler.state_dict())  # what a checkpoint saves and a resume loads
    assert restored.get_last_lr() == scheduler.get_last_lr()
