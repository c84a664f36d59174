"""The rule judge on a table of real cases, the judge factory, and the in-memory judge cache."""

import functools
import importlib.metadata
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ril_fast import judge as judge_mod
from ril_fast import judges_formula
from ril_fast import judges_rule as rule_mod
from ril_fast.config import Config, ConfigError, load_config
from ril_fast.judge import (PROMPT_VERSION, CachedJudge, JudgeItem, JudgeKind, RuleJudge, add_judge_arguments, decide,
                            judge_key, judge_messages, make_judge, make_judge_from_config, verdict_word)

try:  # the version the rule judge's name carries
    MATH_VERIFY_VERSION = importlib.metadata.version("math-verify")
except importlib.metadata.PackageNotFoundError:
    MATH_VERIFY_VERSION = "unknown"

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
    ("7", r"It is not \boxed{7}.", False),  # the negation before the answer marker counts
    ("7", "It is not 5; the answer is 7.", True),
    # ... but only the word right before a box: these words are the left-hand side of an equation
    ("7", "Number of students without glasses = 7", True),
    ("15", "Apples not eaten = 15", True),
    ("5", "Days with no rain = 5", True),
    ("12", "Students who did not pass #### 12", True),
    ("12", "There are twelve or thirteen.", False),
    ("0.5", ".5", True),  # a leading-dot decimal is a number
    ("0.5", "It is .5.", True),
    # a scale word multiplies the number before it: "one hundred" is 100, not 1
    ("100", "one hundred", True),
    ("200", "There are two hundred dots.", True),
    ("1000", "one thousand", True),
    ("1", "one hundred", False),
    ("2", "There are two hundred dots.", False),
    ("1", "one thousand", False),
    ("15 percent", "15%", True),  # "percent" after a number is "%"
    ("15%", "It fell by 15 percent.", True),
    # a minus sign, en dash or fullwidth hyphen-minus before a digit is "-"
    ("5", "−5", False),
    ("-5", "−5", True),
    ("-0.4", "The correlation is −0.4.", True),
    ("0.4", "The correlation is −0.4.", False),
    ("-12%", "The value dropped to −12%.", True),
    ("-3", "x = –3", True),
    ("-5", "－5", True),
    ("2-3", "It takes 2–3 days.", True),  # a dash between two numbers is a range, as "2-3" is
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
    # "a" is an article to tokens(); the letter rule reads the response as written
    ("A", "A", True),
    ("A", "(A)", True),
    ("A", "A.", True),
    ("A", "a", True),
    ("A", "Answer: A", True),
    ("A", "a circle", False),
    ("B", "The answer is b", True),  # a lowercase letter after "answer is" ...
    ("A", "The answer is a.", True),
    ("A", "The answer is a circle.", False),  # ... but not the article before a word
    ("B", "The answer is a circle.", False),
    # markdown's emphasis and LaTeX's dress are dropped; a letter alone on a line is read
    ("B", "**B**", True),
    ("B", "*B*", True),
    ("B", "The correct answer is **B**.", True),
    ("B", "Answer: **B**", True),
    ("B", "**B. 12 cm**", True),
    ("B", r"\boxed{B}", True),
    ("B", r"$\boxed{B}$", True),
    ("B", r"The answer is $\boxed{\text{B}}$.", True),
    ("B", "B\n\nBecause the area is 12.", True),
    ("B", "Let me compute the area.\n\n(B)", True),
    ("B", "It is B.", True),
    ("B", "It's B", True),
    ("B", "I think it is (B)!", True),
    ("B", "It is B, not C.", False),  # no pattern reads a letter mid-sentence (a limit: RuleJudge's docstring)
    ("B", "It is C.", False),
    ("A", "The shape is a circle.", False),  # "is a" is an article, not the letter A
    ("B", "**C**", False),
    ("B", r"$\boxed{C}$", False),
    ("B", "B\n\nC", False),
    ("B", "**A.** 10 cm\n**B.** 12 cm\n**C.** 14 cm", False),  # a list of the options names them all
    ("A", "**A.** 10 cm\n**B.** 12 cm\n**C.** 14 cm", False),
    ("A", "A. 10 cm\nB. 12 cm", False),
    # free text
    ("Paris", "The capital is Paris.", True),
    ("New York", "It is New York City.", True),
    ("Paris", "Paris or London", False),
    ("dog", "dog or cat", False),
    ("dog", "dog, or cat", False),  # a hedge split off by a comma is still a hedge
    ("dog", "a dog, or maybe a cat", False),
    ("dog", "It is a dog, not a cat.", True),
    ("Paris", "The capital is Rome.", False),
    # empty responses
    ("triangle", "", False),
    ("yes", "   ", False),
    ("3", "", False),
    ("B", "", False),
    ("A", "", False),
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


