"""The rule judge on a table of real cases, the judge factory, and the in-memory judge cache."""

import pytest

from ril_fast import judge as judge_mod
from ril_fast.judge import CachedJudge, JudgeItem, JudgeKind, RuleJudge, judge_key, make_judge

# (ground-truth answer, response, verdict). Each row is a case the trainer meets: easy-vqa's yes/no,
# shape and colour answers, counts, multiple choice, and free text.
CASES = [
    # yes / no
    ("yes", "Yes", True),
    # float() parses these words; a cold student emits them: no crash, and not numbers
    ("red", "nan", False),
    ("3", "inf", False),
    ("nan", "nan", True),
    ("2", "infinity 2", True),
    ("yes", "Yes, it is.", True),
    ("Yes", "yes.", True),
    ("no", "No.", True),
    ("no", "No, there is no circle in the image.", True),
    ("no", "There is no triangle.", True),
    ("true", "Yes", True),
    ("yes", "No.", False),
    ("no", "Yes, it is.", False),
    ("yes", "Yes and no.", False),
    ("no", "Well, yes... or no", False),
    ("yes", "It is a triangle.", False),  # no yes/no word at all
    # shapes
    ("triangle", "triangle", True),
    ("triangle", "The shape in the image is a triangle.", True),
    ("triangle", "A TRIANGLE!", True),
    ("the triangle", "a triangle", True),
    ("circle", "It's a circle, not a triangle.", True),
    ("circle", "I see two circles.", True),
    ("triangle", "It is not a triangle.", False),
    ("triangle", "That's not really a triangle.", False),
    ("triangle", "It isn't a triangle.", False),
    ("triangle", "No triangle here.", False),
    ("circle", "triangle or circle", False),
    ("circle", "There is a circle and a rectangle.", False),
    ("rectangle", "The image shows a circle.", False),
    # colours
    ("red", "red", True),
    ("red", "The shape is red.", True),
    ("red", "The color is dark red.", True),
    ("blue", "It is not red, but blue.", True),
    ("gray", "It's grey.", True),
    ("red", "red or blue", False),
    ("red", "It is blue.", False),
    ("green", "It is not green.", False),
    ("teal", "The shape is teal and yellow.", False),
    # numbers
    ("3", "3", True),
    ("3", "three", True),
    ("3", "There are 3.0 apples.", True),
    ("1000", "1,000", True),
    ("1,000", "The total is 1000.", True),
    ("5", "3 circles and 2 squares, so the answer is 5.", True),
    ("2.5", "2.50", True),
    ("0.5", "1/2", True),
    ("50%", "50", True),
    ("6", "It is not 5 but 6.", True),
    ("3", "4", False),
    ("4", "3 or 4", False),
    ("7", "It is not 7.", False),
    ("12", "There are twelve or thirteen.", False),
    # multiple-choice letters
    ("B", "B", True),
    ("B", "(B)", True),
    ("(B)", "b", True),
    ("B", "B. The triangle is larger.", True),
    ("B", "The answer is B.", True),
    ("B", "The correct option is (B) because it is red.", True),
    ("B", "The answer is C.", False),
    ("B", "(A) or (B)", False),
    ("C", "A", False),
    ("A", "A triangle.", False),  # an article, not a letter
    # free text
    ("Paris", "The capital is Paris.", True),
    ("New York", "It is New York City.", True),
    ("Paris", "Paris or London", False),
    ("Paris", "The capital is Rome.", False),
    # empty responses
    ("triangle", "", False),
    ("yes", "   ", False),
    ("3", "", False),
    ("B", "", False),
]


def test_table_is_large_and_two_sided():
    assert len(CASES) >= 40
    assert {v for _, _, v in CASES} == {True, False}


@pytest.mark.parametrize("answer,response,verdict", CASES)
def test_rule_judge_cases(answer, response, verdict):
    judge = RuleJudge(use_math_verify=False)
    assert judge.check(answer, response) is verdict


def test_rule_judge_batch_keeps_order():
    judge = RuleJudge(use_math_verify=False)
    items = [JudgeItem("What shape?", a, r) for a, r, _ in CASES]
    assert judge(items) == [v for _, _, v in CASES]


def test_math_verify_only_where_rules_find_nothing(monkeypatch):
    """math_verify is optional; the fake stands in for it so the hook is tested either way."""
    calls = []

    class FakeMathVerify:
        parse = staticmethod(lambda text: text)

        @staticmethod
        def verify(gold, target):
            calls.append((gold, target))
            return True

    monkeypatch.setattr(judge_mod, "math_verify", FakeMathVerify)
    judge = RuleJudge()
    assert judge.name.endswith("+math_verify")
    assert judge.check(r"\frac{1}{2}", "0.5")  # nothing to compare: math_verify decides
    assert calls == [(r"\frac{1}{2}", "0.5")]
    assert not judge.check("4", "3 or 4")  # the rules found candidates: their verdict stands
    assert not judge.check("red", "red or blue")
    assert len(calls) == 1
    assert not RuleJudge(use_math_verify=False).check(r"\frac{1}{2}", "0.5")


def test_make_judge():
    assert isinstance(make_judge("rule"), RuleJudge)
    assert isinstance(make_judge(JudgeKind.RULE, use_math_verify=False), RuleJudge)
    for kind in ("hf", "http"):
        with pytest.raises(NotImplementedError, match="issue 5"):
            make_judge(kind)
    with pytest.raises(ValueError):
        make_judge("llm")


class CountingJudge:
    """Says "correct" iff the response equals the answer; records every batch it is given."""

    def __init__(self, name="counting"):
        self.name = name
        self.batches = []

    def __call__(self, items):
        self.batches.append(list(items))
        return [item.response == item.answer for item in items]


def test_cached_judge_calls_inner_once_per_distinct_item():
    inner = CountingJudge()
    cached = CachedJudge(inner)
    a, b, c = JudgeItem("q", "x", "x"), JudgeItem("q", "x", "y"), JudgeItem("q2", "x", "x")
    assert cached([a, b, a]) == [True, False, True]
    assert cached([a, c, b, c]) == [True, True, False, True]
    assert cached([b, a]) == [False, True]
    assert inner.batches == [[a, b], [c]]  # no item twice, no call without misses
    assert (cached.hits, cached.misses) == (6, 3)
    assert cached.name == inner.name


def test_cache_key_and_store_hook():
    item = JudgeItem("q", "a", "r")
    assert judge_key("one", item) != judge_key("two", item)
    assert judge_key("one", item) != judge_key("one", JudgeItem("q", "a", "r "))
    assert judge_key("one", JudgeItem("q|a", "", "r")) != judge_key("one", JudgeItem("q", "a|", "r"))
    store = {judge_key("counting", item): True}  # as a persistent store would hand back
    inner = CountingJudge()
    assert CachedJudge(inner, store=store)([item]) == [True]
    assert inner.batches == []
