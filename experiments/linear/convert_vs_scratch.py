"""Conversion vs training from scratch for the Ring-linear hybrid (issue 16 item 5, SPEC §8), on the tiny models:

    converted  the pretrained tiny BailingMoeV2 converted to tiny-linear (`linglab.convert`), then K more steps
               of pretraining (`train --init-from`): how Ring-mini-linear was made from Ling-mini base
    softmax    the same pretrained model continued K steps the same way, unconverted: what conversion costs
    scratch    tiny-linear from random weights for pretraining + K steps: the same total tokens, no conversion

Every arm trains on the embedded corpus with the pretrained model's tokenizer and is scored on the same held-out
set (held-out loss, greedy exact match per tier), over --seeds seeds (train.seed: data order, and the init of the
scratch arm; the conversion itself draws nothing). The converted model is also scored before any training.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/linear/convert_vs_scratch.py [--steps 150] [--seeds 2]
    .venv/bin/python experiments/linear/convert_vs_scratch.py --pretrained runs/tiny/final   # reuse a tiny model

The pretraining trained here is `linglab train --preset tiny` as it is (its default 600 steps) unless
--pretrain-steps shortens it. Runs go to runs/<arm>/seed<k> (a finished run with the same config is reused, so an
interrupted comparison continues). Writes results/convert_vs_scratch.json (per seed and mean/stdev per arm, loss
curves) and .png after every run, so a comparison cut short still leaves the runs it finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))

from linglab.checkpoint import from_pretrained  # noqa: E402
from linglab.config import load_config, to_toml  # noqa: E402
from linglab.convert import convert_to_linear  # noqa: E402
from linglab.data import build_data  # noqa: E402
from linglab.evals import evaluate_run  # noqa: E402
from linglab.flops import matmul_peak_flops  # noqa: E402
from linglab.plots import plt, save  # noqa: E402
from linglab.run import read_jsonl  # noqa: E402
from linglab.train import run_training  # noqa: E402

RUNS, RESULTS = ROOT / "runs", ROOT / "results"
ARMS = ("converted", "softmax", "scratch")
PRESET = {"converted": "tiny-linear", "softmax": "tiny", "scratch": "tiny-linear"}
TIERS = ("easy", "medium", "hard")
REUSED: list[str] = []  # runs found finished, so this invocation's wall time leaves theirs out
# tiny-linear's layer rule and norm groups (linglab.config PRESETS): the converted model must have its shape.
LAYER_GROUP_SIZE, GROUP_NORM_SIZE = 2, 2


def pretrained(path: str | None, steps: int | None) -> Path:
    """The tiny BailingMoeV2 every arm starts from: --pretrained, else the tiny preset trained here (its own
    max_steps unless `steps` is given), reused when a finished pretraining has the same config."""
    if path:
        return Path(path)
    out = RUNS / "pretrain"
    cfg = load_config("tiny", overrides=[f"--train.max_steps={steps}"] if steps else [])
    if not ((out / "summary.json").is_file() and (out / "config.toml").read_text() == to_toml(cfg)):
        t0 = time.time()
        run_training(cfg, out, overwrite=True,
                     command="linglab train --preset tiny (experiments/linear/convert_vs_scratch.py)")
        print(f"  pretraining: {time.time() - t0:.0f} s", flush=True)
    return out / "final"


def arm_config(arm: str, seed: int, start: Path, pretrain_steps: int, args):
    """An arm's config: its preset, the pretrained tokenizer, K continued steps at the continuation LR, or for
    scratch pretraining + K steps with the preset's own schedule."""
    common = [f"--data.tokenizer={start / 'tokenizer.json'}", f"--train.seed={seed}", "--train.eval_every=0",
              f"--train.eval_problems={args.eval_problems}"]
    if arm == "scratch":
        schedule = [f"--train.max_steps={pretrain_steps + args.steps}"]
    else:
        schedule = [f"--train.max_steps={args.steps}", f"--train.lr={args.lr}", f"--train.warmup_steps={args.warmup}",
                    f"--train.ckpt_every={args.steps}"]
    return load_config(PRESET[arm], overrides=common + schedule)


