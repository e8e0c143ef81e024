"""Strict answer extraction: only the marked final answer counts."""

from fractions import Fraction

import pytest

from dfpo.tasks.answers import answers_match, boxed_contents, extract_choice, extract_final_answer, parse_number


@pytest.mark.parametrize(
    "completion,gold,correct",
    [
        ("So 3 + 4 = 7. The answer is 7.", "7", True),
        ("Therefore the final answer is: 1,234", "1234", True),
        ("#### 72", "72", True),
        ("We get \\boxed{\\frac{3}{4}}", "0.75", True),
        ("We get \\boxed{3/4}", "\\frac{3}{4}", True),
        ("The answer is $18$ dollars.", "18", True),
        ("The answer is 18 eggs. That is all.", "18", True),
        ("Thus \\boxed{-2.50}", "-5/2", True),
        # the right number outside the marked answer earns nothing
        ("7 is what I get at first, but the answer is 8.", "7", False),
        ("3 + 4 = 7", "7", False),
        ("The result: 7", "7", False),
        # several boxed answers that disagree are a hedge
        ("Either \\boxed{7} or \\boxed{8}", "7", False),
        ("\\boxed{7}, so again \\boxed{7}", "7", True),
        # a box beats a later free-text marker, and an empty box is no answer
        ("\\boxed{7} ... the answer is 9", "7", True),
        ("\\boxed{}", "0", False),
        ("", "0", False),
        ("The answer is", "0", False),
        ("The answer is 1,23", "123", False),  # not a thousands separator
    ],
)
def test_verifier_fixtures(completion, gold, correct):
    assert answers_match(extract_final_answer(completion), gold) is correct


def test_boxed_contents_balance_braces():
    assert boxed_contents("a \\boxed{\\frac{1}{2}} b \\fbox{x^{2}}") == ["\\frac{1}{2}", "x^{2}"]
    assert boxed_contents("\\boxed{unclosed") == []


@pytest.mark.parametrize(
    "text,value",
    [("1,234,567", 1234567), ("-3.25", Fraction(-13, 4)), ("\\dfrac{2}{6}", Fraction(1, 3)), ("$5", 5), ("40%", 40)],
)
def test_parse_number(text, value):
    assert parse_number(text) == value


@pytest.mark.parametrize("text", ["x + 1", "1/0", "\\frac{1}{0}", "two", "1,23"])
def test_parse_number_refuses_non_numbers(text):
    assert parse_number(text) is None


@pytest.mark.parametrize(
    "completion,letter",
    [
        ("The answer is (B).", "B"),
        ("the answer is c", "C"),
        ("\\boxed{D}", "D"),
        ("The answer is A) mitochondria", "A"),
        ("The answer is E", None),  # only 4 choices
        ("B is tempting. Answer: C", None),  # no marker the parser accepts
        ("The answer is mitochondria", None),
    ],
)
def test_extract_choice(completion, letter):
    assert extract_choice(completion, num_choices=4) == letter
