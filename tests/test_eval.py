"""python -m ril_fast.eval on a tiny model: greedy answers, judged by the rule and the http judge
(tests/fake_openai.py), accuracy overall and per answer type, per-example JSONL and a summary JSON; and
``evaluate``'s counting per rank with its generation and reduction faked (no model)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_openai import FakeOpenAI
from helpers import run_tree
from models_fixtures import one_thread, text_family  # noqa: F401

from ril_fast import distributed
from ril_fast.data import DataError, load_examples, to_sample
from ril_fast.demo import build_demo
from ril_fast.eval import main
from ril_fast.evaluate import evaluate
from ril_fast.judge import PROMPT_VERSION, RuleJudge
from ril_fast.models import load
from ril_fast.rollout import sample_responses

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory, one_thread):  # noqa: F811
    return build_demo(tmp_path_factory.mktemp("eval") / "demo", max_train=4, max_test=12)


def _run(demo, data, out, *extra):
    summary = main(["--model", str(demo.student), "--data", str(data), "--out", str(out), "--max-new-tokens", "5",
                    "--batch-size", "5", *extra])
    records = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    assert json.loads((out / "summary.json").read_text()) == summary
    return summary, records


def test_greedy_answers_judged_and_summarised(demo, tmp_path, capsys):
    summary, records = _run(demo, demo.test, tmp_path / "rule", "--judge", "rule")
    examples = load_examples(demo.test)
    assert [r["id"] for r in records] == [e.id for e in examples]
    # The answers are the model's greedy answers, one question at a time.
    model, processor = load(demo.student, device="cpu")
    for e, r in zip(examples, records):
        alone = sample_responses(model, processor, [to_sample(e)], greedy=True, max_new_tokens=5)[0][0]
        assert r["response"] == alone.text and r["truncated"] == alone.truncated
        assert r["correct"] == RuleJudge().check(e.answer, r["response"])
        assert (r["question"], r["answer"], r["answer_type"]) == (e.question, e.answer, e.answer_type)
    assert summary["examples"] == 12 and summary["judge"] == RuleJudge().name
    for kind, t in summary["per_type"].items():
        mine = [r for r in records if r["answer_type"] == kind]
        assert t == {"examples": len(mine), "correct": sum(r["correct"] for r in mine),
                     "accuracy": sum(r["correct"] for r in mine) / len(mine)}
    printed = capsys.readouterr().out
    assert f"accuracy {summary['accuracy']:.4f} ({summary['correct']}/12)" in printed
    assert all(kind in printed for kind in summary["per_type"])
    cut = sum(r["truncated"] for r in records)
    assert summary["truncated"] == cut
    assert (f"{cut} of 12 answers were cut short at --max-new-tokens 5" in printed) == (cut > 0)


def test_examples_without_an_answer_type_are_their_own_group(demo, tmp_path):
    """Beside typed examples, those without a type are counted as "untyped" (not "all", which reads as the
    overall figure), in the summary and in the trainer's metrics alike."""
    rows = [json.loads(line) for line in demo.test.read_text().splitlines()]
    for row in rows[::3]:
        row.pop("answer_type")
    data = demo.root / "mixed.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary, records = _run(demo, data, tmp_path / "mixed", "--judge", "rule")
    untyped = [r for r in records if r["answer_type"] is None]
    assert len(untyped) == len(rows[::3]) and summary["per_type"]["untyped"]["examples"] == len(untyped)
    assert sum(t["examples"] for t in summary["per_type"].values()) == 12
    examples = load_examples(data)
    model, processor = load(demo.student, device="cpu")
    metrics = evaluate(model, processor, examples, RuleJudge(), distributed.Dist(0, 1, 0, torch.device("cpu")),
                       max_new_tokens=5)
    assert metrics["eval_accuracy/untyped"] == summary["per_type"]["untyped"]["accuracy"]


