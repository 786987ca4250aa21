"""Grouped-GEMM MoE vs the per-expert loop, forward + backward.

64 experts, top-8, hidden 256, expert width 128, 4096 tokens (issue 2). Both paths share the router and
the shared expert; they differ only in how routed tokens reach their experts.

    .venv/bin/python benchmarks/moe_dispatch.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import matmul_peak_flops, report, time_it  # noqa: E402
from moe_loop import moe_loop_forward  # noqa: E402

from linglab.config import load_config  # noqa: E402
from linglab.moe import MoE  # noqa: E402

SHAPE = dict(hidden_size=256, num_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4, moe_intermediate_size=128)
TOKENS = 4096


def main() -> None:
    torch.manual_seed(0)
    cfg = load_config("tiny", overrides=[f"--model.{k}={v}" for k, v in SHAPE.items()]).model
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0.0, 0.02)
    x = torch.randn(TOKENS, cfg.hidden_size, requires_grad=True)

    def step(forward):
        forward(x).sum().backward()

    grouped = time_it(lambda: step(lambda t: moe(t)[0]), repeats=7)
    loop = time_it(lambda: step(lambda t: moe_loop_forward(moe, t)), repeats=7)
    peak = matmul_peak_flops()
    # On a CPU the loop's per-expert launch cost is small, so both paths are bounded below by the same
    # routed-expert GEMM time: the speedup cannot exceed loop / floor.
    gemm_flops = 3 * 3 * 2 * TOKENS * cfg.num_experts_per_tok * cfg.hidden_size * cfg.moe_intermediate_size
    floor = gemm_flops / peak
    print(f"grouped {grouped * 1e3:.1f} ms   loop {loop * 1e3:.1f} ms   routed-expert GEMMs at the fp32 peak "
          f"({peak / 1e9:.0f} GFLOP/s): {floor * 1e3:.1f} ms, so at most {loop / floor:.2f}x is possible here")
    report("moe_dispatch", {"grouped_over_loop_speedup": (loop / grouped, 3)},
           {"shape": SHAPE, "tokens": TOKENS, "grouped_s": grouped, "loop_s": loop, "gemm_floor_s": floor,
            "max_possible_speedup": loop / floor, "matmul_peak_flops": peak})


if __name__ == "__main__":
    main()
