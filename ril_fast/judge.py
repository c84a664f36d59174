"""Correctness judges: a batch of (question, ground-truth answer, response) -> booleans.

RIL's answer reward is r_ans = 1[judge says correct] (shared/RIL.md). Every judge has one interface,
``Judge``: a ``name`` that identifies its verdicts (the cache key) and ``__call__(items) -> list[bool]``.
The kind is picked in one place, ``make_judge`` (``make_judge_from_config`` reads the trainer's
``judge*`` settings, or the same-named command-line options of ``ril_fast.eval`` / ``ril_fast.teacher``):

    rule   RuleJudge: normalised matching, no model                        (this module)
    hf     HFJudge: a local causal LM, p("yes") vs p("no"), batched         (ril_fast.judges_hf)
    http   HTTPJudge: an OpenAI-compatible server such as vLLM, concurrent  (ril_fast.judges_http)

The two LLM judges ask the same question, ``judge_messages`` (a system turn and a user turn):

    system: You are a strict grader. You decide whether a response to a question gives the same
            final answer as the ground-truth answer. Wording, case, punctuation and extra
            explanation do not matter; a different, hedged or missing answer is wrong.
    user:   Question: {question}
            Ground-truth answer: {answer}
            Response: {response}

            Does the response give the same final answer as the ground-truth answer? Answer with one
            word: yes or no.

and decide alike: p_yes / (p_yes + p_no) > 0.5, where p_yes is the probability of the first answer
token being a "yes" token (any token that reads "yes" once stripped and lowercased: "Yes", " yes",
"YES", ...) and p_no likewise; the http judge sums over the top log-probs the server returns. A tie
is "wrong". ``PROMPT_VERSION``, a short hash of the prompt text, is part of their names, so a changed
prompt never reads verdicts cached under the old one.

Teacher responses never change, so their verdicts are computed once: ``CachedJudge`` wraps any judge
with a store keyed by a hash of (judge name, question, answer, response). The store is an in-memory
dict by default; ``judge_store(path)`` gives the persistent one, an SQLite file that several processes
(ranks, runs, ``ril_fast.teacher``) share (``ril_fast.judges_cache``).
"""

import enum
import functools
import hashlib
import json
import math
import re
import threading
from collections.abc import MutableMapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Protocol

try:  # optional: reads LaTeX numbers for the rules, and decides symbolic equivalence where they find nothing
    import math_verify
except ImportError:
    math_verify = None


@dataclass(frozen=True)
class JudgeItem:
    """One judgement: does ``response`` answer ``question`` consistently with ground truth ``answer``?"""

    question: str
    answer: str
    response: str


class Judge(Protocol):
    """A correctness judge. ``name`` identifies its verdicts: two judges with the same name must agree."""

    name: str

    def __call__(self, items: list[JudgeItem]) -> list[bool]:
        """One verdict per item, in order."""
        ...


class JudgeKind(str, enum.Enum):
    """Which judge the trainer uses (its ``judge=`` setting)."""

    RULE = "rule"
    HF = "hf"
    HTTP = "http"


def make_judge(kind: JudgeKind | str, **options) -> Judge:
    """The judge of ``kind`` built with ``options``, the keyword arguments of its class: ``RuleJudge``,
    ``ril_fast.judges_hf.HFJudge`` (``model=DIR``, ...) or ``ril_fast.judges_http.HTTPJudge``
    (``url=``, ``model=``, ...). The model-backed kinds are imported only when asked for."""
    kind = JudgeKind(kind)
    if kind is JudgeKind.RULE:
        return RuleJudge(**options)
    if kind is JudgeKind.HF:
        from ril_fast.judges_hf import HFJudge

        return HFJudge(**options)
    from ril_fast.judges_http import HTTPJudge

    return HTTPJudge(**options)


