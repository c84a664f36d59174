"""Bad input and faults met by the trainer itself (issue 6): each gives an error that names the file and
line, or the setting to change; none is dropped silently. Line-level checks of the JSONL files are in
tests/test_data.py; docs/bad_inputs.md lists every case and its test."""

import json
import math

import pytest
import torch
from models_fixtures import one_thread  # noqa: F401

import ril_fast.train as train
from ril_fast.data import DataError, StepDataError
from ril_fast.demo import build_demo
from ril_fast.metrics import read_metrics


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):  # noqa: F811
    return build_demo(tmp_path_factory.mktemp("demo"), max_train=16, max_test=4)


def _args(demo, out, **extra) -> list[str]:
    args = {"student": demo.student, "train_data": demo.train, "teachers": ",".join(map(str, demo.teachers)),
            "eval_data": "", "steps": 4, "group_size": 2, "max_new_tokens": 11, "output_dir": out,
            "progress": "false", "batch.questions_per_step": 2, "disc.pretrain_steps": 0, "checkpoint_every": 0}
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def _line_of(path, example_id) -> int:
    lines = open(path).read().splitlines()
    return next(n for n, line in enumerate(lines, 1) if line.strip() and json.loads(line)["id"] == example_id)


def test_an_example_without_teacher_response_names_its_line(demo, tmp_path):
    rows = [json.loads(line) for line in open(demo.teachers[0])]
    dropped = rows[5]["id"]
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] != dropped))
    with pytest.raises(DataError) as e:
        train.main(_args(demo, tmp_path / "run", teachers=partial))
    assert str(e.value).startswith(f"{demo.train}:{_line_of(demo.train, dropped)}: example {dropped!r} has no "
                                   f"response in any teacher collection (1 such examples); RIL needs")
    assert str(e.value).endswith("collect them (python -m ril_fast.teacher appends what a file lacks) or drop the "
                                 "examples")
    # Several: the first few others are named too.
    gone = [rows[i]["id"] for i in (2, 5, 7, 9, 11, 13)]
    several = tmp_path / "several.jsonl"
    several.write_text("".join(json.dumps(r) + "\n" for r in rows if r["id"] not in gone))
    with pytest.raises(DataError) as e:
        train.main(_args(demo, tmp_path / "run", teachers=several))
    assert f"example {gone[0]!r} has no response in any teacher collection (6 such examples: also {gone[1]!r}, " \
           f"{gone[2]!r}, {gone[3]!r}, ...); RIL needs" in str(e.value)
    # Its responses there but every one marked truncated (left out): the message says so, naming the first line.
    marked = tmp_path / "marked.jsonl"
    marked.write_text("".join(json.dumps(r | {"truncated": r["id"] == dropped}) + "\n" for r in rows))
    first = 1 + next(i for i, r in enumerate(rows) if r["id"] == dropped)
    with pytest.raises(DataError) as e:
        train.main(_args(demo, tmp_path / "run", teachers=marked))
    assert str(e.value).startswith(f"{demo.train}:{_line_of(demo.train, dropped)}: example {dropped!r} has no "
                                   f"response in any teacher collection (1 such examples); ")
    assert f"; its {sum(r['id'] == dropped for r in rows)} responses were all marked truncated and left out (the " \
           f"first: {marked}:{first}): " in str(e.value) and "--redo-truncated" in str(e.value)
    # Another example's truncated line (beside its whole one) says nothing about this one, which has no line.
    other = next(r for r in rows if r["id"] != dropped)
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_text(partial.read_text() + json.dumps(other | {"truncated": True}) + "\n")
    with pytest.raises(DataError) as e:
        train.main(_args(demo, tmp_path / "run", teachers=elsewhere))
    assert "has no response in any teacher collection (1 such examples); RIL needs" in str(e.value)


def test_a_teacher_response_longer_than_the_budget_names_its_line(demo, tmp_path):
    with pytest.raises(DataError) as e:
        train.main(_args(demo, tmp_path / "run", max_new_tokens=6))
    assert str(e.value).startswith(f"{demo.teachers[1]}:")  # the verbose teacher writes up to 11 tokens
    assert "more than max_new_tokens=6" in str(e.value)


def test_a_prompt_longer_than_the_budget_names_its_line(demo, tmp_path):
    with pytest.raises(DataError) as e:
        train.main(_args(demo, tmp_path / "run", **{"batch.max_tokens": 20}))
    message = str(e.value)
    where = message.split(": the prompt takes")[0]
    path, line = where.rsplit(":", 1)
    assert path == str(demo.train) and 1 <= int(line) <= 16
    assert "exceeds batch.max_tokens (20 tokens): raise batch.max_tokens" in message


