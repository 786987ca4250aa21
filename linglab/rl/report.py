"""Plots and a Markdown report for one RL run directory (see `linglab.rl.trainer`), and for an SFT run
(`write_sft_report`: the loss curve, the before/after evaluation of sft_eval.json).

Reads `metrics.jsonl` (one `train` row per RL step, via `linglab.report.read_metrics`), `rl_eval.json`,
`summary.json` and `config.toml`; writes `plots/{reward,accuracy,mismatch,mask_fraction,response_length}.png`
and `report.md`, every number computed from those files.

    write_rl_report("runs/tiny-rl")
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.ticker import MaxNLocator

from linglab.plots import figure, save
from linglab.report import read_json, read_metrics
from linglab.run import read_jsonl


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), int | float) and np.isfinite(r[key])]
    steps, values = zip(*points, strict=True) if points else ((), ())
    return np.array(steps, dtype=int), np.array(values, dtype=float)


def smooth(values: np.ndarray, window: int = 5) -> np.ndarray:
    """Trailing mean over `window` steps: a step's reward is a small-batch estimate, the trend is what matters."""
    cumulative = np.cumsum(np.insert(values, 0, 0.0))
    counts = np.minimum(np.arange(1, len(values) + 1), window)
    return (cumulative[1:] - cumulative[np.maximum(np.arange(1, len(values) + 1) - window, 0)]) / counts


def _figure(title: str, ylabel: str, xlabel: str = "RL step"):
    fig, ax = figure(title, xlabel, ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, ax


def _first_last(steps: np.ndarray, values: np.ndarray, fmt: str) -> str:
    """'A over steps 1-5 to B over steps 16-20': the means of the first and last (up to) 5 steps."""
    n = min(5, len(values))
    return (f"{format(values[:n].mean(), fmt)} over steps {steps[0]}-{steps[n - 1]} to {format(values[-n:].mean(), fmt)} "
            f"over steps {steps[-n]}-{steps[-1]}")


def _plot_curve(train: list[dict], key: str, title: str, ylabel: str, fmt: str, path: Path,
                xlabel: str = "RL step") -> str | None:
    steps, values = _series(train, key)
    if not len(steps):
        return None
    fig, ax = _figure(title, ylabel, xlabel)
    ax.plot(steps, values, lw=0.8, alpha=0.5, label="per step")
    ax.plot(steps, smooth(values), lw=1.5, label="5-step mean")
    ax.legend(fontsize=8)
    save(fig, path)
    return f"{title.capitalize()} went from {_first_last(steps, values, fmt)}."


def _plot_accuracy(train: list[dict], path: Path) -> str | None:
    steps, values = _series(train, "accuracy")
    if not len(steps):
        return None
    fig, ax = _figure("rollout accuracy (verifier)", "accuracy")
    ax.plot(steps, smooth(values), lw=1.8, color="black", label="all (5-step mean)")
    tiers = list(dict.fromkeys(t for r in train for t in r.get("accuracy_by_tier") or {}))
    for tier in tiers:
        rows = [{"step": r["step"], "a": r["accuracy_by_tier"][tier]} for r in train if tier in (r.get("accuracy_by_tier") or {})]
        s, v = _series(rows, "a")
        ax.plot(s, smooth(v), lw=1, label=f"{tier} (5-step mean)")
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=8)
    save(fig, path)
    return f"Accuracy of the rollouts (fraction `rewards.verify` accepts) went from {_first_last(steps, values, '.1%')}."


def _plot_mismatch(train: list[dict], path: Path) -> str | None:
    steps, mean = _series(train, "mean_abs_logdiff")
    _, peak = _series(train, "max_abs_logdiff")
    if not len(steps) or len(peak) != len(steps):
        return None
    fig, ax = _figure("train-inference mismatch |log pi_train - log pi_infer|", "nats")
    ax.plot(steps, mean, lw=1, label="mean over response tokens")
    ax.plot(steps, peak, lw=1, label="max")
    if mean.min() > 0:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    save(fig, path)
    return (f"Mean |log pi_train - log pi_infer| had median {np.median(mean):.3g} and the max per step median "
            f"{np.median(peak):.3g} (largest {peak.max():.3g} at step {steps[peak.argmax()]}).")


