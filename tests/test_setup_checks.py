"""What the trainer refuses before it trains, and how a resumed run takes its settings.

Bad settings and data fail in ``setup`` with a one-line ``ConfigError`` / ``DataError`` (the setting, or
the file and line) before any model loads; a resume that would mix two runs, run past ``steps`` or
change the batches is refused, leaving the folder's config.yaml as it was; settings changed on resume
apply (the optimisers' included); a finished run has nothing to redo; Ctrl-C stops like SIGTERM.
"""

import dataclasses
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from fake_openai import FakeOpenAI
from models_fixtures import one_thread  # noqa: F401
from PIL import Image

from ril_fast import checkpoint, distributed, lifecycle, preflight, train
from ril_fast.config import ConfigError, load_config
from ril_fast.data import STUDENT, DataError
from ril_fast.demo import build_demo
from ril_fast.imitation import disc_probs
from ril_fast.judges_http import HTTPError
from ril_fast.metrics import read_metrics
from ril_fast.policy import frozen_logprobs
from ril_fast.schedule import lr_factor
from ril_fast.tiny import make_tiny


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):  # noqa: F811
    return build_demo(tmp_path_factory.mktemp("demo"), max_train=16, max_test=4)


def _args(demo, out, **extra):
    args = dict(student=demo.student, train_data=demo.train, teachers=",".join(map(str, demo.teachers)),
                eval_data=demo.test, eval_every=0, eval_max_examples=2, steps=2, group_size=2, max_new_tokens=12,
                output_dir=out, progress="false", checkpoint_every=1, keep_checkpoints=0,
                **{"batch.questions_per_step": 2, "disc.pretrain_steps": 1})
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def finished(demo, tmp_path_factory):
    """A 2-step run with a checkpoint after each step (its folder; copy before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train.main(_args(demo, out))
    return out


def _no_models(monkeypatch):
    """Make loading a model fail the test: the checks under test must come first."""
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")
    monkeypatch.setattr(train, "load", load)


def test_bad_settings_and_data_are_refused_before_any_model_loads(demo, tmp_path, monkeypatch):
    _no_models(monkeypatch)
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"output_dir=.*a_file: exists and is not a folder"):
        train.setup(load_config(_args(demo, tmp_path / "a_file")))
    with pytest.raises(ConfigError, match=r"student=.*nowhere: cannot open the model folder: no such folder$"):
        train.setup(load_config(_args(demo, tmp_path / "run", student=tmp_path / "nowhere")))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a demo")
    monkeypatch.setenv("RIL_FAST_DEMO", str(tmp_path / "mine"))  # the demo's folder: one the user uses otherwise
    with pytest.raises(ConfigError, match=rf"the built-in demo cannot be built in {tmp_path / 'mine'}: .*not a "
                                          rf"ril_fast demo folder.*; set RIL_FAST_DEMO to a writable folder"):
        train.setup(load_config([f"output_dir={tmp_path / 'run'}"]))
    with pytest.raises(ConfigError, match=r"batch.questions_per_step=64: 16 examples cannot fill a batch of 64"):
        train.setup(load_config(_args(demo, tmp_path / "run", **{"batch.questions_per_step": 64})))
    with pytest.raises(ConfigError, match=r"batch.shard_ranks=2: must divide the number of ranks \(1\)"):
        train.setup(load_config(_args(demo, tmp_path / "run", **{"batch.shard_ranks": 2})))
    (tmp_path / "a_file").write_text("not a database, but long enough for SQLite to read a header" * 10)
    with pytest.raises(ConfigError, match=r"judge_cache=.*a_file: cannot use it as the verdict cache"):
        train.setup(load_config(_args(demo, tmp_path / "run", judge_cache=tmp_path / "a_file")))
    from transformers import LlavaConfig

    LlavaConfig().save_pretrained(tmp_path / "llava")  # a VLM family ril_fast cannot pack: not a text model
    with pytest.raises(ConfigError, match=r"student=.*llava: model type 'llava' is a vision-language model ril_fast"):
        train.setup(load_config(_args(demo, tmp_path / "run", student=tmp_path / "llava")))
    with pytest.raises(ConfigError, match=r"^max_image_pixels=40000: .*student's image processor enlarges every "
                                          r"image to at least 50176 pixels$"):  # the demo's: 64 tokens an image
        train.setup(load_config(_args(demo, tmp_path / "run", max_image_pixels=40000)))
    text_student = make_tiny(tmp_path / "text_student", arch="qwen2")
    with pytest.raises(ConfigError, match=r"^max_image_pixels=9000: only Qwen-VL students resize images"):
        train.setup(load_config(_args(demo, tmp_path / "run", student=text_student, max_image_pixels=9000)))
    with pytest.raises(DataError) as e:
        train.setup(load_config(_args(demo, tmp_path / "run", student=text_student)))
    assert str(e.value).startswith(f"{demo.train}:1: the example has images, but the student")
    text_train = tmp_path / "text_train.jsonl"  # text-only training data, but evaluation data with images
    text_train.write_text("".join(json.dumps({**json.loads(line), "images": []}) + "\n"
                                  for line in demo.train.read_text().splitlines()))
    with pytest.raises(DataError) as e:
        train.setup(load_config(_args(demo, tmp_path / "run", student=text_student, train_data=text_train,
                                      teachers="")))
    assert str(e.value).startswith(f"{demo.test}:1: the example has images, but the student")
    with pytest.raises(ConfigError, match=r"judge_model=.*nowhere: no such folder"):
        train.setup(load_config(_args(demo, tmp_path / "run", judge="hf", judge_model=tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match=rf"judge_model={demo.student}: model type 'qwen2_5_vl' is no causal LM"):
        train.setup(load_config(_args(demo, tmp_path / "run", judge="hf", judge_model=demo.student)))
    make_tiny(tmp_path / "text_lm", arch="qwen2")  # a tokenizer of made-up words: "yes" and "no" are several tokens
    with pytest.raises(ConfigError, match=r"judge_model=.*text_lm: the judge model's tokenizer has no single token"):
        train.setup(load_config(_args(demo, tmp_path / "run", judge="hf", judge_model=tmp_path / "text_lm")))
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(ConfigError, match=r"judge_url=.*: the judge server cannot be used: .*failed 1 times"):
        train.setup(load_config(_args(demo, tmp_path / "run", judge="http", judge_url=nobody, judge_model="m",
                                      judge_retries=0, judge_timeout_s=2)))
    with FakeOpenAI() as server, pytest.raises(ConfigError, match=r"cannot be used: it serves fake-model, not 'm'"):
        train.setup(load_config(_args(demo, tmp_path / "run", judge="http", judge_url=server.url, judge_model="m")))
    with monkeypatch.context() as m:  # a CPU rank without the interpreter, also on a machine with a GPU
        m.setenv("TRITON_INTERPRET", "0")
        real_init = train.distributed.init
        m.setattr(train.distributed, "init",
                  lambda **kw: dataclasses.replace(real_init(**kw), device=torch.device("cpu")))
        with pytest.raises(ConfigError, match=r"loss.kernels=triton: Triton kernels need a GPU"):
            train.setup(load_config(_args(demo, tmp_path / "run", **{"loss.kernels": "triton"})))
    assert not (tmp_path / "run").exists()  # nothing written for a refused run
    with pytest.raises(ConfigError, match=r"output_dir=.*a_file/run: cannot write there"):
        train.setup(load_config(_args(demo, tmp_path / "a_file" / "run")))


def test_a_folder_another_run_is_writing_is_refused(demo, tmp_path):
    """Two runs in one output_dir would interleave their metrics and prune each other's checkpoints: while
    another process holds the folder (a run whose torchrun was killed goes on as an orphan), a run is refused
    naming that process; once it ends, however it ends, the folder is free."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ril_fast.files import lock_folder; "
                               "lock_folder(sys.argv[1]); print('held', flush=True); time.sleep(300)", str(out)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=rf"output_dir=.*run is in use by another process \(pid {holder.pid}\)"):
            train.setup(load_config(_args(demo, out)))
        (out / "step-3").mkdir()  # as if the other run had saved a checkpoint: still the folder's use is said,
        (out / "step-3" / "trainer.json").write_text('{"step": 3}')  # not what its checkpoints make of this start
        with pytest.raises(ConfigError, match=rf"output_dir=.*run is in use by another process \(pid {holder.pid}\)"):
            train.setup(load_config(_args(demo, out, resume="none")))
        shutil.rmtree(out / "step-3")
    finally:
        holder.kill()
        holder.wait()
    run = train.setup(load_config(_args(demo, out)))  # SIGKILL dropped the lock
    run.log.close()
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"


