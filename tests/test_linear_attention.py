"""The three forms of SPEC §8's linear attention against each other and against plain causal attention; the decays."""

import ast
from pathlib import Path

import pytest
import torch

from linglab.errors import LinglabError
from linglab.linear_attention import (
    alibi_slopes,
    layer_decays,
    linear_attention_chunked,
    linear_attention_recurrent,
    linear_attention_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(batch=2, heads=4, length=20, dk=8, dv=8, with_state=False):
    q, k, v = torch.randn(batch, heads, length, dk), torch.randn(batch, heads, length, dk), torch.randn(batch, heads, length, dv)
    state = torch.randn(batch, heads, dk, dv) if with_state else None
    return q, k, v, state


# ---- slopes and decays -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("heads, expected", [
    (4, [2**-2, 2**-4, 2**-6, 2**-8]),                       # start = 2^-(8/4)
    (8, [2**-h for h in range(1, 9)]),                        # start = 1/2
    (16, [2**(-h / 2) for h in range(1, 17)]),                # start = 2^-0.5
    # 12 heads: the 8-head slopes, then every other 16-head slope (odd half-powers) until 12 are taken
    (12, [2**-h for h in range(1, 9)] + [2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]),
])
def test_alibi_slopes_hand_computed(heads, expected):
    assert torch.equal(alibi_slopes(heads), torch.tensor(expected, dtype=torch.float32))


def test_layer_decays_layer_zero_is_unclamped_as_in_the_hf_reference():
    slopes = alibi_slopes(16)
    # L = 20, as Ring-mini-linear-2.0: layer 0 decays (1 + 1/19) times faster than layer 1, the last 1/19 as fast
    assert torch.equal(layer_decays(16, 0, 20), -slopes * (1 + 1 / 19 + 1e-5))
    assert torch.equal(layer_decays(16, 1, 20), -slopes * (1 + 1e-5))
    assert torch.allclose(layer_decays(16, 19, 20), -slopes * (1 / 19 + 1e-5), rtol=1e-6, atol=0)
    for layer in range(20):
        g = layer_decays(16, layer, 20)
        assert g.dtype == torch.float32 and (g < 0).all()


def test_layer_decays_one_layer_floors_the_denominator():
    assert torch.equal(layer_decays(4, 0, 1), -alibi_slopes(4) * (2 + 1e-5))


@pytest.mark.parametrize("call", [lambda: alibi_slopes(0), lambda: layer_decays(4, 4, 4), lambda: layer_decays(4, -1, 4)])
def test_bad_slope_arguments_are_one_line_errors(call):
    with pytest.raises(LinglabError):
        call()


# ---- the three forms ---------------------------------------------------------------------------------------------

SHAPES = [  # batch, heads, length, dk, dv
    (1, 1, 1, 4, 4),
    (2, 4, 20, 8, 8),
    (1, 2, 130, 16, 16),   # two whole 64-chunks and a 2-token tail
    (2, 3, 33, 8, 5),      # dk != dv, 3 heads (interleaved slopes)
]


@pytest.mark.parametrize("chunk_size", [1, 7, 64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_equals_recurrent_forward_and_gradients(shape, chunk_size, with_state):
    batch, heads, length, dk, dv = shape
    q, k, v, state = _inputs(batch, heads, length, dk, dv, with_state)
    g = layer_decays(heads, 0, 4)  # the fastest decays of a 4-layer model
    scale = dk**-0.5
    leaves = [t.requires_grad_() for t in (q, k, v) + ((state,) if with_state else ())]
    o_ref, s_ref = linear_attention_recurrent(q, k, v, g, scale, state)
    o, s = linear_attention_chunked(q, k, v, g, scale, state, chunk_size=chunk_size)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)

    do, ds = torch.randn_like(o), torch.randn_like(s)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (s_ref * ds).sum(), leaves)
    grads = torch.autograd.grad((o * do).sum() + (s * ds).sum(), leaves)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-4)


