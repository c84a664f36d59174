"""Benchmark ril_fast's kernels against the eager reference, torch.compile of it, and Liger.

    python bench/kernels.py                      # GPU: N=16384, H=3584, V=152064, bf16 (Qwen2.5-VL-7B head)
    python bench/kernels.py --n 4096 --v 32000   # other shapes
    python bench/kernels.py --quick              # tiny shapes, a smoke run (the test suite uses it)

For each case, provider and mode (fwd, bwd, full) it reports the median time (``triton.testing.do_bench``
on GPU; a perf_counter median on CPU), the peak memory the call adds, and the effective TFLOP/s from
analytic FLOPs (log-probs: 2·N·V·H forward, 4·N·V·H backward, i.e. model FLOPs, not counting the
backward's recomputation of the logits) as a fraction of a bf16 (GPU) or fp32 (CPU) matmul peak measured
in the same run. The memory-bound kernels report GB/s instead. Every row is appended to a CSV with the
device name, date, git SHA and the torch / triton / transformers / liger-kernel versions, and the table is
printed as markdown.

Providers for "logprobs+loss" (the policy-update hot path: LM head → per-token log-probs → Dr.GRPO loss):
    ril_triton   token_logprobs(impl="triton") + dr_grpo_loss(impl="triton")
    ril_torch    the same with impl="torch" (the CPU path: vocabulary-chunked, recomputing)
    eager        the eager references: full (N, V) logits + log_softmax
    compiled     torch.compile of the eager references (GPU only: compiling on CPU takes minutes)
    liger        liger_kernel's LigerFusedLinearGRPOLoss(loss_type="dr_grpo") on the same inputs

On a CPU the Triton kernels would run under the interpreter, whose timings mean nothing: only the torch
paths run there, on smaller default shapes, and the table says so.
"""

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/_common.py, also under runpy / pytest
from _common import (CUDA, append_csv, device_name, git_sha, markdown_table,  # noqa: E402
                     peak_mb, sig, time_ms, versions)

from ril_fast.flops import matmul_peak_tflops  # noqa: E402
from ril_fast.kernels import disc_head, dr_grpo_loss, token_logprobs  # noqa: E402
from ril_fast.kernels.grpo_loss import dr_grpo_loss_ref  # noqa: E402
from ril_fast.kernels.logprobs import token_logprobs_reference  # noqa: E402

MODES = ("fwd", "bwd", "full")


# ----------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------
def _measure(make, reps: int) -> dict:
    """Time and peak memory of the forward, the backward alone, and both, for ``make() -> (forward,
    inputs)`` where forward() returns a scalar loss differentiable w.r.t. inputs."""
    forward, inputs = make()

    def fwd():
        with torch.no_grad():
            forward()

    def full():
        for t in inputs:
            t.grad = None
        forward().backward()

    loss = forward()

    def bwd():
        for t in inputs:
            t.grad = None
        loss.backward(retain_graph=True)

    out = {}
    for mode, fn in zip(MODES, (fwd, bwd, full)):
        out[mode] = (time_ms(fn, reps), peak_mb(fn))
    return out


