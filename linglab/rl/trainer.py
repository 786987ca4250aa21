"""RL post-training (SPEC §5) from an HF checkpoint: optional SFT, then rollouts -> rewards -> policy loss.

    linglab rl --ckpt runs/tiny/pretrain/final --out runs/tiny-rl --rl.algo=lpo --rl.correction=icepop
    linglab rl --out runs/tiny-rl --resume                                      # continue bit-exactly
    linglab rl --ckpt CKPT --out runs/rl --data gsm8k.jsonl --verifier numeric   # your own prompt file (SPEC §10)
    torchrun --nproc_per_node 2 -m linglab rl --ckpt CKPT --out runs/rl-dp2      # colocated on 2 ranks
    torchrun --nproc_per_node 2 -m linglab rl --ckpt CKPT --out runs/rl-async --rl.rollout_ranks=1 --rl.max_staleness=1

Prompts come from a prompt set (`sft.load_prompts`: `rl.data`, or the embedded tiers through the same path),
drawn in a new seeded order each epoch (`PromptStream`) and rendered through the tokenizer's chat template in
`rl.mode` (`chat.render_prompt`).

Per step: sync the rollout engine to the trainer's weights; sample whole groups of G responses (all to the
end, or C3PO++ with `rl.c3po`); reward them (`verify.verify_batch` with the run's verifier, plus optional Evo-CoT
length/format terms);
group advantages (DAPO drops groups whose responses are all right or all wrong, and samples new prompts in their
place for up to `rl.dapo_max_rounds` rounds); recompute
log pi_train(theta_old) of the rollout tokens without gradient; then `rl.ppo_epochs` AdamW steps on the
selected loss (grpo, dapo, drgrpo, gspo, lpo) times the selected correction (none, tis, icepop; k_t =
pi_train(theta_old) / pi_infer from the log-probs the engine recorded), plus the optional k3 KL to the policy
RL started from. The router's expert bias stays frozen (no balancing update; checked every step).

Log-probs on both sides are of the temperature-scaled distribution the rollouts sample from (SPEC §5: 1.0).

Logged `clip_fraction` is the share of tokens the clipped ratio pi_train / pi_train(theta_old) cut in the last
PPO epoch; with `rl.ppo_epochs = 1` that ratio is exactly 1 (the policy has not moved yet), so it is 0 by
construction. `mask_fraction` is the share of tokens IcePop's [alpha, beta] band would mask, logged under
every correction as a mismatch statistic; only `rl.correction = icepop` actually masks them. `step_time` is the
whole step; `rollout_time` its rollout phase (weight sync + generation), the figure C3PO++ targets (SPEC §5);
`sync_s` and `sync_bytes` the weight hand-over in it (seconds, bytes of the full weights); `prefill_tokens`,
`decode_steps` and `decode_rows` the engine's work (padded prompt positions prefilled, decode forwards, rows
summed over them).

Colocated under torchrun (SPEC §9's hybrid engine; docs/rl.md, "Distributed RL: colocated"): every rank trains
its FSDP2 (+ EP) shards of the policy, as `linglab train` does, and samples its share of the step's groups (group
g on rank g * N // prompts_per_step) from a full copy synced each step; rewards and advantages are per rank, each
rank's loss is its share of the loss over all ranks' rollouts (global counts), so the gradient is the
single-process one; metrics are reduced over the ranks and rank 0 writes. Every rollout draws from its own
generator (`rollout.rollout_seed`), so N ranks sample what one process samples. C3PO++, DAPO refill rounds and
SFT are single-process for now (`check_colocated`).

With `rl.rollout_ranks=R` (`linglab.rl.decoupled`; docs/rl.md, "Distributed RL: decoupled rollout ranks") the last R
ranks only generate and the others only train, as above but without a rollout engine: `collect` broadcasts the
weights to the rollout ranks and receives the groups they sampled from weights at most `rl.max_staleness` versions
old (C3PO++: the rollout rank keeps the pool, and the trainer saves the pool's state it sends);
`staleness_max` and `staleness_mean` log the lag of the trained tokens (on one process too).

A run directory holds `config.toml`, the tokenizer files, `metrics.jsonl` (`sft` rows, one `train` row per RL
step, `eval` rows before and after), `rl_start/` (the policy RL starts from, after SFT: the KL reference),
`checkpoints/step_NNNNNN/` (HF checkpoint + `rl_state.pt`: optimizer, step, RNGs, prompt stream, C3PO++
pool), `final/`, `rl_eval.json` (greedy accuracy, pass@k and ApexEval per subset: the embedded tiers or a file's
`subset` field, before vs after), `plots/`,
`report.md` and `summary.json`.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from linglab import checkpoint
from linglab.chat import render_prompt
from linglab.config import Config, RLConfig
from linglab.datasets import Example, PromptSet
from linglab.errors import LinglabError
from linglab.evals import first_per_subset
from linglab.model import LingForCausalLM, build_model
from linglab.parallel.parallel_dims import ParallelDims, init_parallel, sub_layout
from linglab.rl import losses
from linglab.rl.decoupled import RolloutLink, TrainerEnd, check_decoupled, serve_rollouts
from linglab.rl.rewards import evo_cot_length_reward, format_reward
from linglab.rl.rollout import Rollout, RolloutEngine, RolloutGroup, RolloutPool
from linglab.rl.sft import (
    check_prompt_lengths,
    check_start_checkpoint,
    eval_variants,
    evaluate_policy,
    load_prompts,
    load_start,
    read_inputs,
    sft,
    sft_examples,
    verifier_kind,
)
from linglab.run import (
    RunDir,
    build_adamw,
    refuse_pretraining_only_keys,
    releases_locks,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from linglab.tokenizer import Tokenizer
from linglab.train import optimizer_state_by_name
from linglab.verify import verify_batch

STATE_NAME = "rl_state.pt"
START_NAME = "rl_start"


class PromptStream:
    """The train prompts of a prompt set, each epoch in a new order drawn from one seeded RNG; resumable from
    `state_dict()`, which also holds a fingerprint of the prompts so a resume on a changed file is refused."""

    def __init__(self, examples: list[Example], seed: int):
        if not examples:
            raise LinglabError("rl: the prompt set has no train prompts")
        self.examples, self.rng = list(examples), random.Random(seed)
        self.epoch, self.position = 0, 0
        self.order = self._shuffled()
        digest = hashlib.blake2b(digest_size=16)
        for e in self.examples:
            digest.update(repr((e.messages, e.answer)).encode())
        self.fingerprint = digest.hexdigest()

    def _shuffled(self) -> list[int]:
        order = list(range(len(self.examples)))
        self.rng.shuffle(order)
        return order

    def next(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if self.position == len(self.order):
                self.epoch, self.position, self.order = self.epoch + 1, 0, self._shuffled()
            out.append(self.examples[self.order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "order": self.order, "position": self.position, "epoch": self.epoch,
                "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise LinglabError("rl: the train prompts differ from those the run was started with (was rl.data edited?); "
                               "start a new run")
        self.rng.setstate(state["rng"])
        self.order, self.position, self.epoch = list(state["order"]), state["position"], state["epoch"]


# ---------------------------------------------------------------- rewards, batches, losses


def rollout_rewards(cfg: RLConfig, completions: list[str], answers: list[str], lengths: Tensor,
                    kind: str = "numeric") -> tuple[Tensor, Tensor, dict[str, int]]:
    """(reward [B], correct [B], verifier problem counts) of SPEC §5: correctness (`verify.verify_batch` of `kind`)
    + alpha * Evo-CoT length term + format term (read in `rl.mode`) + DAPO overlong.

    `lengths` are the tokens sampled for each response, its EOS included (`Rollout.cost`): what trains.
    """
    verdicts, problems = verify_batch(completions, answers, kind, workers=cfg.reward_workers)
    correct = torch.tensor(verdicts, dtype=torch.bool)
    reward = correct.float()
    if cfg.length_alpha > 0:
        reward = reward + evo_cot_length_reward(lengths, correct, cfg.group_size, cfg.length_alpha)
    if cfg.format_reward:
        reward = reward + torch.tensor([format_reward(c, instant=cfg.mode == "instant") for c in completions])
    if cfg.dapo_overlong_cache > 0:
        reward = reward + losses.overlong_penalty(lengths, cfg.max_new_tokens, cfg.dapo_overlong_cache)
    return reward, correct, problems


@dataclass
class RolloutBatch:
    """Rollouts as padded next-token tensors [B, L]: response tokens, an ending EOS included, are the targets where
    `mask` is set."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor  # bool, the response tokens among the targets
    infer_logp: Tensor  # log pi_infer recorded at sampling, 0 off the response
    sentence_ids: Tensor | None  # LPO sentence of each response token, -1 elsewhere

    def rows(self, index: Tensor) -> RolloutBatch:
        ids = None if self.sentence_ids is None else self.sentence_ids[index]
        return RolloutBatch(self.inputs[index], self.targets[index], self.mask[index], self.infer_logp[index], ids)

    def to(self, device: torch.device) -> RolloutBatch:
        ids = None if self.sentence_ids is None else self.sentence_ids.to(device)
        return RolloutBatch(self.inputs.to(device), self.targets.to(device), self.mask.to(device),
                            self.infer_logp.to(device), ids)


