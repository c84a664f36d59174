"""RIL training: the paper's Algorithm 2 (shared/RIL.md), top to bottom.

    torchrun --nproc_per_node=1 -m ril_fast.train                # the built-in demo (easy-VQA, tiny student)
    torchrun --nproc_per_node=2 -m ril_fast.train steps=40       # two ranks: gloo on CPU, nccl on GPU
    torchrun -m ril_fast.train student=DIR train_data=train.jsonl teachers=a.jsonl,b.jsonl
    python -m ril_fast.train --help                              # every setting, its default and meaning

Each phase lives in its own module: rollouts (``rollout``), teacher outputs and rewards (``rewards``),
the discriminator's Eq. 1 (``imitation``), the policy's Eq. 2 (``policy``), evaluation (``evaluate``); around
them, the run's start, checkpoints and end (``lifecycle``), its record (``metrics``) and faults (``faults``).
With no teachers configured it is plain Dr.GRPO on the judge reward (the paper's "RL only" row).

Where this departs from, or fills in, the paper (its code is not public):
* Student responses are scored on the token ids they were sampled as; teacher responses are
  tokenised from their text (RIL is text-level for the teachers).
* Discriminator pre-training (Step 1) samples fresh initial-student outputs for each of its steps.
* Teacher outputs are judged through a cache (their verdicts never change); student outputs are not.
* A non-finite gradient norm skips that optimiser step (counted in ``skipped_steps``); ``max_bad_steps``
  in a row stop the run.
* Every model stays in eval mode, so dropout is off (as in TRL's GRPO by default): the policy that
  samples, π_old and the policy being updated are one function (with μ = 1 the ratio is exactly 1),
  and the discriminator's scores are deterministic. (With ``batch.activation_checkpointing`` the layer
  modules enter training mode during the updates, which transformers needs to recompute them; their
  attention and dropout modules stay in eval mode.)

Checkpoints (``ril_fast.lifecycle``) are written every ``checkpoint_every`` steps, after the last step
and on SIGTERM or Ctrl-C; the same command run again continues from the newest one, with the same
per-step metrics as a run that was never stopped (after the last step: nothing to do).
"""

import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ril_fast import distributed, schedule
from ril_fast.config import Config, ConfigError, load_config
from ril_fast.data import Batches, DataError, Example, StepDataError, no_room, to_sample
from ril_fast.demo import needs_demo, with_demo
from ril_fast.discriminator import Discriminator
from ril_fast.evaluate import evaluate
from ril_fast.faults import count_skipped, explain_oom
from ril_fast.flops import Shapes, matmul_peak_tflops
from ril_fast.files import unlock_folder
from ril_fast.imitation import disc_pass, disc_probs
from ril_fast.judge import CachedJudge, make_judge_from_config
from ril_fast.judges_http import HTTPError
from ril_fast.metrics import PhaseTimer, RunLog, reset_peak_memory, step_metrics
from ril_fast.microbatch import encode_all, micro_batches, rank_agreement
from ril_fast.lifecycle import (FINISHED, NothingToDo, checkpoint_if_asked, checkpoint_if_due, checkpoint_last,
                               checkpoint_pretraining_if_asked, exit_status, finish, load_checkpoint,
                               lock_output_dir, sigterm_when_torchrun_dies, stop_on_signals, where_to_start)
from ril_fast.models import compute_dtype, enable_activation_checkpointing, load
from ril_fast.policy import LossConfig, frozen_logprobs, global_outputs, normalizer, optimizer_step, policy_pass
from ril_fast.preflight import (built_demo, check_memory, check_surroundings, length_limit, load_data,
                                token_budget)
from ril_fast.processor import UnsupportedModel
from ril_fast.rewards import STUDENT, answer_rewards, build_groups, draw_teacher_outputs
from ril_fast.rollout import sample_responses, sampling_settings


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
    start_step: int = 0  # the step a resumed run continues after (0: a fresh run)
    counters: dict = field(default_factory=lambda: {"skipped_steps": 0, "bad_in_a_row": 0, "questions": 0,
                                                    "pretrained": 0})
    stop_requested: list = field(default_factory=list)  # the signals received (SIGTERM: checkpoint and stop)
    exporting: bool = False  # the run is past its last evaluation: a signal lets the export finish
    shapes: Shapes | None = None  # the student's, for the step's model FLOPs (ril_fast.flops)
    peak_tflops: float = 0.0  # this rank's matmul peak in the training dtype, measured at set-up: MFU's denominator


