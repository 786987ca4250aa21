"""The verifier and the Evo-CoT reward terms (SPEC §5)."""

import time

import pytest
import torch

from linglab.rl.rewards import evo_cot_length_reward, extract_final_answer, format_reward, parse_number, total_reward, verify
from linglab.tasks import generate_problems

SCRATCHPAD = "47+58\n7+8+0=15\n4+5+1=10\nanswer: 105"


@pytest.mark.parametrize("completion, answer", [
    (SCRATCHPAD, "105"),
    ("answer: 12.0", "12"),
    ("answer: 24/2", "12"),
    ("so it is \\boxed{12}", "12.0"),
    ("answer: -7", "-7"),
    ("answer: 1,000", "1000"),
    ("answer: 1,234,567", "1234567.00"),
    ("the result is \\boxed{\\frac{3}{4}}.", "0.75"),
    ("answer: 3/4", "\\frac{3}{4}"),
    ("answer: \\dfrac{\\frac{1}{2}}{2}", "0.25"),
    ("answer: $2^{3} \\cdot 3$", "24"),
    ("answer: 2+3*4", "14"),
    ("so the total is 42.", "42"),
    ("we get -5 in the end", "-5"),
    ("Answer: 105 ", "105"),
    ("\\boxed{3}\nanswer: 4", "4"),
    ("answer: Paris", "paris"),
])
def test_verify_accepts_equivalent_answers(completion, answer):
    assert verify(completion, answer)


@pytest.mark.parametrize("completion, answer", [
    (SCRATCHPAD, "104"),
    ("answer: 7", "-7"),
    ("answer: 1,00", "100"),
    ("answer: 105 apples", "105"),
    ("no number here", "0"),
    ("", "0"),
    ("answer: 1/0", "0"),
    ("answer: 0.33", "1/3"),
    ("12-5", "-5"),
    ("answer: banana", "42"),
])
def test_verify_rejects(completion, answer):
    assert not verify(completion, answer)


def test_verify_agrees_with_the_tasks_on_worked_solutions():
    for problem in generate_problems(50, tiers=(0, 1, 2), seed=0, split="train"):
        assert verify(problem.solution, problem.answer)
        assert format_reward(problem.solution) == 0.0


def test_extraction_order_and_huge_powers_are_refused_quickly():
    assert extract_final_answer("\\boxed{\\frac{1}{2}} then 7") == "\\frac{1}{2}"
    assert extract_final_answer("answer: 3\nanswer: 5\n") == "5"
    start = time.perf_counter()
    assert parse_number("9^9^9") is None and parse_number("(2**64)**64") is None
    assert time.perf_counter() - start < 1.0
    assert parse_number("-3.25") == pytest.approx(-3.25)


@pytest.mark.parametrize("completion, instant, reward", [
    (SCRATCHPAD, True, 0.0),
    (SCRATCHPAD + "\n\n", True, 0.0),
    ("answer: 1\nanswer: 2", True, -0.5),
    ("answer: 1\nmore text", True, -0.5),
    ("no answer", True, -0.5),
    ("", True, -0.5),
    ("<think>hmm</think>\nanswer: 1", True, -0.5),
    ("<think>hmm</think>\nanswer: 1", False, 0.0),
    ("<think>hmm", True, -1.0),
])
def test_format_reward(completion, instant, reward):
    assert format_reward(completion, instant=instant) == reward


def test_evo_cot_length_reward_by_hand():
    # l_min 10, l_max 40: p = 0.5, 0.5 - 10/30, 0.5 - 20/30, -0.5; wrong answers keep only min(p, 0).
    # Second group, all lengths equal: p = 0.5 for all.
    lengths = [10, 20, 30, 40, 7, 7, 7, 7]
    correct = [True, False, True, False, True, False, True, False]
    reward = evo_cot_length_reward(lengths, correct, group_size=4, alpha=0.5)
    expected = 0.5 * torch.tensor([0.5, 0.0, 0.5 - 20 / 30, -0.5, 0.5, 0.0, 0.5, 0.0])
    torch.testing.assert_close(reward, expected)
    with pytest.raises(ValueError):
        evo_cot_length_reward(lengths, correct, group_size=3, alpha=0.5)


def test_total_reward_sums_the_terms():
    completions = ["answer: 5", "long\nanswer: 5", "answer: 4", "<think>\nanswer: 6\nextra"]
    answers = ["5", "5", "5", "6"]
    reward = total_reward(completions, answers, lengths=[2, 4, 2, 4], group_size=2, alpha=1.0)
    # Group 1: both right, p = 0.5 and -0.5. Group 2: one wrong (p = 0.5 -> 0), one right, badly formed,
    # with a think marker: 1 - 0.5 - 0.5 - 0.5.
    torch.testing.assert_close(reward, torch.tensor([1.5, 0.5, 0.0, -0.5]))
