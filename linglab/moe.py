"""The Ling 2.0 MoE block (SPEC §1.4): sigmoid router with group-limited top-k, dropless grouped experts,
one shared expert, aux-loss-free balancing through an fp32 expert bias, and the MaxVio metric.

The hot path has no Python loop over experts: tokens are sorted by expert and each projection runs as
one grouped GEMM (`torch._grouped_mm`, forward and backward). A per-expert loop exists only in the
tests, as the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from linglab.config import ModelConfig
from linglab.precision import autocast_operands, full_precision


def group_limited_topk(scores_for_choice: torch.Tensor, n_group: int, topk_group: int, top_k: int) -> torch.Tensor:
    """Expert indices [N, top_k] chosen by group-limited top-k (SPEC §1.4 step 3).

    A group's score is the sum of its two best experts; only the `topk_group` best groups stay
    eligible, the others are masked to -inf before the final top-k over experts.
    """
    n, num_experts = scores_for_choice.shape
    grouped = scores_for_choice.view(n, n_group, num_experts // n_group)
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [N, n_group]
    kept_groups = group_scores.topk(topk_group, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)
    masked = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(n, num_experts)
    return masked.topk(top_k, dim=-1).indices


def route(logits: torch.Tensor, expert_bias: torch.Tensor, n_group: int, topk_group: int, top_k: int,
          routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights and expert indices, both [N, top_k], from fp32 router logits (SPEC §1.4).

    The bias steers which experts are selected; the weights come from the UNBIASED sigmoid scores,
    normalised over the chosen k and scaled by routed_scaling_factor.
    """
    scores = torch.sigmoid(logits.float())
    idx = group_limited_topk(scores + expert_bias, n_group, topk_group, top_k)
    w = scores.gather(1, idx)
    w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor, idx


class Router(nn.Module):
    """The gate: W_gate (E x H) in fp32 and the per-expert bias buffer (HF: mlp.gate.weight/expert_bias)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # A buffer, not a parameter: moved by update_expert_bias, never by the optimizer.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with full_precision(x.device.type):  # bf16 autocast would round the logits that pick the experts
            logits = F.linear(x.float(), self.weight.float())
        c = self.cfg
        weights, idx = route(logits, self.expert_bias, c.n_group, c.topk_group, c.num_experts_per_tok,
                             c.routed_scaling_factor)
        return weights, idx, logits


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) — the dense FFN and the shared expert (SPEC §1.2)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GroupedExperts(nn.Module):
    """All routed experts as stacked weights, laid out like nn.Linear per expert ([E, out, in]).

    gate_proj and up_proj are fused into `gate_up_proj` [E, 2I, H] so one grouped GEMM reads the
    tokens once; the checkpoint splits it back into the HF per-expert gate_proj / up_proj.
    `forward` takes tokens already sorted by expert, their routing weights and the per-expert counts.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x_sorted: torch.Tensor, weights_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)
        gate, up = grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), offs).chunk(2, dim=-1)
        # Scaling the I-wide hidden by the routing weight equals scaling the H-wide output, at less traffic.
        h = F.silu(gate) * up * weights_sorted.unsqueeze(-1).to(gate.dtype)
        return grouped_mm(h, self.down_proj.transpose(1, 2), offs)


@torch.compiler.disable
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Segment-wise x[seg_e] @ w[e] for contiguous segments ending at `offs` (int32 cumulative counts); in bf16
    under bf16 autocast (`linglab.precision`), which does not cast this op itself.

    Kept out of compiled blocks (train.compile): torch's shape-inference kernel of `_grouped_mm` takes bf16 only,
    so a compiled layer breaks its graph here and runs the grouped GEMM itself, unchanged, eagerly.
    """
    x, w = autocast_operands(x, w)
    return torch._grouped_mm(x, w, offs=offs)


class _Dispatch(torch.autograd.Function):
    """x [N, H] -> the k copies of each token sorted by expert [N*k, H]; backward gathers and sums.

    Dispatch and combine are each other's adjoint. Writing both as gathers (index_select) instead of
    scatter-adds keeps them free of atomics: on a CPU this halves the time of everything but the GEMMs.
    """

    @staticmethod
    def forward(ctx, x, token_of, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, token_of)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse).view(-1, ctx.k, grad.shape[-1]).sum(1), None, None, None


class _Combine(torch.autograd.Function):
    """Expert outputs sorted by expert [N*k, H] -> per-token sum over its k experts [N, H]."""

    @staticmethod
    def forward(ctx, out, token_of, inverse, k):
        ctx.save_for_backward(token_of)
        return out.index_select(0, inverse).view(-1, k, out.shape[-1]).sum(1)

    @staticmethod
    def backward(ctx, grad):
        (token_of,) = ctx.saved_tensors
        return grad.contiguous().index_select(0, token_of), None, None, None


class MoE(nn.Module):
    """Routed experts + shared expert, dropless (SPEC §1.4 step 5).

    Dispatch: the N*k (token, expert) pairs are sorted by expert (stable, so deterministic), each
    expert's contiguous segment goes through the grouped GEMMs, and combine sums every token's k
    weighted outputs. While training, tokens routed to each expert accumulate in `tokens_per_expert`
    (a non-persistent buffer) for the trainer's bias update and the MaxVio metric.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = (SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
                               if cfg.num_shared_experts > 0 else None)
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """y, and the router z-loss while training with router_z_loss_coef > 0 (else None), returned for the
        model to sum over layers."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, idx, logits = self.gate(x)
        k = idx.shape[1]

        flat_idx = idx.flatten()
        order = flat_idx.argsort(stable=True)  # sorted slot -> (token, k) pair
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        token_of = order // k
        counts = torch.bincount(flat_idx, minlength=self.cfg.num_experts)

        out = self.experts(_Dispatch.apply(x, token_of, inverse, k), weights.flatten()[order], counts)
        y = _Combine.apply(out, token_of, inverse, k)

        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        z_loss = None
        if self.training:
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
            if self.cfg.router_z_loss_coef > 0:
                z_loss = router_z_loss(logits, self.cfg.router_z_loss_coef)
        return y.view(shape), z_loss


def router_z_loss(logits: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * mean over tokens of logsumexp(router logits)^2, the optional router z-loss (SPEC §1.4): it keeps
    the fp32 router logits from growing."""
    return coef * torch.logsumexp(logits, dim=-1).square().mean()


@torch.no_grad()
def update_expert_bias(expert_bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """Aux-loss-free balancing step (SPEC §1.4), in place.

    e_i = mean(load) - load_i;  b_i <- b_i + u * (sign(e_i) - mean_j sign(e_j)). The zero-mean
    correction keeps the bias from drifting as a whole. `load` must already be summed over DP ranks.
    """
    load = load.float()
    sign = torch.sign(load.mean() - load)
    expert_bias += rate * (sign - sign.mean())


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean(load) - 1 (SPEC §1.4); 0 for a perfectly balanced layer."""
    load = load.float()
    mean = load.mean()
    return float(load.max() / mean - 1) if mean > 0 else 0.0
