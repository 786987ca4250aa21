"""Experiment 4c: activation gradients in 128x128 blocks instead of 1x128 tiles: loss and gradient distortion.

DeepSeek-V3 saw a 16B MoE diverge with 128x128 blocks for activation gradients (SPEC §3); Ling keeps 1x128.

    .venv/bin/python experiments/fp8/grad_blocks.py [--preset tiny] [--steps 300]
"""

import numpy as np
from common import RESULTS, losses, parser, smooth, train_variant, write_result

from linglab.plots import plt, save
from linglab.report import FP8_KINDS, fp8_matrices


def main() -> None:
    args = parser(__doc__.split("\n")[0]).parse_args()
    variants = {"1x128 tiles (Ling)": ("fp8", ["fp8.enabled=true"]),
                "128x128 blocks": ("fp8-gradblocks", ["fp8.enabled=true", "fp8.grad_blocks=true"])}
    grad = FP8_KINDS.index("grad")
    result = {"preset": args.preset, "steps": args.steps, "variants": {}}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5), layout="constrained")
    for label, (name, overrides) in variants.items():
        rows, fp8_rows, _, _ = train_variant(name, overrides, args)
        steps, loss = losses(rows)
        tail = loss[-50:]
        grad_dist = [float(np.nanmean(fp8_matrices(r)[2][:, grad])) for r in fp8_rows]
        grad_under = [float(np.nanmean(fp8_matrices(r)[1][:, grad])) for r in fp8_rows]
        result["variants"][label] = {"final_loss": sum(tail) / len(tail), "monitor_steps": [r["step"] for r in fp8_rows],
                                     "grad_one_minus_cosine": grad_dist, "grad_underflow": grad_under}
        a.plot(steps, smooth(loss), label=label)
        b.plot(result["variants"][label]["monitor_steps"], grad_dist, marker="o", label=label)
    a.set(xlabel="step", ylabel="training loss (trailing mean of 20)", yscale="log", title="loss")
    b.set(xlabel="step", ylabel="1 - cosine, mean over modules", yscale="log", title="activation-gradient distortion")
    a.legend()
    b.legend()
    RESULTS.mkdir(parents=True, exist_ok=True)
    save(fig, RESULTS / "grad_blocks.png")
    print(write_result("grad_blocks", result))
    for label, v in result["variants"].items():
        print(label, "final loss", round(v["final_loss"], 4), "grad 1-cos (last)", v["grad_one_minus_cosine"][-1],
              "grad underflow (last)", v["grad_underflow"][-1])


if __name__ == "__main__":
    main()
