"""Checkpoints and exact resume (issue 6): a run killed at a random moment, or while writing a checkpoint,
and started again with the same command logs exactly the per-step metrics of a run never stopped.

The runs are real trainer runs on a small slice of the demo, in subprocesses (1 rank: ``python -m``;
2 ranks: torchrun with gloo) killed with SIGKILL: nothing of the killed process gets to clean up.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import descendants
from safetensors.torch import load_file

from ril_fast import checkpoint, train
from ril_fast.config import Config, load_config
from ril_fast.demo import build_demo
from ril_fast.discriminator import Discriminator
from ril_fast.distributed import Dist
from ril_fast.export import main as export_main
from ril_fast.metrics import read_metrics, records_until

STEPS, EVERY = 5, 2  # checkpoints at steps 2 and 4
# Costs, not results: timings, memory, and the teacher-verdict cache's hit rate (the in-memory cache starts
# empty in a resumed process; set judge_cache= to keep it across runs).
COSTS = ("tokens_per_s", "step_time_s", "mfu", "peak_memory_gib", "teacher_judge_cache_hit_rate")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return build_demo(tmp_path_factory.mktemp("demo"), max_train=32, max_test=8)


def _args(demo, out, **extra) -> list[str]:
    args = {"student": demo.student, "train_data": demo.train, "teachers": ",".join(map(str, demo.teachers)),
            "eval_data": demo.test, "eval_every": 2, "eval_max_examples": 4, "steps": STEPS, "group_size": 2,
            "max_new_tokens": 11, "output_dir": out, "progress": "false", "checkpoint_every": EVERY,
            "batch.questions_per_step": 4, "disc.pretrain_steps": 1, "seed": 5, "mu": 2, "beta": 0.1}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def _command(ranks: int, args: list[str], prelude: str = "") -> list[str]:
    if ranks == 1 and not prelude:
        return [sys.executable, "-m", "ril_fast.train", *args]
    if ranks == 1:
        return [sys.executable, "-c", f"{prelude}\nfrom ril_fast.train import main\nmain({args!r})"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "ril_fast.train", *args]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _finish(cmd: list[str], log: Path) -> None:
    proc = _start(cmd, log)
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]


def _wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before the moment to kill it:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the run and every process it started, all at once, as a lost machine would."""
    assert proc.poll() is None, "the run finished before it could be killed"
    victims = [proc.pid, *descendants(proc.pid)]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in victims[1:]):  # SIGKILL cannot be caught: they go within moments
        assert time.monotonic() < deadline, "a killed worker is still running"
        time.sleep(0.01)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a parent that is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _step_metrics(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/") and k not in COSTS}
            for r in read_metrics(out / "metrics.jsonl")]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(next(a.glob("*.safetensors")))), load_file(str(next(b.glob("*.safetensors"))))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    """Uninterrupted runs, per number of ranks."""
    done = {}

    def get(ranks: int) -> Path:
        if ranks not in done:
            out = tmp_path_factory.mktemp(f"reference{ranks}")
            _finish(_command(ranks, _args(demo, out / "run")), out / "log.txt")
            done[ranks] = out / "run"
        return done[ranks]

    return get


