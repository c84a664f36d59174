"""Formula answers for the rule judge (its rule 5, in ``ril_fast.judges_rule``): which answers are formulas, one
spelling for formulas (``formula_form``), where an answer occurs in a response other than inside a longer formula,
and a response's last formula written without LaTeX. Plain text work: no math_verify here.
"""

import re
import unicodedata

# A LaTeX brace group, nested up to three deep.
BRACES = r"\{(?:[^{}]|\{(?:[^{}]|\{[^{}]*\})*\})*\}"

# ---- which answers are formulas ------------------------------------------------------------------

# A formula answer: an operator other than a fraction's "/" ("3/4 cup"), a word's hyphen ("T-shirt", "COVID-19",
# "3-D") or a footnote's "*" ("Germany*"): "y = 2x + 3", "x^2+1", "x < 2", "x/2", "x-1", "2x - 3", "a \cdot b",
# "4 - \pi", "C++". A number with a unit is none ("60 km/h", "5 cm^2", "€2.50/kg": the phrase rule reads "60.0").
_LATEX_OPERATOR = r"\\(?:cdot|times|div|leq?|geq?|neq?|leqslant|geqslant|lt|gt|pm)(?![A-Za-z])|[×·⋅÷−≤≥≠±]|\+/-"
_LETTER = r"[A-Za-z](?![A-Za-z])"  # a letter alone, not the start of a word
_FORMULA_ANSWER = re.compile(rf"[=+^<>]|\*(?=\s*[\w(\\{{])|{_LATEX_OPERATOR}|(?<!\d)/|/(?!\d)"
                             rf"|(?<![A-Za-z]){_LETTER}\s*[-−]\s*(?:\d|{_LETTER})"
                             rf"|\d\s*[-−]\s*[a-z](?![A-Za-z])|\d\s+[-−]\s*{_LETTER}|\d\s*[-−]\s+{_LETTER}"
                             rf"|(?:\\[A-Za-z]+|[}}π√∞])\s*[-−]|[-−]\s*\d*(?:\\[A-Za-z]+|[π√∞{{])")
_UNIT = r"[A-Za-z°%]+(?:\^\d)?"
_UNIT_ANSWER = re.compile(rf"[-+]?[$€£¥]?[\d.,]*\d(?:(?:\s+|(?=[A-Za-z°%]{{2}})){_UNIT}|\s*/\s*{_UNIT})"
                          rf"(?:\s*/\s*{_UNIT})*")


def is_formula(answer: str) -> bool:
    """Whether the ground-truth ``answer`` is a formula (see ``_FORMULA_ANSWER``)."""
    return bool(_FORMULA_ANSWER.search(answer)) and not _UNIT_ANSWER.fullmatch(answer.strip())


# ---- one spelling --------------------------------------------------------------------------------

_SPELLING = {r"\cdot": "*", r"\times": "*", "×": "*", "·": "*", "⋅": "*", r"\div": "/", "÷": "/", "−": "-",
             r"\le": "<=", r"\leq": "<=", r"\leqslant": "<=", "≤": "<=", r"\ge": ">=", r"\geq": ">=",
             r"\geqslant": ">=", "≥": ">=", r"\ne": "!=", r"\neq": "!=", "≠": "!=", r"\lt": "<", r"\gt": ">",
             r"\pm": r" \pm ", "±": r" \pm ", "+/-": r" \pm ", r"\dfrac": r"\frac", r"\tfrac": r"\frac",
             "∞": r"\infty", "²": "^2", "³": "^3", "⁺": "^+", "⁻": "^-"}
