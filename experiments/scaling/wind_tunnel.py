"""The wind tunnel on real text (issue 18, SPEC §4): fit the LR law, fit a ladder, predict a run 10x larger, run it.

On the Python standard library's sources (`data.corpus = "stdlib"`, held out by file), in five stages, each resumable
(a finished run is never trained twice; `--stages` runs a subset):

    lr_scan   LR multipliers spanning 16x at three budgets 16x apart, the profile's centre rung, the published batch
              (lr_scan.toml): the near-optimal band and the parabola vertex per budget -> eta_opt(C) = a C^b, our
              own law (the published one asks for ~8x the best LR at these budgets; docs/scaling.md)
    ladder    IsoFLOP profiles: 6 budgets spanning 32x, 3 model sizes each (ladder.toml), LR from that law and batch
              from the published B_opt(C)
    predict   L(C) fitted on the ladder's frontier, evaluated for ONE run at `--factor` x its largest budget, sized by
              the ladder's own M_opt(C); written to <out>/prediction.json with its timestamp BEFORE that run exists
              (a prediction is never replaced)
    verify    that run, trained; its held-out loss against the prediction
    extras    efficiency leverage on real text: 8, 16 and 64 experts (top-4 + 1 shared) and a dense model of the same
              active width, at three budgets (extras.toml), with the same LR law

then writes <out>/wind_tunnel.json (the prediction, the measurement, the fits, the LR scans, EL; the GEMM rate beside
the wall times) and <out>/wind_tunnel.png, `linglab scaling fit`'s fit.json/scaling.md/plots of ladder + extras under
<out>/fit/, and prints `RESULT wind_tunnel_rel_error=<x> target=0.02`.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python experiments/scaling/wind_tunnel.py --dry-run   # plan + estimate
    OMP_NUM_THREADS=1 nohup .venv/bin/python experiments/scaling/wind_tunnel.py > wind_tunnel.log &   # ~2 h here
    .venv/bin/python experiments/scaling/wind_tunnel.py --stages report                               # re-write the report

`--grids DIR` reads other lr_scan/ladder/extras.toml (the test runs a toy grid that way).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from linglab.data import build_data  # noqa: E402
from linglab.errors import LinglabError  # noqa: E402
from linglab.flops import matmul_peak_flops  # noqa: E402
from linglab.run import read_jsonl  # noqa: E402
from linglab.scaling.fit import fit_power_law, frontier, hyper_scans, runs_on_rule  # noqa: E402
from linglab.scaling.ladder import (  # noqa: E402
    PlannedRun,
    SweepGrid,
    corpus_estimate,
    describe_plan,
    load_grid,
    minutes,
    plan_runs,
)
from linglab.scaling.laws import optimal_lr  # noqa: E402
from linglab.scaling.report import write_fit  # noqa: E402
from linglab.scaling.sweep import append_result, read_results, run_sweep, train_run  # noqa: E402
from linglab.scaling.tunnel import MAX_EPOCHS, PREDICTION, predict, prediction_run, read_prediction, score, write_prediction  # noqa: E402

STAGES = ("lr_scan", "ladder", "predict", "verify", "extras", "report")


def lr_law(out: Path) -> dict:
    """eta_opt(C) = coef C^exponent through the LR scan's parabola vertices (or its argmins where a scan has no
    interior minimum), with the scans it came from."""
    rows = read_results(out / "lr_scan" / "results.jsonl")
    scans = hyper_scans(rows, "lr", "batch_tokens")
    if len(scans) < 2:
        raise LinglabError(f"the LR scan has {len(scans)} budgets with >= 3 LRs of one shape; need 2")
    points = [(s["budget"], s["vertex"] if s["vertex"] is not None else s["best"]) for s in scans]
    law = fit_power_law(*zip(*points))
    return {"law": law.as_dict(), "points": points, "scans": scans,
            "from": ["vertex" if s["vertex"] is not None else "argmin (edge of the scan)" for s in scans]}


def scan_finished(out: Path, grid: SweepGrid) -> bool:
    results = out / "lr_scan" / "results.jsonl"
    done = {r["name"] for r in read_jsonl(results)} if results.is_file() else set()
    return all(r.name in done for r in plan_runs(grid)[0])


def grids(args, out: Path, need_law: bool = True) -> dict[str, SweepGrid]:
    """The three grids; ladder and extras take the LR law of the finished scan (a one-line error before it
    finished, unless `need_law` is false: the dry run then shows the published law in its place)."""
    found = {name: load_grid(args.grids / f"{name}.toml") for name in ("lr_scan", "ladder", "extras")}
    if not scan_finished(out, found["lr_scan"]):
        if need_law:
            raise LinglabError(f"the LR scan in {out / 'lr_scan'} has not finished: run the lr_scan stage first")
        return found
    law = lr_law(out)["law"]
    for name in ("ladder", "extras"):
        found[name] = dataclasses.replace(found[name], lr={"coef": law["coef"], "exponent": law["exponent"]})
    return found


def dry_run(args, out: Path) -> None:
    found = grids(args, out, need_law=False)
    total = 0.0
    for name in ("lr_scan", "ladder", "extras"):
        grid = found[name]
        runs, notes = plan_runs(grid)
        lr = "the published law until the scan has run" if grid.lr == "published" or name == "lr_scan" else \
            f"{grid.lr['coef']:.4g} C^{grid.lr['exponent']:.4f} from the scan" if isinstance(grid.lr, dict) else grid.lr
        print(f"\n## {name} ({args.grids / (name + '.toml')}; LR: {lr})")
        print("\n".join(describe_plan(runs, notes, grid)))
        total += sum(r.estimated_seconds() for r in runs) + corpus_estimate(grid)[0]
        if name == "ladder":
            budget = args.factor * max(grid.budgets)
            # The predicted run's cost, before its shape is known: as the ladder's largest run, scaled by compute.
            largest = max(runs, key=lambda r: r.compute)
            seconds = largest.estimated_seconds() * budget / largest.compute
            print(f"predicted run at C = {budget:.3g} ({args.factor:g}x {max(grid.budgets):.3g}): ~{minutes(seconds)}")
            total += seconds
    print(f"\nall stages: estimated {minutes(total)} on this CPU (the cost model of linglab.scaling.ladder)")


def verify(out: Path, grid: SweepGrid, log=print) -> dict:
    """Train the predicted run (once) and return its results row."""
    results = out / "verify" / "results.jsonl"
    record = read_prediction(out / PREDICTION)
    run: PlannedRun = prediction_run(record, grid)
    done = {r["name"]: r for r in read_jsonl(results)} if results.is_file() else {}
    if run.name in done:
        return done[run.name]
    log(f"verify: training {run.name} ({run.steps} steps, D {run.tokens}, est. {minutes(run.estimated_seconds())})")
    cfg = run.config()
    # The ladder's tokenizer, read and not rewritten: the predicted run sees the ladder's exact tokens.
    data = build_data(cfg.data, out / "ladder", cfg.train.eval_problems, save_tokenizer=False)
    row = train_run(run, data, out / "verify" / "runs" / run.name, log=log)
    append_result(results, row)
    return row


def plot(path: Path, ladder_rows, record, row, lr, fit) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    ax = axes[0]
    on_rule = runs_on_rule(ladder_rows)
    ax.scatter([r["compute"] for r in on_rule], [r["heldout_loss"] for r in on_rule], s=14, c="0.6", label="ladder runs")
    front = frontier(on_rule)
    ax.scatter([r["compute"] for r in front], [r["heldout_loss"] for r in front], s=30, c="C0", label="frontier (fitted)")
    curve = record["loss_vs_compute"]
    c = np.geomspace(min(r["compute"] for r in on_rule) / 1.5, record["run"]["compute"] * 1.5, 200)
    ax.plot(c, curve["E"] + curve["A"] * c ** -curve["alpha"], "C0-",
            label=f"L(C) = {curve['E']:.3g} + {curve['A']:.3g} C^-{curve['alpha']:.3g}")
    at, lc = record["run"]["compute"], record.get("loss_vs_compute_predicted", record["predicted_loss"])
    if record.get("headline", "loss_vs_compute") == "loss_vs_compute" and record["interval_90"]:
        lo, hi = record["interval_90"]
        ax.errorbar([at], [lc], yerr=[[lc - lo], [hi - lc]], fmt="s", c="C1", capsize=4,
                    label=f"predicted by L(C): {lc:.4f} (90% bootstrap), the headline")
    else:
        ax.scatter([at], [lc], marker="s", c="C1", label=f"L(C) at its compute: {lc:.4f}")
    chin = (record.get("chinchilla") or {}).get("predicted_loss")
    if chin is not None:
        headline = ", the headline" if record.get("headline") == "chinchilla" else ""
        ax.scatter([at], [chin], marker="D", c="C2", label=f"predicted by L(N, D): {chin:.4f}{headline}")
    if row is not None:
        ax.scatter([row["compute"]], [row["heldout_loss"]], marker="*", s=160, c="C3", zorder=5,
                   label=f"measured {row['heldout_loss']:.4f}")
    ax.set(xscale="log", xlabel="training compute C (FLOPs)", ylabel="held-out loss (nats/token)",
           title=f"the wind tunnel: {record['factor']:g}x past the ladder")
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, s in enumerate(lr["scans"]):
        ax.plot(s["values"], s["losses"], "o-", c=f"C{i}", label=f"C = {s['budget']:.2g} ({s['shape']})")
        ax.axvspan(*s["band"], color=f"C{i}", alpha=0.12)
        ax.axvline(float(optimal_lr(s["budget"])), c=f"C{i}", ls=":", lw=1)
        if s["vertex"]:
            ax.axvline(s["vertex"], c=f"C{i}", ls="--", lw=1)
    ax.set(xscale="log", xlabel="peak LR", ylabel="held-out loss",
           title="LR scans: band within 0.25% (shaded), vertex (--), published (:)")
    ax.legend(fontsize=7)
    ax = axes[2]
    lev = fit.get("leverage") or []
    if lev:
        for i, e in enumerate(sorted({r["budget"] for r in lev})):
            pts = sorted((r for r in lev if r["budget"] == e), key=lambda r: r["A"])
            ax.plot([r["A"] for r in pts], [r["EL"] for r in pts], "o-", c=f"C{i}", label=f"measured, C = {e:.2g}")
            ax.plot([r["A"] for r in pts], [r["EL_published"] for r in pts], "x--", c=f"C{i}", label=f"published law, C = {e:.2g}")
        ax.axhline(1, c="0.5", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="activation ratio A", ylabel="efficiency leverage EL",
               title="MoE over dense on real text")
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, out: Path, found: dict[str, SweepGrid], command: str) -> dict:
    ladder_rows = read_results(out / "ladder" / "results.jsonl")
    extras = out / "extras" / "results.jsonl"
    extra_rows = read_results(extras) if extras.is_file() else []
    record = read_prediction(out / PREDICTION)
    results = out / "verify" / "results.jsonl"
    row = next((r for r in read_jsonl(results) if r["name"] == record["run"]["name"]), None) if results.is_file() else None
    lr = lr_law(out)
    fit = write_fit(ladder_rows + extra_rows, out / "fit", n_boot=args.bootstrap, commands=[command])
    wall = {name: sum(r["wall_time_s"] for r in rows) for name, rows in
            (("lr_scan", read_results(out / "lr_scan" / "results.jsonl")), ("ladder", ladder_rows), ("extras", extra_rows),
             ("verify", [row] if row else []))}
    summary = {"command": command, "gemm_gflops": matmul_peak_flops() / 1e9, "wall_time_s": wall,
               "corpus": ladder_rows[0].get("corpus"), "prediction": record, "measured": row,
               "score": score(record, row) if row else None, "lr_law": lr,
               # Predictions moved aside by hand before their run finished, with the reason in docs/scaling.md
               "superseded": {p.name: json.loads(p.read_text()) for p in sorted(out.glob("prediction-superseded-*.json"))},
               "published_lr_at_scans": {f"{s['budget']:.3g}": float(optimal_lr(s["budget"])) for s in lr["scans"]},
               # `linglab scaling fit` on ladder + extras (<out>/fit): the frontier there may include the batch scan's runs
               "fit": {k: fit.get(k) for k in ("laws", "intervals", "frontier", "chinchilla", "holdout", "notes")},
               "batch_scans": fit.get("batch_tokens_scans"),
               "leverage": fit.get("leverage"), "dense_curve": fit.get("dense_curve"),
               "grids": {k: dataclasses.asdict(g) for k, g in found.items()}}
    (out / "wind_tunnel.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(out / "wind_tunnel.png", ladder_rows, record, row, lr, fit)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HERE / "wind_tunnel", help="results directory (default: next to this script)")
    p.add_argument("--grids", type=Path, default=HERE / "wind_tunnel", help="directory of lr_scan/ladder/extras.toml")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--factor", type=float, default=10.0, help="the predicted run's budget over the ladder's largest")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples of the fits")
    p.add_argument("--dry-run", action="store_true", help="print every stage's plan and estimated time, train nothing")
    args = p.parse_args()
    stages = args.stages.split(",")
    problem = None  # checked before anything is read or written
    if unknown := [s for s in stages if s not in STAGES]:
        problem = f"unknown stage(s) {', '.join(unknown)} (choose from {', '.join(STAGES)})"
    elif not args.factor >= 1:
        problem = f"--factor must be >= 1 (a run past the ladder), got {args.factor:g}"
    elif args.bootstrap < 0:
        problem = f"--bootstrap must be >= 0, got {args.bootstrap}"
    if problem:
        print(f"wind tunnel: {problem}", file=sys.stderr)
        sys.exit(2)
    command = shlex.join(["python", *sys.argv])
    out = args.out
    try:
        if args.dry_run:
            return dry_run(args, out)
        start = time.perf_counter()
        if "lr_scan" in stages:
            run_sweep(grids(args, out, need_law=False)["lr_scan"], out / "lr_scan", command=command)
        found = grids(args, out)
        if "ladder" in stages:
            run_sweep(found["ladder"], out / "ladder", command=command)
        if "predict" in stages and not (out / PREDICTION).exists():
            # At most MAX_EPOCHS of the corpus (its estimated training tokens): `linglab.scaling.tunnel.predict`.
            corpus_tokens = corpus_estimate(found["ladder"])[1]
            record = predict(read_results(out / "ladder" / "results.jsonl"), found["ladder"], args.factor, args.bootstrap,
                             max_tokens=MAX_EPOCHS * corpus_tokens)
            record["run"]["epochs"] = record["run"]["D"] / corpus_tokens
            write_prediction(out / PREDICTION, record)
            print(f"predicted {record['predicted_loss']:.4f} ({record['headline']}; 90% {record['interval_90']}) for "
                  f"{record['run']['name']} (sized by {record['run']['sized_by']}) at {record['written_at']}")
        if "verify" in stages:
            verify(out, found["ladder"])
        if "extras" in stages:
            run_sweep(found["extras"], out / "extras", command=command)
        if "report" in stages:
            summary = report(args, out, found, command)
            s = summary["score"]
            print(f"wrote {out / 'wind_tunnel.json'} and {out / 'wind_tunnel.png'} ({time.perf_counter() - start:.0f} s)")
            if s is not None:
                print(f"predicted {s['predicted']:.4f}, measured {s['measured']:.4f}")
                print(f"RESULT wind_tunnel_rel_error={s['rel_error']:.4f} target=0.02")
    except LinglabError as e:  # one line, exit 2, as the CLI
        print(f"wind tunnel: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