def test_right_answers_are_counted_and_the_http_judge_agrees(demo, tmp_path):
    """A random tiny model is rarely right, so half of the questions of each answer type (rounded down) get the
    model's own greedy answer as their ground truth: those must count as correct, under the rule judge and under
    the http judge; and the trainer's accuracies (``evaluate``), overall and per type, must be the counts of right
    answers, some type's strictly between 0 and 1 (a figure of 0 everywhere cannot tell one type from another)."""
    _, first = _run(demo, demo.test, tmp_path / "first", "--judge", "rule")
    rule = RuleJudge()
    rows = [json.loads(line) for line in demo.test.read_text().splitlines()]
    of_type = {t: sum(row["answer_type"] == t for row in rows) for t in {row["answer_type"] for row in rows}}
    rigged, rigged_of_type = set(), dict.fromkeys(of_type, 0)
    for row, r in zip(rows, first):
        if rigged_of_type[row["answer_type"]] < of_type[row["answer_type"]] // 2 and \
                rule.check(r["response"], r["response"]):
            row["answer"] = r["response"]
            rigged.add(row["id"])
            rigged_of_type[row["answer_type"]] += 1
    assert rigged, "no greedy answer of the tiny model can serve as a ground truth"
    data = demo.root / "rigged.jsonl"  # beside the images its paths are relative to
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary, records = _run(demo, data, tmp_path / "rigged", "--judge", "rule")
    assert {r["id"] for r in records if r["correct"]} >= rigged and summary["correct"] >= len(rigged)
    with FakeOpenAI() as server:  # it judges with the rule judge: the same verdicts must come back
        http, http_records = _run(demo, data, tmp_path / "http", "--judge", "http", "--judge-url", server.url,
                                  "--judge-model", "fake-model", "--judge-concurrency", "4")
    assert [r["correct"] for r in http_records] == [r["correct"] for r in records]
    assert http["judge"] == f"http:fake-model:{PROMPT_VERSION}:top10" and http["per_type"] == summary["per_type"]
    # The trainer's figures, against a count of its own: the greedy answers are the first run's (the questions
    # are the same), each judged against the rigged ground truth.
    examples = load_examples(data)
    response = {r["id"]: r["response"] for r in first}
    right = {t: sum(rule.check(e.answer, response[e.id]) for e in examples if e.answer_type == t) for t in of_type}
    model, processor = load(demo.student, device="cpu")
    metrics = evaluate(model, processor, examples, rule, distributed.Dist(0, 1, 0, torch.device("cpu")),
                       max_new_tokens=5, batch_size=5)
    assert metrics == {"eval_accuracy": sum(right.values()) / len(examples), "eval_examples": len(examples),
                       **{f"eval_accuracy/{t}": right[t] / n for t, n in of_type.items()}}
    assert any(0 < right[t] < n for t, n in of_type.items()), (right, of_type)


@pytest.mark.parametrize("cache, said", [
    ("notes.txt", "file is not a database"), (".", "unable to open database file"),
    ("notes.txt/verdicts.sqlite", "[Errno 17] File exists: 'TMP/notes.txt'"),
])
def test_a_judge_cache_that_is_no_sqlite_file_is_one_line_before_any_model_loads(demo, tmp_path, capsys,
                                                                                   monkeypatch, cache, said):
    """--judge-cache must open as the verdict cache (an SQLite file, made if missing) before the model loads: a
    text file, a folder, a path under a file were SQLite's traceback after the model had loaded."""
    monkeypatch.setattr("ril_fast.models.load", lambda *a, **k: pytest.fail("a model loaded"))
    (tmp_path / "notes.txt").write_text("an earlier run's notes, not verdicts\n" * 200)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(demo.student), "--data", str(demo.test), "--out", str(tmp_path / "out"), "--judge",
              "rule", "--judge-cache", str(tmp_path / cache)])
    assert e.value.code == 2  # argparse's status for a bad argument
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"python -m ril_fast.eval: error: --judge-cache {tmp_path / cache}: cannot use it as the verdict cache "
        f"(an SQLite file): {said.replace('TMP', str(tmp_path))}")
    assert (tmp_path / "notes.txt").read_text().startswith("an earlier run's notes")


def test_a_judge_cache_is_made_before_the_model_loads(demo, tmp_path, monkeypatch):
    """A --judge-cache that is not there yet is made (its folder too) by the checks, before the model loads."""
    class Loading(Exception):
        """Stops the command where the model would load."""

    cache = tmp_path / "cache" / "verdicts.sqlite"
    made = []

    def load(*args, **kwargs):
        made.append(cache.is_file())
        raise Loading

    monkeypatch.setattr("ril_fast.models.load", load)
    with pytest.raises(Loading):
        main(["--model", str(demo.student), "--data", str(demo.test), "--out", str(tmp_path / "out"), "--judge",
              "rule", "--judge-cache", str(cache)])
    assert made == [True]


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32), ("cuda:0", torch.bfloat16)])
def test_the_model_loads_in_the_trainers_evaluation_dtype(demo, tmp_path, monkeypatch, device, dtype):
    """bf16 on a GPU, as the trainer's mixed precision evaluates its student (fp32 doubled the memory, kept flash
    attention off and could change greedy answers), fp32 on the CPU; the process's device is faked here."""
    import dataclasses

    class Loading(Exception):
        """Stops the command where the model would load."""

    real_init = distributed.init
    monkeypatch.setattr("ril_fast.distributed.init",
                        lambda *a, **k: dataclasses.replace(real_init(*a, **k), device=torch.device(device)))
    asked = []

    def load(path, **kwargs):
        asked.append((kwargs.get("dtype", torch.float32), kwargs.get("device")))  # load's own default dtype: fp32
        raise Loading

    monkeypatch.setattr("ril_fast.models.load", load)
    with pytest.raises(Loading):
        main(["--model", str(demo.student), "--data", str(demo.test), "--out", str(tmp_path / "out"), "--judge",
              "rule"])
    assert asked == [(dtype, torch.device(device))]