def test_a_file_system_without_locks_warns_and_trains(demo, tmp_path, monkeypatch):
    """Where flock fails because the file system keeps no locks (ENOLCK: some FUSE and network mounts), the run warns
    that a second run in its folder would not be refused and goes on; any other failure to lock still refuses it."""
    import errno
    import fcntl

    from ril_fast import files

    def no_locks(f, flags, code=errno.ENOLCK):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match=r"run: not locked, the file system keeps no locks \(No locks available\)"):
        run = train.setup(load_config(_args(demo, tmp_path / "run")))
    run.log.close()
    files.unlock_folder(tmp_path / "run")
    assert (tmp_path / "run" / ".lock").read_text() == f"{os.getpid()}\n"
    monkeypatch.setattr(fcntl, "flock", lambda f, flags: no_locks(f, flags, errno.EACCES))
    with pytest.raises(ConfigError, match=r"output_dir=.*elsewhere: cannot write there: .*Permission denied"):
        train.setup(load_config(_args(demo, tmp_path / "elsewhere")))


def test_under_torchrun_a_refusal_is_one_line(demo, tmp_path):
    """Every rank refuses; rank 0 alone prints the error (not one copy per rank)."""
    (tmp_path / "a_file").write_text("")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ril_fast.train",
           *_args(demo, tmp_path / "a_file")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("error: output_dir=") == 1, done.stderr[-3000:]


def test_a_prompt_that_cannot_be_rendered_names_its_line(demo, tmp_path, monkeypatch):
    _no_models(monkeypatch)
    Image.new("RGB", (3000, 10), (200, 0, 0)).save(tmp_path / "thin.png")
    lines = [json.loads(line) for line in demo.train.read_text().splitlines()]
    for record in lines:
        record["images"] = [str(tmp_path / "thin.png")]  # aspect ratio 300: the image processor refuses it
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(DataError) as e:
        train.main(_args(demo, tmp_path / "run", train_data=data, eval_data=""))
    assert str(e.value).split(": ")[0].startswith(f"{data}:") and "aspect ratio" in str(e.value), str(e.value)


