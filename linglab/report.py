"""Plots and a Markdown report for one training run directory.

Reads what the trainer writes into a run directory: `metrics.jsonl` (required) and, when present,
`config.toml`, `final_eval.json`, `samples.json`, `params.json` and `summary.json`. Writes
`plots/*.png` and `report.md`; the report links its plots relatively, so the directory can be moved,
zipped or browsed on GitHub as it is.

    from linglab.report import plot_run, read_metrics, write_report
    train, evals = read_metrics("runs/tiny/metrics.jsonl")    # row dicts, one per step, sorted by step
    plot_run("runs/tiny")                                      # [runs/tiny/plots/loss.png, ...]
    write_report("runs/tiny", title="tiny, 600 steps")         # runs/tiny/report.md (redraws the plots)

Every number in the report is computed from those files when it is written. A plot whose data is absent
(no eval rows, no expert_load snapshot, ...) is not drawn and has no section; a missing optional file is
named at the top of the report and its section left out.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.colors import ListedColormap, LogNorm, Normalize, TwoSlopeNorm
from matplotlib.ticker import MaxNLocator

from linglab.config import ModelConfig, load_config
from linglab.errors import LinglabError
from linglab.plots import FIGSIZE, figure, log_y_if_wide, plt, save, si
from linglab.run import read_jsonl

WIDE_FIGSIZE = (10.0, 3.5)  # the two-panel expert-load figure
MAX_SAMPLES = 8
FINAL_LOSS_WINDOW = 10  # "final loss" = mean over this many last non-skipped steps, to smooth batch noise
OPTIONAL_FILES = ("config.toml", "summary.json", "params.json", "final_eval.json", "samples.json")


# ---------------------------------------------------------------------------------------------- reading


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows) of a metrics.jsonl, each sorted by step with one row per step.

    Unparsable lines are skipped: a crash can cut the last line short, and a resumed run appends after
    it, so such a line can also sit mid-file. A resumed run replays the steps after its last checkpoint;
    the later line of a step wins, since the final weights descend from it. NaN/Infinity parse as floats.
    """
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "eval": {}}
    for row in _metric_rows(path):
        if row.get("kind") in by_kind:
            by_kind[row["kind"]][row["step"]] = row
    train, evals = ([rows[s] for s in sorted(rows)] for rows in by_kind.values())
    return train, evals


def _metric_rows(path: str | Path):
    """The rows with an integer step of a metrics.jsonl, in file order (torn lines skipped, `run.read_jsonl`)."""
    return [row for row in read_jsonl(path) if _is_int(row.get("step"))]


def _load_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise LinglabError(f"report: {path} not found (is {run_dir} a training run directory?)")
    return read_metrics(path)


def read_json(path: Path):
    """The parsed file, or None when it is missing or unreadable (the report then names it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    """A finite int or float (bools and None excluded), i.e. something safe to plot and print."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _num(d, key):
    """d[key] when d is a dict and that is a finite number, else None."""
    value = d.get(key) if isinstance(d, dict) else None
    return value if _is_num(value) else None


