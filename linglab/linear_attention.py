"""Lightning attention, the linear attention of the Ring-linear layers (SPEC §8), in three equal forms.

Per head, with one constant log-decay g <= 0 (ALiBi slopes scaled by depth, `layer_decays`):

    S_t = exp(g) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t    (S_t already holds token t)

- `linear_attention_recurrent`: that recurrence, one token at a time. The reference: T sequential steps.
- `linear_attention_chunked`: training and prefill. Within a chunk of C tokens, causal attention whose scores are
  weighted by exp(g (i - j)); across chunks, the state carried from one chunk to the next. T / C sequential steps,
  and memory O(T (C + hd^2 / C)) per head: C x C scores and one hd x hd state per chunk, never T x T.
- `linear_attention_step`: decoding, one token against the fixed-size state (hd x hd per head).

Every decay is exp(g * distance) with distance >= 0, so no factor exceeds 1 and nothing overflows at any length
(factoring the decay mask as exp(g i) * exp(-g j) would overflow for long chunks). All three compute in fp32 and
return o in the dtype of q and the state in fp32: a bf16 state would drift over a long decode. Padding is the
caller's business: a zero key adds nothing to the state.

Shapes: q, k [B, nh, T, dk]; v [B, nh, T, dv]; g [nh]; state [B, nh, dk, dv] (None = zeros). Ring uses dk = dv = hd.
"""

from __future__ import annotations

import torch
from torch import Tensor

from linglab.errors import LinglabError


def alibi_slopes(n_heads: int) -> Tensor:
    """The ALiBi head slopes [nh] (float32), SPEC §8.

    For nh a power of two: start = 2^(-2^-(log2 nh - 3)) = 2^(-8 / nh) and slope_h = start^(h+1). Otherwise the
    usual ALiBi interleave: the slopes of the closest lower power of two p, then every other slope of 2p (those
    that fall between them) until nh are taken.
    """
    if n_heads < 1:
        raise LinglabError(f"alibi_slopes: n_heads must be >= 1, got {n_heads}")

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    lower = 1 << (n_heads.bit_length() - 1)
    slopes = power_of_two_slopes(lower) + power_of_two_slopes(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def layer_decays(n_heads: int, layer_idx: int, num_layers: int) -> Tensor:
    """Per-head log-decay g_h = -slope_h * (1 - (l - 1) / (L - 1) + 1e-5) of layer l (0-based) of L, SPEC §8.

    Layer 0 follows the HF reference: l - 1 = -1 is NOT clamped, so layer 0 (linear in any hybrid with
    layer_group_size > 1 and one whole group) decays about 1 + 1/(L-1) times as fast as layer 1. linglab's checkpoints
    must give the same logits in the public implementations (issue 16), whose HF modeling code loads the released
    Ring-linear models; clamping at 0, as one port does, would change layer 0's decays by that factor there.
    L = 1: the denominator is floored at 1 instead of dividing by zero. §8's layer rule makes the only layer of
    a one-layer model softmax, so no model uses that value; the floor only keeps the function total.
    As in the reference, float32 slopes are multiplied by a Python float.
    """
    if not 0 <= layer_idx < num_layers:
        raise LinglabError(f"layer_decays: layer_idx must be in [0, {num_layers}), got {layer_idx}")
    depth = (layer_idx - 1) / max(num_layers - 1, 1)
    return -alibi_slopes(n_heads) * (1 - depth + 1e-5)


def _check_shapes(name: str, q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor | None) -> None:
    """One-line errors for inputs that would otherwise broadcast into a wrong answer or fail deep inside."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3] or q.shape[2] < 1:
        raise LinglabError(f"{name}: expected q, k [B, nh, T, dk] and v [B, nh, T, dv] with T >= 1, got "
                           f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, heads, _, dk = q.shape
    if g.shape != (heads,):
        raise LinglabError(f"{name}: g must hold one log-decay per head, shape ({heads},), got {tuple(g.shape)}")
    if state is not None and state.shape != (batch, heads, dk, v.shape[-1]):
        raise LinglabError(f"{name}: state must be {(batch, heads, dk, v.shape[-1])}, got {tuple(state.shape)}")


def _start_state(q: Tensor, v: Tensor, state: Tensor | None) -> Tensor:
    if state is None:
        return q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1], dtype=torch.float32)
    return state.float()


def linear_attention_recurrent(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float,
                               state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence of SPEC §8 token by token: (o [B, nh, T, dv], final state [B, nh, dk, dv])."""
    _check_shapes("linear_attention_recurrent", q, k, v, g, state)
    decay = torch.exp(g.to(q.device, torch.float32)).view(1, -1, 1, 1)
    qf, kf, vf = q.float(), k.float(), v.float()
    s = _start_state(q, v, state)
    outputs = []
    for t in range(q.shape[2]):
        s = decay * s + kf[:, :, t, :, None] * vf[:, :, t, None, :]
        outputs.append(scale * (qf[:, :, t, None, :] @ s))
    return torch.cat(outputs, dim=2).to(q.dtype), s


def linear_attention_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float,
                          state: Tensor) -> tuple[Tensor, Tensor]:
    """One decoding step, q, k, v [B, nh, 1, d]: (o [B, nh, 1, dv], the state after this token)."""
    _check_shapes("linear_attention_step", q, k, v, g, state)
    if q.shape[2] != 1:
        raise LinglabError(f"linear_attention_step: takes one token (T = 1), got T = {q.shape[2]}")
    decay = torch.exp(g.to(q.device, torch.float32)).view(1, -1, 1, 1)
    s = decay * state.float() + k.float().transpose(-1, -2) @ v.float()
    return (scale * (q.float() @ s)).to(q.dtype), s


