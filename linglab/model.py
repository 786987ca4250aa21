"""BailingMoeV2 (Ling 2.0) and its Ring-linear hybrid BailingMoeLinearV2 as single-device PyTorch, exact to SPEC §1
and §8.

Module and parameter names follow the HF checkpoint (SPEC §1.6), so the state dict maps onto a
BailingMoeV2 checkpoint with one change: routed experts are stacked ([E, out, in]) for the grouped GEMM
and unstacked by `linglab.checkpoint`.

    model = LingForCausalLM(cfg.model)
    logits = model(input_ids)                          # [B, T, V], main head
    out = model(input_ids, targets=targets)            # ModelOutput with loss = main + 0.1 * MTP (+ z-loss)
    logits = model(input_ids, cache=cache, pad=pad)    # decoding left-padded prompts of several lengths

The forward is a chain of named steps, one per pipeline unit: `embed`, `decoder_layer` (each returns its
router z-loss, summed in model order), `head_loss`, `mtp_transformer`, `mtp_loss`, then `total_loss`.
Parallelism (FSDP2, expert/pipeline parallel) wraps this model from outside (`linglab/parallel/`); a pipeline
stage is this model pruned to its units, running these same steps.

A hybrid (`cfg.layer_group_size > 0`, SPEC §8) swaps the attention of its linear layers for `LinearAttention`
(decayed linear attention from `linglab.linear_attention`); everything else, the MTP layer's softmax attention
included, is the BailingMoeV2 above. Its `KVCache` holds K/V for the softmax layers and a fixed-size state for each
linear layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from linglab.config import ModelConfig
from linglab.errors import LinglabError
from linglab.linear_attention import layer_decays, linear_attention_chunked, linear_attention_step
from linglab.moe import MoE, SwiGLU
from linglab.precision import full_precision


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32, learned weight initialised to 1 (SPEC §1.2)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GroupRMSNorm(nn.Module):
    """RMSNorm of each of `groups` equal slices of the last dim, in fp32, then one learned weight over the whole
    width (SPEC §8 g_norm): the linear layers' output norm, groups = group_norm_size."""

    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype, shape = x.dtype, x.shape
        x = x.float().reshape(*shape[:-1], self.groups, shape[-1] // self.groups)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.reshape(shape).to(dtype)


def rope_cos_sin(rope_dim: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [T, rope_dim] (or [B, T, rope_dim] for per-row positions [B, T]) for NeoX-style RoPE with
    frequencies over rope_dim (SPEC §1.3 step 3)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32, device=positions.device) / rope_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def padding_mask(pad: torch.Tensor, start: int, t: int) -> torch.Tensor:
    """Attention mask [B, 1, t, start + t] (True = attend) for queries at positions start..start+t-1 of rows whose
    first pad[b] positions are left padding: causal, and no real token sees a pad slot. A pad query sees itself
    only, so no row of the softmax is empty (an all-masked row would give NaN, and NaN * 0 still poisons)."""
    kpos = torch.arange(start + t, device=pad.device)
    qpos = torch.arange(start, start + t, device=pad.device)
    causal = kpos[None, :] <= qpos[:, None]  # [t, S]
    real_key = kpos[None, None, :] >= pad[:, None, None]  # [B, 1, S]
    return ((causal[None] & real_key) | (kpos[None, :] == qpos[:, None])[None])[:, None]


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rope_dim channels of each head (rotate-half pairs i with i + rope_dim/2); the rest pass.

    x: [B, T, heads, hd]; cos/sin: [T, rope_dim] or [B, T, rope_dim].
    """
    rope_dim = cos.shape[-1]
    rot, rest = x[..., :rope_dim], x[..., rope_dim:]
    x1, x2 = rot[..., : rope_dim // 2], rot[..., rope_dim // 2:]
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)
    rotated = rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([rotated, rest], dim=-1)


class KVCache:
    """The cache for incremental decoding, per layer kind (SPEC §8's "mixed cache"): keys and values
    [B, kv_heads, max_len, head_dim] for each softmax layer, growing with the sequence, and one fixed-size state
    [B, heads, head_dim, head_dim] for each linear layer, kept in fp32 as the recurrence computes it. An all-softmax
    model holds keys and values only."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        kinds = [cfg.layer_kind(i) for i in range(cfg.num_hidden_layers)]
        softmax = [i for i, kind in enumerate(kinds) if kind == "softmax"]
        linear = [i for i, kind in enumerate(kinds) if kind == "linear"]
        self.slot = {layer: j for j, layer in enumerate(softmax)} | {layer: j for j, layer in enumerate(linear)}
        shape = (len(softmax), batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        state = (len(linear), batch_size, cfg.num_attention_heads, cfg.head_dim, cfg.head_dim)
        self.state = torch.zeros(state, device=device, dtype=torch.float32)
        self.pos = 0  # tokens already cached
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax layer `layer`: write k/v [B, kv_heads, T, hd] at the current position; return everything cached
        so far."""
        t, j = k.shape[2], self.slot[layer]
        end = self.pos + t
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.k[j, :, :, self.pos:end] = k
        self.v[j, :, :, self.pos:end] = v
        return self.k[j, :, :, :end], self.v[j, :, :, :end]

    def linear_state(self, layer: int) -> torch.Tensor:
        """Linear layer `layer`'s state after the tokens cached so far (zeros before the first)."""
        return self.state[self.slot[layer]]

    def set_linear_state(self, layer: int, state: torch.Tensor) -> None:
        self.state[self.slot[layer]] = state

    def nbytes(self) -> int:
        """Bytes the cache holds: what decoding at this max_len costs in memory beyond the weights."""
        return self.k.nbytes + self.v.nbytes + self.state.nbytes


class SlotCache:
    """The continuous-batching engine's cache (`linglab.rl.engine`): `slots` independent sequences, each with its own
    length, in preallocated K/V [slots, kv_heads, max_len, hd] per softmax layer and one fp32 state per linear
    layer (SPEC §8's mixed cache, as `KVCache`). A model call on it is a `SlotBatch`: a packed prefill of whole
    sequences into empty slots, or one decode token for each of some slots."""

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int, device=None, dtype=torch.float32):
        self.cache = KVCache(cfg, slots, max_len, device=device, dtype=dtype)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # tokens cached per slot
        self.max_len = max_len

    def copy(self, src: int, dst: Sequence[int]) -> None:
        """Slots `dst` take slot `src`'s cached sequence: G responses to one prompt share its prefill."""
        index = torch.tensor(list(dst), device=self.lengths.device)
        for buffer in (self.cache.k, self.cache.v, self.cache.state):
            buffer[:, index] = buffer[:, src:src + 1].clone()
        self.lengths[index] = int(self.lengths[src])

    def nbytes(self) -> int:
        return self.cache.nbytes()


@dataclass
class SlotBatch:
    """One forward over a SlotCache. Prefill (`lengths` given): input [1, N] is whole sequences packed end to end,
    `lengths` tokens each (sum N), going into the empty `slots`; each attends only to itself (a block-diagonal causal
    mask; a linear layer runs each from a zero state) and counts positions from 0. Decode (`lengths` None): input
    [B, 1], one token for each of `slots`, at that slot's next position."""

    cache: SlotCache
    slots: torch.Tensor  # [n] slot of each sequence (prefill) or row (decode)
    lengths: list[int] | None = None

    @property
    def prefill(self) -> bool:
        return self.lengths is not None

    def positions(self) -> torch.Tensor:
        """RoPE positions: [N] for a prefill (each sequence from 0), [B, 1] for a decode step."""
        if self.prefill:
            return torch.cat([torch.arange(n, device=self.slots.device) for n in self.lengths])
        return self.cache.lengths[self.slots][:, None]

    def prefill_mask(self) -> torch.Tensor:
        """[1, 1, N, N]: causal within each packed sequence, nothing across them."""
        sequence = torch.repeat_interleave(torch.arange(len(self.lengths), device=self.slots.device),
                                           torch.tensor(self.lengths, device=self.slots.device))
        index = torch.arange(len(sequence), device=self.slots.device)
        return ((sequence[:, None] == sequence[None, :]) & (index[None, :] <= index[:, None]))[None, None]

    def offsets(self) -> list[tuple[int, int, int]]:
        """(slot, start, end) of each packed sequence in a prefill's input."""
        bounds = [0, *torch.tensor(self.lengths).cumsum(0).tolist()]
        return list(zip(self.slots.tolist(), bounds, bounds[1:]))

    def advance(self) -> None:
        if self.prefill:
            self.cache.lengths[self.slots] = torch.tensor(self.lengths, device=self.slots.device)
        else:
            self.cache.lengths[self.slots] += 1


class Attention(nn.Module):
    """Fused QKV -> QK-norm -> partial RoPE -> causal GQA -> dense (SPEC §1.3, in that order)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=False)
        self.use_qk_norm = cfg.use_qk_norm
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.dense = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` [B, 1, T, S] (True = attend) replaces the causal mask: left-padded rows (`padding_mask`)."""
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, self.nh + 2 * self.nkv, self.hd)
        q, k, v = qkv.split([self.nh, self.nkv, self.nkv], dim=2)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]
        if isinstance(cache, SlotBatch):
            y = self.slot_attention(q, k, v, cache)
            return self.dense(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))

        causal = mask is None
        if cache is not None:
            past = cache.pos
            k, v = cache.update(self.layer_idx, k, v)
            if past > 0 and mask is None:
                causal = False
                if t > 1:  # queries at positions past..past+t-1 see keys 0..their own position
                    kpos = torch.arange(past + t, device=x.device)
                    qpos = torch.arange(past, past + t, device=x.device)
                    mask = kpos[None, :] <= qpos[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and t > 1,
                                           scale=1.0 / math.sqrt(self.hd), enable_gqa=self.nkv != self.nh)
        return self.dense(y.transpose(1, 2).reshape(b, t, self.nh * self.hd))

    def slot_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: SlotBatch) -> torch.Tensor:
        """Attention on a SlotCache: a packed prefill attends within each sequence and stores its K/V in its slot;
        a decode step writes each row's K/V at its slot's position and attends to that slot's cache."""
        cache, j = batch.cache, batch.cache.cache.slot[self.layer_idx]
        keys, values = cache.cache.k[j], cache.cache.v[j]  # [slots, kv_heads, max_len, hd]
        scale, gqa = 1.0 / math.sqrt(self.hd), self.nkv != self.nh
        if batch.prefill:
            for slot, start, end in batch.offsets():
                keys[slot, :, :end - start] = k[0, :, start:end]
                values[slot, :, :end - start] = v[0, :, start:end]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=batch.prefill_mask(), scale=scale, enable_gqa=gqa)
        position = cache.lengths[batch.slots]  # [B]
        keys[batch.slots, :, position] = k[:, :, 0]
        values[batch.slots, :, position] = v[:, :, 0]
        span = int(position.max()) + 1
        visible = torch.arange(span, device=q.device)[None, :] <= position[:, None]  # [B, span]
        return F.scaled_dot_product_attention(q, keys[batch.slots, :, :span], values[batch.slots, :, :span],
                                              attn_mask=visible[:, None, None, :], scale=scale, enable_gqa=gqa)


