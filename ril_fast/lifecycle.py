"""A training run's life around its steps: where it resumes, its checkpoints, how it stops and finishes.

``ril_fast.train`` calls these; the checkpoint format itself is ``ril_fast.checkpoint``'s.

* Starting: :func:`where_to_start` checks ``output_dir`` (a folder no other run writes: :func:`lock_output_dir`)
  and picks where the run starts; :func:`resume_point` picks the checkpoint a run continues from
  (``resume=auto|none|DIR``), :func:`finished` tells a run that has nothing left to do (:class:`NothingToDo`; one
  that finished with other settings is refused: :func:`check_finished_settings`), :func:`load_checkpoint` restores
  a run from a checkpoint (models, optimisers, scheduler, data position, RNGs, counters).
* Checkpoints: :func:`save_checkpoint`, every ``checkpoint_every`` steps (:func:`checkpoint_if_due`),
  after the last step (:func:`checkpoint_last`) and on SIGTERM or Ctrl-C.
* Stopping: inside :func:`stop_on_signals` SIGTERM and Ctrl-C ask for a stop after the step in flight
  and its checkpoint; :func:`sigterm_when_torchrun_dies` turns torchrun's death into a SIGTERM.
* Finishing: :func:`finish` (the last evaluation, the export to ``final/``, ``FINISHED``); :func:`exit_status` is
  what a rank exits with for a refused setting, file or model.

``run``: the trainer's ``ril_fast.train.Run``.
"""

import contextlib
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path

import torch
import yaml

from ril_fast import checkpoint, distributed
from ril_fast.config import Config, ConfigError
from ril_fast.data import StepDataError
from ril_fast.export import export_hf, save_hf_files
from ril_fast.files import InUse, lock_folder, model_folder_problem, unlock_folder, write_text_atomic
from ril_fast.judges_http import HTTPError
from ril_fast.metrics import records_until
from ril_fast.processor import UnsupportedModel

FINISHED = "finished.json"  # written last, after final/ is complete: the step final/ was exported at


class NothingToDo(Exception):
    """The run in ``output_dir`` finished (its last step exported) with this run's settings (one that finished with
    other settings is a ``ConfigError``: :func:`check_finished_settings`): raised by ``ril_fast.train.setup`` before
    any model loads."""

    def __init__(self, cfg: Config):
        super().__init__(f"nothing to do: the run in {cfg.output_dir} finished (steps={cfg.steps}); "
                         f"raise steps to go on")
        self.output_dir = Path(cfg.output_dir)


# ----------------------------------------------------------------------------------------------------
# Resuming
# ----------------------------------------------------------------------------------------------------
def resume_point(cfg: Config) -> Path | None:
    """The checkpoint the run continues from (``checkpoint.resolve``). Starting afresh or from an earlier
    checkpoint is refused while ``output_dir`` holds later ones of another run: the next ``resume=auto``
    and the pruning of old checkpoints would take theirs for this run's. So is continuing another folder's
    checkpoint in an ``output_dir`` that holds checkpoints, or another run's metrics up to its step (a finished
    ``checkpoint_every=0`` run's: this run's record would begin with them)."""
    try:
        path = checkpoint.resolve(cfg.resume, cfg.output_dir)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if cfg.resume == "auto":
        return path
    out = Path(cfg.output_dir)
    if path is not None and path.resolve().parent != out.resolve() and (held := checkpoint.checkpoints(out)):
        raise ConfigError(f"resume={cfg.resume}: a checkpoint of another folder, and output_dir={out} holds "
                          f"checkpoints ({', '.join(p.name for p in held)}): resume=auto continues those (a run "
                          f"started from {cfg.resume} and stopped, for one); to start from {cfg.resume}, choose an "
                          f"output_dir without checkpoints")
    step = -1 if path is None else checkpoint.saved_step(path)
    metrics = out / "metrics.jsonl"
    if path is not None and path.resolve().parent != out.resolve() and metrics.is_file() \
            and records_until(metrics, step):
        raise ConfigError(f"resume={cfg.resume}: a checkpoint of another folder, and output_dir={out} holds another "
                          f"run's metrics up to its step {step} ({metrics}), which this run's record would begin "
                          f"with: choose another output_dir")
    later = [p.name for p in checkpoint.checkpoints(cfg.output_dir) if checkpoint.saved_step(p) > step]
    if later:
        raise ConfigError(f"resume={cfg.resume}: output_dir={cfg.output_dir} holds checkpoints of another run "
                          f"({', '.join(later)}) that this one would mix with: choose another output_dir, or "
                          f"delete them")
    return path