def make_judge_from_config(cfg) -> Judge:
    """The judge a run's settings name: ``cfg.judge`` (rule | hf | http) with ``judge_model``,
    ``judge_url``, ``judge_batch_size``, ``judge_concurrency``, ``judge_timeout_s`` and
    ``judge_retries`` (a ``ril_fast.config.Config``, or the parsed options of ``add_judge_arguments``).
    Uncached: wrap it in ``CachedJudge(judge, store=judge_store(cfg.judge_cache))`` to cache it."""
    kind = JudgeKind(cfg.judge)
    if kind is JudgeKind.RULE:
        return make_judge(kind)
    if kind is JudgeKind.HF:
        return make_judge(kind, model=cfg.judge_model, batch_size=cfg.judge_batch_size)
    return make_judge(kind, url=cfg.judge_url, model=cfg.judge_model, concurrency=cfg.judge_concurrency,
                      timeout_s=cfg.judge_timeout_s, retries=cfg.judge_retries)


def judge_store(path: str) -> MutableMapping[str, bool] | None:
    """The persistent verdict store at ``path`` (an SQLite file, made if missing), or None for an
    empty path (``CachedJudge`` then keeps its verdicts in memory)."""
    if not path:
        return None
    from ril_fast.judges_cache import SqliteStore

    return SqliteStore(path)


def add_judge_arguments(parser, *, optional: bool = False) -> None:
    """Add ``--judge``, ``--judge-model``, ``--judge-url``, ``--judge-cache``, ``--judge-batch-size``,
    ``--judge-concurrency``, ``--judge-timeout-s`` and ``--judge-retries`` to an argparse parser, with
    the trainer's defaults and help (``ril_fast.config.Config``), for ``make_judge_from_config``.
    ``optional``: ``--judge`` also takes ``none``, its default (no judging)."""
    from dataclasses import fields

    from ril_fast.config import Config  # here, not at the top: config imports this module

    for f in fields(Config):
        if f.name == "judge":
            kinds = [k.value for k in JudgeKind] + (["none"] if optional else [])
            parser.add_argument("--judge", choices=kinds, default="none" if optional else f.default.value,
                                help=f.metadata["help"] + (" | none" if optional else ""))
        elif f.name.startswith("judge_"):
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(f.default),
                                default=f.default, help=f.metadata["help"])


# ---- the LLM judges' question ---------------------------------------------------------------------

JUDGE_SYSTEM = ("You are a strict grader. You decide whether a response to a question gives the same final "
                "answer as the ground-truth answer. Wording, case, punctuation and extra explanation do not "
                "matter; a different, hedged or missing answer is wrong.")
JUDGE_USER = ("Question: {question}\nGround-truth answer: {answer}\nResponse: {response}\n\n"
              "Does the response give the same final answer as the ground-truth answer? "
              "Answer with one word: yes or no.")
# A hash of the prompt text, so an edited prompt is a new version without anyone bumping it by hand.
PROMPT_VERSION = hashlib.sha256(f"{JUDGE_SYSTEM}\0{JUDGE_USER}".encode()).hexdigest()[:8]


def judge_messages(item: JudgeItem) -> list[dict]:
    """The chat messages an LLM judge is given for ``item`` (the prompt in the module docstring)."""
    return [{"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": JUDGE_USER.format(question=item.question, answer=item.answer,
                                                          response=item.response)}]


def verdict_word(token: str) -> str | None:
    """The word "yes" or "no" when ``token`` reads so once stripped and lowercased ("Yes", " no"), else None."""
    word = token.strip().lower()
    return word if word in ("yes", "no") else None


def decide(p_yes: float, p_no: float) -> bool:
    """The LLM judges' binarisation: p_yes / (p_yes + p_no) > 0.5 (a tie, or neither, is wrong)."""
    return p_yes > p_no


# ---- normalisation -------------------------------------------------------------------------------

