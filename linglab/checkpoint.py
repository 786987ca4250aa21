"""Checkpoints are Hugging Face BailingMoeV2 checkpoints (SPEC §1.6), or BailingMoeLinearV2 for a Ring-linear hybrid
(SPEC §8: its own architectures and model_type, the three hybrid keys, the linear layers' g_proj and g_norm).

A model directory holds `config.json` (the exact HF keys) and `model.safetensors` (the exact HF tensor
names and nn.Linear layouts, MTP at layer index num_hidden_layers). linglab stacks routed experts as
[E, out, in] in memory; `to_hf_state_dict` / `from_hf_state_dict` unstack and restack them.

    save_pretrained(model, "ckpt/")          # atomic: written to a temp dir, fsynced, renamed
    model = from_pretrained("ckpt/")          # also reads sharded `model.safetensors.index.json`

FP8 exports (`save_pretrained(model, dir, fp8=True)`, `export_checkpoint`) store the FP8 GEMM weights of SPEC §3
(`linglab.fp8_convert.fp8_weight_names`, the layers FP8 training converts) as E4M3 in 128x128 blocks with a
`<name>_scale_inv` fp32 tensor each; loading dequantises them to fp32.

Loading trusts nothing it reads (one-line CheckpointError otherwise): config.json must hold every SPEC §1.6 key with
its JSON type (`"use_qk_norm": "false"` is an error, not true; only OPTIONAL_CONFIG_KEYS may be absent), tensors
must have the dtypes the writer writes (float32; E4M3 weights with float32 scales in FP8 exports), the names and
shapes of the model, and finite values; a sharded checkpoint's index must agree with its shards.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import typing
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from linglab.config import ConfigError, ModelConfig
from linglab.errors import LinglabError
from linglab.fp8 import E4M3, TILE, dequantize_blockwise, quantize_blockwise
from linglab.fp8_convert import fp8_weight_names
from linglab.model import LingForCausalLM, build_model
from linglab.tokenizer import copy_tokenizer_files

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

# The two families and their class names (SPEC §1.6, §8); model_type decides which one a config.json describes.
ARCHITECTURES = {"bailing_moe": "BailingMoeV2ForCausalLM", "bailing_moe_linear": "BailingMoeLinearV2ForCausalLM"}
# The hybrid's keys (SPEC §8): written and required for bailing_moe_linear only, so a BailingMoeV2 config.json is
# exactly what it was before the hybrid existed.
LINEAR_KEYS = ("layer_group_size", "group_norm_size", "linear_silu")

# Keys whose values are fixed by the architecture (SPEC §1.6); written always, checked on load. The first two name
# the family: see ARCHITECTURES.
_FIXED_KEYS = {
    "architectures": ["BailingMoeV2ForCausalLM"],
    "model_type": "bailing_moe",
    "hidden_act": "silu",
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "use_bias": False,
    "use_qkv_bias": False,
    "norm_topk_prob": True,
    "score_function": "sigmoid",
    "router_dtype": "fp32",
    "moe_router_enable_expert_bias": True,
}
# SPEC §1.6: what an FP8 export adds to config.json; weights are dequantised as q * scale_inv per 128x128 block.
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [TILE, TILE]}
SCALE_SUFFIX = "_scale_inv"
_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_HF_EXPERT_KEY = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class CheckpointError(LinglabError):
    """A missing, corrupted or mismatched checkpoint."""


def hf_config_dict(cfg: ModelConfig) -> dict:
    """config.json contents: the fixed architecture keys plus every ModelConfig field (the LINEAR_KEYS only for a
    hybrid, under its own architectures and model_type)."""
    d = dict(_FIXED_KEYS)
    if cfg.is_linear:
        d["model_type"] = "bailing_moe_linear"
        d["architectures"] = [ARCHITECTURES["bailing_moe_linear"]]
    d.update({k: getattr(cfg, k) for k in ModelConfig.__dataclass_fields__ if cfg.is_linear or k not in LINEAR_KEYS})
    return d


# config.json keys linglab writes beyond SPEC §1.6 and reads with their defaults when absent (an HF checkpoint has
# no z-loss coefficient): they steer training and initialisation, never what a loaded model computes. Every other
# ModelConfig field and every fixed key is required: a default standing in for a missing rope_theta or use_qk_norm
# would silently change the logits.
OPTIONAL_CONFIG_KEYS = ("router_z_loss_coef", "initializer_range")


def _json_value(d: dict, key: str, typ: type, source: str):
    """d[key] if it has the JSON type of a `typ` field (an integer passes for a float; no strings for numbers or
    booleans) and, if a number, is finite; else a CheckpointError naming the key."""
    value = d[key]
    if typ is bool:
        ok, wanted = isinstance(value, bool), "true or false"
    elif typ is int:
        ok, wanted = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        wanted = "a finite number"
    if not ok:
        raise CheckpointError(f"{source}: {key} must be {wanted}, got {json.dumps(value)}")
    return typ(value)


def config_from_hf(d: dict, source: str = CONFIG_NAME) -> ModelConfig:
    """ModelConfig from a config.json dict, checked against the schema of SPEC §1.6 (and §8 for bailing_moe_linear):
    every key it names must be present with its JSON type (and the fixed keys with their one value); unknown HF
    extras are ignored, the hybrid's keys too in a bailing_moe file."""
    model_type = d.get("model_type", "bailing_moe")
    if model_type == "bailing_moe_v2":
        model_type = "bailing_moe"
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:  # another architecture first
        raise CheckpointError(f"{source}: model_type is {model_type!r}, expected 'bailing_moe' or 'bailing_moe_linear'")
    linear = model_type == "bailing_moe_linear"
    fields = {k: t for k, t in typing.get_type_hints(ModelConfig).items() if linear or k not in LINEAR_KEYS}
    required = [k for k in (*_FIXED_KEYS, *fields) if k not in OPTIONAL_CONFIG_KEYS]
    rotary_dim = None
    if "partial_rotary_factor" not in d and "rotary_dim" in d:  # Ling-1T writes rotary_dim instead (SPEC §1.1)
        rotary_dim = _json_value(d, "rotary_dim", int, source)
        required.remove("partial_rotary_factor")
    missing = [k for k in required if k not in d]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing key {missing[0]}{more}; SPEC §1.6 requires it")
    family = ARCHITECTURES[model_type]
    for key, value in {**_FIXED_KEYS, "architectures": [family]}.items():
        if key != "model_type" and (d[key] != value or type(d[key]) is not type(value)):
            raise CheckpointError(f"{source}: {key} is {json.dumps(d[key])}; {family.removesuffix('ForCausalLM')} as "
                                  f"linglab implements it has {json.dumps(value)}")
    cfg = ModelConfig()
    for key, typ in fields.items():
        if key in d:
            setattr(cfg, key, _json_value(d, key, typ, source))
    if rotary_dim is not None and cfg.head_dim >= 1:
        cfg.partial_rotary_factor = rotary_dim / cfg.head_dim
    if linear and cfg.layer_group_size < 1:
        raise CheckpointError(f"{source}: layer_group_size is {cfg.layer_group_size}; bailing_moe_linear needs >= 1 "
                              "(one softmax layer per group, SPEC §8)")
    try:
        cfg.validate()
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None
    return cfg


