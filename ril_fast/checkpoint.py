"""Checkpoints that are never half-written, and exact resume.

A checkpoint is one folder ``output_dir/step-N/``:

    dcp/             torch.distributed.checkpoint of every (model, optimizer) pair, sharded as trained
                     (student + AdamW, discriminator + AdamW): each rank writes its own shards
    trainer.json     step, world size, data-loader position, LR scheduler, the run's counters
    rank-R.json      rank R's RNG states (python, numpy, torch, CUDA, the trainer's own) and counters
    config.yaml      the run's resolved config
    hf/              the student's config and processor files, so ``ril_fast.export`` needs nothing else

It is written under ``output_dir/.step-N.tmp/`` and renamed to ``step-N`` by rank 0 once every rank
has finished writing: a ``step-N`` folder is complete by construction, and a run killed while writing
leaves only a ``.tmp`` folder, which :func:`latest` ignores and the next save removes (but for a
``step-N`` that saving step N again moved aside: put back by :func:`resolve` and by a save's first act,
if the new one never took its place). The newest ``keep`` checkpoints are kept. Every rank must see the
same ``output_dir`` (a shared filesystem on several nodes), as torch.distributed.checkpoint requires.

No arbitrary unpickling: tensors go through DCP, the few non-tensor values of the optimizer states
(learning rates, betas) are read back with ``torch.load(weights_only=True)`` (:class:`SafeLoadPlanner`),
and everything else is JSON. DCP's own ``.metadata`` index is a pickle in every DCP checkpoint, so
load checkpoints that you or your jobs wrote.
"""

import json
import os
import random
import re
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint._traverse import set_element

from ril_fast.distributed import Dist, barrier
from ril_fast.files import write_text_atomic

_STEP_DIR = re.compile(r"^step-(\d+)$")
_UNFINISHED_DIR = re.compile(r"^\.step-\d+(\.old|\.replaced)?\.tmp$")  # being written, deleted or replaced
TRAINER_FILE = "trainer.json"
# What dcp.save / dcp.load warn on every call with no_dist=True (torch/distributed/checkpoint).
_SINGLE_PROCESS_WARNING = (r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to "
                           r"(save|load) in a single process")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor values are unpickled with
    ``torch.load(weights_only=True)`` (plain containers and numbers only) instead of full pickle."""

    def load_bytes(self, read_item: ReadItem, value) -> None:
        """Restore one non-tensor value."""
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


class TrainState(Stateful):
    """A model and its optimizer as one DCP entry (``{"model": ..., "optim": ...}``), FSDP-sharded or not."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        """Model and optimizer states in DCP's canonical (parameter-name keyed) form."""
        model, optim = get_state_dict(self.model, [] if self.optimizer is None else self.optimizer)
        return {"model": model, "optim": optim} if self.optimizer is not None else {"model": model}

    def load_state_dict(self, state: dict) -> None:
        """Load what :meth:`state_dict` gave, into this rank's shards."""
        set_state_dict(self.model, [] if self.optimizer is None else self.optimizer,
                       model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))


# ----------------------------------------------------------------------------------------------------
# RNG states as JSON
# ----------------------------------------------------------------------------------------------------
def _tuples(value):
    """JSON lists back into the nested tuples ``random.setstate`` wants."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def rng_state(own: random.Random) -> dict:
    """This process's RNG states: python's and numpy's global ones, torch's (CPU and every CUDA device),
    and the trainer's own ``random.Random``."""
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "own": own.getstate(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict, own: random.Random) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_tuples(state["python"]))
    own.setstate(_tuples(state["own"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


@contextmanager
def single_process(intended: bool):
    """Around a DCP save or load with ``no_dist=intended``: when one process is the intent, DCP's warning
    that it assumes one process is silenced (only that one)."""
    with warnings.catch_warnings():
        if intended:
            warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING, category=UserWarning)
        yield


def _write_json(path: Path, data: dict) -> None:
    """Write and fsync, so the rename that commits a checkpoint never precedes its contents."""
    write_text_atomic(path, json.dumps(data))


# ----------------------------------------------------------------------------------------------------
# Finding, saving, loading
# ----------------------------------------------------------------------------------------------------
def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run folder, oldest first: its ``step-N`` folders that hold their
    ``trainer.json`` (a folder without one is no checkpoint: emptied by hand, or half deleted)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / TRAINER_FILE).is_file()]
    return [p for _, p in sorted(found)]


def saved_step(path: str | Path) -> int:
    """The step the checkpoint at ``path`` was written after."""
    return json.loads((Path(path) / TRAINER_FILE).read_text())["step"]


def saved_param_groups(path: str | Path, name: str) -> int:
    """How many param groups the optimizer of state ``name`` (a :class:`TrainState`) had in the checkpoint
    at ``path`` (0: none saved), read from the DCP metadata without loading anything."""
    keys = dcp.FileSystemReader(Path(path) / "dcp").read_metadata().state_dict_metadata
    prefix = f"{name}.optim.param_groups."
    return len({key[len(prefix):].split(".")[0] for key in keys if key.startswith(prefix)})


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = checkpoints(output_dir)
    return found[-1] if found else None


def resolve(resume: str, output_dir: str | Path) -> Path | None:
    """Where a run starts from: ``resume`` is ``auto`` (the newest checkpoint in ``output_dir``, if any),
    ``none`` (a fresh start) or the path of a checkpoint folder."""
    _restore_replaced(Path(output_dir))
    if resume == "none":
        return None
    if resume == "auto":
        return latest(output_dir)
    path = Path(resume)
    if _UNFINISHED_DIR.match(path.resolve().name):
        raise FileNotFoundError(f"resume={resume}: a checkpoint a run died writing (or was deleting), not a "
                                f"complete one; checkpoints are the step-N folders of a run's output_dir")
    if not (path / TRAINER_FILE).is_file():
        raise FileNotFoundError(f"resume={resume}: not a complete checkpoint folder (no {TRAINER_FILE}); "
                                f"checkpoints are the step-N folders of a run's output_dir")
    return path