def run_arm(arm: str, seed: int, start: Path, converted: Path, pretrain_steps: int, args) -> Path:
    out = RUNS / arm / f"seed{seed}"
    cfg = arm_config(arm, seed, start, pretrain_steps, args)
    if (out / "summary.json").is_file() and (out / "config.toml").read_text() == to_toml(cfg):
        print(f"reusing {out.relative_to(ROOT)}", flush=True)
        REUSED.append(str(out.relative_to(ROOT)))
        return out
    init = {"converted": converted, "softmax": start, "scratch": None}[arm]
    t0 = time.time()
    run_training(cfg, out, overwrite=True, init_from=init,
                 command=f"linglab train --preset {PRESET[arm]} (experiments/linear/convert_vs_scratch.py, {arm})")
    print(f"  {arm} seed {seed}: {time.time() - t0:.0f} s, {time.strftime('%H:%M:%S')}", flush=True)
    return out


def eval_checkpoint(path: Path, start: Path, eval_problems: int) -> dict:
    """Held-out loss and per-tier accuracy of a checkpoint on the arms' held-out set (step 0: before training)."""
    cfg = load_config("tiny", overrides=[f"--data.tokenizer={start / 'tokenizer.json'}"])
    data = build_data(cfg.data, RUNS, eval_problems, save_tokenizer=False, reuse_saved=False)
    row = evaluate_run(from_pretrained(path), data, 0)
    return {"heldout_loss": row["heldout_loss"], "heldout_loss_by_tier": row["heldout_loss_by_tier"],
            "accuracy": row["accuracy"]}


def read_arm_run(out: Path) -> dict:
    rows = read_jsonl(out / "metrics.jsonl")
    final = [r for r in rows if r.get("kind") == "eval"][-1]
    train = [r for r in rows if r.get("kind") == "train"]
    summary = json.loads((out / "summary.json").read_text())
    return {"heldout_loss": final["heldout_loss"], "heldout_loss_by_tier": final["heldout_loss_by_tier"],
            "accuracy": final["accuracy"], "steps": summary["steps"], "tokens": summary["tokens"],
            "wall_time_s": summary["wall_time_s"], "loss_curve": [[r["step"], r["main_loss"]] for r in train]}


def pretrain_curve(start: Path) -> list[list[float]]:
    """The main loss per step of the run that made `start`, when it is a run's final/ (else none)."""
    metrics = start.parent / "metrics.jsonl"
    if start.name != "final" or not metrics.is_file():
        return []
    return [[r["step"], r["main_loss"]] for r in read_jsonl(metrics) if r.get("kind") == "train"]


def spread(values: list[float]) -> dict:
    return {"values": values, "mean": statistics.fmean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else None}


def summarise(runs: list[dict]) -> dict:
    out = {"heldout_loss": spread([r["heldout_loss"] for r in runs])}
    for tier in TIERS:
        out[f"accuracy_{tier}"] = spread([r["accuracy"][tier] for r in runs])
        out[f"heldout_loss_{tier}"] = spread([r["heldout_loss_by_tier"][tier] for r in runs])
    return out


