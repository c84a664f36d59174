"""RIL training: the paper's Algorithm 2 (shared/RIL.md), top to bottom.

    torchrun --nproc_per_node=1 -m ril_fast.train                # the built-in demo (easy-VQA, tiny student)
    torchrun --nproc_per_node=2 -m ril_fast.train steps=40       # two ranks: gloo on CPU, nccl on GPU
    torchrun -m ril_fast.train student=DIR train_data=train.jsonl teachers=a.jsonl,b.jsonl
    python -m ril_fast.train --help                              # every setting, its default and meaning

Each phase lives in its own module: rollouts (``rollout``), teacher outputs and rewards (``rewards``),
the discriminator's Eq. 1 (``imitation``), the policy's Eq. 2 (``policy``), evaluation (``evaluate``).
With no teachers configured it is plain Dr.GRPO on the judge reward (the paper's "RL only" row).

Where this departs from, or fills in, the paper (its code is not public):
* Student responses are scored on the token ids they were sampled as; teacher responses are
  tokenised from their text (RIL is text-level for the teachers).
* Discriminator pre-training (Step 1) samples fresh initial-student outputs for each of its steps.
* Teacher outputs are judged through a cache (their verdicts never change); student outputs are not.
* A non-finite gradient norm skips that optimiser step (counted in ``skipped_steps``).
"""

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ril_fast import distributed
from ril_fast.config import Config, load_config
from ril_fast.data import Batches, Example, load_examples, load_teachers, to_sample
from ril_fast.demo import build_demo, needs_demo, with_demo
from ril_fast.discriminator import Discriminator
from ril_fast.evaluate import evaluate
from ril_fast.export import export_hf
from ril_fast.imitation import disc_pass, disc_probs
from ril_fast.judge import CachedJudge, JudgeItem, make_judge
from ril_fast.metrics import PhaseTimer, RunLog
from ril_fast.microbatch import encode_all, micro_batches
from ril_fast.models import load
from ril_fast.policy import LossConfig, frozen_logprobs, optimizer_step, policy_pass
from ril_fast.rewards import STUDENT, answer_rewards, build_groups, draw_teacher_outputs, reward_stats
from ril_fast.rollout import sample_responses


@dataclass
class Run:
    """Everything a step needs, built once by :func:`setup`."""

    cfg: Config
    dist: distributed.Dist
    student: torch.nn.Module
    processor: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    reference: torch.nn.Module | None
    disc: torch.nn.Module | None
    disc_optimizer: torch.optim.Optimizer | None
    judge: object
    teacher_judge: object
    bank: object
    batches: Batches
    eval_examples: list[Example]
    rng: random.Random
    log: RunLog
    counters: dict = field(default_factory=lambda: {"skipped_steps": 0, "questions": 0})


def main(argv: list[str] | None = None) -> Path:
    """Train as configured by ``argv`` (``[--config FILE] key=value ...``); returns the run folder."""
    run = setup(load_config(sys.argv[1:] if argv is None else argv))
    cfg = run.cfg

    # Step 1: discriminator pre-training on initial-student vs teacher outputs (Eq. 1).
    for _ in range(cfg.disc.pretrain_steps if run.disc is not None else 0):
        pretrain_disc_step(run)

    evaluate_and_log(run, step=0)
    # Step 2: the RIL loop, one batch of questions per step.
    for step in range(1, cfg.steps + 1):
        metrics = train_step(run, step)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            metrics.update(evaluate_now(run))
        if step % cfg.log_every == 0 or "eval_accuracy" in metrics:
            run.log.log(metrics)
    evaluate_and_log(run, step=cfg.steps)

    out = Path(cfg.output_dir)
    export_hf(run.student, run.processor, out / "final", is_main=run.dist.is_main)
    run.log.close()
    if run.dist.is_main:
        print(f"metrics: {out / 'metrics.jsonl'}\nexported student: {out / 'final'}", flush=True)
    distributed.barrier()
    return out


