"""FP8 numerics (SPEC §3) against per-tile loops and explicit quantise-dequantise GEMMs."""

import math

import pytest
import torch
import torch.nn.functional as F

from linglab.fp8 import (
    E4M3,
    Fp8Op,
    Fp8Recipe,
    dequantize_blockwise,
    dequantize_per_tensor,
    dequantize_tilewise,
    distortion,
    fp8_grouped_mm,
    fp8_linear,
    quantization_stats,
    quantize_blockwise,
    quantize_dequantize,
    quantize_per_tensor,
    quantize_tilewise,
    resolve_backend,
    swiglu_quantize,
    underflow_fraction,
)

TENSORWISE = Fp8Recipe("tensorwise")


def _ref_scale(group: torch.Tensor, pow2: bool) -> float:
    s = float(group.abs().max() / 448.0)  # the division in fp32, as the quantiser does it
    if s == 0.0:
        return 1.0
    if pow2:
        p = 2.0 ** math.floor(math.log2(s))
        while p < s:
            p *= 2
        while p / 2 >= s:
            p /= 2
        s = p
    return s


def _ref_quantize(group: torch.Tensor, scale: float) -> torch.Tensor:
    return (group / scale).clamp(-448, 448).to(E4M3)


def _ref_tilewise(x: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    rows, k = x.shape
    q = torch.empty(rows, k, dtype=E4M3)
    scale = torch.empty(rows, math.ceil(k / 128))
    for i in range(rows):
        for t, j in enumerate(range(0, k, 128)):
            scale[i, t] = s = _ref_scale(x[i, j:j + 128], pow2)
            q[i, j:j + 128] = _ref_quantize(x[i, j:j + 128], s)
    return q, scale


def _ref_blockwise(w: torch.Tensor, pow2: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    q = torch.empty(n, k, dtype=E4M3)
    scale = torch.empty(math.ceil(n / 128), math.ceil(k / 128))
    for bi, i in enumerate(range(0, n, 128)):
        for bj, j in enumerate(range(0, k, 128)):
            scale[bi, bj] = s = _ref_scale(w[i:i + 128, j:j + 128], pow2)
            q[i:i + 128, j:j + 128] = _ref_quantize(w[i:i + 128, j:j + 128], s)
    return q, scale


def _bits(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def _heavy_tailed(*shape) -> torch.Tensor:
    """Values over several decades, so tiles get different scales and some elements hit the subnormals."""
    return torch.randn(*shape) * torch.exp(2 * torch.randn(*shape))


@pytest.mark.parametrize("pow2", [False, True])
def test_tilewise_matches_loop_reference_with_short_last_tile(pow2):
    x = _heavy_tailed(3, 200)
    x[1, 128:] = 0.0  # the short last tile of row 1 is all zero
    q, scale = quantize_tilewise(x, pow2_scales=pow2)
    q_ref, scale_ref = _ref_tilewise(x, pow2)
    assert q.shape == x.shape and q.dtype == E4M3 and scale.shape == (3, 2) and scale.dtype == torch.float32
    assert torch.equal(scale, scale_ref)
    assert torch.equal(_bits(q), _bits(q_ref))
    assert scale[1, 1] == 1.0 and not dequantize_tilewise(q, scale)[1, 128:].any()


@pytest.mark.parametrize("pow2", [False, True])
def test_blockwise_matches_loop_reference_and_stacks_experts(pow2):
    w = _heavy_tailed(2, 200, 136)
    q, scale = quantize_blockwise(w, pow2_scales=pow2)
    assert q.shape == w.shape and scale.shape == (2, 2, 2)
    for e in range(2):
        q_ref, scale_ref = _ref_blockwise(w[e], pow2)
        assert torch.equal(scale[e], scale_ref)
        assert torch.equal(_bits(q[e]), _bits(q_ref))
    # Square blocks: quantising W^T gives the transposed result, which dgrad relies on.
    q_t, scale_t = quantize_blockwise(w[0].t(), pow2_scales=pow2)
    assert torch.equal(_bits(q_t), _bits(q[0].t())) and torch.equal(scale_t, scale[0].t())


def test_outlier_saturates_at_448_and_stays_finite():
    x = torch.randn(2, 128)
    x[0, 5] = 1e6
    q, scale = quantize_tilewise(x)
    assert scale[0, 0] == torch.tensor(1e6) / 448
    assert q[0, 5].float() == 448 and torch.isfinite(q.float()).all()
    assert torch.isfinite(dequantize_tilewise(q, scale)).all()
    # A value past amax / scale (here forced by a too-small scale) is clamped to 448, never nan.
    assert quantize_per_tensor(torch.tensor([1e30, -1e30]))[0].float().abs().max() == 448


def test_pow2_scales_are_powers_of_two_covering_amax():
    x = _heavy_tailed(4, 300)
    for quantize in (quantize_tilewise, quantize_blockwise, quantize_per_tensor):
        q, scale = quantize(x, pow2_scales=True)
        exact = quantize(x)[1]  # amax / 448
        mant, _ = torch.frexp(scale)
        assert (mant == 0.5).all()
        assert (scale >= exact).all() and (scale < 2 * exact).all()
        assert q.float().abs().max() <= 448


def test_zero_inputs_give_zeros_and_unit_scales():
    z = torch.zeros(3, 200)
    for q, scale, deq in ((*quantize_tilewise(z), dequantize_tilewise),
                          (*quantize_blockwise(z), dequantize_blockwise),
                          (*quantize_per_tensor(z), dequantize_per_tensor)):
        assert (scale == 1.0).all()
        x = deq(q, scale)
        assert x.shape == z.shape and torch.equal(x, z)


@pytest.mark.parametrize("granularity", ["tile", "block", "tensor"])
def test_roundtrip_error_within_half_an_e4m3_step(granularity):
    x = _heavy_tailed(150, 200)
    q, scale = {"tile": quantize_tilewise, "block": quantize_blockwise, "tensor": quantize_per_tensor}[granularity](x)
    per_elem = {"tile": lambda s: s.repeat_interleave(128, -1)[:, :200],
                "block": lambda s: s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:150, :200],
                "tensor": lambda s: s}[granularity](scale)
    err = (quantize_dequantize(x, granularity) - x).abs()
    # 3 mantissa bits: half a step is 2^-4 relative for normals; 2^-10 * scale absolute in the subnormal range.
    assert (err <= 2 ** -4 * x.abs() + 2 ** -10 * per_elem).all()


@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_dequantize_fast_tile_path_is_bit_identical(pow2):
    x = _heavy_tailed(3, 256).view(3, 1, 256)
    x[1, 0, :128] = 0.0  # a zero tile
    assert torch.equal(quantize_dequantize(x, "tile", pow2), dequantize_tilewise(*quantize_tilewise(x, pow2_scales=pow2)))


@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_dequantize_fast_block_path_is_bit_identical(pow2):
    w = _heavy_tailed(2, 256, 384)  # stacked experts, whole 128x128 blocks
    w[1, :128, 128:256] = 0.0  # a zero block
    assert torch.equal(quantize_dequantize(w, "block", pow2), dequantize_blockwise(*quantize_blockwise(w, pow2_scales=pow2)))


def _linear_grads(x, w, dy, recipe, backend="emulate"):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(x, w, recipe, backend)
    y.backward(dy)
    return y, x.grad, w.grad


@pytest.mark.parametrize("recipe", [Fp8Recipe(), Fp8Recipe(pow2_scales=True), TENSORWISE, Fp8Recipe(grad_blocks=True)],
                         ids=["tilewise", "pow2", "tensorwise", "grad_blocks"])
def test_fp8_linear_three_gemms_equal_explicit_quantise_dequantise(recipe):
    x, w, dy = _heavy_tailed(3, 50, 200), torch.randn(136, 200), torch.randn(3, 50, 136)
    y, dx, dw = _linear_grads(x, w, dy, recipe)
    qd = lambda t, g: quantize_dequantize(t, g, recipe.pow2_scales)
    act, weight, grad = recipe.act, recipe.weight, recipe.grad
    x2, dy2 = x.view(150, 200), dy.view(150, 136)
    assert torch.allclose(y.view(150, 136), qd(x2, act) @ qd(w, weight).T, rtol=1e-5, atol=1e-5)
    assert torch.allclose(dx.view(150, 200), qd(dy2, grad) @ qd(w, weight), rtol=1e-5, atol=1e-5)
    # wgrad contracts over the 150 tokens: dy^T and x^T are quantised along them (two tiles, the second short).
    assert torch.allclose(dw, qd(dy2.T, grad) @ qd(x2.T, act).T, rtol=1e-5, atol=1e-5)


def test_grad_blocks_changes_only_the_gradient_quantisation():
    x, w, dy = torch.randn(2, 130, 200), torch.randn(136, 200), _heavy_tailed(2, 130, 136)
    y_t, dx_t, dw_t = _linear_grads(x, w, dy, Fp8Recipe())
    y_b, dx_b, dw_b = _linear_grads(x, w, dy, Fp8Recipe(grad_blocks=True))
    assert torch.equal(y_t, y_b)
    assert not torch.allclose(dx_t, dx_b) and not torch.allclose(dw_t, dw_b)
    dy_blocks = quantize_dequantize(dy.view(260, 136), "block")
    assert torch.allclose(dx_b.view(260, 200), dy_blocks @ quantize_dequantize(w, "block"), rtol=1e-5, atol=1e-5)


def test_fp8_linear_keeps_dtypes_and_skips_unneeded_grads():
    x, w = torch.randn(4, 256, dtype=torch.bfloat16), torch.randn(64, 256, requires_grad=True)
    y = fp8_linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (4, 64)
    y.float().sum().backward()
    assert x.grad is None and w.grad.dtype == torch.float32


def test_recipe_and_backend_errors():
    with pytest.raises(ValueError, match="grad_blocks"):
        Fp8Recipe("tensorwise", grad_blocks=True)
    with pytest.raises(ValueError, match="scaling"):
        Fp8Recipe("rowwise")
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cublas", "cpu", Fp8Recipe())
    assert resolve_backend("auto", "cpu", Fp8Recipe()) == "emulate"  # no 1x128 / 128x128 scaled_mm on CPU
    with pytest.raises(ValueError, match="emulate"):
        resolve_backend("scaled_mm", "cpu", Fp8Recipe())
    with pytest.raises(ValueError, match="emulate"):
        fp8_grouped_mm(torch.randn(4, 8), torch.randn(1, 8, 8), torch.tensor([4], dtype=torch.int32), backend="scaled_mm")


def test_scaled_mm_backend_equals_emulate_for_tensorwise_on_cpu():
    if resolve_backend("auto", "cpu", TENSORWISE) != "scaled_mm":
        pytest.skip("torch._scaled_mm does not run per-tensor FP8 on this CPU build")
    x, w, dy = _heavy_tailed(3, 50, 200), torch.randn(136, 200), torch.randn(3, 50, 136)
    for got, want in zip(_linear_grads(x, w, dy, TENSORWISE, "scaled_mm"), _linear_grads(x, w, dy, TENSORWISE)):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def _grouped_reference(x, w, dy, counts, recipe):
    """Per-expert loop of explicit quantise-dequantise GEMMs; per-tensor scales span the whole x, dy and stacked w."""
    qd = lambda t, g: quantize_dequantize(t, g, recipe.pow2_scales)
    tensorwise = recipe.scaling == "tensorwise"
    xq_all, dyq_all, wq_all = qd(x, "tensor"), qd(dy, "tensor"), qd(w, "tensor")
    y, dx, dw = torch.zeros(x.shape[0], w.shape[2]), torch.zeros_like(x), torch.zeros_like(w)
    start = 0
    for e, c in enumerate(counts):
        seg = slice(start, start + c)
        start += c
        if c == 0:
            continue
        xe, dye, we = x[seg], dy[seg], wq_all[e] if tensorwise else qd(w[e], "block")
        xq = xq_all[seg] if tensorwise else qd(xe, "tile")
        xq_t = xq_all[seg].T if tensorwise else qd(xe.T, "tile")
        dyq = dyq_all[seg] if tensorwise else qd(dye, recipe.grad)
        dyq_t = dyq_all[seg].T if tensorwise else qd(dye.T, recipe.grad)
        y[seg], dx[seg], dw[e] = xq @ we, dyq @ we.T, xq_t @ dyq_t.T
    return y, dx, dw


@pytest.mark.parametrize("recipe", [Fp8Recipe(), Fp8Recipe(pow2_scales=True), TENSORWISE, Fp8Recipe(grad_blocks=True)],
                         ids=["tilewise", "pow2", "tensorwise", "grad_blocks"])
def test_fp8_grouped_mm_equals_per_expert_loop(recipe):
    counts = [130, 0, 77, 5]  # an empty expert and segments that are not multiples of 128
    x, dy = _heavy_tailed(212, 200), _heavy_tailed(212, 136)
    stored = torch.randn(4, 136, 200, requires_grad=True)  # [E, out, in], passed transposed as in GroupedExperts
    xg = x.clone().requires_grad_()
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    y = fp8_grouped_mm(xg, stored.transpose(1, 2), offs, recipe)
    y.backward(dy)
    y_ref, dx_ref, dw_ref = _grouped_reference(x, stored.detach().transpose(1, 2), dy, counts, recipe)
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(xg.grad, dx_ref, rtol=1e-5, atol=1e-4)
    assert torch.allclose(stored.grad.transpose(1, 2), dw_ref, rtol=1e-5, atol=1e-4)
    assert not stored.grad[1].any()


STACKED_RECIPES = [Fp8Recipe(), TENSORWISE, Fp8Recipe(grad_blocks=True)]


def _leaf(*shape, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape) * scale).requires_grad_()


@pytest.mark.parametrize("recipe", STACKED_RECIPES, ids=["tilewise", "tensorwise", "grad_blocks"])
def test_stacked_gate_up_gemm_equals_two_separate_fp8_linears(recipe):
    """[gate; up] in one GEMM with parts: each weight in its own blocks, and its slice of dy in its own tiles."""
    op = Fp8Op(recipe, "emulate")
    x, gate, up = _leaf(3, 40, 160), _leaf(72, 160, scale=0.1), _leaf(72, 160, scale=0.1)
    gate_up = torch.cat([gate, up])
    stacked = fp8_linear(x, gate_up, op=op, parts=(72, 72))
    separate = torch.cat([fp8_linear(x, gate, op=op), fp8_linear(x, up, op=op)], dim=-1)
    torch.testing.assert_close(stacked, separate, rtol=1e-6, atol=1e-7)
    # One 128x128 block across the boundary would round differently: the test would see it.
    assert not torch.allclose(fp8_linear(x, gate_up, op=op), separate, rtol=1e-6, atol=1e-7)
    dy = torch.randn_like(stacked)
    grads_stacked = torch.autograd.grad(stacked, (x, gate, up), dy)
    grads_separate = torch.autograd.grad(separate, (x, gate, up), dy)
    for a, b in zip(grads_stacked, grads_separate):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", STACKED_RECIPES, ids=["tilewise", "tensorwise", "grad_blocks"])
def test_stacked_grouped_gate_up_equals_separate_grouped_gemms(recipe):
    op = Fp8Op(recipe, "emulate")
    offs = torch.tensor([70, 70, 210, 240]).to(torch.int32)
    x, gate, up = _leaf(240, 96), _leaf(4, 96, 36, scale=0.1), _leaf(4, 96, 36, scale=0.1)
    stacked = fp8_grouped_mm(x, torch.cat([gate, up], dim=-1), offs, op=op, parts=(36, 36))
    separate = torch.cat([fp8_grouped_mm(x, gate, offs, op=op), fp8_grouped_mm(x, up, offs, op=op)], dim=-1)
    torch.testing.assert_close(stacked, separate, rtol=1e-6, atol=1e-7)
    dy = torch.randn_like(stacked)
    for a, b in zip(torch.autograd.grad(stacked, (x, gate, up), dy), torch.autograd.grad(separate, (x, gate, up), dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_stacked_gemm_on_scaled_mm_equals_emulate_for_tensorwise_on_cpu():
    """scaled_mm runs one GEMM per stacked weight, each with its own per-tensor scale; emulation one GEMM."""
    if resolve_backend("auto", "cpu", TENSORWISE) != "scaled_mm":
        pytest.skip("torch._scaled_mm does not run per-tensor FP8 on this CPU build")
    # gate and up of different magnitudes: one scale for both would be the larger one's
    x, w, dy = torch.randn(3, 50, 200), torch.cat([torch.randn(72, 200), 9 * torch.randn(72, 200)]), torch.randn(3, 50, 144)
    results = {}
    for backend in ("scaled_mm", "emulate"):
        xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xb, wb, op=Fp8Op(TENSORWISE, backend), parts=(72, 72))
        y.backward(dy)
        results[backend] = (y, xb.grad, wb.grad)
    for got, want in zip(results["scaled_mm"], results["emulate"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.detach().abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_quantize_is_bit_exact_with_the_unfused_ops(dtype):
    gate_up = (3 * torch.randn(6, 2 * 150)).to(dtype)
    q, scale = swiglu_quantize(gate_up, pow2_scales=True)
    gate, up = gate_up[:, :150], gate_up[:, 150:]
    q_ref, scale_ref = quantize_tilewise(F.silu(gate) * up, pow2_scales=True)
    assert q.shape == (6, 150) and torch.equal(_bits(q), _bits(q_ref)) and torch.equal(scale, scale_ref)


def test_underflow_counts_exactly_the_tiny_elements_next_to_a_large_one():
    x = torch.zeros(2, 256)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 1.0, 1e-12, -1e-12, 0.5  # one tile: 1e-12 * 448 is far below E4M3's 2^-9
    x[1, 200] = 1e-12  # alone in its tile, so it gets its own scale and survives
    stats = quantization_stats(x, "tile")
    assert stats["underflow"] == pytest.approx(2 / 5)
    deq = quantize_dequantize(x, "tile")
    expected = torch.zeros_like(x, dtype=torch.bool)
    expected[0, 1:3] = True
    assert torch.equal((deq == 0) & (x != 0), expected)
    assert stats["distortion"] == pytest.approx(1.0)


def test_small_integers_with_pow2_scales_are_lossless():
    x = torch.randint(-16, 17, (3, 200)).float()
    stats = quantization_stats(x, "tile", Fp8Recipe(pow2_scales=True))
    assert stats["underflow"] == 0 and stats["distortion"] == pytest.approx(1.0, abs=1e-15)
    for granularity in ("tile", "block", "tensor"):
        assert torch.equal(quantize_dequantize(x, granularity, pow2_scales=True), x)


def test_distortion_is_the_fp64_cosine():
    assert distortion(torch.tensor([3.0, 4.0]), torch.tensor([4.0, 3.0])) == pytest.approx(24 / 25, abs=1e-15)
    assert distortion(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])) == pytest.approx(2 ** -0.5, abs=1e-15)
    assert distortion(torch.zeros(3), torch.zeros(3)) == 1.0
    assert distortion(torch.ones(3), torch.zeros(3)) == 0.0
    assert underflow_fraction(torch.zeros(3), torch.zeros(3)) == 0.0
