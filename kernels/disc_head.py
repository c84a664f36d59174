"""The RIL discriminator's head: pool each response's hidden states, then a d → 1 linear layer.

D_φ is the student's architecture with the LM head (d × V) replaced by a linear head d × 1 over a
pooled hidden state of the response; D = sigmoid(logit) is the probability that the response was
written by the student. This file computes the logits of a packed batch, one per sequence:

    logit_s = pooled_s · weight + bias,   pooled_s = hidden[ends_s − 1]                   ("last")
                                          pooled_s = mean(hidden[starts_s : ends_s])       ("mean")

Both pools are the mean over a row range [lo_s, hi_s) — "last" is the range [ends_s − 1, ends_s) —
so one kernel pair serves both:

* forward, Triton: one program per sequence loops over its rows and the H blocks and accumulates
  Σ_r hidden[r] · weight in fp32; the result is divided by the row count and the bias is added.
* backward, Triton: one program per sequence writes d hidden[r] = g_s · weight / n_s on its rows
  (every other row of d hidden is zero) and adds g_s / n_s · Σ_r hidden[r] to d weight and g_s to
  d bias with fp32 atomics. If two ranges share a row (possible in principle, never in a packed
  batch), d hidden is accumulated with fp32 atomics too, so the result is still the exact sum.
* torch path (CPU, fallback): index_select for "last"; for "mean", by linearity
  mean_r(hidden[r]) · weight = mean_r(hidden[r] · weight), so it projects every row to a scalar and
  sums those per sequence with index_add_ — never an (S, L_max, H) padded tensor. Exact segment
  sums rather than prefix-sum differences, so overlapping ranges leave d hidden exactly zero off them.
"""

import enum

import torch
import triton
import triton.language as tl

from ._triton import interpreting, resolve_impl


class Pool(str, enum.Enum):
    """How a response's hidden states become one vector: its last row, or the mean of its rows."""

    LAST = "last"
    MEAN = "mean"