# The rule judge's verdicts under its current names, with and without math_verify: a few cases of every rule (1-6),
# the LaTeX numbers read with math_verify, and what each version changed. The persistent cache keys a verdict by the
# judge's name, so a verdict that changes under the same name is an older code's verdict handed back from the cache.
# The math-verify package's own version is part of the name: a release that changes a verdict fails this test.
GOLDEN_NAMES = {True: f"rule-v7+math_verify-v8@{MATH_VERIFY_VERSION}", False: "rule-v7"}
GOLDEN_CASES = [  # answer, response, verdict with math_verify, without
    # 1. letters; "It is B." and "It's B" were wrong before rule-v7 (c217e3e)
    ("B", "B", True, True),
    ("B", "(B)", True, True),
    ("(B)", "b", True, True),
    ("B", "The answer is B.", True, True),
    ("B", "**B**", True, True),
    ("B", r"$\boxed{B}$", True, True),
    ("B", "B\n\nBecause the area is 12.", True, True),
    ("B", "It is B.", True, True),
    ("B", "It's B", True, True),
    ("B", "It is B, not C.", False, False),
    ("A", "The answer is a circle.", False, False),
    ("A", "The shape is a circle.", False, False),
    ("B", "A. 10 cm\nB. 12 cm", False, False),
    # 2. empty
    ("triangle", "", False, False),
    ("3", "  . ", False, False),
    # 3. yes / no
    ("yes", "Yes, it is.", True, True),
    ("no", "There is no triangle.", True, True),
    ("yes", "Yes and no.", False, False),
    ("true", "Yes", True, True),
    # 4. numbers, LaTeX numbers (read with math_verify only)
    ("3", "three", True, True),
    ("1,000", "The total is 1000.", True, True),
    ("0.5", "1/2", True, True),
    ("4", "3 or 4", False, False),
    ("7", r"It is not \boxed{7}.", False, False),
    ("7", "Number of students without glasses = 7", True, True),
    ("200", "There are two hundred dots.", True, True),
    ("15%", "It fell by 15 percent.", True, True),
    ("-5", "−5", True, True),
    ("5", "−5", False, False),
    ("0.5", r"$\boxed{\frac{1}{2}}$", True, False),
    ("0.5", r"It is not \frac{1}{2}.", False, False),
    ("3", "The answer is 3.001", False, False),  # numbers equal to 1e-6 relative, no looser
    ("0", "1/0", False, False),  # a zero denominator is no number, not 0
    ("2", "Answer: 2. There are 3 of them", True, True),  # what follows a marker ends at its first clause mark
    (r"\frac{1}{2}", "0.5", True, False),
    # 5. formulas
    ("y=2x+3", "The line is y = 2x + 3.", True, True),
    ("y=2x+3", "y = 2x - 3", False, False),
    ("x-1", "The answer is (x-1)^2.", False, False),
    ("x^2+1", "The answer is $1+x^2$.", True, False),
    ("y=2x+3", "The line is y = 3 + 2x.", True, False),
    ("x=2", "The answer is 2.", True, True),
    ("x=2", "x = 3, so there are 2 solutions", False, False),
    ("Na+", "Na⁺", True, True),
    ("60 km/h", "v = 60 km/h", True, True),
    (r"2 \times 10^5", "200000", True, False),
    ("x=5", "x + 3 = 8 so x = 6", False, False),
    # 6. words and phrases; math_verify where the rules cannot read the answer. A LaTeX number's \text{} unit: the
    # first and last of the \text{} cases were True and False before math_verify-v8 (96432e4)
    ("circle", "It's a circle, not a triangle.", True, True),
    ("triangle", "It is not a triangle.", False, False),
    ("triangle", "It is not at all a triangle.", False, False),  # a negation three words back still counts
    ("red", "red or blue", False, False),
    ("red", "There is red and blue.", False, False),
    ("gray", "It's grey.", True, True),
    ("Paris", "The capital is Paris.", True, True),
    (r"2\sqrt{2}", r"$\sqrt{8}$", True, False),
    ("3 cm", "3 m", False, False),
    ("2:30 PM", "2:45 PM", False, False),
    (r"3\text{ cm}", "3 m", False, False),
    (r"5\text{ kg}", "The mass is 5 kg.", True, False),
    ("3 cm", r"It is $3\text{ cm}$.", True, False),
]


@pytest.mark.parametrize("math", [False, True])
def test_rule_judge_verdicts_change_only_with_its_name(math):
    """Every verdict of the golden table, asserted together with the judge's name: a change of verdict without a new
    name (the cache would hand back the old one) fails, and so does a new name without a look at the table."""
    if math:
        pytest.importorskip("math_verify", reason="the optional [math] extra is not installed")
    judge = RuleJudge(use_math_verify=math)
    changed = [(a, r) for a, r, with_it, without in GOLDEN_CASES
               if judge.check(a, r) is not (with_it if math else without)]
    assert (judge.name, changed) == (GOLDEN_NAMES[math], []), (
        "the rule judge's verdicts changed: bump the judge's version (RuleJudge.__init__: cached verdicts of the old "
        "code must not be reused), then GOLDEN_NAMES and these cases' verdicts here")


def test_math_verify_only_where_rules_find_nothing(monkeypatch):
    """math_verify is optional; the fake stands in for it so the hook is tested either way."""
    calls = []

    class FakeMathVerify:
        parse = staticmethod(lambda text: text)

        @staticmethod
        def verify(gold, target):
            calls.append((gold, target))
            return True

    monkeypatch.setattr(rule_mod, "math_verify", FakeMathVerify)
    rule_mod._latex_value.cache_clear()  # LaTeX read by the real library must not be reused, nor the fake's kept
    monkeypatch.setattr(rule_mod, "_latex_value", functools.lru_cache(rule_mod._latex_value.__wrapped__))
    judge = RuleJudge()
    assert judge.name.endswith("+math_verify-v8@" + MATH_VERIFY_VERSION)
    assert judge.check(r"\sqrt{2}", "1.41421356")  # nothing to compare: math_verify decides
    assert calls == [(r"$\sqrt{2}$", "1.41421356")]  # a LaTeX answer without $s is given to it between $s
    assert not judge.check("4", "3 or 4")  # the rules found candidates: their verdict stands
    assert not judge.check("red", "red or blue")
    # a plain answer not found is wrong, as is a LaTeX answer whose plain word (a unit) the response lacks: math_verify
    # would read only their first numbers ("3 cm" and "3 m" are both 3)
    for answer, response in [("3 cm", "3 m"), ("3:1", "3:2"), ("2:30 PM", "2:30"), (r"2\sqrt{2}\text{ cm}", "$2$ m")]:
        assert not judge.check(answer, response), (answer, response)
    assert len(calls) == 1
    assert not RuleJudge(use_math_verify=False).check(r"\frac{1}{2}", "0.5")


def test_math_verify_itself_where_the_rules_find_nothing():
    """The real library (scripts/setup.sh installs the ``math`` extra): LaTeX and fractions the rules
    cannot compare are decided by symbolic equivalence; word answers it cannot parse stay the rules'."""
    pytest.importorskip("math_verify", reason="the optional [math] extra is not installed")
    judge = RuleJudge()
    assert judge.use_math_verify and judge.name == f"rule-v7+math_verify-v8@{MATH_VERIFY_VERSION}"
    right = [(r"\frac{1}{2}", "0.5"), (r"\frac{1}{2}", r"The answer is $\frac{2}{4}$"), ("3/4", "0.75")]
    wrong = [(r"\frac{1}{2}", "0.4"), (r"\sqrt{2}", r"$\sqrt{3}$"), ("3/4", "0.7")]
    assert [judge.check(a, r) for a, r in right] == [True] * len(right)
    assert [judge.check(a, r) for a, r in wrong] == [False] * len(wrong)
    assert not RuleJudge(use_math_verify=False).check(r"\frac{1}{2}", "0.5")  # only math_verify reads it
    for answer, response, verdict in CASES:  # and it changes none of the rules' verdicts ("not 7" for 7)
        assert judge.check(answer, response) is verdict, (answer, response)


