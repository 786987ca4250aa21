"""Pipeline parallel (SPEC §7) on 2 (and 3) gloo CPU processes against single-process gradient accumulation.

Each rank runs the pipeline on its stages and also the reference itself: the same model (same seed), the
same micro-batches, `(loss / n_microbatches).backward()` for each, as `Trainer.train_step` accumulates.
The runner's `gather` assembles every parameter's gradient on every rank, so each rank checks all of them.
Tolerances are fp32-tight (rtol 1e-5, atol 1e-6): the stages run the single-process model's own steps on
the same micro-batches, so only the shared weights' gradients, summed over copies in another order, differ
(by ~1e-8); everything else matches to the bit.
"""

import functools

import pytest
import torch
from conftest import tiny_config
from dist_utils import requires_gloo, run_on_ranks

from linglab.model import build_model
from linglab.parallel.pipeline import SHARED_WEIGHTS, PipelineRunner, StageModule, carried_names
from linglab.parallel.planner import Plan, analytic_unit_costs, balanced_partition, pipeline_units, uniform_partition, unit_layout

pytestmark = requires_gloo

RTOL, ATOL = 1e-5, 1e-6
MICRO_BATCHES = 4
EMB, HEAD, MTP = ["embedding"], ["head"], ["mtp_transformer", "mtp_loss"]
LAYERS = [f"layers.{i}" for i in range(4)]  # the tiny preset's 4 layers
HYBRID = dict(layer_group_size=2, group_norm_size=2)  # tiny-linear (SPEC §8): layers 0, 2 linear, 1, 3 softmax


def _plan(stages: list[list[str]], num_ranks: int) -> Plan:
    return Plan(stages=stages, stage_costs=[0.0] * len(stages), num_ranks=num_ranks, optimal=False)


def _planned(virtual: int) -> list[list[str]]:
    """The planner's layout for the tiny shape with a 16K vocabulary, where the head and MTP loss dominate."""
    cfg = tiny_config(vocab_size=16384).model
    return balanced_partition(pipeline_units(cfg, analytic_unit_costs(cfg, seq_len=8)), 2, virtual).stages


# name -> the stages of S ranks x V virtual stages (virtual stage j on rank j % S), from the tiny shape's units
LAYOUTS = {
    "1f1b uniform": lambda units: uniform_partition(units, 2, 1).stages,
    # [emb .. head] [MTP]: both MTP units on the other rank from embedding and head
    "1f1b planned": lambda units: _planned(1),
    "1f1b empty first stage": lambda units: [[], EMB + LAYERS + HEAD + MTP],
    "interleaved uniform": lambda units: uniform_partition(units, 2, 2).stages,
    # [emb, l0] [l1-3] [head, mtp_transformer] [mtp_loss]: an embedding copy on the owner's rank, lm_head across
    "interleaved planned": lambda units: _planned(2),
    "interleaved empty stage, MTP apart": lambda units: [EMB + LAYERS[:2], [], LAYERS[2:] + HEAD, MTP],
    "interleaved loss through an empty last stage": lambda units: [EMB + LAYERS[:2], LAYERS[2:], HEAD + MTP, []],
    # 3 ranks: the embedding's copy is summed over ranks {0, 2} only, a subgroup of the pipeline
    "3 ranks, MTP on the last, empty middle": lambda units: [EMB + LAYERS + HEAD, [], MTP],
}


def _batch(cfg, batch_size=8, seq_len=8, masked=False):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (batch_size, seq_len + 1), generator=g)
    mask = (torch.rand(batch_size, seq_len, generator=g) > 0.3).float() if masked else None
    return tokens[:, :-1], tokens[:, 1:], mask


def _terms(out):
    """(loss, main, mtp, z) of a ModelOutput as the stages record them: zero where a term does not exist."""
    return torch.stack([torch.zeros(()) if t is None else t.detach() for t in
                        (out.loss, out.main_loss, out.mtp_loss, out.z_loss)])


def _reference(cfg, inputs, targets, mask):
    """Single process: per micro-batch (loss / M).backward(); returns (mean loss, mean loss terms, model)."""
    model = build_model(cfg.model, seed=0).train()
    terms = torch.zeros(4)
    chunks = zip(inputs.chunk(MICRO_BATCHES), targets.chunk(MICRO_BATCHES),
                 mask.chunk(MICRO_BATCHES) if mask is not None else [None] * MICRO_BATCHES)
    for i, t, m in chunks:
        out = model(i, targets=t, loss_mask=m)
        (out.loss / MICRO_BATCHES).backward()
        terms = terms + _terms(out)
    return terms[0] / MICRO_BATCHES, terms / MICRO_BATCHES, model