def _series(rows: list[dict], key: str, include_skipped: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Steps and values of `key` over the rows where it is a finite number."""
    points = [(r["step"], float(r[key])) for r in rows
              if _is_num(r.get(key)) and (include_skipped or not r.get("skipped"))]
    steps, values = zip(*points, strict=True) if points else ((), ())
    return np.array(steps, dtype=int), np.array(values, dtype=float)


def _matrix(x) -> np.ndarray | None:
    """x as a 2-D float array (None -> NaN), or None when it is not a rectangular list of lists."""
    try:
        m = np.array([[np.nan if v is None else v for v in row] for row in x], dtype=float)
    except (TypeError, ValueError):
        return None
    return m if m.ndim == 2 and m.size else None


def read_model_config(run_dir: Path) -> ModelConfig | None:
    """The run's model as config.toml gives it (defaults filling omitted keys, as linglab reads it), or None when
    the file is missing or not a valid config."""
    try:
        return load_config(preset=None, path=run_dir / "config.toml").model
    except LinglabError:
        return None


def _final_loss(train: list[dict]) -> float | None:
    _, loss = _series(train, "loss", include_skipped=False)
    return float(loss[-FINAL_LOSS_WINDOW:].mean()) if len(loss) else None


# ---------------------------------------------------------------------------------------------- plots


def _mark_skipped(ax, train: list[dict]) -> int:
    """Thin red lines at skipped steps; returns how many there are."""
    steps = [r["step"] for r in train if r.get("skipped")]
    for i, step in enumerate(steps):
        ax.axvline(step, color="tab:red", alpha=0.35, lw=0.8, label="skipped step" if i == 0 else None)
    return len(steps)


def _trend(first: float, last: float) -> str:
    return "fell" if last < first else "rose" if last > first else "went"


def _plot_loss(train: list[dict], evals: list[dict], path: Path, model: ModelConfig | None) -> str | None:
    # Skipped steps are left out (their update was thrown away, their loss often NaN) and marked instead.
    steps, loss = _series(train, "loss", include_skipped=False)
    if not len(steps):
        return None
    fig, ax = figure("training loss", "step", "loss")
    ax.plot(steps, loss, lw=1, label="loss (total)")
    finals = []
    for key, label in (("main_loss", "main loss"), ("mtp_loss", "MTP loss")):
        s, v = _series(train, key, include_skipped=False)
        if len(s):
            ax.plot(s, v, lw=1, label=label)
            finals.append(f"{label} {v[-1]:.4g}")
    held_steps, held = _series(evals, "heldout_loss")
    if len(held_steps):
        ax.plot(held_steps, held, "o", color="black", ms=4, label="held-out loss")
    _mark_skipped(ax, train)
    log_y_if_wide(ax, loss)
    ax.legend(fontsize=8)
    save(fig, path)
    caption = (f"Training loss {_trend(loss[0], loss[-1])} from {loss[0]:.4g} at step {steps[0]} "
               f"to {loss[-1]:.4g} at step {steps[-1]}")
    if finals:
        caption += f" ({', '.join(finals)})"
    if len(held_steps):
        caption += f"; held-out loss was {held[-1]:.4g} at step {held_steps[-1]}"
    return caption + "."


def _plot_lr(train: list[dict], evals: list[dict], path: Path, model: ModelConfig | None) -> str | None:
    steps, lr = _series(train, "lr")
    if not len(steps):
        return None
    fig, ax = figure("learning rate", "step", "lr")
    ax.plot(steps, lr, lw=1.2)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    save(fig, path)
    if lr.min() == lr.max():
        return f"Learning rate was constant at {lr[0]:.2e} from step {steps[0]} to step {steps[-1]}."
    peak = int(lr.argmax())
    return (f"Learning rate started at {lr[0]:.2e} (step {steps[0]}), peaked at {lr[peak]:.2e} "
            f"(step {steps[peak]}) and ended at {lr[-1]:.2e} (step {steps[-1]}).")


def _plot_grad_norm(train: list[dict], evals: list[dict], path: Path, model: ModelConfig | None) -> str | None:
    steps, norm = _series(train, "grad_norm")
    if not len(steps):
        return None
    fig, ax = figure("gradient norm", "step", "grad norm")
    ax.plot(steps, norm, lw=1)
    skipped = _mark_skipped(ax, train)
    log_y_if_wide(ax, norm)
    if skipped:
        ax.legend(fontsize=8)
    save(fig, path)
    peak = int(norm.argmax())
    skips = "1 step was skipped (red line)" if skipped == 1 else f"{skipped} steps were skipped"
    return (f"Gradient norm had median {np.median(norm):.3g}, peaked at {norm[peak]:.3g} at step "
            f"{steps[peak]} and ended at {norm[-1]:.3g} at step {steps[-1]}; {skips}"
            + (" (red lines)." if skipped > 1 else "."))


def _plot_maxvio(train: list[dict], evals: list[dict], path: Path, model: ModelConfig | None) -> str | None:
    steps, vio = _series(train, "maxvio")
    if not len(steps):
        return None
    rows = [r for r in train if isinstance(r.get("maxvio_per_layer"), list) and r["maxvio_per_layer"]]
    # Layer count from the latest row; rows of another length (a changed config on resume) are dropped.
    n_layers = len(rows[-1]["maxvio_per_layer"]) if rows else 0
    rows = [r for r in rows if len(r["maxvio_per_layer"]) == n_layers]
    layer_vio = _matrix([r["maxvio_per_layer"] for r in rows]) if rows else None
    names = _moe_layer_names(model, n_layers, mtp_last=bool(rows) and rows[-1].get("maxvio_mtp") is not None)
    fig, ax = figure("MaxVio (max load / mean load - 1)", "step", "MaxVio")
    if layer_vio is not None:
        layer_steps = [r["step"] for r in rows]
        colors = ListedColormap(plt.get_cmap("viridis")(np.linspace(0, 0.85, 256)))  # viridis minus pale yellow
        for i in range(n_layers):
            ax.plot(layer_steps, layer_vio[:, i], lw=0.8, alpha=0.7, color=colors(i / max(n_layers - 1, 1)),
                    label=(names[i] if n_layers <= 8 else None))
        if n_layers > 8:  # a legend of dozens of layers would cover the plot; a colour scale reads better
            scale = plt.cm.ScalarMappable(norm=Normalize(0, n_layers - 1), cmap=colors)
            colorbar = fig.colorbar(scale, ax=ax, label="MoE layer")
            colorbar.locator = MaxNLocator(integer=True)
    ax.plot(steps, vio, lw=1.5, ls="--", color="black", label="max over layers")  # dashed: a layer may lie under it
    log_y_if_wide(ax, vio if layer_vio is None else np.concatenate([vio, layer_vio[np.isfinite(layer_vio)]]))
    ax.legend(fontsize=7, ncols=2)
    save(fig, path)
    caption = (f"MaxVio (the most imbalanced of {n_layers or 'the'} MoE layers) {_trend(vio[0], vio[-1])} "
               f"from {vio[0]:.3g} at step {steps[0]} to {vio[-1]:.3g} at step {steps[-1]}")
    if layer_vio is not None and np.isfinite(layer_vio[-1]).any():
        worst = int(np.nanargmax(layer_vio[-1]))
        caption += f"; at step {layer_steps[-1]} the worst was {names[worst]} ({layer_vio[-1, worst]:.3g})"
    return caption + "."


def _moe_layer_names(model: ModelConfig | None, n: int, mtp_last: bool) -> list[str]:
    """Names of the n entries of `maxvio_per_layer` / `expert_load`: the main stack's MoE layers, then the MTP layer's
    when it has one. With the run's model they are its layers ("layer 3", in a hybrid "softmax layer 3"), whose
    indices the report's architecture row uses; without it, or when the count disagrees, "MoE layer i"."""
    if model is not None:
        named = [model.layer_name(i) for i in range(model.first_k_dense_replace, model.num_hidden_layers)]
        named += ["MTP layer"] * model.num_nextn_predict_layers
        if len(named) == n:
            return named
    return [f"MoE layer {i}" for i in range(n - mtp_last)] + ["MTP layer"] * mtp_last


def _pct(share: float) -> str:
    """3 significant digits, so the small shares of 256 experts (0.39%) keep their precision."""
    return f"{100 * share:.3g}%"


def _cell_edges(centres: np.ndarray) -> np.ndarray:
    """Cell boundaries halfway between centres (for pcolormesh over unevenly spaced snapshot steps)."""
    if len(centres) == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mid = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - mid[0]], mid, [2 * centres[-1] - mid[-1]]])


