"""Token-level Dr.GRPO loss (Eq. 2 of RIL.md) with its statistics, fused into one pass over the tokens.

    rho_t  = exp(lp_t - old_t)                                   (old = lp.detach() on-policy: rho = 1, drho/dlp = 1)
    k3_t   = exp(ref_t - lp_t) - (ref_t - lp_t) - 1              (k3 KL estimator, >= 0)
    l_t    = min(rho_t A_t, clip(rho_t, 1 - eps_low, 1 + eps_high) A_t) - beta k3_t
    loss   = -sum_t mask_t l_t / normalizer                      (normalizer = sequences x L_max, a constant)

    dloss/dlp_t = -mask_t [ rho_t A_t [not clipped_t] - beta (1 - exp(ref_t - lp_t)) ] / normalizer
    clipped_t   = (rho_t < 1 - eps_low and A_t < 0) or (rho_t > 1 + eps_high and A_t > 0)

``clipped_t`` is exactly the set of tokens where the clipped branch is the active (strictly smaller) side of the
min, so its policy gradient is zero; it is also TRL's and Liger's "clip ratio" statistic. Everything is
token-parallel: the forward writes five partial sums per block of tokens (loss numerator, mask count, KL sum,
clip count, ratio sum) that torch adds up over blocks, which keeps the result bitwise reproducible (no
atomics); the backward recomputes rho and k3 per token from the inputs instead of saving them.
"""

from typing import NamedTuple, Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._triton import interpreting, resolve_impl


class GRPOStats(NamedTuple):
    """Statistics of one loss call: 0-dim fp32 tensors, detached, left on the device (no host sync).

    Means are over masked tokens (weighted by a float mask); over zero masked tokens they are 0.
    """

    kl: Tensor  # mean k3 KL to the reference policy; 0 when ref_logprobs is None
    clip_fraction: Tensor  # fraction of tokens where the clipped branch of the min is active (TRL's definition)
    ratio: Tensor  # mean importance ratio rho = pi_theta / pi_old


# ---------------------------------------------------------------------------------------------------------------
# Reference (also the CPU path)
# ---------------------------------------------------------------------------------------------------------------