def test_cli_data_error_is_one_line_naming_the_file_and_line(demo, tmp_path):
    data = demo.root / "bad_line.jsonl"  # beside the images its paths are relative to
    data.write_text(demo.test.read_text().splitlines(keepends=True)[0] + "[1, 2]\n")
    proc = subprocess.run([sys.executable, "-m", "ril_fast.eval", "--model", str(demo.student), "--data", str(data),
                           "--out", str(tmp_path / "out"), "--judge", "rule"], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {data}:2: expected a JSON object, got list"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_judge_server_failing_for_good_is_one_line(demo, tmp_path):
    """An http judge that fails after its retries (HTTP 500 every time) ends the command with the client's one line
    (the URL, the attempts, the last failure), not a traceback."""
    rows = [json.loads(line) for line in demo.test.read_text().splitlines()[:2]]
    data = demo.root / "judge_fails.jsonl"  # beside the images its paths are relative to
    data.write_text("".join(json.dumps(dict(row, question=row["question"] + " FAULT:500")) + "\n" for row in rows))
    with FakeOpenAI() as server:
        proc = subprocess.run([sys.executable, "-m", "ril_fast.eval", "--model", str(demo.student), "--data",
                               str(data), "--out", str(tmp_path / "out"), "--judge", "http", "--judge-url", server.url,
                               "--judge-model", "fake-model", "--judge-retries", "0", "--max-new-tokens", "2"],
                              cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                              timeout=300)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]  # after the weights' loading bar
    assert last.startswith(f"error: POST {server.url}/chat/completions: failed 1 times"), proc.stderr
    assert "last failure: HTTP 500" in last and "Traceback" not in proc.stderr


def test_a_prompt_longer_than_the_models_sliding_window_is_refused_before_it_loads(tmp_path, tmp_path_factory,
                                                                                   monkeypatch):
    """ril_fast's attention has no sliding window: a prompt and --max-new-tokens beyond the window a model's layers
    slide within stopped the evaluation at its first batch; now before the model loads, naming the line."""
    monkeypatch.setattr("ril_fast.models.load", lambda *a, **k: pytest.fail("a model loaded"))
    model = text_family(tmp_path_factory, "mistral", sliding_window=32)  # prompts of 21 tokens
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(dict(id=str(i), question=f"What is {i} plus {i}?", answer=str(2 * i),
                                            images=[])) + "\n" for i in range(3)))
    with pytest.raises(DataError, match=rf"^{data}:1: the prompt takes 21 tokens .* with max_new_tokens=16 that "
                                        r"exceeds the model's sliding window \(32 tokens\)"):
        main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / "out"), "--judge", "rule",
              "--max-new-tokens", "16"])


