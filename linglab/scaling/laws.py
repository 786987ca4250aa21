"""Compute accounting and the published Ling scaling laws (SPEC §4).

Pure functions on configs, floats and arrays; the fitters (`linglab.scaling.fit`), the ladder and the CLI sit on
top of this module.

    M = non_embedding_flops_per_token(cfg.model, seq_len=128); C = M * tokens
    lr, batch = optimal_lr(C), optimal_batch_tokens(C)          # published laws
    M_opt, D_opt = compute_optimal(C, "moe")
    efficiency_leverage(A, G, C)                                 # EL of an MoE over dense at compute C
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from linglab.config import ModelConfig
from linglab.flops import flops_per_token

# ---------------------------------------------------------------- compute accounting (SPEC §4)


def non_embedding_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """M of SPEC §4: training FLOPs per token (3x forward) of the main model, non-embedding, active experts only.

    Attention (QK^T, AV over a causal sequence) is included, as SPEC §4 says. The MTP layer is excluded
    (open): the laws are about the size of the main model, and MTP's one extra layer is a share of it
    (~1/num_hidden_layers) that changes with depth across a sweep. A run trained with MTP spends about
    (1 + 1/num_hidden_layers) x C; `linglab.flops.flops_per_token` counts it for MFU.
    """
    return flops_per_token(cfg, seq_len, include_mtp=False, non_embedding=True)


def training_compute(cfg: ModelConfig, seq_len: int, tokens: float) -> float:
    """C = M * D (SPEC §4)."""
    return non_embedding_flops_per_token(cfg, seq_len) * tokens


def model_kind(cfg: ModelConfig) -> str:
    """"dense" when every layer has the dense FFN (first_k_dense_replace >= num_hidden_layers), else "moe"."""
    return "dense" if cfg.first_k_dense_replace >= cfg.num_hidden_layers else "moe"


def activation_ratio(cfg: ModelConfig) -> float:
    """A = (E_a + E_s) / (E + E_s) of the MoE layers (SPEC §4); 1 for a dense model."""
    if model_kind(cfg) == "dense":
        return 1.0
    return (cfg.num_experts_per_tok + cfg.num_shared_experts) / (cfg.num_experts + cfg.num_shared_experts)


def granularity(cfg: ModelConfig) -> float:
    """G = 2 * d_model / d_expert (SPEC §4); a dense model counts its FFN as its single expert."""
    d_expert = cfg.intermediate_size if model_kind(cfg) == "dense" else cfg.moe_intermediate_size
    return 2 * cfg.hidden_size / d_expert


# ---------------------------------------------------------------- power laws and the published ones


@dataclass(frozen=True)
class PowerLaw:
    """y = coef * x^exponent."""

    coef: float
    exponent: float

    def predict(self, x):
        return self.coef * np.asarray(x, dtype=float) ** self.exponent

    def as_dict(self) -> dict:
        return asdict(self)


OPTIMAL_LR = PowerLaw(1.1576, -0.1529)
OPTIMAL_BATCH_TOKENS = PowerLaw(0.0694, 0.3644)
COMPUTE_OPTIMAL = {  # kind -> (M_opt in FLOPs/token, D_opt in tokens)
    "dense": (PowerLaw(0.0655, 0.5422), PowerLaw(15.2582, 0.4578)),
    "moe": (PowerLaw(0.1915, 0.5095), PowerLaw(5.2232, 0.4905)),
}
# EL law constants (SPEC §4).
EL_A, EL_D, EL_GAMMA, EL_BETA = 1.23, -7.61e-2, 1.67e-2, -1.17e-1
EL_A_START, EL_A_MAX = 1.63e-2, 5.28e16


def optimal_lr(compute):
    """eta_opt = 1.1576 C^-0.1529 (SPEC §4)."""
    return OPTIMAL_LR.predict(compute)


def optimal_batch_tokens(compute):
    """B_opt = 0.0694 C^0.3644 tokens (SPEC §4)."""
    return OPTIMAL_BATCH_TOKENS.predict(compute)


def compute_optimal(compute, kind: str = "moe"):
    """(M_opt, D_opt) of SPEC §4 for kind "dense" or "moe"; M_opt * D_opt ~= C."""
    if kind not in COMPUTE_OPTIMAL:
        raise ValueError(f"scaling: kind must be 'dense' or 'moe', got {kind!r}")
    m_law, d_law = COMPUTE_OPTIMAL[kind]
    return m_law.predict(compute), d_law.predict(compute)


def efficiency_leverage(activation, g, compute):
    """Efficiency leverage of activation ratio A and granularity G at compute C (SPEC §4):
    EL = Ahat^(alpha + gamma (log2 G)^2 + beta log2 G), alpha = a + d log10 C.

    Ahat ~= A + A_start < 1 and the exponent is negative for C above ~1e16 (~1e13.5 at G ~ 11), so there
    EL > 1, falls with A, grows with C, and peaks in G at log2 G = -beta / (2 gamma), G ~= 11.
    """
    a_hat = 1 / (1 / (activation + 1 / (1 / EL_A_START - 1 / EL_A_MAX)) + 1 / EL_A_MAX)
    log_g = np.log2(g)
    exponent = EL_A + EL_D * np.log10(compute) + EL_GAMMA * log_g**2 + EL_BETA * log_g
    return a_hat**exponent
