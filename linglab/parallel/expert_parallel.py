"""Expert parallelism (SPEC §7): routed experts sharded over EP ranks, tokens moved by a dropless all-to-all.

    apply_expert_parallel(model, ep_group)     # every MoE's `experts` becomes an ExpertParallelExperts
    model.load_state_dict(shard_expert_weights(full_state, rank, ep))     # a single-device checkpoint in
    full_state = gather_expert_weights(model.state_dict(), ep_group)      # ... and back out
    # AdamW's per-parameter state (FQN -> {"step", "exp_avg", "exp_avg_sq"}) in and out the same way:
    shard_expert_optimizer_state(full_optim["state"], rank, ep); gather_expert_optimizer_state(state, ep_group)

Rank r of an EP group of size P holds experts [r*E/P, (r+1)*E/P). The MoE block itself is untouched: its
router, dispatch gather, combine and shared expert run on each rank's own tokens exactly as on one device,
and hand `experts` the k copies of the tokens sorted by global expert, with per-expert counts. Sorted by
expert is also sorted by the rank that owns the expert, so the expert-parallel module only has to:
  1. all-to-all the per-expert counts, so each rank learns how many rows it receives for each local expert;
  2. all-to-all the rows and their routing weights with those variable split sizes (dropless: all are sent);
  3. reorder the received rows from (source rank, expert) to (expert, source rank) and run the module's own
     grouped GEMMs on the local experts (FP8 ones if `linglab.fp8_convert` converted it first);
  4. undo the reorder and all-to-all the outputs back to the ranks the tokens came from.

Autograd: the adjoint of an all-to-all is the all-to-all with the split sizes swapped; `_AllToAll` does
that in its backward. Tokens and weights travel in one Function so that every rank issues the collectives
in the same order in the backward too (two separate Functions would rely on the engine's scheduling).
Only the routed experts' parameters are sharded: everything else is replicated over the EP group and its
gradients still need the data-parallel reduction (FSDP or an all-reduce) over the ranks' distinct tokens.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from linglab.moe import GroupedExperts, MoE

EXPERT_PARAMS = ("experts.gate_up_proj", "experts.down_proj")


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """Rows of each tensor sent in chunks of `in_splits` to the ranks, received in chunks of `out_splits`."""

    @staticmethod
    def forward(ctx, out_splits, in_splits, group, *tensors):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return tuple(_all_to_all(t, out_splits, in_splits, group) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        out_splits, in_splits = ctx.splits
        return None, None, None, *(_all_to_all(g, in_splits, out_splits, ctx.group) for g in grads)


class _Permute(torch.autograd.Function):
    """Rows reordered by `perm`; the backward gathers with the inverse permutation (no scatter-add)."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.contiguous().index_select(0, inverse), None, None


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts holding this rank's E/P experts, with the interface of all E (SPEC §7).

    Parameters keep their names and layout (`gate_up_proj` [E/P, 2I, H], `down_proj` [E/P, H, I]), rows
    [r*E/P, (r+1)*E/P) of the single-device stacks, so state-dict slicing still applies. `forward` runs the
    all-to-alls around `super().forward`: the local GEMMs of the class the module had before
    (`to_expert_parallel`).
    """

    group: dist.ProcessGroup | None
    ep: int
    num_experts: int

    def forward(self, x_sorted: torch.Tensor, weights_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows sorted by global expert [N*k, H], their weights and the [E] counts -> their outputs, same order."""
        ep, local_experts = self.ep, self.num_experts // self.ep
        send = counts.view(ep, local_experts)  # row j: what this rank sends to rank j, per expert of rank j
        recv = torch.empty_like(send)  # row s: what rank s sends here, per local expert
        dist.all_to_all_single(recv, send.contiguous(), group=self.group)
        in_splits, out_splits = torch.stack([send.sum(1), recv.sum(1)]).tolist()  # one host sync for both

        x_recv, w_recv = _AllToAll.apply(out_splits, in_splits, self.group, x_sorted, weights_sorted)
        # Received rows come grouped by (source rank, local expert); the grouped GEMM wants them by expert.
        expert_of = torch.arange(local_experts, device=counts.device).repeat(ep).repeat_interleave(
            recv.flatten(), output_size=sum(out_splits))  # the size is known: no second host sync on a GPU
        order = expert_of.argsort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        out = super().forward(_Permute.apply(x_recv, order, inverse), _Permute.apply(w_recv, order, inverse),
                              recv.sum(0))
        (out_sorted,) = _AllToAll.apply(in_splits, out_splits, self.group, _Permute.apply(out, inverse, order))
        return out_sorted


