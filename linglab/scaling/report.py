"""What a scaling-law sweep's results become (SPEC §4): fit.json, scaling.md and plots/*.png, and training configs
suggested from the fitted (or the published) laws.

    linglab scaling fit --dir runs/scaling                  # fit.json, scaling.md and plots/*.png
    linglab scaling suggest --compute 1e14 --fit runs/scaling/fit.json --out big.toml

`suggest_config` lives here rather than in `laws`: it reads a fit.json of `write_fit` and picks a rung of the
ladder's family, so it depends on both, while `laws` stays the bottom layer of pure functions every module uses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from linglab.config import MIN_SEQ_LEN, Config, load_config, to_toml
from linglab.plots import figure, log_axes, save, si
from linglab.scaling.fit import ChinchillaFit, LossCurve, chinchilla_optimal, fit_results, runs_on_rule
from linglab.scaling.ladder import (
    AXES,
    BASE_PRESET,
    CORPUS_TOKENS_PER_DOC,
    SweepError,
    active_params,
    nearest_rung,
    rung_shape,
    shape_flops,
)
from linglab.scaling.laws import PowerLaw, compute_optimal, efficiency_leverage, optimal_batch_tokens, optimal_lr

# ---------------------------------------------------------------- plots


def _plot_loss_vs_compute(rows, fit, path: Path) -> bool:
    shape_rows = [r for r in rows if r["axis"] == "shape"]
    if "loss_vs_compute" not in fit["laws"]:
        return False
    fig, ax = figure("loss vs compute", "compute C = M D (FLOPs)", "held-out loss", grid="both")
    ax.scatter([r["compute"] for r in shape_rows], [r["heldout_loss"] for r in shape_rows], s=12, color="0.6", label="runs")
    ax.scatter([r["budget"] for r in fit["frontier"]], [r["loss"] for r in fit["frontier"]], s=22, color="tab:blue",
               label="best per budget", zorder=3)
    budgets = [r["budget"] for r in fit["frontier"]]
    c = np.geomspace(min(budgets) / 1.5, max(budgets) * 1.5, 100)
    law = LossCurve(**fit["laws"]["loss_vs_compute"])
    ax.plot(c, law.predict(c), color="tab:blue", label=f"fit: {law.E:.3g} + {law.A:.3g} C^-{law.alpha:.3g}")
    if "holdout" in fit:
        h = fit["holdout"]
        ax.plot(c, LossCurve(**h["fit"]).predict(c), "--", color="tab:orange", label="fit without the largest")
        ax.scatter([h["compute"]], [h["predicted"]], marker="o", facecolors="none", edgecolors="tab:orange", s=60,
                   label=f"predicted (error {h['abs_error']:.3g})", zorder=4)
        ax.scatter([h["compute"]], [h["actual"]], marker="*", color="tab:red", s=90, label="held-out budget", zorder=4)
    log_axes(ax)
    ax.legend(fontsize=7)
    save(fig, path)
    return True


def _plot_leverage(fit, path: Path) -> bool:
    rows = [r for r in fit.get("leverage", []) if r["axis"] == "activation" and math.isfinite(r["EL"])]
    if not rows:
        return False
    fig, ax = figure("efficiency leverage vs activation ratio", "activation ratio A", "EL = C_dense / C_MoE", grid="both")
    a = np.geomspace(min(r["A"] for r in rows) / 1.5, 1.0, 50)
    for i, budget in enumerate(sorted({r["budget"] for r in rows})):
        these = sorted((r for r in rows if r["budget"] == budget), key=lambda r: r["A"])
        color = f"C{i}"
        ax.plot([r["A"] for r in these], [r["EL"] for r in these], "o-", color=color, label=f"measured, C = {budget:.2g}")
        g = these[0]["G"]
        ax.plot(a, efficiency_leverage(a, g, budget), "--", color=color, label=f"published law, G = {g:g}")
    ax.axhline(1.0, color="0.5", lw=0.8)
    log_axes(ax)
    ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")  # A is a ratio, not a FLOP count
    ax.legend(fontsize=7)
    save(fig, path)
    return True


def _plot_chinchilla(rows, fit, path: Path) -> bool:
    if "chinchilla" not in fit:
        return False
    law = ChinchillaFit(**fit["chinchilla"]["fit"])
    on_rule = runs_on_rule([r for r in rows if r["axis"] == "shape"])
    n, d, loss = (np.array([r[k] for r in on_rule], dtype=float) for k in ("N", "D", "heldout_loss"))
    fig, ax = figure("L(N, D) fit: contours; runs: dots", "N (active non-embedding parameters)", "D (tokens)", grid=None)
    gn, gd = np.meshgrid(np.geomspace(n.min() / 2, n.max() * 2, 80), np.geomspace(d.min() / 2, d.max() * 2, 80))
    levels = np.geomspace(loss.min() * 0.8, loss.max() * 1.25, 12)
    contours = ax.contour(gn, gd, law.predict(gn, gd), levels=levels, cmap="viridis", norm="log", linewidths=0.8)
    ax.clabel(contours, fontsize=6, fmt="%.3g")
    ax.scatter(n, d, c=loss, cmap="viridis", norm="log", vmin=levels[0], vmax=levels[-1], edgecolors="k", s=30, zorder=3)
    if not fit["chinchilla"]["degenerate"]:
        n_opt, d_opt = chinchilla_optimal(np.geomspace((6 * n * d).min(), (6 * n * d).max(), 20), law)
        ax.plot(n_opt, d_opt, "--", color="tab:red", label="compute-optimal (C = 6ND)")
        ax.legend(fontsize=7)
    log_axes(ax, y_counts=True)
    ax.set(xlim=(gn.min(), gn.max()), ylim=(gd.min(), gd.max()))
    save(fig, path)
    return True


# ---------------------------------------------------------------- fit.json and scaling.md


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(map(str, r)) + " |" for r in rows)]


def _interval(fit: dict, key: str) -> str:
    intervals = fit["chinchilla"]["intervals"]
    return f"[{intervals[key][0]:.4g}, {intervals[key][1]:.4g}]" if intervals else "-"


def write_fit(rows: list[dict], out: str | Path, n_boot: int = 200, commands: list[str] = ()) -> dict:
    """Fit (fit_results), then write out/fit.json, out/plots/*.png and out/scaling.md; returns the fit."""
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    fit = fit_results(rows, n_boot=n_boot)
    fit["commands"] = list(commands)
    (out / "fit.json").write_text(json.dumps(fit, indent=2) + "\n")
    plots = [(name, caption) for name, caption, drawn in (
        ("loss_vs_compute.png", "best held-out loss per budget, the fitted L(C), and the largest budget predicted from the rest",
         _plot_loss_vs_compute(rows, fit, out / "plots" / "loss_vs_compute.png")),
        ("leverage.png", "efficiency leverage vs activation ratio, measured and the published law",
         _plot_leverage(fit, out / "plots" / "leverage.png")),
        ("chinchilla.png", "L(N, D) fitted on the shape-axis runs",
         _plot_chinchilla(rows, fit, out / "plots" / "chinchilla.png"))) if drawn]

    md = ["# Scaling-law sweep (SPEC §4)", ""]
    if fit["commands"]:
        md += ["Commands:", "", "```", *fit["commands"], "```", ""]
    corpora = sorted({r.get("corpus", {}).get("name", "embedded") for r in rows})
    held_out = ("answer tokens of the embedded arithmetic tasks" if corpora == ["embedded"]
                else f"the held-out files of the {', '.join(corpora)} corpus")
    md += [f"{len(rows)} finished runs; losses are held-out losses on {held_out}.", ""]
    laws, rules = fit["laws"], fit["sweep_rules"]
    md += ["## Fits", "", f"- the sweep's rules: lr = {rules['lr']['coef']:.4g} C^{rules['lr']['exponent']:.4f}, "
           f"batch = {rules['batch_tokens']['coef']:.4g} C^{rules['batch_tokens']['exponent']:.4f} tokens"]
    if "loss_vs_compute" in laws:
        lc = laws["loss_vs_compute"]
        md.append(f"- loss vs compute (best per budget): L(C) = {lc['E']:.4g} + {lc['A']:.4g} C^-{lc['alpha']:.4g}")
        m = laws["m_opt"]
        md.append(f"- compute-optimal M (M of the best run per budget): M_opt = {m['coef']:.4g} C^{m['exponent']:.4f} "
                  f"(published MoE law: 0.1915 C^0.5095)")
        if "intervals" in fit:
            iv = fit["intervals"]
            span = lambda lo_hi: f"[{lo_hi[0]:.3g}, {lo_hi[1]:.3g}]"  # noqa: E731
            md.append("  - 90% bootstrap intervals over the frontier points: L(C) E " + span(iv["loss_vs_compute"]["E"])
                      + ", A " + span(iv["loss_vs_compute"]["A"]) + ", alpha " + span(iv["loss_vs_compute"]["alpha"])
                      + "; M_opt coef " + span(iv["m_opt"]["coef"]) + ", exponent " + span(iv["m_opt"]["exponent"]))
    if "holdout" in fit:
        h = fit["holdout"]
        md.append(f"- wind tunnel: the largest budget C = {h['compute']:.3g} predicted from the others: {h['predicted']:.4f} "
                  f"vs {h['actual']:.4f} measured, absolute error {h['abs_error']:.4f} (Ling's target: within 0.01)")
    for law, published in (("lr", "1.1576 C^-0.1529"), ("batch_tokens", "0.0694 C^0.3644")):
        if law in laws:
            md.append(f"- optimal {law}: {laws[law]['coef']:.4g} C^{laws[law]['exponent']:.4f} (published: {published})")
    if "chinchilla" in fit:
        ch = fit["chinchilla"]
        how = "DEGENERATE, see the notes" if ch["degenerate"] else "90% bootstrap intervals"
        md += ["", f"L(N, D) = E + A / N^alpha + B / D^beta over {ch['points']} (N, D) pairs ({how}):", ""]
        md += _table(["coefficient", "value", "interval"],
                     [[k, f"{v:.4g}", _interval(fit, k)] for k, v in ch["fit"].items()]
                     + [[k, f"{ch[k]:.4g}", _interval(fit, k)] for k in ("n_opt_exponent", "d_opt_exponent")])
    if fit.get("leverage"):
        md += ["", "## Efficiency leverage", "", "EL = C_dense / C_MoE at equal loss, C_dense from the fitted dense curve "
               f"({'saturating' if 'alpha' in fit['dense_curve'] else 'pure power law through 2 budgets'}); "
               "* = outside the dense runs' compute (extrapolated).", ""]
        md += _table(["run", "C", "A", "G", "loss", "EL", "EL published"],
                     [[r["name"], f"{r['budget']:.3g}", f"{r['A']:.3f}", f"{r['G']:g}", f"{r['loss']:.4f}",
                       f"{r['EL']:.3g}{'*' if r['extrapolated'] else ''}", f"{r['EL_published']:.3g}"] for r in fit["leverage"]])
    if fit["notes"]:
        md += ["", "Notes (fits skipped or to read with care):", "", *(f"- {n}" for n in fit["notes"])]
    if plots:
        md += ["", "## Plots", ""] + [f"![{caption}](plots/{name})\n\n{caption}\n" for name, caption in plots]
    md += ["", "## Runs", ""]
    md += _table(["run", "C", "d x L", "E/k", "N", "M", "D", "lr", "batch", "train loss", "held-out loss", "wall"],
                 [[r["name"], f"{r['compute']:.3g}", f"{r['model']['hidden_size']} x {r['model']['num_hidden_layers']}",
                   "dense" if r["kind"] == "dense" else f"{r['model']['num_experts']}/{r['model']['num_experts_per_tok']}",
                   si(r["N"]), si(r["M"]), si(r["D"]), f"{r['lr']:.2g}", r["batch_tokens"],
                   f"{r['train_loss']:.4f}" if r["train_loss"] is not None else "-", f"{r['heldout_loss']:.4f}",
                   f"{r['wall_time_s']:.0f} s"] for r in sorted(rows, key=lambda r: (AXES.index(r["axis"]), r["budget"], r["name"]))])
    (out / "scaling.md").write_text("\n".join(md) + "\n")
    return fit


# ---------------------------------------------------------------- suggest


SUGGEST_WIDTHS = [*range(64, 1024, 32), *range(1024, 16385, 128)]  # the ladder's family, 32-wide heads then 128


def read_fit(path: str | Path) -> dict:
    """A fit.json of `write_fit` with an M_opt law, or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"scaling: fit file not found: {path} (run `linglab scaling fit` first)")
    try:
        fit = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise SweepError(f"scaling: {path} is not valid JSON ({e})") from None
    if not isinstance(fit, dict) or "m_opt" not in fit.get("laws", {}):
        raise SweepError(f"scaling: {path} has no fitted M_opt law (the sweep needs >= 3 shape-axis budgets)")
    return fit


def suggest_config(compute: float, fit: dict | None = None, seq_len: int = 128) -> tuple[Config, dict]:
    """A training config for budget C: M from M_opt(C), D = C / M, lr and batch from their laws (SPEC §4).

    From `fit` (a fit.json): its M_opt law, its fitted eta_opt / B_opt where the sweep varied them, else the rules
    the sweep used. Without: the published MoE M_opt, eta_opt and B_opt. The shape is the rung of the sweep's family
    (width multiple of 32 below 1024, of 128 above; depth width / 40; the base MoE) nearest M_opt in log space.
    """
    if not (math.isfinite(compute) and compute > 0):
        raise SweepError(f"scaling suggest: --compute must be a positive number of FLOPs, got {compute}")
    if seq_len < MIN_SEQ_LEN:
        raise SweepError(f"scaling suggest: --seq-len must be >= {MIN_SEQ_LEN} (data.seq_len's minimum), got {seq_len}")
    if fit is None:
        source = {"m_opt": "published MoE M_opt = 0.1915 C^0.5095", "lr": "published eta_opt = 1.1576 C^-0.1529",
                  "batch_tokens": "published B_opt = 0.0694 C^0.3644"}
        m_opt, _ = compute_optimal(compute, "moe")
        lr, batch_tokens = optimal_lr(compute), optimal_batch_tokens(compute)
    else:
        source, values = {}, {}
        for key, label in (("m_opt", "fitted M_opt"), ("lr", "fitted eta_opt"), ("batch_tokens", "fitted B_opt")):
            law = fit["laws"].get(key)
            if law is None:
                law, label = fit["sweep_rules"][key], f"the sweep's {key} rule (not varied, so not fitted)"
            values[key] = PowerLaw(**law).predict(compute)
            source[key] = f"{label} = {law['coef']:.4g} C^{law['exponent']:.4f}"
        m_opt, lr, batch_tokens = values["m_opt"], values["lr"], values["batch_tokens"]
    shape = rung_shape(SUGGEST_WIDTHS[nearest_rung(float(m_opt), SUGGEST_WIDTHS, seq_len)])
    m = shape_flops(shape, seq_len)
    batch = max(1, round(float(batch_tokens) / seq_len))
    steps = max(1, round(compute / (m * batch * seq_len)))
    train = dict(max_steps=steps, batch_size=batch, lr=float(lr), warmup_steps=max(1, round(0.05 * steps)))
    overrides = [f"--model.{k}={v}" for k, v in shape.items()] + [f"--train.{k}={v}" for k, v in train.items()]
    cfg = load_config(BASE_PRESET, overrides=overrides + [f"--data.seq_len={seq_len}"])
    n, _ = active_params(shape)
    info = {"compute": compute, "M_opt": float(m_opt), "M": m, "N": n, "D": steps * batch * seq_len,
            "compute_planned": m * steps * batch * seq_len, "source": source, "from_fit": fit is not None}
    return cfg, info


def suggestion_toml(cfg: Config, info: dict) -> str:
    """The config as TOML, headed by comments saying which laws chose it."""
    head = [f"# linglab scaling suggest: C = {info['compute']:.4g} FLOPs ({'fitted laws' if info['from_fit'] else 'published laws'}, "
            "SPEC §4)",
            f"# M = {info['M']:.4g} FLOPs/token (M_opt {info['M_opt']:.4g}), N = {info['N']:,} active non-embedding parameters, "
            f"D = {info['D']:,} tokens, M * D = {info['compute_planned']:.4g}"]
    head += [f"# {key}: {text}" for key, text in info["source"].items()]
    epochs = info["D"] / (cfg.data.num_documents * CORPUS_TOKENS_PER_DOC)
    if not cfg.data.path and epochs > 1:
        head.append(f"# D is ~{epochs:.3g} epochs of the embedded corpus: raise data.num_documents or set data.path")
    return "\n".join(head) + "\n\n" + to_toml(cfg)
