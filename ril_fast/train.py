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
* A non-finite gradient norm skips that optimiser step (counted in ``skipped_steps``); ``max_bad_steps``
  in a row stop the run.
* Every model stays in eval mode, so dropout is off (as in TRL's GRPO by default): the policy that
  samples, π_old and the policy being updated are one function (with μ = 1 the ratio is exactly 1),
  and the discriminator's scores are deterministic. (With ``batch.activation_checkpointing`` the layer
  modules enter training mode during the updates, which transformers needs to recompute them; their
  attention and dropout modules stay in eval mode.)

Checkpoints (``ril_fast.checkpoint``) are written every ``checkpoint_every`` steps, after the last step
and on SIGTERM or Ctrl-C; the same command run again continues from the newest one, with the same
per-step metrics as a run that was never stopped (after the last step: nothing to do).
"""

import contextlib
import json
import os
import random
import signal
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ril_fast import checkpoint, distributed, schedule
from ril_fast.config import Config, ConfigError, load_config
from ril_fast.data import Batches, DataError, Example, load_examples, load_teachers, refuse_images, to_sample
from ril_fast.demo import build_demo, needs_demo, with_demo
from ril_fast.discriminator import Discriminator
from ril_fast.evaluate import evaluate
from ril_fast.export import export_hf, save_hf_files
from ril_fast.files import InUse, lock_folder, model_folder_problem, unlock_folder, write_text_atomic
from ril_fast.imitation import disc_pass, disc_probs
from ril_fast.judge import CachedJudge, JudgeItem, JudgeKind, judge_store, make_judge_from_config
from ril_fast.judges_http import OpenAIClient
from ril_fast.metrics import PhaseTimer, RunLog
from ril_fast.microbatch import encode_all, micro_batches, rank_agreement
from ril_fast.kernels._triton import interpreting
from ril_fast.models import Kernels, enable_activation_checkpointing, load
from ril_fast.packing import ModelKind, Processor, UnsupportedModel
from ril_fast.policy import LossConfig, frozen_logprobs, optimizer_step, policy_pass
from ril_fast.rewards import STUDENT, answer_rewards, build_groups, draw_teacher_outputs, reward_stats
from ril_fast.rollout import sample_responses


FINISHED = "finished.json"  # written last, after final/ is complete: the step final/ was exported at


class NothingToDo(Exception):
    """The run in ``output_dir`` finished (its last step exported): raised by :func:`setup` before any
    model loads."""

    def __init__(self, cfg: Config):
        super().__init__(f"nothing to do: the run in {cfg.output_dir} finished (steps={cfg.steps}); "
                         f"raise steps to go on")
        self.output_dir = Path(cfg.output_dir)


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
    counters: dict = field(default_factory=lambda: {"skipped_steps": 0, "bad_in_a_row": 0, "questions": 0})
    stop_requested: list = field(default_factory=list)  # the signals received (SIGTERM: checkpoint and stop)


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

    with stop_on_signals(run):  # SIGTERM, Ctrl-C: stop after the next step's checkpoint
        if run.start_step == 0:
            # Step 1: discriminator pre-training on initial-student vs teacher outputs (Eq. 1).
            for _ in range(cfg.disc.pretrain_steps if run.disc is not None else 0):
                pretrain_disc_step(run)
            evaluate_and_log(run, step=0)

        # Step 2: the RIL loop, one batch of questions per step.
        for step in range(run.start_step + 1, cfg.steps + 1):
            metrics = train_step(run, step)
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                metrics.update(evaluate_now(run))
            if step % cfg.log_every == 0 or "eval_accuracy" in metrics:
                run.log.log(metrics)
            checkpoint_if_due(run, step)  # every checkpoint_every steps; after SIGTERM or Ctrl-C, then stop
    if cfg.checkpoint_every and run.start_step < cfg.steps and cfg.steps % cfg.checkpoint_every:
        save_checkpoint(run, cfg.steps)  # the last step too: the same command run again has nothing to redo
    evaluate_and_log(run, step=cfg.steps)

    export_hf(run.student, run.processor, out / "final", is_main=run.dist.is_main)
    run.log.close()
    if run.dist.is_main:
        write_text_atomic(out / FINISHED, json.dumps({"step": cfg.steps}))
        print(f"metrics: {out / 'metrics.jsonl'}\nexported student: {out / 'final'}", flush=True)
    distributed.barrier()
    unlock_folder(out)
    return out


# ----------------------------------------------------------------------------------------------------
# Set-up: π_ref ← π_θ_init ; π_θ ← π_θ_init ; D_φ from the same initial weights
# ----------------------------------------------------------------------------------------------------
def setup(cfg: Config) -> Run:
    """Process group, data, the three models (reference only when β > 0, discriminator only with
    teachers), optimisers and judges. Bad settings and data fail here, before any model loads."""
    dist = distributed.init()
    if needs_demo(cfg):
        if dist.is_main:
            build_demo()
        distributed.barrier()
        cfg = with_demo(cfg, build_demo())
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out}: exists and is not a folder")
    resume_from = resume_point(cfg)
    if finished(cfg, resume_from):
        raise NothingToDo(cfg)
    if dist.is_main:
        print(cfg.describe(), flush=True)
    torch.manual_seed(cfg.seed)
    examples, bank, eval_examples, batches = load_data(cfg, dist)
    try:
        verdicts = judge_store(cfg.judge_cache)  # the teacher verdicts' persistent cache, if configured
    except (sqlite3.DatabaseError, OSError) as e:
        raise ConfigError(f"judge_cache={cfg.judge_cache}: cannot use it as the verdict cache (an SQLite "
                          f"file): {e}") from None
    check_judge_and_kernels(cfg, dist)
    if dist.is_main:  # from here on this run writes in output_dir
        try:
            lock_folder(out)
        except InUse as e:
            raise ConfigError(f"output_dir={e}: wait for that run to end, or stop it") from None
        except OSError as e:
            raise ConfigError(f"output_dir={out}: cannot write there: {e}") from None

    gpu = dist.device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    student, processor = load(cfg.student, dtype=torch.float32, device=dist.device)
    if cfg.batch.activation_checkpointing:  # acts in the updates only (models.recomputing)
        enable_activation_checkpointing(student)
    student = distributed.shard_model(student, mixed_precision=gpu)  # in eval mode: see the module docstring
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = schedule.make_scheduler(optimizer, cfg)  # warm-up, then cosine decay

    reference = None
    if cfg.beta > 0:
        reference, _ = load(cfg.student, dtype=dtype, device=dist.device)
        reference.requires_grad_(False)

    disc = disc_optimizer = None
    if bank is not None:
        disc, _ = Discriminator.from_student(cfg.student, device=dist.device, pool=cfg.disc.pool)
        if cfg.batch.activation_checkpointing:
            enable_activation_checkpointing(disc.backbone)
        disc = distributed.shard_model(disc.eval(), mixed_precision=gpu)
        disc_optimizer = torch.optim.AdamW(distributed.optimizer_groups(disc), lr=cfg.disc.lr,
                                           weight_decay=cfg.disc.weight_decay)

    judge = make_judge_from_config(cfg)  # rule | hf | http, with the judge_* settings
    run = Run(cfg=cfg, dist=dist, student=student, processor=processor, optimizer=optimizer, scheduler=scheduler,
              reference=reference, disc=disc, disc_optimizer=disc_optimizer, judge=judge,
              teacher_judge=CachedJudge(judge, store=verdicts), bank=bank, batches=batches,
              eval_examples=eval_examples, rng=random.Random(f"{cfg.seed}:{dist.rank}"), log=None)
    if resume_from is not None:
        load_checkpoint(run, resume_from)
    if dist.is_main:  # only now: a refused resume leaves the folder's config as it was
        cfg.save(out / "config.yaml")
    run.log = RunLog(out, enabled=dist.is_main, total_steps=cfg.steps, progress=cfg.progress,
                     resume_step=run.start_step if resume_from is not None else None)
    return run


@contextlib.contextmanager
def stop_on_signals(run: Run):
    """Inside the block, SIGTERM and Ctrl-C ask the run to stop after the step in flight
    (``checkpoint_if_due``); the previous handlers come back after it. Under torchrun, the death of torchrun
    is a SIGTERM too (:func:`sigterm_when_torchrun_dies`, which ``main`` calls first)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    for signum in saved:
        signal.signal(signum, lambda signum, frame: request_stop(run, signum))
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def sigterm_when_torchrun_dies() -> None:
    """Under torchrun on Linux, ask the kernel for a SIGTERM to this rank when torchrun, its parent, dies. A
    SIGKILLed torchrun (an OOM killer, a lost login) leaves its ranks running otherwise, in sessions of their
    own, writing the run folder beside the run started again; with it each rank checkpoints and stops (while
    its models load, before ``stop_on_signals``, SIGTERM just ends it: there is nothing to save yet)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()  # torchrun; pid 1 where it is a container's first process, so no sign of its death
    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # torchrun died before the request: nothing will send it
        os.kill(os.getpid(), signal.SIGTERM)


def request_stop(run: Run, signum: int) -> None:
    """SIGTERM or Ctrl-C: finish the step, checkpoint, stop. Repeats change nothing: torchrun passes a
    Ctrl-C on to ranks that got it from the terminal already (and kills them after its grace period)."""
    if run.dist.is_main and not run.stop_requested:
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        print(f"\n{name}: stopping after this step and its checkpoint" + (
            "; torchrun kills the ranks after its --shutdown-timeout (30 s unless set): raise it where a step "
            "takes longer" if "TORCHELASTIC_RUN_ID" in os.environ else ""), flush=True)
    run.stop_requested.append(signum)


def check_judge_and_kernels(cfg: Config, dist: distributed.Dist) -> None:
    """The settings that name things outside the config, checked before any model loads: an hf judge's model
    folder, an http judge's server (it answers and serves ``judge_model``), Triton kernels' device."""
    if cfg.judge is JudgeKind.HF and (problem := model_folder_problem(cfg.judge_model)):
        raise ConfigError(f"judge_model={cfg.judge_model}: {problem}")
    if cfg.judge is JudgeKind.HTTP and (problem := OpenAIClient(
            cfg.judge_url, timeout_s=cfg.judge_timeout_s, retries=cfg.judge_retries).serving(cfg.judge_model)):
        raise ConfigError(f"judge_url={cfg.judge_url}: the judge server cannot be used: {problem}")
    if cfg.loss.kernels is Kernels.TRITON and dist.device.type != "cuda" and not interpreting():
        raise ConfigError("loss.kernels=triton: Triton kernels need a GPU, or on the CPU the interpreter "
                          "(TRITON_INTERPRET=1); auto picks the chunked torch code here")


def resume_point(cfg: Config) -> Path | None:
    """The checkpoint the run continues from (``checkpoint.resolve``). Starting afresh or from an earlier
    checkpoint is refused while ``output_dir`` holds later ones of another run: the next ``resume=auto``
    and the pruning of old checkpoints would take theirs for this run's."""
    try:
        path = checkpoint.resolve(cfg.resume, cfg.output_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if cfg.resume == "auto":
        return path
    step = -1 if path is None else checkpoint.saved_step(path)
    later = [p.name for p in checkpoint.checkpoints(cfg.output_dir) if checkpoint.saved_step(p) > step]
    if later:
        raise ConfigError(f"resume={cfg.resume}: output_dir={cfg.output_dir} holds checkpoints of another run "
                          f"({', '.join(later)}) that this one would mix with: choose another output_dir, or "
                          f"delete them")
    return path


def finished(cfg: Config, resume_from: Path | None) -> bool:
    """Resumed at its last step, and ``final/`` is the export of that step (``FINISHED``): nothing is
    left to do. A run that wrote no checkpoint (``checkpoint_every=0``) and finished is done too at the
    same ``steps``; at others it is refused, as it has nothing to continue from."""
    marker = Path(cfg.output_dir) / FINISHED
    done = json.loads(marker.read_text()).get("step") if marker.is_file() else None
    if resume_from is not None:
        return checkpoint.saved_step(resume_from) == cfg.steps and done == cfg.steps
    if cfg.resume != "auto" or done is None:  # starting afresh
        return False
    if done == cfg.steps:
        return True
    raise ConfigError(f"output_dir={cfg.output_dir}: holds a run that finished at step {done} and wrote no "
                      f"checkpoint to continue from (checkpoint_every=0): resume=none trains afresh over it, "
                      f"or choose another output_dir")


def load_data(cfg: Config, dist: distributed.Dist):
    """The training examples, the teacher bank (None: RL only), the evaluation examples and this rank's
    batches, checked against the student's tokenizer; prints which ablation runs."""
    if problem := model_folder_problem(cfg.student):
        raise ConfigError(f"student={cfg.student}: cannot open the model folder: {problem}")
    try:
        tokens = Processor.from_pretrained(cfg.student)
    except UnsupportedModel as e:  # "DIR: model type ..."
        raise ConfigError(f"student={e}") from None
    except (OSError, ValueError) as e:  # transformers' words for a missing folder or config.json
        raise ConfigError(f"student={cfg.student}: cannot open the model folder: {e}") from None
    examples = load_examples(cfg.train_data, control_tokens=tokens.control_tokens)
    if tokens.kind is ModelKind.TEXT:
        refuse_images(examples, f"the student ({cfg.student})")
    try:
        batches = Batches(examples, cfg.batch.questions_per_step, seed=cfg.seed, rank=dist.rank,
                          world_size=dist.world_size)
    except ValueError as e:
        raise ConfigError(f"batch.questions_per_step={cfg.batch.questions_per_step}: {e}") from None
    bank = None
    if not cfg.rl_only:
        bank = load_teachers(cfg.teachers, examples, max_tokens=cfg.max_new_tokens,
                             count_tokens=tokens.response_lengths, control_tokens=tokens.control_tokens)
        if missing := bank.missing(examples):
            raise DataError(f"{missing[0].where}: example {missing[0].id!r} has no response in any teacher "
                            f"collection ({len(missing)} such examples); RIL needs G teacher outputs per question")
    eval_examples = load_examples(cfg.eval_data, control_tokens=tokens.control_tokens) if cfg.eval_data else []
    if cfg.eval_max_examples:
        eval_examples = eval_examples[:cfg.eval_max_examples]
    if tokens.kind is ModelKind.TEXT:
        refuse_images(eval_examples, f"the student ({cfg.student})")
    if dist.is_main:
        if bank is None:
            print("mode: RL only (Dr.GRPO on the judge's reward; no teachers given)", flush=True)
        else:
            print(f"mode: RIL with {len(bank.teachers)} teacher(s): "
                  + ", ".join(f"{name} ({n} responses)" for name, n in bank.counts().items()), flush=True)
            if bank.truncated:
                print(f"left out {len(bank.truncated)} teacher responses marked truncated (the first: "
                      f"{bank.truncated[0]})", flush=True)
    return examples, bank, eval_examples, batches


# ----------------------------------------------------------------------------------------------------
# Checkpoints (ril_fast.checkpoint): models, optimisers, schedulers, data position, RNGs, counters
# ----------------------------------------------------------------------------------------------------
def _states(run: Run) -> dict:
    states = {"student": checkpoint.TrainState(run.student, run.optimizer)}
    if run.disc is not None:
        states["disc"] = checkpoint.TrainState(run.disc, run.disc_optimizer)
    return states


_RUN_COUNTERS = ("skipped_steps", "bad_in_a_row")  # the same on every rank; "questions" is per rank


def save_checkpoint(run: Run, step: int) -> Path:
    """Write ``output_dir/step-{step}/`` (every rank calls this)."""
    trainer = {"batches": run.batches.state_dict(), "scheduler": run.scheduler.state_dict(),
               "counters": {k: run.counters[k] for k in _RUN_COUNTERS}}
    return checkpoint.save(run.cfg.output_dir, step, run.dist, states=_states(run), trainer=trainer,
                           counters=run.counters, rng=run.rng, config=run.cfg,
                           hf_files=lambda folder: save_hf_files(run.student, run.processor, folder),
                           keep=run.cfg.keep_checkpoints)


def load_checkpoint(run: Run, path: Path) -> None:
    """Continue ``run`` from the checkpoint at ``path``: the next step is the one after it. Settings
    changed since it was written apply from here on (the optimisers' take this run's values); a
    checkpoint that cannot continue this run (past ``steps``, another mode or batch size) is refused."""
    cfg, changed = run.cfg, run.cfg.differences(path / "config.yaml")
    saved_teachers = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("teachers")
    if bool(saved_teachers) != bool(cfg.teachers):
        raise ConfigError(f"resume={path}: the checkpoint is of " + ("an RIL run (teachers=...)" if saved_teachers
                          else "an RL-only run (no teachers)") + ", this run is not: use another output_dir")
    if run.disc_optimizer is not None and checkpoint.saved_param_groups(path, "disc") == 1:
        # Written before the discriminator's AdamW took distributed.optimizer_groups: it goes on as saved.
        run.disc_optimizer = torch.optim.AdamW(run.disc.parameters(), lr=cfg.disc.lr,
                                               weight_decay=cfg.disc.weight_decay, foreach=False)
    saved = checkpoint.load(path, run.dist, states=_states(run), rng=run.rng)
    if saved.step > cfg.steps:
        raise ConfigError(f"resume={path}: the checkpoint is at step {saved.step}, past steps={cfg.steps}: raise "
                          f"steps, or resume from an earlier checkpoint")
    try:
        run.batches.load_state_dict(saved.trainer["batches"])
    except ValueError as e:
        raise ConfigError(f"resume={path}: {e}: use the checkpoint's setting or another output_dir") from None
    run.scheduler.load_state_dict(saved.trainer["scheduler"])
    _apply_optimizer_settings(run)
    run.counters.update(saved.trainer.get("counters", {}))  # kept when resharding drops the per-rank files
    run.counters.update(saved.counters)
    run.start_step = saved.step
    if run.dist.is_main:
        print(f"resuming from {path} (step {saved.step} of {cfg.steps})"
              + (f"; settings changed since: {', '.join(changed)}" if changed else ""), flush=True)


def _apply_optimizer_settings(run: Run) -> None:
    """This run's optimiser settings over the restored ones (a checkpoint brings its own param groups):
    the student's peak rate, betas and weight decay (the rate at the schedule's current point), the
    discriminator's rate and weight decay."""
    cfg, scheduler = run.cfg, run.scheduler
    scheduler.base_lrs = [cfg.optim.lr] * len(scheduler.base_lrs)
    for group, factor in zip(run.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group.update(initial_lr=cfg.optim.lr, lr=cfg.optim.lr * factor(scheduler.last_epoch),
                     betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay)
    scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    for group in run.disc_optimizer.param_groups if run.disc_optimizer is not None else []:
        group.update(lr=cfg.disc.lr, weight_decay=cfg.disc.weight_decay)


def checkpoint_if_due(run: Run, step: int) -> None:
    """Save after ``step`` when it is a multiple of ``checkpoint_every`` or any rank got SIGTERM; in the
    latter case stop the run once the checkpoint is written."""
    stop = _agree(run, bool(run.stop_requested))
    if stop or (run.cfg.checkpoint_every and step % run.cfg.checkpoint_every == 0):
        path = save_checkpoint(run, step)
    if stop:
        run.log.close()
        cause = "Ctrl-C" if signal.SIGINT in run.stop_requested else "SIGTERM"
        raise SystemExit(f"stopped by {cause} after step {step}: checkpoint {path} "
                         f"written; run the same command to resume" if run.dist.is_main else 1)


def _agree(run: Run, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop after the same step)."""
    return bool(distributed.all_reduce_max(torch.tensor(int(flag), device=run.dist.device)))


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
    try:
        rollouts = sample_responses(run.student, run.processor, prompts, group_size=cfg.group_size,
                                    max_new_tokens=cfg.max_new_tokens, temperature=cfg.rollout.temperature,
                                    top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, seed=seed,
                                    max_batch=cfg.rollout.batch_size)
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
            raise DataError(f"{q.where}: {e}") from None


def _micro(run: Run, samples: list[dict]):
    """The step's packed micro-batches, the same count on every rank, with images in the same ones; on
    this rank's device once for the step's passes (small: token ids, positions and pixels)."""
    encoded = encode_all(run.processor, samples)
    _check_lengths(run, samples, encoded)
    micro = micro_batches(encoded, run.cfg.batch.max_tokens, padded=run.cfg.batch.padded,
                          **rank_agreement(run.processor, run.dist.device))
    for mb in micro:
        mb.batch = mb.batch.to(run.dist.device)
    return micro


def _check_lengths(run: Run, samples: list[dict], encoded) -> None:
    """A question whose prompt leaves no room for a full-length response is an error naming its line."""
    cfg = run.cfg
    context = getattr(distributed.unwrap(run.student).config.get_text_config(), "max_position_embeddings", None)
    budget = min(cfg.batch.max_tokens, context or cfg.batch.max_tokens)
    for sample, e in zip(samples, encoded):
        if e.prompt_len + cfg.max_new_tokens > budget:
            setting = "batch.max_tokens" if budget == cfg.batch.max_tokens else "the model's context"
            raise DataError(f"{sample['where']}: the prompt takes {e.prompt_len} tokens (images included); with "
                            f"max_new_tokens={cfg.max_new_tokens} that exceeds {setting} ({budget} tokens): "
                            f"raise batch.max_tokens, use fewer or smaller images, or drop the example")


def _global_count(run: Run, n: int) -> torch.Tensor:
    """The number of outputs of this step over all ranks, counted once, as a 0-dim fp32 tensor."""
    return distributed.all_reduce_sum(torch.tensor(float(n), device=run.dist.device))


def _disc_update(run: Run, micro, sources, n_global) -> dict:
    labels = torch.tensor([float(s == STUDENT) for s in sources])
    stats = disc_pass(run.disc, micro, labels, n_global)
    stepped = optimizer_step(run.disc, run.disc_optimizer, run.cfg.disc.grad_clip)
    stats.update({f"disc_{k}": v for k, v in stepped.items()})
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


def train_step(run: Run, step: int, timer: PhaseTimer | None = None) -> dict:
    """One batch B: rollouts, teacher outputs, μ discriminator updates, rewards over 2G, advantages,
    old/ref log-probs, μ policy updates. Returns the step's metrics. ``timer``: times the phases (a
    fresh ``PhaseTimer`` by default; bench/throughput.py passes one that also synchronises the GPU)."""
    cfg, timer, t0 = run.cfg, timer or PhaseTimer(), time.perf_counter()
    questions = next(run.batches)

    # π_old ← π_θ: sample G student outputs per q; take G teacher outputs per q from the collection.
    with timer("rollout"), explain_oom(cfg, "rollout"):
        samples, sources, student_texts, teacher_outputs = collect_outputs(run, questions, _seed(run, step))
        micro = _micro(run, samples)
        n_global = _global_count(run, len(samples))

    # Repeat μ times: update D_φ with Eq. 1 on this batch's student and teacher outputs.
    disc_stats = {}
    if run.disc is not None:
        with timer("disc_update"), explain_oom(cfg, "disc_update", micro):
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
    loss_cfg = LossConfig(cfg.loss.eps_low, cfg.loss.eps_high, cfg.beta, cfg.rollout.temperature, cfg.loss.kernels)
    normalizer = n_global * cfg.max_new_tokens
    lr = run.scheduler.get_last_lr()[0]  # the rate of this step's (first) update
    for _ in range(cfg.mu):
        with timer("policy_update"), explain_oom(cfg, "policy_update", micro):
            policy = policy_pass(run.student, micro, advantages, normalizer, loss_cfg, old=old, ref=ref)
        with timer("optimizer"):
            policy.update(optimizer_step(run.student, run.optimizer, cfg.optim.grad_clip))
        count_skipped(run, bool(policy["skipped"]), step)
        run.scheduler.step()

    seconds = time.perf_counter() - t0
    tokens = sum(mb.batch.lengths[k] for mb in micro for k in mb.real)
    cache = (run.teacher_judge.hits, run.teacher_judge.misses)
    per_rank = distributed.all_gather_objects((groups, [q.answer_type for q in questions], tokens, cache))
    all_groups, all_types, all_tokens, all_cache = zip(*per_rank)
    rewards = reward_stats([g for gs in all_groups for g in gs], [t for ts in all_types for t in ts])
    return {"step": step, **rewards, **disc_stats, **policy, "lr": lr, "skipped_steps": run.counters["skipped_steps"],
            **_judge_cache_stats(run, all_cache), "tokens_per_s": sum(all_tokens) / seconds, "step_time_s": seconds,
            **timer.as_metrics()}


def _judge_cache_stats(run: Run, hits_misses: list[tuple[int, int]]) -> dict:
    """The teacher-verdict cache's hit rate over all ranks since these processes started (RIL only): a
    cost figure, like the timings; a resumed run starts with the in-memory cache empty unless
    ``judge_cache`` keeps it. ``hits_misses``: each rank's counts."""
    if run.bank is None:
        return {}
    hits, misses = sum(h for h, _ in hits_misses), sum(m for _, m in hits_misses)
    return {"teacher_judge_cache_hit_rate": hits / max(hits + misses, 1)}


# ----------------------------------------------------------------------------------------------------
# Faults: non-finite updates, out of memory
# ----------------------------------------------------------------------------------------------------
def count_skipped(run: Run, skipped: bool, step: int) -> None:
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
    phase over packed micro-batches, the size of the step's largest one."""
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
        raise RuntimeError(f"out of memory in the {phase} phase; {hint}") from e


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
    try:
        main()
    except (ConfigError, DataError) as e:  # the message names the setting, or the file and line
        raise SystemExit(f"error: {e}" if int(os.environ.get("RANK", "0")) == 0 else 1) from None
