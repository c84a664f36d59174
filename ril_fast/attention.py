"""Varlen attention for packed batches, registered with transformers as ``attn_implementation="ril_varlen"``.

A packed batch is one row of T tokens holding S samples; each sample attends only to itself. On the
GPU that is one varlen flash-attention call over the whole row with the samples' boundaries
(``cu_seqlens``) instead of a (T, T) block-diagonal mask. The boundaries come from the text position
ids the decoder layers pass along (each sample restarts at 0: the same rule transformers' own
flash-attention path uses), and are computed once per forward, not once per layer.

Kernels, picked per call:
* CUDA, fp16/bf16, flash-attn importable: ``flash_attn.flash_attn_varlen_func``;
* CUDA, fp16/bf16 otherwise: PyTorch's own ``torch.nn.attention.varlen.varlen_attn`` (torch ≥ 2.9), unless
  the call needs what the installed release lacks (dropout; a non-default scale on 2.9);
* anything else (CPU, fp32, those calls): the samples right-padded into one batch and one
  ``scaled_dot_product_attention`` call with a per-sample mask (``_padded``); ``_reference``, one SDPA
  call per sample, is what it is tested against.

Generation with a KV cache calls this too: each batch row is one sample whose few queries are its last
positions (causal masking aligned to the last key, flash-attention's rule), left padding given by the
2-D mask. One query per row (every decoding step) is one SDPA call over the cache as it is (``_decode``):
no copy of the cache and no host synchronisation, in the attention or in building its mask.

The name has no "flash" in it on purpose: transformers treats any "*flash*" name as a hub kernel to
download when a model is loaded with it. But Qwen-VL vision towers hand their windows' boundaries to the
attention function only under a "*flash*" name; under any other they split the windows on the host and
make one call per window (thousands per forward at real image sizes). So ``models.load`` renames the
tower's implementation, after loading, to ``VISION_NAME``: this same function under a "flash" name, one
varlen call per layer. A call with no boundaries is plain SDPA. A 2-D padding mask (padded batches) is
handled by gathering the real tokens into a varlen row.
"""

import contextlib
import contextvars
import functools
import inspect
import math

import torch
import torch.nn.functional as F

from ril_fast.processor import UnsupportedModel

NAME = "ril_varlen"
VISION_NAME = "ril_flash_varlen"  # set on loaded vision towers only (see above); never given to from_pretrained

# cu_seqlens of the last position-ids tensor seen (every layer of one forward gets the same tensor),
# keyed by the tensor and its version counter so an in-place edit between forwards is not missed.
_boundaries_cache: tuple[torch.Tensor, int, torch.Tensor, int] | None = None
# The rows kept by the last 2-D padding mask seen (every layer of a padded prefill gets the same mask), keyed alike.
_mask_cache: tuple | None = None
# Set while a packed row goes through the model (:func:`packed_forward`).
_packed = contextvars.ContextVar("ril_fast_packed_forward", default=False)


@contextlib.contextmanager
def packed_forward():
    """Around a model's forward over a packed row: a causal attention call there that gets neither the row's
    position ids nor its boundaries (a model whose layers drop them, such as GPT-BigCode or Persimmon) raises
    ``UnsupportedModel`` instead of attending across the row's samples."""
    token = _packed.set(True)
    try:
        yield
    finally:
        _packed.reset(token)


def _check_window(module, window: int | None, longest: int) -> None:
    """A sliding window (a query sees the keys less than ``window`` positions back, transformers' rule) changes
    nothing for samples of at most ``window`` tokens; ril_fast's attention has none, so a longer one is an error."""
    if window is not None and longest > window:
        raise UnsupportedModel(f"{type(module).__name__} attends within a sliding window of {window} tokens and a "
                               f"sample here is {longest} tokens long: ril_fast's attention has no sliding window, so "
                               f"it is exact only for samples (prompt and response) of at most {window} tokens: lower "
                               f"max_new_tokens or shorten the prompts")


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


def _reference(q, k, v, cu_q, cu_k, causal: bool, scale: float | None, dropout: float) -> torch.Tensor:
    """(Nq, Hq, D) from (N, H, D) inputs: SDPA over each sample on its own, queries [cu_q[i], cu_q[i+1])
    against keys [cu_k[i], cu_k[i+1]); causal masking aligned to the last key (flash-attention's rule)."""
    out = q.new_empty(q.shape)
    for (ql, qh), (kl, kh) in zip(_spans(cu_q), _spans(cu_k)):
        seg = [x.transpose(0, 1) for x in (q[ql:qh], k[kl:kh], v[kl:kh])]  # (H, L, D)
        mask = torch.ones(qh - ql, kh - kl, dtype=torch.bool, device=q.device).tril(kh - kl - (qh - ql)) \
            if causal else None
        out[ql:qh] = F.scaled_dot_product_attention(
            *seg, attn_mask=mask, scale=scale, dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1]
        ).transpose(0, 1)
    return out