def _plot_expert_load(train: list[dict], evals: list[dict], path: Path, model: ModelConfig | None) -> str | None:
    snaps = [(r["step"], _matrix(r["expert_load"])) for r in train if r.get("expert_load")]
    snaps = [(s, m) for s, m in snaps if m is not None and np.isfinite(m).any()]
    if not snaps:
        return None
    step, load = snaps[-1]
    n_layers, n_experts = load.shape
    history = [(s, m[-1]) for s, m in snaps if m.shape == load.shape]  # last layer, snapshot by snapshot
    uniform = 1 / n_experts
    # One colour scale for both panels, white at the uniform share: red = overloaded, blue = starved.
    spread = np.nanmax(np.abs(np.concatenate([load.ravel()] + [h for _, h in history]) - uniform))
    spread = spread if spread > 0 else uniform
    norm = TwoSlopeNorm(uniform, vmin=max(0.0, uniform - spread), vmax=uniform + spread)
    two = len(history) > 1
    names = _moe_layer_names(model, n_layers, mtp_last=bool(train[-1].get("maxvio_mtp") is not None))
    fig, axes = plt.subplots(1, 2 if two else 1, figsize=WIDE_FIGSIZE if two else FIGSIZE,
                             layout="constrained", squeeze=False)
    ax = axes[0, 0]
    image = ax.imshow(load, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
    ax.set(title=f"expert load at step {step}", xlabel="expert", ylabel="MoE layer")
    if two:
        right = axes[0, 1]
        steps = np.array([s for s, _ in history], dtype=float)
        right.pcolormesh(_cell_edges(steps), np.arange(n_experts + 1) - 0.5,
                         np.array([h for _, h in history]).T, cmap="RdBu_r", norm=norm)
        right.set(title=f"{names[-1]} over {len(history)} snapshots", xlabel="step",
                  ylabel="expert")
        right.invert_yaxis()  # expert 0 on top, as in the left panel
    for a in axes.ravel():
        a.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if n_layers <= 8:
        ax.set_yticks(range(n_layers), names, fontsize=7)
    fig.colorbar(image, ax=axes.ravel().tolist(), label=f"share of tokens (white = 1/{n_experts})")
    save(fig, path)
    hi = np.unravel_index(np.nanargmax(load), load.shape)
    lo = np.unravel_index(np.nanargmin(load), load.shape)
    return (f"At step {step} the busiest expert ({names[hi[0]]}, expert {hi[1]}) took {_pct(load[hi])} of "
            f"its layer's routed tokens and the idlest ({names[lo[0]]}, expert {lo[1]}) {_pct(load[lo])}, "
            f"against a uniform share of {_pct(uniform)}"
            + (f"; the right panel follows {names[-1]} over {len(history)} snapshots."
               if two else "."))


def _plot_accuracy(train: list[dict], evals: list[dict], path: Path, model: ModelConfig | None) -> str | None:
    tiers: list[str] = []  # first-seen order, which is the trainer's (easy -> hard)
    for r in evals:
        if isinstance(r.get("accuracy"), dict):
            tiers += [t for t in r["accuracy"] if t not in tiers]
    curves = {}
    for tier in tiers:
        points = [(r["step"], r["accuracy"][tier]) for r in evals
                  if isinstance(r.get("accuracy"), dict) and _is_num(r["accuracy"].get(tier))]
        if points:
            curves[tier] = np.array(points, dtype=float)
    if not curves:
        return None
    fig, ax = figure("held-out accuracy by tier", "step", "accuracy (%)")
    for tier, points in curves.items():
        ax.plot(points[:, 0], 100 * points[:, 1], "o-", ms=3, lw=1, label=tier)
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=8)
    save(fig, path)
    all_steps = np.concatenate([p[:, 0] for p in curves.values()])
    first, last = int(all_steps.min()), int(all_steps.max())
    if first == last:
        return f"Held-out accuracy at step {first}: " + ", ".join(
            f"{t} {p[-1, 1]:.1%}" for t, p in curves.items()) + "."
    return f"Held-out accuracy from step {first} to step {last}: " + ", ".join(
        f"{t} {p[0, 1]:.1%} → {p[-1, 1]:.1%}" for t, p in curves.items()) + "."