def test_the_steps_own_length_check_names_the_line(demo):
    """Each step checks its encoded prompts again (an image file replaced since the data was read would escape
    the check before loading, which counts from the sizes it read then)."""
    from types import SimpleNamespace

    from transformers import AutoConfig

    cfg = train.load_config(_args(demo, "unused", **{"batch.max_tokens": 90}))
    run = SimpleNamespace(cfg=cfg, student=SimpleNamespace(config=AutoConfig.from_pretrained(demo.student)))
    samples = [{"where": "a.jsonl:3", "images": []}, {"where": "a.jsonl:9", "images": ["img/a.png"]}]
    train._check_lengths(run, samples[:1], [SimpleNamespace(prompt_len=79)])  # 79 + 11 = 90 fits
    with pytest.raises(StepDataError) as e:  # one rank's own questions: that rank says it (lifecycle.exit_status)
        train._check_lengths(run, samples, [SimpleNamespace(prompt_len=79), SimpleNamespace(prompt_len=80)])
    assert str(e.value) == ("a.jsonl:9: the prompt takes 80 tokens (images included); with max_new_tokens=11 that "
                            "exceeds batch.max_tokens (90 tokens): raise batch.max_tokens, lower max_new_tokens, use "
                            "fewer or smaller images, or drop the example")
    # The model's own limit, the smaller (preflight.length_limit): here LongRoPE's original context, which nothing
    # but this check guards while training (the attention has no check of its own for it).
    longrope = AutoConfig.for_model("phi3", hidden_size=64, num_attention_heads=4, original_max_position_embeddings=64,
                                    rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 8,
                                                      long_factor=[4.0] * 8))
    run.student = SimpleNamespace(config=longrope)
    with pytest.raises(StepDataError) as e:
        train._check_lengths(run, samples[:1], [SimpleNamespace(prompt_len=54)])  # 54 + 11 > 64
    assert str(e.value) == ("a.jsonl:3: the prompt takes 54 tokens (images included); with max_new_tokens=11 that "
                            "exceeds the model's original context (LongRoPE) (64 tokens): lower max_new_tokens, "
                            "shorten the question, or drop the example")
    # A prompt the processor refuses at the step (an image changed since the checks) is named alike.
    processor = SimpleNamespace(encode_prompt=lambda question, images: (_ for _ in ()).throw(
        ValueError(f"cannot read image {images[0]}: image file is truncated")) if images else None)
    questions = [SimpleNamespace(question="q?", images=[], where="a.jsonl:2"),
                 SimpleNamespace(question="q?", images=["img/x.png"], where="a.jsonl:5")]
    with pytest.raises(StepDataError, match=r"^a\.jsonl:5: cannot read image img/x\.png: image file is truncated"):
        train._name_the_failing_prompt(SimpleNamespace(processor=processor), questions)


def test_non_finite_updates_are_skipped_then_stop_the_run(demo, tmp_path, monkeypatch):
    real = train.policy_pass
    poisoned_steps = []

    def poisoned(model, *args, **kwargs):  # a gradient that overflowed, from the second update on
        stats = real(model, *args, **kwargs)
        poisoned_steps.append(len(poisoned_steps) + 1)
        if len(poisoned_steps) >= 2:
            grad = next(p for p in model.parameters() if p.grad is not None).grad
            (grad.to_local() if hasattr(grad, "to_local") else grad).view(-1)[0] = math.inf
        return stats

    monkeypatch.setattr(train, "policy_pass", poisoned)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"stopping at step 4: 3 optimizer steps in a row had a non-finite"):
        train.main(_args(demo, out, steps=10, max_bad_steps=3))
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["skipped"], r["skipped_steps"]) for r in steps] == [(1, 0.0, 0), (2, 1.0, 1), (3, 1.0, 2)]
    assert math.isinf(steps[-1]["grad_norm"])
    assert not (out / "final").exists()


PREFLIGHT = " (python -m ril_fast.preflight estimates what an update micro-batch keeps for its backward)"


def test_out_of_memory_names_the_micro_batch_and_the_setting(demo, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "policy_pass", oom)
    with pytest.raises(RuntimeError) as e:
        train.main(_args(demo, tmp_path / "run"))
    message = str(e.value)
    assert message.startswith("out of memory in the policy_update phase; its largest micro-batch holds ")
    tokens = int(message.split("holds ")[1].split(" tokens")[0])
    assert 0 < tokens <= 4096 and message.endswith("lower batch.max_tokens (now 4096), or set "
                                                   "batch.activation_checkpointing=true, "
                                                   "or batch.keep_gathered=false" + PREFLIGHT)  # one rank
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)


