"""Evaluation of a model on the embedded tasks: held-out loss, greedy exact match, pass@k and ApexEval per tier.

    linglab eval --ckpt runs/tiny/pretrain/final          # held-out loss + greedy exact match per difficulty tier
    sample_pass_at_k(model, tok, problems, n=8, ks=[1, 4, 8])   # {"hard": {"pass@1": 0.4, ...}, ...}
    apex_eval(model, tok, problems, PROMPT_VARIANTS, n=8, k=8)  # best pass@k over prompt variants (SPEC §6)

Exact match = the `answer:` line of a greedy completion equals the problem's answer (`tasks.is_correct`).
Sampled evaluations (pass@k, ApexEval) check answers with `linglab.verify.verify` (the RL reward's verifier
too), which compares values, not strings (SPEC §6). Held-out problems are disjoint from training by construction (`tasks.is_heldout`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence

import torch

from linglab.data import PackedDataset
from linglab.generate import generate, generate_text
from linglab.model import LingForCausalLM
from linglab.passk import pass_at_k_batch, pass_at_k_by_variant
from linglab.tasks import TIERS, Problem, is_correct
from linglab.verify import verify

MAX_NEW_TOKENS = 64  # the longest worked solution of the embedded tiers is ~35 tokens


@torch.no_grad()
def heldout_loss(model: LingForCausalLM, dataset: PackedDataset, batch_size: int = 64) -> float:
    """Mean masked cross-entropy of the main head over a packed held-out set."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    device = next(model.parameters()).device
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset.tokens[start:start + batch_size].long().to(device)
            mask = dataset.loss_mask[start:start + batch_size, 1:].float().to(device)
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


def evaluate_run(model: LingForCausalLM, data, step: int) -> dict:
    """An eval row for metrics.jsonl: held-out loss (all tiers together and each alone) and greedy exact match per
    tier, of a `RunData` (the embedded corpus; user text has no held-out problems)."""
    row = {"kind": "eval", "step": step, "heldout_loss": None, "accuracy": {}, "heldout_loss_by_tier": {}}
    if data.heldout is not None:
        row["heldout_loss"] = heldout_loss(model, data.heldout)
    for tier, problems in data.heldout_problems.items():
        name = TIERS[tier].name
        row["accuracy"][name] = tier_accuracy(model, data.tokenizer, problems)
        if tier in data.heldout_by_tier:
            row["heldout_loss_by_tier"][name] = heldout_loss(model, data.heldout_by_tier[tier])
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


_EQUATION_PROMPT = re.compile(r"(.+)=\?\n")


def _question_prompt(problem: Problem) -> str:
    match = _EQUATION_PROMPT.fullmatch(problem.prompt)
    return f"What is {match.group(1)}?\n" if match else problem.prompt


def _bare_prompt(problem: Problem) -> str:
    match = _EQUATION_PROMPT.fullmatch(problem.prompt)
    return f"{match.group(1)}=\n" if match else problem.prompt


# Prompt/format variants for ApexEval (SPEC §6), each the same question put another way: the training format
# "47+58=?", the question "What is 47+58?" and the bare "47+58=". Word problems have one wording only, so
# every variant leaves them as they are.
PROMPT_VARIANTS: dict[str, Callable[[Problem], str]] = {
    "plain": lambda p: p.prompt,
    "question": _question_prompt,
    "bare": _bare_prompt,
}


def correct_counts(model: LingForCausalLM, tokenizer, prompts: Sequence[str], answers: Sequence[str], n: int,
                   temperature: float = 1.0, seed: int = 0) -> list[int]:
    """How many of n samples per prompt `rewards.verify` accepts; the n samples of a prompt share one batch."""
    result = generate(model, [ids for ids in tokenizer.encode_batch(prompts) for _ in range(n)], MAX_NEW_TOKENS,
                      tokenizer.eos_id, temperature=temperature, seed=seed)
    texts = [tokenizer.decode(ids) for ids in result.tokens]
    return [sum(verify(texts[i * n + j], answer) for j in range(n)) for i, answer in enumerate(answers)]


