"""Scaling-law math (SPEC §4): FLOPs against hand counts, the published laws, and the fitters on synthetic data."""

import numpy as np
import pytest

from linglab.config import ModelConfig, load_config
from linglab.flops import attention_flops
from linglab.scaling.fit import (
    ChinchillaFit,
    LossCurve,
    bootstrap_chinchilla,
    bootstrap_loss_vs_compute,
    bootstrap_power_law,
    chinchilla_optimal,
    fit_chinchilla,
    fit_loss_vs_compute,
    fit_power_law,
    holdout_prediction,
)
from linglab.scaling.laws import (
    activation_ratio,
    compute_optimal,
    efficiency_leverage,
    granularity,
    model_kind,
    non_embedding_flops_per_token,
    optimal_batch_tokens,
    optimal_lr,
    training_compute,
)

# hidden 64, 2 layers, 4 query heads and 2 KV heads of 16 channels, dense FFN 128, 8 experts of 32 (top-2 + 1 shared).
SHAPE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8, num_shared_experts=1,
             num_experts_per_tok=2, n_group=2, topk_group=1, num_nextn_predict_layers=1)
SEQ = 8


def _config(**overrides) -> ModelConfig:
    cfg = ModelConfig(**{**SHAPE, **overrides})
    cfg.validate()
    return cfg


# Per layer, forward, by hand (a GEMM with P weights costs 2P FLOPs per token):
#   attention projections: qkv 64 * (4 + 2 * 2) * 16 = 8192 weights, dense 4 * 16 * 64 = 4096 -> 12288
#   QK^T and AV: 2 FLOPs * 4 heads * 16 channels * (8 + 1) / 2 mean causal context = 576 each -> 1152
#   dense SwiGLU FFN: 3 * 64 * 128 = 24576 weights
#   MoE FFN: (2 routed + 1 shared) * 3 * 64 * 32 = 18432 weights, router gate 8 * 64 = 512 -> 18944
ATTN_GEMM_FWD = 2 * 12288  # 24576
ATTN_SCORES_FWD = 1152
DENSE_LAYER_FWD = ATTN_GEMM_FWD + ATTN_SCORES_FWD + 2 * 24576  # 74880
MOE_LAYER_FWD = ATTN_GEMM_FWD + ATTN_SCORES_FWD + 2 * 18944  # 63616


def test_flops_of_a_dense_config_match_the_hand_count():
    cfg = _config(first_k_dense_replace=2)
    assert model_kind(cfg) == "dense"
    assert attention_flops(cfg, SEQ) == ATTN_SCORES_FWD
    # 3 x forward (backward = two GEMMs per forward GEMM); no embedding, no lm_head, no MTP.
    assert non_embedding_flops_per_token(cfg, SEQ) == 3 * 2 * DENSE_LAYER_FWD == 449280


def test_flops_of_a_moe_config_match_the_hand_count_and_exclude_mtp():
    cfg = _config(first_k_dense_replace=1)
    assert model_kind(cfg) == "moe"
    assert non_embedding_flops_per_token(cfg, SEQ) == 3 * (DENSE_LAYER_FWD + MOE_LAYER_FWD) == 415488
    assert non_embedding_flops_per_token(_config(first_k_dense_replace=1, num_nextn_predict_layers=0), SEQ) == 415488
    assert training_compute(cfg, SEQ, tokens=1e9) == 415488 * 1e9


def test_ling_mini_counts_its_published_active_non_embedding_parameters():
    cfg = load_config("ling-mini-2.0").model
    seq = 4096
    params = (non_embedding_flops_per_token(cfg, seq) - 3 * cfg.num_hidden_layers * attention_flops(cfg, seq)) / 6
    assert params == pytest.approx(0.789e9, rel=1e-3)  # SPEC §1.1: 0.789B active non-embedding
    assert activation_ratio(cfg) == 9 / 257
    assert granularity(cfg) == 8.0  # 2 * 2048 / 512


def test_a_dense_config_has_activation_one_and_its_ffn_as_the_expert():
    cfg = _config(first_k_dense_replace=2)
    assert activation_ratio(cfg) == 1.0
    assert granularity(cfg) == 1.0  # 2 * 64 / 128
    moe = _config(first_k_dense_replace=1)
    assert activation_ratio(moe) == 3 / 9 and granularity(moe) == 4.0


