"""RL, SFT and evaluation on the user's own prompt files (issue 14, SPEC §10), through the commands a user types:
GSM8K- and MATH-shaped JSONL written by hand, `linglab sft`, `linglab rl --data`, `linglab eval --data`, resume after
kill -9, the embedded tiers exported to a file training like the built-in default, and bad rows."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config

from linglab.checkpoint import save_pretrained
from linglab.cli import main
from linglab.datasets import load_prompt_set
from linglab.model import build_model
from linglab.tasks import iter_corpus_texts
from linglab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# Small and fast: two RL steps of 2 prompts x 2 samples, short completions, a tiny evaluation.
RL_FAST = ["--rl.steps=2", "--rl.group_size=2", "--rl.prompts_per_step=2", "--rl.max_new_tokens=12",
           "--rl.eval_problems=2", "--rl.eval_samples=2", "--rl.eval_ks=1,2", "--rl.ckpt_every=1"]
SFT_FAST = ["--rl.sft_steps=3", "--rl.sft_batch_size=2", "--rl.sft_seq_len=64", "--rl.eval_problems=2",
            "--rl.eval_samples=2", "--rl.eval_ks=1,2", "--rl.max_new_tokens=12", "--rl.ckpt_every=1"]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny HF checkpoint with its tokenizer (trained on the embedded corpus: letters are byte tokens)."""
    tok = Tokenizer.train(iter_corpus_texts(300, seed=0), vocab_size=300)
    model = build_model(tiny_config(num_hidden_layers=2, vocab_size=tok.vocab_size).model, seed=0)
    with torch.no_grad():  # EOS ~15% likely at every step, so responses end and vary in length
        model.model.word_embeddings.weight[:, 0] = 1.0
        model.lm_head.weight[tok.eos_id, 0] = 0.35
    path = tmp_path_factory.mktemp("start")
    save_pretrained(model, path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """40 GSM8K-shaped rows and 40 MATH-shaped rows, as a user would write them."""
    root = tmp_path_factory.mktemp("data")
    names = ["Ann", "Ben", "Cara", "Dan"]
    gsm8k = [{"question": f"{names[i % 4]} has {i + 3} apples and buys {2 * i + 1} more. How many apples now?",
              "answer": f"{i + 3} + {2 * i + 1} = {3 * i + 4}.\n#### {3 * i + 4}"} for i in range(40)]
    math = [{"problem": f"Simplify $\\frac{{{2 * (i + 1)}}}{{{4 * (i + 1)}}} + {i}$.",
             "solution": f"The fraction is $\\frac{{1}}{{2}}$, so the sum is $\\boxed{{{i}+\\frac{{1}}{{2}}}}$."}
            for i in range(40)]
    for name, rows in (("gsm8k.jsonl", gsm8k), ("math.jsonl", math)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_rl_and_eval_on_gsm8k_and_math_files(start, files, tmp_path):
    sft, rl, ev = tmp_path / "sft", tmp_path / "rl", tmp_path / "eval"
    assert main(["sft", "--ckpt", str(start), "--out", str(sft), "--data", str(files / "gsm8k.jsonl"), *SFT_FAST]) == 0
    assert [r["step"] for r in rows_of(sft / "metrics.jsonl") if r["kind"] == "sft"] == [1, 2, 3]
    assert "## Evaluation before vs after" in (sft / "report.md").read_text() and (sft / "plots" / "sft_loss.png").is_file()
    summary = json.loads((sft / "summary.json").read_text())
    split = load_prompt_set(files / "gsm8k.jsonl")  # the train rows SFT sees: all but those held out by hash
    assert summary["examples"] == len(split.train) and 0 < len(split.heldout) < 40 and summary["data"] == str(files / "gsm8k.jsonl")
    assert main(["rl", "--ckpt", str(sft), "--out", str(rl), "--data", str(files / "gsm8k.jsonl"), "--rl.algo=lpo",
                 "--rl.correction=icepop", *RL_FAST]) == 0
    summary = json.loads((rl / "summary.json").read_text())
    assert summary["verifier"] == "numeric" and summary["train_prompts"] + summary["heldout_prompts"] == 40
    rl_eval = json.loads((rl / "rl_eval.json").read_text())
    assert list(rl_eval) == ["before", "after"] and list(rl_eval["after"]["tiers"]) == ["all"]
    assert (rl / "report.md").is_file() and (rl / "final" / "model.safetensors").is_file()

    assert main(["eval", "--ckpt", str(start), "--ckpt", str(rl / "final"), "--data", str(files / "math.jsonl"),
                 "--verifier", "math", "--samples", "2", "--ks", "1,2", "--problems", "4",
                 "--eval.max_new_tokens=8", "--out", str(ev)]) == 0
    summary = json.loads((ev / "summary.json").read_text())
    assert list(summary["checkpoints"]) == [start.name, "final"]  # labelled by directory name
    assert summary["best_apex"] in summary["checkpoints"] and summary["settings"]["verifier"] == "math"
    for label in summary["checkpoints"]:
        record = json.loads((ev / f"{label}.json").read_text())
        assert record["subsets"]["all"]["n_problems"] == 4
        assert set(record["all"]["apex"]["variants"]) >= {"instant", "instant+system", "thinking"}
    assert main(["eval", "--ckpt", str(start), "--data", str(files / "math.jsonl"), "--out", str(ev)]) == 2  # exists
    # As if killed before the second checkpoint finished: --resume keeps the first one's file and redoes the other.
    first, second = (ev / f"{label}.json" for label in summary["checkpoints"])
    kept = first.read_text()
    second.unlink()
    assert main(["eval", "--ckpt", str(start), "--ckpt", str(rl / "final"), "--data", str(files / "math.jsonl"),
                 "--verifier", "math", "--samples", "2", "--ks", "1,2", "--problems", "4",
                 "--eval.max_new_tokens=8", "--out", str(ev), "--resume"]) == 0
    assert first.read_text() == kept and second.is_file()
    # --overwrite with one checkpoint: the earlier comparison's records go, a file of the user's stays.
    (ev / "notes.json").write_text('{"mine": 1}')
    assert main(["eval", "--ckpt", str(rl / "final"), "--data", str(files / "math.jsonl"), "--verifier", "math",
                 "--samples", "2", "--ks", "1,2", "--problems", "4", "--eval.max_new_tokens=8", "--out", str(ev),
                 "--overwrite"]) == 0
    assert not first.exists() and second.is_file() and (ev / "notes.json").read_text() == '{"mine": 1}'
    assert list(json.loads((ev / "summary.json").read_text())["checkpoints"]) == ["final"]


def _killed_then_resumed(args, out, stop_at, env):
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not any(c.name >= stop_at for c in out.glob("checkpoints/step_*")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run([sys.executable, "-m", "linglab.cli", args[3], "--out", str(out), "--resume"], check=True,
                   capture_output=True, env=env)


@pytest.mark.parametrize("command", ["sft", "rl"])
def test_kill_9_then_resume_ends_bit_exact_on_a_file(start, files, tmp_path, command):
    fast = SFT_FAST + ["--rl.sft_steps=6", "--rl.eval_problems=0"] if command == "sft" else \
        RL_FAST + ["--rl.steps=5", "--rl.eval_problems=0", "--rl.algo=lpo"]
    args = [sys.executable, "-m", "linglab.cli", command, "--ckpt", str(start), "--data", str(files / "gsm8k.jsonl"),
            *fast]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([*args, "--out", str(tmp_path / "full")], check=True, capture_output=True, env=env)
    _killed_then_resumed(args, tmp_path / "killed", "step_000002", env)
    weights = "model.safetensors" if command == "sft" else "final/model.safetensors"
    assert (tmp_path / "full" / weights).read_bytes() == (tmp_path / "killed" / weights).read_bytes()


def test_exported_tasks_train_rl_exactly_like_the_builtin_default(start, tmp_path):
    train, heldout = tmp_path / "train.jsonl", tmp_path / "heldout.jsonl"
    sizes = ["--rl.train_problems=64", "--rl.eval_problems=2"]
    assert main(["tasks", "export", "--out", str(train), "--n", "64"]) == 0
    assert main(["tasks", "export", "--out", str(heldout), "--split", "heldout", "--n", "2"]) == 0
    common = [*RL_FAST, *sizes, "--rl.tiers=1,2", "--rl.eval_problems=0"]
    assert main(["rl", "--ckpt", str(start), "--out", str(tmp_path / "builtin"), *common]) == 0
    assert main(["rl", "--ckpt", str(start), "--out", str(tmp_path / "file"), "--data", str(train),
                 "--eval-data", str(heldout), *common]) == 0
    assert (tmp_path / "builtin" / "final" / "model.safetensors").read_bytes() == \
        (tmp_path / "file" / "final" / "model.safetensors").read_bytes()
    drop = {"time", "step_time", "rollout_time", "sync_s"}  # wall times
    train_rows = [{k: v for k, v in r.items() if k not in drop} for r in rows_of(tmp_path / "builtin" / "metrics.jsonl")]
    assert train_rows == [{k: v for k, v in r.items() if k not in drop} for r in rows_of(tmp_path / "file" / "metrics.jsonl")]


def test_a_bad_row_is_one_line_and_skip_bad_rows_counts_it(start, files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = (files / "gsm8k.jsonl").read_text().splitlines()
    lines[6] = json.dumps({"question": "What is 2+2?", "answer": "4, no final-answer marker"})
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "rl"
    assert main(["rl", "--ckpt", str(start), "--out", str(out), "--data", str(bad), *RL_FAST]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:7" in err and "answer" in err and len(err.strip().splitlines()) == 1 and not out.exists()
    assert main(["rl", "--ckpt", str(start), "--out", str(out), "--data", str(bad), "--skip-bad-rows", *RL_FAST]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_rows"] == 1 and summary["train_prompts"] + summary["heldout_prompts"] == 39
    assert main(["rl", "--ckpt", str(start), "--out", str(tmp_path / "x"), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # --resume trusts the run's own config: another data file is refused, and so is the same file edited
    assert main(["rl", "--out", str(out), "--resume", "--data", str(files / "gsm8k.jsonl")]) == 2
    assert "rl.data" in capsys.readouterr().err
    bad.write_text(bad.read_text().replace("apples", "pears"))
    assert main(["rl", "--out", str(out), "--resume", "--rl.steps=3"]) == 2
    assert "differ from those the run was started with" in capsys.readouterr().err


def test_generate_chat_renders_the_prompt_through_the_template(start, capsys):
    assert main(["generate", "--ckpt", str(start), "--prompt", "1+1=?", "--chat", "--mode", "thinking",
                 "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("1+1=?\n<think>\n")  # linglab's template opens the thinking block


def test_out_holding_the_prompt_file_is_refused_even_with_overwrite(start, files, tmp_path, capsys):
    """--overwrite deletes the old --out: one that holds the command's own prompt file is refused, the file kept."""
    data = tmp_path / "work" / "gsm8k.jsonl"
    data.parent.mkdir()
    data.write_bytes((files / "gsm8k.jsonl").read_bytes())
    for args in (["rl", "--ckpt", str(start), *RL_FAST], ["sft", "--ckpt", str(start), *SFT_FAST],
                 ["eval", "--ckpt", str(start)]):
        assert main([*args, "--data", str(data), "--out", str(data.parent), "--overwrite"]) == 2
        assert "overlaps the input" in capsys.readouterr().err and data.read_bytes() == (files / "gsm8k.jsonl").read_bytes()


def test_a_prompt_too_long_for_the_context_is_named_before_anything_is_written(start, files, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--ckpt", str(start), "--data", str(files / "gsm8k.jsonl"), "--eval.max_new_tokens=32768",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{files / 'gsm8k.jsonl'}:1" in err and "eval.max_new_tokens=32768" in err
    assert not out.exists()  # nothing written
