"""The RL system of issue 15 (SPEC §9) on the `long` tier: continuous batching, C3PO++, rollout ranks, weight sync.

Its ratios are measured side by side in one run: the continuous-batching engine, C3PO++ on the RL trainer, decoupled
rollout ranks, and the weight sync's seconds and bytes.

Every figure decodes the `long` tier's (tier 3) heavy-tailed response lengths: a response is exactly as long as its
prompt's worked solution in the runs' default tokenizer plus one token for its EOS (~30 to ~380 tokens, median ~30),
from the `tiny` preset with random weights and no stop token. A random model's responses end at random; these end
where a model trained on the tier ends them, and what it writes does not change the cost of writing it. Rewards are
then all 0 (so the policy barely moves): these are timings, not learning curves. Rollouts are fp32 on the continuous
engine (`rl.rollout_engine=continuous`) throughout.

- continuous_over_static_tokens: generated tokens per second of `linglab.rl.engine.ContinuousEngine` (slots refilled
  as responses end, packed prefills, a group's prompt prefilled once) over `linglab.generate` (the static engine:
  one left-padded batch per RL step, every row kept until the longest ends). Both decode the same requests:
  `--steps` RL steps of `--groups` prompts x `--group-size` responses; the static engine runs one call per step,
  the continuous engine serves all steps' responses as one queue through `--groups` x `--group-size` slots.
  Alternating rounds, medians compared.
- c3po_rollout_speedup: the rollout phase's generation time (`rollout_time - sync_s` of `RLTrainer.train_step`:
  `collect` without the engine's weight copy) per trained response token, synchronous (`rl.c3po=false`, every
  group to the end) over C3PO++ (`RolloutPool`: Omega = 2 x the synchronous batch, Phi = the synchronous batch's
  expected tokens, sigma = 2). Two `RLTrainer`s in one process, steps alternating; `--rl-steps` each, the first
  (cold) step of each left out. The lengths come from `SolutionLengthEngine`, the run's `RolloutEngine` with each
  prompt's `response_limit` set to its solution's length.
- async_over_sync_steps: RL steps per second of 1 trainer + 1 rollout rank at `rl.max_staleness=1` over the colocated
  synchronous run (both ranks train and generate) on the same 2 gloo CPU ranks: `linglab.rl.trainer.run_rl` on
  ranks spawned by `torch.multiprocessing` (as tests/test_rl_decoupled.py launches them, one thread each), the same
  `--rl-steps` steps of the same prompts, each rank building its rollout engine as a `SolutionLengthEngine` (in place
  of `trainer.rollout_engine`); the steps' `step_time`, the first left out.
- weight sync (JSON `weight_sync`): seconds and bytes of one step's hand-over for the `tiny` and `small` presets,
  1 trainer + 1 rollout rank on gloo: `TrainerEnd.publish` on the trainer (its logged `sync_s`: the bucketed
  broadcast and the digest) and, on the rollout rank, the time until `decoupled.hold_weights` returns (received,
  loaded into its engine, digested), both from a common barrier; medians of `--sync-repeats`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rl_system.py                     # ~6 minutes on 2 CPU cores
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/rl_system.py --rl-steps 3 --rounds 1 --steps 1 \\
        --sync-repeats 1 --sync-presets tiny                                        # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import matmul_peak_flops, report  # noqa: E402

from linglab.checkpoint import from_pretrained, save_pretrained  # noqa: E402
from linglab.config import RLConfig, load_config  # noqa: E402
from linglab.generate import generate  # noqa: E402
from linglab.model import build_model  # noqa: E402
from linglab.parallel.parallel_dims import ParallelDims  # noqa: E402
from linglab.rl import trainer as rl_trainer  # noqa: E402
from linglab.rl.decoupled import RolloutLink, TrainerEnd, hold_weights  # noqa: E402
from linglab.rl.engine import ContinuousEngine  # noqa: E402
from linglab.rl.rollout import Rollout, RolloutEngine  # noqa: E402
from linglab.rl.sft import load_prompts  # noqa: E402
from linglab.run import RunDir  # noqa: E402
from linglab.tasks import generate_problems, iter_corpus_texts  # noqa: E402
from linglab.tokenizer import Tokenizer  # noqa: E402

LONG_TIER = 3
TRAIN_PROBLEMS = 512  # the RL runs' prompt set: enough that no step repeats a prompt


def default_tokenizer() -> Tokenizer:
    """The runs' default tokenizer."""
    return Tokenizer.train(iter_corpus_texts(20_000, seed=0), vocab_size=512)


