"""Nothing lost (issue 13): the commands a user might mistype never destroy a run, a checkpoint or an input; a
failed start leaves --out as it found it; --resume trusts the run's own config; a second writer is refused.

Each test types the command a user would (`linglab.cli.main`), and checks the one-line error, exit code 2 and
that every file it could have touched is byte-for-byte what it was.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_main_pipeline import RL_FAST as RL_FAST_ARGS
from test_train import FAST

from linglab.cli import main
from linglab.run import RunDir
from linglab.train import TrainingDiverged

pytestmark = pytest.mark.usefixtures("one_thread")


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (lock files beside it aside), with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at 2 and 4, final/), made once and copied by each test that changes it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", "--out", str(out), "--train.max_steps=4", "--train.ckpt_every=2", *FAST]) == 0
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


# ---------------------------------------------------------------- 1. a rejected command never deletes its input


def test_sft_and_rl_refuse_an_out_that_is_or_contains_their_checkpoint(run, capsys):
    before = snapshot(run)
    final = run / "final"
    assert main(["sft", "--ckpt", str(final), "--out", str(final), "--overwrite", "--rl.sft_steps=1"]) == 2
    assert "overlaps the input" in one_line_error(capsys)
    assert main(["rl", "--ckpt", str(final), "--out", str(run), "--overwrite", *RL_FAST_ARGS]) == 2
    assert "overlaps the input" in one_line_error(capsys)
    assert snapshot(run) == before


# ---------------------------------------------------------------- 2. every writer refuses an existing output


def test_merge_refuses_to_replace_a_run_file_or_its_own_input(run, tmp_path, capsys):
    before = snapshot(run)
    assert main(["merge", str(run), "--out", str(run / "final")]) == 2
    assert "--overwrite" in one_line_error(capsys)
    a, b = RunDir(run).checkpoints()
    assert main(["merge", str(a), str(b), "--out", str(a), "--overwrite"]) == 2
    assert "overlaps the input" in one_line_error(capsys)
    assert snapshot(run) == before
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0


def test_export_refuses_its_own_input_and_suggest_an_existing_file(run, tmp_path, capsys):
    before = snapshot(run)
    assert main(["export", "--ckpt", str(run / "final"), "--out", str(run / "final"), "--overwrite", "--fp8"]) == 2
    assert "overlaps the input" in one_line_error(capsys)
    assert snapshot(run) == before
    toml = tmp_path / "mine.toml"
    toml.write_text("# my notes\n")
    assert main(["scaling", "suggest", "--compute", "1e14", "--out", str(toml)]) == 2
    assert "--overwrite" in one_line_error(capsys) and toml.read_text() == "# my notes\n"
    assert main(["scaling", "suggest", "--compute", "1e14", "--out", str(toml), "--overwrite"]) == 0


def test_eval_json_refuses_the_checkpoint_dir_and_an_existing_file(run, tmp_path, capsys):
    before = snapshot(run)
    assert main(["eval", "--ckpt", str(run / "final"), "--json", str(run / "final" / "config.json")]) == 2
    assert "inside the checkpoint" in one_line_error(capsys)
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    assert main(["eval", "--ckpt", str(run / "final"), "--json", str(mine), "--problems", "1", "--seq-len", "64"]) == 2
    assert "--overwrite" in one_line_error(capsys) and mine.read_text() == "{}"
    assert snapshot(run) == before


def test_train_overwrite_refuses_a_run_that_holds_its_own_data(run, capsys):
    data = run / "mine.txt"
    data.write_text("12+34=46\n" * 2000)
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--overwrite", f"--data.path={data}", *FAST]) == 2
    assert "overlaps the input" in one_line_error(capsys)
    assert snapshot(run) == before


# ---------------------------------------------------------------- 3, 4. --resume trusts the run, changes nothing it refuses


def test_a_refused_resume_leaves_the_run_resumable(run, tmp_path, capsys):
    other = tmp_path / "other.json"
    shutil.copy(run / "tokenizer.json", other)
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--resume", f"--data.tokenizer={other}"]) == 2
    assert "cannot change data.tokenizer" in one_line_error(capsys)
    assert main(["train", "--out", str(run), "--resume", "--preset", "small"]) == 2
    assert "drop --preset" in one_line_error(capsys)
    assert snapshot(run) == before
    assert main(["train", "--out", str(run), "--resume", "--train.max_steps=6"]) == 2  # WSD: the decay would move
    assert "WSD run" in one_line_error(capsys)
    assert main(["train", "--out", str(run), "--resume"]) == 0


def test_resume_uses_the_runs_own_config_and_records_harmless_changes(run, capsys):
    stored = (run / "config.toml").read_text()
    assert "max_steps = 4" in stored and "batch_size = 8" in stored  # a small run, not the defaults (600, 32)
    (run / "final").rename(run / "final.bak")
    shutil.rmtree(RunDir(run).checkpoints()[-1])  # the run was killed after step 2
    assert main(["train", "--out", str(run), "--resume", "--train.log_every=1"]) == 0
    config = (run / "config.toml").read_text()
    assert config == stored.replace("log_every = 10", "log_every = 1")
    rows = [r for r in RunDir(run).read_metrics() if r["kind"] == "resume"]
    assert rows[-1]["step"] == 2 and rows[-1]["changes"] == {"train.log_every": [10, 1]}
    assert [r["step"] for r in RunDir(run).read_metrics() if r["kind"] == "train"] == [1, 2, 3, 4]


# ---------------------------------------------------------------- 5. non-finite weights are never checkpointed


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    from test_train import _trainer

    trainer = _trainer(tmp_path)
    trainer.train_step()
    trainer.save()
    trainer.train_step()
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("nan")  # what one step at an infinite LR leaves behind
    with pytest.raises(TrainingDiverged, match="lm_head.weight is not finite after step 2.*step_000001"):
        trainer.save()
    assert [c.name for c in RunDir(tmp_path).checkpoints()] == ["step_000001"]


# ---------------------------------------------------------------- 7. one writer at a time


def test_a_second_writer_is_refused_and_a_killed_ones_lock_is_not_stale(run, capsys):
    holder = RunDir(run)
    holder.lock()
    try:
        before = snapshot(run)
        assert main(["train", "--out", str(run), "--resume"]) == 2
        assert "is in use by linglab train" in one_line_error(capsys)
        assert main(["train", "--out", str(run), "--overwrite", *FAST]) == 2
        one_line_error(capsys)
        assert snapshot(run) == before
    finally:
        holder.unlock()
    code = f"from linglab.run import RunDir; RunDir({str(run)!r}).lock(); print('locked', flush=True); import time; time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert main(["train", "--out", str(run), "--resume"]) == 0  # the kernel dropped the dead writer's lock


# ---------------------------------------------------------------- 8. a failed start leaves --out as it found it


@pytest.mark.parametrize("bad", [["--data.path={tmp}/missing.jsonl"], ["--train.batch_size=4096"]])
def test_a_failed_start_leaves_out_as_it_was(run, tmp_path, capsys, bad):
    bad = [a.format(tmp=tmp_path) for a in bad]
    fresh = tmp_path / "fresh"
    assert main(["train", "--out", str(fresh), *FAST, *bad]) == 2
    one_line_error(capsys)
    assert not fresh.exists()
    before = snapshot(run)
    assert main(["train", "--out", str(run), "--overwrite", *FAST, *bad]) == 2
    one_line_error(capsys)
    assert snapshot(run) == before


def test_rl_with_a_corrupt_checkpoint_leaves_out_untouched(run, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(run / "final", bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    out = tmp_path / "rl"
    assert main(["rl", "--ckpt", str(bad), "--out", str(out), *RL_FAST_ARGS]) == 2
    one_line_error(capsys)
    assert not out.exists()


def test_random_bytes_in_train_state_fall_back_then_fail_in_one_line(run, capsys):
    newest, older = RunDir(run).checkpoints()[::-1]
    (newest / "train_state.pt").write_bytes(os.urandom(4096))
    (run / "final").rename(run / "final.bak")
    assert main(["train", "--out", str(run), "--resume"]) == 0  # from step 2, with a warning
    for ckpt in RunDir(run).checkpoints():
        (ckpt / "train_state.pt").write_bytes(os.urandom(4096))
    assert main(["train", "--out", str(run), "--resume"]) == 2
    assert "unreadable train_state.pt" in one_line_error(capsys)


# ---------------------------------------------------------------- 9, 10. odd --out, leftovers of kill -9


def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    assert main(["train", "--out", str(afile), *FAST]) == 2
    assert "is a file" in one_line_error(capsys) and afile.read_text() == "mine"
    assert main(["train", "--out", "/proc/linglab-run", *FAST]) == 2
    assert "cannot write --out" in one_line_error(capsys)


def test_leftovers_of_a_killed_writer_are_tidied_and_half_deleted_checkpoints_do_not_count(run):
    ckpts = RunDir(run).checkpoints()
    tmp = run / "checkpoints" / ".step_000006.tmp-abc"  # an atomic write killed before its rename
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    (ckpts[0] / "model.safetensors").unlink()  # a checkpoint deleted half-way by hand or by an old linglab
    assert RunDir(run).checkpoints() == ckpts[1:]
    rd = RunDir(run)
    rd.lock()
    rd.unlock()
    assert not tmp.exists()

    aside = run.with_name(f".{run.name}.old-123")  # an --overwrite killed before its start committed
    shutil.move(run, aside)
    run.mkdir()
    (run / "half-made").write_text("new run, never committed")
    before = snapshot(aside)
    rd.lock()
    rd.unlock()
    assert not aside.exists() and snapshot(run) == before  # the old run is back, as a failed start leaves it


def test_a_resumed_run_killed_again_still_ends_bit_exact(tmp_path):
    """The tidy-up and the lock change nothing of exact resume: kill -9 mid-run, resume, same final weights."""
    args = [sys.executable, "-m", "linglab.cli", "train", "--train.max_steps=12", "--train.ckpt_every=3", *FAST]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*args, "--out", str(tmp_path / "full")], check=True, capture_output=True, env=env)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not any(c.name >= "step_000006" for c in RunDir(killed).checkpoints()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([*args[:4], "--out", str(killed), "--resume"], check=True, capture_output=True, env=env)
    assert (tmp_path / "full" / "final" / "model.safetensors").read_bytes() == \
        (killed / "final" / "model.safetensors").read_bytes()
