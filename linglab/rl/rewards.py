"""Rewards for RL on verifiable tasks (SPEC §5 Evo-CoT): correctness + alpha * length term + format term.

Correctness is `linglab.verify.verify` (exact numeric comparison of the final answer), shared with the evaluations.

    verify("47+58\\n7+8+0=15\\n4+5+1=10\\nanswer: 105", "105")        # True
    rewards = total_reward(completions, answers, lengths, group_size=8, alpha=0.1)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from linglab.verify import ANSWER_LINE, extract_final_answer, parse_number, verify  # noqa: F401  (re-exported)

THINK_MARKERS = ("<think>", "</think>")


def format_reward(completion: str, instant: bool = True, penalty: float = 0.5, think_penalty: float = 0.5,
                  think_markers: Sequence[str] = THINK_MARKERS) -> float:
    """Format term (SPEC §5): 0 if well formed, minus `penalty` if not; minus `think_penalty` more if a think marker
    appears in instant mode.

    Well formed: exactly one `answer: X` line and it is the last line (trailing whitespace allowed).
    """
    lines = completion.rstrip().splitlines()
    answer_lines = [line for line in lines if ANSWER_LINE.fullmatch(line)]
    reward = 0.0
    if len(answer_lines) != 1 or not ANSWER_LINE.fullmatch(lines[-1]):
        reward -= penalty
    if instant and any(marker in completion for marker in think_markers):
        reward -= think_penalty
    return reward


def evo_cot_length_reward(lengths: Tensor | Sequence[int], correct: Tensor | Sequence[bool], group_size: int,
                          alpha: float) -> Tensor:
    """alpha * the Evo-CoT length term [B] (SPEC §5), per group of `group_size` contiguous responses.

    p(l) = 0.5 - (l - l_min) / (l_max - l_min + 1e-9) over the group's lengths (right and wrong alike);
    a correct response gets p, a wrong one min(p, 0): shorter right answers earn more, and no wrong answer
    is paid for being short.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.float64)
    if lengths.numel() % group_size:
        raise ValueError(f"{lengths.numel()} responses do not split into groups of {group_size}")
    groups = lengths.view(-1, group_size)
    low, high = groups.min(-1, keepdim=True).values, groups.max(-1, keepdim=True).values
    p = (0.5 - (groups - low) / (high - low + 1e-9)).flatten()
    term = torch.where(torch.as_tensor(correct, dtype=torch.bool), p, p.clamp(max=0.0))
    return (alpha * term).float()


def total_reward(completions: Sequence[str], answers: Sequence[str], lengths: Tensor | Sequence[int], group_size: int,
                 alpha: float, instant: bool = True) -> Tensor:
    """Evo-CoT reward [B] (SPEC §5): correctness (1/0) + alpha * length term + format term.

    `lengths` are the responses' token counts; `answers` the gold answer of each response's prompt.
    """
    correct = torch.tensor([verify(c, a) for c, a in zip(completions, answers, strict=True)])
    length = evo_cot_length_reward(lengths, correct, group_size, alpha)
    form = torch.tensor([format_reward(c, instant) for c in completions])
    return correct.float() + length + form