@pytest.mark.parametrize("ranks", [1, 2])
def test_sigkill_at_a_random_moment_then_resume_gives_the_same_metrics(demo, reference, tmp_path, ranks):
    ref = reference(ranks)
    out = tmp_path / "run"
    cmd = _command(ranks, _args(demo, out))
    proc = _start(cmd, tmp_path / "killed.txt")
    _wait_for(lambda: checkpoint.latest(out) is not None, proc, tmp_path / "killed.txt")
    delay = random.uniform(0.0, 2.0)
    print(f"killing {delay:.2f} s after the first checkpoint appeared")
    time.sleep(delay)
    _kill(proc)
    killed_at = checkpoint.latest(out)
    _finish(cmd, tmp_path / "resumed.txt")
    assert f"resuming from {killed_at}" in (tmp_path / "resumed.txt").read_text()
    assert _step_metrics(out) == _step_metrics(ref)
    assert [r["step"] for r in _step_metrics(out) if "loss" in r] == list(range(1, STEPS + 1))
    _same_weights(out / "final", ref / "final")


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(demo, reference, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "writing"
    args = _args(demo, out)
    # The second checkpoint's DCP shards are written, then the process hangs before its other files:
    # it is killed in the middle of writing step-4.
    prelude = (
        "import time, pathlib, torch.distributed.checkpoint as dcp, ril_fast.checkpoint as ck\n"
        "real, calls = dcp.save, []\n"
        "def save(*a, **k):\n"
        "    calls.append(1); real(*a, **k)\n"
        f"    if len(calls) == 2: pathlib.Path({str(marker)!r}).touch(); time.sleep(600)\n"
        "ck.dcp.save = save\n")
    proc = _start(_command(1, args, prelude), tmp_path / "killed.txt")
    _wait_for(marker.exists, proc, tmp_path / "killed.txt")
    _kill(proc)
    assert (out / f".step-{2 * EVERY}.tmp" / "dcp").is_dir()  # half a checkpoint is on disk...
    assert checkpoint.latest(out) == out / f"step-{EVERY}"     # ...and is not taken for one
    _finish(_command(1, args), tmp_path / "resumed.txt")
    assert f"resuming from {out / f'step-{EVERY}'}" in (tmp_path / "resumed.txt").read_text()
    assert _step_metrics(out) == _step_metrics(reference(1))
    assert not list(out.glob(".step-*.tmp"))  # the next save removed the leftover
    assert [p.name for p in checkpoint.checkpoints(out)] == [f"step-{2 * EVERY}", f"step-{STEPS}"]


def test_sigterm_writes_a_checkpoint_and_stops(demo, reference, tmp_path):
    out = tmp_path / "run"
    cmd = _command(1, _args(demo, out, checkpoint_every=0))
    proc = _start(cmd, tmp_path / "stopped.txt")
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text(),
              proc, tmp_path / "stopped.txt")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) != 0  # stopped, not finished
    saved = checkpoint.latest(out)
    assert saved is not None and not (out / "final").exists()
    assert "run the same command to resume" in (tmp_path / "stopped.txt").read_text()
    step = json.loads((saved / "trainer.json").read_text())["step"]
    assert 1 <= step < STEPS
    _finish(cmd, tmp_path / "resumed.txt")
    assert _step_metrics(out) == _step_metrics(reference(1))


def test_sigterm_during_discriminator_pretraining_checkpoints_it(demo, tmp_path):
    """A SIGTERM during the discriminator's pre-training (50 steps of a 3B student in docs/real_student.yaml: more
    than torchrun's grace period) checkpoints its progress as step 0 and stops; the same command goes on from there
    as if never stopped (the same metrics and the same final student)."""
    args = dict(steps=2, checkpoint_every=0, eval_every=0, **{"disc.pretrain_steps": 3})
    ref = tmp_path / "reference"
    _finish(_command(1, _args(demo, ref, **args)), tmp_path / "reference.txt")
    out = tmp_path / "run"
    sigterm_after_two = ("import os, signal\nfrom ril_fast import train\nstep, calls = train.pretrain_disc_step, []\n"
                         "def counted(run):\n    metrics = step(run)\n    calls.append(1)\n    if len(calls) == 2:\n"
                         "        os.kill(os.getpid(), signal.SIGTERM)\n    return metrics\n"
                         "train.pretrain_disc_step = counted")
    proc = _start(_command(1, _args(demo, out, **args), prelude=sigterm_after_two), tmp_path / "stopped.txt")
    assert proc.wait(timeout=300) != 0
    log = (tmp_path / "stopped.txt").read_text()
    assert "stopped by SIGTERM after 2 of the discriminator's 3 pre-training steps: checkpoint" in log, log[-2000:]
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step-0"] and not (out / "final").exists()
    # As if a resumed run had evaluated step 0 and logged step 1 before a SIGKILL: going on from step-0 again
    # evaluates step 0 again, and the record holds it once.
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 0, "eval_accuracy": 0.5}\n{"step": 1, "loss": 0.25}\n')
    _finish(_command(1, _args(demo, out, **args)), tmp_path / "resumed.txt")
    assert "resuming from" in (tmp_path / "resumed.txt").read_text()
    assert _step_metrics(out) == _step_metrics(ref)
    _same_weights(out / "final", ref / "final")


