"""Colocated RL on torch.distributed (issue 15 item 1): every rank trains its FSDP2 shards and samples its share of the
step's groups; the run equals one process with the same seeds.

One 2-rank launch (gloo, CPU) runs a bad layout, then 2 steps, then a resume to step 3, and a DAPO run whose
scripted rewards leave one rank without a group to train in some steps (it then runs the step's collectives with
its loss weighted 0); the single-process runs happen in the test process.

Rollouts are batch-invariant (each draws from its own generator), so both sample the same tokens; the losses,
rewards and weights then differ only by fp32 summation order (per-rank partial sums, the FSDP2 average): 1e-5.
AdamW divides each update by the root of its squared gradient, so an element whose gradient is a near-cancelling
sum (an lm_head row of a token never sampled: its terms are weighted by zero-mean group advantages) turns rounding
into up to an lr-sized step: one such element moved 2.3e-5 at lr 1e-3. The comparisons run at lr 1e-4, where
every weight still moves ~3e-4 and a lost or doubled rank's gradient would move many by that.
"""

import functools
import json

import pytest
import torch
from dist_utils import requires_gloo, run_on_ranks
from safetensors.torch import load_file
from test_rl_trainer import rl_config, start  # noqa: F401 - the module fixture: a tiny start checkpoint

import linglab.rl.report
from linglab.errors import LinglabError
from linglab.rl import trainer as trainer_module
from linglab.rl.trainer import run_rl

pytestmark = requires_gloo
OPTIONS = dict(kl_coef=0.1, lr=1e-4)  # GRPO divides by responses, the KL term by tokens: both global counts are used
TOL = 1e-5


DAPO = dict(algo="dapo", dapo_max_rounds=0, lr=1e-4, steps=3)


def _skip_report() -> None:
    """The report's plots take seconds per run on 2 shared cores and are not what is compared here."""
    linglab.rl.report.write_rl_report = lambda run_dir: run_dir / "report.md"


def _odd_lengths_are_right(cfg, completions, answers, lengths, kind="numeric"):
    """The random model is never right: a scripted verdict, so that DAPO keeps some groups and drops others."""
    return (lengths % 2).float(), lengths % 2 == 1, {}


def _colocated(rank, world_size, ckpt, root):
    _skip_report()
    with pytest.raises(LinglabError, match=r"rl.prompts_per_step=3 groups do not split evenly over 2 ranks"):
        run_rl(rl_config(**OPTIONS, prompts_per_step=3), ckpt, root / "bad")
    with pytest.raises(LinglabError, match=r"rl.c3po on 2 ranks is not supported yet"):
        run_rl(rl_config(**OPTIONS, c3po=True), ckpt, root / "bad")
    assert not (root / "bad").exists()
    run_rl(rl_config(**OPTIONS, steps=2), ckpt, root / "dp2")
    run_rl(rl_config(**OPTIONS, steps=3), None, root / "dp2", resume=True)
    trainer_module.rollout_rewards = _odd_lengths_are_right
    run_rl(rl_config(**DAPO), ckpt, root / "dapo-dp2")


def _train_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in line]


def test_two_colocated_ranks_equal_one_process_and_resume(start, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(linglab.rl.report, "write_rl_report", lambda run_dir: run_dir / "report.md")
    run_rl(rl_config(**OPTIONS), start, tmp_path / "single")
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "rollout_rewards", _odd_lengths_are_right)
        run_rl(rl_config(**DAPO), start, tmp_path / "dapo")
    run_on_ranks(functools.partial(_colocated, ckpt=start, root=tmp_path), tmp_path, world_size=2)
    single, dp2 = _train_rows(tmp_path / "single"), _train_rows(tmp_path / "dp2")
    assert [r["step"] for r in dp2] == [1, 2, 3]
    for one, two in zip(single, dp2, strict=True):
        assert one["response_tokens"] == two["response_tokens"] and one["groups_sampled"] == two["groups_sampled"] == 2
        for key in ("reward", "loss", "kl", "grad_norm", "entropy", "response_length"):
            assert two[key] == pytest.approx(one[key], abs=TOL, rel=TOL), key
        assert two["sync_bytes"] == one["sync_bytes"] > 0 and two["sync_s"] > 0
    dapo, dapo_dp2 = _train_rows(tmp_path / "dapo"), _train_rows(tmp_path / "dapo-dp2")
    assert 1 in [r["groups_trained"] for r in dapo], "a step where one rank has no group to train"
    for one, two in zip(dapo, dapo_dp2, strict=True):
        assert one["groups_trained"] == two["groups_trained"]
        for key in ("loss", "grad_norm", "clip_fraction"):
            assert two[key] == pytest.approx(one[key], abs=TOL, rel=TOL), key
    for single, dp2 in (("single", "dp2"), ("dapo", "dapo-dp2")):
        ours, theirs = (load_file(tmp_path / run / "final" / "model.safetensors") for run in (single, dp2))
        assert ours.keys() == theirs.keys()
        for name, tensor in ours.items():
            torch.testing.assert_close(theirs[name], tensor, atol=TOL, rtol=0, msg=f"{dp2}: {name}")
