"""Ring-linear's linear attention (SPEC §8, issue 16): the chunked training form over the naive recurrence.

chunked_over_recurrent: forward+backward throughput of `linear_attention_chunked` (chunks of 64, its default) over
`linear_attention_recurrent`, on the q, k, v that one linear layer sees when the `tiny` and `small` presets train:
nh = num_attention_heads, head_dim = hidden_size / nh (SPEC §8: no GQA), batch x seq_len as in
benchmarks/train_step.py, g the fastest-decaying layer's (layer 0). The two forms are timed in alternating rounds
in one process and the medians compared; their outputs are checked equal first. The headline is `small` (longer
rows, more chunks per row); `tiny` is printed with it.

Each figure of the issue is one function returning its RESULT entries and JSON fields; the model-level figures
(decode step time and cache bytes at 16K context, hybrid vs softmax) need the hybrid model and join as their own.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/linear_attention.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, time_it  # noqa: E402

from linglab.config import load_config  # noqa: E402
from linglab.linear_attention import layer_decays, linear_attention_chunked, linear_attention_recurrent  # noqa: E402

# (batch, seq_len) per preset: the shapes training uses (benchmarks/train_step.py).
SHAPES = {"tiny": (32, 128), "small": (4, 512)}
CHUNK_SIZE = 64  # linear_attention_chunked's default


def training_form_step(form, preset: str):
    """A forward+backward of `form` on one linear layer's q, k, v at the preset's training shape, and its output."""
    cfg = load_config(preset).model
    batch, seq = SHAPES[preset]
    heads, head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=generator, requires_grad=True) for _ in range(3))
    do = torch.randn(batch, heads, seq, head_dim, generator=generator)
    g = layer_decays(heads, 0, cfg.num_hidden_layers)

    def step():
        o, _ = form(q, k, v, g, head_dim**-0.5)
        torch.autograd.grad((o * do).sum(), (q, k, v))
        return o

    return step, {"batch": batch, "seq_len": seq, "heads": heads, "head_dim": head_dim}


def chunked_over_recurrent(rounds: int) -> tuple[dict, dict]:
    results, rows = {}, {}
    for preset in SHAPES:
        chunked, shape = training_form_step(
            lambda *inputs: linear_attention_chunked(*inputs, chunk_size=CHUNK_SIZE), preset)
        recurrent, _ = training_form_step(linear_attention_recurrent, preset)
        max_abs_diff = (chunked() - recurrent()).abs().max().item()
        chunked_s, recurrent_s = [], []
        for _ in range(rounds):
            chunked_s.append(time_it(chunked, repeats=5))
            recurrent_s.append(time_it(recurrent, repeats=5))
        tokens = shape["batch"] * shape["seq_len"]
        row = {**shape, "chunk_size": CHUNK_SIZE, "chunked_s": statistics.median(chunked_s),
               "recurrent_s": statistics.median(recurrent_s), "max_abs_diff": max_abs_diff}
        row["speedup"] = row["recurrent_s"] / row["chunked_s"]
        print(f"{preset:6s} [{shape['batch']} x {shape['seq_len']}, {shape['heads']} heads x {shape['head_dim']}]  "
              f"chunked {row['chunked_s'] * 1e3:8.2f} ms ({tokens / row['chunked_s']:9.0f} tokens/s)  "
              f"recurrent {row['recurrent_s'] * 1e3:8.2f} ms ({tokens / row['recurrent_s']:8.0f} tokens/s)  "
              f"{row['speedup']:.1f}x  max |diff| {max_abs_diff:.1e}")
        rows[preset] = row
    results["chunked_over_recurrent"] = (rows["small"]["speedup"], 10)
    results["chunked_over_recurrent_tiny"] = (rows["tiny"]["speedup"], "-")
    return results, {"chunked_over_recurrent": {"rounds": rounds, "presets": rows}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of (chunked, recurrent)")
    args = parser.parse_args()
    results, extra = chunked_over_recurrent(args.rounds)
    report("linear_attention", results, extra)


if __name__ == "__main__":
    main()
