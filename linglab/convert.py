"""Conversion of a BailingMoeV2 checkpoint into a Ring-linear hybrid (BailingMoeLinearV2), as Ring-mini-linear-2.0
was made from Ling-mini-2.0 base (SPEC §8).

    linglab convert --to linear --ckpt runs/tiny/final --out ckpt/tiny-converted --layer-group-size 2 \
        --group-norm-size 2
    linglab train --preset tiny-linear --init-from ckpt/tiny-converted --out runs/tiny-converted   # continue

Every tensor the two families share is copied bit for bit: embeddings, norms, MoE (experts, gates, expert
biases), the MTP layer, lm_head, and the whole attention of the layers that stay softmax. A layer that becomes
linear keeps its query rows, QK-norms and `dense`; its K/V rows grow from GQA to one head per query head
(`expand_gqa_rows`: each K/V head repeated for the query heads that shared it, which is what GQA computed);
it gains `g_proj` and `g_norm` (`new_linear_tensors`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from linglab import checkpoint as ckpt
from linglab.config import ConfigError, ModelConfig
from linglab.errors import LinglabError
from linglab.model import build_model
from linglab.run import check_output
from linglab.tokenizer import copy_tokenizer_files


class ConvertError(LinglabError):
    """A checkpoint or shape the conversion cannot take."""


def hybrid_config(cfg: ModelConfig, layer_group_size: int, group_norm_size: int) -> ModelConfig:
    """The BailingMoeLinearV2 config of a converted BailingMoeV2 `cfg` (SPEC §8): the same keys plus the hybrid's.

    Refused with one line: a hybrid input, a group size that leaves no layer linear, and shapes a linear layer
    cannot take (nh * head_dim != hidden, group_norm_size not dividing the width).
    """
    if cfg.is_linear:
        raise ConvertError(f"convert: the checkpoint is already a hybrid (layer_group_size {cfg.layer_group_size}); "
                           "convert takes a BailingMoeV2 checkpoint")
    new = dataclasses.replace(cfg, layer_group_size=layer_group_size, group_norm_size=group_norm_size)
    if layer_group_size < 2 or layer_group_size > cfg.num_hidden_layers:
        # 1 makes every layer softmax (it closes its own group); above L every layer falls in the trailing group.
        raise ConvertError(f"convert: --layer-group-size {layer_group_size} leaves no layer linear in "
                           f"{cfg.num_hidden_layers} layers; use 2..{cfg.num_hidden_layers}")
    try:
        new.validate()
    except ConfigError as e:
        raise ConvertError(f"convert: {e}") from None
    return new


def expand_gqa_rows(qkv: torch.Tensor, nh: int, nkv: int, hd: int) -> torch.Tensor:
    """A softmax layer's query_key_value [(nh + 2 nkv) hd, H] as a linear layer's [3 nh hd, H]: the query rows as
    they are, then each K and each V head repeated nh / nkv times in place, so query head h meets the K/V head it
    used under GQA (head h // (nh / nkv), as `scaled_dot_product_attention(enable_gqa=True)` pairs them)."""
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=0)
    group = nh // nkv

    def repeat(rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(nkv, hd, -1).repeat_interleave(group, dim=0).reshape(nh * hd, -1)

    return torch.cat([q, repeat(k), repeat(v)], dim=0)


def new_linear_tensors(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The two tensors a linear layer has and a softmax layer lacks (SPEC §8).

    g_proj is zero, so the output gate sigmoid(g_proj(x)) starts at 0.5 on every channel for every input: the gate
    is neutral (no channel favoured), its slope is the steepest (0.25), so training moves it from the first step,
    and the conversion needs no random numbers (the same checkpoint converts to the same bytes). g_norm is ones,
    as every RMSNorm starts.
    """
    width = cfg.num_attention_heads * cfg.head_dim
    return {"g_proj.weight": torch.zeros(width, cfg.hidden_size), "g_norm.weight": torch.ones(width)}


def convert_tensors(tensors: dict[str, torch.Tensor], cfg: ModelConfig,
                    hybrid: ModelConfig) -> dict[str, torch.Tensor]:
    """HF-named tensors of BailingMoeV2 `cfg` -> those of the hybrid `hybrid`: shared tensors are the same objects,
    each linear layer's query_key_value expanded and its g_proj, g_norm added."""
    out = dict(tensors)
    for i in range(cfg.num_hidden_layers):
        if hybrid.layer_kind(i) != "linear":
            continue
        prefix = f"model.layers.{i}.attention."
        name = prefix + "query_key_value.weight"
        want = ((cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim, cfg.hidden_size)
        if name not in out or tuple(out[name].shape) != want:
            got = tuple(out[name].shape) if name in out else "missing"
            raise ConvertError(f"convert: {name} is {got}, expected {want} from config.json")
        out[name] = expand_gqa_rows(out[name], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        out.update({prefix + key: t for key, t in new_linear_tensors(cfg).items()})
    return out


def convert_to_linear(ckpt_dir: str | Path, out: str | Path, layer_group_size: int, group_norm_size: int = 1,
                      overwrite: bool = False) -> ModelConfig:
    """Convert checkpoint `ckpt_dir` into a BailingMoeLinearV2 checkpoint at `out` with its tokenizer files; the
    hybrid's config. Everything is read and checked (the input, the shapes, --out) before --out is touched, and
    the result is loaded into the hybrid model before it is written, so a written checkpoint always loads."""
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    cfg = ckpt.load_config_json(ckpt_dir)
    hybrid = hybrid_config(cfg, layer_group_size, group_norm_size)
    check_output(out, overwrite, "convert", inputs=[ckpt_dir])
    tensors = ckpt.load_hf_tensors(ckpt_dir)
    model = build_model(hybrid, device="meta").to_empty(device="cpu")
    ckpt.load_state_into(model, convert_tensors(tensors, cfg, hybrid), str(ckpt_dir))

    def write(tmp: Path) -> None:
        ckpt.write_model_files(model, tmp)
        copy_tokenizer_files(ckpt_dir, tmp)

    ckpt.write_atomically(out, write)
    return hybrid
