"""Rollouts for RL (SPEC §5): the inference engine with its own copy of the policy, and the C3PO++ pool.

The engine samples with `linglab.generate` and keeps each token's log-prob as it was sampled: that is
log pi_infer, which the trainer compares with its own log pi_train for IcePop/TIS. Its weights are a copy
of the trainer's, refreshed by `sync_weights`. With `precision="fp8"` it runs the FP8 GEMMs of SPEC §3 as an
FP8 inference engine does: their weights are the FP8 export's 128x128-block E4M3 tensors, loaded (the weights and
blocks FP8 training uses), and their activations are quantised at every call, dynamically, in 1x128 E4M3 tiles
(`linglab.fp8_convert.convert_to_fp8_inference`). So pi_infer really differs from pi_train, as it does between
a real inference engine and its trainer.

    engine = RolloutEngine(model.cfg, eos_id=tok.eos_id, max_new_tokens=64, precision="fp8")
    engine.sync_weights(model)
    groups = engine.generate_groups(prompts, group_size=8, seed=0, step=3, payloads=problems)  # synchronous

    pool = RolloutPool(capacity=128, budget=2560, max_retention=2, group_size=8)
    groups, stats = pool.collect(engine, next_prompts, seed=0, step=3)   # C3PO++: whole groups, >= budget tokens

Every rollout samples from its own generator, seeded from (seed, RL step, group index, member index) by
`rollout_seed`: its tokens are the same whichever batch (or rank) samples it, and a C3PO++ rollout carried over
continues its own generator (saved with the pool). The group index counts the groups a step starts, from 0 in
prompt order: the synchronous groups, then DAPO's refills; C3PO++'s new groups in the order the pool starts them.

`kind="continuous"` samples with the continuous-batching engine (`linglab.rl.engine`: fixed slots refilled as
responses finish, packed prefills, a group's prompt prefilled once) instead of `generate`'s static left-padded
batch; it is built on first use with room for the longest prompt + max_new_tokens seen, and rebuilt larger when
one does not fit.

A response is every token sampled for it, the EOS that ended it included, each with its log pi_infer: EOS
is a trained token, so the policy learns when to stop, and IcePop/TIS and the mismatch statistics see it like
any other. A truncated response (max_new_tokens without EOS) has no EOS. A rollout that holds its EOS is done
and never resumed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from linglab import checkpoint as ckpt
from linglab.config import ModelConfig
from linglab.fp8 import TILE, Fp8Recipe
from linglab.fp8_convert import convert_to_fp8_inference
from linglab.generate import generate
from linglab.model import LingForCausalLM, build_model
from linglab.rl.engine import ContinuousEngine

ENGINES = ("static", "continuous")


@dataclass
class Rollout:
    """One response: the prompt ids, the tokens sampled so far (ending with EOS once `eos`) with their log pi_infer
    and the policy version (engine sync count) that sampled each, how it ended, and how often it was carried over
    unfinished."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    eos: bool = False  # ended by EOS
    truncated: bool = False  # reached its limit (`RolloutEngine.response_limit`) without EOS
    retained: int = 0
    generator: torch.Generator | None = field(default=None, repr=False, compare=False)  # None: torch's global RNG

    @property
    def done(self) -> bool:
        return self.eos or self.truncated

    @property
    def cost(self) -> int:
        """Tokens the engine sampled for it, EOS included (so a response that is only EOS still costs one): the
        response length the rewards see and the number of its tokens that train."""
        return len(self.tokens)

    @property
    def text_tokens(self) -> list[int]:
        """The tokens without the EOS: what the completion text is decoded from."""
        return self.tokens[:len(self.tokens) - int(self.eos)]


@dataclass
class RolloutGroup:
    """The G responses of one prompt, kept together for group advantages; `payload` is what the reward needs."""

    prompt: list[int]
    rollouts: list[Rollout]
    payload: object = None

    @property
    def done(self) -> bool:
        return all(r.done for r in self.rollouts)


