"""Shared by the FP8 experiments: train one named variant (cached), read its metrics, probe its QKV outliers.

Each variant is a `linglab train` configuration (preset + overrides) trained with the library's Trainer
into experiments/fp8/runs/<name>/ (git-ignored); a finished run is reused, so the three experiment scripts
share their runs (the FP8 tilewise run serves all three). Every variant uses the same seed and data.

    from common import train_rows, train_variant
    rows, fp8_rows = train_rows("fp8", ["fp8.enabled=true"], args)                 # metrics only
    rows, fp8_rows, model, data = train_variant("fp8", ["fp8.enabled=true"], args)  # and the trained model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parents[1]))

from linglab.checkpoint import from_pretrained  # noqa: E402
from linglab.config import load_config  # noqa: E402
from linglab.data import build_data  # noqa: E402
from linglab.evals import evaluate_run  # noqa: E402
from linglab.model import build_model  # noqa: E402
from linglab.report import FP8_KINDS, fp8_matrices, read_fp8_samples, read_metrics  # noqa: E402
from linglab.run import RunDir, resolve_device  # noqa: E402
from linglab.train import apply_fp8, build_trainer  # noqa: E402

RUNS = ROOT / "runs"
RESULTS = ROOT / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", default="tiny", help="model/data preset (default: tiny; `small` needs ~10x the time)")
    p.add_argument("--steps", type=int, default=300, help="training steps per variant (default: 300)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--monitor-every", type=int, default=25, help="FP8 monitor sampling interval in steps")
    p.add_argument("--device", default="cpu", help="train.device for the runs: cpu, cuda or auto (default: cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run, e.g. --set model.vocab_size=512 (repeatable)")
    return p


def base_overrides(args) -> list[str]:
    return [f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}", "train.eval_every=0",
            f"train.ckpt_every={args.steps}", f"fp8.monitor_every={args.monitor_every}", "train.keep_last=1",
            f"train.device={args.device}", *args.set]


def ensure_trained(name: str, overrides: list[str], args) -> tuple[Path, object]:
    """(run dir, config) of variant `name`, training it first unless a finished run with these overrides exists.

    An override of train.eval_every > 0 (the base sets 0) adds held-out evaluations to metrics.jsonl, the last one
    after the final step."""
    every = [*base_overrides(args), *overrides]
    cfg = load_config(args.preset, overrides=[f"--{o}" for o in every])
    run_dir = RUNS / f"{args.preset}-{args.steps}-{name}"
    done = run_dir / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("overrides") == every:  # same run: reuse it
        return run_dir, cfg
    RunDir(run_dir).prepare(resume=False, overwrite=True)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg.data, run_dir, eval_problems=8)
    model = build_model(cfg.model, device=resolve_device(cfg.train.device), seed=cfg.train.seed)
    trainer = build_trainer(cfg, RunDir(run_dir), data, model, log=Console().print)
    print(f"[{name}] training {args.steps} steps ({args.preset} on {trainer.device}, "
          f"{' '.join(overrides) or 'fp32'})", flush=True)
    if cfg.train.eval_every:  # held-out loss every eval_every steps and at the end, as `linglab train` scores it
        trainer.fit(evaluate=lambda step: evaluate_run(trainer.full_model(), data, step))
        trainer.write_metrics(evaluate_run(trainer.full_model(), data, trainer.step))
    else:
        trainer.fit()
    done.write_text(json.dumps({"overrides": every, "seconds": trainer.counters["elapsed"],
                                "device": str(trainer.device)}) + "\n")
    return run_dir, cfg


def _rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    train, _ = read_metrics(run_dir / "metrics.jsonl")
    return train, read_fp8_samples(run_dir / "metrics.jsonl")


def train_rows(name: str, overrides: list[str], args) -> tuple[list[dict], list[dict]]:
    """(train rows, fp8 monitor rows) of variant `name`, trained if needed."""
    run_dir, _ = ensure_trained(name, overrides, args)
    return _rows(run_dir)


def train_seconds(name: str, args) -> float:
    """Wall time of a finished variant's training steps, as its done.json recorded it."""
    return json.loads((RUNS / f"{args.preset}-{args.steps}-{name}" / "done.json").read_text())["seconds"]


