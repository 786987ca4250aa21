"""Selective recompute (`train.recompute`, SPEC §3, §7): activation checkpointing applied to a built model from outside.

A recomputed module keeps only its inputs for backward and runs its forward again when backward reaches it
(`torch.utils.checkpoint`, non-reentrant): compute traded for activation memory. Ling recomputes the MTP layer's
transformer part, which it schedules apart from its loss part (SPEC §7), and the experts (SPEC §7 "faster expert
recompute"; SPEC §3: Ling's FP8 SwiGLU keeps only its input, as `linglab.fp8` does already):

    "none"     nothing recomputed
    "mtp"      the MTP layer's transformer part (`MTPLayer`: enorm/hnorm, eh_proj, its decoder layer, final norm)
    "experts"  every MoE's routed experts (grouped GEMMs, SwiGLU) and its shared expert, the MTP layer's included;
               routing, dispatch and combine are kept (their outputs are small, and the load counts live there)
    "full"     every decoder layer, the MTP layer included

Like `convert_to_fp8`, `apply_recompute` turns each chosen module into a subclass of its own type: the same object
with the same Parameters, so names, optimizer state and checkpoints are unchanged. Apply it after FP8 conversion, so
the recomputed forward is the FP8 one, and before parallelising: expert parallel's all-to-all and FSDP2's gathers
then stay outside the recomputed region, as torchtitan orders activation checkpointing before FSDP.

The recomputed forward runs the first one's ops on the same inputs, so losses and gradients equal those of no
recompute bit for bit (CPU kernels are deterministic; checkpoint replays the RNG and autocast state). It leaves no
trace: every buffer of the module is restored after it, so the MoE load counts (`tokens_per_expert`, which the
expert-bias update and MaxVio read, SPEC §1.4) count each token once, and the FP8 monitor does not sample it.

    apply_recompute(model, "mtp")        # after convert_to_fp8, before ParallelDims.parallelize
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from linglab.fp8 import Fp8Op
from linglab.model import LingForCausalLM

RECOMPUTE_MODES = ("none", "mtp", "experts", "full")


class Recomputed:
    """Mixin: the module's own forward under non-reentrant activation checkpointing while autograd records."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and sampling keep nothing for a backward
            return super().forward(*args, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), leaving_no_trace(self)), **kwargs)


@contextlib.contextmanager
def leaving_no_trace(module: nn.Module):
    """Around a recomputed forward: `module`'s buffers come out as they went in, and FP8 monitors inside it are off."""
    saved = [(b, b.clone()) for b in module.buffers()]
    monitors = {op.monitor for m in module.modules() for op in vars(m).values()
                if isinstance(op, Fp8Op) and op.monitor is not None and op.monitor.active}
    for monitor in monitors:
        monitor.active = False
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
        for monitor in monitors:
            monitor.active = True


@functools.cache
def _recomputed_class(cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` with its forward recomputed, made once per class (as FSDP2's fully_shard makes its classes)."""
    return type(f"Recomputed{cls.__name__}", (Recomputed, cls), {})


def recomputed_modules(model: LingForCausalLM, mode: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of what `mode` recomputes (module docstring)."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute: mode must be one of {RECOMPUTE_MODES}, got {mode!r}")
    names = {module: name for name, module in model.named_modules()}  # modules hash by identity
    if mode == "full":
        chosen = [*model.model.layers, *model.model.mtp_layers]
    elif mode == "mtp":
        chosen = list(model.model.mtp_layers)
    elif mode == "experts":
        chosen = [part for moe in model.moe_layers() for part in (moe.experts, moe.shared_experts) if part is not None]
    else:
        chosen = []
    return [(names[module], module) for module in chosen]


def apply_recompute(model: LingForCausalLM, mode: str) -> list[str]:
    """Recompute the modules `mode` names (`RECOMPUTE_MODES`), in place; returns their names."""
    chosen = recomputed_modules(model, mode)
    for _, module in chosen:
        if not isinstance(module, Recomputed):
            module.__class__ = _recomputed_class(type(module))
    return [name for name, _ in chosen]
