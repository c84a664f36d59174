"""Packed rows through a hybrid model's linear-attention layers (ril_fast.recurrence), on a tiny Qwen3.5.

Oracle: each sample on its own (a packed row of one sample runs as it is), in fp64. Log-probs and gradients
of a packed row of very uneven samples (so that several groups of similar lengths are run) must be as close
to it as the same samples run one by one in fp32 (``helpers.assert_close_rule``): the layers compute their
recurrence in fp32 whatever the model's dtype, and a gradient summed over hundreds of tokens with
cancellation (``dt_bias``, ``A_log``) differs between any two summation orders by ~1e-5.
"""

import contextlib
import random

import pytest
import torch
from transformers import MambaConfig, MambaForCausalLM

from helpers import (assert_close_rule, assert_grads_close_rule, fp64_oracle, gated_delta_rule_in_dtype,
                     max_err)
from models_fixtures import one_thread, random_samples, tiny_folder  # noqa: F401
from ril_fast import recurrence
from ril_fast.models import load, response_logprobs
from ril_fast.processor import UnsupportedModel


def test_similar_lengths_groups_cost_at_most_twice_their_tokens(_fresh_seed):
    rng = random.Random(_fresh_seed)  # RIL_TEST_SEED replays the draws
    for _ in range(500):
        lengths = [rng.choice([rng.randint(1, 40), rng.randint(1, 4000)]) for _ in range(rng.randint(1, 40))]
        groups = recurrence.similar_lengths(lengths)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        for g in groups:
            assert len(g) * max(lengths[i] for i in g) <= 2 * sum(lengths[i] for i in g)
    assert recurrence.similar_lengths([5, 100, 5, 5]) == [[1, 0], [2, 3]]  # a pair is always within 2x


