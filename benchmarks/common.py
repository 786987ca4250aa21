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


def matmul_peak_flops(n: int = 4096, repeats: int = 3) -> float:
    """fp32 FLOP/s of a large square matmul, measured now, in this process: the MFU denominator.

    4096 rather than 2048: on this CPU the 2048 GEMM reaches only ~75% of the large-GEMM rate, which
    would inflate every MFU computed against it.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / time_it(lambda: a @ b, repeats=repeats)


def report(script: str, results: dict[str, tuple[float, float]], extra: dict | None = None) -> None:
    """Print `RESULT name=value target=target` lines and write benchmarks/results/<script>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {"results": {k: {"value": v, "target": t} for k, (v, t) in results.items()},
               "torch": torch.__version__, "threads": torch.get_num_threads(), **(extra or {})}
    (RESULTS_DIR / f"{script}.json").write_text(json.dumps(payload, indent=2) + "\n")
    for name, (value, target) in results.items():
        print(f"RESULT {name}={value:.4g} target={target}")
