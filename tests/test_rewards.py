"""The Evo-CoT reward terms (SPEC §5); the verifiers themselves are tested in test_verify.py."""

import pytest
import torch

from linglab.rl.rewards import evo_cot_length_reward, format_reward, total_reward, verify
from linglab.tasks import generate_problems

SCRATCHPAD = "47+58\n7+8+0=15\n4+5+1=10\nanswer: 105"


def test_verify_agrees_with_the_tasks_on_worked_solutions():
    for problem in generate_problems(50, tiers=(0, 1, 2), seed=0, split="train"):
        assert verify(problem.solution, problem.answer)
        assert format_reward(problem.solution) == 0.0


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