def _spans(cu: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu.tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _padded(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float | None,
            dropout: float) -> torch.Tensor:
    """The CPU path: every sample in one right-padded (S, H, L, D) batch and ONE SDPA call with an
    (S, 1, Lq, Lk) boolean mask (the sample's real keys; causal aligned to its last key).

    On a CPU a packed row of T tokens under a (T, T) block-diagonal mask costs O(T^2), and a loop of
    per-sample SDPA calls pays dispatch per sample; the padded batch costs S * Lq * Lk (forward + backward
    of the demo student over 128 samples of ~35 tokens: 1.2 s, 0.42 s and 0.13 s). When padding would
    more than quadruple that (very uneven lengths), the per-sample loop is used instead. Padded query
    rows still see key 0, so no row is fully masked.
    """
    len_q, len_k = cu_q.diff(), cu_k.diff()
    S = len(len_q)
    if S * max_q * max_k > 4 * int((len_q * len_k).sum()) + 4096:
        return _reference(q, k, v, cu_q, cu_k, causal, scale, dropout)
    pos_q = torch.arange(max_q, device=q.device)
    pos_k = torch.arange(max_k, device=q.device)
    # Rows gathered with index_select, whose backward adds into rows (advanced indexing's sorts them first:
    # 2.6 vs 0.7 ms forward + backward at the demo's sizes on the CPU). Padding reads a real row; dropped below.
    rows_q = (cu_q[:-1, None] + pos_q).clamp_max(q.shape[0] - 1).flatten()  # (S·Lq,)
    rows_k = (cu_k[:-1, None] + pos_k).clamp_max(k.shape[0] - 1).flatten()
    mask = (pos_k < len_k[:, None])[:, None, :]  # (S, 1, Lk)
    if causal:
        mask = mask & (pos_k <= pos_q[:, None] + (len_k - len_q)[:, None, None])  # (S, Lq, Lk)

    def padded(x, rows, width):  # (S, H, L, D)
        return x.index_select(0, rows).view(S, width, *x.shape[1:]).transpose(1, 2)

    out = F.scaled_dot_product_attention(
        padded(q, rows_q, max_q), padded(k, rows_k, max_k), padded(v, rows_k, max_k), attn_mask=mask[:, None],
        scale=scale, dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1])
    token = torch.arange(q.shape[0], device=q.device)  # each query row's place in the (S·Lq) padded rows
    sample = torch.searchsorted(cu_q[1:].long(), token, right=True)
    return out.transpose(1, 2).flatten(0, 1).index_select(0, sample * max_q + token - cu_q[sample])


@functools.cache
def _flash_attn():
    """flash-attn's varlen function, or None where flash-attn is not installed (looked up once: Python does not
    remember a failed import, and this runs in every layer)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen_params() -> frozenset[str] | None:
    """The keyword arguments of torch's ``varlen_attn`` (None before torch 2.9, which has none)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def _torch_varlen_kwargs(params: frozenset[str] | None, *, causal: bool, scale: float | None, head_dim: int,
                         gqa: bool, dropout: float) -> dict | None:
    """The keyword arguments of a ``varlen_attn`` call with ``params`` (its signature moved between releases: 2.9
    has ``is_causal`` and no ``scale``; later ones add ``scale``, then ``window_size`` for ``is_causal`` and
    ``enable_gqa``), ``enable_gqa`` left out where the caller must repeat K and V; None where it cannot run this
    call: no such function, dropout (it has none), or a scale other than 1/sqrt(head_dim) without ``scale``."""
    default_scale = scale is None or math.isclose(scale, head_dim ** -0.5, rel_tol=1e-6)
    if params is None or dropout > 0 or ("scale" not in params and not default_scale):
        return None
    kw = {"scale": scale} if "scale" in params else {}
    if "window_size" in params:
        kw["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        kw["is_causal"] = causal
    if gqa and "enable_gqa" in params:
        kw["enable_gqa"] = True
    return kw


def _torch_varlen(q, k, v, cu_q, cu_k, max_q: int, max_k: int, kw: dict) -> torch.Tensor:
    """PyTorch's varlen flash kernel with the keyword arguments of :func:`_torch_varlen_kwargs`."""
    from torch.nn.attention.varlen import varlen_attn

    if q.shape[1] != k.shape[1] and "enable_gqa" not in kw:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, *, causal: bool, scale: float | None = None,
                     dropout: float = 0.0, cu_seqlens_k: torch.Tensor | None = None,
                     max_seqlen_k: int | None = None) -> torch.Tensor:
    """Attention of each sample with itself: queries [cu[i], cu[i+1]) against keys
    [cu_k[i], cu_k[i+1]) (``cu_seqlens_k``; default the same boundaries).

    q (Nq, Hq, D), k and v (Nk, Hkv, D) with Hq a multiple of Hkv; cu_seqlens (S+1,) int32 on q's device.
    A sample with fewer queries than keys (decoding with a KV cache) holds its last positions: causal
    masking is aligned to the last key, as in flash-attention. Returns (Nq, Hq, D) in q's dtype.
    """
    cu_k = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    max_k = max_seqlen if max_seqlen_k is None else max_seqlen_k
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if (flash := _flash_attn()) is not None:
            return flash(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, dropout_p=dropout, softmax_scale=scale,
                         causal=causal)
        kw = _torch_varlen_kwargs(_torch_varlen_params(), causal=causal, scale=scale, head_dim=q.shape[-1],
                                  gqa=q.shape[1] != k.shape[1], dropout=dropout)
        if kw is not None:
            return _torch_varlen(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, kw)
    return _padded(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, causal, scale, dropout)


