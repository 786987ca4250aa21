"""Mixed precision (`train.precision`, SPEC §3, §7): bf16 compute on fp32 master weights, through torch.autocast.

Ling trains in BF16 and measures its FP8 runs against BF16 (SPEC §3). Here `train.precision=bf16` runs the training
forward under `torch.autocast(dtype=bfloat16)`: the weights, their gradients, the AdamW state and the checkpoints stay
fp32, and each GEMM reads bf16 copies of its operands. Autocast, not explicit casts, because it leaves the model code
as it is (the model reads as the recipe): only the few places that must stay fp32 say so, with `full_precision`.

What stays fp32 (SPEC §3 "kept in high precision", §1.4, §8): the embedding lookup, the router (logits, sigmoid,
top-k, z-loss), the norms' statistics (RMSNorm computes in fp32 whatever its input), the losses (cross-entropy on
fp32 logits), the linear attention's decayed state and RoPE tables. Attention's softmax runs inside
scaled_dot_product_attention on bf16 q/k/v with fp32 statistics (every fused kernel, CPU and CUDA, accumulates the
softmax in fp32). `torch._grouped_mm` is not on autocast's list, so the routed experts cast their operands
themselves (`autocast_operands`). With FP8 on top (`linglab.fp8_convert`), an FP8 layer quantises its bf16 input
and multiplies with fp32 accumulation, and its output is bf16.

    with compute_precision("bf16", device):
        out = model(input_ids, targets=targets)
    out.loss.backward()              # outside autocast: backward follows the dtypes the forward chose
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def compute_precision(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context a training forward runs in: nothing for fp32, bf16 autocast on `device`'s type for bf16."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes GEMMs in on `device_type` right now; None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def full_precision(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off: what runs inside computes in the dtypes it is given (fp32 where the code asks for it)."""
    return torch.autocast(device_type, enabled=False)


def autocast_operands(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The operands of a GEMM autocast does not list (`torch._grouped_mm`), cast as autocast would cast them."""
    dtype = autocast_dtype(tensors[0].device.type)
    return tensors if dtype is None else tuple(t.to(dtype) for t in tensors)
