"""The run report: robust metrics reading, one valid PNG per available plot, numbers taken from the files."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from linglab.errors import LinglabError
from linglab.report import plot_run, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STEPS = 300
SKIPPED_STEP = 150
LOAD_EVERY = 50
LAYERS, EXPERTS = 3, 8
TIERS = {"easy": (0.4, 0.93, 200, "one operation"), "medium": (0.1, 0.71, 150, "two operations"),
         "hard": (0.0, 0.2, 100, "three operations")}
SAMPLES = [{"prompt": f"{i}+{i}=", "completion": str(2 * i + (i % 3 == 0)), "answer": str(2 * i),
            "correct": i % 3 != 0, "tier": "easy"} for i in range(10)]
SAMPLES[1]["completion"] = "```not a fence```"  # must not close the sample's fenced block
CONFIG = '[model]\nhidden_size = 128\nnum_experts = 8\n\n[train]\nlr = 0.003\n'


def loss_at(step: int) -> float:
    return 1.0 + 6.0 * math.exp(-step / 60)


def train_row(step: int) -> dict:
    skipped = step == SKIPPED_STEP  # a non-finite loss: the trainer logged NaN and skipped the update
    loss = math.nan if skipped else loss_at(step)
    vio = 1.5 / math.sqrt(step)
    row = {"kind": "train", "step": step, "tokens": 4096 * step, "time": 0.5 * step, "loss": loss,
           "main_loss": loss - 0.1, "mtp_loss": loss + 0.2, "z_loss": None,
           "lr": 3e-3 * min(1.0, step / 30) * (1 - 0.9 * step / STEPS),
           "grad_norm": math.nan if skipped else 2.0 / math.sqrt(step),
           "tokens_per_s": 8000.0 + step, "mfu": 0.30 + step / 10_000,
           "maxvio": vio, "maxvio_per_layer": [vio * (0.5 + 0.25 * i) for i in range(LAYERS)], "skipped": skipped}
    if step % LOAD_EVERY == 0:
        # Layer i, expert e gets a share that tilts towards expert 0 by an amount shrinking over time.
        tilt = 0.5 / step ** 0.5
        row["expert_load"] = [[(1 + tilt * (i + 1) * (e == 0) - tilt * (i + 1) / (EXPERTS - 1) * (e != 0)) / EXPERTS
                               for e in range(EXPERTS)] for i in range(LAYERS)]
    return row


def eval_row(step: int) -> dict:
    frac = step / STEPS
    return {"kind": "eval", "step": step, "heldout_loss": loss_at(step) + 0.05,
            "accuracy": {t: lo + (hi - lo) * frac for t, (lo, hi, _, _) in TIERS.items()}}


def write_run(run_dir, optional: bool = True) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(train_row(s)) for s in range(1, STEPS + 1)]
    lines += [json.dumps(eval_row(s)) for s in (100, 200, 300)]
    lines.append('{"kind": "train", "step": 301, "loss": 0.9')  # the crash cut this line short
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))
    if not optional:
        return
    (run_dir / "config.toml").write_text(CONFIG)
    (run_dir / "final_eval.json").write_text(json.dumps({"step": STEPS, "heldout_loss": 1.25, "tiers": {
        t: {"accuracy": hi, "n": n, "description": d} for t, (_, hi, n, d) in TIERS.items()}}))
    (run_dir / "samples.json").write_text(json.dumps(SAMPLES))
    (run_dir / "params.json").write_text(json.dumps(
        {"total": 1_740_000, "active": 520_000, "active_non_embedding": 310_000, "mtp": 120_000}))
    (run_dir / "summary.json").write_text(json.dumps(
        {"steps": STEPS, "tokens": 4096 * STEPS, "wall_time_s": 3723.0, "skipped_steps": 1,
         "final_checkpoint": "runs/x/checkpoints/step_300", "command": "linglab train --preset tiny"}))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    write_run(run_dir)
    return run_dir, write_report(run_dir, title="synthetic run").read_text(encoding="utf-8")


def test_read_metrics_skips_bad_lines_and_keeps_the_latest_replayed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([
        json.dumps({"kind": "train", "step": 1, "loss": 5.0}),
        '{"kind": "train", "step": 2, "lo',  # cut by a crash, then the resumed run appended after it
        "",
        json.dumps({"kind": "train", "step": 2, "loss": math.nan, "skipped": True}),
        json.dumps({"kind": "eval", "step": 2, "heldout_loss": 4.0, "accuracy": {}}),
        json.dumps({"kind": "train", "step": 2, "loss": 4.5}),  # the replayed step wins
        json.dumps({"kind": "other", "step": 3}),
        "[1, 2]",
    ]))
    train, evals = read_metrics(path)
    assert [(r["step"], r["loss"]) for r in train] == [(1, 5.0), (2, 4.5)]
    assert [r["heldout_loss"] for r in evals] == [4.0]


def test_plots_are_valid_pngs(full_run):
    run_dir, _ = full_run
    paths = plot_run(run_dir)
    assert [p.name for p in paths] == ["loss.png", "lr.png", "grad_norm.png", "maxvio.png", "expert_load.png",
                                       "accuracy.png"]
    for p in paths:
        assert p.parent == run_dir / "plots"
        assert p.read_bytes()[:8] == PNG_MAGIC


def test_report_numbers_come_from_the_files(full_run):
    run_dir, report = full_run
    assert report.startswith("# synthetic run\n")
    assert "Not found" not in report
    # Loss caption: first and last non-skipped loss; final loss = mean of the last 10 steps.
    assert f"fell from {loss_at(1):.4g} at step 1 to {loss_at(STEPS):.4g} at step {STEPS}" in report
    final = sum(loss_at(s) for s in range(STEPS - 9, STEPS + 1)) / 10
    assert f"| final loss | {final:.4g} (mean of the last 10" in report
    assert f"held-out loss was {loss_at(300) + 0.05:.4g} at step 300" in report
    # Summary table from summary.json / params.json, medians from metrics.
    assert "| steps | 300 |" in report
    assert f"| tokens | {4096 * STEPS:,} (1.23M) |" in report
    assert "| wall time | 1h 02m 03s (3,723.0 s) |" in report
    median_tps = 8000 + (STEPS + 1) / 2
    assert f"| tokens/s (median) | {median_tps:,.0f} |" in report
    assert f"| MFU (median) | {0.30 + (STEPS + 1) / 2 / 10_000:.1%} |" in report
    assert "| skipped steps | 1 |" in report
    assert "1.74M total / 520.00K active / 310.00K active non-embedding / 120.00K MTP layer" in report
    # Held-out table from final_eval.json.
    assert "Final evaluation at step 300, held-out loss 1.25." in report
    for tier, (_, hi, n, desc) in TIERS.items():
        assert f"| {tier} | {desc} | {hi:.1%} | {n} |" in report
    # Every plot embedded with a relative link; accuracy and expert-load captions carry their numbers.
    for name in ("loss", "lr", "grad_norm", "maxvio", "expert_load", "accuracy"):
        assert f"![{name}](plots/{name}.png)" in report
    first, last = eval_row(100)["accuracy"], eval_row(300)["accuracy"]
    assert "Held-out accuracy from step 100 to step 300: " + ", ".join(
        f"{t} {first[t]:.1%} → {last[t]:.1%}" for t in TIERS) + "." in report
    tilt = 0.5 / STEPS ** 0.5
    busiest = 100 * (1 + 3 * tilt) / EXPERTS  # layer 2 is the most tilted, towards expert 0
    assert f"At step {STEPS} the busiest expert (MoE layer 2, expert 0) took {busiest:.3g}%" in report
    assert "over 6 snapshots" in report


def test_report_samples_and_config(full_run):
    _, report = full_run
    assert "8 of 10 samples shown; 5 of them correct." in report
    assert report.count("**") // 2 == 8
    assert "**1. ✗ easy**, expected answer `0`" in report
    assert "**2. ✓ easy**" in report
    assert "````text\nprompt: 1+1=\ncompletion: ```not a fence```\n````" in report
    assert "<details><summary>Resolved config (config.toml)</summary>" in report
    assert "```toml\n" + CONFIG + "```\n\n</details>" in report


def test_missing_optional_files_and_data(tmp_path):
    write_run(tmp_path, optional=False)
    report = write_report(tmp_path).read_text(encoding="utf-8")
    assert report.startswith("# linglab training run\n")
    assert "left out: config.toml, summary.json, params.json, final_eval.json, samples.json." in report
    assert "| steps | 300 |" in report  # from the last metrics row instead of summary.json
    assert "## Samples" not in report and "<details>" not in report and "## Held-out" not in report

    # Metrics without eval rows or expert-load snapshots: those two plots are skipped.
    rows = [train_row(s) for s in range(1, 40)]
    for r in rows:
        r.pop("expert_load", None)
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    shutil.rmtree(tmp_path / "plots")
    assert [p.name for p in plot_run(tmp_path)] == ["loss.png", "lr.png", "grad_norm.png", "maxvio.png"]

    with pytest.raises(LinglabError, match="metrics.jsonl"):
        write_report(tmp_path / "nowhere")


def _outline(report: str) -> list[str]:
    """Section headings, embedded plots and the summary rows' labels: what a reader scans a report by."""
    return [line if not line.startswith("| ") else line.split(" | ")[0] for line in report.splitlines()
            if line.startswith(("#", "![", "| "))]