def where_to_start(cfg: Config) -> tuple[Path | None, bool]:
    """The checkpoint the run continues from (:func:`resume_point`) and whether the run has anything left to do
    (:func:`finished`; a run that finished with other settings is refused: :func:`check_finished_settings`), all
    before any model loads, as is a checkpoint that cannot continue this run (:func:`check_student`,
    :func:`check_mode`). ``output_dir`` must be a folder (or not exist yet) that no other run is writing
    (:func:`lock_output_dir`): that is said first, not what the other run's checkpoints would make of this start."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir={out}: exists and is not a folder")
    if out.is_dir():
        lock_output_dir(out)
        unlock_folder(out)  # taken for good once the set-up's checks pass
    resume_from = resume_point(cfg)
    done = finished(cfg, resume_from)
    if done:
        check_finished_settings(cfg)
    if resume_from is not None:
        check_student(cfg, resume_from)
        check_mode(cfg, resume_from)
    return resume_from, done


def lock_output_dir(out: Path) -> None:
    """Take ``output_dir``'s lock for this process (rank 0's: ``on_rank0`` gives its refusal to every rank)."""
    try:
        lock_folder(out)
    except InUse as e:
        raise ConfigError(f"output_dir={e}: wait for that run to end, or stop it") from None
    except OSError as e:
        raise ConfigError(f"output_dir={out}: cannot write there: {e}") from None


def check_student(cfg: Config, path: Path) -> None:
    """Refuse, before any model loads, a checkpoint whose student has other parameters (names or shapes) than
    ``student=`` builds: another architecture or size, which loading it would fail on deep in DCP."""
    from transformers import AutoConfig

    from ril_fast.models import meta_model

    if not (path / "hf" / "config.json").is_file() or model_folder_problem(cfg.student):
        return  # no saved config to compare (an old checkpoint), or no student: preflight names the setting

    def shapes(folder) -> tuple[str, dict]:
        config = AutoConfig.from_pretrained(folder)
        return config.model_type, {n: tuple(p.shape) for n, p in meta_model(config).named_parameters()}

    (saved_type, saved), (new_type, new) = shapes(path / "hf"), shapes(cfg.student)
    if saved != new:
        def size(params: dict) -> str:
            return f"{sum(map(math.prod, params.values())):,} parameters"

        raise ConfigError(f"resume={path}: the checkpoint's student ({saved_type}, {size(saved)}) is not "
                          f"student={cfg.student} ({new_type}, {size(new)}): a run goes on with the student it started "
                          f"with; give that one, or another output_dir to start afresh")


def check_mode(cfg: Config, path: Path) -> None:
    """Refuse a checkpoint of the other mode (RIL with teachers, RL only without): its models and optimisers are
    not this run's (an RIL checkpoint holds a discriminator). Reads only its config.yaml."""
    saved_teachers = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("teachers")
    if bool(saved_teachers) != bool(cfg.teachers):
        raise ConfigError(f"resume={path}: the checkpoint is of " + ("an RIL run (teachers=...)" if saved_teachers
                          else "an RL-only run (no teachers)") + ", this run is not: use another output_dir")


# Settings of how a run runs, not of what it makes (its student, record and final/): a finished run given other
# values of these alone has nothing to do. (Resuming takes every changed setting from its step on: load_checkpoint.)
_HOW_IT_RUNS = frozenset({
    "steps", "output_dir", "resume", "progress", "checkpoint_every", "keep_checkpoints", "max_bad_steps",
    "judge_url", "judge_cache", "judge_batch_size", "judge_concurrency", "judge_timeout_s", "judge_retries",
    "rollout.batch_size", "loss.kernels", "batch.max_tokens", "batch.padded", "batch.activation_checkpointing",
    "batch.keep_gathered", "batch.shard_ranks", "batch.cpu_offload", "batch.offload_pinned"})


def check_finished_settings(cfg: Config) -> None:
    """Refuse, in one line, a run whose ``output_dir`` finished with other settings than its own (``config.yaml``
    there: the last run started there, the one ``FINISHED`` speaks of): "nothing to do" would say that run is this
    one. Settings of how a run runs (``_HOW_IT_RUNS``: steps, output_dir, resume, progress, checkpoints, the judge's
    transport, memory layout and kernels) may differ; a setting the saved config lacks (written before it existed)
    differs only where this run does not take its default."""
    saved = Path(cfg.output_dir) / "config.yaml"
    if not saved.is_file():
        return  # nothing to compare with
    other = [k for k in cfg.differences(saved, unsaved_as_default=True) if k not in _HOW_IT_RUNS]
    if other:
        raise ConfigError(f"the run in {cfg.output_dir} finished with other settings ({', '.join(other)}): choose "
                          f"another output_dir")


