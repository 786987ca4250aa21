"""Does RL raise held-out accuracy on the harder tiers? The default `tiny` pretraining, then `linglab rl` from it
with several RL seeds (each seed: its own prompts, samples and held-out problems), before vs after per tier.

The RL settings are the defaults (GRPO + IcePop, FP8 rollouts, tiers 1-2 at temperature 1, SPEC §5) except those
given here (`--steps`, `--lr`). The pretraining run is made once (or reused with --pretrained) and shared by all
seeds, so the spread is RL's own: sampling, prompt order and which held-out problems are drawn.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/rl/rl_gain.py [--seeds 3] [--steps 40] [--lr 1e-4]
        [--eval-problems 64] [--pretrained runs/tiny/final]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))

from linglab.config import load_config  # noqa: E402
from linglab.rl.trainer import run_rl  # noqa: E402
from linglab.train import run_training  # noqa: E402

RUNS, RESULTS = ROOT / "runs", ROOT / "results"
METRICS = ("greedy_accuracy", "pass@1")


def pretrained(path: str | None) -> Path:
    """The checkpoint RL starts from: --pretrained, else the default tiny run (trained here once)."""
    if path:
        return Path(path)
    final = RUNS / "pretrain" / "final"
    if not final.is_dir():
        run_training(load_config("tiny"), RUNS / "pretrain", overwrite=True,
                     command="linglab train --preset tiny (experiments/rl/rl_gain.py)")
    return final


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--eval-problems", type=int, default=64, help="held-out problems per tier, before and after")
    p.add_argument("--pretrained", help="HF checkpoint to start from (default: train the tiny preset here)")
    args = p.parse_args()
    start = pretrained(args.pretrained)

    runs = []
    for seed in range(args.seeds):
        cfg = load_config("tiny", overrides=[f"--rl.steps={args.steps}", f"--rl.lr={args.lr}", f"--rl.seed={seed}",
                                             f"--rl.eval_problems={args.eval_problems}"])
        out = RUNS / f"rl-seed{seed}"
        run_rl(cfg, start, out, overwrite=True, command=f"experiments/rl/rl_gain.py seed {seed}")
        runs.append(json.loads((out / "rl_eval.json").read_text()))

    tiers = list(runs[0]["before"]["tiers"])
    table = {}
    for tier in tiers:
        for metric in METRICS:
            before = [r["before"]["tiers"][tier][metric] for r in runs]
            after = [r["after"]["tiers"][tier][metric] for r in runs]
            gains = [a - b for a, b in zip(after, before)]
            table[f"{tier}/{metric}"] = {
                "before": before, "after": after, "gain": gains, "mean_gain": statistics.fmean(gains),
                "stdev_gain": statistics.stdev(gains) if len(gains) > 1 else None}

    fig, axes = plt.subplots(1, len(METRICS), figsize=(10, 3.6), layout="constrained")
    for ax, metric in zip(axes, METRICS):
        for i, tier in enumerate(tiers):
            row = table[f"{tier}/{metric}"]
            for s, (b, a) in enumerate(zip(row["before"], row["after"])):
                ax.plot([i - 0.15, i + 0.15], [100 * b, 100 * a], marker="o", color=f"C{s}",
                        label=f"RL seed {s}" if i == 0 else None)
        ax.set_xticks(range(len(tiers)), [f"{t}\n(before -> after)" for t in tiers])
        ax.set(ylabel=f"held-out {metric}, %", title=metric)
    axes[0].legend(fontsize=8)
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "rl_gain.png", dpi=110)

    result = {"seeds": args.seeds, "steps": args.steps, "lr": args.lr, "eval_problems": args.eval_problems,
              "pretrained": str(start), "table": table}
    (RESULTS / "rl_gain.json").write_text(json.dumps(result, indent=2) + "\n")
    print(RESULTS / "rl_gain.json")
    for key, row in table.items():
        spread = "" if row["stdev_gain"] is None else f" (stdev {100 * row['stdev_gain']:.1f})"
        print(f"{key:24s} before {' '.join(f'{100 * v:5.1f}' for v in row['before'])}  "
              f"after {' '.join(f'{100 * v:5.1f}' for v in row['after'])}  "
              f"mean gain {100 * row['mean_gain']:+.1f} points{spread}")


if __name__ == "__main__":
    main()
