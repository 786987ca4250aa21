"""FP8 training applied to a built model from outside (SPEC §3), as torchtitan's float8 converter does.

`convert_to_fp8` picks the layers SPEC §3 runs in FP8 by their type and turns each, in place, into an FP8
subclass of that type: attention's query_key_value and dense (`Fp8Linear`), and a hybrid's linear layers' (SPEC §8)
query_key_value, g_proj and dense, every SwiGLU, i.e. the dense FFN
and the shared expert (`Fp8SwiGLU`), and the routed experts (`Fp8GroupedExperts`), the MTP layer's included.
What is none of these stays in high precision: embedding, lm_head, router gate, norms, MTP eh_proj, and the
linear attention itself (its decayed state is a sum over the whole sequence, kept in fp32 as the softmax is).
g_proj is one more H x H projection on the layer input, the shape of dense, so it runs in FP8 like the other
attention GEMMs (Ring-linear reports FP8 training of the whole model, SPEC §8). A converted
layer is the same object with the same Parameters, so optimizer state and checkpoints are unchanged; the
model code (`linglab.model`, `linglab.moe`) knows nothing of FP8 and the numerics (`linglab.fp8`) nothing of
the model.

`fp8_weight_names` is the same choice as parameter names: the FP8 export (`linglab.checkpoint`) stores exactly
these in E4M3 and FP8 rollouts quantise exactly these. Gate and up are separate weights everywhere, each in its
own 128x128 blocks (per expert for the routed experts), also where training runs them as one GEMM on
[gate; up]: the blocks of an export's `_scale_inv` are the blocks training used.

`convert_to_fp8_inference` is an FP8 inference engine's view of the same layers (the RL rollout engine,
`linglab.rl.rollout`): their weights are used as loaded, already the FP8 export's values, and their activations
are quantised at every call (dynamic, 1x128 tiles, E4M3), as an FP8 GEMM kernel does; forward only.

    model = build_model(cfg.model)
    convert_to_fp8(model, Fp8Recipe(), backend="auto", monitor=Fp8Monitor())   # before parallelising the model
    convert_to_fp8_inference(engine_model, Fp8Recipe())   # then load the FP8 export's dequantised weights into it
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from linglab.fp8 import (
    Fp8Monitor,
    Fp8Op,
    Fp8Recipe,
    fp8_grouped_mm,
    fp8_linear,
    fp8_swiglu_down,
    quantize_dequantize,
    resolve_backend,
)
from linglab.model import Attention, LinearAttention
from linglab.moe import GroupedExperts, SwiGLU, grouped_mm
from linglab.precision import autocast_dtype, full_precision


def _fp8_under_autocast(forward: Callable) -> Callable:
    """An FP8 layer's forward under bf16 autocast (`train.precision=bf16`, `linglab.precision`): it reads its input in
    bf16, as Ling's FP8 GEMMs read BF16 activations, and quantises from there; its GEMMs accumulate in fp32 with
    autocast off (autocast would round the dequantised FP8 operands to bf16), and its output comes out in bf16.
    Weights are quantised from the fp32 masters."""

    @functools.wraps(forward)
    def run(self, x: torch.Tensor, *args):
        dtype = autocast_dtype(x.device.type)
        if dtype is None:
            return forward(self, x, *args)
        with full_precision(x.device.type):
            return forward(self, x.to(dtype), *args)

    return run


class Fp8Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in FP8."""

    op: Fp8Op

    # Kept out of compiled blocks (train.compile), as every FP8 training layer here: the autograd Functions run as
    # they are, with their quantisers as their own fused kernels. Traced into a layer's graph, they gave the MTP
    # layer's FP8 weights wrong gradients (torch 2.13, CPU; the routed experts' grouped GEMM cannot be traced at all).
    @torch.compiler.disable
    @_fp8_under_autocast
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, op=self.op)


class Fp8SwiGLU(SwiGLU):
    """SwiGLU with all GEMMs in FP8 and the SwiGLU fused into the down projection's input quantisation."""

    gate_up_op: Fp8Op
    down_op: Fp8Op

    @torch.compiler.disable  # see Fp8Linear.forward
    @_fp8_under_autocast
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One GEMM on [gate; up], so x is quantised once; gate and up keep their own blocks (parts).
        gate, up = self.gate_proj.weight, self.up_proj.weight
        gate_up = fp8_linear(x, torch.cat([gate, up]), op=self.gate_up_op, parts=(gate.shape[0], up.shape[0]))
        return fp8_swiglu_down(gate_up, self.down_proj.weight, self.down_op)


class Fp8GroupedExperts(GroupedExperts):
    """The routed experts with all grouped GEMMs in FP8 (emulated: torch has no blockwise FP8 grouped GEMM)."""

    gate_up_op: Fp8Op
    down_op: Fp8Op

    @torch.compiler.disable  # see Fp8Linear.forward
    @_fp8_under_autocast
    def forward(self, x_sorted: torch.Tensor, weights_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)
        intermediate = self.gate_up_proj.shape[1] // 2
        gate_up = fp8_grouped_mm(x_sorted, self.gate_up_proj.transpose(1, 2), offs, op=self.gate_up_op,
                                 parts=(intermediate, intermediate))
        return fp8_swiglu_down(gate_up, self.down_proj.transpose(1, 2), self.down_op, row_weights=weights_sorted,
                               offs=offs)