# With math_verify: the LaTeX numbers it reads are compared, negated and hedged by the rules like any number
# (answer, response, verdict).
LATEX_CASES = [
    ("0.5", r"$\boxed{\frac{1}{2}}$", True),
    ("0.5", r"The answer is \frac{1}{2}.", True),
    ("7", r"\boxed{7}", True),
    ("-0.75", r"$-\frac{3}{4}$", True),
    ("0.75", r"\dfrac{3}{4}", True),
    ("0.25", r"$\tfrac{1}{4}$", True),
    ("2.5", r"$2\frac{1}{2}$", True),  # a mixed number, as math_verify reads it
    ("1000", r"$1{,}000$", True),
    ("0.5", r"$x = 3$, so $\boxed{\frac{1}{2}}$", True),  # "\boxed{" is still the last answer marker
    (r"\frac{1}{2}", "0.5", True),  # a LaTeX answer, a plain response
    (r"$-\frac{3}{4}$", "-0.75", True),
    (r"\frac{1}{2}", r"\dfrac{2}{4}", True),
    (r"2\sqrt{2}", r"$\sqrt{8}$", True),  # no number the rules can compare: math_verify's own verdict
    ("0.5", r"\frac{1}{3}", False),
    ("-0.75", r"$\frac{3}{4}$", False),
    ("0.5", r"It is not \frac{1}{2}.", False),
    ("0.5", r"$\frac{1}{2}$ or $\frac{1}{3}$", False),
    (r"\frac{1}{2}", "It is not 0.5.", False),
    (r"\frac{1}{2}", r"\frac{1}{3}", False),
    (r"2\sqrt{2}", "2", False),  # a bare LaTeX answer is read whole, not as its first number
    ("0.5", r"$\frac{a}{b}$", False),
    ("0.5", r"$\frac{10^{10^{10^{10}}}}{2}$", False),  # not evaluated (that would never end): no number
    ("7", "It is not 7.", False),
    ("x^2+1", "The answer is $1+x^2$.", True),  # a bare formula answer, read as the LaTeX it is
    ("y=2x+3", "The line is $y = 3 + 2x$.", True),
    ("x^2+1", "The answer is $x^2+2$.", False),
    ("x^2+1", "The answer is $(x+1)^2$.", False),
    ("-0.75", r"$−\frac{3}{4}$", True),  # a minus sign before LaTeX
    # a plain answer not found is wrong: math_verify would read only the first number of each
    ("3 cm", "3 m", False),
    (r"3\text{ cm}", "3 m", False),  # math_verify reads "3\text{ cm}" as 3: the unit's words are kept beside it
    (r"5\text{ kg}", "The mass is 5 g.", False),
    (r"5\text{ kg}", "The mass is 5 kg.", True),
    ("3 cm", r"It is $3\text{ cm}$.", True),
    ("2 hours", "It takes 2 minutes.", False),
    ("40 years", "40 days", False),
    ("3:1", "3:2", False),
    ("10:30", "10:45", False),
    ("2:30 PM", "2:45 PM", False),
    ("2:30 PM", "2:30", False),
]


@pytest.mark.parametrize("answer,response,verdict", LATEX_CASES)
def test_math_verify_reads_latex_numbers(answer, response, verdict):
    pytest.importorskip("math_verify", reason="the optional [math] extra is not installed")
    assert RuleJudge().check(answer, response) is verdict