def to_hf_state_dict(model: LingForCausalLM, state_dict: dict[str, torch.Tensor] | None = None,
                     fp8: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors under their HF names, experts unstacked, all contiguous.

    `state_dict` replaces `model.state_dict()` where the model holds only shards (FSDP2, expert parallel):
    the full single-device state gathered from the ranks (`linglab.parallel.parallel_dims`). `fp8`: the FP8
    export's tensors (SPEC §1.6): each FP8 GEMM weight in E4M3 with its 128x128-block `_scale_inv` (q * scale_inv
    is the weight), per expert and with gate and up apart, as FP8 training quantises them.
    """
    n_layers = model.cfg.num_hidden_layers
    quantized = set(fp8_weight_names(model)) if fp8 else set()
    out = {}
    for name, t in (model.state_dict() if state_dict is None else state_dict).items():
        for hf_name, hf_t in _hf_tensors(name, t, n_layers):
            if name in quantized:
                out[hf_name], out[hf_name + SCALE_SUFFIX] = quantize_blockwise(hf_t, TILE)
            else:
                out[hf_name] = hf_t.contiguous()
    return out


def _hf_tensors(name: str, t: torch.Tensor, n_layers: int):
    """(HF name, tensor) of one internal tensor: the MTP layer at index n_layers, stacked experts one by one."""
    name = re.sub(r"^model\.mtp_layers\.(\d+)\.", lambda m: f"model.layers.{n_layers + int(m.group(1))}.", name)
    m = _EXPERT_KEY.match(name)
    if m and m.group(2) == "gate_up_proj":
        gate, up = t.chunk(2, dim=1)
        for e in range(t.shape[0]):
            yield f"{m.group(1)}.{e}.gate_proj.weight", gate[e]
            yield f"{m.group(1)}.{e}.up_proj.weight", up[e]
    elif m:
        for e in range(t.shape[0]):
            yield f"{m.group(1)}.{e}.{m.group(2)}.weight", t[e]
    else:
        yield name, t


def from_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict`: restack experts, move layer num_hidden_layers to mtp_layers."""
    n_layers = cfg.num_hidden_layers
    out, experts = {}, {}
    for name, t in sd.items():
        m = re.match(r"^model\.layers\.(\d+)\.(.*)$", name)
        if m and int(m.group(1)) >= n_layers:
            name = f"model.mtp_layers.{int(m.group(1)) - n_layers}.{m.group(2)}"
        m = _HF_EXPERT_KEY.match(name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
        else:
            out[name] = t
    stacked = {}
    for (prefix, proj), per_expert in experts.items():
        if sorted(per_expert) != list(range(cfg.num_experts)):
            raise CheckpointError(f"{prefix}.*.{proj}: found {len(per_expert)} experts, config says {cfg.num_experts}")
        stacked[(prefix, proj)] = torch.stack([per_expert[e] for e in range(cfg.num_experts)])
    for (prefix, proj), t in stacked.items():
        if proj == "down_proj":
            out[f"{prefix}.down_proj"] = t
        elif proj == "gate_proj":
            up = stacked.get((prefix, "up_proj"))
            if up is None or up.shape != t.shape:
                raise CheckpointError(f"{prefix}.*.up_proj.weight: missing or not shaped like gate_proj")
            out[f"{prefix}.gate_up_proj"] = torch.cat([t, up], dim=1)
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(out: Path, write) -> None:
    """Run write(tmp_dir), fsync its files, then rename tmp_dir to `out` (replacing an old `out`).

    A crash at any point leaves either the old directory or the complete new one, never a mix.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def dequantize_hf_state_dict(sd: dict[str, torch.Tensor], block: int, source: str) -> dict[str, torch.Tensor]:
    """Inverse of `to_hf_state_dict(..., fp8=True)`: fp32 q * scale_inv for every tensor with a scale, scales dropped."""
    out = {}
    for name, t in sd.items():
        if name.endswith(SCALE_SUFFIX):
            if name.removesuffix(SCALE_SUFFIX) not in sd:
                raise CheckpointError(f"checkpoint {source}: {name} has no weight {name.removesuffix(SCALE_SUFFIX)}")
            continue
        scale = sd.get(name + SCALE_SUFFIX)
        if scale is None:
            if t.dtype == E4M3:
                raise CheckpointError(f"checkpoint {source}: {name} is float8_e4m3fn but has no {name}{SCALE_SUFFIX}")
            out[name] = t
            continue
        if scale.dtype != torch.float32:
            raise CheckpointError(f"checkpoint {source}: {name}{SCALE_SUFFIX} is {scale.dtype}, expected torch.float32")
        if t.dtype != E4M3 or t.dim() != 2:
            raise CheckpointError(f"checkpoint {source}: {name} has a {SCALE_SUFFIX} but is a {t.dtype} tensor of "
                                  f"shape {tuple(t.shape)}, expected a 2-D float8_e4m3fn weight")
        want = tuple(-(-d // block) for d in t.shape)
        if tuple(scale.shape) != want:
            raise CheckpointError(f"checkpoint {source}: {name}{SCALE_SUFFIX} has shape {tuple(scale.shape)}, "
                                  f"expected {want} for {tuple(t.shape)} in {block}x{block} blocks")
        out[name] = dequantize_blockwise(t, scale, block)
    return out


def write_model_files(model: LingForCausalLM, directory: Path, fp8: bool = False,
                      state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """config.json + model.safetensors into an existing directory (no atomicity; see save_pretrained).

    `state_dict`: the full state to write when `model` holds only shards (see `to_hf_state_dict`).
    """
    directory = Path(directory)
    config, sd = hf_config_dict(model.cfg), to_hf_state_dict(model, state_dict, fp8)
    if fp8:
        config["quantization_config"] = FP8_QUANTIZATION_CONFIG
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_file(sd, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})


def save_pretrained(model: LingForCausalLM, out: str | Path, fp8: bool = False) -> None:
    """Write an HF BailingMoeV2 (or BailingMoeLinearV2) checkpoint directory atomically; `fp8` writes the FP8 export
    of SPEC §1.6."""
    write_atomically(Path(out), lambda tmp: write_model_files(model, tmp, fp8))


def export_checkpoint(ckpt: str | Path, out: str | Path, fp8: bool = False) -> None:
    """Re-save checkpoint `ckpt` at `out` (fp32, or the FP8 export of SPEC §1.6), atomically, with its tokenizer files.

    The source is loaded into a model first, so a checkpoint that would not load is never exported.
    """
    ckpt = Path(ckpt)
    model = from_pretrained(ckpt)

    def write(tmp: Path) -> None:
        write_model_files(model, tmp, fp8)
        copy_tokenizer_files(ckpt, tmp)

    write_atomically(Path(out), write)


def _read_config_dict(path: Path) -> dict:
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    if not cfg_file.is_file():
        raise CheckpointError(f"checkpoint {path}: missing {CONFIG_NAME}")
    try:
        d = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {cfg_file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"checkpoint {cfg_file}: expected a JSON object")
    return d


def load_config_json(path: str | Path) -> ModelConfig:
    """The ModelConfig of checkpoint directory `path`, every key checked (`config_from_hf`)."""
    path = Path(path)
    return config_from_hf(_read_config_dict(path), f"checkpoint {path / CONFIG_NAME}")


def _fp8_block_size(path: Path) -> int | None:
    """The weight block size of an FP8 export (SPEC §1.6), None for a checkpoint without quantization_config."""
    if not (path / CONFIG_NAME).is_file():  # a bare tensor directory: nothing says it is quantised
        return None
    q = _read_config_dict(path).get("quantization_config")
    if q is None:
        return None
    source = f"checkpoint {path / CONFIG_NAME}: quantization_config"
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        method = q.get("quant_method") if isinstance(q, dict) else q
        raise CheckpointError(f"{source} quant_method {method!r} is not supported (only 'fp8')")
    if q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{source} fmt {q['fmt']!r} is not supported (only 'e4m3')")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and block[0] == block[1] and isinstance(block[0], int)
            and block[0] >= 1):
        raise CheckpointError(f"{source} weight_block_size {block!r}: expected square blocks such as [128, 128]")
    return block[0]


def _shard_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of checkpoint `path` and, for a sharded one, its index's tensor -> shard map."""
    if (path / WEIGHTS_NAME).is_file() or not (path / INDEX_NAME).is_file():
        return [path / WEIGHTS_NAME], None
    source = f"checkpoint {path / INDEX_NAME}"
    try:
        index = json.loads((path / INDEX_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(shard, str) for shard in weight_map.values())):
        raise CheckpointError(f"{source}: expected a JSON object whose weight_map maps each tensor name to a shard file")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or not shard.endswith(".safetensors"):
            raise CheckpointError(f"{source}: shard {shard!r} is not a .safetensors file name in {path}")
    return [path / shard for shard in sorted(set(weight_map.values()))], weight_map


# What the writer writes: fp32 tensors, and in FP8 exports E4M3 weights (with fp32 scales, see dequantize_hf_state_dict).
_STORED_DTYPES = (torch.float32, E4M3)


def load_hf_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (single file or sharded with an index); FP8 exports come back in fp32.

    Refused with one line: a dtype the writer never writes (an I32 tensor is not cast), a sharded checkpoint whose
    index disagrees with its shards, and non-finite values in any tensor.
    """
    path = Path(path)
    files, weight_map = _shard_files(path)
    sd, shard_of = {}, {}
    for f in files:
        if not f.is_file():
            named = f" (named in {INDEX_NAME})" if weight_map is not None else ""
            raise CheckpointError(f"checkpoint {path}: missing {f.name}{named}")
        try:
            tensors = load_file(str(f))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint {f}: corrupted or not a safetensors file ({e})") from None
        for name, t in tensors.items():
            if name in sd:
                raise CheckpointError(f"checkpoint {path}: tensor {name} is in both {shard_of[name]} and {f.name}")
            if t.dtype not in _STORED_DTYPES:
                raise CheckpointError(f"checkpoint {f}: {name} is {str(t.dtype).removeprefix('torch.')}; linglab "
                                      "checkpoints hold float32 (and float8_e4m3fn FP8 weights)")
            sd[name], shard_of[name] = t, f.name
    if weight_map is not None and weight_map != shard_of:
        name = next(n for n in (*weight_map, *shard_of) if weight_map.get(n) != shard_of.get(n))
        where = f"it is in {shard_of[name]}" if name in shard_of else "no shard holds it"
        raise CheckpointError(f"checkpoint {path / INDEX_NAME}: says {name} is in {weight_map.get(name)}, but {where}")
    block = _fp8_block_size(path)
    if block is not None:
        sd = dequantize_hf_state_dict(sd, block, str(path))
    else:
        # Without quantization_config, E4M3 bytes would load as if they were the weights themselves.
        fp8 = next((name for name, t in sd.items() if t.dtype == E4M3), None)
        if fp8 is not None:
            raise CheckpointError(f"checkpoint {path}: {fp8} is float8_e4m3fn but {CONFIG_NAME} has no "
                                  "quantization_config")
    for name, t in sd.items():
        if not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"checkpoint {path}: {name} holds {bad} non-finite value(s) (nan or inf)")
    return sd


def load_state_into(model: LingForCausalLM, hf_tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy HF-named tensors into `model`, checking names and shapes first (one-line errors)."""
    model.load_state_dict(checked_state_dict(hf_tensors, model.cfg, model.state_dict(), source), strict=True)


def checked_state_dict(hf_tensors: dict[str, torch.Tensor], cfg: ModelConfig, expected: dict[str, torch.Tensor],
                       source: str) -> dict[str, torch.Tensor]:
    """HF-named tensors as a state dict with the names, shapes and dtypes of `expected` (one-line errors otherwise).

    `expected` is a single-device model's state dict; a sharded model checks against one built on the meta device.
    """
    sd = from_hf_state_dict(hf_tensors, cfg)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint {source}: missing tensor {to_hf_name(missing[0], cfg)}{more}")
    if unexpected:
        raise CheckpointError(f"checkpoint {source}: unexpected tensor {unexpected[0]} for this config")
    for k, t in sd.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            got, want = tuple(t.shape), tuple(expected[k].shape)
            m = _EXPERT_KEY.match(k)
            if m:  # report one expert's shape as the file stores it (gate and up apart)
                half = 2 if m.group(2) == "gate_up_proj" else 1
                got, want = (got[1] // half, got[2]), (want[1] // half, want[2])
            raise CheckpointError(f"checkpoint {source}: {to_hf_name(k, cfg)} has shape {got}, "
                                  f"the model expects {want}")
        if t.dtype != expected[k].dtype:  # never cast: an I32 tensor cast to fp32 loads as nonsense weights
            raise CheckpointError(f"checkpoint {source}: {to_hf_name(k, cfg)} is {t.dtype}, the model expects "
                                  f"{expected[k].dtype}")
    return sd


def to_hf_name(internal: str, cfg: ModelConfig) -> str:
    """The HF name of an internal tensor, for messages; stacked experts read as `experts.*.<proj>.weight`."""
    name = re.sub(r"^model\.mtp_layers\.(\d+)\.",
                  lambda m: f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.", internal)
    m = _EXPERT_KEY.match(name)
    if not m:
        return name
    return f"{m.group(1)}.*.{'gate_proj' if m.group(2) == 'gate_up_proj' else m.group(2)}.weight"


def from_pretrained(path: str | Path, device: str | torch.device = "cpu") -> LingForCausalLM:
    """Load an HF BailingMoeV2 or BailingMoeLinearV2 checkpoint directory into a LingForCausalLM.

    The model is built on the meta device and materialised empty, so no random init runs before the load
    overwrites every weight; the one non-persistent buffer, the MoE's `tokens_per_expert`, starts at zero.
    """
    cfg = load_config_json(path)
    tensors = load_hf_tensors(path)
    model = build_model(cfg, device="meta").to_empty(device=device)
    load_state_into(model, tensors, str(path))
    model.reset_load_counts()
    return model