def test_uneven_packed_samples_equal_separate_ones(tmp_path_factory, one_thread, monkeypatch):  # noqa: F811
    folder = tiny_folder(tmp_path_factory, "qwen3_5")
    (model, proc), (model64, _) = load(folder, device="cpu"), load(folder, device="cpu", dtype=torch.float64)
    samples = random_samples([1, 0, 2, 0, 1])
    samples[1]["response"] = " ".join(["the red circle is on the left"] * 60) + "."  # one long sample
    calls = []
    mixer = type(next(m for m in model.modules() if type(m).__name__.endswith("GatedDeltaNet")))
    forward = mixer.forward
    def spy(self, *args, **kwargs):  # the layer's own forward: record the batch it is given
        calls.append((kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[:2])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(mixer, "forward", spy)
    results, oracle_calls = [], []
    for m, packed in ((model, True), (model, False), (model64, False)):
        calls.clear()
        m.zero_grad(set_to_none=True)
        with fp64_oracle() if m is model64 else contextlib.nullcontext() as rule_calls:
            lps = response_logprobs(m, proc, samples, packed=packed)
        oracle_calls += rule_calls or []
        sum((torch.arange(lp.numel()).sin().to(lp.dtype) * lp).sum() for lp in lps).backward()
        results.append((torch.cat([lp.detach() for lp in lps]), {n: p.grad.clone() for n, p in m.named_parameters()
                                                                  if p.grad is not None}, list(calls)))
    (lp_p, g_p, calls_p), (lp_s, g_s, calls_s), (lp_64, g_64, _) = results
    print(f"packed: the linear-attention layer ran on {calls_p}")
    assert len(calls_p) >= 2 and all(n == 1 for n, _ in calls_s)  # several groups; alone, one row each
    assert sum(n * width for n, width in calls_p) <= 2 * sum(width for _, width in calls_s)
    # Each layer ran once per group of similar lengths (recurrence.similar_lengths), not once per sample.
    layers = len(calls_s) // len(samples)
    lengths = [width for _, width in calls_s[::layers]]  # one forward per sample, every layer in turn
    groups = recurrence.similar_lengths(lengths)
    assert 1 < len(groups) < len(samples)
    assert sorted(calls_p) == sorted([(len(g), lengths[g[0]]) for g in groups] * layers)
    assert oracle_calls and set(oracle_calls) == {torch.float64}  # the oracle's recurrence ran, in fp64
    assert_close_rule(lp_p, lp_s, lp_64, atol=1e-6, what="log-probs")
    assert any("linear_attn" in n for n in g_p)
    assert_grads_close_rule(g_p, g_s, g_64, atol=1e-6, what="gradients")


def test_the_fp64_oracle_computes_transformers_gated_delta_rule():
    """The tests' fp64 stand-in for Qwen3.5's recurrence is transformers' own arithmetic: in fp32, on fresh
    random inputs (2 key heads serving 4 value heads, 150 tokens: three chunks), it gives the outputs and
    input gradients of transformers' chunked and per-token forms."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import (torch_chunk_gated_delta_rule,
                                                              torch_recurrent_gated_delta_rule)

    B, T = 2, 150
    inputs = [torch.randn(B, T, 2, 16), torch.randn(B, T, 2, 16), torch.randn(B, T, 4, 16),
              -torch.rand(B, T, 4), torch.rand(B, T, 4)]  # q, k, v, g <= 0, beta
    upstream = torch.randn(B, T, 4, 16)
    results = []
    for rule in (gated_delta_rule_in_dtype, torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule):
        xs = [x.clone().requires_grad_() for x in inputs]
        out, _ = rule(*xs, use_qk_l2norm_in_kernel=True)
        results.append((out.detach(), torch.autograd.grad((out * upstream).sum(), xs)))
    (ours, g_ours), *theirs = results
    for out, grads in theirs:
        assert max_err(ours, out) <= 1e-5
        for a, b in zip(g_ours, grads):
            assert max_err(a, b) <= 1e-4 * (1 + b.abs().max().item())


def test_a_row_not_starting_a_sample_is_refused():
    with pytest.raises(ValueError, match="the first 3 tokens belong to none"):
        recurrence._Layout(torch.tensor([3, 9, 15], dtype=torch.int32))


def test_other_stateful_layers_are_refused(tmp_path):
    """A model whose layers carry state along the sequence, other than the Gated DeltaNet handled here,
    would mix packed samples: a Mamba model is refused by name."""
    MambaForCausalLM(MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=64, state_size=4)).save_pretrained(
        tmp_path / "mamba")
    with pytest.raises(UnsupportedModel, match=r"mamba: its MambaMixer layers carry state along the sequence"):
        load(tmp_path / "mamba", device="cpu")


def test_stateful_layers_declared_in_the_config_are_refused(tmp_path_factory, one_thread):  # noqa: F811
    """A stateful mixer under a class name ``recurrence`` does not know is still refused when the config's
    ``layer_types`` declares more such layers than the Gated DeltaNet layers it handles."""
    model, _ = load(tiny_folder(tmp_path_factory, "qwen3_5"), device="cpu")
    text = model.config.get_text_config()
    assert text.layer_types.count("linear_attention") >= 1
    recurrence.per_sample(model, "qwen3_5")  # its own Gated DeltaNet layers: accepted
    model, _ = load(tiny_folder(tmp_path_factory, "qwen2"), device="cpu")
    model.config.get_text_config().layer_types = ["full_attention", "conv"]
    with pytest.raises(UnsupportedModel, match=r"qwen2: its 1 conv layers carry state along the sequence"):
        recurrence.per_sample(model, "qwen2")


def test_a_group_may_cost_exactly_twice_its_tokens():
    """The bound is inclusive: lengths 4, 1, 1 padded to 3 × 4 = 12 slots hold 6 tokens, exactly twice, one group."""
    assert recurrence.similar_lengths([4, 1, 1]) == [[0, 1, 2]]
    assert recurrence.similar_lengths([4, 1, 1, 1]) == [[0, 1, 2], [3]]  # 4 × 4 = 16 > 2 × 7


def test_a_layout_follows_its_positions_changed_in_place():
    """The layout is cached for the position tensor every layer of a forward gets, and made again when that tensor
    is another one or was changed in place (its version counter)."""
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    first = recurrence._layout(positions)
    assert [shape for *_, shape in first.groups] == [(2, 3)] and recurrence._layout(positions) is first
    positions[0, 3:] = torch.tensor([3, 4])  # in place: one sample of 5 tokens now
    assert [shape for *_, shape in recurrence._layout(positions).groups] == [(1, 5)]
    other = torch.tensor([[0, 1, 0, 1, 2, 3, 4, 5]])
    assert [shape for *_, shape in recurrence._layout(other).groups] == [(2, 6)]


def test_stateful_layers_declared_as_block_types_are_refused(tmp_path_factory, one_thread):  # noqa: F811
    """Configs that declare their layers as ``layers_block_type`` (Jamba, Zamba, ...), not ``layer_types``: a stateful
    kind there is refused too."""
    model, _ = load(tiny_folder(tmp_path_factory, "qwen2"), device="cpu")
    text = model.config.get_text_config()
    text.layer_types = None
    text.layers_block_type = ["attention", "mamba"]
    with pytest.raises(UnsupportedModel, match=r"qwen2: its 1 mamba layers carry state along the sequence"):
        recurrence.per_sample(model, "qwen2")


def test_a_batch_of_whole_rows_runs_as_it_is(tmp_path_factory, one_thread):  # noqa: F811
    """Several rows without a mask, each one sample from position 0 (not a packed row): the layer's own batched
    forward, the same logits as each row alone."""
    model, _ = load(tiny_folder(tmp_path_factory, "qwen3_5"), device="cpu")
    ids = torch.randint(10, 100, (2, 12))
    with torch.no_grad():
        both = model(input_ids=ids, use_cache=False).logits  # no cache: a forward as the trainer's
        alone = torch.cat([model(input_ids=row[None], use_cache=False).logits for row in ids])
    assert max_err(both, alone) <= 1e-5


def test_a_left_padded_row_with_a_mask_runs_as_it_is(tmp_path_factory, one_thread):  # noqa: F811
    """One left-padded row with its mask and the positions generation gives it (1 on the pads, 0 from the first
    real token): not a packed row (it would be refused: its first tokens belong to no sample), the layer's own
    forward; its real tokens' logits are the unpadded row's."""
    model, _ = load(tiny_folder(tmp_path_factory, "qwen3_5"), device="cpu")
    ids = torch.randint(10, 100, (1, 12))
    padded = torch.cat([torch.zeros(1, 3, dtype=ids.dtype), ids], 1)
    mask = (torch.arange(15) >= 3).long()[None]
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        got = model(input_ids=padded, attention_mask=mask, position_ids=positions, use_cache=False).logits[:, 3:]
        want = model(input_ids=ids, use_cache=False).logits
    assert max_err(got, want) <= 1e-5