def rollout_batch(rollouts: list[Rollout], pad_id: int, tokenizer: Tokenizer | None = None) -> RolloutBatch:
    """Pad prompt + response of each rollout; with a tokenizer, number the LPO sentences of each decoded response
    and give each token the sentence its text begins in (`losses.token_offsets`; the EOS joins the last one)."""
    length = max(len(r.prompt) + len(r.tokens) for r in rollouts) - 1
    inputs = torch.full((len(rollouts), max(length, 1)), pad_id, dtype=torch.long)
    targets, mask = inputs.clone(), torch.zeros(inputs.shape, dtype=torch.bool)
    infer_logp, sentence_ids = torch.zeros(inputs.shape), torch.full(inputs.shape, -1, dtype=torch.long)
    for b, r in enumerate(rollouts):
        seq = torch.tensor(r.prompt + r.tokens)
        inputs[b, :len(seq) - 1], targets[b, :len(seq) - 1] = seq[:-1], seq[1:]
        response = slice(len(r.prompt) - 1, len(seq) - 1)  # targets[i] is token i + 1 of the sequence
        mask[b, response] = True
        infer_logp[b, response] = torch.tensor(r.logprobs)
        if tokenizer is not None and r.tokens:
            sentence_ids[b, response] = torch.tensor(losses.sentence_ids(*losses.token_offsets(tokenizer.decode, r.tokens)))
    return RolloutBatch(inputs, targets, mask, infer_logp, sentence_ids if tokenizer is not None else None)


