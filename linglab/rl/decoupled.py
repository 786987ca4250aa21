"""Decoupled rollout ranks (SPEC §9; docs/rl.md, "Distributed RL: decoupled rollout ranks"): R ranks only generate,
the others train, and the weights flow back after every optimizer step.

    torchrun --nproc_per_node 2 -m linglab rl --ckpt CKPT --out runs/rl-async --rl.rollout_ranks=1 --rl.max_staleness=1

Layout: ranks 0 .. T-1 train (T = W - R; FSDP2 over them when T > 1, as colocated RL trains), ranks T .. W-1
generate. Every rank draws each step's `rl.prompts_per_step` prompts from the same prompt stream; group g of a step
is sampled by rollout rank T + g * R // prompts_per_step and trained by trainer rank g * T // prompts_per_step
(contiguous: a group never straddles ranks), and every rollout draws from its own generator
(`rollout.rollout_seed`), so what is sampled depends on the seed alone, not on timing.

The schedule (`RolloutLink.weights_for`): step s is sampled from the weights after max(s - S, start) optimizer
steps (S = `rl.max_staleness`, start = the step the run started or resumed at). So a rollout rank runs up to S
steps ahead of the trainer and never further, and every token sampled for step s is exactly min(s - start, S)
versions old when it trains; S = 0 is synchronous and samples what one process samples. A fixed lag rather than
"the newest weights that have arrived" keeps runs reproducible.

C3PO++ (`rl.c3po`, 1 trainer + 1 rollout rank): the rollout rank keeps the pool and runs `RolloutPool.collect` each
step, as one process does; the trainer gets the finished groups with their examples, and the number of prompts
the pool drew (its stream follows). S bounds the head lag, as AReaL's max_head_offpolicyness (SPEC §9): a group
carried over k times holds tokens up to S + k versions old, as on one process it holds tokens up to k old. The
pool's state comes along with every step a checkpoint follows, for the trainer to save (`TrainerEnd.pool_state`).
DAPO's refill rounds (1 + 1 too) run where the groups are generated: the rollout rank scores its groups
(`refill`, the trainer module's `dapo_refill`), generates the missing ones numbered on, and sends them all.

Transport, all torch.distributed: trainer rank 0 broadcasts the full weights (gathered from the trainers' FSDP2
shards) in buckets over a group of itself and the rollout ranks (`weight_sync.broadcast_weights`); a rollout rank
sends each step's finished groups to the trainer ranks that train them, point to point (`isend` of the pickled
message, on the default group), so it goes on generating while the trainers train.
A message holds, per group, its index in the step, its prompt ids and every response's tokens, log pi_infer and
the policy version of each token (`group_message`); the trainer finds the payload (answer) from its own prompt
stream by the index and checks the prompt matches (C3PO++: the group brings it). It also holds the digest of the
weights that sampled it, which the trainers check against the weights broadcast: the rollout copy equals the
trainer's bitwise, or the run stops.

Every weight broadcast is announced by a small control message from trainer rank 0 (`send_control`), and the run
ends with one: the trainers' end, or their error. So a failure on either side ends the other with one line that
names the rank, rather than leaving it waiting in a broadcast: a rollout rank that raises sends its error in place
of the step's groups (`RolloutRankError` on the trainers); a trainer that raises sends its error as the next control
message (`TrainerEnd.end`), which the rollout ranks wait for at their next sync or at the end. A rank killed outright
can say nothing: its peers' transport fails (one line too, where they notice first) and torchrun ends the job.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from linglab.config import Config
from linglab.errors import LinglabError
from linglab.model import LingForCausalLM
from linglab.parallel.parallel_dims import ParallelDims
from linglab.parallel.weight_sync import broadcast_weights, weights_digest
from linglab.rl.rollout import Rollout, RolloutEngine, RolloutGroup, RolloutPool

TRAINER = 0
# DAPO's refill rounds: (the step's groups, generate_groups(n, first_group)) -> (every group sampled, rounds)
Refill = Callable[[list[RolloutGroup], Callable[[int, int], list[RolloutGroup]]], tuple[list[RolloutGroup], int]]


class RolloutRankError(LinglabError):
    """A rollout rank failed, or was lost: the trainers stop, without a word to the rollout ranks (which know)."""


def check_decoupled(cfg: Config, dims: ParallelDims) -> None:
    """One line, before anything is written, for a layout decoupled rollout ranks cannot run (yet)."""
    rl, world = cfg.rl, dims.world
    if rl.rollout_ranks >= world:
        raise LinglabError(f"rl: rl.rollout_ranks={rl.rollout_ranks} leaves no trainer among {world} rank(s); launch at "
                           f"least rl.rollout_ranks + 1 ranks (torchrun --nproc_per_node {rl.rollout_ranks + 1} -m linglab rl ...)")
    trainers = world - rl.rollout_ranks
    if rl.prompts_per_step % trainers:
        raise LinglabError(f"rl: rl.prompts_per_step={rl.prompts_per_step} groups do not split evenly over {trainers} "
                           "trainer ranks; make it a multiple of the number of ranks minus rl.rollout_ranks")
    if dims.ep > 1 or dims.pp > 1:
        raise LinglabError("rl: rl.rollout_ranks with parallel.ep or parallel.pp > 1 is not supported yet")
    if rl.c3po and (trainers, rl.rollout_ranks) != (1, 1):
        raise LinglabError(f"rl: rl.c3po with rl.rollout_ranks runs on 1 trainer + 1 rollout rank for now (one pool, "
                           f"and a step's finished groups may be fewer than the trainer ranks), not {trainers} + "
                           f"{rl.rollout_ranks}; launch 2 ranks with rl.rollout_ranks=1")
    if rl.algo == "dapo" and rl.dapo_max_rounds > 0 and (trainers, rl.rollout_ranks) != (1, 1):
        raise LinglabError(f"rl: DAPO refill rounds (rl.dapo_max_rounds={rl.dapo_max_rounds}) with rl.rollout_ranks "
                           f"run on 1 trainer + 1 rollout rank for now (the refills go where the missing groups "
                           f"were), not {trainers} + {rl.rollout_ranks}; set rl.dapo_max_rounds=0 or launch 2 ranks")
    if rl.sft_steps:
        raise LinglabError(f"rl: rl.sft_steps={rl.sft_steps} with rl.rollout_ranks: run `linglab sft` first and start "
                           "RL from its checkpoint (--ckpt) with rl.sft_steps=0")


@dataclass
class RolloutLink:
    """What both ends agree on: who generates which groups, with which weights, and the weight-sync group."""

    rank: int
    world: int
    rollout_ranks: int
    max_staleness: int
    steps: int
    prompts_per_step: int
    ckpt_every: int
    device: torch.device
    sync_group: dist.ProcessGroup

    @classmethod
    def for_run(cls, cfg: Config, dims: ParallelDims) -> RolloutLink:
        """Collective: every rank creates the weight-sync group (trainer rank 0 and the rollout ranks)."""
        rl = cfg.rl
        sync = [TRAINER, *range(dims.world - rl.rollout_ranks, dims.world)]
        return cls(dims.rank, dims.world, rl.rollout_ranks, rl.max_staleness, rl.steps, rl.prompts_per_step,
                   rl.ckpt_every, dims.device, dist.new_group(ranks=sync))

    @property
    def trainers(self) -> int:
        return self.world - self.rollout_ranks

    @property
    def is_trainer(self) -> bool:
        return self.rank < self.trainers

    def rollout_rank_ids(self) -> range:
        return range(self.trainers, self.world)

    def groups_of(self, rank: int) -> list[int]:
        """The step's group indices that rank `rank` samples (a rollout rank) or trains (a trainer rank):
        contiguous, in order, so a group never straddles ranks."""
        first, ranks = (TRAINER, self.trainers) if rank < self.trainers else (self.trainers, self.rollout_ranks)
        n = self.prompts_per_step
        return [g for g in range(n) if g * ranks // n == rank - first]

    def weights_for(self, step: int, start: int) -> int:
        """How many optimizer steps the weights that sample `step` have seen: step - S, not before the run's start."""
        return max(step - self.max_staleness, start)

    def checkpoints_after(self, step: int) -> bool:
        """Whether the trainers write a checkpoint once `step` is trained (the C3PO++ pool then travels with it)."""
        return (step + 1) % self.ckpt_every == 0 or step + 1 == self.steps

    def publishes(self, step: int, start: int) -> bool:
        """Whether the trainer broadcasts its weights at the start of `step`: the start, and any a later step samples."""
        return step == start or step + self.max_staleness < self.steps