def finished(cfg: Config, resume_from: Path | None) -> bool:
    """The run in ``output_dir`` finished at ``steps`` (``FINISHED``, which a start that trains deletes:
    it speaks of the last run started there): nothing is left to do with ``resume=auto``, whatever its newest
    checkpoint (``checkpoint_every=0`` saves none at the last step); with ``resume=DIR``, only from the last
    step's checkpoint. At other ``steps``, a finished run is refused where going on would train again a step it
    trained (no checkpoint, or the newest before its last step: a SIGTERM's with ``checkpoint_every=0``)."""
    marker = Path(cfg.output_dir) / FINISHED
    done = json.loads(marker.read_text()).get("step") if marker.is_file() else None
    if cfg.resume == "none" or done is None:  # starting afresh, or nothing finished
        return False
    if cfg.resume != "auto":
        return checkpoint.saved_step(resume_from) == cfg.steps and done == cfg.steps
    saved = None if resume_from is None else checkpoint.saved_step(resume_from)
    if done == cfg.steps:
        return True
    if saved is not None and (saved >= done or cfg.steps <= saved):  # trains no step the finished run did
        return False
    newest = "no checkpoint" if resume_from is None else f"its newest checkpoint at step {saved}"
    raise ConfigError(f"output_dir={cfg.output_dir}: holds a run that finished at step {done} with {newest} "
                      f"(checkpoint_every=0 saves none at the end), so it cannot go on to steps={cfg.steps}: "
                      f"resume=none trains afresh over it, or choose another output_dir")


# ----------------------------------------------------------------------------------------------------
# Checkpoints (ril_fast.checkpoint): models, optimisers, schedulers, data position, RNGs, counters
# ----------------------------------------------------------------------------------------------------
def _states(run) -> dict:
    states = {"student": checkpoint.TrainState(run.student, run.optimizer)}
    if run.disc is not None:
        states["disc"] = checkpoint.TrainState(run.disc, run.disc_optimizer)
    return states


_RUN_COUNTERS = ("skipped_steps", "bad_in_a_row", "pretrained")  # the same on every rank; "questions" is per rank


def save_checkpoint(run, step: int) -> Path:
    """Write ``output_dir/step-{step}/`` (every rank calls this)."""
    trainer = {"batches": run.batches.state_dict(), "scheduler": run.scheduler.state_dict(),
               "counters": {k: run.counters[k] for k in _RUN_COUNTERS}}
    return checkpoint.save(run.cfg.output_dir, step, run.dist, states=_states(run), trainer=trainer,
                           counters=run.counters, rng=run.rng, config=run.cfg,
                           hf_files=lambda folder: save_hf_files(run.student, run.processor, folder),
                           keep=run.cfg.keep_checkpoints)


def load_checkpoint(run, path: Path) -> None:
    """Continue ``run`` from the checkpoint at ``path``: the next step is the one after it. Settings
    changed since it was written apply from here on (the optimisers' take this run's values, the learning
    rate the schedule's point for this run's ``steps × mu``, at the saved step); a
    checkpoint that cannot continue this run (past ``steps``, another mode or batch size) is refused."""
    cfg, changed = run.cfg, run.cfg.differences(path / "config.yaml")
    check_mode(cfg, path)  # (where_to_start checked it before any model loaded)
    if run.disc_optimizer is not None and checkpoint.saved_param_groups(path, "disc") == 1:
        # Written before the discriminator's AdamW took distributed.optimizer_groups: it goes on as saved.
        run.disc_optimizer = torch.optim.AdamW(run.disc.parameters(), lr=cfg.disc.lr,
                                               weight_decay=cfg.disc.weight_decay, foreach=False,
                                               fused=run.optimizer.defaults.get("fused"))
    saved = checkpoint.load(path, run.dist, states=_states(run), rng=run.rng)
    if saved.step == 0:  # saved during the discriminator's pre-training: the student's AdamW has not stepped, but DCP
        run.optimizer.state.clear()  # gives an empty optimizer the state of a zero-gradient step (its bias correction)
    if saved.step > cfg.steps:
        raise ConfigError(f"resume={path}: the checkpoint is at step {saved.step}, past steps={cfg.steps}: raise "
                          f"steps, or resume from an earlier checkpoint")
    try:
        run.batches.load_state_dict(saved.trainer["batches"])
    except ValueError as e:
        raise ConfigError(f"resume={path}: {e}: use the checkpoint's setting or another output_dir") from None
    run.scheduler.load_state_dict(saved.trainer["scheduler"])
    run.scheduler.last_epoch = saved.step * cfg.mu  # μ updates a step: a changed mu keeps the schedule's point
    _apply_optimizer_settings(run)
    run.counters.update(saved.trainer.get("counters", {}))  # kept when resharding drops the per-rank files
    run.counters.update(saved.counters)
    run.start_step = saved.step
    if run.dist.is_main:
        print(f"resuming from {path} (step {saved.step} of {cfg.steps})"
              + (f"; settings changed since: {', '.join(changed)}" if changed else ""), flush=True)