@pytest.mark.parametrize("where, phase, hint", [
    ("disc_pass", "pre-training disc_update", "its largest micro-batch holds "),
    ("sample_responses", "pre-training rollout", "lower rollout.batch_size (now 64 sequences per generate call)"),
    ("evaluate", "evaluation", "lower rollout.batch_size (now 64 sequences per generate call)"),
])
def test_out_of_memory_before_the_first_step_names_the_setting(demo, tmp_path, monkeypatch, where, phase, hint):
    """The discriminator's pre-training (a real run's first heavy work: 50 steps in docs/real_student.yaml) and the
    evaluations say what to lower too, not CUDA's traceback alone."""
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, where, oom)
    extra = {"disc.pretrain_steps": 1} if where != "evaluate" else {"eval_data": demo.test, "eval_max_examples": 2}
    with pytest.raises(RuntimeError) as e:
        train.main(_args(demo, tmp_path / "run", **extra, **{"rollout.batch_size": 64}))
    assert str(e.value).startswith(f"out of memory in the {phase} phase; {hint}"), str(e.value)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)


def _oom_cfg(**batch):
    from types import SimpleNamespace

    batch = {"max_tokens": 4096, "activation_checkpointing": False, "keep_gathered": True, "shard_ranks": 0, **batch}
    return SimpleNamespace(rollout=SimpleNamespace(batch_size=64), batch=SimpleNamespace(**batch))


def _explained(cfg, phase, micro) -> str:
    from ril_fast.faults import explain_oom

    with pytest.raises(RuntimeError) as e:
        with explain_oom(cfg, phase, micro):
            raise torch.OutOfMemoryError("CUDA out of memory")
    return str(e.value)


def test_out_of_memory_names_the_micro_batch_of_most_tokens_and_only_the_settings_that_apply(monkeypatch):
    """The largest micro-batch is the one of most tokens (not of most sequences); activation checkpointing is
    suggested only for an update phase where it is off, keep_gathered=false only for an update where it is on and a
    copy is one rank (with the student sharded over 2 ranks it is not kept gathered anyway)."""
    from types import SimpleNamespace

    from ril_fast import distributed

    micro = [SimpleNamespace(batch=SimpleNamespace(lengths=[10, 10, 10])), SimpleNamespace(batch=SimpleNamespace(
        lengths=[100]))]
    holds = "its largest micro-batch holds 100 tokens in 1 sequences: lower batch.max_tokens (now 4096)"
    assert _explained(_oom_cfg(), "policy_update", micro) == (
        f"out of memory in the policy_update phase; {holds}, or set batch.activation_checkpointing=true, or "
        f"batch.keep_gathered=false{PREFLIGHT}")
    assert _explained(_oom_cfg(), "reference_pass", micro) == f"out of memory in the reference_pass phase; {holds}"
    assert _explained(_oom_cfg(activation_checkpointing=True, keep_gathered=False), "disc_update", micro) == \
        f"out of memory in the disc_update phase; {holds}{PREFLIGHT}"
    monkeypatch.setattr(distributed, "shard_size", lambda shard_ranks: 2)
    assert _explained(_oom_cfg(activation_checkpointing=True), "policy_update", micro) == \
        f"out of memory in the policy_update phase; {holds}{PREFLIGHT}"


def test_skipped_steps_count_and_only_a_run_of_them_stops(tmp_path):
    """A finite step resets the run of skipped ones (two bad steps apart do not stop a run with max_bad_steps=2);
    ``skipped_steps`` counts the skipped ones only; the stop is the message on the main rank, status 1 on the
    others (the main rank says it)."""
    from types import SimpleNamespace

    from ril_fast.faults import count_skipped

    def run(is_main):
        return SimpleNamespace(counters={"skipped_steps": 0, "bad_in_a_row": 0}, dist=SimpleNamespace(is_main=is_main),
                               cfg=SimpleNamespace(max_bad_steps=2, output_dir=tmp_path))

    for is_main in (True, False):
        r = run(is_main)
        for step, skipped in enumerate([True, False, True, False], 1):
            count_skipped(r, skipped, step)
        assert r.counters == {"skipped_steps": 2, "bad_in_a_row": 0}
        count_skipped(r, True, 5)
        with pytest.raises(SystemExit) as e:
            count_skipped(r, True, 6)
        if is_main:
            assert str(e.value.code).startswith("stopping at step 6: 2 optimizer steps in a row had a non-finite")
        else:
            assert e.value.code == 1
        assert r.counters == {"skipped_steps": 4, "bad_in_a_row": 2}
