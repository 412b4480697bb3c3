"""Math reward: extract the final answer, normalise it, compare with the reference exactly.

Self-contained on purpose: no sympy `eval` of model text in the trainer's process (parsing
untrusted strings with sympify runs Python), no signal-based timeouts (unsafe off the main thread).
Numbers compare as exact rationals, so 1/2, 0.5, \\frac{1}{2}, \\dfrac12 and 50\\% of 1 agree
(percent signs are dropped: "50\\%" equals 50). Anything else compares as a normalised string
(whitespace, \\left/\\right, spacing commands, \\text wrappers and units removed).
"""

from __future__ import annotations

import re
from fractions import Fraction

from joyai_megatron.rl.rewards.registry import register_reward
from joyai_megatron.rl.rewards.think_format import strip_reasoning

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"(?:final answer|answer)\s*(?:is|:)\s*(?P<answer>[^\n]+)", re.IGNORECASE)
_NUMBER_TOKEN = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_REMOVE = [r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", r"\ ", "~", r"\$", "$"]
_DEGREES_PERCENT = re.compile(r"\^\s*\{?\\circ\}?|\\circ|\\%|%")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_TRAILING_UNITS = re.compile(r"^(?P<value>\S.*?)\s+[a-zA-Z]+(?:\^\d)?(?:\s+[a-zA-Z]+(?:\^\d)?)*$")
_ASSIGNMENT = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(?P<rhs>.+)$")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?$", re.IGNORECASE)
_FRAC = re.compile(
    r"^(?P<sign>[+-]?)\\frac\s*(?:\{(?P<num>[^{}]+)\}|(?P<num1>\d))\s*(?:\{(?P<den>[^{}]+)\}|(?P<den1>\d))$"
)
_SLASH = re.compile(r"^(?P<num>[+-]?[\d.]+)/(?P<den>[+-]?[\d.]+)$")
_LETTER_CHOICE = re.compile(r"^\(?(?P<letter>[A-Za-z])\)?$")
_MAX_ANSWER_CHARS = 1000  # a final answer is short; longer text is not graded (and costs no regex time)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced; None if absent."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for pos in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[pos], 0)
        if depth == 0:
            return text[start:pos]
    return None


def extract_answer(response: str) -> str | None:
    """The final answer after any reasoning block: last \\boxed{}, else the last "answer is X" /
    "Answer: X", else the last number in the text; None when there is nothing to grade."""
    text = strip_reasoning(response)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    stated = list(_ANSWER_IS.finditer(text))
    if stated:
        return stated[-1]["answer"]
    numbers = _NUMBER_TOKEN.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Canonical string form: LaTeX noise, units, trailing periods, `x =` prefixes removed."""
    text = answer.strip().replace("\u2212", "-").replace(r"\dfrac", r"\frac").replace(r"\tfrac", r"\frac")
    for token in _REMOVE:
        text = text.replace(token, " " if token in (r"\ ", "~") else "")
    text = _DEGREES_PERCENT.sub("", text)
    text = _TEXT_WRAPPER.sub(lambda m: f" {m[1]}", text).strip().rstrip(".").strip()
    assignment = _ASSIGNMENT.match(text)
    if assignment:
        text = assignment["rhs"].strip()
    units = _TRAILING_UNITS.match(text)
    if units and parse_number(re.sub(r"\s+", "", units["value"])) is not None:
        text = units["value"]  # "5 cm", "12 square meters": drop words after a number
    text = re.sub(r"\s+", "", text)
    choice = _LETTER_CHOICE.match(text)
    return choice["letter"].upper() if choice else text


def parse_number(text: str) -> Fraction | None:
    """Exact value of a normalised integer, decimal, thousands-separated, a/b or \\frac answer."""
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    try:
        if _DECIMAL.match(text):
            return Fraction(text)
        frac = _FRAC.match(text) or _SLASH.match(text)
        if frac is None:
            return None
        parts = frac.groupdict()
        num = parse_number(parts.get("num") or parts.get("num1") or "")
        den = parse_number(parts.get("den") or parts.get("den1") or "")
        if num is None or den is None or den == 0:
            return None
        value = num / den
        return -value if parts.get("sign") == "-" else value
    except (ValueError, ZeroDivisionError):
        return None


def _split_items(text: str) -> list[str]:
    """Elements of a tuple/list answer such as (1,2) or 1,2,3 (brackets stripped)."""
    if text[:1] in "([{" and text[-1:] in ")]}":
        text = text[1:-1]
    return text.split(",")


def answers_match(predicted: str, reference: str) -> bool:
    """Whether two raw answers agree after normalisation (numbers exactly, else as strings)."""
    if len(predicted) > _MAX_ANSWER_CHARS:
        return False
    pred, ref = normalize_answer(predicted), normalize_answer(reference)
    if not pred:
        return False
    pred_value, ref_value = parse_number(pred), parse_number(ref)
    if pred_value is not None and ref_value is not None:
        return pred_value == ref_value
    if pred == ref:
        return True
    pred_items, ref_items = _split_items(pred), _split_items(ref)
    if len(ref_items) < 2 or len(pred_items) != len(ref_items):
        return False
    return all(answers_match(p, r) for p, r in zip(pred_items, ref_items, strict=True))


@register_reward("math")
def math_reward(response: str, reference: str) -> float:
    """1.0 if the response's final answer equals the reference answer, else 0.0."""
    answer = extract_answer(response)
    return 1.0 if answer is not None and answers_match(answer, reference) else 0.0