def send_message(message: dict, dst: int, step: int, device: torch.device) -> list:
    """isend the pickled `message` (its size, then its bytes); returns what `finish_sends` waits on."""
    data = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8).to(device)
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    return [(dist.isend(size, dst, tag=2 * step), size), (dist.isend(data, dst, tag=2 * step + 1), data)]


def finish_sends(pending: list) -> None:
    for work, _ in pending:  # the tensors stay referenced until their send completes
        work.wait()
    pending.clear()


def send_control(message: dict, link: RolloutLink) -> None:
    """Trainer rank 0 to the rollout ranks: {"version": v} (weights follow), {"end": True}, or {"error": line}."""
    dist.broadcast_object_list([message], src=TRAINER, group=link.sync_group)


def receive_control(link: RolloutLink, step: int) -> dict:
    """A rollout rank's side of `send_control`; the trainers' error, or their loss, as one line naming this rank."""
    message = [None]
    try:
        dist.broadcast_object_list(message, src=TRAINER, group=link.sync_group)
    except RuntimeError as e:
        raise LinglabError(f"rl: rollout rank {link.rank} lost trainer rank {TRAINER} at step {step}: "
                           f"{first_line(e)}") from None
    if "error" in message[0]:
        raise LinglabError(f"rl: rollout rank {link.rank} stops: {message[0]['error']}")
    return message[0]


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def receive_message(src: int, step: int, device: torch.device) -> dict:
    size = torch.empty(1, dtype=torch.long, device=device)
    dist.recv(size, src, tag=2 * step)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.recv(data, src, tag=2 * step + 1)
    return pickle.loads(data.cpu().numpy().tobytes())


