"""Training: schedule, bit-exact resume after SIGKILL, non-finite steps, and one-line errors (exit 2); a Ring-linear
hybrid (SPEC §8) through the same commands."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from linglab.cli import main
from linglab.config import TrainConfig, load_config
from linglab.data import build_data
from linglab.model import build_model
from linglab.moe import max_violation
from linglab.run import RunDir
from linglab.train import TrainingDiverged, build_trainer, lr_at

# A fast run: small batch, short sequences, a small corpus and few held-out problems.
FAST = ["--train.batch_size=8", "--data.seq_len=64", "--data.num_documents=1500", "--train.eval_problems=4",
        "--train.num_samples=2", "--train.eval_every=0", "--model.num_hidden_layers=2", "--train.warmup_steps=5"]
# FAST's 2 layers as a hybrid (SPEC §8): layer 0 linear (dense FFN), layer 1 and the MTP layer softmax (MoE).
HYBRID = ["--model.layer_group_size=2", "--model.group_norm_size=2"]


def _no_peak_measurement(repeats=2, device="cpu"):
    """The MFU denominator times a 4096^2 GEMM: seconds per run on 2 shared cores, and no test reads it."""
    return 1e11


def test_lr_schedules():
    wsd = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, schedule="wsd", decay_frac=0.2)
    assert lr_at(5, wsd) == 0.5 and lr_at(10, wsd) == 1.0 and lr_at(80, wsd) == 1.0
    assert lr_at(90, wsd) == pytest.approx(0.5) and lr_at(100, wsd) == 0.0
    wsm = TrainConfig(lr=1.0, warmup_steps=10, max_steps=100, schedule="wsm")
    assert lr_at(100, wsm) == 1.0 and lr_at(3, wsm) == pytest.approx(0.3)


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "linglab.cli", "train", "--out", str(out), "--train.max_steps=40",
            "--train.ckpt_every=10", *FAST, *extra]


def test_sigkill_then_resume_is_bit_exact(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    full = tmp_path / "full"
    subprocess.run(_train_cmd(full), check=True, capture_output=True, env=env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not any(d.name >= "step_000020" for d in RunDir(killed).checkpoints()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert RunDir(killed).checkpoints(), "the run was killed before its first checkpoint"
    assert not (killed / "final").exists(), "the run finished before it could be killed"
    subprocess.run(_train_cmd(killed, "--resume"), check=True, capture_output=True, env=env)

    a = (full / "final" / "model.safetensors").read_bytes()
    b = (killed / "final" / "model.safetensors").read_bytes()
    assert a == b
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 41)), "a resumed run rewrites the metrics past its checkpoint exactly once"
    for name in ("report.md", "final_eval.json", "samples.json", "plots/loss.png", "final/tokenizer.json"):
        assert (killed / name).is_file(), name


def _trainer(tmp_path, max_bad_steps=3):
    cfg = load_config("tiny", overrides=FAST + ["--train.max_steps=20", "--train.ckpt_every=2",
                                                f"--train.max_bad_steps={max_bad_steps}"])
    RunDir(tmp_path).prepare(resume=False, overwrite=True)
    data = build_data(cfg.data, tmp_path, cfg.train.eval_problems)
    trainer = build_trainer(cfg, RunDir(tmp_path), data, build_model(cfg.model, seed=0), log=lambda *a: None)
    trainer.cfg = cfg  # for the tests that build a second trainer of the same run
    return trainer


def test_mtp_router_bias_moves_toward_balance_and_its_maxvio_is_reported(tmp_path):
    """SPEC §1.4: every router with an expert bias is balanced, the MTP layer's included (SPEC §1.5)."""
    trainer = _trainer(tmp_path)
    mtp = trainer.model.model.mtp_layers[0].mlp
    assert trainer.model.moe_layers()[-1] is mtp
    for _ in range(3):
        before = mtp.gate.expert_bias.clone()
        row = trainer.train_step()
        load = mtp.tokens_per_expert.float()
        assert load.sum() > 0, "the MTP layer routed no tokens"
        delta = mtp.gate.expert_bias - before
        over, under = load > load.mean(), load < load.mean()
        assert (delta[over] < 0).all() and (delta[under] > 0).all(), "overloaded experts must lose bias, idle ones gain"
        assert row["maxvio_mtp"] == pytest.approx(max_violation(load))
        assert row["maxvio_per_layer"][-1] == row["maxvio_mtp"]
        assert len(row["maxvio_per_layer"]) == len(trainer.model.moe_layers())
        assert row["maxvio"] == max(row["maxvio_per_layer"])


