"""Strict extraction of a completion's final answer, and comparison with the gold answer.

Only a *marked* final answer counts: ``\\boxed{...}``, "the answer is ...", or ``#### ...`` (GSM8K's marker), in that
order of precedence. A number that appears anywhere else earns nothing, and several boxed answers that disagree are
a hedge and earn nothing either. Format gates correctness: an unmarked completion scores 0 however right its text.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"(?:final\s+)?answer\s+is\s*:?\s*(.+)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*(.+)")
_CHOICE = re.compile(r"^\(?\s*([A-Za-z])\s*\)?(?:[\s.:)]|$)")


def boxed_contents(text: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``, braces balanced, in order."""
    found = []
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found.append(text[start:i].strip())
                break
    return found


def _clean_tail(answer: str) -> str:
    """Cut a free-text answer at the end of its line, and strip closing punctuation and markdown emphasis."""
    answer = answer.strip().splitlines()[0] if answer.strip() else ""
    answer = re.split(r"(?<=[^\d])\.\s|\.\s+[A-Z]", answer)[0]
    return answer.strip().strip("*").rstrip(".").strip()


def extract_final_answer(text: str) -> str | None:
    """The marked final answer of a completion, or ``None`` when there is none (or the boxed answers disagree)."""
    boxed = boxed_contents(text)
    if boxed:
        distinct = {normalize_text(b) for b in boxed}
        return boxed[-1] if len(distinct) == 1 and boxed[-1] else None
    for pattern in (_ANSWER_IS, _HASHES):
        matches = list(pattern.finditer(text))
        if matches:
            answer = _clean_tail(matches[-1].group(1))
            return answer or None
    return None


def extract_choice(text: str, num_choices: int) -> str | None:
    """The marked choice letter (``A``, ``B``, ...) of a multiple-choice completion, or ``None``."""
    answer = extract_final_answer(text)
    if answer is None:
        return None
    match = _CHOICE.match(answer.strip().lstrip("$").replace("\\text{", "").strip())
    if not match:
        return None
    letter = match.group(1).upper()
    return letter if ord(letter) - ord("A") < num_choices else None


def normalize_text(text: str) -> str:
    """Lower case, LaTeX text wrappers and dollar signs removed, whitespace collapsed."""
    text = re.sub(r"\\text\{([^}]*)\}", r"\1", text)
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("\\!", "")
    return " ".join(text.lower().split()).strip(" .")


_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")
_FRAC = re.compile(r"^([+-]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
# A number followed only by words (a unit: "18 eggs", "5 dollars"); anything else is not a plain number.
_NUMBER_WITH_UNIT = re.compile(r"^([+-]?[\d,]*\.?\d+(?:/\d+)?)\s*[a-z%][a-z\s%]*$")


def parse_number(text: str) -> Fraction | None:
    """An exact number from ``text``: integers, decimals, thousands separators (``1,234``), ``a/b``,
    ``\\frac{a}{b}``, a leading ``$`` or trailing ``%``, or a number followed by a unit word. ``None`` otherwise."""
    normalized = normalize_text(text)
    unit = _NUMBER_WITH_UNIT.match(normalized)
    s = unit.group(1) if unit else normalized.replace(" ", "")
    s = s.rstrip("%")
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    frac = _FRAC.match(s)
    if frac:
        sign, num, den = frac.groups()
        a, b = parse_number(num), parse_number(den)
        if a is None or b is None or b == 0:
            return None
        return -(a / b) if sign == "-" else a / b
    try:
        value = Fraction(s)  # accepts "3", "-2.5", "3/4"
    except (ValueError, ZeroDivisionError):
        return None
    return value


def answers_match(predicted: str | None, gold: str) -> bool:
    """Exact numeric equality when both sides are plain numbers, else normalised text equality."""
    if predicted is None:
        return False
    a, b = parse_number(predicted), parse_number(gold)
    if a is not None and b is not None:
        return a == b
    return normalize_text(predicted) == normalize_text(gold)