# ---------------------------------------------------------------- the engines


def long_tier_requests(tokenizer: Tokenizer, steps: int, groups: int, group_size: int, seed: int = 0):
    """Per RL step: prompts (each repeated group_size times) and each response's length (its solution + EOS)."""
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


def engines_on_the_long_tier(tokenizer: Tokenizer, steps: int, groups: int, group_size: int, slots: int,
                             rounds: int) -> tuple[dict, dict]:
    model = build_model(load_config("tiny").model, seed=0).eval()
    batches = long_tier_requests(tokenizer, steps, groups, group_size)
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


# ---------------------------------------------------------------- RL runs with the tier's lengths


class SolutionLengthEngine(RolloutEngine):
    """The run's rollout engine (`trainer.rollout_engine`) without a stop token, each response exactly as long as its
    prompt's worked solution + 1 (`lengths`: prompt ids -> tokens)."""

    def __init__(self, lengths: dict[tuple[int, ...], int], cfg: RLConfig, model_cfg, device="cpu"):
        super().__init__(model_cfg, [], cfg.max_new_tokens, cfg.rollout_precision, cfg.temperature, cfg.top_p,
                         device=device, kind=cfg.rollout_engine, slots=cfg.rollout_slots)
        self.lengths = lengths

    def response_limit(self, rollout: Rollout) -> int:
        return min(self.lengths[tuple(rollout.prompt)], self.max_new_tokens)


def rl_overrides(steps: int, groups: int, group_size: int, **rl) -> list[str]:
    """The RL runs' settings on the long tier (no evaluation, one checkpoint at the end)."""
    base = dict(tiers=LONG_TIER, train_problems=TRAIN_PROBLEMS, rollout_engine="continuous", rollout_precision="fp32",
                group_size=group_size, prompts_per_step=groups, rollout_slots=groups * group_size,
                max_new_tokens=512, steps=steps, ckpt_every=steps, eval_problems=0)
    return [f"--rl.{k}={v}" for k, v in {**base, **rl}.items()]


def solution_lengths(cfg: RLConfig, tokenizer: Tokenizer) -> dict[tuple[int, ...], int]:
    """Every train prompt of the run (as the trainer renders it) -> its worked solution's tokens + 1."""
    examples = load_prompts(cfg).train
    prompts = rl_trainer.encode_prompts(tokenizer, cfg, examples)
    return {tuple(p): len(tokenizer.encode(e.solution)) + 1 for p, e in zip(prompts, examples, strict=True)}


def start_checkpoint(tokenizer: Tokenizer, path: Path) -> Path:
    """The tiny preset with random weights and the default tokenizer, as an HF checkpoint RL starts from."""
    save_pretrained(build_model(load_config("tiny").model, seed=0), path)
    tokenizer.save(path)
    return path


def long_tier_trainer(ckpt: Path, tokenizer: Tokenizer, cfg: RLConfig, lengths: dict, path: Path) -> rl_trainer.RLTrainer:
    """An `RLTrainer` of `cfg` from `ckpt` in a new run directory `path`, sampling with a `SolutionLengthEngine`."""
    path.mkdir()
    trainer = rl_trainer.RLTrainer(cfg, RunDir(path, "rl", rl_trainer.STATE_NAME), from_pretrained(ckpt),
                                   from_pretrained(ckpt), tokenizer, load_prompts(cfg), log=lambda *a: None)
    trainer.engine = SolutionLengthEngine(lengths, cfg, trainer.model.cfg)
    return trainer


