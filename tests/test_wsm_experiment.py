"""experiments/wsm/wsm_vs_wsd.py end to end on --quick (2 layers, seq 64, 30 steps, one seed): the result JSON's
structure, merged models that differ from the last checkpoint, `linglab eval --json` agreeing with the training
run's own final evaluation, a shorter merge window, and a rerun that skips every finished step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["wsd_final", "wsm_last", "wsm_merged_linear", "wsm_merged_cosine"]
METRICS = ["heldout_loss", "accuracy_easy", "accuracy_medium", "accuracy_hard"]


def _experiment(runs: Path, out: Path) -> str:
    cmd = [sys.executable, str(ROOT / "experiments" / "wsm" / "wsm_vs_wsd.py"), "--quick", "--seeds", "0",
           "--jobs", "2", "--runs", str(runs), "--out", str(out)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_quick_experiment_end_to_end(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "results"
    _experiment(runs, out)
    result = json.loads((out / "wsm_vs_wsd.json").read_text())
    assert (out / "wsm_vs_wsd.png").stat().st_size > 0

    assert result["quick"] and result["seeds"] == [0]
    assert result["settings"]["merged_steps"] == [21, 24, 27, 30] and result["settings"]["wsm_keep_last"] == 4
    assert list(result["models"]) == [*MODELS, "wsm_merged_linear_last2", "wsm_merged_cosine_last2"]
    assert result["fp32_gemm_flops"]["flops_per_s"] > 0 and len(result["git"]["commit"]) == 40
    assert "--train.schedule=wsm" in result["commands"]["seed0/wsm/train"]
    assert result["commands"]["seed0/wsm/merge-cosine"].startswith("python -m linglab.cli merge ")
    assert len(result["wall_times_s"]["steps"]) == 12  # 2 trainings, 4 merges, 6 evaluations
    assert all(t["gemm_flops_per_s"] > 0 for t in result["wall_times_s"]["steps"].values())
    for key in MODELS:
        assert set(result["summary"][key]) == set(METRICS)
        assert result["summary"][key]["heldout_loss"]["stdev"] is None  # one seed: no spread
    assert set(result["paired_minus_wsd_final"]) == set(result["models"]) - {"wsd_final"}

    seed = result["per_seed"]["0"]
    for key in MODELS:
        assert set(seed["models"][key]["accuracy"]) == {"easy", "medium", "hard"}
    # WSD decays from step 22 on: the arms log the same losses through step 22 (taken before that step's update).
    assert seed["same_losses_through_step"] == 22

    # The eval subprocess on the WSD run's final model reproduces the run's own final evaluation.
    wsd, trained = seed["models"]["wsd_final"], seed["training"]["wsd"]
    assert wsd["heldout_loss"] == pytest.approx(trained["final_eval_heldout_loss"], abs=1e-6)
    assert wsd["accuracy"] == trained["final_eval_accuracy"]
    assert trained["gemm_flops_per_s"] > 0  # the rate `linglab train` measured, read back from its MFU

    # The merges: the 4 kept checkpoints, equal weights for the linear decay, a different model from the last one.
    last = load_file(str(runs / "seed0-wsm" / "final" / "model.safetensors"))
    for decay in ("linear", "cosine"):
        merge = seed["merges"][f"wsm_merged_{decay}"]
        assert merge["checkpoints"] == ["step_000021", "step_000024", "step_000027", "step_000030"]
        assert seed["merges"][f"wsm_merged_{decay}_last2"]["checkpoints"] == ["step_000027", "step_000030"]
        assert sum(merge["weights"]) == pytest.approx(1.0) and merge["max_abs_diff_vs_last"] > 0
        merged = load_file(str(runs / "seed0-wsm" / f"merged-{decay}" / "model.safetensors"))
        assert not torch.equal(merged["lm_head.weight"], last["lm_head.weight"])
        assert seed["models"][f"wsm_merged_{decay}"]["heldout_loss"] != seed["models"]["wsm_last"]["heldout_loss"]
    assert seed["merges"]["wsm_merged_linear"]["weights"] == pytest.approx([0.25] * 4)
    assert seed["merges"]["wsm_merged_cosine"]["weights"] != pytest.approx([0.25] * 4)

    # Resumable: a rerun finds every step done and runs no subprocess.
    assert ": linglab " not in _experiment(runs, out)
    assert json.loads((out / "wsm_vs_wsd.json").read_text())["per_seed"] == result["per_seed"]
