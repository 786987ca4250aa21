"""Sampling from a LingForCausalLM: greedy, temperature and nucleus (top-p), with a KV cache.

    result = generate(model, [tok.encode("47+58=?\\n")], max_new_tokens=64, eos_id=tok.eos_id,
                      temperature=0.0)
    result.tokens[0], result.logprobs[0], result.finished[0]
    texts = generate_text(model, tok, ["47+58=?\\n"], max_new_tokens=64, temperature=0.8, top_p=0.95, seed=0)

Variable-length prompts are left-padded into one batch with one KVCache (prefill the prompts, then one
token per step), which stops when every row has produced EOS or `max_new_tokens` tokens. The model masks
the padding and counts each row's RoPE positions from its first real token (`pad=` of
`LingForCausalLM.forward`), so a row's output is the same as generating its prompt alone, up to
floating-point rounding from the batch shape (greedy outputs match exactly in practice). One batch, not one
per prompt length, is what keeps resumed C3PO++ rollouts (every one of its own length) fast.

Each generated token comes with its log-prob under the temperature-scaled distribution BEFORE top-p
truncation: the quantity a policy-gradient update (RL) differentiates. At temperature 0 (greedy) that
distribution is degenerate, so the log-prob is reported under the model's own (temperature 1) softmax.
The EOS that ends a row is not one of its tokens, but it and its log-prob are kept apart (`eos_tokens`,
`eos_logprobs`): deciding to stop is an action RL trains too. `eos_id` may be several ids
(`Tokenizer.stop_ids`: EOS and the chat template's end-of-turn marker, e.g. Ling's `<|role_end|>`); any of them
ends a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from linglab.errors import LinglabError
from linglab.model import KVCache, LingForCausalLM
from linglab.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    """Per prompt, in input order: generated ids (no prompt, no EOS), their log-probs, whether EOS ended it, and
    the EOS id and log-prob it was sampled with (None without EOS); and the work done: prompt positions prefilled
    (padding included) and decode forwards of the whole batch."""

    tokens: list[list[int]]
    logprobs: list[list[float]]
    finished: list[bool]
    prefill_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # rows over all decode forwards (finished rows of a static batch included)
    eos_logprobs: list[float | None] = field(default_factory=list)
    eos_tokens: list[int | None] = field(default_factory=list)


def _check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0.0:  # also rejects NaN
        raise LinglabError(f"generate: temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise LinglabError(f"generate: top_p must be in (0, 1], got {top_p}")


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None,
                generators: Sequence[torch.Generator | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token ids [B] and their log-probs [B] from logits [B, V].

    temperature 0 is greedy (argmax, first index on ties). Otherwise the softmax of logits / temperature
    is cut to its nucleus, the fewest most-likely tokens whose mass reaches top_p (top_p = 1 keeps all),
    and sampled: every row from `generator`, or with `generators` (one per row) row b alone from generators[b],
    so that what a row draws does not depend on the other rows. Log-probs: see the module docstring.
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
        ids = order.gather(-1, _draw(sorted_p, generator, generators)).squeeze(-1)
    else:
        ids = _draw(probs, generator, generators).squeeze(-1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


def _draw(probs: torch.Tensor, generator: torch.Generator | None,
          generators: Sequence[torch.Generator | None] | None) -> torch.Tensor:
    """One index per row of probs [B, V], [B, 1]: from one generator, or row by row from its own."""
    if generators is None:
        return torch.multinomial(probs, 1, generator=generator)
    if len(generators) != probs.shape[0]:
        raise ValueError(f"sample_next: {len(generators)} generators for {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(row[None], 1, generator=g) for row, g in zip(probs, generators)])


def _generate_batch(model: LingForCausalLM, prompts: torch.Tensor, pad: torch.Tensor | None, limits: list[int],
                    stop_ids: frozenset[int], temperature: float, top_p: float, generator: torch.Generator | None,
                    generators: Sequence[torch.Generator | None] | None, use_cache: bool,
                    on_token: Callable[[int, int], None] | None, stop: Callable[[GenerationResult], bool] | None,
                    result: GenerationResult) -> None:
    """Generate for left-padded prompts [B, P] (pad [B] slots each, or None) as one batch into `result`; row b
    stops at EOS or after limits[b] tokens."""
    batch, prompt_len = prompts.shape
    steps = max(limits)
    weight = model.lm_head.weight
    cache = (KVCache(model.cfg, batch, prompt_len + steps, device=weight.device, dtype=weight.dtype)
             if use_cache else None)
    seq = prompts
    logits = model(prompts, cache=cache, pad=pad)[:, -1]
    result.prefill_tokens += prompts.numel()
    for step in range(steps):
        ids, logp = sample_next(logits, temperature, top_p, generator, generators)
        for row, (token, lp) in enumerate(zip(ids.tolist(), logp.tolist(), strict=True)):
            if result.finished[row] or step >= limits[row]:
                continue
            if token in stop_ids:
                result.finished[row], result.eos_logprobs[row], result.eos_tokens[row] = True, lp, token
                continue
            result.tokens[row].append(token)
            result.logprobs[row].append(lp)
            if on_token is not None:
                on_token(row, token)
        if stop is not None and stop(result):
            break
        if step == steps - 1 or all(result.finished[r] or step + 1 >= limits[r] for r in range(batch)):
            break
        # Finished rows keep decoding (their samples are discarded) so the batch keeps its shape.
        result.decode_steps += 1
        result.decode_rows += batch
        if use_cache:
            logits = model(ids[:, None], cache=cache, pad=pad)[:, -1]
        else:  # the full forward every step: the reference the KV cache must reproduce
            seq = torch.cat([seq, ids[:, None]], dim=1)
            logits = model(seq, pad=pad)[:, -1]


def check_requests(model: LingForCausalLM, prompts: Sequence[Sequence[int]],
                   max_new_tokens: int | Sequence[int]) -> list[int]:
    """Each prompt's token limit, after checking the prompts (non-empty, ids in the vocabulary) and that prompt +
    limit fits the model's positions: one line naming the prompt otherwise."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise LinglabError(f"generate: {len(limits)} max_new_tokens for {len(prompts)} prompts")
    if any(n < 0 for n in limits):
        raise LinglabError(f"generate: max_new_tokens must be >= 0, got {min(limits)}")
    vocab, max_pos = model.cfg.vocab_size, model.cfg.max_position_embeddings
    for i, (p, limit) in enumerate(zip(prompts, limits)):
        if len(p) == 0:
            raise LinglabError(f"generate: prompt {i} is empty")
        if min(p) < 0 or max(p) >= vocab:
            raise LinglabError(f"generate: prompt {i} has a token id outside [0, {vocab})")
        if len(p) + limit > max_pos:
            raise LinglabError(f"generate: prompt {i} ({len(p)} tokens) + max_new_tokens ({limit}) exceeds the model's "
                               f"max_position_embeddings ({max_pos})")
    return limits