# (file stem, drawing function returning the caption or None when its data is absent), in report order
_PLOTS: list[tuple[str, Callable[[list[dict], list[dict], Path, ModelConfig | None], str | None]]] = [
    ("loss", _plot_loss),
    ("lr", _plot_lr),
    ("grad_norm", _plot_grad_norm),
    ("maxvio", _plot_maxvio),
    ("expert_load", _plot_expert_load),
    ("accuracy", _plot_accuracy),
]


def read_fp8_samples(path: str | Path) -> list[dict]:
    """The FP8 safeguard-monitor rows of a metrics.jsonl (`kind: fp8`), sorted by step, the later one per step."""
    by_step = {row["step"]: row for row in _metric_rows(path) if row.get("kind") == "fp8" and isinstance(row.get("ops"), dict)}
    return [by_step[s] for s in sorted(by_step)]


FP8_KINDS = ("act", "weight", "grad")


def fp8_matrices(sample: dict) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(op names, underflow [ops, 3], 1 - cosine [ops, 3]) of one monitor sample; NaN where a kind is absent."""
    names = sorted(sample["ops"], key=_op_order)
    under = np.full((len(names), len(FP8_KINDS)), np.nan)
    dist = np.full_like(under, np.nan)
    for i, name in enumerate(names):
        for j, kind in enumerate(FP8_KINDS):
            pair = sample["ops"][name].get(kind)
            if isinstance(pair, list) and len(pair) == 2 and all(_is_num(v) for v in pair):
                under[i, j], dist[i, j] = pair[0], 1.0 - pair[1]
    return names, under, dist


def _op_order(name: str):
    """Layer index first (model.layers.3.x, model.mtp_layers.0.x after the stack), then the op name."""
    numbers = [int(n) for n in re.findall(r"\.(\d+)\.", name)]
    return ("mtp" in name, numbers[0] if numbers else -1, name)


def _short_op(name: str) -> str:
    return (name.replace("model.layers.", "L").replace("model.mtp_layers.", "MTP").replace(".attention.", " attn.")
            .replace(".mlp.shared_experts.", " shared.").replace(".mlp.experts.", " experts.").replace(".mlp.", " mlp."))


def _plot_fp8_monitor(samples: list[dict], path: Path) -> str | None:
    if not samples:
        return None
    step = samples[-1]["step"]
    names, under, dist = fp8_matrices(samples[-1])
    if not names:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 1.2 + 0.22 * len(names)), layout="constrained")
    positive = dist[dist > 0]
    lo = float(positive.min()) if positive.size else 1e-9
    # 1 - cosine spans decades between ops (weights ~1e-4, gradients worse): a log colour scale shows them all.
    log_norm = LogNorm(vmin=lo, vmax=max(float(np.nanmax(dist)), lo * 10))
    panels = ((under * 100, "underflow (% of nonzeros -> 0)", "viridis", None),
              (np.where(dist > 0, dist, np.nan), "distortion: 1 - cosine", "magma", log_norm))
    for ax, (m, title, cmap, norm) in zip(axes, panels):
        image = ax.imshow(m, aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(f"{title}, step {step}", fontsize=9)
        ax.set_xticks(range(len(FP8_KINDS)), FP8_KINDS)
        ax.set_yticks(range(len(names)), [_short_op(n) for n in names], fontsize=6)
        fig.colorbar(image, ax=ax)
    save(fig, path)
    worst_u = np.unravel_index(np.nanargmax(under), under.shape)
    worst_d = np.unravel_index(np.nanargmax(dist), dist.shape)
    return (f"FP8 safeguard monitor at step {step} ({len(samples)} samples): the worst underflow is "
            f"{under[worst_u]:.3%} ({_short_op(names[worst_u[0]])}, {FP8_KINDS[worst_u[1]]}) and the worst "
            f"distortion 1 - cosine = {dist[worst_d]:.2e} ({_short_op(names[worst_d[0]])}, {FP8_KINDS[worst_d[1]]}).")


def _render(run_dir: Path, train: list[dict], evals: list[dict]) -> list[tuple[Path, str]]:
    """Draw every plot that has data; (path, caption) for each one written."""
    model = read_model_config(run_dir)
    out = run_dir / "plots"
    out.mkdir(exist_ok=True)
    made = []
    for stem, draw in _PLOTS:
        path = out / f"{stem}.png"
        caption = draw(train, evals, path, model)
        if caption is not None:
            made.append((path, caption))
    path = out / "fp8_monitor.png"
    caption = _plot_fp8_monitor(read_fp8_samples(run_dir / "metrics.jsonl"), path)
    if caption is not None:
        made.append((path, caption))
    return made


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write run_dir/plots/{loss,lr,grad_norm,maxvio,expert_load,accuracy}.png (those with data)."""
    run_dir = Path(run_dir)
    return [path for path, _ in _render(run_dir, *_load_metrics(run_dir))]


