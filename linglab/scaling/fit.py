"""The fitters of SPEC §4 and the analysis of a sweep's results: power laws, Chinchilla's L(N, D), the saturating
loss-vs-compute curve, their bootstrap intervals, the held-out budget prediction, and `fit_results`.

Pure functions on floats, arrays and result rows (`linglab.scaling.sweep` writes the rows).

    fit = fit_chinchilla(N, D, loss); N_opt, D_opt = chinchilla_optimal(1e21, fit)
    holdout_prediction(C, loss).abs_error                        # the wind-tunnel check
    fit_results(rows)                                            # every fit the rows support, as one dict

Every fit minimises a SUM of Huber losses of log-space residuals, r = log(model) - log(loss), where the
model is a sum of exponentials, E + A/X^alpha = exp(LSE(e, a - alpha log X)). The minimiser is one
L-BFGS written in numpy that runs every start of a grid (and every bootstrap resample) as one batch:
the problems are independent, so each keeps its own history and line search, and 4500 starts cost a
few seconds on two cores instead of 4500 calls to a scalar optimiser.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from linglab.scaling.laws import PowerLaw, efficiency_leverage

# ---------------------------------------------------------------- power laws


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
    curves = bootstrap_loss_curves(compute, loss, n_boot, seed, delta, fit)
    tail = 100 * (1 - level) / 2
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
            for k, v in zip(("E", "A", "alpha"), curves.T)}


def bootstrap_prediction(compute, loss, at: float, n_boot: int = 200, seed: int = 0, level: float = 0.9,
                         delta: float = 1e-3, fit: LossCurve | None = None) -> tuple[float, float]:
    """Percentile interval (central `level`) of L(at) over the bootstrap refits of `fit_loss_vs_compute`: how far the
    frontier points alone pin the prediction (not the run-to-run noise of the run being predicted)."""
    e, a, alpha = bootstrap_loss_curves(compute, loss, n_boot, seed, delta, fit).T
    with np.errstate(over="ignore", invalid="ignore"):  # a resample's A can overflow exp(): no prediction from it
        predicted = e + a * float(at) ** -alpha
    predicted = predicted[np.isfinite(predicted)]
    if not len(predicted):
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    return float(np.percentile(predicted, tail)), float(np.percentile(predicted, 100 - tail))


def bootstrap_loss_curves(compute, loss, n_boot: int = 200, seed: int = 0, delta: float = 1e-3,
                          fit: LossCurve | None = None) -> np.ndarray:
    """[n_boot, 3] = (E, A, alpha) of `fit_loss_vs_compute` refitted on bootstrap resamples of the points."""
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
    return np.stack([np.exp(theta[:, 0]), np.exp(theta[:, 1]), theta[:, 2]], axis=1)


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


# ---------------------------------------------------------------- the analysis of sweep results (SPEC §4)


def _loss(row: dict) -> float:
    return row["heldout_loss"]


def frontier(rows: list[dict]) -> list[dict]:
    """The best (lowest held-out loss) run at each budget, by budget."""
    best: dict[float, dict] = {}
    for row in rows:
        if row["budget"] not in best or _loss(row) < _loss(best[row["budget"]]):
            best[row["budget"]] = row
    return [best[c] for c in sorted(best)]


def _invert(curve: dict, loss: float) -> float:
    """The compute at which a fitted loss curve reaches `loss`: inf when it is at or below the curve's floor."""
    if "alpha" in curve:  # saturating L = E + A C^-alpha
        return math.inf if loss <= curve["E"] else ((loss - curve["E"]) / curve["A"]) ** (-1 / curve["alpha"])
    return (loss / curve["coef"]) ** (1 / curve["exponent"])


def runs_on_rule(rows: list[dict]) -> list[dict]:
    """The runs at the sweep's own LR and batch rule (multipliers 1)."""
    return [r for r in rows if r["lr_multiplier"] == 1 and r["batch_multiplier"] == 1]


def _hyper_optimum(rows: list[dict], key: str, other: str) -> list[tuple[float, float]]:
    """(budget, value of `key` of the best run) at budgets where runs of the best shape and `other` vary `key`."""
    points = []
    for best in frontier(rows):
        peers = [r for r in rows if r["budget"] == best["budget"] and r["model"] == best["model"] and r[other] == best[other]]
        if len({r[key] for r in peers}) > 1:
            points.append((best["budget"], best[key]))
    return points


