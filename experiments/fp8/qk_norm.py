"""Experiment 4b: QK-norm on vs off under FP8: QKV outliers by depth and the monitor's error per module.

SPEC §3: without QK-norm, the fused QKV projection's activations and output gradient develop outliers
that grow with depth and inflate FP8 quantisation error; QK-norm suppresses them. Outliers are max|x|/RMS
on one fixed batch after training; underflow and distortion are the safeguard monitor's last sample.

    .venv/bin/python experiments/fp8/qk_norm.py [--preset tiny] [--steps 300]
"""

import numpy as np
from common import RESULTS, losses, monitor_means, parser, qkv_outliers, train_variant, write_result

from linglab.plots import plt, save
from linglab.report import FP8_KINDS, fp8_matrices


def main() -> None:
    args = parser(__doc__.split("\n")[0]).parse_args()
    variants = {"qk-norm on": ("fp8", ["fp8.enabled=true"]),
                "qk-norm off": ("fp8-noqknorm", ["fp8.enabled=true", "model.use_qk_norm=false"])}
    result = {"preset": args.preset, "steps": args.steps, "variants": {}}
    for label, (name, overrides) in variants.items():
        rows, fp8_rows, model, data = train_variant(name, overrides, args)
        ops, under, dist = fp8_matrices(fp8_rows[-1])
        tail = rows[-50:]
        result["variants"][label] = {
            "final_loss": sum(r["loss"] for r in tail) / len(tail),
            "qkv_outliers": qkv_outliers(model, data),
            "monitor_step": fp8_rows[-1]["step"],
            "monitor": {op: {kind: {"underflow": under[i, j], "one_minus_cosine": dist[i, j]}
                             for j, kind in enumerate(FP8_KINDS)} for i, op in enumerate(ops)},
            "mean_one_minus_cosine": monitor_means(fp8_rows[-1])["one_minus_cosine"],
            "mean_underflow": monitor_means(fp8_rows[-1])["underflow"],
            "loss_curve": losses(rows)[1][:: max(1, args.steps // 100)],
        }

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.5), layout="constrained")
    for label, v in result["variants"].items():
        for ax, key in zip(axes[:3], ("input", "output", "output_grad")):
            ax.plot(range(len(v["qkv_outliers"][key])), v["qkv_outliers"][key], marker="o", label=label)
            ax.set(title=f"QKV {key}: max|x| / RMS", xlabel="layer", yscale="log")
        kinds = list(v["mean_one_minus_cosine"])
        offset = -0.2 if label.endswith("on") else 0.2
        axes[3].bar(np.arange(len(kinds)) + offset, [v["mean_one_minus_cosine"][k] for k in kinds], width=0.4, label=label)
        axes[3].set_xticks(range(len(kinds)), kinds)
    axes[3].set(title="FP8 distortion, mean over modules", ylabel="1 - cosine", yscale="log")
    for ax in axes:
        ax.legend(fontsize=8)
    RESULTS.mkdir(parents=True, exist_ok=True)
    save(fig, RESULTS / "qk_norm.png")
    print(write_result("qk_norm", result))
    for label, v in result["variants"].items():
        print(label, "final loss", round(v["final_loss"], 4), "outliers", {k: [round(x, 1) for x in xs]
                                                                          for k, xs in v["qkv_outliers"].items()})
        print("   mean 1-cos", v["mean_one_minus_cosine"], "mean underflow", v["mean_underflow"])


if __name__ == "__main__":
    main()