def test_non_finite_steps_are_skipped_and_too_many_stop_with_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    real_forward = trainer.model.forward

    def forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        return _poisoned(out) if trainer.step + 1 in {3, 6, 7, 8} else out

    monkeypatch.setattr(trainer.model, "forward", forward)
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row at step 8.*step_000006"):
        trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["skipped"]] == [3, 6, 7, 8]
    assert trainer.counters["skipped"] == 4
    assert RunDir(tmp_path).checkpoints()[-1].name == "step_000006"  # no checkpoint of the diverged state


def test_skipped_step_does_not_change_weights(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_bad_steps=5)
    trainer.train_step()
    real_forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward",
                        lambda *a, **k: _poisoned(real_forward(*a, **k)))
    snapshot = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    row = trainer.train_step()
    assert row["skipped"] and trainer.counters["bad_in_a_row"] == 1
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_a_checkpoint_with_positional_optimizer_state_still_resumes(tmp_path, monkeypatch):
    """Checkpoints written before torchrun training keyed AdamW's state by position; it now loads by parameter name."""
    monkeypatch.setattr("linglab.train.matmul_peak_flops", _no_peak_measurement)
    trainer = _trainer(tmp_path)
    trainer.train_step()
    path = trainer.save()
    state = torch.load(path / "train_state.pt", weights_only=False)
    assert all(isinstance(key, str) for key in state["optimizer"]["state"])
    state["optimizer"] = trainer.optimizer.state_dict()  # the old format: keys 0, 1, ...
    torch.save(state, path / "train_state.pt")
    resumed = build_trainer(trainer.cfg, RunDir(tmp_path), trainer.data, build_model(trainer.cfg.model, seed=1),
                            log=lambda *a: None)
    assert resumed.resume() == path and resumed.step == 1
    for (i, expected), (j, loaded) in zip(trainer.optimizer.state_dict()["state"].items(),
                                          resumed.optimizer.state_dict()["state"].items()):
        assert i == j and all(torch.equal(loaded[k], v) for k, v in expected.items()), i


def _poisoned(out):
    out.loss = out.loss * float("inf")
    return out


@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--train.max_steps=4", "--train.ckpt_every=2", *FAST]) == 0
    return out


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_existing_run_is_never_overwritten_without_flag(finished_run, capsys):
    before = (finished_run / "final" / "model.safetensors").read_bytes()
    assert main(["train", "--out", str(finished_run), *FAST]) == 2
    assert "already holds a run" in _error(capsys)
    assert (finished_run / "final" / "model.safetensors").read_bytes() == before


def test_resume_with_another_shape_is_refused_and_rewrites_nothing(finished_run, capsys):
    before = {name: (finished_run / name).read_bytes() for name in ("config.toml", "params.json", "metrics.jsonl")}
    assert main(["train", "--out", str(finished_run), "--resume", *FAST, "--model.hidden_size=64"]) == 2
    assert "cannot change model.hidden_size (128 -> 64)" in _error(capsys)
    assert {name: (finished_run / name).read_bytes() for name in before} == before


def test_a_corrupted_latest_checkpoint_falls_back_to_the_one_before(finished_run, capsys):
    ckpts = RunDir(finished_run).checkpoints()
    last = ckpts[-1] / "model.safetensors"
    last.write_bytes(last.read_bytes()[:100])
    capsys.readouterr()
    assert main(["train", "--out", str(finished_run), "--resume"]) == 0  # the run's own config.toml: 4 steps
    out = "".join(capsys.readouterr().out.split())  # rich wraps long paths
    assert "warning" in out and f"resumedfrom{ckpts[-2]}" in out
    for ckpt in RunDir(finished_run).checkpoints():  # every checkpoint corrupted: nothing to fall back to
        (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    assert main(["train", "--out", str(finished_run), "--resume"]) == 2
    assert "no checkpoint of" in _error(capsys)


@pytest.mark.parametrize("setup, args, message", [
    (None, ["--data.path={tmp}/missing.jsonl"], "missing.jsonl"),
    ("empty.txt", ["--data.path={tmp}/empty.txt"], "empty.txt"),
    ("bad.json", ["--data.tokenizer={tmp}/bad.json"], "bad.json"),
    (None, ["--train.bogus=1"], "unknown key 'train.bogus'"),
    (None, ["--train.schedule=cosine"], "train.schedule must be 'wsd' or 'wsm'"),
    (None, ["--train.precision=fp16"], "train.precision must be 'fp32' or 'bf16'"),
    (None, ["--train.recompute=moe"], "train.recompute must be 'none', 'mtp', 'experts' or 'full'"),
])
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, setup, args, message):
    if setup == "empty.txt":
        (tmp_path / "empty.txt").write_text("")
    if setup == "bad.json":
        (tmp_path / "bad.json").write_text("{not a tokenizer")
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["train", "--out", str(tmp_path / "run"), *FAST, *args]) == 2
    assert message in _error(capsys)


