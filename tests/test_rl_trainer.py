"""The RL trainer (SPEC §5) end to end: every loss and correction, frozen router bias, metrics, exact resume, and the
pass@k / ApexEval evaluation (SPEC §6)."""

import json

import pytest
import torch
from conftest import tiny_config

from linglab import evals
from linglab.checkpoint import from_pretrained, save_pretrained
from linglab.config import ConfigError, load_config
from linglab.datasets import example_from_problem
from linglab.errors import LinglabError
from linglab.generate import GenerationResult
from linglab.model import build_model
from linglab.rl import trainer as trainer_module
from linglab.rl.rollout import Rollout, RolloutGroup
from linglab.rl.sft import load_prompts
from linglab.rl.trainer import STATE_NAME, RLTrainer, run_rl
from linglab.run import RunDir
from linglab.tasks import generate_problems, iter_corpus_texts
from linglab.tokenizer import Tokenizer, load_tokenizer

METRIC_KEYS = {"reward", "accuracy", "response_length", "entropy", "clip_fraction", "kl", "mask_fraction",
               "mean_abs_logdiff", "max_abs_logdiff", "tokens_generated", "time", "step_time", "rollout_time",
               "response_tokens", "prefill_tokens", "decode_steps", "decode_rows", "sync_s", "sync_bytes"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _start_checkpoint(path, tok, **model):
    """A tiny HF checkpoint with tokenizer.json whose responses vary in length."""
    model = build_model(tiny_config(num_hidden_layers=2, vocab_size=tok.vocab_size, **model).model, seed=0)
    with torch.no_grad():
        # A random model almost never samples EOS. One shared embedding component, read by EOS's output row, makes
        # EOS ~15% likely at every step: lengths vary, so the Evo-CoT length term gives each group reward variance.
        model.model.word_embeddings.weight[:, 0] = 1.0
        model.lm_head.weight[tok.eos_id, 0] = 0.35
    save_pretrained(model, path)
    tok.save(path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    tok = Tokenizer.train(iter_corpus_texts(300, seed=0), vocab_size=300)
    return _start_checkpoint(tmp_path_factory.mktemp("start"), tok)


@pytest.fixture(scope="module")
def hybrid_start(tmp_path_factory, start):
    """The same as a Ring-linear hybrid (SPEC §8): layer 0 linear, layer 1 softmax."""
    tok = load_tokenizer(start / "tokenizer.json")
    return _start_checkpoint(tmp_path_factory.mktemp("hybrid"), tok, layer_group_size=2, group_norm_size=2)


def rl_config(**rl):
    fast = dict(steps=3, group_size=4, prompts_per_step=2, max_new_tokens=16, ckpt_every=2, eval_problems=0,
                length_alpha=0.5, lr=1e-3)
    return load_config("tiny", overrides=[f"--rl.{k}={v}" for k, v in {**fast, **rl}.items()])


def trainer_for(start, run_dir, **rl):
    run_dir.mkdir()
    model, tok = from_pretrained(start), load_tokenizer(start / "tokenizer.json")
    cfg = rl_config(**rl).rl
    return RLTrainer(cfg, RunDir(run_dir, "rl", STATE_NAME), model, from_pretrained(start), tok, load_prompts(cfg),
                     log=lambda *a: None)


def biases(model):
    return {n: b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")}


@pytest.mark.parametrize("ckpt, algo, correction, precision", [
    ("start", "grpo", "none", "fp32"), ("start", "dapo", "icepop", "fp8"), ("start", "drgrpo", "tis", "fp8"),
    ("start", "gspo", "icepop", "fp8"), ("start", "lpo", "tis", "fp8"), ("start", "lpo", "icepop", "fp32"),
    ("hybrid_start", "grpo", "none", "fp32"), ("hybrid_start", "lpo", "icepop", "fp8"),
])
def test_three_steps_of_every_loss_and_correction(ckpt, request, tmp_path, monkeypatch, algo, correction, precision):
    start = request.getfixturevalue(ckpt)
    if algo == "dapo":  # the random model is never right, and DAPO trains only on groups both right and wrong
        monkeypatch.setattr(trainer_module, "rollout_rewards", lambda cfg, texts, answers, lengths, kind: (
            (lengths % 2).float(), lengths % 2 == 1, {}))
    trainer = trainer_for(start, tmp_path / "run", algo=algo, correction=correction, rollout_precision=precision)
    bias_before, head_before = biases(trainer.model), trainer.model.lm_head.weight.clone()
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert METRIC_KEYS <= row.keys()
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["mask_fraction"] <= 1 and row["response_length"] <= 16
        assert 0 < row["sync_s"] < row["rollout_time"] < row["step_time"] and row["sync_bytes"] > 0
        assert row["response_tokens"] == round(row["response_length"] * row["groups_sampled"] * 4)  # 4 samples
        assert row["groups_sampled"] == 2 or algo == "dapo"  # DAPO refills groups all right or all wrong
    assert any(not r["skipped"] for r in rows) and any(r["grad_norm"] for r in rows if not r["skipped"])
    if precision == "fp32":  # same weights: only the KV-cache path and the batch shape differ
        assert all(r["max_abs_logdiff"] < 1e-5 for r in rows)
    else:  # ~1e-4 on this model, whose GEMM weights are mostly tiny; the fp32 rows are ~1e-8
        assert all(r["mean_abs_logdiff"] > 2e-5 for r in rows)
    assert all(torch.equal(b, biases(trainer.model)[n]) for n, b in bias_before.items()), "router bias must stay frozen"
    assert not torch.equal(head_before, trainer.model.lm_head.weight)
    assert [p.name for p in RunDir(tmp_path / "run", "rl", STATE_NAME).checkpoints()] == ["step_000002", "step_000003"]


class ScriptedEngine:
    """Stands in for the rollout engine: round i's groups answer as `script[i]` says, one entry per group:
    "right"/"wrong" (every response), or "mixed" (the first response right, the others wrong). Right responses get
    different lengths, so an all-right group still has unequal Evo-CoT length terms."""

    def __init__(self, engine, tokenizer, script):
        self.engine, self.tokenizer, self.script, self.rounds = engine, tokenizer, list(script), []

    def generate_groups(self, prompts, group_size, seed, step, first_group, payloads):
        answers = self.script.pop(0)
        assert len(answers) == len(prompts), "the trainer asks for exactly the missing groups"
        self.rounds.append(len(prompts))
        groups = []
        for prompt, payload, kind in zip(prompts, payloads, answers, strict=True):
            rollouts = []
            for i in range(group_size):
                right = kind == "right" or (kind == "mixed" and i == 0)
                text = "ok\n" * i + f"answer: {payload.answer if right else -1}"
                tokens = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
                rollouts.append(Rollout(list(prompt), tokens, [-1.0] * len(tokens), [1] * len(tokens), eos=True))
            groups.append(RolloutGroup(list(prompt), rollouts, payload))
        return groups

    def __getattr__(self, name):  # sync_weights, work, version: the real engine's
        return getattr(self.engine, name)


@pytest.mark.parametrize("script, rounds, trained", [
    # Uniform groups every round: the refills stop at rl.dapo_max_rounds = 2, and nothing trains.
    ([["right", "wrong"], ["wrong", "right"], ["right", "right"]], [2, 2, 2], 0),
    # One mixed group first: one group is missing, then found in the first refill.
    ([["mixed", "right"], ["mixed"]], [2, 1], 2),
])
def test_dapo_refills_groups_whose_responses_are_all_right_or_all_wrong(start, tmp_path, script, rounds, trained):
    trainer = trainer_for(start, tmp_path / "run", algo="dapo", dapo_max_rounds=2, length_alpha=0.5)
    trainer.engine = ScriptedEngine(trainer.engine, trainer.tokenizer, script)
    groups, stats = trainer.collect()
    scored = trainer.score(groups)
    assert trainer.engine.rounds == rounds and stats["dapo_rounds"] == len(rounds) - 1
    assert scored.row["groups_sampled"] == sum(rounds) and scored.row["groups_trained"] == trained
    keep, rewards = scored.keep.view(-1, 4), scored.rewards.view(-1, 4)
    kinds = [kind for answers in script for kind in answers]
    assert keep[:, 0].tolist() == [kind == "mixed" for kind in kinds]
    # An all-right group's rewards differ (the length term) and it is dropped all the same: correctness decides.
    right = kinds.index("right")
    assert len(set(rewards[right].tolist())) == 4 and not keep[right].any()
    updated = trainer.update(scored)
    assert (updated["loss"] is None) == (trained == 0)


def test_dapo_refills_need_synchronous_rollouts():
    with pytest.raises(ConfigError, match="rl.dapo_max_rounds"):
        rl_config(algo="dapo", c3po=True)
    assert rl_config(algo="dapo", c3po=True, dapo_max_rounds=0).rl.c3po


@pytest.mark.parametrize("ckpt, engine", [("start", "static"), ("start", "continuous"),
                                          ("hybrid_start", "continuous")])
def test_c3po_steps_train_on_whole_groups_with_stale_tokens(ckpt, engine, request, tmp_path):
    start = request.getfixturevalue(ckpt)
    trainer = trainer_for(start, tmp_path / "run", c3po=True, c3po_capacity=12, c3po_budget=30,
                          c3po_max_retention=1, rollout_engine=engine, rollout_slots=8)
    rows = [trainer.train_step() for _ in range(3)]
    assert all(r["completed_tokens"] >= 30 and r["groups_sampled"] >= 1 for r in rows)
    assert any(r["carried_groups"] for r in rows) and any(r["stale_token_fraction"] > 0 for r in rows)
    assert all(len(g.rollouts) == 4 and not g.done for g in trainer.pool.groups)


@pytest.mark.parametrize("engine", ["static", "continuous"])
def test_run_then_resume_is_bit_exact(start, tmp_path, engine):
    options = dict(steps=4, c3po=True, c3po_capacity=12, c3po_budget=40, kl_coef=0.1, rollout_engine=engine)
    run_rl(rl_config(**options), start, tmp_path / "full")
    run_rl(rl_config(**{**options, "steps": 2}), start, tmp_path / "resumed")
    run_rl(rl_config(**options), None, tmp_path / "resumed", resume=True)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "full" / "final" / name).read_bytes() == (tmp_path / "resumed" / "final" / name).read_bytes()
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]


def test_sft_then_rl_writes_the_before_after_evaluation_and_report(start, tmp_path):
    cfg = rl_config(steps=2, sft_steps=2, sft_batch_size=2, sft_seq_len=32, eval_problems=2, eval_samples=2,
                    eval_ks="1,2")
    run_rl(cfg, start, tmp_path / "run")
    rl_eval = json.loads((tmp_path / "run" / "rl_eval.json").read_text())
    assert list(rl_eval) == ["before", "sft", "after"]
    for stage in rl_eval.values():
        assert set(stage["tiers"]) == {"easy", "medium", "hard"}
        for tier in stage["tiers"].values():
            assert all(0 <= tier[k] <= 1 for k in ("greedy_accuracy", "pass@1", "pass@2"))
            assert tier["apex"]["apex"] == max(tier["apex"]["variants"].values())
    for name in ("report.md", "plots/reward.png", "plots/mismatch.png", "final/model.safetensors", "rl_start/config.json"):
        assert (tmp_path / "run" / name).is_file(), name


def test_pass_at_k_and_apex_take_the_best_prompt_variant(start, monkeypatch):
    model, tok = from_pretrained(start), load_tokenizer(start / "tokenizer.json")
    problems = generate_problems(3, [0], seed=0, split="heldout") + generate_problems(3, [1], seed=0, split="heldout")
    examples = [example_from_problem(p) for p in problems]
    question = evals.EMBEDDED_VARIANTS[1]
    answers = {tuple(tok.encode(question.prompt(tok, e))): e.answer for e in examples}
    assert question.name == "question" and question.prompt(tok, examples[0]).startswith("What is ")

    def fake_generate(model, prompts, max_new_tokens, eos_id, temperature, seed):
        # Only the "question" variant is answered, and right in every other sample.
        texts = [f"answer: {answers[tuple(p)]}" if tuple(p) in answers and i % 2 == 0 else "answer: -1"
                 for i, p in enumerate(prompts)]
        return GenerationResult([tok.encode(t) for t in texts], [[] for _ in texts], [True] * len(texts))

    monkeypatch.setattr(evals, "generate", fake_generate)
    result = evals.policy_eval(model, tok, examples, n=4, ks=[1, 2], kind="numeric")
    assert set(result["subsets"]) == {"easy", "medium"}
    pooled = evals.overall(result["subsets"])
    apex = pooled["apex"]
    assert apex["best_variant"] == "question" and apex["variants"]["plain"] == 0.0
    assert apex["apex"] == pytest.approx(1 - 1 / 6) and all(apex["apex"] >= v for v in apex["variants"].values())
    # greedy accuracy and pass@k read the first variant, "plain", which is never answered
    assert all(s[k] == 0.0 for s in result["subsets"].values() for k in ("greedy_accuracy", "pass@1", "pass@2"))
    monkeypatch.undo()
    sampled = evals.policy_eval(model, tok, examples, n=2, ks=[1, 2], kind="numeric")["subsets"]
    assert all(0 <= t[k] <= 1 for t in sampled.values() for k in ("pass@1", "pass@2", "greedy_accuracy"))


def test_bad_input_is_one_line_before_anything_is_written(start, tmp_path):
    with pytest.raises(LinglabError, match="checkpoint not found"):
        run_rl(rl_config(), tmp_path / "missing", tmp_path / "out")
    with pytest.raises(LinglabError, match="--ckpt is required"):
        run_rl(rl_config(), None, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    for override, message in (("algo=ppo", "rl.algo must be one of"), ("c3po_capacity=2", "rl.c3po_capacity"),
                              ("eval_ks=1,16", "rl.eval_ks")):
        with pytest.raises(ConfigError, match=message):
            rl_config(**dict([override.split("=")]))


def test_sft_command_writes_a_checkpoint_rl_can_start_from(start, tmp_path, capsys):
    from linglab.cli import main

    out = tmp_path / "sft"
    args = ["sft", "--ckpt", str(start), "--out", str(out), "--rl.sft_steps=2", "--rl.sft_batch_size=2",
            "--rl.sft_seq_len=32", "--rl.eval_problems=2", "--rl.eval_samples=2", "--rl.eval_ks=1,2"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sft_step"] for r in rows if r["kind"] == "sft"] == [1, 2]
    assert set(json.loads((out / "sft_eval.json").read_text())) == {"before", "after"}
    tuned = from_pretrained(out)
    assert not torch.equal(tuned.lm_head.weight, from_pretrained(start).lm_head.weight)
    assert main(["rl", "--ckpt", str(out), "--out", str(tmp_path / "rl"), "--rl.steps=1", "--rl.group_size=2",
                 "--rl.prompts_per_step=1", "--rl.max_new_tokens=8", "--rl.eval_problems=0"]) == 0
    capsys.readouterr()
    assert main(args) == 2  # an existing --out is never overwritten without --overwrite
    assert main([*args[:5], "--rl.sft_steps=0", "--overwrite"]) == 2
    assert "rl.sft_steps" in capsys.readouterr().err and (out / "model.safetensors").is_file()
    bare = tmp_path / "bare"  # an HF checkpoint without tokenizer.json: both commands refuse it before writing
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((start / name).read_bytes())
    for command in ("sft", "rl"):
        assert main([command, "--ckpt", str(bare), "--out", str(tmp_path / f"{command}-bare"), "--rl.sft_steps=1"]) == 2
        assert "has no tokenizer.json" in capsys.readouterr().err and not (tmp_path / f"{command}-bare").exists()


def test_sft_and_rl_commands_on_a_hybrid_checkpoint(hybrid_start, tmp_path):
    from linglab.cli import main

    sft, rl = tmp_path / "sft", tmp_path / "rl"
    assert main(["sft", "--ckpt", str(hybrid_start), "--out", str(sft), "--rl.sft_steps=1", "--rl.sft_batch_size=2",
                 "--rl.sft_seq_len=32", "--rl.eval_problems=0"]) == 0
    assert main(["rl", "--ckpt", str(sft), "--out", str(rl), "--rl.steps=1", "--rl.group_size=2",
                 "--rl.prompts_per_step=1", "--rl.max_new_tokens=8", "--rl.eval_problems=0"]) == 0
    for ckpt in (sft, rl / "final"):
        assert json.loads((ckpt / "config.json").read_text())["model_type"] == "bailing_moe_linear"
    assert not torch.equal(from_pretrained(rl / "final").lm_head.weight, from_pretrained(sft).lm_head.weight)