class LinearAttention(nn.Module):
    """A Ring-linear layer's attention (SPEC §8), in this order: fused MHA qkv -> optional SiLU on q, k, v ->
    QK-norm -> partial RoPE as §1.3 -> per-head decayed linear attention (`linglab.linear_attention`, decay
    `layer_decays`, scale head_dim^-0.5) -> GroupRMSNorm -> times sigmoid(g_proj(x)) -> dense.

    Without a cache (training, scoring) and for a prefill it runs the chunked form; a one-token decode step with a
    cache runs the recurrent step on the cache's state. `pad` [B]: the first pad[b] positions of row b are left
    padding; their keys are zeroed, so they add nothing to the state and real tokens never see them.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.num_layers = layer_idx, cfg.num_hidden_layers
        self.nh, self.hd = cfg.num_attention_heads, cfg.head_dim  # nh * hd = hidden (ModelConfig.validate)
        width = self.nh * self.hd
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * width, bias=False)
        self.linear_silu = cfg.linear_silu
        self.use_qk_norm = cfg.use_qk_norm
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.g_proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.g_norm = GroupRMSNorm(width, cfg.group_norm_size, cfg.rms_norm_eps)
        self.dense = nn.Linear(width, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                pad: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.query_key_value(x).view(b, t, 3 * self.nh, self.hd).split(self.nh, dim=2)
        if self.linear_silu:
            q, k, v = F.silu(q), F.silu(k), F.silu(v)
        if self.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if pad is not None:
            start = cache.pos if cache is not None else 0
            real = torch.arange(start, start + t, device=x.device)[None, :] >= pad[:, None]  # [B, T]
            k = k * real[:, :, None, None].to(k.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, hd]

        g = layer_decays(self.nh, self.layer_idx, self.num_layers).to(x.device)
        scale = self.hd ** -0.5
        with full_precision(x.device.type):  # the decayed state is a sum over the whole sequence: fp32 under bf16 too
            if cache is None:
                o, _ = linear_attention_chunked(q, k, v, g, scale)
            elif isinstance(cache, SlotBatch):
                o = self.slot_attention(q, k, v, g, scale, cache)
            else:
                state = cache.linear_state(self.layer_idx)
                step = linear_attention_step if t == 1 else linear_attention_chunked
                o, state = step(q, k, v, g, scale, state)
                cache.set_linear_state(self.layer_idx, state)
        o = o.to(x.dtype).transpose(1, 2).reshape(b, t, self.nh * self.hd)
        return self.dense(self.g_norm(o) * torch.sigmoid(self.g_proj(x)))

    def slot_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float,
                       batch: SlotBatch) -> torch.Tensor:
        """On a SlotCache: each packed sequence runs the chunked form from a zero state into its slot's state; a
        decode step runs the recurrent step on each row's slot state."""
        states = batch.cache.cache.state[batch.cache.cache.slot[self.layer_idx]]  # [slots, heads, hd, hd]
        if batch.prefill:
            outputs = []
            for slot, start, end in batch.offsets():
                o, states[slot] = linear_attention_chunked(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                                           g, scale)
                outputs.append(o)
            return torch.cat(outputs, dim=2)
        o, states[batch.slots] = linear_attention_step(q, k, v, g, scale, states[batch.slots])
        return o