_SYMBOL = re.compile(rf"{_LATEX_OPERATOR}|\\[dt]frac(?![A-Za-z])|[∞²³⁺⁻]")
# Dress dropped: $s, \( \) \[ \], \left / \right, spacing commands, \displaystyle, markdown's ** and __, backticks.
_NOISE = re.compile(r"\$|\\(?:left|right|displaystyle|quad|qquad)(?![A-Za-z])|\\[,;:! ()\[\]]|\*\*|__|`")
_WRAPPER = re.compile(rf"\\(?:boxed|text|mathrm|mathbf|mathit)\s*({BRACES})")  # \boxed{..}: what it holds
_SCRIPT = re.compile(r"([\^_])\s*\{([^{}]*)\}")  # x^{2} is x^2, 2^{x+1} is 2^(x+1)
# An ion's charge, after an element or a count and before no operand: Na^+ is Na+, SO4^{2-} is SO42-.
_CHARGE = re.compile(r"(?:(?<=[A-Z\d])|(?<=[A-Z][a-z]))\^\{?(\d*[+-])\}?"
                     r"(?![\w({])(?!\s*(?:[\d({\\]|[a-z](?![a-z])))")
_DECIMAL = re.compile(r"(?<![\w.])(\d*)\.(\d+)")  # "7.0" is 7, ".05" is 0.05, "2.50" is 2.5
_OPERATORS = "=+\\-*/^<>!"  # spaced in formula_form (a regex character class)


def _unwrapped(text: str) -> str:
    """``text`` with \\boxed{..}, \\text{..} (and \\mathrm, \\mathbf, \\mathit) replaced by what they hold and a
    script's braces dropped around one token ("x^{2}" is "x^2") or made parentheses ("2^{x+1}" is "2^(x+1)");
    other braces are kept ("\\sqrt{x+1}" is not "\\sqrt{x}+1")."""
    for _ in range(4):  # nested wrappers, up to four deep
        script = _SCRIPT.sub(lambda m: m[1] + (m[2] if re.fullmatch(r"\s*\\?[\w.]+\s*", m[2]) else f"({m[2]})"),
                             text)
        unwrapped = _WRAPPER.sub(lambda m: f" {m[1][1:-1]} ", script)
        if unwrapped == text:
            break
        text = unwrapped
    return text


def undressed(text: str) -> str:
    """``text`` without the dress ``formula_form`` drops (LaTeX's $s, \\left / \\right, spacing commands, markdown's
    ** and __, backticks), \\boxed{..} and \\text{..} unwrapped (``_unwrapped``); case, spacing and spellings
    kept: "**B**" is "B", "$\\boxed{B}$" is " B " (a wrapper's content is spaced)."""
    return _unwrapped(_NOISE.sub("", text))


def _decimal(match: re.Match) -> str:
    whole, fraction = match[1] or "0", match[2].rstrip("0")
    return f"{whole}.{fraction}" if fraction else whole


def formula_form(text: str) -> str:
    """``text`` written one way for comparing formulas: Unicode compatibility forms as their plain characters
    (fullwidth "＝"); LaTeX's $s, \\left / \\right, spacing commands, markdown's ** and __ dropped; \\boxed{..} and
    \\text{..} unwrapped; a script's braces dropped around one token (others kept); an ion's charge without its
    "^" ("Na^+" is "Na+"); then lowercase; \\cdot, \\times, ×, · as "*", \\div and ÷ as "/", "−" as "-", \\le, \\ge,
    \\ne (≤ ≥ ≠, \\leqslant, \\geqslant) as "<=", ">=", "!=", \\lt and \\gt as "<" and ">", ± and +/- as \\pm, ∞ as
    \\infty, \\dfrac / \\tfrac as \\frac, ² ³ as ^2 ^3; "x" between two numbers as "*" ("1920x1080"); decimals
    without trailing zeros ("7.0" is "7", ".05" is "0.05"), without thousands separators; one space around each
    operator character (so "<=" is "< ="), after a comma and between words, none inside parentheses, none between
    a number (or a closing brace) and a lone letter (a "*" between them dropped): "$y=2 x^{2} \\cdot 3$" is
    "y = 2x ^ 2 * 3", "**y = 2·x**" is "y = 2x"."""
    text = unicodedata.normalize("NFKC", _SYMBOL.sub(lambda m: _SPELLING[m.group()], text))
    text = _unwrapped(_CHARGE.sub(r"\1", _NOISE.sub("", text)).lower())
    text = _DECIMAL.sub(_decimal, re.sub(r"(?<=\d)\s*x\s*(?=\d)", "*", text))
    text = re.sub(r",(?!\d{3}(?!\d))", ", ", re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text))  # 1,000 is 1000
    text = re.sub(rf"([{_OPERATORS}])", r" \1 ", text)
    text = re.sub(r"\( | \)", lambda m: m.group().strip(), " ".join(text.split()))
    return re.sub(r"(?<=[\d}]) (?:\* )?(?=[a-z](?![a-z]))", "", text)  # "2 x", "2 * x" are "2x"; "3 is" stays


