"""Generated tokens/s of the rollout engine's sampler with the KV cache vs without, batch 32, 256 new tokens.

Without the cache every new token re-runs the whole sequence (prompt + everything generated so far), so the
work per token grows with the length; with it each step runs one token per row against the cached keys and
values. Both compute the same logits (greedy outputs are tested equal in tests/test_generate.py); EOS is never
hit, so both produce exactly batch x new_tokens tokens. The model is the `tiny` preset at random init.

Also timed, for docs/rl.md's C3PO++ discussion: one cached decode step (one new token per row) at several
batch sizes, i.e. what a synchronous batch's long tail costs per step (few rows) against a full C3PO++ pool.

    .venv/bin/python benchmarks/rollout.py [--batch 32] [--new-tokens 256] [--prompt-len 32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report  # noqa: E402

from linglab.config import load_config  # noqa: E402
from linglab.generate import generate  # noqa: E402
from linglab.model import KVCache, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of (cache, no cache)")
    args = parser.parse_args()

    cfg = load_config("tiny").model
    model = build_model(cfg, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), generator=g).tolist()

    def run(use_cache: bool) -> float:
        start = time.perf_counter()
        out = generate(model, prompts, args.new_tokens, eos_id=-1, temperature=1.0, seed=0, use_cache=use_cache)
        elapsed = time.perf_counter() - start
        assert sum(len(t) for t in out.tokens) == args.batch * args.new_tokens
        return args.batch * args.new_tokens / elapsed

    run(True)  # warm-up
    rates = {"cache": [], "no_cache": []}
    for r in range(args.rounds):  # alternate, so drifts in machine speed hit both alike
        rates["cache"].append(run(True))
        rates["no_cache"].append(run(False))
        print(f"round {r + 1}: with cache {rates['cache'][-1]:8.0f} tok/s, without {rates['no_cache'][-1]:8.0f} tok/s")
    median = {k: statistics.median(v) for k, v in rates.items()}
    speedup = median["cache"] / median["no_cache"]
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens: "
          f"with cache {median['cache']:.0f} tok/s, without {median['no_cache']:.0f} tok/s")
    decode_ms = {b: decode_step_ms(model, b, args.prompt_len) for b in (4, 16, 64, 128)}
    print("one cached decode step: " + ", ".join(f"batch {b}: {ms:.2f} ms" for b, ms in decode_ms.items()))
    report("rollout", {"kv_cache_speedup": (speedup, 5)},
           {"tokens_per_s": median, "rounds": rates, "batch": args.batch, "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len, "preset": "tiny", "decode_step_ms_by_batch": decode_ms})


@torch.no_grad()
def decode_step_ms(model, batch: int, prompt_len: int, steps: int = 40) -> float:
    """Median time of one cached decode step for `batch` rows after a prompt of `prompt_len` tokens."""
    cache = KVCache(model.cfg, batch, prompt_len + steps + 1)
    model(torch.zeros(batch, prompt_len, dtype=torch.long), cache=cache)
    ids, times = torch.zeros(batch, 1, dtype=torch.long), []
    for _ in range(steps):
        start = time.perf_counter()
        model(ids, cache=cache)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


if __name__ == "__main__":
    main()