def main(argv: list[str] | None = None) -> Path:
    """Train as configured by ``argv`` (``[--config FILE] key=value ...``); returns the run folder."""
    sigterm_when_torchrun_dies()  # from the start: a rank loading its models when torchrun dies stops there
    try:
        run = setup(load_config(sys.argv[1:] if argv is None else argv))
    except NothingToDo as done:
        if distributed.init().is_main:
            print(done, flush=True)
        return done.output_dir
    cfg = run.cfg
    out = Path(cfg.output_dir)

    with stop_on_signals(run):  # SIGTERM, Ctrl-C: checkpoint after the step (or evaluation) in flight, and stop
        if run.start_step == 0:
            # Step 1: discriminator pre-training on initial-student vs teacher outputs (Eq. 1); after SIGTERM or
            # Ctrl-C its progress is checkpointed as step 0, from which the same command goes on.
            while run.disc is not None and run.counters["pretrained"] < cfg.disc.pretrain_steps:
                pretrain_disc_step(run)
                run.counters["pretrained"] += 1
                checkpoint_pretraining_if_asked(run)
            evaluate_and_log(run, step=0)
            checkpoint_if_asked(run, 0, saved=False, after="step 0's evaluation")  # keeps the pre-training

        # Step 2: the RIL loop, one batch of questions per step.
        for step in range(run.start_step + 1, cfg.steps + 1):
            metrics = train_step(run, step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                metrics.update(evaluate_now(run))
            if step % cfg.log_every == 0 or "eval_accuracy" in metrics:
                run.log.log(metrics)
            checkpoint_if_due(run, step)  # every checkpoint_every steps; after SIGTERM or Ctrl-C, then stop
        # The last step too (steps=0: the discriminator's pre-training), so that the same command run again has
        # nothing to redo, and more steps go on from it; then its evaluation, final/ and finished.json.
        checkpoint_last(run)
        finish(run, evaluate_and_log)
    distributed.barrier()
    unlock_folder(out)
    return out


# ----------------------------------------------------------------------------------------------------
# Set-up: π_ref ← π_θ_init ; π_θ ← π_θ_init ; D_φ from the same initial weights
# ----------------------------------------------------------------------------------------------------
def setup(cfg: Config) -> Run:
    """Process group, data, the three models (reference only when β > 0, discriminator only with
    teachers), optimisers and judges. Bad settings and data fail here, before any model loads."""
    dist = distributed.init(cpu_collectives=cfg.batch.cpu_offload)
    if needs_demo(cfg):
        distributed.on_rank0(built_demo)  # rank 0 builds it (every rank raises its error); the others find it built
        cfg = with_demo(cfg, built_demo())
    out = Path(cfg.output_dir)
    # Rank 0's view of output_dir decides for every rank: a shared file system may show ranks different views.
    resume_from, done = distributed.on_rank0(lambda: where_to_start(cfg))
    if done:
        raise NothingToDo(cfg)
    if dist.is_main:
        print(cfg.describe(), flush=True)
    examples, bank, eval_examples, batches = load_data(cfg, dist)
    verdicts = check_surroundings(cfg, dist)  # the judge's folder, server and verdict cache, on every rank
    check_memory(cfg, dist, disc=bank is not None, examples=examples)
    distributed.on_rank0(lambda: lock_output_dir(out))  # from here on this run writes in output_dir

    gpu, dtype = dist.device.type == "cuda", compute_dtype(dist.device)
    # Each model loads into the CPU's memory and shard_model moves it to the device one unit at a time: a GPU
    # never holds a whole fp32 model (30 GB for 7B parameters). With several ranks only rank 0 reads the weights
    # (the others build the models empty and receive their shards from it), unless offloaded.
    from_rank0 = dist.world_size > 1 and not cfg.batch.cpu_offload
    empty = from_rank0 and not dist.is_main
    # The weights a folder lacks, which transformers initialises from torch's generator, start alike in π_θ, π_ref
    # and D_φ, on every rank and in every run of the seed: the generator is seeded afresh before each model loads.
    torch.manual_seed(cfg.seed)
    student, processor = load(cfg.student, dtype=torch.float32, device=dist.device, weights_on_cpu=True, empty=empty,
                              max_image_pixels=cfg.max_image_pixels)
    shapes = Shapes.of_model(student)
    if cfg.batch.activation_checkpointing:  # acts in the updates only (models.recomputing)
        enable_activation_checkpointing(student)
    reshard = None if cfg.batch.keep_gathered else True  # None: only when a copy is sharded over several ranks
    shard = dict(reshard_after_forward=reshard, shard_ranks=cfg.batch.shard_ranks, cpu_offload=cfg.batch.cpu_offload,
                 pin_memory=cfg.batch.offload_pinned, from_rank0=from_rank0)
    # Offloaded, AdamW steps on the CPU: its fused kernel makes one pass over each tensor, 7x faster there than
    # torch's default per-tensor loop (67 M parameters, 2 threads). (CPU runs keep the default: the demo's
    # optimiser is 13 ms of a 1.4 s step, and its measured trajectory would change by rounding.)
    fused = dict(fused=True) if cfg.batch.cpu_offload else {}
    # In eval mode: see the module docstring.
    student = distributed.shard_model(student, mixed_precision=gpu, device=dist.device, **shard)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay, **fused)
    scheduler = schedule.make_scheduler(optimizer, cfg)  # warm-up, then cosine decay

    reference = None
    if cfg.beta > 0:  # sharded like the student where a copy is, offloaded with it: between its passes a rank keeps
        # its shard, where the student keeps its own
        sharded = distributed.shard_size(cfg.batch.shard_ranks) > 1 or cfg.batch.cpu_offload
        torch.manual_seed(cfg.seed)
        reference, _ = load(cfg.student, dtype=dtype, device=dist.device, weights_on_cpu=sharded,
                            empty=sharded and empty)
        reference.requires_grad_(False)
        if sharded:
            reference = distributed.shard_model(reference, mixed_precision=gpu, sum_gradients=False, device=dist.device,
                                                **shard)

    disc = disc_optimizer = None
    if bank is not None:
        torch.manual_seed(cfg.seed)
        disc, _ = Discriminator.from_student(cfg.student, device=dist.device, pool=cfg.disc.pool, weights_on_cpu=True,
                                             empty=empty)
        if cfg.batch.activation_checkpointing:
            enable_activation_checkpointing(disc.backbone)
        disc = distributed.shard_model(disc.eval(), mixed_precision=gpu, device=dist.device, **shard)
        disc_optimizer = torch.optim.AdamW(distributed.optimizer_groups(disc), lr=cfg.disc.lr,
                                           weight_decay=cfg.disc.weight_decay, **fused)

    judge = make_judge_from_config(cfg)  # rule | hf | http, with the judge_* settings
    distributed.barrier()  # ranks that share a CPU measure its peak together: each its share, as they will train
    peak_tflops = matmul_peak_tflops(dist.device, dtype)
    if dist.is_main:
        print(f"matmul peak measured for MFU: {peak_tflops:.3g} TFLOP/s ({str(dtype)[6:]}, {dist.device.type})",
              flush=True)
    run = Run(cfg=cfg, dist=dist, student=student, processor=processor, optimizer=optimizer, scheduler=scheduler,
              reference=reference, disc=disc, disc_optimizer=disc_optimizer, judge=judge,
              teacher_judge=CachedJudge(judge, store=verdicts), bank=bank, batches=batches,
              eval_examples=eval_examples, rng=random.Random(f"{cfg.seed}:{dist.rank}"), log=None, shapes=shapes,
              peak_tflops=peak_tflops)
    if resume_from is not None:
        load_checkpoint(run, resume_from)
    if dist.is_main:  # only now: a refused resume leaves the folder's config (and finished.json) as it was
        cfg.save(out / "config.yaml")
        (out / FINISHED).unlink(missing_ok=True)  # an earlier run's: this one has yet to finish
    run.log = RunLog(out, enabled=dist.is_main, total_steps=cfg.steps, progress=cfg.progress,
                     resume_step=run.start_step if resume_from is not None else None,
                     keep_evaluation=0 < run.start_step < cfg.steps)  # a finished run's last one, if going on
    return run


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
    run.processor.forget_prompts()  # the last step's questions: not asked again this epoch
    prompts = [to_sample(q) for q in questions]
    try:
        rollouts = sample_responses(run.student, run.processor, prompts, seed=seed, **sampling_settings(cfg))
    except ValueError:
        _name_the_failing_prompt(run, questions)
        raise
    teacher_outputs = None
    if run.bank is not None:
        teacher_outputs = []
        for q in questions:
            teacher_outputs.append(draw_teacher_outputs(run.bank.responses(q.id), cfg.group_size, run.rng,
                                                        rotation=run.counters["questions"]))
            run.counters["questions"] += 1
    samples, sources = [], []
    for k, (q, prompt) in enumerate(zip(questions, prompts)):
        samples += [dict(r.sample(prompt), answer=q.answer, where=q.where) for r in rollouts[k]]
        sources += [STUDENT] * len(rollouts[k])
        if teacher_outputs is not None:
            samples += [dict(to_sample(q, text), answer=q.answer, where=q.where) for _, text in teacher_outputs[k]]
            sources += [name for name, _ in teacher_outputs[k]]
    return samples, sources, [[r.text for r in rs] for rs in rollouts], teacher_outputs


