"""Sampling from a LingForCausalLM: greedy, temperature and nucleus (top-p), with a KV cache.

    result = generate(model, [tok.encode("47+58=?\\n")], max_new_tokens=64, eos_id=tok.eos_id,
                      temperature=0.0)
    result.tokens[0], result.logprobs[0], result.finished[0]
    texts = generate_text(model, tok, ["47+58=?\\n"], max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)

Variable-length prompts: the model has no attention mask, so prompts cannot be left-padded into one
batch. Instead prompts are bucketed by exact length; each bucket runs as one batch with its own
KVCache (prefill the prompts, then one token per step) and stops when every row has produced EOS or
`max_new_tokens` tokens. A row's output is therefore the same as generating its prompt alone (up to
floating-point rounding from the batch shape; greedy outputs match exactly in practice).

Each generated token comes with its log-prob under the temperature-scaled distribution BEFORE top-p
truncation: the quantity a policy-gradient update (RL) differentiates. At temperature 0 (greedy) that
distribution is degenerate, so the log-prob is reported under the model's own (temperature 1) softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from linglab.errors import LinglabError
from linglab.model import KVCache, LingForCausalLM
from linglab.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    """Per prompt, in input order: generated ids (no prompt, no EOS), their log-probs, whether EOS ended it."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]


def _check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0.0:  # also rejects NaN
        raise LinglabError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise LinglabError(f"generate: top_p must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token ids [B] and their log-probs [B] from logits [B, V].

    temperature 0 is greedy (argmax, first index on ties). Otherwise the softmax of logits / temperature
    is cut to its nucleus, the fewest most-likely tokens whose mass reaches top_p (top_p = 1 keeps all),
    and sampled. Log-probs: see the module docstring.
    """
    _check_sampling(temperature, top_p)
    logits = logits.float()
    if temperature == 0.0:
        ids = logits.argmax(dim=-1)
        return ids, F.log_softmax(logits, dim=-1).gather(-1, ids[:, None]).squeeze(-1)

    logp = F.log_softmax(logits / temperature, dim=-1)
    probs = logp.exp()
    if top_p < 1.0:
        # Stable sort so that, among equal probabilities, the lowest id ranks first (as argmax does).
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_p.cumsum(dim=-1) - sorted_p
        sorted_p = sorted_p.masked_fill(mass_before >= top_p, 0.0)  # never drops the most likely token
        ids = order.gather(-1, torch.multinomial(sorted_p, 1, generator=generator)).squeeze(-1)
    else:
        ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


def _generate_bucket(model: LingForCausalLM, prompts: torch.Tensor, max_new_tokens: int, eos_id: int,
                     temperature: float, top_p: float, generator: torch.Generator | None, use_cache: bool,
                     on_token: Callable[[int, int], None] | None, rows: list[int],
                     result: GenerationResult) -> None:
    """Generate for equal-length prompts [B, P] as one batch; write into `result` at indices `rows`."""
    batch, prompt_len = prompts.shape
    weight = model.lm_head.weight
    cache = (KVCache(model.cfg, batch, prompt_len + max_new_tokens, device=weight.device, dtype=weight.dtype)
             if use_cache else None)
    seq = prompts
    logits = model(prompts, cache=cache)[:, -1]
    for step in range(max_new_tokens):
        ids, logp = sample_next(logits, temperature, top_p, generator)
        for b, (token, lp) in enumerate(zip(ids.tolist(), logp.tolist(), strict=True)):
            row = rows[b]
            if result.finished[row]:
                continue
            if token == eos_id:
                result.finished[row] = True
                continue
            result.tokens[row].append(token)
            result.logprobs[row].append(lp)
            if on_token is not None:
                on_token(row, token)
        if step == max_new_tokens - 1 or all(result.finished[r] for r in rows):
            break
        # Finished rows keep decoding (their samples are discarded) so the batch keeps its shape.
        if use_cache:
            logits = model(ids[:, None], cache=cache)[:, -1]
        else:  # the full forward every step: the reference the KV cache must reproduce
            seq = torch.cat([seq, ids[:, None]], dim=1)
            logits = model(seq)[:, -1]


@torch.no_grad()
def generate(model: LingForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_id: int,
             temperature: float = 1.0, top_p: float = 1.0, seed: int | torch.Generator | None = None,
             use_cache: bool = True, on_token: Callable[[int, int], None] | None = None) -> GenerationResult:
    """Sample up to `max_new_tokens` tokens after each prompt; see the module docstring.

    seed: an int (a fresh generator), a torch.Generator (continued), or None (torch's global RNG).
    Buckets draw from one generator in order of length, so a row's samples (not its greedy output)
    can change when prompts of other lengths are added to the call.
    use_cache=False recomputes the whole sequence each step (same outputs, for benchmarks and tests).
    on_token(row, token_id) is called for every token as it is appended to `tokens[row]` (never for EOS).
    The model runs in eval mode (no MoE load statistics) and gets its previous mode back afterwards.
    """
    _check_sampling(temperature, top_p)
    if max_new_tokens < 0:
        raise LinglabError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = model.cfg.vocab_size
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise LinglabError(f"generate: prompt {i} is empty")
        if min(p) < 0 or max(p) >= vocab:
            raise LinglabError(f"generate: prompt {i} has a token id outside [0, {vocab})")

    device = model.lm_head.weight.device
    generator = seed
    if isinstance(seed, int):
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    n = len(prompts)
    result = GenerationResult(tokens=[[] for _ in range(n)], logprobs=[[] for _ in range(n)], finished=[False] * n)
    if max_new_tokens == 0:
        return result
    buckets: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        buckets.setdefault(len(p), []).append(i)

    was_training = model.training
    model.eval()
    try:
        for length in sorted(buckets):
            rows = buckets[length]
            batch = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)
            _generate_bucket(model, batch, max_new_tokens, eos_id, temperature, top_p, generator, use_cache,
                             on_token, rows, result)
    finally:
        model.train(was_training)
    return result


def generate_text(model: LingForCausalLM, tokenizer: Tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  **kw) -> list[str]:
    """Completions (prompt excluded, stopped at EOS) for text prompts; `kw` as for `generate`."""
    result = generate(model, tokenizer.encode_batch(prompts), max_new_tokens, tokenizer.eos_id, **kw)
    return [tokenizer.decode(ids) for ids in result.tokens]
