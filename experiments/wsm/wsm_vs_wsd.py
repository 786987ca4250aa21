"""WSM vs WSD on the tiny preset (SPEC §2, issue 12 item 6): does a merge of the last checkpoints of a
constant-LR run match the LR decay it replaces?

For each train.seed s, two `linglab train` runs from the same start on the same batches (data.seed 0):

    wsd   the default schedule: a linear decay to 0 over the last decay_frac x max_steps steps (0.3 x 600 = 180);
    wsm   constant LR to the end, a checkpoint every --ckpt-every steps (20), and just enough of them kept
          (keep_last 10) to cover that same window, steps 420..600; then `linglab merge` of those
          checkpoints with the weights of a linear decay and of a cosine decay over the window.

As a diagnostic for the window, the same two merges of only the last --windows checkpoints (2, 4, 7).

Every model (WSD final, WSM last, every WSM merge) is evaluated with `linglab eval --json` on the
training run's held-out problems (train.eval_problems per tier, data.seq_len). Both runs of a seed use the same
LR up to the window's start, so they are the same run up to there (`same_losses_through_step` checks it on the
training losses) and a per-seed difference between the arms is paired.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python experiments/wsm/wsm_vs_wsd.py --seeds 0 1 2
    .venv/bin/python experiments/wsm/wsm_vs_wsd.py --quick --seeds 0 --runs /tmp/wsm/runs --out /tmp/wsm  # the test's

Each step is a subprocess of the real CLI (`python -m linglab.cli train|merge|eval`), logged to
<runs>/logs/. Resumable: a finished training, merge or evaluation is skipped, an interrupted training resumed.
Writes <out>/wsm_vs_wsd.json (per seed and model, mean and stdev per model, paired differences to WSD, the
commands, the commit, the fp32 GEMM rate and the wall times) and <out>/wsm_vs_wsd.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from linglab.config import load_config  # noqa: E402
from linglab.flops import flops_per_token, matmul_peak_flops  # noqa: E402
from linglab.report import read_metrics  # noqa: E402
from linglab.run import RunDir  # noqa: E402
from linglab.tasks import CORE_TIERS, TIERS  # noqa: E402

PRESET = "tiny"
DECAYS = ("linear", "cosine")
# model key -> plot label; the keys are those of the result JSON
MODELS = {"wsd_final": "WSD final", "wsm_last": "WSM last", "wsm_merged_linear": "WSM merged\nlinear",
          "wsm_merged_cosine": "WSM merged\ncosine"}
# A smoke-test run: small enough for a test to run both arms end to end in seconds.
QUICK = ["--model.num_hidden_layers=2", "--data.seq_len=64", "--data.num_documents=1500", "--train.max_steps=30",
         "--train.warmup_steps=5", "--train.batch_size=8", "--train.eval_problems=4", "--train.num_samples=2"]


def shown(path: Path) -> str:
    """A path as commands name it: relative to the repository when inside it (the commands run from there)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


class Runner:
    """Runs CLI subprocesses, logs each to <runs>/logs/<name>.log and keeps their wall times in timings.json
    (so a resumed experiment still reports the times of the steps it skips), each with the fp32 GEMM rate
    measured by the invocation that ran it."""

    def __init__(self, runs: Path, gemm_flops_per_s: float):
        self.gemm_flops_per_s = gemm_flops_per_s
        self.logs = runs / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.timings_path = runs / "timings.json"
        self.timings = json.loads(self.timings_path.read_text()) if self.timings_path.is_file() else {}
        self.commands: dict[str, str] = {}
        self.lock = threading.Lock()  # steps of a stage may run side by side (--jobs)

    def run(self, name: str, args: list[str], done: bool, record: list[str] | None = None) -> None:
        """`python -m linglab.cli ARGS` unless `done`; `record` is the command written to the results, if not ARGS."""
        self.commands[name] = "python -m linglab.cli " + shlex.join(record or args)
        if done:
            return
        print(f"[{time.strftime('%H:%M:%S')}] {name}: linglab {shlex.join(args)}", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        log = self.logs / f"{name.replace('/', '-')}.log"
        start = time.perf_counter()
        with open(log, "w") as f:
            code = subprocess.call([sys.executable, "-m", "linglab.cli", *args], cwd=ROOT, env=env, stdout=f,
                                   stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
        if code != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise SystemExit(f"{name} failed (exit {code}); the end of {log}:\n{tail}")
        with self.lock:
            self.timings[name] = {"seconds": seconds, "resumed": "--resume" in args,
                                  "gemm_flops_per_s": self.gemm_flops_per_s}
            self.timings_path.write_text(json.dumps(self.timings, indent=2) + "\n")


def in_parallel(jobs: int, calls: list) -> None:
    """Call the zero-argument callables, up to `jobs` at a time; the first failure is raised here."""
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda call: call(), calls))


