"""Shared by the benchmark scripts: timing, the in-process fp32 matmul peak, and the RESULT/JSON output.

Machines are noisy, so every benchmark measures its ratios side by side in one process and reports
the median of repeated timings; absolute times are printed for context only.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from linglab.flops import matmul_peak_flops  # noqa: F401  (re-exported for the scripts)

RESULTS_DIR = Path(__file__).parent / "results"


def time_it(fn, repeats: int = 5, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(script: str, results: dict[str, tuple[float, float]], extra: dict | None = None) -> None:
    """Print `RESULT name=value target=target` lines and write benchmarks/results/<script>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"results": {k: {"value": v, "target": t} for k, (v, t) in results.items()},
               "torch": torch.__version__, "threads": torch.get_num_threads(), **(extra or {})}
    (RESULTS_DIR / f"{script}.json").write_text(json.dumps(payload, indent=2) + "\n")
    for name, (value, target) in results.items():
        print(f"RESULT {name}={value:.4g} target={target}")
