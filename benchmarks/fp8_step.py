"""Step time of FP8 training (emulated E4M3, Ling's tilewise recipe) over fp32, same model and batch.

On a CPU the FP8 GEMMs are emulated: each operand is quantised to E4M3 and dequantised, then multiplied
in fp32, so FP8 can only cost time here; the figure says how much the quantisation passes add to a
forward+backward step. Three sides are timed alternately in one process: fp32, FP8 with the eager
quantisers (five elementwise passes per operand) and FP8 with the fused ones (one compiled kernel each,
`linglab.fp8._Fused`). Their first steps, which compile, are timed apart and reported as `compile_s`.
The headline is the `small` preset (GEMMs large enough to dominate, as on real hardware); `tiny` is
printed for context. On a GPU (`--device cuda`) the same script compares real FP8 GEMMs (`scaled_mm`
backend where supported) with bf16.

    .venv/bin/python benchmarks/fp8_step.py [--device cpu] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, time_it  # noqa: E402

from linglab.config import load_config  # noqa: E402
from linglab.fp8 import FUSED_ENV, Fp8Recipe, resolve_backend  # noqa: E402
from linglab.fp8_convert import convert_to_fp8  # noqa: E402
from linglab.model import build_model  # noqa: E402

SHAPES = {"tiny": (32, 128), "small": (4, 512)}
# side -> (FP8 conversion, fused quantisers)
SIDES = {"base": (False, False), "fp8_eager": (True, False), "fp8": (True, True)}


def measure(preset: str, device: str, dtype: torch.dtype, rounds: int) -> dict:
    cfg = load_config(preset).model
    batch, seq = SHAPES[preset]
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    backend = resolve_backend("auto", device, Fp8Recipe())
    models = {}
    for name, (fp8, _) in SIDES.items():
        models[name] = build_model(cfg, device=device, seed=0)
        if fp8:
            convert_to_fp8(models[name], Fp8Recipe(), backend, device=device)

    def step(name):
        def run():
            os.environ[FUSED_ENV] = "1" if SIDES[name][1] else "0"
            # On a GPU both run under bf16 autocast; the FP8 model's GEMMs then take FP8 operands.
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                models[name](ids[:, :-1], targets=ids[:, 1:]).loss.backward()
            models[name].zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    first_step = {}
    for name in SIDES:  # the first step compiles (fused side); timed on its own, never in the step times
        start = time.perf_counter()
        step(name)()
        first_step[name] = time.perf_counter() - start
    # Alternate the sides so that drifts in machine speed hit all alike.
    runs = {name: [] for name in SIDES}
    for _ in range(rounds):
        for name in SIDES:
            runs[name].append(time_it(step(name), repeats=3, warmup=1))
    seconds = {name: sorted(v)[len(v) // 2] for name, v in runs.items()}
    ratio, ratio_eager = seconds["fp8"] / seconds["base"], seconds["fp8_eager"] / seconds["base"]
    compile_s = first_step["fp8"] - seconds["fp8"]
    print(f"{preset:6s} [{batch} x {seq}]  base {seconds['base'] * 1e3:8.1f} ms  fp8 eager quantisers "
          f"{seconds['fp8_eager'] * 1e3:8.1f} ms (ratio {ratio_eager:.2f})  fp8 fused {seconds['fp8'] * 1e3:8.1f} ms "
          f"(ratio {ratio:.2f}, compile {compile_s:.1f} s)  (fp8 backend {backend})")
    return {"seconds": seconds, "ratio": ratio, "ratio_eager_quantizers": ratio_eager, "compile_s": compile_s,
            "first_step_s": first_step, "batch": batch, "seq_len": seq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the three sides (median taken)")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    rows = {preset: measure(preset, args.device, dtype, args.rounds) for preset in SHAPES}
    name = "fp8_over_fp32_step_time" if args.device == "cpu" else "fp8_over_bf16_step_time"
    report("fp8_step" if args.device == "cpu" else "fp8_step_cuda",
           {name: (rows["small"]["ratio"], 1.3), f"{name}_tiny": (rows["tiny"]["ratio"], "-"),
            f"{name}_eager_quantizers": (rows["small"]["ratio_eager_quantizers"], "-"),
            f"{name}_eager_quantizers_tiny": (rows["tiny"]["ratio_eager_quantizers"], "-")},
           {"device": args.device, "presets": rows})


if __name__ == "__main__":
    main()