def _assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def _check_layout(rank, world_size, layout, masked=False, z_loss=0.0, steps=1, mtp=True, hybrid=False):
    cfg = tiny_config(initializer_range=0.02, router_z_loss_coef=z_loss, num_nextn_predict_layers=int(mtp),
                      **(HYBRID if hybrid else {}))
    model = build_model(cfg.model, seed=0)
    stages = LAYOUTS[layout](pipeline_units(cfg.model, analytic_unit_costs(cfg.model, seq_len=8)))
    runner = PipelineRunner(model, _plan(stages, world_size), None, MICRO_BATCHES)
    inputs, targets, mask = _batch(cfg, masked=masked)
    ref_loss, ref_terms, ref = _reference(cfg, inputs, targets, mask)
    for _ in range(steps):  # a later step reuses the schedule and must start from zero gradients
        loss = runner.step(inputs, targets, mask)

    assert (loss is not None) == (rank == (len(stages) - 1) % world_size)
    if loss is not None:
        _assert_close(loss, ref_loss, f"{layout}: loss")
    terms = runner.loss_terms()  # on every rank: loss, main, MTP and router z-loss terms
    _assert_close(terms, ref_terms, f"{layout}: loss terms")
    assert (terms[3] > 0) == (z_loss > 0), f"{layout}: z-loss term {terms[3]}"
    grads, ref_grads = runner.gather(grads=True), {n: p.grad for n, p in ref.named_parameters()}
    assert grads.keys() == ref_grads.keys(), f"{layout}: gathered {sorted(grads.keys() ^ ref_grads.keys())} differ"
    for name, grad in grads.items():
        _assert_close(grad, ref_grads[name], f"{layout}: grad {name}")
    # Every copy of a shared weight holds the summed gradient, so copies stay equal under the same update.
    for name, p in runner.named_parameters():
        _assert_close(p.grad, ref_grads[name], f"{layout}: local grad {name}")
    # Static stage metadata: no shape-inference forward, so each MoE layer counted each token once per step.
    ref_modules = dict(ref.named_modules())
    for module in runner.modules:
        for name, m in module.named_modules():
            if hasattr(m, "tokens_per_expert"):
                assert torch.equal(m.tokens_per_expert, steps * ref_modules[name].tokens_per_expert), f"{layout}: {name}"


@pytest.mark.parametrize("masked", [False, True])
def test_one_stage_holding_every_unit_is_the_model_to_the_bit(masked):
    """A stage is the model pruned to its units, running the model's steps: with all units, the very same
    loss, loss terms (router z-loss included), gradients and expert loads as `model(...)`, bit for bit."""
    cfg = tiny_config(initializer_range=0.02, router_z_loss_coef=0.01)
    inputs, targets, mask = _batch(cfg, masked=masked)
    model = build_model(cfg.model, seed=0).train()
    out = model(inputs, targets=targets, loss_mask=mask)
    out.loss.backward()

    held = build_model(cfg.model, seed=0)
    units = [name for name, _ in unit_layout(cfg.model)]
    stage = StageModule(held, units, {"model.word_embeddings": held.model.word_embeddings, "lm_head": held.lm_head})
    stage.in_names, stage.out_names = carried_names([], units, masked, has_z=True), ("loss",)
    (loss,) = stage.train()(inputs, targets, *([mask] if masked else []))
    loss.backward()

    assert out.z_loss > 0 and torch.equal(loss, out.loss)
    assert torch.equal(stage.loss_terms[-1], _terms(out))
    params, ref_params = dict(stage.named_parameters()), dict(model.named_parameters())
    assert params.keys() == ref_params.keys()
    for name, p in params.items():
        assert torch.equal(p.grad, ref_params[name].grad), name
    for m, ref_m in zip(stage.moe_layers(), model.moe_layers(), strict=True):
        assert torch.equal(m.tokens_per_expert, ref_m.tokens_per_expert)


def test_a_stage_holds_only_its_units_under_the_model_names():
    model = build_model(tiny_config().model, seed=0)
    stage = StageModule(model, LAYERS[1:3] + HEAD, {"lm_head": model.lm_head})
    held = ("model.layers.1.", "model.layers.2.", "model.norm.", "lm_head.")
    expected = {name: p for name, p in model.named_parameters() if name.startswith(held)}
    params = dict(stage.named_parameters())
    assert params.keys() == expected.keys() and all(params[name] is p for name, p in expected.items())
    assert stage.model.word_embeddings is None and stage.model.layers[0] is None and stage.model.mtp_layers[0] is None
    assert [id(m) for m in stage.moe_layers()] == [id(layer.mlp) for layer in model.model.layers[1:3]]


