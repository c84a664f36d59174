"""The trainer with an LLM judge, reporting each rank's teacher judge cache (the trainer's metrics give only the
hit rate over all ranks, ``teacher_judge_cache_hit_rate``) and the judge phase's seconds per step.

    .venv/bin/torchrun --nproc_per_node=1 bench/train_judge.py steps=3 judge=http \\
        judge_url=http://127.0.0.1:8000/v1 judge_model=smollm2 judge_cache=/tmp/judge.sqlite eval_every=0 \\
        eval_max_examples=20 output_dir=/tmp/ril-http
    .venv/bin/torchrun --nproc_per_node=1 bench/train_judge.py steps=3 judge=hf judge_model=DIR ...

Any ``ril_fast.train`` arguments. It runs ``ril_fast.train.main`` unchanged, with ``CachedJudge``
replaced by a subclass that remembers its instances, and prints, per rank, the teacher judge cache's
hits, misses and hit rate, and the judge phase's seconds per step (``time/judge``) from the run's metrics.
"""

import sys
from pathlib import Path

from ril_fast import train
from ril_fast.judge import CachedJudge
from ril_fast.metrics import read_metrics

MADE: list[CachedJudge] = []


class RememberedCachedJudge(CachedJudge):
    """A CachedJudge that adds itself to ``MADE``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        MADE.append(self)


def main(argv: list[str]) -> None:
    """Train with ``argv`` and print the cache figures."""
    train.CachedJudge = RememberedCachedJudge
    out = train.main(argv)
    for judge in MADE:
        print(f"teacher judge cache ({judge.name}, store {judge.store.__class__.__name__}): hits {judge.hits}, "
              f"misses {judge.misses}, hit rate {judge.hit_rate:.3f}", flush=True)
    steps = read_metrics(Path(out) / "metrics.jsonl")
    judge_s = [round(r["time/judge"], 2) for r in steps if "time/judge" in r]
    print(f"judge-phase seconds per step: {judge_s}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