class TrainerEnd:
    """A trainer rank's side: broadcast the weights at the start of a step (rank 0; the trainer ranks gather their
    FSDP2 shards first), then receive the step's groups this rank trains. `dims`: the trainer ranks' layout."""

    def __init__(self, link: RolloutLink, dims: ParallelDims):
        self.link, self.dims = link, dims
        self.start = 0  # the step the run starts at (`begin`)
        self.digests: dict[int, str] = {}  # policy version -> digest of the weights broadcast as it
        self.syncing = False  # in a weight broadcast: the rollout ranks expect weights, not a control message
        self.pool_state: dict | None = None  # C3PO++: the rollout rank's pool as of the step last checkpointed

    def begin(self, step: int, prompt_state: dict) -> None:
        """Tell the rollout ranks where the run starts (or resumed): its step, the prompt stream's state and, with
        C3PO++, the pool (`pool_state`, as the checkpoint resumed holds it)."""
        self.start = step
        if self.link.rank == TRAINER:
            send_control({"step": step, "prompts": prompt_state, "pool": self.pool_state}, self.link)

    def publish(self, model: LingForCausalLM, step: int) -> dict:
        """At the start of `step`: the weights (after `step` optimizer steps, policy version step + 1), if a step will
        sample from them. {sync_s, sync_bytes}: 0 when nothing was sent."""
        start_time = time.perf_counter()
        sending = self.link.rank == TRAINER
        if not self.link.publishes(step, self.start):
            return {"sync_s": 0.0, "sync_bytes": 0}
        state = model.state_dict() if self.dims.world == 1 else self.dims.full_state(model)[0]
        sent = 0
        if sending:
            send_control({"version": step + 1}, self.link)
            self.syncing = True
            sent = broadcast_weights(state, TRAINER, self.link.sync_group)
            self.syncing = False
        self.digests[step + 1] = weights_digest(state)
        return {"sync_s": time.perf_counter() - start_time, "sync_bytes": sent}

    def end(self, step: int, error: BaseException | None = None) -> None:
        """Tell the rollout ranks the trainers are done: at the end of the run, or with `error` (raised at `step`),
        which they stop with. Not after a rollout rank's failure (they know), nor inside a weight broadcast (they
        cannot hear it; torchrun ends them when this process exits)."""
        if self.link.rank != TRAINER or isinstance(error, RolloutRankError) or self.syncing:
            return
        if error is None:
            send_control({"end": True}, self.link)
        else:
            send_control({"error": f"trainer rank {TRAINER} failed at step {step}: {type(error).__name__}: "
                                   f"{first_line(error)}"}, self.link)

    def receive(self, step: int, new_prompts: Callable[[int], list[tuple[list[int], object]]]
                ) -> tuple[list[RolloutGroup], dict]:
        """The step's groups this rank trains, from every rollout rank, in group order, and the engines' work (sent
        to trainer rank 0 only, so a sum over the trainer ranks counts it once). `new_prompts(n)`: the next n
        (prompt ids, example) of this rank's prompt stream, drawn as the rollout ranks drew: the step's
        `prompts_per_step` and DAPO's refills, whose examples the groups are matched with by index; with C3PO++ the
        number the pool started, and the groups bring their examples (a group finishing now may have started steps
        ago). A rollout rank's error is raised here, as one line."""
        messages = {}
        for rank in self.link.rollout_rank_ids():
            try:
                messages[rank] = receive_message(rank, step, self.link.device)
            except RuntimeError as e:
                raise RolloutRankError(f"rl: lost rollout rank {rank} at step {step}: {first_line(e)}") from None
            if messages[rank].get("error"):
                raise RolloutRankError(messages[rank]["error"])
        pairs = new_prompts(messages[self.link.trainers]["drawn"])
        groups, stats = [], {}
        for rank, message in messages.items():
            if self.digests.get(message["version"]) != message["digest"]:
                raise RuntimeError(f"rl: rollout rank {rank} sampled step {step} from weights that differ from the "
                                   f"trainer's version {message['version']}")
            for index, prompt, rollouts, payload in message["groups"]:
                if index is not None:
                    if prompt != pairs[index][0]:
                        raise RuntimeError(f"rl: rollout rank {rank} sampled group {index} of step {step} from "
                                           "another prompt than the trainer's stream holds")
                    payload = pairs[index][1]
                members = [Rollout(list(prompt), tokens, logprobs, versions, eos, truncated, retained)
                           for tokens, logprobs, versions, eos, truncated, retained in rollouts]
                groups.append(RolloutGroup(list(prompt), members, payload))
            for k, v in message["work"].items():
                stats[k] = stats.get(k, 0) + v
            if message["pool"] is not None:
                self.pool_state = message["pool"]
        # Whole groups: the tokens this rank trains. C3PO++ reports what it sampled, unfinished rollouts included.
        stats.setdefault("tokens_generated", sum(r.cost for g in groups for r in g.rollouts))
        return groups, stats