def _whole_chunks(q: Tensor, k: Tensor, v: Tensor, g: Tensor, s: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """The chunked form over T = n * chunk tokens (fp32 inputs, g [nh]), without the scale: (o, final state)."""
    batch, heads, length, _ = q.shape
    n = length // chunk
    q, k, v = (t.reshape(batch, heads, n, chunk, t.shape[-1]) for t in (q, k, v))
    g = g.view(1, heads, 1, 1, 1)  # against [B, nh, n chunks, C, C] and [B, nh, n, C, d]
    pos = torch.arange(chunk, device=q.device, dtype=torch.float32)
    distance = pos[:, None] - pos[None, :]
    # exp(g (i - j)) on and below the diagonal; above it the exponent is clamped to 0 first, so never exp(+x)
    intra_decay = torch.exp(g * distance.clamp(min=0)) * (distance >= 0)
    from_start = torch.exp(g * (pos[:, None] + 1))           # the state entering the chunk -> token i
    to_end = torch.exp(g * (chunk - 1 - pos[:, None]))       # key j -> the chunk's last token
    across = torch.exp(g[:, :, 0] * chunk)                   # one whole chunk, [1, nh, 1, 1] against the state

    o = ((q @ k.transpose(-1, -2)) * intra_decay) @ v
    chunk_updates = (k * to_end).transpose(-1, -2) @ v  # [B, nh, n, dk, dv]
    entering = []
    for i in range(n):
        entering.append(s)
        s = across * s + chunk_updates[:, :, i]
    o = o + (q * from_start) @ torch.stack(entering, dim=2)
    return o.reshape(batch, heads, length, -1), s


def linear_attention_chunked(q: Tensor, k: Tensor, v: Tensor, g: Tensor, scale: float,
                             state: Tensor | None = None, chunk_size: int = 64) -> tuple[Tensor, Tensor]:
    """The chunked parallel form (training, prefill): (o [B, nh, T, dv], final state [B, nh, dk, dv]).

    Any T: the whole chunks run batched, then a last shorter chunk (or T < chunk_size) continues from their state.
    """
    _check_shapes("linear_attention_chunked", q, k, v, g, state)
    if chunk_size < 1:
        raise LinglabError(f"linear_attention_chunked: chunk_size must be >= 1, got {chunk_size}")
    g32 = g.to(q.device, torch.float32)
    qf, kf, vf = q.float(), k.float(), v.float()
    s = _start_state(q, v, state)
    length = q.shape[2]
    whole = length - length % chunk_size
    outputs = []
    for start, stop, chunk in ((0, whole, chunk_size), (whole, length, length - whole)):
        if stop > start:
            o, s = _whole_chunks(qf[:, :, start:stop], kf[:, :, start:stop], vf[:, :, start:stop], g32, s, chunk)
            outputs.append(o)
    return (scale * torch.cat(outputs, dim=2)).to(q.dtype), s
