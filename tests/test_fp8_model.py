"""FP8 applied to the model from outside (SPEC §3): the fused SwiGLU-down path, which modules convert (by type),
the monitor, training, and which modules know of which."""

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from test_train import FAST

from linglab.cli import main
from linglab.fp8 import Fp8Monitor, Fp8Op, Fp8Recipe, fp8_grouped_mm, fp8_linear, fp8_swiglu_down
from linglab.fp8_convert import Fp8GroupedExperts, Fp8Linear, Fp8SwiGLU, convert_to_fp8, fp8_weight_names
from linglab.model import build_model
from linglab.moe import GroupedExperts, SwiGLU

RECIPES = [Fp8Recipe(), Fp8Recipe("tensorwise"), Fp8Recipe(grad_blocks=True)]


def _leaf(shape, scale=1.0):
    return (torch.randn(shape) * scale).requires_grad_()


@pytest.mark.parametrize("recipe", RECIPES)
def test_fused_swiglu_down_equals_swiglu_then_fp8_linear(recipe):
    op = Fp8Op(recipe, "emulate")
    gate_up, w = _leaf((2, 5, 2 * 72)), _leaf((48, 72), 0.1)
    fused = fp8_swiglu_down(gate_up, w, op)
    gate, up = gate_up.chunk(2, dim=-1)
    unfused = fp8_linear(F.silu(gate) * up, w, op=op)
    assert torch.equal(fused, unfused)
    dy = torch.randn_like(fused)
    grads_fused = torch.autograd.grad(fused, (gate_up, w), dy)
    grads_unfused = torch.autograd.grad(unfused, (gate_up, w), dy)
    for a, b in zip(grads_fused, grads_unfused):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("recipe", RECIPES)