def _name_the_failing_prompt(run: Run, questions: list[Example]) -> None:
    """After the rollout failed: render each question's prompt alone, so that one the processor refuses
    (e.g. an image of extreme aspect ratio) becomes an error naming its line. Returns if none fails."""
    for q in questions:
        try:
            run.processor.encode_prompt(q.question, q.images)
        except ValueError as e:
            raise StepDataError(f"{q.where}: {e}") from None


def _micro(run: Run, samples: list[dict]):
    """The step's packed micro-batches, the same count on every rank, with images in the same ones; on
    this rank's device once for the step's passes (small: token ids, positions and pixels). Returns them
    and the samples' encodings."""
    encoded = encode_all(run.processor, samples)
    _check_lengths(run, samples, encoded)
    micro = micro_batches(encoded, run.cfg.batch.max_tokens, padded=run.cfg.batch.padded,
                          **rank_agreement(run.processor, run.dist.device))
    for mb in micro:
        mb.batch = mb.batch.to(run.dist.device)
    return micro, encoded


def _check_lengths(run: Run, samples: list[dict], encoded) -> None:
    """A question whose prompt leaves no room for a full-length response is an error naming its line (checked
    before loading too, from image sizes: this catches an image file replaced since)."""
    cfg = run.cfg
    budget, setting = token_budget(cfg, length_limit(distributed.unwrap(run.student).config))
    for sample, e in zip(samples, encoded):
        if e.prompt_len + cfg.max_new_tokens > budget:
            raise StepDataError(": ".join(no_room(sample["where"], e.prompt_len, max_new_tokens=cfg.max_new_tokens,
                                              budget=budget, setting=setting, images=bool(sample["images"]))))