def _by_tier(problems: Sequence[Problem]) -> dict[str, list[Problem]]:
    tiers: dict[str, list[Problem]] = {}
    for p in problems:
        tiers.setdefault(TIERS[p.tier].name, []).append(p)
    return tiers


def sample_pass_at_k(model: LingForCausalLM, tokenizer, problems: Sequence[Problem], n: int, ks: Sequence[int],
                     temperature: float = 1.0, seed: int = 0) -> dict[str, dict[str, float]]:
    """Unbiased pass@k (SPEC §6) per tier name from n samples per problem: {"hard": {"pass@1": ..., "pass@8": ...}}."""
    out = {}
    for tier, group in _by_tier(problems).items():
        counts = correct_counts(model, tokenizer, [p.prompt for p in group], [p.answer for p in group], n,
                                temperature, seed)
        out[tier] = {f"pass@{k}": float(pass_at_k_batch(n, counts, k).mean()) for k in ks}
    return out


def apex_eval(model: LingForCausalLM, tokenizer, problems: Sequence[Problem],
              variants: Mapping[str, Callable[[Problem], str]] = PROMPT_VARIANTS, n: int = 8, k: int = 8,
              temperature: float = 1.0, seed: int = 0) -> dict:
    """ApexEval (SPEC §6): mean pass@k of each prompt variant over `problems`, and the best of them as the score."""
    scores = pass_at_k_by_variant(variant_correct_counts(model, tokenizer, problems, variants, n, temperature, seed), n, k)
    best = max(scores, key=scores.get)
    return {"k": k, "apex": scores[best], "best_variant": best, "variants": scores}


def variant_correct_counts(model: LingForCausalLM, tokenizer, problems: Sequence[Problem],
                           variants: Mapping[str, Callable[[Problem], str]], n: int, temperature: float = 1.0,
                           seed: int = 0) -> dict[str, list[int]]:
    """`correct_counts` of every problem under each prompt variant: {variant: [count per problem]}."""
    answers = [p.answer for p in problems]
    return {name: correct_counts(model, tokenizer, [variant(p) for p in problems], answers, n, temperature, seed)
            for name, variant in variants.items()}


def policy_eval(model: LingForCausalLM, tokenizer, problems: Sequence[Problem], n: int, ks: Sequence[int],
                variants: Mapping[str, Callable[[Problem], str]] = PROMPT_VARIANTS, temperature: float = 1.0,
                seed: int = 0) -> dict[str, dict]:
    """Per tier name: greedy accuracy, pass@k of the plain prompt and ApexEval at the largest k, from one set of samples.

    The plain prompt's samples serve both pass@k and ApexEval's "plain" variant, so nothing is sampled twice.
    """
    out = {}
    for tier, group in _by_tier(problems).items():
        counts = variant_correct_counts(model, tokenizer, group, {"plain": PROMPT_VARIANTS["plain"], **variants}, n,
                                        temperature, seed)
        scores = pass_at_k_by_variant(counts, n, max(ks))
        best = max(scores, key=scores.get)
        out[tier] = {"n_problems": len(group), "greedy_accuracy": tier_accuracy(model, tokenizer, group),
                     **{f"pass@{k}": float(pass_at_k_batch(n, counts["plain"], k).mean()) for k in ks},
                     "apex": {"k": max(ks), "apex": scores[best], "best_variant": best, "variants": scores}}
    return out


def greedy_accuracy(model: LingForCausalLM, tokenizer, problems: Sequence[Problem]) -> dict[str, float]:
    """Greedy exact-match accuracy (`tier_accuracy`) per tier name."""
    return {tier: tier_accuracy(model, tokenizer, group) for tier, group in _by_tier(problems).items()}
