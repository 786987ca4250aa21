"""The RL comparisons of docs/rl.md (issue 5), each arm run with several seeds from the default tiny pretraining:

    algo      GRPO vs GSPO vs LPO (SPEC §5) at the same budget, 2 PPO epochs per rollout batch so that each
              loss's clipping acts (with one epoch pi_theta = pi_old and no ratio is ever clipped)
    mismatch  FP8 rollouts (the engine runs its FP8 GEMMs on the FP8 export's weights, loaded at every sync, and on
              activations quantised at every call) with no correction vs TIS vs IcePop
    c3po      C3PO++ budget-controlled partial rollouts vs synchronous rollouts: time per step and reward
    c3po-continuous  the same two arms on the continuous-batching engine (rl.rollout_engine=continuous), and C3PO++
              with a slot for every rollout of its pool

Every arm keeps the RL defaults (GRPO + IcePop, FP8 rollouts, 40 steps, lr 1e-4, tiers 1-2) except what it
names. Each run is a `linglab rl` subprocess in `runs/cmp/<config hash>/seed<k>`; a run whose directory holds
the same resolved config and a finished summary is reused, so arms shared by two experiments (the default
GRPO + IcePop run is both the IcePop arm of `mismatch` and the synchronous arm of `c3po`) run once, and an
interrupted comparison continues where it stopped. With --jobs 2 two runs share the machine at one thread
each; runs start in seed-major order, so that the two arms of a `c3po` seed run side by side, timed under about
the same load.

    .venv/bin/python experiments/rl/compare.py --experiment c3po [--seeds 3] [--steps 40] [--jobs 2]
    .venv/bin/python experiments/rl/compare.py --experiment mismatch --arms none,IcePop --steps 200 --name mismatch-200
    .venv/bin/python experiments/rl/compare.py --pooled    # every distinct run of the 40-step results, together
    .venv/bin/python experiments/rl/compare.py --side-by-side c3po,c3po-continuous   # both engines' arms, one table
    .venv/bin/python experiments/rl/compare.py --mismatch-sources   # weight-only vs weight + activation FP8, same tokens

Writes results/<name>.json (per-arm curves, held-out accuracy before/after per tier, timings, per-seed values
and their spread) and results/<name>.png; the name is the experiment's unless --name gives another.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))

from linglab.config import load_config, to_toml  # noqa: E402
from linglab.plots import plt, save  # noqa: E402
from linglab.rl.report import smooth  # noqa: E402
from linglab.run import read_jsonl  # noqa: E402
from linglab.train import run_training  # noqa: E402

RUNS, RESULTS = ROOT / "runs", ROOT / "results"


@dataclass(frozen=True)
class Experiment:
    title: str
    arms: dict[str, dict[str, object]]  # arm label -> its rl.* overrides
    common: dict[str, object]  # overrides of every arm
    panels: tuple[tuple[str, str], ...]  # (metrics.jsonl key, y label) of the curve panels besides reward


EXPERIMENTS = {
    "algo": Experiment(
        "GRPO vs GSPO vs LPO (2 PPO epochs per rollout batch)",
        {"GRPO": {"rl.algo": "grpo"}, "GSPO": {"rl.algo": "gspo"}, "LPO": {"rl.algo": "lpo"}},
        {"rl.ppo_epochs": 2},
        (("clip_fraction", "clip fraction (2nd epoch)"), ("entropy", "entropy (nats/token)"),
         ("grad_norm", "grad norm (before clipping)"))),
    "mismatch": Experiment(
        "FP8 rollouts: no correction vs TIS vs IcePop",
        {"none": {"rl.correction": "none"}, "TIS": {"rl.correction": "tis"}, "IcePop": {"rl.correction": "icepop"}},
        {"rl.rollout_precision": "fp8"},
        (("mean_abs_logdiff", "mean |log pi_train - log pi_infer|"),
         ("max_abs_logdiff", "max |log pi_train - log pi_infer|"),
         ("mask_fraction", "share of tokens outside [0.5, 5]"))),
    "c3po": Experiment(
        "C3PO++ vs synchronous rollouts",
        {"synchronous": {"rl.c3po": False}, "C3PO++": {"rl.c3po": True}},
        {},
        (("rollout_time", "rollout phase, s/step"), ("step_time", "whole step, s/step"),
         ("response_tokens", "response tokens trained per step"))),
}
# The same arms on the continuous-batching engine (packed prefills, slots refilled as responses end): section c's
# static-engine result blamed the padded prefills of resumed rollouts, which this engine does not have. Its 64
# default slots hold half of C3PO++'s pool, so a third arm gives the pool a slot per rollout, as the static engine's
# one batch did.
EXPERIMENTS["c3po-continuous"] = Experiment(
    "C3PO++ vs synchronous rollouts, continuous-batching engine",
    {**EXPERIMENTS["c3po"].arms, "C3PO++, 128 slots": {"rl.c3po": True, "rl.rollout_slots": 128}},
    {"rl.rollout_engine": "continuous"}, EXPERIMENTS["c3po"].panels)
POOLED = ("algo", "mismatch", "c3po")  # the 40-step comparisons of the default recipe before issue 14
TIERS = ("easy", "medium", "hard")
EVAL_METRICS = ("greedy_accuracy", "pass@1")


def pretrained(path: str | None) -> Path:
    """The checkpoint RL starts from: --pretrained, else the default tiny run (trained here once, ~5 min)."""
    if path:
        return Path(path)
    final = RUNS / "pretrain" / "final"
    if not final.is_dir():
        run_training(load_config("tiny"), RUNS / "pretrain", overwrite=True,
                     command="linglab train --preset tiny (experiments/rl/compare.py)")
    return final


def overrides_of(arm: dict, common: dict, args) -> list[str]:
    settings = {"rl.steps": args.steps, "rl.lr": args.lr, "rl.eval_problems": args.eval_problems, **common, **arm}
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]


def run_dir(overrides: list[str], seed: int) -> tuple[Path, list[str], str]:
    """The run's directory (keyed by the resolved config without the seed), its full overrides and config TOML."""
    base = to_toml(load_config("tiny", overrides=overrides))
    full = [*overrides, f"--rl.seed={seed}"]
    key = hashlib.sha256(base.encode()).hexdigest()[:10]
    return RUNS / "cmp" / key / f"seed{seed}", full, to_toml(load_config("tiny", overrides=full))


