"""Heterogeneous pipeline planner (SPEC §7): unit costs against linglab.flops, the partitioner against brute force."""

import itertools
import json
import random

import pytest
import torch

from linglab.cli import main
from linglab.config import ModelConfig, load_config
from linglab.errors import LinglabError
from linglab.flops import attention_flops, flops_per_token, layer_matmul_params
from linglab.parallel.planner import (
    UNIT_KINDS,
    Unit,
    analytic_unit_costs,
    balanced_partition,
    compare_plans,
    describe_stage,
    measure_unit_costs,
    pipeline_units,
    plan_to_dict,
    uniform_partition,
    unit_layout,
)

SEQ = 4096


def _mini() -> ModelConfig:
    return load_config("ling-mini-2.0").model


def _units(costs: list[float]) -> list[Unit]:
    return [Unit(f"u{i}", "moe", c) for i, c in enumerate(costs)]


def brute_force_bottleneck(costs: list[float], stages: int, virtual: int) -> float:
    """Every way to cut the units into S*V contiguous, possibly empty runs; run j on rank j % S."""
    n, k = len(costs), stages * virtual
    best = float("inf")
    for inner in itertools.combinations_with_replacement(range(n + 1), k - 1):
        bounds = (0, *inner, n)
        loads = [0.0] * stages
        for j in range(k):
            loads[j % stages] += sum(costs[bounds[j]:bounds[j + 1]])
        best = min(best, max(loads))
    return best


def test_units_of_ling_mini_in_dataflow_order():
    units = pipeline_units(_mini(), analytic_unit_costs(_mini(), SEQ))
    names = [u.name for u in units]
    assert names == ["embedding", *(f"layers.{i}" for i in range(20)), "head", "mtp_transformer", "mtp_loss"]
    kinds = [u.kind for u in units]
    assert kinds.count("dense") == 1 and kinds[1] == "dense" and kinds.count("moe") == 19


def test_units_follow_the_config():
    cfg = load_config("tiny", overrides=["--model.num_nextn_predict_layers=0", "--model.first_k_dense_replace=0"]).model
    units = pipeline_units(cfg, analytic_unit_costs(cfg, 128))
    assert [u.kind for u in units] == ["embedding", *["moe"] * cfg.num_hidden_layers, "head"]


def test_analytic_costs_match_linglab_flops():
    cfg = _mini()
    costs = analytic_unit_costs(cfg, SEQ)
    assert set(costs) == set(UNIT_KINDS)
    for kind, moe in (("dense", False), ("moe", True)):
        assert costs[kind] == 3 * (2 * layer_matmul_params(cfg, moe) + attention_flops(cfg, SEQ))
    h, v = cfg.hidden_size, cfg.vocab_size
    eh_proj = 3 * 2 * (2 * h * h)
    pure = analytic_unit_costs(cfg, SEQ, flop_per_byte=0)
    assert pure["mtp_transformer"] == pytest.approx(pure["moe"] + eh_proj)  # a MoE layer + eh_proj
    assert pure["head"] == pure["mtp_loss"] == 3 * 2 * h * v
    assert costs["head"] > pure["head"] and costs["embedding"] < 0.05 * costs["moe"]
    # Without the memory-bound terms the units add up to exactly what linglab.flops counts for the whole model.
    units = pipeline_units(cfg, pure)
    assert sum(u.cost for u in units) == pytest.approx(flops_per_token(cfg, SEQ), rel=1e-12)
    recompute = analytic_unit_costs(cfg, SEQ, recompute_mtp=True)
    assert recompute["mtp_transformer"] == pytest.approx(costs["mtp_transformer"] * 4 / 3)  # one extra forward
    assert costs["head"] > 6 * costs["moe"]  # a 157K vocabulary against hidden 2048: the head is the heavy unit


