"""Rollouts on tiny Qwen2.5-VL, Qwen2-VL, Qwen3-VL, Qwen3.5, InternVL3 and InternVL3.5 (0, 1 or 2 images per
question) and Qwen2 (text).

Oracles: (1) a hand-written sampling loop (full forward per token, softmax(logits / τ), one
``draw_one`` per step: the CPU sampler, itself checked against the categorical distribution) run from
the same seed gives the same tokens, so
sampling is exactly the student's tempered distribution and the model's own generation_config
(poisoned here with top_k=1, a repetition penalty, ...) does not leak in; (2) greedy decoding of a
batch equals transformers' greedy ``generate`` of one prompt at a time (no padding); (3) greedy tokens
are the argmax of the packed teacher-forced forward (ril_fast.packing's own mrope positions), which
fails when image tokens get text positions during generation (negative control).

Random tiny models rarely emit the end-of-turn token, so the ``eos`` models scale its LM-head row
(x10; x5 for the tiny Qwen3-VL, which x10 makes stop at once): responses then end at random points and
the end-of-turn handling is exercised.
"""

import contextlib
import copy
import inspect
import json
import shutil

import pytest
import torch

from helpers import fsdp_states_seen, vision_rows_seen
from ril_fast import distributed, packing, rollout
from ril_fast.models import last_hidden_states, lm_head_weight, load
from ril_fast.packing import pack
from ril_fast.processor import Encoded
from ril_fast.rollout import Rollout, _generation_config, sample_responses
from tests.models_fixtures import one_rank, one_thread, random_samples, tiny_folder, turn_end_folder  # noqa: F401

ARCHS = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "qwen2", "internvl", "internvl3_5")
IMAGES = {"qwen2_5_vl": [0, 1, 2, 1], "qwen2_vl": [1, 0, 2, 1], "qwen3_vl": [1, 2, 0, 1], "qwen3_5": [2, 0, 1, 1],
          "qwen2": [0, 0, 0, 0], "internvl": [1, 0, 2, 1], "internvl3_5": [2, 1, 0, 1]}
EOS_BOOST = {"qwen2_5_vl": 10, "qwen2_vl": 10, "qwen3_vl": 5, "qwen3_5": 10, "qwen2": 10, "internvl": 10,
             "internvl3_5": 10}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, one_thread):  # noqa: F811
    return {a: load(tiny_folder(tmp_path_factory, a), device="cpu") for a in ARCHS}


@pytest.fixture(scope="module")
def eos_loaded(tmp_path_factory, one_thread):  # noqa: F811
    out = {}
    for a in ARCHS:
        model, proc = load(tiny_folder(tmp_path_factory, a), device="cpu")
        with torch.no_grad():
            lm_head_weight(model)[proc.end_token_id] *= EOS_BOOST[a]
        out[a] = model, proc
    return out


def _examples(arch: str, seed: int | None = None) -> list[dict]:
    """Questions with IMAGES[arch] images each; a fixed ``seed`` where a test needs particular outcomes."""
    if seed is None:
        return random_samples(IMAGES[arch])
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return random_samples(IMAGES[arch])


def _hf_inputs(model, proc, examples: list[dict], repeat: int = 1) -> dict:
    """Unpadded HF inputs of ONE prompt (repeated ``repeat`` times), built here independently of rollout.py."""
    assert len(examples) == 1
    enc = proc.encode({**examples[0], "response": ""})
    ids = enc.input_ids[:enc.prompt_len][None].repeat(repeat, 1)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if enc.pixel_values is not None:
        if enc.image_grid_thw is None:  # InternVL: the prompt's tiles, repeated
            kw.update(pixel_values=enc.pixel_values.repeat(repeat, 1, 1, 1))
        else:
            kw.update(pixel_values=enc.pixel_values.repeat(repeat, 1),
                      image_grid_thw=enc.image_grid_thw.repeat(repeat, 1))
        if enc.image_grid_thw is not None and "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            kw["mm_token_type_ids"] = (ids == proc.image_token_id).int()
    return kw


def _cut(row: list[int], end: int) -> list[int]:
    return row[:row.index(end)] if end in row else row


