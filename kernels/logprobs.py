"""Per-token log-probabilities (plus k3 KL and entropy) straight from hidden states and the LM head.

RIL needs log π(o_t | ·) of every response token under the student, the old policy and the reference,
over a vocabulary of ~152k. Building the (N, V) logits costs N·V·4 bytes (5 GB at N = 8192), so
neither path here ever builds them:

* forward, Triton: each program owns a block of rows and a slice of the vocabulary, runs the
  hidden @ weightᵀ tiles through ``tl.dot`` and folds them into an online log-sum-exp (and the running
  Σ p·z for the entropy); the slices are merged in O(N) afterwards. Extra memory: O(N).
* backward, Triton: the vocabulary is taken in chunks; a Triton kernel recomputes the chunk's logits
  tile by tile and writes d loss / d logits straight into an (N, chunk) buffer; two dense matmuls
  (cuBLAS on GPU) then add the chunk's share of d hidden (accumulated in fp32) and write its rows of
  d weight (each a full reduction over N inside one matmul).
* torch path (CPU, fallback, fp64): the same vocabulary chunks with plain torch ops, the forward an
  online log-sum-exp over them. Chunking the vocabulary rather than the rows reads the LM head once per
  pass instead of once per row chunk: on the CPU, where the pass is memory-bound, that is the difference
  between seconds and minutes at V = 152k. It computes in fp32, or in fp64 for fp64 inputs (so an fp64
  model stays an fp64 oracle); the Triton kernels accumulate in fp32 and refuse fp64 inputs.

Formulas, with z = hidden @ weightᵀ / τ, lse = log Σ_v exp z_v, p = exp(z − lse):
    logprob   lp  = z_target − lse
    entropy   H   = lse − Σ_v p_v z_v
    k3 KL     kl  = exp(ref − lp) − (ref − lp) − 1
    d lp / d z_v  = 1[v = target] − p_v
    d H  / d z_v  = −p_v (z_v − lse + H)
    d kl / d lp   = 1 − exp(ref − lp)
"""

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._triton import interpreting, resolve_impl

# Bytes of (N × chunk) scratch one vocabulary chunk may use: the torch path's logits and softmax
# temporaries, and the Triton backward's d-logits buffer. Large on GPU so the matmuls stay efficient;
# small on CPU so the memory bound of the issue holds (≤ 10% of the eager logits).
_CHUNK_BYTES = {"cuda": 1 << 30, "cpu": 1 << 25}


class TokenLogprobs(NamedTuple):
    """Result of :func:`token_logprobs`: ``logprobs (N,)`` fp32, ``kl (N,)`` fp32 or None,
    ``entropy (N,)`` fp32 or None (each fp64 for fp64 inputs)."""

    logprobs: torch.Tensor
    kl: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]


def _k3(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π ‖ π_ref) per token: exp(ref − lp) − (ref − lp) − 1 (≥ 0)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


