"""Planned vs uniform pipeline partition (SPEC §7), measured: 2 gloo ranks x 2 virtual stages on this CPU.

The tiny shape with a 16K vocabulary and MTP on, so the head and the MTP loss (two lm_head GEMMs + softmax)
dominate the decoder layers as the 157K-vocabulary head does at Ling's scale. Unit costs are measured in
this process (`measure_unit_costs`, one micro-batch, one thread); `balanced_partition` plans from them and
`uniform_partition` is the baseline. Two spawned ranks of one thread each then run both plans with
`PipelineRunner` (interleaved 1F1B), alternating plan by plan, and the median step times are compared
with the planner's predictions, from the measured costs and from the analytic FLOP model.

    PYTHONPATH=. .venv/bin/python benchmarks/pipeline_plan.py
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from common import report  # noqa: E402
from dist_utils import run_on_ranks  # noqa: E402

from linglab.config import load_config  # noqa: E402
from linglab.model import build_model  # noqa: E402
from linglab.parallel.pipeline import PipelineRunner  # noqa: E402
from linglab.parallel.planner import (  # noqa: E402
    analytic_unit_costs,
    balanced_partition,
    describe_stage,
    format_comparison,
    measure_unit_costs,
    pipeline_units,
    plan_to_dict,
    uniform_partition,
)

OVERRIDES = ["--model.vocab_size=16384"]
RANKS, VIRTUAL = 2, 2
BATCH, SEQ, MICRO_BATCHES = 16, 128, 8
WARMUP, REPEATS = 2, 7


def _time_plans(rank: int, world_size: int, plans: dict[str, list[list[str]]], out: str) -> None:
    """On each rank: a runner per plan, then steps alternating between them (ABBA order); rank 0 writes the
    wall times and every rank's CPU seconds per step (each rank's own work, whoever else shares the cores)."""
    import torch.distributed as dist

    from linglab.parallel.planner import Plan

    cfg = load_config("tiny", overrides=OVERRIDES).model
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ + 1), generator=g)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    runners = {name: PipelineRunner(build_model(cfg, seed=0), Plan(stages, [0.0] * len(stages), world_size, False),
                                    None, MICRO_BATCHES) for name, stages in plans.items()}
    times: dict[str, list[float]] = {name: [] for name in plans}
    cpu: dict[str, list[float]] = {name: [] for name in plans}
    for repeat in range(WARMUP + REPEATS):
        order = list(plans) if repeat % 2 == 0 else list(reversed(plans))
        for name in order:
            dist.barrier()
            start, start_cpu = time.perf_counter(), time.process_time()
            runners[name].step(inputs, targets)
            busy = time.process_time() - start_cpu
            dist.barrier()  # the step ends when the slowest rank is done
            if repeat >= WARMUP:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(busy)
    per_rank: list = [None] * world_size
    dist.all_gather_object(per_rank, cpu)
    if rank == 0:
        Path(out).write_text(json.dumps({"wall": times, "cpu_per_rank": per_rank}))


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # as each pipeline rank runs
    load_before = os.getloadavg()[0]  # other jobs on the cores slow the ranks unevenly: recorded beside the result
    cfg = load_config("tiny", overrides=OVERRIDES).model
    micro = BATCH // MICRO_BATCHES
    measured = pipeline_units(cfg, {k: 1e3 * v for k, v in measure_unit_costs(cfg, micro, SEQ, repeats=5).items()})
    analytic = pipeline_units(cfg, {k: 1e-6 * v for k, v in analytic_unit_costs(cfg, SEQ).items()})
    uniform, planned = uniform_partition(measured, RANKS, VIRTUAL), balanced_partition(measured, RANKS, VIRTUAL)
    print(format_comparison(uniform, planned, MICRO_BATCHES,
                            f"measured ms of forward + backward per micro-batch of {micro} x {SEQ}", "tiny, vocab 16384"))
    predicted = planned.predicted_speedup_over(uniform)
    # What the planner predicts when it prices units by FLOPs instead (its layout may differ: printed below).
    analytic_planned, analytic_uniform = balanced_partition(analytic, RANKS, VIRTUAL), uniform_partition(analytic, RANKS, VIRTUAL)
    predicted_analytic = analytic_planned.predicted_speedup_over(analytic_uniform)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        plans = {"uniform": uniform.stages, "planned": planned.stages}
        run_on_ranks(functools.partial(_time_plans, plans=plans, out=str(out)), Path(tmp), world_size=RANKS)
        measured_runs = json.loads(out.read_text())
    times, cpu = measured_runs["wall"], measured_runs["cpu_per_rank"]
    medians = {name: statistics.median(t) for name, t in times.items()}
    speedup = medians["uniform"] / medians["planned"]
    # The busiest rank's CPU seconds per step: the planner's bottleneck, measured, and blind to time-sharing.
    cpu_medians = {name: [statistics.median(rank_cpu[name]) for rank_cpu in cpu] for name in plans}
    busiest = {name: max(c) for name, c in cpu_medians.items()}
    print(f"step time, median of {REPEATS} ({BATCH} x {SEQ} tokens, {MICRO_BATCHES} micro-batches, interleaved 1F1B): "
          f"uniform {medians['uniform']:.3f} s, planned {medians['planned']:.3f} s")
    print("CPU seconds per step by rank: " + ", ".join(
        f"{name} {' / '.join(f'{c:.3f}' for c in cpu_medians[name])}" for name in plans))
    load_after = os.getloadavg()[0]
    print(f"1-minute load average before / after: {load_before:.2f} / {load_after:.2f} on {os.cpu_count()} cores")
    flop_plan = " | ".join(describe_stage(s) for s in analytic_planned.stages)
    print(f"speedup planned over uniform: measured {speedup:.2f}x wall, {busiest['uniform'] / busiest['planned']:.2f}x "
          f"busiest-rank CPU; predicted from measured unit costs {predicted:.2f}x, from analytic FLOPs "
          f"{predicted_analytic:.2f}x (FLOP plan: {flop_plan})")
    report("pipeline_plan", {"planned_over_uniform_speedup": (speedup, 1.2)},
           {"model_overrides": OVERRIDES, "ranks": RANKS, "virtual": VIRTUAL, "batch": BATCH, "seq_len": SEQ,
            "micro_batches": MICRO_BATCHES, "threads_per_rank": 1, "step_s": times, "median_step_s": medians,
            "cpu_s_per_rank_median": cpu_medians, "busiest_rank_cpu_speedup": busiest["uniform"] / busiest["planned"],
            "predicted_speedup_measured_costs": predicted, "predicted_speedup_analytic_costs": predicted_analytic,
            "uniform": plan_to_dict(uniform), "planned": plan_to_dict(planned),
            "analytic_planned_stages": analytic_planned.stages,
            "load_average_1min": [load_before, load_after], "cpu_count": os.cpu_count()})


if __name__ == "__main__":
    main()