def _draw_margin(probs: torch.Tensor, drawn: torch.Tensor, rng_before: torch.Tensor) -> torch.Tensor:
    """For each row, the distance (as a fraction of the row's mass) from the uniform number that
    ``rollout.draw_one`` used (replayed from ``rng_before``) to the nearer edge of the drawn entry's CDF slot."""
    after = torch.get_rng_state()
    torch.set_rng_state(rng_before)
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64) * cdf[:, -1:]
    torch.set_rng_state(after)
    hi = cdf.gather(1, drawn[:, None])
    lo = hi - probs.double().gather(1, drawn[:, None])
    assert ((lo <= u) & (u < hi)).all()  # the replayed uniform is the one that drew these entries
    return (torch.minimum(u - lo, hi - u) / cdf[:, -1:]).squeeze(1)


# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_groups_and_fields(arch, eos_loaded):
    model, proc = eos_loaded[arch]
    examples, G, L = _examples(arch), 3, 8
    out = sample_responses(model, proc, examples, group_size=G, max_new_tokens=L, seed=1)
    assert len(out) == len(examples) and all(len(group) == G for group in out)
    for ex, group in zip(examples, out):
        for r in group:
            assert isinstance(r, Rollout) and all(isinstance(t, int) for t in r.token_ids)
            assert len(r.token_ids) <= L and not set(proc.stop_token_ids) & set(r.token_ids)
            assert r.truncated == (len(r.token_ids) == L) == (r.end_id is None)
            assert r.text == proc.tokenizer.decode(r.token_ids, skip_special_tokens=False)
            enc = proc.encode(r.sample(ex))  # what the trainer packs next
            assert (enc.input_ids[-1].item() == proc.end_token_id) != r.truncated
    assert sample_responses(model, proc, [], group_size=G, max_new_tokens=L) == []


@pytest.mark.parametrize("arch", ARCHS)
def test_end_of_turn_and_truncation(arch, eos_loaded):
    """Some responses stop at the end-of-turn token (not kept, not truncated), some run out of budget."""
    model, proc = eos_loaded[arch]
    L = 10
    out = sample_responses(model, proc, _examples(arch, seed=0), group_size=8, max_new_tokens=L, seed=3)
    flat = [r for group in out for r in group]
    finished = [r for r in flat if not r.truncated]
    truncated = [r for r in flat if r.truncated]
    print(f"{arch}: lengths {[len(r.token_ids) for r in flat]}")
    assert finished and truncated
    assert all(len(r.token_ids) < L for r in finished) and all(len(r.token_ids) == L for r in truncated)


def test_responses_end_at_the_templates_turn_end_not_the_tokenizers_eos(tmp_path_factory, one_thread):  # noqa: F811
    """A Qwen base tokenizer's eos is <|endoftext|> while its chat template ends turns with <|im_end|> (and its
    generation_config lists both): a model that ends its turns with <|im_end|> (its LM-head row x10) has its
    responses stop there, not truncated, without it in the ids or the text; greedy decoding equals transformers'
    generate with the model's own generation_config; a finished response encodes followed by <|im_end|>."""
    model, proc = load(turn_end_folder(tmp_path_factory, [0, 2]), device="cpu")
    tok = proc.tokenizer
    im_end, eos = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert (tok.eos_token_id, proc.end_token_id, proc.stop_token_ids) == (eos, im_end, (im_end, eos))
    with torch.no_grad():
        lm_head_weight(model)[im_end] *= 10
    examples, L = _examples("qwen2", seed=0), 12
    greedy = sample_responses(model, proc, examples, max_new_tokens=L, greedy=True)
    for ex, (r,) in zip(examples, greedy):
        kw = _hf_inputs(model, proc, [ex])
        with torch.no_grad():
            out = model.generate(**kw, max_new_tokens=L, do_sample=False)  # eos_token_id [0, 2] from the folder
        row = out[0, kw["input_ids"].shape[1]:].tolist()
        assert not r.truncated and r.token_ids + [im_end] == row[:len(r.token_ids) + 1] and r.end_id == im_end
    sampled = [r for g in sample_responses(model, proc, examples, group_size=8, max_new_tokens=L, seed=0) for r in g]
    print(f"lengths {[len(r.token_ids) for r in sampled]}, ends {[r.end_id for r in sampled]}")
    finished = [r for r in sampled if not r.truncated]
    assert len(finished) >= len(sampled) // 2 and {r.end_id for r in finished} == {im_end}
    for r in [g[0] for g in greedy] + sampled:
        assert im_end not in r.token_ids and "<|im_end|>" not in r.text and r.truncated == (r.end_id is None)
        enc = proc.encode(r.sample(examples[0]))
        assert enc.input_ids[-1].item() == (r.token_ids[-1] if r.truncated else r.end_id)