def test_long_prompts_are_refused_or_left_out_before_any_model_loads(demo, tmp_path, monkeypatch, capsys):
    """Three training examples given three images each no longer fit beside a full-length response in a
    batch.max_tokens that all the others fit in, and a held-out example gets an image the image processor refuses:
    long_prompts=refuse stops the run before any model loads, naming the first line and counting the others;
    skip leaves exactly those out (of every batch, and of the evaluation) and says so."""
    from ril_fast.processor import Processor

    _no_models(monkeypatch)
    records = [json.loads(line) for line in demo.train.read_text().splitlines()]
    for record in records:  # the copies are elsewhere: their images by absolute paths
        record["images"] = [str(demo.train.parent / name) for name in record["images"]]
    for record in records[4:12:3]:
        record["images"] = record["images"] * 3
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    Image.new("RGB", (3000, 10), (200, 0, 0)).save(tmp_path / "thin.png")
    held_out = [json.loads(line) for line in demo.test.read_text().splitlines()]
    for record in held_out:
        record["images"] = [str(demo.test.parent / name) for name in record["images"]]
    held_out[1]["images"] = [str(tmp_path / "thin.png")]
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps(r) + "\n" for r in held_out))
    proc = Processor.from_pretrained(demo.student)
    lengths = proc.prompt_lengths([(r["question"], [(64, 64)] * len(r["images"])) for r in records])
    fits = max(n for r, n in zip(records, lengths) if len(r["images"]) == 1)
    assert min(n for r, n in zip(records, lengths) if len(r["images"]) == 3) > fits
    args = _args(demo, tmp_path / "run", train_data=data, eval_data=test, eval_max_examples=0,
                 **{"batch.max_tokens": fits + 12})  # max_new_tokens=12: the longest one-image prompt just fits
    with pytest.raises(DataError) as e:
        train.setup(load_config(args))
    assert str(e.value).startswith(f"{data}:5: the prompt takes {lengths[4]} tokens (images included); with "
                                   f"max_new_tokens=12 that exceeds batch.max_tokens ({fits + 12} tokens): raise "
                                   f"batch.max_tokens"), str(e.value)
    assert str(e.value).endswith(": raise batch.max_tokens, lower max_new_tokens, use fewer or smaller images, or "
                                 "drop the example "
                                 "(long_prompts=skip leaves such examples out; 2 more such example(s) in the file)")
    dist = SimpleNamespace(rank=0, world_size=1, is_main=True)
    capsys.readouterr()
    examples, bank, eval_examples, batches = preflight.load_data(load_config(args + ["long_prompts=skip"]), dist)
    assert [e.id for e in examples] == [r["id"] for i, r in enumerate(records) if i not in (4, 7, 10)]
    assert [e.id for e in eval_examples] == [r["id"] for i, r in enumerate(held_out) if i != 1]
    served = {e.id for _ in range(3 * batches.steps_per_epoch) for e in next(batches)}  # three epochs
    assert served == {e.id for e in examples} and bank is not None
    printed = capsys.readouterr().out
    assert f"left out 3 of {len(records)} training examples (long_prompts=skip); the first: {data}:5: " in printed
    assert (f"left out 1 of {len(held_out)} held-out examples (long_prompts=skip); the first: {test}:2: the image "
            f"processor refuses an image of the example (absolute aspect ratio must be smaller than 200") in printed


def test_only_rank_0_reads_the_data(demo, tmp_path):
    """Over two ranks (torchrun, gloo) rank 0 alone opens the image files, and every rank gets the same examples,
    teacher responses and held-out examples, takes its own half of each batch, and raises rank 0's errors, those
    that cannot be sent as they are included; where the run starts (resume, finished) is rank 0's reading of
    output_dir alone."""
    out = tmp_path / "seen.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    script = Path(__file__).parent / "dist_scripts" / "data_checks.py"
    settings = _args(demo, tmp_path / "run", **{"batch.questions_per_step": 4})
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(out), *settings], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    zero, one = json.loads(out.read_text())
    assert zero["opened"] >= 16 + 4 and one["opened"] == 0  # every training and held-out image, once or more
    for key in ("examples", "eval", "teachers"):
        assert zero[key] == one[key], key
    assert len(zero["examples"]) == 16 and len(zero["eval"]) == 2 and len(zero["teachers"]) == 16
    assert len(zero["batch"]) == len(one["batch"]) == 2 and not set(zero["batch"]) & set(one["batch"])
    assert zero["error"] == one["error"] and zero["error"].startswith(f"{demo.train}:1: the prompt takes")
    # What cannot travel from rank 0 is still an error on every rank, in rank 0's words; nothing hangs.
    assert zero["unpicklable"] == one["unpicklable"] and "pickle" in zero["unpicklable"]
    # Rank 0 raises its own exception, its traceback reaching into the function; the others its copy in words.
    assert zero["unrebuildable"] == "Picky: 1/2 [in fn]"
    assert one["unrebuildable"] == "RuntimeError: on rank 0: Picky: 1/2"
    assert zero["set_up"] == one["set_up"] == 0  # where the run starts: rank 0's reading of output_dir, for both


def test_a_start_that_would_mix_two_runs_is_refused(demo, finished, tmp_path, monkeypatch):
    _no_models(monkeypatch)
    with pytest.raises(ConfigError, match=r"resume=none: .* holds checkpoints of another run \(step-1, step-2\)"):
        train.setup(load_config(_args(demo, finished, resume="none")))
    with pytest.raises(ConfigError, match=r"holds checkpoints of another run \(step-2\)"):
        train.setup(load_config(_args(demo, finished, resume=finished / "step-1")))
    with pytest.raises(ConfigError, match="not a complete checkpoint folder"):
        train.setup(load_config(_args(demo, tmp_path / "run", resume=finished)))
    other = tmp_path / "other"  # another folder's checkpoint, continued where checkpoints are
    shutil.copytree(finished, other, ignore=shutil.ignore_patterns("final", "tensorboard"))
    with pytest.raises(ConfigError, match=rf"resume=.*step-2: a checkpoint of another folder, and output_dir="
                                          rf"{other} holds checkpoints \(step-1, step-2\): resume=auto continues"):
        train.setup(load_config(_args(demo, other, resume=finished / "step-2", steps=3)))
    shutil.rmtree(other / "step-1")
    shutil.rmtree(other / "step-2")  # no checkpoints, but the records of another run up to step 2 (finished's)
    with pytest.raises(ConfigError, match=rf"resume=.*step-2: a checkpoint of another folder, and output_dir={other} "
                                          rf"holds another run's metrics up to its step 2"):
        train.setup(load_config(_args(demo, other, resume=finished / "step-2", steps=3)))
    monkeypatch.undo()  # models may load now
    (other / "metrics.jsonl").write_text("")  # as if a start from finished/step-2 had died before its first checkpoint
    run = train.setup(load_config(_args(demo, other, resume=finished / "step-2", steps=3)))  # the same command
    assert run.start_step == 2
    run.log.close()