def test_fused_grouped_swiglu_down_with_routing_weights(recipe):
    op = Fp8Op(recipe, "emulate")
    counts = torch.tensor([70, 0, 140, 30])
    offs = counts.cumsum(0).to(torch.int32)
    gate_up, w, rw = _leaf((240, 2 * 32)), _leaf((4, 32, 24), 0.1), _leaf((240,))
    fused = fp8_swiglu_down(gate_up, w, op, row_weights=rw, offs=offs)
    gate, up = gate_up.chunk(2, dim=-1)
    unfused = fp8_grouped_mm(F.silu(gate) * up * rw.unsqueeze(-1), w, offs, op=op)
    assert torch.equal(fused, unfused)
    dy = torch.randn_like(fused)
    for a, b in zip(torch.autograd.grad(fused, (gate_up, w, rw), dy), torch.autograd.grad(unfused, (gate_up, w, rw), dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_convert_touches_exactly_the_fp8_gemms_of_spec3():
    cfg = tiny_config().model
    model = build_model(cfg, seed=0)
    keys, weights = set(model.state_dict()), fp8_weight_names(model)
    names = convert_to_fp8(model, Fp8Recipe(), "emulate")
    assert set(model.state_dict()) == keys  # checkpoints are unchanged
    assert fp8_weight_names(model) == weights  # the same decision before and after conversion
    layers = [f"model.layers.{i}" for i in range(cfg.num_hidden_layers)] + ["model.mtp_layers.0"]
    expected = {f"{layer}.attention.{p}" for layer in layers for p in ("query_key_value", "dense")}
    expected |= {f"{layers[0]}.mlp.{p}" for p in ("gate_up_proj", "down_proj")}
    expected |= {f"{layer}.mlp.{m}.{p}" for layer in layers[1:] for m in ("experts", "shared_experts")
                 for p in ("gate_up_proj", "down_proj")}
    assert set(names) == expected
    expected_weights = {f"{layer}.attention.{p}.weight" for layer in layers for p in ("query_key_value", "dense")}
    expected_weights |= {f"{layers[0]}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    expected_weights |= {f"{layer}.mlp.shared_experts.{p}.weight" for layer in layers[1:]
                         for p in ("gate_proj", "up_proj", "down_proj")}
    expected_weights |= {f"{layer}.mlp.experts.{p}" for layer in layers[1:] for p in ("gate_up_proj", "down_proj")}
    assert set(weights) == expected_weights
    # High precision (SPEC §3): embedding, lm_head, router, norms, MTP eh_proj.
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.mtp_layers[0].eh_proj) is torch.nn.Linear
    assert type(model.model.word_embeddings) is torch.nn.Embedding
    for module in model.modules():
        if isinstance(module, SwiGLU):
            assert type(module) is Fp8SwiGLU and module.gate_up_op.backend == "emulate"
        elif isinstance(module, GroupedExperts):
            assert type(module) is Fp8GroupedExperts
    assert {n for n, m in model.named_modules() if type(m) is Fp8Linear} == {
        f"{layer}.attention.{p}" for layer in layers for p in ("query_key_value", "dense")}


def test_convert_refuses_a_layer_another_wrapper_already_specialised():
    class Sharded(GroupedExperts):  # stands in for expert parallel's subclass, whose all-to-all would be lost
        pass

    model = build_model(tiny_config(num_hidden_layers=2).model, seed=0)
    model.model.layers[1].mlp.experts.__class__ = Sharded
    with pytest.raises(ValueError, match="Sharded is not a plain GroupedExperts; convert the model to FP8 before"):
        convert_to_fp8(model, Fp8Recipe(), "emulate")


def _linglab_imports(module: str) -> set[str]:
    """The linglab modules `module`'s source imports, anywhere in it (lazy imports included)."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return {m for m in found if m.split(".")[0] == "linglab"}


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        for m in _linglab_imports(todo.pop()) - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_fp8_numerics_import_nothing_of_ours_and_the_model_nothing_of_fp8():
    assert _linglab_imports("linglab.fp8") == set()
    for module in ("linglab.model", "linglab.moe"):
        assert not _closure(module) & {"linglab.fp8", "linglab.fp8_convert"}, module
    assert {"linglab.fp8", "linglab.model", "linglab.moe"} <= _closure("linglab.fp8_convert")


def test_fp8_model_tracks_fp32_and_the_monitor_sees_every_op():
    cfg = tiny_config(hidden_size=128, num_hidden_layers=2).model
    ref, fp8 = build_model(cfg, seed=0), build_model(cfg, seed=0)
    monitor = Fp8Monitor()
    names = convert_to_fp8(fp8, Fp8Recipe(), "emulate", monitor)
    ids = torch.randint(2, cfg.vocab_size, (2, 33))
    loss_ref = ref(ids[:, :-1], targets=ids[:, 1:]).loss
    with monitor.sampling():
        loss_fp8 = fp8(ids[:, :-1], targets=ids[:, 1:]).loss
        loss_fp8.backward()
    assert abs(loss_fp8.item() - loss_ref.item()) / loss_ref.item() < 1e-3
    loss_ref.backward()
    for (name, p), q in zip(ref.named_parameters(), fp8.parameters()):
        cos = F.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.95, name
    assert set(monitor.stats) == set(names)
    for ops in monitor.stats.values():
        assert set(ops) == {"act", "weight", "grad"}
        for underflow, cos in ops.values():
            assert 0.0 <= underflow < 0.05 and 0.99 < cos <= 1.0 + 1e-12
    assert not monitor.active
    # Thresholds no tensor can meet warn for every op and kind; thresholds every tensor meets warn for none.
    assert set(monitor.warnings(0.0, 1.1)) == {(n, k) for n in names for k in ("act", "weight", "grad")}
    assert monitor.warnings(1.0, -1.0) == {}


def test_train_with_fp8_writes_monitor_rows_and_heatmap(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--train.max_steps=4", "--fp8.enabled=true",
                 "--fp8.monitor_every=2", "--fp8.underflow_warn=0", *FAST]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    fp8_rows = [r for r in rows if r["kind"] == "fp8"]
    assert [r["step"] for r in fp8_rows] == [2, 4]
    assert all(len(r["ops"]) > 0 for r in fp8_rows)
    assert (out / "plots" / "fp8_monitor.png").is_file()
    assert "fp8_monitor.png" in (out / "report.md").read_text()
