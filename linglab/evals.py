"""Evaluation of a pretrained model on the embedded tasks: held-out loss and exact match per tier.

    linglab eval --ckpt runs/tiny/final          # held-out loss + greedy exact match per difficulty tier

Exact match = the `answer:` line of a greedy completion equals the problem's answer (`tasks.is_correct`).
Held-out problems are disjoint from training by construction (`tasks.is_heldout`).
"""

from __future__ import annotations

import torch

from linglab.data import PackedDataset
from linglab.generate import generate_text
from linglab.model import LingForCausalLM
from linglab.tasks import TIERS, Problem, is_correct

MAX_NEW_TOKENS = 64  # the longest worked solution of the embedded tiers is ~35 tokens


@torch.no_grad()
def heldout_loss(model: LingForCausalLM, dataset: PackedDataset, batch_size: int = 64) -> float:
    """Mean masked cross-entropy of the main head over a packed held-out set."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset.tokens[start:start + batch_size].long()
            mask = dataset.loss_mask[start:start + batch_size, 1:].float()
            out = model(rows[:, :-1], targets=rows[:, 1:], loss_mask=mask)
            n = mask.sum().item()
            total += out.main_loss.item() * n
            count += n
    finally:
        model.train(was_training)
    return total / max(count, 1.0)


def tier_accuracy(model: LingForCausalLM, tokenizer, problems: list[Problem]) -> float:
    """Greedy exact-match accuracy over problems."""
    completions = generate_text(model, tokenizer, [p.prompt for p in problems], max_new_tokens=MAX_NEW_TOKENS,
                                temperature=0.0)
    return sum(is_correct(c, p) for c, p in zip(completions, problems)) / max(len(problems), 1)


def evaluate_run(model: LingForCausalLM, data, step: int, seq_len: int) -> dict:
    """An eval row for metrics.jsonl: held-out loss and accuracy per tier (embedded corpus only)."""
    row = {"kind": "eval", "step": step, "heldout_loss": None, "accuracy": {}}
    if data.heldout is not None:
        row["heldout_loss"] = heldout_loss(model, data.heldout)
    for tier, problems in data.heldout_problems.items():
        row["accuracy"][TIERS[tier].name] = tier_accuracy(model, data.tokenizer, problems)
    return row


def sample_completions(model: LingForCausalLM, data, n: int) -> list[dict]:
    """Up to n greedy completions of held-out prompts, spread over tiers, for the run report."""
    # Round-robin over tiers: the first problem of each tier, then the second of each, ...
    interleaved = [p for group in zip(*data.heldout_problems.values()) for p in group]
    chosen = interleaved[:n]
    if not chosen:
        return []
    completions = generate_text(model, data.tokenizer, [p.prompt for p in chosen], max_new_tokens=MAX_NEW_TOKENS,
                                temperature=0.0)
    return [{"prompt": p.prompt, "completion": c, "answer": p.answer, "correct": is_correct(c, p),
             "tier": TIERS[p.tier].name} for p, c in zip(chosen, completions)]