class DecoderLayer(nn.Module):
    """Pre-norm block: x + Attention(norm(x)), then x + FFN(norm(x)); FFN dense below first_k_dense_replace.
    The attention is `Attention` or, for a hybrid's linear layers, `LinearAttention` (`ModelConfig.layer_kind`).

    Returns (x, z_loss): the MoE FFN's router z-loss (SPEC §1.4), None for a dense FFN or when none is computed.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        linear = cfg.layer_kind(layer_idx) == "linear"
        self.attention = LinearAttention(cfg, layer_idx) if linear else Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                mask: torch.Tensor | None = None,
                pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`mask` (softmax layers) and `pad` (linear layers) describe the same left padding (see `forward` of
        LingForCausalLM)."""
        h = self.input_layernorm(x)
        if isinstance(self.attention, LinearAttention):
            x = x + self.attention(h, cos, sin, cache, pad)
        else:
            x = x + self.attention(h, cos, sin, cache, mask)
        if isinstance(self.mlp, MoE):
            y, z_loss = self.mlp(self.post_attention_layernorm(x))
        else:
            y, z_loss = self.mlp(self.post_attention_layernorm(x)), None
        return x + y, z_loss


class MTPLayer(DecoderLayer):
    """Multi-token prediction, depth 1 (SPEC §1.5): predicts t_{i+2} from H_i and Emb(t_{i+1}).

    Its attention is softmax in a hybrid too: index num_hidden_layers falls in SPEC §8's trailing group.
    h = eh_proj([enorm(Emb(t_{i+1})), hnorm(H_i)]), then a full MoE decoder layer and its own final norm;
    the caller applies the shared lm_head. Stored at HF layer index num_hidden_layers. Returns (h, z_loss).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx, moe=True)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, next_emb: torch.Tensor, hidden: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.eh_proj(torch.cat([self.enorm(next_emb), self.hnorm(hidden)], dim=-1))
        h, z_loss = super().forward(h, cos, sin)
        return self.final_layernorm(h), z_loss


class LingModel(nn.Module):
    """Embedding, decoder stack, final norm (HF: `model.*`); the MTP layer lives in `mtp_layers`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, moe=i >= cfg.first_k_dense_replace) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mtp_layers = nn.ModuleList(
            MTPLayer(cfg, cfg.num_hidden_layers + j) for j in range(cfg.num_nextn_predict_layers))


