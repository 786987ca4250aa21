"""Selective recompute (`linglab.recompute`, SPEC §7): the same loss, gradients, expert loads and FP8 monitor samples
as no recompute, bit for bit, with less kept for backward."""

import contextlib

import pytest
import torch
from conftest import tiny_config

from linglab import recompute
from linglab.model import build_model
from linglab.recompute import RECOMPUTE_MODES, Recomputed, apply_recompute
from linglab.train import apply_fp8

pytestmark = pytest.mark.usefixtures("one_thread")


def _step(cfg, mode: str, ids: torch.Tensor) -> dict:
    """One training forward/backward of a fresh seed-0 model with `mode`; what it produced and what it kept."""
    model = build_model(cfg.model, seed=0).train()
    monitor = apply_fp8(model, cfg.fp8)
    names = apply_recompute(model, mode)
    kept = []

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t

    sampling = monitor.sampling() if monitor is not None else contextlib.nullcontext()
    with sampling, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids[:, :-1], targets=ids[:, 1:])
    if monitor is not None:
        monitor.active = True  # the grads' samples too, as a sampled step records them
    out.loss.backward()
    return {"names": names, "loss": out.loss.detach(), "grads": {n: p.grad for n, p in model.named_parameters()},
            "loads": [m.tokens_per_expert.clone() for m in model.moe_layers()], "kept": sum(kept),
            "fp8": None if monitor is None else monitor.stats}


@pytest.mark.parametrize("fp8, hybrid", [(False, False), (True, True)], ids=["fp32", "fp8-hybrid"])
def test_every_mode_computes_what_no_recompute_computes_bit_for_bit(fp8, hybrid):
    """Exact, not within a tolerance: the recomputed forward replays the same CPU kernels on the same inputs, and the
    backward is the same graph. Expert loads (the bias update's input) are counted once and the FP8 monitor's
    samples are those of the first forward (a hybrid's linear layers, SPEC §8, and the MTP layer included)."""
    cfg = tiny_config(num_hidden_layers=2, router_z_loss_coef=1e-3, layer_group_size=2 if hybrid else 0)
    cfg.fp8.enabled, cfg.fp8.backend = fp8, "emulate"
    ids = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    runs = {mode: _step(cfg, mode, ids) for mode in RECOMPUTE_MODES}
    ref = runs["none"]
    assert runs["mtp"]["names"] == ["model.mtp_layers.0"]
    assert runs["full"]["names"] == ["model.layers.0", "model.layers.1", "model.mtp_layers.0"]
    assert runs["experts"]["names"] == [f"model.{where}.mlp.{part}" for where in ("layers.1", "mtp_layers.0")
                                        for part in ("experts", "shared_experts")]
    for mode in ("mtp", "experts", "full"):
        run = runs[mode]
        assert torch.equal(run["loss"], ref["loss"]), mode
        for name, grad in ref["grads"].items():
            assert torch.equal(run["grads"][name], grad), (mode, name)
        assert all(torch.equal(a, b) for a, b in zip(run["loads"], ref["loads"])), mode
        assert run["fp8"] == ref["fp8"], mode
        assert run["kept"] < ref["kept"], mode
    assert runs["full"]["kept"] < runs["experts"]["kept"] and runs["full"]["kept"] < runs["mtp"]["kept"]


def test_without_the_guard_a_recomputed_forward_would_count_expert_loads_twice(monkeypatch):
    """What `leaving_no_trace` prevents: the recomputed MoE forward adds its tokens to `tokens_per_expert` again."""
    cfg = tiny_config(num_hidden_layers=2)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 33), generator=torch.Generator().manual_seed(0))
    ref = _step(cfg, "none", ids)["loads"]
    monkeypatch.setattr(recompute, "leaving_no_trace", lambda module: contextlib.nullcontext())
    doubled = _step(cfg, "mtp", ids)["loads"]
    assert torch.equal(doubled[0], ref[0]) and torch.equal(doubled[-1], 2 * ref[-1])


def test_recompute_keeps_names_and_is_skipped_without_grad():
    cfg = tiny_config(num_hidden_layers=2)
    model = build_model(cfg.model, seed=0)
    names = [n for n, _ in model.named_parameters()]
    apply_recompute(model, "full")
    assert [n for n, _ in model.named_parameters()] == names
    assert isinstance(model.model.layers[0], Recomputed) and type(model.model.layers[0]).__name__ == "RecomputedDecoderLayer"
    apply_recompute(model, "full")  # twice is once
    assert type(model.model.layers[0]).__mro__.count(Recomputed) == 1
    with torch.no_grad():  # evaluation and KV-cache decoding run the plain forward
        model.eval()(torch.randint(0, cfg.model.vocab_size, (1, 8)))


def test_fp8_conversion_after_recompute_is_refused():
    """Recompute wraps the FP8 modules, not the other way round: converting afterwards would drop the recompute."""
    from linglab.fp8 import Fp8Recipe
    from linglab.fp8_convert import convert_to_fp8

    model = build_model(tiny_config(num_hidden_layers=2).model, seed=0)
    apply_recompute(model, "experts")
    with pytest.raises(ValueError, match="is not a plain"):
        convert_to_fp8(model, Fp8Recipe(), backend="emulate")