_ARTICLES = {"a", "an", "the"}
_YES = {"yes", "yeah", "yep", "yup", "true"}
_NO = {"no", "nope", "false"}
_NEGATIONS = {"not", "no", "never", "neither", "nor", "without", "none"}
_NEGATION_WINDOW = 3  # words looked back from a match for a negation ("is not really a triangle")
_BOUNDARY = "|"  # clause punctuation: negation and phrase matches do not cross it
_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen twenty").split()
_TENS = "thirty forty fifty sixty seventy eighty ninety".split()
_NUMBER_WORDS = {w: i for i, w in enumerate(_UNITS)} | {w: 10 * i for i, w in enumerate(_TENS, 3)}
_SCALES = {"hundred": 100, "thousand": 1000, "million": 10**6, "billion": 10**9}  # "two hundred" = 200
# Closed answer classes: a response naming two members of the answer's class is hedging ("red or blue").
_CLASSES = [
    {"red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray",
     "teal", "cyan", "magenta", "violet", "gold", "silver", "beige", "maroon", "navy"},
    {"circle", "square", "rectangle", "triangle", "oval", "ellipse", "star", "hexagon", "pentagon",
     "diamond", "heart", "cross", "rhombus", "trapezoid", "octagon", "cube", "sphere", "cylinder", "cone"},
]
_SYNONYMS = {"grey": "gray", "colour": "color"}
_TOKEN = re.compile(r"(?<![\w.])-?(?:\d+(?:\.\d+)?|\.\d+)(?:/\d+)?%?|[^\W\d_]+|[,.;:!?]")  # ".5" is a number
_ANSWER_MARKER = re.compile(r"answer\s*(?:is|:)|=|\\boxed\{|####")


def _number(token: str) -> float | None:
    """The value of a number token ("3", "3.0", "-2", "1/2", "50%", "three"), else None."""
    if token in _NUMBER_WORDS:
        return float(_NUMBER_WORDS[token])
    token = token.rstrip("%")
    try:
        if "/" in token:
            num, den = token.split("/")
            value = float(num) / float(den) if float(den) else None
        else:
            value = float(token)
    except ValueError:
        return None
    # float() also reads the words "nan", "inf" and "infinity": they are words here, not numbers.
    return value if value is not None and math.isfinite(value) else None


def _canonical(token: str) -> str:
    """One spelling per value: numbers as "3" / "2.5", British spellings as American."""
    value = _number(token)
    if value is not None:
        return str(int(value)) if value == int(value) else repr(value)
    return _SYNONYMS.get(token, token)


def tokens(text: str) -> list[str]:
    """Normalised tokens of ``text``: lowercase, contractions expanded ("isn't" -> "is not"),
    thousands separators dropped ("1,000" -> "1000"), articles dropped, numbers canonical
    ("three", "3.0" -> "3", ".5" -> "0.5") and a number followed by a scale word folded into one
    ("two hundred", "2 hundred" -> "200"), other punctuation dropped except clause punctuation, which
    becomes "|"."""
    text = text.lower().replace("\u2019", "'")
    text = re.sub(r"n't\b", " not", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    out = []
    for tok in _TOKEN.findall(text):
        if tok in ",.;:!?":
            if out and out[-1] != _BOUNDARY:
                out.append(_BOUNDARY)
        elif tok in _SCALES and out and _number(out[-1]) is not None:
            out[-1] = _canonical(str(_number(out[-1]) * _SCALES[tok]))
        elif tok not in _ARTICLES:
            out.append(_canonical(tok))
    return out[:-1] if out and out[-1] == _BOUNDARY else out


def _negated(toks: list[str], start: int) -> bool:
    """Whether a negation word comes shortly before ``toks[start]`` in the same clause."""
    for tok in reversed(toks[max(0, start - _NEGATION_WINDOW):start]):
        if tok == _BOUNDARY or tok == "but":
            return False
        if tok in _NEGATIONS:
            return True
    return False


def _occurrences(toks: list[str], phrase: list[str]) -> list[int]:
    """Start indices of ``phrase`` in ``toks``; its last word may carry a plural -s / -es."""
    n, last = len(phrase), phrase[-1]
    return [i for i in range(len(toks) - n + 1)
            if toks[i:i + n - 1] == phrase[:-1] and toks[i + n - 1] in (last, last + "s", last + "es")]


def _beside(toks: list[str], start: int, end: int) -> list[str]:
    """The words just before and just after ``toks[start:end]``, looking past one clause mark on either
    side: a hedge is often split off by a comma ("a dog, or maybe a cat")."""
    before = toks[max(0, start - 1):start]
    if before == [_BOUNDARY]:
        before = toks[max(0, start - 2):start - 1]
    after = toks[end:end + 1]
    if after == [_BOUNDARY]:
        after = toks[end + 1:end + 2]
    return before + after


def _singular(word: str, vocabulary: set[str]) -> str:
    """``word`` without a plural -s / -es when that gives a member of ``vocabulary``."""
    for stem in (word[:-1], word[:-2]):
        if stem in vocabulary:
            return stem
    return word


def _affirmed_numbers(toks: list[str], before: list[str] | None = None) -> set[float]:
    """The distinct numbers of ``toks`` not negated. ``before``: the tokens before them in the response, where
    a negation may also be ("not \\boxed{7}")."""
    context, start = [*(before or []), *toks], len(before or [])
    return {_number(t) for i, t in enumerate(toks) if _number(t) is not None and not _negated(context, start + i)}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))


