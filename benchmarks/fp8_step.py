"""Step time of FP8 training (emulated E4M3, Ling's tilewise recipe) over fp32, same model and batch.

On a CPU the FP8 GEMMs are emulated: each operand is quantised to E4M3 and dequantised, then multiplied
in fp32, so FP8 can only cost time here; the figure says how much the quantisation passes add to a
forward+backward step. The headline is the `small` preset (GEMMs large enough to dominate, as on real
hardware); `tiny` is printed for context. On a GPU (`--device cuda`) the same script compares real FP8
GEMMs (`scaled_mm` backend where supported) with bf16.

    .venv/bin/python benchmarks/fp8_step.py [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, time_it  # noqa: E402

from linglab.config import load_config  # noqa: E402
from linglab.fp8 import Fp8Recipe, resolve_backend  # noqa: E402
from linglab.fp8_convert import convert_to_fp8  # noqa: E402
from linglab.model import build_model  # noqa: E402

SHAPES = {"tiny": (32, 128), "small": (4, 512)}


def measure(preset: str, device: str, dtype: torch.dtype) -> dict:
    cfg = load_config(preset).model
    batch, seq = SHAPES[preset]
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    models = {"base": build_model(cfg, device=device, seed=0), "fp8": build_model(cfg, device=device, seed=0)}
    backend = resolve_backend("auto", device, Fp8Recipe())
    convert_to_fp8(models["fp8"], Fp8Recipe(), backend, device=device)

    def step(model):
        def run():
            # On a GPU both run under bf16 autocast; the FP8 model's GEMMs then take FP8 operands.
            with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
                model(ids[:, :-1], targets=ids[:, 1:]).loss.backward()
            model.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    # Alternate the two so that drifts in machine speed hit both alike.
    runs = {name: [] for name in models}
    for _ in range(3):
        for name, model in models.items():
            runs[name].append(time_it(step(model), repeats=3, warmup=1))
    seconds = {name: sorted(v)[len(v) // 2] for name, v in runs.items()}
    ratio = seconds["fp8"] / seconds["base"]
    print(f"{preset:6s} [{batch} x {seq}]  base {seconds['base'] * 1e3:8.1f} ms  fp8 {seconds['fp8'] * 1e3:8.1f} ms  "
          f"ratio {ratio:.2f}  (fp8 backend {backend})")
    return {"seconds": seconds, "ratio": ratio, "batch": batch, "seq_len": seq}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    rows = {preset: measure(preset, args.device, dtype) for preset in SHAPES}
    name = "fp8_over_fp32_step_time" if args.device == "cpu" else "fp8_over_bf16_step_time"
    report("fp8_step" if args.device == "cpu" else "fp8_step_cuda",
           {name: (rows["small"]["ratio"], 1.5), f"{name}_tiny": (rows["tiny"]["ratio"], "-")},
           {"device": args.device, "presets": rows})


if __name__ == "__main__":
    main()
