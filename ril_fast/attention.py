"""Varlen attention for packed batches, registered with transformers as ``attn_implementation="ril_varlen"``.

A packed batch is one row of T tokens holding S samples; each sample attends only to itself. On the
GPU that is one varlen flash-attention call over the whole row with the samples' boundaries
(``cu_seqlens``) instead of a (T, T) block-diagonal mask. The boundaries come from the text position
ids the decoder layers pass along (each sample restarts at 0: the same rule transformers' own
flash-attention path uses), and are computed once per forward, not once per layer.

Kernels, picked per call:
* CUDA, fp16/bf16, flash-attn importable: ``flash_attn.flash_attn_varlen_func``;
* CUDA, fp16/bf16 otherwise: PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (torch ≥ 2.9);
* anything else (CPU, fp32): one ``scaled_dot_product_attention`` call per sample, the reference.

The name has no "flash" in it on purpose: transformers treats any "*flash*" name as a hub kernel to
download. The cost: vision towers (Qwen-VL) take their non-flash path, which splits the image/window
chunks on the host and calls this function once per chunk; a call with no boundaries is plain SDPA.
A 2-D padding mask (padded batches) is handled by gathering the real tokens into a varlen row.
"""

import inspect

import torch
import torch.nn.functional as F

NAME = "ril_varlen"

# cu_seqlens of the last position-ids tensor seen (every layer of one forward gets the same tensor),
# keyed by the tensor and its version counter so an in-place edit between forwards is not missed.
_boundaries_cache: tuple[torch.Tensor, int, torch.Tensor, int] | None = None


def _boundaries_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (S+1,) int32 and max length of the samples in ``position_ids`` (B, T) (restarts at 0)."""
    global _boundaries_cache
    cache = _boundaries_cache
    if cache is not None and cache[0] is position_ids and cache[1] == position_ids._version:
        return cache[2], cache[3]
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    _boundaries_cache = (position_ids, position_ids._version, cu, max_len)
    return cu, max_len


def _reference(q, k, v, cu, causal: bool, scale: float | None, dropout: float) -> torch.Tensor:
    """(N, Hq, D) from (N, H, D) inputs: SDPA over each [cu[i], cu[i+1]) on its own."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        seg = [x[lo:hi].transpose(0, 1) for x in (q, k, v)]  # (H, L, D)
        out[lo:hi] = F.scaled_dot_product_attention(
            *seg, is_causal=causal, scale=scale, dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1]
        ).transpose(0, 1)
    return out


def _torch_varlen(q, k, v, cu, max_len: int, causal: bool, scale: float | None) -> torch.Tensor:
    """PyTorch's varlen flash kernel; its signature moved between releases (is_causal -> window_size)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kw = {"scale": scale}
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kw["is_causal"] = causal
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, *, causal: bool, scale: float | None = None,
                     dropout: float = 0.0) -> torch.Tensor:
    """Attention of each sample [cu[i], cu[i+1]) with itself.

    q (N, Hq, D), k and v (N, Hkv, D) with Hq a multiple of Hkv; cu_seqlens (S+1,) int32 on q's device.
    Returns (N, Hq, D) in q's dtype.
    """
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            return _torch_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale)
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      dropout_p=dropout, softmax_scale=scale, causal=causal)
    return _reference(q, k, v, cu_seqlens, causal, scale, dropout)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             is_causal=None, position_ids=None, sliding_window=None, **kwargs):
    """transformers attention function: query (B, Hq, T, D), key/value (B, Hkv, T, D) -> ((B, T, Hq, D), None).

    Boundaries, in order of preference: ``cu_seq_lens_q`` (given by a caller), a 2-D padding mask
    ``attention_mask`` (B, T), the restarting ``position_ids`` (B, T), else one sample per batch row.
    """
    if sliding_window is not None:
        raise NotImplementedError("ril_varlen does not implement sliding-window attention")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("ril_varlen does not implement logit soft-capping")
    B, Hq, T, D = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D).contiguous() for x in (query, key, value))
    dropout = dropout if module.training else 0.0
    keep = None
    if kwargs.get("cu_seq_lens_q") is not None:
        cu, max_len = kwargs["cu_seq_lens_q"].to(torch.int32), int(kwargs["max_length_q"])
    elif attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(f"ril_varlen takes a 2-D padding mask, got shape {tuple(attention_mask.shape)}")
        keep = attention_mask.reshape(-1).bool()
        lens = attention_mask.bool().sum(1)
        cu = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        max_len = int(lens.max())
        q, k, v = q[keep], k[keep], v[keep]
    elif position_ids is not None:
        cu, max_len = _boundaries_from_positions(position_ids)
    else:
        cu = torch.arange(0, (B + 1) * T, T, device=q.device, dtype=torch.int32)
        max_len = T
    out = varlen_attention(q, k, v, cu, max_len, causal=causal, scale=scaling, dropout=dropout)
    if keep is not None:
        out = out.new_zeros(B * T, Hq, D).index_put_((keep,), out)
    return out.reshape(B, T, Hq, D), None


def register() -> str:
    """Register ``ril_varlen`` with transformers' attention and mask interfaces (idempotent); returns the name.

    The mask function is flash-attention's: None for unpadded input, the 2-D padding mask otherwise.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    return NAME
