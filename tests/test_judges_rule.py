"""The rule judge's verdicts (``ril_fast.judges_rule.RuleJudge``) on cases each rule of its docstring names and
tests/test_judge.py's table does not: the one verdict a rule decides, written by hand from the docstring.

Each case below is one that a change of one rule (a word dropped from a list, a number off, a clause mark not
looked past) turns, found by mutation testing."""

import pytest

from ril_fast.judges_rule import RuleJudge

CASES = [
    # rule 6, negations: "without" is one ("without" dropped from the list: right)
    ("cat", "a picture without a cat", False),
    # the negation window is 3 words: a "no" 4 words back negates nothing
    ("triangle", "no doubt it is a triangle", True),
    # number words: the tens ("forty" is 40, not 30)
    ("40", "The answer is forty.", True),
    ("30", "forty", False),
    # a number is written one way: "-0" is 0, in a phrase too (a "-0.0" spelling apart from "0.0": wrong)
    ("0 degrees", "-0 degrees", True),
    # an answer's trailing punctuation is no word ("red." is the answer red)
    ("red.", "It is red", True),
    ("a dog.", "I see a dog", True),
    # hedged past a clause mark on the left ("or," before the answer), as on the right
    ("dog", "a cat or, a dog", False),
    # rule 6's class rivals are read singular, -es too: "crosses" names the shape cross
    ("circle", "circles and crosses", False),
    # rule 4: only a box's preceding word can negate it; before another marker "no" is no negation of the answer
    ("7", "Is it 5? No. The answer is 7.", True),
    ("7", "students who said no = 7", True),
    # rule 4's tolerance is relative (1e-6 of the larger), not absolute
    ("123456.789", "123456.7891", True),
]


@pytest.mark.parametrize("answer, response, right", CASES)
@pytest.mark.parametrize("use_math_verify", [True, False], ids=["math_verify", "rules"])
def test_rule_verdicts(answer, response, right, use_math_verify):
    """One verdict per case, with math_verify and without (none of these reads LaTeX)."""
    assert RuleJudge(use_math_verify=use_math_verify).check(answer, response) is right


def test_math_verify_reads_an_answers_unit_in_the_plural():
    """Rule 6 gives math_verify a LaTeX answer whose words the response holds, a unit in the plural too
    ("meters" for "\\text{ meter}"); not one whose unit it lacks."""
    judge = RuleJudge()
    assert judge.check("2\\sqrt{2}\\text{ meter}", "$\\sqrt{8}$ meters")
    assert not judge.check("2\\sqrt{2}\\text{ meter}", "$\\sqrt{8}$ seconds")