def test_a_resume_that_cannot_continue_the_run_is_refused(demo, finished, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("step-1", "step-2", "config.yaml"):
        (out / name).symlink_to(finished / name)
    config = (finished / "config.yaml").read_bytes()
    (out / train.FINISHED).write_text(json.dumps({"step": 0}))  # (a steps=0 run's) a refused start leaves it
    cases = [(dict(steps=1), r"at step 2, past steps=1"),
             (dict(teachers=""), r"the checkpoint is of an RIL run"),
             ({"batch.questions_per_step": 4}, r"questions_per_step=2, this run has 4")]
    for change, message in cases:
        with pytest.raises(ConfigError, match=message):
            train.setup(load_config(_args(demo, out, **change)))
        assert (finished / "config.yaml").read_bytes() == config
        assert json.loads((out / train.FINISHED).read_text()) == {"step": 0}


def test_a_resume_with_another_student_architecture_is_refused_before_any_model_loads(demo, finished, tmp_path,
                                                                                       monkeypatch):
    """student= of another architecture than the checkpoint's: one line naming both, not DCP's size mismatch after
    every model has loaded; the same student in another folder goes on."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / train.FINISHED).unlink()
    other = make_tiny(tmp_path / "qwen3_vl", arch="qwen3_vl")
    with monkeypatch.context() as m:
        _no_models(m)
        with pytest.raises(ConfigError, match=rf"resume=.*step-2: the checkpoint's student \(qwen2_5_vl, [\d,]+ "
                                              rf"parameters\) is not student={other} \(qwen3_vl, [\d,]+ parameters\)"):
            train.setup(load_config(_args(demo, out, steps=3, student=other)))
    with monkeypatch.context() as m:  # no student at all: preflight's own words, not transformers' traceback
        _no_models(m)
        with pytest.raises(ConfigError, match=r"student=.*nowhere: cannot open the model folder: no such folder"):
            train.setup(load_config(_args(demo, out, steps=3, student=tmp_path / "nowhere")))
    moved = shutil.copytree(demo.student, tmp_path / "moved")
    run = train.setup(load_config(_args(demo, out, steps=3, student=moved)))
    assert run.start_step == 2
    run.log.close()


def test_settings_changed_on_resume_apply_to_the_optimisers(demo, finished, tmp_path, capsys):
    """The checkpoint's param groups carry the old rates; the resumed run takes the new ones at the
    schedule's current point (with another mu, the same step's point of the new steps × mu updates), and says
    which settings changed."""
    args = _args(demo, finished, steps=4, mu=2, resume=finished / "step-2", **{
        "optim.lr": 1e-3, "optim.weight_decay": 0.5, "optim.beta1": 0.8, "disc.lr": 2e-4, "disc.weight_decay": 0.2})
    run = train.setup(load_config(args + ["output_dir=" + str(tmp_path / "run")]))
    said = capsys.readouterr().out
    assert (f"resuming from {finished / 'step-2'} (step 2 of 4); settings changed since: steps, mu, output_dir, "
            f"resume, optim.lr, optim.weight_decay, optim.beta1, disc.lr, disc.weight_decay\n") in said
    cfg = run.cfg
    assert cfg.mu == 2 and yaml.safe_load((finished / "config.yaml").read_text()).get("mu", 1) == 1
    group = run.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(1e-3 * lr_factor(2 * cfg.mu, cfg.optim.warmup_steps, 4 * cfg.mu), rel=1e-12)
    assert (group["weight_decay"], group["betas"][0], group["initial_lr"]) == (0.5, 0.8, 1e-3)
    assert run.scheduler.get_last_lr() == [group["lr"]]
    assert {(g["lr"], g["weight_decay"]) for g in run.disc_optimizer.param_groups} == {(2e-4, 0.2)}
    run.scheduler.step()  # the schedule goes on from the new peak
    assert group["lr"] == pytest.approx(1e-3 * lr_factor(2 * cfg.mu + 1, cfg.optim.warmup_steps, 4 * cfg.mu))
    run.log.close()


def test_a_finished_run_has_nothing_to_redo(demo, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    handlers = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
    train.main(_args(demo, out, steps=3, checkpoint_every=2))
    assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == handlers  # given back after the run
    assert sorted(p.name for p in out.glob("step-*")) == ["step-2", "step-3"]  # the last step is saved too
    before, config = read_metrics(out / "metrics.jsonl"), (out / "config.yaml").read_bytes()
    capsys.readouterr()
    _no_models(monkeypatch)  # said before any model loads (minutes for a 7B student)
    how = {"keep_checkpoints": 1, "progress": "true", "batch.activation_checkpointing": "true"}  # not what it made
    assert train.main(_args(demo, out, steps=3, checkpoint_every=2, **how)) == out
    assert "nothing to do: the run in" in capsys.readouterr().out
    assert read_metrics(out / "metrics.jsonl") == before
    assert (out / "config.yaml").read_bytes() == config  # the settings it ran with, not the unused new ones
    # resume=DIR names the checkpoint to go on from: nothing to do only from the last step's
    for step, done in ((3, True), (2, False)):
        cfg = load_config(_args(demo, out, steps=3, resume=out / f"step-{step}"))
        assert lifecycle.finished(cfg, out / f"step-{step}") is done


def test_a_finished_run_with_other_settings_is_refused_before_any_model_loads(demo, finished, tmp_path, monkeypatch):
    """A finished output_dir given settings that change what the run makes (the RL-only ablation, another seed, G
    or rate) is refused in one line naming them, not answered "nothing to do" (as if it were that run); with more
    steps, a checkpoint of the other mode is refused before any model loads (it was after every model had loaded).
    A setting its config.yaml lacks (written before the setting existed) counts only where this run sets it."""
    _no_models(monkeypatch)
    config = (finished / "config.yaml").read_bytes()
    cases = [(dict(teachers=""), "teachers"), (dict(seed=1), "seed"), (dict(group_size=3), "group_size"),
             ({"optim.lr": 0.01, "seed": 1}, "seed, optim.lr")]
    for change, named in cases:
        with pytest.raises(ConfigError) as refused:
            train.setup(load_config(_args(demo, finished, **change)))
        assert str(refused.value) == (f"the run in {finished} finished with other settings ({named}): choose "
                                      f"another output_dir")
    with pytest.raises(ConfigError, match=r"step-2: the checkpoint is of an RIL run \(teachers=...\), this run is "
                                          r"not: use another output_dir$"):
        train.setup(load_config(_args(demo, finished, steps=3, teachers="")))
    assert (finished / "config.yaml").read_bytes() == config
    assert json.loads((finished / train.FINISHED).read_text()) == {"step": 2}
    older = tmp_path / "older"
    shutil.copytree(finished, older)
    saved = yaml.safe_load(config)
    del saved["long_prompts"]  # as an earlier release wrote it
    (older / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(lifecycle.NothingToDo):
        train.setup(load_config(_args(demo, older)))
    with pytest.raises(ConfigError, match=r"finished with other settings \(long_prompts\)"):
        train.setup(load_config(_args(demo, older, long_prompts="skip")))


def test_the_held_out_examples_left_out_are_said(demo, capsys):
    """eval_max_examples takes the eval file's first lines: how many of how many is printed."""
    _, _, held_out, _ = preflight.load_data(load_config(_args(demo, "unused")), distributed.init())
    assert len(held_out) == 2 and f"held-out: the first 2 of the 4 examples of {demo.test}" in capsys.readouterr().out
    _, _, held_out, _ = preflight.load_data(load_config(_args(demo, "unused", eval_max_examples=0)), distributed.init())
    assert len(held_out) == 4 and "held-out:" not in capsys.readouterr().out


