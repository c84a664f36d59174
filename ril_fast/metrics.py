"""The run's record: ``metrics.jsonl`` (one JSON object per logged step), a progress bar, phase timers,
TensorBoard events (when tensorboard is installed) and, at the end, ``curves.png`` (``ril_fast.curves``).

A training step's record is :func:`step_metrics`'s: its rewards, updates, throughput, MFU (FLOPs from
:func:`model_flops`) and peak memory, over all ranks.

Only the main rank writes. Every value logged is a plain float or int, and each line is strict JSON
(``record_line``): a non-finite float (a skipped step's loss or gradient norm) is written as the string "nan",
"inf" or "-inf", since JSON has no such numbers (the bare NaN / Infinity of Python's json are refused by Node's
JSON.parse, and jq reads them as null and 1.8e308). ``read_metrics`` reads the file back, those strings as the
floats again (and a file of older code, with bare NaN, as well), for tests, plots and comparisons between runs.
"""

import json
import math
import resource
import sys
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import torch

from ril_fast import curves, distributed
from ril_fast.files import write_text_atomic
from ril_fast.flops import Sample, phase_flops
from ril_fast.rewards import STUDENT, reward_stats

# The numbers shown on the progress bar (or the step's printed line), in order, when present. An evaluation's
# accuracies get a line of their own (``evaluation_line``): the bar's postfix is cut at the terminal's width.
_BAR_KEYS = ("student_answer_reward", "student_similarity_reward", "disc_accuracy", "loss", "kl", "clip_frac",
             "grad_norm", "tokens_per_s", "mfu", "peak_memory_gib")
# Their short names on the bar; a key not listed shows as itself. No label may be another listed key.
_BAR_LABELS = {"loss": "loss", "disc_loss": "disc_loss", "disc_accuracy": "disc_acc",
               "student_answer_reward": "ans_reward", "student_similarity_reward": "sim_reward",
               "clip_frac": "clip", "grad_norm": "gnorm", "tokens_per_s": "tok/s", "peak_memory_gib": "mem_gib",
               "eval_accuracy": "eval_acc"}


class PhaseTimer:
    """Wall-clock seconds per phase of a step: ``with timer("rollout"): ...`` adds to ``seconds["rollout"]``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def as_metrics(self) -> dict[str, float]:
        """``{"time/<phase>": seconds}`` for the step log."""
        return {f"time/{k}": round(v, 4) for k, v in self.seconds.items()}


class RunLog:
    """Appends step metrics to ``out_dir/metrics.jsonl`` and ``out_dir/tensorboard/`` and shows progress;
    :meth:`close` draws ``out_dir/curves.png`` (main rank only)."""

    def __init__(self, out_dir: Path, *, enabled: bool, total_steps: int, progress: bool = True,
                 resume_step: int | None = None, keep_evaluation: bool = False):
        """``resume_step``: the run resumes after that step, so the file keeps exactly the records an
        uninterrupted run had written by then (see :func:`records_until`); else the file starts empty.
        ``keep_evaluation``: the final evaluation logged after ``resume_step`` is kept too (a finished run
        going on to more steps, which will not evaluate that step again).
        TensorBoard shows the same: it hides every event an earlier run in the folder logged from
        ``resume_step`` on (from step 0 on a fresh start), and the kept records of that step are logged
        again (a step's training record and an evaluation logged after it share a step number, and only
        the first is kept)."""
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.bar = None
        self.tensorboard = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = records_until(self.path, resume_step, keep_evaluation=keep_evaluation) \
            if resume_step is not None and self.path.exists() else []
        write_text_atomic(self.path, "".join(record_line(r) for r in kept))  # a crash keeps the old file
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=resume_step or 0, desc="RIL", unit="step",
                            dynamic_ncols=True)
        purge = resume_step or 0
        self.tensorboard = curves.tensorboard_writer(self.path.parent / "tensorboard", purge_step=purge)
        for r in kept if self.tensorboard is not None else []:
            if r["step"] >= purge:
                curves.add_scalars(self.tensorboard, r)

    def log(self, metrics: dict) -> None:
        """Write one line; advance the bar (or print a short line when there is no terminal); an evaluation's
        accuracies are printed on a line of their own (:func:`evaluation_line`), above the bar."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(record_line(metrics))
        if self.tensorboard is not None:
            curves.add_scalars(self.tensorboard, metrics)
        shown = {k: metrics[k] for k in _BAR_KEYS if k in metrics}
        if self.bar is not None:
            if metrics.get("step", 0) > self.bar.n:
                self.bar.update(metrics["step"] - self.bar.n)
            if shown:
                labels = bar_labels(shown)
                self.bar.set_postfix({labels[k]: _number(k, v) for k, v in shown.items()})
        elif shown:
            print(f"step {metrics.get('step')}: " + ", ".join(f"{k} {_number(k, v)}" for k, v in shown.items()),
                  flush=True)
        if "eval_accuracy" in metrics:
            if self.bar is not None:
                self.bar.write(evaluation_line(metrics))
            else:
                print(evaluation_line(metrics), flush=True)  # a log file sees it now, not after the next step

    def close(self) -> None:
        """Close the progress bar and the TensorBoard writer; draw ``curves.png`` from the whole
        ``metrics.jsonl`` (a resumed run's earlier records included) and print where it is."""
        if self.bar is not None:
            self.bar.close()
        if not self.enabled:
            return
        if self.tensorboard is not None:
            self.tensorboard.close()
            print(f"tensorboard: tensorboard --logdir {self.path.parent / 'tensorboard'}", flush=True)
        png = curves.plot_curves(read_metrics(self.path), self.path.parent / "curves.png",
                                 title=str(self.path.parent))
        if png is not None:
            print(f"curves: {png}", flush=True)