def finished(out: Path, config: str) -> bool:
    return ((out / "summary.json").is_file() and (out / "rl_eval.json").is_file()
            and (out / "config.toml").is_file() and (out / "config.toml").read_text() == config)


def launch(start: Path, out: Path, overrides: list[str], threads: int) -> None:
    """One `linglab rl` run in a subprocess; its output goes to <out>.log."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "linglab", "rl", "--ckpt", str(start), "--out", str(out), "--overwrite", *overrides]
    t0 = time.time()
    with open(out.parent / f"{out.name}.log", "w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise SystemExit(f"compare: run failed (exit {rc}); see {out.parent / (out.name + '.log')}")
    print(f"  done {out.relative_to(RUNS)} in {time.time() - t0:.0f} s", flush=True)


def read_run(out: Path) -> dict:
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("kind") == "train"]
    return {"train": train, "eval": json.loads((out / "rl_eval.json").read_text()),
            "summary": json.loads((out / "summary.json").read_text())}


def curve(run: dict, key: str) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else float(r[key]) for r in run["train"]])


def spread(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.fmean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else None}


def summarise_arm(runs: list[dict]) -> dict:
    """Per-arm figures over seeds: reward trend, stability, timings, mismatch statistics, held-out before/after."""
    out: dict = {"seeds": len(runs)}
    reward = [curve(r, "reward") for r in runs]
    smoothed = [smooth(c) for c in reward]
    out["reward_first5"] = spread([float(np.mean(c[:5])) for c in reward])
    out["reward_last5"] = spread([float(np.mean(c[-5:])) for c in reward])
    # Stability: the largest fall of the 5-step reward average below its running best, and the worst step.
    out["reward_max_drawdown"] = spread([float(np.max(np.maximum.accumulate(s) - s)) for s in smoothed])
    # Time per 1000 trained response tokens: C3PO++ steps end on a token budget, so their batches differ in size.
    out["rollout_s_per_1k_tokens"] = spread([float(np.mean(curve(r, "rollout_time")[1:] / curve(r, "response_tokens")[1:]))
                                             * 1000 for r in runs])
    out["step_s_per_1k_tokens"] = spread([float(np.mean(curve(r, "step_time")[1:] / curve(r, "response_tokens")[1:]))
                                          * 1000 for r in runs])
    for key in ("step_time", "rollout_time", "tokens_generated", "response_tokens", "response_length", "entropy", "kl",
                "stale_token_fraction", "prefill_tokens", "decode_steps", "decode_rows",
                "mean_abs_logdiff", "max_abs_logdiff", "mask_fraction", "clip_fraction", "grad_norm"):
        if any(key not in r["train"][0] for r in runs):  # e.g. the C3PO++ pool's stats in synchronous runs
            continue
        values = [float(np.nanmean(curve(r, key)[1:])) for r in runs]  # step 1 pays one-off warm-up costs
        if all(np.isfinite(values)):
            out[f"mean_{key}"] = spread(values)
    # The trend over the run: means over each fifth of the steps (40-step blocks of a 200-step run).
    for key in ("reward", "entropy", "mask_fraction", "mean_abs_logdiff"):
        blocks = np.array([[np.mean(b) for b in np.array_split(curve(r, key), 5)] for r in runs])  # [seeds, 5]
        out[f"{key}_by_fifth"] = blocks.mean(axis=0).tolist()
    out["max_max_abs_logdiff"] = max(float(np.nanmax(curve(r, "max_abs_logdiff"))) for r in runs)
    out["max_grad_norm"] = max(float(np.nanmax(curve(r, "grad_norm"))) for r in runs)
    out["final_entropy"] = spread([float(np.mean(curve(r, "entropy")[-5:])) for r in runs])
    heldout = {}
    for tier in TIERS:
        for metric in EVAL_METRICS:
            before = [r["eval"]["before"]["tiers"][tier][metric] for r in runs]
            after = [r["eval"]["after"]["tiers"][tier][metric] for r in runs]
            heldout[f"{tier}/{metric}"] = {"before": before, "after": after,
                                          "gain": spread([a - b for a, b in zip(after, before, strict=True)])}
    out["heldout"] = heldout
    return out


def plot(exp: Experiment, arms: dict[str, list[dict]], path: Path) -> None:
    keys = (("reward", "reward (5-step mean)"), *exp.panels)
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(4.2 * (len(keys) + 1), 3.6), layout="constrained")
    for ax, (key, label) in zip(axes, keys):
        for i, (arm, runs) in enumerate(arms.items()):
            curves = np.array([smooth(curve(r, key)) if key == "reward" else curve(r, key) for r in runs])
            steps = np.arange(1, curves.shape[1] + 1)
            for c in curves:
                ax.plot(steps, c, color=f"C{i}", lw=0.6, alpha=0.3)
            ax.plot(steps, np.nanmean(curves, axis=0), color=f"C{i}", lw=1.8, label=f"{arm} (mean of {len(runs)})")
        ax.set(xlabel="RL step", ylabel=label)
        if key in ("max_abs_logdiff", "mask_fraction"):
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    ax = axes[-1]  # held-out greedy accuracy per tier, before (hatched, shared start) and after RL, per seed dots
    width = 0.8 / (len(arms) + 1)
    before = np.mean([[r["eval"]["before"]["tiers"][t]["greedy_accuracy"] for t in TIERS]
                      for runs in arms.values() for r in runs], axis=0)
    ax.bar(np.arange(3) - 0.4 + width / 2, 100 * before, width, color="0.75", label="before RL")
    for i, (arm, runs) in enumerate(arms.items()):
        after = np.array([[r["eval"]["after"]["tiers"][t]["greedy_accuracy"] for t in TIERS] for r in runs])
        x = np.arange(3) - 0.4 + width * (i + 1.5)
        ax.bar(x, 100 * after.mean(0), width, color=f"C{i}", label=arm)
        for row in after:
            ax.plot(x, 100 * row, "k.", ms=3)
    ax.set_xticks(range(3), TIERS)
    ax.set(ylabel="held-out greedy accuracy, %", title="after RL (dots: seeds)")
    ax.legend(fontsize=7)
    steps = len(next(iter(arms.values()))[0]["train"])
    fig.suptitle(f"{exp.title}, {steps} steps")
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiment", choices=sorted(EXPERIMENTS))
    p.add_argument("--pooled", action="store_true", help="pool the held-out gains of every distinct run in "
                   f"results/{{{','.join(POOLED)}}}.json into results/pooled_gain.json")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-problems", type=int, default=64, help="held-out problems per tier, before and after")
    p.add_argument("--jobs", type=int, default=2, help="runs at once")
    p.add_argument("--threads", type=int, help="threads per run (default 2 // jobs), e.g. 1 to time a late arm "
                   "alone as its companions were timed")
    p.add_argument("--pretrained", help="HF checkpoint to start from (default: train the tiny preset here)")
    p.add_argument("--arms", help="comma-separated subset of the experiment's arms (default: all)")
    p.add_argument("--name", help="results file stem (default: the experiment's name)")
    p.add_argument("--side-by-side", metavar="NAMES", help="comma-separated results file stems: print their arms "
                   "as the columns of one table (docs/rl.md section c: --side-by-side c3po,c3po-continuous)")
    p.add_argument("--mismatch-sources", action="store_true", help="weight-only vs weight + activation FP8 mismatch "
                   "on the same rollouts from the start checkpoint, into results/mismatch_sources.json")
    args = p.parse_args()
    if args.pooled:
        return pooled()
    if args.side_by_side:
        return print_side_by_side(args.side_by_side.split(","))
    if args.mismatch_sources:
        return mismatch_sources(pretrained(args.pretrained).resolve(), args.seeds)
    if args.experiment is None:
        p.error("give --experiment or --pooled")
    exp = EXPERIMENTS[args.experiment]
    if args.arms:
        unknown = set(args.arms.split(",")) - set(exp.arms)
        if unknown:
            p.error(f"unknown arms {sorted(unknown)}; {args.experiment} has {list(exp.arms)}")
        exp = Experiment(exp.title, {a: v for a, v in exp.arms.items() if a in args.arms.split(",")}, exp.common,
                         exp.panels)
    name = args.name or args.experiment
    start = pretrained(args.pretrained).resolve()

    plan = []  # (arm, seed, out, overrides, config), seed-major so that the arms of a seed run side by side
    for seed in range(args.seeds):
        for arm, settings in exp.arms.items():
            out, full, config = run_dir(overrides_of(settings, exp.common, args), seed)
            plan.append((arm, seed, out, full, config))
    todo = [(out, full) for _, _, out, full, config in plan if not finished(out, config)]
    print(f"{args.experiment}: {len(plan)} runs, {len(plan) - len(todo)} reused, {len(todo)} to run "
          f"({args.jobs} at a time)", flush=True)
    threads = args.threads or max(1, 2 // args.jobs)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda job: launch(start, job[0], job[1], threads), todo))

    arms: dict[str, list[dict]] = {arm: [] for arm in exp.arms}
    for arm, _, out, _, _ in plan:
        arms[arm].append(read_run(out))
    result = {"experiment": args.experiment, "title": exp.title, "common": exp.common,
              "arms": {arm: {"overrides": exp.arms[arm], "runs": [str(out.relative_to(RUNS)) for a, _, out, _, _ in plan
                                                                  if a == arm], **summarise_arm(runs)}
                       for arm, runs in arms.items()},
              "settings": {"seeds": args.seeds, "steps": args.steps, "lr": args.lr,
                           "eval_problems": args.eval_problems, "jobs": args.jobs, "threads_per_run": threads,
                           "pretrained": str(start)},
              "command": "experiments/rl/compare.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(exp, arms, RESULTS / f"{name}.png")
    print_table(result)


def mismatch_sources(start: Path, seeds: int) -> None:
    """Where FP8 rollouts' mismatch comes from, on one set of tokens: rollouts sampled from `start` by an fp32 engine
    (the default prompts, 8 x 8 per seed), scored by the trainer's fp32 model, by the same model with the FP8
    export's weights (weight-only FP8) and by the FP8 rollout engine (those weights and FP8 activations)."""
    import torch

    from linglab.checkpoint import dequantize_hf_state_dict, from_pretrained, load_state_into, to_hf_state_dict
    from linglab.fp8 import TILE
    from linglab.model import build_model
    from linglab.rl.losses import mismatch_stats
    from linglab.rl.rollout import RolloutEngine
    from linglab.rl.trainer import policy_logprobs, rollout_batch
    from linglab.tasks import generate_problems
    from linglab.tokenizer import load_tokenizer

    rl = load_config("tiny").rl
    model, tok = from_pretrained(start).eval(), load_tokenizer(start / "tokenizer.json")
    weight_only = build_model(model.cfg).eval()
    load_state_into(weight_only, dequantize_hf_state_dict(to_hf_state_dict(model, fp8=True), TILE, str(start)), str(start))
    sampler, fp8 = (RolloutEngine(model.cfg, tok.eos_id, rl.max_new_tokens, precision) for precision in ("fp32", "fp8"))
    sampler.sync_weights(model)
    fp8.sync_weights(model)
    rows: dict[str, list[dict]] = {"weight-only FP8": [], "FP8 weights + activations": []}
    for seed in range(seeds):
        prompts = tok.encode_batch([p.prompt for p in generate_problems(rl.prompts_per_step, rl.tiers, seed, "train")])
        groups = sampler.generate_groups(prompts, rl.group_size, seed)
        batch = rollout_batch([r for g in groups for r in g.rollouts], tok.pad_id)
        with torch.no_grad():
            train = policy_logprobs(model, batch, rl.temperature)[0]
            for name, engine_model in (("weight-only FP8", weight_only), ("FP8 weights + activations", fp8.model)):
                stats = mismatch_stats(train, policy_logprobs(engine_model, batch, rl.temperature)[0], batch.mask,
                                       rl.icepop_alpha, rl.icepop_beta)
                rows[name].append({**stats, "tokens": int(batch.mask.sum())})
    out = {"pretrained": str(start), "seeds": seeds, "per_seed": rows,
           "mean": {name: {k: statistics.fmean(r[k] for r in runs) for k in runs[0]} for name, runs in rows.items()},
           "command": "experiments/rl/compare.py " + " ".join(sys.argv[1:])}
    (RESULTS / "mismatch_sources.json").write_text(json.dumps(out, indent=2) + "\n")
    for name, m in out["mean"].items():
        print(f"{name:26s} mean |dlogp| {m['mean_abs_logdiff']:.4f}  max {m['max_abs_logdiff']:.2f}  "
              f"outside [alpha, beta] {1000 * m['icepop_mask_fraction']:.2f} per mille")


