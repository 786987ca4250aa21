"""WSM checkpoint merging (SPEC §2): averaging checkpoints in place of an LR decay.

Ling 2.0 trains with warmup-stable-merge: the learning rate stays constant to the end, and the decay
phase is replaced by a weighted average of the last k+1 checkpoints theta_0..theta_k. Writing
delta_i = theta_i - theta_{i-1} for the k updates between them,

    sum_j c_j theta_j = theta_0 + sum_i w_i delta_i,   with   w_i = sum_{j>=i} c_j   (sum_j c_j = 1),

so a merge is exactly the point a run would reach by scaling its last k updates by a decay
1 >= w_1 >= ... >= w_k >= 0 (same update vectors; a real decayed run differs only at second order in
the LR). Conversely a target decay gives c_k = w_k, c_j = w_j - w_{j+1}, c_0 = 1 - w_1.

    c = merge_weights_from_decay(decay_schedule("cosine", k=len(dirs) - 1))
    merge_checkpoints(dirs, c, "run/merged")          # a normal checkpoint dir: from_pretrained() reads it

Every tensor is merged, including the fp32 router `...mlp.gate.expert_bias`: it is a buffer (moved by
the balancing rule, not the optimizer), and averaging it is the natural choice, as the merged router
weights are averages too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from linglab.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_config_json, load_hf_tensors, write_atomically
from linglab.errors import LinglabError
from linglab.tokenizer import copy_tokenizer_files

DECAY_KINDS = ("linear", "cosine", "sqrt")
_SUM_TOLERANCE = 1e-6


def _check_decay(decay: Sequence[float]) -> list[float]:
    w = [float(x) for x in decay]
    for i, x in enumerate(w, start=1):
        if not (0.0 <= x <= 1.0):  # also rejects NaN
            raise LinglabError(f"merge: decay w_{i} = {x} is outside [0, 1]")
        if i > 1 and x > w[i - 2]:
            raise LinglabError(f"merge: decay must be non-increasing, but w_{i} = {x} > w_{i - 1} = {w[i - 2]}")
    return w


def check_merge_weights(weights: Sequence[float], n: int | None = None) -> list[float]:
    """Merge coefficients as floats, checked: finite, >= 0, summing to 1 (and `n` of them if given)."""
    c = [float(x) for x in weights]
    if not c:
        raise LinglabError("merge: no merge weights given")
    if n is not None and len(c) != n:
        raise LinglabError(f"merge: {len(c)} merge weights for {n} checkpoints")
    for j, x in enumerate(c):
        if not (math.isfinite(x) and x >= 0.0):
            raise LinglabError(f"merge: weight c_{j} = {x} must be finite and >= 0")
    total = math.fsum(c)
    if abs(total - 1.0) > _SUM_TOLERANCE:
        raise LinglabError(f"merge: weights must sum to 1, they sum to {total:.8g}")
    return c


def merge_weights_from_decay(decay: Sequence[float]) -> list[float]:
    """Coefficients c_0..c_k over theta_0..theta_k that realise the decay w_1..w_k (SPEC §2).

    c_0 = 1 - w_1, c_j = w_j - w_{j+1}, c_k = w_k; an empty decay (k = 0) gives [1.0].
    """
    w = _check_decay(decay)
    # With the conventions w_0 = 1 and w_{k+1} = 0 all three cases are one difference.
    padded = [1.0, *w, 0.0]
    return [padded[j] - padded[j + 1] for j in range(len(w) + 1)]


def decay_from_merge_weights(c: Sequence[float]) -> list[float]:
    """The decay w_1..w_k that merging theta_0..theta_k with weights c applies: w_i = sum_{j>=i} c_j (SPEC §2)."""
    c = check_merge_weights(c)
    w, tail = [], 0.0
    for x in reversed(c[1:]):
        tail += x
        w.append(min(tail, 1.0))  # a sum within tolerance of 1 may round just above it
    return w[::-1]


def decay_schedule(kind: str, k: int) -> list[float]:
    """A named target decay w_1..w_k over the last k updates, with s_i = i / (k + 1):

    - "linear": w_i = 1 - s_i. Its merge weights are all 1/(k+1): the plain mean of the checkpoints
      (SPEC §2, "a plain mean equals a linear decay").
    - "cosine": w_i = (1 + cos(pi * s_i)) / 2.
    - "sqrt":   w_i = 1 - sqrt(s_i) (the "1-sqrt" cooldown).

    s runs strictly inside (0, 1), so the decay ends above 0 and the newest checkpoint keeps a weight.
    """
    if kind not in DECAY_KINDS:
        raise LinglabError(f"merge: unknown decay '{kind}' (choose from: {', '.join(DECAY_KINDS)})")
    if k < 0:
        raise LinglabError(f"merge: the number of merged updates k must be >= 0, got {k}")
    s = [i / (k + 1) for i in range(1, k + 1)]
    if kind == "linear":
        return [1.0 - x for x in s]
    if kind == "cosine":
        return [0.5 * (1.0 + math.cos(math.pi * x)) for x in s]
    return [1.0 - math.sqrt(x) for x in s]


class _WeightedSum:
    """sum_j c_j * theta_j accumulated in fp64, one state dict at a time (only one checkpoint in memory).

    The first state dict fixes names, shapes and dtypes; the others must match it. Non-float tensors
    cannot be averaged and are taken from the last state dict.
    """

    def __init__(self) -> None:
        self.acc: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def add(self, sd: dict[str, torch.Tensor], weight: float, source: str) -> None:
        if not self.shapes:
            self.shapes = {k: tuple(t.shape) for k, t in sd.items()}
            self.dtypes = {k: t.dtype for k, t in sd.items()}
        missing = [k for k in self.shapes if k not in sd]
        if missing:
            raise LinglabError(f"merge: {source} has no tensor {missing[0]}")
        extra = [k for k in sd if k not in self.shapes]
        if extra:
            raise LinglabError(f"merge: {source} has an extra tensor {extra[0]}")
        for k, t in sd.items():
            if tuple(t.shape) != self.shapes[k]:
                raise LinglabError(f"merge: {source}: {k} has shape {tuple(t.shape)}, expected {self.shapes[k]}")
            if t.dtype != self.dtypes[k]:
                raise LinglabError(f"merge: {source}: {k} has dtype {t.dtype}, expected {self.dtypes[k]}")
            if not t.is_floating_point():
                self.acc[k] = t.clone()
            elif k in self.acc:
                self.acc[k].add_(t.double(), alpha=weight)
            else:
                self.acc[k] = t.double() * weight

    def result(self) -> dict[str, torch.Tensor]:
        return {k: t.to(self.dtypes[k]) for k, t in self.acc.items()}


def merge_state_dicts(state_dicts: list[dict[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_j weights[j] * state_dicts[j] per tensor, accumulated in fp64 and cast back to its dtype (SPEC §2)."""
    if not state_dicts:
        raise LinglabError("merge: no state dicts to merge")
    c = check_merge_weights(weights, len(state_dicts))
    total = _WeightedSum()
    for j, (sd, w) in enumerate(zip(state_dicts, c, strict=True)):
        total.add(sd, w, f"state dict {j}")
    return total.result()


