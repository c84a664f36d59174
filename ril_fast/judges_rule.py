"""The rule judge: a correctness verdict by normalised matching, no model (``RuleJudge``).

``ril_fast.judge`` picks it (``judge=rule``, the default) and holds the interface every judge shares. The
rules are in ``RuleJudge``'s docstring; ``math_verify`` (the optional ``math`` extra, which
scripts/setup.sh installs) reads LaTeX numbers for them and decides symbolic equivalence where they find
nothing to compare.
"""

import functools
import math
import re
import threading
from fractions import Fraction
from typing import TYPE_CHECKING

try:  # optional: reads LaTeX numbers for the rules, and decides symbolic equivalence where they find nothing
    import math_verify
except ImportError:
    math_verify = None

from ril_fast.judges_formula import (delimited, formula_form, has_latex, is_formula, last_bare_formula, latex_command,
                                     occurrences, same_shape, too_costly, undressed, variable_value)

if TYPE_CHECKING:
    from ril_fast.judge import JudgeItem

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
# Minus signs other than "-" before a number or a LaTeX command: the minus sign, figure and en dashes, small and
# fullwidth hyphen-minus ("−5" is -5). Written "-", they read as "-" does: "2–3" is 2 and 3, as "2-3" is.
_MINUS_SIGNS = re.compile(r"[\u2012\u2013\u2212\ufe63\uff0d](?=\.?\d|\\[A-Za-z])")


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


def _minus_signs(text: str) -> str:
    """``text`` with the minus signs of ``_MINUS_SIGNS`` before a number (or a LaTeX command) written "-"."""
    return _MINUS_SIGNS.sub("-", text)