def _disc_update(run: Run, micro, sources, n_global) -> dict:
    labels = torch.tensor([float(s == STUDENT) for s in sources])
    stats = disc_pass(run.disc, micro, labels, n_global, threshold=run.cfg.disc.threshold)
    stepped = optimizer_step(run.disc, run.disc_optimizer, run.cfg.disc.grad_clip)
    stats.update({f"disc_{k}": v for k, v in stepped.items()})
    return stats


def pretrain_disc_step(run: Run) -> dict:
    """One Eq. 1 step on a fresh batch: initial-student samples (label 1) vs teacher outputs (label 0)."""
    cfg, questions = run.cfg, next(run.batches)
    with explain_oom(cfg, "pre-training rollout"):
        samples, sources, _, _ = collect_outputs(run, questions, seed=_seed(run, -1 - run.counters["questions"]))
        micro, _ = _micro(run, samples)
    with explain_oom(cfg, "pre-training disc_update", micro):
        return _disc_update(run, micro, sources, global_outputs(len(samples), run.dist.device))


def _seed(run: Run, step: int) -> int:
    """A distinct sampling seed per (run seed, step, rank)."""
    return (run.cfg.seed * 1_000_003 + step) * 4096 + run.dist.rank


def train_step(run: Run, step: int, timer: PhaseTimer | None = None) -> dict:
    """One batch B: rollouts, teacher outputs, μ discriminator updates, rewards over 2G, advantages,
    old/ref log-probs, μ policy updates. Returns the step's metrics. ``timer``: times the phases (a
    fresh ``PhaseTimer`` by default; bench/throughput.py passes one that also synchronises the GPU)."""
    cfg, timer, t0 = run.cfg, timer or PhaseTimer(), time.perf_counter()
    reset_peak_memory(run.dist.device)
    questions = next(run.batches)

    # π_old ← π_θ: sample G student outputs per q; take G teacher outputs per q from the collection.
    with timer("rollout"), explain_oom(cfg, "rollout"):
        samples, sources, student_texts, teacher_outputs = collect_outputs(run, questions, _seed(run, step))
        micro, encoded = _micro(run, samples)
        n_global = global_outputs(len(samples), run.dist.device)

    # Repeat μ times: update D_φ with Eq. 1 on this batch's student and teacher outputs.
    disc_stats = {}
    if run.disc is not None:
        with timer("disc_update"), explain_oom(cfg, "disc_update", micro):
            for _ in range(cfg.mu):
                disc_stats = _disc_update(run, micro, sources, n_global)

    # Rewards r = r_sim + r_ans for all 2G outputs of each q; Dr.GRPO advantages over each group.
    with timer("judge"):
        r_ans = answer_rewards(run.judge, run.teacher_judge, samples, sources)
    with timer("disc_score"), explain_oom(cfg, "disc_score", micro):
        probs = disc_probs(run.disc, micro, len(samples)) if run.disc is not None else None
    groups = build_groups(student_texts, teacher_outputs, r_ans, probs, threshold=cfg.disc.threshold)
    advantages = torch.cat([g.advantages for g in groups])

    # π_old and π_ref log-probs from packed no-grad passes (only when they are used).
    with timer("old_ref_logprobs"), explain_oom(cfg, "old_ref_logprobs", micro):
        kernels, temperature = cfg.loss.kernels, cfg.rollout.temperature
        old = frozen_logprobs(run.student, micro, temperature, kernels) if cfg.mu > 1 else None
        ref = frozen_logprobs(run.reference, micro, temperature, kernels) if run.reference is not None else None

    # Repeat μ times: update π_θ with Eq. 2 over all 2G outputs.
    loss_cfg, divisor = LossConfig.from_config(cfg), normalizer(n_global, cfg.max_new_tokens)
    lr = run.scheduler.get_last_lr()[0]  # the rate of this step's (first) update
    for _ in range(cfg.mu):
        with timer("policy_update"), explain_oom(cfg, "policy_update", micro):
            policy = policy_pass(run.student, micro, advantages, divisor, loss_cfg, old=old, ref=ref)
        with timer("optimizer"):
            policy.update(optimizer_step(run.student, run.optimizer, cfg.optim.grad_clip))
        count_skipped(run, bool(policy["skipped"]), step)
        run.scheduler.step()

    return step_metrics(run, step, timer, seconds=time.perf_counter() - t0, questions=questions, groups=groups,
                        updates={**disc_stats, **policy, "lr": lr}, micro=micro, encoded=encoded, sources=sources)


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------
def evaluate_now(run: Run) -> dict:
    """Greedy accuracy on the held-out examples (empty when there are none)."""
    if not run.eval_examples:
        return {}
    try:
        with explain_oom(run.cfg, "evaluation"):
            return evaluate(run.student, run.processor, run.eval_examples, run.judge, run.dist,
                            max_new_tokens=run.cfg.max_new_tokens, batch_size=run.cfg.rollout.batch_size)
    finally:
        run.processor.forget_prompts()  # each held-out prompt is rendered once: keeping them holds only memory


def evaluate_and_log(run: Run, step: int) -> None:
    """Evaluate and write one metrics line for it (before the first step and after the last)."""
    metrics = evaluate_now(run)
    if metrics:
        run.log.log({"step": step, **metrics})


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, UnsupportedModel, HTTPError) as e:  # names the setting, FILE:LINE, the model or URL
        distributed.destroy()  # as below: 2 of 6 runs refused on 3-4 ranks aborted a rank without it
        raise SystemExit(exit_status(e, int(os.environ.get("RANK", "0")))) from None
    # Leave the process group before the interpreter tears down: a gloo group destroyed during finalization once
    # aborted a rank that had finished (4 ranks under torchrun: "terminate called without an active exception").
    distributed.destroy()