def _restore_replaced(root: Path) -> None:
    """Put back a ``step-N`` that a same-step save moved aside, whole, to ``.step-N.replaced.tmp`` and was killed
    before moving the new one in (:func:`save`): else ``resume=auto`` would not see it, and the next save would
    delete it with the new one."""
    for aside in root.glob(".step-*.replaced.tmp") if root.is_dir() else []:
        final = root / aside.name[1:-len(".replaced.tmp")]
        if not final.exists():
            os.replace(aside, final)


@dataclass
class Saved:
    """What :func:`load` restores besides the models: the trainer's step and state, this rank's counters."""

    step: int
    trainer: dict
    counters: dict
    exact: bool  # False when this rank's RNG file was missing (resumed on a different number of ranks)


def save(output_dir: str | Path, step: int, dist: Dist, *, states: dict[str, Stateful], trainer: dict,
         counters: dict, rng: random.Random, config, hf_files, keep: int) -> Path:
    """Write checkpoint ``step`` of the run (every rank must call this) -> its ``step-N`` folder.

    ``states``: DCP entries (``TrainState``s), ``trainer``: JSON-able rank-independent state (same on
    every rank; rank 0 writes it), ``counters``: JSON-able per-rank state, ``rng``: the trainer's
    ``random.Random``, ``config``: the run config (its ``save``), ``hf_files(folder)``: writes the
    student's config and processor files. Keeps the newest ``keep`` checkpoints (0: all).
    """
    root = Path(output_dir)
    final, tmp = root / f"step-{step}", root / f".step-{step}.tmp"
    if dist.is_main:
        _restore_replaced(root)
        for stale in root.glob(".step-*.tmp"):
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    barrier()
    try:
        _write(tmp, step, dist, states=states, trainer=trainer, counters=counters, rng=rng, config=config,
               hf_files=hf_files)
    except Exception as e:  # a full disk, most often: leave no half-written checkpoint behind
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(root).free / 2**30
        raise RuntimeError(f"writing checkpoint {final} failed ({type(e).__name__}: {e}); {free:.1f} GiB free in "
                           f"{root}: free space there, or lower keep_checkpoints (the newest checkpoints are kept)"
                           ) from e
    if dist.is_main:
        replaced = root / f".step-{step}.replaced.tmp"  # (resolve puts it back if a kill comes before the next line)
        if final.exists():  # the same step saved again (a resumed run's SIGTERM): replace it whole, the
            os.replace(final, replaced)  # old one deleted only once the new one is in place
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in checkpoints(root)[:-keep] if keep else []:
            doomed = root / f".{old.name}.old.tmp"  # out of sight at once: a kill mid-deletion leaves no
            os.replace(old, doomed)  # step-N folder without its files (the next save clears .tmp folders)
            shutil.rmtree(doomed)
    barrier()
    return final


def _write(tmp: Path, step: int, dist: Dist, *, states, trainer, counters, rng, config, hf_files) -> None:
    """:func:`save`'s files, written into ``tmp`` (every rank its own; rank 0 the shared ones)."""
    # One process: no collectives. (Gloo runs all_gather_object's copies on its own thread; libgomp then
    # counts more OpenMP threads than CPUs and stops spin-waiting, and every later parallel op of a
    # multi-threaded CPU run paid a futex wake-up: the demo's steps took 1.6x as long after its first
    # checkpoint.)
    with single_process(dist.world_size == 1):
        dcp.save(states, checkpoint_id=tmp / "dcp", no_dist=dist.world_size == 1)
    _write_json(tmp / f"rank-{dist.rank}.json", {"rng": rng_state(rng), "counters": counters})
    if dist.is_main:
        config.save(tmp / "config.yaml")
        hf_files(tmp / "hf")
        _write_json(tmp / TRAINER_FILE, {"step": step, "world_size": dist.world_size, **trainer})
    barrier()


def load(path: str | Path, dist: Dist, *, states: dict[str, Stateful], rng: random.Random) -> Saved:
    """Restore a checkpoint written by :func:`save` into ``states`` and this process's RNGs (every rank
    must call this). Resharding to another number of ranks works for the models; the per-rank RNG
    states then cannot be matched, so the run goes on correctly but not bit-for-bit (``exact=False``)."""
    path = Path(path)
    trainer = json.loads((path / TRAINER_FILE).read_text())
    with single_process(dist.world_size == 1):
        dcp.load(states, checkpoint_id=path / "dcp", planner=SafeLoadPlanner(), no_dist=dist.world_size == 1)
    rank_file = path / f"rank-{dist.rank}.json"
    exact = trainer["world_size"] == dist.world_size and rank_file.is_file()
    counters = {}
    if exact:
        saved = json.loads(rank_file.read_text())
        set_rng_state(saved["rng"], rng)
        counters = saved["counters"]
    elif dist.is_main:
        why = (f"was written by {trainer['world_size']} ranks, this run has {dist.world_size}"
               if trainer["world_size"] != dist.world_size else f"has no {rank_file.name}")
        warnings.warn(f"{path} {why}: models and data position resume, the random streams start afresh",
                      stacklevel=2)
    return Saved(step=trainer["step"], trainer=trainer, counters=counters, exact=exact)
