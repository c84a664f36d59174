"""judges_formula's boundaries and checks (the rule judge's formula matching; tests/test_judge.py holds its
verdicts)."""

from ril_fast.judges_formula import (_MAX_EXPONENTS, _MAX_RUN_CHARS, delimited, formula_form, last_bare_formula,
                                     occurrences, same_shape, too_costly, variable_value)


def test_a_relation_after_an_equals_sign_is_part_of_a_longer_one():
    """F5: "=" may precede a formula holding no relation ("y = 2x + 3" holds "2x + 3"), not one holding one:
    "x = 2" in "y = x = 2" is part of the chain."""
    assert occurrences(formula_form("y = x = 2"), formula_form("x = 2")) == []
    assert occurrences(formula_form("y = 2x + 3"), formula_form("2x+3")) != []


def test_the_run_and_exponent_limits_are_inclusive():
    """F7, F8: a run of exactly _MAX_RUN_CHARS characters and exponents summing to exactly _MAX_EXPONENTS pass."""
    run = "x" + "+1" * ((_MAX_RUN_CHARS - 1) // 2) + "0" * ((_MAX_RUN_CHARS - 1) % 2)  # "x+1+...+10"
    assert len(run) == _MAX_RUN_CHARS and last_bare_formula(f"so {run}") == (3, 3 + _MAX_RUN_CHARS)
    assert last_bare_formula(f"so {run}+1") is None
    assert not too_costly(f"x^{_MAX_EXPONENTS // 2}*x^{_MAX_EXPONENTS // 2}")
    assert too_costly(f"x^{_MAX_EXPONENTS // 2}*x^{_MAX_EXPONENTS // 2 + 1}")


def test_same_shape_needs_a_relation_on_both_sides_and_a_letter_where_the_answer_has_one():
    """F9, F10."""
    assert not same_shape("x + 4", "x + 1 = 3") and not same_shape("x + 1 = 3", "x + 4")
    assert not same_shape("3", "x + 1") and same_shape("y + 1", "x + 1")


def test_delimited_latex_is_left_as_it_is():
    """F12: "$\\frac{1}{2}$" is not wrapped in $s again."""
    assert delimited("$\\frac{1}{2}$") == "$\\frac{1}{2}$"
    assert delimited("\\frac{1}{2}") == "$\\frac{1}{2}$"


def test_variable_value_is_of_the_whole_answer():
    """F13: "x = 2y" and "x = 2 + 3" give their variable no number."""
    assert variable_value("x = 2") == "2" and variable_value(" pH = 7.5 ") == "7.5"
    assert variable_value("x = 2y") is None and variable_value("x = 2 + 3") is None
