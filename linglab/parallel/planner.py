"""Heterogeneous pipeline planner (SPEC §7): cost each pipeline unit, then split the units over (virtual) stages.

Ling's pipeline lets each virtual stage hold any number of layers, zero included, and schedules MTP as
two units of its own (a transformer part and a loss part), because the stages are far from equal: the
embedding is nearly free while the LM head + loss and MTP's loss part are GEMMs against a 157K vocabulary.

    units = pipeline_units(cfg.model, analytic_unit_costs(cfg.model, seq_len=4096))
    plan = balanced_partition(units, stages=4, virtual=2)   # the smallest slowest-rank load, proven optimal
    plan.predicted_speedup_over(uniform_partition(units, 4, 2))
    uniform, planned, unit = compare_plans(cfg, stages=4, virtual=2, micro_batches=8, measured=False)
    print(format_comparison(uniform, planned, 8, unit, "ling-mini-2.0"))   # what `linglab plan` prints

A decoder layer's kind names its FFN and, in a Ring-linear hybrid (SPEC §8), its attention: "dense" and "moe" are
softmax layers, "linear_dense" and "linear_moe" linear ones, priced by `linglab.flops` (a linear layer's attention
costs the same at any sequence length, a softmax layer's grows with it).

Unit order is the model's dataflow: embedding, layers.0 .. layers.{L-1}, head, mtp_transformer, mtp_loss.
`head` (final norm, lm_head, loss) comes before MTP because MTP reads H_i after the final norm (SPEC §1.5);
the stage holding `head` passes H_i on. MTP's Emb(t_{i+1}) lookup and its lm_head GEMM use weights shared
with `embedding` and `head`: a stage that holds an MTP unit apart from them keeps a copy of the shared weight
and all-reduces its gradient with the owner, as pipelines already do for tied embeddings.

Virtual stage j runs on rank j % S (the interleaved layout); a rank's load is the sum of its V virtual
stages, and the slowest rank bounds the steady-state step. `balanced_partition` minimises that bottleneck
exactly, in polynomial time for V <= 2 (a DP over ranks on the Pareto frontier of two chunk cursors, with a
binary search on the bound). With V free the problem contains PARTITION (once V >= the number of units every
assignment of units to ranks is reachable), so V >= 3 runs a branch and bound whose every pruning rule is a
proof, within a node budget, and the plan says whether the search finished.
"""

from __future__ import annotations

import bisect
import itertools
import time
from dataclasses import asdict, dataclass

from linglab.config import Config, ModelConfig
from linglab.errors import LinglabError
from linglab.flops import decoder_layer_flops

# FLOPs an accelerator could have done in the time it moves one byte: H100 SXM, 989 TFLOP/s dense bf16
# over 3.35 TB/s of HBM3. Prices the memory-bound units (embedding lookup, softmax) on the GEMM FLOP scale.
MACHINE_BALANCE = 295.0
BF16_BYTES, FP32_BYTES = 2, 4
LAYER_KINDS = ("dense", "moe", "linear_dense", "linear_moe")
UNIT_KINDS = ("embedding", *LAYER_KINDS, "head", "mtp_transformer", "mtp_loss")


@dataclass(frozen=True)
class Unit:
    """One schedulable piece of the model (SPEC §7): `name` in model order, `kind` in UNIT_KINDS, `cost` >= 0."""

    name: str
    kind: str
    cost: float


def layer_unit_kind(cfg: ModelConfig, i: int) -> str:
    """Decoder layer i's unit kind: its FFN ("dense" below first_k_dense_replace, else "moe"), prefixed "linear_"
    for a hybrid's linear layers (`ModelConfig.layer_kind`)."""
    ffn = "dense" if i < cfg.first_k_dense_replace else "moe"
    return f"linear_{ffn}" if cfg.layer_kind(i) == "linear" else ffn


