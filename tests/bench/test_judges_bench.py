"""bench/judges.py runs the rule judge on its cases and writes a row that names what produced it: the judge's
own name (the judge cache's key, with its code version) and the packages' versions (a smoke test: no speed is
asserted)."""

import csv
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