# ----------------------------------------------------------------------------------------------------
# Reference: eager PyTorch, builds the full logits. For tests and as the definition of the result.
# ----------------------------------------------------------------------------------------------------
def token_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ref_logprobs: Optional[torch.Tensor] = None,
    return_entropy: bool = False,
    upcast: bool = False,
) -> TokenLogprobs:
    """Eager reference of :func:`token_logprobs`; materialises the (N, V) logits.

    The matmul runs in the inputs' dtype (so a bf16 run shows what bf16 costs) unless ``upcast``; the
    softmax runs in fp32, or fp64 for fp64 inputs, and so do the outputs.
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)
    if upcast:
        hidden, weight = hidden.to(acc), weight.to(acc)
    logits = (hidden @ weight.T).to(acc) / temperature
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(1, targets[:, None]).squeeze(1)
    kl = _k3(ref_logprobs.to(acc), lp) if ref_logprobs is not None else None
    entropy = -(logp.exp() * logp).sum(-1) if return_entropy else None
    return TokenLogprobs(lp, kl, entropy)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 tile of hidden @ weightᵀ."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    # 64-bit row offsets: a head's V·H, or a packed row's N·H, may pass 2^31 elements (152,064 × 16,384).
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for h0 in range(0, H, BLOCK_H):
        hk = h0 + tl.arange(0, BLOCK_H)
        hk_ok = hk < H
        a = tl.load(h_rows + hk[None, :], mask=row_ok[:, None] & hk_ok[None, :], other=0.0)
        b = tl.load(w_rows + hk[None, :], mask=col_ok[:, None] & hk_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter computes bf16 dots wrongly (triton #11584)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _fwd_kernel(h_ptr, w_ptr, t_ptr, max_ptr, sum_ptr, zt_ptr, pz_ptr,
                N, V, H, stride_h, stride_w, inv_temp, v_per_split,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                ENTROPY: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (row block, vocabulary slice): online log-sum-exp over the slice's logit tiles.

    Writes, per row, into the slice's row of the (splits, N) partials: the running max m, Σ exp(z − m),
    the target's logit if it lies in the slice (else 0) and Σ exp(z − m)·(z − m) (for the entropy:
    measured from m it has no cancellation against lse).
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    v_begin = split * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    pz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                         BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION) * inv_temp
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has at least one valid column
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new[:, None])
        if ENTROPY:  # re-centre the running Σ e·(z − m) on m_new; alpha = 0 while m = −inf
            shift = tl.where(alpha > 0, m - m_new, 0.0)
            pz = alpha * (pz + shift * s) + tl.sum(e * tl.where(col_ok[None, :], z - m_new[:, None], 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        m = m_new
    out = split * N + rows
    tl.store(max_ptr + out, m, mask=row_ok)
    tl.store(sum_ptr + out, s, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)
    tl.store(pz_ptr + out, pz, mask=row_ok)


@triton.jit
def _dlogits_kernel(h_ptr, w_ptr, t_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, out_ptr,
                    N, V, H, stride_h, stride_w, stride_out, inv_temp, col_offset,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                    ENTROPY: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One (row block, vocabulary tile) of d loss / d (hidden @ weightᵀ), recomputing the logits.

    ``w_ptr`` points at the vocabulary chunk's first row, ``col_offset`` is that row's token id."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                     BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, DOT_PRECISION) * inv_temp
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    logp = z - lse[:, None]
    p = tl.exp(logp)
    dz = tl.where(cols[None, :] + col_offset == tgt[:, None], g_lp[:, None], 0.0) - g_lp[:, None] * p
    if ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        dz -= g_ent[:, None] * p * (logp + ent[:, None])
    ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
    tl.store(ptrs, (dz * inv_temp).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _blocks(hidden: torch.Tensor) -> dict:
    """Tile sizes, warps and dot flags. Under the interpreter every program costs ~1 ms of Python, so tiles
    are large there; on GPU they are matmul-shaped, with 8 warps: compiled for sm_90 (Triton 3.9's ptxas -v,
    bf16), the forward and the entropy backward spill 336 and 448 bytes of registers a thread at the default 4
    warps (255 registers) and none at 8 (177 and 196). fp32 inputs get IEEE dots (TF32 would cost ~1e-3)."""
    upcast = interpreting()
    if upcast:
        sizes = dict(BLOCK_N=128, BLOCK_V=2048, BLOCK_H=128)
    else:
        sizes = dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64, num_warps=8)
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"
    return dict(sizes, UPCAST=upcast, DOT_PRECISION=precision)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _merge(row_max, row_sum, pz, return_entropy):
    """Combine online-softmax partials over K vocabulary parts, each (K, N): per part the max m_k,
    s_k = Σ exp(z − m_k) and pz_k = Σ exp(z − m_k)(z − m_k). Returns (lse, entropy or None), (N,) in the
    partials' dtype.

    With M = max_k m_k and c_k = exp(m_k − M): S = Σ_k c_k s_k, lse = M + log S, and entropy
    = log S − Σ_k c_k (pz_k + (m_k − M) s_k) / S (all terms measured from M: no cancellation).
    """
    top = row_max.max(dim=0).values
    shift = row_max - top
    scale = torch.exp(shift)
    total = (row_sum * scale).sum(0)
    lse = top + torch.log(total)
    if not return_entropy:
        return lse, None
    shift = torch.where(scale > 0, shift, 0.0)  # an empty part has m_k = −inf and s_k = 0
    return lse, torch.log(total) - (scale * (pz + shift * row_sum)).sum(0) / total


def _vocab_slice(N: int, V: int, cfg: dict, device: torch.device) -> int:
    """Vocabulary columns per program of the Triton forward, a multiple of BLOCK_V: the vocabulary is split
    so that small N still fills the GPU (about two programs per SM)."""
    want = max(1, triton.cdiv(2 * _num_sms(device), triton.cdiv(N, cfg["BLOCK_N"])))
    return triton.cdiv(triton.cdiv(V, want), cfg["BLOCK_V"]) * cfg["BLOCK_V"]


def _forward_triton(hidden, weight, targets, temperature, return_entropy):
    """Triton forward: (lse, target logit, entropy or None), each (N,) fp32."""
    N, H = hidden.shape
    V = weight.shape[0]
    cfg = _blocks(hidden)
    row_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    v_per_split = _vocab_slice(N, V, cfg, hidden.device)
    splits = triton.cdiv(V, v_per_split)
    parts = [torch.empty((splits, N), device=hidden.device, dtype=torch.float32) for _ in range(4)]
    row_max, row_sum, zt, pz = parts
    _fwd_kernel[(row_blocks, splits)](
        hidden, weight, targets, row_max, row_sum, zt, pz,
        N, V, H, hidden.stride(0), weight.stride(0), 1.0 / temperature, v_per_split,
        ENTROPY=return_entropy, **cfg,
    )
    lse, entropy = _merge(row_max, row_sum, pz, return_entropy)
    return lse, zt.sum(0), entropy


def _dlogits_triton(h, w, t, col_offset, lse, ent, g_lp, g_ent, temperature):
    """d loss / d logits (N, chunk) in the weights' dtype for the chunk ``w`` (rows col_offset…), by Triton."""
    N, H = h.shape
    V = w.shape[0]
    cfg = _blocks(h)
    # The interpreter truncates fp32 → bf16 stores instead of rounding them: store fp32 there and let
    # torch round, as a GPU store would.
    out = torch.empty((N, V), device=h.device, dtype=torch.float32 if cfg["UPCAST"] else w.dtype)
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(V, cfg["BLOCK_V"]))
    entropy = g_ent is not None
    _dlogits_kernel[grid](
        h, w, t, lse, ent if entropy else lse, g_lp, g_ent if entropy else g_lp, out,
        N, V, H, h.stride(0), w.stride(0), out.stride(0), 1.0 / temperature, col_offset,
        ENTROPY=entropy, **cfg,
    )
    return out.to(w.dtype)


