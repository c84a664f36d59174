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
    import torch
    import triton

    for r in rows:
        assert float(r["ms"]) > 0 and r["device"] and r["git_sha"] and r["date"]
        assert r["torch"] == torch.__version__ and r["triton"] == triton.__version__ and r["liger_kernel"]
    assert "| logprobs+loss | ril_torch | full |" in capsys.readouterr().out


def test_logprobs_loss_providers_compute_the_same_loss():
    """Every provider of the "logprobs+loss" case computes the same loss, Liger's included, also where the tokens
    are not a whole number of 1,024-token sequences (Liger divides by its sequences x max_completion_length)."""
    import torch

    bench = runpy.run_path(str(BENCH), run_name="kernels")
    for n in (700, 1500, 2048):
        torch.manual_seed(n)
        losses = {name: make()[0]().item() for name, make in bench["logprobs_loss_providers"](n, 32, 96,
                                                                                           torch.float32).items()}
        assert {"ril_torch", "eager", "liger"} <= losses.keys()
        for name, loss in losses.items():
            assert abs(loss - losses["eager"]) <= 1e-5 * abs(losses["eager"]) + 1e-7, (n, name, losses)