# Formula answers (rule 5), decided by the rules alone: the same verdict with and without math_verify.
FORMULA_CASES = [
    ("y=2x+3", "The line is y = 2x + 3.", True),
    ("y = 2x - 3", "y=2x+3", False),  # operators count
    ("y=2x+3", "y = 2x - 3", False),
    ("y=2x+3", "The line is y = 2x + 3x.", False),  # part of a longer formula
    ("y=2x+3", "z - y = 2x + 3", False),
    ("y = 2x + 3", "y=2x+3.5", False),
    ("y=2x+3", "y = 2x + 3 is the line", True),
    ("y=2x+3", "Y = 2X + 3", True),
    ("y=2x+3", "we get y = 2 x + 3", True),
    ("x^2+1", "x^{2} + 1", True),
    ("x^2+1", "$x^2 - 1$", False),
    ("x > 2", "x < 2", False),
    ("x<2", "x<=2", False),
    (r"x \le 2", "x ≤ 2", True),
    (r"2x \cdot 3", "2x*3", True),
    ("a+b", "a-b", False),
    ("x-1", "x+1", False),
    ("x-1", "The answer is x - 1.", True),
    ("C++", "I would use C++ here.", True),
    ("C++", "C", False),
    ("y=2x+3", "It is not y = 2x + 3.", False),
    ("y=2x+3", "y = 2x + 3 or y = 2x - 3", False),
    ("y=2x+3", "Either y = 2x-3, or y = 2x+3", False),
    ("y=2x+3", "Not x = 1. So y = 2x + 3", True),  # the negation is in another sentence
    ("T-shirt", "a t shirt", True),  # a hyphenated word is no formula
    ("3/4 cup", "0.75 cups", True),  # nor a fraction
    ("C++", "**C++**", True),  # markdown's bold is no operator
    ("Disney+", "The answer is **Disney+**.", True),
    ("Rep/Lean Rep", "**Rep/Lean Rep**", True),
    ("y=2x+3", "The equation is **y = 2x + 3**.", True),
    ("y=2x+3", r"\boxed{y=2x+3}", True),
    ("x-1", "The answer is (x-1)^2.", False),  # parentheses do not hide a longer formula
    ("x+1", "f(x) = 2(x+1)", False),
    ("x^2+1", "(x^2+1)^2", False),
    ("2x+3", "f(x) = (2x+3)/5", False),
    ("x+1", "2^x + 1", False),
    ("x+1", r"\sin x + 1", False),
    ("x+1", "ax + 1", False),
    ("3x+2", "13x+2", False),
    ("x+1", "x + 1.5", False),
    ("x+1", "x+1.", True),
    ("2x+3", "y = 2x + 3", True),  # "=" may come before an answer that holds no relation
    ("x^2+1", "f(x) = x^2 + 1", True),
    (r"\sqrt{x+1}", r"\sqrt{x}+1", False),  # braces are kept where they group
    (r"\frac{1}{x+1}", r"$\frac{1}{x}+1$", False),
    ("2^{x+1}", "2^{x}+1", False),
    ("2^{x+1}", "2^(x+1)", True),
    (r"y=\frac{1}{12}x+1", r"y = \frac{11}{2}x + 1", False),
    (r"y=\frac{1}{2}x+1", r"y = \dfrac{1}{2}x + 1", True),
    (r"y=\frac{1}{2}x+1", r"$y = \frac{1}{2} x + 1$", True),
    ("x^{2}+2x+1", "x^2+2x+1", True),
    ("x=2", "The answer is 2.", True),  # a variable's value, where the response writes no equation
    ("x=2", "Therefore, x is 2.", True),
    ("x=2", "x = 3, so there are 2 solutions", False),
    ("x=2", "x = 3. The answer is 2", False),
    ("x=2", "we have 3x = 2", False),
    ("x=2", "x = 22", False),
    ("x=2", "x = -2", False),
    ("x=-2", "x=−2", True),
    ("x=2", r"\(x = 2\)", True),
    ("x=2", "so x = 2, y = 4", True),
    ("x=2", "x = 2.0", True),  # numbers written one way
    (r"x \leq 2", r"x \leqslant 2", True),  # spellings
    (r"x \neq 2", r"x \ne 2", True),
    ("x<2", r"$x \lt 2$", True),
    (r"x=\pm 2", "x = ±2", True),
    ("x^2", "x²", True),
    ("y=x^2+1", "y = x² + 1", True),
    ("y=2x+3", "y = 2·x + 3", True),
    ("y=2x+3", "y=2*x+3", True),
    ("Na+", "Na^+", True),  # an ion's charge
    ("SO4^2-", "SO4^{2-}", True),
    ("Ca2+", "Ca^{2+}", True),
    ("60 km/h", "The speed is 60.0 km/h.", True),  # a number with a unit is a phrase
    ("60 km/h", "60km/h", True),
    ("60 km/h", "v = 60 km/h", True),
    ("60 km/h", "The speed is 60 km/h or 70 km/h.", False),
    ("5 cm^2", "The area is 5.0 cm^2.", True),
    ("5 cm^2", "The area is 15 cm^2", False),
    ("9.8 m/s^2", "g = 9.8 m/s^2", True),
    ("3-D", "It is 3D", True),  # a number's hyphen before a capital is a word's
    ("2-D", "It is a 2D shape", True),
    ("Germany*", "Germany", True),  # a footnote's star is no operator
    ("€2.50/kg", "€2.5/kg", True),
    ("+5°C", "5 °C", True),
    ("4 - \\pi", "4 + \\pi", False),  # a minus beside LaTeX or π is an operator
    ("16 - 4\\pi", "$16+4\\pi$", False),
    ("\\sqrt{3} - 1", "\\sqrt{3} + 1", False),
    ("8 - 2π", "8 + 2π", False),
    ("x+1", "The answer is \\frac{x+1}{2}.", False),  # braces, bars, LaTeX and ÷ × − do not hide a longer formula
    ("x^2+1", "$\\sqrt{x^2+1}$", False),
    ("x+1", "|x+1|", False),
    ("x=4", "$x=4\\sqrt{2}$", False),
    ("x = 2", "x = 2\\frac{1}{2}", False),
    ("x=2", "$x = 2 \\times 5$", False),
    ("x = 2", "x = 2 ÷ 5", False),
    ("x+1", "−x+1", False),
    ("5x+3", "0.5x + 3", False),  # nor a decimal point
    ("25-x", "1.25 - x", False),
    ("2x+3", "f(x) ≠ 2x + 3", False),  # "=" may come before a formula without relation, "≠" and "<=" may not
    ("2x+3", "y <= 2x + 3", False),
    ("x=2", "Solving $x^2 - 5x + 6 = 0$ gives $x = 3$, the larger of the 2 roots.", False),  # LaTeX alone is read
    ("x=2", "$x = 3$ (checked with 2 methods)", False),
    ("x=2", "x < 2", False),  # a variable's value is read only where no other relation is written
    ("x=5", "The solution is x > 5.", False),
    ("x=2", "x ≠ 2", False),
    ("AB = 6", "The length of AB is 6.", True),
    ("pH = 7", "pH = 7.0", True),
    ("Na+", "Na⁺", True),  # charges written otherwise
    ("Na+", "Na$^+$", True),
    ("Ca2+", "Ca$^{2+}$", True),
    ("H+", "hydrogen ions (H⁺)", True),
    ("p < 0.05", "p<.05", True),  # spellings
    ("F = 20 N", "F = 20.0 N", True),
    ("5 ± 0.2", "5 +/- 0.2", True),
    ("y=2x+3", "y＝2x＋3", True),
    ("1920×1080", "1920x1080", True),
]
# Formula answers the response writes another way, without LaTeX: only math_verify finds them.
FORMULA_MATH_VERIFY_CASES = [
    ("y=2x+3", "The line is y = 3 + 2x.", True),
    ("a+b", "b + a", True),
    ("x^2+1", "so 1 + x^2", True),
    ("y=2x+3", "It is not y = 3 + 2x.", False),
    ("y=2x+3", "y = 3 + 2x or y = 2x", False),
    ("x^2+1", "so (x+1)^2", False),
    (r"y=\frac{1}{2}x+1", "y = 0.5x + 1", True),
    (r"\pi/2", r"\frac{\pi}{2}", True),  # LaTeX outside $s is given to math_verify between them
    ("x/2", r"The answer is \frac{x}{2}.", True),
    (r"2 \times 10^5", "200000", True),  # an answer without letters is the number it evaluates to
    (r"1.5 \times 10^{-3}", "0.0015", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("x=5", "x + 3 = 8 so x = 6", False),  # only the response's last formula is its answer
    ("x=2", "We compute 6 - 4 and get x = 5.", False),
    ("x=2", "First 1 + 1, then x = 5.", False),
    ("y=2x+3", "slope 2, intercept 3: 2x + 3, but y = 2x - 3", False),
    ("x>2", "x-2>0 so x<2", False),
    ("y=x^2", "the area is x^2, so y = 2x", False),
    ("y=2x+3", "y = 2x + 5, so the intercept is 2x+3", False),  # of the answer's shape
    ("y=2x+3", "z = 3 + 2x", False),
    ("x=2", "so x = 2 + 1 = 3", False),
]


@pytest.mark.parametrize("math", [True, False])
@pytest.mark.parametrize("answer,response,verdict", FORMULA_CASES)
def test_formula_answers_keep_their_operators(answer, response, verdict, math):
    if math:
        pytest.importorskip("math_verify", reason="the optional [math] extra is not installed")
    assert RuleJudge(use_math_verify=math).check(answer, response) is verdict


@pytest.mark.parametrize("answer,response,verdict", FORMULA_MATH_VERIFY_CASES)
def test_formulas_written_otherwise_are_math_verifys(answer, response, verdict):
    pytest.importorskip("math_verify", reason="the optional [math] extra is not installed")
    assert RuleJudge().check(answer, response) is verdict
    assert RuleJudge(use_math_verify=False).check(answer, response) is False  # the rules alone cannot tell


def test_random_formulas_are_matched_as_written_and_told_apart_by_an_operator():
    """Fresh random polynomials y = c_k x^k ± ... ± c_0: found whatever their spacing, case and LaTeX dress; one
    sign flipped, or the relation reversed, and they are wrong."""
    rng = random.Random()

    def dress(text: str) -> str:  # spacing, case and LaTeX that do not change the formula
        text = "".join(c + " " * rng.randint(0, 2) if c in "=+-^<>" else c for c in text)
        text = text.upper() if rng.random() < 0.3 else text
        text = text.replace("^2", "^{2}") if rng.random() < 0.5 else text
        return f"${text}$" if rng.random() < 0.5 else text

    for use_math_verify in ([True, False] if rule_mod.math_verify else [False]):
        judge = RuleJudge(use_math_verify=use_math_verify)
        for _ in range(30):
            terms = [f"{rng.randint(1, 9)}x^{k}" if k > 1 else f"{rng.randint(1, 9)}x" if k else str(rng.randint(1, 9))
                     for k in range(rng.randint(1, 3), -1, -1)]
            signs = [rng.choice("+-") for _ in terms[1:]]
            relation = rng.choice(["=", "<", ">"])
            answer = f"y{relation}" + terms[0] + "".join(s + t for s, t in zip(signs, terms[1:]))
            assert judge.check(answer, f"So {dress(answer)}.") is True, answer
            flipped = rng.randrange(len(signs))
            other_signs = [("-" if s == "+" else "+") if i == flipped else s for i, s in enumerate(signs)]
            wrong = f"y{relation}" + terms[0] + "".join(s + t for s, t in zip(other_signs, terms[1:]))
            reversed_ = answer.replace(relation, {"=": "<", "<": ">", ">": "<"}[relation], 1)
            for other in (wrong, reversed_):
                assert judge.check(answer, f"So {dress(other)}.") is False, (answer, other)


def test_formula_rule_on_degenerate_responses():
    """Long runs a cold student emits are judged in linear time (a digit run was quadratic in the bare-formula
    pattern, ~4 min for 50,000 digits; a formula repeated thousands of times quadratic in the match check) and
    a formula that repeats glued to itself is part of a longer formula."""
    judge = RuleJudge()
    for response in ["1" * 50_000 + "+", "y=2x+3" * 10_000, "1 = " * 20_000 + "x", "1." * 20_000 + "+",
                     "\\boxed{" * 20_000 + "x", "^{" * 20_000 + "x", "(" * 50_000 + "x+1", "Na^+" * 20_000]:
        assert judge.check("y=2x+3", response) is False
    assert judge.check("7", "1" * 8_000 + r"\frac{1}{2}") is False  # a mixed number of 8,000 digits raised
    assert judge.check("y=2x+3", "y = 2x + 3, " * 5_000) is True
    assert judges_formula.occurrences("y = 2x + 3y = 2x + 3", "y = 2x + 3") == []
    assert judges_formula.occurrences("so y = 2x + 3. and y = 2x + 3", "y = 2x + 3") == [(3, 13), (19, 29)]


def test_formula_form_writes_a_formula_one_way():
    """The spellings rule 5 compares, as formula_form writes them."""
    for text, form in [(r"$y=2 x^{2} \cdot 3$", "y = 2x ^ 2 * 3"), ("**y = 2·x**", "y = 2x"), ("Na^+", "na +"),
                       ("1,000 + x", "1000 + x"), ("x ≤ 7.50", "x < = 7.5"), (r"\boxed{\frac{1}{2}x}", r"\frac{1}{2}x"),
                       ("(2,5)", "(2, 5)"), (r"\sqrt{x+1}", r"\sqrt{x + 1}"), ("2^{x+1}", "2 ^ (x + 1)"),
                       (r"x \geqslant -\infty", r"x > = - \infty"), ("y＝2x＋3", "y = 2x + 3")]:
        assert judges_formula.formula_form(text) == form, text


def test_power_towers_are_not_given_to_math_verify():
    """math_verify never returns on a power tower where it runs without its timeouts (any thread but the main one),
    and takes minutes on a product of high powers: a response's last formula, its LaTeX, or an answer without
    letters, that holds one is not given to it in rule 5."""
    pytest.importorskip("math_verify", reason="the optional [math] extra is not installed")
    judge, verdicts = RuleJudge(), []
    cases = [("x=2", "so x = 9^9^9^9"), ("x^2+1", "9^9^9^9"), ("9^9^9^9", "9"), ("x=2", "x = 2^(3^(4^5))"),
             ("2^{1000000}", "2"), (r"\binom{10000}{5000}", "7"), ("y=2x+3", r"$9^{9^{9^{9}}}$"),
             ("y=2x+3", "y = (x+1)^99*(x-1)^99*(x+2)^99*(x-2)^99*(x+3)^99")]  # 35 s in a thread
    worker = threading.Thread(target=lambda: verdicts.extend(judge.check(*case) for case in cases), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert not worker.is_alive() and verdicts == [False] * len(cases)


def test_simple_latex_is_read_as_math_verify_reads_it():
    """Fractions (plain, mixed, signed, \\dfrac / \\tfrac) and "{,}"-grouped digits are read without
    math_verify (~1 ms a parse), as it reads them: fresh random fragments, each compared with its parse."""
    math_verify = pytest.importorskip("math_verify", reason="the optional [math] extra is not installed")
    rng = random.Random()
    fragments = {"1{,}000", "12{,}345{,}678", r"\frac{10}{4}", r"03\frac{1}{2}"}
    while len(fragments) < 60:
        whole = rng.choice(["", str(rng.randint(0, 30))])
        fragments.add(f"{rng.choice(['', '-'])}{whole}\\{rng.choice(['', 'd', 't'])}frac{{{rng.randint(1, 99)}}}"
                      f"{{{rng.randint(1, 99)}}}")
    for text in fragments:
        assert rule_mod._SIMPLE_LATEX.fullmatch(text), text
        assert rule_mod._latex_value(text) == str(math_verify.parse(f"${text}$")[0]), text
    for text in (r"\frac{1}{0}", r"2\frac{0}{5}"):  # left to math_verify: no number, the product 2·0
        assert rule_mod._SIMPLE_LATEX.fullmatch(text) is None and rule_mod._latex_value(text) is None, text


def test_latex_numbers_start_at_a_digit_runs_first_digit():
    """A LaTeX number starts at the first digit of a run (so the pattern also reads long digit runs in linear
    time: 40,000 digits took 3 s when every digit could start a match): "1234{,}567" is no grouped number,
    not "1" then "234{,}567"; a mixed number keeps its whole part."""
    assert rule_mod._LATEX_NUMBER.findall("1234{,}567") == []
    assert rule_mod._LATEX_NUMBER.findall(r"12\frac{1}{2} and 1{,}000") == [r"12\frac{1}{2}", "1{,}000"]
    assert rule_mod._LATEX_NUMBER.findall("9" * 40_000 + r" -\frac{1}{2}") == [r"-\frac{1}{2}"]


def test_without_math_verify_latex_is_digits():
    """The rules alone read no LaTeX: "\\frac{1}{2}" is 1 and 2."""
    judge = RuleJudge(use_math_verify=False)
    assert not judge.check("0.5", r"$\boxed{\frac{1}{2}}$") and not judge.check("-0.75", r"$-\frac{3}{4}$")


def test_math_verify_gives_the_same_verdicts_in_threads():
    """math_verify's timeouts use SIGALRM, which only the main thread can set: other threads (a thread pool,
    a server's workers) run it without them and get the main thread's verdicts, not "not equivalent"."""
    pytest.importorskip("math_verify", reason="the optional [math] extra is not installed")
    judge = RuleJudge()
    items = [JudgeItem("q", a, r) for a, r, _ in LATEX_CASES]
    expected = [v for _, _, v in LATEX_CASES]
    assert judge(items) == expected
    assert rule_mod._no_alarm("timeout_seconds") == {}  # the main thread keeps its timeouts
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(lambda item: judge([item])[0], items)) == expected
    verdicts = []
    thread = threading.Thread(target=lambda: verdicts.append(judge(items)))
    thread.start()
    thread.join()
    assert verdicts == [expected]


def test_make_judge(tmp_path):
    from ril_fast.judges_http import HTTPJudge

    assert isinstance(make_judge("rule"), RuleJudge)
    assert isinstance(make_judge(JudgeKind.RULE, use_math_verify=False), RuleJudge)
    # v7: "It is B."; v6: dressed letters, minus signs; v3: a negation before an answer marker; v2: letters, scale
    # words, ".5" and comma hedges: older verdicts in a cache are stale
    assert make_judge("rule", use_math_verify=False).name == "rule-v7"
    http = make_judge("http", url="http://127.0.0.1:9/v1", model="judge-model")
    assert isinstance(http, HTTPJudge) and http.name == f"http:judge-model:{PROMPT_VERSION}:top10"
    with pytest.raises(ValueError, match="model"):
        make_judge("http", url="http://127.0.0.1:9/v1", model="")
    with pytest.raises(ValueError, match="http://"):
        make_judge("http", url="127.0.0.1:9/v1", model="m")
    with pytest.raises(FileNotFoundError, match="/nonexistent/folder: no such folder"):
        make_judge("hf", model="/nonexistent/folder")
    with pytest.raises(FileNotFoundError, match="no config.json in the folder"):
        make_judge("hf", model=str(tmp_path))
    with pytest.raises(ValueError):
        make_judge("llm")


def test_make_judge_from_config_and_command_line(monkeypatch):
    import argparse

    cfg = load_config(["judge=http", "judge_url=http://127.0.0.1:9/v1", "judge_model=m", "judge_concurrency=3",
                       "judge_timeout_s=2.5", "judge_retries=1"])
    judge = make_judge_from_config(cfg)
    assert judge.client.url == "http://127.0.0.1:9/v1" and judge.model == "m"
    assert (judge.client.concurrency, judge.client.timeout_s, judge.client.retries) == (3, 2.5, 1)
    assert isinstance(make_judge_from_config(load_config([])), RuleJudge)
    parser = argparse.ArgumentParser()
    add_judge_arguments(parser)
    args = parser.parse_args(["--judge", "http", "--judge-url", "http://h:1/v1", "--judge-model", "m",
                              "--judge-retries", "0"])
    assert (args.judge, args.judge_retries, args.judge_concurrency) == ("http", 0, Config().judge_concurrency)
    assert make_judge_from_config(args).client.retries == 0
    # The hf judge gets its batch size (its class stubbed: no model loads); an optional --judge (the teacher tool's,
    # the evaluator's) is off unless asked for
    monkeypatch.setattr("ril_fast.judges_hf.HFJudge", lambda **options: options)
    assert make_judge_from_config(load_config(["judge=hf", "judge_model=m", "judge_batch_size=3"])) == \
        {"model": "m", "batch_size": 3}
    optional = argparse.ArgumentParser()
    add_judge_arguments(optional, optional=True)
    assert optional.parse_args([]).judge == "none" and optional.parse_args(["--judge", "none"]).judge == "none"
    with pytest.raises(ConfigError, match="judge_url must start with http"):
        load_config(["judge=http", "judge_url=localhost:8000", "judge_model=m"])
    with pytest.raises(ConfigError, match="judge_concurrency"):
        load_config(["judge_concurrency=0"])


def test_prompt_and_decision():
    messages = judge_messages(JudgeItem("What shape?", "circle", "A red circle."))
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "Question: What shape?\nGround-truth answer: circle\nResponse: A red circle." in messages[1]["content"]
    assert [verdict_word(t) for t in ("Yes", " yes", "NO\n", "yes.", "Maybe")] == ["yes", "yes", "no", None, None]
    assert decide(0.6, 0.4) and not decide(0.4, 0.6) and not decide(0.3, 0.3) and not decide(0.0, 0.0)


def test_prompt_version_follows_the_prompt_text():
    """The module run again with one word of the prompt edited has another PROMPT_VERSION (so the LLM
    judges' names, and their cached verdicts, change with it); run unedited, the same one."""
    from pathlib import Path

    source = Path(judge_mod.__file__).read_text()
    versions = []
    for text in (source, source.replace("You are a strict grader.", "You are a careful grader.")):
        namespace = {"__name__": "ril_fast.judge_edited"}
        exec(compile(text, judge_mod.__file__, "exec"), namespace)
        versions.append(namespace["PROMPT_VERSION"])
    assert versions[0] == PROMPT_VERSION != versions[1]


def test_train_judge_bench_reports_the_judge_phase_seconds(tmp_path, monkeypatch, capsys):
    """bench/train_judge.py's "judge-phase seconds per step" are the steps' ``time/judge``, not also the teacher
    judge cache's hit rate the trainer logs beside it (its name holds "judge" too)."""
    import json
    import runpy
    from pathlib import Path

    from ril_fast import train

    rows = [{"step": 0, "eval_accuracy": 0.5},
            {"step": 1, "teacher_judge_cache_hit_rate": 0.25, "time/judge": 1.234, "time/rollout": 2.0},
            {"step": 2, "teacher_judge_cache_hit_rate": 0.75, "time/judge": 0.5}]

    def fake_main(argv):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path)

    monkeypatch.setattr(train, "main", fake_main)
    monkeypatch.setattr(train, "CachedJudge", train.CachedJudge)  # the bench replaces it: put back afterwards
    runpy.run_path(str(Path(__file__).parents[1] / "bench" / "train_judge.py"))["main"]([])
    assert "judge-phase seconds per step: [1.23, 0.5]\n" in capsys.readouterr().out


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
    assert (cached.hits, cached.misses) == (6, 3) and cached.hit_rate == 6 / 9
    assert cached.name == inner.name
    assert CachedJudge(inner).hit_rate == 0  # before its first call


