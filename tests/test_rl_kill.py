"""kill -9 of either rank of a decoupled RL run (issue 15 item 6), launched as a user launches it:
`torchrun --nproc_per_node 2 -m linglab rl ... --rl.rollout_ranks=1` (1 trainer + 1 rollout rank, gloo, max_staleness 0).

The rank is killed once the run's first checkpoint is written; torchrun then ends the job (it tears the other rank
down), the newest checkpoint is intact (the resume loads it, not the one before), and `torchrun ... --resume`
ends with final weights bitwise those of an uninterrupted run. The uninterrupted run is one process, in the test
process: with one trainer rank and S = 0 the decoupled run computes exactly what one process computes.
About 35 s per killed rank on 2 shared cores (two torchrun launches).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dist_utils import requires_gloo
from test_rl_trainer import rl_config, start  # noqa: F401 - the module fixture: a tiny start checkpoint

import linglab.rl.report
from linglab.rl.trainer import run_rl
from linglab.run import RunDir

pytestmark = [requires_gloo, pytest.mark.usefixtures("one_thread")]
# Every option spelled out, so the launched runs and the one in the test process read the same (rl_config's defaults
# are for the tests' in-process runs).
OPTIONS = dict(steps=8, ckpt_every=2, group_size=4, prompts_per_step=2, max_new_tokens=16, eval_problems=0,
               length_alpha=0.5, kl_coef=0.1, lr=1e-4)
RANKS = {"rollout": 1, "trainer": 0}


@pytest.fixture(scope="module")
def uninterrupted(start, tmp_path_factory):  # noqa: F811
    """The final weights of the run without a kill, on one process."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    report = linglab.rl.report.write_rl_report
    linglab.rl.report.write_rl_report = lambda run_dir: run_dir / "report.md"  # its plots are not compared
    try:
        run_rl(rl_config(**OPTIONS), start, out)
    finally:
        linglab.rl.report.write_rl_report = report
    return (out / "final" / "model.safetensors").read_bytes()


def torchrun(*args: str) -> list[str]:
    """The command line of `torchrun --standalone --nproc_per_node 2 -m linglab rl ARGS` (torchrun is this module
    of the venv's Python; --standalone: a free port, as parallel test runs need)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "linglab",
            "rl", *args]


def rank_pid(torchrun_pid: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of `rank` (torchrun's child whose environment holds RANK=rank)."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.parametrize("killed", list(RANKS))
def test_kill_9_of_a_rank_ends_the_job_and_resume_is_bit_exact(start, uninterrupted, tmp_path, killed):  # noqa: F811
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    options = [f"--rl.{k}={v}" for k, v in OPTIONS.items()]
    log = tmp_path / "stderr.txt"  # a file, not a pipe nobody reads while the job runs
    with log.open("w") as stderr:
        proc = subprocess.Popen(torchrun("--ckpt", str(start), "--out", str(out), *options, "--rl.rollout_ranks=1"),
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)
    deadline = time.time() + 120
    while time.time() < deadline and not RunDir(out, "rl", "rl_state.pt").checkpoints() and proc.poll() is None:
        time.sleep(0.05)
    pid = rank_pid(proc.pid, RANKS[killed])
    assert pid is not None, f"no checkpoint within 120 s, or the run ended first:\n{log.read_text()}"
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=120)  # torchrun ends the job: the other rank does not hang
    err = log.read_text()
    assert proc.returncode != 0 and f"exitcode  : -9 (pid: {pid})" in err and not (out / "final").exists()
    newest = RunDir(out, "rl", "rl_state.pt").checkpoints()[-1]
    assert newest.name < "step_000008"

    subprocess.run(torchrun("--out", str(out), "--resume"), check=True, capture_output=True, env=env, timeout=180)
    resumed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"resume"' in line]
    assert resumed[-1]["from"] == str(newest)  # the newest checkpoint loaded: intact
    assert (out / "final" / "model.safetensors").read_bytes() == uninterrupted
