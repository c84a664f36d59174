"""Held-out evaluation: greedy answers to examples, scored by the configured judge.

The trainer calls :func:`evaluate` before the first step, every ``eval_every`` steps and after the last.
Each rank answers its own slice of the examples; the counts are summed over ranks, so every rank
returns the same figures. Accuracy is reported overall and per answer type (yes/no, shape, colour on the
demo): a blind model reaches ~60% overall on easy-VQA from the question text alone, so the overall
figure by itself does not show that the student looks at the image.
"""

from collections.abc import Callable

import torch

from ril_fast.data import Example, to_sample
from ril_fast.distributed import Dist, all_reduce_sum
from ril_fast.judge import Judge, JudgeItem
from ril_fast.rollout import sample_responses

UNTYPED = "untyped"  # the group of examples without an answer type, beside typed ones


def evaluate(model, processor, examples: list[Example], judge: Judge, dist: Dist, *, max_new_tokens: int,
             batch_size: int = 64, records: list | None = None, progress: bool = False,
             journal: Callable[[list[dict]], None] | None = None) -> dict:
    """Greedy answers to ``examples`` (all ranks' list; this rank takes ``examples[rank::world]``).

    Returns ``{"eval_accuracy": float, "eval_accuracy/<type>": float, ..., "eval_examples": int}`` (per type
    when some example has one; those without are ``untyped``).
    ``records``: when a list, one dict per example of this rank is appended to it: ``id``,
    ``answer_type``, ``question``, ``answer``, ``response``, ``truncated``, ``correct``. ``progress``: a
    progress bar of rank 0's examples on stderr. ``journal``: called with each batch's rows as soon as they are
    answered (before they are judged: no ``correct``) and again once judged (``ril_fast.eval`` keeps them so that a
    crash loses no answer: ``ril_fast.eval_journal``).
    """
    from tqdm import tqdm

    mine = examples[dist.rank::dist.world_size]
    types = sorted({e.answer_type or UNTYPED for e in examples})
    correct = torch.zeros(len(types), dtype=torch.float64)
    total = torch.zeros(len(types), dtype=torch.float64)
    was_training = model.training
    model.eval()
    per_rank = -(-len(examples) // dist.world_size)  # the largest slice: every rank runs as many calls
    bar = tqdm(total=len(mine), desc="eval", unit="example", disable=not (progress and dist.is_main))
    for start in range(0, max(per_rank, 1), batch_size):
        chunk = mine[start:start + batch_size]
        # Every rank runs the same number of generate calls (FSDP collectives); an empty slice repeats
        # the first example and does not count it.
        prompts = [to_sample(e) for e in chunk] or [to_sample(examples[0])]
        answers = sample_responses(model, processor, prompts, group_size=1, greedy=True,
                                   max_new_tokens=max_new_tokens)
        rows = [{"id": e.id, "answer_type": e.answer_type, "question": e.question, "answer": e.answer,
                 "response": a[0].text, "truncated": a[0].truncated} for e, a in zip(chunk, answers)]
        if journal is not None and rows:
            journal(rows)
        rows = judged(rows, judge)
        if journal is not None and rows:
            journal(rows)
        if records is not None:
            records.extend(rows)
        for e, r in zip(chunk, rows):
            k = types.index(e.answer_type or UNTYPED)
            correct[k] += float(r["correct"])
            total[k] += 1
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    both = all_reduce_sum(torch.stack([correct, total]).to(dist.device)).cpu()
    correct, total = both[0], both[1]
    out = {"eval_accuracy": (correct.sum() / total.sum().clamp(min=1)).item(), "eval_examples": int(total.sum())}
    if any(e.answer_type for e in examples):
        out.update({f"eval_accuracy/{t}": (correct[k] / total[k].clamp(min=1)).item() for k, t in enumerate(types)})
    return out


def judged(rows: list[dict], judge: Judge) -> list[dict]:
    """``rows`` (answers as :func:`evaluate` records them: ``question``, ``answer``, ``response``, ...) with the
    ``judge``'s verdict on each as ``correct``, in one call of the judge."""
    verdicts = judge([JudgeItem(r["question"], r["answer"], r["response"]) for r in rows])
    return [{**r, "correct": bool(ok)} for r, ok in zip(rows, verdicts)]