def test_every_stop_token_ends_a_response(tmp_path_factory, one_thread):  # noqa: F811
    """A generation_config listing several eos ids (2, 3, 4; the tokenizer's eos 0 and the template's turn end 2
    besides): each of them ends a response (every stop row x5, so that all are drawn), which is cut at its first
    stop token, not truncated, and encodes followed by the stop token it sampled; none holds a stop token."""
    model, proc = load(turn_end_folder(tmp_path_factory, [2, 3, 4]), device="cpu")
    assert (proc.end_token_id, sorted(proc.stop_token_ids)) == (2, [0, 2, 3, 4])
    with torch.no_grad():
        for t in proc.stop_token_ids:
            lm_head_weight(model)[t] *= 5
    examples, L = _examples("qwen2", seed=0), 10
    flat = [r for g in sample_responses(model, proc, examples, group_size=8, max_new_tokens=L, seed=3) for r in g]
    print(f"lengths {[len(r.token_ids) for r in flat]}, ends {[r.end_id for r in flat]}")
    assert {r.end_id for r in flat} == {None, 0, 2, 3, 4}
    for r in flat:
        assert not {0, 2, 3, 4} & set(r.token_ids) and r.truncated == (r.end_id is None) == (len(r.token_ids) == L)
        enc = proc.encode(r.sample(examples[0]))
        assert enc.input_ids[-1].item() == (r.token_ids[-1] if r.truncated else r.end_id)
    # a response handed over without the stop token it sampled (a teacher's) ends with the template's turn end
    assert proc.encode(dict(examples[0], response="blue")).input_ids[-1].item() == 2
    # generate itself stops at each (cutting afterwards alone gives the same rollouts, running every row to L)
    config = _generation_config(proc, max_new_tokens=L, greedy=False, temperature=1.0, top_p=1.0, top_k=0, pad_id=0)
    assert config.eos_token_id == [2, 0, 3, 4]