# ---------------------------------------------------------------------------------------------- report


def _duration(seconds: float) -> str:
    """1h 02m 03s, 4m 05s or 42.3 s."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f} s"


def _cell(text) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ticks(text: str, least: int) -> str:
    """A backtick run longer than any inside text (and at least `least`), so text cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(least, longest + 1)


def _code(text) -> str:
    """Inline code that survives backticks in text."""
    text = str(text)
    ticks = _ticks(text, 1)
    # Markdown strips one space from each side, which lets the text itself start or end with a backtick.
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _either(value, fallback):
    return value if value is not None else fallback


def _median(train: list[dict], key: str) -> float | None:
    _, values = _series(train, key)
    return statistics.median(values.tolist()) if len(values) else None


def _summary_section(train: list[dict], summary, params, model: ModelConfig | None) -> list[str]:
    last = train[-1] if train else {}
    # summary.json is the trainer's own account; the last metrics row stands in when it is missing.
    steps = _either(_num(summary, "steps"), _num(last, "step"))
    tokens = _either(_num(summary, "tokens"), _num(last, "tokens"))
    wall = _either(_num(summary, "wall_time_s"), _num(last, "time"))
    skipped = _num(summary, "skipped_steps")
    if skipped is None and train:
        skipped = sum(bool(r.get("skipped")) for r in train)
    tokens_per_s, mfu, final_loss = _median(train, "tokens_per_s"), _median(train, "mfu"), _final_loss(train)
    _, losses = _series(train, "loss", include_skipped=False)

    rows = []
    if steps is not None:
        rows.append(("steps", f"{steps:,}"))
    if tokens is not None:
        rows.append(("tokens", f"{tokens:,} ({si(tokens, '.2f')})"))
    if wall is not None:
        rows.append(("wall time", f"{_duration(wall)} ({wall:,.1f} s)"))
    if tokens_per_s is not None:
        rows.append(("tokens/s (median)", f"{tokens_per_s:,.0f}"))
    if mfu is not None:
        rows.append(("MFU (median)", f"{mfu:.1%}"))
    if final_loss is not None:
        rows.append(("final loss", f"{final_loss:.4g} (mean of the last {min(len(losses), FINAL_LOSS_WINDOW)} "
                                   "non-skipped steps)"))
    if skipped is not None:
        rows.append(("skipped steps", f"{skipped:,}"))
    if model is not None:
        rows.append(("architecture", model.layer_layout()))
    counts = [(label, _num(params, key)) for key, label in
              (("total", "total"), ("active", "active"), ("active_non_embedding", "active non-embedding"),
               ("mtp", "MTP layer"))]
    counts = [f"{si(n, '.2f')} {label}" for label, n in counts if n is not None]
    if counts:
        rows.append(("parameters", " / ".join(counts)))
    if isinstance(summary, dict) and summary.get("final_checkpoint"):
        rows.append(("final checkpoint", _code(summary["final_checkpoint"])))
    if isinstance(summary, dict) and summary.get("command"):
        rows.append(("command", _code(summary["command"])))
    if not rows:
        return []
    return ["## Summary", "", "| | |", "|---|---|", *(f"| {k} | {_cell(v)} |" for k, v in rows), ""]


