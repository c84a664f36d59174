"""ril_fast.attention on CPU: the padded-batch SDPA path (one call for all samples) against the
per-sample reference and against a dense oracle written here (block-diagonal mask over the whole row),
forward and gradients, for packed rows (queries = keys) and KV-cached decoding (fewer queries than keys,
causal masking aligned to the last key). Fresh random lengths and values per case."""

import pytest
import torch
import torch.nn.functional as F

from ril_fast import attention
from helpers import max_err


def _cu(lengths: list[int]) -> torch.Tensor:
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


def _dense_oracle(q, k, v, len_q, len_k, causal, scale):
    """All samples in one SDPA call over the whole (Nq, Nk) row pair under an explicit mask: query i of
    sample s sees key j of the same sample when j <= i + (len_k[s] - len_q[s]) (or always, not causal)."""
    sample_q = torch.repeat_interleave(torch.arange(len(len_q)), torch.tensor(len_q))
    sample_k = torch.repeat_interleave(torch.arange(len(len_k)), torch.tensor(len_k))
    pos_q = torch.cat([torch.arange(n) for n in len_q])
    pos_k = torch.cat([torch.arange(n) for n in len_k])
    offset = (torch.tensor(len_k) - torch.tensor(len_q))[sample_q]
    mask = sample_q[:, None] == sample_k[None, :]
    if causal:
        mask &= pos_k[None, :] <= (pos_q + offset)[:, None]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


CASES = [  # (name, causal, decoding, heads_q, heads_kv)
    ("packed causal", True, False, 4, 4),
    ("packed causal gqa", True, False, 4, 2),
    ("packed bidirectional (vision)", False, False, 2, 2),
    ("kv-cache decoding", True, True, 4, 2),
]


@pytest.mark.parametrize("name,causal,decoding,hq,hkv", CASES)
def test_padded_equals_reference_and_dense_oracle(name, causal, decoding, hq, hkv):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    S, D = int(torch.randint(1, 9, (1,), generator=g)), 8
    len_k = torch.randint(1, 40, (S,), generator=g).tolist()
    len_q = [int(torch.randint(1, n + 1, (1,), generator=g)) for n in len_k] if decoding else len_k
    q = torch.randn(sum(len_q), hq, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(sum(len_k), hkv, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in "kv")
    cu_q, cu_k = _cu(len_q), _cu(len_k)
    scale = 0.3
    outs = {
        "padded": attention.varlen_attention(q, k, v, cu_q, max(len_q), causal=causal, scale=scale,
                                             cu_seqlens_k=cu_k, max_seqlen_k=max(len_k)),
        "reference": attention._reference(q, k, v, cu_q, cu_k, causal, scale, 0.0),
        "oracle": _dense_oracle(q, k, v, len_q, len_k, causal, scale),
    }
    upstream = torch.randn_like(outs["oracle"])
    grads = {n: torch.autograd.grad((o * upstream).sum(), (q, k, v)) for n, o in outs.items()}
    for n in ("padded", "reference"):
        assert outs[n].shape == (sum(len_q), hq, D)
        assert max_err(outs[n], outs["oracle"]) <= 1e-12, n
        for a, b in zip(grads[n], grads["oracle"]):
            assert max_err(a, b) <= 1e-12, n


def test_uneven_lengths_fall_back_to_the_loop(monkeypatch):
    """One long sample among many short ones would make the padded batch mostly padding: the
    per-sample loop runs instead (and gives the same numbers)."""
    calls = []
    real = attention._reference
    monkeypatch.setattr(attention, "_reference", lambda *a: calls.append(1) or real(*a))
    lengths = [400] + [3] * 60
    q = torch.randn(sum(lengths), 2, 4, dtype=torch.float64)
    out = attention.varlen_attention(q, q, q, _cu(lengths), 400, causal=True)
    assert calls == [1]
    assert max_err(out, _dense_oracle(q, q, q, lengths, lengths, True, None)) <= 1e-12


@pytest.mark.parametrize("tq", [1, 2])
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 2)])
def test_decoding_through_the_transformers_entry_point(tq, hq, hkv):
    """transformers' calling convention during cached generation: query (B, Hq, Tq, D) against the cache
    (B, Hkv, Tk, D) with a left-padding mask (B, Tk): each row attends to its real keys only (causal,
    aligned to the last key). Tq = 1 (every decoding step) takes its own SDPA path."""
    B, Tk, D = 3, 7, 4
    query = torch.randn(B, hq, tq, D, dtype=torch.float64)
    key, value = torch.randn(B, hkv, Tk, D, dtype=torch.float64), torch.randn(B, hkv, Tk, D, dtype=torch.float64)
    mask = torch.ones(B, Tk, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    mask[2, :1] = 0
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = attention.varlen_attention_forward(module, query, key, value, mask, scaling=None)
    assert out.shape == (B, tq, hq, D)
    for b in range(B):
        real = mask[b].bool()
        k, v = (x[b][:, real].repeat_interleave(hq // hkv, 0) for x in (key, value))  # (Hq, L, D)
        causal = torch.ones(tq, k.shape[1], dtype=torch.bool).tril(k.shape[1] - tq)
        want = F.scaled_dot_product_attention(query[b], k, v, attn_mask=causal)  # (Hq, Tq, D)
        assert max_err(out[b].transpose(0, 1), want) <= 1e-12