def test_hybrid_stages_chained_in_one_process_are_the_model_to_the_bit():
    """SPEC §8 by global layer index: in stages [emb, L0] [L1, L2] [L3, head, MTP] of tiny-linear, L1 stays softmax and
    L2 linear with layer 2's decays. A stage that recomputed kinds or decays from its own layer count (L1 as its
    first layer: linear) would change the loss."""
    cfg = tiny_config(initializer_range=0.02, **HYBRID)
    inputs, targets, _ = _batch(cfg)
    model = build_model(cfg.model, seed=0).eval()
    stages = [EMB + LAYERS[:1], LAYERS[1:3], LAYERS[3:] + HEAD + MTP]
    units = [u for stage in stages for u in stage]
    carried, done = (inputs, targets), []
    with torch.no_grad():
        expected = model(inputs, targets=targets).loss
        for held in stages:
            shared = {path: model.get_submodule(path) for path, users in SHARED_WEIGHTS.items() if set(users) & set(held)}
            stage = StageModule(model, held, shared)
            stage.in_names = carried_names(done, units, has_mask=False, has_z=False)
            done += held
            stage.out_names = carried_names(done, units, has_mask=False, has_z=False)
            carried = stage(*carried)
    assert [type(layer.attention).__name__ for layer in model.model.layers] == ["LinearAttention", "Attention"] * 2
    assert torch.equal(carried[0], expected)


def _check_layouts(rank, world_size, layouts, **kwargs):
    for layout in layouts:
        _check_layout(rank, world_size, layout, **kwargs)


def test_carried_names_follow_the_units():
    units = EMB + LAYERS + HEAD + MTP
    assert carried_names([], units, has_mask=True, has_z=True) == ("input_ids", "targets", "loss_mask")
    assert carried_names(EMB + LAYERS[:1], units, True, True) == ("hidden", "targets", "loss_mask", "z_loss")
    assert carried_names(EMB + LAYERS + HEAD, units, False, False) == ("final_hidden", "targets", "main_loss")
    assert carried_names(units[:-1], units, False, True) == ("mtp_hidden", "targets", "main_loss", "z_loss")
    assert carried_names(units, units, True, True) == ("loss",)


def _schedule_cases(rank, world_size, prefix):
    """Every layout of one schedule, then its uniform layout without MTP, where `head` ends the pipeline, and on
    tiny-linear, whose stages hold linear and softmax layers by their global index (SPEC §8)."""
    _check_layouts(rank, world_size, [name for name in LAYOUTS if name.startswith(prefix)])
    _check_layout(rank, world_size, f"{prefix} uniform", mtp=False)
    _check_layout(rank, world_size, f"{prefix} uniform", hybrid=True)


def test_1f1b_loss_and_gradients_equal_single_process_accumulation(tmp_path):
    run_on_ranks(functools.partial(_schedule_cases, prefix="1f1b"), tmp_path)


def test_interleaved_1f1b_loss_and_gradients_equal_single_process_accumulation(tmp_path):
    run_on_ranks(functools.partial(_schedule_cases, prefix="interleaved"), tmp_path)


def test_loss_mask_router_z_loss_and_repeated_steps(tmp_path):
    layouts = ["1f1b planned", "interleaved empty stage, MTP apart"]
    run_on_ranks(functools.partial(_check_layouts, layouts=layouts, masked=True, z_loss=0.01, steps=2), tmp_path)


def test_shared_weight_gradients_summed_over_a_subgroup_of_three_ranks(tmp_path):
    run_on_ranks(functools.partial(_check_layouts, layouts=["3 ranks, MTP on the last, empty middle"]), tmp_path,
                 world_size=3)


def _bad_plans(rank, world_size):
    cfg = tiny_config()
    model = build_model(cfg.model, seed=0)
    for stages, match in [([EMB + LAYERS, HEAD + MTP, []], "2 ranks"),
                          ([LAYERS + EMB, HEAD + MTP], "in order"),
                          ([EMB + LAYERS, HEAD], "in order")]:
        with pytest.raises(ValueError, match=match):
            PipelineRunner(model, Plan(stages, [0.0] * len(stages), len(stages), False), None, MICRO_BATCHES)
    runner = PipelineRunner(model, _plan([EMB + LAYERS, HEAD + MTP], world_size), None, MICRO_BATCHES)
    inputs, targets, _ = _batch(cfg, batch_size=6)
    with pytest.raises(ValueError, match="does not split"):
        runner.step(inputs, targets)


def test_plans_that_do_not_fit_are_refused(tmp_path):
    run_on_ranks(_bad_plans, tmp_path)
