"""Experiment 4d: FP8 at depth on real text: the loss gap against seed spread, and QK-norm's outliers by layer.

SPEC §3 claims FP8 training within 0.25% of high-precision loss, and that without QK-norm the fused QKV
projection's input, output and output gradient develop outliers that grow with depth and inflate FP8 error in
every module. Experiments a and b tested both on 4-6 layers of arithmetic and could not resolve either; this
trains a deep, narrow dense model (default 12 layers of width 64, no MoE, no MTP) on the Python standard library
(`data.corpus=stdlib`, scored on held-out files), with:

- FP8 vs fp32 with QK-norm for `--seeds` seeds (each pair: same initial weights, same batches), so the paired
  gap's seed-to-seed spread is measured, not assumed;
- FP8 vs fp32 without QK-norm for `--noqk-seeds` seeds (the fp32 run is the control for QK-norm's own effect);
- QKV max|x| and RMS per layer at every checkpoint (`--probes` over training) on fixed held-out rows;
- the FP8 monitor's underflow and distortion at every sample, per module.

Runs are cached in experiments/fp8/runs/ (a finished run with the same overrides is reused, so a killed sweep
resumes); results go to experiments/fp8/results/depth.json and .png.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/fp8/depth.py --dry-run     # planned runs, estimated time
    OMP_NUM_THREADS=1 .venv/bin/python experiments/fp8/depth.py --steps 800 --seeds 3 --noqk-seeds 1
"""

from __future__ import annotations

import json
import statistics

import numpy as np
import torch
from common import RESULTS, RUNS, base_overrides, ensure_trained, monitor_means, outlier_ratio, parser, qkv_stats, smooth, write_result

from linglab.checkpoint import from_pretrained
from linglab.data import build_data
from linglab.plots import plt, save
from linglab.report import fp8_matrices, read_fp8_samples, read_metrics
from linglab.run import RunDir
from linglab.train import apply_fp8

LING_BAR = 0.0025
# Seconds per step of the default model (12 x 64, batch 16 x 128 tokens) on one core of the 2-core machine while
# another job used the other core, and per run (tokenizer, data, the fused quantisers' compile, probes); other
# shapes are scaled by tokens x layers, a rough guide.
STEP_SECONDS = {"fp32": 0.25, "fp8": 0.52}
RUN_SECONDS = {"fp32": 40.0, "fp8": 70.0}
TENSORS = ("input", "output", "output_grad")


def add_arguments(p) -> None:
    p.set_defaults(steps=800, batch_size=16, monitor_every=50)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=64, help="model width (heads of 16)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--corpus", default="stdlib", help="data.corpus (default: stdlib; '' = the arithmetic corpus)")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the FP8/fp32 pair with QK-norm (default: 3)")
    p.add_argument("--noqk-seeds", type=int, default=1, help="seeds of the FP8/fp32 pair without QK-norm")
    p.add_argument("--probes", type=int, default=4, help="checkpoints probed for QKV statistics over training")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and the estimated time, train nothing")


def model_overrides(args) -> list[str]:
    """A dense, deep and narrow decoder: every layer the dense SwiGLU FFN (3x width), no MTP."""
    return [f"model.hidden_size={args.hidden}", f"model.num_hidden_layers={args.layers}",
            f"model.num_attention_heads={args.hidden // 16}", f"model.num_key_value_heads={args.hidden // 16}",
            "model.head_dim=16", f"model.intermediate_size={3 * args.hidden}",
            f"model.first_k_dense_replace={args.layers}", "model.num_nextn_predict_layers=0",
            f"data.corpus={args.corpus}", f"data.seq_len={args.seq_len}",
            f"train.ckpt_every={max(1, args.steps // args.probes)}", f"train.keep_last={args.probes + 1}",
            f"train.eval_every={max(1, args.steps // args.probes)}", "train.num_samples=0"]