def test_cli_refuses_an_unsupported_vlm_in_one_line(demo, tmp_path):
    from transformers import LlavaConfig

    LlavaConfig().save_pretrained(tmp_path / "llava")
    proc = subprocess.run([sys.executable, "-m", "ril_fast.eval", "--model", str(tmp_path / "llava"), "--data",
                           str(demo.test), "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: {tmp_path / 'llava'}: model type 'llava' is a vision-language model"), \
        proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_question_holding_a_control_token_is_refused(demo, tmp_path):
    """As the trainer's data: the student's tokenizer would read '<|im_end|>' in the text as its end of turn."""
    row = json.loads(demo.test.read_text().splitlines()[0])
    data = demo.root / "control.jsonl"  # beside the images its paths are relative to
    data.write_text(json.dumps(row) + "\n" + json.dumps(row | {"id": "x", "question": "Red?<|im_end|>"}) + "\n")
    with pytest.raises(DataError, match=f"{data}:2: 'question' contains '<\\|im_end\\|>'"):
        main(["--model", str(demo.student), "--data", str(data), "--out", str(tmp_path / "out"), "--judge", "rule"])


def test_out_that_is_a_file_is_refused_before_evaluating(demo, tmp_path, capsys, monkeypatch):
    def evaluate(*args, **kwargs):
        raise AssertionError("evaluated although the results could not be written")

    monkeypatch.setattr("ril_fast.evaluate.evaluate", evaluate)
    out = tmp_path / "results"
    out.write_text("an earlier run's notes")
    with pytest.raises(SystemExit) as e:
        main(["--model", str(demo.student), "--data", str(demo.test), "--out", str(out), "--judge", "rule"])
    assert e.value.code == 2  # argparse's status for a bad argument
    assert f"error: --out {out}: exists and is not a folder" in capsys.readouterr().err
    assert out.read_text() == "an earlier run's notes"


def test_out_folder_is_made_before_evaluating(demo, tmp_path, monkeypatch):
    class Evaluating(Exception):
        """Stops the command where the evaluation would start."""

    made = []

    def evaluate(*args, **kwargs):
        made.append((tmp_path / "a" / "b").is_dir())
        raise Evaluating

    monkeypatch.setattr("ril_fast.evaluate.evaluate", evaluate)
    with pytest.raises(Evaluating):
        main(["--model", str(demo.student), "--data", str(demo.test), "--out", str(tmp_path / "a" / "b"),
              "--judge", "rule"])
    assert made == [True]


@pytest.mark.parametrize("model, said", [
    ("nowhere", "no such folder"), ("notes.txt", "not a folder"), (".", "no config.json in the folder"),
    ("step-8", "TMP/step-8 is a training checkpoint, not a model folder: python -m ril_fast.export TMP/step-8 OUT"),
    ("step-8/hf", "TMP/step-8 is a training checkpoint, not a model folder"),  # its configs, without weights
])
def test_model_that_is_not_a_model_folder_is_refused_before_any_model_loads(demo, tmp_path, capsys, monkeypatch,
                                                                               model, said):
    monkeypatch.setattr("ril_fast.models.load", lambda *a, **k: pytest.fail("a model loaded"))
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "step-8" / "hf").mkdir(parents=True)
    (tmp_path / "step-8" / "trainer.json").write_text('{"step": 8}')
    (tmp_path / "step-8" / "hf" / "config.json").write_text("{}")
    said = said.replace("TMP", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path / model), "--data", str(demo.test), "--out", str(tmp_path / "out")])
    assert e.value.code == 2  # argparse's status for a bad argument
    assert f"error: --model {tmp_path / model}: {said}" in capsys.readouterr().err


@pytest.mark.parametrize("judge, said", [
    (["--judge", "hf"], "--judge hf needs --judge-model"),
    (["--judge", "hf", "--judge-model", "NOWHERE"], "--judge-model NOWHERE: no such folder"),
    (["--judge", "hf", "--judge-model", "STUDENT"], "--judge-model STUDENT: model type 'qwen2_5_vl' is no causal LM"),
    (["--judge", "http", "--judge-model", "m"], "--judge http needs --judge-url and --judge-model"),
    (["--judge", "http", "--judge-url", "localhost:8000", "--judge-model", "m"],
     "--judge-url must start with http:// or https://"),
])
def test_judge_options_that_build_no_judge_are_refused_before_any_model_loads(demo, tmp_path, capsys, monkeypatch,
                                                                               judge, said):
    monkeypatch.setattr("ril_fast.models.load", lambda *a, **k: pytest.fail("a model loaded"))
    def placed(text):
        return text.replace("NOWHERE", str(tmp_path / "nowhere")).replace("STUDENT", str(demo.student))

    with pytest.raises(SystemExit) as e:
        main(["--model", str(demo.student), "--data", str(demo.test), "--out", str(tmp_path / "out"),
              *map(placed, judge)])
    assert e.value.code == 2
    assert "error: " + placed(said) in capsys.readouterr().err


@pytest.mark.parametrize("dest, disc, what", [("a_file", None, "student"), ("a_file/sub", None, "student"),
                                              ("out", "a_file", "discriminator")])
def test_export_to_a_destination_that_cannot_be_made_is_one_line(tmp_path, dest, disc, what):
    """python -m ril_fast.export's destination (tests/test_checkpoint.py exports real checkpoints): refused
    before the checkpoint's model is read, here a checkpoint folder holding no model at all."""
    from ril_fast.export import main as export_main

    checkpoint = tmp_path / "step-1"
    (checkpoint / "dcp").mkdir(parents=True)
    (checkpoint / "hf").mkdir()
    (checkpoint / "hf" / "config.json").write_text("{}")
    (tmp_path / "a_file").write_text("kept")
    bad = tmp_path / (disc or dest)
    reason = "a file of that name is there" if bad.name == "a_file" else "Not a directory"
    with pytest.raises(SystemExit, match=f"^error: {bad}: cannot make the folder to export the {what} to: {reason}$"):
        export_main([str(checkpoint), str(tmp_path / dest), *(["--disc", str(tmp_path / disc)] if disc else [])])
    assert (tmp_path / "a_file").read_text() == "kept"


