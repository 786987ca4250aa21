"""Tokens/s and MFU of one forward+backward step for the `tiny` and `small` presets.

MFU = model FLOPs/s (linglab.flops: 3 x forward, active experts only, attention and MTP included)
divided by the fp32 matmul FLOP/s measured in the same process just before.

    .venv/bin/python benchmarks/train_step.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak_flops, report, time_it  # noqa: E402

from linglab.config import load_config  # noqa: E402
from linglab.flops import flops_per_token  # noqa: E402
from linglab.model import build_model  # noqa: E402

# (batch, seq_len) per preset: the shapes training uses.
SHAPES = {"tiny": (32, 128), "small": (4, 512)}


def measure(preset: str, peak: float) -> dict:
    cfg = load_config(preset).model
    model = build_model(cfg, seed=0)
    batch, seq = SHAPES[preset]
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))

    def step():
        model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = time_it(step, repeats=5)
    tokens = batch * seq
    mfu = flops_per_token(cfg, seq) * tokens / seconds / peak
    print(f"{preset:6s} [{batch} x {seq}]  {seconds * 1e3:7.1f} ms/step  {tokens / seconds:9.0f} tokens/s  MFU {mfu:.1%}")
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "mfu": mfu, "batch": batch, "seq_len": seq}


def main() -> None:
    torch.manual_seed(0)
    peak = matmul_peak_flops()
    print(f"fp32 matmul peak in this process: {peak / 1e9:.1f} GFLOP/s")
    rows = {preset: measure(preset, peak) for preset in SHAPES}
    report("train_step", {"mfu_small": (rows["small"]["mfu"], 0.35), "mfu_tiny": (rows["tiny"]["mfu"], "-"),
                          "tokens_per_s_tiny": (rows["tiny"]["tokens_per_s"], "-")},
           {"matmul_peak_flops": peak, "presets": rows})


if __name__ == "__main__":
    main()