def test_cache_key_and_store_hook():
    item = JudgeItem("q", "a", "r")
    assert judge_key("one", item) != judge_key("two", item)
    assert judge_key("one", item) != judge_key("one", JudgeItem("q", "a", "r "))
    assert judge_key("one", JudgeItem("q|a", "", "r")) != judge_key("one", JudgeItem("q", "a|", "r"))
    # the same question and response, another ground truth (easy-VQA repeats its questions): another verdict
    assert judge_key("one", JudgeItem("What shape?", "circle", "Circle.")) != \
        judge_key("one", JudgeItem("What shape?", "square", "Circle."))
    cached = CachedJudge(RuleJudge(use_math_verify=False))
    assert cached([JudgeItem("What shape?", "circle", "Circle."), JudgeItem("What shape?", "square", "Circle.")]) == \
        [True, False]
    # half an emoji (a lone UTF-16 surrogate, as a server that cuts a reply sends) is hashed, not refused
    cut = JudgeItem("q", "red", "The shape is red \ud83d")
    assert judge_key("one", cut) != judge_key("one", JudgeItem("q", "red", "The shape is red \ufffd"))
    assert CachedJudge(RuleJudge(use_math_verify=False))([cut]) == [True]
    store = {judge_key("counting", item): True}  # as a persistent store would hand back
    inner = CountingJudge()
    assert CachedJudge(inner, store=store)([item]) == [True]
    assert inner.batches == []


