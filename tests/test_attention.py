"""ril_fast.attention on CPU: the padded-batch SDPA path (one call for all samples) against the
per-sample reference and against a dense oracle written here (block-diagonal mask over the whole row),
forward and gradients, for packed rows (queries = keys) and KV-cached decoding (fewer queries than keys,
causal masking aligned to the last key). Fresh random lengths and values per case. The decoding step (one
query per row, query heads folded onto their KV head) against per-sample attention over the unpadded cache,
and generate's decoding steps through a tiny model without a host synchronisation."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ril_fast import attention
from ril_fast.models import load
from ril_fast.rollout import sample_responses
from helpers import assert_close_rule, max_err
from tests.models_fixtures import one_thread, tiny_folder  # noqa: F401


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
def test_padded_equals_reference_and_dense_oracle(name, causal, decoding, hq, hkv, _fresh_seed):
    g = torch.Generator().manual_seed(_fresh_seed)  # RIL_TEST_SEED replays the draws
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


def test_torch_varlen_gets_what_its_release_takes():
    """torch's varlen_attn changed its signature across releases: 2.9 (is_causal, no scale), then scale, then
    window_size and enable_gqa (2.13, installed here; a GPU machine's image may hold another). Each gets only
    keywords it has; a call it cannot run (dropout; on 2.9 a scale other than 1/sqrt(head_dim)) goes to the padded
    SDPA path (None)."""
    kwargs = attention._torch_varlen_kwargs
    v29, with_scale = frozenset({"is_causal", "return_aux"}), frozenset({"is_causal", "return_aux", "scale"})
    v213 = frozenset({"scale", "window_size", "enable_gqa", "return_aux"})
    installed = attention._torch_varlen_params()
    assert installed is not None and ("is_causal" in installed or "window_size" in installed)  # torch >= 2.9
    if torch.__version__.startswith("2.13"):  # CPU CI's pin; a GPU machine's image may hold an older torch
        assert v213 <= installed
    call = dict(causal=True, scale=0.125, head_dim=64, gqa=True, dropout=0.0)
    assert kwargs(v29, **call) == {"is_causal": True}  # 0.125 is 64 ** -0.5: its own default
    assert kwargs(v29, **call | {"scale": 0.2}) is None
    assert kwargs(with_scale, **call | {"scale": 0.2, "causal": False}) == {"scale": 0.2, "is_causal": False}
    assert kwargs(v213, **call) == {"scale": 0.125, "window_size": (-1, 0), "enable_gqa": True}
    assert kwargs(v213, **call | {"causal": False, "gqa": False}) == {"scale": 0.125, "window_size": (-1, -1)}
    assert kwargs(v213, **call | {"dropout": 0.1}) is None and kwargs(None, **call) is None


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


def _decode_reference(query, key, value, mask):
    """Decoding step one row at a time over its real keys only, K/V heads repeated per query head
    (transformers' repeat_kv: query head h reads KV head h // G) -> (B, 1, Hq, D); a row whose newest
    key is padding gives zeros."""
    B, Hq, _, D = query.shape
    out = torch.zeros(B, 1, Hq, D, dtype=query.dtype)
    for b in range(B):
        real = mask[b].bool()
        if real[-1]:
            k, v = (x[b][:, real].repeat_interleave(Hq // key.shape[1], 0) for x in (key, value))  # (Hq, L, D)
            out[b, 0] = F.scaled_dot_product_attention(query[b], k, v)[:, 0]
    return out


@pytest.mark.parametrize("dtype,atol", [  # atol: ~5x the most the 2x rule fell short in 3,000 random cases
    (torch.float32, 5e-6),  # (9e-7: ~4 ulps of |out| < 4; a mispaired head is off by O(1))
    (torch.bfloat16, 4e-3),  # (1.3e-3: under one ulp of |out| in [2, 4))
])
@pytest.mark.parametrize("group", [1, 2, 8])
def test_decoding_step_equals_per_sample_attention(group, dtype, atol):
    """One query per row (every decoding step) against a left-padded cache of random length, GQA with
    Hq / Hkv = ``group``; padded cache entries hold huge values, so attending to one shows. Also without a
    mask (unpadded rows: transformers 5.2x's generate drops an all-ones mask)."""
    B, Hkv, D = int(torch.randint(1, 7, ())), int(torch.randint(1, 4, ())), 8 * int(torch.randint(1, 9, ()))
    Tk, Hq = int(torch.randint(1, 60, ())), Hkv * group
    mask = torch.ones(B, Tk, dtype=torch.long)
    for b in range(B):
        mask[b, :int(torch.randint(0, Tk, ()))] = 0  # left padding; the newest key stays real
    if B > 1:
        mask[-1, -1] = 0  # a padding query row
    query = torch.randn(B, Hq, 1, D, dtype=torch.float64)
    key, value = (torch.randn(B, Hkv, Tk, D, dtype=torch.float64) for _ in "kv")
    padding = ~mask.bool()[:, None, :, None]
    poisoned = key.masked_fill(padding, 1e4), value.masked_fill(padding, -1e4)
    module = torch.nn.Module().eval()
    module.is_causal = True
    ones = torch.ones(B, Tk, dtype=torch.long)
    for m, given, (k, v) in ((mask, mask, poisoned), (ones, None, (key, value))):
        want64 = _decode_reference(query, k, v, m)
        args = [x.to(dtype) for x in (query, k, v)]
        out, _ = attention.varlen_attention_forward(module, *args, given, scaling=None)
        assert_close_rule(out, _decode_reference(*args, m), want64, atol, f"{dtype} G={group} mask={given is not None}")
        assert not out[~m[:, -1].bool()].any(), "a padding query row must give zeros"


@pytest.mark.parametrize("hq,hkv", [(8, 4), (6, 2), (4, 1)])
def test_decoding_step_pairs_query_head_h_with_kv_head_h_div_g(hq, hkv):
    """Every value of KV head j is j, so query head h gives h // (hq / hkv) (h % hkv, the other natural
    fold, reads a different head whenever hkv > 1)."""
    B, Tk, D = 3, 5, 4
    query, key = torch.randn(B, hq, 1, D), torch.randn(B, hkv, Tk, D)
    value = torch.arange(hkv, dtype=torch.float32)[None, :, None, None].expand(B, hkv, Tk, D)
    mask = torch.ones(B, Tk, dtype=torch.long)
    mask[0, :2] = 0
    module = torch.nn.Module()
    module.is_causal = True
    for m in (mask, None):
        out, _ = attention.varlen_attention_forward(module, query, key, value, m)
        want = (torch.arange(hq) // (hq // hkv)).float()[None, None, :, None].expand(B, 1, hq, D)
        assert max_err(out, want) <= 1e-5


def test_decoding_step_gives_sdpa_equal_head_counts(monkeypatch):
    """The decoding step's SDPA call sees as many query heads as KV heads and no ``enable_gqa``: on CUDA,
    GQA with a mask rules out both fused kernels and SDPA falls back to the math kernel."""
    calls, real = [], F.scaled_dot_product_attention

    def sdpa(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[1], kw.get("enable_gqa")))
        return real(q, k, v, **kw)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    module = torch.nn.Module()
    module.is_causal = True
    query, key = torch.randn(2, 16, 1, 8), torch.randn(2, 2, 9, 8)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    for m in (mask, None):
        attention.varlen_attention_forward(module, query, key, key, m)
    assert calls == [(2, 2, None)] * 2


def test_mask_function_keeps_the_decoding_mask_as_given():
    """Decoding (one query) gets the 2-D mask even without padding (no ``.all()`` check on the host), its last
    kv_length columns where the cache keeps fewer positions than the mask has (a sliding window's); longer inputs keep
    flash-attention's rule (None when unpadded)."""
    ones, padded = torch.ones(2, 7, dtype=torch.bool), torch.ones(2, 7, dtype=torch.bool)
    padded[0, :3] = False
    kw = dict(batch_size=2, q_offset=0, kv_offset=0)
    assert torch.equal(attention._padding_mask(q_length=1, kv_length=7, attention_mask=ones, **kw), ones)
    assert torch.equal(attention._padding_mask(q_length=1, kv_length=7, attention_mask=padded, **kw), padded)
    assert attention._padding_mask(q_length=7, kv_length=7, attention_mask=ones, **kw) is None
    assert torch.equal(attention._padding_mask(q_length=7, kv_length=7, attention_mask=padded, **kw), padded)
    assert attention._padding_mask(q_length=1, kv_length=7, attention_mask=None, **kw) is None
    longer = torch.ones(2, 9, dtype=torch.bool)  # a sliding-window cache keeps the last 7 of the 9 positions
    longer[0, :3] = False
    assert torch.equal(attention._padding_mask(q_length=1, kv_length=7, attention_mask=longer, **kw), longer[:, 2:])


def test_decoding_a_left_padded_batch_past_a_sliding_window_equals_eager():
    """Mistral with a sliding window of 8 generating 12 tokens after 6-token prompts, one of them left-padded by 3:
    its cache keeps the last 8 positions while the mask grows, so each step's mask is the mask's last columns. Greedy
    tokens and every step's log-probs equal transformers' eager attention's (the mask's first columns put them
    ~0.5 off)."""
    import copy

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mistral", vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, sliding_window=8, pad_token_id=0)
    ours = AutoModelForCausalLM.from_config(config, attn_implementation=attention.register()).eval()
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    eager.load_state_dict(ours.state_dict())
    ids = torch.randint(1, 100, (2, 6))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    kw = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, output_scores=True,
              return_dict_in_generate=True)
    with torch.no_grad():
        a, b = ours.generate(ids, **kw), eager.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == 12
    for x, y in zip(a.scores, b.scores):  # min_new_tokens sets the end token's score to -inf in both
        x, y = x.log_softmax(-1), y.log_softmax(-1)
        assert torch.equal(x.isinf(), y.isinf()) and max_err(x[x.isfinite()], y[y.isfinite()]) <= 1e-4


def test_torch_varlen_without_enable_gqa_pairs_query_head_h_with_kv_head_h_div_g(monkeypatch):
    """A torch ``varlen_attn`` without ``enable_gqa`` (2.9-2.12) gets K and V with each key-value head repeated for
    its group of query heads in turn (repeat_interleave: query head h reads kv head h // g), as GQA pairs them."""
    import torch.nn.attention.varlen as varlen

    def equal_heads_only(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, is_causal=False, **kw):
        assert q.shape[1] == k.shape[1] == v.shape[1] and not kw
        return attention._reference(q, k, v, cu_q, cu_k, is_causal, scale, 0.0)

    monkeypatch.setattr(varlen, "varlen_attn", equal_heads_only)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8)
    got = attention._torch_varlen(q, k, v, cu, cu, 7, 7, {"scale": None, "is_causal": True})
    assert max_err(got, attention._reference(q, k, v, cu, cu, True, None, 0.0)) <= 1e-6


class _HostSyncs(TorchDispatchMode):
    """Counts, while ``on``, the ops that make the host wait for the device: reading a tensor's value
    (``item``, ``bool(t)``) and data-dependent output shapes (``nonzero``, boolean indexing)."""

    OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
           torch.ops.aten.item.default, torch.ops.aten.nonzero.default}

    def __init__(self):
        super().__init__()
        self.on, self.count = False, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.on and func in self.OPS:
            self.count[str(func)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2"])
@pytest.mark.parametrize("padded", [True, False])
def test_decoding_steps_make_no_host_synchronisation(tmp_path_factory, one_thread, arch, padded):  # noqa: F811
    """Inside the decoder's forward on every one-token step of a real ``generate`` (the rollout's), with
    left-padded prompts and with prompts of one length (transformers 5.2x's generate then drops the mask): no
    host synchronisation, neither building the mask nor in any layer's attention."""
    model, proc = load(tiny_folder(tmp_path_factory, arch), device="cpu")
    syncs, steps = _HostSyncs(), []

    def start(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        x = kwargs["input_ids"] if x is None else x
        syncs.on = x.shape[1] == 1
        steps.append(syncs.on)

    def stop(module, args, kwargs, output):
        syncs.on = False

    decoder = model.get_decoder()
    hooks = [decoder.register_forward_pre_hook(start, with_kwargs=True),
             decoder.register_forward_hook(stop, with_kwargs=True)]
    questions = ["what is the red circle left of?", "why?"] if padded else ["how many bars?", "how many bars?"]
    try:
        with syncs:
            sample_responses(model, proc, [{"question": q} for q in questions], group_size=2, max_new_tokens=4)
    finally:
        for h in hooks:
            h.remove()
    assert any(steps), "no decoding step ran"
    assert not syncs.count, dict(syncs.count)


def test_a_padded_prefill_synchronises_once_not_per_layer(monkeypatch):
    """Every layer of a left-padded prefill gets the same 2-D mask: the rows it keeps are found in the first
    layer's call (its host synchronisations) and reused by the next ones, which synchronise not at all around the
    kernel (the kernel is not counted: on a CPU it is the padded SDPA path, on a GPU flash-attention, which needs
    none) and give what a fresh computation gives; a mask edited in place is read again."""
    B, Tk, hq, hkv, D = 3, 9, 4, 2, 8
    mask = torch.ones(B, Tk, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :2] = 0
    module = torch.nn.Module()
    module.is_causal = True
    layers = [[torch.randn(B, h, Tk, D, dtype=torch.float64) for h in (hq, hkv, hkv)] for _ in range(3)]
    syncs, outs = _HostSyncs(), []
    kernel = attention.varlen_attention

    def uncounted(*args, **kwargs):
        on, syncs.on = syncs.on, False
        try:
            return kernel(*args, **kwargs)
        finally:
            syncs.on = on

    monkeypatch.setattr(attention, "varlen_attention", uncounted)
    with syncs:
        for n, (q, k, v) in enumerate(layers):
            syncs.on = n > 0
            outs.append(attention.varlen_attention_forward(module, q, k, v, mask, scaling=None)[0])
    assert not syncs.count, dict(syncs.count)
    attention._mask_cache = None
    for (q, k, v), out in zip(layers, outs):
        assert torch.equal(out, attention.varlen_attention_forward(module, q, k, v, mask, scaling=None)[0])
        real = mask.bool()
        assert (out[~real] == 0).all() and out[real].abs().sum() > 0  # padding queries give zeros
    mask[1, 0] = 0  # in place: the cached rows no longer hold
    out = attention.varlen_attention_forward(module, *layers[0], mask, scaling=None)[0]
    attention._mask_cache = None
    assert torch.equal(out, attention.varlen_attention_forward(module, *layers[0], mask, scaling=None)[0])


def test_a_sliding_window_is_taken_where_no_sample_is_longer():
    """transformers' window lets a query see the keys less than ``sliding_window`` positions back: a sample of exactly
    that many tokens is attended to whole (the window changes nothing), one token more is an error naming the window."""
    from ril_fast.processor import UnsupportedModel

    lengths = [5, 9, 3]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # a packed row: each sample restarts at 0
    q, k, v = (torch.randn(1, 2, sum(lengths), 4, dtype=torch.float64) for _ in range(3))
    module = torch.nn.Module()
    plain, _ = attention.varlen_attention_forward(module, q, k, v, None, position_ids=positions)
    windowed, _ = attention.varlen_attention_forward(module, q, k, v, None, position_ids=positions.clone(),
                                                     sliding_window=9)
    assert torch.equal(windowed, plain)
    with pytest.raises(UnsupportedModel, match="sliding window of 8 tokens and a sample here is 9 tokens long"):
        attention.varlen_attention_forward(module, q, k, v, None, position_ids=positions.clone(), sliding_window=8)


@pytest.mark.parametrize("case, words", [
    ("s_aux", "adds attention sinks to its softmax"),  # GPT-OSS, Granite-SWA: s_aux=self.sinks
    ("sinks", "adds attention sinks to its softmax"),  # Inkling2: sinks=<computed per call>
    ("softcap", "soft-caps its attention logits"),  # Gemma 2: softcap=attn_logit_softcapping
    ("value dim", "has values of 6 dims per head and queries of 4"),  # multi-head latent attention: DeepSeek-V3
    ("own mask", r"builds its own attention mask \(shape \(1, 1, 6, 6\)\)"),  # Doge's 4-D mask
])
def test_what_the_attention_cannot_stand_for_is_refused(case, words):
    """Attention sinks (as ``s_aux`` or ``sinks``), soft-capped attention logits, values of another head dim than the
    queries' and a mask the model built itself raise UnsupportedModel naming the module: ignored, they gave log-probs
    0.02-0.14 off the model's eager attention (sinks), or a shape error deep in the call."""
    from ril_fast.processor import UnsupportedModel

    q, k = (torch.randn(1, 2, 6, 4) for _ in "qk")
    v = torch.randn(1, 2, 6, 6 if case == "value dim" else 4)
    kw = {case: torch.zeros(2)} if case in ("s_aux", "sinks") else dict(softcap=30.0) if case == "softcap" else {}
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril() if case == "own mask" else None
    positions = torch.arange(6)[None]

    class SomeAttention(torch.nn.Module):
        pass

    with pytest.raises(UnsupportedModel, match=f"^SomeAttention {words}"):
        attention.varlen_attention_forward(SomeAttention(), q, k, v, mask, position_ids=positions, **kw)
