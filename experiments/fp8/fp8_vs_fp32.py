"""Experiment 4a: FP8 (Ling's tilewise recipe, emulated) vs fp32, same seed and data: the relative loss gap.

Ling reports its FP8 loss within 0.25% of BF16 (SPEC §3). For each seed s (initial weights and data order)
an fp32 run and an FP8 run are trained from the same start on the same batches; the paired gap
(FP8 - fp32) / fp32 is measured on the trailing-mean loss (window 20) over training and at the end (mean
of the last 50 steps). How large a gap run-to-run noise alone makes is measured the same way between
fp32 runs of different seeds. The verdict compares the mean paired gap with Ling's bar and with that noise.

    .venv/bin/python experiments/fp8/fp8_vs_fp32.py [--preset tiny] [--steps 300] [--seeds 2] [--fp8-seeds 1]
    # train one variant only (e.g. several processes sharing one GPU), then run without --only to analyse:
    .venv/bin/python experiments/fp8/fp8_vs_fp32.py --preset small --steps 1000 --device cuda --only fp8-seed1
"""

import statistics

from common import RESULTS, losses, parser, smooth, train_rows, train_seconds, write_result

from linglab.plots import plt, save


def variants(seeds: int, fp8_seeds: int) -> dict[str, list[str]]:
    """Variant name -> overrides. Seed 0 keeps the plain names the other FP8 experiments share."""
    out = {}
    for s in range(seeds):
        suffix, seed = ("", []) if s == 0 else (f"-seed{s}", [f"train.seed={s}"])
        out[f"fp32{suffix}"] = seed
        if s < fp8_seeds:
            out[f"fp8{suffix}"] = ["fp8.enabled=true", *seed]
    return out


def relative(a: list[float], b: list[float]) -> list[float]:
    return [(y - x) / x for x, y in zip(a, b)]


def end_mean(values: list[float], tail: int = 50) -> float:
    tail = min(tail, len(values))
    return sum(values[-tail:]) / tail


def main() -> None:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=2, help="seeds per arm (default: 2); >= 2 gives the noise yardstick")
    p.add_argument("--fp8-seeds", type=int, help="seeds with an FP8 run (default: all); the other fp32 seeds "
                   "only measure the noise (saves the slow emulated runs on a CPU)")
    p.add_argument("--only", help="train this one variant (e.g. fp8-seed1) and exit")
    args = p.parse_args()
    args.fp8_seeds = args.seeds if args.fp8_seeds is None else min(args.fp8_seeds, args.seeds)
    todo = variants(args.seeds, args.fp8_seeds)
    if args.only:
        if args.only not in todo:
            raise SystemExit(f"--only must be one of {', '.join(todo)}")
        train_rows(args.only, todo[args.only], args)
        return
    loss = {}
    for name, overrides in todo.items():
        rows, _ = train_rows(name, overrides, args)
        steps, loss[name] = losses(rows)
    smoothed = {name: smooth(v) for name, v in loss.items()}
    half = len(steps) // 2

    per_seed = []
    for s in range(args.fp8_seeds):
        suffix = "" if s == 0 else f"-seed{s}"
        a, b = f"fp32{suffix}", f"fp8{suffix}"
        gap = relative(smoothed[a], smoothed[b])
        per_seed.append({"seed": s, "final_loss_fp32": end_mean(loss[a]), "final_loss_fp8": end_mean(loss[b]),
                         "final_relative_gap": (end_mean(loss[b]) - end_mean(loss[a])) / end_mean(loss[a]),
                         "mean_relative_gap_second_half": statistics.fmean(gap[half:]),
                         "max_abs_relative_gap_second_half": max(abs(g) for g in gap[half:]), "curve": gap})
    noise = []  # fp32 seed s vs fp32 seed 0: what a different start alone does
    for s in range(1, args.seeds):
        a, b = "fp32", f"fp32-seed{s}"
        noise.append({"seed": s, "final_relative_gap": (end_mean(loss[b]) - end_mean(loss[a])) / end_mean(loss[a]),
                      "curve": relative(smoothed[a], smoothed[b])})

    finals = [r["final_relative_gap"] for r in per_seed]
    mean_gap = statistics.fmean(finals)
    spread = statistics.stdev(finals) if len(finals) > 1 else None  # None: one paired seed, no spread
    noise_abs = statistics.fmean(abs(r["final_relative_gap"]) for r in noise) if noise else None

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    for s in range(args.seeds):
        suffix = "" if s == 0 else f"-seed{s}"
        line, = a.plot(steps, smoothed[f"fp32{suffix}"], lw=1, label=f"fp32, seed {s}")
        if s < args.fp8_seeds:
            a.plot(steps, smoothed[f"fp8{suffix}"], lw=1, ls="--", color=line.get_color(), label=f"FP8, seed {s}")
            b.plot(steps, [100 * g for g in per_seed[s]["curve"]], lw=1.2, color=line.get_color(),
                   label=f"FP8 vs fp32, seed {s}")
    for r in noise:
        b.plot(steps, [100 * g for g in r["curve"]], color="gray", lw=0.8,
               label=f"fp32 seed {r['seed']} vs seed 0 (noise)")
    a.set(xlabel="step", ylabel="training loss (trailing mean of 20)", yscale="log",
          title=f"{args.preset}, {args.steps} steps")
    a.legend(fontsize=7)
    b.axhline(0.25, color="red", ls="--", lw=1, label="Ling's bar (±0.25%)")
    b.axhline(-0.25, color="red", ls="--", lw=1)
    b.set(xlabel="step", ylabel="relative loss gap, %", title="(FP8 - fp32) / fp32, same seed and data")
    b.legend(fontsize=7)
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"fp8_vs_fp32_{args.preset}.png"
    save(fig, png)

    result = {"preset": args.preset, "steps": args.steps, "batch_size": args.batch_size,
              "seeds": args.seeds, "fp8_seeds": args.fp8_seeds,
              "overrides": args.set,
              "device": args.device, "ling_bar": 0.0025,
              "mean_final_relative_gap": mean_gap, "stdev_final_relative_gap": spread,
              "mean_abs_final_gap_between_fp32_seeds": noise_abs,
              "within_ling_bar": abs(mean_gap) <= 0.0025,
              "train_seconds": {name: train_seconds(name, args) for name in todo},
              "per_seed": [{k: v for k, v in r.items() if k != "curve"} for r in per_seed],
              "seed_noise": [{k: v for k, v in r.items() if k != "curve"} for r in noise]}
    print(write_result(f"fp8_vs_fp32_{args.preset}", result))
    print(f"plot: {png}")
    for r in result["per_seed"]:
        print(f"seed {r['seed']}: fp32 {r['final_loss_fp32']:.4f}  fp8 {r['final_loss_fp8']:.4f}  "
              f"gap {100 * r['final_relative_gap']:+.3f}%")
    pct = lambda v: "n/a" if v is None else f"{100 * v:.3f}%"  # noqa: E731
    print(f"mean paired gap {100 * mean_gap:+.3f}% (stdev {pct(spread)}), Ling's bar 0.25%; "
          f"fp32 seed-to-seed |gap| {pct(noise_abs)}")


if __name__ == "__main__":
    main()
