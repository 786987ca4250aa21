"""Data parallelism with FSDP2 (SPEC §7), applied to the single-device model from outside.

    mesh = init_device_mesh("cuda", (world_size,), mesh_dim_names=("dp",))
    apply_fsdp(model, mesh)                        # each decoder layer, the MTP layer, then the root
    optimizer = make_optimizer(model, cfg.train)   # built after sharding: it holds the local shards
    ...forward/backward on this rank's share of the batch...
    all_reduce_expert_loads(model, mesh.get_group())   # before update_expert_bias (SPEC §1.4)

Gradients: FSDP2's reduce-scatter AVERAGES over the mesh, so the gradient each rank ends with is that of
the mean of the ranks' losses. That equals the gradient of the full-batch mean when every rank's loss is
the mean over an equal number of counted tokens (equal micro-batches, no loss mask, or `grad_accum`
scaling applied alike on every rank); an uneven loss mask needs each rank's loss rescaled by
local_tokens * world / global_tokens first (`ParallelDims.loss_weights` does).

With expert parallelism, `apply_fsdp(model, world_mesh, expert_mesh=dp_mesh)` after `apply_expert_parallel`
makes each rank's expert slice a unit of its own over the dp ranks that hold the same slice.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from linglab.model import LingForCausalLM
from linglab.moe import MoE


def apply_fsdp(model: LingForCausalLM, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None,
               reshard_after_forward: bool = True, expert_mesh: DeviceMesh | None = None) -> LingForCausalLM:
    """Shard `model` in place with FSDP2 over `mesh`: one unit per decoder layer and MTP layer, then the root.

    A unit per layer bounds peak memory to one unsharded layer at a time; the root unit holds the embedding,
    the final norm and the lm_head, which the MTP head reuses (SPEC §1.5) inside the root's forward, so
    they are gathered once per step. Parameters stay fp32 unless `mp_policy` asks for a lower compute dtype;
    the fp32 expert-bias and load buffers are not parameters and stay replicated.

    `expert_mesh` (experts already sliced by `apply_expert_parallel`): the ranks holding the same expert slice.
    Each `experts` module becomes a unit over it, and its gradients are divided by the size of `mesh` (all
    ranks), not of `expert_mesh`: an expert's local gradient already sums the loss gradients of the tokens
    of every EP rank of its group, so an average over the dp ranks alone would count those ep times.
    """
    mp_policy = mp_policy or MixedPrecisionPolicy()
    if expert_mesh is not None:
        for moe in (m for m in model.modules() if isinstance(m, MoE)):
            fully_shard(moe.experts, mesh=expert_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
            moe.experts.set_gradient_divide_factor(float(mesh.size()))
            # Sum, then divide: gloo has no PREMUL_SUM. Not on one rank, where FSDP2 (torch 2.13) then divides twice.
            moe.experts.set_force_sum_reduction_for_comms(expert_mesh.size() > 1)
    for layer in [*model.model.layers, *model.model.mtp_layers]:
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    return model


@torch.no_grad()
def all_reduce_expert_loads(model: LingForCausalLM, group: dist.ProcessGroup | None = None) -> None:
    """Sum every MoE layer's `tokens_per_expert` (the MTP layer's included) over the ranks of `group`, in place (SPEC §1.4).

    The bias update needs the step's global loads, and after this every rank holds the same loads, so
    each rank's `update_expert_bias` moves its replicated bias identically. `group` must span every rank
    that routed distinct tokens: the data-parallel ranks, and the expert-parallel ranks too (each routes
    its own tokens over all E experts). One collective for all layers: the loads are flattened first.
    """
    loads = [m.tokens_per_expert for m in model.moe_layers()]
    if not loads:
        return
    flat = torch.cat(loads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    for load, summed in zip(loads, flat.split([load.numel() for load in loads])):
        load.copy_(summed)