# ---- math_verify ---------------------------------------------------------------------------------

# A LaTeX number the rules cannot read: a command with its brace groups (nested up to three deep), after an
# optional sign and integer ("\frac{1}{2}", "-\dfrac{3}{4}", "2\frac{1}{2}"), or digits grouped by "{,}"
# ("1{,}000"). \boxed is not one: it is an answer marker to the rules, and what it holds is read on its own.
_BRACES = r"\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}"
# (?<!\d): a match starts at the first digit of a run (linear time on long digit runs).
_LATEX_NUMBER = re.compile(rf"-?(?<!\d)\d*\\(?!boxed\b)[A-Za-z]+(?:{_BRACES})+|(?<!\d)\d{{1,3}}(?:\{{,\}}\d{{3}})+")
# The common ones, read here as math_verify reads them (a test checks they agree), without its ~1 ms a parse:
# [-][whole]\frac{a}{b} (also \dfrac, \tfrac; a whole part makes a mixed number; a, b > 0: math_verify reads
# "2\frac{0}{5}" as the product 2·0, no number) and digits grouped by "{,}".
# A bare formula as a ground-truth answer ("x^2+1", "y=2x+3"): math_verify reads it only between $s.
_BARE_FORMULA = re.compile(r"[\w\s.,()^=+\-*/<>]*[\^=+*/<>][\w\s.,()^=+\-*/<>]*")
_SIMPLE_LATEX = re.compile(r"(-?)(\d*)\\[dt]?frac\{(\d*[1-9]\d*)\}\{(\d*[1-9]\d*)\}|(\d{1,3}(?:\{,\}\d{3})+)")


def _no_alarm(option: str) -> dict:
    """math_verify's keyword argument ``option`` (``parse``'s ``parsing_timeout``, ``verify``'s
    ``timeout_seconds``) set to None outside the main thread: its timeouts use SIGALRM, which only the main
    thread can set, so elsewhere every call fails ("not equivalent"). The main thread keeps its timeouts,
    against pathological inputs."""
    return {} if threading.current_thread() is threading.main_thread() else {option: None}


def _latex_number(match: re.Match) -> str:
    """The LaTeX number ``match`` written as the integer or fraction math_verify reads there (" -3/4 " for
    "-\\frac{3}{4}", spaced to be a token of its own), else as it is ("\\frac{a}{b}", "\\text{cm}")."""
    value = _latex_value(match.group())
    return match.group() if value is None else f" {value} "


@functools.lru_cache(maxsize=4096)  # a response's fragments recur across a group's samples and steps
def _latex_value(text: str) -> str | None:
    """The integer or fraction math_verify reads in the LaTeX ``text`` ("-3/4", "1000"), or None. Simple
    fractions and grouped digits are read here (``_SIMPLE_LATEX``). What math_verify leaves unevaluated
    ("\\sqrt{4}") is not evaluated here: that can take forever ("10^{10^{10^{10}}}")."""
    if simple := _SIMPLE_LATEX.fullmatch(text):
        sign, whole, numerator, denominator, grouped = simple.groups()
        if grouped:
            return grouped.replace("{,}", "")
        value = int(whole or 0) + Fraction(int(numerator), int(denominator))
        return str(-value if sign else value)
    try:
        value = math_verify.parse(f"${text}$", **_no_alarm("parsing_timeout"))[0]
    except Exception:  # nothing parsed
        return None
    return str(value) if getattr(value, "is_Rational", False) else None