def _heldout_section(final_eval) -> list[str]:
    if not isinstance(final_eval, dict):
        return []
    lines = ["## Held-out evaluation", ""]
    facts = []
    if _num(final_eval, "step") is not None:
        facts.append(f"at step {final_eval['step']:,}")
    if _num(final_eval, "heldout_loss") is not None:
        facts.append(f"held-out loss {final_eval['heldout_loss']:.4g}")
    if facts:
        lines += [f"Final evaluation {', '.join(facts)}.", ""]
    tiers = final_eval.get("tiers")
    if isinstance(tiers, dict) and tiers:
        lines += ["| tier | description | accuracy | n |", "|---|---|---:|---:|"]
        for tier, info in tiers.items():
            info = info if isinstance(info, dict) else {}
            accuracy = _num(info, "accuracy")
            n = _num(info, "n")
            lines.append(f"| {_cell(tier)} | {_cell(info.get('description', ''))} | "
                         f"{'' if accuracy is None else f'{accuracy:.1%}'} | {'' if n is None else f'{n:,}'} |")
        lines.append("")
    return lines


def _plots_section(plots: list[tuple[Path, str]], run_dir: Path) -> list[str]:
    lines = ["## Plots", ""] if plots else []
    for path, caption in plots:
        lines += [f"![{path.stem}]({path.relative_to(run_dir).as_posix()})", "", caption, ""]
    return lines