NEAR_OPTIMAL = 0.0025  # Ling's near-optimal band: runs within 0.25% of the best loss at a budget (SPEC §4)


def hyper_scans(rows: list[dict], key: str, other: str, tol: float = NEAR_OPTIMAL) -> list[dict]:
    """Per budget where runs of one shape (and one value of `other`) vary `key` (lr or batch_tokens): the values
    and losses, the best value, the near-optimal band (values of the runs within `tol` of the best loss, relative),
    and, when the best is inside the scan, the vertex of a parabola in log(value) through it and its neighbours.

    The band, not only the argmin, is what a law for the hyperparameter should pass through (Ling fits eta_opt and
    B_opt to near-optimal runs, SPEC §4): at small scale a loss this flat in the LR picks its argmin by noise.
    """
    scans = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["budget"], json.dumps(r["model"], sort_keys=True), r[other]), []).append(r)
    for (budget, _, _), peers in sorted(groups.items(), key=lambda item: item[0][0]):
        if len({r[key] for r in peers}) < 3:
            continue
        peers = sorted(peers, key=lambda r: r[key])
        values, losses = np.array([r[key] for r in peers], float), np.array([_loss(r) for r in peers])
        best = int(np.argmin(losses))
        near = values[losses <= losses[best] * (1 + tol)]
        model = peers[0]["model"]
        scan = {"budget": budget, "shape": f"d{model['hidden_size']} x {model['num_hidden_layers']}", "values": values.tolist(),
                "losses": losses.tolist(), "best": float(values[best]), "band": [float(near.min()), float(near.max())],
                "vertex": None, "edge": best in (0, len(values) - 1)}
        if not scan["edge"]:
            x, y = np.log(values[best - 1:best + 2]), losses[best - 1:best + 2]
            a, b, _ = np.polyfit(x, y, 2)
            if a > 0:
                scan["vertex"] = float(np.exp(-b / (2 * a)))
        scans.append(scan)
    return scans


