"""experiments/fp8/depth.py at toy size: the grid trains, probes, writes its result, and a rerun reuses the runs."""

import sys
from pathlib import Path

import pytest

import linglab.data
from linglab.corpora import Corpus

# experiments/fp8/ and benchmarks/ each have a common.py, and a pytest worker may have imported the other one:
# these scripts import their own, and leave the name free for the next.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "fp8"))
sys.modules.pop("common", None)
import common  # noqa: E402
import depth  # noqa: E402

sys.modules.pop("common", None)

TOY = ["--layers", "2", "--hidden", "32", "--steps", "4", "--probes", "2", "--batch-size", "2", "--seq-len", "16",
       "--seeds", "2", "--noqk-seeds", "1", "--monitor-every", "2", "--set", "data.heldout_tokens=64", "--set", "train.warmup_steps=1"]


@pytest.fixture
def out_dirs(tmp_path, monkeypatch):
    """Runs and results under tmp_path, and a few of linglab's own sources standing in for the stdlib corpus."""
    sources = sorted((Path(__file__).resolve().parents[1] / "linglab").glob("*.py"))
    texts = [p.read_text() for p in sources[:12]]
    monkeypatch.setattr(linglab.data, "load_corpus", lambda name: Corpus(texts[2:], texts[:2], {"name": name}))
    monkeypatch.setattr("linglab.train.matmul_peak_flops", lambda repeats=2, device="cpu": 1e11)  # MFU: not measured
    for module in (common, depth):
        monkeypatch.setattr(module, "RUNS", tmp_path / "runs")
        monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    return tmp_path


def test_depth_grid_at_toy_size(out_dirs, capsys, monkeypatch):
    assert depth.main([*TOY, "--dry-run"]) is None
    assert "6 runs of 4 steps" in capsys.readouterr().out
    assert not (out_dirs / "runs").exists()

    result = depth.main(TOY)
    assert (out_dirs / "results" / "depth.json").is_file() and (out_dirs / "results" / "depth.png").is_file()
    assert len(result["runs"]) == 6 and result["corpus"] == {"name": "stdlib"}
    assert [g["seed"] for g in result["fp8_vs_fp32"]["per_seed"]] == [0, 1]
    assert len(result["seed_noise_heldout"]["fp32"]) == 1 and not result["seed_noise_heldout"]["fp8-noqk"]
    assert result["fp8_vs_fp32"]["stdev_heldout"] is not None and result["fp8_vs_fp32_noqk"]["stdev_heldout"] is None
    run = result["runs"]["depth2x32-fp8-noqk-s0"]
    assert [p["step"] for p in run["probes"]] == [2, 4]
    assert all(len(p[kind]["max"]) == 2 and min(p[kind]["rms"]) > 0 for p in run["probes"] for kind in depth.TENSORS)
    assert run["monitor"]["steps"] and run["monitor"]["last_by_op"]
    assert not result["runs"]["depth2x32-fp32-s0"]["monitor"]

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(common, "build_trainer", no_training)
    monkeypatch.setattr(depth, "plot", lambda *args: None)  # drawn above; seconds per figure
    capsys.readouterr()
    assert depth.main(TOY)["runs"]["depth2x32-fp8-s1"]["heldout_loss"] == result["runs"]["depth2x32-fp8-s1"]["heldout_loss"]
    assert capsys.readouterr().out.count("done, reused") == 6
