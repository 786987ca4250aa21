"""FP8 training numerics of SPEC §3: E4M3 quantisers, the recipes, FP8 linear and grouped GEMMs, the monitor.

Every GEMM of a linear runs on quantised operands with fp32 accumulation: y = Q(x) Q(W)^T, dx = Q(dy) Q(W),
dW = Q(dy^T) Q(x^T)^T. Each operand is quantised along its contraction dim: activations and activation
gradients in 1x128 tiles, weights in 128x128 blocks (square, so one block quantisation serves W and W^T),
one fp32 scale = amax / 448 per tile or block.

Two backends compute the same numbers. "emulate" dequantises the FP8 operands and multiplies in fp32: the
operand rounding is exactly FP8's, it runs on any device, and it is what the tests check. "scaled_mm" hands
the FP8 operands and scales to `torch._scaled_mm` (CPU: per-tensor scales only; CUDA sm90+: 1x128/128x128).
`resolve_backend("auto", ...)` takes scaled_mm only where a probe GEMM ran there and matched the emulation.

Each emulated quantise -> dequantise (and the SwiGLU that feeds the down projection's) runs as one compiled kernel
(`_Fused`), the eager quantisers below compiled, so bit for bit theirs; LINGLAB_FP8_FUSED=0 keeps them eager.

The autograd Functions save the high-precision x, not Q(x): wgrad needs x^T quantised along the token dim,
which cannot be derived from Q(x) without quantising twice. A fused kernel would save Q(x) and Q(x^T).

`parts`: one GEMM may run on several weights stacked along N (a SwiGLU's [gate; up]). Each stays its own weight
in the numbers: its 128x128 blocks, and the 1x128 tiles of its slice of dy, restart at its boundary, so the
stacked GEMM computes what separate gate and up linears sharing one Q(x) would, and its blocks are those an FP8
export of gate_proj and up_proj writes. Emulated it is still one GEMM; scaled_mm runs one per stacked weight,
as each needs scales of its own (x is then quantised for each, to the same values).

Which layers of the model run in FP8 is `linglab.fp8_convert`'s business: this module knows no model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TILE = 128  # 1 x TILE activation tiles and TILE x TILE weight blocks

Granularity = Literal["tile", "block", "tensor"]

_log = logging.getLogger(__name__)


def _scale_from_amax(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    """fp32 scale = amax / 448 (SPEC §3), rounded up to a power of two if `pow2`; 1.0 for all-zero groups."""
    scale = amax / E4M3_MAX
    if pow2:
        # frexp is exact: a power of two has mantissa 0.5 and is kept, anything else goes up to 2**exp,
        # so amax / scale <= 448 and nothing saturates (log2 + ceil can round the wrong way).
        mant, exp = torch.frexp(scale)
        scale = torch.where(mant == 0.5, scale, torch.ldexp(torch.ones_like(scale), exp))
    # An all-zero group (or one so small that amax / 448 underflows) needs a finite, nonzero scale:
    # 1.0 keeps the division defined and dequantises its zeros to exactly 0.
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """Saturating cast: E4M3 has no inf, so anything past ±448 would otherwise become nan."""
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _pad_last_dims(x: torch.Tensor, mult: int, ndims: int) -> torch.Tensor:
    """Zero-pad the last `ndims` dims up to multiples of `mult` (zeros never change an amax)."""
    pads = [p for d in range(1, ndims + 1) for p in (0, -x.shape[-d] % mult)]
    return F.pad(x, pads) if any(pads) else x


def quantize_tilewise(x: torch.Tensor, tile: int = TILE, pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (E4M3 q [..., K], fp32 scale [..., ceil(K / tile)]): 1 x tile groups along the last dim.

    If K is not a multiple of `tile` the last tile of each row is shorter (zero padding, which leaves its amax alone).
    """
    k = x.shape[-1]
    tiles = _pad_last_dims(x.float(), tile, 1).unflatten(-1, (-1, tile))
    scale = _scale_from_amax(tiles.abs().amax(-1), pow2_scales)
    # No clamp: each tile's own amax maps to 448 (or below, with power-of-two scales), so nothing can overflow.
    q = (tiles / scale.unsqueeze(-1)).to(E4M3).flatten(-2)
    return (q if k % tile == 0 else q[..., :k].contiguous()), scale