# ----------------------------------------------------------------------------------------------------
# Reference: eager PyTorch. The CPU path and the fallback.
# ----------------------------------------------------------------------------------------------------
def disc_head_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    pool: Pool = Pool.LAST,
    upcast: bool = True,
) -> torch.Tensor:
    """Eager :func:`disc_head` (no input checks). Differentiable through autograd.

    With ``upcast`` the arithmetic runs in fp32 (fp64 for fp64 inputs) and so does the result;
    without it, in ``hidden``'s dtype, which shows what that dtype costs. The "mean" segment sums are
    always accumulated in fp32 (fp64 for fp64 inputs).
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    dt = acc if upcast else hidden.dtype
    w, b = weight.to(dt), bias.to(dt)
    if Pool(pool) is Pool.LAST:
        return hidden.index_select(0, ends - 1).to(dt) @ w + b
    scores = (hidden.to(dt) @ w).to(acc)  # (N,): each row's projection
    # Segment sums over the T = Σ_s n_s pooled rows (T scalars): seq[t] is row t's sequence.
    lengths = (ends - starts).long()
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=hidden.device), lengths)
    first = torch.cumsum(lengths, 0) - lengths
    rows = starts.long()[seq] + torch.arange(len(seq), device=hidden.device) - first[seq]
    sums = scores.new_zeros(len(lengths)).index_add_(0, seq, scores.index_select(0, rows))
    return (sums / lengths).to(dt) + b


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(h_ptr, w_ptr, b_ptr, lo_ptr, hi_ptr, out_ptr, H, stride_h,
                BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Sequence s = program_id: out[s] = Σ_{r ∈ [lo, hi)} hidden[r] · weight / (hi − lo) + bias."""
    s = tl.program_id(0)
    lo = tl.load(lo_ptr + s).to(tl.int64)
    hi = tl.load(hi_ptr + s).to(tl.int64)
    r_off = tl.arange(0, BLOCK_R)
    h_off = tl.arange(0, BLOCK_H)
    # Loaded values are upcast at once: memory-bound, and the interpreter gets bf16 arithmetic wrong.
    acc = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + h_off
        col_ok = cols < H
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        for r0 in range(lo, hi, BLOCK_R):
            rows = r0 + r_off
            ok = (rows < hi)[:, None] & col_ok[None, :]
            x = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=ok, other=0.0)
            acc += x.to(tl.float32) * w[None, :]
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    bias = tl.load(b_ptr).to(tl.float32)
    tl.store(out_ptr + s, total / (hi - lo).to(tl.float32) + bias)


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, lo_ptr, hi_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr, H, stride_h, stride_dh,
                BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr, ATOMIC_DH: tl.constexpr):
    """Sequence s = program_id, with c = g[s] / (hi − lo):
    d hidden[r] = c · weight for r in [lo, hi);  d weight += c · Σ_r hidden[r];  d bias += g[s].

    d weight and d bias are fp32 buffers shared by all programs (atomics). d hidden rows are owned by
    one program when the ranges are disjoint (plain stores in d hidden's dtype); with ATOMIC_DH they
    may be shared and d hidden is an fp32 buffer accumulated with atomics.
    """
    s = tl.program_id(0)
    lo = tl.load(lo_ptr + s).to(tl.int64)
    hi = tl.load(hi_ptr + s).to(tl.int64)
    g = tl.load(g_ptr + s).to(tl.float32)
    c = g / (hi - lo).to(tl.float32)
    tl.atomic_add(db_ptr, g)
    r_off = tl.arange(0, BLOCK_R)
    h_off = tl.arange(0, BLOCK_H)
    for h0 in range(0, H, BLOCK_H):
        cols = h0 + h_off
        col_ok = cols < H
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dx = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32) + (c * w)[None, :]
        x_sum = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
        for r0 in range(lo, hi, BLOCK_R):
            rows = r0 + r_off
            ok = (rows < hi)[:, None] & col_ok[None, :]
            x = tl.load(h_ptr + rows[:, None] * stride_h + cols[None, :], mask=ok, other=0.0)
            x_sum += x.to(tl.float32)
            dh_ptrs = dh_ptr + rows[:, None] * stride_dh + cols[None, :]
            if ATOMIC_DH:
                tl.atomic_add(dh_ptrs, dx, mask=ok)
            else:
                tl.store(dh_ptrs, dx.to(dh_ptr.dtype.element_ty), mask=ok)
        tl.atomic_add(dw_ptr + cols, c * tl.sum(x_sum, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _blocks(H: int, mean: bool) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_H). "last" reads one row, so BLOCK_R = 1. Under the interpreter each loop
    iteration costs ~ms whatever its size, so the blocks are as large as the data allows."""
    if interpreting():
        return (64 if mean else 1), min(triton.next_power_of_2(H), 4096)
    return (8 if mean else 1), min(triton.next_power_of_2(H), 512 if mean else 1024)


def _fwd(hidden, weight, bias, lo, hi, mean: bool) -> torch.Tensor:
    """logits (S,) fp32."""
    S, H = lo.numel(), hidden.shape[1]
    out = torch.empty(S, device=hidden.device, dtype=torch.float32)
    block_r, block_h = _blocks(H, mean)
    _fwd_kernel[(S,)](hidden, weight, bias, lo, hi, out, H, hidden.stride(0),
                      BLOCK_R=block_r, BLOCK_H=block_h, num_warps=4)
    return out


def _bwd(hidden, weight, lo, hi, g, mean: bool, overlapping: bool):
    """(d hidden in hidden's dtype, d weight (H,) fp32, d bias () fp32)."""
    (N, H), S = hidden.shape, lo.numel()
    # d hidden is zero off the pooled rows, so it starts zeroed; shared rows need an fp32 sum.
    dh = torch.zeros(N, H, device=hidden.device, dtype=torch.float32 if overlapping else hidden.dtype)
    dw = torch.zeros(H, device=hidden.device, dtype=torch.float32)
    db = torch.zeros((), device=hidden.device, dtype=torch.float32)
    block_r, block_h = _blocks(H, mean)
    _bwd_kernel[(S,)](hidden, weight, lo, hi, g, dh, dw, db, H, hidden.stride(0), dh.stride(0),
                      BLOCK_R=block_r, BLOCK_H=block_h, ATOMIC_DH=overlapping, num_warps=4)
    return dh.to(hidden.dtype), dw, db


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------
class _DiscHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, lo, hi, mean: bool, overlapping: bool):
        ctx.save_for_backward(hidden, weight, lo, hi)
        ctx.mean, ctx.overlapping, ctx.bias_dtype = mean, overlapping, bias.dtype
        return _fwd(hidden, weight, bias, lo, hi, mean)

    @staticmethod
    def backward(ctx, g):
        hidden, weight, lo, hi = ctx.saved_tensors
        dh, dw, db = _bwd(hidden, weight, lo, hi, g.contiguous(), ctx.mean, ctx.overlapping)
        return dh, dw.to(weight.dtype), db.to(ctx.bias_dtype), None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------
def _check(hidden, weight, bias, starts, ends, lo) -> bool:
    """Raise ValueError on bad shapes, dtypes or ranges; return whether two pooled ranges share a row.

    The range checks read the small (S,) tensors back to the host once (one sync per call).
    """
    if hidden.dim() != 2 or hidden.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"hidden must be (N, H) bf16 or fp32, got {tuple(hidden.shape)} {hidden.dtype}")
    N, H = hidden.shape
    for name, t, shape in (("weight", weight, (H,)), ("bias", bias, ())):
        if tuple(t.shape) != shape or t.dtype not in (torch.float32, hidden.dtype):
            raise ValueError(f"{name} must be {shape} fp32 or {hidden.dtype}, got {tuple(t.shape)} {t.dtype}")
    for name, t in (("starts", starts), ("ends", ends)):
        if t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be (S,) int32 or int64, got {tuple(t.shape)} {t.dtype}")
    if starts.shape != ends.shape:
        raise ValueError(f"starts {tuple(starts.shape)} and ends {tuple(ends.shape)} differ in length")
    if len({t.device for t in (hidden, weight, bias, starts, ends)}) != 1:
        raise ValueError("hidden, weight, bias, starts and ends must be on one device")
    if starts.numel() == 0:
        return False
    bad = (starts < 0) | (ends <= starts) | (ends > N)
    # Sorted by lo, two pooled ranges share a row iff some pair of neighbours does.
    order = torch.argsort(lo)
    shared = lo[order][1:] < ends[order][:-1]
    any_bad, overlapping = torch.stack([bad.any(), shared.any()]).tolist()
    if any_bad:
        s = int(bad.nonzero()[0])
        raise ValueError(f"range {s} is [{int(starts[s])}, {int(ends[s])}): every range must satisfy "
                         f"0 <= starts < ends <= N = {N} (empty ranges have no row to pool)")
    return overlapping