def test_more_bad_input_is_one_line_before_any_model_loads(demo, tmp_path, capsys, monkeypatch):
    """--out under a file, a judge server that cannot be reached, image data for a text-only model: one
    `error:` line each, before any model loads (these were tracebacks, after the evaluation for two)."""
    import socket

    from ril_fast.tiny import make_tiny

    monkeypatch.setattr("ril_fast.models.load", lambda *a, **k: pytest.fail("a model loaded"))
    (tmp_path / "a_file").write_text("")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    base = ["--model", str(demo.student), "--data", str(demo.test)]
    cases = [(["--out", str(tmp_path / "a_file" / "out")], f"--out {tmp_path / 'a_file' / 'out'}: cannot make the "
              "folder: Not a directory"),
             (["--out", str(tmp_path / "out"), "--judge", "http", "--judge-url", nobody, "--judge-model", "m",
               "--judge-retries", "0"], f"--judge-url {nobody}: the judge server cannot be used: GET {nobody}/models: "
              "failed 1 times")]
    for extra, said in cases:
        with pytest.raises(SystemExit) as e:
            main(base + extra)
        assert e.value.code == 2 and f"error: {said}" in capsys.readouterr().err
    text_model = make_tiny(tmp_path / "text", arch="qwen2")
    done = subprocess.run([sys.executable, "-m", "ril_fast.eval", "--model", str(text_model), "--data", str(demo.test),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip() == (f"error: {demo.test}:1: the example has images, but the model ({text_model}) "
                                   f"is a text-only model")


def test_a_terminal_shows_the_evaluation_progress(demo, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    main(["--model", str(demo.student), "--data", str(demo.test), "--out", str(tmp_path / "out"),
          "--max-examples", "5", "--max-new-tokens", "3", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert "eval: 100%" in err and "5/5" in err, err[-1000:]


def test_an_image_the_processor_refuses_is_refused_before_the_model_loads(demo, tmp_path, monkeypatch):
    """As in the trainer, every prompt is counted from its image sizes first: an image of aspect ratio 300 names
    its line, and nothing is evaluated."""
    from PIL import Image

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad example was refused")

    monkeypatch.setattr("ril_fast.models.load", load)
    Image.new("RGB", (3000, 10)).save(tmp_path / "thin.png")
    row = json.loads(demo.test.read_text().splitlines()[0])
    data = demo.root / "thin.jsonl"  # beside the images its other line's paths are relative to
    data.write_text(json.dumps(row) + "\n" + json.dumps(row | {"id": "x", "images": [str(tmp_path / "thin.png")]})
                    + "\n")
    with pytest.raises(DataError, match=f"^{data}:2: the image processor refuses an image of the example "
                                        r"\(absolute aspect ratio must be smaller than 200, got 300.0\): resize the "
                                        r"image or drop the example$"):
        main(["--model", str(demo.student), "--data", str(data), "--out", str(tmp_path / "out"), "--judge", "rule"])


def test_two_ranks_answer_the_same_as_one(demo, tmp_path):
    """Under torchrun with two ranks (gloo) each rank answers its share of the examples (rank 0 alone reads the
    data): the records and the summary are those of one process, example for example."""
    one, records = _run(demo, demo.test, tmp_path / "one", "--judge", "rule")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "ril_fast.eval", "--model", str(demo.student), "--data", str(demo.test), "--out",
                           str(tmp_path / "two"), "--max-new-tokens", "5", "--batch-size", "5", "--judge", "rule"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(env, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert [json.loads(line) for line in (tmp_path / "two" / "examples.jsonl").read_text().splitlines()] == records
    assert {k: v for k, v in two.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}


def test_two_ranks_go_on_from_one_ranks_journal(demo, tmp_path, monkeypatch):
    """A one-process evaluation whose judge failed for good at its second batch (five answers judged, five not)
    goes on under torchrun with two ranks: they share the five answers to judge and the two examples left to answer,
    and write what one uninterrupted process writes."""
    from ril_fast.files import unlock_folder

    _, records = _run(demo, demo.test, tmp_path / "one", "--judge", "rule")
    out = tmp_path / "two"
    with monkeypatch.context() as m:
        m.setattr("ril_fast.judge.make_judge_from_config", lambda args: _FailingJudge(fail_at=2))
        with pytest.raises(Exception, match="3 retries spent"):
            _run(demo, demo.test, out, "--judge", "rule")
    unlock_folder(out)  # this process's lock of --out, which a process of its own would give back as it ends
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "ril_fast.eval", "--model", str(demo.student), "--data", str(demo.test), "--out", str(out),
                           "--max-new-tokens", "5", "--batch-size", "5", "--judge", "rule"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(env, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "going on from" in proc.stderr and "5 examples answered and judged, 5 answered and not yet judged" in \
        proc.stderr
    assert [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()] == records
    assert json.loads((out / "summary.json").read_text())["resumed"] == 10 and not (out / "partial").exists()


def test_a_sharded_student_evaluates_in_step_on_two_ranks(demo, tmp_path):
    """The trainer's evaluation of its FSDP-sharded student on two ranks (gloo), 3 examples one per generate call:
    rank 0 answers two, rank 1 one and then the first example again, uncounted, because every generate call
    all-gathers the parameters on every rank: a rank that stopped after its own share would leave the other
    waiting in that collective. tests/dist_scripts/eval_checks.py ends a hung rank after its HANG_S seconds; the
    timeout here is the last resort. The figures and answers are those of the unsharded model in one process."""
    examples = load_examples(demo.test)[:3]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    out = tmp_path / "ranks.json"
    proc = run_tree([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     str(ROOT / "tests" / "dist_scripts" / "eval_checks.py"), str(demo.student), str(demo.test),
                     str(out), str(len(examples))], cwd=ROOT, timeout=400,
                    env=dict(env, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    ranks = json.loads(out.read_text())
    assert [r["calls"] for r in ranks] == [[1, 1], [1, 1]]  # as many generate calls, of one prompt each
    model, processor = load(demo.student, device="cpu")
    alone: list[dict] = []
    metrics = evaluate(model, processor, examples, RuleJudge(), distributed.Dist(0, 1, 0, torch.device("cpu")),
                       max_new_tokens=4, batch_size=1, records=alone)
    assert metrics["eval_examples"] == 3 and [r["metrics"] for r in ranks] == [metrics, metrics]
    assert [r["id"] for r in ranks[0]["records"]] == [examples[0].id, examples[2].id]
    assert [r["id"] for r in ranks[1]["records"]] == [examples[1].id]
    assert sorted(ranks[0]["records"] + ranks[1]["records"], key=lambda r: r["id"]) == \
        sorted(alone, key=lambda r: r["id"])


def _fake_generation(monkeypatch, model):
    """``evaluate``'s generation and reduction faked (no model runs): each prompt's answer is its question's last
    word, truncated where the question ends in "!"; the model must be in eval mode while answering. Returns the
    lengths of the prompt lists it was called with and the tensors handed to the reduction (returned unchanged)."""
    from types import SimpleNamespace

    calls, reduced = [], []

    def answer(model_, processor, prompts, **kwargs):
        assert not model.training and prompts  # never an empty generate call (every rank runs as many)
        calls.append(len(prompts))
        return [[SimpleNamespace(text=p["question"].split()[-1].strip("!"), truncated=p["question"].endswith("!"))]
                for p in prompts]

    monkeypatch.setattr("ril_fast.evaluate.sample_responses", answer)
    monkeypatch.setattr("ril_fast.evaluate.all_reduce_sum", lambda t: reduced.append(t.clone()) or t)
    return calls, reduced


def _exact(items):
    """A judge: the response is the answer."""
    return [i.response == i.answer for i in items]


def test_evaluate_counts_per_rank_in_step_and_restores_the_training_mode(monkeypatch):
    """``evaluate`` on each of two ranks, the reduction faked: both ranks count the same answer types (rank 1's slice
    holds only one of them: the vectors summed over ranks must line up) and run as many generate calls (the last
    one a rank's own filler, uncounted); the two ranks' counts sum to one rank's, per type; each record says whether
    its answer was cut short; the model is back in training mode afterwards. ~0.1 s, no model."""
    from ril_fast.data import Example

    examples = [Example(f"e{i}", f"say {w}", a, [], t) for i, (w, a, t) in enumerate(
        [("red", "red", "color"), ("3!", "3", "count"), ("blue", "green", "color"), ("5", "5", "count"),
         ("red", "red", "color")])]
    model = torch.nn.Linear(1, 1)
    figures, counts = [], []
    for rank, world in ((0, 2), (1, 2), (0, 1)):
        calls, reduced = _fake_generation(monkeypatch, model)
        model.train()
        records = []
        figures.append(evaluate(model, None, examples, _exact, distributed.Dist(rank, world, rank, torch.device("cpu")),
                                max_new_tokens=3, batch_size=2, records=records))
        assert model.training
        counts.append((calls, reduced[0]))
        assert [(r["id"], r["truncated"], r["correct"]) for r in records] == \
            [(e.id, e.question.endswith("!"), e.id != "e2") for e in examples[rank::world]]
    assert [c for c, _ in counts] == [[2, 1], [2, 1], [2, 2, 1]]  # rank 1: two answers, then its filler
    assert counts[0][1].shape == counts[1][1].shape == (2, 2)  # (correct, total) of "color", "count"
    assert torch.equal(counts[0][1] + counts[1][1], counts[2][1])
    assert torch.equal(counts[2][1], torch.tensor([[2.0, 2.0], [3.0, 2.0]], dtype=torch.float64))
    assert figures[2] == {"eval_accuracy": 0.8, "eval_examples": 5, "eval_accuracy/color": 2 / 3,
                          "eval_accuracy/count": 1.0}


def test_evaluate_of_untyped_examples_reports_no_per_type_figure(monkeypatch):
    """Examples none of which has an answer type give the overall figure alone (no "eval_accuracy/untyped" beside
    it). ~0.1 s, no model."""
    from ril_fast.data import Example

    _fake_generation(monkeypatch, model := torch.nn.Linear(1, 1))
    examples = [Example("a", "say red", "red", []), Example("b", "say 3", "4", [])]
    assert evaluate(model, None, examples, _exact, distributed.Dist(0, 1, 0, torch.device("cpu")),
                    max_new_tokens=3) == {"eval_accuracy": 0.5, "eval_examples": 2}


class _FailingJudge:
    """The rule judge (its name too, so a journal it leaves is the rule judge's) failing for good at its
    ``fail_at``-th call, as an http judge whose retries are spent."""

    def __init__(self, fail_at: int):
        self.rule, self.calls, self.fail_at = RuleJudge(), 0, fail_at
        self.name = self.rule.name

    def __call__(self, items):
        from ril_fast.judges_http import HTTPError

        self.calls += 1
        if self.calls == self.fail_at:
            raise HTTPError("http://judge/v1: 3 retries spent")
        return self.rule(items)


def _generated(monkeypatch) -> list[str]:
    """The questions ``evaluate`` generates answers to from now on (the real generation, spied on)."""
    import ril_fast.evaluate as module

    asked, real = [], module.sample_responses

    def spy(model, processor, prompts, **kwargs):
        asked.extend(p["question"] for p in prompts)
        return real(model, processor, prompts, **kwargs)

    monkeypatch.setattr(module, "sample_responses", spy)
    return asked


def test_a_judge_failing_for_good_loses_no_answer(demo, tmp_path, capsys, monkeypatch):
    """The judge fails for good at the second batch of five: the first batch's answers and verdicts and the second's
    answers are in the journal; the same command again judges the five unjudged answers without generating them,
    answers the last two examples only, and writes what one uninterrupted run writes; the journal is then gone.
    A line cut short by the crash is skipped."""
    _, clean = _run(demo, demo.test, tmp_path / "clean", "--judge", "rule")
    examples = load_examples(demo.test)
    out = tmp_path / "out"
    monkeypatch.setattr("ril_fast.judge.make_judge_from_config", lambda args: _FailingJudge(fail_at=2))
    with pytest.raises(Exception, match="3 retries spent"):
        _run(demo, demo.test, out, "--judge", "rule")
    assert f"the answers so far are kept in {out / 'partial'}: the same command goes on" in capsys.readouterr().err
    assert not (out / "examples.jsonl").exists()
    [kept] = (out / "partial").glob("*-0.jsonl")
    rows = [json.loads(line) for line in kept.read_text().splitlines()]
    assert [(r["id"], "correct" in r) for r in rows] == \
        [(e.id, False) for e in examples[:5]] + [(e.id, True) for e in examples[:5]] + \
        [(e.id, False) for e in examples[5:10]]
    assert all(r["question_sha"] == e.question_sha for r, e in zip(rows, examples[:5] * 2 + examples[5:10]))
    with kept.open("a") as f:
        f.write('{"id": "' + examples[10].id + '", "answer_type": ')  # the write a kill cut short
    monkeypatch.undo()
    asked = _generated(monkeypatch)
    summary, records = _run(demo, demo.test, out, "--judge", "rule")
    assert asked == [e.question for e in examples[10:]]
    assert records == clean and summary["resumed"] == 10
    assert "going on from" in capsys.readouterr().err
    assert not (out / "partial").exists()


def test_an_interrupted_evaluation_goes_on_and_a_journal_of_another_budget_is_set_aside(demo, tmp_path, capsys,
                                                                                        monkeypatch):
    """Interrupted (Ctrl-C) in its second generate call, an evaluation keeps its first batch; the same command with
    another --max-new-tokens sets that journal aside and answers every example; an example whose question changed
    under its id since it was answered is answered again."""
    import ril_fast.evaluate as module

    examples = load_examples(demo.test)
    out = tmp_path / "out"
    real, calls = module.sample_responses, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "sample_responses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(demo, demo.test, out, "--judge", "rule")
    monkeypatch.undo()
    # The first example's question changes under its id (the data file beside the images its paths are relative to).
    rows = [json.loads(line) for line in demo.test.read_text().splitlines()]
    data = demo.root / "changed.jsonl"
    data.write_text("".join(json.dumps(r | {"question": r["question"] + " Answer briefly."} if i == 0 else r) + "\n"
                            for i, r in enumerate(rows)))
    asked = _generated(monkeypatch)
    _, records = _run(demo, data, out, "--judge", "rule")
    assert asked == [examples[0].question + " Answer briefly."] + [e.question for e in examples[5:]]
    assert not (out / "partial.stale").exists()
    asked.clear()
    monkeypatch.setattr(module, "sample_responses", interrupted)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        _run(demo, demo.test, out, "--judge", "rule")
    monkeypatch.undo()
    asked = _generated(monkeypatch)
    capsys.readouterr()
    summary = main(["--model", str(demo.student), "--data", str(demo.test), "--out", str(out), "--max-new-tokens",
                    "6", "--batch-size", "5", "--judge", "rule"])
    assert asked == [e.question for e in examples] and summary["resumed"] == 0
    assert f"set aside {out / 'partial.stale'}" in capsys.readouterr().err
    assert [json.loads(line)["id"] for line in (out / "partial.stale").glob("*.jsonl").__next__().read_text()
            .splitlines()] == [e.id for e in examples[:5]] * 2


def test_a_second_evaluation_into_the_same_out_is_refused(demo, tmp_path):
    """Two evaluations writing one --out would mix their journals: the second stops, naming the first's process."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ril_fast.files import lock_folder; "
                               f"lock_folder({str(out)!r}); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline() == "held\n"
        from ril_fast.files import InUse

        with pytest.raises(InUse, match=f"{out} is in use by another process \\(pid {holder.pid}\\)"):
            main(["--model", str(demo.student), "--data", str(demo.test), "--out", str(out), "--judge", "rule"])
    finally:
        holder.kill()
        holder.wait()


def test_resume_takes_an_answer_judged_in_any_file_as_done(tmp_path):
    """``eval_journal.resume`` without a model: an example judged in one file and only answered in another is done,
    whichever file is read first; rows of unknown ids, of another question (its digest), answer or answer type (each
    made for another data file's example) are left out, and the question's digest is not handed back in the rows."""
    from ril_fast.data import Example
    from ril_fast.eval_journal import resume

    examples = [Example("a", "Red?", "yes", [], question_sha="s1"), Example("b", "Blue?", "no", [], question_sha="s2"),
                Example("c", "Green?", "no", [], question_sha="s3"), Example("d", "Pink?", "no", [], question_sha="s4")]
    key = {"model": "m", "judge": "rule"}
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "run.json").write_text(json.dumps(key))
    row = {"answer_type": None, "truncated": False}
    (tmp_path / "partial" / "1-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        row | {"id": "a", "question": "Red?", "answer": "yes", "response": "yes", "question_sha": "s1",
               "correct": True},
        row | {"id": "c", "question": "Green?", "answer": "no", "response": "no", "question_sha": "s9"},
        row | {"id": "z", "question": "?", "answer": "no", "response": "no", "question_sha": "s0"},
        row | {"id": "d", "question": "Pink?", "answer": "no", "response": "no", "question_sha": "s4",
               "answer_type": "color"}]))
    (tmp_path / "partial" / "2-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        row | {"id": "a", "question": "Red?", "answer": "yes", "response": "yes", "question_sha": "s1"},
        row | {"id": "b", "question": "Blue?", "answer": "no", "response": "no", "question_sha": "s2"},
        row | {"id": "b", "question": "Blue?", "answer": "yes", "response": "yes", "question_sha": "s2"}]))
    found = resume(tmp_path, key, examples)
    assert found.done == {"a": row | {"id": "a", "question": "Red?", "answer": "yes", "response": "yes",
                                      "correct": True}}
    assert found.pending == {"b": row | {"id": "b", "question": "Blue?", "answer": "no", "response": "no"}}
    assert found.set_aside == "" and found.attempt