def _cu_from_mask(mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (B+1,) int32 and the longest row of a 2-D padding mask (B, T)."""
    lens = mask.sum(1)
    return F.pad(lens.cumsum(0), (1, 0)).to(torch.int32), int(lens.max())


def _rows_from_mask(mask: torch.Tensor, tq: int) -> tuple:
    """For a 2-D padding mask (B, Tk) whose rows' queries are their last ``tq`` positions: the flat indices of the
    real query rows (of B·tq) and key rows (of B·Tk), and the cu_seqlens (int32) and longest length of each.
    Computed once per mask (four host synchronisations), not again in every layer."""
    global _mask_cache
    cache = _mask_cache
    if cache is not None and cache[0] is mask and cache[1] == mask._version and cache[2] == tq:
        return cache[3]
    keep_k = mask.bool()
    keep_q = keep_k[:, -tq:]
    rows = (keep_q.reshape(-1).nonzero().flatten(), keep_k.reshape(-1).nonzero().flatten(), *_cu_from_mask(keep_q),
            *_cu_from_mask(keep_k))
    _mask_cache = (mask, mask._version, tq, rows)
    return rows


def _decode(query, key, value, mask: torch.Tensor | None, scale: float | None, dropout: float) -> torch.Tensor:
    """One query per row against the whole cache (cached generation, every decoding step): query (B, Hq, 1, D),
    key/value (B, Hkv, Tk, D), mask (B, Tk) (nonzero on real keys; None: all real) -> (B, 1, Hq, D). A row whose
    last key is padding (a padding query) gives zeros.

    Query head h reads KV head h // G, G = Hq // Hkv (transformers' ``repeat_kv``): the G query heads of a KV head
    become G query rows, (B, Hq, 1, D) -> (B, Hkv, G, D), and SDPA sees equal head counts. With ``enable_gqa`` and a
    mask instead, CUDA's flash kernel (no mask) and memory-efficient kernel (no GQA in torch 2.11) are both ruled
    out, and the math kernel copies K and V once per query head, every layer and step.
    """
    B, Hq, _, D = query.shape
    Hkv = key.shape[1]
    keys = None if mask is None else mask.bool()
    out = F.scaled_dot_product_attention(query.reshape(B, Hkv, Hq // Hkv, D), key, value,
                                         attn_mask=None if keys is None else keys[:, None, None, :], scale=scale,
                                         dropout_p=dropout)
    out = out.reshape(B, 1, Hq, D)
    return out if keys is None else torch.where(keys[:, -1, None, None, None], out, 0.0)


def _padding_mask(*, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None,
                  **kwargs) -> torch.Tensor | None:
    """transformers mask function of ``ril_varlen``: the 2-D padding mask (B, kv_length) bool, or None.

    One query per row (a decoding step) gets the mask as given: flash-attention's function checks
    ``attention_mask.all()`` to return None for unpadded rows, a host synchronisation every step, and ``_decode``
    needs no such check. Longer inputs keep flash-attention's function (one check per forward): None sends unpadded
    prefills to the mask-free paths, which gather nothing. Packed rows come with no mask and get None either way.
    """
    from transformers.masking_utils import flash_attention_mask

    if q_length == 1 and attention_mask is not None:
        return attention_mask[:, -kv_length:]
    return flash_attention_mask(q_length=q_length, kv_length=kv_length, attention_mask=attention_mask, **kwargs)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             is_causal=None, position_ids=None, sliding_window=None, **kwargs):
    """transformers attention function: query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D) -> ((B, Tq, Hq, D), None).

    Boundaries, in order of preference: ``cu_seq_lens_q``/``cu_seq_lens_k`` (given by a caller), a 2-D
    padding mask ``attention_mask`` (B, Tk) (its last Tq columns mark the real queries), the restarting
    ``position_ids`` (1, T) of a packed row (B = 1), else one sample per batch row. Tq < Tk is generation with a
    KV cache: each batch row is one sample, its queries the last positions. A ``sliding_window`` is taken where no
    sample is longer than it (where it changes nothing); never logit soft-capping, attention sinks (``s_aux``), values
    of another head dim than the queries' (multi-head latent attention) or a mask the model built itself (any but a
    2-D padding mask): those raise ``UnsupportedModel``.
    """
    name = type(module).__name__
    if kwargs.get("softcap") is not None:
        raise UnsupportedModel(f"{name} soft-caps its attention logits: ril_fast's attention does not")
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise UnsupportedModel(f"{name} adds attention sinks to its softmax: ril_fast's attention has none")
    if value.shape[-1] != query.shape[-1]:
        raise UnsupportedModel(f"{name} has values of {value.shape[-1]} dims per head and queries of "
                               f"{query.shape[-1]}: ril_fast's attention takes one head dim for both")
    B, Hq, Tq, D = query.shape
    Tk = key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    dropout = dropout if module.training else 0.0
    padding_mask = attention_mask is not None and attention_mask.ndim == 2
    if Tq == 1 and (padding_mask or (attention_mask is None and kwargs.get("cu_seq_lens_q") is None)):
        _check_window(module, sliding_window, Tk)
        return _decode(query, key, value, attention_mask, scaling, dropout), None
    packed_row = position_ids is not None and B == 1 and Tq == Tk  # as transformers detects one
    if kwargs.get("cu_seq_lens_q") is None and attention_mask is None and not packed_row and (not causal or Tq == Tk):
        if causal and _packed.get():
            raise UnsupportedModel(f"{name} gets neither position ids nor sample boundaries from its model, so the "
                                   f"samples of a packed row cannot be kept apart: ril_fast cannot train this "
                                   f"architecture")
        # one sample per batch row (e.g. a vision chunk): plain SDPA
        _check_window(module, sliding_window, Tk)
        out = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scaling, dropout_p=dropout,
                                             enable_gqa=Hq != key.shape[1])
        return out.transpose(1, 2), None
    q = query.transpose(1, 2).reshape(B * Tq, Hq, D).contiguous()
    k, v = (x.transpose(1, 2).reshape(B * Tk, x.shape[1], D).contiguous() for x in (key, value))
    rows_q = None  # the real query rows, where padding was gathered out
    if kwargs.get("cu_seq_lens_q") is not None:
        cu, max_len = kwargs["cu_seq_lens_q"].to(torch.int32), int(kwargs["max_length_q"])
        cu_k = kwargs.get("cu_seq_lens_k", cu).to(torch.int32)
        max_k = int(kwargs.get("max_length_k", max_len))
    elif attention_mask is not None:
        if attention_mask.ndim != 2:  # e.g. Doge's, built by the model itself: transformers' mask function is ours
            raise UnsupportedModel(f"{name} builds its own attention mask (shape {tuple(attention_mask.shape)}), not "
                                   f"the 2-D padding mask ril_fast's attention keeps samples apart by: ril_fast cannot "
                                   f"train this architecture")
        rows_q, rows_k, cu, max_len, cu_k, max_k = _rows_from_mask(attention_mask, Tq)
        q, k, v = q.index_select(0, rows_q), k.index_select(0, rows_k), v.index_select(0, rows_k)
    elif packed_row:
        cu, max_len = _boundaries_from_positions(position_ids)
        cu_k, max_k = cu, max_len
    else:  # KV-cached decoding without padding: one sample per batch row, its queries the last positions
        cu = torch.arange(0, (B + 1) * Tq, Tq, device=q.device, dtype=torch.int32)
        cu_k = torch.arange(0, (B + 1) * Tk, Tk, device=q.device, dtype=torch.int32)
        max_len, max_k = Tq, Tk
    _check_window(module, sliding_window, max_k)
    out = varlen_attention(q, k, v, cu, max_len, causal=causal, scale=scaling, dropout=dropout,
                           cu_seqlens_k=cu_k, max_seqlen_k=max_k)
    if rows_q is not None:
        out = out.new_zeros(B * Tq, Hq, D).index_copy_(0, rows_q, out)
    return out.reshape(B, Tq, Hq, D), None


def register() -> str:
    """Register ``ril_varlen`` (and ``VISION_NAME``) with transformers' attention and mask interfaces
    (idempotent); returns ``NAME``.

    The mask function is ``_padding_mask``: the 2-D padding mask, None for unpadded input of more than one query.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name in (NAME, VISION_NAME):
        AttentionInterface.register(name, varlen_attention_forward)
        AttentionMaskInterface.register(name, _padding_mask)
    return NAME