def hold_weights(link: RolloutLink, engine: RolloutEngine, model: LingForCausalLM, steps: int, step: int) -> str:
    """A rollout rank's end of one `TrainerEnd.publish` at RL step `step`: receive the weights after `steps` optimizer
    steps into `model` (`receive_weights`), load them into `engine` as policy version steps + 1 (the trainer's count),
    and return their digest."""
    receive_weights(link, model, step)
    engine.sync_weights(model)
    engine.version = steps + 1
    return weights_digest(model.state_dict())


def step_groups(link: RolloutLink, engine: RolloutEngine, pool: RolloutPool | None, refill: Refill | None, stream,
                encode: Callable[[list], list[list[int]]], group_size: int, seed: int, step: int
                ) -> tuple[list[tuple[int | None, RolloutGroup]], int, dict]:
    """A rollout rank's groups of `step` as (index in the step, group), the number of prompts it drew from the
    stream, and the pool's or the refills' statistics. Without C3PO++: its share of the step's `prompts_per_step`
    groups, then DAPO's refill groups (`refill`, one rollout rank), numbered on. With C3PO++: the groups the pool
    finished (`RolloutPool.collect`, to the token budget), index None: they may have started in an earlier step,
    and travel with their examples to the one trainer rank."""
    drawn = 0

    def new_prompts(n: int) -> list[tuple[list[int], object]]:
        nonlocal drawn
        examples = stream.next(n)
        drawn += n
        return list(zip(encode(examples), examples))

    if pool is not None:
        completed, stats = pool.collect(engine, new_prompts, seed, step)
        return [(None, group) for group in completed], drawn, stats
    pairs, mine = new_prompts(link.prompts_per_step), link.groups_of(link.rank)
    if not mine:
        return [], drawn, {}
    prompts, payloads = zip(*[pairs[g] for g in mine])
    groups = engine.generate_groups(prompts, group_size, seed, step, mine[0], payloads)
    if refill is None:
        return list(zip(mine, groups, strict=True)), drawn, {}

    def generate_groups(n: int, first_group: int) -> list[RolloutGroup]:
        prompts, payloads = zip(*new_prompts(n))
        return engine.generate_groups(prompts, group_size, seed, step, first_group, payloads)

    groups, rounds = refill(groups, generate_groups)
    return list(enumerate(groups)), drawn, {"dapo_rounds": rounds}


