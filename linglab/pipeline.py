"""The main job (`make run`, issue 5 point 7): pretrain -> RL -> evaluation -> one report.md.

    linglab pipeline --preset tiny --out runs/tiny --overwrite --rl-seeds 3   # what `make run` runs
    linglab pipeline --out runs/tiny --resume                      # finish an interrupted pipeline
    linglab pipeline --preset tiny --out runs/x --rl.algo=lpo --train.max_steps=300   # any config override

One config drives both stages: `[model]`, `[data]`, `[train]` and `[fp8]` the pretraining, `[rl]` the RL stage.

    <out>/pretrain/     the `linglab train` run: metrics, plots, samples, report.md, checkpoints, final/
    <out>/rl/           the `linglab rl` run from pretrain/final: per-step RL metrics, before/after evaluation
                        (with --rl-seeds N > 1: rl-seed<s>/ for rl.seed = s, s+1, ..., each its own prompts,
                        samples and held-out problems, so the gain comes with its spread over seeds)
    <out>/summary.json  wall time of each stage, of the RL phase and of the whole pipeline (evaluations and
                        reports included)
    <out>/report.md     the one report: the before/after table per tier (greedy, pass@k, ApexEval; mean,
                        spread and per-seed changes), both stages' headline numbers and plots, and links to
                        each stage's full report

On the CPU, several RL seeds train side by side, one process and one thread per core (`rl_workers`: faster than
one after the other at this scale), each logging to <out>/<run>.log; on a GPU one after the other.

With --resume a finished stage (its summary.json is written last) is kept and an unfinished one resumes from
its last checkpoint, bit-exactly as `linglab train --resume` and `linglab rl --resume` do.
"""

from __future__ import annotations

import copy
import json
import multiprocessing as mp
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch

from linglab.config import Config
from linglab.errors import LinglabError
from linglab.report import read_json, read_model_config
from linglab.run import releases_locks

PRETRAIN, RL = "pretrain", "rl"


def _stage_state(stage_dir: Path) -> str:
    """'done' (summary.json written), 'started' (something there) or 'new'."""
    if (stage_dir / "summary.json").is_file():
        return "done"
    return "started" if stage_dir.is_dir() and any(stage_dir.iterdir()) else "new"


def rl_runs(rl_seeds: int, first_seed: int) -> list[tuple[str, int]]:
    """(directory name, rl.seed) of each RL run: `rl` alone, or `rl-seed<s>` for several seeds."""
    if rl_seeds == 1:
        return [(RL, first_seed)]
    return [(f"{RL}-seed{s}", s) for s in range(first_seed, first_seed + rl_seeds)]


@releases_locks
def run_pipeline(cfg: Config, out: str | Path, resume: bool = False, overwrite: bool = False, command: str = "",
                 console=None, rl_seeds: int | None = None) -> dict:
    """Pretrain, RL from the final checkpoint (once per RL seed), report; returns the pipeline summary.

    rl_seeds None: as many as the pipeline being resumed has, else 1."""
    from rich.console import Console

    from linglab.run import RunDir
    from linglab.train import run_training

    console = console or Console()
    out = Path(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LinglabError("pipeline: runs in one process; under torchrun use `linglab train`, then `linglab rl`")
    if rl_seeds is not None and rl_seeds < 1:
        raise LinglabError(f"pipeline: --rl-seeds must be >= 1, got {rl_seeds}")
    pipeline_dir = RunDir(out, "pipeline")
    pipeline_dir.prepare(resume, overwrite)  # locked for the whole pipeline
    if not resume or not (out / "config.toml").is_file():
        pipeline_dir.write_config(cfg)  # what `linglab pipeline --resume` reads back
    previous = (read_json(out / "summary.json") or {}) if resume else {}
    if rl_seeds is None:
        rl_seeds = len(previous.get("rl_runs", [RL]))
    stages = dict(previous.get("stages", {}))
    rl_before, rl_t0 = previous.get("rl_wall_time_s", 0.0), None

    def rl_wall() -> float:  # the RL phase's wall time so far, over every process that ran it
        return rl_before + (0.0 if rl_t0 is None else time.perf_counter() - rl_t0)

    pretrain_dir = out / PRETRAIN
    runs = rl_runs(rl_seeds, cfg.rl.seed)
    _write_summary(out, stages, command, runs, rl_wall())  # the RL runs are on record before anything can be interrupted

    state = _stage_state(pretrain_dir)
    if state != "done":
        console.rule(f"[bold]1/2 pretraining -> {pretrain_dir}")
        t0 = time.perf_counter()
        run_training(cfg, pretrain_dir, resume=state == "started", command=command, console=console)
        stages[PRETRAIN] = {"wall_time_s": time.perf_counter() - t0 + stages.get(PRETRAIN, {}).get("wall_time_s", 0.0),
                            "resumed": state == "started"}
        _write_summary(out, stages, command, runs, rl_wall())

    todo = []
    for name, seed in runs:
        state = _stage_state(out / name)
        if state != "done":
            rl_cfg = copy.deepcopy(cfg)
            rl_cfg.rl.seed = seed
            started = state == "started" and (out / name / "rl_start").is_dir()
            todo.append((name, seed, rl_cfg, started))
    workers = rl_workers(cfg, len(todo))
    rl_t0 = time.perf_counter() if todo else None
    if workers > 1:
        console.rule(f"[bold]2/2 RL x {len(todo)} from {pretrain_dir / 'final'}: {workers} at a time, "
                     f"{_threads(workers)} thread(s) each; logs in {out}/<run>.log")
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(_threads(workers),)) as pool:
            futures = {pool.submit(_rl_stage, rl_cfg, pretrain_dir / "final", out / name, started, command,
                                   out / f"{name}.log"): (name, seed, started) for name, seed, rl_cfg, started in todo}
            for future in as_completed(futures):
                name, seed, started = futures[future]
                wall = future.result()
                console.print(f"{name} (rl.seed={seed}) finished in {wall:.0f} s: {out / name / 'report.md'}")
                stages[name] = {"wall_time_s": wall + stages.get(name, {}).get("wall_time_s", 0.0),
                                "resumed": started, "rl_seed": seed, "parallel_runs": workers}
                _write_summary(out, stages, command, runs, rl_wall())
    for name, seed, rl_cfg, started in todo if workers == 1 else []:
        console.rule(f"[bold]2/2 RL (rl.seed={seed}) from {pretrain_dir / 'final'} -> {out / name}")
        wall = _rl_stage(rl_cfg, pretrain_dir / "final", out / name, started, command, console=console)
        stages[name] = {"wall_time_s": wall + stages.get(name, {}).get("wall_time_s", 0.0),
                        "resumed": started, "rl_seed": seed}
        _write_summary(out, stages, command, runs, rl_wall())

    summary = _write_summary(out, stages, command, runs, rl_wall())
    console.print(f"pipeline report: {write_pipeline_report(out)}")
    return summary