@pytest.mark.parametrize("evaluation", [1, 2], ids=["step_0", "last_step"])
def test_sigterm_during_an_evaluation_checkpoints_and_stops(demo, tmp_path, evaluation):
    """A SIGTERM during step 0's evaluation saves the discriminator's pre-training as step 0 (it went on to train
    step 1 first, which a grace period may not wait for); during the last step's, with checkpoint_every=0, the
    last step (the final evaluation and the export ran without the handlers: all steps were lost). The same command
    then goes on as if never stopped."""
    args = dict(steps=2, checkpoint_every=0, eval_every=0, **{"disc.pretrain_steps": 2})
    ref = tmp_path / "reference"
    _finish(_command(1, _args(demo, ref, **args)), tmp_path / "reference.txt")
    out = tmp_path / "run"
    sigterm = ("import os, signal\nfrom ril_fast import train\nevaluate, calls = train.evaluate_now, []\n"
               "def counted(run):\n    calls.append(1)\n    if len(calls) == " + str(evaluation) + ":\n"
               "        os.kill(os.getpid(), signal.SIGTERM)\n    return evaluate(run)\n"
               "train.evaluate_now = counted")
    proc = _start(_command(1, _args(demo, out, **args), prelude=sigterm), tmp_path / "stopped.txt")
    assert proc.wait(timeout=300) != 0
    log = (tmp_path / "stopped.txt").read_text()
    step = 0 if evaluation == 1 else 2
    assert f"stopped by SIGTERM after step {step}'s evaluation: checkpoint" in log, log[-2000:]
    assert [p.name for p in checkpoint.checkpoints(out)] == [f"step-{step}"] and not (out / "final").exists()
    _finish(_command(1, _args(demo, out, **args)), tmp_path / "resumed.txt")
    assert "resuming from" in (tmp_path / "resumed.txt").read_text()
    assert _step_metrics(out) == _step_metrics(ref)
    _same_weights(out / "final", ref / "final")


def test_a_steps_0_run_keeps_its_pretraining_for_more_steps(demo, tmp_path):
    """steps=0 (the discriminator's pre-training, then an evaluation) saves step 0; the same command has nothing to
    do, and more steps go on from it as a run of those steps would have (the same metrics and final student)."""
    args = dict(steps=2, checkpoint_every=1, eval_every=0, **{"disc.pretrain_steps": 3})
    ref = tmp_path / "reference"
    _finish(_command(1, _args(demo, ref, **args)), tmp_path / "reference.txt")
    out = tmp_path / "run"
    _finish(_command(1, _args(demo, out, **args | {"steps": 0})), tmp_path / "pretrained.txt")
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step-0"]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [0]  # step 0 evaluated once, the last
    _finish(_command(1, _args(demo, out, **args | {"steps": 0})), tmp_path / "again.txt")
    assert "nothing to do: the run in" in (tmp_path / "again.txt").read_text()
    _finish(_command(1, _args(demo, out, **args)), tmp_path / "resumed.txt")
    assert "resuming from" in (tmp_path / "resumed.txt").read_text()
    assert _step_metrics(out) == _step_metrics(ref)
    _same_weights(out / "final", ref / "final")


def test_ctrl_c_under_torchrun_writes_a_checkpoint_and_stops(demo, reference, tmp_path):
    """Ctrl-C reaches torchrun and, from it and from the terminal, each rank (twice): every rank finishes
    the step, the checkpoint is written, and the same command resumes as if never stopped."""
    out = tmp_path / "run"
    cmd = _command(2, _args(demo, out, checkpoint_every=0))
    proc = _start(cmd, tmp_path / "stopped.txt")
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text(),
              proc, tmp_path / "stopped.txt")
    for pid in [proc.pid, *descendants(proc.pid)]:
        os.kill(pid, signal.SIGINT)
    assert proc.wait(timeout=300) != 0  # stopped, not finished
    log = (tmp_path / "stopped.txt").read_text()
    saved = checkpoint.latest(out)
    assert saved is not None and not (out / "final").exists(), log[-3000:]
    assert "stopped by Ctrl-C after step" in log and "KeyboardInterrupt" not in log, log[-3000:]
    _finish(cmd, tmp_path / "resumed.txt")
    assert _step_metrics(out) == _step_metrics(reference(2))


