"""Model FLOPs per token, counted from the architecture (SPEC §4: only activated experts count).

Forward FLOPs = 2 x (activated matmul parameters) + each layer's token mixing; training = 3 x forward (backward
is two GEMMs per forward GEMM). A softmax layer mixes by causal attention (QK^T and AV, growing with the context);
a Ring-linear hybrid's linear layers (SPEC §8, `ModelConfig.layer_kind`) by the decayed state, whose update and
read cost the same at any context. The input embedding is a lookup and costs nothing; the lm_head is a GEMM and
counts. `non_embedding=True` drops the lm_head too, giving the "M" of the Ling scaling laws.

    flops_per_token(cfg, seq_len=128)                   # training FLOPs per token, incl. MTP and lm_head
"""

from __future__ import annotations

from linglab.config import ModelConfig


def attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward QK^T + AV FLOPs per token per layer, averaged over a causal sequence of seq_len tokens."""
    mean_context = (seq_len + 1) / 2
    return 2 * 2 * cfg.num_attention_heads * cfg.head_dim * mean_context


def linear_attention_flops(cfg: ModelConfig) -> float:
    """Forward FLOPs per token of one linear layer's decayed linear attention (SPEC §8): the state update
    S_t = exp(g) S_{t-1} + k_t^T v_t and the read q_t S_t, 2 hd^2 each per head, with no term in the context.

    The decay exp(g) S is elementwise and, like the norms, not counted. This is the recurrence's count, the
    model's: the chunked form that trains also computes the decayed scores within each chunk (a further
    ~2 x 2 x hd x (chunk + 1) / 2 per head), an implementation's extra, as flash attention's recomputation is.
    """
    return 2 * 2 * cfg.num_attention_heads * cfg.head_dim**2


def layer_matmul_params(cfg: ModelConfig, moe: bool, kind: str = "softmax") -> int:
    """Activated matmul parameters of one decoder layer (norms excluded: they are not GEMMs).

    kind "linear" (SPEC §8): query_key_value holds nh key/value heads (no GQA), and g_proj is one more
    H -> nh x hd projection beside dense.
    """
    h, width = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
    if kind == "linear":
        attn = h * 3 * width + h * width + width * h  # query_key_value, g_proj, dense
    else:
        attn = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim + width * h
    if not moe:
        return attn + 3 * h * cfg.intermediate_size
    experts = cfg.num_experts_per_tok + cfg.num_shared_experts
    return attn + 3 * h * cfg.moe_intermediate_size * experts + cfg.num_experts * h  # + router gate


def decoder_layer_flops(cfg: ModelConfig, seq_len: int, moe: bool, kind: str = "softmax") -> float:
    """Forward FLOPs per token of one decoder layer of `kind` ("softmax" or "linear", SPEC §8)."""
    mixing = linear_attention_flops(cfg) if kind == "linear" else attention_flops(cfg, seq_len)
    return 2 * layer_matmul_params(cfg, moe, kind) + mixing


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = True,
                            non_embedding: bool = False) -> float:
    flops = 0.0
    for i in range(cfg.num_hidden_layers):
        flops += decoder_layer_flops(cfg, seq_len, moe=i >= cfg.first_k_dense_replace, kind=cfg.layer_kind(i))
    if not non_embedding:
        flops += 2 * cfg.hidden_size * cfg.vocab_size
    if include_mtp and cfg.num_nextn_predict_layers:  # the MTP layer is softmax in a hybrid too (layer_kind)
        flops += 2 * 2 * cfg.hidden_size * cfg.hidden_size
        flops += decoder_layer_flops(cfg, seq_len, moe=True, kind=cfg.layer_kind(cfg.num_hidden_layers))
        if not non_embedding:
            flops += 2 * cfg.hidden_size * cfg.vocab_size
    return flops


def flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = True, non_embedding: bool = False) -> float:
    """Training FLOPs per token: 3 x forward."""
    return 3 * forward_flops_per_token(cfg, seq_len, include_mtp, non_embedding)


def matmul_peak_flops(n: int = 4096, repeats: int = 3, device="cpu") -> float:
    """fp32 FLOP/s of a large square matmul on `device`, measured now, in this process: the MFU denominator.

    4096 rather than 2048: on a 2-core CPU the 2048 GEMM reaches only ~75% of the large-GEMM rate,
    which would inflate every MFU computed against it.
    """
    import statistics
    import time

    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)
