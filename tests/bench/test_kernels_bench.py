"""bench/kernels.py runs and reports every case, provider and mode (a smoke test: no speed is asserted), and its
rates are its analytic FLOPs and bytes over its times."""

import csv
import runpy
import sys
from pathlib import Path

import pytest

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


def test_kernels_bench_rates_are_its_flops_and_bytes_over_its_times(tmp_path, monkeypatch):
    """Every call timed at 2 ms against a 1 TFLOP/s peak (faked; --quick, --dtype bf16): log-probs + loss TFLOP/s
    from 2·N·V·H forward, 4·N·V·H backward, 6·N·V·H both, as a fraction of the peak; the loss on 4N fp32 tokens
    (its row's N and dtype what was run); the head's GB/s from the response half of the hidden states, read
    twice by forward + backward; Liger's rows say to compare its full mode only."""
    import torch

    bench = runpy.run_path(str(BENCH), run_name="kernels")
    globs = bench["main"].__globals__
    sizes = []
    grpo = globs["grpo_loss_providers"]
    monkeypatch.setitem(globs, "time_ms", lambda fn, reps: 2.0)
    monkeypatch.setitem(globs, "peak_mb", lambda fn: 1.0)
    monkeypatch.setitem(globs, "matmul_peak_tflops", lambda device, dtype: 1.0)
    monkeypatch.setitem(globs, "grpo_loss_providers", lambda n: sizes.append(n) or grpo(n))
    torch.manual_seed(0)
    rows = bench["main"](["--quick", "--dtype", "bf16", "--out", str(tmp_path / "kernels.csv")])
    n, h, v = 256, 64, 1000
    by = {(r["case"], r["provider"], r["mode"]): r for r in rows}
    for mode, k in (("fwd", 2), ("bwd", 4), ("full", 6)):
        row = by["logprobs+loss", "ril_torch", mode]
        assert row["tflops"] == pytest.approx(k * n * v * h / 2e-3 / 1e12, rel=1e-3), mode
        assert row["util_of_matmul_peak"] == row["tflops"] and row["dtype"] == "bfloat16"
        assert "compare the full mode only" in by["logprobs+loss", "liger", mode]["note"]
    for mode in ("fwd", "bwd", "full"):
        assert by["dr_grpo_loss", "ril_torch", mode]["N"] == sizes[0] == 4 * n
        assert by["dr_grpo_loss", "ril_torch", mode]["dtype"] == "float32"
    head = {m: by["disc_head", "ril_torch", m]["gb_per_s"] for m in ("fwd", "bwd", "full")}
    assert head["fwd"] == head["bwd"] == pytest.approx(n // 2 * h * 2 / 2e-3 / 1e9, rel=1e-3)
    assert head["full"] == pytest.approx(2 * head["fwd"], rel=1e-3)
