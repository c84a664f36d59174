"""The student's learning-rate schedule: linear warm-up to the peak, then cosine decay towards zero.

    factor(k) = (k + 1) / W                                  for the first W optimiser steps (W = warm-up)
    factor(k) = (1 + cos(π (k − W + 1) / (T − W + 1))) / 2   after them, T = steps × μ optimiser steps

k counts optimiser steps from 0 (the trainer steps the scheduler after each of the μ policy updates of
a step). The decay never reaches zero within the run: the last step still moves the student. Why decay
at all: on the demo a constant peak rate let the held-out accuracy drift down late in the run while the
gradient norm and the discriminator's accuracy climbed (issue 4's note).
"""

import math

import torch


def lr_factor(k: int, warmup: int, total: int) -> float:
    """The multiple of the peak learning rate for optimiser step ``k`` (0-based) of ``total``, with
    ``warmup`` warm-up steps (0 or 1: none)."""
    warmup = max(warmup, 1)
    if k < warmup:
        return (k + 1) / warmup
    progress = min((k - warmup + 1) / max(total - warmup + 1, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """The trainer's scheduler for ``optimizer`` from a :class:`ril_fast.config.Config`: warm-up of
    ``optim.warmup_steps``, cosine decay over the run's ``steps × mu`` optimiser steps."""
    total = cfg.steps * cfg.mu
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, cfg.optim.warmup_steps, total))
