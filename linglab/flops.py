"""Model FLOPs per token, counted from the architecture (SPEC §4: only activated experts count).

Forward FLOPs = 2 x (activated matmul parameters) + causal attention (QK^T and AV); training = 3 x
forward (backward is two GEMMs per forward GEMM). The input embedding is a lookup and costs nothing;
the lm_head is a GEMM and counts. `non_embedding=True` drops the lm_head too, giving the "M" of the
Ling scaling laws.

    flops_per_token(cfg, seq_len=128)                   # training FLOPs per token, incl. MTP and lm_head
"""

from __future__ import annotations

from linglab.config import ModelConfig


def attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Forward QK^T + AV FLOPs per token per layer, averaged over a causal sequence of seq_len tokens."""
    mean_context = (seq_len + 1) / 2
    return 2 * 2 * cfg.num_attention_heads * cfg.head_dim * mean_context


def layer_matmul_params(cfg: ModelConfig, moe: bool) -> int:
    """Activated matmul parameters of one decoder layer (norms excluded: they are not GEMMs)."""
    h = cfg.hidden_size
    attn = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
    attn += cfg.num_attention_heads * cfg.head_dim * h
    if not moe:
        return attn + 3 * h * cfg.intermediate_size
    experts = cfg.num_experts_per_tok + cfg.num_shared_experts
    return attn + 3 * h * cfg.moe_intermediate_size * experts + cfg.num_experts * h  # + router gate


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = True,
                            non_embedding: bool = False) -> float:
    flops = 0.0
    for i in range(cfg.num_hidden_layers):
        flops += 2 * layer_matmul_params(cfg, moe=i >= cfg.first_k_dense_replace) + attention_flops(cfg, seq_len)
    if not non_embedding:
        flops += 2 * cfg.hidden_size * cfg.vocab_size
    if include_mtp and cfg.num_nextn_predict_layers:
        flops += 2 * (2 * cfg.hidden_size * cfg.hidden_size + layer_matmul_params(cfg, moe=True))
        flops += attention_flops(cfg, seq_len)
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
