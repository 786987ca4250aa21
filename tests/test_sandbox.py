"""The code verifier's sandbox (SPEC §9, issue 15 item 4): answers that loop, fork, allocate 10 GB, write or delete
outside their directory, open sockets or raise their limits score 0 and harm nothing; parallel scoring and the
background reward pool give the same scores as one worker."""

import os

import pytest

from linglab.sandbox import SandboxLimits, run_sandboxed
from linglab.verify import RewardPool, code_answer, verify, verify_batch, verify_code

QUICK = SandboxLimits(timeout_s=2.0, cpu_s=2)


def test_a_correct_answer_passes_and_a_wrong_one_fails():
    assert run_sandboxed("def f(x):\n    return 2 * x\nassert f(2) == 4\nprint('ok')\n", QUICK).status == "passed"
    result = run_sandboxed("def f(x):\n    return x\nassert f(2) == 4\n", QUICK)
    assert result.status == "failed" and "AssertionError" in result.output
    # The answer may use its own directory.
    assert run_sandboxed("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n",
                         QUICK).passed


@pytest.mark.parametrize("name, source, status", [
    ("loops", "while True:\n    pass\n", "timeout"),
    ("sleeps", "import time\ntime.sleep(60)\n", "timeout"),
    ("forks", "import os\nwhile True:\n    os.fork()\n", "denied"),
    ("forks through posix", "import posix\nposix.fork()\n", "denied"),
    ("spawns", "import subprocess\nsubprocess.run(['sleep', '60'])\n", "denied"),
    ("allocates 10 GB", "x = bytearray(10 * 2**30)\n", "memory"),
    ("opens a socket", "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n", "denied"),
    ("raises its limits", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n", "denied"),
    ("kills its parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "denied"),
])
def test_harmful_answers_score_zero(name, source, status):
    result = run_sandboxed(source, QUICK)
    assert result.status == status, (name, result.output)
    assert not verify_code(f"```python\n{source}```", "assert True", QUICK)


def test_writes_and_deletes_outside_the_directory_are_refused(tmp_path):
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    escape = tmp_path / "escape.txt"
    for source in (f"open({str(escape)!r}, 'w').write('x')\n",
                   f"import os\nos.open({str(escape)!r}, os.O_WRONLY | os.O_CREAT)\n",
                   f"import os\nos.symlink({str(victim)!r}, 'link')\nopen('link', 'w').write('gone')\n",
                   f"import os\nos.chdir({str(tmp_path)!r})\nopen('escape.txt', 'w')\n",
                   f"import os\nos.remove({str(victim)!r})\n",
                   f"import os\nos.rename({str(victim)!r}, 'mine.txt')\n",
                   f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n"):
        assert run_sandboxed(source, QUICK).status == "denied", source
    assert victim.read_text() == "keep" and not escape.exists()


def test_the_sandbox_leaves_nothing_behind(tmp_path):
    before = {p for p in os.listdir(tmp_path.parent) if p.startswith("linglab-sandbox-")}
    result = run_sandboxed("import os\nprint(os.getcwd())\n", QUICK)
    workdir = result.output.strip()
    assert result.passed and os.path.basename(workdir).startswith("linglab-sandbox-")
    assert not os.path.exists(workdir)
    assert {p for p in os.listdir(tmp_path.parent) if p.startswith("linglab-sandbox-")} == before


def test_code_answer_is_the_last_fenced_block():
    assert code_answer("text\n```python\nx = 1\n```\nmore\n```py\ny = 2\n```\n") == "y = 2\n"
    assert code_answer("```\nz = 3\n```") == "z = 3\n"
    assert code_answer("def f(): pass") == "def f(): pass"


def test_verify_code_and_its_reference():
    answer = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert verify(answer, "assert add(2, 3) == 5", kind="code")
    assert not verify(answer, "assert add(2, 3) == 6", kind="code")
    with pytest.raises(ValueError, match="no tests"):
        verify(answer, "  ", kind="code")


def test_parallel_scoring_equals_one_worker_and_contains_a_stuck_item():
    completions = [f"answer: {i}" for i in range(40)]
    references = [str(i if i % 3 else i + 1) for i in range(40)]
    one = verify_batch(completions, references)
    assert verify_batch(completions, references, workers=3) == one
    answers = ["```python\ndef f(x):\n    return x + 1\n```", "```python\nwhile True:\n    pass\n```",
               "```python\ndef f(x):\n    return x\n```", "```python\ndef f(x):\n    return x + 1\n```"]
    scores, counts = verify_batch(answers, ["assert f(1) == 2"] * 4, kind="code", workers=2, timeout_s=1.0)
    assert scores == [True, False, False, True]
    assert counts == {"verifier_errors": 0, "verifier_timeouts": 1}
    with pytest.raises(ValueError, match="workers"):
        verify_batch(completions, references, workers=0)


def test_reward_pool_scores_in_the_background():
    completions = [f"answer: {i}" for i in range(10)]
    references = [str(i % 4) for i in range(10)]
    with RewardPool("numeric", workers=2) as pool:
        futures = [pool.submit(completions, references), pool.submit(completions[:3], references[:3])]
        results = [f.result(timeout=60) for f in futures]
    assert results == [verify_batch(completions, references), verify_batch(completions[:3], references[:3])]


def test_rl_rewards_score_code_answers_with_parallel_workers():
    import torch

    from linglab.config import RLConfig
    from linglab.rl.trainer import rollout_rewards

    cfg = RLConfig(group_size=2, prompts_per_step=1, reward_workers=2)
    right, wrong = "```python\ndef f(x):\n    return x * x\n```", "```python\ndef f(x):\n    return x\n```"
    reward, correct, problems = rollout_rewards(cfg, [right, wrong], ["assert f(3) == 9"] * 2, torch.tensor([9, 9]),
                                                kind="code")
    assert correct.tolist() == [True, False] and reward.tolist() == [1.0, 0.0]
    assert problems == {"verifier_errors": 0, "verifier_timeouts": 0}