def plan(args) -> dict[str, dict]:
    """Run name -> {arm, seed, overrides}; arms are fp32 / fp8 with QK-norm and fp32-noqk / fp8-noqk without.

    Seed by seed, every arm of a seed before the next seed: a sweep stopped early has all four arms to compare.
    """
    runs = {}
    for seed in range(max(args.seeds, args.noqk_seeds)):
        for arms, seeds in ((("fp32", "fp8"), args.seeds), (("fp32-noqk", "fp8-noqk"), args.noqk_seeds)):
            for arm in arms if seed < seeds else ():
                extra = (["fp8.enabled=true"] if arm.startswith("fp8") else []) + \
                        (["model.use_qk_norm=false"] if arm.endswith("noqk") else [])
                runs[f"depth{args.layers}x{args.hidden}-{arm}-s{seed}"] = {
                    "arm": arm, "seed": seed, "overrides": [*model_overrides(args), f"train.seed={seed}", *extra]}
    return runs


def is_done(name: str, overrides: list[str], args) -> bool:
    done = RUNS / f"{args.preset}-{args.steps}-{name}" / "done.json"
    return done.is_file() and json.loads(done.read_text()).get("overrides") == [*base_overrides(args), *overrides]


def estimate_seconds(run: dict, args) -> float:
    kind = "fp8" if run["arm"].startswith("fp8") else "fp32"
    scale = args.batch_size * args.seq_len * args.layers / (16 * 128 * 12)
    return RUN_SECONDS[kind] + args.steps * STEP_SECONDS[kind] * scale


def probe_run(run_dir, cfg, data) -> list[dict]:
    """QKV statistics (`qkv_stats`) of every checkpoint of a run on the first 16 held-out rows, oldest first."""
    rows, mask = data.heldout.tokens[:16].long(), data.heldout.loss_mask[:16]
    out = []
    for ckpt in RunDir(run_dir).checkpoints():
        model = from_pretrained(ckpt)
        apply_fp8(model, cfg.fp8)
        torch.manual_seed(0)
        out.append({"step": int(ckpt.name.split("_")[1]), **qkv_stats(model, rows, mask)})
    return out


def monitor_trace(samples: list[dict]) -> dict:
    """The FP8 monitor over training (means over modules) and its last sample per module."""
    if not samples:
        return {}
    ops, under, dist = fp8_matrices(samples[-1])
    return {"steps": [s["step"] for s in samples], "means": [monitor_means(s) for s in samples],
            "last_by_op": {op: {"underflow": {"act": under[i, 0], "grad": under[i, 2]},
                                "one_minus_cosine": {"act": dist[i, 0], "grad": dist[i, 2]}}
                           for i, op in enumerate(ops)}}


def end_mean(values: list[float], tail: int = 50) -> float:
    tail = min(tail, len(values))
    return sum(values[-tail:]) / tail


def paired(runs: dict, a: str, b: str) -> dict:
    """(b - a) / a per seed where both arms ran, on final held-out loss and on end-of-training loss."""
    seeds = sorted({r["seed"] for r in runs.values() if r["arm"] == a} & {r["seed"] for r in runs.values()
                                                                           if r["arm"] == b})
    by = {(r["arm"], r["seed"]): r for r in runs.values()}
    gaps = [{"seed": s, "heldout": (by[b, s]["heldout_loss"] - by[a, s]["heldout_loss"]) / by[a, s]["heldout_loss"],
             "train_end": (by[b, s]["train_end_loss"] - by[a, s]["train_end_loss"]) / by[a, s]["train_end_loss"]}
            for s in seeds]
    out = {"per_seed": gaps}
    for key in ("heldout", "train_end"):
        values = [g[key] for g in gaps]
        out[f"mean_{key}"] = statistics.fmean(values) if values else None
        out[f"stdev_{key}"] = statistics.stdev(values) if len(values) > 1 else None
        out[f"stderr_{key}"] = statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None
    return out


def seed_noise(runs: dict, arm: str) -> list[float]:
    """(seed s - seed 0) / seed 0 of an arm's final held-out loss, s > 0: the gap a different start alone makes."""
    by = {r["seed"]: r["heldout_loss"] for r in runs.values() if r["arm"] == arm}
    return [(by[s] - by[0]) / by[0] for s in sorted(by) if s > 0] if 0 in by else []


def spread(runs: dict, arm: str) -> float | None:
    """Relative stdev of an arm's final held-out loss across seeds: what a different start alone moves."""
    values = [r["heldout_loss"] for r in runs.values() if r["arm"] == arm]
    return statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else None


