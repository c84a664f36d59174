"""bench/judges.py runs the rule judge on its cases and writes a row that names what produced it: the judge's
own name (the judge cache's key, with its code version) and the packages' versions (a smoke test: no speed is
asserted)."""

import csv
import re
import runpy
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "judges.py"


def test_rule_judge_row_names_its_judge_and_versions(tmp_path, capsys):
    pytest.importorskip("easy_vqa")
    from ril_fast.judge import RuleJudge

    out = tmp_path / "judges.csv"
    bench = runpy.run_path(str(BENCH), run_name="judges")
    returned = bench["main"](["--cases", "40", "--out", str(out)])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(returned) == 1
    row = rows[0]
    assert row["judge"] == "rule" and row["judge_name"] == RuleJudge().name
    assert row["cases"] == "40" and float(row["seconds"]) > 0
    assert float(row["agreement_with_rule"]) == 1.0  # the rule judge's verdicts are the labels
    assert row["torch"] == version("torch") and row["transformers"] == version("transformers")
    try:
        math_verify = version("math-verify")
    except PackageNotFoundError:  # not installed: the column is empty
        math_verify = ""
    assert row["math_verify"] == math_verify
    assert "| rule |" in capsys.readouterr().out


def test_judge_rates_are_cases_over_seconds_against_the_mean_plain_load(tmp_path, capsys, monkeypatch):
    """The hf and http judges and the plain load faked (40 cases; the http judge 1.6 s, the plain load 2 s before
    it and 3 s after): each row's rate is cases / seconds, the hf row names its batch size, and the http judge's
    share is of the rate of the two plain loads' mean time (16 cases/s, not the first one's 20)."""
    pytest.importorskip("easy_vqa")
    from ril_fast.judge import RuleJudge

    bench = runpy.run_path(str(BENCH), run_name="judges")
    globs = bench["main"].__globals__
    loads = iter([0.1, 2.0, 3.0])  # the warm-up, before, after

    class Judge:
        name = "fake-judge"

        def __call__(self, items):
            return RuleJudge()(items)

        def body(self, item):
            return {"q": item.question}

    real_timed = globs["timed"]
    monkeypatch.setitem(globs, "make_judge", lambda kind, **kw: Judge())
    monkeypatch.setitem(globs, "plain_load", lambda url, bodies, concurrency: next(loads))
    monkeypatch.setitem(globs, "timed", lambda judge, items: (1.6, real_timed(judge, items)[1]) if isinstance(
        judge, Judge) else real_timed(judge, items))
    rows = bench["main"](["--cases", "40", "--hf-model", "x", "--vllm-url", "http://127.0.0.1:1/v1", "--concurrency",
                          "4", "--out", str(tmp_path / "judges.csv")])
    assert [r["judge"] for r in rows] == ["rule", "hf", "plain load (vLLM)", "http", "plain load (vLLM)"]
    for r in rows:
        assert r["per_second"] == pytest.approx(40 / r["seconds"], rel=1e-3), r
    assert rows[1]["batch_size"] == 32 and [r.get("concurrency") for r in rows[2:]] == [4, 4, 4]
    assert "concurrency 4: http judge 25.00/s = 156.2% of the plain load's 16.00/s" in capsys.readouterr().out


def test_the_cases_are_half_right_with_a_wrong_answer_of_the_same_kind():
    """400 cases: about half right (the rule judge's labels); a wrong one says another answer of the question's
    kind (a shape for a shape, a colour for a colour, yes for no), never the right answer again."""
    pytest.importorskip("easy_vqa")
    from ril_fast.demo import COLORS, SHAPES
    from ril_fast.judge import RuleJudge

    bench = runpy.run_path(str(BENCH), run_name="judges")
    items = bench["cases"](400)
    right = sum(RuleJudge()(items)) / len(items)
    assert 0.42 < right < 0.58
    for item in items:
        words = set(re.findall(r"[a-z]+", item.response.lower()))
        kinds = [kind for kind in (("yes", "no"), SHAPES, COLORS) if item.answer in kind]
        said = [w for kind in (("yes", "no"), SHAPES, COLORS) for w in kind if w in words]
        assert said and all(w in kinds[0] for w in said), (item, said)