# ----------------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------------
def _logprob_loss_inputs(n, h, v, dtype, device, seq_len=1024):
    hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(v, h, device=device) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=device)
    seqs = max(1, n // seq_len)
    adv = torch.randn(seqs, device=device).repeat_interleave(n // seqs)
    adv = torch.cat([adv, adv.new_zeros(n - adv.numel())])
    mask = torch.rand(n, device=device) > 0.1
    with torch.no_grad():
        old = token_logprobs(hidden, weight, targets).logprobs + 0.05 * torch.randn(n, device=device)
    ref = old + 0.05 * torch.randn(n, device=device)
    return hidden, weight, targets, adv, mask, old, ref, seqs * seq_len


def logprobs_loss_providers(n, h, v, dtype):
    """name -> make() for the "logprobs+loss" case."""
    device = "cuda" if CUDA else "cpu"
    hidden, weight, targets, adv, mask, old, ref, norm = _logprob_loss_inputs(n, h, v, dtype, device)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, normalizer=norm)

    def ours(impl):
        def forward():
            lp = token_logprobs(hidden, weight, targets, impl=impl).logprobs
            return dr_grpo_loss(lp, adv, mask, impl=impl, **kw)[0]
        return lambda: (forward, (hidden, weight))

    def eager_forward():
        lp = token_logprobs_reference(hidden, weight, targets).logprobs
        return dr_grpo_loss_ref(lp, adv, mask, old, ref, 0.04, 0.2, 0.2, norm)[0]

    def liger():
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

        seqs = norm // 1024 if n >= 1024 else 1
        t = n // seqs
        fn = LigerFusedLinearGRPOLoss(beta=0.04, use_ref_model=True, loss_type="dr_grpo",  # divides by seqs x L:
                                      max_completion_length=norm // seqs, compiled=CUDA)  # ours by norm
        shape = lambda x: x[: seqs * t].reshape(seqs, t)  # noqa: E731
        seq_adv = adv[: seqs * t].reshape(seqs, t)[:, 0].contiguous()

        def forward():
            return fn(hidden[: seqs * t].reshape(seqs, t, h), weight, shape(targets), shape(mask).long(), seq_adv,
                      ref_per_token_logps=shape(ref), old_per_token_logps=shape(old))[0]
        return forward, (hidden, weight)

    providers = {"ril_torch": ours("torch"), "eager": lambda: (eager_forward, (hidden, weight))}
    if CUDA:
        providers["ril_triton"] = ours("triton")
        compiled = torch.compile(eager_forward)
        providers["compiled"] = lambda: (compiled, (hidden, weight))
    try:
        import liger_kernel.chunked_loss  # noqa: F401

        providers["liger"] = liger
    except ImportError:
        print("liger_kernel not importable: the liger provider is skipped", file=sys.stderr)
    return providers


CASE_DTYPES = {"dr_grpo_loss": torch.float32}  # its log-probs are fp32 whatever the model's dtype (the others: --dtype)


def grpo_loss_providers(n):
    """The Dr.GRPO loss over ``n`` random tokens (old and reference log-probs, β = 0.04), per implementation."""
    device = "cuda" if CUDA else "cpu"
    lp = (torch.randn(n, device=device) - 2).requires_grad_()
    adv, mask = torch.randn(n, device=device), torch.rand(n, device=device) > 0.1
    old, ref = lp.detach() + 0.1 * torch.randn(n, device=device), lp.detach() + 0.1 * torch.randn(n, device=device)
    kw = dict(old_logprobs=old, ref_logprobs=ref, beta=0.04, normalizer=n)
    impls = ["torch", "triton"] if CUDA else ["torch"]
    return {f"ril_{i}": (lambda i=i: (lambda: dr_grpo_loss(lp, adv, mask, impl=i, **kw)[0], (lp,))) for i in impls}


def disc_head_providers(n, h, seqs, dtype):
    """The discriminator head's mean pooling over ``seqs`` equal samples of ``n`` tokens in all (``h`` wide,
    ``dtype``; each sample's second half is its response), per implementation."""
    device = "cuda" if CUDA else "cpu"
    hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(h, device=device, requires_grad=True)
    bias = torch.zeros((), device=device, requires_grad=True)
    bounds = torch.linspace(0, n, seqs + 1, device=device).long()
    starts, ends = bounds[:-1] + (bounds[1:] - bounds[:-1]) // 2, bounds[1:]  # the second half is the response

    def make(impl):
        return lambda: (lambda: disc_head(hidden, weight, bias, starts, ends, pool="mean", impl=impl).sum(),
                        (hidden, weight, bias))

    providers = {"ril_torch": make("torch")}  # the torch path is also the reference
    if CUDA:
        providers["ril_triton"] = make("triton")
    return providers


# ----------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------
def main(argv=None):
    """Time every provider of every kernel (forward, backward, full), print the tables and write the CSV rows."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, help="tokens (default 16384 on GPU, 1024 on CPU)")
    p.add_argument("--h", type=int, help="hidden size (default 3584 on GPU, 256 on CPU)")
    p.add_argument("--v", type=int, help="vocabulary (default 152064 on GPU, 32000 on CPU)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="default bf16 on GPU, fp32 on CPU")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "kernels.csv"), help="CSV to append to")
    args = p.parse_args(argv)
    if args.quick:
        n, h, v = 256, 64, 1000
    else:
        n, h, v = (args.n or (16384 if CUDA else 1024), args.h or (3584 if CUDA else 256),
                   args.v or (152064 if CUDA else 32000))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if CUDA else "fp32")]
    torch.manual_seed(0)

    device, sha, date = device_name(), git_sha(), datetime.datetime.now().isoformat(timespec="seconds")
    installed = versions()  # torch, triton, transformers, liger_kernel: columns of every row
    peak = matmul_peak_tflops(torch.device("cuda" if CUDA else "cpu"), dtype)
    print(f"# ril_fast kernels on {device} — git {sha} — {date}")
    print(f"measured {str(dtype).split('.')[-1]} matmul peak: {peak:.1f} TFLOP/s")
    if not CUDA:
        print("no GPU: the Triton kernels would run interpreted, so only the torch paths are timed, "
              "on CPU-sized shapes; absolute times mean little here")

    cases = [
        ("logprobs+loss", dict(N=n, H=h, V=v), logprobs_loss_providers(n, h, v, dtype),
         {"fwd": 2 * n * v * h, "bwd": 4 * n * v * h, "full": 6 * n * v * h}, None),
        ("dr_grpo_loss", dict(N=n * 4, H=0, V=0), grpo_loss_providers(n * 4),
         None, {"fwd": 5 * 4 * n * 4, "bwd": 6 * 4 * n * 4, "full": 11 * 4 * n * 4}),
        ("disc_head", dict(N=n, H=h, V=0), disc_head_providers(n, h, max(1, n // 512), dtype),
         None, {m: n // 2 * h * dtype.itemsize * k for m, k in (("fwd", 1), ("bwd", 1), ("full", 2))}),
    ]
    rows = []
    for case, shape, providers, flops, nbytes in cases:
        for provider, make in providers.items():
            try:
                results = _measure(make, args.reps)
            except torch.OutOfMemoryError:
                results = None
                torch.cuda.empty_cache()
            for mode in MODES:
                ms, mb = results[mode] if results else (float("nan"), float("nan"))
                row = dict(date=date, git_sha=sha, device=device, **installed, case=case, provider=provider, mode=mode,
                           dtype=str(CASE_DTYPES.get(case, dtype)).split(".")[-1], **shape, ms=sig(ms),
                           peak_mib=sig(mb))
                if flops:
                    row["tflops"] = sig(flops[mode] / (ms * 1e-3) / 1e12)
                    row["util_of_matmul_peak"] = sig(row["tflops"] / peak)
                if nbytes:
                    row["gb_per_s"] = sig(nbytes[mode] / (ms * 1e-3) / 1e9)
                if not results:
                    row["note"] = "out of memory"
                elif provider == "liger":
                    row["note"] = "computes its gradients inside the forward: compare the full mode only"
                rows.append(row)

    columns = ["date", "git_sha", "device", *installed, "case", "provider", "mode", "dtype", "N", "H", "V", "ms",
               "peak_mib", "tflops", "util_of_matmul_peak", "gb_per_s", "note"]
    print()
    print(markdown_table(rows, [("case", "case"), ("provider", "provider"), ("mode", "mode"), ("ms", "ms"),
                                ("peak_mib", "peak MiB"), ("tflops", "TFLOP/s"),
                                ("util_of_matmul_peak", "of matmul peak"), ("gb_per_s", "GB/s")]))
    out = append_csv(args.out, rows, columns)
    print(f"\n{len(rows)} rows appended to {out}")
    return rows


if __name__ == "__main__":
    main()
