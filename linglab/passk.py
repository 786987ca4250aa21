"""Unbiased pass@k and the ApexEval score, the best pass@k over prompt/format variants (SPEC §6).

    pass_at_k(n=16, c=3, k=4)                                  # one problem: 16 samples, 3 correct
    pass_at_k_batch(16, [3, 0, 16], k=4)                       # many problems at once
    apex_score({"plain": [3, 0, 16], "cot": [5, 1, 16]}, n=16, k=4)

ApexEval max-pools over variants per problem set: each variant (one prompt/format applied to every
problem) gets its mean pass@k over the problems, and the score is the best variant's. This is "solvable
under the best single prompt". Taking the max per problem instead would mix prompts across problems and
grow with the number of variants even when no variant is better than another.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def _check(n: np.ndarray, c: np.ndarray, k: int) -> None:
    if (n < 1).any() or (c < 0).any() or (c > n).any():
        raise ValueError("pass@k needs n >= 1 samples and 0 <= c <= n correct")
    if k < 1 or (k > n).any():
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of n samples with c correct: 1 - C(n-c, k) / C(n, k) (SPEC §6).

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the huge binomials; 1 when n - c < k.
    """
    _check(np.asarray(n), np.asarray(c), k)
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def pass_at_k_batch(n: int | Sequence[int] | np.ndarray, correct_counts: Sequence[int] | np.ndarray, k: int) -> np.ndarray:
    """`pass_at_k` for many problems at once [P]; `n` is one sample count for all or one per problem."""
    c = np.asarray(correct_counts, dtype=np.int64)
    n = np.broadcast_to(np.asarray(n, dtype=np.int64), c.shape)
    if c.size == 0:
        return np.zeros(0)
    _check(n, c, k)
    i = np.arange(1, n.max() + 1)
    # Row p multiplies the factors i = n_p - c_p + 1 .. n_p; every other i contributes 1.
    in_product = (i > (n - c)[:, None]) & (i <= n[:, None])
    product = np.where(in_product, 1.0 - k / i, 1.0).prod(axis=1)
    return np.where(n - c < k, 1.0, 1.0 - product)


def pass_at_k_by_variant(per_variant_correct_counts: Mapping[str, Sequence[int]], n: int, k: int) -> dict[str, float]:
    """Mean pass@k over the problems, for each prompt/format variant (all variants score the same problems)."""
    sizes = {len(counts) for counts in per_variant_correct_counts.values()}
    if len(sizes) > 1 or 0 in sizes:
        raise ValueError(f"every variant must score the same, non-empty problem set, got problem counts {sorted(sizes)}")
    return {name: float(pass_at_k_batch(n, counts, k).mean()) for name, counts in per_variant_correct_counts.items()}


def apex_score(per_variant_correct_counts: Mapping[str, Sequence[int]], n: int, k: int) -> float:
    """ApexEval (SPEC §6): the best variant's mean pass@k over the problem set (see the module docstring)."""
    if not per_variant_correct_counts:
        raise ValueError("apex_score needs at least one variant")
    return max(pass_at_k_by_variant(per_variant_correct_counts, n, k).values())