# ---- the persistent cache ---------------------------------------------------------------------------

# One worker process: judges the shared items and its own, in small batches of a random order, through a
# CachedJudge on the SQLite store; prints its hits and misses.
_WORKER = r"""
import json, random, sys
from ril_fast.judge import CachedJudge, JudgeItem, judge_store
path, worker, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

class Parity:
    name = "parity"
    def __call__(self, items):
        return [len(item.response) % 2 == 0 for item in items]

items = [JudgeItem("q", "a", "shared" + "x" * i) for i in range(200)]
items += [JudgeItem("q", "a", f"own{worker}-" + "y" * i) for i in range(50)]
random.Random(seed).shuffle(items)
judge = CachedJudge(Parity(), store=judge_store(path))
for start in range(0, len(items), 10):
    batch = items[start:start + 10]
    assert judge(batch) == Parity()(batch)
print(json.dumps({"hits": judge.hits, "misses": judge.misses}))
"""


def _workers(path, seeds):
    import json
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(path), str(w), str(s)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w, s in seeds]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    return [json.loads(out) for out, _ in outs]


def test_sqlite_store_is_shared_by_processes(tmp_path):
    """Four processes judge 200 shared items and 50 of their own at once through one SQLite file: every
    verdict is right, every distinct item is stored exactly once, and a later process judges nothing."""
    import os

    from ril_fast.judges_cache import SqliteStore

    path = tmp_path / "cache" / "judge.sqlite"
    seeds = [(w, int.from_bytes(os.urandom(4), "little")) for w in range(4)]
    stats = _workers(path, seeds)
    store = SqliteStore(path)
    assert len(store) == 200 + 4 * 50
    for key in list(store)[:50]:
        assert isinstance(store[key], bool)
    misses = sum(s["misses"] for s in stats)
    # Each distinct item is judged at least once; a shared one twice only when two processes raced for it.
    assert 400 <= misses <= 400 + 3 * 200 and all(s["hits"] + s["misses"] == 250 for s in stats)
    again = _workers(path, seeds[:1])  # the same items again, in a new process: all from the file
    assert again == [{"hits": 250, "misses": 0}]