def c3po_over_synchronous(ckpt: Path, tokenizer: Tokenizer, steps: int, groups: int, group_size: int,
                          root: Path) -> tuple[dict, dict]:
    sync_cfg = load_config("tiny", overrides=rl_overrides(steps, groups, group_size)).rl
    lengths = solution_lengths(sync_cfg, tokenizer)
    budget = round(groups * group_size * statistics.mean(lengths.values()))  # the synchronous batch, expected
    c3po_cfg = load_config("tiny", overrides=rl_overrides(steps, groups, group_size, c3po="true",
                                                          c3po_capacity=2 * groups * group_size, c3po_budget=budget)).rl
    trainers = {name: long_tier_trainer(ckpt, tokenizer, cfg, lengths, root / name)
                for name, cfg in (("synchronous", sync_cfg), ("c3po", c3po_cfg))}
    rows = {name: [] for name in trainers}
    for _ in range(steps):
        for name, trainer in trainers.items():
            rows[name].append(trainer.train_step())
    out = {}
    for name, steps_rows in rows.items():
        measured = steps_rows[1:]  # the first step allocates the engine's slots; C3PO++'s pool starts empty
        generating = sum(r["rollout_time"] - r["sync_s"] for r in measured)
        trained = sum(r["response_tokens"] for r in measured)
        out[name] = {"generation_s_per_step": generating / len(measured),
                     "rollout_s_per_step": statistics.mean(r["rollout_time"] for r in measured),
                     "step_s": statistics.mean(r["step_time"] for r in measured),
                     "trained_tokens_per_step": trained / len(measured),
                     "generation_ms_per_trained_token": 1e3 * generating / trained,
                     **{k: statistics.mean(r[k] for r in measured)
                        for k in ("tokens_generated", "prefill_tokens", "decode_steps", "decode_rows",
                                  "staleness_mean")}}
        print(f"{name:11s} generating {out[name]['generation_s_per_step']:5.2f} s/step  "
              f"{out[name]['trained_tokens_per_step']:6.0f} trained tokens/step  "
              f"{out[name]['generation_ms_per_trained_token']:.3f} ms/trained token  prefill "
              f"{out[name]['prefill_tokens']:.0f}  decode {out[name]['decode_steps']:.0f} forwards, "
              f"{out[name]['decode_rows']:.0f} rows  staleness {out[name]['staleness_mean']:.2f}")
    ratio = out["synchronous"]["generation_ms_per_trained_token"] / out["c3po"]["generation_ms_per_trained_token"]
    shape = {"steps": steps, "measured_steps": steps - 1, "groups_per_step": groups, "group_size": group_size,
             "slots": groups * group_size, "c3po_capacity": 2 * groups * group_size, "c3po_budget": budget,
             "c3po_max_retention": c3po_cfg.c3po_max_retention}
    return {"c3po_rollout_speedup": (ratio, 1.5)}, {"c3po": {**shape, **out}}


# ---------------------------------------------------------------- two gloo ranks


