"""``ril_fast.eval_journal`` and ``ril_fast.eval``'s use of it, without generating: what a journal is of
(``run_key``), the set-aside of another run's journal, rows on the disk as soon as they are journaled, verdicts on
kept answers journaled, the results written before the journal is removed, and an evaluation whose every example an
earlier attempt answered going on from the journal without loading the model."""

import json
import os
from pathlib import Path

import pytest
from models_fixtures import tiny_folder

from ril_fast.data import Example, load_examples
from ril_fast.eval_journal import FOLDER, RUN, Journal, resume, run_key

_EXAMPLES = [Example("a", "Red?", "yes", [], question_sha="s1"), Example("b", "Blue?", "no", [], question_sha="s2")]


def _row(e: Example, **more) -> dict:
    """A journal row of ``e`` as ``ril_fast.evaluate`` journals it (its digest included)."""
    return {"id": e.id, "answer_type": e.answer_type, "question": e.question, "answer": e.answer, "response": e.answer,
            "truncated": False, "question_sha": e.question_sha, **more}


def test_a_model_written_again_or_another_judge_or_budget_is_another_run(tmp_path):
    """``run_key`` differs for a model file written again with the same size (its modification time), for another
    judge and for another budget, not for the folder's path written another way; a journal of another judge is set
    aside, not resumed."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"0" * 64)
    key = run_key(model, max_new_tokens=5, judge="rule-v1")
    assert run_key(model, max_new_tokens=5, judge="rule-v1") == key
    assert run_key(f"{model}/", max_new_tokens=5, judge="rule-v1") == key  # the same folder, written another way
    assert run_key(tmp_path / "." / "model", max_new_tokens=5, judge="rule-v1") == key
    assert run_key(model, max_new_tokens=5, judge="http-v1") != key
    assert run_key(model, max_new_tokens=6, judge="rule-v1") != key
    stat = (model / "model.safetensors").stat()
    (model / "model.safetensors").write_bytes(b"1" * 64)  # written again: the same size
    os.utime(model / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run_key(model, max_new_tokens=5, judge="rule-v1") != key

    out = tmp_path / "out"
    resume(out, run_key(model, max_new_tokens=5, judge="rule-v1"), _EXAMPLES)
    (out / FOLDER / "1-0.jsonl").write_text(json.dumps(_row(_EXAMPLES[0], correct=True)) + "\n")
    found = resume(out, run_key(model, max_new_tokens=5, judge="http-v1"), _EXAMPLES)
    assert found.done == {} and found.set_aside.startswith(f"set aside {out / 'partial.stale'}")
    assert (out / "partial.stale" / "1-0.jsonl").exists()


def test_a_journal_set_aside_again_replaces_the_older_one(tmp_path):
    """A second journal of another run is set aside in place of the first one set aside (``partial.stale`` holds
    the latest only), and the new attempt's ``run.json`` is this run's."""
    out = tmp_path / "out"
    for n, judge in enumerate(["j1", "j2", "j3"]):
        assert bool(resume(out, {"judge": judge}, _EXAMPLES).set_aside) == (n > 0)
        (out / FOLDER / f"{n}-0.jsonl").write_text(json.dumps(_row(_EXAMPLES[0])) + "\n")
    assert sorted(p.name for p in (out / "partial.stale").iterdir()) == ["1-0.jsonl", RUN]
    assert json.loads((out / "partial.stale" / RUN).read_text()) == {"judge": "j2"}
    assert json.loads((out / FOLDER / RUN).read_text()) == {"judge": "j3"}


def test_journaled_rows_are_on_the_disk_before_the_journal_is_closed(tmp_path):
    """Each call's rows are in the file when it returns (a crash loses none), each with its question's digest, and
    a second call appends to them."""
    journal = Journal(tmp_path, "1", 0, {e.id: e.question_sha for e in _EXAMPLES})
    rows = [{k: v for k, v in _row(e).items() if k != "question_sha"} for e in _EXAMPLES]
    journal(rows[:1])
    assert [json.loads(line) for line in journal.path.read_text().splitlines()] == [_row(_EXAMPLES[0])]
    journal([rows[1] | {"correct": True}])
    assert [json.loads(line) for line in journal.path.read_text().splitlines()] == \
        [_row(_EXAMPLES[0]), _row(_EXAMPLES[1], correct=True)]
    journal.close()
    assert journal.path == tmp_path / FOLDER / "1-0.jsonl"


def test_verdicts_on_kept_answers_are_journaled():
    """``_judge_pending`` journals the verdicts it gives answers an earlier attempt kept without one (a crash after
    it does not judge them again), and returns the rows with them."""
    from ril_fast.eval import _judge_pending

    journaled = []

    def judge(items):
        return [item.response == "yes" for item in items]

    rows = [{k: v for k, v in _row(e).items() if k != "question_sha"} for e in _EXAMPLES]
    rows[1]["response"] = "maybe"
    judged = _judge_pending(rows, judge, journaled.extend)
    assert judged == journaled == [rows[0] | {"correct": True}, rows[1] | {"correct": False}]
    assert _judge_pending([], judge, journaled.extend) == [] and len(journaled) == 2


def test_the_journal_is_removed_only_once_the_results_are_written(tmp_path, monkeypatch, capsys):
    """A crash while writing the results leaves the journal (the same command goes on from it); once both files are
    written it is gone."""
    import ril_fast.files
    from ril_fast.eval import _write, summarise

    resume(tmp_path, {"judge": "j"}, _EXAMPLES)
    records = [{k: v for k, v in _row(e, correct=True).items() if k != "question_sha"} for e in _EXAMPLES]
    summary = {"judge": "j", **summarise(records)}
    real = ril_fast.files.write_text_atomic

    def failing(path, text):
        if Path(path).name == "summary.json":
            raise OSError("No space left on device")
        real(path, text)

    monkeypatch.setattr(ril_fast.files, "write_text_atomic", failing)
    with pytest.raises(OSError, match="No space left"):
        _write(tmp_path, records, summary, 5)
    assert (tmp_path / FOLDER / RUN).exists()
    monkeypatch.undo()
    _write(tmp_path, records, summary, 5)
    assert not (tmp_path / FOLDER).exists() and json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "accuracy 1.0000 (2/2)" in capsys.readouterr().out


class _Judge:
    """A judge named ``fake`` finding "yes" correct; failing for good when ``fail``."""

    name = "fake"

    def __init__(self, fail: bool = False):
        self.fail = fail

    def __call__(self, items):
        if self.fail:
            raise ConnectionError("http://judge/v1: 3 retries spent")
        return [item.response == "yes" for item in items]


def test_an_evaluation_answered_before_goes_on_without_loading_the_model(tmp_path_factory, tmp_path, monkeypatch,
                                                                         capsys):
    """Every example answered by an earlier attempt (two judged, one not): the command says how many of each, judges
    the one, loads no model, counts the three as ``resumed``; a judge that fails for good on it says the answers are
    kept even though this attempt journaled nothing, and the journal is there for the next one."""
    from ril_fast.eval import main

    model = tiny_folder(tmp_path_factory, "qwen2")
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"id": f"t{i}", "question": f"Is {i} odd?", "answer": "yes" if i % 2 else "no",
                                        "images": []}) + "\n" for i in range(3)))
    examples = load_examples(data)
    out = tmp_path / "out"
    key = run_key(model, max_new_tokens=5, judge="fake")
    (out / FOLDER).mkdir(parents=True)
    (out / FOLDER / RUN).write_text(json.dumps(key))
    rows = [_row(e) | {"response": "yes"} for e in examples]
    (out / FOLDER / "1-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        *rows, rows[0] | {"correct": False}, rows[1] | {"correct": True}]))

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("ril_fast.models.load", no_load)
    argv = ["--model", str(model), "--data", str(data), "--out", str(out), "--max-new-tokens", "5", "--judge", "rule"]
    monkeypatch.setattr("ril_fast.judge.make_judge_from_config", lambda args: _Judge(fail=True))
    with pytest.raises(ConnectionError):
        main(argv)
    err = capsys.readouterr().err
    assert f"going on from {out / FOLDER}: 2 examples answered and judged, 1 answered and not yet judged" in err
    assert f"the answers so far are kept in {out / FOLDER}: the same command goes on from them" in err
    monkeypatch.setattr("ril_fast.judge.make_judge_from_config", lambda args: _Judge())
    summary = main(argv)
    assert (summary["examples"], summary["correct"], summary["resumed"]) == (3, 2, 3)
    assert [(r["id"], r["correct"]) for r in map(json.loads, (out / "examples.jsonl").read_text().splitlines())] == \
        [("t0", False), ("t1", True), ("t2", True)]
    assert not (out / FOLDER).exists()