def rl_workers(cfg: Config, runs: int) -> int:
    """RL runs to train at once: on the CPU one per core (up to the runs), one thread each; else one at a time.

    Why: at the tiny scale an RL step is many small ops that two threads share poorly. In the fresh-clone `make run`
    of docs/results/make-run/summary.json the three RL runs took 93-103 s each, 298 s in all, and the RL phase 198 s
    (`rl_wall_time_s`); the `make run` before, one run after the other with 2 threads, took 602 s in all against 503 s
    (its files were not kept). A GPU run keeps one process."""
    if cfg.train.device != "cpu" or runs < 2:
        return 1
    return max(1, min(runs, os.cpu_count() or 1))


def _threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def _rl_stage(rl_cfg: Config, start: Path, rl_dir: Path, started: bool, command: str, log: Path | None = None,
              console=None) -> float:
    """One RL run of the pipeline (`linglab rl`, resumed if it had started); its wall time. With `log`, its console
    output goes to that file (a worker process of parallel RL seeds)."""
    from rich.console import Console

    from linglab.rl.trainer import run_rl

    handle = None
    if log is not None:
        handle = open(log, "a", encoding="utf-8")
        console = Console(file=handle, width=120)
    try:
        t0 = time.perf_counter()
        run_rl(rl_cfg, start, rl_dir, resume=started, overwrite=not started, command=command, console=console)
        return time.perf_counter() - t0
    finally:
        if handle is not None:
            handle.close()


def _write_summary(out: Path, stages: dict, command: str, runs: list[tuple[str, int]], rl_wall: float) -> dict:
    """summary.json: each stage's wall time, the RL phase's (its runs may overlap: `rl_workers`) and the total."""
    pretrain = stages.get(PRETRAIN, {}).get("wall_time_s", 0.0)
    summary = {"stages": stages, "rl_wall_time_s": rl_wall, "total_wall_time_s": pretrain + rl_wall,
               "rl_runs": [name for name, _ in runs], "command": command}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _pct(x) -> str:
    return f"{x:.1%}" if isinstance(x, int | float) else ""


def _before_after_section(evals: list[dict | None]) -> list[str]:
    """Per tier and metric: before RL, after RL and the change in points, from each RL run's rl_eval.json; with
    several RL seeds the means, the change's stdev and each seed's change."""
    evals = [e for e in evals if e and "before" in e and "after" in e]
    if not evals:
        return ["*No before/after evaluation (rl_eval.json missing or rl.eval_problems = 0).*", ""]
    several = len(evals) > 1
    lines = ["## Held-out accuracy before vs after RL", "",
             "The same held-out problems before and after RL (none of them in any training document): greedy "
             "exact match, unbiased pass@k of n samples, and ApexEval, the best pass@k over prompt variants "
             "(SPEC §6). Answers are checked by the verifier, not by string match.", ""]
    if several:
        lines += [f"{len(evals)} RL seeds, each with its own prompts, samples and held-out problems: before and "
                  "after are means over the seeds; the change is mean ± stdev, then each seed's.", ""]
    lines += ["| tier | metric | before RL | after RL | change (points) |" + (" per seed |" if several else ""),
              "|---|---|---:|---:|---:|" + ("---|" if several else "")]

    def value(e: dict, stage: str, tier: str, metric: str):
        v = e[stage]["tiers"].get(tier, {}).get(metric)
        return v.get("apex") if isinstance(v, dict) else v

    first = evals[0]["before"]["tiers"]
    for tier, info in first.items():
        for metric in ["greedy_accuracy", *(k for k in info if k.startswith("pass@")), "apex"]:
            before = [value(e, "before", tier, metric) for e in evals]
            after = [value(e, "after", tier, metric) for e in evals]
            if any(not isinstance(v, int | float) for v in before + after):
                continue
            change = [100 * (a - b) for a, b in zip(after, before, strict=True)]
            cell = f"{statistics.fmean(change):+.1f}" + (f" ± {statistics.stdev(change):.1f}" if several else "")
            label = f"ApexEval (pass@{info['apex']['k']})" if metric == "apex" else metric
            row = f"| {tier} | {label} | {_pct(statistics.fmean(before))} | {_pct(statistics.fmean(after))} | {cell} |"
            lines.append(row + (" " + ", ".join(f"{c:+.1f}" for c in change) + " |" if several else ""))
    n = next(iter(first.values())).get("n_problems")
    if n:
        lines += ["", f"{n} problems per tier" + (" per seed." if several else ".")]
    return lines + [""]


