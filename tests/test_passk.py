"""Unbiased pass@k and the ApexEval score (SPEC §6)."""

import math

import numpy as np
import pytest

from linglab.passk import apex_score, pass_at_k, pass_at_k_batch, pass_at_k_by_variant


def closed_form(n, c, k):
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_matches_the_binomial_closed_form():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(closed_form(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 4, 2) == 1.0  # n - c = 1 < k: every 2-subset holds a correct sample
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)


def test_pass_at_k_batch_matches_the_scalar_form():
    counts = [0, 1, 3, 7, 16, 15]
    batch = pass_at_k_batch(16, counts, k=4)
    np.testing.assert_allclose(batch, [pass_at_k(16, c, 4) for c in counts], atol=1e-12)
    per_problem_n = [4, 8, 16, 10]
    np.testing.assert_allclose(pass_at_k_batch(per_problem_n, [1, 2, 15, 0], k=3),
                               [closed_form(n, c, 3) for n, c in zip(per_problem_n, [1, 2, 15, 0])], atol=1e-12)
    assert pass_at_k_batch(8, [], k=2).shape == (0,)


def test_apex_score_is_the_best_variant_mean():
    counts = {"plain": [0, 2], "cot": [4, 0], "terse": [1, 1]}
    # n = 4, k = 1: pass@1 = c / 4. Means: plain 0.25, cot 0.5, terse 0.25.
    assert pass_at_k_by_variant(counts, n=4, k=1) == pytest.approx({"plain": 0.25, "cot": 0.5, "terse": 0.25})
    assert apex_score(counts, n=4, k=1) == pytest.approx(0.5)
    # Per set, not per problem: the per-problem max would be (1 + 0.5) / 2 = 0.75.
    assert apex_score({"a": [4, 0], "b": [0, 4]}, n=4, k=1) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        apex_score({"a": [1, 2], "b": [1]}, n=4, k=1)
    with pytest.raises(ValueError):
        apex_score({}, n=4, k=1)