_OPENER = """
import json, sys, time
from ril_fast.judges_cache import SqliteStore
folder, trials, gap, worker = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
print("ready", flush=True)
start = float(sys.stdin.readline())
retries = []
for trial in range(trials):  # every process opens the same new file at the same moment, once a trial
    time.sleep(max(0.0, start + gap * trial - time.time()))  # asleep: a busy wait on 2 cores serialised them
    store = SqliteStore(f"{folder}/{trial}.sqlite")
    store[worker] = True
    retries.append(store.retries)
    store.close()
print(json.dumps(retries))
"""


def test_sqlite_store_opened_by_many_processes_at_once(tmp_path):
    """Six processes (say, the ranks of one node) open the same new file at once: none fails, all write. SQLite
    answers "database is locked" at once, without its busy timeout, to a switch to WAL that meets another
    process's write lock (without the retry 15 of 30 such openings failed here). Processes racing on 2 cores
    seldom meet so, so on every other file this test holds a write lock itself for the first 0.1 s: there every
    opener must go through the retry (without it, they all fail)."""
    import json
    import sqlite3
    import subprocess
    import sys
    import time

    from ril_fast.judges_cache import SqliteStore

    trials, gap, workers = 12, 0.2, 6
    held = {}
    for trial in range(0, trials, 2):  # the file made and write-locked before any opener starts
        held[trial] = sqlite3.connect(tmp_path / f"{trial}.sqlite", isolation_level=None)
        held[trial].execute("BEGIN IMMEDIATE")
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, str(tmp_path), str(trials), str(gap), str(w)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in range(workers)]
    try:
        ready = [p.stdout.readline() for p in procs]  # a barrier: every interpreter has started
        start = time.time() + 0.1
        for p in procs:
            p.stdin.write(f"{start}\n")
            p.stdin.flush()
        for trial, conn in held.items():
            time.sleep(max(0.0, start + gap * trial + 0.1 - time.time()))
            conn.execute("ROLLBACK")
            conn.close()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * workers, "\n".join([str(ready)] + [err for _, err in outs])
    retries = [json.loads(out) for out, _ in outs]
    for trial in range(trials):
        assert dict(SqliteStore(tmp_path / f"{trial}.sqlite")) == {str(w): True for w in range(workers)}
    # Each opener that came while the lock was held retried: at least one for each such file (all, nearly always).
    assert all(sum(r[trial] for r in retries) > 0 for trial in held), retries