def test_published_laws_reproduce_hand_computed_values():
    # 1.1576 * 10^(-0.1529 * 20) = 1.1576 * 10^-3.058; 0.0694 * 10^(0.3644 * 20) = 0.0694 * 10^7.288.
    assert optimal_lr(1e20) == pytest.approx(1.01288e-3, rel=1e-5)
    assert optimal_lr(1e22) == pytest.approx(5.00909e-4, rel=1e-5)
    assert optimal_batch_tokens(1e20) == pytest.approx(1.346975e6, rel=1e-5)
    assert optimal_batch_tokens(1e22) == pytest.approx(7.213723e6, rel=1e-5)
    # MoE at 1e21: 0.1915 * 10^(0.5095 * 21), 5.2232 * 10^(0.4905 * 21); dense: 0.0655, 0.5422 / 15.2582, 0.4578.
    m, d = compute_optimal(1e21, "moe")
    assert (m, d) == (pytest.approx(9.586692e9, rel=1e-5), pytest.approx(1.043366e11, rel=1e-5))
    m, d = compute_optimal(1e21, "dense")
    assert (m, d) == (pytest.approx(1.593827e10, rel=1e-5), pytest.approx(6.270516e10, rel=1e-5))
    assert optimal_lr(np.array([1e20, 1e22])).shape == (2,)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_compute_optimal_allocations_spend_the_budget(kind):
    for c in (1e18, 1e21, 1e24):
        m, d = compute_optimal(c, kind)
        assert m * d == pytest.approx(c, rel=1e-3)  # coefficients multiply to ~1, exponents sum to 1
    with pytest.raises(ValueError, match="kind"):
        compute_optimal(1e20, "hybrid")


def test_efficiency_leverage_is_sane():
    # Ling-mini shape (A = 9/257, G = 8) at 1e22: Ahat = 1 / (1 / (A + 1 / (1/0.0163 - 1/5.28e16)) + 1/5.28e16)
    # = 0.0513195, exponent 1.23 - 0.0761 * 22 + 0.0167 * 9 - 0.117 * 3 = -0.6449 -> EL = 6.788 (the "7x" claim).
    assert efficiency_leverage(9 / 257, 8, 1e22) == pytest.approx(6.78796, rel=1e-5)
    activations = np.array([0.01, 0.02, 0.05, 0.1, 0.2])
    for c in (1e20, 1e22, 1e24):
        el = efficiency_leverage(activations, 8, c)
        assert np.all(el > 1) and np.all(np.diff(el) < 0)  # leverage at low A, lower A always helps
    assert efficiency_leverage(0.05, 8, 1e24) > efficiency_leverage(0.05, 8, 1e20)  # grows with compute
    g = np.linspace(2, 32, 3001)
    best_g = g[np.argmax(efficiency_leverage(0.05, g, 1e21))]
    assert best_g == pytest.approx(2 ** (0.117 / (2 * 0.0167)), abs=0.02)  # log2 G = -beta / (2 gamma): G = 11.34
    assert 8 <= best_g <= 12


def test_fit_power_law_recovers_noisy_coefficients():
    rng = np.random.default_rng(0)
    x = np.logspace(15, 20, 30)
    y = 3.0 * x**-0.15 * np.exp(rng.normal(0, 0.02, x.shape))
    law = fit_power_law(x, y)
    assert law.exponent == pytest.approx(-0.15, abs=0.005)
    assert law.coef == pytest.approx(3.0, rel=0.2)
    assert fit_power_law(x, 3.0 * x**-0.15).predict(1e22) == pytest.approx(3.0 * 1e22**-0.15, rel=1e-9)
    with pytest.raises(ValueError, match="positive"):
        fit_power_law([1.0, -1.0], [1.0, 2.0])


