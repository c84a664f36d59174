"""bench/kernels.py runs and reports every case, provider and mode (a smoke test: no speed is asserted)."""

import csv
import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


def test_kernels_bench_quick(tmp_path, monkeypatch, capsys):
    out = tmp_path / "kernels.csv"
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--quick", "--reps", "1", "--out", str(out)])
    runpy.run_path(str(BENCH), run_name="__main__")
    rows = list(csv.DictReader(out.open()))
    seen = {(r["case"], r["provider"], r["mode"]) for r in rows}
    for case, provider in [("logprobs+loss", "ril_torch"), ("logprobs+loss", "eager"), ("logprobs+loss", "liger"),
                           ("dr_grpo_loss", "ril_torch"), ("disc_head", "ril_torch")]:
        for mode in ("fwd", "bwd", "full"):
            assert (case, provider, mode) in seen
    for r in rows:
        assert float(r["ms"]) > 0 and r["device"] and r["git_sha"] and r["date"]
    assert "| logprobs+loss | ril_torch | full |" in capsys.readouterr().out
