"""Model FLOPs of a Ring-linear hybrid (SPEC §8): linear layers counted as linear attention, against hand counts."""

import pytest
from torch import nn

from linglab.config import ModelConfig, load_config
from linglab.flops import attention_flops, flops_per_token, layer_matmul_params, linear_attention_flops
from linglab.model import build_model
from linglab.scaling.laws import non_embedding_flops_per_token

# hidden 64, 4 heads of 16 (= hidden / heads, as a hybrid needs), 2 K/V heads, dense FFN 128, 8 experts of 32 (top-2
# + 1 shared), vocab 100; groups of 2: layer 0 linear with the dense FFN, layer 1 softmax with the MoE FFN, MTP softmax.
HYBRID = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8, num_shared_experts=1,
              num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=1,
              layer_group_size=2)
SEQ = 8

# Forward, per token, by hand (a GEMM with P weights costs 2P FLOPs):
#   linear layer 0: query_key_value 64 * 3 * 64 = 12288 (4 K/V heads, no GQA), g_proj 64 * 64 = 4096, dense 4096
#     -> 20480 weights; state update k^T v and read q S: 2 * 16 * 16 each for 4 heads -> 4096 at any context;
#     dense SwiGLU FFN 3 * 64 * 128 = 24576 weights
LINEAR_DENSE_LAYER_FWD = 2 * 20480 + 4096 + 2 * 24576  # 94208
#   softmax layer 1: qkv 64 * (4 + 2 * 2) * 16 = 8192, dense 4096 -> 12288 weights; QK^T and AV: 2 * 2 * 4 * 16 *
#     (8 + 1) / 2 = 1152; MoE FFN (2 routed + 1 shared) * 3 * 64 * 32 = 18432 + router gate 8 * 64 = 512 weights
SOFTMAX_MOE_LAYER_FWD = 2 * 12288 + 1152 + 2 * 18944  # 63616
#   MTP: eh_proj 2 * 64 * 64 = 8192 weights, then a softmax MoE layer; lm_head 64 * 100 = 6400 weights, twice
MTP_FWD = 2 * 8192 + SOFTMAX_MOE_LAYER_FWD
LM_HEAD_FWD = 2 * 6400


def _hybrid(**overrides) -> ModelConfig:
    cfg = ModelConfig(**{**HYBRID, **overrides})
    cfg.validate()
    return cfg


def test_a_linear_layer_counts_its_projections_and_the_state_update_and_read():
    cfg = _hybrid()
    assert [cfg.layer_kind(i) for i in range(3)] == ["linear", "softmax", "softmax"]  # index 2: the MTP layer
    assert layer_matmul_params(cfg, moe=False, kind="linear") == 20480 + 24576
    assert layer_matmul_params(cfg, moe=True, kind="softmax") == 12288 + 18944
    assert linear_attention_flops(cfg) == 4096
    assert attention_flops(cfg, SEQ) == 1152


def test_hybrid_flops_per_token_match_the_hand_count():
    cfg = _hybrid()
    assert non_embedding_flops_per_token(cfg, SEQ) == 3 * (LINEAR_DENSE_LAYER_FWD + SOFTMAX_MOE_LAYER_FWD) == 473472
    assert flops_per_token(cfg, SEQ) == 3 * (LINEAR_DENSE_LAYER_FWD + SOFTMAX_MOE_LAYER_FWD + LM_HEAD_FWD + MTP_FWD
                                             + LM_HEAD_FWD) == 790272


def test_only_the_softmax_layers_grow_with_the_sequence():
    hybrid, softmax = _hybrid(), _hybrid(layer_group_size=0)
    growth = attention_flops(hybrid, 4096) - attention_flops(hybrid, SEQ)
    assert flops_per_token(hybrid, 4096) - flops_per_token(hybrid, SEQ) == 3 * 2 * growth  # layer 1 and MTP
    assert flops_per_token(softmax, 4096) - flops_per_token(softmax, SEQ) == 3 * 3 * growth  # every layer and MTP


def test_matmul_params_equal_the_models_gemm_weights():
    cfg = load_config("tiny-linear").model
    model = build_model(cfg, device="meta")
    for i, layer in enumerate(model.model.layers):
        if i < cfg.first_k_dense_replace:  # a dense layer: every GEMM weight is active
            gemm = sum(m.weight.numel() for m in layer.modules() if isinstance(m, nn.Linear))
            assert gemm == layer_matmul_params(cfg, moe=False, kind=cfg.layer_kind(i))
        attention = sum(m.weight.numel() for m in layer.attention.modules() if isinstance(m, nn.Linear))
        assert attention == layer_matmul_params(cfg, moe=False, kind=cfg.layer_kind(i)) - 3 * cfg.hidden_size * cfg.intermediate_size


def test_ring_mini_linear_counts_its_published_active_non_embedding_parameters():
    cfg = load_config("ring-mini-linear-2.0").model
    seq = 4096
    kinds = [cfg.layer_kind(i) for i in range(cfg.num_hidden_layers)]
    mixing = kinds.count("softmax") * attention_flops(cfg, seq) + kinds.count("linear") * linear_attention_flops(cfg)
    params = (non_embedding_flops_per_token(cfg, seq) - 3 * mixing) / 6
    assert params == pytest.approx(0.957e9, rel=1e-3)  # SPEC §8: 957M active non-embedding (norms are not GEMMs)