def window(cfg, ckpt_every: int) -> tuple[int, list[int]]:
    """(keep_last, checkpoint steps) of the WSM run: every checkpoint of the WSD decay's window, its ends included."""
    steps = cfg.train.max_steps
    decay = int(steps * cfg.train.decay_frac)
    if decay < ckpt_every or decay % ckpt_every or steps % ckpt_every:
        raise SystemExit(f"--ckpt-every {ckpt_every} must divide both max_steps {steps} and the decay window {decay}")
    kept = list(range(steps - decay, steps + 1, ckpt_every))
    return len(kept), kept


def train(runner: Runner, run_dir: Path, name: str, overrides: list[str]) -> None:
    """`linglab train` into run_dir: skipped when finished, resumed from its last checkpoint when interrupted."""
    args = ["train", "--preset", PRESET, "--out", shown(run_dir), *overrides]
    if (run_dir / "summary.json").is_file():
        runner.run(name, [*args, "--overwrite"], done=True)
    elif RunDir(run_dir).checkpoints():
        resume = ["train", "--out", shown(run_dir), *overrides, "--resume"]  # the run's own config.toml
        runner.run(name, resume, done=False, record=[*args, "--overwrite"])
    else:
        runner.run(name, [*args, "--overwrite"], done=False)


def same_losses_through(a: Path, b: Path) -> int:
    """The last step up to which two runs logged bit-equal training losses. For the two arms of a seed it is the
    WSD decay's first step + 1: a step's loss is taken before its update, the first one with another LR."""
    rows_a, _ = read_metrics(a / "metrics.jsonl")
    rows_b, _ = read_metrics(b / "metrics.jsonl")
    step = 0
    for ra, rb in zip(rows_a, rows_b):
        if ra["step"] != rb["step"] or ra["loss"] != rb["loss"]:
            break
        step = ra["step"]
    return step


def max_abs_diff(a: Path, b: Path) -> float:
    """Largest elementwise difference between the float tensors of two checkpoints."""
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta if ta[k].is_floating_point())


def run_gemm_rate(run_dir: Path, model_flops_per_token: float) -> float:
    """The fp32 GEMM rate `linglab train` measured at the start of a run (`matmul_peak_flops`), read back from
    its first metrics row: mfu = model FLOPs per token x tokens/s / that rate."""
    rows, _ = read_metrics(run_dir / "metrics.jsonl")
    return model_flops_per_token * rows[0]["tokens_per_s"] / rows[0]["mfu"]