@functools.cache
def _expert_parallel_class(experts_class: type[GroupedExperts]) -> type[ExpertParallelExperts]:
    """ExpertParallelExperts whose `super().forward` is `experts_class`'s forward."""
    if experts_class is GroupedExperts:
        return ExpertParallelExperts
    return type(f"ExpertParallel{experts_class.__name__}", (ExpertParallelExperts, experts_class), {})


def to_expert_parallel(experts: GroupedExperts, group: dist.ProcessGroup | None) -> ExpertParallelExperts:
    """Cut a single-device GroupedExperts down to this rank's experts, in place.

    The module keeps what was set on it and its own grouped GEMMs: a converted subclass (FP8) becomes an
    expert-parallel subclass of itself, made once per class as FSDP2's fully_shard does.
    """
    ep = dist.get_world_size(group)
    num_experts = experts.gate_up_proj.shape[0]
    if num_experts % ep:
        raise ValueError(f"expert parallel: num_experts {num_experts} is not divisible by the EP size {ep}")
    local = num_experts // ep
    first = dist.get_rank(group) * local
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            setattr(experts, name, nn.Parameter(full[first:first + local].clone(), full.requires_grad))
    experts.__class__ = _expert_parallel_class(type(experts))
    experts.group, experts.ep, experts.num_experts = group, ep, num_experts
    return experts


def apply_expert_parallel(model: nn.Module, ep_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard the routed experts of every MoE block in `model` (main stack and MTP) over `ep_group`, in place.

    Every rank must hold the same full weights beforehand (same seed, or the same checkpoint loaded); each
    keeps its slice. Call before FSDP or the optimizer, which must see the sliced parameters.
    """
    for module in model.modules():
        if isinstance(module, MoE) and not isinstance(module.experts, ExpertParallelExperts):
            to_expert_parallel(module.experts, ep_group)
    return model


def _is_expert_param(name: str) -> bool:
    return name.endswith(EXPERT_PARAMS)


def shard_expert_weights(full_state: dict[str, torch.Tensor], rank: int, ep: int) -> dict[str, torch.Tensor]:
    """A single-device state dict cut down to EP rank `rank` of `ep`: stacked experts sliced on dim 0."""
    return {name: t.chunk(ep)[rank].clone() if _is_expert_param(name) else t for name, t in full_state.items()}


def _gather_rows(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def gather_expert_weights(state: dict[str, torch.Tensor], group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Inverse of `shard_expert_weights`, collectively over `group`: every rank gets the full stacks."""
    return {name: _gather_rows(t, group) if _is_expert_param(name) else t for name, t in state.items()}


def shard_expert_optimizer_state(state: dict[str, dict], rank: int, ep: int) -> dict[str, dict]:
    """Optimizer state keyed by parameter name, cut down like `shard_expert_weights` (scalars such as `step` kept)."""
    return {name: {k: v.chunk(ep)[rank].clone() if _is_expert_param(name) and v.dim() else v for k, v in per.items()}
            for name, per in state.items()}


def gather_expert_optimizer_state(state: dict[str, dict], group: dist.ProcessGroup | None = None) -> dict[str, dict]:
    """Inverse of `shard_expert_optimizer_state`, collectively over `group` (same order of names on every rank)."""
    return {name: {k: _gather_rows(v, group) if _is_expert_param(name) and v.dim() else v for k, v in per.items()}
            for name, per in state.items()}
