"""The wind tunnel as Ling runs it (SPEC §4): fit a ladder, write down what a much larger run will score, then run it.

    record = predict(rows, grid, factor=10)      # from a ladder's results rows (linglab.scaling.sweep)
    write_prediction(out / "prediction.json", record)   # refuses to replace one: the prediction comes first
    run = prediction_run(record, grid)           # the PlannedRun it predicts, trained by sweep.train_run
    scored = score(record, row)                  # |predicted - measured| / measured, the interval, L(N, D)'s too

The prediction is the frontier law L(C) = E + A C^-alpha of the ladder's runs at their own LR and batch rule (the best
held-out loss at each budget), evaluated at the new run's compute, with a 90% bootstrap interval over the frontier
points. The new run is sized by the ladder's own compute-optimal law M_opt(C) (the rung of the grid's ladder nearest
it), with the grid's LR and batch rules at its budget: the recipe's own laws choose it, as Ling sizes a run from its
fits. L(N, D) (Chinchilla form) at the chosen run's N and D is written beside, when its fit is not degenerate, and is
the headline when the corpus is too small for the M_opt run (see `predict`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

from linglab.scaling.fit import (
    bootstrap_prediction,
    fit_chinchilla,
    fit_loss_vs_compute,
    fit_power_law,
    frontier,
    runs_on_rule,
)
from linglab.scaling.ladder import (
    PlannedRun,
    SweepError,
    SweepGrid,
    active_params,
    batch_for,
    lr_for,
    nearest_rung,
    rung_shape,
    shape_flops,
)

PREDICTION = "prediction.json"


def _rows_digest(rows: list[dict]) -> str:
    """SHA-256 of the rows the prediction was fitted on (sorted by name), recorded so a reader can tell which."""
    text = json.dumps(sorted(rows, key=lambda r: r["name"]), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


MAX_EPOCHS = 4.0  # Muennighoff et al. (2023): up to ~4 epochs, repeated tokens are worth almost as much as new ones


def predict(rows: list[dict], grid: SweepGrid, factor: float = 10.0, n_boot: int = 200,
            max_tokens: float | None = None) -> dict:
    """The prediction record of one run at `factor` x the ladder's largest budget (see the module docstring).

    `max_tokens` (the most the run may read: `MAX_EPOCHS` x the corpus's training tokens): a run sized by M_opt that
    would read more moves up the ladder to the first rung that reads at most that. Such a run is off the frontier
    that L(C) describes, so its headline prediction is then L(N, D) at its own N and D (when that fit is not
    degenerate); which one is the headline is written before the run.
    """
    if factor < 1:
        raise SweepError(f"scaling: the wind tunnel predicts a larger run; factor must be >= 1, got {factor}")
    shape_rows = runs_on_rule([r for r in rows if r["axis"] == "shape"])
    front = frontier(shape_rows)
    if len(front) < 4:
        raise SweepError(f"scaling: the wind tunnel needs >= 4 shape-axis budgets at the grid's LR and batch rule, "
                         f"got {len(front)}")
    compute, loss = [r["compute"] for r in front], [r["heldout_loss"] for r in front]
    curve = fit_loss_vs_compute(compute, loss)
    m_law = fit_power_law([r["budget"] for r in front], [r["M"] for r in front])
    budget = factor * max(r["budget"] for r in front)
    widths = sorted(grid.ladder)
    i = nearest_rung(float(m_law.predict(budget)), widths, grid.seq_len)
    batch = batch_for(grid, budget)
    sized_by = "M_opt"
    while max_tokens and i + 1 < len(widths) and budget / shape_flops(rung_shape(widths[i]), grid.seq_len) > max_tokens:
        i, sized_by = i + 1, "the corpus (max_tokens)"
    width = widths[i]
    shape = rung_shape(width)
    steps = round(budget / (shape_flops(shape, grid.seq_len) * batch * grid.seq_len))
    run = PlannedRun(f"predicted-C{budget:.3g}".replace("e+", "e") + f"-d{width}", "shape", budget, shape,
                     lr_for(grid, budget), batch, steps, grid)
    record = {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ladder": {"runs": len(shape_rows), "sha256": _rows_digest(shape_rows), "largest_budget": max(compute),
                   "frontier": [{"name": r["name"], "compute": r["compute"], "loss": r["heldout_loss"]} for r in front]},
        "factor": factor,
        "loss_vs_compute": curve.as_dict(),
        "m_opt": m_law.as_dict(),
        "run": {"name": run.name, "budget": budget, "compute": run.compute, "hidden_size": width, "shape": shape,
                "lr": run.lr, "batch_size": batch, "steps": steps, "D": run.tokens, "N": active_params(shape)[0],
                "M": run.m, "sized_by": sized_by, "M_opt": float(m_law.predict(budget)),
                "max_tokens": max_tokens},
        "headline": "loss_vs_compute",
        "loss_vs_compute_predicted": float(curve.predict(run.compute)),
        "predicted_loss": float(curve.predict(run.compute)),
        "interval_90": bootstrap_prediction(compute, loss, run.compute, n_boot=n_boot, fit=curve) if n_boot else None,
    }
    n, d, lo = ([r[k] for r in shape_rows] for k in ("N", "D", "heldout_loss"))
    if len({(a, b) for a, b in zip(n, d)}) >= 5:
        chin = fit_chinchilla(n, d, lo)
        sane = all(math.isfinite(v) and v > 0 for v in chin.as_dict().values())
        record["chinchilla"] = {"fit": chin.as_dict(), "degenerate": not sane,
                                "predicted_loss": float(chin.predict(record["run"]["N"], run.tokens)) if sane else None}
        if sane and sized_by != "M_opt":
            record.update(headline="chinchilla", predicted_loss=record["chinchilla"]["predicted_loss"], interval_90=None)
    return record


def write_prediction(path: str | Path, record: dict) -> Path:
    """Write the prediction before the run exists; an existing prediction is never replaced (a new one after the
    fact would not be a prediction): remove it by hand to predict again."""
    path = Path(path)
    if path.exists():
        raise SweepError(f"scaling: {path} exists, written at {read_prediction(path).get('written_at')}; a prediction "
                         "is never replaced (move it away by hand to predict again)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
    return path


def read_prediction(path: str | Path) -> dict:
    """A prediction record, or a one-line error for a missing or unreadable one."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"scaling: prediction not found: {path} (write it first: the wind tunnel's predict stage)")
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SweepError(f"scaling: {path} is not a prediction record ({e})") from None
    if not isinstance(record, dict) or not {"run", "predicted_loss", "written_at"} <= set(record):
        raise SweepError(f"scaling: {path} is not a prediction record (needs run, predicted_loss, written_at)")
    return record


def prediction_run(record: dict, grid: SweepGrid) -> PlannedRun:
    """The PlannedRun a prediction record names, on `grid`'s data and schedule (the ladder's)."""
    r = record["run"]
    return PlannedRun(r["name"], "shape", r["budget"], dict(r["shape"]), r["lr"], r["batch_size"], r["steps"], grid)


def score(record: dict, row: dict) -> dict:
    """The prediction against the measured held-out loss of its run's results row."""
    measured = row["heldout_loss"]
    predicted = record["predicted_loss"]
    scored = {"headline": record.get("headline", "loss_vs_compute"), "predicted": predicted, "measured": measured,
              "abs_error": abs(predicted - measured),
              "rel_error": abs(predicted - measured) / measured, "interval_90": record.get("interval_90"),
              "inside_interval": None if record.get("interval_90") is None
              else record["interval_90"][0] <= measured <= record["interval_90"][1]}
    if "loss_vs_compute_predicted" in record:
        scored["loss_vs_compute"] = {"predicted": record["loss_vs_compute_predicted"],
                                     "rel_error": abs(record["loss_vs_compute_predicted"] - measured) / measured}
    chin = record.get("chinchilla") or {}
    if chin.get("predicted_loss") is not None:
        scored["chinchilla"] = {"predicted": chin["predicted_loss"],
                                "rel_error": abs(chin["predicted_loss"] - measured) / measured}
    return scored