def _apply_optimizer_settings(run) -> None:
    """This run's optimiser settings over the restored ones (a checkpoint brings its own param groups):
    the student's peak rate, betas and weight decay (the rate at the schedule's current point), the
    discriminator's rate and weight decay, and both optimisers' kernels (fused or not: ``batch.cpu_offload``)."""
    cfg, scheduler = run.cfg, run.scheduler
    scheduler.base_lrs = [cfg.optim.lr] * len(scheduler.base_lrs)
    for group, factor in zip(run.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group.update(initial_lr=cfg.optim.lr, lr=cfg.optim.lr * factor(scheduler.last_epoch),
                     betas=(cfg.optim.beta1, cfg.optim.beta2), weight_decay=cfg.optim.weight_decay)
    scheduler._last_lr = [group["lr"] for group in run.optimizer.param_groups]
    for group in run.disc_optimizer.param_groups if run.disc_optimizer is not None else []:
        group.update(lr=cfg.disc.lr, weight_decay=cfg.disc.weight_decay)
    for optimizer in filter(None, (run.optimizer, run.disc_optimizer)):
        _take_own_kernels(optimizer)


def _take_own_kernels(optimizer) -> None:
    """The kernel choice ``optimizer`` was built with (``fused``, ``foreach``) over the one its param groups
    brought back from a checkpoint, with the step counters where that kernel reads them (fp32, on each
    parameter's device for a fused one, else on the CPU, as torch's optimisers lay them out)."""
    kernels = {k: optimizer.defaults[k] for k in ("fused", "foreach") if k in optimizer.defaults}
    for group in optimizer.param_groups:
        group.update(kernels)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")):
                where = p.device if group.get("fused") or group.get("capturable") else torch.device("cpu")
                state["step"] = state["step"].to(device=where, dtype=torch.float32)


def checkpoint_if_due(run, step: int) -> None:
    """Save after ``step`` when it is a multiple of ``checkpoint_every`` or any rank got SIGTERM; in the
    latter case stop the run once the checkpoint is written."""
    stop = _agree(run, bool(run.stop_requested))
    if stop or (run.cfg.checkpoint_every and step % run.cfg.checkpoint_every == 0):
        save_checkpoint(run, step)
    if stop:
        _stop(run, step)


def checkpoint_last(run) -> None:
    """After the loop: save the last step (steps=0: the discriminator's pre-training) unless the loop did
    (``checkpoint_every`` divides ``steps``, or a resumed run had no step left) or ``checkpoint_every=0``, so that
    the same command run again has nothing to redo and more steps go on from it; a SIGTERM or Ctrl-C during that
    save stops the run after it."""
    cfg = run.cfg
    if cfg.checkpoint_every and (run.start_step < cfg.steps and cfg.steps % cfg.checkpoint_every or cfg.steps == 0):
        save_checkpoint(run, cfg.steps)
        stop_if_asked(run, cfg.steps)


def checkpoint_pretraining_if_asked(run) -> None:
    """After a step of the discriminator's pre-training: when any rank got SIGTERM or Ctrl-C, save its progress
    (``run.counters["pretrained"]`` steps) as the checkpoint of step 0, from which the run goes on, and stop."""
    checkpoint_if_asked(run, 0, saved=False, after=f"{run.counters['pretrained']} of the discriminator's "
                                                   f"{run.cfg.disc.pretrain_steps} pre-training steps")


def checkpoint_if_asked(run, step: int, *, saved: bool, after: str) -> None:
    """Where the run has trained up to ``step`` and done what it says ``after`` (step 0's or the last step's
    evaluation): when any rank got SIGTERM or Ctrl-C meanwhile, save ``step``'s checkpoint (unless ``saved``, where
    ``output_dir``'s newest is it) and stop, rather than start a step or the export that a scheduler's grace period
    may not wait for (step 0's: the discriminator's pre-training, minutes of a real student's; the last step's:
    ``checkpoint_every=0`` keeps no other)."""
    if _agree(run, bool(run.stop_requested)):
        newest = distributed.on_rank0(lambda: checkpoint.latest(run.cfg.output_dir)) if saved else None
        if newest is None or checkpoint.saved_step(newest) != step:  # (a resume from another folder's last
            save_checkpoint(run, step)  # step saved none here)
        _stop(run, step, after=after)


def stop_if_asked(run, step: int) -> None:
    """After the checkpoint of ``step``: stop when any rank got SIGTERM or Ctrl-C meanwhile."""
    if _agree(run, bool(run.stop_requested)):
        _stop(run, step)


def _stop(run, step: int, after: str = "") -> None:
    run.log.close()
    cause = "Ctrl-C" if signal.SIGINT in run.stop_requested else "SIGTERM"
    again = "the same command" if run.cfg.resume == "auto" else "it again with resume=auto"
    raise SystemExit(f"stopped by {cause} after {after or f'step {step}'}: checkpoint "
                     f"{Path(run.cfg.output_dir) / f'step-{step}'} written; run {again} to resume"
                     if run.dist.is_main else 1)


def _agree(run, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (so all ranks stop after the same step)."""
    return bool(distributed.all_reduce_max(torch.tensor(int(flag), device=run.dist.device)))


# ----------------------------------------------------------------------------------------------------
# Stopping: SIGTERM, Ctrl-C, torchrun's death
# ----------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def stop_on_signals(run):
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


def request_stop(run, signum: int) -> None:
    """SIGTERM or Ctrl-C: finish the step, checkpoint, stop (past the last evaluation: finish the export). Repeats
    change nothing: torchrun passes a Ctrl-C on to ranks that got it from the terminal already (and kills them
    after its grace period)."""
    if run.dist.is_main and not run.stop_requested:
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        if run.exporting:
            print(f"\n{name}: the run ends once final/ is written (its last work); nothing else is saved", flush=True)
        else:
            print(f"\n{name}: stopping after this step (or evaluation) and its checkpoint" + (
                "; torchrun kills the ranks after its --shutdown-timeout (30 s unless set): raise it where a step "
                "takes longer" if "TORCHELASTIC_RUN_ID" in os.environ else ""), flush=True)
    run.stop_requested.append(signum)


# ----------------------------------------------------------------------------------------------------
# Finishing: the last evaluation, the export, FINISHED; what a refused run exits with
# ----------------------------------------------------------------------------------------------------
def finish(run, evaluate_and_log) -> None:
    """The run's end: the last step's evaluation (``evaluate_and_log(run, step=steps)``, the trainer's; with
    ``steps=0``, step 0's was the last), after which a SIGTERM or Ctrl-C meanwhile saves the last step (unless
    saved) and stops; then the export to ``output_dir/final`` (a signal from here on waits for it), the log
    closed and, on the main rank, ``FINISHED`` written and where the record and the student are printed."""
    cfg, out = run.cfg, Path(run.cfg.output_dir)
    if cfg.steps:
        evaluate_and_log(run, step=cfg.steps)
        checkpoint_if_asked(run, cfg.steps, saved=cfg.checkpoint_every > 0, after=f"step {cfg.steps}'s evaluation")
    run.exporting = True  # a SIGTERM or Ctrl-C from here on waits for the export, the run's last work
    export_hf(run.student, run.processor, out / "final", is_main=run.dist.is_main,
              dtype=cfg.export_dtype.on(run.dist.device))
    run.log.close()
    if run.dist.is_main:
        write_text_atomic(out / FINISHED, json.dumps({"step": cfg.steps}))
        print(f"metrics: {out / 'metrics.jsonl'}\nexported student: {out / 'final'}", flush=True)


def exit_status(error: Exception, rank: int) -> str | int:
    """What ``rank`` exits with for a ``ConfigError``, ``DataError``, ``UnsupportedModel`` or the http judge's
    ``HTTPError``: its message (``SystemExit`` prints it, status 1), or 1 alone. Set-up's errors are every rank's (each
    rank's own checks are agreed on: ``preflight.check_surroundings``), said by rank 0; a step's data error is one
    rank's own questions' (``StepDataError``), said by that rank, as is a model ril_fast cannot train found out in a
    forward (``UnsupportedModel``: set-up refuses what the student's config shows, ``preflight.meta_student``; a
    sliding window that one rank's own sample outgrows is that rank's alone), and a judge server failing for good
    on the requests of that rank's samples (``HTTPError``, after ``judge_retries``)."""
    if isinstance(error, HTTPError):
        error = (f"the judge failed: {error} (the same command run again goes on from output_dir's newest checkpoint, "
                 f"if it has one)")
    elif not (rank == 0 or isinstance(error, (StepDataError, UnsupportedModel))):
        return 1
    return f"error{f' (rank {rank})' if rank else ''}: {error}"
