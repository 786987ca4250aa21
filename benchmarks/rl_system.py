"""The RL system's engines (issue 15, SPEC §9): the continuous-batching rollout engine over the static one.

continuous_over_static_tokens: generated tokens per second of `linglab.rl.engine.ContinuousEngine` (slots refilled
as responses end, packed prefills, a group's prompt prefilled once) over `linglab.generate` (the static engine RL
uses today: one left-padded batch per RL step, every row kept until the longest ends), on the `long` tier's
prompts. Both decode the same requests: `--steps` RL steps of `--groups` prompts x `--group-size` responses, each
response as long as that prompt's worked solution (+ its EOS) in the default tokenizer, so the lengths have the
tier's heavy tail (~30 to ~380 tokens, median 30). The model is the `tiny` preset with random weights and no stop
token: a response's length is set by its limit, not by what a random model samples, so both engines do exactly
the same tokens (a model trained on the tier writes solutions of these lengths; what it writes does not change the
engines' cost). The static engine runs one call per RL step (its batch = one step's responses); the continuous
engine serves all steps' responses as one queue through `--slots` slots (= one step's batch). The two are timed in
alternating rounds in one process; the medians are compared.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rl_system.py [--rounds 3]

The other figures of issue 15 (asynchronous over synchronous steps, C3PO++'s rollout speedup, weight-sync bytes
and seconds) join this script with the decoupled rollout workers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak_flops, report  # noqa: E402

from linglab.config import load_config  # noqa: E402
from linglab.generate import generate  # noqa: E402
from linglab.model import build_model  # noqa: E402
from linglab.rl.engine import ContinuousEngine  # noqa: E402
from linglab.tasks import generate_problems, iter_corpus_texts  # noqa: E402
from linglab.tokenizer import Tokenizer  # noqa: E402

LONG_TIER = 3


def long_tier_requests(steps: int, groups: int, group_size: int, seed: int = 0):
    """Per RL step: prompts (each repeated group_size times) and each response's length (its solution + EOS)."""
    tokenizer = Tokenizer.train(iter_corpus_texts(20_000, seed=0), vocab_size=512)  # the runs' default tokenizer
    problems = generate_problems(steps * groups, [LONG_TIER], seed, "train")
    batches = []
    for step in range(steps):
        prompts, limits = [], []
        for problem in problems[step * groups:(step + 1) * groups]:
            prompt, length = tokenizer.encode(problem.prompt), len(tokenizer.encode(problem.solution)) + 1
            prompts += [prompt] * group_size
            limits += [length] * group_size
        batches.append((prompts, limits))
    return batches


def engines_on_the_long_tier(steps: int, groups: int, group_size: int, slots: int, rounds: int) -> tuple[dict, dict]:
    model = build_model(load_config("tiny").model, seed=0).eval()
    batches = long_tier_requests(steps, groups, group_size)
    prompts = [p for batch, _ in batches for p in batch]
    limits = [n for _, batch in batches for n in batch]
    tokens = sum(limits)
    max_len = max(len(p) + n for p, n in zip(prompts, limits))
    engine = ContinuousEngine(model, slots=slots, max_len=-(-max_len // 64) * 64)
    work = {}

    def static():
        results = [generate(model, batch, batch_limits, eos_id=[], temperature=1.0, seed=step)
                   for step, (batch, batch_limits) in enumerate(batches)]
        work["static"] = {"prefill_tokens": sum(r.prefill_tokens for r in results),
                          "decode_rows": sum(r.decode_rows for r in results),
                          "decode_steps": sum(r.decode_steps for r in results)}
        return sum(len(t) for r in results for t in r.tokens)

    def continuous():
        result = engine.run(prompts, limits, stop_ids=[], temperature=1.0, seed=0)
        work["continuous"] = {"prefill_tokens": result.prefill_tokens, "decode_rows": result.decode_rows,
                              "decode_steps": result.decode_steps}
        return sum(len(t) for t in result.tokens)

    times = {"static": [], "continuous": []}
    for _ in range(rounds):
        for name, run in (("static", static), ("continuous", continuous)):
            start = time.perf_counter()
            assert run() == tokens
            times[name].append(time.perf_counter() - start)
    rows = {name: {"seconds": statistics.median(t), "tokens_per_s": tokens / statistics.median(t), **work[name]}
            for name, t in times.items()}
    ratio = rows["continuous"]["tokens_per_s"] / rows["static"]["tokens_per_s"]
    lengths = sorted(limits[::group_size])
    for name, row in rows.items():
        print(f"{name:10s} {row['seconds']:6.2f} s  {row['tokens_per_s']:8.0f} tokens/s  prefill {row['prefill_tokens']} "
              f"tokens  decode {row['decode_steps']} forwards, {row['decode_rows']} rows")
    shape = {"model": "tiny (random weights)", "tier": "long", "steps": steps, "groups_per_step": groups,
             "group_size": group_size, "slots": slots, "tokens": tokens,
             "response_lengths": {"min": lengths[0], "median": lengths[len(lengths) // 2], "max": lengths[-1]},
             "rounds": rounds}
    return {"continuous_over_static_tokens": (ratio, 1.5)}, {"engines": {**shape, **rows}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the comparison")
    parser.add_argument("--steps", type=int, default=4, help="RL steps of requests")
    parser.add_argument("--groups", type=int, default=8, help="prompts per RL step")
    parser.add_argument("--group-size", type=int, default=8, help="responses per prompt")
    args = parser.parse_args()
    torch.manual_seed(0)
    gemm = matmul_peak_flops() / 1e9
    print(f"fp32 GEMM {gemm:.0f} GFLOP/s (beside the absolute times below)")
    results, extra = engines_on_the_long_tier(args.steps, args.groups, args.group_size, args.groups * args.group_size,
                                              args.rounds)
    report("rl_system", results, {"gemm_gflops": gemm, **extra})


if __name__ == "__main__":
    main()