# ----------------------------------------------------------------------------------------------------
# Set-up: π_ref ← π_θ_init ; π_θ ← π_θ_init ; D_φ from the same initial weights
# ----------------------------------------------------------------------------------------------------
def setup(cfg: Config) -> Run:
    """Process group, data, the three models (reference only when β > 0, discriminator only with
    teachers), optimisers and judges."""
    dist = distributed.init()
    if needs_demo(cfg):
        if dist.is_main:
            build_demo()
        distributed.barrier()
        cfg = with_demo(cfg, build_demo())
    out = Path(cfg.output_dir)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        print(cfg.describe(), flush=True)
    torch.manual_seed(cfg.seed)

    examples = load_examples(cfg.train_data)
    bank = None if cfg.rl_only else load_teachers(cfg.teachers, examples)
    if bank is not None and bank.missing(examples):
        missing = bank.missing(examples)
        raise SystemExit(f"{len(missing)} training examples have no teacher response (first: {missing[0].id}); "
                         f"RIL needs G teacher outputs per question")
    eval_examples = load_examples(cfg.eval_data) if cfg.eval_data else []
    if cfg.eval_max_examples:
        eval_examples = eval_examples[:cfg.eval_max_examples]

    gpu = dist.device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    student, processor = load(cfg.student, dtype=torch.float32, device=dist.device)
    student = distributed.shard_model(student.train(), mixed_precision=gpu)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    warmup = max(cfg.optim.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / warmup))

    reference = None
    if cfg.beta > 0:
        reference, _ = load(cfg.student, dtype=dtype, device=dist.device)
        reference.requires_grad_(False)

    disc = disc_optimizer = None
    if bank is not None:
        disc, _ = Discriminator.from_student(cfg.student, device=dist.device, pool=cfg.disc.pool)
        disc = distributed.shard_model(disc.train(), mixed_precision=gpu)
        # foreach=False: the head's 0-dim bias stays a plain tensor beside FSDP's DTensors.
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=cfg.disc.lr, foreach=False)

    judge = make_judge(cfg.judge)  # the hf and http kinds (issue 5) will take judge_url / judge_model
    return Run(cfg=cfg, dist=dist, student=student, processor=processor, optimizer=optimizer, scheduler=scheduler,
               reference=reference, disc=disc, disc_optimizer=disc_optimizer, judge=judge,
               teacher_judge=CachedJudge(judge), bank=bank,
               batches=Batches(examples, cfg.batch.questions_per_step, seed=cfg.seed, rank=dist.rank,
                               world_size=dist.world_size),
               eval_examples=eval_examples, rng=random.Random(f"{cfg.seed}:{dist.rank}"),
               log=RunLog(out, enabled=dist.is_main, total_steps=cfg.steps, progress=cfg.progress))


# ----------------------------------------------------------------------------------------------------
# One step of Algorithm 2
# ----------------------------------------------------------------------------------------------------
def collect_outputs(run: Run, questions: list[Example], seed: int):
    """For each q: G student outputs o^(s) ~ π_old(·|q), and G teacher outputs from the collection.

    Returns (samples, sources, student_texts, teacher_outputs): the packing samples of all outputs in
    group order (q's student outputs, then its teacher outputs; each also carries q's ground-truth
    ``answer`` for the judge), their sources ("student" or a teacher),
    the student texts per question, and the (teacher, response) pairs per question (None: RL only).
    """
    cfg = run.cfg
    prompts = [to_sample(q) for q in questions]
    rollouts = sample_responses(run.student, run.processor, prompts, group_size=cfg.group_size,
                                max_new_tokens=cfg.max_new_tokens, temperature=cfg.rollout.temperature,
                                top_p=cfg.rollout.top_p, seed=seed, max_batch=cfg.rollout.batch_size)
    teacher_outputs = None
    if run.bank is not None:
        teacher_outputs = []
        for q in questions:
            teacher_outputs.append(draw_teacher_outputs(run.bank.responses(q.id), cfg.group_size, run.rng,
                                                        rotation=run.counters["questions"]))
            run.counters["questions"] += 1
    samples, sources = [], []
    for k, (q, prompt) in enumerate(zip(questions, prompts)):
        samples += [dict(r.sample(prompt), answer=q.answer) for r in rollouts[k]]
        sources += [STUDENT] * len(rollouts[k])
        if teacher_outputs is not None:
            samples += [dict(to_sample(q, text), answer=q.answer) for _, text in teacher_outputs[k]]
            sources += [name for name, _ in teacher_outputs[k]]
    return samples, sources, [[r.text for r in rs] for rs in rollouts], teacher_outputs


def _micro(run: Run, samples: list[dict]):
    """The step's packed micro-batches, the same count on every rank."""
    def agree(n: int) -> int:
        return int(distributed.all_reduce_max(torch.tensor(n, device=run.dist.device)))

    return micro_batches(encode_all(run.processor, samples), run.cfg.batch.max_tokens, agree=agree)


def _global_count(run: Run, n: int) -> torch.Tensor:
    """The number of outputs of this step over all ranks, counted once, as a 0-dim fp32 tensor."""
    return distributed.all_reduce_sum(torch.tensor(float(n), device=run.dist.device))


def _disc_update(run: Run, micro, sources, n_global) -> dict:
    labels = torch.tensor([float(s == STUDENT) for s in sources])
    stats = disc_pass(run.disc, micro, labels, n_global)
    stats.update({f"disc_{k}": v for k, v in optimizer_step(run.disc, run.disc_optimizer, run.cfg.optim.grad_clip).items()})
    return stats


