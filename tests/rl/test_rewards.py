"""Reward registry, math verifier and format reward."""

from __future__ import annotations

import pytest

from joyai_megatron.rl.rewards import available_rewards, get_reward, register_reward
from joyai_megatron.rl.rewards.math_answer import extract_answer, normalize_answer


def test_builtin_rewards_are_registered():
    assert {"math", "code", "think_format"} <= set(available_rewards())
    with pytest.raises(KeyError, match="unknown reward"):
        get_reward("no_such_reward")


def test_registry_rejects_duplicates_and_out_of_range_scores():
    @register_reward("test_only_out_of_range")
    def broken(response: str, reference: str) -> float:
        return 1.5

    with pytest.raises(ValueError, match="outside"):
        get_reward("test_only_out_of_range")("x", "y")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("math")(broken)


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        (r"So the result is \boxed{42}.", "42"),
        (r"\boxed{\dfrac{1}{2}}", "0.5"),
        (r"\boxed{\frac12}", "1/2"),
        (r"\boxed{\frac{-3}{4}}", r"-\frac{3}{4}"),
        (r"\boxed{-0.75}", "-3/4"),
        (r"\boxed{−7}", "-7"),  # unicode minus
        (r"\boxed{1,234,567}", "1234567"),
        ("The answer is 1,000 dollars.", "1000"),
        (r"\boxed{5\text{ cm}}", "5"),
        (r"\boxed{12 square meters}", "12"),
        (r"\boxed{90^\circ}", "90"),
        (r"\boxed{x = 7}", "7"),
        (r"\boxed{\left( 1, 2 \right)}", "(1,2)"),
        (r"\boxed{\text{(B)}}", "B"),
        (r"\boxed{\sqrt{2}}", r"\sqrt{2}"),
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\dfrac{\sqrt{3}}{2}"),
        ("<think>maybe \\boxed{3}</think>Final answer: $\\frac{-1}{2}$", "-1/2"),
        ("after all that, we get 17", "17"),
    ],
)
def test_math_verifier_accepts_equivalent_answers(response, reference):
    assert get_reward("math")(response, reference) == 1.0


@pytest.mark.parametrize(
    ("response", "reference"),
    [
        (r"\boxed{43}", "42"),
        (r"\boxed{-5}", "5"),
        (r"\boxed{\frac{1}{3}}", "0.333"),
        (r"\boxed{1,2}", "12"),
        (r"\boxed{(1, 3)}", "(1,2)"),
        (r"\boxed{\sqrt{3}}", r"\sqrt{2}"),
        ("I could not solve it.", "5"),
        (r"\boxed{}", "0"),
        ("<think>the answer is 42</think>I give up.", "42"),  # reasoning is not the answer
    ],
)
def test_math_verifier_rejects_wrong_answers(response, reference):
    assert get_reward("math")(response, reference) == 0.0


def test_answer_extraction_and_normalisation_details():
    assert extract_answer(r"\boxed{\frac{a}{b}} then \boxed{\{1,2\}}") == r"\{1,2\}"
    assert extract_answer("Answer: 12\nmore text 99") == "12"
    assert extract_answer("nothing") is None
    assert normalize_answer(r"$\left(3\right).$") == "(3)"
    assert normalize_answer(r"10\%") == "10"
    assert get_reward("math")("x" * 5000 + r"\boxed{" + "1" * 2000 + "}", "1") == 0.0


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("<think>step 1, step 2</think>The answer is 4.", 1.0),
        ("\n<think>\nreasoning\n</think>\n\n4", 1.0),
        ("The answer is 4.", 0.0),  # no think block
        ("<think></think>4", 0.0),  # empty reasoning
        ("<think>reasoning</think>   ", 0.0),  # no answer
        ("<think>a</think>b<think>c</think>d", 0.0),  # two blocks
        ("intro <think>a</think>b", 0.0),  # text before the block
        ("<think>unterminated reasoning", 0.0),
    ],
)
def test_think_format_reward(response, score):
    assert get_reward("think_format")(response, "") == score