def policy_logprobs(model: LingForCausalLM, batch: RolloutBatch, temperature: float,
                    with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """log pi(target) [B, L] under the temperature-scaled softmax, and the per-position entropy if asked."""
    logp_all = F.log_softmax(model(batch.inputs).float() / temperature, dim=-1)
    logp = logp_all.gather(-1, batch.targets[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logp, entropy


def algo_eps(cfg: RLConfig) -> tuple[float, float]:
    """(eps_low, eps_high) of the selected loss (SPEC §5 defaults in RLConfig)."""
    return {"grpo": (cfg.grpo_eps, cfg.grpo_eps), "dapo": (cfg.dapo_eps_low, cfg.dapo_eps_high),
            "drgrpo": (cfg.drgrpo_eps, cfg.drgrpo_eps), "gspo": (cfg.gspo_eps_low, cfg.gspo_eps_high),
            "lpo": (cfg.lpo_eps, cfg.lpo_eps)}[cfg.algo]


def policy_loss(cfg: RLConfig, logp: Tensor, old_logp: Tensor, advantages: Tensor, batch: RolloutBatch,
                token_weights: Tensor | None) -> Tensor:
    """The selected SPEC §5 loss (-J) of a rollout batch."""
    low, high = algo_eps(cfg)
    args = (logp, old_logp, advantages, batch.mask)
    if cfg.algo == "grpo":
        return losses.grpo_loss(*args, eps=low, token_weights=token_weights)
    if cfg.algo == "dapo":
        return losses.dapo_loss(*args, eps_low=low, eps_high=high, token_weights=token_weights)
    if cfg.algo == "drgrpo":
        return losses.drgrpo_loss(*args, eps=low, max_len=cfg.max_new_tokens, token_weights=token_weights)
    if cfg.algo == "gspo":
        return losses.gspo_loss(*args, eps_low=low, eps_high=high, token_weights=token_weights)
    return losses.lpo_loss(*args, batch.sentence_ids, eps=low, token_weights=token_weights)


def _token_count(mask: Tensor) -> Tensor:
    """Response tokens, each response counted as at least 1 (as the losses divide)."""
    return mask.float().sum(-1).clamp(min=1).sum()


def policy_loss_count(algo: str, mask: Tensor) -> float:
    """What the selected loss divides its summed terms by, up to constants: the response tokens (DAPO and LPO, token
    means over the batch) or the responses (GRPO and GSPO, means over responses; Dr.GRPO, responses x max_len)."""
    return float(_token_count(mask)) if algo in ("dapo", "lpo") else float(mask.shape[0])


def policy_ratio(cfg: RLConfig, logp: Tensor, old_logp: Tensor, batch: RolloutBatch) -> Tensor:
    """The ratio the selected loss clips: per token [B, L], per response [B, 1] (GSPO) or per sentence (LPO)."""
    if cfg.algo == "gspo":
        return losses.sequence_ratio(logp, old_logp, batch.mask)[:, None]
    if cfg.algo == "lpo":
        return losses.sentence_ratio(logp, old_logp, batch.mask, batch.sentence_ids)
    return torch.exp(torch.where(batch.mask, logp - old_logp, 0.0))


def correction_weights(cfg: RLConfig, train_logp_old: Tensor, infer_logp: Tensor) -> Tensor | None:
    """Per-token weights of the mismatch correction: IcePop M(k_t), TIS min(k_t, C), or None."""
    if cfg.correction == "icepop":
        return losses.icepop_mask(train_logp_old, infer_logp, cfg.icepop_alpha, cfg.icepop_beta)
    if cfg.correction == "tis":
        return losses.tis_weights(train_logp_old, infer_logp, cfg.tis_cap)
    return None


def group_rewards(cfg: RLConfig, tokenizer: Tokenizer, verifier: str, groups: list[RolloutGroup]
                  ) -> tuple[Tensor, Tensor, dict[str, int]]:
    """`rollout_rewards` of every rollout of `groups`, in order: (reward, correct, verifier problem counts)."""
    rollouts = [r for g in groups for r in g.rollouts]
    completions = [tokenizer.decode(r.text_tokens) for r in rollouts]
    lengths = torch.tensor([r.cost for r in rollouts])  # EOS included: the tokens that train
    return rollout_rewards(cfg, completions, [g.payload.answer for g in groups for _ in g.rollouts], lengths, verifier)


def dapo_refill(cfg: RLConfig, tokenizer: Tokenizer, verifier: str, groups: list[RolloutGroup],
                generate_groups) -> tuple[list[RolloutGroup], int]:
    """DAPO dynamic sampling (SPEC §5): while fewer than `prompts_per_step` groups have responses both right and
    wrong, generate as many new groups as are missing (`generate_groups(n, first_group)`, numbered on from the
    groups so far), for at most `rl.dapo_max_rounds` rounds. Returns every group sampled (`score` keeps the mixed
    ones) and the rounds spent. Run by the process that generates: the trainer, or a rollout rank.

    Correctness decides, not the total reward: a group all right or all wrong has no signal about what is right,
    even when its length or format terms differ.
    """
    def mixed(batch: list[RolloutGroup]) -> int:
        _, correct, _ = group_rewards(cfg, tokenizer, verifier, batch)
        return int(losses.dapo_keep_groups(correct, cfg.group_size).view(-1, cfg.group_size)[:, 0].sum())

    found, rounds = mixed(groups), 0
    while found < cfg.prompts_per_step and rounds < cfg.dapo_max_rounds:
        more = generate_groups(cfg.prompts_per_step - found, len(groups))
        found += mixed(more)
        groups, rounds = groups + more, rounds + 1
    return groups, rounds


def encode_prompts(tokenizer: Tokenizer, cfg: RLConfig, examples: list[Example]) -> list[list[int]]:
    """The prompt ids of `examples`: each through the chat template in `rl.mode`."""
    return tokenizer.encode_batch([render_prompt(tokenizer, e.chat(), cfg.mode, cfg.system_prompt) for e in examples])


def rollout_engine(cfg: RLConfig, model_cfg, tokenizer: Tokenizer, device: torch.device) -> RolloutEngine:
    """The run's inference engine (`rl.rollout_engine`, `rl.rollout_precision`, sampling settings)."""
    return RolloutEngine(model_cfg, tokenizer.stop_ids, cfg.max_new_tokens, cfg.rollout_precision, cfg.temperature,
                         cfg.top_p, device=device, kind=cfg.rollout_engine, slots=cfg.rollout_slots)


def _expert_biases(model: LingForCausalLM) -> dict[str, Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers() if name.endswith("expert_bias")}


# ---------------------------------------------------------------- the trainer


@dataclass
class ScoredRollouts:
    """A step's rollouts after `RLTrainer.score`: rewards, the groups kept for training, the padded batch, the
    trainer's log-probs at theta_old and the reference's, and the step's metrics so far."""

    rewards: Tensor
    keep: Tensor  # bool per rollout: its group trains (DAPO drops groups all right or all wrong)
    batch: RolloutBatch
    old_logp: Tensor
    ref_logp: Tensor
    row: dict


class RLTrainer:
    """The state of one RL run: policy, rollout engine (and C3PO++ pool), reference, optimizer, RNGs, metrics.

    A step follows the recipe (SPEC §5): `collect` (weight sync + rollouts), `score` (rewards, advantages' groups,
    old and reference log-probs, mismatch statistics), `update` (the PPO epochs of the selected loss).

    Colocated on several ranks (`dims`, see the module docstring): the policy is FSDP2-sharded (+ EP) as
    `linglab train` shards it, and each rank keeps a full copy in its rollout engine and its own full reference.
    Only rank 0 writes.
    """

    def __init__(self, cfg: RLConfig, run: RunDir, model: LingForCausalLM, reference: LingForCausalLM,
                 tokenizer: Tokenizer, prompts: PromptSet, log=print, dims: ParallelDims | None = None,
                 rollout_ranks: TrainerEnd | None = None):
        self.dims = dims or ParallelDims()
        self.rollout_ranks = rollout_ranks
        model = self.dims.parallelize(model)  # before the optimizer, which then holds this rank's shards
        self.cfg, self.run, self.model, self.tokenizer = cfg, run, model, tokenizer
        self.log = log if self.dims.is_main else _quiet
        self.reference = reference.eval().requires_grad_(False)
        self.device = self.dims.device if self.dims.world > 1 else model.lm_head.weight.device
        self.engine = None if rollout_ranks is not None else rollout_engine(cfg, model.cfg, tokenizer, self.device)
        self.pool = (RolloutPool(cfg.c3po_capacity, cfg.c3po_budget, cfg.c3po_max_retention, cfg.group_size)
                     if cfg.c3po and rollout_ranks is None else None)  # with rollout ranks, theirs
        self.optimizer = build_adamw(model.parameters(), cfg.lr, (cfg.beta1, cfg.beta2), cfg.weight_decay)
        self.prompts = PromptStream(prompts.train, cfg.seed)
        self.verifier = verifier_kind(cfg, prompts)
        self.step = 0
        self.counters = {"tokens_generated": 0, "elapsed": 0.0}
        self.frozen_bias = _expert_biases(model)

    # -- state

    def save(self) -> Path | None:
        """HF checkpoint + rl_state.pt, written atomically by rank 0 (collective: the full state is gathered as
        `linglab train` gathers it, AdamW keyed by parameter name, so any layout resumes it); prunes all but the last
        `keep_last`. Its path on rank 0, None elsewhere."""
        model_state, optimizer_state = self.dims.full_state(self.model, self.optimizer)
        pool = self.pool.state_dict() if self.pool is not None else None
        if self.rollout_ranks is not None and self.cfg.c3po:
            pool = self.rollout_ranks.pool_state
        state = {"step": self.step, "optimizer": optimizer_state, "rng": rng_state(), "prompts": self.prompts.state_dict(),
                 "pool": pool, "engine_version": self.step,
                 "counters": dict(self.counters)}
        return self.dims.on_main(lambda: self.run.save_checkpoint(self.step, self.model, self.tokenizer, state,
                                                                  self.cfg.keep_last, model_state=model_state))

    def resume(self) -> Path | None:
        """Restore the newest intact checkpoint (weights, optimizer, RNGs, prompt stream, pool); None if there is none.
        One that does not load is skipped with a warning for the one before it. Every rank reads the full checkpoint
        and keeps its shards."""
        path = self.run.load_newest(self._load_checkpoint, self.log)
        if path is not None and self.dims.is_main:
            self.run.truncate_metrics(self.step)
        return path

    def _load_checkpoint(self, path: Path) -> None:
        cfg = self.model.cfg
        expected = build_model(cfg, device="meta").state_dict()  # single-device names and shapes
        model_state = checkpoint.checked_state_dict(checkpoint.load_hf_tensors(path), cfg, expected, str(path))
        state = self.run.load_state(path)
        try:
            optimizer_state = optimizer_state_by_name(state["optimizer"], self.model, self.optimizer)
            self.dims.load_full_state(self.model, self.optimizer, model_state, optimizer_state,
                                      every_parameter_trained=False)
            pool = state["pool"]
        except (RuntimeError, KeyError, ValueError) as e:
            raise checkpoint.CheckpointError(f"checkpoint {path}: unreadable RL state ({e})") from None
        if (pool is None) == self.cfg.c3po:
            raise LinglabError(f"rl: {path} was written with rl.c3po={pool is not None}; resume with the same")
        self.step = state["step"]
        if self.engine is not None:
            self.engine.version = state["engine_version"]
        self.prompts.load_state_dict(state["prompts"])
        if self.pool is not None:
            self.pool.load_state_dict(pool, self.device)
        elif self.rollout_ranks is not None:  # for the rollout rank's pool (`TrainerEnd.begin`)
            self.rollout_ranks.pool_state = pool
        self.counters.update(state["counters"])
        set_rng_state(state["rng"])

    # -- one step: collect, score, update

    def _new_prompts(self, n: int) -> list[tuple[list[int], Example]]:
        """n (prompt ids, example) pairs: the next examples of the stream through the chat template (`rl.mode`)."""
        examples = self.prompts.next(n)
        return list(zip(encode_prompts(self.tokenizer, self.cfg, examples), examples))

    def collect(self) -> tuple[list[RolloutGroup], dict]:
        """Sync the engine to the trainer's weights, then this step's groups: C3PO++ from the pool, or
        `prompts_per_step` groups generated to completion (with DAPO, refilled: `dynamic_sampling`); on several
        ranks, this rank's share of them. Returns the groups this rank sampled, with the weight sync's time and
        bytes and the engine's work counters (summed over the ranks). With rollout ranks: broadcast the weights
        to them, and receive the groups they sampled (`decoupled.TrainerEnd`)."""
        if self.rollout_ranks is not None:
            sync = self.rollout_ranks.publish(self.model, self.step)
            groups, stats = self.rollout_ranks.receive(self.step, self._new_prompts)
            totals = self.dims.sum(torch.tensor([float(v) for v in stats.values()], dtype=torch.float64)).tolist()
            return groups, {**sync, **{k: type(stats[k])(v) for k, v in zip(stats, totals)}}
        sync = self.sync_weights()
        work_before = dict(self.engine.work)
        if self.pool is not None:
            groups, stats = self.pool.collect(self.engine, self._new_prompts, self.cfg.seed, self.step)
        else:
            groups, stats = self._generate_groups(self.cfg.prompts_per_step, 0), {}
            if self.cfg.algo == "dapo":
                groups, stats = self.dynamic_sampling(groups)
            stats["tokens_generated"] = sum(r.cost for g in groups for r in g.rollouts)
        stats.update({k: v - work_before[k] for k, v in self.engine.work.items()})
        work = ("tokens_generated", *self.engine.work)
        totals = self.dims.sum(torch.tensor([float(stats[k]) for k in work])).tolist()
        stats.update({k: int(v) for k, v in zip(work, totals)})
        return groups, {**sync, **stats}

    def sync_weights(self) -> dict:
        """The step's weight hand-over, timed: the trainer's weights (on several ranks, its FSDP2 shards gathered
        into full tensors) into the rollout engine's full copy. {sync_s, sync_bytes} (bytes of the full weights)."""
        start = time.perf_counter()
        full = None if self.dims.world == 1 else self.dims.full_state(self.model)[0]
        sent = self.engine.sync_weights(self.model, full)
        return {"sync_s": time.perf_counter() - start, "sync_bytes": sent}

    def _generate_groups(self, n: int, first_group: int) -> list[RolloutGroup]:
        """n new groups of this step, numbered from `first_group`; every rank draws all n prompts (the stream stays
        the same everywhere) and samples its share: group g on rank g * W // n (contiguous; a group never straddles
        ranks)."""
        pairs = self._new_prompts(n)
        mine = [g for g in range(n) if g * self.dims.world // n == self.dims.rank]
        prompts, payloads = zip(*[pairs[g] for g in mine])
        return self.engine.generate_groups(prompts, self.cfg.group_size, self.cfg.seed, self.step,
                                           first_group + mine[0], payloads)

    def dynamic_sampling(self, groups: list[RolloutGroup]) -> tuple[list[RolloutGroup], dict]:
        """DAPO's refill rounds (`dapo_refill`) on this process; returns every group sampled and the rounds spent."""
        groups, rounds = dapo_refill(self.cfg, self.tokenizer, self.verifier, groups, self._generate_groups)
        return groups, {"dapo_rounds": rounds}

    @torch.no_grad()
    def score(self, groups: list[RolloutGroup]) -> ScoredRollouts:
        """Rewards (the verifier plus optional length/format terms), the groups that train, and log pi_train(theta_old)
        and log pi_ref of every rollout token; the step's reward, accuracy and mismatch metrics."""
        cfg, model = self.cfg, self.model
        rollouts = [r for g in groups for r in g.rollouts]
        lengths = torch.tensor([r.cost for r in rollouts])
        rewards, correct, problems = group_rewards(cfg, self.tokenizer, self.verifier, groups)
        keep = (losses.dapo_keep_groups(correct, cfg.group_size) if cfg.algo == "dapo"
                else torch.ones(len(rollouts), dtype=torch.bool))
        batch = rollout_batch(rollouts, self.tokenizer.pad_id,
                              self.tokenizer if cfg.algo == "lpo" else None).to(self.device)
        model.eval()
        old_logp, entropy = policy_logprobs(model, batch, cfg.temperature, with_entropy=True)
        ref_logp, _ = policy_logprobs(self.reference, batch, cfg.temperature)  # also logged when kl_coef = 0
        response = batch.mask
        # The step's metrics are of all ranks' rollouts together: each rank's, in rank (= group) order, concatenated.
        mine = {"rewards": rewards, "correct": correct, "lengths": lengths, "keep": keep,
                "truncated": torch.tensor([r.truncated for r in rollouts]),
                "tiers": [g.payload.subset for g in groups for _ in g.rollouts], "problems": problems,
                "entropy": entropy[response].cpu(), "train_logp": old_logp[response].cpu(),
                "infer_logp": batch.infer_logp[response].cpu(), "ref_logp": ref_logp[response].cpu(),
                "staleness": self._staleness(rollouts, keep)}
        every = self.dims.gather_objects(mine)
        cat = {k: torch.cat([r[k] for r in every]) for k in mine if k not in ("tiers", "problems")}
        tiers = [t for r in every for t in r["tiers"]]
        tokens = torch.ones_like(cat["entropy"], dtype=torch.bool)
        mismatch = losses.mismatch_stats(cat["train_logp"], cat["infer_logp"], tokens, cfg.icepop_alpha,
                                         cfg.icepop_beta)
        correct_all = cat["correct"].tolist()
        row = {"reward": cat["rewards"].mean().item(), "accuracy": cat["correct"].float().mean().item(),
               "accuracy_by_tier": {t: float(np.mean([c for c, tt in zip(correct_all, tiers) if tt == t]))
                                    for t in dict.fromkeys(tiers)},
               "response_length": cat["lengths"].float().mean().item(), "response_tokens": int(cat["lengths"].sum()),
               "truncated_fraction": cat["truncated"].float().mean().item(),
               "entropy": cat["entropy"].mean().item() if tokens.any() else 0.0,
               "kl": losses.k3_kl(cat["train_logp"], cat["ref_logp"], tokens).item(),
               "mask_fraction": mismatch["icepop_mask_fraction"], "mean_abs_logdiff": mismatch["mean_abs_logdiff"],
               "max_abs_logdiff": mismatch["max_abs_logdiff"], "groups_sampled": len(cat["rewards"]) // cfg.group_size,
               "groups_trained": int(cat["keep"].sum()) // cfg.group_size,
               "staleness_max": int(cat["staleness"].max()) if len(cat["staleness"]) else 0,
               "staleness_mean": cat["staleness"].float().mean().item() if len(cat["staleness"]) else 0.0,
               **{k: sum(r["problems"].get(k, 0) for r in every) for k in problems}}
        return ScoredRollouts(rewards, keep, batch, old_logp, ref_logp, row)

    def _staleness(self, rollouts: list[Rollout], keep: Tensor) -> Tensor:
        """Per trained token, how many versions its policy lags the one this step trains (step + 1 after `step`
        optimizer steps); with rollout ranks, checked against `rl.max_staleness` plus the carry-overs of its group
        (C3PO++: a group carried k times began k steps before the step that finished it)."""
        lags = torch.tensor([self.step + 1 - v for r, k in zip(rollouts, keep.tolist(), strict=True) if k
                             for v in r.versions], dtype=torch.long)
        if self.rollout_ranks is None:
            return lags
        size = self.cfg.group_size
        for first in range(0, len(rollouts), size):
            group = [r for r, k in zip(rollouts[first:first + size], keep[first:first + size].tolist()) if k]
            carried = max((r.retained for r in group), default=0)
            lag = self.step + 1 - min((v for r in group for v in r.versions), default=self.step + 1)
            if lag > self.cfg.max_staleness + carried:
                raise RuntimeError(f"rl: step {self.step} trains a token {lag} versions old, beyond "
                                   f"rl.max_staleness={self.cfg.max_staleness} + {carried} carry-over(s)")
        return lags

    def update(self, scored: ScoredRollouts) -> dict:
        """`rl.ppo_epochs` AdamW steps on the selected loss times the mismatch correction (+ k3 KL) over the kept
        groups; {loss, grad_norm, clip_fraction}, all None when no group trains (on any rank).

        On several ranks each rank's loss is rescaled to its share of the loss over every rank's rollouts
        (`loss_shares`), so FSDP2's gradient average is the single-process gradient; the clip norm is global."""
        cfg, model, dims = self.cfg, self.model, self.dims
        kept = int(dims.sum(scored.keep.sum()[None].float()).item())
        if not kept:
            return {"loss": None, "grad_norm": None, "clip_fraction": None}
        keep = scored.keep
        if not keep.any():  # others train: this rank runs the same collectives on its first group, weighted 0
            keep = torch.arange(len(keep)) < cfg.group_size
        index = keep.nonzero().squeeze(-1)
        scale = "none" if cfg.algo == "drgrpo" else "std"
        advantages = losses.group_advantages(scored.rewards[index], cfg.group_size, scale=scale).to(self.device)
        index = index.to(self.device)
        batch, old, ref = scored.batch.rows(index), scored.old_logp[index], scored.ref_logp[index]
        weights = correction_weights(cfg, old, batch.infer_logp)
        shares = self.loss_shares(batch.mask, counted=scored.keep.any())
        model.train()
        for _ in range(cfg.ppo_epochs):
            logp, _ = policy_logprobs(model, batch, cfg.temperature)
            objective = policy_loss(cfg, logp, old, advantages, batch, weights)
            kl = losses.k3_kl(logp, ref, batch.mask) if cfg.kl_coef > 0 else None
            if shares is not None:  # several ranks (a single process keeps its loss exactly as it is)
                objective = objective * shares[0]
                kl = None if kl is None else kl * shares[1]
            if kl is not None:
                objective = objective + cfg.kl_coef * kl
            objective.backward()
            grad_norm = dims.clip_grad_norm_(model, cfg.grad_clip).item()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                clip = losses.clip_fraction(policy_ratio(cfg, logp.detach(), old, batch), advantages, batch.mask,
                                            *algo_eps(cfg))
        if dims.world == 1:
            return {"loss": objective.item(), "grad_norm": grad_norm, "clip_fraction": clip}
        tokens = float(batch.mask.sum()) if scored.keep.any() else 0.0
        loss, clipped, counted = dims.sum(torch.tensor([objective.item() / dims.world, clip * tokens, tokens])).tolist()
        return {"loss": loss, "grad_norm": grad_norm, "clip_fraction": clipped / max(counted, 1.0)}

    def loss_shares(self, mask: Tensor, counted: bool) -> tuple[float, float] | None:
        """On several ranks, the factors (policy loss, KL) that make this rank's loss its share of the global one;
        None in a single process.

        Each loss divides a sum over this rank's rollouts by a count c (`policy_loss_count`); the single-process
        loss divides the sum over all rollouts by the global count C (all_reduce). With the factor c * W / C,
        FSDP2's average over the W ranks is the global loss. `counted=False`: a rank with no group to train, 0.
        """
        if self.dims.world == 1:
            return None
        local = torch.tensor([policy_loss_count(self.cfg.algo, mask), float(_token_count(mask))], dtype=torch.float64)
        local = local * float(counted)
        total = self.dims.sum(local)
        return tuple((local * self.dims.world / total.clamp(min=1)).tolist())

    def train_step(self) -> dict:
        """One RL step: collect, score, update (see the module docstring); returns its metrics row."""
        start = time.perf_counter()
        groups, rollout_stats = self.collect()
        rollout_time = time.perf_counter() - start
        scored = self.score(groups)
        updated = self.update(scored)
        self._check_bias_frozen()
        self.step += 1
        elapsed = time.perf_counter() - start
        self.counters["elapsed"] += elapsed
        self.counters["tokens_generated"] += rollout_stats["tokens_generated"]
        return {"kind": "train", "step": self.step, "lr": self.cfg.lr, **scored.row, **rollout_stats, **updated,
                "skipped": updated["loss"] is None, "step_time": elapsed, "rollout_time": rollout_time,
                "time": self.counters["elapsed"], "total_tokens_generated": self.counters["tokens_generated"]}

    def full_model(self) -> LingForCausalLM | None:
        """The policy on one device, for evaluation: the model itself in a single process; on several ranks a copy on
        rank 0 from the gathered weights (collective), None on the other ranks."""
        if self.dims.world == 1:
            return self.model
        model_state, _ = self.dims.full_state(self.model)
        if not self.dims.is_main:
            return None
        full = build_model(self.model.cfg, device=self.device)
        full.load_state_dict(model_state)
        return full

    def _check_bias_frozen(self) -> None:
        for name, bias in _expert_biases(self.model).items():
            if not torch.equal(bias, self.frozen_bias[name]):
                raise LinglabError(f"rl: router {name} changed during RL; SPEC §5 keeps it frozen")

    def fit(self) -> None:
        """Train to rl.steps, a metrics row per step, checkpoints every rl.ckpt_every steps and at the end."""
        if self.rollout_ranks is None:
            self._train()
            return
        self.rollout_ranks.begin(self.step, self.prompts.state_dict())  # also when there is no step left to run
        try:
            self._train()
        except Exception as e:  # the rollout ranks stop with it, rather than wait for weights that never come
            self.rollout_ranks.end(self.step, e)
            raise
        self.rollout_ranks.end(self.step)

    def _train(self) -> None:
        while self.step < self.cfg.steps:
            row = self.train_step()
            if self.dims.is_main:
                self.run.append_metrics(row)
            self.log(f"step {self.step}/{self.cfg.steps} reward {row['reward']:.3f} acc {row['accuracy']:.2f} "
                     f"len {row['response_length']:.0f} |dlogp| {row['mean_abs_logdiff']:.0e} "
                     f"mask {row['mask_fraction']:.2%} sync {row['sync_s']:.2f}s {row['step_time']:.1f}s"
                     + (" (no update)" if row["skipped"] else ""))
            if self.step % self.cfg.ckpt_every == 0 or self.step == self.cfg.steps:
                self.save()


def _reraise(error: BaseException | None) -> None:
    if error is not None:
        raise error


def _quiet(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


# ---------------------------------------------------------------- entry point


def check_colocated(cfg: Config, dims: ParallelDims) -> None:
    """One line, before anything is written, for what colocated RL on several ranks does not run (yet)."""
    rl, world = cfg.rl, dims.world
    if world == 1:
        return
    if dims.pp > 1:
        raise LinglabError(f"rl: parallel.pp={dims.pp}: RL shards the policy with FSDP2 (+ parallel.ep), not in "
                           "pipeline stages; use parallel.pp=1")
    if rl.c3po:
        raise LinglabError(f"rl: rl.c3po on {world} ranks is not supported yet (colocated RL samples whole groups "
                           "synchronously); run C3PO++ on one process")
    if rl.algo == "dapo" and rl.dapo_max_rounds > 0:
        raise LinglabError(f"rl: DAPO refill rounds (rl.dapo_max_rounds={rl.dapo_max_rounds}) on {world} ranks are "
                           "not supported yet; set rl.dapo_max_rounds=0 or run on one process")
    if rl.prompts_per_step % world:
        raise LinglabError(f"rl: rl.prompts_per_step={rl.prompts_per_step} groups do not split evenly over {world} "
                           "ranks; make it a multiple of the number of ranks")
    if rl.sft_steps:
        raise LinglabError(f"rl: rl.sft_steps={rl.sft_steps} on {world} ranks: SFT runs on one process; run "
                           "`linglab sft` first and start RL from its checkpoint (--ckpt) with rl.sft_steps=0")


@releases_locks
def run_rl(cfg: Config, ckpt: str | Path | None, out: str | Path, resume: bool = False, overwrite: bool = False,
           console=None, command: str = "") -> dict:
    """The whole job: [SFT], RL steps with checkpoints, before/after evaluation, rl_eval.json, plots, report.

    Under torchrun every rank runs this (colocated: each trains and generates its share, see the module docstring;
    with `rl.rollout_ranks`, the last ranks only generate: `linglab.rl.decoupled`); rank 0 alone prints and writes.
    """
    dims = init_parallel(cfg.parallel, resolve_device(cfg.train.device, "rl"), command="rl")
    try:
        (check_decoupled if cfg.rl.rollout_ranks else check_colocated)(cfg, dims)
        return _run(cfg, ckpt, RunDir(out, "rl", STATE_NAME), dims, resume, overwrite, console, command)
    finally:
        dims.close()


def _run(cfg: Config, ckpt: str | Path | None, run: RunDir, dims: ParallelDims, resume: bool, overwrite: bool,
         console, command: str) -> dict:
    from rich.console import Console

    from linglab.rl.report import write_rl_report

    rl = cfg.rl
    console = console or Console()
    if not dims.is_main:
        console = Console(quiet=True)
    start_dir = run.path / START_NAME
    device = dims.device

    def check() -> dict:
        # Everything is read and checked before --out is touched: the start checkpoint, the prompt set and its
        # variants, --out itself.
        refuse_pretraining_only_keys(cfg.train, "rl")
        if not resume:
            if ckpt is None:
                raise LinglabError("rl: --ckpt is required to start a run")
            check_start_checkpoint(ckpt, "rl")
        run.check(resume, overwrite, inputs=[] if resume else read_inputs(rl, ckpt))
        run.lock()
        if not resume:
            return {}
        if not (start_dir / checkpoint.CONFIG_NAME).is_file():
            raise LinglabError(f"rl: {run.path} has no {START_NAME}/ to resume from; start over with --ckpt and --overwrite")
        return run.resume_changes(cfg)

    changes = dims.on_main(check)
    source = start_dir if resume else Path(ckpt)
    model, tokenizer = load_start(source, device, "rl")
    prompts = load_prompts(rl)
    unanswered = next((e for e in prompts.train + prompts.heldout if not e.answer.strip()), None)
    if unanswered is not None:
        raise LinglabError(f"rl: {unanswered.source}: no reference answer; RL rewards and the evaluation need one "
                           "(an `answer` field, or rl.answer_field)")
    eval_variants(rl, prompts)
    check_prompt_lengths(prompts.train + first_per_subset(prompts.heldout, rl.eval_problems), tokenizer, rl,
                         model.cfg.max_position_embeddings, "rl")
    examples = sft_examples(rl, prompts) if rl.sft_steps and not resume else []
    if prompts.skipped:
        console.print(f"[yellow]skipped {prompts.skipped} malformed row(s) of {rl.data}, e.g. {prompts.skipped_reasons[0]}")
    seed_everything(rl.seed)

    def begin() -> None:  # rank 0, while the others wait: the run directory, the evaluation before, SFT, rl_start/
        run.begin(resume, overwrite)
        if resume:
            return
        run.write_config(cfg)
        tokenizer.save(run.path)
        run.metrics_path.write_text("")
        if rl.eval_problems:
            console.print(f"evaluating {source} before RL")
            run.append_metrics(evaluate_policy(model, tokenizer, rl, prompts, "before", 0))
        if rl.sft_steps:
            console.print(f"SFT: {rl.sft_steps} steps on {len(examples)} worked solutions")
            sft(model, tokenizer, rl, examples, run.append_metrics)
            if rl.eval_problems:
                run.append_metrics(evaluate_policy(model, tokenizer, rl, prompts, "sft", 0))

        def write_start(tmp: Path) -> None:
            checkpoint.write_model_files(model, tmp)
            tokenizer.save(tmp)

        checkpoint.write_atomically(start_dir, write_start)

    link = RolloutLink.for_run(cfg, dims) if rl.rollout_ranks else None
    trainer_dims = dims if link is None else sub_layout(dims, link.trainers)  # with rollout ranks: the trainer ranks
    if link is not None and not link.is_trainer:
        return _serve(cfg, run, dims, link, model, tokenizer, prompts)

    def setup() -> RLTrainer:
        trainer_dims.on_main(begin)
        rollout_ranks = None if link is None else TrainerEnd(link, trainer_dims)
        trainer = RLTrainer(rl, run, model, checkpoint.from_pretrained(start_dir, device=device), tokenizer, prompts,
                            log=console.print, dims=trainer_dims, rollout_ranks=rollout_ranks)
        if resume:
            resumed_from = trainer.resume()
            console.print(f"resumed from {resumed_from}" if resumed_from else "no RL checkpoint yet: starting from step 0")

            def record_resume() -> None:  # only now, with the resume known to succeed, is the run written
                if resumed_from is None:
                    run.truncate_metrics(0)
                run.write_config(cfg)  # with the changes a resume may make
                run.append_metrics({"kind": "resume", "step": trainer.step, "from": str(resumed_from),
                                    "changes": {k: list(v) for k, v in changes.items()}, "command": command})

            trainer_dims.on_main(record_resume)
        return trainer

    failure = None
    try:
        trainer = setup()
    except BaseException as e:
        failure = e
    try:
        if link is not None:  # the rollout ranks wait for the trainers' setup, and hear of rank 0's failure
            dims.on_main(lambda: _reraise(failure))
        _reraise(failure)
    except BaseException:
        if dims.is_main:
            run.rollback()
        raise
    dims.on_main(run.commit)
    ranks = f" on {dims.world} ranks (dp={dims.dp}, ep={dims.ep})" if dims.world > 1 else ""
    if link is not None:
        ranks = f" on {link.trainers} trainer + {rl.rollout_ranks} rollout rank(s), max staleness {rl.max_staleness}"
    console.print(f"RL: {rl.algo} + {rl.correction}, {rl.rollout_precision} rollouts"
                  f"{' (C3PO++)' if rl.c3po else ''}, {rl.steps} steps{ranks} -> {run.path}")
    trainer.fit()

    summary = {"steps": trainer.step, "algo": rl.algo, "correction": rl.correction,
               "rollout_precision": rl.rollout_precision, "c3po": rl.c3po, "start_checkpoint": str(ckpt or source),
               "data": rl.data or "embedded tiers", "verifier": trainer.verifier, "mode": rl.mode,
               "train_prompts": len(prompts.train), "heldout_prompts": len(prompts.heldout),
               "skipped_rows": prompts.skipped, "ranks": dims.world, "rollout_ranks": rl.rollout_ranks,
               "max_staleness": rl.max_staleness,
               "tokens_generated": trainer.counters["tokens_generated"], "wall_time_s": trainer.counters["elapsed"],
               "final_checkpoint": str(run.final_path), "command": command}
    final = trainer.full_model() if rl.eval_problems else None  # the trainers' last collective
    dims.barrier()
    if not dims.is_main:
        return summary
    run.finalize()
    if rl.eval_problems:
        run.append_metrics(evaluate_policy(final, tokenizer, rl, prompts, "after", trainer.step))
        stages = {row["stage"]: {"step": row["step"], "tiers": row["tiers"]}
                  for row in run.read_metrics() if row.get("kind") == "eval" and "stage" in row}  # the later row wins
        run.write_json("rl_eval.json", stages)
    run.write_json("summary.json", summary)
    console.print(f"report: {write_rl_report(run.path)}")
    return summary


def _serve(cfg: Config, run: RunDir, dims: ParallelDims, link: RolloutLink, model: LingForCausalLM,
           tokenizer: Tokenizer, prompts: PromptSet) -> dict:
    """A rollout rank's part of `_run`: the world's collectives of the trainers' setup, then `decoupled.serve_rollouts`."""
    rl = cfg.rl
    dims.on_main(lambda: None)  # the trainers set up (rank 0 tells how it went)
    dims.on_main(lambda: None)  # rank 0 commits the run directory
    pool = RolloutPool(rl.c3po_capacity, rl.c3po_budget, rl.c3po_max_retention, rl.group_size) if rl.c3po else None
    verifier = verifier_kind(rl, prompts)
    refill = None
    if rl.algo == "dapo" and rl.dapo_max_rounds > 0:
        def refill(groups, generate_groups):
            return dapo_refill(rl, tokenizer, verifier, groups, generate_groups)
    serve_rollouts(link, rollout_engine(rl, model.cfg, tokenizer, dims.device), model, PromptStream(prompts.train, rl.seed),
                   lambda examples: encode_prompts(tokenizer, rl, examples), rl.group_size, rl.seed, pool, refill)
    dims.barrier()
    return {"rollout_rank": dims.rank, "steps": rl.steps, "run": str(run.path)}