TRUE = ChinchillaFit(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
N_GRID, D_GRID = (v.ravel() for v in np.meshgrid(np.logspace(6, 9, 6), np.logspace(7, 10, 6)))


def _close_to_truth(fit: ChinchillaFit, rel: float, rel_ab: float, abs_exp: float) -> None:
    assert fit.E == pytest.approx(TRUE.E, rel=rel)
    assert (fit.A, fit.B) == (pytest.approx(TRUE.A, rel=rel_ab), pytest.approx(TRUE.B, rel=rel_ab))
    assert (fit.alpha, fit.beta) == (pytest.approx(TRUE.alpha, abs=abs_exp), pytest.approx(TRUE.beta, abs=abs_exp))


def test_fit_chinchilla_recovers_exact_data_tightly():
    _close_to_truth(fit_chinchilla(N_GRID, D_GRID, TRUE.predict(N_GRID, D_GRID)), rel=1e-8, rel_ab=1e-8, abs_exp=1e-9)


@pytest.fixture(scope="module")
def noisy_loss():
    return TRUE.predict(N_GRID, D_GRID) * np.exp(np.random.default_rng(1).normal(0, 0.005, N_GRID.shape))


def test_fit_chinchilla_with_noise_and_bootstrap_intervals_contain_the_truth(noisy_loss):
    fit = fit_chinchilla(N_GRID, D_GRID, noisy_loss)
    _close_to_truth(fit, rel=0.05, rel_ab=0.25, abs_exp=0.02)
    intervals = bootstrap_chinchilla(N_GRID, D_GRID, noisy_loss, n_boot=100, seed=0, level=0.9, fit=fit)
    truth = {**TRUE.as_dict(), "n_opt_exponent": TRUE.n_opt_exponent, "d_opt_exponent": TRUE.d_opt_exponent}
    assert set(intervals) == set(truth)
    for name, (low, high) in intervals.items():
        assert low <= truth[name] <= high, name
        assert low <= getattr(fit, name) <= high, name


def test_chinchilla_optimal_spends_the_budget_and_minimises_the_loss():
    for c in (1e18, 1e21):
        n_opt, d_opt = chinchilla_optimal(c, TRUE)
        assert 6 * n_opt * d_opt == pytest.approx(c, rel=1e-12)
        n = n_opt * np.logspace(-1, 1, 2001)  # along the iso-compute line D = C / (6 N)
        assert n[np.argmin(TRUE.predict(n, c / (6 * n)))] == pytest.approx(n_opt, rel=3e-3)


def test_fit_loss_vs_compute_recovers_a_saturating_law():
    true = LossCurve(E=1.5, A=30.0, alpha=0.12)
    c = np.logspace(12, 16, 5)
    fit = fit_loss_vs_compute(c, true.predict(c))
    assert (fit.E, fit.A, fit.alpha) == (pytest.approx(1.5, rel=1e-6), pytest.approx(30.0, rel=1e-5),
                                         pytest.approx(0.12, rel=1e-6))
    with pytest.raises(ValueError, match=">= 3 points"):
        fit_loss_vs_compute(c[:2], true.predict(c[:2]))


def test_loss_vs_compute_and_power_law_bootstrap_intervals_contain_the_truth_and_shrink_with_less_noise():
    true = LossCurve(E=1.5, A=30.0, alpha=0.12)
    c = np.logspace(12, 16, 12)
    widths = []
    for sigma in (0.01, 0.002):
        loss = true.predict(c) * np.exp(np.random.default_rng(2).normal(0, sigma, c.shape))
        intervals = bootstrap_loss_vs_compute(c, loss, n_boot=100, seed=0)
        assert set(intervals) == {"E", "A", "alpha"}
        for name, (low, high) in intervals.items():
            assert low <= getattr(true, name) <= high, (sigma, name)
        widths.append(intervals["alpha"][1] - intervals["alpha"][0])
    assert widths[1] < widths[0] / 2
    x = np.logspace(11, 13, 8)
    y = 0.2 * x**0.5 * np.exp(np.random.default_rng(3).normal(0, 0.05, x.shape))
    law = bootstrap_power_law(x, y, seed=0)
    assert law["exponent"][0] <= 0.5 <= law["exponent"][1] and law["exponent"][1] - law["exponent"][0] < 0.2
    with pytest.raises(ValueError, match="distinct"):
        bootstrap_power_law([1.0, 1.0], [2.0, 3.0])


def test_holdout_prediction_predicts_the_largest_budget_from_the_others():
    true = LossCurve(E=1.5, A=30.0, alpha=0.12)
    c = np.array([1e16, 1e12, 1e13, 1e14, 1e15, 1e12 * 10**0.5])  # order does not matter; 1e16 is held out
    loss = true.predict(c)
    loss[0] += 0.05  # only the held-out point changes: it moves `actual`, never the fit
    result = holdout_prediction(c, loss)
    assert result.compute == 1e16
    assert result.predicted == pytest.approx(float(true.predict(1e16)), abs=1e-6)
    assert result.actual == loss[0]
    assert result.abs_error == pytest.approx(0.05, abs=1e-6)
    assert result.as_dict()["abs_error"] == result.abs_error
    with pytest.raises(ValueError, match="one point per compute budget"):
        holdout_prediction([1e12, 1e13, 1e14, 1e14], [3.0, 2.9, 2.8, 2.7])
