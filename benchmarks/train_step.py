"""Tokens/s and MFU of one forward+backward step for the `tiny` and `small` presets, and what train.compile gains.

MFU = model FLOPs/s (linglab.flops: 3 x forward, active experts only, attention and MTP included)
divided by the fp32 matmul FLOP/s measured in the same process just before.

The compile section times four sides alternately in one process: the eager model, the same with its decoder
layers compiled (`linglab.train.compile_blocks`, as `--train.compile=true`), and both again with FP8 (emulated,
fused quantisers). Their first steps, which compile, are timed apart (`compile_s`); `recompiles` counts graphs
compiled after them (0: no step recompiles).

    .venv/bin/python benchmarks/train_step.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak_flops, report, time_it  # noqa: E402

from linglab.config import load_config  # noqa: E402
from linglab.flops import flops_per_token  # noqa: E402
from linglab.fp8 import Fp8Recipe  # noqa: E402
from linglab.fp8_convert import convert_to_fp8  # noqa: E402
from linglab.model import build_model  # noqa: E402
from linglab.train import compile_blocks  # noqa: E402

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


def measure_compile(preset: str, rounds: int) -> dict:
    cfg = load_config(preset).model
    eager = build_model(cfg, seed=0)
    fp8 = copy.deepcopy(eager)
    convert_to_fp8(fp8, Fp8Recipe(), "emulate")
    models = {"eager": eager, "compiled": copy.deepcopy(eager), "fp8": fp8, "fp8_compiled": copy.deepcopy(fp8)}
    compile_blocks(models["compiled"])
    compile_blocks(models["fp8_compiled"])
    batch, seq = SHAPES[preset]
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1))

    def step(model):
        def run():
            model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    first_step = {}
    for name, model in models.items():
        start = time.perf_counter()
        step(model)()
        first_step[name] = time.perf_counter() - start
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    runs = {name: [] for name in models}
    for _ in range(rounds):  # alternated, so that drifts in machine speed hit all sides alike
        for name, model in models.items():
            runs[name].append(time_it(step(model), repeats=3, warmup=1))
    seconds = {name: sorted(v)[len(v) // 2] for name, v in runs.items()}
    row = {"seconds": seconds, "speedup": seconds["eager"] / seconds["compiled"],
           "fp8_speedup": seconds["fp8"] / seconds["fp8_compiled"],
           "compile_s": {name: first_step[name] - seconds[name] for name in ("compiled", "fp8_compiled")},
           "recompiles": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs, "batch": batch, "seq_len": seq}
    print(f"{preset:6s} [{batch} x {seq}]  " + "  ".join(f"{k} {v * 1e3:7.1f} ms" for k, v in seconds.items())
          + f"  compile speedup {row['speedup']:.2f} (fp8 {row['fp8_speedup']:.2f})")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the compile section's sides")
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = matmul_peak_flops()
    print(f"fp32 matmul peak in this process: {peak / 1e9:.1f} GFLOP/s")
    rows = {preset: measure(preset, peak) for preset in SHAPES}
    compiled = {preset: measure_compile(preset, args.rounds) for preset in SHAPES}
    report("train_step", {"mfu_small": (rows["small"]["mfu"], 0.35), "mfu_tiny": (rows["tiny"]["mfu"], "-"),
                          "tokens_per_s_tiny": (rows["tiny"]["tokens_per_s"], "-"),
                          "compile_speedup_small": (compiled["small"]["speedup"], "-"),
                          "compile_speedup_tiny": (compiled["tiny"]["speedup"], "-"),
                          "fp8_compile_speedup_small": (compiled["small"]["fp8_speedup"], "-"),
                          "fp8_compile_speedup_tiny": (compiled["tiny"]["fp8_speedup"], "-")},
           {"matmul_peak_flops": peak, "presets": rows, "compile": compiled})


if __name__ == "__main__":
    main()