def test_an_exported_folder_stops_where_the_rollouts_stop(tmp_path_factory, tmp_path, one_thread):  # noqa: F811
    """final/'s generation_config.json lists every stop token of the trainer's rollouts: a Qwen base folder lists
    only <|endoftext|> (0), so transformers or vLLM running final/ went on past the <|im_end|> (2) it learnt to end
    its turns with."""
    from transformers import GenerationConfig

    from ril_fast.export import export_hf
    from ril_fast.processor import Processor

    folder = shutil.copytree(turn_end_folder(tmp_path_factory, [0]), tmp_path / "student")
    # as many models ship it: greedy with a sampling setting, which a changed GenerationConfig's save refuses
    shipped = json.loads((folder / "generation_config.json").read_text())
    shipped.update(do_sample=False, temperature=0.7)
    (folder / "generation_config.json").write_text(json.dumps(shipped))
    model, proc = load(folder, device="cpu")
    assert GenerationConfig.from_pretrained(folder).eos_token_id == [0] and proc.stop_token_ids == (2, 0)
    export_hf(model, proc, tmp_path / "final", is_main=True)
    saved = json.loads((tmp_path / "final" / "generation_config.json").read_text())
    assert (saved["eos_token_id"], saved["do_sample"], saved["temperature"]) == ([2, 0], False, 0.7)
    assert Processor.from_pretrained(tmp_path / "final").stop_token_ids == (2, 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded(arch, loaded):
    model, proc = loaded[arch]
    examples = _examples(arch)
    kw = dict(group_size=4, max_new_tokens=8, temperature=1.0)
    rng = torch.get_rng_state()
    a = sample_responses(model, proc, examples, seed=5, **kw)
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator is left alone
    assert sample_responses(model, proc, examples, seed=5, **kw) == a
    assert sample_responses(model, proc, examples, seed=6, **kw) != a
    # G samples of one question differ from each other
    assert all(len({tuple(r.token_ids) for r in group}) > 1 for group in a)


def test_trainer_sampling_seed_is_distinct_per_run_seed_step_and_rank():
    """The trainer's seed for ``sample_responses`` (``train._seed``): distinct for every (run seed, step, rank), so
    ranks sampling their own prompts never draw the same random numbers (one seed on all ranks would correlate them);
    negative steps are the discriminator's pre-training steps (``pretrain_disc_step``)."""
    from types import SimpleNamespace

    from ril_fast.train import _seed

    def run(seed, rank):
        return SimpleNamespace(cfg=SimpleNamespace(seed=seed), dist=SimpleNamespace(rank=rank))

    keys = [(seed, step, rank) for seed in (0, 1, 2) for step in (-2, -1, 0, 1, 7) for rank in range(4)]
    seeds = [_seed(run(seed, rank), step) for seed, step, rank in keys]
    assert len(set(seeds)) == len(keys)
    assert _seed(run(1, 0), 3) != _seed(run(1, 1), 3)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.0, 5)])
