"""A deliberately plain BailingMoeV2 forward written from SPEC §1, used only as a test oracle; with SPEC §8's linear
layers when the config is a Ring-linear hybrid (BailingMoeLinearV2).

It reads nothing from linglab: only a config.json dict and HF-named tensors (SPEC §1.6). Tokens and
experts are handled one at a time with explicit loops, so it shares no dispatch, masking or RoPE code
with the real model; the linear layers run the naive per-token recurrence, with decays built here from the SPEC
formula (layer 0 unclamped, linglab's documented choice).
"""

from __future__ import annotations

import math

import torch


def rms(x, w, eps):
    x = x.float()
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def swiglu(x, sd, prefix):
    g = x @ sd[f"{prefix}.gate_proj.weight"].T
    u = x @ sd[f"{prefix}.up_proj.weight"].T
    return (g * torch.sigmoid(g) * u) @ sd[f"{prefix}.down_proj.weight"].T


def rope(x, pos, rope_dim, theta):
    """x: [heads, hd] at one position; rotate-half over the first rope_dim channels."""
    out = x.clone()
    half = rope_dim // 2
    for i in range(half):
        freq = 1.0 / theta ** (2 * i / rope_dim)
        c, s = math.cos(pos * freq), math.sin(pos * freq)
        a, b = x[:, i], x[:, i + half]
        out[:, i] = a * c - b * s
        out[:, i + half] = b * c + a * s
    return out