def run_seed(runner: Runner, runs: Path, seed: int, common: list[str], wsm_overrides: list[str],
             kept_steps: list[int], windows: list[int], eval_args: list[str], jobs: int,
             model_flops_per_token: float) -> dict:
    """Both arms of one seed, the merges and their evaluations; the seed's results."""
    wsd, wsm = runs / f"seed{seed}-wsd", runs / f"seed{seed}-wsm"
    seeded = [*common, "--data.seed=0", f"--train.seed={seed}"]
    in_parallel(jobs, [partial(train, runner, wsd, f"seed{seed}/wsd/train", [*seeded, "--train.schedule=wsd"]),
                       partial(train, runner, wsm, f"seed{seed}/wsm/train",
                               [*seeded, "--train.schedule=wsm", *wsm_overrides])])
    merged_steps = [int(p.name.removeprefix("step_")) for p in RunDir(wsm).checkpoints()]
    if merged_steps != kept_steps:
        raise SystemExit(f"{wsm} kept checkpoints at steps {merged_steps}, expected {kept_steps}")

    ckpts = {"wsd_final": wsd / "final", "wsm_last": wsm / "final"}
    # model key -> (what `linglab merge` merges: the run dir = all kept checkpoints, or the last n of them; decay)
    merge_inputs = {f"wsm_merged_{decay}": ([wsm], decay) for decay in DECAYS}
    merge_inputs.update({window_key(decay, n): (RunDir(wsm).checkpoints()[-n:], decay) for decay in DECAYS for n in windows})
    suffix = {key: key.removeprefix("wsm_merged_").replace("_", "-") for key in merge_inputs}  # linear-last4
    merged = {key: wsm / f"merged-{suffix[key]}" for key in merge_inputs}
    in_parallel(jobs, [partial(runner.run, f"seed{seed}/wsm/merge-{suffix[key]}",
                               ["merge", *map(shown, inputs), "--out", shown(merged[key]), "--decay", decay],
                               done=(merged[key] / "model.safetensors").is_file())
                       for key, (inputs, decay) in merge_inputs.items()])
    merges = {}
    for key, out in merged.items():
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            provenance = json.loads(f.metadata()["wsm_merge"])
        merges[key] = {"checkpoints": [Path(p).name for p in provenance["checkpoints"]],
                       "weights": provenance["weights"], "max_abs_diff_vs_last": max_abs_diff(out, wsm / "final")}
        ckpts[key] = out

    results = {key: runs / "evals" / f"seed{seed}-{key}.json" for key in ckpts}
    in_parallel(jobs, [partial(runner.run, f"seed{seed}/eval/{key}",
                               ["eval", "--ckpt", shown(ckpts[key]), *eval_args, "--json", shown(result)],
                               done=result.is_file()) for key, result in results.items()])
    models = {}
    for key, ckpt in ckpts.items():
        ev = json.loads(results[key].read_text())
        models[key] = {"heldout_loss": ev["heldout_loss"],
                       "accuracy": {name: t["accuracy"] for name, t in ev["tiers"].items()},
                       "tier_heldout_loss": {name: t["heldout_loss"] for name, t in ev["tiers"].items()},
                       "checkpoint": shown(ckpt)}
    training = {}
    for arm, run_dir in (("wsd", wsd), ("wsm", wsm)):
        final_eval = json.loads((run_dir / "final_eval.json").read_text())
        summary = json.loads((run_dir / "summary.json").read_text())
        _, evals = read_metrics(run_dir / "metrics.jsonl")
        training[arm] = {"train_steps_wall_s": summary["wall_time_s"],
                         "gemm_flops_per_s": run_gemm_rate(run_dir, model_flops_per_token),
                         "final_eval_heldout_loss": final_eval["heldout_loss"],
                         "final_eval_accuracy": {name: t["accuracy"] for name, t in final_eval["tiers"].items()},
                         "heldout_loss_by_step": {str(r["step"]): r["heldout_loss"] for r in evals}}
    return {"models": models, "merges": merges, "training": training,
            "same_losses_through_step": same_losses_through(wsd, wsm)}


def window_key(decay: str, n: int) -> str:
    return f"wsm_merged_{decay}_last{n}"


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "stdev": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def metrics(model: dict) -> dict[str, float]:
    """One model's numbers as flat metric -> value: held-out loss and accuracy per tier."""
    return {"heldout_loss": model["heldout_loss"], **{f"accuracy_{t}": a for t, a in model["accuracy"].items()}}


def summarise(per_seed: dict[int, dict]) -> tuple[dict, dict]:
    """(mean/stdev/values per model and metric, the same for each WSM model minus WSD final of the same seed)."""
    flat = {s: {key: metrics(m) for key, m in r["models"].items()} for s, r in per_seed.items()}
    keys = list(next(iter(flat.values())))
    names = list(next(iter(flat.values()))["wsd_final"])
    summary = {key: {n: spread([flat[s][key][n] for s in flat]) for n in names} for key in keys}
    paired = {key: {n: spread([flat[s][key][n] - flat[s]["wsd_final"][n] for s in flat]) for n in names}
              for key in keys if key != "wsd_final"}
    return summary, paired