def test_a_hybrids_units_name_their_attention_and_add_up_to_linglab_flops():
    cfg = load_config("ring-mini-linear-2.0").model  # softmax at 4, 9, 14, 19; layer 0 dense
    units = pipeline_units(cfg, analytic_unit_costs(cfg, SEQ, flop_per_byte=0))
    kinds = [u.kind for u in units[1:21]]
    assert kinds[0] == "linear_dense" and [i for i, k in enumerate(kinds) if k == "moe"] == [4, 9, 14, 19]
    assert kinds.count("linear_moe") == 15
    assert sum(u.cost for u in units) == pytest.approx(flops_per_token(cfg, SEQ), rel=1e-12)


def test_linear_layers_are_priced_without_a_sequence_term():
    cfg = load_config("ring-mini-linear-2.0").model
    short, long = analytic_unit_costs(cfg, 128), analytic_unit_costs(cfg, 32768)
    assert short["linear_moe"] == long["linear_moe"] and short["linear_dense"] == long["linear_dense"]
    assert long["moe"] > short["moe"]
    # Full-head K/V rows and g_proj cost more than softmax attention over short sequences (below ~5.4K tokens for
    # Ring-mini); the softmax scores outgrow them at long ones.
    assert short["linear_moe"] > short["moe"] and long["linear_moe"] < 0.5 * long["moe"]


def test_a_hybrid_plan_gives_the_cheaper_linear_layers_longer_stages():
    # At 32K tokens a softmax layer costs ~2x a linear one: the all-softmax Ling-mini splits its 20 layers 8/8/4 with
    # the head on the third rank, the hybrid of the same shape 9/9/2, and its bottleneck is lower.
    seq, stages = 32768, 4
    softmax = balanced_partition(pipeline_units(_mini(), analytic_unit_costs(_mini(), seq)), stages)
    hybrid_cfg = load_config("ring-mini-linear-2.0").model
    hybrid = balanced_partition(pipeline_units(hybrid_cfg, analytic_unit_costs(hybrid_cfg, seq)), stages)
    layers = [[sum(name.startswith("layers.") for name in stage) for stage in plan.stages] for plan in (softmax, hybrid)]
    assert layers == [[8, 8, 4, 0], [9, 9, 2, 0]]
    assert hybrid.bottleneck < 0.7 * softmax.bottleneck


@pytest.mark.parametrize("virtual", [1, 2, 3])
def test_partition_matches_brute_force(virtual):
    rng = random.Random(virtual)
    for _ in range(40):
        stages = rng.randint(1, 3 if virtual < 3 else 2)
        costs = [rng.choice([0.0, 1.0, rng.random(), 10 * rng.random()]) for _ in range(rng.randint(1, 8))]
        plan = balanced_partition(_units(costs), stages, virtual)
        assert plan.optimal
        assert plan.bottleneck == pytest.approx(brute_force_bottleneck(costs, stages, virtual), rel=1e-9, abs=1e-12)
        assert len(plan.stages) == stages * virtual
        assert [name for stage in plan.stages for name in stage] == [f"u{i}" for i in range(len(costs))]


def test_interleaving_beats_one_stage_per_rank():
    # A heavy unit between two light ones: only with V = 2 can the two ends share a rank, the middle one alone on the other.
    costs = [1.0, 2.0, 1.0]
    one, two = balanced_partition(_units(costs), 2, 1), balanced_partition(_units(costs), 2, 2)
    assert one.bottleneck == 3.0 and two.bottleneck == 2.0
    assert two.stages == [["u0"], ["u1"], ["u2"], []] and two.rank_costs == [2.0, 2.0]


def test_a_huge_unit_leaves_stages_empty():
    units = [Unit("embedding", "embedding", 0.0), *(Unit(f"layers.{i}", "moe", 1.0) for i in range(3)),
             Unit("head", "head", 10.0)]
    plan = balanced_partition(units, 2, 2)
    assert plan.bottleneck == 10.0  # the head alone on its rank
    assert any(not stage for stage in plan.stages)
    assert uniform_partition(units, 2, 2).bottleneck == 11.0


