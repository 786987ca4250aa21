"""Running the scaling-law sweep (SPEC §4): train every planned run of the ladder not yet in results.jsonl.

    linglab scaling sweep --out runs/scaling --dry-run      # the planned runs and their estimated time
    linglab scaling sweep --out runs/scaling                # the default grid, ~30 min on 2 CPU cores; --resume to continue

    rows = run_sweep(load_grid(), "runs/scaling")            # the same from Python

A run trains with `Trainer.fit` on the embedded arithmetic corpus, then records its held-out and final training
loss as one line of out/results.jsonl; out/sweep.json keeps the grid and every command that trained into out/.
What the runs are is `linglab.scaling.ladder`; what is fitted on the rows is `linglab.scaling.fit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from linglab.config import to_toml
from linglab.plots import si
from linglab.run import RunDir, read_jsonl, releases_locks, seed_everything
from linglab.scaling.ladder import (
    AXES,
    SHAPE_KEYS,
    PlannedRun,
    SweepError,
    SweepGrid,
    active_params,
    is_number,
    minutes,
    plan_runs,
)
from linglab.scaling.laws import activation_ratio, granularity, model_kind

# ---------------------------------------------------------------- results.jsonl


def _finished(path: Path) -> dict[str, dict]:
    """name -> row of a results.jsonl (the last line of a name wins); a torn line, from a kill mid-write, is skipped."""
    return {row["name"]: row for row in (read_jsonl(path) if path.is_file() else ()) if "name" in row}


# The columns of a results row that the fits read (train_run writes them all): positive finite numbers, then the rest.
POSITIVE_COLUMNS = ("budget", "compute", "N", "M", "D", "lr", "lr_multiplier", "batch_tokens", "batch_multiplier",
                    "activation_ratio", "granularity", "heldout_loss")
MODEL_COLUMNS = ("hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok")


def _check_row(row: dict, source: str) -> None:
    """A one-line SweepError naming the run and column unless `row` has every column the fits read, each with its type
    (a NaN or infinite loss, from a diverged run, cannot be fitted)."""
    where = f"{source}: run {row['name']!r}"
    for key in (*POSITIVE_COLUMNS, "axis", "kind", "model", "train_loss", "wall_time_s"):
        if key not in row:
            raise SweepError(f"{where} has no '{key}' column")
    for key in POSITIVE_COLUMNS:
        value = row[key]
        if not (is_number(value) and math.isfinite(value) and value > 0):
            raise SweepError(f"{where}: {key} must be a positive finite number, got {json.dumps(value)}")
    if row["axis"] not in AXES or row["kind"] not in ("dense", "moe"):
        raise SweepError(f"{where}: axis {row['axis']!r} / kind {row['kind']!r}; expected one of {', '.join(AXES)} / "
                         "dense or moe")
    model = row["model"]
    if not (isinstance(model, dict) and all(isinstance(model.get(k), int) for k in MODEL_COLUMNS)):
        raise SweepError(f"{where}: model must map {', '.join(MODEL_COLUMNS)} to integers, got {json.dumps(model)}")
    if not (row["train_loss"] is None or is_number(row["train_loss"]) and math.isfinite(row["train_loss"])):
        raise SweepError(f"{where}: train_loss must be a finite number or null, got {json.dumps(row['train_loss'])}")
    if not (is_number(row["wall_time_s"]) and math.isfinite(row["wall_time_s"])):
        raise SweepError(f"{where}: wall_time_s must be a finite number, got {json.dumps(row['wall_time_s'])}")


def read_results(path: str | Path) -> list[dict]:
    """The finished runs of a results.jsonl, each checked by `_check_row`; a one-line error for a file that is not
    one (binary data), holds no runs, or has a row the fits cannot read."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"scaling: results file not found: {path} (run `linglab scaling sweep` first)")
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"scaling: {path} is not a JSON-lines results file (binary data at byte {e.start})") from None
    if b"\0" in data:
        raise SweepError(f"scaling: {path} is not a JSON-lines results file (binary data at byte {data.index(0)})")
    lines = read_jsonl(path)
    if any(not isinstance(row.get("name"), str) for row in lines):
        raise SweepError(f"scaling: {path} has a row without a run 'name' (not a results file of linglab scaling sweep)")
    rows = {row["name"]: row for row in lines}  # the last line of a name wins, as in _finished
    if not rows:
        raise SweepError(f"scaling: {path} holds no finished runs")
    for row in rows.values():
        _check_row(row, f"scaling: {path}")
    return list(rows.values())


# ---------------------------------------------------------------- running