def test_a_rank_whose_torchrun_is_killed_checkpoints_and_stops(demo, tmp_path):
    """torchrun starts its ranks in sessions of their own: SIGKILL torchrun alone and they would go on, writing
    the folder. They get a SIGTERM from the kernel instead, finish the step, checkpoint and stop."""
    out = tmp_path / "run"
    proc = _start(_command(2, _args(demo, out, checkpoint_every=0, steps=50)), tmp_path / "log.txt")
    _wait_for(lambda: (out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text(),
              proc, tmp_path / "log.txt")
    ranks = [pid for pid in descendants(proc.pid) if "ril_fast.train" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(ranks) == 2
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 300
    while any(_alive(pid) for pid in ranks):
        assert time.monotonic() < deadline, "the ranks of a killed torchrun are still running"
        time.sleep(0.1)
    log = (tmp_path / "log.txt").read_text()
    saved = checkpoint.latest(out)
    assert saved is not None and "stopped by SIGTERM after step" in log, log[-3000:]
    assert 1 <= json.loads((saved / "trainer.json").read_text())["step"] < 50


_PARENT_PROBE = """
import os, signal, sys
parents = [int(p) for p in sys.argv[1:]]  # what os.getppid says, call after call (the last one from then on)
os.getppid = lambda: parents.pop(0) if len(parents) > 1 else parents[0]
os.environ["TORCHELASTIC_RUN_ID"] = "probe"
got = []
signal.signal(signal.SIGTERM, lambda *_: got.append("SIGTERM"))
from ril_fast.lifecycle import sigterm_when_torchrun_dies
sigterm_when_torchrun_dies()
print(got)
"""


@pytest.mark.parametrize("parents, stops", [([1, 1], False), ([4242, 4242], False), ([4242, 1], True)])
def test_a_rank_stops_if_torchrun_died_before_it_asked_for_the_signal(parents, stops):
    """A rank whose parent changed while it asked for its parent-death signal (torchrun died first) stops; one
    whose parent is pid 1 throughout (torchrun as a container's first process) goes on: a rule "parent 1 means
    torchrun died" stopped every run of such a container after its first step."""
    done = subprocess.run([sys.executable, "-c", _PARENT_PROBE, *map(str, parents)], capture_output=True, text=True,
                          timeout=300, check=True)
    assert done.stdout.strip() == ("['SIGTERM']" if stops else "[]"), done.stderr[-2000:]


def test_export_cli_writes_the_checkpointed_student_and_discriminator(demo, reference, tmp_path):
    ref = reference(1)
    assert [p.name for p in checkpoint.checkpoints(ref)] == [
        f"step-{2 * EVERY}", f"step-{STEPS}"]  # keep_checkpoints=2; the last step is always saved
    export_main([str(ref / f"step-{2 * EVERY}"), str(tmp_path / "student"), "--disc", str(tmp_path / "disc")])
    # The student exported from the last checkpoint (step 4) differs from the initial one and loads in
    # plain transformers; its weights are the ones training had at step 4: resuming from that checkpoint
    # with steps=4 exports (as final/) exactly the same tensors.
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(tmp_path / "student")
    resumed = tmp_path / "resumed"
    subprocess.run(["cp", "-r", str(ref), str(resumed)], check=True)
    for later in (f"step-{STEPS}", "final"):  # step 5's: else resuming at step 4 is refused, or has nothing to do
        shutil.rmtree(resumed / later)
    _finish(_command(1, _args(demo, resumed, steps=2 * EVERY)), tmp_path / "log.txt")
    _same_weights(tmp_path / "student", resumed / "final")
    initial = load_file(str(next(Path(demo.student).glob("*.safetensors"))))
    exported = load_file(str(next((tmp_path / "student").glob("*.safetensors"))))
    assert any(not torch.equal(initial[k], exported[k]) for k in initial)
    # --dtype bfloat16: the bf16 cast of the same weights, a config that says so
    export_main([str(ref / f"step-{2 * EVERY}"), str(tmp_path / "student16"), "--dtype", "bfloat16"])
    half = load_file(str(next((tmp_path / "student16").glob("*.safetensors"))))
    assert half.keys() == exported.keys() and all(torch.equal(half[k], exported[k].to(half[k].dtype)) for k in half)
    assert {t.dtype for t in half.values() if t.is_floating_point()} == {torch.bfloat16}
    config = json.loads((tmp_path / "student16" / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == config["vision_config"]["dtype"] == "bfloat16"
    disc, _ = Discriminator.load(tmp_path / "disc")
    assert torch.isfinite(disc.weight).all() and disc.weight.abs().sum() > 0  # trained away from its zero start
    # The exported discriminator, backbone and head, is the checkpoint's, read here from its DCP files alone (not
    # through export.py's loading): every tensor, none missing or extra.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(ref / f"step-{2 * EVERY}" / "dcp", tmp_path / "checkpoint.pt")
    saved = {k.removeprefix("module."): v for k, v in torch.load(tmp_path / "checkpoint.pt")["disc"]["model"].items()}
    state = disc.state_dict()
    assert state.keys() == saved.keys() and any(k.startswith("backbone.") for k in state)
    assert [k for k in state if not torch.equal(state[k], saved[k])] == []


ALONE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))  # one process, no process group


def _save_alone(root: Path, step: int, *, states=None, counters=None, trainer=None, keep: int = 1,
                hf_files=lambda folder: folder.mkdir()) -> Path:
    """``checkpoint.save`` in one process: of ``states`` (default: a fresh Linear(3, 2) as "student", no
    optimiser), the default Config, an empty hf/ folder unless ``hf_files`` writes one."""
    states = {"student": checkpoint.TrainState(torch.nn.Linear(3, 2), None)} if states is None else states
    return checkpoint.save(root, step, ALONE, states=states, trainer=trainer or {}, counters=counters or {},
                           rng=random.Random(1), config=Config(), hf_files=hf_files, keep=keep)


def test_export_cli_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit, match="not a ril_fast checkpoint"):
        export_main([str(tmp_path), str(tmp_path / "out")])


def test_export_cli_refuses_disc_for_a_checkpoint_without_one(tmp_path):
    """--disc for an RL-only run's checkpoint: a one-line error before any model is written (was DCP's traceback
    after the student was written)."""
    hf = lambda folder: folder.mkdir() or (folder / "config.json").write_text("{}")  # noqa: E731
    saved = _save_alone(tmp_path, 2, hf_files=hf)
    with pytest.raises(SystemExit, match=rf"error: {saved}: holds no discriminator \(a checkpoint of an RL-only "
                                         rf"run\): leave out --disc"):
        export_main([str(saved), str(tmp_path / "out"), "--disc", str(tmp_path / "disc")])
    assert not any((tmp_path / "out").iterdir()) and not any((tmp_path / "disc").iterdir())


def test_export_cli_writes_a_tied_students_head_once(tmp_path):
    """A student whose LM head is its input embeddings (tie_word_embeddings=True) is exported from a checkpoint
    with the head tied again: the tensor written once (as in the student's own folder and final/; a second copy is
    0.6 GB more for a 3B Qwen2.5-VL), with the checkpoint's values, and loading tied."""
    from transformers import AutoModelForCausalLM

    from ril_fast.export import save_hf_files
    from ril_fast.processor import Processor
    from ril_fast.tiny import make_tiny

    source = make_tiny(tmp_path / "tiny", "qwen2")
    student = AutoModelForCausalLM.from_pretrained(source)
    student.config.tie_word_embeddings = True
    student.lm_head.weight = student.model.embed_tokens.weight
    with torch.no_grad():
        student.model.embed_tokens.weight.add_(1.0)  # unlike the tiny model's own embeddings and head
    root = torch.nn.Module()
    root.module = student  # parameter names as under the trainer's root: "module.model...."
    processor = Processor.from_pretrained(source)
    saved = _save_alone(tmp_path / "run", 1, states={"student": checkpoint.TrainState(root, None)},
                        hf_files=lambda folder: save_hf_files(student, processor, folder))
    export_main([str(saved), str(tmp_path / "out")])
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert "lm_head.weight" not in weights
    assert torch.equal(weights["model.embed_tokens.weight"], student.model.embed_tokens.weight)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert again.lm_head.weight is again.model.embed_tokens.weight


def test_resume_path_must_be_a_complete_checkpoint(tmp_path):
    """A checkpoint a run died writing (``.step-N.tmp``, even with rank 0's trainer.json written before another
    rank's files), or a step-N folder without its trainer.json (emptied, or half deleted), is none."""
    (tmp_path / ".step-3.tmp").mkdir()
    (tmp_path / ".step-3.tmp" / checkpoint.TRAINER_FILE).write_text('{"step": 3}')
    (tmp_path / "step-2").mkdir()
    assert checkpoint.resolve("auto", tmp_path) is None and checkpoint.checkpoints(tmp_path) == []
    assert checkpoint.resolve("none", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="a checkpoint a run died writing"):
        checkpoint.resolve(str(tmp_path / ".step-3.tmp"), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not a complete checkpoint folder \(no trainer.json\)"):
        checkpoint.resolve(str(tmp_path / "step-2"), tmp_path)
    (tmp_path / "best").mkdir()  # a complete checkpoint kept under a name of one's own
    (tmp_path / "best" / checkpoint.TRAINER_FILE).write_text('{"step": 3}')
    assert checkpoint.resolve(str(tmp_path / "best"), tmp_path) == tmp_path / "best"


def test_checkpoints_go_by_step_number_not_folder_name(tmp_path):
    """step-10 is newer than step-9 and step-2 (though its name sorts first): resume=auto takes it, and pruning to
    the newest keep_checkpoints deletes the oldest steps, never it."""
    for step in (2, 9):
        _save_alone(tmp_path, step, keep=0)
    assert checkpoint.latest(tmp_path) == tmp_path / "step-9"
    _save_alone(tmp_path, 10, keep=0)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-2", "step-9", "step-10"]
    assert checkpoint.latest(tmp_path) == checkpoint.resolve("auto", tmp_path) == tmp_path / "step-10"
    _save_alone(tmp_path, 11, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10", "step-11"]


def test_records_until_keeps_what_an_uninterrupted_run_had_written(tmp_path):
    records = [{"step": 0, "eval_accuracy": 0.1}, {"step": 1, "loss": 1.0},
               {"step": 2, "loss": 2.0, "eval_accuracy": 0.2}, {"step": 3, "loss": 3.0},
               {"step": 3, "eval_accuracy": 0.3}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')  # cut short by a kill
    assert records_until(path, 2) == records[:3]
    assert records_until(path, 3) == records[:4]  # not the final evaluation that followed step 3
    assert records_until(path, 3, keep_evaluation=True) == records  # unless the run goes on past step 3
    assert read_metrics(path) == records  # the cut line is no record
    path.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 2.0}\n')
    for read in (lambda: records_until(path, 2), lambda: read_metrics(path)):
        with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON metrics record"):
            read()
    path.write_text('{"step": 1, "loss": 1.0}\n\n\nnot json\n{"step": 2, "loss": 2.0}\n\n')  # blank lines count
    with pytest.raises(ValueError, match=r"metrics.jsonl:4: not a JSON metrics record"):
        read_metrics(path)


def test_rng_state_round_trips_through_json():
    own = random.Random(7)
    state = json.loads(json.dumps(checkpoint.rng_state(own)))
    expected = (random.random(), own.random(), __import__("numpy").random.rand(), torch.rand(3))
    checkpoint.set_rng_state(state, own)
    again = (random.random(), own.random(), __import__("numpy").random.rand(), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])


def test_load_takes_a_ranks_file_only_from_as_many_ranks(tmp_path):
    """A rank's RNG states and counters come back only from a checkpoint of as many ranks, with its file there: a
    checkpoint of 2 ranks holds a rank-0.json, but another layout's (and a missing file is no file); the models load
    either way, the random streams start afresh and it is said."""
    path = _save_alone(tmp_path, 3, counters={"questions": 5})
    rng = random.Random(2)
    assert checkpoint.load(path, ALONE, states={"student": checkpoint.TrainState(torch.nn.Linear(3, 2), None)},
                           rng=rng).counters == {"questions": 5}
    assert rng.getstate() == random.Random(1).getstate()  # _save_alone's
    trainer = json.loads((path / checkpoint.TRAINER_FILE).read_text())
    (path / checkpoint.TRAINER_FILE).write_text(json.dumps(trainer | {"world_size": 2}))
    for rank_file in ("there", "missing"):
        if rank_file == "missing":
            (path / checkpoint.TRAINER_FILE).write_text(json.dumps(trainer))
            (path / "rank-0.json").unlink()
        rng = random.Random(2)
        why = "was written by 2 ranks, this run has 1" if rank_file == "there" else "has no rank-0.json"
        with pytest.warns(UserWarning, match=f"{why}: models and data position resume, the random streams start"):
            saved = checkpoint.load(path, ALONE, states={"student": checkpoint.TrainState(torch.nn.Linear(3, 2),
                                                                                          None)}, rng=rng)
        assert (saved.step, saved.exact, saved.counters) == (3, False, {}), rank_file
        assert rng.getstate() == random.Random(2).getstate(), rank_file


def test_the_same_step_saved_again_replaces_it_whole(tmp_path, monkeypatch):
    """A resumed run stopped before its next step saves its resume step again: the new checkpoint takes
    the old one's place before the old one is deleted, so a kill during that delete (here: after its first
    file) leaves a complete checkpoint, the new one; a finished save leaves nothing else in the folder."""
    rmtree = shutil.rmtree

    def killed_while_deleting(path, *args, **kwargs):
        next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
        raise KeyboardInterrupt

    def states():
        return {"student": checkpoint.TrainState(torch.nn.Linear(3, 2), None)}

    def save(skipped):
        return _save_alone(tmp_path, 4, states=states(), counters={"skipped_steps": skipped})

    def load(path):
        return checkpoint.load(path, ALONE, states=states(), rng=random.Random(2))

    path = save(1)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        save(2)
    assert checkpoint.checkpoints(tmp_path) == [path] and load(path).counters == {"skipped_steps": 2}
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    save(3)
    assert load(path).counters == {"skipped_steps": 3} and sorted(p.name for p in tmp_path.iterdir()) == ["step-4"]
    # Killed between its two renames: step-4 aside, whole, the new one complete but unnamed. resume=auto puts the
    # old one back (the next save would have deleted both), and the folder reads as before the save.
    replace = os.replace

    def killed_after_the_first(src, dst):
        replace(src, dst)
        if Path(dst).name == ".step-4.replaced.tmp":
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.os, "replace", killed_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        save(4)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    assert checkpoint.checkpoints(tmp_path) == []
    assert checkpoint.resolve("none", tmp_path) is None and checkpoint.checkpoints(tmp_path) == [path]  # any resume=
    assert checkpoint.resolve("auto", tmp_path) == path and load(path).counters == {"skipped_steps": 3}
    with pytest.raises(KeyboardInterrupt):  # and a save's first act, before it clears what a killed one left
        monkeypatch.setattr(checkpoint.os, "replace", killed_after_the_first)
        save(4)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    _save_alone(tmp_path, 5, states=states(), counters={"skipped_steps": 9}, keep=0)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-4", "step-5"]
    assert load(path).counters == {"skipped_steps": 3}
    shutil.rmtree(tmp_path / "step-5")
    save(5)
    assert load(path).counters == {"skipped_steps": 5} and sorted(p.name for p in tmp_path.iterdir()) == ["step-4"]


def test_a_failed_save_leaves_no_partial_checkpoint_and_says_what_is_free(tmp_path, monkeypatch):
    """A checkpoint that cannot be written (a full disk) leaves no .step-N.tmp and names the free space and
    the setting to lower; pruning moves an old checkpoint out of sight before deleting it."""
    def save(step):
        return _save_alone(tmp_path, step)

    save(1)
    with monkeypatch.context() as m:
        m.setattr(checkpoint.dcp, "save", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
        with pytest.raises(RuntimeError, match=rf"writing checkpoint {tmp_path / 'step-2'} failed \(OSError: .*No "
                                               rf"space left\); [\d.]+ GiB free in {tmp_path}: .*keep_checkpoints"):
            save(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]
    rmtree, seen = shutil.rmtree, []
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda path, *a, **k: seen.append(Path(path).name) or
                        rmtree(path, *a, **k))
    save(2)
    assert ".step-1.old.tmp" in seen and "step-1" not in seen  # never deleted where resume=auto looks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]


def test_one_process_save_and_load_warn_nothing(tmp_path):
    """One process is what world_size=1 means: DCP's "assuming the intent is to save in a single process"
    warning (printed on every save and load) is silenced; the checkpoint still round-trips exactly."""
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 7)).square().sum().backward()
    optimizer.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = _save_alone(tmp_path, 3, states={"student": checkpoint.TrainState(model, optimizer)},
                           trainer={"batches": {"epoch": 1}}, counters={"skipped_steps": 2}, keep=0)
        again = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
        again_optimizer = torch.optim.AdamW(again.parameters(), lr=1e-2)
        saved = checkpoint.load(path, ALONE, states={"student": checkpoint.TrainState(again, again_optimizer)},
                                rng=random.Random(2))
    assert [str(w.message) for w in caught] == []
    assert saved.step == 3 and saved.exact and saved.counters == {"skipped_steps": 2}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    state, loaded = optimizer.state_dict()["state"], again_optimizer.state_dict()["state"]
    assert state.keys() == loaded.keys()
    assert all(torch.equal(state[k][name], loaded[k][name]) for k in state for name in state[k])


