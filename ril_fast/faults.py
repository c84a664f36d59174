"""Faults met during training, turned into what to do about them: non-finite updates (:func:`count_skipped`) and
out-of-memory errors (:func:`explain_oom`). ``ril_fast.train`` calls these; tests/test_faults.py runs them through
the trainer.

``run``: the trainer's ``ril_fast.train.Run``.
"""

import contextlib

import torch

from ril_fast import checkpoint, distributed
from ril_fast.config import Config


def count_skipped(run, skipped: bool, step: int) -> None:
    """Count an optimizer step skipped for a non-finite loss or gradient norm; ``max_bad_steps`` in a row
    stop the run (the skipped steps left the model as it was)."""
    run.counters["skipped_steps"] += int(skipped)
    run.counters["bad_in_a_row"] = run.counters["bad_in_a_row"] + 1 if skipped else 0
    if run.counters["bad_in_a_row"] >= run.cfg.max_bad_steps:
        message = (f"stopping at step {step}: {run.cfg.max_bad_steps} optimizer steps in a row had a non-finite "
                   f"loss or gradient norm; each was skipped, so the model is as it was before them. Lower "
                   f"optim.lr or check the data; the newest checkpoint is {checkpoint.latest(run.cfg.output_dir)}")
        raise SystemExit(message if run.dist.is_main else 1)


@contextlib.contextmanager
def explain_oom(cfg: Config, phase: str, micro=None):
    """Turn an out-of-memory error inside ``phase`` into one that names the setting to lower and, for a
    phase over packed micro-batches, the size of the step's largest one (for an update, where preflight's estimate
    of its activations is)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        if micro is None:
            hint = f"lower rollout.batch_size (now {cfg.rollout.batch_size} sequences per generate call)"
        else:
            biggest = max(micro, key=lambda mb: sum(mb.batch.lengths))
            hint = (f"its largest micro-batch holds {sum(biggest.batch.lengths)} tokens in "
                    f"{len(biggest.batch.lengths)} sequences: lower batch.max_tokens (now {cfg.batch.max_tokens})")
            if phase.endswith("_update") and not cfg.batch.activation_checkpointing:
                hint += ", or set batch.activation_checkpointing=true"
            if phase.endswith("_update") and cfg.batch.keep_gathered and \
                    distributed.shard_size(cfg.batch.shard_ranks) == 1:
                hint += ", or batch.keep_gathered=false"
            if phase.endswith("_update"):
                hint += " (python -m ril_fast.preflight estimates what an update micro-batch keeps for its backward)"
        raise RuntimeError(f"out of memory in the {phase} phase; {hint}") from e