def unit_layout(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(name, kind) of every pipeline unit in dataflow order (see the module docstring for why this order)."""
    layers = [(f"layers.{i}", layer_unit_kind(cfg, i)) for i in range(cfg.num_hidden_layers)]
    mtp = [("mtp_transformer", "mtp_transformer"), ("mtp_loss", "mtp_loss")] if cfg.num_nextn_predict_layers else []
    return [("embedding", "embedding"), *layers, ("head", "head"), *mtp]


def pipeline_units(cfg: ModelConfig, costs: dict[str, float]) -> list[Unit]:
    """The units of `unit_layout`, each priced by its kind's entry in `costs`."""
    return [Unit(name, kind, costs[kind]) for name, kind in unit_layout(cfg)]


# ---------------------------------------------------------------- analytic cost model


def embedding_lookup_flops(cfg: ModelConfig, flop_per_byte: float = MACHINE_BALANCE) -> float:
    """Forward FLOP-equivalent of one token's embedding lookup: no FLOPs, one row of H bf16 values moved."""
    return cfg.hidden_size * BF16_BYTES * flop_per_byte


def lm_head_loss_flops(cfg: ModelConfig, flop_per_byte: float = MACHINE_BALANCE) -> float:
    """Forward FLOPs per token of lm_head (2HV) + softmax cross-entropy, the latter one memory-bound pass over V fp32 logits."""
    return 2 * cfg.hidden_size * cfg.vocab_size + cfg.vocab_size * FP32_BYTES * flop_per_byte


def mtp_transformer_flops(cfg: ModelConfig, seq_len: int, flop_per_byte: float = MACHINE_BALANCE) -> float:
    """Forward FLOPs per token of MTP's transformer part (SPEC §1.5): Emb(t_{i+1}) lookup, eh_proj 2H -> H, a MoE
    layer (softmax in a hybrid too, SPEC §8)."""
    eh_proj = 2 * (2 * cfg.hidden_size * cfg.hidden_size)
    return embedding_lookup_flops(cfg, flop_per_byte) + eh_proj + decoder_layer_flops(cfg, seq_len, moe=True)


def analytic_unit_costs(cfg: ModelConfig, seq_len: int, recompute_mtp: bool = False,
                        flop_per_byte: float = MACHINE_BALANCE) -> dict[str, float]:
    """Training FLOPs per token of each unit kind: 3 x forward, as in `linglab.flops`.

    `recompute_mtp` adds one more forward of the MTP transformer part, the only part Ling recomputes
    (SPEC §7). `flop_per_byte=0` drops the memory-bound terms, leaving exactly `flops.flops_per_token`'s count.
    """
    forward = {
        "embedding": embedding_lookup_flops(cfg, flop_per_byte),
        "dense": decoder_layer_flops(cfg, seq_len, moe=False),
        "moe": decoder_layer_flops(cfg, seq_len, moe=True),
        "linear_dense": decoder_layer_flops(cfg, seq_len, moe=False, kind="linear"),
        "linear_moe": decoder_layer_flops(cfg, seq_len, moe=True, kind="linear"),
        "head": lm_head_loss_flops(cfg, flop_per_byte),
        "mtp_transformer": mtp_transformer_flops(cfg, seq_len, flop_per_byte),
        "mtp_loss": lm_head_loss_flops(cfg, flop_per_byte),
    }
    costs = {kind: 3 * f for kind, f in forward.items()}
    if recompute_mtp:
        costs["mtp_transformer"] += forward["mtp_transformer"]
    return costs


# ---------------------------------------------------------------- measured cost model


def _time_forward_backward(forward, wrt: list, repeats: int) -> float:
    """Seconds of forward + backward to everything in `wrt`: the fastest of `repeats` runs after a warm-up run,
    since on a shared CPU the slow runs measure the neighbours, not the unit."""
    import torch

    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        out = forward()
        torch.autograd.grad(out.float().sum(), wrt)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def measure_unit_costs(cfg: ModelConfig, batch: int, seq_len: int, repeats: int = 5) -> dict[str, float]:
    """Seconds of forward + backward of one micro-batch [batch, seq_len] through each unit kind, on this CPU.

    Builds the real modules (one DecoderLayer of each layer kind the model has, the MTPLayer, embedding, final
    norm and lm_head) once each; gradients flow to the unit's input as well, as they must between pipeline stages.
    Full-size presets allocate full-size layers: meant for small configs or a machine with the memory.
    """
    import torch
    from torch import nn

    from linglab.model import DecoderLayer, MTPLayer, RMSNorm, masked_cross_entropy, rope_cos_sin

    g = torch.Generator().manual_seed(0)
    h = cfg.hidden_size
    ids = torch.randint(cfg.vocab_size, (batch, seq_len), generator=g)
    targets = torch.randint(cfg.vocab_size, (batch, seq_len), generator=g)
    x = torch.randn(batch, seq_len, h, generator=g).requires_grad_()
    cos, sin = rope_cos_sin(cfg.rope_dim, cfg.rope_theta, torch.arange(seq_len))
    kinds = {kind for _, kind in unit_layout(cfg)}
    emb, norm, lm_head = nn.Embedding(cfg.vocab_size, h), RMSNorm(h, cfg.rms_norm_eps), nn.Linear(h, cfg.vocab_size, bias=False)
    first_of_kind = {}  # the first layer of each kind: the layer index decides softmax or linear attention
    for i in range(cfg.num_hidden_layers):
        first_of_kind.setdefault(layer_unit_kind(cfg, i), i)
    layers = {kind: DecoderLayer(cfg, i, moe=kind.endswith("moe")) for kind, i in first_of_kind.items()}
    mtp = MTPLayer(cfg, cfg.num_hidden_layers) if "mtp_transformer" in kinds else nn.Identity()
    with torch.no_grad():  # the pretraining init (SPEC §1.2): routed experts are allocated uninitialised
        for module in (emb, lm_head, *layers.values(), mtp):
            for name, p in module.named_parameters():
                if not name.endswith("norm.weight"):
                    p.normal_(0.0, cfg.initializer_range, generator=g)

    runs = {
        "embedding": (lambda: emb(ids), [emb.weight]),
        **{kind: (lambda layer=layer: layer(x, cos, sin)[0], [x, *layer.parameters()]) for kind, layer in layers.items()},
        "head": (lambda: masked_cross_entropy(lm_head(norm(x)), targets, None), [x, norm.weight, lm_head.weight]),
        "mtp_transformer": (lambda: mtp(emb(ids), x, cos, sin)[0], [x, emb.weight, *mtp.parameters()]),
        "mtp_loss": (lambda: masked_cross_entropy(lm_head(x), targets, None), [x, lm_head.weight]),
    }
    return {kind: _time_forward_backward(forward, wrt, repeats) for kind, (forward, wrt) in runs.items() if kind in kinds}


# ---------------------------------------------------------------- plans


@dataclass(frozen=True)
class Plan:
    """A pipeline layout (SPEC §7): unit names per virtual stage; virtual stage j runs on rank j % num_ranks."""

    stages: list[list[str]]
    stage_costs: list[float]
    num_ranks: int
    optimal: bool  # proven to minimise the bottleneck (False for the uniform baseline)

    @property
    def virtual(self) -> int:
        return len(self.stages) // self.num_ranks

    @property
    def rank_costs(self) -> list[float]:
        return [sum(self.stage_costs[r::self.num_ranks]) for r in range(self.num_ranks)]

    @property
    def bottleneck(self) -> float:
        """The slowest rank's load per micro-batch: every rank waits for it in the steady state."""
        return max(self.rank_costs)

    def predicted_speedup_over(self, other: Plan) -> float:
        return other.bottleneck / self.bottleneck

    def step_time(self, micro_batches: int) -> float:
        """(M + (S-1)/V) x bottleneck for interleaved 1F1B over M micro-batches.

        M x bottleneck is the busy time; the bubble fraction (S-1)/(V*M) of interleaved 1F1B (Narayanan et
        al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using Megatron-LM", §2.2)
        adds (S-1)/V x bottleneck. That bubble assumes a rank's V virtual stages cost alike: an estimate.
        """
        return (micro_batches + (self.num_ranks - 1) / self.virtual) * self.bottleneck


def _plan(units: list[Unit], cuts: list[int], num_ranks: int, optimal: bool) -> Plan:
    spans = list(zip(cuts, cuts[1:]))
    return Plan(stages=[[u.name for u in units[a:b]] for a, b in spans],
                stage_costs=[sum(u.cost for u in units[a:b]) for a, b in spans], num_ranks=num_ranks, optimal=optimal)


def _check_shape(units: list[Unit], stages: int, virtual: int) -> None:
    if stages < 1 or virtual < 1:
        raise LinglabError(f"plan: stages and virtual stages must be >= 1, got {stages} and {virtual}")
    if not units or any(u.cost < 0 for u in units):
        raise LinglabError("plan: needs at least one unit, and unit costs must be >= 0")


def uniform_partition(units: list[Unit], stages: int, virtual: int) -> Plan:
    """The naive baseline: decoder layers split evenly by count over the S*V virtual stages (earlier stages take
    the remainder), the embedding on the first stage, head and MTP units on the last. Units as from `pipeline_units`."""
    _check_shape(units, stages, virtual)
    k = stages * virtual
    num_layers = sum(u.kind in LAYER_KINDS for u in units)
    per_stage = [num_layers // k + (j < num_layers % k) for j in range(k)]
    cuts = [0, *(1 + c for c in itertools.accumulate(per_stage[:-1])), len(units)]
    return _plan(units, cuts, stages, optimal=False)


def _integer_costs(units: list[Unit]) -> list[int]:
    """Costs in units of 2^-40 of the total: sums are exact, so equal layers give equal loads and ties are ties.
    The rounding moves any load by less than n * 2^-41 of the total."""
    total = sum(u.cost for u in units) or 1.0
    return [round(u.cost / total * 2**40) for u in units]


def _loads(prefix: list[int], cuts: list[int], num_ranks: int) -> tuple[int, int]:
    """(largest rank load, largest virtual stage) of a plan."""
    loads, segments = [0] * num_ranks, [prefix[b] - prefix[a] for a, b in zip(cuts, cuts[1:])]
    for j, segment in enumerate(segments):
        loads[j % num_ranks] += segment
    return max(loads), max(segments)


def _two_chunk_cuts(prefix: list[int], num_ranks: int, bound: int, segment_bound: int, split: int) -> list[int] | None:
    """Cuts of 2S segments, chunk 0 = units [0, split) on ranks 0..S-1 then chunk 1 = [split, n) on ranks 0..S-1
    again, with every rank's load <= bound and every segment <= segment_bound; None when there are none.

    Rank by rank, the state is the pair of cursors (x, y) up to which chunks 0 and 1 are placed. A pair at
    least as far along in both chunks dominates: it can follow any continuation of the other, each rank
    taking a sub-run of what the other takes (costs >= 0), and end at (split, n) all the same. So only the
    Pareto-maximal pairs are kept, an antichain of at most n + 1, and the search is exhaustive over the rest.
    """
    n = len(prefix) - 1
    frontier: dict[tuple[int, int], tuple[int, int] | None] = {(0, split): None}
    history = []
    for _ in range(num_ranks):
        reached: dict[tuple[int, int], tuple[int, int]] = {}
        for x, y in frontier:
            x_end = bisect.bisect_right(prefix, prefix[x] + min(bound, segment_bound), lo=x, hi=split + 1) - 1
            for x2 in range(x, x_end + 1):
                room = min(segment_bound, bound - (prefix[x2] - prefix[x]))
                reached.setdefault((x2, bisect.bisect_right(prefix, prefix[y] + room, lo=y) - 1), (x, y))
        frontier, top = {}, -1
        for x2, y2 in sorted(reached, reverse=True):  # x descending: a pair survives if no further-x pair has its y
            if y2 > top:
                frontier[(x2, y2)], top = reached[(x2, y2)], y2
        history.append(frontier)
    if (split, n) not in frontier:
        return None
    points = [(split, n)]
    for step in reversed(history):
        points.append(step[points[-1]])
    points.reverse()
    return [x for x, _ in points] + [y for _, y in points[1:]]


def _smallest_bound(cuts_at, splits: list[int], lower: int, upper: int) -> tuple[int, list[int]]:
    """The smallest v in [lower, upper] for which `cuts_at(v, split)` finds cuts for some split, and those cuts.

    Needs cuts at `upper`. Integer bounds (see `_integer_costs`), so a per-split binary search is exact; it
    runs only for a split that beats the best so far. Splits are tried in the given order."""
    best, best_cuts = upper + 1, None
    for split in splits:
        if best <= lower or cuts_at(best - 1, split) is None:
            continue
        lo, hi = lower, best - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if cuts_at(mid, split) is None:
                lo = mid + 1
            else:
                hi = mid
        best, best_cuts = hi, cuts_at(hi, split)
    return best, best_cuts


def _search_cuts(prefix: list[int], num_ranks: int, virtual: int, bound: int, segment_bound: int, stop_at: int,
                 max_nodes: int) -> tuple[list[int] | None, bool]:
    """Cuts into S*V segments (segment j on rank j % S), each <= segment_bound, whose largest rank load is below
    `bound`, by branch and bound.

    Depth-first over segment ends, keeping the best plan found and cutting a branch only when no completion
    can beat it: (1) costs are >= 0, so a rank's load never falls: once a segment pushes its rank to the best,
    longer ones do too; (2) the work left must fit under the best on the ranks with segments still to come,
    and in the segments left, in total and (3) for its largest unit; (4) a state (stage, start unit, loads)
    reached again has the same completions. Stops once the best is <= `stop_at`. Returns (cuts, or None if
    nothing beats `bound`; finished): finished is False only when `max_nodes` ran out first.
    """
    n, k, s = len(prefix) - 1, num_ranks * virtual, num_ranks
    total = prefix[-1]
    costs = [b - a for a, b in zip(prefix, prefix[1:])]
    suffix_max = [max(costs[i:], default=0) for i in range(n + 1)]
    later_ranks = [sorted({q % s for q in range(j + 1, k)}) for j in range(k)]
    best: list = [bound, None]
    seen, nodes, path = set(), 0, [0] * k + [n]

    def search(j: int, i: int, loads: tuple[int, ...]) -> bool:
        """Segment j starts at unit i; False to stop (budget spent, or `stop_at` reached)."""
        nonlocal nodes
        nodes += 1
        if nodes > max_nodes:
            return False
        r = j % s
        if j == k - 1:
            worst = max(*loads, loads[r] + total - prefix[i])
            if worst < best[0] and total - prefix[i] <= segment_bound:
                best[:] = [worst, path.copy()]
            return best[0] > stop_at
        later = later_ranks[j]
        room_elsewhere = sum(best[0] - 1 - loads[q] for q in later if q != r)
        longest = bisect.bisect_left(prefix, min(best[0] - loads[r], segment_bound + 1) + prefix[i], lo=i) - 1  # (1)
        shortest = bisect.bisect_left(prefix, total - (k - 1 - j) * segment_bound, lo=i)  # (2), segments left
        if r in later:  # (2): what this segment takes from the work left it also takes from r's room
            if total - prefix[i] > room_elsewhere + best[0] - 1 - loads[r]:
                return True
        else:  # (2): r is done, so the segment must leave no more work than the other ranks have room for
            shortest = max(shortest, bisect.bisect_left(prefix, total - room_elsewhere, lo=i))
        # Segments closest to an even share of the work left come first: good plans early, and the first plan
        # found under a bound spreads the remaining work instead of idling ranks.
        share = (total - prefix[i]) / (k - j)
        for e in sorted(range(shortest, min(longest, n) + 1), key=lambda e: abs(prefix[e] - prefix[i] - share)):
            new = loads[:r] + (loads[r] + prefix[e] - prefix[i],) + loads[r + 1:]
            if new[r] >= best[0]:  # (1) again: the best may have improved since `longest`
                continue
            if e < n and suffix_max[e] + min(new[q] for q in later) >= best[0]:  # (3)
                continue
            if (j, e, new) in seen:  # (4)
                continue
            seen.add((j, e, new))
            path[j + 1] = e
            if not search(j + 1, e, new):
                return False
        return True

    finished = search(0, 0, (0,) * s) or nodes <= max_nodes
    return best[1], finished


def balanced_partition(units: list[Unit], stages: int, virtual: int = 1, max_nodes: int = 200_000) -> Plan:
    """Contiguous runs of units on S*V virtual stages, empty ones allowed, minimising the slowest rank's load (SPEC §7).

    1. V <= 2, exact and polynomial: `_two_chunk_cuts` over every chunk split (V = 1: chunk 1 empty), binary
       search on the bound; then, at that bottleneck, the smallest largest virtual stage, which keeps the
       interleaved bubble near the (S-1)/V x bottleneck that `Plan.step_time` assumes.
    2. V >= 3: the better of the V = 2 optimum (later chunks empty) and the S*V segments with the smallest
       largest segment seeds the branch and bound `_search_cuts`, which stops at the lower bound
       max(total / S, largest unit). Should it exhaust `max_nodes`, `optimal` is False.
    3. Among plans as good on both counts, the first in the search's even-share order (within `max_nodes`):
       no rank idles that could take work.
    """
    _check_shape(units, stages, virtual)
    k, n, s = stages * virtual, len(units), stages
    costs = _integer_costs(units)
    prefix = list(itertools.accumulate(costs, initial=0))
    total, largest = prefix[-1], max(costs)
    lower = max(-(-total // s), largest)
    tie = n  # one rounding per unit: loads equal in real costs differ here by less than n, so ties get that slack
    splits = sorted(range(n + 1), key=lambda p: abs(2 * prefix[p] - total)) if virtual > 1 else [n]  # even splits first
    bound, _ = _smallest_bound(lambda b, p: _two_chunk_cuts(prefix, s, b, b, p), splits, lower, total)
    segment_bound, cuts = _smallest_bound(lambda c, p: _two_chunk_cuts(prefix, s, bound + tie, c, p), splits, largest, bound + tie)
    cuts = cuts[: k + 1] + [n] * (k - 2 * s)
    optimal = True
    if virtual > 2:
        _, even = _smallest_bound(lambda c, p: _two_chunk_cuts(prefix, k, c, c, p), [n], largest, total)
        cuts = min(cuts, even[: k + 1], key=lambda c: _loads(prefix, c, s))
        better, optimal = _search_cuts(prefix, s, virtual, _loads(prefix, cuts, s)[0], total, lower, max_nodes)
        cuts = better or cuts
    bound, segment_bound = _loads(prefix, cuts, s)
    spread, _ = _search_cuts(prefix, s, virtual, bound + tie + 1, segment_bound + tie, bound + tie, max_nodes)
    return _plan(units, spread or cuts, s, optimal=optimal)


def training_plan(cfg: ModelConfig, seq_len: int, stages: int, virtual: int, kind: str = "balanced") -> Plan:
    """The layout `linglab train --parallel.pp=S` runs: analytic unit costs, then the balanced or uniform partition."""
    units = pipeline_units(cfg, analytic_unit_costs(cfg, seq_len))
    return balanced_partition(units, stages, virtual) if kind == "balanced" else uniform_partition(units, stages, virtual)


# ---------------------------------------------------------------- report


def plan_to_dict(plan: Plan) -> dict:
    """The plan with its derived per-rank costs and bottleneck, ready for JSON."""
    return {**asdict(plan), "virtual": plan.virtual, "rank_costs": plan.rank_costs, "bottleneck": plan.bottleneck}


def describe_stage(names: list[str]) -> str:
    """Unit names with runs of decoder layers folded: "embedding, layers.0-4"; "-" for an empty stage."""
    parts: list[str] = []
    for is_layer, group in itertools.groupby(names, key=lambda name: name.startswith("layers.")):
        group = list(group)
        if is_layer and len(group) > 1:
            parts.append(f"{group[0]}-{group[-1].removeprefix('layers.')}")
        else:
            parts.extend(group)
    return ", ".join(parts) or "-"


def compare_plans(cfg: Config, stages: int, virtual: int, micro_batches: int, measured: bool) -> tuple[Plan, Plan, str]:
    """(uniform, planned, cost unit) for the config, costed in training GFLOP per token at data.seq_len, or in
    measured milliseconds per micro-batch of train.batch_size / micro_batches sequences."""
    if micro_batches < 1:
        raise LinglabError(f"plan: micro-batches must be >= 1, got {micro_batches}")
    seq_len = cfg.data.seq_len
    if measured:
        batch = max(1, cfg.train.batch_size // micro_batches)
        costs = {kind: 1e3 * t for kind, t in measure_unit_costs(cfg.model, batch, seq_len).items()}
        unit = f"measured ms of forward + backward per micro-batch of {batch} x {seq_len} tokens"
    else:
        costs = {kind: 1e-9 * f for kind, f in analytic_unit_costs(cfg.model, seq_len).items()}
        unit = f"training GFLOP per token (3 x forward) at seq_len {seq_len}"
    units = pipeline_units(cfg.model, costs)
    return uniform_partition(units, stages, virtual), balanced_partition(units, stages, virtual), unit


def format_comparison(uniform: Plan, planned: Plan, micro_batches: int, unit: str, title: str) -> str:
    """The uniform and planned layouts side by side: units and cost per virtual stage, per-rank loads, bottlenecks."""
    rows = [("stage", "rank", "uniform", "cost", "planned", "cost")]
    for j, (a, b) in enumerate(zip(uniform.stages, planned.stages)):
        rows.append((str(j), str(j % uniform.num_ranks), describe_stage(a), f"{uniform.stage_costs[j]:.4g}",
                     describe_stage(b), f"{planned.stage_costs[j]:.4g}"))
    for r, (a, b) in enumerate(zip(uniform.rank_costs, planned.rank_costs)):
        rows.append(("", str(r), "rank total", f"{a:.4g}", "rank total", f"{b:.4g}"))
    widths = [max(len(row[c]) for row in rows) for c in range(6)]
    table = ["  ".join(cell.rjust(w) if c in (0, 1, 3, 5) else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    s, v = uniform.num_ranks, uniform.virtual
    proof = "proven optimal" if planned.optimal else "best found, search budget spent"
    return "\n".join([
        f"{title}: {s} ranks x {v} virtual stages, {micro_batches} micro-batches; cost = {unit}",
        "",
        *table,
        "",
        f"bottleneck (slowest rank): uniform {uniform.bottleneck:.4g}, planned {planned.bottleneck:.4g}"
        f" ({proof}); predicted speedup {planned.predicted_speedup_over(uniform):.2f}x",
        f"step time (M + (S-1)/V) x bottleneck, M = {micro_batches}: uniform {uniform.step_time(micro_batches):.4g},"
        f" planned {planned.step_time(micro_batches):.4g}"
        f" (ratio {uniform.step_time(micro_batches) / planned.step_time(micro_batches):.2f}x)",
    ])
