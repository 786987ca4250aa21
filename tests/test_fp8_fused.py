"""The fused (compiled) FP8 quantisers against the eager ones: bit for bit, gradients included, no recompiles.

The rest of the suite runs the eager quantisers (conftest.py); this module turns fusing on. Every test here
compiles, so shapes are few and shared between tests: the compiled kernels are reused within the module.
"""

import logging

import pytest
import torch
from conftest import slow

from linglab import fp8
from linglab.fp8 import (
    FUSED_ENV,
    Fp8Op,
    Fp8Recipe,
    dequantize_per_tensor,
    dequantize_tilewise,
    fp8_grouped_mm,
    fp8_linear,
    fp8_swiglu_down,
    quantize_dequantize,
    swiglu_quantize,
)


@pytest.fixture(autouse=True)
def fused(monkeypatch, one_thread):
    monkeypatch.setenv(FUSED_ENV, "1")
    # Every variant this module makes must run compiled, not fall back to eager at dynamo's recompile limit.
    with torch._dynamo.config.patch(recompile_limit=64):
        yield


def _eager(fn, *args):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FUSED_ENV, "0")
        return fn(*args)


def _hard_values(*shape, seed=0):
    """Normal values over 60 decades (no inf: E4M3 has none), a zero row, a zero tile and an all-equal tile."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-30, 30, shape[-1])
    x[..., 0, :] = 0
    x[..., 1, :128] = 0
    x[..., 2, :128] = -3.0
    return x


@pytest.mark.parametrize("granularity", ["tile", pytest.param("block", marks=slow), pytest.param("tensor", marks=slow)])
def test_fused_quantize_dequantize_is_bit_identical(granularity):
    # whole tiles and blocks; odd sizes (zero-padded edge tiles and blocks); for blocks, stacked expert weights
    xs = [_hard_values(256, 384), _hard_values(129, 200, seed=1)]
    if granularity == "block":
        xs.append(_hard_values(3, 130, 260, seed=2).transpose(1, 2))
    for x in xs:
        for pow2 in (False, True):
            fused = quantize_dequantize(x, granularity, pow2)
            assert torch.equal(fused, _eager(quantize_dequantize, x, granularity, pow2))
    assert fp8._QDQ[granularity].compiled is not None


def test_narrow_weights_quantise_right_inside_the_fp8_forward():
    # More than 128 rows, a width under 128 (zero-padded blocks), quantised under the forward's no_grad: the compiled
    # block quantiser gave cosine 0.67 against eager here on torch 2.13 CPU, so padded blocks run eagerly.
    w, x = torch.randn(192, 64) * 0.006, torch.randn(8, 64)
    assert torch.equal(fp8_linear(x, w), _eager(fp8_linear, x, w))


def test_fused_swiglu_quantisation_is_bit_identical():
    gate_up = torch.randn(200, 512) * 4
    gate_up[:3] = 0
    row_weights = torch.rand(200)
    for granularity, rw, pow2 in (("tile", None, False), ("tile", row_weights, False), ("tile", row_weights, True),
                                  ("tensor", row_weights, False)):
        dequantize = dequantize_tilewise if granularity == "tile" else dequantize_per_tensor
        eager = dequantize(*swiglu_quantize(gate_up, pow2_scales=pow2, row_weights=rw, granularity=granularity))
        assert torch.equal(fp8._SWIGLU_QDQ[granularity](gate_up, rw, pow2), eager)


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    return [out] + [t.grad for t in inputs if t.grad is not None]


def _offs(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


@slow
def test_autograd_functions_give_the_same_outputs_and_gradients_fused():
    # Ling's recipe only: the other recipes run the same quantisers, tested bit for bit above.
    op = Fp8Op(Fp8Recipe(), "emulate")
    cases = {
        "linear": (lambda x, w: fp8_linear(x, w, op=op, parts=(256, 128)), torch.randn(4, 50, 256), torch.randn(384, 256)),
        "grouped": (lambda x, w: fp8_grouped_mm(x, w, _offs([70, 0, 130]), op=op, parts=(128, 128)),
                    torch.randn(200, 256), torch.randn(3, 256, 256)),
        "swiglu_down": (lambda gu, w, rw: fp8_swiglu_down(gu, w, op, row_weights=rw, offs=_offs([70, 0, 130])),
                        torch.randn(200, 512), torch.randn(3, 256, 128), torch.rand(200)),
        "dense_swiglu_down": (lambda gu, w: fp8_swiglu_down(gu, w, op), torch.randn(200, 512), torch.randn(128, 256)),
    }
    for name, (fn, *inputs) in cases.items():
        for fused, eager in zip(_grads(fn, *inputs), _eager(_grads, fn, *inputs)):
            assert torch.equal(fused, eager), name


def test_varying_expert_segments_do_not_recompile():
    op = Fp8Op(Fp8Recipe(), "emulate")
    x, w, w_down = torch.randn(240, 256), torch.randn(3, 256, 256), torch.randn(3, 128, 256)

    def step(counts):
        offs = _offs(counts)
        x_ = x.detach().requires_grad_()
        gate_up = fp8_grouped_mm(x_, w, offs, op=op, parts=(128, 128))
        fp8_swiglu_down(gate_up, w_down, op, row_weights=torch.rand(240), offs=offs).sum().backward()

    step([100, 60, 80])
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for counts in ([1, 200, 39], [0, 0, 240], [129, 1, 110], [80, 80, 80]):
        step(counts)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_a_failed_compile_logs_one_line_and_runs_eagerly(monkeypatch, caplog):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no C++ compiler\nsecond line")
        return run

    monkeypatch.setattr(fp8, "_fused_failed", [])
    monkeypatch.setattr(torch, "compile", broken)
    tilewise = fp8._Fused(fp8._qdq_tilewise)
    x = torch.randn(8, 256)
    with caplog.at_level(logging.WARNING, logger="linglab.fp8"):
        assert torch.equal(tilewise(x, False), _eager(quantize_dequantize, x, "tile"))
        assert torch.equal(tilewise(x, False), _eager(quantize_dequantize, x, "tile"))
    assert [r.getMessage() for r in caplog.records] == [
        "fp8: compiling the fused quantisers failed (RuntimeError: no C++ compiler); running them eagerly"]
    assert not fp8.fused_enabled()