@releases_locks
def train_run(run: PlannedRun, data, run_dir: Path, log=print) -> dict:
    """Train one planned run with `Trainer.fit` (no evals, one checkpoint at the end), measure its losses, return its row.

    A run dir that already holds the final checkpoint (killed between training and the results line) is resumed
    from it and only evaluated; anything less is discarded and trained from the start: runs are minutes long.
    Checkpoints are deleted once measured; config.toml and metrics.jsonl stay.
    """
    from linglab import evals, report
    from linglab.model import build_model
    from linglab.train import STATE_NAME, build_trainer

    start = time.perf_counter()
    cfg = run.config()
    rd = RunDir(run_dir, "scaling sweep", STATE_NAME)
    resume = any(d.name == f"step_{run.steps:06d}" for d in rd.checkpoints()) \
        and (run_dir / "config.toml").is_file() and (run_dir / "config.toml").read_text() == to_toml(cfg)
    rd.prepare(resume=resume, overwrite=not resume)
    rd.write_config(cfg)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, seed=cfg.train.seed)
    trainer = build_trainer(cfg, rd, data, model, log=log)
    if resume:
        trainer.resume()
    trainer.fit()
    heldout = evals.heldout_loss(model, data.heldout)
    train_rows, _ = report.read_metrics(rd.metrics_path)
    losses = [r["loss"] for r in train_rows if not r.get("skipped")][-report.FINAL_LOSS_WINDOW:]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    n, n_total = active_params(run.shape)
    return {"name": run.name, "axis": run.axis, "budget": run.budget, "compute": run.compute,
            "model": {k: run.shape[k] for k in SHAPE_KEYS}, "kind": model_kind(cfg.model),
            "activation_ratio": activation_ratio(cfg.model), "granularity": granularity(cfg.model),
            "N": n, "N_total": n_total, "M": run.m, "D": run.tokens, "steps": run.steps,
            "lr": run.lr, "lr_multiplier": run.lr_multiplier, "batch_size": run.batch_size,
            "batch_tokens": run.batch_size * cfg.data.seq_len, "batch_multiplier": run.batch_multiplier,
            "seq_len": cfg.data.seq_len, "train_loss": float(np.mean(losses)) if losses else None,
            "heldout_loss": heldout, "train_time_s": trainer.counters["elapsed"], "wall_time_s": time.perf_counter() - start,
            "corpus": {k: data.corpus[k] for k in ("name", "sha256")} if data.corpus else {"name": "embedded"}}


def append_result(results: Path, row: dict) -> None:
    """One finished run's row at the end of a results.jsonl; a line torn by a kill stays apart from this one."""
    torn = results.is_file() and results.stat().st_size > 0 and not results.read_bytes().endswith(b"\n")
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(("\n" if torn else "") + json.dumps(row) + "\n")


def run_sweep(grid: SweepGrid, out: str | Path, log=print, command: str = "") -> list[dict]:
    """Train every planned run not yet in out/results.jsonl, appending one line per finished run; returns the new rows."""
    from linglab.data import build_data

    out = Path(out)
    runs, notes = plan_runs(grid)
    results = out / "results.jsonl"
    done = _finished(results)
    todo = [r for r in runs if r.name not in done]
    for note in notes:
        log(note)
    estimate = sum(r.estimated_seconds() for r in todo)
    log(f"{len(runs)} runs planned, {len(runs) - len(todo)} already in {results}, {len(todo)} to train "
        f"(estimated {minutes(estimate)})")
    if not todo:
        return []
    out.mkdir(parents=True, exist_ok=True)
    record = out / "sweep.json"  # the grid and every command that trained into out/, for scaling.md
    commands = json.loads(record.read_text()).get("commands", []) if record.is_file() else []
    record.write_text(json.dumps({"grid": dataclasses.asdict(grid), "commands": [*commands, command]}, indent=2) + "\n")
    data_cfg = todo[0].config()
    # Built once for every run (same corpus, tokenizer and held-out set); the tokenizer is saved in out/ and reused.
    data = build_data(data_cfg.data, out, data_cfg.train.eval_problems)
    new, spent, estimated = [], 0.0, 0.0
    for i, run in enumerate(todo):
        row = train_run(run, data, out / "runs" / run.name, log=log)
        append_result(results, row)
        new.append(row)
        spent += row["wall_time_s"]
        estimated += run.estimated_seconds()
        remaining = sum(r.estimated_seconds() for r in todo[i + 1:]) * spent / estimated
        log(f"[{i + 1}/{len(todo)}] {run.name}: N {si(row['N'])} D {si(row['D'])} held-out {row['heldout_loss']:.4f} "
            f"train {row['train_loss']:.4f} in {row['wall_time_s']:.0f} s; ETA {minutes(remaining)}")
    return new