def test_steps_equal_recurrent_forward_and_gradients():
    q, k, v, state = _inputs(length=9, with_state=True)
    g = layer_decays(4, 2, 4)
    leaves = [t.requires_grad_() for t in (q, k, v, state)]
    o_ref, s_ref = linear_attention_recurrent(q, k, v, g, 0.3, state)
    s, outputs = state, []
    for t in range(q.shape[2]):
        o_t, s = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], g, 0.3, s)
        outputs.append(o_t)
    o = torch.cat(outputs, dim=2)
    torch.testing.assert_close(o, o_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=1e-6)
    grads_ref = torch.autograd.grad(o_ref.square().sum() + s_ref.sum(), leaves)
    grads = torch.autograd.grad(o.square().sum() + s.sum(), leaves)
    for grad, grad_ref in zip(grads, grads_ref):
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length", [5, 64, 100])
def test_prefill_chunked_then_one_step_equals_recurrent_over_one_more_token(length):
    q, k, v, _ = _inputs(length=length + 1)
    g = layer_decays(4, 1, 6)
    o_ref, s_ref = linear_attention_recurrent(q, k, v, g, 0.25)
    o_prefill, s = linear_attention_chunked(q[:, :, :length], k[:, :, :length], v[:, :, :length], g, 0.25, chunk_size=16)
    o_next, s = linear_attention_step(q[:, :, length:], k[:, :, length:], v[:, :, length:], g, 0.25, s)
    torch.testing.assert_close(torch.cat([o_prefill, o_next], dim=2), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_no_decay_is_plain_causal_linear_attention():
    q, k, v, _ = _inputs(length=50)
    causal = torch.ones(50, 50).tril()
    expected = 0.5 * ((q @ k.transpose(-1, -2)) * causal) @ v
    g = torch.zeros(4)
    for o, _ in (linear_attention_recurrent(q, k, v, g, 0.5), linear_attention_chunked(q, k, v, g, 0.5, chunk_size=16)):
        torch.testing.assert_close(o, expected, rtol=1e-5, atol=1e-4)


def test_strong_decay_over_long_chunks_stays_finite():
    # g = -30 over 256-token chunks: any exp(-g * distance) would be exp(7650) = inf
    q, k, v, state = _inputs(heads=2, length=600, with_state=True)
    g = torch.tensor([-30.0, -1e-3])
    q.requires_grad_()
    o, s = linear_attention_chunked(q, k, v, g, 0.1, state, chunk_size=256)
    o_ref, s_ref = linear_attention_recurrent(q, k, v, g, 0.1, state)
    (grad,) = torch.autograd.grad(o.sum(), q)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s, s_ref, rtol=1e-4, atol=1e-4)


def test_low_precision_inputs_compute_in_fp32():
    q, k, v, _ = _inputs(length=40)
    g = layer_decays(4, 0, 2)
    o32, s32 = linear_attention_recurrent(q, k, v, g, 0.3)
    o, s = linear_attention_chunked(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, 0.3, chunk_size=16)
    assert o.dtype == torch.bfloat16 and s.dtype == torch.float32
    # only the bf16 rounding of the inputs and of o separates the two
    torch.testing.assert_close(o.float(), o32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("call", [
    lambda q, k, v, s: linear_attention_chunked(q, k[:, :, :-1], v, torch.zeros(4), 1.0),
    lambda q, k, v, s: linear_attention_chunked(q, k, v, torch.zeros(3), 1.0),
    lambda q, k, v, s: linear_attention_chunked(q, k, v, torch.zeros(4), 1.0, chunk_size=0),
    lambda q, k, v, s: linear_attention_recurrent(q, k, v, torch.zeros(4), 1.0, s[:1]),
    lambda q, k, v, s: linear_attention_step(q, k, v, torch.zeros(4), 1.0, s),  # T = 20, not one token
])
def test_bad_shapes_are_one_line_errors(call):
    q, k, v, state = _inputs(with_state=True)
    with pytest.raises(LinglabError):
        call(q, k, v, state)


def test_the_kernel_imports_nothing_of_ours_but_errors():
    tree = ast.parse((Path(__file__).resolve().parents[1] / "linglab" / "linear_attention.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert {m for m in imported if m.startswith("linglab")} == {"linglab.errors"}