def _samples_section(samples) -> list[str]:
    if not isinstance(samples, list):
        return []
    shown = [s for s in samples if isinstance(s, dict)][:MAX_SAMPLES]
    if not shown:
        return []
    correct = sum(bool(s.get("correct")) for s in shown)
    lines = ["## Samples", "", f"{len(shown)} of {len(samples)} samples shown; {correct} of them correct.", ""]
    for i, s in enumerate(shown, 1):
        mark = "✓" if s.get("correct") else "✗"
        text = f"prompt: {s.get('prompt', '')}\ncompletion: {s.get('completion', '')}".rstrip("\n")
        fence = _ticks(text, 3)
        lines += [f"**{i}. {mark} {s.get('tier', '')}**, expected answer {_code(s.get('answer', ''))}", "",
                  f"{fence}text", text, fence, ""]
    return lines


def _config_section(config_text: str | None) -> list[str]:
    if config_text is None:
        return []
    fence = _ticks(config_text, 3)
    # The blank lines let Markdown renderers (GitHub) format the fenced block inside the HTML element.
    return ["<details><summary>Resolved config (config.toml)</summary>", "", f"{fence}toml",
            config_text.rstrip("\n"), fence, "", "</details>", ""]


def write_report(run_dir: str | Path, title: str = "linglab training run") -> Path:
    """Draw the plots and write run_dir/report.md; returns its path."""
    run_dir = Path(run_dir)
    train, evals = _load_metrics(run_dir)
    plots = _render(run_dir, train, evals)
    data = {name: read_json(run_dir / name) for name in OPTIONAL_FILES if name.endswith(".json")}
    try:
        config_text = (run_dir / "config.toml").read_text(encoding="utf-8")
    except OSError:
        config_text = None
    absent = [name for name in OPTIONAL_FILES
              if (config_text if name == "config.toml" else data[name]) is None]

    lines = [f"# {title}", ""]
    if absent:
        lines += [f"*Not found or unreadable, so left out: {', '.join(absent)}.*", ""]
    lines += _summary_section(train, data["summary.json"], data["params.json"], read_model_config(run_dir))
    lines += _heldout_section(data["final_eval.json"])
    lines += _plots_section(plots, run_dir)
    lines += _samples_section(data["samples.json"])
    lines += _config_section(config_text)
    path = run_dir / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
