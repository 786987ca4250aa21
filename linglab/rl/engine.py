"""A continuous-batching rollout engine (issue 15 item 3; the engines of SPEC §9's RL systems work this way).

`linglab.generate` decodes a static batch: every prompt left-padded to the longest, and every row kept in the
batch until the longest response ends. With responses of heavy-tailed length (the `long` tier, C3PO++'s regime)
most of that batch is padding and finished rows. This engine instead keeps a fixed number of slots, each with its
own preallocated cache (`linglab.model.SlotCache`):

- a finished response frees its slot at once, and the slot is refilled from the queue at the next step;
- new prompts (and C3PO++'s resumed rollouts, prompt + tokens so far) are prefilled packed: whole sequences end
  to end in one forward, each attending only to itself, with no padding (`SlotBatch`), up to `prefill_tokens`
  tokens per forward;
- the G responses to one prompt share its prefill: it runs once and the slot's cache is copied to the others;
- every decode forward carries only the slots that hold a live response.

    engine = ContinuousEngine(model, slots=64, max_len=256)
    result = engine.run(prompts, max_new_tokens=200, stop_ids=tok.stop_ids, temperature=1.0, seed=0)

`run` returns a `linglab.generate.GenerationResult`, per prompt in input order, with the same meaning as
`generate`'s: tokens without the EOS, their log-probs under the temperature-scaled distribution before top-p, the
ending EOS and its log-prob apart; `stop(result)` after each sampling step ends the run there (C3PO++'s budget);
its work counters count real tokens: `prefill_tokens` (shared prefills once), `decode_rows` (live rows only).
Greedy decoding gives `generate`'s tokens (tested on mixed-length prompts, softmax and hybrid models). Sampled
tokens differ from `generate`'s for the same seed, since the rows draw in another order; with `generators=` (one
per prompt) prompt i draws its k-th token from generators[i]'s k-th draw, as `generate` does, so a prompt's
response does not depend on what else is queued.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

import torch

from linglab.generate import GenerationResult, _check_sampling, check_requests, sample_next, seeded_generator
from linglab.model import LingForCausalLM, SlotBatch, SlotCache


class ContinuousEngine:
    """`slots` sequences decoded side by side on one model, each up to `max_len` tokens (prompt + response)."""

    def __init__(self, model: LingForCausalLM, slots: int, max_len: int, prefill_tokens: int = 2048):
        if slots < 1 or max_len < 2 or prefill_tokens < 1:
            raise ValueError(f"engine: slots ({slots}) and prefill_tokens ({prefill_tokens}) must be >= 1, "
                             f"max_len ({max_len}) >= 2")
        weight = model.lm_head.weight
        self.model, self.max_len, self.prefill_tokens = model, max_len, prefill_tokens
        self.cache = SlotCache(model.cfg, slots, max_len, device=weight.device, dtype=weight.dtype)
        self.slots = slots

    @torch.no_grad()
    def run(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], stop_ids: int | Sequence[int],
            temperature: float = 1.0, top_p: float = 1.0, seed: int | torch.Generator | None = None,
            stop: Callable[[GenerationResult], bool] | None = None,
            generators: Sequence[torch.Generator | None] | None = None) -> GenerationResult:
        """Sample a response for every prompt (see the module docstring); the queue is served in order."""
        _check_sampling(temperature, top_p)
        limits = check_requests(self.model, prompts, max_new_tokens)
        for i, (p, limit) in enumerate(zip(prompts, limits)):
            if len(p) + limit > self.max_len:
                raise ValueError(f"engine: prompt {i} ({len(p)} tokens) + {limit} new tokens exceeds the slots' "
                                 f"max_len {self.max_len}")
        stop_set = frozenset([stop_ids] if isinstance(stop_ids, int) else stop_ids)
        generator = seeded_generator(seed, self.model.lm_head.weight.device)
        if generators is not None and len(generators) != len(prompts):
            raise ValueError(f"engine: {len(generators)} generators for {len(prompts)} prompts")
        n = len(prompts)
        result = GenerationResult(tokens=[[] for _ in range(n)], logprobs=[[] for _ in range(n)],
                                  finished=[False] * n, eos_logprobs=[None] * n, eos_tokens=[None] * n)
        was_training = self.model.training
        self.model.eval()
        try:
            self._serve([list(p) for p in prompts], limits, stop_set, temperature, top_p, generator, generators, stop,
                        result)
        finally:
            self.model.train(was_training)
        return result

    def _prefill(self, admitted: list[tuple[int, list[int]]], result: GenerationResult) -> dict[int, torch.Tensor]:
        """Packed prefill of (slot, sequence) pairs; equal sequences are computed once and their cache copied.
        Returns each slot's logits for its first sample."""
        first_slot: dict[tuple[int, ...], int] = {}
        copies: dict[int, list[int]] = {}
        for slot, sequence in admitted:
            key = tuple(sequence)
            if key in first_slot:
                copies[first_slot[key]].append(slot)
            else:
                first_slot[key], copies[slot] = slot, []
        unique = list(first_slot.items())
        device = self.model.lm_head.weight.device
        ids = torch.tensor([[t for key, _ in unique for t in key]], device=device)
        batch = SlotBatch(self.cache, torch.tensor([slot for _, slot in unique], device=device),
                          [len(key) for key, _ in unique])
        logits = self.model(ids, cache=batch)
        result.prefill_tokens += ids.shape[1]
        out = {}
        for (_, slot), row in zip(unique, logits):
            out[slot] = row
            if copies[slot]:
                self.cache.copy(slot, copies[slot])
                out.update({dst: row for dst in copies[slot]})
        return out

    def _serve(self, prompts: list[list[int]], limits: list[int], stop_ids: frozenset[int], temperature: float,
               top_p: float, generator: torch.Generator | None, generators: Sequence[torch.Generator | None] | None,
               stop: Callable[[GenerationResult], bool] | None, result: GenerationResult) -> None:
        queue = deque(i for i in range(len(prompts)) if limits[i] > 0)
        free = deque(range(self.slots))
        owner: dict[int, int] = {}  # slot -> prompt index
        pending: dict[int, torch.Tensor] = {}  # slot -> logits of its next sample
        device = self.model.lm_head.weight.device
        while queue or owner:
            admitted, budget = [], 0
            while queue and free and (not admitted or budget + len(prompts[queue[0]]) <= self.prefill_tokens):
                i = queue.popleft()
                slot = free.popleft()
                owner[slot] = i
                admitted.append((slot, prompts[i]))
                budget += len(prompts[i])
            if admitted:
                pending.update(self._prefill(admitted, result))
            live = sorted(pending)
            rows = None if generators is None else [generators[owner[s]] for s in live]
            ids, logp = sample_next(torch.stack([pending[s] for s in live]), temperature, top_p, generator, rows)
            pending.clear()
            decode = []
            for slot, token, lp in zip(live, ids.tolist(), logp.tolist(), strict=True):
                i = owner[slot]
                if token in stop_ids:
                    result.finished[i], result.eos_tokens[i], result.eos_logprobs[i] = True, token, lp
                else:
                    result.tokens[i].append(token)
                    result.logprobs[i].append(lp)
                    if len(result.tokens[i]) < limits[i]:
                        decode.append((slot, token))
                        continue
                del owner[slot]
                free.append(slot)
            if stop is not None and stop(result):
                break
            if decode:
                slots = torch.tensor([slot for slot, _ in decode], device=device)
                tokens = torch.tensor([[token] for _, token in decode], device=device)
                logits = self.model(tokens, cache=SlotBatch(self.cache, slots))
                pending.update(zip((slot for slot, _ in decode), logits))
                result.decode_steps += 1
                result.decode_rows += len(decode)