@dataclass
class ModelOutput:
    loss: torch.Tensor  # what the optimizer minimises: main + mtp_scale * mtp + z-loss
    main_loss: torch.Tensor
    mtp_loss: torch.Tensor | None
    z_loss: torch.Tensor | None
    logits: torch.Tensor


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over positions where mask is nonzero (all positions if None)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    if mask is None:
        return ce.mean()
    mask = mask.flatten().to(ce.dtype)
    return (ce * mask).sum() / mask.sum().clamp(min=1.0)


def add_z_loss(total: torch.Tensor | None, z_loss: torch.Tensor | None) -> torch.Tensor | None:
    """The running router z-loss over layers in model order (SPEC §1.4); None until a layer returns one."""
    if z_loss is None:
        return total
    return z_loss if total is None else total + z_loss


class LingForCausalLM(nn.Module):
    """BailingMoeV2ForCausalLM: `model` + untied `lm_head` (SPEC §1.2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = LingModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Pretraining init (SPEC §1.2): every weight ~ N(0, 0.006); norms 1; expert bias 0."""
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, self.cfg.initializer_range)
        for m in self.modules():
            if isinstance(m, MoE) and not m.gate.expert_bias.is_meta:
                m.gate.expert_bias.zero_()
        self.reset_load_counts()

    @torch.no_grad()
    def reset_load_counts(self) -> None:
        """Zero every MoE's `tokens_per_expert` (the MTP layer's too): the non-persistent state a checkpoint
        does not hold, so a loaded model starts it here."""
        for m in self.modules():
            if isinstance(m, MoE) and not m.tokens_per_expert.is_meta:
                m.tokens_per_expert.zero_()

    def moe_layers(self) -> list[MoE]:
        """Every MoE block with a router, in model order: the main stack, then the MTP layer's (SPEC §1.4: each
        router that has an expert bias gets the aux-loss-free update, and its load counts in MaxVio)."""
        return [layer.mlp for layer in [*self.model.layers, *self.model.mtp_layers]
                if layer is not None and isinstance(layer.mlp, MoE)]  # None: a layer a pipeline stage does not hold

    # The forward's steps, one per pipeline unit of `linglab.parallel.planner.unit_layout` (embedding, layers.i,
    # head, mtp_transformer, mtp_loss): a pipeline stage (`StageModule`) runs them on the modules it holds.

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of `positions` for every layer's partial RoPE (SPEC §1.3 step 3)."""
        return rope_cos_sin(self.cfg.rope_dim, self.cfg.rope_theta, positions)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, unscaled (SPEC §1.2); MTP looks up Emb(t_{i+1}) here too (SPEC §1.5)."""
        return self.model.word_embeddings(input_ids)

    def decoder_layer(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, z_loss: torch.Tensor | None,
                      cache: KVCache | None = None, mask: torch.Tensor | None = None,
                      pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoder layer i (SPEC §1.2-1.4, §8) -> (x, z_loss): its router z-loss added to the running `z_loss`."""
        x, z = self.model.layers[i](x, cos, sin, cache, mask, pad)
        return x, add_z_loss(z_loss, z)

    def head(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final norm, then the untied lm_head (SPEC §1.2) -> (H, logits); H after the norm is what MTP reads."""
        hidden = self.model.norm(x)
        return hidden, self.lm_head(hidden)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor,
                  loss_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`head`, then the main loss: masked cross-entropy against t_{i+1} -> (H, logits, main loss)."""
        hidden, logits = self.head(x)
        return hidden, logits, masked_cross_entropy(logits, targets, loss_mask)

    def mtp_transformer(self, hidden: torch.Tensor, targets: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        z_loss: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """MTP's transformer part (SPEC §1.5) -> (h, z_loss): at position i, Emb(t_{i+1}) = Emb(targets[:, i]) and
        H_i; the last position has no t_{i+2} and is left out. Its router z-loss joins the running `z_loss`."""
        h, z = self.model.mtp_layers[0](self.embed(targets[:, :-1]), hidden[:, :-1], cos[:-1], sin[:-1])
        return h, add_z_loss(z_loss, z)

    def mtp_loss(self, h: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
        """MTP's loss part (SPEC §1.5): the shared lm_head on h, masked cross-entropy against t_{i+2}."""
        return masked_cross_entropy(self.lm_head(h), targets[:, 1:], None if loss_mask is None else loss_mask[:, 1:])

    def total_loss(self, main: torch.Tensor, mtp: torch.Tensor | None, z_loss: torch.Tensor | None) -> torch.Tensor:
        """What the optimizer minimises: main + mtp_scale * mtp (SPEC §1.5) + router z-loss (SPEC §1.4), if present."""
        loss = main
        if mtp is not None:
            loss = loss + self.cfg.mtp_loss_scaling_factor * mtp
        if z_loss is not None:
            loss = loss + z_loss
        return loss

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, cache: KVCache | None = None, pad: torch.Tensor | None = None):
        """Logits [B, T, V] when `targets` is None, else a ModelOutput with the training loss.

        targets[:, i] is the token after input_ids[:, i]; the MTP head at position i predicts
        targets[:, i + 1] from Emb(targets[:, i]) = Emb(t_{i+1}) and the main hidden state H_i.
        pad [B] (inference): the first pad[b] positions of row b (of the whole sequence, cached ones included)
        are left padding. Real tokens never attend to them (a linear layer zeroes their keys, so its state never
        holds them) and count their positions from the first real token, so each row computes what it would alone,
        and prompts of several lengths decode as one batch.
        A sequence longer than max_position_embeddings is refused; with `pad`, rows decode past their own limits
        (their samples discarded), so `generate` checks each row's prompt + new tokens instead.
        """
        if isinstance(cache, SlotBatch):
            return self.slot_forward(input_ids, cache)
        t = input_ids.shape[1]
        start = cache.pos if cache is not None else 0
        if pad is None and start + t > self.cfg.max_position_embeddings:
            raise LinglabError(f"model: a sequence of {start + t} positions exceeds max_position_embeddings "
                               f"({self.cfg.max_position_embeddings})")
        positions = torch.arange(start, start + t, device=input_ids.device)
        mask = None
        if pad is not None:
            if targets is not None:
                raise ValueError("pad is for inference; training batches are packed, not padded")
            positions = (positions[None, :] - pad[:, None]).clamp(min=0)  # [B, T]; pad slots sit at 0, masked
            mask = padding_mask(pad, start, t)
        cos, sin = self.rope(positions)
        x, z_loss = self.embed(input_ids), None
        for i in range(len(self.model.layers)):
            x, z_loss = self.decoder_layer(i, x, cos, sin, z_loss, cache, mask, pad)
        if cache is not None:
            cache.pos += t
        if targets is None:
            _, logits = self.head(x)
            return logits

        hidden, logits, main = self.head_loss(x, targets, loss_mask)
        mtp_loss = None
        if len(self.model.mtp_layers) > 0 and t > 1:
            h, z_loss = self.mtp_transformer(hidden, targets, cos, sin, z_loss)
            mtp_loss = self.mtp_loss(h, targets, loss_mask)
        return ModelOutput(loss=self.total_loss(main, mtp_loss, z_loss), main_loss=main, mtp_loss=mtp_loss,
                           z_loss=z_loss, logits=logits)


    def slot_forward(self, input_ids: torch.Tensor, batch: SlotBatch) -> torch.Tensor:
        """Logits [n, V] of the continuous-batching engine's call: after each packed sequence's last token (prefill),
        or after each row's token (decode); the slots' lengths advance."""
        cos, sin = self.rope(batch.positions())
        x = self.embed(input_ids)
        for i in range(len(self.model.layers)):
            x, _ = self.decoder_layer(i, x, cos, sin, None, batch)
        batch.advance()
        if batch.prefill:
            ends = torch.tensor(batch.lengths, device=x.device).cumsum(0) - 1
            return self.head(x[0, ends])[1]
        return self.head(x[:, -1])[1]


@dataclass
class ParamCounts:
    total: int  # without the MTP layer, as the released totals are stated (SPEC §1.1)
    active: int  # per token: embedding + head + attention (either kind) + dense FFN + k routed + shared experts + routers
    active_non_embedding: int  # active without embedding and lm_head
    mtp: int  # the MTP layer, reported apart


def count_parameters(model: LingForCausalLM) -> ParamCounts:
    """Total / active / active non-embedding parameter counts from the module tree (works on meta)."""
    cfg = model.cfg
    mtp = sum(p.numel() for p in model.model.mtp_layers.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    inactive = sum(
        (cfg.num_experts - cfg.num_experts_per_tok) * sum(p[0].numel() for p in m.experts.parameters())
        for m in (layer.mlp for layer in model.model.layers) if isinstance(m, MoE))
    active = total - inactive
    embedding = model.model.word_embeddings.weight.numel() + model.lm_head.weight.numel()
    return ParamCounts(total=total, active=active, active_non_embedding=active - embedding, mtp=mtp)


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", seed: int | None = None) -> LingForCausalLM:
    """Instantiate (on `device`; "meta" gives shapes only) and initialise with an optional seed."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        return LingForCausalLM(cfg)