def router_ref(x, gate_w, bias, cfg):
    """Per token: sigmoid scores, bias for selection only, group-limited top-k, normalised weights."""
    E, G, kg, k = cfg["num_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
    s = torch.sigmoid(gate_w.double() @ x.double())
    sel = s + bias.double()
    per = E // G
    group_scores = [sorted(sel[g * per:(g + 1) * per].tolist(), reverse=True)[:2] for g in range(G)]
    group_scores = [sum(v) for v in group_scores]
    kept = sorted(range(G), key=lambda g: -group_scores[g])[:kg]
    candidates = [e for e in range(E) if e // per in kept]
    chosen = sorted(candidates, key=lambda e: -sel[e].item())[:k]
    w = torch.stack([s[e] for e in chosen])
    w = w / (w.sum() + 1e-20) * cfg["routed_scaling_factor"]
    return chosen, w.float()


def moe_ref(x, sd, prefix, cfg):
    chosen, w = router_ref(x, sd[f"{prefix}.gate.weight"], sd[f"{prefix}.gate.expert_bias"], cfg)
    y = swiglu(x, sd, f"{prefix}.shared_experts")
    for e, we in zip(chosen, w):
        y = y + we * swiglu(x, sd, f"{prefix}.experts.{e}")
    return y


def softmax_attention_ref(x, sd, p, cfg):
    """SPEC §1.3 over a whole sequence x [T, H]: GQA, causal softmax."""
    T, _ = x.shape
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    rope_dim = int(hd * cfg["partial_rotary_factor"])
    qkv = x @ sd[f"{p}.attention.query_key_value.weight"].T
    q = qkv[:, : nh * hd].reshape(T, nh, hd)
    k = qkv[:, nh * hd:(nh + nkv) * hd].reshape(T, nkv, hd)
    v = qkv[:, (nh + nkv) * hd:].reshape(T, nkv, hd)
    q = rms(q, sd[f"{p}.attention.query_layernorm.weight"], eps)
    k = rms(k, sd[f"{p}.attention.key_layernorm.weight"], eps)
    q = torch.stack([rope(q[t], t, rope_dim, cfg["rope_theta"]) for t in range(T)])
    k = torch.stack([rope(k[t], t, rope_dim, cfg["rope_theta"]) for t in range(T)])
    out = torch.zeros(T, nh, hd)
    rep = nh // nkv
    for head in range(nh):
        kh = head // rep
        for t in range(T):
            scores = (k[: t + 1, kh] @ q[t, head]) / math.sqrt(hd)
            out[t, head] = torch.softmax(scores.float(), dim=0) @ v[: t + 1, kh]
    return out.reshape(T, nh * hd) @ sd[f"{p}.attention.dense.weight"].T


def is_softmax_layer(i, cfg):
    """SPEC §8: softmax closes each group of layer_group_size and fills a trailing partial group."""
    g, L = cfg.get("layer_group_size", 0), cfg["num_hidden_layers"]
    return g == 0 or (i + 1) % g == 0 or i >= (L // g) * g


def alibi_slopes_ref(n):
    """SPEC §8: start = 2^(-2^-(log2 n - 3)), slope_h = start^(h+1); other n: the nearest lower power of two's
    slopes, then every other slope of twice that power."""
    if math.log2(n).is_integer():
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (h + 1) for h in range(n)]
    p = 2 ** math.floor(math.log2(n))
    return alibi_slopes_ref(p) + alibi_slopes_ref(2 * p)[0::2][: n - p]


def linear_attention_ref(x, sd, p, cfg, layer):
    """SPEC §8 over a whole sequence x [T, H], token by token: S_t = exp(g_h) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t."""
    T, H = x.shape
    nh = cfg["num_attention_heads"]
    hd = H // nh
    eps = cfg["rms_norm_eps"]
    rope_dim = int(hd * cfg["partial_rotary_factor"])
    L = cfg["num_hidden_layers"]
    qkv = x @ sd[f"{p}.attention.query_key_value.weight"].T
    q, k, v = (qkv[:, j * nh * hd:(j + 1) * nh * hd].reshape(T, nh, hd) for j in range(3))
    if cfg["linear_silu"]:
        q, k, v = (a * torch.sigmoid(a) for a in (q, k, v))
    q = rms(q, sd[f"{p}.attention.query_layernorm.weight"], eps)
    k = rms(k, sd[f"{p}.attention.key_layernorm.weight"], eps)
    q = torch.stack([rope(q[t], t, rope_dim, cfg["rope_theta"]) for t in range(T)])
    k = torch.stack([rope(k[t], t, rope_dim, cfg["rope_theta"]) for t in range(T)])
    out = torch.zeros(T, nh, hd)
    for head, slope in enumerate(alibi_slopes_ref(nh)):
        g = -slope * (1 - (layer - 1) / (L - 1) + 1e-5)
        S = torch.zeros(hd, hd, dtype=torch.float64)
        for t in range(T):
            S = math.exp(g) * S + torch.outer(k[t, head].double(), v[t, head].double())
            out[t, head] = (hd ** -0.5 * q[t, head].double() @ S).float()
    o = out.reshape(T, nh * hd)
    groups = cfg["group_norm_size"]
    normed = torch.cat([rms(part, torch.ones(1), eps) for part in o.split(nh * hd // groups, dim=-1)], dim=-1)
    o = sd[f"{p}.attention.g_norm.weight"] * normed
    o = o * torch.sigmoid(x @ sd[f"{p}.attention.g_proj.weight"].T)
    return o @ sd[f"{p}.attention.dense.weight"].T


def layer_ref(h, sd, p, cfg, moe, layer):
    T, H = h.shape
    eps = cfg["rms_norm_eps"]
    x = rms(h, sd[f"{p}.input_layernorm.weight"], eps)
    if is_softmax_layer(layer, cfg):
        h = h + softmax_attention_ref(x, sd, p, cfg)
    else:
        h = h + linear_attention_ref(x, sd, p, cfg, layer)
    x = rms(h, sd[f"{p}.post_attention_layernorm.weight"], eps)
    if moe:
        ffn = torch.stack([moe_ref(x[t], sd, f"{p}.mlp", cfg) for t in range(T)])
    else:
        ffn = swiglu(x, sd, f"{p}.mlp")
    return h + ffn


def forward_ref(input_ids: list[int], sd: dict, cfg: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Main logits [T, V] and, if the checkpoint has an MTP layer, MTP logits [T-1, V] for one sequence."""
    ids = torch.tensor(input_ids)
    h = sd["model.word_embeddings.weight"][ids]
    L = cfg["num_hidden_layers"]
    for i in range(L):
        h = layer_ref(h, sd, f"model.layers.{i}", cfg, moe=i >= cfg["first_k_dense_replace"], layer=i)
    hidden = rms(h, sd["model.norm.weight"], cfg["rms_norm_eps"])
    logits = hidden @ sd["lm_head.weight"].T
    mtp_logits = None
    if cfg.get("num_nextn_predict_layers", 0) and len(input_ids) > 1:
        p = f"model.layers.{L}"
        e = rms(sd["model.word_embeddings.weight"][ids[1:]], sd[f"{p}.enorm.weight"], cfg["rms_norm_eps"])
        hh = rms(hidden[:-1], sd[f"{p}.hnorm.weight"], cfg["rms_norm_eps"])
        m = torch.cat([e, hh], dim=-1) @ sd[f"{p}.eh_proj.weight"].T
        m = layer_ref(m, sd, p, cfg, moe=True, layer=L)
        m = rms(m, sd[f"{p}.final_layernorm.weight"], cfg["rms_norm_eps"])
        mtp_logits = m @ sd["lm_head.weight"].T
    return logits, mtp_logits