# ---- the rule judge ------------------------------------------------------------------------------

_LETTER_ANSWER = re.compile(r"\(?([A-Za-z])\)?[.:]?")
_LETTER_PATTERNS = [
    re.compile(r"^\(?([A-Za-z])\)?[.:)]?$"),  # the whole response: "B", "(b)", "B."
    re.compile(r"\(([A-Za-z])\)"),  # "(B)" anywhere
    re.compile(r"^([A-Z])[.:)](?:\s|$)"),  # "B. because ..." at the start
    re.compile(r"^([A-Z]) is\b"),  # "B is correct"
    # "The answer is B" / "answer: b"; a lowercase "a" only where no word follows ("the answer is a circle")
    re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:\-]?\s*\(?([A-Z]|[b-z]|a(?=\W*$))\b"),
]


class RuleJudge:
    """Judges by normalised matching; no model. The question is not used.

    Both texts are normalised (``tokens``): lowercase, punctuation and articles (a/an/the) dropped,
    numbers written one way ("3", "3.0", "three", ".5" / "0.5", "1,000" / "1000" and "one thousand"
    agree: a scale word multiplies the number before it), "grey" = "gray". With ``math_verify`` (below),
    LaTeX numbers in either text are first written as plain numbers: a command with its brace groups, after
    an optional sign and integer, or digits grouped by "{,}", that math_verify reads as an integer or a
    fraction ("\\frac{1}{2}", "\\dfrac{2}{4}", "-\\tfrac{3}{4}", "2\\frac{1}{2}", "1{,}000"; "\\boxed{" stays
    the answer marker of rule 4). The rules then compare, negate and hedge them like any number:
    "$\\boxed{\\frac{1}{2}}$" is right for 0.5, "0.5" for "\\frac{1}{2}"; "not \\frac{1}{2}" and "\\frac{1}{2} or
    \\frac{1}{3}" are wrong.
    The ground-truth answer then picks one rule; the first that applies decides:

    1. letter answer ("A", "(B)", "b."): multiple choice, read from the response as written (so "a"
       counts as the letter A here, though an article elsewhere). The response's letters are read from
       the whole response ("A", "(a)", "A."), "(B)" anywhere, "B." / "B)" / "B is" at its start,
       "answer is B" / "answer is b", "option B", "choice: B" ("answer is a" only where no word follows
       the "a": "the answer is a circle" is no letter). Right iff exactly one distinct letter is found
       and it is the answer's; an empty response has none.
    2. empty response (nothing left once normalised): wrong.
    3. yes/no answer ("yes", "no", "true", "false"): right iff the response contains words of
       exactly one polarity (yes/yeah/yep/true vs no/nope/false) and it is the answer's. "Yes, it
       is." is yes; "There is no triangle." is no; a response with both, or with neither, is wrong.
    4. numeric answer (a single number): the candidates are the numbers after the last answer marker
       ("answer is", "answer:", "=", "\\boxed{", "####") if it is followed by any, else every number in
       the response; numbers negated ("not 3") are dropped. Right iff the candidates are exactly one
       value, equal to the answer's (relative tolerance 1e-6). "3 or 4" is wrong for 3.
    5. anything else (a word or phrase): right iff the response is the answer, or contains the
       answer as a phrase (its last word may be plural) that is
       - not negated: no "not / no / never / neither / nor / without / none" among the 3 words before
         it in the same clause ("not a triangle" is wrong; "not red, but blue" is right for blue);
       - not hedged: not directly beside "or", a comma between them or not ("red or blue", "a dog,
         or maybe a cat");
       - alone in its class: when the answer is a colour or a shape (the closed lists in
         ``_CLASSES``), no other member of that class is named un-negated ("red and blue" is wrong
         for red).
       When nothing in the response could be compared (no occurrence, no number, negated or not) and
       ``math_verify`` is importable, it decides symbolic equivalence ("2\\sqrt{2}" vs "\\sqrt{8}"; an answer
       with LaTeX but no "$" is given to it between "$"s, as it reads LaTeX); it is optional and never
       overrides a rule that found a candidate ("not 7" stays wrong for 7).

    math_verify runs with its timeouts in the main thread and without them in any other (they use SIGALRM,
    which only the main thread can set), so a thread pool gets the same verdicts.

    Limits: a long response that mentions the answer in passing is judged right; number words above twenty that are
    not multiples of ten ("twenty-one") are not read, nor are compounds past a scale word ("one hundred twenty" is
    100 and 20, two numbers); a scale word alone ("a hundred") is no number; yes/no needs an explicit word. Before
    an answer marker only a box's preceding word can negate ("not \\boxed{7}"): "I do not think the answer is 7" and
    "I do not believe x = 7" are right for 7 (the words before "=" are the equation's left-hand side: "students
    without glasses = 7"). LaTeX is read as the number math_verify makes of it only where that is an integer or a
    fraction ("\\frac{6}{3}" is 2, "\\binom{5}{2}" 10, "2\\frac{1}{2}" the mixed number 5/2); what it leaves
    unevaluated is not computed here ("\\sqrt{4}" is the number 4, "2^{3}" the numbers 2 and 3), and without
    math_verify no LaTeX is read ("\\frac{1}{2}" is 1 and 2). A formula answer is compared by its words and
    numbers, not its operators, where the response has them ("y=2x+3" is right for "y = 2x - 3"); only where it
    has not does math_verify decide ("x^2+1" is right for "$1+x^2$").
    """

    def __init__(self, use_math_verify: bool = True):
        self.use_math_verify = use_math_verify and math_verify is not None
        # The identity changes with anything that can change a verdict (the cache key).
        # rule-v3: a negation before an answer marker ("not \\boxed{7}"); math_verify-v3: it reads LaTeX numbers
        # for the rules, and works in threads; -v4: it reads a bare formula answer ("x^2+1")
        self.name = "rule-v3" + ("+math_verify-v4" if self.use_math_verify else "")

    def __call__(self, items: list[JudgeItem]) -> list[bool]:
        """One verdict per item."""
        return [self.check(item.answer, item.response) for item in items]

    def check(self, answer: str, response: str) -> bool:
        """Whether ``response`` agrees with the ground-truth ``answer`` (the rules above)."""
        # Letters are read from the raw text, before tokens() drops "a" as an article ("A", "(a)").
        if _LETTER_ANSWER.fullmatch(answer.strip()):
            letters = {m.upper() for p in _LETTER_PATTERNS for m in p.findall(response.strip())}
            return letters == {_LETTER_ANSWER.fullmatch(answer.strip()).group(1).upper()}
        text = self._read_latex(response)  # for the rules; math_verify's own verdict gets the texts as written
        ans, res = tokens(self._read_latex(answer)), tokens(text)
        if not res:
            return False
        if ans in (["yes"], ["true"], ["no"], ["false"]):
            said = {"yes" for t in res if t in _YES} | {"no" for t in res if t in _NO}
            return said == ({"yes"} if ans[0] in _YES else {"no"})
        if len(ans) == 1 and _number(ans[0]) is not None:
            return self._numeric(_number(ans[0]), text, res, answer)
        return self._phrase(ans, res, answer, response)

    def _read_latex(self, text: str) -> str:
        """``text`` with its LaTeX numbers written as the rules read numbers (``_latex_number``), with
        math_verify."""
        return _LATEX_NUMBER.sub(_latex_number, text) if self.use_math_verify else text

    def _numeric(self, value: float, response: str, res: list[str], answer: str) -> bool:
        marker = list(_ANSWER_MARKER.finditer(response.lower()))
        after = tokens(response[marker[-1].end():]) if marker else []
        after = after[:after.index(_BOUNDARY)] if _BOUNDARY in after else after
        # "not \\boxed{7}": the word before a box may negate it ("x without glasses = 7" is no negation)
        boxed = bool(marker) and marker[-1].group().startswith("\\boxed")
        before = tokens(response[:marker[-1].start()])[-1:] if boxed else None
        candidates = _affirmed_numbers(after, before) or _affirmed_numbers(res)
        if not any(_number(t) is not None for t in res):  # a negated number is one the rules compared
            return self._math_verify(answer, response)
        return len(candidates) == 1 and _close(candidates.pop(), value)

    def _phrase(self, ans: list[str], res: list[str], answer: str, response: str) -> bool:
        if not ans:
            return False
        found = _occurrences(res, ans)
        if not found:
            return self._math_verify(answer, response)
        n = len(ans)
        kept = [i for i in found if not _negated(res, i) and "or" not in _beside(res, i, i + n)]
        if not kept:
            return False
        for members in _CLASSES:
            if n == 1 and ans[0] in members:
                rivals = {_singular(t, members) for i, t in enumerate(res) if not _negated(res, i)}
                return not (rivals & members) - {ans[0]}
        return True

    def _math_verify(self, answer: str, response: str) -> bool:
        if not self.use_math_verify:
            return False
        try:
            # math_verify reads LaTeX between $s (or in \boxed{}); a bare 2\sqrt{2} it would read as 2, a bare
            # x^2+1 not at all.
            bare = "$" not in answer and ("\\" in answer or _BARE_FORMULA.fullmatch(answer.strip()))
            answer = f"${answer}$" if bare else answer
            gold, target = (math_verify.parse(t, **_no_alarm("parsing_timeout")) for t in (answer, response))
            return bool(math_verify.verify(gold, target, **_no_alarm("timeout_seconds")))
        except Exception:  # math_verify raises on unparsable text; that is "not equivalent"
            return False