def merge_checkpoints(ckpt_dirs: Sequence[str | Path], weights: Sequence[float], out_dir: str | Path) -> None:
    """Merge checkpoint directories theta_0..theta_k (oldest first) into a new checkpoint at `out_dir`.

    All inputs must have the same config.json content. The output, written atomically, holds the
    first input's config.json (less any FP8 quantization_config), the merged fp32 model.safetensors and
    copies of the last input's tokenizer files (tokenizer.json, tokenizer_config.json), those it has.
    """
    dirs = [Path(d) for d in ckpt_dirs]
    if not dirs:
        raise LinglabError("merge: no checkpoints to merge")
    c = check_merge_weights(weights, len(dirs))
    configs = []
    for d in dirs:
        load_config_json(d)  # one-line errors for a missing or invalid config
        configs.append(json.loads((d / CONFIG_NAME).read_text()))
    for d, cfg in zip(dirs[1:], configs[1:], strict=True):
        if cfg != configs[0]:
            key = next(k for k in sorted(set(cfg) | set(configs[0]), key=str) if cfg.get(k) != configs[0].get(k))
            raise LinglabError(f"merge: {d}/{CONFIG_NAME} differs from {dirs[0]}/{CONFIG_NAME} at '{key}'")

    total = _WeightedSum()
    for d, w in zip(dirs, c, strict=True):
        total.add(load_hf_tensors(d), w, str(d))
    merged = total.result()
    provenance = json.dumps({"checkpoints": [str(d) for d in dirs], "weights": c})

    def write(tmp: Path) -> None:
        # The merged tensors are full precision even when the inputs were FP8 exports (SPEC §1.6).
        config = {k: v for k, v in configs[0].items() if k != "quantization_config"}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        save_file(merged, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "wsm_merge": provenance})
        copy_tokenizer_files(dirs[-1], tmp)

    write_atomically(Path(out_dir), write)