def test_teacher_lines_repeated_word_for_word_are_said(demo, tmp_path, capsys):
    """A teacher collection copied in twice: said with its first repeated line, before any model loads."""
    rows = [json.loads(line) | {"index": 0} for line in demo.teachers[0].read_text().splitlines()]
    twice = tmp_path / "teacher_concise.jsonl"
    twice.write_text("".join(json.dumps(r) + "\n" for r in rows + rows))
    preflight.load_data(load_config(_args(demo, "unused", teachers=f"{twice},{demo.teachers[1]}")), distributed.init())
    assert (f"{len(rows)} teacher lines repeat an earlier line's teacher, id, index and response word for word (the "
            f"first: {twice}:{len(rows) + 1}): a collection copied in twice?" in capsys.readouterr().out)


def test_a_checkpoint_exports_the_students_generation_settings(demo, tmp_path):
    """Stop tokens and sampling defaults live in generation_config.json: final/ and an export from a checkpoint keep
    the student's (transformers would derive another from config.json: one stop token, no sampling defaults)."""
    from transformers import GenerationConfig

    from ril_fast.export import main as export_main

    student = shutil.copytree(demo.student, tmp_path / "student")
    settings = dict(eos_token_id=[2, 0], do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    GenerationConfig(**settings).save_pretrained(student)
    out = tmp_path / "run"
    train.main(_args(demo, out, student=student, steps=1))
    export_main([str(out / "step-1"), str(tmp_path / "exported")])
    for folder in (out / "final", tmp_path / "exported"):
        saved = GenerationConfig.from_pretrained(folder).to_dict()
        assert {k: saved[k] for k in settings} == settings, folder


def test_an_exported_discriminator_keeps_the_runs_pool(demo, tmp_path):
    """The discriminator of a disc.pool=mean run, exported from a checkpoint, pools by the mean (disc_head.json),
    so it scores responses as the checkpoint's discriminator does (not by the default last token)."""
    from ril_fast.discriminator import Discriminator
    from ril_fast.export import main as export_main

    args = _args(demo, tmp_path / "run", steps=1, **{"disc.pool": "mean"})
    train.main(args)
    export_main([str(tmp_path / "run" / "step-1"), str(tmp_path / "student"), "--disc", str(tmp_path / "disc")])
    assert json.loads((tmp_path / "disc" / "disc_head.json").read_text()) == {"pool": "mean"}
    exported, _ = Discriminator.load(tmp_path / "disc")
    run = train.setup(load_config(args + ["steps=2"]))  # the checkpoint's discriminator, as the trainer holds it
    assert run.start_step == 1 and exported.weight.abs().sum() > 0  # trained: the pooling shows in the scores
    samples, _, _, _ = train.collect_outputs(run, next(run.batches), seed=0)
    micro, _ = train._micro(run, samples)
    assert torch.equal(disc_probs(exported, micro, len(samples)), disc_probs(run.disc, micro, len(samples)))
    run.log.close()


def test_a_ranks_own_data_error_is_said_by_that_rank():
    """Set-up's errors are every rank's: rank 0 says them, the others exit 1. A step's data error comes from one rank's
    own questions: that rank says it, whichever it is (rank 2's was lost behind gloo's 'connection closed'); so does a
    model ril_fast cannot train found out in one rank's forward (a sliding window its own sample outgrows), and a judge
    server failing for good on one rank's requests."""
    from ril_fast.data import StepDataError
    from ril_fast.processor import UnsupportedModel

    setup_error, step_error = DataError("t.jsonl:3: bad"), StepDataError("t.jsonl:7: cannot read image 'a.png'")
    assert [lifecycle.exit_status(setup_error, rank) for rank in (0, 2)] == ["error: t.jsonl:3: bad", 1]
    assert [lifecycle.exit_status(step_error, rank) for rank in (0, 2)] == [
        "error: t.jsonl:7: cannot read image 'a.png'", "error (rank 2): t.jsonl:7: cannot read image 'a.png'"]
    window = UnsupportedModel("MistralAttention attends within a sliding window of 8 tokens")
    assert [lifecycle.exit_status(window, rank) for rank in (0, 2)] == [f"error: {window}", f"error (rank 2): {window}"]
    judge = HTTPError("POST http://j/v1/chat/completions: failed 4 times (timeout 60.0 s, 3 retries); last failure: "
                      "HTTP 503")  # each rank judges its own samples
    assert [lifecycle.exit_status(judge, rank) for rank in (0, 2)] == [
        f"error{where}: the judge failed: {judge} (the same command run again goes on from output_dir's newest "
        f"checkpoint, if it has one)"
        for where in ("", " (rank 2)")]


def test_a_judge_server_failing_for_good_mid_run_is_one_line(demo, tmp_path):
    """``python -m ril_fast.train`` with judge=http: a server that answers the start-up check but fails every judging
    request (HTTP 500, no retries) stops the run at step 1 with one line naming the server and what to do, no
    traceback."""
    rows = [json.loads(line) for line in demo.train.read_text().splitlines()]
    train_data = demo.train.parent / "judge_fails.jsonl"  # beside the images its paths are relative to
    train_data.write_text("".join(json.dumps(dict(r, question=r["question"] + " FAULT:500")) + "\n" for r in rows))
    with FakeOpenAI() as server:
        done = subprocess.run([sys.executable, "-m", "ril_fast.train",
                               *_args(demo, tmp_path / "run", train_data=train_data, teachers="", eval_data="",
                                      judge="http", judge_url=server.url, judge_model="fake-model", judge_retries=0)],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: the judge failed: POST {server.url}/chat/completions: failed 1 times"), done.stderr
    assert last.endswith("last failure: HTTP 500: '{\"error\": \"injected server error\"}' (the same command run "
                         "again goes on from output_dir's newest checkpoint, if it has one)")
    assert "Traceback" not in done.stderr


def test_a_ranks_own_set_up_check_is_raised_on_every_rank(monkeypatch):
    """The checks each rank makes of its own surroundings (a judge server another node cannot reach): the first
    rank's refusal is every rank's, naming that rank, so rank 0 says it and no rank waits in a collective. A second
    rank is simulated by the gather."""
    problem = "judge_url=http://localhost:8000/v1: the judge server cannot be used: connection refused"
    monkeypatch.setattr(preflight, "_surroundings", lambda cfg, dist: "the verdict store")
    monkeypatch.setattr(preflight.distributed, "all_gather_objects", lambda mine: [mine, problem])
    with pytest.raises(ConfigError) as e:
        preflight.check_surroundings(None, None)
    assert str(e.value) == problem + " (on rank 1)"
    monkeypatch.setattr(preflight.distributed, "all_gather_objects", lambda mine: [mine, None])
    assert preflight.check_surroundings(None, None) == "the verdict store"
    monkeypatch.setattr(preflight, "_surroundings", lambda cfg, dist: (_ for _ in ()).throw(
        ConfigError("judge_model=x: no such folder")))
    with pytest.raises(ConfigError, match=r"^judge_model=x: no such folder$"):  # this rank's own, first
        preflight.check_surroundings(None, None)


def test_an_output_dir_in_use_is_refused_on_every_rank(demo, tmp_path):
    """output_dir's lock is rank 0's; its refusal is raised on every rank (the others died of gloo tracebacks)."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "ril_fast.train", *_args(demo, out)], capture_output=True, text=True, env=env,
                              timeout=300)
    assert done.returncode != 0
    assert f"error: output_dir={out} is in use by another process" in done.stderr, done.stderr[-3000:]
    assert "Connection closed" not in done.stderr and "[rank1]" not in done.stderr, done.stderr[-3000:]


def test_a_finished_run_going_on_keeps_its_last_evaluation(demo, finished, tmp_path):
    """Raising steps on a finished run: its record keeps the held-out evaluation after its last step (which the
    longer run will not repeat), then the new steps and their own final evaluation."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    before = read_metrics(out / "metrics.jsonl")
    assert [(r["step"], "loss" in r, "eval_accuracy" in r) for r in before] == [
        (0, False, True), (1, True, False), (2, True, False), (2, False, True)]
    train.main(_args(demo, out, steps=3))
    after = read_metrics(out / "metrics.jsonl")
    assert after[:4] == before
    assert [(r["step"], "loss" in r, "eval_accuracy" in r) for r in after[4:]] == [(3, True, False), (3, False, True)]


def test_a_finished_run_without_checkpoints_is_not_trained_again(demo, tmp_path, capsys, monkeypatch):
    """checkpoint_every=0 writes no checkpoint: run again, the finished run has nothing to do (it used to be
    trained again from scratch over its own record); with more steps it is refused, having nothing to
    continue from; resume=none trains afresh."""
    out = tmp_path / "run"
    train.main(_args(demo, out, steps=2, checkpoint_every=0))
    assert not list(out.glob("step-*"))
    before = read_metrics(out / "metrics.jsonl")
    capsys.readouterr()
    with monkeypatch.context() as m:
        _no_models(m)
        assert train.main(_args(demo, out, steps=2, checkpoint_every=0)) == out
        assert "nothing to do: the run in" in capsys.readouterr().out
        assert read_metrics(out / "metrics.jsonl") == before
        with pytest.raises(ConfigError, match=r"finished at step 2 with no checkpoint \(checkpoint_every=0"):
            train.setup(load_config(_args(demo, out, steps=3, checkpoint_every=0)))
    train.main(_args(demo, out, steps=1, checkpoint_every=0, resume="none"))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1]


def _stop_asked_at(monkeypatch, step: int, where: str) -> None:
    """A SIGTERM during ``step`` (``where="step"``) or during its checkpoint's save ("save"), to the handler
    installed then (the default one would end the process)."""
    name, module = ("train_step", train) if where == "step" else ("save_checkpoint", lifecycle)
    real = getattr(module, name)

    def asked(run, at, *args, **kwargs):
        if at == step:
            handler = signal.getsignal(signal.SIGTERM)
            assert callable(handler), f"a SIGTERM would end the process in step {at}'s {where}"
            handler(signal.SIGTERM, None)
        return real(run, at, *args, **kwargs)
    monkeypatch.setattr(module, name, asked)


def test_finished_json_speaks_of_the_last_run_started_there(demo, tmp_path, monkeypatch, capsys):
    """A start that trains deletes an earlier run's finished.json: a fresh run over a finished one, killed
    before it finishes, is not taken for finished (final/ may be half written). A run whose newest checkpoint
    is before its last step (checkpoint_every=0, stopped once by SIGTERM and resumed) is finished all the
    same: it used to be trained again from that checkpoint every time its command was run."""
    out = tmp_path / "run"
    train.main(_args(demo, out, checkpoint_every=0))
    with monkeypatch.context() as m:
        m.setattr(train, "train_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("killed")))
        with pytest.raises(RuntimeError, match="killed"):
            train.main(_args(demo, out, checkpoint_every=0, resume="none", seed=6))
    assert not (out / train.FINISHED).exists()
    capsys.readouterr()
    with monkeypatch.context() as m:
        _stop_asked_at(m, 1, "step")
        with pytest.raises(SystemExit, match="stopped by SIGTERM after step 1"):
            train.main(_args(demo, out, checkpoint_every=0, resume="none", seed=6))
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step-1"]
    train.main(_args(demo, out, checkpoint_every=0, seed=6))  # resumes, finishes without saving step 2
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step-1"]
    assert json.loads((out / train.FINISHED).read_text()) == {"step": 2}
    capsys.readouterr()
    _no_models(monkeypatch)
    assert train.main(_args(demo, out, checkpoint_every=0, seed=6)) == out
    assert "nothing to do: the run in" in capsys.readouterr().out
    # More steps: its newest checkpoint is older than the step it finished at, so going on from there would
    # train steps 2 again over the finished run's record; refused, as where it has no checkpoint at all.
    with pytest.raises(ConfigError, match=r"finished at step 2 with its newest checkpoint at step 1 "):
        train.setup(load_config(_args(demo, out, checkpoint_every=0, seed=6, steps=3)))


def test_a_sigterm_during_the_last_steps_save_keeps_it(demo, tmp_path, monkeypatch):
    """The last step's checkpoint (checkpoint_every not dividing steps) is saved with the signals still
    deferred: a SIGTERM then stops the run after it, and the same command exports without training again."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_asked_at(m, 3, "save")
        with pytest.raises(SystemExit, match=rf"stopped by SIGTERM after step 3: checkpoint {out / 'step-3'} written"):
            train.main(_args(demo, out, steps=3, checkpoint_every=2))
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step-2", "step-3"] and not (out / "final").exists()
    before = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    monkeypatch.setattr(train, "train_step", lambda *a, **k: pytest.fail("a step was trained again"))
    train.main(_args(demo, out, steps=3, checkpoint_every=2))
    assert json.loads((out / train.FINISHED).read_text()) == {"step": 3}
    assert [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == before


@pytest.mark.parametrize("cut", ["killed_while_exporting", "final_of_an_earlier_steps"])
def test_a_run_whose_export_is_not_of_its_last_step_exports_again(demo, finished, tmp_path, capsys, cut):
    """final/ counts as done only with finished.json naming the last step (written after the export): a run
    killed while exporting, or resumed at its last step beside an earlier run's final/, exports again."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    if cut == "killed_while_exporting":
        shutil.rmtree(out / "final")
        (out / "final").mkdir()
        (out / train.FINISHED).unlink()
    else:
        (out / train.FINISHED).write_text(json.dumps({"step": 1}))
    capsys.readouterr()
    train.main(_args(demo, out))
    assert "nothing to do" not in capsys.readouterr().out
    assert json.loads((out / train.FINISHED).read_text()) == {"step": 2}
    assert (out / "final" / "model.safetensors").read_bytes() == (finished / "final" / "model.safetensors").read_bytes()
    # It evaluates again too, in place of the killed run's last evaluation: one record of it, not two.
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "eval_accuracy" in r] == [0, 2]


def test_a_checkpoint_with_the_discriminators_single_param_group_resumes(demo, tmp_path, monkeypatch):
    """Checkpoints written before the discriminator's AdamW took ``distributed.optimizer_groups`` hold
    one param group: such a run resumes with it (DCP would miss the second group's keys) and finishes."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(train.distributed, "optimizer_groups", lambda model: model.parameters())  # the old optimizer
        train.main(_args(demo, out, steps=1))
    assert checkpoint.saved_param_groups(out / "step-1", "disc") == 1
    assert checkpoint.saved_param_groups(out / "step-1", "student") == 1
    run = train.setup(load_config(_args(demo, out, steps=2)))
    assert run.start_step == 1 and len(run.disc_optimizer.param_groups) == 1
    run.log.close()
    train.main(_args(demo, out, steps=2))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert checkpoint.saved_param_groups(out / "step-2", "disc") == 1  # and stays as it was saved
    fresh = tmp_path / "fresh"
    train.main(_args(demo, fresh, steps=1))
    assert checkpoint.saved_param_groups(fresh / "step-1", "disc") == 2  # DTensors, then the 0-d bias


def test_a_stop_after_the_last_evaluation_saves_the_step_where_output_dir_lacks_it(tmp_path, monkeypatch):
    """With checkpoint_every > 0 the last step is saved before its evaluation, but not by a run that resumed from
    another folder's last step: a stop there saves it (the message named a checkpoint that was not written)."""
    saves, stops = [], []
    monkeypatch.setattr(lifecycle, "save_checkpoint", lambda run, step: saves.append(step))
    monkeypatch.setattr(lifecycle, "_stop", lambda run, step, after: stops.append((step, after)))
    run = SimpleNamespace(stop_requested=[signal.SIGTERM], cfg=SimpleNamespace(output_dir=tmp_path),
                          dist=SimpleNamespace(device=torch.device("cpu")))
    lifecycle.checkpoint_if_asked(run, 2, saved=True, after="step 2's evaluation")  # none in output_dir
    (tmp_path / "step-2").mkdir()
    (tmp_path / "step-2" / "trainer.json").write_text('{"step": 2}')
    lifecycle.checkpoint_if_asked(run, 2, saved=True, after="step 2's evaluation")  # saved: not again
    lifecycle.checkpoint_if_asked(run, 2, saved=False, after="step 2's evaluation")
    assert saves == [2, 2] and stops == [(2, "step 2's evaluation")] * 3
    run.stop_requested.clear()
    lifecycle.checkpoint_if_asked(run, 2, saved=False, after="step 2's evaluation")  # no stop asked: nothing
    assert saves == [2, 2] and len(stops) == 3


def test_ctrl_c_stops_after_the_step_like_sigterm(capsys):
    """Each signal only asks for the stop (the step finishes, the checkpoint is written): under torchrun a
    rank gets a terminal's Ctrl-C twice, from the terminal and from torchrun."""
    run = SimpleNamespace(stop_requested=[], dist=SimpleNamespace(is_main=True), exporting=False)
    for _ in range(2):
        lifecycle.request_stop(run, signal.SIGINT)
    lifecycle.request_stop(run, signal.SIGTERM)
    assert run.stop_requested == [signal.SIGINT, signal.SIGINT, signal.SIGTERM]
    assert capsys.readouterr().out.count("Ctrl-C: stopping after this step") == 1
    run = SimpleNamespace(stop_requested=[], dist=SimpleNamespace(is_main=True), exporting=True)
    lifecycle.request_stop(run, signal.SIGTERM)  # past the last evaluation: the export finishes, nothing is saved
    assert capsys.readouterr().out == "\nSIGTERM: the run ends once final/ is written (its last work); nothing else " \
                                      "is saved\n"


def test_run_counters_survive_a_resume_on_another_number_of_ranks(demo, finished, tmp_path):
    """skipped_steps, bad_in_a_row and the discriminator's pre-training steps are the run's (every rank has the
    same): they are in trainer.json, so a resume that cannot match the per-rank files (another rank count) keeps
    them. Here a checkpoint of 2 ranks resumed by 1: its rank-0.json is there but is another layout's rank 0, so
    neither its counters nor its random streams are taken (rank 0's file of a 1-rank run would be)."""
    out = tmp_path / "run"
    shutil.copytree(finished / "step-2", out / "step-2")
    trainer = json.loads((out / "step-2" / "trainer.json").read_text())
    assert trainer["counters"] == {"skipped_steps": 0, "bad_in_a_row": 0, "pretrained": 1}
    trainer["counters"] = {"skipped_steps": 2, "bad_in_a_row": 1, "pretrained": 1}
    trainer["world_size"] = 2  # as when resuming on another number of ranks
    (out / "step-2" / "trainer.json").write_text(json.dumps(trainer))
    shutil.copy(out / "step-2" / "rank-0.json", out / "step-2" / "rank-1.json")
    assert json.loads((out / "step-2" / "rank-0.json").read_text())["counters"]["questions"] > 0
    with pytest.warns(UserWarning, match="written by 2 ranks, this run has 1: .*the random streams start afresh"):
        run = train.setup(load_config(_args(demo, out, steps=3)))
    assert run.counters == {"skipped_steps": 2, "bad_in_a_row": 1, "questions": 0, "pretrained": 1}
    assert run.rng.getstate() == random.Random(f"{run.cfg.seed}:0").getstate()  # a fresh run's stream
    run.log.close()


def test_a_resume_restores_the_ranks_teacher_rotation(demo, tmp_path):
    """group_size=3 over the demo's 2 teachers: which teacher gets a group's third output rotates with the rank's
    count of questions drawn (its own, in rank-R.json). A resume takes it back, odd here (step 0 saved after one
    pre-training question): the next question's extra output goes to the second teacher, as in a run never stopped
    (from a count of 0 it would go to the first)."""
    args = _args(demo, tmp_path / "run", steps=0, group_size=3, **{"batch.questions_per_step": 1})
    train.main(args)
    saved = json.loads((tmp_path / "run" / "step-0" / "rank-0.json").read_text())["counters"]
    assert saved == {"skipped_steps": 0, "bad_in_a_row": 0, "questions": 1, "pretrained": 1}
    run = train.setup(load_config(args + ["steps=1"]))
    assert run.start_step == 0 and run.counters == saved
    questions = next(run.batches)
    first, second = [name for name, responses in run.bank.responses(questions[0].id).items() if responses]
    _, sources, _, _ = train.collect_outputs(run, questions, seed=0)
    assert [s for s in sources if s != STUDENT] == [first, second, second]
    run.log.close()


def test_dropout_is_off_in_every_model(demo, tmp_path):
    """A student whose config has dropout: the trainer's models run without it (eval mode), so π_old is the
    sampling policy and two scoring passes agree exactly."""
    student = tmp_path / "student"
    shutil.copytree(demo.student, student)
    config = json.loads((student / "config.json").read_text())
    config["text_config"]["attention_dropout"] = 0.5
    (student / "config.json").write_text(json.dumps(config))
    run = train.setup(load_config(_args(demo, tmp_path / "run", student=student, beta=0.1)))
    assert run.student.module.config.text_config.attention_dropout == 0.5
    for model in (run.student, run.disc, run.reference):
        assert not any(m.training for m in model.modules())
    samples, _, _, _ = train.collect_outputs(run, next(run.batches), seed=0)
    micro, _ = train._micro(run, samples)
    first, second = (frozen_logprobs(run.student, micro, 1.0) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    scores = [disc_probs(run.disc, micro, len(samples)) for _ in range(2)]
    assert torch.equal(*scores)
    run.log.close()


def test_the_rollout_renders_each_prompt_once(demo, tmp_path):
    """bench/_probe.py counts the rollout's prefill and image FLOPs from the prompts the processor renders:
    one per question, however the trainer checks them."""
    run = train.setup(load_config(_args(demo, tmp_path / "run", **{"batch.questions_per_step": 4})))
    rendered = []
    inner = run.processor

    class Counting:
        def __getattr__(self, name):
            return getattr(inner, name)

        def encode_prompt(self, question, images=None):
            rendered.append(question)
            return inner.encode_prompt(question, images)

    run.processor = Counting()
    questions = next(run.batches)
    train.collect_outputs(run, questions, seed=0)
    assert sorted(rendered) == sorted(q.question for q in questions)
    run.log.close()
