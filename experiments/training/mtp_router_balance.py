"""Does balancing the MTP layer's router change what the tiny preset learns? An ablation, seeds side by side.

Issue 12 gave the MTP layer's router the aux-loss-free bias update every other router has (SPEC §1.4); before,
its bias stayed 0 for the whole run. `make run`'s pretraining then ended lower (75/1/25% vs 94/9/39% held-out
easy/medium/hard, docs/training.md), on one seed. This trains the tiny preset with the default settings for each
seed twice: "balanced" (linglab's training step as it is) and "frozen" (the MTP router's bias reset to 0 after
every step, as before), and evaluates both on the run's held-out problems (`evals.evaluate_run`).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/training/mtp_router_balance.py --seeds 0 1 2 --jobs 2

Writes experiments/training/results/mtp_router_balance.json and .png; resumable (finished arms are kept).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from linglab.config import load_config  # noqa: E402
from linglab.data import build_data  # noqa: E402
from linglab.evals import evaluate_run  # noqa: E402
from linglab.flops import matmul_peak_flops  # noqa: E402
from linglab.model import build_model  # noqa: E402
from linglab.plots import plt, save  # noqa: E402
from linglab.run import RunDir, seed_everything  # noqa: E402
from linglab.train import build_trainer  # noqa: E402

RESULTS = ROOT / "experiments" / "training" / "results"
ARMS = ("balanced", "frozen")


def train_arm(seed: int, arm: str, steps: int | None) -> dict:
    """One tiny-preset run of `arm`; its final held-out loss, per-tier accuracy, MTP MaxVio and wall time."""
    overrides = [f"--train.seed={seed}"] + ([f"--train.max_steps={steps}"] if steps else [])
    cfg = load_config("tiny", overrides=overrides)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        seed_everything(cfg.train.seed)
        data = build_data(cfg.data, Path(d), cfg.train.eval_problems)
        trainer = build_trainer(cfg, RunDir(d), data, build_model(cfg.model, seed=cfg.train.seed), log=lambda *a: None)
        mtp_bias = trainer.model.model.mtp_layers[0].mlp.gate.expert_bias
        vio = []
        while trainer.step < cfg.train.max_steps:
            row = trainer.train_step()
            if arm == "frozen":
                mtp_bias.zero_()
            vio.append(row["maxvio_mtp"])
        final = evaluate_run(trainer.model, data, trainer.step)
    return {"seed": seed, "arm": arm, "steps": trainer.step, "heldout_loss": final["heldout_loss"],
            "accuracy": final["accuracy"], "maxvio_mtp_last50": statistics.fmean(vio[-50:]),
            "final_loss": row["loss"], "wall_time_s": time.perf_counter() - start}


def plot(rows: list[dict], path: Path) -> None:
    metrics = ["easy", "medium", "hard", "heldout_loss", "maxvio_mtp_last50"]
    fig, axes = plt.subplots(1, len(metrics), figsize=(13, 3.2))
    for ax, metric in zip(axes, metrics):
        for i, arm in enumerate(ARMS):
            vals = [r["accuracy"][metric] if metric in r["accuracy"] else r[metric] for r in rows if r["arm"] == arm]
            ax.scatter([i] * len(vals), vals, color=f"C{i}", zorder=3)
            ax.bar(i, statistics.fmean(vals), color=f"C{i}", alpha=0.35)
        ax.set_xticks(range(len(ARMS)), ARMS)
        ax.set_title(metric if metric in ("heldout_loss", "maxvio_mtp_last50") else f"{metric} accuracy", fontsize=9)
    fig.suptitle("tiny preset: MTP router balanced vs frozen bias (seeds as points, mean as bars)", fontsize=10)
    save(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="arms trained at once (each one process)")
    parser.add_argument("--steps", type=int, help="train.max_steps (default: the preset's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "mtp_router_balance.json")
    args = parser.parse_args()
    done = json.loads(args.out.read_text())["runs"] if args.out.is_file() else []
    have = {(r["seed"], r["arm"]) for r in done}
    todo = [(s, a) for s in args.seeds for a in ARMS if (s, a) not in have]
    rate = matmul_peak_flops(repeats=2)
    print(f"{len(todo)} runs to train (fp32 GEMM {rate / 1e9:.0f} GFLOP/s)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(train_arm, *zip(*todo), [args.steps] * len(todo)) if todo else []:
            done.append(row)
            print(f"seed {row['seed']} {row['arm']:8s} loss {row['heldout_loss']:.4f} "
                  + " ".join(f"{k} {v:.0%}" for k, v in row["accuracy"].items()) + f" ({row['wall_time_s']:.0f} s)",
                  flush=True)
            args.out.write_text(json.dumps({"runs": done}, indent=1) + "\n")
    summary = {}
    for arm in ARMS:
        rows = [r for r in done if r["arm"] == arm]
        summary[arm] = {m: {"mean": statistics.fmean(v), "stdev": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
                        for m, v in [(t, [r["accuracy"][t] for r in rows]) for t in rows[0]["accuracy"]]
                        + [(k, [r[k] for r in rows]) for k in ("heldout_loss", "maxvio_mtp_last50")]}
    result = {"command": "experiments/training/mtp_router_balance.py " + " ".join(sys.argv[1:]), "runs": done,
              "summary": summary, "fp32_gemm_flops": rate}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(done, args.out.with_suffix(".png"))
    for arm, metrics in summary.items():
        print(f"{arm:8s} " + "  ".join(f"{m} {v['mean']:.3g} ± {v['stdev']:.2g}" for m, v in metrics.items()))


if __name__ == "__main__":
    main()
