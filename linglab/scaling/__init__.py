"""Scaling laws (SPEC §4): the ladder runs, the fitter fits, the report writes and plots.

    laws.py    compute accounting (M, C = M D, A, G, dense or MoE) and the published laws (eta_opt, B_opt,
               M_opt / D_opt, efficiency leverage)
    fit.py     the fitters (power law, Chinchilla's L(N, D), L(C), bootstraps, the held-out budget) and
               `fit_results`, every fit a sweep's results support
    ladder.py  the grid (`SweepGrid`, `load_grid`), rung shapes, the cost model, `plan_runs`, `describe_plan`
    sweep.py   execution: `run_sweep` trains the planned runs into results.jsonl, resumably
    report.py  `write_fit` (fit.json, scaling.md, plots/*.png), `read_fit`, `suggest_config`
    tunnel.py  the wind tunnel: `predict` a run past the ladder, `write_prediction` before it runs, `score` it after
               (experiments/scaling/wind_tunnel.py chains scan, ladder, prediction and run)

Run them from the command line:

    linglab scaling sweep --out runs/scaling --dry-run      # the planned runs and their estimated time
    linglab scaling sweep --out runs/scaling                # the default grid, ~30 min on 2 CPU cores; --resume to continue
    linglab scaling fit --dir runs/scaling                  # fit.json, scaling.md and plots/*.png
    linglab scaling suggest --compute 1e14 --fit runs/scaling/fit.json --out big.toml

Dependencies point one way: laws <- fit and ladder; ladder <- sweep; fit and ladder <- report and tunnel. Re-exported below are
the names the CLI calls; the law math and the fitters come from their modules (`from linglab.scaling.laws import
optimal_lr`).
"""

from linglab.scaling.ladder import check_axis, describe_plan, load_grid, plan_runs
from linglab.scaling.report import read_fit, suggest_config, suggestion_toml, write_fit
from linglab.scaling.sweep import read_results, run_sweep

__all__ = ["check_axis", "describe_plan", "load_grid", "plan_runs", "read_fit", "read_results", "run_sweep",
           "suggest_config", "suggestion_toml", "write_fit"]