def plot(result: dict, args, path) -> None:
    runs = result["runs"]
    colors = {"fp32": "C0", "fp8": "C1", "fp32-noqk": "C2", "fp8-noqk": "C3"}
    fig, axes = plt.subplots(3, 3, figsize=(15, 11), layout="constrained")
    ax = axes[0, 0]
    for r in runs.values():
        ax.plot(r["eval_steps"], r["eval_losses"], color=colors[r["arm"]], marker=".", lw=1,
                label=f"{r['arm']} s{r['seed']}")
    ax.set(xlabel="step", ylabel="held-out loss", yscale="log", title=f"{args.layers} x {args.hidden}, {args.corpus}")
    ax.legend(fontsize=6, ncol=2)
    ax = axes[0, 1]
    by = {(r["arm"], r["seed"]): r for r in runs.values()}
    for (a, b), color in ((("fp32", "fp8"), "C1"), (("fp32-noqk", "fp8-noqk"), "C3")):
        for (arm, seed), r in by.items():
            if arm == b and (a, seed) in by:
                base = by[a, seed]["train_smoothed"]
                ax.plot(r["train_steps"], [100 * (y - x) / x for x, y in zip(base, r["train_smoothed"])],
                        color=color, lw=0.8, label=f"{b} vs {a}, s{seed}")
    base = by.get(("fp32", 0))
    for (arm, seed), r in by.items():
        if arm == "fp32" and seed > 0 and base:
            ax.plot(r["train_steps"],
                    [100 * (y - x) / x for x, y in zip(base["train_smoothed"], r["train_smoothed"])], color="gray",
                    lw=0.8, label=f"fp32 s{seed} vs s0 (noise)")
    ax.axhspan(-100 * LING_BAR, 100 * LING_BAR, color="red", alpha=0.15, label="Ling's bar ±0.25%")
    ax.set(xlabel="step", ylabel="relative gap, %", title="training loss (trailing mean 20), paired by seed")
    ax.legend(fontsize=6)
    ax = axes[0, 2]
    for r in runs.values():
        m = r.get("monitor")
        if m and r["seed"] == 0:
            for kind, ls in (("act", "-"), ("grad", "--")):
                ax.plot(m["steps"], [x["one_minus_cosine"][kind] for x in m["means"]], ls=ls, color=colors[r["arm"]],
                        label=f"{r['arm']} {kind}")
    ax.set(xlabel="step", ylabel="1 - cosine, mean over modules", yscale="log", title="FP8 monitor: distortion")
    ax.legend(fontsize=7)
    for col, kind in enumerate(TENSORS):
        ax = axes[1, col]
        for r in runs.values():
            if r["seed"] == 0 and r["probes"]:
                last = r["probes"][-1]
                ax.plot(range(args.layers), outlier_ratio(last[kind]), marker="o", ms=3, color=colors[r["arm"]],
                        label=r["arm"])
        ax.set(xlabel="layer", ylabel="max|x| / RMS", yscale="log", title=f"QKV {kind}, final checkpoint, seed 0")
        ax.legend(fontsize=7)
        ax = axes[2, col]
        for arm, ls in (("fp8", "--"), ("fp8-noqk", "-")):
            r = by.get((arm, 0))
            if not r:
                continue
            cmap = plt.get_cmap("viridis")
            for i, probe in enumerate(r["probes"]):
                ax.plot(range(args.layers), probe[kind]["max"], ls=ls, color=cmap(i / max(1, len(r["probes"]) - 1)),
                        label=f"{arm} step {probe['step']}")
        ax.set(xlabel="layer", ylabel="max|x|", yscale="log", title=f"QKV {kind} max over training (FP8, seed 0)")
        ax.legend(fontsize=6, ncol=2)
    save(fig, path)