def dequantize_tilewise(q: torch.Tensor, scale: torch.Tensor, tile: int = TILE) -> torch.Tensor:
    """The fp32 values q * scale of a `quantize_tilewise` result."""
    if q.shape[-1] % tile == 0:  # broadcast the scales instead of materialising them per element
        return (q.float().unflatten(-1, (-1, tile)) * scale.unsqueeze(-1)).flatten(-2)
    return q.float() * scale.repeat_interleave(tile, dim=-1)[..., : q.shape[-1]]


def quantize_blockwise(w: torch.Tensor, block: int = TILE, pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (E4M3 q [..., N, K], fp32 scale [..., ceil(N / block), ceil(K / block)]).

    Leading dims (the E of stacked expert weights) are independent. Edge blocks of non-multiple N or K are
    zero-padded internally, so they are smaller blocks. Quantising w^T gives q^T and scale^T.
    """
    n, k = w.shape[-2:]
    blocks = _pad_last_dims(w.float(), block, 2).unflatten(-1, (-1, block)).unflatten(-3, (-1, block))
    scale = _scale_from_amax(blocks.abs().amax(dim=(-3, -1)), pow2_scales)
    q = _to_e4m3(blocks / scale[..., :, None, :, None]).flatten(-2).flatten(-3, -2)[..., :n, :k]
    return q.contiguous(), scale


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block: int = TILE) -> torch.Tensor:
    """The fp32 values q * scale of a `quantize_blockwise` result."""
    n, k = q.shape[-2:]
    return q.float() * scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)[..., :n, :k]


def quantize_per_tensor(x: torch.Tensor, pow2_scales: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x -> (E4M3 q, fp32 scale []): one scale for the whole tensor, the comparison recipe of SPEC §3."""
    x = x.float()
    scale = _scale_from_amax(x.abs().amax(), pow2_scales)
    return _to_e4m3(x / scale), scale


def dequantize_per_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The fp32 values q * scale of a `quantize_per_tensor` result."""
    return q.float() * scale


_QUANTIZE = {"tile": quantize_tilewise, "block": quantize_blockwise, "tensor": quantize_per_tensor}


def _qdq_groups(groups: torch.Tensor, amax_dims, pow2_scales: bool) -> torch.Tensor:
    """Quantise -> dequantise whole groups in place of their layout: one amax per group over `amax_dims`, scales
    broadcast. No clamp: each group's amax maps to 448 (or below, with power-of-two scales), so nothing overflows."""
    scale = _scale_from_amax(groups.abs().amax(dim=amax_dims, keepdim=True), pow2_scales)
    return (groups / scale).to(E4M3).float() * scale


# The emulated GEMMs' hot paths, for whole tiles and blocks: the same arithmetic as quantize + dequantize without
# the padding and the per-element scale tensor (bit-identical; tested). Each runs as one `_Fused` kernel.

def _qdq_tilewise(x: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
    if x.shape[-1] % TILE == 0:
        return _qdq_groups(x.float().unflatten(-1, (-1, TILE)), -1, pow2_scales).flatten(-2)
    return dequantize_tilewise(*quantize_tilewise(x, pow2_scales=pow2_scales))


def _qdq_blockwise(x: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
    if x.shape[-1] % TILE == 0 and x.shape[-2] % TILE == 0:
        blocks = x.float().unflatten(-1, (-1, TILE)).unflatten(-3, (-1, TILE))
        return _qdq_groups(blocks, (-3, -1), pow2_scales).flatten(-2).flatten(-3, -2)
    return dequantize_blockwise(*quantize_blockwise(x, pow2_scales=pow2_scales))


def _qdq_per_tensor(x: torch.Tensor, pow2_scales: bool) -> torch.Tensor:
    return dequantize_per_tensor(*quantize_per_tensor(x, pow2_scales))


FUSED_ENV = "LINGLAB_FP8_FUSED"
_fused_failed: list[str] = []  # the first compile error, once seen: every quantiser is eager from then on


def fused_enabled() -> bool:
    """Whether the quantisers run compiled: unless LINGLAB_FP8_FUSED=0, or a compile has failed in this process."""
    return os.environ.get(FUSED_ENV, "1") != "0" and not _fused_failed


class _Fused:
    """`fn` compiled by torch.compile (inductor: the CPU and CUDA kernels come from the same code) into one fused
    kernel, or `fn` itself, eager, when fusing is off (`fused_enabled`).

    Dynamic shapes from the first call: an MoE's expert segments change size every step and must not recompile.
    Every tensor is passed detached: dynamo keeps a parameter's shape static (a weight's `.float()` is the parameter
    itself) and guards on `requires_grad`, so either would compile another graph per call site until the recompile
    limit sent the rest back to eager (seen in benchmarks/fp8_step). The quantisers are never differentiated through:
    the FP8 autograd Functions own their backward.
    Inside a region already being compiled `fn` is traced into that region's graph instead (train.compile keeps the
    FP8 layers out of its graphs, `linglab.fp8_convert`).
    A compile that fails (no C++ compiler, a backend's refusal) logs one line and leaves every quantiser eager;
    `fn` then reruns eagerly, so an error of the arguments themselves still surfaces as eager's own.
    """

    def __init__(self, fn):
        self.fn, self.compiled = fn, None
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if not fused_enabled() or torch.compiler.is_compiling():
            return self.fn(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)
        args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        try:
            return self.compiled(*args)
        except Exception as err:  # noqa: BLE001 -- torch.compile raises a dozen unrelated types; eager reruns below
            _fused_failed.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            _log.warning("fp8: compiling the fused quantisers failed (%s); running them eagerly", _fused_failed[0])
            return self.fn(*args)


_QDQ = {"tile": _Fused(_qdq_tilewise), "block": _Fused(_qdq_blockwise), "tensor": _Fused(_qdq_per_tensor)}


def quantize_dequantize(x: torch.Tensor, granularity: Granularity, pow2_scales: bool = False,
                        parts: tuple[int, ...] | None = None, dim: int = -1) -> torch.Tensor:
    """The fp32 reconstruction of x through E4M3 at `granularity` (tile: 1x128, block: 128x128, tensor),
    as one fused kernel (`_Fused`).

    `parts`: the sizes along `dim` of the tensors stacked in x, each quantised on its own (module docstring).
    """
    if parts is not None:
        return torch.cat([quantize_dequantize(t, granularity, pow2_scales) for t in x.split(parts, dim)], dim)
    if granularity == "block" and (x.shape[-1] % TILE or x.shape[-2] % TILE):
        # Eager: compiled with dynamic shapes under no_grad (as the FP8 autograd Functions' forward runs it), the
        # zero-padded edge blocks came out wrong on torch 2.13 CPU (a 192 x 64 weight at cosine 0.67). Only weights
        # take this path, once per step each, so eager costs little.
        return _qdq_blockwise(x, pow2_scales)
    return _QDQ[granularity](x, pow2_scales)


@dataclass(frozen=True)
class Fp8Recipe:
    """Which granularity each operand gets (SPEC §3).

    "tilewise" is Ling's and DeepSeek-V3's: activations and activation gradients in 1x128 tiles, weights in
    128x128 blocks. "tensorwise" uses one scale per tensor for everything. `grad_blocks` quantises activation
    gradients in 128x128 blocks instead, the setting DeepSeek-V3 saw diverge; `pow2_scales` rounds scales up to 2^n.
    """

    scaling: Literal["tilewise", "tensorwise"] = "tilewise"
    grad_blocks: bool = False
    pow2_scales: bool = False

    def __post_init__(self):
        if self.scaling not in ("tilewise", "tensorwise"):
            raise ValueError(f"Fp8Recipe.scaling must be 'tilewise' or 'tensorwise', got {self.scaling!r}")
        if self.grad_blocks and self.scaling != "tilewise":
            raise ValueError("Fp8Recipe.grad_blocks only applies to the 'tilewise' recipe")

    @property
    def act(self) -> Granularity:
        return "tile" if self.scaling == "tilewise" else "tensor"

    @property
    def weight(self) -> Granularity:
        return "block" if self.scaling == "tilewise" else "tensor"

    @property
    def grad(self) -> Granularity:
        return self.weight if self.grad_blocks else self.act


def _scaled_gemm(a: torch.Tensor, a_gran: Granularity, bt: torch.Tensor, bt_gran: Granularity, pow2: bool) -> torch.Tensor:
    """Q(a) Q(bt)^T through torch._scaled_mm, both operands quantised along their last (contraction) dim.

    On CUDA, cuBLAS wants M and N in multiples of 16 and (1x128/128x128 scales) K in whole tiles: the operands
    are zero-padded to that and the product cut back. Zero rows and columns change no amax and add nothing.
    """
    m, n = a.shape[0], bt.shape[0]
    if a.is_cuda:
        a, bt = F.pad(a, (0, -a.shape[1] % TILE, 0, -m % 16)), F.pad(bt, (0, -bt.shape[1] % TILE, 0, -n % 16))
    aq, sa = _QUANTIZE[a_gran](a, pow2_scales=pow2)
    bq, sb = _QUANTIZE[bt_gran](bt, pow2_scales=pow2)
    # cuBLAS layouts: 1x128 scales of the lhs are outer-dim-major; the rhs is bt^T, column-major, and its scales
    # are given transposed with it (1x128 ones outer-dim-major again, 128x128 ones as a view of the row-major grid).
    if a_gran == "tile":
        sa = sa.t().contiguous().t()
    if bt_gran == "tile":
        sb = sb.t().contiguous()
    elif bt_gran == "block":
        sb = sb.t()
    out = torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    return out[:m, :n]


def _fp8_gemm(a: torch.Tensor, a_gran: Granularity, bt: torch.Tensor, bt_gran: Granularity, pow2: bool,
              backend: str) -> torch.Tensor:
    """Q(a) Q(bt)^T in fp32, a [M, K] and bt [N, K] quantised along K: the one GEMM all three passes reduce to."""
    if backend == "scaled_mm":
        return _scaled_gemm(a, a_gran, bt, bt_gran, pow2)
    return quantize_dequantize(a, a_gran, pow2) @ quantize_dequantize(bt, bt_gran, pow2).T


@functools.cache
def _scaled_mm_matches(device: str, recipe: Fp8Recipe) -> bool:
    """Whether torch._scaled_mm runs the recipe's three operand pairings on `device` and agrees with emulation."""
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(256, 256, generator=g).to(device) for _ in range(2))
    pairs = ((recipe.act, recipe.weight), (recipe.grad, recipe.weight), (recipe.grad, recipe.act))
    try:
        return all(torch.allclose(_scaled_gemm(a, ga, b, gb, recipe.pow2_scales),
                                  _fp8_gemm(a, ga, b, gb, recipe.pow2_scales, "emulate"), rtol=1e-4, atol=1e-3)
                   for ga, gb in pairs)
    except (RuntimeError, ValueError, NotImplementedError):  # torch's refusals: unsupported layout, dtype or CUDA build
        return False


def _scaled_mm_supported(device: torch.device, recipe: Fp8Recipe) -> bool:
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < ((9, 0) if recipe.scaling == "tilewise" else (8, 9)):
            return False
    elif device.type != "cpu" or recipe.scaling == "tilewise":  # CPU kernels take per-tensor and row-wise scales only
        return False
    # grad_blocks makes dgrad a 128x128 x 128x128 product, a pairing no cuBLAS kernel takes.
    return not recipe.grad_blocks and _scaled_mm_matches(str(device), recipe)


def resolve_backend(name: str, device: torch.device | str, recipe: Fp8Recipe) -> str:
    """The backend to run for `name` in {auto, emulate, scaled_mm}; "auto" takes scaled_mm only where it is known to work."""
    if name == "emulate":
        return name
    if name not in ("auto", "scaled_mm"):
        raise ValueError(f"FP8 backend must be 'auto', 'emulate' or 'scaled_mm', got {name!r}")
    supported = _scaled_mm_supported(torch.device(device), recipe)
    if name == "scaled_mm" and not supported:
        raise ValueError(f"torch._scaled_mm cannot run the {recipe} on {device}; use backend='emulate'")
    return "scaled_mm" if supported else "emulate"


@dataclass
class Fp8Op:
    """One FP8 op in a model: its recipe, resolved backend, monitor name and (optional) monitor."""

    recipe: Fp8Recipe = Fp8Recipe()
    backend: str = "emulate"
    name: str = ""
    monitor: Fp8Monitor | None = None

    @property
    def watching(self) -> bool:
        return self.monitor is not None and self.monitor.active

    def observe(self, kind: str, x: torch.Tensor, granularity: Granularity, parts: tuple[int, ...] | None = None,
                dim: int = -1) -> None:
        if self.watching:
            x = x.detach()
            self.monitor.record(self.name, kind, x, quantize_dequantize(x, granularity, self.recipe.pow2_scales, parts, dim))


def _split(t: torch.Tensor, parts: tuple[int, ...] | None, dim: int) -> tuple[torch.Tensor, ...]:
    """The stacked tensors of t along `dim` (t alone without parts)."""
    return (t,) if parts is None else t.split(parts, dim)


def _linear_grads(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, op: Fp8Op, need_dx: bool, need_dw: bool,
                  w_deq: torch.Tensor | None, parts: tuple[int, ...] | None = None):
    """dgrad Q(dy) Q(W) (dy tiles along N, W^T blocks) and wgrad Q(dy^T) Q(x^T)^T (tiles along tokens), 2-D x, dy.

    Emulated, dgrad reuses `w_deq`, the forward's dequantised Q(W) (the 128x128 blocks of W^T are W's blocks
    transposed, and a per-tensor scale is the same), so each weight is quantised once per step instead of twice.
    scaled_mm runs one GEMM per stacked weight of `parts`: each needs scales of its own.
    """
    r, p = op.recipe, op.recipe.pow2_scales
    dx = dw = None
    if op.backend == "emulate":
        if need_dx:
            dx = quantize_dequantize(dy, r.grad, p, parts, -1) @ w_deq
        if need_dw:
            dw = quantize_dequantize(dy.t(), r.grad, p, parts, 0) @ quantize_dequantize(x.t(), r.act, p).t()
        return dx, dw
    dys = _split(dy, parts, 1)
    if need_dx:
        dx = sum(_fp8_gemm(d, r.grad, w.float().t(), r.weight, p, op.backend) for d, w in zip(dys, _split(weight, parts, 0)))
    if need_dw:
        dw = torch.cat([_fp8_gemm(d.t(), r.grad, x.t(), r.act, p, op.backend) for d in dys])
    return dx, dw


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T with all three GEMMs in FP8 (SPEC §3); saves x and W in their own precision."""

    @staticmethod
    def forward(ctx, x, weight, op, parts):
        ctx.op, ctx.parts = op, parts
        r, p = op.recipe, op.recipe.pow2_scales
        x2 = x.reshape(-1, x.shape[-1]).float()
        op.observe("act", x2, r.act)
        op.observe("weight", weight, r.weight, parts, 0)
        if op.backend == "emulate":
            w_deq = quantize_dequantize(weight.float(), r.weight, p, parts, 0)  # kept for dgrad
            y = quantize_dequantize(x2, r.act, p) @ w_deq.t()
        else:
            w_deq = None
            y = torch.cat([_fp8_gemm(x2, r.act, w.float(), r.weight, p, op.backend) for w in _split(weight, parts, 0)], 1)
        ctx.save_for_backward(x, weight, w_deq)
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x, weight, w_deq = ctx.saved_tensors
        op = ctx.op
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        op.observe("grad", dy2, op.recipe.grad, ctx.parts)
        dx, dw = _linear_grads(dy2, x.reshape(-1, x.shape[-1]).float(), weight, op, *ctx.needs_input_grad[:2],
                               w_deq=w_deq, parts=ctx.parts)
        return ((None if dx is None else dx.to(x.dtype).view(x.shape)), (None if dw is None else dw.to(weight.dtype)),
                None, None)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, recipe: Fp8Recipe = Fp8Recipe(), backend: str = "emulate",
               op: Fp8Op | None = None, parts: tuple[int, ...] | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T -> [..., N] in x's dtype, forward and backward in FP8 (SPEC §3).

    `op` (from `linglab.fp8_convert`) carries an already resolved backend and the monitor; otherwise one is made.
    `parts`: the sizes of the weights stacked along N in `weight`, each quantised as its own (module docstring).
    """
    return _Fp8Linear.apply(x, weight, op or Fp8Op(recipe, resolve_backend(backend, x.device, recipe)), parts)


def _padded_segments(offs: torch.Tensor, rows: int, mult: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Each expert segment padded to a multiple of `mult` rows: (new row of each old row, padded offs, total rows).

    Token-dim tiles then start at segment starts, so none mixes two experts' tokens.
    """
    ends = offs.long()
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded = (counts + mult - 1) // mult * mult
    padded_ends = padded.cumsum(0)
    expert = torch.searchsorted(ends, torch.arange(rows, device=offs.device), right=True)
    new_row = torch.arange(rows, device=offs.device) + (padded_ends - padded - (ends - counts))[expert]
    return new_row, padded_ends.to(torch.int32), int(padded_ends[-1])


def _scatter_rows(x: torch.Tensor, new_row: torch.Tensor, total: int) -> torch.Tensor:
    return x.new_zeros(total, x.shape[1]).index_copy_(0, new_row, x)


def _grouped_grads(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, recipe: Fp8Recipe,
                   need_dx: bool, need_dw: bool, w_deq: torch.Tensor | None = None,
                   parts: tuple[int, ...] | None = None):
    """dgrad and wgrad of the grouped GEMM x[seg_e] @ w[e], all operands quantised as in `_linear_grads`.

    `w_deq`: the forward's dequantised Q(w), reused by dgrad instead of quantising w again. `parts`: the weights
    stacked along N, whose slices of dy are quantised apart.
    """
    r, p = recipe, recipe.pow2_scales
    dy = dy.float().contiguous()
    new_row, padded_offs, total = _padded_segments(offs, x.shape[0], TILE)
    dy_pad = _scatter_rows(dy, new_row, total)
    if r.grad == "block":  # 128x128 blocks along tokens must not cross experts either; dgrad and wgrad share them
        dy_wgrad = quantize_dequantize(dy_pad, "block", p, parts, -1)
        dy_dgrad = dy_wgrad.index_select(0, new_row)
    else:
        dy_wgrad = quantize_dequantize(dy_pad.t(), r.grad, p, parts, 0).t().contiguous()
        dy_dgrad = quantize_dequantize(dy, r.grad, p, parts, -1)
    dx = dw = None
    if need_dx:
        w_q = quantize_dequantize(w.float(), r.weight, p, parts, -1) if w_deq is None else w_deq
        dx = torch._grouped_mm(dy_dgrad, w_q.transpose(1, 2).contiguous(), offs=offs)
    if need_dw:
        # wgrad contracts over each expert's own tokens: x^T tiles along the padded token dim; zero rows add nothing.
        x_t = quantize_dequantize(_scatter_rows(x.float(), new_row, total).t(), r.act, p)
        dw = torch._grouped_mm(x_t, dy_wgrad, offs=padded_offs)
    return dx, dw


class _Fp8GroupedMM(torch.autograd.Function):
    """Segment-wise x[seg_e] @ w[e] (w [E, K, N]) with all three GEMMs in FP8, emulated, grouped via _grouped_mm."""

    @staticmethod
    def forward(ctx, x, w, offs, op, parts):
        ctx.op, ctx.parts = op, parts
        r, p = op.recipe, op.recipe.pow2_scales
        op.observe("act", x, r.act)
        op.observe("weight", w, r.weight, parts, -1)
        # Blocks of w[e] [K, N] are the transposed blocks of the stored [N, K] expert weight: the same numbers.
        w_deq = quantize_dequantize(w.float(), r.weight, p, parts, -1)
        ctx.save_for_backward(x, w, offs, w_deq)  # w_deq is reused by dgrad: one weight quantisation per step
        y = torch._grouped_mm(quantize_dequantize(x.float(), r.act, p), w_deq, offs=offs)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs, w_deq = ctx.saved_tensors
        ctx.op.observe("grad", dy, ctx.op.recipe.grad, ctx.parts)
        dx, dw = _grouped_grads(dy, x, w, offs, ctx.op.recipe, *ctx.needs_input_grad[:2], w_deq=w_deq, parts=ctx.parts)
        return (None if dx is None else dx.to(x.dtype)), (None if dw is None else dw.to(w.dtype)), None, None, None


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, recipe: Fp8Recipe = Fp8Recipe(),
                   backend: str = "emulate", op: Fp8Op | None = None, parts: tuple[int, ...] | None = None) -> torch.Tensor:
    """FP8 `torch._grouped_mm(x, w, offs=offs)`: x [T, K] sorted by expert, w [E, K, N], offs int32 ends, offs[-1] == T.

    Only the emulate backend exists ("auto" picks it). K and N must be multiples of 4 (_grouped_mm's 16-byte strides).
    `parts`: the sizes of the weights stacked along N in every w[e], each quantised as its own (module docstring).
    """
    backend = op.backend if op is not None else backend
    if backend not in ("auto", "emulate"):
        raise ValueError(f"fp8_grouped_mm has only the 'emulate' backend, got {backend!r}")
    return _Fp8GroupedMM.apply(x, w, offs, op or Fp8Op(recipe, "emulate"), parts)


def _swiglu(gate: torch.Tensor, up: torch.Tensor, row_weights: torch.Tensor | None) -> torch.Tensor:
    h = F.silu(gate)
    h.mul_(up)  # in place: h is the only full-size intermediate
    if row_weights is not None:
        h.mul_(row_weights.unsqueeze(-1).to(h.dtype))
    return h


def swiglu_quantize(gate_up: torch.Tensor, tile: int = TILE, pow2_scales: bool = False,
                    row_weights: torch.Tensor | None = None, granularity: Granularity = "tile"):
    """SwiGLU then quantisation, the down projection's input (SPEC §3 fusion): gate_up [M, 2I] -> (q, scale) of h [M, I].

    gate is the first I columns and up the last I, as GroupedExperts splits them; `row_weights` [M] (the MoE routing
    weights) scale each row of h before it is quantised. Equal bit for bit to quantize_tilewise(silu(gate) * up).
    """
    gate, up = gate_up.chunk(2, dim=-1)
    h = _swiglu(gate, up, row_weights)
    if granularity == "tile":
        return quantize_tilewise(h, tile, pow2_scales)
    return _QUANTIZE[granularity](h, pow2_scales=pow2_scales)


def _swiglu_qdq_tilewise(gate_up: torch.Tensor, row_weights: torch.Tensor | None, pow2_scales: bool) -> torch.Tensor:
    return _qdq_tilewise(_swiglu(*gate_up.float().chunk(2, dim=-1), row_weights), pow2_scales)


def _swiglu_qdq_per_tensor(gate_up: torch.Tensor, row_weights: torch.Tensor | None, pow2_scales: bool) -> torch.Tensor:
    return _qdq_per_tensor(_swiglu(*gate_up.float().chunk(2, dim=-1), row_weights), pow2_scales)


# The down projection's input as its GEMM sees it: SwiGLU, routing weight, quantise, dequantise in one fused kernel.
_SWIGLU_QDQ = {"tile": _Fused(_swiglu_qdq_tilewise), "tensor": _Fused(_swiglu_qdq_per_tensor)}


class _Fp8SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up [* routing weight]) in FP8 with the SwiGLU fused into the input quantisation (SPEC §3).

    Only gate_up is saved: backward recomputes h (as Ling recomputes its SwiGLU), runs dgrad/wgrad of the down
    projection in FP8, then differentiates the SwiGLU in high precision. `offs` set: routed experts (grouped GEMM).
    """

    @staticmethod
    def forward(ctx, gate_up, weight, row_weights, offs, op):
        ctx.op = op
        r, p = op.recipe, op.recipe.pow2_scales
        if offs is None and op.backend == "scaled_mm":  # a real FP8 GEMM, which quantises h (padded) itself
            ctx.save_for_backward(gate_up, weight, row_weights, offs, None)
            h = _swiglu(*gate_up.float().chunk(2, dim=-1), row_weights)
            op.observe("act", h, r.act)
            op.observe("weight", weight, r.weight)
            return _scaled_gemm(h, r.act, weight.float(), r.weight, p).to(gate_up.dtype)
        h_deq = _SWIGLU_QDQ[r.act](gate_up, row_weights, p)
        if op.watching:  # the monitor quantises h itself, so it needs h before quantisation
            op.observe("act", _swiglu(*gate_up.float().chunk(2, dim=-1), row_weights), r.act)
        op.observe("weight", weight, r.weight)
        w_deq = quantize_dequantize(weight.float(), r.weight, p)
        ctx.save_for_backward(gate_up, weight, row_weights, offs, w_deq)  # w_deq: reused by dgrad
        y = h_deq @ w_deq.t() if offs is None else torch._grouped_mm(h_deq, w_deq, offs=offs)
        return y.to(gate_up.dtype)

    @staticmethod
    def backward(ctx, dy):
        gate_up, weight, row_weights, offs, w_deq = ctx.saved_tensors
        op = ctx.op
        dy = dy.float().contiguous()
        op.observe("grad", dy, op.recipe.grad)
        with torch.enable_grad():
            gu = gate_up.detach().float().requires_grad_()
            rw = None if row_weights is None else row_weights.detach().float().requires_grad_()
            gate, up = gu.chunk(2, dim=-1)
            h = F.silu(gate) * up * (1.0 if rw is None else rw.unsqueeze(-1))
        if offs is None:
            dh, dw = _linear_grads(dy, h.detach(), weight, op, True, ctx.needs_input_grad[1], w_deq=w_deq)
        else:
            dh, dw = _grouped_grads(dy, h.detach(), weight, offs, op.recipe, True, ctx.needs_input_grad[1], w_deq=w_deq)
        inputs = (gu,) if rw is None else (gu, rw)
        grads = torch.autograd.grad(h, inputs, dh)
        d_gate_up = grads[0].to(gate_up.dtype)
        d_rw = None if rw is None else grads[1].to(row_weights.dtype)
        return d_gate_up, (None if dw is None else dw.to(weight.dtype)), d_rw, None, None


def fp8_swiglu_down(gate_up: torch.Tensor, weight: torch.Tensor, op: Fp8Op, row_weights: torch.Tensor | None = None,
                    offs: torch.Tensor | None = None) -> torch.Tensor:
    """The down projection of a SwiGLU FFN in FP8: gate_up [M, 2I] -> [M, H].

    Dense or shared expert: weight is the nn.Linear weight [H, I]. Routed experts: weight is [E, I, H] as
    `_grouped_mm` takes it, `offs` the expert segment ends and `row_weights` the routing weight of each row.
    """
    shape = gate_up.shape
    out = _Fp8SwiGLUDown.apply(gate_up.reshape(-1, shape[-1]), weight, row_weights, offs, op)
    return out.view(*shape[:-1], out.shape[-1])


class Fp8Monitor:
    """The safeguard monitor (SPEC §3): underflow and distortion of every FP8 operand, per op and layer.

    Inactive by default (zero cost). `with monitor.sampling():` around one training step records, for every
    FP8 op, the tensors it quantises ("act", "weight", "grad") as `{op: {kind: (underflow, distortion)}}`.
    """

    def __init__(self):
        self.active = False
        self.stats: dict[str, dict[str, tuple[float, float]]] = {}

    @contextlib.contextmanager
    def sampling(self):
        self.active, self.stats = True, {}
        try:
            yield self
        finally:
            self.active = False

    @torch.no_grad()
    def record(self, name: str, kind: str, x: torch.Tensor, x_deq: torch.Tensor) -> None:
        """One tensor of op `name` and its quantise -> dequantise reconstruction."""
        stats = (float(underflow_fraction(x, x_deq)), float(distortion(x, x_deq)))
        ops = self.stats.setdefault(name, {})
        if kind in ops:  # an op called twice in a step (gradient accumulation): keep the worse numbers
            stats = (max(stats[0], ops[kind][0]), min(stats[1], ops[kind][1]))
        ops[kind] = stats

    def warnings(self, underflow_warn: float, distortion_warn: float) -> dict[tuple[str, str], str]:
        """{(op, tensor kind): one line} for every op and tensor kind past a threshold."""
        return {(name, kind): f"fp8 monitor: {name} {kind}: underflow {underflow:.2%}, distortion (cosine) {cos:.5f}"
                for name, ops in self.stats.items() for kind, (underflow, cos) in ops.items()
                if underflow > underflow_warn or cos < distortion_warn}


def underflow_fraction(x: torch.Tensor, x_deq: torch.Tensor) -> torch.Tensor:
    """Fraction of the nonzero elements of x that quantise to exactly 0 (SPEC §3 monitor); 0 if x has none."""
    nonzero = x != 0
    return (nonzero & (x_deq == 0)).sum() / nonzero.sum().clamp(min=1)


def distortion(x: torch.Tensor, x_deq: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of x and its reconstruction, flattened, accumulated in fp64 (SPEC §3 monitor); 1 is lossless."""
    a, b = x.double().flatten(), x_deq.double().flatten()
    norms = a.norm() * b.norm()
    # Two zero tensors are the same tensor; a zero and a nonzero one share no direction.
    return torch.where(norms > 0, (a @ b) / norms, (a.norm() == b.norm()).double())


def quantization_stats(x: torch.Tensor, granularity: Granularity, recipe: Fp8Recipe = Fp8Recipe()) -> dict[str, torch.Tensor]:
    """{"underflow", "distortion"} of x quantised at `granularity` with the recipe's scale rounding (0-dim tensors)."""
    x_deq = quantize_dequantize(x, granularity, recipe.pow2_scales)
    return {"underflow": underflow_fraction(x, x_deq), "distortion": distortion(x, x_deq)}