def rollout_seed(seed: int, step: int, group: int, member: int) -> int:
    """The seed of one rollout's generator: the first 63 bits of BLAKE2b-64 of "seed:step:group:member" (`rl.seed`,
    the RL step that starts it, its group's index among the groups that step starts, its index in the group).

    A hash rather than arithmetic on the four numbers, so that nearby tuples give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{step}:{group}:{member}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def start_groups(prompts: Sequence[Sequence[int]], payloads: Sequence[object], group_size: int, seed: int, step: int,
                 first_group: int, device: str | torch.device = "cpu") -> list[RolloutGroup]:
    """New groups, group i numbered first_group + i, each member with its own generator (`rollout_seed`) on `device`."""
    groups = []
    for i, (prompt, payload) in enumerate(zip(prompts, payloads, strict=True)):
        rollouts = []
        for member in range(group_size):
            generator = torch.Generator(device=device).manual_seed(rollout_seed(seed, step, first_group + i, member))
            rollouts.append(Rollout(list(prompt), generator=generator))
        groups.append(RolloutGroup(list(prompt), rollouts, payload))
    return groups


class RolloutEngine:
    """The inference side: its own model, synced from the trainer's, sampling with recorded log pi_infer."""

    def __init__(self, model_cfg: ModelConfig, eos_id: int | Sequence[int], max_new_tokens: int, precision: str = "fp32",
                 temperature: float = 1.0, top_p: float = 1.0, device: str | torch.device = "cpu", kind: str = "static",
                 slots: int = 64):
        if precision not in ("fp32", "fp8"):
            raise ValueError(f"rollout precision must be 'fp32' or 'fp8', got {precision!r}")
        if kind not in ENGINES:
            raise ValueError(f"rollout engine must be one of {', '.join(ENGINES)}, got {kind!r}")
        self.kind, self.slots, self.continuous, self.device = kind, slots, None, torch.device(device)
        self.model = build_model(model_cfg, device=device).eval().requires_grad_(False)
        if precision == "fp8":
            convert_to_fp8_inference(self.model, Fp8Recipe())
        self.eos_id, self.max_new_tokens = eos_id, max_new_tokens
        self.precision, self.temperature, self.top_p = precision, temperature, top_p
        self.version = 0  # number of syncs: the policy version that samples new tokens
        self.work = {"prefill_tokens": 0, "decode_steps": 0, "decode_rows": 0}  # cumulative, see `generate`

    @torch.no_grad()
    def sync_weights(self, train_model: LingForCausalLM, state_dict: dict[str, torch.Tensor] | None = None) -> int:
        """Copy the trainer's weights in; with fp8, through the HF FP8 export's quantise -> dequantise (SPEC §1.6, §3):
        the weights an FP8 checkpoint holds. `state_dict`: the full weights when `train_model` holds shards
        (`ParallelDims.full_state`). Returns the bytes of the weights handed over."""
        fp8 = self.precision == "fp8"
        full = train_model.state_dict() if state_dict is None else state_dict
        tensors = ckpt.to_hf_state_dict(train_model, full, fp8=fp8)
        if fp8:
            tensors = ckpt.dequantize_hf_state_dict(tensors, TILE, "rollout sync")
        ckpt.load_state_into(self.model, tensors, "rollout sync")
        self.version += 1
        return sum(t.numel() * t.element_size() for t in full.values())

    def response_limit(self, rollout: Rollout) -> int:
        """The most tokens `rollout` may have: `max_new_tokens` for every rollout. A subclass may give each prompt
        its own (benchmarks/rl_system.py makes a response as long as its prompt's worked solution)."""
        return self.max_new_tokens

    def continue_rollouts(self, rollouts: Sequence[Rollout], stop: Callable[[], bool] | None = None) -> int:
        """Sample on for every unfinished rollout, from its prompt + tokens so far, as one batch, until each ends
        (EOS or its `response_limit`) or `stop()` says so; `stop` is asked after every token step, when the rollouts
        already hold what was sampled, so it can count completed groups (C3PO++'s budget). Each rollout draws
        from its own generator, so what it samples does not depend on the batch.

        Earlier tokens keep the log-probs recorded when they were sampled, possibly by an older policy version.
        An ending EOS is appended with its log-prob. Returns the tokens sampled (EOS included).
        """
        active = [r for r in rollouts if not r.done]
        if not active:
            return 0
        start, ends = [len(r.tokens) for r in active], [self.response_limit(r) for r in active]

        def record(result) -> None:
            for r, n0, limit, tokens, logprobs, eos, eos_logprob, eos_token in zip(
                    active, start, ends, result.tokens, result.logprobs, result.finished, result.eos_logprobs,
                    result.eos_tokens, strict=True):
                if r.eos:  # recorded, EOS included, by an earlier call of `stop`
                    continue
                k = len(r.tokens) - n0  # tokens of this call already recorded
                r.tokens += tokens[k:] + [eos_token] * int(eos)
                r.logprobs += logprobs[k:] + [eos_logprob] * int(eos)
                r.versions += [self.version] * (len(tokens) - k + int(eos))
                r.eos = eos
                r.truncated = not eos and len(r.tokens) >= limit

        def record_then_stop(result) -> bool:  # with a budget only: without one, recording once at the end does
            record(result)
            return stop()

        sequences, limits = [r.prompt + r.tokens for r in active], [end - n for end, n in zip(ends, start)]
        callback = None if stop is None else record_then_stop
        generators = [r.generator for r in active]
        if self.kind == "continuous":
            result = self.continuous_engine(max(len(s) + n for s, n in zip(sequences, limits))).run(
                sequences, limits, self.eos_id, self.temperature, self.top_p, stop=callback, generators=generators)
        else:
            result = generate(self.model, sequences, limits, self.eos_id, self.temperature, self.top_p, stop=callback,
                              generators=generators)
        record(result)
        self.work["prefill_tokens"] += result.prefill_tokens
        self.work["decode_steps"] += result.decode_steps
        self.work["decode_rows"] += result.decode_rows
        return sum(len(r.tokens) - n0 for r, n0 in zip(active, start, strict=True))

    def continuous_engine(self, needed: int) -> ContinuousEngine:
        """The slots, preallocated once for sequences of `needed` tokens (rounded up to 64), or grown when needed."""
        if self.continuous is None or self.continuous.max_len < needed:
            self.continuous = ContinuousEngine(self.model, self.slots, -(-needed // 64) * 64)
        return self.continuous

    def generate_groups(self, prompts: Sequence[Sequence[int]], group_size: int, seed: int, step: int = 0,
                        first_group: int = 0, payloads: Sequence[object] | None = None) -> list[RolloutGroup]:
        """G responses per prompt, each generated to EOS or its limit (the synchronous mode); the groups are
        numbered from `first_group` for their generators (`start_groups`)."""
        payloads = [None] * len(prompts) if payloads is None else payloads
        groups = start_groups(prompts, payloads, group_size, seed, step, first_group, self.device)
        self.continue_rollouts([r for g in groups for r in g.rollouts])
        return groups


class RolloutPool:
    """C3PO++ (SPEC §5): an inference pool of `capacity` rollouts, generation per step bounded by a token budget.

    `collect` fills the pool with new groups, samples every unfinished rollout as one batch (resumed ones from
    where they stopped), and stops at the first token step after which the groups whose G responses are all
    done hold `budget` tokens; those groups leave the pool for training. (Should every rollout end before the
    budget is met, the pool is refilled and sampling goes on.) Unfinished rollouts stay, their retention + 1,
    and the next policy version (the next `sync_weights`) resumes them; their earlier tokens keep the log-probs
    of the versions that sampled them, so IcePop/TIS see the staleness as mismatch. A rollout carried over more
    than `max_retention` times is purged with its whole group: a group's advantages need all G rewards, and its
    finished members are stale by then.

    Choices SPEC leaves open: Phi counts the response tokens (EOS included) of the groups completed in this
    step, i.e. the batch the trainer gets; Omega counts rollouts, filled G at a time with whole groups.
    """

    def __init__(self, capacity: int, budget: int, max_retention: int, group_size: int):
        if capacity < group_size:
            raise ValueError(f"pool capacity {capacity} cannot hold a group of {group_size}")
        self.capacity, self.budget, self.max_retention = capacity, budget, max_retention
        self.group_size = group_size
        self.groups: list[RolloutGroup] = []

    def open_slots(self) -> int:
        """How many new groups fit into the pool now."""
        return (self.capacity - self.group_size * len(self.groups)) // self.group_size

    def collect(self, engine: RolloutEngine, new_prompts: Callable[[int], list[tuple[list[int], object]]],
                seed: int, step: int) -> tuple[list[RolloutGroup], dict]:
        """One step's rollouts: the completed groups, and stats for the metrics.

        `new_prompts(n)` returns n (prompt ids, payload) pairs to start new groups with; they sample from generators
        of (seed, step, the index of the group among those this call starts, member) (`start_groups`).
        """
        completed: list[RolloutGroup] = []
        completed_tokens = sampled = started = 0
        resumed = sum(1 for g in self.groups for r in g.rollouts if not r.done)
        while completed_tokens < self.budget:
            fresh = new_prompts(self.open_slots())
            if fresh:
                prompts, payloads = zip(*fresh)
                self.groups += start_groups(prompts, payloads, self.group_size, seed, step, started, engine.device)
                started += len(fresh)
            active = [r for g in self.groups for r in g.rollouts if not r.done]
            if not active:
                break

            def budget_met(before: int = completed_tokens) -> bool:
                return before + sum(r.cost for g in self.groups if g.done for r in g.rollouts) >= self.budget

            sampled += engine.continue_rollouts(active, stop=budget_met)
            for group in [g for g in self.groups if g.done]:
                self.groups.remove(group)
                completed.append(group)
                completed_tokens += sum(r.cost for r in group.rollouts)

        kept, purged = [], 0
        for group in self.groups:
            for r in group.rollouts:
                r.retained += int(not r.done)
            if max(r.retained for r in group.rollouts) > self.max_retention:
                purged += 1
            else:
                kept.append(group)
        self.groups = kept
        stale = sum(v < engine.version for g in completed for r in g.rollouts for v in r.versions)
        total = sum(len(r.tokens) for g in completed for r in g.rollouts)
        stats = {"tokens_generated": sampled, "completed_tokens": completed_tokens, "resumed_rollouts": resumed,
                 "carried_groups": len(kept), "purged_groups": purged, "stale_token_fraction": stale / max(total, 1)}
        return completed, stats

    def state_dict(self) -> dict:
        """The in-flight groups and their rollouts' generator states, for an exact resume (payloads must be picklable)."""
        return {"groups": [replace(g, rollouts=[replace(r, generator=None) for r in g.rollouts]) for g in self.groups],
                "generators": [[None if r.generator is None else r.generator.get_state() for r in g.rollouts]
                               for g in self.groups]}

    def load_state_dict(self, state: dict, device: str | torch.device = "cpu") -> None:
        """The pool of `state_dict`, each rollout's generator on `device` where it stopped (a pool saved before
        rollouts had generators: torch's global RNG)."""
        self.groups = state["groups"]
        saved = state.get("generators") or [[None] * len(g.rollouts) for g in self.groups]
        for group, states in zip(self.groups, saved, strict=True):
            for rollout, generator_state in zip(group.rollouts, states, strict=True):
                rollout.generator = None
                if generator_state is not None:
                    rollout.generator = torch.Generator(device=device)
                    rollout.generator.set_state(generator_state)