# ---- occurrences ---------------------------------------------------------------------------------

# What may not touch a formula's occurrence on either side, lest it be part of a longer formula ("y = 2x + 3" in
# "y = 2x + 3x", "z - y = 2x + 3", "(x - 1)^2", "\sin x + 1", "0.5x + 3", "\frac{x+1}{2}", "|x+1|", "x = 2\sqrt{2}"):
# a letter, digit, decimal point, LaTeX command, brace, bracket or bar, or an operator past a space, opening
# parentheses between them or not (closing ones after). A "." after it only before a digit. "=" may come before a
# formula that holds no relation ("y = 2x + 3" holds the answer "2x+3"), "<=", ">=", "!=" may not.
# The operator characters include those formula_form spells otherwise: a raw response is checked too.
_OPERATOR_CHARS = rf"[{_OPERATORS}×·⋅÷−≤≥≠±]"
_BEFORE = re.compile(rf"(?:[\w\\)}}{{\[|]|\d\.|\\[A-Za-z]+ |{_OPERATOR_CHARS} ?)\(*$")  # on the 20 characters before
_BEFORE_EQUALS = re.compile(r"(?<![<>!=] )(?<![<>!=])= ?\(*$")
_AFTER = re.compile(rf"\)*(?:[\w(\\{{}}\[\]|]| ?(?:{_OPERATOR_CHARS}|\\[A-Za-z]))|\.\d")
_RELATION = re.compile(r"[=<>]")  # in formula_form: = < > <= >= !=


def _joined(text: str, start: int, end: int, equals_may_precede: bool = False) -> bool:
    """Whether ``text[start:end]`` is part of a longer formula (``_BEFORE``, ``_AFTER``)."""
    before = text[max(0, start - 20):start]
    if _BEFORE.search(before) and not (equals_may_precede and _BEFORE_EQUALS.search(before)):
        return True
    return bool(_AFTER.match(text, end))


def occurrences(text: str, formula: str) -> list[tuple[int, int]]:
    """The (start, end) of each occurrence of ``formula`` in ``text`` (both ``formula_form``) that is not part of
    a longer formula. Linear in ``len(text)`` times the number of occurrences' 20-character contexts."""
    spans, start = [], text.find(formula)
    equals_may_precede = not _RELATION.search(formula)
    while start >= 0 and formula:
        end = start + len(formula)
        if not _joined(text, start, end, equals_may_precede):
            spans.append((start, end))
        start = text.find(formula, start + 1)
    return spans


# ---- formulas written without LaTeX --------------------------------------------------------------

# Operands (a number, a number times one letter "2x", one letter) joined by operators, a parenthesis allowed on
# either side of an operand ("y = 3 + 2x", "(x+1)^2", "x <= -2"). A run starts at its first "(" (linear time).
_OPERAND = rf"\(*-?(?:(?<![\d.])\d+(?:\.\d+)?(?:{_LETTER})?|(?<![A-Za-z\\]){_LETTER})\)*"
_BARE_RUN = re.compile(rf"(?<!\(){_OPERAND}(?:\s*(?:[<>!]=|[=+\-*/^<>])\s*{_OPERAND})+")
_MAX_RUN_CHARS = 300  # math_verify takes seconds on a formula of thousands of characters ...
_MAX_EXPONENTS = 40  # ... and minutes on (x+1)^99*(x-1)^99*..., forever on 9^9^9^9, 9^{9^{9}} or 2^1000000
_TOWER = re.compile(r"\^\s*[({]*\s*[-\w.]*\s*\^|\^\s*[({]*\s*\d{3,}")
_EXPONENT = re.compile(r"\^\s*[({]*\s*(\d+)")