def test_hsdp_checkpoint_resumes_as_fsdp(demo, tmp_path):
    """Four ranks as HSDP (``batch.shard_ranks=2``: two replicas, each sharded over two ranks) checkpoint at
    step 2; four ranks of plain FSDP resume from that checkpoint (DCP lays the weights and AdamW states out
    anew) and log step 3 as the HSDP run does, and end with its weights (the AdamW moments of the checkpoint
    moved them). Only the gradient sums' order
    differs (HSDP reduces within a replica, then across the two; FSDP over all four at once), so gradient
    norms agree to fp32 rounding (1e-5 relative) and weights to 1e-6, the rest exactly."""
    hsdp, fsdp = tmp_path / "hsdp", tmp_path / "fsdp"
    settings = dict(steps=3, mu=1)  # μ = 1: every logged value of step 3 comes before its one update
    _finish(_command(4, _args(demo, hsdp, **settings, **{"batch.shard_ranks": 2})), tmp_path / "hsdp.txt")
    _finish(_command(4, _args(demo, fsdp, **settings, resume=hsdp / "step-2")), tmp_path / "fsdp.txt")
    assert f"resuming from {hsdp / 'step-2'}" in (tmp_path / "fsdp.txt").read_text()
    last = [[r for r in _step_metrics(out) if r["step"] == 3] for out in (hsdp, fsdp)]
    assert len(last[0]) == len(last[1]) == 2  # the step's record, then the final evaluation
    for got, want in zip(last[1], last[0]):
        assert got.keys() == want.keys()
        norms = [k for k in want if k.endswith("grad_norm")]
        assert {k: got[k] for k in want if k not in norms} == {k: want[k] for k in want if k not in norms}
        assert all(got[k] == pytest.approx(want[k], rel=1e-5) for k in norms)
    wa, wb = (load_file(str(next((out / "final").glob("*.safetensors")))) for out in (hsdp, fsdp))
    print("max weight difference", max((wa[k] - wb[k]).abs().max().item() for k in wa))
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() <= 1e-6 for k in wa)


