"""Experiment 4a: FP8 (Ling's tilewise recipe, emulated) vs fp32, same seed and data: the relative loss gap.

Ling reports its FP8 loss within 0.25% of BF16 (SPEC §3). The gap is measured on the trailing-mean loss
(window 20 steps) over training and at the end (mean of the last 50 steps). As a yardstick for how large a
gap run-to-run noise alone makes at this scale, a second fp32 run with another seed (`train.seed=1`: other
initial weights and data order) is compared with the first in the same way.

    .venv/bin/python experiments/fp8/fp8_vs_fp32.py [--preset tiny] [--steps 300]
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from common import RESULTS, losses, parser, smooth, train_variant, write_result  # noqa: E402


def main() -> None:
    args = parser(__doc__.split("\n")[0]).parse_args()
    fp32, _, _, _ = train_variant("fp32", [], args)
    fp8, _, _, _ = train_variant("fp8", ["fp8.enabled=true"], args)
    seed1, _, _, _ = train_variant("fp32-seed1", ["train.seed=1"], args)
    steps, l32 = losses(fp32)
    _, l8 = losses(fp8)
    _, l32b = losses(seed1)
    s32, s8, s32b = smooth(l32), smooth(l8), smooth(l32b)
    gap = [(b - a) / a for a, b in zip(s32, s8)]
    seed_gap = [(b - a) / a for a, b in zip(s32, s32b)]
    tail = min(50, len(l32))
    end32, end8, end32b = (sum(v[-tail:]) / tail for v in (l32, l8, l32b))
    end_gap = (end8 - end32) / end32
    half = len(gap) // 2
    mean_abs_gap_second_half = sum(abs(g) for g in gap[half:]) / max(len(gap) - half, 1)
    mean_abs_seed_gap_second_half = sum(abs(g) for g in seed_gap[half:]) / max(len(seed_gap) - half, 1)

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    a.plot(steps, s32, label="fp32")
    a.plot(steps, s8, label="FP8 tilewise (emulated)")
    a.set(xlabel="step", ylabel="training loss (trailing mean of 20)", yscale="log", title="loss")
    a.legend()
    b.plot(steps, [100 * g for g in gap], label="FP8 vs fp32, same seed")
    b.plot(steps, [100 * g for g in seed_gap], color="gray", lw=1, label="fp32 seed 1 vs seed 0 (noise yardstick)")
    b.axhline(0.25, color="red", ls="--", lw=1, label="Ling's bar (+0.25%)")
    b.axhline(-0.25, color="red", ls="--", lw=1)
    b.set(xlabel="step", ylabel="(FP8 - fp32) / fp32, %", title="relative loss gap")
    b.legend()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "fp8_vs_fp32.png", dpi=110)

    result = {"preset": args.preset, "steps": args.steps, "batch_size": args.batch_size,
              "final_loss_fp32": end32, "final_loss_fp8": end8, "final_relative_gap": end_gap,
              "mean_abs_relative_gap_second_half": mean_abs_gap_second_half,
              "final_loss_fp32_seed1": end32b, "final_relative_gap_fp32_seed1": (end32b - end32) / end32,
              "mean_abs_relative_gap_fp32_seed1_second_half": mean_abs_seed_gap_second_half,
              "max_abs_relative_gap_second_half": max(abs(g) for g in gap[half:]), "ling_bar": 0.0025}
    print(write_result("fp8_vs_fp32", result))
    for k, v in result.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