def disc_head(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    *,
    pool: Pool | str = Pool.LAST,
    impl: str = "auto",
) -> torch.Tensor:
    """Discriminator logits of a packed batch: ``pooled_s · weight + bias`` for each sequence s.

    Args:
        hidden: ``(N, H)`` bf16 or fp32, the discriminator's last hidden states of a packed batch.
        weight: ``(H,)`` fp32 or ``hidden``'s dtype, the d → 1 head.
        bias: ``()`` (0-dim) fp32 or ``hidden``'s dtype.
        starts, ends: ``(S,)`` int32 or int64; sequence s's response is ``hidden[starts[s]:ends[s]]``.
            Every range must be non-empty and inside ``[0, N)`` (else ValueError; checked with one
            host sync). Ranges may overlap: the backward sums every range's contribution.
        pool: ``"last"`` pools ``hidden[ends[s] - 1]``; ``"mean"`` the mean of the range's rows.
        impl: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.

    Returns:
        logits ``(S,)`` fp32; D = sigmoid(logits) is the probability that a response is the student's.
        Sums are accumulated in fp32. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``; their
        gradients come back in each input's own dtype (accumulated in fp32), and d hidden is zero on
        every row that no sequence pools. S = 0 gives an empty ``(0,)`` result.
    """
    pool = Pool(pool)
    lo = starts if pool is Pool.MEAN else ends - 1
    overlapping = _check(hidden, weight, bias, starts, ends, lo)
    impl = resolve_impl(impl, hidden, weight, bias, starts, ends)
    # S = 0 goes to the torch path too: an empty result that is still part of the autograd graph.
    if impl == "torch" or starts.numel() == 0:
        return disc_head_torch(hidden, weight, bias, starts, ends, pool)
    if hidden.stride(1) != 1:
        hidden = hidden.contiguous()
    return _DiscHead.apply(hidden, weight.contiguous(), bias, lo.contiguous(), ends.contiguous(),
                           pool is Pool.MEAN, overlapping)