@pytest.fixture(scope="module")
def hybrid_run(tmp_path_factory):
    """A hybrid trained by the CLI with MTP, expert-bias balancing and FP8 GEMMs (monitored at steps 2 and 4)."""
    out = tmp_path_factory.mktemp("hybrid") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("linglab.train.matmul_peak_flops", _no_peak_measurement)
        assert main(["train", "--out", str(out), *HYBRID_ARGS]) == 0
    return out


HYBRID_ARGS = ["--train.max_steps=4", "--train.ckpt_every=2", "--fp8.enabled=true", "--fp8.monitor_every=2", *FAST,
               *HYBRID, "--data.seq_len=32", "--train.eval_problems=1", "--train.num_samples=1"]  # FP8 generation is slow


def test_a_hybrid_trains_with_mtp_balancing_and_fp8_and_resumes_bit_exact(hybrid_run, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (hybrid_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["mtp_loss"] > 0 and r["maxvio_mtp"] is not None for r in train)
    fp8_ops = [r["ops"] for r in rows if r["kind"] == "fp8"]
    linear = {f"model.layers.0.attention.{name}" for name in ("query_key_value", "g_proj", "dense")}
    assert len(fp8_ops) == 2 and all(linear <= ops.keys() for ops in fp8_ops), "the linear layer's GEMMs run in FP8"
    weights = load_file(str(hybrid_run / "final" / "model.safetensors"))
    for layer in (1, 2):  # the MoE layer and the MTP layer (HF index num_hidden_layers): both balanced
        assert weights[f"model.layers.{layer}.mlp.gate.expert_bias"].abs().sum() > 0, layer
    assert "linear attention at 0, softmax at 1" in (hybrid_run / "report.md").read_text()

    resumed = tmp_path / "resumed"  # as if killed after the step-2 checkpoint
    shutil.copytree(hybrid_run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_000004")
    monkeypatch.setattr("linglab.train.matmul_peak_flops", _no_peak_measurement)
    assert main(["train", "--out", str(resumed), "--resume"]) == 0
    for name in ("final/model.safetensors", "checkpoints/step_000004/model.safetensors"):
        assert (resumed / name).read_bytes() == (hybrid_run / name).read_bytes(), name
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("run", ["finished_run", "hybrid_run"])
def test_merge_generate_and_eval_commands_on_a_run(run, request, tmp_path, capsys):
    from safetensors.torch import load_file

    finished_run = request.getfixturevalue(run)
    merged = tmp_path / "merged"
    assert main(["merge", str(finished_run), "--out", str(merged)]) == 0  # a run dir: its kept checkpoints
    ckpts = RunDir(finished_run).checkpoints()
    tensors = [load_file(str(c / "model.safetensors")) for c in ckpts]
    out = load_file(str(merged / "model.safetensors"))
    name = "lm_head.weight"
    assert torch.allclose(out[name], sum(t[name] for t in tensors) / len(tensors), atol=1e-6)  # linear = mean
    assert (merged / "tokenizer.json").is_file()

    capsys.readouterr()
    assert main(["generate", "--ckpt", str(finished_run / "final"), "--prompt", "12+34=?", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("12+34=?\n")
    assert main(["eval", "--ckpt", str(merged), "--problems", "3", "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "easy" in out and "hard" in out
    assert main(["merge", str(ckpts[-1]), "--out", str(tmp_path / "m2")]) == 2
