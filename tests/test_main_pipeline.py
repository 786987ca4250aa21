"""`linglab pipeline` (make run): pretrain -> RL -> one report.md, resumable stage by stage, never clobbering."""

import json
import os

import pytest
from test_train import FAST

from linglab.cli import main
from linglab.pipeline import write_pipeline_report

pytestmark = pytest.mark.usefixtures("one_thread")

RL_FAST = ["--rl.steps=2", "--rl.group_size=2", "--rl.prompts_per_step=2", "--rl.max_new_tokens=8",
           "--rl.eval_problems=2", "--rl.eval_samples=2", "--rl.eval_ks=1,2", "--rl.ckpt_every=1"]
ARGS = ["--train.max_steps=4", "--train.ckpt_every=2", *FAST, *RL_FAST]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    assert main(["pipeline", "--out", str(out), *ARGS]) == 0
    return out


def test_pipeline_writes_both_stages_and_one_report(finished):
    assert (finished / "pretrain" / "final" / "model.safetensors").is_file()
    assert (finished / "rl" / "final" / "model.safetensors").is_file()
    rl_summary = json.loads((finished / "rl" / "summary.json").read_text())
    assert rl_summary["start_checkpoint"] == str(finished / "pretrain" / "final")
    summary = json.loads((finished / "summary.json").read_text())
    assert set(summary["stages"]) == {"pretrain", "rl"}
    rl_stages = sum(s["wall_time_s"] for name, s in summary["stages"].items() if name != "pretrain")
    assert summary["rl_wall_time_s"] == pytest.approx(rl_stages, rel=0.05)  # one RL run: the phase is that run
    assert summary["total_wall_time_s"] == pytest.approx(summary["stages"]["pretrain"]["wall_time_s"] +
                                                         summary["rl_wall_time_s"])

    report = (finished / "report.md").read_text()
    rl_eval = json.loads((finished / "rl" / "rl_eval.json").read_text())
    for tier in ("easy", "medium", "hard"):
        before = rl_eval["before"]["tiers"][tier]["greedy_accuracy"]
        after = rl_eval["after"]["tiers"][tier]["greedy_accuracy"]
        assert f"| {tier} | greedy_accuracy | {before:.1%} | {after:.1%} | {100 * (after - before):+.1f} |" in report
        assert f"| {tier} | ApexEval (pass@2) |" in report
    for plot in ("pretrain/plots/loss.png", "rl/plots/reward.png"):
        assert f"]({plot})" in report and (finished / plot).is_file()


def test_existing_pipeline_is_refused_then_resume_keeps_finished_stages(finished):
    before = (finished / "rl" / "final" / "model.safetensors").read_bytes()
    assert main(["pipeline", "--out", str(finished), *ARGS]) == 2  # no --overwrite: untouched
    assert main(["pipeline", "--out", str(finished), "--resume", *ARGS]) == 0  # both stages done: nothing reruns
    assert (finished / "rl" / "final" / "model.safetensors").read_bytes() == before


def test_resume_finishes_an_interrupted_rl_stage(finished, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(finished, out)
    # As if killed during RL after its first checkpoint: no final/, no summary, the step-2 checkpoint gone.
    for name in ("summary.json", "rl_eval.json", "report.md"):
        (out / "rl" / name).unlink()
    shutil.rmtree(out / "rl" / "final")
    shutil.rmtree(out / "rl" / "checkpoints" / "step_000002")
    pretrain_weights = (out / "pretrain" / "final" / "model.safetensors").read_bytes()
    assert main(["pipeline", "--out", str(out), "--resume", *ARGS]) == 0
    assert (out / "pretrain" / "final" / "model.safetensors").read_bytes() == pretrain_weights
    assert (out / "rl" / "final" / "model.safetensors").read_bytes() == \
        (finished / "rl" / "final" / "model.safetensors").read_bytes()
    assert json.loads((out / "summary.json").read_text())["stages"]["rl"]["resumed"] is True


def test_resume_without_a_pipeline_is_a_one_line_error(tmp_path, capsys):
    assert main(["pipeline", "--out", str(tmp_path / "none"), "--resume", *ARGS]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_report_of_a_partial_pipeline_says_what_is_missing(finished, tmp_path):
    out = tmp_path / "partial"
    (out / "pretrain").mkdir(parents=True)
    report = write_pipeline_report(out).read_text()
    assert "No before/after evaluation" in report


def test_several_rl_seeds_report_the_gain_with_its_spread(tmp_path):
    """On a hybrid preset (SPEC §8), which every stage trains and the resume keeps: FAST's 2 layers, 0 linear."""
    out = tmp_path / "run"
    assert main(["pipeline", "--preset", "tiny-linear", "--out", str(out), "--rl-seeds", "2", *ARGS]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rl_runs"] == ["rl-seed0", "rl-seed1"] and not (out / "rl").exists()
    assert [summary["stages"][name]["rl_seed"] for name in summary["rl_runs"]] == [0, 1]
    if (os.cpu_count() or 1) > 1:  # the two runs train side by side, each in its own process, logging to a file
        assert all(summary["stages"][name]["parallel_runs"] == 2 for name in summary["rl_runs"])
        assert all("RL: grpo" in (out / f"{name}.log").read_text() for name in summary["rl_runs"])
        assert "| RL phase |" in (out / "report.md").read_text()
    evals = [json.loads((out / name / "rl_eval.json").read_text()) for name in summary["rl_runs"]]
    changes = [100 * (e["after"]["tiers"]["hard"]["pass@1"] - e["before"]["tiers"]["hard"]["pass@1"]) for e in evals]
    report = (out / "report.md").read_text()
    assert "2 RL seeds" in report and "Model: BailingMoeLinearV2" in report and "linear attention at 0, softmax at 1" in report
    for name in ("pretrain", *summary["rl_runs"]):
        assert json.loads((out / name / "final" / "config.json").read_text())["model_type"] == "bailing_moe_linear"
    row = next(line for line in report.splitlines() if line.startswith("| hard | pass@1 |"))
    assert row.endswith(f" {changes[0]:+.1f}, {changes[1]:+.1f} |")
    before = (out / "rl-seed1" / "final" / "model.safetensors").read_bytes()
    assert main(["pipeline", "--out", str(out), "--resume", *ARGS]) == 0  # resumes with the run's own 2 seeds
    assert json.loads((out / "summary.json").read_text())["rl_runs"] == ["rl-seed0", "rl-seed1"]
    assert (out / "rl-seed1" / "final" / "model.safetensors").read_bytes() == before and not (out / "rl").exists()
    assert main(["pipeline", "--out", str(tmp_path / "bad"), "--rl-seeds", "0", *ARGS]) == 2
