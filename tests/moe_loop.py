"""The per-expert loop: the reference the grouped MoE must equal (used by tests and benchmarks only)."""

import torch
import torch.nn.functional as F

from linglab.moe import MoE


def moe_loop_forward(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """MoE forward with one Python iteration per expert; x is [N, H]."""
    weights, idx, _ = moe.gate(x)
    y = torch.zeros_like(x)
    ex = moe.experts
    for e in range(moe.cfg.num_experts):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        gate_w, up_w = ex.gate_up_proj[e].chunk(2, dim=0)
        h = F.silu(x[tok] @ gate_w.T) * (x[tok] @ up_w.T)
        y = y.index_add(0, tok, (h @ ex.down_proj[e].T) * weights[tok, slot].unsqueeze(-1))
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(x)
    return y