def seeded_generator(seed: int | torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """`seed` as `generate` takes it: an int makes a fresh generator, a generator is continued, None is global."""
    if isinstance(seed, int):
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        return generator
    return seed


@torch.no_grad()
def generate(model: LingForCausalLM, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
             eos_id: int | Sequence[int], temperature: float = 1.0, top_p: float = 1.0, seed: int | torch.Generator | None = None,
             use_cache: bool = True, on_token: Callable[[int, int], None] | None = None,
             stop: Callable[[GenerationResult], bool] | None = None,
             generators: Sequence[torch.Generator | None] | None = None) -> GenerationResult:
    """Sample up to `max_new_tokens` tokens after each prompt (one limit, or one per prompt); see the module
    docstring.

    seed: an int (a fresh generator), a torch.Generator (continued), or None (torch's global RNG).
    All rows draw from one generator at each step, so a row's samples (not its greedy output) change when
    other prompts are added to the call.
    generators: one per prompt instead of `seed`; prompt i then draws its k-th token from generators[i]'s k-th
    draw, whatever else is in the batch (RL's batch-invariant rollouts). A row that has finished keeps drawing
    while the batch decodes, so a finished prompt's generator is not to be continued.
    use_cache=False recomputes the whole sequence each step (same outputs, for benchmarks and tests).
    on_token(row, token_id) is called for every token as it is appended to `tokens[row]` (never for EOS).
    stop(result so far) is called after every sampling step; True ends generation there (C3PO++'s budget).
    The model runs in eval mode (no MoE load statistics) and gets its previous mode back afterwards.
    """
    _check_sampling(temperature, top_p)
    limits = check_requests(model, prompts, max_new_tokens)
    device = model.lm_head.weight.device
    generator = seeded_generator(seed, device)
    if generators is not None and len(generators) != len(prompts):
        raise LinglabError(f"generate: {len(generators)} generators for {len(prompts)} prompts")

    n = len(prompts)
    result = GenerationResult(tokens=[[] for _ in range(n)], logprobs=[[] for _ in range(n)], finished=[False] * n,
                              eos_logprobs=[None] * n, eos_tokens=[None] * n)
    if n == 0 or max(limits) == 0:
        return result
    width = max(len(p) for p in prompts)
    # Left padding with id 0: masked, so its value never matters. None when every prompt is as long.
    pads = [width - len(p) for p in prompts]
    batch = torch.tensor([[0] * n + list(p) for n, p in zip(pads, prompts)], dtype=torch.long, device=device)
    pad = torch.tensor(pads, device=device) if any(pads) else None

    was_training = model.training
    model.eval()
    try:
        stop_ids = frozenset([eos_id] if isinstance(eos_id, int) else eos_id)
        _generate_batch(model, batch, pad, limits, stop_ids, temperature, top_p, generator, generators, use_cache,
                        on_token, stop, result)
    finally:
        model.train(was_training)
    return result


def generate_text(model: LingForCausalLM, tokenizer: Tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  **kw) -> list[str]:
    """Completions (prompt excluded, stopped at EOS) for text prompts; `kw` as for `generate`."""
    result = generate(model, tokenizer.encode_batch(prompts), max_new_tokens, tokenizer.stop_ids, **kw)
    return [tokenizer.decode(ids) for ids in result.tokens]