def evaluation_line(metrics: dict) -> str:
    """An evaluation's record in words: ``step 50: held-out accuracy 0.44 on 300 examples (color 0.99, shape
    0.41)``, the per-type accuracies (``eval_accuracy/<type>``) in the record's order."""
    types = [f"{k.removeprefix('eval_accuracy/')} {v:.3g}" for k, v in metrics.items()
             if k.startswith("eval_accuracy/")]
    examples = f" on {metrics['eval_examples']} examples" if "eval_examples" in metrics else ""
    return (f"step {metrics.get('step')}: held-out accuracy {metrics['eval_accuracy']:.3g}{examples}"
            + (f" ({', '.join(types)})" if types else ""))


def _number(key: str, v: float) -> str:
    """Three significant digits; whole numbers from 1,000 up (tokens/s) without an exponent; MFU in percent."""
    if key == "mfu":
        return f"{100 * v:.3g}%"
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def peak_memory_gib(device: torch.device) -> float:
    """The memory high-water mark in GiB: on CUDA the most the caching allocator held in tensors since
    :func:`reset_peak_memory`; on a CPU the process's peak resident set since it started (it cannot be reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark for :func:`peak_memory_gib` (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def step_metrics(run, step: int, timer: PhaseTimer, *, seconds: float, questions: list, groups: list, updates: dict,
                 micro: list, encoded: list, sources: list[str]) -> dict:
    """The record of training step ``step`` of ``run`` (the trainer's ``ril_fast.train.Run``), over all ranks (every
    rank calls this: one gather of each rank's figures): ``reward_stats`` of every rank's ``groups`` (with the
    ``questions``' answer types), then ``updates`` (the discriminator's and policy's statistics and ``lr``),
    ``skipped_steps``, the teacher-verdict cache's hit rate (RIL only), tokens/s (:func:`real_tokens` of every rank's
    ``micro``), ``step_time_s`` (``seconds``), MFU (every rank's :func:`model_flops` of ``encoded`` and ``sources``
    over ``seconds`` times their matmul peaks), the largest rank's peak memory and ``timer``'s phase times."""
    tokens = real_tokens(micro)
    cache = (run.teacher_judge.hits, run.teacher_judge.misses)
    memory = peak_memory_gib(run.dist.device)
    cost = (model_flops(run, encoded, sources), run.peak_tflops)
    per_rank = distributed.all_gather_objects((groups, [q.answer_type for q in questions], tokens, cache, memory, cost))
    all_groups, all_types, all_tokens, all_cache, all_memory, all_cost = zip(*per_rank)
    rewards = reward_stats([g for gs in all_groups for g in gs], [t for ts in all_types for t in ts])
    flops, peaks = map(sum, zip(*all_cost))
    return {"step": step, **rewards, **updates, "skipped_steps": run.counters["skipped_steps"],
            **_judge_cache_stats(run, all_cache), "tokens_per_s": sum(all_tokens) / seconds, "step_time_s": seconds,
            "mfu": flops / (seconds * peaks * 1e12), "peak_memory_gib": round(max(all_memory), 3),
            **timer.as_metrics()}


def real_tokens(micro: list) -> int:
    """The tokens of the packed micro-batches' real samples (``MicroBatch.real``; the zero-weight fillers a rank
    with fewer outputs gets are no work of the step): a step's tokens, for tokens/s."""
    return sum(mb.batch.lengths[k] for mb in micro for k in mb.real)