def main(argv: list[str] | None = None) -> dict | None:
    p = parser(__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    todo = plan(args)
    total = 0.0
    for name, run in todo.items():
        done = is_done(name, run["overrides"], args)
        seconds = 0.0 if done else estimate_seconds(run, args)
        total += seconds
        print(f"{name:32s} {'done, reused' if done else f'~{seconds / 60:.1f} min'}")
    print(f"{len(todo)} runs of {args.steps} steps, batch {args.batch_size} x {args.seq_len}: "
          f"~{total / 60:.0f} min single-threaded left to train (one core of this machine)")
    if args.dry_run:
        return None

    runs, datasets = {}, {}
    for name, run in todo.items():
        run_dir, cfg = ensure_trained(name, run["overrides"], args)
        train, evals = read_metrics(run_dir / "metrics.jsonl")
        tokenizer = (run_dir / "tokenizer.json").read_text()
        if tokenizer not in datasets:  # every run trains the same tokenizer on the same text: encode it once
            datasets[tokenizer] = build_data(cfg.data, run_dir, eval_problems=8, save_tokenizer=False)
        losses = [r["loss"] for r in train]
        runs[name] = {"arm": run["arm"], "seed": run["seed"],
                      "heldout_loss": evals[-1]["heldout_loss"], "train_end_loss": end_mean(losses),
                      "eval_steps": [r["step"] for r in evals], "eval_losses": [r["heldout_loss"] for r in evals],
                      "train_steps": [r["step"] for r in train][:: max(1, args.steps // 200)],
                      "train_smoothed": smooth(losses)[:: max(1, args.steps // 200)],
                      "seconds": json.loads((run_dir / "done.json").read_text())["seconds"],
                      "probes": probe_run(run_dir, cfg, datasets[tokenizer]),
                      "monitor": monitor_trace(read_fp8_samples(run_dir / "metrics.jsonl"))}
        print(f"[{name}] held-out loss {runs[name]['heldout_loss']:.4f}", flush=True)

    corpus = next(iter(datasets.values())).corpus  # name, files, bytes and sha256 of the text every run read
    result = {"layers": args.layers, "hidden": args.hidden, "steps": args.steps, "batch_size": args.batch_size,
              "seq_len": args.seq_len, "tokens_per_run": args.steps * args.batch_size * args.seq_len,
              "corpus": corpus, "overrides": args.set, "device": args.device, "ling_bar": LING_BAR,
              "fp8_vs_fp32": paired(runs, "fp32", "fp8"), "fp8_vs_fp32_noqk": paired(runs, "fp32-noqk", "fp8-noqk"),
              "noqk_vs_qk_fp32": paired(runs, "fp32", "fp32-noqk"), "noqk_vs_qk_fp8": paired(runs, "fp8", "fp8-noqk"),
              "seed_spread_heldout": {arm: spread(runs, arm) for arm in ("fp32", "fp8", "fp32-noqk", "fp8-noqk")},
              "seed_noise_heldout": {arm: seed_noise(runs, arm) for arm in ("fp32", "fp8", "fp32-noqk", "fp8-noqk")},
              "runs": runs}
    result["distortion_higher_without_qk_norm"] = modules_worse(runs)
    png = RESULTS / "depth.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(result, args, png)
    print(write_result("depth", result))
    print(f"plot: {png}")
    summary(result)
    return result


def modules_worse(runs: dict) -> dict | None:
    """Share of FP8 modules whose last-sample distortion is higher without QK-norm, per tensor kind, seed 0
    (SPEC §3: QK-norm 'lowers the error in every FP8 module')."""
    by = {(r["arm"], r["seed"]): r for r in runs.values()}
    on, off = by.get(("fp8", 0), {}).get("monitor"), by.get(("fp8-noqk", 0), {}).get("monitor")
    if not on or not off:
        return None
    ops = sorted(set(on["last_by_op"]) & set(off["last_by_op"]))
    return {kind: float(np.mean([off["last_by_op"][op]["one_minus_cosine"][kind] >
                                 on["last_by_op"][op]["one_minus_cosine"][kind] for op in ops]))
            for kind in ("act", "grad")}


def summary(result: dict) -> None:
    pct = lambda v: "n/a" if v is None else f"{100 * v:+.3f}%"  # noqa: E731
    for key in ("fp8_vs_fp32", "fp8_vs_fp32_noqk", "noqk_vs_qk_fp32", "noqk_vs_qk_fp8"):
        r = result[key]
        print(f"{key:18s} held-out gap {pct(r['mean_heldout'])} (stdev {pct(r['stdev_heldout'])}, "
              f"stderr {pct(r['stderr_heldout'])}, n={len(r['per_seed'])})")
    print("seed spread of held-out loss:", {k: pct(v) for k, v in result["seed_spread_heldout"].items()})
    print("modules with higher distortion without QK-norm:", result["distortion_higher_without_qk_norm"])


if __name__ == "__main__":
    main()