# ---- caching -------------------------------------------------------------------------------------

def judge_key(name: str, item: JudgeItem) -> str:
    """The cache key of ``item`` under the judge called ``name``: sha256 of the four strings. A lone
    UTF-16 surrogate (a server's reply cut inside an emoji) is hashed as is rather than refused."""
    blob = json.dumps([name, item.question, item.answer, item.response], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8", "surrogatepass")).hexdigest()


class CachedJudge:
    """Wraps ``judge`` so each distinct (question, answer, response) is judged once.

    ``store`` maps ``judge_key`` -> verdict; by default an in-memory dict, or any
    ``MutableMapping[str, bool]`` backed by disk, such as ``judge_store(path)`` (shared by processes).
    Misses of one call go to the inner judge as a single batch, duplicates removed, and are written
    to the store with one ``update`` (one transaction on disk).
    ``misses`` counts the items the inner judge was given, ``hits`` every other item asked about (an
    item repeated within one call is a hit after its first time): hit rate = hits / (hits + misses).
    """

    def __init__(self, judge: Judge, store: MutableMapping[str, bool] | None = None):
        self.judge = judge
        self.name = judge.name
        self.store = {} if store is None else store
        self.hits = 0
        self.misses = 0

    def __call__(self, items: list[JudgeItem]) -> list[bool]:
        """One verdict per item; only items never seen before reach the inner judge."""
        keys = [judge_key(self.name, item) for item in items]
        known, todo = {}, {}
        for k, item in zip(keys, items):
            if k in known or k in todo:
                continue
            verdict = self.store.get(k)  # one look-up (a query, on disk)
            if verdict is None:
                todo[k] = item
            else:
                known[k] = verdict
        if todo:
            fresh = {k: bool(v) for k, v in zip(todo, self.judge(list(todo.values())))}
            self.store.update(fresh)
            known.update(fresh)
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        return [bool(known[k]) for k in keys]

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses) so far (0 before the first call)."""
        return self.hits / max(self.hits + self.misses, 1)