def model_flops(run, encoded: list, sources: list[str]) -> float:
    """This rank's model FLOPs in the step (``ril_fast.flops``: the matmuls of the rollout, the
    discriminator's updates and scores, the frozen log-probs and the policy updates; nothing recomputed).
    ``encoded``: the step's outputs in group order, a question's G student outputs first."""
    cfg = run.cfg
    samples = [Sample.of(e) for e in encoded]
    students = [x for x, source in zip(samples, sources) if source == STUDENT]
    prompts = [x.prompt_only() for x in students[::cfg.group_size]]  # each question's rendered prompt
    frozen = int(cfg.mu > 1) + int(run.reference is not None)
    return sum(phase_flops(run.shapes, prompts, students, samples, group_size=cfg.group_size, mu=cfg.mu,
                           frozen_models=frozen, disc=run.disc is not None).values())


def _judge_cache_stats(run, hits_misses: list[tuple[int, int]]) -> dict:
    """The teacher-verdict cache's hit rate over all ranks since these processes started (RIL only): a
    cost figure, like the timings; a resumed run starts with the in-memory cache empty unless
    ``judge_cache`` keeps it. ``hits_misses``: each rank's counts."""
    if run.bank is None:
        return {}
    hits, misses = sum(h for h, _ in hits_misses), sum(m for _, m in hits_misses)
    return {"teacher_judge_cache_hit_rate": hits / max(hits + misses, 1)}


def bar_labels(keys) -> dict[str, str]:
    """``{key: label}`` for the progress bar, distinct for distinct keys: the short name of
    ``_BAR_LABELS`` where there is one, else the key; keys whose labels would clash show in full."""
    labels = {k: _BAR_LABELS.get(k, k) for k in keys}
    clashes = Counter(labels.values())
    return {k: k if clashes[label] > 1 else label for k, label in labels.items()}


def records_until(path: str | Path, step: int, *, keep_evaluation: bool = False) -> list[dict]:
    """The records of ``path`` (:func:`read_metrics`) logged up to the end of training step ``step``: those of
    earlier steps and the step's own training record, not the final evaluation after it (unless
    ``keep_evaluation``) nor anything later."""
    return [r for r in read_metrics(path)
            if r["step"] < step or (r["step"] == step and ("loss" in r or keep_evaluation))]


# A non-finite float's string in metrics.jsonl (str() of the float) and the float it stands for.
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def record_line(record: dict) -> str:
    """``record`` as one line of ``metrics.jsonl``, newline included: strict JSON, a non-finite float written as
    the string "nan", "inf" or "-inf" (:func:`read_metrics` reads it back as the float)."""
    finite = {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
    return json.dumps(finite, allow_nan=False) + "\n"


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl``, in order, the strings "nan", "inf" and "-inf" read as those floats (as
    are the bare NaN and Infinity that older code wrote). A last line cut short by a kill is dropped; a damaged line
    before it is an error naming the line."""
    lines = Path(path).read_text().splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if number < last:
                raise ValueError(f"{path}:{number}: not a JSON metrics record")
            continue
        records.append({k: _NON_FINITE.get(v, v) if isinstance(v, str) else v for k, v in record.items()})
    return records