def tokens(text: str) -> list[str]:
    """Normalised tokens of ``text``: lowercase, contractions expanded ("isn't" -> "is not"),
    thousands separators dropped ("1,000" -> "1000"), articles dropped, minus signs as "-" ("−5" -> "-5"),
    numbers canonical ("three", "3.0" -> "3", ".5" -> "0.5"), a number followed by a scale word folded into one
    ("two hundred", "2 hundred" -> "200"), "percent" after a number dropped as "%" is ("15 percent", "15%" ->
    "15"), other punctuation dropped except clause punctuation, which becomes "|"."""
    text = _minus_signs(text).lower().replace("\u2019", "'")
    text = re.sub(r"n't\b", " not", text)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    out = []
    for tok in _TOKEN.findall(text):
        if tok in ",.;:!?":
            if out and out[-1] != _BOUNDARY:
                out.append(_BOUNDARY)
        elif tok in _SCALES and out and _number(out[-1]) is not None:
            out[-1] = _canonical(str(_number(out[-1]) * _SCALES[tok]))
        elif tok == "percent" and out and _number(out[-1]) is not None:
            continue
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
def _installed(package: str) -> str:
    """The installed version of ``package`` (a distribution name), or "unknown" where its metadata is missing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


# A LaTeX number the rules cannot read: a command with its brace groups ("\frac{1}{2}", "-\dfrac{3}{4}",
# "2\frac{1}{2}"), or digits grouped by "{,}" ("1{,}000"). \boxed is not one: it is an answer marker to the
# rules, and what it holds is read on its own.
_LATEX_NUMBER = re.compile(latex_command(r"(?!boxed\b)") + r"|(?<!\d)\d{1,3}(?:\{,\}\d{3})+")
# The common ones, read here as math_verify reads them (a test checks they agree), without its ~1 ms a parse:
# [-][whole]\frac{a}{b} (also \dfrac, \tfrac; a whole part makes a mixed number; a, b > 0: math_verify reads
# "2\frac{0}{5}" as the product 2·0, no number) and digits grouped by "{,}".
# A bare formula as a ground-truth answer ("x^2+1", "y=2x+3"): math_verify reads it only between $s.
_BARE_FORMULA = re.compile(r"[\w\s.,()^=+\-*/<>]*[\^=+*/<>][\w\s.,()^=+\-*/<>]*")
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")  # a command's name: no word of the answer's (rule 6)
_TEXT_WORDS = re.compile(r"\\(?:text|textrm|mathrm|mbox)\{([^{}]*)\}")  # words set in a formula ("3\\text{ cm}")
_SIMPLE_LATEX = re.compile(r"(-?)(\d*)\\[dt]?frac\{(\d*[1-9]\d*)\}\{(\d*[1-9]\d*)\}|(\d{1,3}(?:\{,\}\d{3})+)")


def _no_alarm(option: str) -> dict:
    """math_verify's keyword argument ``option`` (``parse``'s ``parsing_timeout``, ``verify``'s
    ``timeout_seconds``) set to None outside the main thread: its timeouts use SIGALRM, which only the main
    thread can set, so elsewhere every call fails ("not equivalent"). The main thread keeps its timeouts,
    against pathological inputs."""
    return {} if threading.current_thread() is threading.main_thread() else {option: None}


def _latex_number(match: re.Match) -> str:
    """The LaTeX number ``match`` written as the integer or fraction math_verify reads there (" -3/4 " for
    "-\\frac{3}{4}", spaced to be a token of its own), with the words of its ``\\text{..}`` (a unit math_verify
    drops: "3\\text{ cm}" is " 3 cm ", not 3), else as it is ("\\frac{a}{b}", "\\text{cm}")."""
    value = _latex_value(match.group())
    if value is None:
        return match.group()
    return f" {value} {' '.join(_TEXT_WORDS.findall(match.group()))} "


@functools.lru_cache(maxsize=4096)  # a response's fragments recur across a group's samples and steps
def _latex_value(text: str) -> str | None:
    """The integer or fraction math_verify reads in the LaTeX ``text`` ("-3/4", "1000"), or None. Simple
    fractions and grouped digits are read here (``_SIMPLE_LATEX``). What math_verify leaves unevaluated
    ("\\sqrt{4}") is not evaluated here: that can take forever ("10^{10^{10^{10}}}")."""
    try:
        if simple := _SIMPLE_LATEX.fullmatch(text):
            sign, whole, numerator, denominator, grouped = simple.groups()
            if grouped:
                return grouped.replace("{,}", "")
            value = int(whole or 0) + Fraction(int(numerator), int(denominator))
            return str(-value if sign else value)
        value = math_verify.parse(f"${text}$", **_no_alarm("parsing_timeout"))[0]
        return str(value) if getattr(value, "is_Rational", False) else None
    except Exception:  # nothing parsed, or too many digits to read or write (a run of 5,000 digits)
        return None


# ---- formula answers (rule 5; the text work is ril_fast.judges_formula's) --------------------

@functools.lru_cache(maxsize=1024)
def _evaluated(formula: str) -> str | None:
    """The number the formula without letters ``formula`` evaluates to, as math_verify reads it ("200000" for
    "2 \\times 10^5", "0.0015" for "1.5 \\times 10^{-3}"), else None. Not for what ``too_costly`` names."""
    try:
        value = math_verify.parse(f"${formula}$", **_no_alarm("parsing_timeout"))[0].doit()
        if getattr(value, "is_Rational", False):
            return str(value)
        return repr(float(value)) if getattr(value, "is_Float", False) else None
    except Exception:  # nothing parsed, nothing to evaluate, or too many digits to write
        return None


def _affirmed(text: str, start: int, end: int) -> bool:
    """Whether ``text[start:end]`` is neither negated (a negation word among the 3 before it, in its clause) nor
    hedged (beside "or"). Only the 100 characters on either side are read (a response can hold thousands of
    matches)."""
    placeholder = "qqmatchqq"  # one token where the match is, so clause marks on either side are kept
    before = tokens(f"{text[max(0, start - 100):start]} {placeholder}")[:-1]
    context = [*before, placeholder, *tokens(f"{placeholder} {text[end:end + 100]}")[1:]]
    return not _negated(context, len(before)) and "or" not in _beside(context, len(before), len(before) + 1)


def _left_to_math_verify(answer: str, res: list[str]) -> bool:
    """Whether rule 6 leaves the phrase ``answer``, found nowhere in the response (tokens ``res``), to math_verify:
    where it holds LaTeX, which the rules read as words ("2\\sqrt{2}" is 2, "sqrt", 2), and none of its words
    outside LaTeX commands is missing from the response (the unit of "3\\text{ cm}"); or where it holds no word and
    the response no number (nothing to compare). A plain answer the rules read whole: a word it has and the response
    lacks ("3 cm" for "3 m", "2:30 PM" for "2:30") or another number ("3:1" for "3:2") is wrong. math_verify would
    read only the first number of each ("3 cm" and "3 m" are both 3)."""
    words = [t for t in tokens(_LATEX_COMMAND.sub(" ", answer)) if t != _BOUNDARY and _number(t) is None]
    if has_latex(answer):
        return all(w in res or w + "s" in res for w in words)
    return not words and not any(_number(t) is not None for t in res)


# ---- the rule judge ------------------------------------------------------------------------------

_LETTER_ANSWER = re.compile(r"\(?([A-Za-z])\)?[.:]?")
_EMPHASIS = re.compile(r"[*_]")  # markdown's *italic* and _italic_ (undressed drops ** and __)
_LETTER_PATTERNS = [
    re.compile(r"^[ \t]*\(?([A-Za-z])\)?[.:)]?[ \t]*$", re.M),  # a line of its own: "B", "(b)", "B." ("B\n\nBecause")
    re.compile(r"\(([A-Za-z])\)"),  # "(B)" anywhere
    re.compile(r"^([A-Z])[.:)](?:\s|$)", re.M),  # "B. because ..." at a line's start (a list of options names all)
    re.compile(r"^([A-Z]) is\b"),  # "B is correct"
    re.compile(r"(?:\bis|['\u2019]s)\s+\(?([A-Z])\)?[.!]?$"),  # "It is B." / "It's B" at the end (capital: "is a")
    # "The answer is B" / "answer: b"; a lowercase "a" only where no word follows ("the answer is a circle")
    re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*[:\-]?\s*\(?([A-Z]|[b-z]|a(?=\W*$))\b"),
]


class RuleJudge:
    """Judges by normalised matching; no model. The question is not used.

    Both texts are normalised (``tokens``): lowercase, punctuation and articles (a/an/the) dropped,
    numbers written one way ("3", "3.0", "three", ".5" / "0.5", "1,000" / "1000" and "one thousand"
    agree: a scale word multiplies the number before it; "15%" and "15 percent" are 15; a minus sign, en dash or
    fullwidth hyphen-minus before a digit is "-": "−5" is -5), "grey" = "gray". With ``math_verify`` (below),
    LaTeX numbers in either text are first written as plain numbers: a command with its brace groups, after
    an optional sign and integer, or digits grouped by "{,}", that math_verify reads as an integer or a
    fraction ("\\frac{1}{2}", "\\dfrac{2}{4}", "-\\tfrac{3}{4}", "2\\frac{1}{2}", "1{,}000"; "\\boxed{" stays
    the answer marker of rule 4). The rules then compare, negate and hedge them like any number:
    "$\\boxed{\\frac{1}{2}}$" is right for 0.5, "0.5" for "\\frac{1}{2}"; "not \\frac{1}{2}" and "\\frac{1}{2} or
    \\frac{1}{3}" are wrong.
    The ground-truth answer then picks one rule; the first that applies decides:

    1. letter answer ("A", "(B)", "b."): multiple choice, read from the response as written (so "a"
       counts as the letter A here, though an article elsewhere), its markdown emphasis and LaTeX dress
       dropped ("**B**", "*B*", "$\\boxed{B}$", "\\text{B}" are "B": ``judges_formula.undressed``). The
       response's letters are read from a line of its own ("A", "(a)", "A."; "B\n\nBecause ..."), "(B)"
       anywhere, "B." / "B)" at a line's start (a list of options names each), "B is" at its start, "is B." /
       "'s B" at its end,
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
    5. formula answer (``judges_formula.is_formula``: an operator other than a fraction's "/", a word's hyphen or a
       footnote's "*": "y = 2x + 3", "x^2+1", "x < 2", "x-1", "4 - \\pi", "C++"; a number with a unit, "60 km/h",
       "5 cm^2", "€2.50/kg", is a phrase): both texts are written one way (``judges_formula.formula_form``:
       spacing, case, markdown's bold, LaTeX's $s and \\boxed{}, spellings such as \\cdot / × for *, \\le / ≤
       for <=, decimals, a script's braces around one token, an ion's charge), and the answer's occurrences in
       the response that are not part of a longer formula ("y = 2x + 3x", "z - y = 2x + 3", "(x-1)^2", "2(x+1)",
       "\\sin x + 1", "\\frac{x+1}{2}", "|x+1|", "0.5x + 3") are its candidates; where there are none, the
       response's last formula written without LaTeX ("y = 3 + 2x") where it has the answer's shape (a relation or
       not, the same one-letter left-hand side) and math_verify finds it equivalent. Right iff a candidate is
       neither negated nor hedged (as in rule 6). With no candidate: math_verify decides on the response's LaTeX
       alone ("$1 + x^2$", "\\frac{x}{2}"; not the plain "2" of "$x = 3$, one of 2 roots"); without LaTeX, an
       answer "x = 2" (a name, "=", a number) is the number 2 where the response writes no relation and no "^"
       ("The answer is 2."; "x < 2" is wrong), and one without letters the number it evaluates to ("2 \\times
       10^5" is 200000, with math_verify); else wrong. Operators count: "y = 2x - 3" is wrong for "y=2x+3", "x < 2"
       for "x > 2".
    6. anything else (a word or phrase): right iff the response is the answer, or contains the
       answer as a phrase (its last word may be plural) that is
       - not negated: no "not / no / never / neither / nor / without / none" among the 3 words before
         it in the same clause ("not a triangle" is wrong; "not red, but blue" is right for blue);
       - not hedged: not directly beside "or", a comma between them or not ("red or blue", "a dog,
         or maybe a cat");
       - alone in its class: when the answer is a colour or a shape (the closed lists in
         ``_CLASSES``), no other member of that class is named un-negated ("red and blue" is wrong
         for red).
       With no occurrence, ``math_verify`` (where importable) decides symbolic equivalence only where the rules
       cannot read the answer: it holds LaTeX ("2\\sqrt{2}" vs "\\sqrt{8}"; an answer with LaTeX but no "$" is
       given to it between "$"s, as it reads LaTeX) and none of its words outside LaTeX commands is missing from
       the response, or it holds no word and the response no number (``_left_to_math_verify``). A plain answer
       not found is wrong: "3 cm" for "3 m", "2:30 PM" for "2:45 PM", "3:1" for "3:2" (math_verify reads only
       their first numbers). It is optional and never overrides a rule that found a candidate ("not 7" stays
       wrong for 7).

    math_verify runs with its timeouts in the main thread and without them in any other (they use SIGALRM,
    which only the main thread can set), so a thread pool gets the same verdicts, except on what makes it time out:
    formulas known to take it minutes or forever (``judges_formula.too_costly``: power towers, exponents of three
    digits or summing past 40) are not given to it in rule 5; elsewhere a thread waits for it.

    Limits: a long response that mentions the answer in passing is judged right; number words above twenty that are
    not multiples of ten ("twenty-one") are not read, nor are compounds past a scale word ("one hundred twenty" is
    100 and 20, two numbers); a scale word alone ("a hundred") is no number; yes/no needs an explicit word. Before
    an answer marker only a box's preceding word can negate ("not \\boxed{7}"): "I do not think the answer is 7" and
    "I do not believe x = 7" are right for 7 (the words before "=" are the equation's left-hand side: "students
    without glasses = 7"). LaTeX is read as the number math_verify makes of it only where that is an integer or a
    fraction ("\\frac{6}{3}" is 2, "\\binom{5}{2}" 10, "2\\frac{1}{2}" the mixed number 5/2); what it leaves
    unevaluated is not computed here ("\\sqrt{4}" is the number 4, "2^{3}" the numbers 2 and 3), and without
    math_verify no LaTeX is read ("\\frac{1}{2}" is 1 and 2). A formula written without LaTeX is read by
    math_verify only as operands joined by operators (numbers, one letter, a number times one letter), and only a
    response's last one: "x/2" is not found in "0.5x", "x = 2.0" is right for "x=2" only with math_verify;
    without math_verify a formula must be written as the answer is (spacing, case and LaTeX aside). A formula's
    negation is read only from the words before it: "x > 2 is false" is right for "x > 2". LaTeX outside $s
    is read as its commands alone: "y = \\frac{1}{2}x + 1" is not found right for "y = 0.5x + 1". A response
    "A+" is empty once normalised ("a" is an article): rule 2 finds it wrong, also for the answer "A+". A letter
    response that goes on to discuss other options at a line's start ("B\n\nA. is too small") names them: wrong; a
    letter mid-sentence is not read ("It is B, not C." names none: wrong).
    """

    def __init__(self, use_math_verify: bool = True):
        self.use_math_verify = use_math_verify and math_verify is not None
        # The identity changes with anything that can change a verdict (the cache key).
        # rule-v3: a negation before an answer marker ("not \\boxed{7}"); -v4: formula answers keep their
        # operators (rule 5); -v5: rule 5 reads markdown, parentheses, units, spellings, a variable's value.
        # math_verify-v3: it reads LaTeX numbers for the rules, and works in threads; -v4: it reads a bare formula
        # answer ("x^2+1"); -v5: it reads a response's formulas written without LaTeX; -v6: only its last one, of
        # the answer's shape, and LaTeX outside $s.
        # rule-v6: letters undressed ("**B**", "\\boxed{B}") and on any line, minus signs "−5", "15 percent";
        # math_verify-v7: rule 6 gives it only answers the rules cannot read ("3 cm" is not "3 m").
        # rule-v7: a letter after "is" / "'s" at a response's end ("It is B."); math_verify-v8: a LaTeX number keeps
        # its \\text{} unit ("3\\text{ cm}" is not 3). The math-verify package's own version follows "@": its
        # releases can change verdicts too. tests/test_judge.py's golden table holds these names.
        self.name = "rule-v7" + (f"+math_verify-v8@{_installed('math-verify')}" if self.use_math_verify else "")

    def __call__(self, items: "list[JudgeItem]") -> list[bool]:
        """One verdict per item."""
        return [self.check(item.answer, item.response) for item in items]

    def check(self, answer: str, response: str) -> bool:
        """Whether ``response`` agrees with the ground-truth ``answer`` (the rules above)."""
        # Letters are read from the raw text, before tokens() drops "a" as an article ("A", "(a)").
        if _LETTER_ANSWER.fullmatch(answer.strip()):
            text = _EMPHASIS.sub("", undressed(response)).strip()  # "**B**", "\\boxed{B}", "$\\text{B}$" are "B"
            letters = {m.upper() for p in _LETTER_PATTERNS for m in p.findall(text)}
            return letters == {_LETTER_ANSWER.fullmatch(answer.strip()).group(1).upper()}
        answer, response = _minus_signs(answer), _minus_signs(response)  # "−5" is -5 to every rule
        text = self._read_latex(response)  # for the rules; math_verify's own verdict gets the texts as written
        ans, res = tokens(self._read_latex(answer)), tokens(text)
        if not res:
            return False
        if ans in (["yes"], ["true"], ["no"], ["false"]):
            said = {"yes" for t in res if t in _YES} | {"no" for t in res if t in _NO}
            return said == ({"yes"} if ans[0] in _YES else {"no"})
        if len(ans) == 1 and _number(ans[0]) is not None:
            return self._numeric(_number(ans[0]), text, res, answer)
        if is_formula(answer):
            return self._formula(answer, response)
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
            return _left_to_math_verify(answer, res) and self._math_verify(answer, response)
        n = len(ans)
        kept = [i for i in found if not _negated(res, i) and "or" not in _beside(res, i, i + n)]
        if not kept:
            return False
        for members in _CLASSES:
            if n == 1 and ans[0] in members:
                rivals = {_singular(t, members) for i, t in enumerate(res) if not _negated(res, i)}
                return not (rivals & members) - {ans[0]}
        return True

    def _formula(self, answer: str, response: str) -> bool:
        text, formula = formula_form(response), formula_form(answer)
        if spans := occurrences(text, formula):
            return any(_affirmed(text, *span) for span in spans)
        if span := self._equivalent_last_run(formula, answer, response):
            return _affirmed(response, *span)
        if has_latex(response):  # math_verify reads LaTeX only, not the last plain number ("... of the 2 roots")
            return not too_costly(response) and self._math_verify(answer, delimited(response), latex_only=True)
        # The answer's value, where the response writes no formula: "The answer is 2." for "x=2", "200000" for
        # "2 \times 10^5" (but "x < 2" is not "x = 2").
        if (value := variable_value(answer)) is not None and not re.search(r"[=<>^]", text):
            return self.check(value, response)
        if self.use_math_verify and not too_costly(answer) and (value := _evaluated(answer.strip())):
            return self.check(value, response)
        return False

    def _equivalent_last_run(self, formula: str, answer: str, response: str) -> tuple[int, int] | None:
        """The span of ``response``'s last formula written without LaTeX (``last_bare_formula``) where it has the
        shape of the answer (``formula``: ``same_shape``) and math_verify finds it equivalent; None without
        math_verify. Only the last: an equivalent formula met on the way ("x + 3 = 8 so x = 6" holds "x = 5") is
        no answer."""
        if not self.use_math_verify or (span := last_bare_formula(response)) is None:
            return None
        run = response[span[0]:span[1]]
        return span if same_shape(formula_form(run), formula) and self._math_verify(answer, f"${run}$") else None

    def _math_verify(self, answer: str, response: str, latex_only: bool = False) -> bool:
        """Whether math_verify finds ``response`` equivalent to ``answer``; with ``latex_only`` it reads only the
        response's LaTeX (by default also plain numbers and expressions: its last plain number, where it has no
        LaTeX)."""
        if not self.use_math_verify:
            return False
        try:
            # math_verify reads LaTeX between $s (or in \boxed{}); a bare 2\sqrt{2} it would read as 2, a bare
            # x^2+1 not at all.
            bare = "$" not in answer and ("\\" in answer or _BARE_FORMULA.fullmatch(answer.strip())
                                           or is_formula(answer))
            answer = f"${answer}$" if bare else answer
            gold = math_verify.parse(answer, **_no_alarm("parsing_timeout"))
            configs = {"extraction_config": [math_verify.LatexExtractionConfig()]} if latex_only else {}
            target = math_verify.parse(response, **configs, **_no_alarm("parsing_timeout"))
            return bool(math_verify.verify(gold, target, **_no_alarm("timeout_seconds")))
        except Exception:  # math_verify raises on unparsable text; that is "not equivalent"
            return False