def _rank(rank: int, world: int, store: str, body, args: tuple) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(minutes=10))
    try:
        body(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def on_two_ranks(body, *args) -> None:
    """`body(rank, *args)` on 2 spawned processes joined by gloo (a module-level function: they import it by name)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(2, f"{tmp}/store", body, args), nprocs=2, join=True)


def _rl_run(rank: int, overrides: list[str], lengths: dict, ckpt: Path, out: Path) -> None:
    rl_trainer.rollout_engine = lambda cfg, model_cfg, tokenizer, device: SolutionLengthEngine(
        lengths, cfg, model_cfg, device)
    rl_trainer.run_rl(load_config("tiny", overrides=overrides), ckpt, out, console=Console(quiet=True))


def async_over_sync(ckpt: Path, tokenizer: Tokenizer, steps: int, groups: int, group_size: int,
                    root: Path) -> tuple[dict, dict]:
    layouts = {"colocated": rl_overrides(steps, groups, group_size),
               "decoupled": rl_overrides(steps, groups, group_size, rollout_ranks=1, max_staleness=1)}
    lengths = solution_lengths(load_config("tiny", overrides=layouts["colocated"]).rl, tokenizer)
    out = {}
    for name, overrides in layouts.items():
        on_two_ranks(_rl_run, overrides, lengths, ckpt, root / name)
        rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
        measured = [r for r in rows if r["kind"] == "train"][1:]  # the first step allocates the engines' slots
        seconds = sum(r["step_time"] for r in measured)
        out[name] = {"steps_per_s": len(measured) / seconds, "step_s": seconds / len(measured),
                     "rollout_s": statistics.mean(r["rollout_time"] for r in measured),
                     "staleness_max": max(r["staleness_max"] for r in measured),
                     "response_tokens": statistics.mean(r["response_tokens"] for r in measured)}
        print(f"{name:10s} {out[name]['step_s']:5.2f} s/step ({out[name]['rollout_s']:.2f} s waiting for rollouts)  "
              f"{out[name]['response_tokens']:.0f} tokens/step  staleness max {out[name]['staleness_max']}")
    ratio = out["decoupled"]["steps_per_s"] / out["colocated"]["steps_per_s"]
    shape = {"ranks": 2, "steps": steps, "measured_steps": steps - 1, "groups_per_step": groups,
             "group_size": group_size, "decoupled_layout": "1 trainer + 1 rollout rank, max_staleness 1",
             "colocated_layout": "2 ranks, each trains (FSDP2) and generates half the groups"}
    return {"async_over_sync_steps": (ratio, 1.3)}, {"async": {**shape, **out}}


def _weight_sync(rank: int, presets: list[str], repeats: int, out: Path) -> None:
    link = RolloutLink(rank=rank, world=2, rollout_ranks=1, max_staleness=0, steps=1, prompts_per_step=1, ckpt_every=0,
                       device=torch.device("cpu"), sync_group=None)
    timings = {}
    for preset in presets:
        model = build_model(load_config(preset).model, seed=0)
        engine = None if rank == 0 else RolloutEngine(model.cfg, [], 1, device="cpu")
        trainer = TrainerEnd(link, ParallelDims()) if rank == 0 else None
        rows = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            if trainer is not None:
                rows.append(trainer.publish(model, 0))
            else:
                hold_weights(link, engine, model, 0, 0)
                rows.append({"held_s": time.perf_counter() - start})
        timings[preset] = rows
    (out / f"rank{rank}.json").write_text(json.dumps(timings))


def weight_sync(presets: list[str], repeats: int, root: Path) -> dict:
    root.mkdir()
    on_two_ranks(_weight_sync, presets, repeats, root)
    trainer, rollout = (json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1))
    out = {}
    for preset in presets:
        out[preset] = {"bytes": trainer[preset][0]["sync_bytes"],
                       "publish_s": statistics.median(r["sync_s"] for r in trainer[preset]),
                       "held_s": statistics.median(r["held_s"] for r in rollout[preset])}
        print(f"weight sync {preset:5s} {out[preset]['bytes'] / 2**20:7.1f} MiB  trainer publish "
              f"{out[preset]['publish_s']:.3f} s  rollout rank holds it after {out[preset]['held_s']:.3f} s")
    return {"weight_sync": {"layout": "1 trainer + 1 rollout rank, gloo, one step's hand-over", "repeats": repeats,
                            **out}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the engine comparison")
    parser.add_argument("--steps", type=int, default=4, help="RL steps of requests in the engine comparison")
    parser.add_argument("--groups", type=int, default=8, help="prompts per RL step")
    parser.add_argument("--group-size", type=int, default=8, help="responses per prompt")
    parser.add_argument("--rl-steps", type=int, default=6,
                        help="RL steps of each arm of the C3PO++ and asynchronous comparisons (the first is left out)")
    parser.add_argument("--sync-repeats", type=int, default=5, help="weight syncs timed per preset")
    parser.add_argument("--sync-presets", nargs="+", default=["tiny", "small"], help="presets whose weight sync is timed")
    args = parser.parse_args()
    if args.rl_steps < 2:
        parser.error("--rl-steps must be >= 2 (the first step of each arm is left out)")
    torch.manual_seed(0)
    gemm = matmul_peak_flops() / 1e9
    print(f"fp32 GEMM {gemm:.0f} GFLOP/s (beside the absolute times below)")
    tokenizer = default_tokenizer()
    results, extra = engines_on_the_long_tier(tokenizer, args.steps, args.groups, args.group_size,
                                              args.groups * args.group_size, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = start_checkpoint(tokenizer, root / "start")
        for figure in (c3po_over_synchronous, async_over_sync):
            (root / figure.__name__).mkdir()
            more, detail = figure(ckpt, tokenizer, args.rl_steps, args.groups, args.group_size, root / figure.__name__)
            results, extra = {**results, **more}, {**extra, **detail}
        extra.update(weight_sync(args.sync_presets, args.sync_repeats, root / "weight_sync"))
    report("rl_system", results, {"gemm_gflops": gemm, **extra})


if __name__ == "__main__":
    main()