def group_message(index: int | None, group: RolloutGroup) -> tuple:
    """A group as it travels: its index, its prompt ids, per response (tokens, log pi_infer, policy versions, eos,
    truncated, carry-overs), and its example where the index is None (C3PO++)."""
    return (index, group.prompt, [(r.tokens, r.logprobs, r.versions, r.eos, r.truncated, r.retained)
                                  for r in group.rollouts], group.payload if index is None else None)


def serve_rollouts(link: RolloutLink, engine: RolloutEngine, model: LingForCausalLM, stream,
                   encode: Callable[[list], list[list[int]]], group_size: int, seed: int,
                   pool: RolloutPool | None = None, refill: Refill | None = None) -> None:
    """A rollout rank's whole job: receive the start and the weights, generate its groups of every step with the
    weights the schedule names, send each trainer rank the groups it trains. `model` is the buffer the weights
    arrive in (same architecture as the trainers'); `stream` the run's `PromptStream`, moved to the trainers'
    position; `encode` renders and tokenizes examples as the trainers do; `pool` C3PO++'s (`rl.c3po`), moved to
    the state the trainers resumed (and sent back with every step a checkpoint follows); `refill` DAPO's refill
    rounds (`trainer.dapo_refill`: the rollout rank scores its groups to know which are mixed)."""
    header = receive_control(link, 0)
    start = header["step"]
    stream.load_state_dict(header["prompts"])
    if pool is not None and header["pool"] is not None:
        pool.load_state_dict(header["pool"], engine.device)
    have, digest, pending = None, "", []
    for step in range(start, link.steps):
        try:
            while have != link.weights_for(step, start):
                have = start if have is None else have + 1
                digest = hold_weights(link, engine, model, have, step)
            work = dict(engine.work)
            groups, drawn, stats = step_groups(link, engine, pool, refill, stream, encode, group_size, seed, step)
            stats.update({k: v - work[k] for k, v in engine.work.items()})
            state = pool.state_dict() if pool is not None and link.checkpoints_after(step) else None
            messages = [{"version": engine.version, "digest": digest, "drawn": drawn, "pool": state,
                         "work": {k: v * (trainer == TRAINER) for k, v in stats.items()},
                         "groups": [group_message(index, group) for index, group in groups  # C3PO++, refills: 1 trainer
                                    if link.trainers == 1 or index in link.groups_of(trainer)]}
                        for trainer in range(link.trainers)]
        except Exception as e:  # to the trainers, which stop the run with it
            messages = [{"error": f"rl: rollout rank {link.rank} failed at step {step}: {type(e).__name__}: {e}"}
                        ] * link.trainers
        pending = [p for p in pending if not p[0].is_completed()]
        for trainer, message in enumerate(messages):
            pending += send_message(message, trainer, step, link.device)
        if "error" in messages[0]:
            # The trainers broadcast the weights of the steps up to this one before they look for its groups (with
            # S > 0 this rank has not needed them yet): join those broadcasts, or neither side gets further.
            for later in range(start if have is None else have + 1, step + 1):
                if link.publishes(later, start):
                    receive_weights(link, model, step)
            finish_sends(pending)
            raise LinglabError(messages[0]["error"])
    receive_control(link, link.steps)  # the trainers' end, once they have received every group sent
    finish_sends(pending)


def receive_weights(link: RolloutLink, model: LingForCausalLM, step: int) -> None:
    """A weight broadcast of the trainers, into `model` (its control message first)."""
    receive_control(link, step)
    broadcast_weights(model.state_dict(), TRAINER, link.sync_group)