def too_costly(text: str) -> bool:
    """Whether math_verify may take minutes or forever on ``text``: a power tower, an exponent of three digits or
    more, or exponents summing to more than ``_MAX_EXPONENTS``. Off the main thread it runs without a timeout."""
    return bool(_TOWER.search(text)) or sum(int(e) for e in _EXPONENT.findall(text)) > _MAX_EXPONENTS


def last_bare_formula(response: str) -> tuple[int, int] | None:
    """The span of ``response``'s last formula written without LaTeX (``_BARE_RUN``), or None where there is none,
    it is part of a longer one ("2(x+1)", "\\sin x + 1", "$x = 2 \\times 5$"), or it is too long or costly for
    math_verify."""
    run = None
    for run in _BARE_RUN.finditer(response):
        pass
    if run is None or len(run.group()) > _MAX_RUN_CHARS or too_costly(run.group()):
        return None
    return None if _joined(response, *run.span()) else run.span()


def same_shape(run: str, formula: str) -> bool:
    """Whether the formula ``run`` (``formula_form``) may be compared with the answer ``formula``: both a relation
    or neither, with the same left-hand side where the answer's is one letter ("z = 2x + 3", "3x = 2" are not
    "y = 2x + 3", "x = 2"), a letter where the answer has one."""
    if bool(_RELATION.search(run)) != bool(_RELATION.search(formula)):
        return False
    if re.search("[a-z]", formula) and not re.search("[a-z]", run):
        return False
    lhs = _RELATION.split(formula, 1)[0].strip()
    return not (_RELATION.search(formula) and re.fullmatch("[a-z]", lhs) and _RELATION.split(run, 1)[0].strip() != lhs)


# ---- the rest --------------------------------------------------------------------------------------

def latex_command(not_named: str = "") -> str:
    """The pattern of a LaTeX command with its brace groups (nested up to three deep), after an optional sign and
    integer ("\\frac{1}{2}", "-\\dfrac{3}{4}", "2\\frac{1}{2}"), other than the commands ``not_named`` (a
    lookahead, e.g. ``r"(?!boxed\\b)"``). (?<!\\d): a match starts at the first digit of a run (linear time on
    long digit runs)."""
    return r"-?(?<!\d)\d*\\" + not_named + r"[A-Za-z]+(?:" + BRACES + ")+"


_VARIABLE_VALUE = re.compile(r"[A-Za-z]\w{0,19}\s*=\s*(-?(?:\d+(?:\.\d+)?|\.\d+))")  # "x = 2", "AB = 6", "pH = 7"
_LATEX = re.compile(r"\$|\\[A-Za-z(\[]")
_DELIMITED = re.compile(r"\$|\\[(\[]|\\boxed\b")  # LaTeX math_verify reads; it reads no other ...
_LATEX_FRAGMENT = re.compile(latex_command())  # ... so these are put between $s


def variable_value(answer: str) -> str | None:
    """The number an answer "x = 2" (a name, "=", a number) gives its variable, else None."""
    match = _VARIABLE_VALUE.fullmatch(answer.strip())
    return match[1] if match else None


def has_latex(text: str) -> bool:
    """Whether ``text`` holds LaTeX: a "$" or a command."""
    return bool(_LATEX.search(text))


def delimited(text: str) -> str:
    """``text`` with its LaTeX readable by math_verify: as it is where it has $s, \\( \\), \\[ \\] or \\boxed, else
    each command with its brace groups between $s ("\\frac{\\pi}{2}" is "$\\frac{\\pi}{2}$")."""
    return text if _DELIMITED.search(text) else _LATEX_FRAGMENT.sub(r"$\g<0>$", text)