def fit_results(rows: list[dict], n_boot: int = 200) -> dict:
    """Every fit of SPEC §4 the results support; a note for each one they do not.

    Losses are held-out losses. Shape-axis runs give the frontier L(C) (best loss per budget, fit_loss_vs_compute),
    the wind-tunnel check (the largest budget predicted from the others), M_opt(C) (M of the best run per budget),
    L(N, D) with bootstrap intervals (>= 5 distinct (N, D)), and eta_opt / B_opt when the grid varied them. Dense runs
    give L_dense(C); each MoE run of the other axes then has EL = C_dense(L_MoE) / C_MoE beside the published EL.
    """
    notes, fit = [], {"runs": len(rows), "laws": {}}
    shape_rows = [r for r in rows if r["axis"] == "shape"]
    front = frontier(shape_rows)
    fit["frontier"] = [{"budget": r["budget"], "name": r["name"], "loss": _loss(r), "M": r["M"], "N": r["N"], "D": r["D"]}
                       for r in front]
    if len(front) >= 3:
        curve = fit_loss_vs_compute([r["compute"] for r in front], [_loss(r) for r in front])
        fit["laws"]["loss_vs_compute"] = curve.as_dict()
        fit["laws"]["m_opt"] = fit_power_law([r["budget"] for r in front], [r["M"] for r in front]).as_dict()
        if n_boot:  # 90% bootstrap intervals over the frontier points
            fit["intervals"] = {
                "loss_vs_compute": bootstrap_loss_vs_compute([r["compute"] for r in front],
                                                                     [_loss(r) for r in front], n_boot=n_boot, fit=curve),
                "m_opt": bootstrap_power_law([r["budget"] for r in front], [r["M"] for r in front])}
        edges = [f"{r['budget']:.3g}" for r in front
                 if len(ms := {p["M"] for p in shape_rows if p["budget"] == r["budget"]}) > 1 and r["M"] in (min(ms), max(ms))]
        if edges:
            notes.append(f"M_opt: at C = {', '.join(edges)} the best run is the smallest or largest of its profile, so the "
                         "optimum may lie outside it there (widen sizes_per_budget or move centre_scale)")
    else:
        notes.append(f"loss vs compute: {len(front)} shape-axis budgets, need >= 3")
    if len(front) >= 4:
        fit["holdout"] = holdout_prediction([r["compute"] for r in front], [_loss(r) for r in front]).as_dict()
    else:
        notes.append(f"held-out prediction: {len(front)} shape-axis budgets, need >= 4")

    # L(N, D) from the runs at the sweep's own LR and batch: an off-optimum LR would read as a worse (N, D).
    on_rule = runs_on_rule(shape_rows)
    pairs = {(r["N"], r["D"]) for r in on_rule}
    if len(pairs) >= 5:
        n, d, loss = ([r[k] for r in on_rule] for k in ("N", "D", "heldout_loss"))
        chin = fit_chinchilla(n, d, loss)
        # Undertrained small runs can prefer a smaller N at every D: alpha <= 0 (or a term at 0) has no optimum.
        sane = all(math.isfinite(v) and v > 0 for v in chin.as_dict().values())
        fit["chinchilla"] = {"fit": chin.as_dict(), "n_opt_exponent": chin.n_opt_exponent, "degenerate": not sane,
                             "d_opt_exponent": chin.d_opt_exponent, "points": len(pairs),
                             "intervals": bootstrap_chinchilla(n, d, loss, n_boot=n_boot, fit=chin)
                             if n_boot and sane else None}
        if not sane:
            notes.append(f"L(N, D): the fit is degenerate ({', '.join(f'{k} = {v:.3g}' for k, v in chin.as_dict().items())}): "
                         "no intervals and no compute-optimal N, D")
    else:
        notes.append(f"L(N, D): {len(pairs)} distinct (N, D) shape-axis pairs, need >= 5")

    for key, other, law in (("lr", "batch_tokens", "lr"), ("batch_tokens", "lr", "batch_tokens")):
        points = _hyper_optimum(shape_rows, key, other)
        if len(points) >= 2:
            fit["laws"][law] = fit_power_law(*zip(*points)).as_dict()
            fit[f"{law}_optima"] = points
        else:
            notes.append(f"optimal {key} vs compute: the sweep did not vary {key} at >= 2 budgets")
        if scans := hyper_scans(shape_rows, key, other):
            fit[f"{law}_scans"] = scans
            vertices = [(s["budget"], s["vertex"]) for s in scans if s["vertex"] is not None]
            if len(vertices) >= 2:
                fit["laws"][f"{law}_vertex"] = fit_power_law(*zip(*vertices)).as_dict()
            if edges := [f"{s['budget']:.3g}" for s in scans if s["edge"]]:
                notes.append(f"{key} scans: at C = {', '.join(edges)} the best {key} is at the edge of the scan")
    # The rules the sweep itself used, for `suggest` where no optimum was fitted (exact for fixed and published rules).
    plain = runs_on_rule(rows) or rows
    fit["sweep_rules"] = {key: fit_power_law([r["budget"] for r in plain], [r[key] for r in plain]).as_dict()
                          for key in ("lr", "batch_tokens")}

    dense = frontier([r for r in rows if r["kind"] == "dense"])
    moe_axis = [r for r in rows if r["axis"] != "shape" and r["kind"] == "moe"]
    c_dense, l_dense = [r["compute"] for r in dense], [_loss(r) for r in dense]
    curve = None
    if len(dense) >= 2 and moe_axis:
        curve = (fit_loss_vs_compute(c_dense, l_dense).as_dict() if len(dense) >= 3
                 else fit_power_law(c_dense, l_dense).as_dict())
    if curve is not None and curve.get("exponent", -1) < 0 and curve.get("alpha", 1) > 0:
        fit["dense_curve"] = curve
        fit["leverage"] = []
        for r in sorted(moe_axis, key=lambda r: (r["axis"], r["budget"], r["activation_ratio"], r["granularity"])):
            c_eq = _invert(curve, _loss(r))
            fit["leverage"].append({
                "name": r["name"], "axis": r["axis"], "budget": r["budget"], "A": r["activation_ratio"], "G": r["granularity"],
                "loss": _loss(r), "C_dense": c_eq, "EL": c_eq / r["compute"],
                "extrapolated": not (min(c_dense) <= c_eq <= max(c_dense)),
                "EL_published": float(efficiency_leverage(r["activation_ratio"], r["granularity"], r["compute"]))})
    elif curve is not None:
        notes.append(f"efficiency leverage: the dense loss does not fall with compute ({l_dense} at C = {c_dense}); "
                     "no curve to invert")
    else:
        notes.append(f"efficiency leverage: needs dense runs at >= 2 budgets and MoE runs of the activation or "
                     f"granularity axis (have {len(dense)} dense budgets, {len(moe_axis)} MoE runs)")
    fit["notes"] = notes
    return fit