def test_planned_is_never_worse_than_uniform():
    rng = random.Random(0)
    for _ in range(30):
        layers = rng.randint(1, 12)
        units = [Unit("embedding", "embedding", rng.random()),
                 *(Unit(f"layers.{i}", "moe", 1 + rng.random()) for i in range(layers)),
                 Unit("head", "head", 5 * rng.random()), Unit("mtp_transformer", "mtp_transformer", 1.5),
                 Unit("mtp_loss", "mtp_loss", 5 * rng.random())]
        stages, virtual = rng.randint(1, 4), rng.randint(1, 2)
        uniform, planned = uniform_partition(units, stages, virtual), balanced_partition(units, stages, virtual)
        assert planned.bottleneck <= uniform.bottleneck * (1 + 1e-9)


def test_uniform_partition_splits_layers_by_count():
    units = pipeline_units(_mini(), analytic_unit_costs(_mini(), SEQ))
    plan = uniform_partition(units, 4, 2)
    assert [sum(n.startswith("layers.") for n in stage) for stage in plan.stages] == [3, 3, 3, 3, 2, 2, 2, 2]
    assert plan.stages[0][0] == "embedding" and plan.stages[-1][-3:] == ["head", "mtp_transformer", "mtp_loss"]


@pytest.mark.parametrize("stages", [4, 8])
@pytest.mark.parametrize("virtual", [1, 2])
def test_ling_mini_plan_beats_uniform(stages, virtual):
    units = pipeline_units(_mini(), analytic_unit_costs(_mini(), SEQ))
    uniform, planned = uniform_partition(units, stages, virtual), balanced_partition(units, stages, virtual)
    assert planned.optimal
    assert planned.predicted_speedup_over(uniform) > 2.0
    assert planned.bottleneck < uniform.bottleneck


def test_step_time_and_speedup():
    plan = balanced_partition(_units([1.0, 2.0, 3.0, 4.0]), 2, 2)
    assert plan.step_time(8) == pytest.approx((8 + 1 / 2) * plan.bottleneck)
    other = uniform_partition(_units([1.0, 2.0, 3.0, 4.0]), 1, 1)
    assert plan.predicted_speedup_over(other) == pytest.approx(10.0 / plan.bottleneck)


def test_plan_command_and_json(capsys):
    assert main(["plan", "--preset", "ling-mini-2.0", "--stages", "4", "--virtual", "2", "--micro-batches", "8",
                 "--data.seq_len=4096"]) == 0
    text = capsys.readouterr().out
    assert "uniform" in text and "planned" in text and "predicted speedup" in text and "proven optimal" in text
    assert "-19" in text and "mtp_loss" in text and "GFLOP" in text
    units = pipeline_units(_mini(), analytic_unit_costs(_mini(), SEQ))
    d = json.loads(json.dumps(plan_to_dict(balanced_partition(units, 4, 2))))
    assert d["virtual"] == 2 and len(d["stages"]) == 8 and d["bottleneck"] == max(d["rank_costs"])


def test_describe_stage_folds_layer_runs():
    assert describe_stage(["embedding", "layers.0", "layers.1", "layers.2"]) == "embedding, layers.0-2"
    assert describe_stage(["layers.7", "head"]) == "layers.7, head"
    assert describe_stage([]) == "-"


def test_bad_shapes_are_user_errors():
    with pytest.raises(LinglabError, match="stages"):
        balanced_partition(_units([1.0]), 0, 1)
    with pytest.raises(LinglabError, match="micro-batches"):
        compare_plans(load_config("tiny"), 2, 1, 0, False)


@pytest.mark.parametrize("preset", ["tiny", "tiny-linear"])
def test_measured_costs_on_a_tiny_config(preset):
    cfg = load_config(preset).model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a CPU shared with other jobs, OpenMP threads stall each other on these tiny ops
    try:
        costs = measure_unit_costs(cfg, batch=1, seq_len=8, repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert set(costs) == {kind for _, kind in unit_layout(cfg)} and all(t > 0 for t in costs.values())
    plan = balanced_partition(pipeline_units(cfg, costs), 2, 2)
    assert plan.optimal and len(plan.stages) == 4