def pooled() -> None:
    """Does RL raise the harder tier, whatever the variant? Each distinct run (the default recipe appears in two
    experiments) of the 40-step comparisons once: its held-out gains per tier and metric, and their spread."""
    runs: dict[str, dict] = {}
    for name in POOLED:
        result = json.loads((RESULTS / f"{name}.json").read_text())
        for arm, a in result["arms"].items():
            for i, run in enumerate(a["runs"]):
                entry = runs.setdefault(run, {"variants": [], "gain": {}})
                entry["variants"].append(f"{name}/{arm}")
                for key, h in a["heldout"].items():
                    entry["gain"][key] = h["gain"]["values"][i]
    table = {}
    for key in next(iter(runs.values()))["gain"]:
        gains = [r["gain"][key] for r in runs.values()]
        table[key] = {**spread(gains), "positive": sum(g > 0 for g in gains), "runs": len(gains)}
    out = {"runs": runs, "table": table, "command": "experiments/rl/compare.py --pooled"}
    (RESULTS / "pooled_gain.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"{len(runs)} distinct RL runs (mean ± stdev of the gain, runs with a gain > 0)")
    for key, row in table.items():
        print(f"  {key:24s} {_pm(row, 100)} points, {row['positive']}/{row['runs']} > 0")


def _pm(s: dict, scale: float = 1.0, fmt: str = ".1f") -> str:
    sd = "" if s["stdev"] is None else f" ± {format(scale * s['stdev'], fmt.lstrip('+'))}"
    return f"{format(scale * s['mean'], fmt)}{sd}"


SIDE_BY_SIDE = (  # (label, summary or held-out key, scale, format, with the stdev) of `print_side_by_side`'s rows
    ("rollout phase, s/step", "mean_rollout_time", 1, ".2f", False),
    ("whole step, s/step", "mean_step_time", 1, ".2f", False),
    ("response tokens trained per step", "mean_response_tokens", 1, ".0f", False),
    ("**rollout phase, s per 1000 trained tokens**", "rollout_s_per_1k_tokens", 1, ".3f", True),
    ("whole step, s per 1000 trained tokens", "step_s_per_1k_tokens", 1, ".3f", True),
    ("**rollout phase / rest of the step** (time)", "rollout_over_rest", 1, ".2f", True),
    ("decode forwards per step", "mean_decode_steps", 1, ".1f", False),
    ("rows decoded per step (summed over forwards)", "mean_decode_rows", 1, ".0f", False),
    ("prompt positions prefilled per step", "mean_prefill_tokens", 1, ".0f", False),
    ("trained tokens sampled by an older policy, %", "mean_stale_token_fraction", 100, ".0f", False),
    ("mean \\|Δ log p\\|", "mean_mean_abs_logdiff", 1, ".4f", False),
    ("hard greedy gain (pts)", "hard/greedy_accuracy", 100, "+.1f", True),
    ("hard pass@1 gain (pts)", "hard/pass@1", 100, "+.1f", True),
    ("medium greedy gain (pts)", "medium/greedy_accuracy", 100, "+.1f", True),
    ("easy greedy gain (pts)", "easy/greedy_accuracy", 100, "+.1f", True),
    ("reward, steps 1-5", "reward_first5", 1, ".3f", True),
    ("reward, last 5 steps", "reward_last5", 1, ".3f", True),
)


def print_side_by_side(names: list[str]) -> None:
    """The Markdown table of docs/rl.md section c: every arm of each results file as a column (mean over seeds,
    ± stdev where it decides); a statistic an arm does not log (synchronous rollouts' stale share) is 0.

    `rollout_over_rest` divides each run's mean rollout phase by the mean rest of its step (the trainer's forward,
    backward and update of about the same number of tokens in every arm): a machine shared with other jobs slows
    both alike, so this ratio holds where the seconds do not."""
    columns = []
    for name in names:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"compare: no results file {path}")
        for arm, a in json.loads(path.read_text())["arms"].items():
            rollout, step = a["mean_rollout_time"]["values"], a["mean_step_time"]["values"]
            a["rollout_over_rest"] = spread([r / (s - r) for r, s in zip(rollout, step, strict=True)])
            columns.append((f"{arm} ({name})", a))
    print("| | " + " | ".join(label for label, _ in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for label, key, scale, fmt, with_stdev in SIDE_BY_SIDE:
        stats = [a["heldout"][key]["gain"] if key in a["heldout"] else a.get(key, {"mean": 0.0, "stdev": None})
                 for _, a in columns]
        cells = [_pm(s, scale, fmt) if with_stdev else format(scale * s["mean"], fmt) for s in stats]
        print(f"| {label} | " + " | ".join(cells) + " |")


def print_table(result: dict) -> None:
    """The Markdown table docs/rl.md quotes."""
    print(f"\n{result['title']} ({result['settings']['seeds']} seeds, mean ± stdev)\n")
    print("| arm | reward steps 1-5 | reward last 5 | max drawdown | hard greedy gain (pts) | hard pass@1 gain "
          "| medium greedy gain | easy greedy gain | s/step | rollout s/step | rollout s per 1k tokens "
          "| mean |dlogp| | mask fraction |")
    print("|---" * 13 + "|")
    for arm, a in result["arms"].items():
        h = a["heldout"]
        print(f"| {arm} | {_pm(a['reward_first5'], 1, '.3f')} | {_pm(a['reward_last5'], 1, '.3f')} "
              f"| {_pm(a['reward_max_drawdown'], 1, '.3f')} | {_pm(h['hard/greedy_accuracy']['gain'], 100)} "
              f"| {_pm(h['hard/pass@1']['gain'], 100)} | {_pm(h['medium/greedy_accuracy']['gain'], 100)} "
              f"| {_pm(h['easy/greedy_accuracy']['gain'], 100)} | {_pm(a['mean_step_time'], 1, '.2f')} "
              f"| {_pm(a['mean_rollout_time'], 1, '.2f')} | {_pm(a['rollout_s_per_1k_tokens'], 1, '.3f')} "
              f"| {_pm(a['mean_mean_abs_logdiff'], 1, '.4f')} "
              f"| {_pm(a['mean_mask_fraction'], 100, '.3f')}% |")


if __name__ == "__main__":
    main()
