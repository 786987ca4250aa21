"""Pipeline parallelism (SPEC §7): a planner `Plan` run by torch.distributed.pipelining, 1F1B or interleaved 1F1B.

    plan = balanced_partition(pipeline_units(cfg.model, costs), stages=2, virtual=2)   # linglab.parallel.planner
    runner = PipelineRunner(build_model(cfg.model, seed=0), plan, group, n_microbatches=4)
    loss = runner.step(input_ids, targets, loss_mask)   # the batch's mean loss on the last stage's rank, else None
    optimizer = make_optimizer(runner, cfg.train)       # over runner.parameters(): this rank's stages, copies included
    full = runner.gather(grads=True)                     # collective: {model parameter name: gradient}

For `linglab train --parallel.pp` (`Trainer`), collectives over the pipeline ranks: `clip_grad_norm_` (the whole
model's norm, each shared weight once), `loss_terms` (the step's loss, main, MTP and z terms on every rank),
`full_optimizer_state` / `load_full_state` (the single-process AdamW state keyed by parameter name).

Every rank builds the same full model (same seed or checkpoint) and keeps the units of its virtual stages
(stage j runs on rank j % S): one `StageModule` each, empty ones included, wrapped in a `PipelineStage`. A
`StageModule` is the model pruned to its units (the modules of other units are None), and it runs each unit
with the model's own step (`LingForCausalLM.embed`, `decoder_layer`, `head_loss`, `mtp_transformer`,
`mtp_loss`, `total_loss`), so a stage computes what `LingForCausalLM.forward` computes by construction.
V = 1 runs `Schedule1F1B`, V > 1 `ScheduleInterleaved1F1B`; the library does every send and receive.

Between stages flows what the units still ahead need (SPEC §1.5), a tuple named by `carried_names`:
the hidden state (x before `head`; the post-norm H_i after it, which MTP reads; MTP's output before
`mtp_loss`), the token targets (MTP looks up Emb(t_{i+1}) = Emb(targets) and both losses need them), the
loss mask if one is given, the main loss once `head` has run, and a running router z-loss (the sum of what
each MoE layer returns) if router_z_loss_coef > 0. The stage with the last unit ends with the micro-batch loss,
`total_loss`: main + mtp_scale * mtp (+ z); any empty stages after it pass it on.

Gradients: the schedule's loss is that micro-batch loss, and with `scale_grads=True` each stage divides its
accumulated gradients by the number of micro-batches once all backwards are done, which is the gradient of
the mean micro-batch loss, as `Trainer.train_step` accumulates it (loss / grad_accum per micro-batch).

MTP's Emb(t_{i+1}) and its lm_head GEMM use weights shared with `embedding` and `head` (SPEC §1.5). Every
stage using one holds its own copy (the earliest holds the model's own module), so the schedule's per-stage
gradient scaling touches each once; after the schedule the copies' gradients are summed, within the rank
and over a process group of the ranks holding copies, and every copy gets the sum: identical copies stay
identical under the same optimizer step, as pipelines do for tied embeddings.

Static stage metadata (shapes from the first batch) means the library runs no extra forward to infer
shapes, so MoE load counters see each micro-batch once. Every step must then have the same [B, T] and
the same loss-mask presence; B must divide into the micro-batches.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from linglab.model import LingForCausalLM
from linglab.parallel.planner import Plan, unit_layout

# Weights a unit reads that another unit owns (SPEC §1.5): MTP's embedding lookup and its lm_head GEMM.
SHARED_WEIGHTS = {"model.word_embeddings": ("embedding", "mtp_transformer"), "lm_head": ("head", "mtp_loss")}
# Carried tensors that gradients flow back through; token ids and the loss mask are data.
DIFFERENTIABLE = ("hidden", "final_hidden", "mtp_hidden", "main_loss", "z_loss", "loss")
# (id of the default group, global ranks) -> (that default group, the subgroup); see PipelineRunner._group_over
_SUBGROUPS: dict[tuple[int, tuple[int, ...]], tuple[dist.ProcessGroup, dist.ProcessGroup]] = {}


def carried_names(units_done: list[str], all_units: list[str], has_mask: bool, has_z: bool) -> tuple[str, ...]:
    """Names of the tensors that flow to the next stage once `units_done` (a prefix of `all_units`) have run."""
    if len(units_done) == len(all_units):
        return ("loss",)
    done = set(units_done)
    if "embedding" not in done:
        state = "input_ids"
    elif "head" not in done:
        state = "hidden"
    elif "mtp_transformer" not in done:
        state = "final_hidden"
    else:
        state = "mtp_hidden"
    return (state, "targets", *(("loss_mask",) if has_mask else ()), *(("main_loss",) if "head" in done else ()),
            *(("z_loss",) if has_z and "embedding" in done else ()))


class StageModule(LingForCausalLM):
    """One virtual stage (SPEC §7): the model pruned to its units, running the model's own step for each.

    It holds the model's modules for its units under the model's own names; the others are None (a layer it
    does not hold is a None entry of `model.layers`, so names and indices stay the model's). `model.word_embeddings`
    / `lm_head` may be a copy of a shared weight (see the module docstring). `forward(*carried_in) -> carried_out`,
    tuples named by `in_names` / `out_names` (set by the runner once it knows whether a loss mask flows), only
    moves the carried tensors between the steps. An empty stage passes its input through.
    """

    def __init__(self, model: LingForCausalLM, units: list[str], shared: dict[str, nn.Module]):
        nn.Module.__init__(self)  # not LingForCausalLM.__init__: the stage builds no weights, it holds the model's
        self.cfg, self.units = model.cfg, units
        self.in_names: tuple[str, ...] = ()
        self.out_names: tuple[str, ...] = ()
        self.loss_terms: list[torch.Tensor] = []  # (loss, main, mtp, z) per micro-batch, where the loss is summed
        self.model = nn.Module()
        self.model.word_embeddings = shared.get("model.word_embeddings")
        self.model.layers = nn.ModuleList(layer if f"layers.{i}" in units else None
                                          for i, layer in enumerate(model.model.layers))
        self.model.norm = model.model.norm if "head" in units else None
        self.model.mtp_layers = nn.ModuleList(layer if "mtp_transformer" in units else None
                                              for layer in model.model.mtp_layers)
        self.lm_head = shared.get("lm_head")

    def forward(self, *carried: torch.Tensor) -> tuple[torch.Tensor, ...]:
        state = dict(zip(self.in_names, carried, strict=True))
        if any(u.startswith("layers.") or u == "mtp_transformer" for u in self.units):
            targets = state["targets"]
            cos, sin = self.rope(torch.arange(targets.shape[1], device=targets.device))
        for unit in self.units:
            if unit == "embedding":
                state["hidden"] = self.embed(state.pop("input_ids"))
                if self.cfg.router_z_loss_coef > 0:  # the running sum travels from here on, one shape for all
                    state["z_loss"] = torch.zeros((), device=state["hidden"].device)
            elif unit.startswith("layers."):
                state["hidden"], state["z_loss"] = self.decoder_layer(
                    int(unit.removeprefix("layers.")), state["hidden"], cos, sin, state.get("z_loss"))
            elif unit == "head":
                state["final_hidden"], _, state["main_loss"] = self.head_loss(
                    state.pop("hidden"), state["targets"], state.get("loss_mask"))
            elif unit == "mtp_transformer":
                state["mtp_hidden"], state["z_loss"] = self.mtp_transformer(
                    state.pop("final_hidden"), state["targets"], cos, sin, state.get("z_loss"))
            elif unit == "mtp_loss":
                state["mtp_loss"] = self.mtp_loss(state.pop("mtp_hidden"), state["targets"], state.get("loss_mask"))
        if self.out_names == ("loss",) and "loss" not in state:
            terms = (state["main_loss"], state.get("mtp_loss"), state.get("z_loss"))
            state["loss"] = self.total_loss(*terms)
            zero = torch.zeros((), device=state["loss"].device)
            self.loss_terms.append(torch.stack([zero if t is None else t.detach().float()
                                                for t in (state["loss"], *terms)]))
        return tuple(state[name].contiguous() for name in self.out_names)  # the sends need contiguous tensors


def _last_output(output: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor:
    """The schedule's loss_fn: the last stage already computed the loss (it needs targets mid-pipeline)."""
    return output[0]


class PipelineRunner:
    """This rank's stages of `plan` over the ranks of `group`, and the schedule that runs them (SPEC §7).

    `model`: the full model, the same on every rank; the stages hold its modules (not copies), so after
    a step this rank's share of `model`'s parameters carries the gradients. `n_microbatches` splits
    each batch along dim 0. Constructing is collective over the ranks that share a weight copy.
    """

    def __init__(self, model: LingForCausalLM, plan: Plan, group: dist.ProcessGroup | None, n_microbatches: int):
        self.cfg, self.plan, self.n_microbatches = model.cfg, plan, n_microbatches
        self.group = group if group is not None else dist.group.WORLD
        self.rank, world = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.units = [name for name, _ in unit_layout(model.cfg)]
        if plan.num_ranks != world or len(plan.stages) % world:
            raise ValueError(f"pipeline: the plan is for {plan.num_ranks} ranks x {len(plan.stages) / plan.num_ranks:g} "
                             f"virtual stages, the process group has {world} ranks")
        if [u for stage in plan.stages for u in stage] != self.units:
            raise ValueError(f"pipeline: the plan's stages must hold the model's units in order, {self.units[0]} .. "
                             f"{self.units[-1]}, each once; got {plan.stages}")
        if n_microbatches < 1:
            raise ValueError(f"pipeline: n_microbatches must be >= 1, got {n_microbatches}")
        self.stage_ids = list(range(self.rank, len(plan.stages), world))
        self.device = next(model.parameters()).device
        self.model = model
        self._holders = {path: [j for j, units in enumerate(plan.stages) if set(users) & set(units)]
                         for path, users in SHARED_WEIGHTS.items()}
        self.modules: list[StageModule] = []
        for j in self.stage_ids:
            shared = {path: self._shared_module(path, j) for path, holders in self._holders.items() if j in holders}
            self.modules.append(StageModule(model, plan.stages[j], shared))
        self._sync_groups = {path: self._group_over(tuple(sorted({j % world for j in holders})))
                             for path, holders in self._holders.items() if len(holders) > 1}
        self.has_last_stage = len(plan.stages) - 1 in self.stage_ids
        self._schedule = None
        self._signature = None

    # ------------------------------------------------------------ construction

    def _names_before(self, j: int, has_mask: bool) -> tuple[str, ...]:
        done = [u for stage in self.plan.stages[:j] for u in stage]
        return carried_names(done, self.units, has_mask, self.cfg.router_z_loss_coef > 0)

    def _shared_module(self, path: str, j: int) -> nn.Module:
        """The model's module for the weight's first holder, a copy for every later one (even on the same rank)."""
        module = self.model.get_submodule(path)
        return module if j == self._holders[path][0] else copy.deepcopy(module)

    def _group_over(self, ranks: tuple[int, ...]) -> dist.ProcessGroup | None:
        """A process group over `ranks` (of `group`) for the shared-weight gradient sum; None off it or for one rank."""
        if len(ranks) == 1 or self.rank not in ranks:
            return None
        if len(ranks) == dist.get_world_size(self.group):
            return self.group
        global_ranks = tuple(dist.get_global_rank(self.group, r) for r in ranks)
        # Only the member ranks call new_group (local synchronisation: other pipelines need not join). Such a
        # group is named by its ranks, so one is made per rank set and reused by later runners in this process,
        # as long as the default group it was made under lives: the key holds the id of that group and the value
        # the group itself (so the id is not reused), and a re-initialised process group makes new subgroups.
        world = dist.group.WORLD
        key = (id(world), global_ranks)
        if key not in _SUBGROUPS:
            _SUBGROUPS[key] = (world, dist.new_group(list(global_ranks), use_local_synchronization=True))
        return _SUBGROUPS[key][1]

    def _build_schedule(self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None) -> None:
        """Stages with static metadata for this micro-batch shape, and the 1F1B / interleaved schedule."""
        b, t = input_ids.shape
        if b % self.n_microbatches:
            raise ValueError(f"pipeline: batch size {b} does not split into {self.n_microbatches} micro-batches")
        if t < 2 and self.cfg.num_nextn_predict_layers:
            raise ValueError("pipeline: MTP needs sequences of at least 2 tokens")
        mb, hidden = b // self.n_microbatches, self.cfg.hidden_size
        dtype = self.model.model.word_embeddings.weight.dtype
        shapes = {"input_ids": ((mb, t), input_ids.dtype), "targets": ((mb, t), targets.dtype),
                  "hidden": ((mb, t, hidden), dtype), "final_hidden": ((mb, t, hidden), dtype),
                  "mtp_hidden": ((mb, t - 1, hidden), dtype),
                  **{name: ((), torch.float32) for name in ("main_loss", "z_loss", "loss")}}
        if loss_mask is not None:
            shapes["loss_mask"] = ((mb, t), loss_mask.dtype)

        def example(names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
            return tuple(torch.empty(shapes[n][0], dtype=shapes[n][1], device="meta").requires_grad_(n in DIFFERENTIABLE)
                         for n in names)

        has_mask = loss_mask is not None
        stages = []
        for j, module in zip(self.stage_ids, self.modules):
            module.in_names, module.out_names = self._names_before(j, has_mask), self._names_before(j + 1, has_mask)
            stages.append(PipelineStage(module, j, len(self.plan.stages), self.device, input_args=example(module.in_names),
                                        output_args=example(module.out_names), group=self.group))
        if self.plan.virtual == 1:
            self._schedule = Schedule1F1B(stages[0], self.n_microbatches, loss_fn=_last_output, scale_grads=True)
        else:
            self._schedule = ScheduleInterleaved1F1B(stages, self.n_microbatches, loss_fn=_last_output, scale_grads=True)

    # ------------------------------------------------------------ the step

    def step(self, input_ids: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None):
        """One training forward + backward of the batch [B, T] over the pipeline; every rank calls it alike.

        Returns the mean micro-batch loss (detached) on the rank holding the last stage, None elsewhere.
        Gradients are recomputed from zero: afterwards each local stage parameter's .grad is that of the
        mean micro-batch loss, shared-weight copies summed.
        """
        signature = (tuple(input_ids.shape), input_ids.dtype, targets.dtype,
                     None if loss_mask is None else loss_mask.dtype)
        if self._schedule is None:
            self._build_schedule(input_ids, targets, loss_mask)
            self._signature = signature
        elif signature != self._signature:
            raise ValueError(f"pipeline: every step needs the first step's batch shape, dtypes and loss-mask presence "
                             f"{self._signature}; got {signature}")
        for module in self.modules:
            module.train()
            module.zero_grad(set_to_none=True)
            module.loss_terms.clear()
        args = (input_ids, targets) if loss_mask is None else (input_ids, targets, loss_mask)
        losses: list[torch.Tensor] = []
        self._schedule.step(*args, target=targets, losses=losses, return_outputs=False)
        self._sum_shared_grads()
        if not self.has_last_stage:
            return None
        return torch.stack([loss.detach() for loss in losses]).sum() / self.n_microbatches

    @torch.no_grad()
    def _sum_shared_grads(self) -> None:
        """Every copy of a shared weight gets the sum of all copies' gradients (SPEC §7, tied-weight style)."""
        for path, group in self._sync_groups.items():
            local = [m.get_submodule(path).weight for j, m in zip(self.stage_ids, self.modules) if j in self._holders[path]]
            if not local:
                continue
            total = torch.zeros_like(local[0])
            for p in local:
                if p.grad is not None:
                    total += p.grad
            if group is not None:
                dist.all_reduce(total, group=group)
            for p in local:
                p.grad = total.clone()

    # ------------------------------------------------------------ views

    def parameters(self):
        """This rank's stage parameters, shared-weight copies included (each copy is stepped like its owner)."""
        seen = set()
        for module in self.modules:
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def named_parameters(self):
        """(model parameter name, parameter) of this rank's stages; a shared weight may appear more than once."""
        for module in self.modules:
            yield from module.named_parameters()

    def gather(self, grads: bool = False) -> dict[str, torch.Tensor]:
        """Collective over `group`: every rank gets {model name: parameter or buffer}, or {name: gradient} of every
        parameter, assembled from all ranks' stages (copies of a shared weight are equal; the first wins)."""
        local: dict[str, torch.Tensor] = {}
        for module in self.modules:
            items = ((n, p.grad) for n, p in module.named_parameters()) if grads else module.state_dict().items()
            for name, t in items:
                if t is not None:
                    local.setdefault(name, t.detach().cpu())
        parts: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, local, group=self.group)
        full: dict[str, torch.Tensor] = {}
        for part in parts:
            for name, t in part.items():
                full.setdefault(name, t)
        return full

    # ------------------------------------------------------------ training (collectives over `group`)

    def loss_terms(self) -> torch.Tensor:
        """Collective: the last step's mean (loss, main_loss, mtp_loss, z_loss) over micro-batches, on every rank
        (zeros where a term does not exist). The stage that sums the loss records them; the others add zeros."""
        local = [t for module in self.modules for t in module.loss_terms]
        terms = torch.stack(local).sum(0) / self.n_microbatches if local else torch.zeros(4, device=self.device)
        dist.all_reduce(terms, group=self.group)
        return terms

    def owned_parameters(self):
        """This rank's parameters that count once in the pipeline's gradient norm: a shared weight's copies
        carry the same summed gradient as its owner (the first holder), so only the owner's counts."""
        for j, module in zip(self.stage_ids, self.modules):
            for name, p in module.named_parameters():
                path = name.rsplit(".", 1)[0]
                if path not in self._holders or j == self._holders[path][0]:
                    yield p

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Collective: clip every local gradient (copies included) by the whole model's gradient norm; returns it.

        The squares of the owned gradients are summed over the pipeline ranks, so every rank gets the norm of the
        single-process model's gradient and scales by the same factor (or sees the same non-finite norm)."""
        grads = [p.grad for p in self.owned_parameters() if p.grad is not None]
        square = (torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)).square()
        dist.all_reduce(square, group=self.group)
        total = square.sqrt()
        torch.nn.utils.clip_grads_with_norm_(list(self.parameters()), max_norm, total)
        return total

    def moe_blocks(self) -> set[int]:
        """ids of the MoE blocks this rank's stages hold: the ones whose expert bias this rank updates."""
        return {id(m) for module in self.modules for m in module.moe_layers()}

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Collective: `optimizer`'s state as the single-process optimizer's full state dict keyed by model
        parameter name (a shared weight once: its copies were stepped alike), complete on every rank."""
        names = {id(p): name for name, p in self.named_parameters()}
        local = {"state": {}, "param_groups": []}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p in optimizer.state:
                    local["state"].setdefault(names[id(p)], {k: v.detach().cpu() if torch.is_tensor(v) else v
                                                             for k, v in optimizer.state[p].items()})
            local["param_groups"].append({**{k: v for k, v in group.items() if k != "params"},
                                          "params": [names[id(p)] for p in group["params"]]})
        parts: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(parts, local, group=self.group)
        order = {name: i for i, (name, _) in enumerate(self.model.named_parameters())}
        state = {}
        for part in parts:
            for name, per in part["state"].items():
                state.setdefault(name, per)
        groups = []
        for i, group in enumerate(parts[0]["param_groups"]):
            params = {name for part in parts for name in part["param_groups"][i]["params"]}
            groups.append({**group, "params": sorted(params, key=order.__getitem__)})
        return {"state": state, "param_groups": groups}

    def load_full_state(self, model_state: dict, optimizer: torch.optim.Optimizer, optim_state: dict) -> None:
        """Inverse of `gather` + `full_optimizer_state`: every rank passes the full states and keeps its stages'
        share, shared-weight copies included. Groups are matched by position (both built by `make_optimizer`)."""
        self.model.load_state_dict(model_state)
        for module in self.modules:  # the copies of shared weights; the rest is the model's own
            module.load_state_dict({name: model_state[name] for name in module.state_dict()})
        for name, p in self.named_parameters():
            if name in optim_state["state"]:
                optimizer.state[p] = {k: v.to(p.device, copy=True) if torch.is_tensor(v) and k != "step" else
                                      v.clone() if torch.is_tensor(v) else v
                                      for k, v in optim_state["state"][name].items()}
        if len(optim_state["param_groups"]) != len(optimizer.param_groups):
            raise ValueError(f"{len(optim_state['param_groups'])} parameter groups saved, "
                             f"{len(optimizer.param_groups)} in the optimizer")
        for group, saved in zip(optimizer.param_groups, optim_state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
