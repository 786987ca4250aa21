"""The README's commands, typed as a new user would (litgpt's tests/test_readme.py): each is read from README.md,
so a command the README shows is a command that runs."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# Keeps a few-step train fast; appended to the README's own command, so what is tested is that command.
FAST_TRAIN = ["--train.max_steps=6", "--train.ckpt_every=3", "--train.warmup_steps=2", "--train.batch_size=8",
              "--data.seq_len=64", "--data.num_documents=600", "--train.eval_problems=4", "--train.num_samples=2",
              "--train.eval_every=0", "--model.num_hidden_layers=2"]


def readme_command(prefix: str) -> list[str]:
    """The README line that starts with `prefix`, as argv without the leading `linglab` and its comment."""
    for line in README.read_text().splitlines():
        if line.startswith(prefix):
            return shlex.split(line.split("  #")[0])[1:]
    raise AssertionError(f"README.md has no command starting with {prefix!r}")


def linglab(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linglab.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_params_prints_the_published_counts(tmp_path):
    args = readme_command("linglab params")
    out = linglab(args, tmp_path)
    assert out.returncode == 0, out.stderr
    comment = next(line for line in README.read_text().splitlines() if line.startswith("linglab params")).split("#")[1]
    for figure in re.findall(r"\d+\.\d+B", comment):  # what the README promises, e.g. 16.26B total
        assert figure in out.stdout, f"README says {figure}; linglab printed:\n{out.stdout}"


def test_init_then_check(tmp_path):
    args = readme_command("linglab init")
    out = linglab(args, tmp_path)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / args[args.index("--out") + 1] / "model.safetensors").is_file()
    again = linglab(args, tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr  # an existing checkpoint is not replaced
    check = linglab([*readme_command("linglab check"), "--batch-size", "2", "--seq-len", "16"], tmp_path)
    assert check.returncode == 0, check.stderr
    assert "forward+backward" in check.stdout and "loss" in check.stdout


@pytest.mark.parametrize("prefix", ["linglab train --preset tiny --out runs/pt"])
def test_train_a_few_steps_then_resume_and_merge(tmp_path, prefix):
    train = readme_command(prefix)
    out = linglab([*train, *FAST_TRAIN], tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / train[train.index("--out") + 1]
    for name in ("config.toml", "metrics.jsonl", "final/model.safetensors", "final/tokenizer.json", "report.md"):
        assert (run / name).is_file(), name
    assert linglab([*train, *FAST_TRAIN], tmp_path).returncode == 2  # refuses to touch an existing run
    resume = linglab([*readme_command("linglab train --out runs/pt --resume"), *FAST_TRAIN], tmp_path)
    assert resume.returncode == 0, resume.stderr
    merge = linglab(readme_command("linglab merge runs/pt"), tmp_path)
    assert merge.returncode == 0, merge.stderr
    assert (run / "merged" / "model.safetensors").is_file()


def test_the_ling_recipe_config_trains_with_wsm_z_loss_pow2_fp8_and_merges(tmp_path):
    """configs/ling-recipe.toml turns on what Ling uses (SPEC §1.4, §2, §3) over a preset; its kept checkpoints merge."""
    recipe = README.parent / "configs" / "ling-recipe.toml"
    out = linglab(["train", "--preset", "tiny", "--config", str(recipe), "--out", "run", *FAST_TRAIN,
                   "--train.ckpt_every=2", "--fp8.monitor_every=2"], tmp_path)
    assert out.returncode == 0, out.stderr
    config = (tmp_path / "run" / "config.toml").read_text()
    for line in ('schedule = "wsm"', "router_z_loss_coef = 3.5e-06", "pow2_scales = true", "keep_last = 10"):
        assert line in config, line
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert all(r["z_loss"] > 0 for r in train) and len({r["lr"] for r in train if r["step"] > 2}) == 1  # constant LR
    assert any(r["kind"] == "fp8" for r in rows)
    merge = linglab(["merge", "run", "--out", "merged", "--decay", "cosine"], tmp_path)
    assert merge.returncode == 0, merge.stderr
    assert "merge of 3 checkpoints" in merge.stdout  # steps 2, 4, 6: all kept


def test_your_own_data_commands(tmp_path):
    """The README's own-data section: SFT, RL (then --resume) and eval on hand-written GSM8K and MATH rows."""
    from conftest import tiny_config

    from linglab.checkpoint import save_pretrained
    from linglab.model import build_model
    from linglab.tasks import iter_corpus_texts
    from linglab.tokenizer import Tokenizer

    tok = Tokenizer.train(iter_corpus_texts(300, seed=0), vocab_size=300)
    start = tmp_path / "runs" / "tiny" / "pretrain" / "final"
    save_pretrained(build_model(tiny_config(num_hidden_layers=2, vocab_size=tok.vocab_size).model, seed=0), start)
    tok.save(start)
    gsm8k = [{"question": f"Ann has {i} apples and buys {i + 2} more. How many apples now?",
              "answer": f"{i} + {i + 2} = {2 * i + 2}.\n#### {2 * i + 2}"} for i in range(40)]
    math = [{"problem": f"Simplify $\\frac{{2}}{{4}} + {i}$.", "solution": f"It is $\\boxed{{{i}+\\frac{{1}}{{2}}}}$."}
            for i in range(40)]
    for name, rows in (("gsm8k.jsonl", gsm8k), ("math.jsonl", math)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    small = ["--rl.eval_problems=2", "--rl.eval_samples=2", "--rl.eval_ks=1,2", "--rl.max_new_tokens=8"]
    steps = [
        [*readme_command("linglab sft --ckpt runs/tiny/pretrain/final --out runs/sft"), "--rl.sft_steps=2",
         "--rl.sft_batch_size=2", "--rl.sft_seq_len=64", *small],
        [*readme_command("linglab rl --ckpt runs/sft"), "--rl.steps=1", "--rl.group_size=2", "--rl.prompts_per_step=1",
         *small],
        [*readme_command("linglab rl --out runs/rl --resume"), "--rl.steps=2"],  # a resumed run may only grow rl.steps
        [*readme_command("linglab eval --ckpt runs/sft"), "--samples", "2", "--ks", "1,2", "--problems", "2",
         "--eval.max_new_tokens=8"],
        readme_command("linglab tasks export"),
    ]
    for args in steps:
        out = linglab(args, tmp_path)
        assert out.returncode == 0, (args, out.stderr)
    assert json.loads((tmp_path / "runs" / "rl" / "summary.json").read_text())["steps"] == 2
    summary = json.loads((tmp_path / "runs" / "eval" / "summary.json").read_text())
    assert summary["best_apex"] in summary["checkpoints"] and summary["settings"]["verifier"] == "math"
    assert (tmp_path / "tasks.jsonl").is_file() and (tmp_path / "runs" / "sft" / "model.safetensors").is_file()
