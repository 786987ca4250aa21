"""The math of the Ling scaling laws (SPEC §4): compute accounting, the published laws, and the fitters.

Pure functions on floats and arrays; the sweep runner and the CLI sit on top of this module.

    M = non_embedding_flops_per_token(cfg.model, seq_len=128); C = M * tokens
    lr, batch = optimal_lr(C), optimal_batch_tokens(C)          # published laws
    fit = fit_chinchilla(N, D, loss); N_opt, D_opt = chinchilla_optimal(1e21, fit)
    holdout_prediction(C, loss).abs_error                        # the wind-tunnel check

Every fit minimises a SUM of Huber losses of log-space residuals, r = log(model) - log(loss), where the
model is a sum of exponentials, E + A/X^alpha = exp(LSE(e, a - alpha log X)). The minimiser is one
L-BFGS written in numpy that runs every start of a grid (and every bootstrap resample) as one batch:
the problems are independent, so each keeps its own history and line search, and 4500 starts cost a
few seconds on two cores instead of 4500 calls to a scalar optimiser.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
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


def _columns(name: str, *columns):
    """Equal-length, positive, finite 1-D float arrays, or a one-line ValueError naming the function."""
    arrays = [np.asarray(c, dtype=float).ravel() for c in columns]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"scaling: {name} inputs must have equal lengths, got {[len(a) for a in arrays]}")
    if not all(np.all(np.isfinite(a) & (a > 0)) for a in arrays):
        raise ValueError(f"scaling: {name} inputs must be positive and finite")
    return arrays


def fit_power_law(x, y) -> PowerLaw:
    """y = coef * x^exponent by least squares on log y against log x."""
    x, y = _columns("fit_power_law", x, y)
    exponent, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return PowerLaw(float(np.exp(intercept)), float(exponent))


# ---------------------------------------------------------------- batched Huber / L-BFGS core


def _huber_objective(theta, log_x, log_y, weights, delta):
    """Weighted Huber sum of r = LSE(e, c_j - p_j log x_j) - log y, and its gradient, per row of theta.

    theta [S, 1 + 2k] = (e, c_1..c_k, p_1..p_k); log_x [n, k]; weights [S, n] (bootstrap counts or ones).
    Written in place on one [S, 1 + k, n] buffer: this function is the whole cost of every fit.
    """
    k = log_x.shape[1]
    z = np.empty((len(theta), k + 1, len(log_y)))
    z[:, 0] = theta[:, :1]
    np.multiply(theta[:, 1 + k:, None], -log_x.T[None], out=z[:, 1:])
    z[:, 1:] += theta[:, 1:1 + k, None]
    z_max = z.max(axis=1)
    z -= z_max[:, None]
    np.exp(z, out=z)
    total = z.sum(axis=1)
    r = z_max + np.log(total) - log_y
    r_clip = np.clip(r, -delta, delta)  # = dHuber/dr
    f = (weights * np.abs(r_clip) * (np.abs(r) - 0.5 * np.abs(r_clip))).sum(axis=1)
    z *= (weights * r_clip / total)[:, None]  # softmax weight of each term times dLoss/dr
    return f, np.concatenate([z.sum(axis=2), -(z[:, 1:] * log_x.T[None]).sum(axis=2)], axis=1)


def _lbfgs(fun, x0, max_iter=1000, history=10, ftol=1e-10, gtol=1e-14):
    """Minimise S independent problems at once; fun(x [s, k], rows) -> (f [s], grad [s, k]) for those rows.

    Each problem keeps its own curvature pairs and Armijo step, and stops on its own when a step lowers f
    by less than ftol relative (scipy's criterion, without its absolute floor so exact fits converge to
    float64 precision), or its gradient vanishes; only unfinished rows are evaluated. A step that fails
    at length 1 is retried at 2^-1..2^-8 in one call (then 2^-9..2^-16, ...): one call per round, not per
    halving, since per-call overhead dominates these small problems.
    """
    x = np.array(x0, dtype=float)
    n_prob, dim = x.shape
    f, g = fun(x, np.arange(n_prob))
    s_hist, y_hist = np.zeros((history, n_prob, dim)), np.zeros((history, n_prob, dim))
    rho = np.zeros((history, n_prob))  # 0 marks an empty slot: it drops out of the two-loop recursion
    gamma = 1 / np.maximum(1.0, np.linalg.norm(g, axis=1))  # first step at most unit length
    active = np.isfinite(f) & (np.abs(g).max(axis=1) > gtol)
    for it in range(max_iter):
        idx = np.flatnonzero(active)
        if not idx.size:
            break
        q, alphas = g[idx].copy(), []
        for j in (np.arange(it, it - history, -1) % history):  # newest pair first
            alpha = rho[j, idx] * (s_hist[j, idx] * q).sum(axis=1)
            q -= alpha[:, None] * y_hist[j, idx]
            alphas.append((j, alpha))
        q *= gamma[idx, None]
        for j, alpha in reversed(alphas):
            beta = rho[j, idx] * (y_hist[j, idx] * q).sum(axis=1)
            q += (alpha - beta)[:, None] * s_hist[j, idx]
        d = -q
        slope = (d * g[idx]).sum(axis=1)
        uphill = ~(slope < 0)
        if uphill.any():  # stale curvature: forget it and take a scaled gradient step
            rho[:, idx[uphill]] = 0.0
            d[uphill] = -gamma[idx[uphill], None] * g[idx[uphill]]
            slope[uphill] = (d[uphill] * g[idx[uphill]]).sum(axis=1)
        step = np.zeros(len(idx))
        f_new, g_new = f[idx].copy(), g[idx].copy()
        for powers in (np.array([0]), *np.split(np.arange(1, 49), 6)):
            todo = np.flatnonzero(step == 0)
            if not todo.size:
                break
            trial = 0.5 ** powers.astype(float)
            xt = x[idx[todo], None] + trial[None, :, None] * d[todo, None]
            ft, gt = fun(xt.reshape(-1, dim), np.repeat(idx[todo], len(trial)))
            ft, gt = ft.reshape(len(todo), -1), gt.reshape(len(todo), len(trial), dim)
            ok = np.isfinite(ft) & (ft <= f[idx[todo], None] + 1e-4 * trial * slope[todo, None])
            hit, first = ok.any(axis=1), ok.argmax(axis=1)
            rows = todo[hit]
            step[rows] = trial[first[hit]]
            f_new[rows], g_new[rows] = ft[hit, first[hit]], gt[hit, first[hit]]
        accepted = step > 0
        ok_idx = idx[accepted]
        s = step[accepted, None] * d[accepted]
        y = g_new[accepted] - g[ok_idx]
        sy = (s * y).sum(axis=1)
        slot = it % history
        rho[slot, idx] = 0.0
        curved = sy > 1e-20
        s_hist[slot, ok_idx], y_hist[slot, ok_idx] = s, y
        rho[slot, ok_idx[curved]] = 1 / sy[curved]
        gamma[ok_idx[curved]] = sy[curved] / (y[curved] ** 2).sum(axis=1)
        x[ok_idx] += s
        progress = f[ok_idx] - f_new[accepted] > ftol * np.maximum(np.abs(f[ok_idx]), np.abs(f_new[accepted]))
        f[ok_idx], g[ok_idx] = f_new[accepted], g_new[accepted]
        active[idx[~accepted]] = False
        active[ok_idx] = progress & (np.abs(g[ok_idx]).max(axis=1) > gtol)
    return x, f


def _fit_lse(log_x, log_y, starts, weights, delta, scout_ftol=1e-6):
    """The best minimiser of the Huber objective per group: starts [G, S, 1 + 2k], weights [G, n] -> [G, 1 + 2k].

    Every start runs to a loose ftol (scout_ftol), then each group's best runs on to float64 precision:
    most starts only need to show which basin they fall in, and polishing just the winners makes the
    4500-start grid several times cheaper than running every start to convergence. log x is centred
    inside (c'_j = c_j - p_j mean log x_j) so intercept and exponent are not nearly collinear.
    """
    k = log_x.shape[1]
    centre = log_x.mean(axis=0)
    n_group, n_start, dim = starts.shape
    x0 = np.array(starts, dtype=float).reshape(-1, dim)
    x0[:, 1:1 + k] -= x0[:, 1 + k:] * centre
    weights = np.repeat(weights, n_start, axis=0)
    fun = lambda th, rows: _huber_objective(th, log_x - centre, log_y, weights[rows], delta)
    theta, f = _lbfgs(fun, x0, ftol=scout_ftol)
    best = np.where(np.isfinite(f), f, np.inf).reshape(n_group, n_start).argmin(axis=1) + np.arange(n_group) * n_start
    theta, _ = _lbfgs(lambda th, rows: fun(th, best[rows]), theta[best], ftol=1e-12)
    theta[:, 1:1 + k] += theta[:, 1 + k:] * centre
    return theta


# ---------------------------------------------------------------- Chinchilla fits (SPEC §4)

# Chinchilla's grid of starts, 5 * 5 * 5 * 6 * 6 = 4500: cheap because they run as one batch.
CHINCHILLA_GRID = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0), "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
_CHINCHILLA_KEYS = ("e", "a", "b", "alpha", "beta")  # the layout of theta in _huber_objective with k = 2


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta (SPEC §4)."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @property
    def n_opt_exponent(self) -> float:
        """a of N_opt ~ C^a, comparable with the exponent of the published M_opt law."""
        return self.beta / (self.alpha + self.beta)

    @property
    def d_opt_exponent(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def predict(self, n, d):
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def as_dict(self) -> dict:
        return asdict(self)


def _grid_starts(grid: Mapping[str, Sequence[float]]):
    missing = [k for k in _CHINCHILLA_KEYS if k not in grid]
    if missing:
        raise ValueError(f"scaling: grid needs keys {', '.join(_CHINCHILLA_KEYS)}; missing {', '.join(missing)}")
    return np.array(list(itertools.product(*(grid[k] for k in _CHINCHILLA_KEYS))), dtype=float)


def _chinchilla(theta) -> ChinchillaFit:
    e, a, b, alpha, beta = (float(v) for v in theta)
    return ChinchillaFit(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=alpha, beta=beta)


def fit_chinchilla(n, d, loss, delta: float = 1e-3, grid: Mapping[str, Sequence[float]] | None = None) -> ChinchillaFit:
    """L(N, D) fitted as Chinchilla does (SPEC §4): A, B, E = exp(a, b, e), r = LSE(a - alpha log N,
    b - beta log D, e) - log L, Huber_delta(r) SUMMED over points, L-BFGS from every grid start, best kept.
    """
    n, d, loss = _columns("fit_chinchilla", n, d, loss)
    starts = _grid_starts(CHINCHILLA_GRID if grid is None else grid)
    (theta,) = _fit_lse(np.log(np.stack([n, d], axis=1)), np.log(loss), starts[None], np.ones((1, len(loss))), delta)
    return _chinchilla(theta)


def bootstrap_chinchilla(n, d, loss, n_boot: int = 200, seed: int = 0, level: float = 0.9, delta: float = 1e-3,
                         grid: Mapping[str, Sequence[float]] | None = None, grid_starts: int = 8,
                         fit: ChinchillaFit | None = None) -> dict[str, tuple[float, float]]:
    """Percentile intervals (central `level`) of E, A, B, alpha, beta, n_opt_exponent and d_opt_exponent over
    bootstrap resamples of the points.

    A resample is a vector of multinomial counts used as Huber weights. Each is refitted from the full-data
    fit (which sits near every resample's optimum; computed here unless passed) plus `grid_starts` random
    grid starts (a guard against a resample whose optimum moved to another basin), all as one batch.
    """
    n, d, loss = _columns("bootstrap_chinchilla", n, d, loss)
    fit = fit_chinchilla(n, d, loss, delta, grid) if fit is None else fit
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(loss), np.full(len(loss), 1 / len(loss)), size=n_boot).astype(float)
    grid = _grid_starts(CHINCHILLA_GRID if grid is None else grid)
    full_theta = [np.log(fit.E), np.log(fit.A), np.log(fit.B), fit.alpha, fit.beta]
    starts = np.stack([np.vstack([full_theta, grid[rng.choice(len(grid), min(grid_starts, len(grid)), replace=False)]])
                       for _ in range(n_boot)])
    theta = _fit_lse(np.log(np.stack([n, d], axis=1)), np.log(loss), starts, counts, delta)
    fits = [_chinchilla(t) for t in theta]
    tail = 100 * (1 - level) / 2
    names = (*fit.as_dict(), "n_opt_exponent", "d_opt_exponent")
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
            for k, v in ((k, [getattr(f, k) for f in fits]) for k in names)}


def chinchilla_optimal(compute, fit: ChinchillaFit):
    """(N_opt, D_opt) minimising fit.predict on C = 6 N D (SPEC §4): N_opt = G (C/6)^(beta/(alpha+beta)),
    D_opt = G^-1 (C/6)^(alpha/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)).
    """
    g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / (fit.alpha + fit.beta))
    per_six = np.asarray(compute, dtype=float) / 6
    return g * per_six**fit.n_opt_exponent, per_six**fit.d_opt_exponent / g


# ---------------------------------------------------------------- loss against compute (the wind tunnel)


@dataclass(frozen=True)
class LossCurve:
    """L(C) = E + A * C^-alpha: the frontier loss at compute C."""

    E: float
    A: float
    alpha: float

    def predict(self, compute):
        return self.E + self.A * np.asarray(compute, dtype=float) ** -self.alpha

    def as_dict(self) -> dict:
        return asdict(self)


def fit_loss_vs_compute(compute, loss, delta: float = 1e-3) -> LossCurve:
    """Saturating power law L(C) = E + A C^-alpha, fitted like fit_chinchilla with a single term (SPEC §4).

    Saturating rather than a straight line in log-log: losses bend toward an irreducible floor, and a
    straight line extrapolated 100x past the data overshoots the drop (E -> 0 recovers the plain law).
    Starts come from the data: E at fractions of the smallest loss, alpha on a grid, A through the points.
    """
    compute, loss = _columns("fit_loss_vs_compute", compute, loss)
    if len(loss) < 3:
        raise ValueError(f"scaling: fit_loss_vs_compute needs >= 3 points for 3 coefficients, got {len(loss)}")
    log_c = np.log(compute)
    starts = np.array([[np.log(floor), np.mean(np.log(loss - floor) + p * log_c), p]
                       for floor, p in itertools.product(np.array([0.05, 0.25, 0.5, 0.75, 0.9]) * loss.min(),
                                                         (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0))])
    ((e, a, alpha),) = _fit_lse(log_c[:, None], np.log(loss), starts[None], np.ones((1, len(loss))), delta)
    return LossCurve(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha))


def bootstrap_loss_vs_compute(compute, loss, n_boot: int = 200, seed: int = 0, level: float = 0.9, delta: float = 1e-3,
                              fit: LossCurve | None = None) -> dict[str, tuple[float, float]]:
    """Percentile intervals (central `level`) of E, A and alpha of `fit_loss_vs_compute` over bootstrap resamples.

    As `bootstrap_chinchilla`: each resample is a vector of multinomial counts used as Huber weights, refitted
    from the full-data fit and a few of the data-driven starts, all as one batch. A resample needs >= 3 distinct
    points for 3 coefficients; those with fewer are drawn again.
    """
    compute, loss = _columns("bootstrap_loss_vs_compute", compute, loss)
    fit = fit_loss_vs_compute(compute, loss, delta) if fit is None else fit
    rng = np.random.default_rng(seed)
    counts = []
    while len(counts) < n_boot:
        c = rng.multinomial(len(loss), np.full(len(loss), 1 / len(loss))).astype(float)
        if np.count_nonzero(c) >= 3:
            counts.append(c)
    log_c = np.log(compute)
    full = [np.log(fit.E), np.log(fit.A), fit.alpha]
    starts = np.stack([np.array([full, *[[np.log(f * loss.min()), np.mean(np.log(loss - f * loss.min()) + p * log_c), p]
                                          for f, p in zip(rng.choice([0.05, 0.25, 0.5, 0.75, 0.9], 4),
                                                          rng.choice([0.05, 0.1, 0.3, 0.5, 1.0], 4))]])
                       for _ in range(n_boot)])
    theta = _fit_lse(log_c[:, None], np.log(loss), starts, np.array(counts), delta)
    values = {"E": np.exp(theta[:, 0]), "A": np.exp(theta[:, 1]), "alpha": theta[:, 2]}
    tail = 100 * (1 - level) / 2
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in values.items()}


def bootstrap_power_law(x, y, n_boot: int = 1000, seed: int = 0, level: float = 0.9) -> dict[str, tuple[float, float]]:
    """Percentile intervals of coef and exponent of `fit_power_law` over bootstrap resamples of the points
    (resamples with fewer than 2 distinct x are drawn again: they fix no slope)."""
    x, y = _columns("bootstrap_power_law", x, y)
    if len(np.unique(x)) < 2:
        raise ValueError("scaling: bootstrap_power_law needs >= 2 distinct x")
    rng = np.random.default_rng(seed)
    fits = []
    while len(fits) < n_boot:
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) >= 2:
            fits.append(np.polyfit(np.log(x[idx]), np.log(y[idx]), 1))
    exponent, intercept = np.array(fits).T
    tail = 100 * (1 - level) / 2
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
            for k, v in (("coef", np.exp(intercept)), ("exponent", exponent))}


@dataclass(frozen=True)
class HoldoutPrediction:
    """The largest-compute point predicted by a LossCurve fitted on the others."""

    fit: LossCurve
    compute: float
    predicted: float
    actual: float

    @property
    def abs_error(self) -> float:
        return abs(self.predicted - self.actual)

    def as_dict(self) -> dict:
        return {"fit": self.fit.as_dict(), "compute": self.compute, "predicted": self.predicted,
                "actual": self.actual, "abs_error": self.abs_error}


def holdout_prediction(compute, loss, delta: float = 1e-3) -> HoldoutPrediction:
    """Fit L(C) on all but the largest compute and predict it (SPEC §4 wind tunnel: within 0.01).

    Pass one point per budget, the frontier (best loss at each C): the curve is a law for that envelope.
    """
    c, lo = _columns("holdout_prediction", compute, loss)
    if len(np.unique(c)) != len(c):
        raise ValueError("scaling: holdout_prediction wants one point per compute budget (the best loss at each)")
    if len(c) < 4:
        raise ValueError(f"scaling: holdout_prediction needs >= 4 points (3 to fit, 1 to predict), got {len(c)}")
    last = int(np.argmax(c))
    keep = np.arange(len(c)) != last
    fit = fit_loss_vs_compute(c[keep], lo[keep], delta)
    return HoldoutPrediction(fit=fit, compute=float(c[last]), predicted=float(fit.predict(c[last])), actual=float(lo[last]))