def test_offloaded_checkpoint_resumes_without_offload(demo, tmp_path):
    """Two ranks with the trained state in the CPU's memory (``batch.cpu_offload``: FSDP2's offload path, AdamW's
    fused CPU kernel) checkpoint at step 2; two ranks without offload resume from it and log step 3 exactly as
    the offloaded run does (μ = 1: step 3's values all come before its update), and end with its weights to
    1e-6 (the fused and the for-loop AdamW kernels round apart). A resumed run steps with the kernel its own
    settings choose, not the checkpoint's: fused when offloaded, else torch's default."""
    offloaded, plain = tmp_path / "offloaded", tmp_path / "plain"
    settings = dict(steps=3, mu=1)
    _finish(_command(2, _args(demo, offloaded, **settings, **{"batch.cpu_offload": "true"})), tmp_path / "off.txt")
    _finish(_command(2, _args(demo, plain, **settings, resume=offloaded / "step-2")), tmp_path / "plain.txt")
    assert f"resuming from {offloaded / 'step-2'}" in (tmp_path / "plain.txt").read_text()
    last = [[r for r in _step_metrics(out) if r["step"] == 3] for out in (offloaded, plain)]
    assert len(last[0]) == 2 and last[1] == last[0]  # the step's record, then the final evaluation
    wa, wb = (load_file(str(next((out / "final").glob("*.safetensors")))) for out in (offloaded, plain))
    print("max weight difference", max((wa[k] - wb[k]).abs().max().item() for k in wa))
    assert wa.keys() == wb.keys() and all((wa[k] - wb[k]).abs().max() <= 1e-6 for k in wa)
    for source, offload, fused in ((offloaded / "step-2", False, None), (plain / "step-3", True, True)):
        run = train.setup(load_config(_args(demo, tmp_path / f"again-{offload}", steps=4, resume=source,
                                            **{"batch.cpu_offload": offload})))
        for optimizer in (run.optimizer, run.disc_optimizer):
            assert {g["fused"] for g in optimizer.param_groups} == {fused}, source
            steps = [s["step"] for s in optimizer.state.values()]
            assert steps and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in steps)
        run.log.close()
