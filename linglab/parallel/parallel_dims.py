"""Training on several ranks under torchrun (SPEC §7): the process group, the (dp, ep) layout, and the few
collectives the Trainer needs so that N ranks compute what one process computes on the whole batch.

    torchrun --nproc_per_node 4 -m linglab train --parallel.ep=2     # dp = 4 / 2 = 2
    dims = init_parallel(cfg.parallel, device)    # a one-rank ParallelDims when not under torchrun
    model = dims.parallelize(model)               # expert parallel over ep, then FSDP2; optimizer after this

Layout: W = dp * ep ranks, rank = d * ep + e. Every rank reads its own batch_size / W rows of each global
batch (`DataLoader.next_batch(shard=rank, num_shards=W)`): expert parallelism is carved out of data
parallelism, so the ep ranks of group d route distinct tokens and trade them by all-to-all. Routed experts
are sliced over the ep ranks of a group and FSDP2-sharded over the dp ranks holding the same slice; every
other parameter is FSDP2-sharded over all W ranks. The model code stays single-device.

The same math as one process on the global batch:
- loss: each micro-batch is the masked mean over the GLOBAL count of target tokens (`loss_weights`), so
  FSDP2's average over ranks gives the single-process gradient (SPEC §2, §1.5 for the MTP term);
- expert loads are summed over all ranks before the bias update, so every rank's bias moves identically
  (SPEC §1.4);
- clipping uses the global gradient norm (`clip_grad_norm_`): every rank scales by the same factor and
  makes the same skip decision on a non-finite loss or norm.
Checkpoints hold the full single-device state (`full_state`, `load_full_state`), so any layout resumes any
other. WORLD_SIZE=1 (`torchrun --nproc_per_node 1`) is the single-process run.

RL with rollout ranks trains on the first ranks only (`sub_layout`): their ParallelDims holds their process `group`,
and every collective above stays within it.

Pipeline parallel (`--parallel.pp=W`, dp = ep = 1) is a layout of its own: every rank reads the whole global
batch (`data_rank` 0 of `data_world` 1) and the Trainer runs it through `linglab.parallel.pipeline`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from linglab.config import ParallelConfig
from linglab.errors import LinglabError
from linglab.model import LingForCausalLM
from linglab.parallel.expert_parallel import (
    EXPERT_PARAMS,
    apply_expert_parallel,
    gather_expert_optimizer_state,
    gather_expert_weights,
    shard_expert_optimizer_state,
    shard_expert_weights,
)
from linglab.parallel.fsdp import all_reduce_expert_loads, apply_fsdp

FULL = StateDictOptions(full_state_dict=True)


@dataclass
class ParallelDims:
    """This rank's place in the launch; a single process is rank 0 of 1 and every method degenerates to a no-op."""

    rank: int = 0
    world: int = 1
    dp: int = 1
    ep: int = 1
    pp: int = 1  # pipeline ranks: all of them when > 1 (dp = ep = 1)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    world_mesh: DeviceMesh | None = None  # all ranks: FSDP2 of everything but the routed experts
    expert_mesh: DeviceMesh | None = None  # the dp ranks holding this rank's expert slice (ep > 1)
    ep_group: dist.ProcessGroup | None = None  # the ep ranks of this rank's group (ep > 1)
    group: dist.ProcessGroup | None = None  # the ranks of this layout when they are not all (RL's trainer ranks)
    owns_group: bool = False  # init_parallel created the process group, so close() destroys it

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run directory: metrics, checkpoints, evaluations, report."""
        return self.rank == 0

    @property
    def data_world(self) -> int:
        """Ranks that read distinct rows of each batch: dp * ep (the pipeline ranks share theirs)."""
        return self.dp * self.ep

    @property
    def data_rank(self) -> int:
        return self.rank // self.pp

    def parallelize(self, model: LingForCausalLM) -> LingForCausalLM:
        """Slice the experts over ep, then FSDP2 (in place); the optimizer must be built afterwards."""
        if self.data_world == 1:  # one process, or a pipeline: the Trainer hands the model to PipelineRunner
            return model
        if self.ep > 1:
            apply_expert_parallel(model, self.ep_group)
        return apply_fsdp(model, self.world_mesh, expert_mesh=self.expert_mesh)

    # -- the step

    def loss_weights(self, masks: list[torch.Tensor]) -> list[tuple[float, float]]:
        """Per micro-batch (main, MTP) factors that make this rank's masked mean its share of the global mean.

        `masked_cross_entropy` divides by this rank's count c of target tokens; the single-process loss divides
        by the global count C. With the factor c * W / C, FSDP2's average over the W ranks is sum(ce * mask) / C.
        The MTP head's targets are the mask without its first column (SPEC §1.5). 1.0 in a single process.
        """
        if self.world == 1:
            return [(1.0, 1.0)] * len(masks)
        local = torch.stack([torch.stack([(k != 0).sum(), (k[:, 1:] != 0).sum()]) for k in masks])
        total = local.clone()
        dist.all_reduce(total, group=self.group)
        return [tuple(row) for row in (local.double() * self.world / total.clamp(min=1).double()).tolist()]

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of `t` over the ranks (for reporting the global loss)."""
        if self.world == 1:
            return t
        t = t.clone()
        dist.all_reduce(t, group=self.group)
        return t / self.world

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over the ranks, on every rank (`t` itself in a single process)."""
        if self.world == 1:
            return t
        t = t.to(self.device, copy=True)
        dist.all_reduce(t, group=self.group)
        return t

    def gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank: [obj] in a single process."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_reduce_expert_loads(self, model: LingForCausalLM) -> None:
        """Sum the step's expert loads over all ranks: each routed its own tokens (SPEC §1.4)."""
        if self.world > 1:
            all_reduce_expert_loads(model)

    def clip_grad_norm_(self, model: LingForCausalLM, max_norm: float) -> torch.Tensor:
        """Clip every gradient by the norm of the whole model's gradient (SPEC §2: clip 1.0); returns that norm.

        FSDP2 gradients are DTensors whose norm reduces over their mesh. With ep > 1 the expert slices live on
        another mesh (the dp ranks) and each ep rank holds other experts, so their squared norm is summed over
        the ep group before it joins the rest.
        """
        if self.ep == 1:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            return norm.full_tensor() if isinstance(norm, DTensor) else norm
        experts, others = [], []
        for name, p in model.named_parameters():
            if p.grad is not None:
                (experts if name.endswith(EXPERT_PARAMS) else others).append(p)
        squares = []
        for params, group in ((others, None), (experts, self.ep_group)):
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            square = (norm.full_tensor() if isinstance(norm, DTensor) else norm).square()
            if group is not None:
                dist.all_reduce(square, group=group)
            squares.append(square)
        total = torch.stack(squares).sum().sqrt()
        for params in (others, experts):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # -- checkpoints and evaluation

    def full_state(self, model: LingForCausalLM, optimizer: torch.optim.Optimizer | None = None) -> tuple[dict, dict | None]:
        """The single-device model state dict and AdamW state (keyed by parameter name), complete on every rank.

        Collective: FSDP2 shards are gathered by torch.distributed.checkpoint's full state dicts, expert slices
        by an all-gather over the ep group. One process gets the same, so checkpoints do not depend on the layout.
        """
        model_state = get_model_state_dict(model, options=FULL)
        optim_state = get_optimizer_state_dict(model, optimizer, options=FULL) if optimizer is not None else None
        if self.ep > 1:
            model_state = gather_expert_weights(model_state, self.ep_group)
            if optim_state is not None:
                optim_state = {**optim_state, "state": gather_expert_optimizer_state(optim_state["state"], self.ep_group)}
        return model_state, optim_state

    def load_full_state(self, model: LingForCausalLM, optimizer: torch.optim.Optimizer, model_state: dict,
                        optim_state: dict, every_parameter_trained: bool = True) -> None:
        """Inverse of `full_state`: every rank passes the full state and keeps its expert slice and FSDP2 shards.

        `every_parameter_trained=False` (RL, whose loss never reaches the MTP head) accepts parameters without AdamW
        state: those that never had a gradient have none."""
        if self.ep > 1:
            ep_rank = dist.get_rank(self.ep_group)
            model_state = shard_expert_weights(model_state, ep_rank, self.ep)
            optim_state = {**optim_state, "state": shard_expert_optimizer_state(optim_state["state"], ep_rank, self.ep)}
        set_model_state_dict(model, model_state, options=FULL)
        options = FULL if every_parameter_trained else StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)

    # -- coordination

    def on_main(self, fn):
        """fn() on rank 0 only: its result there, None elsewhere; an error on rank 0 is raised on every rank.

        For what only rank 0 does (prepare the run directory, write a checkpoint), so the others do not wait
        in the next collective for a rank that has failed.
        """
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as e:  # re-raised below, after the other ranks heard of it
                error = e
        if self.world > 1:
            message = [None if error is None else str(error) if isinstance(error, LinglabError)
                       else f"rank 0 failed: {type(error).__name__}: {error}"]
            dist.broadcast_object_list(message, src=0, group=self.group)
            if error is None and message[0] is not None:
                raise LinglabError(message[0])
        if error is not None:
            raise error
        return result

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

    def close(self) -> None:
        """Destroy the process group if init_parallel created it (after the run's last collective)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def sub_layout(dims: ParallelDims, ranks: int) -> ParallelDims:
    """Data parallel over the first `ranks` of the world (RL's trainer ranks, the others generate), for the ranks in
    it; a one-rank ParallelDims for `ranks` = 1. Collective: every rank of the world calls it (`dist.new_group`)."""
    group = dist.new_group(ranks=list(range(ranks))) if ranks > 1 else None
    if dims.rank >= ranks or ranks == 1:
        return ParallelDims(device=dims.device)
    return ParallelDims(rank=dims.rank, world=ranks, dp=ranks, device=dims.device, group=group,
                        world_mesh=DeviceMesh.from_group(group, dims.device.type, mesh_dim_names=("world",)))


def init_parallel(cfg: ParallelConfig, device: torch.device, command: str = "train") -> ParallelDims:
    """The launch this process belongs to: torchrun's WORLD_SIZE/RANK/LOCAL_RANK, or a process group already
    initialised by the caller (the tests); a one-rank ParallelDims for a plain `linglab train` (or `command`).

    Initialises the process group (gloo on CPU; NCCL when `device` is cuda, each rank on cuda:LOCAL_RANK) and
    the meshes. A layout that does not match the number of ranks is a one-line LinglabError.
    """
    initialised = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialised else int(os.environ.get("WORLD_SIZE", "1"))
    ep, pp = cfg.ep, cfg.pp
    dp = cfg.dp or max(world // (ep * pp), 1)
    if pp > 1 and dp * ep > 1:
        raise LinglabError(f"parallel: pp={pp} with dp={dp} x ep={ep} is not built yet; pipeline parallel runs "
                           f"alone (dp = ep = 1, pp = the number of ranks)")
    if pp > 1 and pp != world:
        if world == 1:
            raise LinglabError(f"parallel: pp={pp} needs {pp} ranks but this is a single process; "
                               f"launch it with torchrun --nproc_per_node {pp} -m linglab {command} ...")
        raise LinglabError(f"parallel: pp={pp} ranks, but {world} were started (WORLD_SIZE); make pp equal the "
                           "number of ranks")
    if dp * ep * pp != world:
        if world == 1:
            raise LinglabError(f"parallel: dp={dp} x ep={ep} needs {dp * ep} ranks but this is a single process; "
                               f"launch it with torchrun --nproc_per_node {dp * ep} -m linglab {command} ...")
        raise LinglabError(f"parallel: dp={dp} x ep={ep} = {dp * ep} ranks, but {world} were started (WORLD_SIZE); "
                           "make dp * ep equal the number of ranks")
    if world == 1:
        return ParallelDims(device=device)

    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() if initialised else 0))
    if device.type == "cuda":
        if device.index is not None:
            raise LinglabError(f"parallel: train.device={device} under torchrun; use train.device=cuda "
                               "(each rank takes cuda:LOCAL_RANK)")
        if local_rank >= torch.cuda.device_count():
            raise LinglabError(f"parallel: LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not initialised:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    dims = ParallelDims(rank=dist.get_rank(), world=world, dp=dp, ep=ep, pp=pp, device=device, owns_group=not initialised,
                        world_mesh=init_device_mesh(device.type, (world,), mesh_dim_names=("world",)))
    if ep > 1:
        mesh = init_device_mesh(device.type, (dp, ep), mesh_dim_names=("dp", "ep"))
        dims.expert_mesh, dims.ep_group = mesh["dp"], mesh.get_group("ep")
    return dims