def dr_grpo_loss_ref(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    normalizer: Union[float, Tensor] = 1.0,
    upcast: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eager Dr.GRPO loss written as TRL writes it; autograd gives the gradient w.r.t. ``logprobs``.

    Computes in fp32 (at least) when ``upcast``, else in ``logprobs.dtype`` (the tests run it in fp64 as the
    ground truth). Returns ``(loss, kl, clip_fraction, ratio)``, 0-dim tensors in the compute dtype; only
    ``loss`` carries a graph.
    """
    dtype = torch.promote_types(logprobs.dtype, torch.float32) if upcast else logprobs.dtype
    lp = logprobs.to(dtype)
    adv = advantages.detach().to(dtype)
    m = mask.detach().to(dtype)
    # On-policy, TRL's exp(lp - lp.detach()): the value is exactly 1, the gradient is rho * A.
    old = lp.detach() if old_logprobs is None else old_logprobs.detach().to(dtype)
    out = m == 0  # masked-out tokens: ratio 1 and no KL, whatever their log-probs (inf * 0 would be NaN)
    rho = torch.exp((lp - old).masked_fill(out, 0.0))
    lo, hi = 1.0 - eps_low, 1.0 + eps_high
    per_token = torch.minimum(rho * adv, rho.clamp(lo, hi) * adv)
    kl = torch.zeros((), dtype=dtype, device=lp.device)
    count = m.sum()
    denom = torch.where(count > 0, count, 1.0)  # weighted means; 0 over no tokens
    if ref_logprobs is not None:
        delta = (ref_logprobs.detach().to(dtype) - lp).masked_fill(out, 0.0)
        k3 = torch.exp(delta) - delta - 1.0
        kl = (k3.detach() * m).sum() / denom
        if beta != 0.0:
            per_token = per_token - beta * k3
    if isinstance(normalizer, Tensor):
        normalizer = normalizer.detach().to(device=lp.device, dtype=dtype)
    loss = -(per_token * m).sum() / normalizer
    rho = rho.detach()
    clipped = ((rho < lo) & (adv < 0)) | ((rho > hi) & (adv > 0))
    clip_fraction = (clipped.to(dtype) * m).sum() / denom
    ratio = (rho * m).sum() / denom
    return loss, kl, clip_fraction, ratio


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------

N_PARTIALS = 5  # loss numerator, mask count, kl sum, clip count, ratio sum


@triton.jit
def _load_tokens(lp_ptr, adv_ptr, mask_ptr, old_ptr, N, HAS_OLD: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of tokens: (offsets, valid, lp, A, mask, rho), fp32. Lanes past N load values
    that make every term 0 (mask 0, rho 1, k3 0); a masked-out token's rho is 1, whatever its log-probs."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    lp = tl.load(lp_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    m = tl.load(mask_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if HAS_OLD:
        rho = tl.exp(lp - tl.load(old_ptr + offs, mask=valid, other=0.0).to(tl.float32))
        rho = tl.where(m != 0.0, rho, 1.0)
    else:
        rho = tl.full((BLOCK,), 1.0, tl.float32)
    return offs, valid, lp, adv, m, rho


@triton.jit
def _dr_grpo_fwd_kernel(
    lp_ptr,
    adv_ptr,
    mask_ptr,
    old_ptr,
    ref_ptr,
    partials_ptr,  # (N_PARTIALS, n_blocks) fp32
    N,
    n_blocks,
    beta,
    clip_lo,
    clip_hi,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,  # read ref for the KL statistic
    HAS_KL: tl.constexpr,  # ... and put beta * k3 into the loss
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, valid, lp, adv, m, rho = _load_tokens(lp_ptr, adv_ptr, mask_ptr, old_ptr, N, HAS_OLD, BLOCK)
    rho_clipped = tl.minimum(tl.maximum(rho, clip_lo), clip_hi)
    term = tl.minimum(rho * adv, rho_clipped * adv)
    clipped = ((rho < clip_lo) & (adv < 0.0)) | ((rho > clip_hi) & (adv > 0.0))
    kl_sum = 0.0
    if HAS_REF:
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        delta = ref - lp
        k3 = tl.where(m != 0.0, tl.exp(delta) - delta - 1.0, 0.0)  # masked out: none (inf * 0 would be NaN)
        kl_sum = tl.sum(k3 * m, axis=0)
        if HAS_KL:
            term = term - beta * k3
    tl.store(partials_ptr + pid, tl.sum(term * m, axis=0))
    tl.store(partials_ptr + n_blocks + pid, tl.sum(m, axis=0))
    tl.store(partials_ptr + 2 * n_blocks + pid, kl_sum)
    tl.store(partials_ptr + 3 * n_blocks + pid, tl.sum(tl.where(clipped, m, 0.0), axis=0))
    tl.store(partials_ptr + 4 * n_blocks + pid, tl.sum(rho * m, axis=0))


@triton.jit
def _dr_grpo_bwd_kernel(
    lp_ptr,
    adv_ptr,
    mask_ptr,
    old_ptr,
    ref_ptr,
    scale_ptr,  # 0-dim fp32: -grad_loss / normalizer, read on the device so nothing syncs
    grad_ptr,  # (N,) d loss / d logprobs
    N,
    beta,
    clip_lo,
    clip_hi,
    HAS_OLD: tl.constexpr,
    HAS_KL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs, valid, lp, adv, m, rho = _load_tokens(lp_ptr, adv_ptr, mask_ptr, old_ptr, N, HAS_OLD, BLOCK)
    clipped = ((rho < clip_lo) & (adv < 0.0)) | ((rho > clip_hi) & (adv > 0.0))
    # d/dlp of min(rho A, clip(rho) A): rho A on the unclipped branch, 0 where the clipped branch is active.
    dterm = tl.where(clipped, 0.0, rho * adv)
    if HAS_KL:
        ref = tl.load(ref_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        # d k3 / d lp = 1 - exp(ref - lp)
        dterm = dterm - beta * (1.0 - tl.exp(ref - lp))
    scale = tl.load(scale_ptr).to(tl.float32)
    tl.store(grad_ptr + offs, tl.where(m != 0.0, scale * m * dterm, 0.0), mask=valid)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _block() -> int:
    # Under the interpreter each program costs milliseconds whatever its size, so fewer, larger blocks.
    return 4096 if interpreting() else 1024


def _fwd_sums(lp, adv, mask, old, ref, beta, clip_lo, clip_hi, has_kl) -> Tensor:
    """The five masked sums, a (N_PARTIALS,) fp32 tensor, reduced over blocks in a fixed order."""
    n = lp.numel()
    block = _block()
    n_blocks = triton.cdiv(n, block)
    if n_blocks == 0:
        return torch.zeros(N_PARTIALS, dtype=torch.float32, device=lp.device)
    partials = torch.empty((N_PARTIALS, n_blocks), dtype=torch.float32, device=lp.device)
    _dr_grpo_fwd_kernel[(n_blocks,)](
        lp, adv, mask,
        lp if old is None else old,  # unread placeholders when absent (constexpr flags)
        lp if ref is None else ref,
        partials, n, n_blocks, float(beta), float(clip_lo), float(clip_hi),
        HAS_OLD=old is not None, HAS_REF=ref is not None, HAS_KL=has_kl, BLOCK=block,
    )  # fmt: skip
    return partials.sum(dim=1)


def _bwd(lp, adv, mask, old, ref, scale, beta, clip_lo, clip_hi, has_kl) -> Tensor:
    n = lp.numel()
    grad = torch.empty_like(lp)
    if n == 0:
        return grad
    block = _block()
    _dr_grpo_bwd_kernel[(triton.cdiv(n, block),)](
        lp, adv, mask,
        lp if old is None else old,
        lp if ref is None or not has_kl else ref,
        scale, grad, n, float(beta), float(clip_lo), float(clip_hi),
        HAS_OLD=old is not None, HAS_KL=has_kl, BLOCK=block,
    )  # fmt: skip
    return grad


# ---------------------------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------------------------


class _DrGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, advantages, mask, old, ref, beta, eps_low, eps_high, normalizer):
        clip_lo, clip_hi = 1.0 - eps_low, 1.0 + eps_high
        has_kl = ref is not None and beta != 0.0
        sums = _fwd_sums(logprobs, advantages, mask, old, ref, beta, clip_lo, clip_hi, has_kl)
        numerator, count, kl_sum, clip_count, ratio_sum = sums.unbind(0)
        loss = -(numerator / normalizer)
        denom = torch.where(count > 0, count, 1.0)  # weighted means; 0 over no tokens
        kl, clip_fraction, ratio = kl_sum / denom, clip_count / denom, ratio_sum / denom
        ctx.save_for_backward(logprobs, advantages, mask, old, ref if has_kl else None)
        ctx.args = (beta, clip_lo, clip_hi, has_kl, normalizer)
        ctx.mark_non_differentiable(kl, clip_fraction, ratio)
        return loss, kl, clip_fraction, ratio

    @staticmethod
    def backward(ctx, grad_loss, *_grad_stats):
        logprobs, advantages, mask, old, ref = ctx.saved_tensors
        beta, clip_lo, clip_hi, has_kl, normalizer = ctx.args
        scale = (-grad_loss / normalizer).to(torch.float32).contiguous()
        grad = _bwd(logprobs, advantages, mask, old, ref, scale, beta, clip_lo, clip_hi, has_kl)
        return grad, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------------
# Public function
# ---------------------------------------------------------------------------------------------------------------


def _check_inputs(logprobs, advantages, mask, old_logprobs, ref_logprobs, beta, eps_low, eps_high, normalizer):
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be 1-D (N,) over packed tokens, got shape {tuple(logprobs.shape)}")
    for name, t in (("advantages", advantages), ("mask", mask), ("old_logprobs", old_logprobs),
                    ("ref_logprobs", ref_logprobs)):  # fmt: skip
        if t is None:
            continue
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(logprobs.shape)}, got {tuple(t.shape)}")
        if t.device != logprobs.device:
            raise ValueError(f"{name} is on {t.device}, logprobs on {logprobs.device}")
        if name != "mask" and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if not logprobs.is_floating_point():
        raise ValueError(f"logprobs must be a floating-point tensor, got {logprobs.dtype}")
    if not (beta >= 0.0 and eps_low >= 0.0 and eps_high >= 0.0):
        raise ValueError(f"beta, eps_low and eps_high must be >= 0, got {beta}, {eps_low}, {eps_high}")
    if isinstance(normalizer, Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"a tensor normalizer must be 0-dim, got shape {tuple(normalizer.shape)}")
    elif not normalizer > 0:
        raise ValueError(f"normalizer (sequences x L_max) must be > 0, got {normalizer}")


def dr_grpo_loss(
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    old_logprobs: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    beta: float = 0.0,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    normalizer: Union[int, float, Tensor],
    impl: str = "auto",
) -> tuple[Tensor, GRPOStats]:
    """Token-level Dr.GRPO loss (RIL.md Eq. 2) over N packed tokens, and its statistics.

    Args:
        logprobs: (N,) fp32, log pi_theta of each sampled token; the only input that receives a gradient.
        advantages: (N,) fp32, each sequence's advantage broadcast to its tokens.
        mask: (N,) bool or float, 1 on response tokens to train on (a float mask weights tokens).
        old_logprobs: (N,) fp32 log pi_old, or None for on-policy: rho = exp(lp - lp.detach()) = 1, with
            gradient rho * A, as TRL does.
        ref_logprobs: (N,) fp32 log pi_ref, or None. The KL term enters the loss only when it is given and
            beta != 0; when given, ``stats.kl`` is reported even with beta == 0.
        beta: weight of the k3 KL penalty.
        eps_low, eps_high: clip range [1 - eps_low, 1 + eps_high] of rho.
        normalizer: number of sequences x L_max: a Python number, or a 0-dim tensor (e.g. all-reduced across
            ranks; it stays on the device, so nothing syncs).
        impl: "auto" (Triton on CUDA, the eager reference elsewhere), "triton" or "torch".

    Returns:
        loss: 0-dim fp32, -sum_t mask_t [min(rho A, clip(rho) A) - beta k3]_t / normalizer.
        stats: ``GRPOStats`` of 0-dim fp32 detached tensors: mean kl, clip_fraction and ratio over masked tokens.
    """
    _check_inputs(logprobs, advantages, mask, old_logprobs, ref_logprobs, beta, eps_low, eps_high, normalizer)
    if resolve_impl(impl, logprobs) == "torch":
        loss, kl, clip_fraction, ratio = dr_grpo_loss_ref(
            logprobs, advantages, mask, old_logprobs, ref_logprobs, beta, eps_low, eps_high, normalizer
        )
        return loss.float(), GRPOStats(kl.float(), clip_fraction.float(), ratio.float())

    if isinstance(normalizer, Tensor):
        normalizer = normalizer.detach().to(device=logprobs.device, dtype=torch.float32)
    else:
        normalizer = float(normalizer)
    mask = mask.to(torch.float32)  # bool/int masks become 0/1 weights; a no-op for fp32
    old = old_logprobs.detach().contiguous() if old_logprobs is not None else None
    ref = ref_logprobs.detach().contiguous() if ref_logprobs is not None else None
    loss, kl, clip_fraction, ratio = _DrGRPOLoss.apply(
        logprobs.contiguous(), advantages.detach().contiguous(), mask.detach().contiguous(), old, ref,
        float(beta), float(eps_low), float(eps_high), normalizer,
    )  # fmt: skip
    return loss, GRPOStats(kl, clip_fraction, ratio)