def plot(result: dict, path: Path) -> None:
    """Left: main loss against total steps (pretraining + continued) per arm and seed; right: held-out accuracy per
    tier, mean over seeds with each seed as a dot."""
    pretrain_steps = result["setup"]["pretrain_steps"]
    colors = {"converted": "tab:orange", "softmax": "tab:blue", "scratch": "tab:green"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for arm in result["arms"]:
        for k, run in enumerate(result["runs"][arm]):
            offset = 0 if arm == "scratch" else pretrain_steps
            steps = [offset + s for s, _ in run["loss_curve"]]
            loss = [v for _, v in run["loss_curve"]]
            mean = result["arms"][arm]["heldout_loss"]["mean"]
            left.plot(steps, loss, color=colors[arm], alpha=0.8, lw=1,
                      label=f"{arm} (held-out loss {mean:.3f})" if k == 0 else None)
    if result["pretrain_curve"]:
        steps, loss = zip(*result["pretrain_curve"])
        left.plot(steps, loss, color="grey", lw=1, label="pretraining (softmax, the start of converted and softmax)")
    left.axvline(pretrain_steps, color="grey", ls=":", lw=1)
    left.set(yscale="log", xlabel="total training steps (pretraining + continued)", ylabel="train main loss",
             title="training loss (continued arms start where pretraining ends)")
    left.grid(alpha=0.3, which="both")
    left.legend()
    width = 0.25
    for j, arm in enumerate(ARMS):
        if arm not in result["arms"]:
            continue
        xs = [i + (j - 1) * width for i in range(len(TIERS))]
        means = [result["arms"][arm][f"accuracy_{t}"]["mean"] for t in TIERS]
        right.bar(xs, means, width, color=colors[arm], label=arm)
        for x, tier in zip(xs, TIERS):
            values = result["arms"][arm][f"accuracy_{tier}"]["values"]
            right.scatter([x] * len(values), values, color="black", s=10, zorder=3)
    right.set(xticks=range(len(TIERS)), xticklabels=TIERS, ylabel="held-out greedy exact match", ylim=(0, 1),
              title="per tier, seeds " + ", ".join(f"{arm} {n}" for arm, n in result["setup"]["seeds"].items()))
    right.grid(alpha=0.3, axis="y")
    right.legend()
    save(fig, path)


def write(result: dict, runs: dict, name: str, t0: float) -> None:
    """The JSON and PNG of the runs finished so far: an arm's mean is over the seeds it has."""
    result["setup"]["seeds"] = {arm: len(runs[arm]) for arm in ARMS}
    result["setup"]["wall_time_s"] = time.time() - t0
    result["setup"]["reused_runs"] = REUSED
    result["setup"]["run_wall_time_s"] = {arm: [r["wall_time_s"] for r in runs[arm]] for arm in ARMS}
    result["arms"] = {arm: summarise(runs[arm]) for arm in ARMS if runs[arm]}
    result["runs"] = runs
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, RESULTS / f"{name}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", help="tiny BailingMoeV2 checkpoint with tokenizer (default: train one here)")
    parser.add_argument("--pretrain-steps", type=int,
                        help="steps of the pretraining trained here (default: the tiny preset's); with --pretrained, "
                             "the steps it was trained for when its run's summary.json is not beside it")
    parser.add_argument("--steps", type=int, default=150, help="K: continued steps (scratch: pretraining + K)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak LR of the continued runs")
    parser.add_argument("--warmup", type=int, default=10, help="warmup steps of the continued runs")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--eval-problems", type=int, default=100, help="held-out problems per tier")
    parser.add_argument("--name", default="convert_vs_scratch")
    args = parser.parse_args()

    t0 = time.time()
    # The machine is shared: the GEMM rate now says how loaded it was, next to the wall time.
    gemm_rate = matmul_peak_flops(repeats=2)
    print(f"fp32 GEMM {gemm_rate / 1e9:.0f} GFLOP/s", flush=True)
    start = pretrained(args.pretrained, args.pretrain_steps)
    summary = start.parent / "summary.json"
    pretrain = json.loads(summary.read_text()) if summary.is_file() else {}
    pretrain_steps = pretrain.get("steps", args.pretrain_steps)
    if pretrain_steps is None:
        parser.error("--pretrained without its run's summary.json needs --pretrain-steps")
    converted = RUNS / "converted_start"
    # Converted every time (seconds, no random numbers): a reused one could come from another pretraining.
    convert_to_linear(start, converted, LAYER_GROUP_SIZE, GROUP_NORM_SIZE, overwrite=True)
    result = {
        "setup": {"pretrained": str(start), "pretrain_steps": pretrain_steps, "continued_steps": args.steps,
                  "scratch_steps": pretrain_steps + args.steps, "lr": args.lr, "warmup": args.warmup,
                  "seeds": {}, "eval_problems_per_tier": args.eval_problems,
                  "layer_group_size": LAYER_GROUP_SIZE, "group_norm_size": GROUP_NORM_SIZE,
                  "presets": PRESET, "fp32_gemm_flops_per_s": gemm_rate, "wall_time_s": None,
                  "pretrain_wall_time_s": pretrain.get("wall_time_s")},
        "start": {"pretrained": eval_checkpoint(start, start, args.eval_problems),
                  "converted_before_training": eval_checkpoint(converted, start, args.eval_problems)},
        "pretrain_curve": pretrain_curve(start),
    }
    runs = {arm: [] for arm in ARMS}
    for seed in range(args.seeds):  # seed by seed, so a cut-short comparison still has every arm
        for arm in ARMS:
            runs[arm].append(read_arm_run(run_arm(arm, seed, start, converted, pretrain_steps, args)))
            write(result, runs, args.name, t0)
    for arm in ARMS:
        a = result["arms"][arm]
        tiers = ", ".join(f"{t} {a[f'accuracy_{t}']['mean']:.1%}" for t in TIERS)
        print(f"{arm:9s} held-out loss {a['heldout_loss']['mean']:.4f}  {tiers}")
    print(f"wrote {RESULTS / (args.name + '.json')} in {result['setup']['wall_time_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