def test_sqlite_store_is_a_mapping(tmp_path):
    from ril_fast.judges_cache import SqliteStore

    store = SqliteStore(tmp_path / "s.sqlite")
    store.update({"a": True, "b": False})
    store["c"] = 1
    assert dict(store.items()) == {"a": True, "b": False, "c": True} and len(store) == 3
    assert store.get("zz") is None and "a" in store and "zz" not in store
    store["a"] = False
    del store["b"]
    assert dict(store) == {"a": False, "c": True}
    with pytest.raises(KeyError):
        del store["b"]
    store.close()
    assert SqliteStore(tmp_path / "s.sqlite")["c"] is True  # persisted


# One trial per run: the parent writes 50 verdicts and forks; the child writes 200 batches of 10 through the store
# it was handed (or, odd trials, one of its own), reading each back, while the parent closes its store after the
# child's 50th batch. Prints the rows in the file and the batches the child could not read back.
_FORKER = r"""
import os, sqlite3, sys
from ril_fast.judges_cache import SqliteStore
path, own = sys.argv[1], sys.argv[2] == "1"
store = SqliteStore(path)
store.update({f"p{i}": True for i in range(50)})
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(read)
    child = SqliteStore(path) if own else store
    unread = 0
    for i in range(200):
        child.update({f"c{i}-{j}": True for j in range(10)})
        unread += child.get(f"c{i}-0") is not True
        if i == 50:
            os.write(write, b"x")
    child.close()
    os._exit(min(unread, 100))
os.close(write)
os.read(read, 1)
store.close()  # the parent is done with the cache while its child still writes
_, status = os.waitpid(pid, 0)
conn = sqlite3.connect(path)
print(conn.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0], os.waitstatus_to_exitcode(status))
"""


def test_sqlite_store_keeps_a_forked_childs_verdicts(tmp_path):
    """A process forked from one that has the store open writes verdicts while its parent closes the store: none
    is lost. Without closing every store before a fork (judges_cache._close_before_fork), the parent's close
    deleted the WAL under the child: every trial lost 200 to 1,500 of the child's 2,000 rows here."""
    import subprocess
    import sys

    for trial in range(6):
        path = tmp_path / f"{trial}.sqlite"
        run = subprocess.run([sys.executable, "-c", _FORKER, str(path), str(trial % 2)], capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == ["2050", "0"], f"trial {trial}: (rows, child's unread batches) {run.stdout}"


def test_sqlite_store_is_closed_for_a_fork_from_any_thread(tmp_path):
    """What runs before a fork closes every open store, also one opened by another thread than the forking one,
    and each store reopens on its next access."""
    from ril_fast import judges_cache
    from ril_fast.judges_cache import SqliteStore

    stores = [SqliteStore(tmp_path / "a.sqlite"), SqliteStore(tmp_path / "b.sqlite")]
    stores[0]["x"] = True
    with ThreadPoolExecutor(1) as pool:
        pool.submit(judges_cache._close_before_fork).result()  # a fork from another thread
    assert [store._conn for store in stores] == [None, None]
    assert stores[0]["x"] is True and len(stores[1]) == 0  # reopened
    assert all(store._conn is not None for store in stores)
