"""The scaling sweep (SPEC §4): the plan spends each budget, a micro sweep runs and resumes, the fit recovers a known
law, suggested configs validate, and bad input exits 2 with one line."""

import contextlib
import io
import json

import numpy as np
import pytest

from linglab.cli import main
from linglab.config import load_config
from linglab.scaling import ladder, sweep
from linglab.scaling.fit import LossCurve

# Two budgets of one small MoE, and an MoE / dense pair: a handful of steps on 32-token sequences each.
MICRO_GRID = """
axes = ["shape", "activation"]
budgets = [1.5e8, 3e8]
ladder = [32, 64]
sizes_per_budget = 1
axis_budgets = [2e8]
num_experts = [8]
lr = 3e-3
batch_tokens = 128
min_steps = 2
seq_len = 32
num_documents = 300
eval_problems = 4
"""


@pytest.fixture(autouse=True)
def _no_matmul_probe(monkeypatch):
    # The trainer measures a 4096^2 matmul for its MFU column: seconds per run that these tests do not need.
    monkeypatch.setattr("linglab.train.matmul_peak_flops", lambda repeats=2, device="cpu": 1e11)


def test_default_grid_spans_the_budgets_and_each_run_spends_its_budget(tmp_path, capsys):
    grid = ladder.load_grid()
    assert len(grid.budgets) >= 5 and max(grid.budgets) / min(grid.budgets) >= 30
    runs, notes = ladder.plan_runs(grid)
    assert len({r.name for r in runs}) == len(runs) and not notes
    for run in runs:
        # C = M * D up to the rounding of D to whole optimizer steps.
        assert abs(run.compute / run.budget - 1) <= 0.5 / run.steps + 1e-9, run.name
        assert run.config().model.num_nextn_predict_layers == 0
    assert {r.axis for r in runs} == {"shape", "activation"}
    assert any(r.shape["first_k_dense_replace"] == r.shape["num_hidden_layers"] for r in runs)  # the dense baseline

    assert main(["scaling", "sweep", "--out", str(tmp_path / "s"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(r.name in out for r in runs) and f"{len(runs)} runs" in out and "estimated" in out
    assert not (tmp_path / "s").exists()


def test_micro_sweep_runs_writes_results_and_resumes(tmp_path, capsys, monkeypatch):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(MICRO_GRID)
    out = tmp_path / "sweep"
    argv = ["scaling", "sweep", "--out", str(out), "--grid", str(grid_file)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    planned, _ = ladder.plan_runs(ladder.load_grid(grid_file))
    assert [r["name"] for r in rows] == [r.name for r in planned] and len(rows) == 4
    for row in rows:
        assert np.isfinite(row["heldout_loss"]) and np.isfinite(row["train_loss"]) and row["wall_time_s"] > 0
        assert abs(row["compute"] / row["budget"] - 1) <= 0.5 / row["steps"] + 1e-9
        assert row["M"] * row["D"] == pytest.approx(row["compute"])
        assert not (out / "runs" / row["name"] / "checkpoints").exists()
    assert {r["kind"] for r in rows} == {"moe", "dense"}
    assert "ETA" in capsys.readouterr().out

    # Finished runs are skipped; a run whose line is missing or torn (killed while writing it) is trained again.
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    trained = []
    real = sweep.train_run
    monkeypatch.setattr(sweep, "train_run", lambda run, *a, **k: trained.append(run.name) or real(run, *a, **k))
    assert main(argv) == 2  # an existing sweep is neither continued nor replaced unasked
    assert main([*argv, "--resume"]) == 0
    assert trained == [rows[-1]["name"]]
    assert main([*argv, "--resume"]) == 0
    assert trained == [rows[-1]["name"]] and "0 to train" in capsys.readouterr().out
    assert [r["name"] for r in sweep.read_results(out / "results.jsonl")] == [r["name"] for r in rows]
    assert len(json.loads((out / "sweep.json").read_text())["commands"]) == 2


# ---------------------------------------------------------------- fit on synthetic results from known laws

TRUE = LossCurve(E=0.05, A=40.0, alpha=0.15)  # the frontier L(C)
DENSE = LossCurve(E=0.05, A=80.0, alpha=0.15)  # dense: every loss needs 2^(1/0.15) ~ 100x more compute... per unit A
LR_OPT = (0.5, -0.1)  # eta_opt = 0.5 C^-0.1


def _row(name, axis, budget, loss, n, kind="moe", experts=16, lr=1e-2, lr_multiplier=1.0):
    m = 6.4 * n
    return {"name": name, "axis": axis, "budget": budget, "compute": budget, "kind": kind,
            "model": {"hidden_size": int(n ** 0.33), "num_hidden_layers": 2, "num_experts": experts, "num_experts_per_tok": 4},
            "activation_ratio": 1.0 if kind == "dense" else 5 / (experts + 1), "granularity": 4.0, "N": n, "N_total": 2 * n,
            "M": m, "D": budget / m, "steps": 100, "lr": lr, "lr_multiplier": lr_multiplier, "batch_size": 8,
            "batch_tokens": 1024, "batch_multiplier": 1.0, "seq_len": 128, "train_loss": loss * 1.01,
            "heldout_loss": loss, "wall_time_s": 1.0}


def _synthetic_rows(seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.geomspace(1e11, 1e14, 7):
        best = float(TRUE.predict(c)) * (1 + 0.002 * rng.standard_normal())
        lr_opt = LR_OPT[0] * c ** LR_OPT[1]
        for i, (n, worse) in enumerate(((1e5, 1.08), (3e5, 1.0), (1e6, 1.05))):
            n = n * (c / 1e11) ** 0.5
            rows.append(_row(f"shape-C{c:.2g}-{i}", "shape", c, best * worse, n, lr=lr_opt))
            if worse == 1.0:  # the best shape also at half and double the optimal LR: a bowl around eta_opt
                rows += [_row(f"shape-C{c:.2g}-{i}-lrx{k}", "shape", c, best * (1.02 + 0.01 * k), n, lr=lr_opt * k, lr_multiplier=k)
                         for k in (0.5, 2.0)]
    for c in (1e12, 3e12, 1e13):
        rows.append(_row(f"activation-C{c:.2g}-dense", "activation", c, float(DENSE.predict(c)), 3e5, kind="dense"))
        for experts, el in ((8, 1.5), (32, 3.0)):  # the MoE reaches at C the dense loss at el * C
            rows.append(_row(f"activation-C{c:.2g}-E{experts}", "activation", c, float(DENSE.predict(el * c)), 3e5,
                             experts=experts))
    return rows


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """`linglab scaling fit` on synthetic results, once for the tests that read its files (the fits take seconds)."""
    out = tmp_path_factory.mktemp("fit")
    with open(out / "results.jsonl", "w") as f:
        for row in _synthetic_rows():
            f.write(json.dumps(row) + "\n")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["scaling", "fit", "--dir", str(out), "--bootstrap", "20"]) == 0
    return out, printed.getvalue()


def test_fit_recovers_known_laws_and_writes_its_files(fitted):
    out, printed = fitted
    assert "held-out budget" in printed and "note: optimal batch_tokens" in printed
    fit = json.loads((out / "fit.json").read_text())
    law = fit["laws"]["loss_vs_compute"]
    predicted = LossCurve(**law).predict(np.geomspace(1e11, 1e14, 7))
    assert np.allclose(predicted, TRUE.predict(np.geomspace(1e11, 1e14, 7)), rtol=0.01)
    assert law["alpha"] == pytest.approx(TRUE.alpha, rel=0.25)
    assert fit["holdout"]["abs_error"] < 0.01 * fit["holdout"]["actual"]
    assert fit["laws"]["lr"]["exponent"] == pytest.approx(LR_OPT[1], abs=1e-6)
    assert fit["laws"]["m_opt"]["exponent"] == pytest.approx(0.5, abs=1e-6)
    assert fit["chinchilla"]["points"] == 21 and fit["chinchilla"]["intervals"] is not None
    for r in fit["leverage"]:
        assert r["EL"] == pytest.approx(1.5 if r["name"].endswith("E8") else 3.0, rel=1e-3)
        assert np.isfinite(r["EL_published"])
    md = (out / "scaling.md").read_text()
    assert "absolute error" in md and "linglab scaling fit --dir" in md and "| activation-C1e+12-E8 |" in md
    for name in ("loss_vs_compute.png", "leverage.png", "chinchilla.png"):
        assert (out / "plots" / name).stat().st_size > 1000 and f"plots/{name}" in md


# ---------------------------------------------------------------- suggest


@pytest.mark.parametrize("compute", ["1e14", "3e17", "1e21"])
def test_suggest_from_the_published_laws_writes_a_valid_config(compute, tmp_path, capsys):
    path = tmp_path / "suggested.toml"
    assert main(["scaling", "suggest", "--compute", compute, "--out", str(path)]) == 0
    assert "published laws" in capsys.readouterr().out
    cfg = load_config("tiny", path=path)
    c = float(compute)
    m = ladder.shape_flops({k: getattr(cfg.model, k) for k in ladder.SHAPE_KEYS}, cfg.data.seq_len)
    tokens = cfg.train.max_steps * cfg.train.batch_size * cfg.data.seq_len
    assert abs(m * tokens / c - 1) <= 0.5 / cfg.train.max_steps + 1e-9
    assert cfg.model.num_nextn_predict_layers == 0


def test_suggest_from_a_fit_uses_its_laws(fitted, tmp_path, capsys):
    path = tmp_path / "suggested.toml"
    assert main(["scaling", "suggest", "--compute", "1e15", "--fit", str(fitted[0] / "fit.json"), "--out", str(path)]) == 0
    text = capsys.readouterr().out
    assert "fitted M_opt" in text and "fitted eta_opt" in text and "the sweep's batch_tokens rule" in text
    cfg = load_config("tiny", path=path)
    assert cfg.train.lr == pytest.approx(LR_OPT[0] * 1e15 ** LR_OPT[1])
    assert cfg.train.batch_size == 1024 // cfg.data.seq_len


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, message", [
    (["scaling", "fit", "--dir", "/nonexistent/sweep"], "results file not found"),
    (["scaling", "fit", "--dir", "{empty}"], "holds no finished runs"),
    (["scaling", "sweep", "--out", "{tmp}", "--axis", "depth", "--dry-run"], "unknown axis 'depth'"),
    (["scaling", "sweep", "--out", "{tmp}", "--budgets", "1e12", "0", "--dry-run"], "positive number of FLOPs"),
    (["scaling", "suggest", "--compute=-1e12"], "positive number of FLOPs"),
    (["scaling", "suggest", "--compute", "lots"], "positive number of FLOPs"),
    (["scaling", "suggest", "--compute", "1e14", "--fit", "/nonexistent/fit.json"], "fit file not found"),
])
def test_bad_input_exits_2_with_one_line(argv, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "results.jsonl").write_text("")
    argv = [a.format(tmp=tmp_path, empty=tmp_path / "empty") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
