"""The main job (`make run`, issue 5 point 7): pretrain -> RL -> evaluation -> one report.md.

    linglab pipeline --preset tiny --out runs/tiny --overwrite     # what `make run` runs
    linglab pipeline --out runs/tiny --resume                      # finish an interrupted pipeline
    linglab pipeline --preset tiny --out runs/x --rl.algo=lpo --train.max_steps=300   # any config override

One config drives both stages: `[model]`, `[data]`, `[train]` and `[fp8]` the pretraining, `[rl]` the RL stage.

    <out>/pretrain/     the `linglab train` run: metrics, plots, samples, report.md, checkpoints, final/
    <out>/rl/           the `linglab rl` run from pretrain/final: per-step RL metrics, before/after evaluation
    <out>/summary.json  wall time of each stage and of the whole pipeline (evaluations and reports included)
    <out>/report.md     the one report: the before/after table per tier (greedy, pass@k, ApexEval), both
                        stages' headline numbers and plots, and links to each stage's full report

With --resume a finished stage (its summary.json is written last) is kept and an unfinished one resumes from
its last checkpoint, bit-exactly as `linglab train --resume` and `linglab rl --resume` do.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from linglab.config import Config
from linglab.errors import LinglabError

PRETRAIN, RL = "pretrain", "rl"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stage_state(stage_dir: Path) -> str:
    """'done' (summary.json written), 'started' (something there) or 'new'."""
    if (stage_dir / "summary.json").is_file():
        return "done"
    return "started" if stage_dir.is_dir() and any(stage_dir.iterdir()) else "new"


def run_pipeline(cfg: Config, out: str | Path, resume: bool = False, overwrite: bool = False, command: str = "",
                 console=None) -> dict:
    """Pretrain, RL from the final checkpoint, report; returns the pipeline summary."""
    from rich.console import Console

    from linglab.rl.trainer import run_rl
    from linglab.train import prepare_run_dir, run_training

    console = console or Console()
    out = Path(out)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LinglabError("pipeline: runs in one process; under torchrun use `linglab train`, then `linglab rl`")
    prepare_run_dir(out, resume, overwrite, command="pipeline")
    previous = (_read_json(out / "summary.json") or {}) if resume else {}
    stages = dict(previous.get("stages", {}))
    pretrain_dir, rl_dir = out / PRETRAIN, out / RL

    state = _stage_state(pretrain_dir)
    if state != "done":
        console.rule(f"[bold]1/2 pretraining -> {pretrain_dir}")
        t0 = time.perf_counter()
        run_training(cfg, pretrain_dir, resume=state == "started", command=command, console=console)
        stages[PRETRAIN] = {"wall_time_s": time.perf_counter() - t0 + stages.get(PRETRAIN, {}).get("wall_time_s", 0.0),
                            "resumed": state == "started"}
        _write_summary(out, stages, command)

    state = _stage_state(rl_dir)
    if state != "done":
        console.rule(f"[bold]2/2 RL from {pretrain_dir / 'final'} -> {rl_dir}")
        t0 = time.perf_counter()
        started = state == "started" and (rl_dir / "rl_start").is_dir()
        run_rl(cfg, pretrain_dir / "final", rl_dir, resume=started, overwrite=not started, command=command,
               console=console)
        stages[RL] = {"wall_time_s": time.perf_counter() - t0 + stages.get(RL, {}).get("wall_time_s", 0.0),
                      "resumed": started}
        _write_summary(out, stages, command)

    summary = _write_summary(out, stages, command)
    console.print(f"pipeline report: {write_pipeline_report(out)}")
    return summary


def _write_summary(out: Path, stages: dict, command: str) -> dict:
    summary = {"stages": stages, "total_wall_time_s": sum(s["wall_time_s"] for s in stages.values()),
               "command": command}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _pct(x) -> str:
    return f"{x:.1%}" if isinstance(x, int | float) else ""


def _before_after_section(rl_eval: dict | None) -> list[str]:
    """Per tier and metric: before RL, after RL and the change in points, from rl/rl_eval.json."""
    if not rl_eval or "before" not in rl_eval or "after" not in rl_eval:
        return ["*No before/after evaluation (rl/rl_eval.json missing or rl.eval_problems = 0).*", ""]
    before, after = rl_eval["before"]["tiers"], rl_eval["after"]["tiers"]
    lines = ["## Held-out accuracy before vs after RL", "",
             "The same held-out problems before and after RL (none of them in any training document): greedy "
             "exact match, unbiased pass@k of n samples, and ApexEval, the best pass@k over prompt variants "
             "(SPEC §6). Answers are checked by the verifier, not by string match.", "",
             "| tier | metric | before RL | after RL | change (points) |", "|---|---|---:|---:|---:|"]
    for tier, info in before.items():
        for metric in ["greedy_accuracy", *(k for k in info if k.startswith("pass@")), "apex"]:
            b, a = info.get(metric), after.get(tier, {}).get(metric)
            if isinstance(b, dict):  # ApexEval: {"apex", "best_variant", "k"}
                b, a = b.get("apex"), (a or {}).get("apex")
                metric = f"ApexEval (pass@{info['apex']['k']})"
            change = f"{100 * (a - b):+.1f}" if isinstance(a, int | float) and isinstance(b, int | float) else ""
            lines.append(f"| {tier} | {metric} | {_pct(b)} | {_pct(a)} | {change} |")
    n = next(iter(before.values())).get("n_problems")
    if n:
        lines += ["", f"{n} problems per tier."]
    return lines + [""]


def _image(out: Path, rel: str, caption: str) -> list[str]:
    return [f"![{Path(rel).stem}]({rel})", "", caption, ""] if (out / rel).is_file() else []


def write_pipeline_report(out: str | Path) -> Path:
    """<out>/report.md from the files the two stages wrote; every number is read from them."""
    out = Path(out)
    summary = _read_json(out / "summary.json") or {}
    pre_summary = _read_json(out / PRETRAIN / "summary.json") or {}
    pre_eval = _read_json(out / PRETRAIN / "final_eval.json") or {}
    rl_summary = _read_json(out / RL / "summary.json") or {}
    rl_eval = _read_json(out / RL / "rl_eval.json")

    lines = ["# linglab pipeline: pretrain -> RL -> evaluation", ""]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`", ""]
    lines += ["| stage | what | wall time |", "|---|---|---:|"]
    stages = summary.get("stages", {})
    if PRETRAIN in stages:
        lines.append(f"| [pretraining]({PRETRAIN}/report.md) | {pre_summary.get('steps', '?')} steps, "
                     f"{pre_summary.get('tokens', 0) / 1e6:.2f}M tokens | {stages[PRETRAIN]['wall_time_s']:.0f} s |")
    if RL in stages:
        lines.append(f"| [RL]({RL}/report.md) | {rl_summary.get('steps', '?')} steps of {rl_summary.get('algo', '?')} + "
                     f"{rl_summary.get('correction', '?')}, {rl_summary.get('rollout_precision', '?')} rollouts"
                     f"{', C3PO++' if rl_summary.get('c3po') else ''} | {stages[RL]['wall_time_s']:.0f} s |")
    if stages:
        lines.append(f"| total | | {summary.get('total_wall_time_s', 0):.0f} s |")
    lines += ["", "Wall times include data, evaluation and report writing, not the package install.", ""]

    lines += _before_after_section(rl_eval)

    lines += ["## Pretraining", ""]
    if pre_eval.get("tiers"):
        tiers = ", ".join(f"{name} {_pct(t['accuracy'])} (n={t['n']})" for name, t in pre_eval["tiers"].items())
        lines += [f"Held-out greedy exact match at the end of pretraining (the pretraining run's own held-out set): "
                  f"{tiers}.", ""]
    lines += _image(out, f"{PRETRAIN}/plots/loss.png", "Pretraining loss.")
    lines += _image(out, f"{PRETRAIN}/plots/accuracy.png", "Held-out exact match per tier during pretraining.")
    lines += ["## RL", ""]
    lines += _image(out, f"{RL}/plots/reward.png", "Mean reward of each RL step's rollouts.")
    lines += _image(out, f"{RL}/plots/accuracy.png", "Rollout accuracy per tier during RL.")
    lines += _image(out, f"{RL}/plots/mismatch.png",
                    "Train-inference mismatch |log pi_train - log pi_infer| of the rollout tokens.")
    lines += ["Full reports: [pretraining](pretrain/report.md) (config, expert load, samples), "
              "[RL](rl/report.md) (config, mask fraction, response length).", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