def _plot_mask(train: list[dict], path: Path) -> str | None:
    steps, frac = _series(train, "mask_fraction")
    if not len(steps):
        return None
    fig, ax = _figure("IcePop mask fraction (k_t outside [alpha, beta])", "per mille of response tokens")
    ax.plot(steps, 1000 * frac, lw=1)
    save(fig, path)
    return (f"IcePop would mask (or masked, with rl.correction=icepop) a median {1000 * np.median(frac):.3g} per "
            f"mille of response tokens, at most {1000 * frac.max():.3g} (step {steps[frac.argmax()]}).")


def _eval_section(rl_eval) -> list[str]:
    if not isinstance(rl_eval, dict) or not rl_eval:
        return []
    stages = list(rl_eval)
    tiers = list(dict.fromkeys(t for s in stages for t in rl_eval[s].get("tiers", {})))
    metrics = [k for k in next(iter(rl_eval[stages[0]]["tiers"].values())) if k.startswith("pass@")]
    header = ["subset", "metric", *(f"{s} (step {rl_eval[s]['step']})" for s in stages)]
    lines = ["## Evaluation before vs after", "",
             "Held-out problems per subset (the embedded tiers, or a prompt file's `subset` field); greedy accuracy, "
             "unbiased pass@k of the first prompt variant and ApexEval (best pass@k over prompt variants, SPEC §6), "
             "sampled at the rollout temperature, answers checked by the run's verifier.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * len(stages)]
    for tier in tiers:
        for metric in ["greedy_accuracy", *metrics, "apex"]:
            cells = []
            for s in stages:
                info = rl_eval[s]["tiers"].get(tier, {})
                value = info.get(metric)
                if metric == "apex" and isinstance(value, dict):
                    cells.append(f"{value['apex']:.1%} ({value['best_variant']}, k={value['k']})")
                else:
                    cells.append("" if value is None else f"{value:.1%}")
            lines.append(f"| {tier} | {metric} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_rl_report(run_dir: str | Path, title: str = "linglab RL run") -> Path:
    """Draw the RL plots and write run_dir/report.md; returns its path."""
    run_dir = Path(run_dir)
    train, _ = read_metrics(run_dir / "metrics.jsonl")
    return _write_report(run_dir, title, "rl_eval.json", (
        ("reward", lambda p: _plot_curve(train, "reward", "mean reward", "reward", ".3f", p)),
        ("accuracy", lambda p: _plot_accuracy(train, p)),
        ("mismatch", lambda p: _plot_mismatch(train, p)),
        ("mask_fraction", lambda p: _plot_mask(train, p)),
        ("response_length", lambda p: _plot_curve(train, "response_length", "mean response length", "tokens", ".1f", p)),
    ))


def write_sft_report(run_dir: str | Path, title: str = "linglab SFT run") -> Path:
    """Draw the SFT loss curve and write run_dir/report.md (summary, before/after evaluation, config)."""
    run_dir = Path(run_dir)
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "sft"]
    return _write_report(run_dir, title, "sft_eval.json", (
        ("sft_loss", lambda p: _plot_curve(rows, "loss", "SFT loss on the assistant tokens", "cross-entropy", ".3f", p,
                                           xlabel="SFT step")),
    ))


def _write_report(run_dir: Path, title: str, eval_name: str, plots) -> Path:
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    drawn = []
    for stem, draw in plots:
        caption = draw(plots_dir / f"{stem}.png")
        if caption is not None:
            drawn.append((stem, caption))

    summary = read_json(run_dir / "summary.json") or {}
    lines = [f"# {title}", ""]
    if summary:
        shown = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in summary.items() if v not in ("", None)}
        lines += ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in shown.items()), ""]
    lines += _eval_section(read_json(run_dir / eval_name))
    if drawn:
        lines += ["## Plots", ""]
    for stem, caption in drawn:
        lines += [f"![{stem}](plots/{stem}.png)", "", caption, ""]
    config = run_dir / "config.toml"
    if config.is_file():
        lines += ["<details><summary>Resolved config (config.toml)</summary>", "", "```toml",
                  config.read_text().rstrip("\n"), "```", "", "</details>", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
