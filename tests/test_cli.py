"""The CLI: exact parameter counts of the released shapes, init -> load, and exit code 2 on bad input."""

import subprocess
import sys

import pytest
import torch

from linglab.cli import main
from linglab.config import load_config
from linglab.model import build_model, count_parameters


@pytest.mark.parametrize("preset, total, active, active_non_emb", [
    ("ling-mini-2.0", "16.26B", "1.43B", "0.79B"),
    ("ling-flash-2.0", "102.89B", "6.15B", None),
    ("ling-1t", "999.71B", "51.05B", None),
])
def test_params_reproduce_published_totals(preset, total, active, active_non_emb, capsys):
    assert main(["params", "--preset", preset]) == 0
    out = capsys.readouterr().out
    assert total in out and active in out
    if active_non_emb:
        assert active_non_emb in out


def test_param_counts_exact():
    c = count_parameters(build_model(load_config("ling-mini-2.0").model, device="meta"))
    assert round(c.total / 1e9, 2) == 16.26 and round(c.active / 1e9, 2) == 1.43
    assert round(c.active_non_embedding / 1e9, 3) == 0.789
    c = count_parameters(build_model(load_config("ling-flash-2.0").model, device="meta"))
    assert round(c.total / 1e9, 2) == 102.89 and round(c.active / 1e9, 2) == 6.15
    c = count_parameters(build_model(load_config("ling-1t").model, device="meta"))
    assert round(c.total / 1e9, 1) == 999.7 and round(c.active / 1e9, 2) == 51.05


def test_init_writes_a_loadable_checkpoint(tmp_path, capsys):
    import linglab

    out = tmp_path / "ckpt"
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "7", "--model.num_hidden_layers=2"]) == 0
    model = linglab.from_pretrained(out)
    assert model.cfg.num_hidden_layers == 2
    logits = model(torch.randint(0, 512, (1, 5)))
    assert logits.shape == (1, 5, 512)
    # Same seed, same weights; an existing directory is not overwritten without --overwrite.
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "7", "--model.num_hidden_layers=2"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["init", "--preset", "tiny", "--out", str(out), "--seed", "7", "--model.num_hidden_layers=2",
                 "--overwrite"]) == 0
    again = linglab.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.parametrize("argv, message", [
    (["params", "--model.hiden_size=3"], "unknown key"),
    (["params", "--model.n_group=3"], "divisible by n_group"),
    (["params", "--config", "/nonexistent.toml"], "file not found"),
    (["init", "--preset", "ling-mini-2.0", "--out", "/tmp/linglab-never"], "too large"),
])
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_console_script_runs_and_exits_2_on_bad_key():
    ok = subprocess.run([sys.executable, "-m", "linglab.cli", "params", "--preset", "ling-mini-2.0"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "16.26B" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "linglab.cli", "params", "--model.nope=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: config: unknown key 'model.nope'")


def test_python_dash_m_linglab_is_the_cli():
    """`torchrun ... -m linglab train` runs `python -m linglab`."""
    ok = subprocess.run([sys.executable, "-m", "linglab", "params", "--preset", "ling-mini-2.0"], capture_output=True, text=True)
    assert ok.returncode == 0 and "16.26B" in ok.stdout


def test_plan_prints_uniform_and_planned_partitions(capsys):
    assert main(["plan", "--preset", "ling-mini-2.0", "--stages", "4"]) == 0
    out = capsys.readouterr().out
    assert "uniform" in out and "planned" in out and "predicted speedup" in out
    assert main(["plan", "--stages", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_rl_refuses_a_missing_checkpoint_in_one_line(tmp_path, capsys):
    assert main(["rl", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "out").exists()
