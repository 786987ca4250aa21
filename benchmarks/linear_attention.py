"""Ring-linear's linear attention (SPEC §8, issue 16): the chunked training form over the naive recurrence, and the
long-context payoff of the hybrid model (decode step time and cache bytes against the softmax model).

chunked_over_recurrent: forward+backward throughput of `linear_attention_chunked` (chunks of 64, its default) over
`linear_attention_recurrent`, on the q, k, v that one linear layer sees when the `tiny` and `small` presets train:
nh = num_attention_heads, head_dim = hidden_size / nh (SPEC §8: no GQA), batch x seq_len as in
benchmarks/train_step.py, g the fastest-decaying layer's (layer 0). The two forms are timed in alternating rounds
in one process and the medians compared; their outputs are checked equal first. The headline is `small` (longer
rows, more chunks per row); `tiny` is printed with it.

decode_speedup_at_16k, cache_bytes_ratio_at_16k: one decode step (one new token per row, no grad) of the softmax
model and of the hybrid at contexts 512 .. 16384, timed in alternating rounds, and the bytes of the `KVCache` each
needs for that context (`KVCache.nbytes`: K/V of the softmax layers, fp32 state of the linear layers). Both models
have `small`'s widths (hidden 512, 8 heads of 64, 2 K/V heads, 16 experts, top-4) and 10 layers instead of 6, so
that Ring-mini-linear's group of 5 (SPEC §8: 1 softmax per 4 linear) fits twice: the hybrid is the same shape with
layer_group_size 5 (layers 4 and 9 softmax, 8 linear; group_norm_size 2 keeps mini's 4 heads per norm group).
Two batches are timed. Batch 1 is one user's stream: there a step reads every active weight for a single token, a
cost no attention choice changes, so it bounds the speedup. Batch 8 is one RL group (rl.group_size 8; a rollout
decodes prompts_per_step of them at once): the weights are read once for 8 tokens while each row attends over
its own context, which is the regime the hybrid was built for. The headline `decode_speedup_at_16k` is batch 8;
batch 1 is reported beside it (`decode_speedup_at_16k_batch1`). The cache is not filled by a prefill (a 16K
prefill per context, batch and model would dominate the run): its K/V and states are random values of the right
shapes and its position is set to the context, since a decode step's time depends on the shapes and the position,
not on the values.

Each figure of the issue is one function returning its RESULT entries and JSON fields.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/linear_attention.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, report, time_it  # noqa: E402

from linglab.config import load_config  # noqa: E402
from linglab.linear_attention import layer_decays, linear_attention_chunked, linear_attention_recurrent  # noqa: E402
from linglab.model import KVCache, build_model  # noqa: E402

# (batch, seq_len) per preset: the shapes training uses (benchmarks/train_step.py).
SHAPES = {"tiny": (32, 128), "small": (4, 512)}
CHUNK_SIZE = 64  # linear_attention_chunked's default
CONTEXTS = [512 * 2**i for i in range(6)]  # 512 .. 16384
DECODE_LAYERS, LAYER_GROUP_SIZE = 10, 5
DECODE_BATCHES = (1, 8)  # one stream; one RL group (rl.group_size)
HEADLINE_BATCH = 8


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


def decode_models() -> dict[str, torch.nn.Module]:
    """The softmax model and the hybrid of the same shape (see the module docstring), eval mode."""
    softmax = dataclasses.replace(load_config("small").model, num_hidden_layers=DECODE_LAYERS)
    hybrid = dataclasses.replace(softmax, layer_group_size=LAYER_GROUP_SIZE, group_norm_size=2)
    hybrid.validate()
    return {name: build_model(cfg, seed=0).eval() for name, cfg in (("softmax", softmax), ("hybrid", hybrid))}


def filled_cache(cfg, batch: int, context: int) -> KVCache:
    """A cache of `batch` rows holding `context` tokens of random K/V and states (what a prefill leaves, in shape)."""
    cache = KVCache(cfg, batch, context + 1)
    generator = torch.Generator().manual_seed(0)
    cache.k[:, :, :, :context] = torch.randn(cache.k[:, :, :, :context].shape, generator=generator)
    cache.v[:, :, :, :context] = torch.randn(cache.v[:, :, :, :context].shape, generator=generator)
    cache.state.copy_(0.1 * torch.randn(cache.state.shape, generator=generator))
    cache.pos = context
    return cache


def decode_step(model, batch: int, context: int):
    """One decode step at `context` cached tokens; the position is reset each call so every call times the same step."""
    cache = filled_cache(model.cfg, batch, context)
    token = torch.zeros(batch, 1, dtype=torch.long)

    @torch.no_grad()
    def step():
        cache.pos = context
        return model(token, cache=cache)

    return step


def decode_at_long_context(rounds: int) -> tuple[dict, dict]:
    models = decode_models()
    by_batch = {}
    for batch in DECODE_BATCHES:
        rows = []
        for context in CONTEXTS:
            steps = {name: decode_step(model, batch, context) for name, model in models.items()}
            times = {name: [] for name in models}
            for _ in range(rounds):
                for name, step in steps.items():
                    times[name].append(time_it(step, repeats=5))
            row = {"context": context}
            for name, model in models.items():
                row[f"{name}_step_s"] = statistics.median(times[name])
                row[f"{name}_cache_bytes"] = KVCache(model.cfg, batch, context, device="meta").nbytes()
            row["decode_speedup"] = row["softmax_step_s"] / row["hybrid_step_s"]
            row["cache_bytes_ratio"] = row["softmax_cache_bytes"] / row["hybrid_cache_bytes"]
            print(f"batch {batch}  context {context:6d}  step softmax {row['softmax_step_s'] * 1e3:7.2f} ms  hybrid "
                  f"{row['hybrid_step_s'] * 1e3:7.2f} ms  ({row['decode_speedup']:.2f}x)  cache softmax "
                  f"{row['softmax_cache_bytes'] / 2**20:8.2f} MiB  hybrid {row['hybrid_cache_bytes'] / 2**20:7.2f} MiB  "
                  f"({row['cache_bytes_ratio']:.2f}x)")
            rows.append(row)
            del steps  # free this context's caches before the next, larger ones are filled
        by_batch[batch] = rows
    at_16k, at_16k_batch1 = by_batch[HEADLINE_BATCH][-1], by_batch[1][-1]
    results = {"decode_speedup_at_16k": (at_16k["decode_speedup"], 2),
               "decode_speedup_at_16k_batch1": (at_16k_batch1["decode_speedup"], "-"),
               "cache_bytes_ratio_at_16k": (at_16k["cache_bytes_ratio"], 3)}
    shape = {"widths": "small", "num_hidden_layers": DECODE_LAYERS, "layer_group_size": LAYER_GROUP_SIZE,
             "softmax_layers": [i for i in range(DECODE_LAYERS) if models["hybrid"].cfg.layer_kind(i) == "softmax"],
             "headline_batch": HEADLINE_BATCH,
             "cache_filled_with": "random K/V and states, position set to the context"}
    return results, {"decode": {"rounds": rounds, **shape,
                                "batches": {str(b): rows for b, rows in by_batch.items()}}}


def plot_decode(by_batch: dict[str, list[dict]], path: Path) -> None:
    """Decode step time per batch and cache MiB (batch 1) against the context, softmax vs hybrid, log-log."""
    from linglab.plots import FIGSIZE, log_axes, plt, save

    panels = [(rows, "step_s", 1e3, f"decode step (ms, batch {batch})") for batch, rows in by_batch.items()]
    panels.append((by_batch["1"], "cache_bytes", 2**-20, "cache (MiB, batch 1)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * FIGSIZE[0], FIGSIZE[1]), layout="constrained")
    for ax, (rows, key, scale, label) in zip(axes, panels):
        contexts = [r["context"] for r in rows]
        for name in ("softmax", "hybrid"):
            ax.plot(contexts, [r[f"{name}_{key}"] * scale for r in rows], marker="o", label=name)
        log_axes(ax)
        ax.set(xlabel="context (tokens)", ylabel=label)
        ax.set_xticks(contexts, [str(c) for c in contexts])
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    fig.suptitle(f"small widths, {DECODE_LAYERS} layers: softmax vs hybrid (layer_group_size {LAYER_GROUP_SIZE})")
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each comparison")
    args = parser.parse_args()
    results, extra = chunked_over_recurrent(args.rounds)
    decode_results, decode_extra = decode_at_long_context(args.rounds)
    report("linear_attention", {**results, **decode_results}, {**extra, **decode_extra})
    plot_decode(decode_extra["decode"]["batches"], RESULTS_DIR / "linear_attention_decode.png")


if __name__ == "__main__":
    main()