def quantize_activation(x: torch.Tensor, recipe: Fp8Recipe) -> torch.Tensor:
    """x as an FP8 GEMM sees it: quantised along its last (contraction) dim at the recipe's activation granularity."""
    return quantize_dequantize(x, recipe.act, recipe.pow2_scales).to(x.dtype)


class Fp8InferenceLinear(nn.Linear):
    """nn.Linear of an FP8 inference engine: the loaded weight times the quantised input."""

    recipe: Fp8Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_activation(x, self.recipe), self.weight)


class Fp8InferenceSwiGLU(SwiGLU):
    """SwiGLU of an FP8 inference engine: x quantised once for gate and up, silu(gate) * up for down."""

    recipe: Fp8Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_activation(x, self.recipe)
        return self.down_proj(quantize_activation(F.silu(self.gate_proj(x)) * self.up_proj(x), self.recipe))


class Fp8InferenceGroupedExperts(GroupedExperts):
    """The routed experts of an FP8 inference engine: `GroupedExperts.forward` with both GEMM inputs quantised, the
    down projection's after the routing weight (as FP8 training's fused SwiGLU quantisation, `fp8_swiglu_down`)."""

    recipe: Fp8Recipe

    def forward(self, x_sorted: torch.Tensor, weights_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)
        x = quantize_activation(x_sorted, self.recipe)  # 1x128 tiles lie within a token, so never across experts
        gate, up = grouped_mm(x, self.gate_up_proj.transpose(1, 2), offs).chunk(2, dim=-1)
        h = F.silu(gate) * up * weights_sorted.unsqueeze(-1).to(gate.dtype)
        return grouped_mm(quantize_activation(h, self.recipe), self.down_proj.transpose(1, 2), offs)


def fp8_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, layer) of every layer whose GEMMs SPEC §3 runs in FP8, converted or not, chosen by type."""
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            yield f"{name}.query_key_value", module.query_key_value
            yield f"{name}.dense", module.dense
        elif isinstance(module, LinearAttention):
            yield f"{name}.query_key_value", module.query_key_value
            yield f"{name}.g_proj", module.g_proj
            yield f"{name}.dense", module.dense
        elif isinstance(module, (SwiGLU, GroupedExperts)):
            yield name, module


def fp8_weight_names(model: nn.Module) -> list[str]:
    """State-dict names of the FP8 GEMM weights (SPEC §3): every parameter of the `fp8_layers`."""
    return [f"{name}.{param}" for name, layer in fp8_layers(model) for param, _ in layer.named_parameters()]


def _become(layer: nn.Module, fp8_class: type[nn.Module]) -> None:
    """Turn `layer` into an `fp8_class`, the same object: its Parameters (optimizer state, checkpoints) stay."""
    base = fp8_class.__bases__[0]  # the model's layer type that fp8_class specialises
    if type(layer) not in (base, fp8_class):
        # A subclass's own forward (expert parallel's all-to-all, FSDP's hooks) would be lost.
        raise ValueError(f"convert_to_fp8: {type(layer).__name__} is not a plain {base.__name__}; "
                         "convert the model to FP8 before parallelising it")
    layer.__class__ = fp8_class


def convert_to_fp8(model: nn.Module, recipe: Fp8Recipe, backend: str = "auto", monitor: Fp8Monitor | None = None,
                   device: torch.device | str = "cpu") -> list[str]:
    """Put the GEMMs SPEC §3 names into FP8, in place; returns the converted op names (the monitor's).

    Weights stay in their dtype. Routed experts run in the grouped GEMM, which exists in emulation only.
    """
    backend = resolve_backend(backend, device, recipe)
    converted = []
    for name, layer in fp8_layers(model):
        if isinstance(layer, nn.Linear):
            _become(layer, Fp8Linear)
            layer.op = Fp8Op(recipe, backend, name, monitor)
            converted.append(name)
            continue
        experts = isinstance(layer, GroupedExperts)
        _become(layer, Fp8GroupedExperts if experts else Fp8SwiGLU)
        layer_backend = "emulate" if experts else backend
        layer.gate_up_op, layer.down_op = (Fp8Op(recipe, layer_backend, f"{name}.{part}", monitor)
                                           for part in ("gate_up_proj", "down_proj"))
        converted += [layer.gate_up_op.name, layer.down_op.name]
    return converted


def convert_to_fp8_inference(model: nn.Module, recipe: Fp8Recipe) -> list[str]:
    """Quantise the activations of every GEMM SPEC §3 runs in FP8 (the `fp8_layers`) at every call, in place, for
    inference; returns the converted layer names.

    The weights are used as they are: load FP8 weights (the FP8 export, dequantised) into the model, as an FP8
    inference engine loads an FP8 checkpoint. The arithmetic is FP8's emulated forward (`linglab.fp8`): the
    quantised activation times the weight in the model's dtype.
    """
    converted = []
    for name, layer in fp8_layers(model):
        _become(layer, Fp8InferenceLinear if isinstance(layer, nn.Linear) else
                Fp8InferenceGroupedExperts if isinstance(layer, GroupedExperts) else Fp8InferenceSwiGLU)
        layer.recipe = recipe
        converted.append(name)
    return converted