# ----------------------------------------------------------------------------------------------------
# The torch path: the same algorithm over vocabulary chunks in plain PyTorch ops
# ----------------------------------------------------------------------------------------------------
def _acc_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The torch path's compute dtype: fp32, or fp64 for fp64 inputs."""
    return torch.promote_types(hidden.dtype, torch.float32)


def _vocab_chunk(hidden: torch.Tensor, V: int) -> int:
    """Vocabulary rows per chunk so that one (N, chunk) scratch tensor in the compute dtype (fp32, fp64 for
    fp64 inputs) stays within _CHUNK_BYTES."""
    budget = _CHUNK_BYTES["cuda" if hidden.is_cuda else "cpu"]
    return min(V, max(1, budget // (_acc_dtype(hidden).itemsize * hidden.shape[0])))


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, chunk) logits of one vocabulary chunk, fp32 (fp64 for fp64 inputs); the matmul in the inputs' dtype."""
    return (h @ w.T).to(_acc_dtype(h)).div_(temperature)


def _forward_torch(hidden, weight, targets, temperature, return_entropy):
    """Torch forward, an online log-sum-exp over vocabulary chunks: (lse, target logit, entropy or None),
    each (N,) fp32 (fp64 for fp64 inputs)."""
    N, V = hidden.shape[0], weight.shape[0]
    f = dict(device=hidden.device, dtype=_acc_dtype(hidden))
    m = torch.full((N,), float("-inf"), **f)
    s = torch.zeros(N, **f)
    zt = torch.zeros(N, **f)
    pz = torch.zeros(N, **f)
    step = _vocab_chunk(hidden, V)
    for v0 in range(0, V, step):
        z = _chunk_logits(hidden, weight[v0:v0 + step], temperature)
        local = targets - v0
        hit = (local >= 0) & (local < z.shape[1])
        zt += torch.where(hit, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
        m_new = torch.maximum(m, z.amax(dim=1))
        alpha = torch.exp(m - m_new)
        z = z.sub_(m_new[:, None])
        e = torch.exp(z)
        if return_entropy:  # Σ e·(z − m), re-centred on m_new as in the Triton kernel
            pz = alpha * (pz + torch.where(alpha > 0, m - m_new, 0.0) * s) + torch.linalg.vecdot(e, z)
        s = s * alpha + e.sum(1)
        m = m_new
    lse, entropy = _merge(m[None], s[None], pz[None], return_entropy)
    return lse, zt, entropy


def _dlogits_torch(h, w, t, col_offset, lse, ent, g_lp, g_ent, temperature):
    """d loss / d logits (N, chunk) in the weights' dtype for the chunk ``w`` (rows col_offset…), in torch."""
    logp = _chunk_logits(h, w, temperature).sub_(lse[:, None])
    p = torch.exp(logp)
    if g_ent is not None:  # d H / d z = −p (log p + H)
        dz = logp.add_(ent[:, None]).mul_(p).mul_(-g_ent[:, None])
        dz.sub_(p.mul_(g_lp[:, None]))
    else:
        dz = p.mul_(-g_lp[:, None])
    local = t - col_offset
    hit = (local >= 0) & (local < w.shape[0])
    dz.scatter_add_(1, local.clamp(0, w.shape[0] - 1)[:, None], torch.where(hit, g_lp, 0.0)[:, None])
    return dz.div_(temperature).to(w.dtype)


# ----------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------
class _TokenLogprobs(torch.autograd.Function):
    """Saves only O(N) per-row values; the backward recomputes the logits one vocabulary chunk at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ref_logprobs, temperature, return_entropy, impl):
        forward = _forward_triton if impl == "triton" else _forward_torch
        lse, zt, entropy = forward(hidden, weight, targets, temperature, return_entropy)
        lp = zt - lse
        kl = _k3(ref_logprobs.to(lp.dtype), lp) if ref_logprobs is not None else None
        ctx.save_for_backward(hidden, weight, targets, lse, lp, entropy, ref_logprobs)
        ctx.temperature, ctx.impl = temperature, impl
        # An output the loss does not use gets None, not zeros: 0 · (1 − exp(ref − lp)) would be NaN where
        # ref − lp passes ~88.7 (exp overflows in fp32) and spread to every row of d weight.
        ctx.set_materialize_grads(False)
        return lp, kl, entropy

    @staticmethod
    def backward(ctx, g_lp, g_kl, g_ent):
        hidden, weight, targets, lse, lp, entropy, ref = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        acc = lp.dtype  # fp32, or fp64 for fp64 inputs
        g_lp = torch.zeros_like(lp) if g_lp is None else g_lp.to(acc)
        if g_kl is not None and ref is not None:  # d kl / d lp = 1 − exp(ref − lp)
            g_lp = g_lp + g_kl.to(acc) * (1 - torch.exp(ref.to(acc) - lp))
        g_lp = g_lp.contiguous()
        g_ent = g_ent.to(acc).contiguous() if (g_ent is not None and entropy is not None) else None

        dlogits = _dlogits_triton if ctx.impl == "triton" else _dlogits_torch
        V = weight.shape[0]
        d_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=acc) if need_h else None
        d_weight = torch.empty_like(weight) if need_w else None
        step = _vocab_chunk(hidden, V)
        for v0 in range(0, V, step):
            w = weight[v0:v0 + step]
            g = dlogits(hidden, w, targets, v0, lse, entropy, g_lp, g_ent, ctx.temperature)
            if need_h:  # summed over the chunks in fp32 (fp64); a bf16 chunk's own product is rounded to bf16 first
                if g.dtype == acc:
                    d_hidden.addmm_(g, w)
                else:
                    d_hidden.add_(g @ w)
            if need_w:  # each row of d weight is one full reduction over N
                torch.mm(g.T, hidden, out=d_weight[v0:v0 + step])
        if need_h:
            d_hidden = d_hidden.to(hidden.dtype)
        return d_hidden, d_weight, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------
def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ref_logprobs: Optional[torch.Tensor] = None,
    return_entropy: bool = False,
    impl: str = "auto",
) -> TokenLogprobs:
    """Log-probabilities of ``targets`` under softmax(hidden @ weightᵀ / temperature), never building the
    (N, V) logits.

    Args:
        hidden: ``(N, H)`` bf16 or fp32 (or fp64, torch path only), the final hidden states of the positions
            that predict ``targets``; any strides (the Triton path copies it to a contiguous tensor).
        weight: ``(V, H)``, same dtype as ``hidden``: the LM head.
        targets: ``(N,)`` int64 token ids in ``[0, V)``.
        temperature: the sampling temperature τ (logits are divided by it), > 0.
        ref_logprobs: ``(N,)`` fp32 reference-policy log-probs; when given, ``kl`` is the k3 estimator
            exp(ref − lp) − (ref − lp) − 1.
        return_entropy: also return the entropy of each row's distribution.
        impl: ``"auto"`` (Triton on CUDA, torch elsewhere and for fp64 inputs), ``"triton"`` (on CPU only
            under ``TRITON_INTERPRET=1``; fp64 inputs are a ValueError, its kernels accumulate in fp32) or
            ``"torch"`` (chunked, recomputes in backward).

    Returns:
        ``TokenLogprobs(logprobs (N,) fp32, kl (N,) fp32 | None, entropy (N,) fp32 | None)`` (fp64 for
        fp64 inputs), differentiable w.r.t. ``hidden`` and ``weight`` through all three (gradients in the
        inputs' dtypes, accumulated in fp32, or fp64 for fp64 inputs).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be (N, H) and weight (V, H); "
                         f"got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype; got {hidden.dtype} and {weight.dtype}")
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be ({hidden.shape[0]},) int64; got {tuple(targets.shape)} {targets.dtype}")
    if ref_logprobs is not None and ref_logprobs.shape != targets.shape:
        raise ValueError(f"ref_logprobs must be ({hidden.shape[0]},); got {tuple(ref_logprobs.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    V = weight.shape[0]
    # One host sync, worth it: an out-of-range id would silently give lp = −lse in the Triton path.
    if targets.numel():
        low, high = torch.stack(torch.aminmax(targets)).tolist()
        if low < 0 or high >= V:
            raise ValueError(f"targets must lie in [0, {V}); got [{low}, {high}]")
    if hidden.dtype == torch.float64:  # the Triton kernels accumulate in fp32: fp64 results would be fp32-accurate
        if impl == "triton":
            raise ValueError("impl='triton' computes in fp32 and takes no torch.float64 inputs; "
                             "use impl='torch' or 'auto'")
        impl = "torch" if impl == "auto" else impl
    impl = resolve_impl(impl, hidden, weight, targets)
    if hidden.shape[0] == 0:
        # Connected to both inputs so that .backward() through an empty batch still works.
        empty = hidden.new_zeros(0, dtype=_acc_dtype(hidden)) + 0 * hidden.sum() + 0 * weight.sum()
        return TokenLogprobs(empty, empty if ref_logprobs is not None else None, empty if return_entropy else None)
    lp, kl, entropy = _TokenLogprobs.apply(
        hidden.contiguous(), weight.contiguous(), targets.long().contiguous(),
        ref_logprobs, float(temperature), bool(return_entropy), impl,
    )
    return TokenLogprobs(lp, kl, entropy)