def plot(per_seed: dict[int, dict], summary: dict, window_models: dict[str, dict[int, str]], path: Path,
         title: str) -> None:
    """Top: per-tier accuracy and held-out loss per model, each seed a point (a seed's points joined), the mean a
    bar. Bottom: the merges against their window in steps (`window_models`: decay -> steps -> model key), the
    mean a line, WSD final and WSM last dashed."""
    panels = [(f"accuracy_{t.name}", f"{t.name} exact match, %", 100.0) for t in (TIERS[i] for i in CORE_TIERS)]
    panels.append(("heldout_loss", "held-out loss (all tiers)", 1.0))
    colors = {"wsd_final": "tab:blue", "wsm_last": "tab:gray", "linear": "tab:orange", "cosine": "tab:red"}
    color = {key: colors.get(key) or colors[key.removeprefix("wsm_merged_")] for key in MODELS}
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7.6), layout="constrained")
    x = range(len(MODELS))
    seeds = sorted(per_seed)
    for ax, (name, label, scale) in zip(axes[0], panels):
        for i, key in enumerate(MODELS):
            ax.hlines(scale * summary[key][name]["mean"], i - 0.3, i + 0.3, color=color[key], lw=2.5)
        for j, seed in enumerate(seeds):
            ys = [scale * metrics(per_seed[seed]["models"][key])[name] for key in MODELS]
            xs = [i + 0.08 * (j - (len(seeds) - 1) / 2) for i in x]
            ax.plot(xs, ys, color="0.75", lw=0.8, zorder=1)
            ax.scatter(xs, ys, c=[color[k] for k in MODELS], s=22, zorder=2, marker="os^Dv"[j % 5],
                       label=f"train.seed {seed}")
        ax.set_xticks(list(x), list(MODELS.values()), fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    for ax, (name, label, scale) in zip(axes[1], panels):
        for key, style in (("wsd_final", "--"), ("wsm_last", ":")):
            ax.axhline(scale * summary[key][name]["mean"], color=colors[key], ls=style, lw=1.2, label=MODELS[key])
        for decay, by_steps in window_models.items():
            steps = sorted(by_steps)
            keys = [by_steps[w] for w in steps]
            ax.plot(steps, [scale * summary[k][name]["mean"] for k in keys], color=colors[decay], marker="o",
                    label=f"WSM merged {decay}, mean")
            for seed in seeds:
                ax.scatter(steps, [scale * metrics(per_seed[seed]["models"][k])[name] for k in keys],
                           color=colors[decay], s=8, alpha=0.4)
        ax.set_xticks(steps)
        ax.set(xlabel="merge window, steps", ylabel=label)
        ax.grid(alpha=0.3)
    axes[1][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_commit() -> dict:
    """HEAD, and whether the code that made the numbers (linglab/, this script) differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"),
            "code_dirty": bool(git("status", "--porcelain", "--", "linglab", "experiments/wsm/wsm_vs_wsd.py"))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed values, each arm (default 0 1 2)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON and PNG go")
    p.add_argument("--runs", type=Path, default=HERE / "runs", help="run directories, evaluations and logs")
    p.add_argument("--ckpt-every", type=int, help="WSM checkpoint interval in steps (default 20; 3 with --quick)")
    p.add_argument("--jobs", type=int, default=1, help="subprocesses side by side within a stage (default 1: "
                   "wall times measured alone)")
    p.add_argument("--windows", type=int, nargs="+", help="checkpoints merged in the extra, shorter windows "
                   "(each ending at the last step; default 2 4 7, 2 with --quick)")
    p.add_argument("--quick", action="store_true", help="a smoke test: 2 layers, seq 64, 30 steps, 4 problems per tier")
    args = p.parse_args()
    common = QUICK if args.quick else []
    ckpt_every = args.ckpt_every or (3 if args.quick else 20)
    cfg = load_config(PRESET, overrides=common)
    keep_last, kept_steps = window(cfg, ckpt_every)
    wsm_overrides = [f"--train.ckpt_every={ckpt_every}", f"--train.keep_last={keep_last}"]
    windows = args.windows or ([2] if args.quick else [2, 4, 7])
    if not all(2 <= n < keep_last for n in windows):
        raise SystemExit(f"--windows must lie in [2, {keep_last}): the full window of {keep_last} is always merged")
    window_models = {decay: {(n - 1) * ckpt_every: window_key(decay, n) for n in windows}
                     | {(keep_last - 1) * ckpt_every: f"wsm_merged_{decay}"} for decay in DECAYS}
    labels = {key: label.replace("\n", " ") for key, label in MODELS.items()}
    labels.update({window_key(decay, n): f"WSM merged {decay}, the last {n} checkpoints (steps "
                   f"{kept_steps[-n]}..{kept_steps[-1]})" for decay in DECAYS for n in windows})
    eval_args = ["--problems", str(cfg.train.eval_problems), "--data-seed", "0", "--seq-len", str(cfg.data.seq_len)]

    # The GEMM rate that puts the wall times in context, measured under this process's thread count.
    gemm_n = 512 if args.quick else 4096
    peak = matmul_peak_flops(n=gemm_n)
    print(f"fp32 GEMM rate {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} thread(s)); WSM window: steps "
          f"{kept_steps[0]}..{kept_steps[-1]}, {keep_last} checkpoints", flush=True)
    runner = Runner(args.runs, peak)
    start = time.perf_counter()
    per_seed = {s: run_seed(runner, args.runs, s, common, wsm_overrides, kept_steps, windows, eval_args, args.jobs,
                            flops_per_token(cfg.model, cfg.data.seq_len))
                for s in args.seeds}
    summary, paired = summarise(per_seed)

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "wsm_vs_wsd.png"
    plot(per_seed, summary, window_models, png, f"{PRESET}{' --quick' if args.quick else ''}, {cfg.train.max_steps} steps: WSD "
         f"(decay over the last {kept_steps[-1] - kept_steps[0]}) vs WSM merges of steps {kept_steps[0]}..{kept_steps[-1]}")
    result = {
        "experiment": "WSM vs WSD (SPEC §2, issue 12 item 6)", "preset": PRESET, "quick": args.quick,
        "seeds": args.seeds, "jobs": args.jobs, "git": git_commit(),
        "settings": {"max_steps": cfg.train.max_steps, "decay_frac": cfg.train.decay_frac, "lr": cfg.train.lr,
                     "warmup_steps": cfg.train.warmup_steps, "batch_size": cfg.train.batch_size,
                     "seq_len": cfg.data.seq_len, "data_seed": 0, "eval_problems_per_tier": cfg.train.eval_problems,
                     "wsm_ckpt_every": ckpt_every, "wsm_keep_last": keep_last, "merged_steps": kept_steps,
                     "decays": list(DECAYS), "window_checkpoints": windows},
        "models": labels,
        "summary": summary, "paired_minus_wsd_final": paired,
        "per_seed": {str(s): r for s, r in per_seed.items()},
        "fp32_gemm_flops": {"flops_per_s": peak, "n": gemm_n, "threads": torch.get_num_threads(),
                            "source": "linglab.flops.matmul_peak_flops",
                            "note": "this invocation's; each wall_times_s.steps entry has the rate of the invocation "
                                    "that ran it, per_seed.*.training.*.gemm_flops_per_s the rate each `linglab "
                                    "train` measured at its start"},
        "wall_times_s": {"this_invocation": time.perf_counter() - start, "steps": runner.timings},
        "commands": runner.commands,
        "driver": "python experiments/wsm/wsm_vs_wsd.py " + shlex.join(sys.argv[1:]),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    path = args.out / "wsm_vs_wsd.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path} and {png}")
    for key, label in labels.items():
        s = summary[key]
        accs = "  ".join(f"{t.name} {100 * s[f'accuracy_{t.name}']['mean']:5.1f}%" for t in (TIERS[i] for i in CORE_TIERS))
        print(f"loss {s['heldout_loss']['mean']:.4f}  {accs}  {label}")


if __name__ == "__main__":
    main()