def _image(out: Path, rel: str, caption: str) -> list[str]:
    return [f"![{Path(rel).stem}]({rel})", "", caption, ""] if (out / rel).is_file() else []


def write_pipeline_report(out: str | Path) -> Path:
    """<out>/report.md from the files the two stages wrote; every number is read from them."""
    out = Path(out)
    summary = read_json(out / "summary.json") or {}
    pre_summary = read_json(out / PRETRAIN / "summary.json") or {}
    pre_eval = read_json(out / PRETRAIN / "final_eval.json") or {}
    names = summary.get("rl_runs", [RL])
    rl_summaries = [read_json(out / name / "summary.json") or {} for name in names]
    rl_evals = [read_json(out / name / "rl_eval.json") for name in names]

    lines = ["# linglab pipeline: pretrain -> RL -> evaluation", ""]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`", ""]
    lines += ["| stage | what | wall time |", "|---|---|---:|"]
    stages = summary.get("stages", {})
    if PRETRAIN in stages:
        lines.append(f"| [pretraining]({PRETRAIN}/report.md) | {pre_summary.get('steps', '?')} steps, "
                     f"{pre_summary.get('tokens', 0) / 1e6:.2f}M tokens | {stages[PRETRAIN]['wall_time_s']:.0f} s |")
    for name, rl_summary in zip(names, rl_summaries, strict=True):
        if name in stages:
            seed = stages[name].get("rl_seed")
            lines.append(f"| [RL]({name}/report.md){'' if seed is None else f' seed {seed}'} | "
                         f"{rl_summary.get('steps', '?')} steps of {rl_summary.get('algo', '?')} + "
                         f"{rl_summary.get('correction', '?')}, {rl_summary.get('rollout_precision', '?')} rollouts"
                         f"{', C3PO++' if rl_summary.get('c3po') else ''} | {stages[name]['wall_time_s']:.0f} s |")
    parallel = max((s.get("parallel_runs", 1) for s in stages.values()), default=1)
    if parallel > 1:
        lines.append(f"| RL phase | the RL runs, {parallel} at a time (one thread each) | "
                     f"{summary.get('rl_wall_time_s', 0):.0f} s |")
    if stages:
        lines.append(f"| total | | {summary.get('total_wall_time_s', 0):.0f} s |")
    lines += ["", "Wall times include data, evaluation and report writing, not the package install.", ""]

    lines += _before_after_section(rl_evals)

    lines += ["## Pretraining", ""]
    model = read_model_config(out / PRETRAIN)
    if model is not None:
        lines += [f"Model: {model.layer_layout()}.", ""]
    if pre_eval.get("tiers"):
        tiers = ", ".join(f"{name} {_pct(t['accuracy'])} (n={t['n']})" for name, t in pre_eval["tiers"].items())
        lines += [f"Held-out greedy exact match at the end of pretraining (the pretraining run's own held-out set): "
                  f"{tiers}.", ""]
    lines += _image(out, f"{PRETRAIN}/plots/loss.png", "Pretraining loss.")
    lines += _image(out, f"{PRETRAIN}/plots/accuracy.png", "Held-out exact match per tier during pretraining.")
    first = names[0]
    lines += ["## RL", ""] + ([f"Plots of the first RL seed ({first}/); the others' are in their directories.", ""]
                              if len(names) > 1 else [])
    lines += _image(out, f"{first}/plots/reward.png", "Mean reward of each RL step's rollouts.")
    lines += _image(out, f"{first}/plots/accuracy.png", "Rollout accuracy per tier during RL.")
    lines += _image(out, f"{first}/plots/mismatch.png",
                    "Train-inference mismatch |log pi_train - log pi_infer| of the rollout tokens.")
    lines += [f"Full reports: [pretraining]({PRETRAIN}/report.md) (config, expert load, samples), "
              + ", ".join(f"[{name}]({name}/report.md)" for name in names)
              + " (config, mask fraction, response length).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