def train_variant(name: str, overrides: list[str], args):
    """(train rows, fp8 monitor rows, trained model on the CPU, run data) of variant `name`, trained if needed."""
    run_dir, cfg = ensure_trained(name, overrides, args)
    torch.manual_seed(cfg.train.seed)
    data = build_data(cfg.data, run_dir, eval_problems=8)  # reuses the run's tokenizer
    model = from_pretrained(RunDir(run_dir).checkpoints()[-1])
    apply_fp8(model, cfg.fp8)
    return (*_rows(run_dir), model, data)


def losses(rows: list[dict]) -> tuple[list[int], list[float]]:
    return [r["step"] for r in rows], [r["loss"] for r in rows]


def smooth(values: list[float], window: int = 20) -> list[float]:
    """Trailing mean: per-step losses are noisy at batch 32, the gap between runs is a fraction of a percent."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def qkv_stats(model, rows: torch.Tensor, loss_mask: torch.Tensor) -> dict[str, dict[str, list[float]]]:
    """max|x| and RMS(x) per decoder layer of the fused QKV projection's input, output and output gradient.

    One forward and backward of the token `rows` (the loss on `loss_mask`), with forward hooks on
    `attention.query_key_value` and a hook on its output's gradient: the tensors SPEC §3 says develop outliers
    that grow with depth without QK-norm. Returns {tensor: {"max": [per layer], "rms": [per layer]}}.
    """
    found = {k: {"max": {}, "rms": {}} for k in ("input", "output", "output_grad")}

    def record(kind: str, i: int, t: torch.Tensor) -> None:
        t = t.detach().float()
        found[kind]["max"][i], found[kind]["rms"][i] = float(t.abs().max()), float(t.pow(2).mean().sqrt())

    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(module, inputs, output, i=i):
            record("input", i, inputs[0])
            record("output", i, output)
            output.register_hook(lambda g, i=i: record("output_grad", i, g))
        handles.append(layer.attention.query_key_value.register_forward_hook(hook))
    model.train()
    model(rows[:, :-1], targets=rows[:, 1:], loss_mask=loss_mask[:, 1:].float()).loss.backward()
    model.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    return {kind: {stat: [v[i] for i in sorted(v)] for stat, v in stats.items()} for kind, stats in found.items()}


def outlier_ratio(stats: dict[str, list[float]]) -> list[float]:
    """max|x| / RMS(x) per layer of one `qkv_stats` entry: how far the largest element sits above the typical one."""
    return [m / max(r, 1e-30) for m, r in zip(stats["max"], stats["rms"])]


def qkv_outliers(model, data, batch: int = 16) -> dict[str, list[float]]:
    """max|x| / RMS(x) per decoder layer of the fused QKV projection's input, output and output gradient, on the
    first `batch` training rows (`qkv_stats`)."""
    stats = qkv_stats(model, data.train.tokens[:batch].long(), data.train.loss_mask[:batch])
    return {kind: outlier_ratio(v) for kind, v in stats.items()}


def monitor_means(sample: dict) -> dict[str, dict[str, float]]:
    """One FP8 monitor sample averaged over its modules: {"one_minus_cosine" | "underflow": {kind: mean}}."""
    _, under, dist = fp8_matrices(sample)
    return {"one_minus_cosine": {kind: float(np.nanmean(dist[:, j])) for j, kind in enumerate(FP8_KINDS)},
            "underflow": {kind: float(np.nanmean(under[:, j])) for j, kind in enumerate(FP8_KINDS)}}


def write_result(script: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{script}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