def test_a_hybrid_report_has_the_softmax_sections_and_names_its_layer_layout(full_run, tmp_path):
    _, softmax = full_run
    write_run(tmp_path)  # the same files, from a Ring-linear hybrid (SPEC §8) without MTP: MoE at 1-3
    (tmp_path / "config.toml").write_text(CONFIG.replace(
        "[train]", "num_nextn_predict_layers = 0\nlayer_group_size = 2\ngroup_norm_size = 2\n\n[train]"))
    hybrid = write_report(tmp_path, title="synthetic run").read_text(encoding="utf-8")
    assert _outline(hybrid) == _outline(softmax)
    assert "| architecture | BailingMoeV2: 4 layers; softmax attention at 0-3; dense FFN at 0, MoE at 1-3" in softmax
    assert ("| architecture | BailingMoeLinearV2 (Ring-linear hybrid, one softmax layer per group of 2): 4 layers; "
            "linear attention at 0, 2, softmax at 1, 3; dense FFN at 0, MoE at 1-3 (8 experts") in hybrid
    # MoE entry i is layer 1 + i: the most imbalanced and most tilted entry, 2, is softmax layer 3.
    assert "the worst was softmax layer 3" in hybrid and "the busiest expert (softmax layer 3, expert 0)" in hybrid