def pretrain_disc_step(run: Run) -> dict:
    """One Eq. 1 step on a fresh batch: initial-student samples (label 1) vs teacher outputs (label 0)."""
    questions = next(run.batches)
    samples, sources, _, _ = collect_outputs(run, questions, seed=_seed(run, -1 - run.counters["questions"]))
    micro = _micro(run, samples)
    return _disc_update(run, micro, sources, _global_count(run, len(samples)))


def _seed(run: Run, step: int) -> int:
    """A distinct sampling seed per (run seed, step, rank)."""
    return (run.cfg.seed * 1_000_003 + step) * 4096 + run.dist.rank


def train_step(run: Run, step: int) -> dict:
    """One batch B: rollouts, teacher outputs, μ discriminator updates, rewards over 2G, advantages,
    old/ref log-probs, μ policy updates. Returns the step's metrics."""
    cfg, timer, t0 = run.cfg, PhaseTimer(), time.perf_counter()
    questions = next(run.batches)

    # π_old ← π_θ: sample G student outputs per q; take G teacher outputs per q from the collection.
    with timer("rollout"):
        samples, sources, student_texts, teacher_outputs = collect_outputs(run, questions, _seed(run, step))
        micro = _micro(run, samples)
        n_global = _global_count(run, len(samples))

    # Repeat μ times: update D_φ with Eq. 1 on this batch's student and teacher outputs.
    disc_stats = {}
    if run.disc is not None:
        with timer("disc_update"):
            for _ in range(cfg.mu):
                disc_stats = _disc_update(run, micro, sources, n_global)

    # Rewards r = r_sim + r_ans for all 2G outputs of each q; Dr.GRPO advantages over each group.
    with timer("judge"):
        items = [JudgeItem(s["question"], s["answer"], s["response"]) for s in samples]
        student_idx = [i for i, s in enumerate(sources) if s == STUDENT]
        teacher_idx = [i for i, s in enumerate(sources) if s != STUDENT]
        r_ans = torch.zeros(len(items))
        r_ans[student_idx] = answer_rewards(run.judge, [items[i] for i in student_idx])
        if teacher_idx:
            r_ans[teacher_idx] = answer_rewards(run.teacher_judge, [items[i] for i in teacher_idx])
    with timer("disc_score"):
        probs = disc_probs(run.disc, micro, len(samples)) if run.disc is not None else None
    groups = build_groups(student_texts, teacher_outputs, r_ans, probs, threshold=cfg.disc.threshold)
    advantages = torch.cat([g.advantages for g in groups])

    # π_old and π_ref log-probs from packed no-grad passes (only when they are used).
    with timer("old_ref_logprobs"):
        old = frozen_logprobs(run.student, micro, cfg.rollout.temperature) if cfg.mu > 1 else None
        ref = frozen_logprobs(run.reference, micro, cfg.rollout.temperature) if run.reference is not None else None

    # Repeat μ times: update π_θ with Eq. 2 over all 2G outputs.
    loss_cfg = LossConfig(cfg.loss.eps_low, cfg.loss.eps_high, cfg.beta, cfg.rollout.temperature)
    normalizer = n_global * cfg.max_new_tokens
    for _ in range(cfg.mu):
        with timer("policy_update"):
            policy = policy_pass(run.student, micro, advantages, normalizer, loss_cfg, old=old, ref=ref)
        with timer("optimizer"):
            policy.update(optimizer_step(run.student, run.optimizer, cfg.optim.grad_clip))
        run.counters["skipped_steps"] += int(policy["skipped"])
        run.scheduler.step()

    tokens = sum(sum(mb.batch.lengths) for mb in micro)
    seconds = time.perf_counter() - t0
    return {"step": step, **reward_stats(groups), **disc_stats, **policy, "lr": run.scheduler.get_last_lr()[0],
            "skipped_steps": run.counters["skipped_steps"], "tokens_per_s": tokens * run.dist.world_size / seconds,
            "step_time_s": seconds, **timer.as_metrics()}


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------
def evaluate_now(run: Run) -> dict:
    """Greedy accuracy on the held-out examples (empty when there are none)."""
    if not run.eval_examples:
        return {}
    return evaluate(run.student, run.processor, run.eval_examples, run.judge, run.dist,
                    max_new_tokens=run.cfg.max_new_tokens, batch_size=run.cfg.rollout.batch_size)


def evaluate_and_log(run: Run, step: int) -> None:
    """Evaluate and write one metrics line for it (before the first step and after the last)."""
    metrics = evaluate_now(run)
    if metrics:
        run.log.log({"step": step, **metrics})


if __name__ == "__main__":
    main()