def test_sampling_is_softmax_over_temperature(arch, temperature, top_k, eos_loaded, monkeypatch):
    """Outside oracle: a plain sampling loop from the same seed (softmax over the ``top_k`` largest
    logits when set), while the model's generation_config asks for something else entirely (generate
    fills every unset setting from it)."""
    from transformers import GenerationConfig

    model, proc = eos_loaded[arch]
    poisoned = GenerationConfig(do_sample=False, top_k=1, top_p=0.01, temperature=0.05, repetition_penalty=1.3,
                                no_repeat_ngram_size=2, min_p=0.9, typical_p=0.1, max_new_tokens=2,
                                eos_token_id=5, pad_token_id=0)
    monkeypatch.setattr(model, "generation_config", poisoned)
    examples, G, L, seed = _examples(arch)[2:3], 4, 10, 11
    got = sample_responses(model, proc, examples, group_size=G, max_new_tokens=L, temperature=temperature,
                           top_k=top_k, seed=seed)

    kw = _hf_inputs(model, proc, examples, repeat=G)
    ids, end, pad = kw.pop("input_ids"), proc.end_token_id, proc.tokenizer.pad_token_id
    done = torch.zeros(G, dtype=torch.bool)
    margins = []  # per step and row: how far the uniform fell from the edges of the drawn entry's CDF slot
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(L):
            step = dict(kw, attention_mask=torch.ones_like(ids))
            if "mm_token_type_ids" in kw:
                step["mm_token_type_ids"] = (ids == proc.image_token_id).int()
            logits = model(input_ids=ids, use_cache=False, **step).logits[:, -1].float()
            for image_token in (proc.image_token_id, proc.image_start_id, proc.image_end_id):
                if image_token is not None:  # a response may not contain image placeholders (InternVL: or markers)
                    logits[:, image_token] = -torch.inf
            if top_k:
                logits[logits < logits.topk(top_k, dim=-1).values[:, -1:]] = -torch.inf
            probs = torch.softmax(logits / temperature, -1)
            before = torch.get_rng_state()
            nxt = rollout.draw_one(probs).squeeze(1)  # tested below
            margins.append(_draw_margin(probs, nxt, before))
            nxt = torch.where(done, pad, nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == end
            if done.all():
                break
    rows = ids[:, kw["attention_mask"].shape[1]:].tolist()
    # The oracle recomputes every step without a KV cache, so its probabilities differ from generate's in
    # the last float bits. A row may part from the oracle only where the uniform fell that close to the
    # edge of a CDF slot (a near-tie); its later tokens then follow a different context.
    parted = 0
    for g, (r, row) in enumerate(zip(got[0], rows)):
        mine, want = r.token_ids + ([] if r.truncated else [end]), row[:len(_cut(row, end)) + (end in row)]
        k = next((k for k, (a, b) in enumerate(zip(mine, want)) if a != b), min(len(mine), len(want)))
        if mine == want:
            assert r.truncated == (end not in row) and r.token_ids == _cut(row, end)
            continue
        parted += 1
        assert margins[k][g] < 1e-6, f"row {g} parts from the oracle at token {k}, {margins[k][g]:.2e} from a tie"
    assert parted <= 1, f"{parted} of {G} rows part from the oracle"


def test_draw_one_samples_the_categorical_distribution():
    """Fresh random rows (a third of the entries zero, unnormalised): 40,000 draws per row land on each
    entry with its probability, within 5 binomial standard deviations; zeros are never drawn.

    Nonzero entries are at least 0.05 (a probability of at least 0.001 once normalised, ~40 draws): a rarer
    entry, drawn even once, would lie past 5 standard deviations, where the normal bound does not hold."""
    B, V, n = 4, 50, 40_000
    probs = (0.05 + 0.95 * torch.rand(B, V)) * (torch.rand(B, V) > 0.33)
    counts = torch.zeros(B, V)
    for _ in range(n // 1000):
        idx = rollout.draw_one(probs.repeat_interleave(1000, 0)).view(B, 1000)
        counts.scatter_add_(1, idx, torch.ones(B, 1000))
    p = probs / probs.sum(1, keepdim=True)
    assert counts.sum() == B * n
    assert (counts[p == 0] == 0).all()
    assert ((counts / n - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-9).all()


@pytest.mark.parametrize("bad", ["nan", "inf", "negative", "zeros"])
def test_draw_one_refuses_what_multinomial_refuses(bad):
    """A row with NaN, infinity or a negative entry, or all zeros (logits gone NaN), is an error, as it is to
    torch.multinomial, not a silent draw of the last token."""
    probs = torch.rand(3, 20)
    probs[1] = {"nan": float("nan"), "inf": float("inf"), "negative": -0.5, "zeros": 0.0}[bad]
    with pytest.raises(RuntimeError):
        torch.multinomial(probs, 1)
    with pytest.raises(RuntimeError, match="no longer finite"):
        rollout.draw_one(probs)


def test_fast_sampling_is_scoped():
    """Only one-sample CPU calls are rerouted, only inside the block, and torch's own comes back after an error."""
    original = torch.multinomial
    probs = torch.rand(3, 5)
    with pytest.raises(RuntimeError), rollout._fast_cpu_sampling():
        assert torch.multinomial is not original
        assert torch.multinomial(probs, 2).shape == (3, 2)  # torch's: two draws without replacement
        assert torch.multinomial(probs, num_samples=1).shape == (3, 1)
        raise RuntimeError
    assert torch.multinomial is original


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_top_p_is_greedy(arch, eos_loaded, monkeypatch):
    model, proc = eos_loaded[arch]
    examples = _examples(arch)
    greedy = sample_responses(model, proc, examples, max_new_tokens=8, greedy=True)
    nucleus = sample_responses(model, proc, examples, max_new_tokens=8, top_p=1e-9, seed=2)
    assert nucleus == greedy
    # G samples per question: group k is question k's (here each its greedy answer), none another's; the rows
    # generate gets are each question's prompt G times in turn (a random model may answer every question alike).
    rows, batch = [], rollout._batch
    monkeypatch.setattr(rollout, "_batch", lambda prompts, *a: rows.extend(prompts) or batch(prompts, *a))
    groups = sample_responses(model, proc, examples, group_size=3, max_new_tokens=8, top_p=1e-9, seed=2)
    assert groups == [g * 3 for g in greedy]
    want = [proc.encode_prompt(ex["question"], ex.get("images")).input_ids for ex in examples for _ in range(3)]
    assert len(rows) == len(want) and all(torch.equal(r.input_ids, w) for r, w in zip(rows, want))
    with pytest.raises(ValueError):
        sample_responses(model, proc, examples, group_size=2, max_new_tokens=8, greedy=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("max_batch", [None, 3])
def test_greedy_matches_one_prompt_at_a_time(arch, max_batch, eos_loaded):
    """Batched, left-padded greedy decoding (prompts of different lengths and image counts) equals
    transformers' own greedy generate of each prompt alone (told, as the rollout is, never to write an
    image placeholder, nor InternVL's <img> and </img>)."""
    model, proc = eos_loaded[arch]
    examples, L = _examples(arch), 12
    got = sample_responses(model, proc, examples, max_new_tokens=L, greedy=True, max_batch=max_batch)
    end = proc.end_token_id
    image_tokens = [t for t in (proc.image_token_id, proc.image_start_id, proc.image_end_id) if t is not None]
    banned = {"suppress_tokens": image_tokens} if image_tokens else {}
    for ex, (r,) in zip(examples, got):
        kw = _hf_inputs(model, proc, [ex])
        with torch.no_grad():
            out = model.generate(**kw, do_sample=False, max_new_tokens=L, eos_token_id=end,
                                 pad_token_id=proc.tokenizer.pad_token_id, **banned)
        row = out[0, kw["input_ids"].shape[1]:].tolist()
        assert r.token_ids == _cut(row, end)
        assert r.truncated == (end not in row)
    print(f"{arch}: greedy lengths {[len(r[0].token_ids) for r in got]}")


def _packed_argmax(model, proc, example: dict, r: Rollout) -> list[int]:
    """Argmax of the packed, teacher-forced forward at each response row (ril_fast.packing's positions)."""
    enc = proc.encode({**example, "response": ""})
    ids = torch.cat([enc.input_ids[:enc.prompt_len], torch.tensor(r.token_ids, dtype=torch.long)])
    mrope = None
    if enc.mrope is not None:
        mrope = (proc.rope_index(ids[None], enc.image_grid_thw)[:, 0] if enc.image_grid_thw is not None
                 else torch.arange(ids.numel()).expand(3, -1).clone())
    e = Encoded(ids, enc.prompt_len, enc.pixel_values, enc.image_grid_thw, mrope)
    # the last prompt row and every response row predict the next token
    rows = torch.arange(enc.prompt_len - 1, ids.numel())
    with torch.no_grad():
        hidden = last_hidden_states(model, pack([e]))[0, rows]
        return (hidden @ lm_head_weight(model).T).argmax(-1).tolist()


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5"])
def test_generation_positions_match_packing(arch, loaded, monkeypatch):
    """Greedy tokens (with the end-of-turn token) are the argmax of the packed forward over prompt +
    response: generation gives image tokens the same mrope positions as training. Negative control:
    without mm_token_type_ids, transformers gives image tokens 1-D positions and the tokens differ."""
    model, proc = loaded[arch]
    examples = _examples(arch, seed=0)
    examples = [ex for ex in examples if ex["images"]]
    got = sample_responses(model, proc, examples, max_new_tokens=12, greedy=True)
    for ex, (r,) in zip(examples, got):
        predicted = _packed_argmax(model, proc, ex, r)
        assert predicted[:len(r.token_ids)] == r.token_ids
        if not r.truncated:
            assert predicted[len(r.token_ids)] == proc.end_token_id
    if not rollout._rope_takes_types(model):
        pytest.skip("this transformers computes mrope from the ids: there is nothing to leave out")
    monkeypatch.setattr(rollout, "_rope_takes_types", lambda m: False)
    wrong = sample_responses(model, proc, examples, max_new_tokens=12, greedy=True)
    assert any(_packed_argmax(model, proc, ex, r)[:len(r.token_ids)] != r.token_ids
               for ex, (r,) in zip(examples, wrong))


def test_generation_config_restored(loaded):
    model, proc = loaded["qwen2"]
    before = copy.deepcopy(model.generation_config.to_dict())
    sample_responses(model, proc, _examples("qwen2")[:1], group_size=2, max_new_tokens=4)
    assert model.generation_config.to_dict() == before


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl", "internvl"])
def test_a_questions_prompts_share_their_images(arch, tmp_path_factory, monkeypatch):
    """The G prompts of a question hand its images to the vision tower once (Qwen-VL's patches,
    InternVL's tiles), and sample what prompts with their own copies of the pixels sample (same seed)."""
    model, proc = load(tiny_folder(tmp_path_factory, arch), device="cpu")
    examples, G = random_samples([1, 2, 1]), 3
    with vision_rows_seen(model) as seen:
        shared = sample_responses(model, proc, examples, group_size=G, max_new_tokens=6, seed=2)
        monkeypatch.setattr(packing, "image_groups", lambda encoded: [[i] for i in range(len(encoded))])
        own = sample_responses(model, proc, examples, group_size=G, max_new_tokens=6, seed=2)
    distinct = sum(proc.encode_prompt(ex["question"], ex["images"]).pixel_values.shape[0] for ex in examples)
    assert seen == [distinct, G * distinct]
    assert [[r.token_ids for r in g] for g in shared] == [[r.token_ids for r in g] for g in own]


# ----------------------------------------------------------------------------------------------------
# A sharded student: its decoder blocks decode without FSDP's forward hooks (distributed.bare_blocks)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS + ("internvl",))
def test_sharded_bf16_generation_runs_blocks_bare(arch, eos_loaded, tmp_path_factory, monkeypatch, one_rank):
    """Generation by a sharded bf16 student runs its decoder blocks without FSDP's hooks (the hooks of
    ours stay), samples what the hooked blocks sample (FSDP's input casts were no-ops: every block input
    is already bf16), and gives the hooks back afterwards (the control run goes through them)."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    if arch == "internvl":
        model, proc = load(tiny_folder(tmp_path_factory, arch), device="cpu")
    else:
        model, proc = eos_loaded[arch]
    sharded = distributed.shard_model(copy.deepcopy(model), mixed_precision=True)
    blocks = distributed.decoder_blocks(sharded)
    seen, handles = fsdp_states_seen(blocks)
    examples = random_samples(IMAGES.get(arch, [1, 0, 2]))
    seed = int(torch.randint(1 << 30, ()))
    bare = sample_responses(sharded, proc, examples, group_size=2, max_new_tokens=8, seed=seed)
    bare_seen, seen[:] = seen[:], []
    monkeypatch.setattr(rollout, "bare_blocks", contextlib.nullcontext)  # the blocks keep FSDP's hooks
    hooked = sample_responses(sharded, proc, examples, group_size=2, max_new_tokens=8, seed=seed)
    for h in handles:
        h.remove()
    assert [[r.token_ids for r in g] for g in bare] == [[r.token_ids for r in g] for g in hooked]
    assert len(bare_seen) == len(seen) >= len(blocks) * 2  # the prefill and at least one more token
    assert set(bare_seen) == {TrainingState.IDLE}
    assert set(seen) == {TrainingState.FORWARD}


def test_bare_blocks_is_scoped(loaded, one_rank):
    """Refused with grad enabled; outside gathered() the blocks keep their hooks (they must gather); inside,
    FSDP's hooks are gone, and come back (the same hook dicts) when the block exits, by an error too."""
    model, _ = loaded["qwen2"]
    sharded = distributed.shard_model(copy.deepcopy(model), mixed_precision=False)
    block = distributed.decoder_blocks(sharded)[0]
    before = (block._forward_pre_hooks, block._forward_hooks)
    assert before[0] and before[1]
    with pytest.raises(RuntimeError, match="no-grad"), distributed.bare_blocks(sharded):
        pass
    with torch.no_grad(), distributed.bare_blocks(sharded):
        assert (block._forward_pre_hooks, block._forward_hooks) == before
    with pytest.raises(ValueError, match="inside"), torch.no_grad(), distributed.gathered(sharded), \
            distributed.bare_blocks(sharded):
        assert not block._forward_pre_hooks and not block._forward_hooks
        raise ValueError("inside")
    assert (block._forward_pre_hooks, block._forward_hooks) == before
    assert block._forward_pre_hooks is before[0] and block._forward_hooks is before[1]
